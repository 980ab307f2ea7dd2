//! Checkpoints in any object store or local folder, published atomically, the newest few kept.
//!
//! A checkpoint root (`checkpoint.url`, by default `RUN_DIR/checkpoints`) holds:
//!
//! ```text
//! ckpt-00001000/model.safetensors      every variable of the var store (weights, batch-norm
//!                                      statistics and counters), `trunk.*` and `heads.0.*`
//! ckpt-00001000/optimizer.safetensors  LARC-SGD momentum buffers, keyed by parameter name
//! ckpt-00001000/queue.safetensors      the SwAV queue (`queue`), when the run has one
//! ckpt-00001000/config.toml            the resolved configuration
//! ckpt-00001000/state.json             step, data-stream position, loss scale, seeds (TrainState)
//! latest.json                          {"checkpoint": "ckpt-00001000", "step": 1000}
//! ```
//!
//! **Atomic publication.** Every object store writes single objects atomically, but has no
//! atomic rename of a folder. So the files of a checkpoint are written first, under a folder
//! nobody reads yet, `state.json` last among them; then `latest.json` is replaced to point at
//! the folder. A reader goes through `latest.json` and never sees a checkpoint that is still
//! being written: a run killed mid-save leaves the previous checkpoint published and a stale
//! folder that the next save of that step overwrites.
//!
//! **Retention.** After publishing, every checkpoint folder older than the newest `keep_last`
//! published ones is deleted. Folders newer than the published one (left by a killed run) are
//! left alone.
//!
//! **Random state.** The trainer draws from torch's generator only to initialize the model; each
//! step reseeds it from `(seed, step)` ([`step_seed`]), so the seed in `state.json` and the step
//! determine every torch random number of a resumed run. The augmenter's randomness is part of
//! its stream position.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use augment::StreamState;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use shards::{Location, StoreOptions};
use tch::nn::VarStore;
use tch::{Device, TchError, Tensor};

/// The pointer to the newest published checkpoint.
pub const LATEST: &str = "latest.json";
/// The trainer's state in a checkpoint folder.
pub const STATE: &str = "state.json";
/// Every variable of the model.
pub const MODEL: &str = "model.safetensors";
/// The optimizer's momentum buffers.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// The SwAV queue.
pub const QUEUE: &str = "queue.safetensors";
/// The resolved configuration.
pub const CONFIG: &str = "config.toml";

/// Format version of [`TrainState`].
const STATE_VERSION: u32 = 1;

/// What can go wrong writing or reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store refused a read, write, listing or deletion.
    #[error(transparent)]
    Store(#[from] shards::StoreError),
    /// Listing or deleting in the store failed.
    #[error("{url}: {source}")]
    ObjectStore {
        /// What was being listed or deleted.
        url: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// libtorch could not write or read a tensor file.
    #[error("{what}: {source}")]
    Torch {
        /// The file.
        what: String,
        /// libtorch's error.
        #[source]
        source: TchError,
    },
    /// A local temporary file could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A trial write before training found that checkpoints cannot be stored here.
    #[error("checkpoints cannot be written to {url}: {source}")]
    NotWritable {
        /// The checkpoint root.
        url: String,
        /// The store's refusal (boxed: it is large, and this error is rare).
        #[source]
        source: Box<shards::StoreError>,
    },
    /// A checkpoint that does not fit the model, or a malformed one.
    #[error("{url}: {reason}")]
    Invalid {
        /// The checkpoint or file.
        url: String,
        /// What does not fit.
        reason: String,
    },
    /// Nothing to resume from.
    #[error("{url}: no checkpoint (neither {LATEST} nor {STATE} there)")]
    NotFound {
        /// Where the checkpoint was looked for.
        url: String,
    },
}

/// The dynamic loss scale of fp16 training, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    /// The current scale.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
}

