//! Frozen-trunk features of every sample of a labeled shard dataset, and a disk cache for them.
//!
//! Each image is decoded as the augmenter decodes it (RGB8, gray replicated), its shorter side
//! resized to [`Preprocess::resize`] (bilinear with antialiasing, torchvision's `Resize`), center
//! cropped to [`Preprocess::crop`] (torchvision's `CenterCrop`, same rounding), scaled to
//! `[0, 1]` and normalized with the training run's mean and standard deviation. The trunk runs in
//! eval mode (batch norm with its running statistics) without gradients; its output is the
//! global average pool of the last stage, or with [`ExtractOptions::pool`] `N > 1` the last
//! stage average-pooled to `N × N` and flattened (`C·N²` values: SwAV's `--global_pooling
//! false`, VISSL's pooled-layer probes). The crop flipped left to right goes through the trunk
//! too: the linear probe draws one of the two per sample and epoch (its light augmentation).

use std::path::{Path, PathBuf};

use augment::decode::Decoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shards::{Dataset, SampleMeta, StoreOptions};
use tch::{Device, Kind, Tensor};
use tracing::info;

use super::EvalError;
use crate::checkpoint::{load_checkpoint, restore_variables};
use crate::config::TrainConfig;
use crate::train::{SwavModel, init_seed};

/// Images whose header claims more pixels than this are refused (as the augmenter's default).
const MAX_PIXELS: u64 = 64_000_000;

/// The largest center crop: the largest crop training takes.
pub const MAX_CROP: u32 = augment::config::MAX_CROP_SIZE;

/// The largest resized shorter side.
pub const MAX_RESIZE: u32 = 8192;

/// The most memory one batch of resized images may take (`float32`, at least
/// `batch × 3 × resize²` values), as the augmenter's cap on a batch.
pub const MAX_BATCH_BYTES: u64 = augment::pipeline::MAX_BATCH_BYTES;

/// Where the features come from.
#[derive(Debug, Clone)]
pub enum Trunk {
    /// A checkpoint folder, or a checkpoint root (its newest checkpoint), by URL or path.
    Checkpoint(String),
    /// The trunk of `config`, initialized as a run with `seed` starts (no training): the
    /// random-initialization baseline.
    Random {
        /// The training configuration that gives the architecture.
        config: Box<TrainConfig>,
        /// torch's seed before building the model.
        seed: u64,
    },
    /// The normalized crop's pixels, flattened (`3·crop²` values): the raw-pixel baseline.
    Pixels,
}

/// How images become trunk inputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Preprocess {
    /// The shorter side is resized to this.
    pub resize: u32,
    /// Then the center `crop × crop` is taken.
    pub crop: u32,
    /// Normalization mean per channel (of `[0, 1]` values).
    pub mean: [f32; 3],
    /// Normalization standard deviation per channel.
    pub std: [f32; 3],
}

impl Preprocess {
    /// Checks that the crop fits in the resized image and that both are within bounds: crops
    /// up to [`MAX_CROP`] (as training's), resized sides up to [`MAX_RESIZE`].
    pub fn validate(&self) -> Result<(), EvalError> {
        if self.crop == 0 || self.resize < self.crop {
            return Err(EvalError::usage(
                "--resize/--crop",
                format!(
                    "the crop ({}) must be at least 1 and at most the resized shorter side ({})",
                    self.crop, self.resize
                ),
            ));
        }
        if self.crop > MAX_CROP || self.resize > MAX_RESIZE {
            return Err(EvalError::usage(
                "--resize/--crop",
                format!(
                    "crop {} and resized side {}: at most {MAX_CROP} and {MAX_RESIZE}",
                    self.crop, self.resize
                ),
            ));
        }
        if self.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return Err(EvalError::usage(
                "augment.std",
                format!("{:?}: every value must be positive", self.std),
            ));
        }
        Ok(())
    }

    /// One decoded RGB8 image as a normalized crop `[3, crop, crop]`.
    pub fn apply(&self, width: u32, height: u32, rgb: &[u8]) -> Tensor {
        let image = Tensor::from_slice(rgb).view([1, i64::from(height), i64::from(width), 3]);
        self.apply_batch(&image).squeeze_dim(0)
    }

    /// Images of one size `[B, H, W, 3]` (`uint8`) as normalized crops `[B, 3, crop, crop]`.
    pub fn apply_batch(&self, images: &Tensor) -> Tensor {
        let size = images.size();
        let (h, w) = (size[1], size[2]);
        let images = images
            .permute([0, 3, 1, 2]) // [B, 3, H, W]
            .to_kind(Kind::Float)
            / 255.0;
        let (new_h, new_w) = resized_size(h, w, i64::from(self.resize));
        let images = if (new_h, new_w) == (h, w) {
            images
        } else {
            images.internal_upsample_bilinear2d_aa([new_h, new_w], false, None, None)
        };
        let crop = i64::from(self.crop);
        let top = center_offset(new_h, crop);
        let left = center_offset(new_w, crop);
        let images = images.narrow(2, top, crop).narrow(3, left, crop); // [B, 3, crop, crop]
        let mean = Tensor::from_slice(&self.mean).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&self.std).view([1, 3, 1, 1]);
        (images - mean) / std
    }
}