/// Everything about a run besides tensors, as `state.json` holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainState {
    /// Format version.
    pub version: u32,
    /// Steps completed: a resumed run continues with this step (0-based).
    pub step: u64,
    /// The data stream just after the last batch consumed; `None` before the first.
    pub stream: Option<StreamState>,
    /// Images consumed so far (all ranks).
    pub images_seen: u64,
    /// Steps skipped in total (non-finite loss or fp16 overflow).
    pub skipped_steps: u64,
    /// Steps skipped in a row up to now.
    pub skipped_in_a_row: u32,
    /// The fp16 loss scale, in fp16 runs.
    pub loss_scale: Option<LossScaleState>,
    /// The run's seed: torch's generator was seeded with it (`crate::train::init_seed`) before
    /// the model was built and is reseeded with [`step_seed`]`(seed, step)` before every step.
    pub seed: u64,
    /// The data stream's seed.
    pub data_seed: u64,
    /// [`crate::config::TrainConfig::digest`] of the configuration that wrote the checkpoint.
    pub config_digest: String,
    /// In a data-parallel run, every rank's data stream, in rank order (`stream` is rank 0's);
    /// empty for a single process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<Option<StreamState>>,
}

impl TrainState {
    /// A fresh state at step 0.
    pub fn new(seed: u64, data_seed: u64, config_digest: String) -> Self {
        TrainState {
            version: STATE_VERSION,
            step: 0,
            stream: None,
            images_seen: 0,
            skipped_steps: 0,
            skipped_in_a_row: 0,
            loss_scale: None,
            seed,
            data_seed,
            config_digest,
            streams: Vec::new(),
        }
    }
}

/// The torch seed of `step` in a run seeded with `seed` (SplitMix64 of both, kept within
/// `i64` as `tch::manual_seed` takes it).
pub fn step_seed(seed: u64, step: u64) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// The content of `latest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    /// Folder name of the newest published checkpoint.
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its URL.
    pub url: String,
    /// `state.json`.
    pub state: TrainState,
    /// Every model variable, on the CPU.
    pub model: Vec<(String, Tensor)>,
    /// The momentum buffers, on the CPU.
    pub optimizer: Vec<(String, Tensor)>,
    /// The queue, if the run had one.
    pub queue: Option<Tensor>,
    /// The resolved configuration, as saved.
    pub config: String,
}

/// The parts of a run a checkpoint saves.
pub struct Snapshot<'a> {
    /// The model.
    pub vs: &'a VarStore,
    /// The optimizer's state (`LarcSgd::state`).
    pub optimizer: &'a [(String, Tensor)],
    /// The SwAV queue, if any.
    pub queue: Option<&'a Tensor>,
    /// The trainer's state.
    pub state: &'a TrainState,
    /// The resolved configuration (`TrainConfig::to_toml`).
    pub config: &'a str,
}

/// The name of the checkpoint folder of `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("ckpt-{step:08}")
}

fn step_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-")?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// A checkpoint root in an object store or local folder.
pub struct CheckpointStore {
    location: Location,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("url", &self.location.url)
            .finish()
    }
}

impl CheckpointStore {
    /// Opens the root at `url` (a URL or local folder; a local folder is created).
    pub fn open(url: &str, options: &StoreOptions) -> Result<Self, CheckpointError> {
        Self::open_with(url, options, true)
    }

    /// Opens an existing root (a local folder must exist).
    pub fn open_existing(url: &str, options: &StoreOptions) -> Result<Self, CheckpointError> {
        Self::open_with(url, options, false)
    }

    fn open_with(url: &str, options: &StoreOptions, create: bool) -> Result<Self, CheckpointError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| CheckpointError::Io {
                path: PathBuf::from(url),
                source,
            })?;
        Ok(CheckpointStore {
            location: Location::open(url, options, create)?,
            runtime,
        })
    }

    /// Writes and deletes a small object, so that a root that cannot take checkpoints (a
    /// read-only bucket or disk, credentials that may only read) stops a run before it trains,
    /// not at its first checkpoint hours later.
    pub fn check_writable(&self) -> Result<(), CheckpointError> {
        self.runtime
            .block_on(self.location.check_writable())
            .map_err(|source| CheckpointError::NotWritable {
                url: self.location.url.clone(),
                source: Box::new(source),
            })
    }

    /// The root's URL.
    pub fn url(&self) -> &str {
        &self.location.url
    }

    /// Writes a checkpoint of `snapshot.state.step`, publishes it, and deletes all but the
    /// newest `keep_last` published checkpoints. Returns the checkpoint's URL.
    pub fn save(
        &self,
        snapshot: &Snapshot<'_>,
        keep_last: usize,
    ) -> Result<String, CheckpointError> {
        let step = snapshot.state.step;
        let name = checkpoint_name(step);
        let scratch = tempfile::tempdir().map_err(|source| CheckpointError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let mut files = vec![(MODEL, variables_of(snapshot.vs))];
        files.push((OPTIMIZER, to_cpu(snapshot.optimizer)));
        if let Some(queue) = snapshot.queue {
            files.push((
                QUEUE,
                to_cpu(&[("queue".to_owned(), queue.shallow_clone())]),
            ));
        }
        self.runtime.block_on(async {
            for (file, tensors) in files {
                let path = scratch.path().join(file);
                Tensor::write_safetensors(&tensors, &path).map_err(|source| {
                    CheckpointError::Torch {
                        what: path.display().to_string(),
                        source,
                    }
                })?;
                self.location
                    .put_file(&format!("{name}/{file}"), &path)
                    .await?;
            }
            self.location
                .put_bytes(&format!("{name}/{CONFIG}"), snapshot.config.to_owned())
                .await?;
            // Last in the folder, then the pointer: see the module documentation.
            self.location
                .put_json(&format!("{name}/{STATE}"), snapshot.state)
                .await?;
            self.location
                .put_json(
                    LATEST,
                    &Latest {
                        checkpoint: name.clone(),
                        step,
                    },
                )
                .await?;
            self.prune(step, keep_last).await
        })?;
        Ok(self.location.url_of(&self.location.child(&name)))
    }

    /// Published-or-older checkpoint folders, oldest first.
    pub fn list(&self) -> Result<Vec<String>, CheckpointError> {
        self.runtime.block_on(self.list_async())
    }

    async fn list_async(&self) -> Result<Vec<String>, CheckpointError> {
        let prefix = (!self.location.prefix.as_ref().is_empty()).then_some(&self.location.prefix);
        let listing = self
            .location
            .store
            .list_with_delimiter(prefix)
            .await
            .map_err(|source| CheckpointError::ObjectStore {
                url: self.location.url.clone(),
                source,
            })?;
        let names: BTreeSet<(u64, String)> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| {
                let name = p.filename()?.to_owned();
                Some((step_of(&name)?, name))
            })
            .collect();
        Ok(names.into_iter().map(|(_, name)| name).collect())
    }

    async fn prune(&self, published: u64, keep_last: usize) -> Result<(), CheckpointError> {
        let older: Vec<String> = self
            .list_async()
            .await?
            .into_iter()
            .filter(|name| step_of(name).is_some_and(|s| s <= published))
            .collect();
        let excess = older.len().saturating_sub(keep_last.max(1));
        for name in &older[..excess] {
            let folder = self.location.child(name);
            let objects: Vec<_> = self
                .location
                .store
                .list(Some(&folder))
                .try_collect()
                .await
                .map_err(|source| CheckpointError::ObjectStore {
                    url: self.location.url_of(&folder),
                    source,
                })?;
            // state.json first: a half-deleted folder no longer looks like a checkpoint.
            let mut paths: Vec<_> = objects.into_iter().map(|o| o.location).collect();
            paths.sort_by_key(|p| p.filename() != Some(STATE));
            for path in paths {
                match self.location.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(source) => {
                        return Err(CheckpointError::ObjectStore {
                            url: self.location.url_of(&path),
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// `latest.json`, if a checkpoint was published.
    pub fn latest(&self) -> Result<Option<Latest>, CheckpointError> {
        Ok(self.runtime.block_on(self.location.get_json_opt(LATEST))?)
    }

    /// The newest checkpoint folder that was written to the end (it has its `state.json`,
    /// written last), published or not. Where `latest.json` is missing, such a folder means
    /// that `latest.json` was lost, not that no run was here.
    pub fn newest_complete(&self) -> Result<Option<String>, CheckpointError> {
        self.runtime.block_on(async {
            for name in self.list_async().await?.into_iter().rev() {
                let state = self
                    .location
                    .get_bytes_opt(&format!("{name}/{STATE}"))
                    .await?;
                if state.is_some() {
                    return Ok(Some(name));
                }
            }
            Ok(None)
        })
    }

    /// Reads the checkpoint folder `name` of this root.
    pub fn load(&self, name: &str) -> Result<Checkpoint, CheckpointError> {
        self.runtime.block_on(async {
            let url = self.location.url_of(&self.location.child(name));
            let state: TrainState = self.location.get_json(&format!("{name}/{STATE}")).await?;
            if state.version != STATE_VERSION {
                return Err(CheckpointError::Invalid {
                    url,
                    reason: format!(
                        "state format version {}, this trainer reads {STATE_VERSION}",
                        state.version
                    ),
                });
            }
            // The folder is named for the step its state holds; a state edited or copied from
            // elsewhere would resume at a step the weights do not belong to.
            if let Some(step) = step_of(name)
                && step != state.step
            {
                return Err(CheckpointError::Invalid {
                    url: format!("{url}/{STATE}"),
                    reason: format!(
                        "it holds step {}, but its folder {name} is named for step {step}",
                        state.step
                    ),
                });
            }
            let config = self.location.get_bytes(&format!("{name}/{CONFIG}")).await?;
            let config =
                String::from_utf8(config.to_vec()).map_err(|e| CheckpointError::Invalid {
                    url: format!("{url}/{CONFIG}"),
                    reason: e.to_string(),
                })?;
            let scratch = tempfile::tempdir().map_err(|source| CheckpointError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
            let model = self.read_tensors(name, MODEL, scratch.path()).await?;
            let optimizer = self.read_tensors(name, OPTIMIZER, scratch.path()).await?;
            let queue = match self
                .location
                .get_bytes_opt(&format!("{name}/{QUEUE}"))
                .await?
            {
                None => None,
                Some(_) => {
                    let mut tensors = self.read_tensors(name, QUEUE, scratch.path()).await?;
                    let position = tensors.iter().position(|(k, _)| k == "queue");
                    Some(
                        tensors
                            .swap_remove(position.ok_or_else(|| CheckpointError::Invalid {
                                url: format!("{url}/{QUEUE}"),
                                reason: "no tensor named queue".into(),
                            })?)
                            .1,
                    )
                }
            };
            // Training never writes a non-finite value (`crate::train` checks before saving),
            // so one here means the file was damaged after it was written.
            let queue_file: Vec<(String, Tensor)> = queue
                .iter()
                .map(|q| ("queue".to_owned(), q.shallow_clone()))
                .collect();
            let files = [
                (MODEL, &model),
                (OPTIMIZER, &optimizer),
                (QUEUE, &queue_file),
            ];
            for (file, tensors) in files {
                if let Some(name) = first_non_finite(tensors) {
                    return Err(non_finite(&format!("{url}/{file}"), name));
                }
            }
            Ok(Checkpoint {
                url,
                state,
                model,
                optimizer,
                queue,
                config,
            })
        })
    }

    async fn read_tensors(
        &self,
        name: &str,
        file: &str,
        scratch: &Path,
    ) -> Result<Vec<(String, Tensor)>, CheckpointError> {
        let bytes = self.location.get_bytes(&format!("{name}/{file}")).await?;
        let path = scratch.join(file);
        std::fs::write(&path, &bytes).map_err(|source| CheckpointError::Io {
            path: path.clone(),
            source,
        })?;
        Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Torch {
            what: self
                .location
                .url_of(&self.location.child(&format!("{name}/{file}"))),
            source,
        })
    }
}

/// Opens what `--resume` names: a checkpoint root (its `latest.json` is followed) or one
/// checkpoint folder (with a `state.json`).
pub fn load_checkpoint(url: &str, options: &StoreOptions) -> Result<Checkpoint, CheckpointError> {
    let root = CheckpointStore::open_existing(url, options)?;
    if let Some(latest) = root.latest()? {
        return root.load(&latest.checkpoint);
    }
    let trimmed = url.trim_end_matches('/');
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some((parent, name)) => (if parent.is_empty() { "/" } else { parent }, name),
        None => (".", trimmed),
    };
    if step_of(name).is_none() {
        return Err(CheckpointError::NotFound {
            url: url.to_owned(),
        });
    }
    CheckpointStore::open_existing(parent, options)?.load(name)
}

/// The name of the first floating-point tensor of `tensors` that holds an infinity or a NaN.
pub fn first_non_finite(tensors: &[(String, Tensor)]) -> Option<&str> {
    tch::no_grad(|| {
        tensors
            .iter()
            .filter(|(_, t)| t.is_floating_point())
            .find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0)
            .map(|(name, _)| name.as_str())
    })
}

fn non_finite(url: &str, name: &str) -> CheckpointError {
    CheckpointError::Invalid {
        url: url.to_owned(),
        reason: format!(
            "{name} holds infinite or NaN values, which training never saves: the file is \
             damaged (resume from an older checkpoint)"
        ),
    }
}

/// Every variable of `vs`, detached and on the CPU, sorted by name.
fn variables_of(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    to_cpu(&variables)
}

fn to_cpu(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect()
}

/// Copies saved `tensors` into the variables of `vs`, which must have exactly the same names
/// and shapes.
pub fn restore_variables(
    vs: &VarStore,
    tensors: &[(String, Tensor)],
    url: &str,
) -> Result<(), CheckpointError> {
    let invalid = |reason: String| CheckpointError::Invalid {
        url: url.to_owned(),
        reason,
    };
    let mut variables = vs.variables();
    let mut saved: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    saved.sort_unstable();
    let mut missing: Vec<&String> = variables
        .keys()
        .filter(|k| saved.binary_search(&k.as_str()).is_err())
        .collect();
    missing.sort();
    if let Some(first) = missing.first() {
        return Err(invalid(format!(
            "{} model variables missing from the checkpoint, e.g. {first}: a different model?",
            missing.len()
        )));
    }
    for (name, tensor) in tensors {
        let variable = variables.get_mut(name).ok_or_else(|| {
            invalid(format!(
                "the checkpoint has {name}, which the model does not"
            ))
        })?;
        if variable.size() != tensor.size() {
            return Err(invalid(format!(
                "{name} has shape {:?}, the model's {:?}",
                tensor.size(),
                variable.size()
            )));
        }
        // The copy would convert any type silently (integers read as weights, say).
        if variable.kind() != tensor.kind() {
            return Err(invalid(format!(
                "{name} is {:?}, the model's {:?}: a damaged or foreign checkpoint",
                tensor.kind(),
                variable.kind()
            )));
        }
        tch::no_grad(|| variable.f_copy_(tensor)).map_err(|source| CheckpointError::Torch {
            what: format!("{url}: {name}"),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_step() {
        assert_eq!(checkpoint_name(42), "ckpt-00000042");
        assert_eq!(step_of("ckpt-00000042"), Some(42));
        assert_eq!(step_of("ckpt-123456789"), Some(123_456_789));
        assert_eq!(step_of("ckpt-42"), None);
        assert_eq!(step_of("latest.json"), None);
    }

    #[test]
    fn step_seeds_differ_and_fit_i64() {
        let seeds: BTreeSet<i64> = (0..1000).map(|s| step_seed(7, s)).collect();
        assert_eq!(seeds.len(), 1000);
        assert!(seeds.iter().all(|&s| s >= 0));
        assert_ne!(step_seed(1, 0), step_seed(2, 0));
    }

    #[test]
    fn save_prune_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ckpts");
        let store =
            CheckpointStore::open(root.to_str().unwrap(), &StoreOptions::default()).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let weight = (vs.root() / "layer").randn_standard("weight", &[3, 2]);
        let counter = (vs.root() / "bn").add("count", Tensor::from(5i64), false);
        let momentum = vec![("layer.weight".to_owned(), weight.ones_like())];
        let queue = Tensor::arange(12, (tch::Kind::Float, Device::Cpu)).view([1, 3, 4]);
        for step in [10, 20, 30, 40] {
            let mut state = TrainState::new(1, 2, "abc".into());
            state.step = step;
            let snapshot = Snapshot {
                vs: &vs,
                optimizer: &momentum,
                queue: Some(&queue),
                state: &state,
                config: "seed = 1\n",
            };
            store.save(&snapshot, 2).unwrap();
        }
        assert_eq!(store.list().unwrap(), ["ckpt-00000030", "ckpt-00000040"]);
        assert_eq!(store.latest().unwrap().unwrap().step, 40);
        assert!(!root.join("ckpt-00000010").exists());

        let loaded = load_checkpoint(root.to_str().unwrap(), &StoreOptions::default()).unwrap();
        assert_eq!(loaded.state.step, 40);
        assert_eq!(loaded.config, "seed = 1\n");
        assert!(loaded.queue.unwrap().equal(&queue));
        let other = VarStore::new(Device::Cpu);
        let w = (other.root() / "layer").zeros("weight", &[3, 2]);
        let c = (other.root() / "bn").add("count", Tensor::from(0i64), false);
        restore_variables(&other, &loaded.model, &loaded.url).unwrap();
        assert!(w.equal(&weight));
        assert!(c.equal(&counter));
        // A folder by path works too.
        let folder = root.join("ckpt-00000030");
        let one = load_checkpoint(folder.to_str().unwrap(), &StoreOptions::default()).unwrap();
        assert_eq!(one.state.step, 30);
        // A state whose step is not its folder's is refused, named.
        let state_file = folder.join(STATE);
        let text = std::fs::read_to_string(&state_file).unwrap();
        let mut edited: serde_json::Value = serde_json::from_str(&text).unwrap();
        edited["step"] = serde_json::json!(u64::MAX);
        std::fs::write(&state_file, edited.to_string()).unwrap();
        let message = load_checkpoint(folder.to_str().unwrap(), &StoreOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("state.json")
                && message.contains(
                    "it holds step 18446744073709551615, but its folder ckpt-00000030 is named \
                     for step 30"
                ),
            "{message}"
        );
        std::fs::write(&state_file, text).unwrap();

        let wrong = VarStore::new(Device::Cpu);
        let _other = (wrong.root() / "other").zeros("weight", &[3, 2]);
        let message = restore_variables(&wrong, &loaded.model, "x")
            .unwrap_err()
            .to_string();
        assert!(message.contains("other.weight"), "{message}");
        // Tensors of another type (integers where the model holds weights) are refused, not
        // converted.
        let integers: Vec<(String, Tensor)> = loaded
            .model
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.to_kind(tch::Kind::Int)))
            .collect();
        let message = restore_variables(&other, &integers, "x")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("is Int, the model's") && message.contains("a damaged or foreign"),
            "{message}"
        );

        // Without latest.json, the newest folder written to the end still shows; a folder
        // whose save stopped before its state.json does not count.
        assert_eq!(store.newest_complete().unwrap().unwrap(), "ckpt-00000040");
        std::fs::remove_file(root.join(LATEST)).unwrap();
        std::fs::remove_file(root.join("ckpt-00000040").join(STATE)).unwrap();
        assert_eq!(store.newest_complete().unwrap().unwrap(), "ckpt-00000030");
        std::fs::remove_file(root.join("ckpt-00000030").join(STATE)).unwrap();
        assert_eq!(store.newest_complete().unwrap(), None);
    }

    #[test]
    fn non_finite_values_on_disk_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ckpts");
        let store =
            CheckpointStore::open(root.to_str().unwrap(), &StoreOptions::default()).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let _weight = (vs.root() / "layer").randn_standard("weight", &[3, 2]);
        let state = TrainState::new(1, 2, "abc".into());
        let snapshot = Snapshot {
            vs: &vs,
            optimizer: &[],
            queue: None,
            state: &state,
            config: "seed = 1\n",
        };
        store.save(&snapshot, 2).unwrap();
        let name = checkpoint_name(0);
        assert!(store.load(&name).is_ok());
        let bad = [(
            "layer.weight".to_owned(),
            Tensor::from_slice(&[1.0f32, f32::INFINITY]),
        )];
        Tensor::write_safetensors(&bad, root.join(&name).join(OPTIMIZER)).unwrap();
        let message = store.load(&name).err().unwrap().to_string();
        assert!(
            message.contains("optimizer.safetensors") && message.contains("layer.weight"),
            "{message}"
        );
    }
}