/// Decoded images waiting for a trunk pass, stored by size so that each run of equal sizes is
/// resized and cropped in one batched operation.
#[derive(Default)]
struct Pending {
    /// `(width, height, first image, images)` per run of equal sizes, in arrival order.
    runs: Vec<(u32, u32, Vec<u8>, i64)>,
    count: usize,
}

impl Pending {
    fn push(&mut self, width: u32, height: u32, rgb: &[u8]) {
        match self.runs.last_mut() {
            Some((w, h, bytes, n)) if (*w, *h) == (width, height) => {
                bytes.extend_from_slice(rgb);
                *n += 1;
            }
            _ => self.runs.push((width, height, rgb.to_vec(), 1)),
        }
        self.count += 1;
    }

    /// The normalized crops `[B, 3, crop, crop]`, in arrival order; empties the list.
    fn take(&mut self, preprocess: &Preprocess) -> Tensor {
        let crops: Vec<Tensor> = self
            .runs
            .drain(..)
            .map(|(w, h, bytes, n)| {
                let images = Tensor::from_slice(&bytes).view([n, i64::from(h), i64::from(w), 3]);
                preprocess.apply_batch(&images)
            })
            .collect();
        self.count = 0;
        Tensor::cat(&crops, 0)
    }
}

/// torchvision's `Resize(size)` for one int: the shorter side becomes `size`, the longer one
/// `int(size · long / short)` (truncated).
fn resized_size(height: i64, width: i64, size: i64) -> (i64, i64) {
    if height <= width {
        (size, size * width / height)
    } else {
        (size * height / width, size)
    }
}

/// torchvision's `CenterCrop` offset: `int(round((length - crop) / 2))`, Python's round half to
/// even.
fn center_offset(length: i64, crop: i64) -> i64 {
    let excess = length - crop;
    let half = excess / 2;
    if excess % 2 == 0 || half % 2 == 0 {
        half
    } else {
        half + 1
    }
}

/// A trunk ready to embed images.
pub struct LoadedTrunk {
    model: Option<SwavModel>,
    device: Device,
    /// What it is, for reports: `checkpoint URL (step N)`, `random (seed S)` or `pixels`.
    pub description: String,
    /// The training configuration, when there is one (its crop sizes and normalization give the
    /// evaluation's defaults).
    pub config: Option<TrainConfig>,
}

impl LoadedTrunk {
    /// Loads (or builds) `trunk` on `device`.
    pub fn load(trunk: &Trunk, device: Device, store: &StoreOptions) -> Result<Self, EvalError> {
        match trunk {
            Trunk::Checkpoint(url) => {
                let bad = |reason: String| EvalError::Checkpoint {
                    url: url.clone(),
                    reason,
                };
                let saved = load_checkpoint(url, store).map_err(|e| bad(format!("{e:#}")))?;
                let config = TrainConfig::from_toml_str(&saved.config, &[] as &[&str])
                    .map_err(|e| bad(format!("the configuration saved with it: {e}")))?;
                let model =
                    SwavModel::new(&config, device).map_err(|e| bad(format!("model: {e}")))?;
                restore_variables(&model.vs, &saved.model, &saved.url)
                    .map_err(|e| bad(e.to_string()))?;
                Ok(LoadedTrunk {
                    model: Some(model),
                    device,
                    description: format!("checkpoint {} (step {})", saved.url, saved.state.step),
                    config: Some(config),
                })
            }
            Trunk::Random { config, seed } => {
                tch::manual_seed(init_seed(*seed));
                let model = SwavModel::new(config, device)
                    .map_err(|e| EvalError::usage("--config", format!("model: {e}")))?;
                Ok(LoadedTrunk {
                    model: Some(model),
                    device,
                    description: format!(
                        "random initialization (seed {seed}, configuration {})",
                        config.digest()
                    ),
                    config: Some((**config).clone()),
                })
            }
            Trunk::Pixels => Ok(LoadedTrunk {
                model: None,
                device,
                description: "pixels".into(),
                config: None,
            }),
        }
    }

    /// Whether this is the raw-pixel baseline (no trunk).
    pub fn is_pixels(&self) -> bool {
        self.model.is_none()
    }

    /// Features `[B, D]` (on the CPU) of normalized crops `[B, 3, crop, crop]`: the last stage
    /// average-pooled to `pool × pool` and flattened (`D = C·pool²`; 1 is the global pool).
    /// Pixels are the crop itself, whatever `pool`.
    pub fn embed(&self, images: &Tensor, pool: u32) -> Tensor {
        match &self.model {
            Some(model) => tch::no_grad(|| {
                let pool = i64::from(pool.max(1));
                model
                    .trunk
                    .feature_map(&images.to_device(self.device), false) // [B, C, h, w]
                    .adaptive_avg_pool2d([pool, pool]) // [B, C, pool, pool]
                    .flatten(1, -1) // [B, C·pool²]
                    .to_device(Device::Cpu)
            }),
            None => images.flatten(1, -1), // [B, 3·crop·crop]
        }
    }
}

/// The features of one dataset.
#[derive(Debug)]
pub struct Features {
    /// Sample keys, in the dataset's order (manifest shards, then shard order).
    pub keys: Vec<String>,
    /// Each sample's label (`cls`).
    pub labels: Vec<String>,
    /// Features of the center crops, `[N, D]`, `float32` on the CPU.
    pub features: Tensor,
    /// Features of the same crops flipped left to right, `[N, D]`.
    pub flipped: Tensor,
}

impl Features {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Feature width `D`.
    pub fn dim(&self) -> i64 {
        self.features.size()[1]
    }
}

/// How to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Images per trunk pass.
    pub batch_size: usize,
    /// Resize, crop and normalization.
    pub preprocess: Preprocess,
    /// The last stage is average-pooled to `pool × pool` (1: the global average pool).
    pub pool: u32,
    /// Object-store options for the dataset.
    pub store: StoreOptions,
}

/// Opens the dataset at `url` (reads its manifest).
pub fn open_dataset(url: &str, store: &StoreOptions) -> Result<Dataset, EvalError> {
    runtime(url)?
        .block_on(Dataset::open(url, store))
        .map_err(|e| EvalError::Dataset {
            url: url.to_owned(),
            source: Box::new(e),
        })
}

fn runtime(url: &str) -> Result<tokio::runtime::Runtime, EvalError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EvalError::Dataset {
            url: url.to_owned(),
            source: Box::new(e),
        })
}

/// Runs `trunk` over every sample of `dataset` (at `url`). Every sample must decode and carry a
/// label: a sample left out would bias the accuracy, so a bad one is an error naming it.
pub fn extract(
    url: &str,
    dataset: &Dataset,
    trunk: &LoadedTrunk,
    options: &ExtractOptions,
) -> Result<Features, EvalError> {
    options.preprocess.validate()?;
    check_batch(options.batch_size, &options.preprocess)?;
    let total = dataset.manifest.total_samples();
    let batch_size = options.batch_size.max(1);
    let runtime = runtime(url)?;
    let mut decoder = Decoder::new(MAX_PIXELS);
    let mut keys = Vec::with_capacity(total as usize);
    let mut labels = Vec::with_capacity(total as usize);
    let mut pending = Pending::default();
    let mut features: Vec<Tensor> = Vec::new();
    let mut flipped: Vec<Tensor> = Vec::new();
    let preprocess = options.preprocess;
    let mut flush = |pending: &mut Pending| {
        if pending.count == 0 {
            return;
        }
        let images = pending.take(&preprocess); // [B, 3, crop, crop]
        features.push(trunk.embed(&images, options.pool));
        flipped.push(trunk.embed(&images.flip([3]), options.pool));
    };
    let dataset_error = |e: shards::ShardError| EvalError::Dataset {
        url: url.to_owned(),
        source: Box::new(e),
    };
    for shard in &dataset.manifest.shards {
        let mut stream =
            runtime
                .block_on(dataset.stream(shard))
                .map_err(|e| EvalError::Dataset {
                    url: url.to_owned(),
                    source: Box::new(e),
                })?;
        while let Some(sample) = runtime.block_on(stream.next()).map_err(dataset_error)? {
            let bad = |reason: String| EvalError::Sample {
                url: url.to_owned(),
                shard: shard.name.clone(),
                key: sample.key.clone(),
                reason,
            };
            let meta = sample
                .get("json")
                .ok_or_else(|| bad("no .json member (not an ingested sample)".into()))?;
            let meta: SampleMeta = serde_json::from_slice(meta)
                .map_err(|e| bad(format!("{}.json: {e}", sample.key)))?;
            let label = meta.cls.ok_or_else(|| {
                bad(
                    "no label (`cls` in its .json): ingest with --labels-from-folders or \
                     --label-column"
                        .into(),
                )
            })?;
            let (_, bytes) = sample
                .image()
                .ok_or_else(|| bad("no image member".into()))?;
            let rgb = decoder.decode(bytes).map_err(|e| bad(e.to_string()))?;
            pending.push(rgb.width, rgb.height, rgb.data);
            keys.push(sample.key.clone());
            labels.push(label);
            if pending.count == batch_size {
                flush(&mut pending);
            }
            if keys.len() % 10_000 == 0 {
                info!(dataset = url, done = keys.len(), total, "features");
            }
        }
    }
    flush(&mut pending);
    if keys.is_empty() {
        return Err(EvalError::Dataset {
            url: url.to_owned(),
            source: "the dataset has no samples".into(),
        });
    }
    Ok(Features {
        keys,
        labels,
        features: Tensor::cat(&features, 0),
        flipped: Tensor::cat(&flipped, 0),
    })
}

/// Checks that a batch of `batch_size` images resized as `preprocess` says stays within
/// [`MAX_BATCH_BYTES`] (counting the square resized images, the least they take).
pub fn check_batch(batch_size: usize, preprocess: &Preprocess) -> Result<(), EvalError> {
    let side = u64::from(preprocess.resize);
    let bytes = (batch_size.max(1) as u64).saturating_mul(3 * 4 * side * side);
    if bytes > MAX_BATCH_BYTES {
        return Err(EvalError::usage(
            "--batch-size",
            format!(
                "{batch_size} images resized to {side} pixels take at least {:.1} GiB as \
                 float32, more than the {} GiB a batch may take: lower --batch-size or --resize",
                bytes as f64 / f64::from(1u32 << 30),
                MAX_BATCH_BYTES >> 30
            ),
        ));
    }
    Ok(())
}

/// Features stored on disk, one file pair per (trunk, dataset, preprocessing): several probes
/// (kNN with several k, linear probes with several settings) reuse one extraction.
///
/// A cache entry is `features-DIGEST.safetensors` (`features`, `flipped`) and
/// `features-DIGEST.json` (keys, labels, what was extracted), where the digest covers the
/// trunk's description, the dataset's URL and manifest, and the preprocessing. Entries are
/// written under a temporary name and renamed, so a reader never sees half of one.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct CacheMeta {
    trunk: String,
    dataset: String,
    keys: Vec<String>,
    labels: Vec<String>,
}

impl FeatureCache {
    /// A cache in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FeatureCache { dir: dir.into() }
    }

    /// The entry's file stem for these inputs.
    pub fn entry(
        &self,
        trunk: &LoadedTrunk,
        url: &str,
        dataset: &Dataset,
        preprocess: &Preprocess,
        pool: u32,
    ) -> PathBuf {
        let mut hash = Sha256::new();
        hash.update(trunk.description.as_bytes());
        hash.update([0]);
        hash.update(url.as_bytes());
        hash.update([0]);
        hash.update(serde_json::to_vec(&dataset.manifest).unwrap_or_default());
        hash.update(serde_json::to_vec(preprocess).unwrap_or_default());
        // The global pool hashes as before pooling was a choice, so older entries stay valid.
        if pool > 1 && !trunk.is_pixels() {
            hash.update(format!("pool {pool}").as_bytes());
        }
        let digest = hex::encode(&hash.finalize()[..12]);
        self.dir.join(format!("features-{digest}"))
    }

    /// The entry at `stem`, if it is there and whole.
    pub fn load(&self, stem: &Path) -> Result<Option<Features>, EvalError> {
        let (tensors_path, meta_path) = paths(stem);
        if !tensors_path.exists() || !meta_path.exists() {
            return Ok(None);
        }
        let text = std::fs::read(&meta_path).map_err(|e| EvalError::file(&meta_path, e))?;
        let meta: CacheMeta =
            serde_json::from_slice(&text).map_err(|e| EvalError::file(&meta_path, e))?;
        let tensors = Tensor::read_safetensors(&tensors_path)
            .map_err(|e| EvalError::file(&tensors_path, e))?;
        let find = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| EvalError::file(&tensors_path, format!("no tensor {name:?}")))
        };
        let features = find("features")?;
        let flipped = find("flipped")?;
        let n = meta.keys.len() as i64;
        if features.size().first() != Some(&n)
            || flipped.size() != features.size()
            || meta.labels.len() != meta.keys.len()
        {
            return Err(EvalError::file(
                &tensors_path,
                format!(
                    "{} keys, {} labels, features {:?}, flipped {:?}: not one row per sample",
                    meta.keys.len(),
                    meta.labels.len(),
                    features.size(),
                    flipped.size()
                ),
            ));
        }
        Ok(Some(Features {
            keys: meta.keys,
            labels: meta.labels,
            features,
            flipped,
        }))
    }

    /// Stores `features` at `stem`.
    pub fn store(
        &self,
        stem: &Path,
        features: &Features,
        trunk: &LoadedTrunk,
        url: &str,
    ) -> Result<(), EvalError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| EvalError::file(&self.dir, e))?;
        let (tensors_path, meta_path) = paths(stem);
        let meta = CacheMeta {
            trunk: trunk.description.clone(),
            dataset: url.to_owned(),
            keys: features.keys.clone(),
            labels: features.labels.clone(),
        };
        let partial = |path: &Path| {
            let mut name = path.as_os_str().to_owned();
            name.push(".partial");
            PathBuf::from(name)
        };
        let tensors_partial = partial(&tensors_path);
        Tensor::write_safetensors(
            &[
                ("features", &features.features),
                ("flipped", &features.flipped),
            ],
            &tensors_partial,
        )
        .map_err(|e| EvalError::file(&tensors_partial, e))?;
        let meta_partial = partial(&meta_path);
        let text = serde_json::to_vec(&meta).map_err(|e| EvalError::file(&meta_path, e))?;
        std::fs::write(&meta_partial, text).map_err(|e| EvalError::file(&meta_partial, e))?;
        // The tensors first: `load` needs both, so an entry is complete once its JSON is there.
        std::fs::rename(&tensors_partial, &tensors_path)
            .map_err(|e| EvalError::file(&tensors_path, e))?;
        std::fs::rename(&meta_partial, &meta_path).map_err(|e| EvalError::file(&meta_path, e))?;
        Ok(())
    }
}

fn paths(stem: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut name = stem.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    (with(".safetensors"), with(".json"))
}

/// The features of `url` for `trunk`: from `cache` when it has them, else extracted (and then
/// stored in `cache`).
pub fn features_of(
    url: &str,
    trunk: &LoadedTrunk,
    options: &ExtractOptions,
    cache: Option<&FeatureCache>,
) -> Result<Features, EvalError> {
    let dataset = open_dataset(url, &options.store)?;
    let entry = cache.map(|c| c.entry(trunk, url, &dataset, &options.preprocess, options.pool));
    if let (Some(cache), Some(entry)) = (cache, &entry)
        && let Some(features) = cache.load(entry)?
    {
        info!(dataset = url, cache = %entry.display(), "features from the cache");
        return Ok(features);
    }
    let started = std::time::Instant::now();
    let features = extract(url, &dataset, trunk, options)?;
    info!(
        dataset = url,
        samples = features.len(),
        dim = features.dim(),
        seconds = started.elapsed().as_secs_f64(),
        "features extracted"
    );
    if let (Some(cache), Some(entry)) = (cache, &entry) {
        cache.store(entry, &features, trunk, url)?;
    }
    Ok(features)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_and_center_crop_follow_torchvision() {
        assert_eq!(resized_size(28, 28, 32), (32, 32));
        assert_eq!(resized_size(480, 640, 256), (256, 341));
        assert_eq!(resized_size(640, 480, 256), (341, 256));
        // int(round(x / 2)) with Python's round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
        assert_eq!(center_offset(225, 224), 0);
        assert_eq!(center_offset(227, 224), 2);
        assert_eq!(center_offset(229, 224), 2);
        assert_eq!(center_offset(256, 224), 16);
    }

    #[test]
    fn preprocessing_crops_the_center_and_normalizes() {
        // A 4x2 image (width 4, height 2): resize 2 keeps it, crop 2 takes columns 1 and 2.
        let rgb: Vec<u8> = (0..8u8).flat_map(|v| [v * 10, v * 10, v * 10]).collect();
        let preprocess = Preprocess {
            resize: 2,
            crop: 2,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let crop = preprocess.apply(4, 2, &rgb);
        assert_eq!(crop.size(), [3, 2, 2]);
        let values: Vec<f32> = Vec::try_from(crop.get(0).flatten(0, -1)).unwrap();
        let expected: Vec<f32> = [10.0, 20.0, 50.0, 60.0].iter().map(|v| v / 255.0).collect();
        assert_eq!(values, expected);
        assert!(
            Preprocess {
                crop: 3,
                ..preprocess
            }
            .validate()
            .is_err()
        );
    }
}
