//! The training loop: RegNetY + SwAV on libtorch, fed by the augmenter, checkpointed, logged.
//!
//! [`train`] runs one process's share of a run described by a [`TrainConfig`]. Each step:
//!
//! 1. takes the next batch from the [`BatchLoader`] (the wait is recorded);
//! 2. runs the trunk once per group of equal-size crops and the head once on all `V·B`
//!    features, crop-major ([`SwavModel::forward`], seer.md §1 "Batching / forward");
//! 3. computes the swapped-prediction loss with the step as SwAV's iteration (Sinkhorn in
//!    `float32` or higher whatever the precision, seer.md §2);
//! 4. if the loss is finite: backward (scaled, in fp16), zeroes the prototypes' gradient while
//!    they are frozen, a LARC-SGD step at the schedule's learning rate, prototypes back to unit
//!    norm (seer.md §2 "Prototype normalization", §3);
//! 5. otherwise skips the update and counts it; more than `max_skipped_steps` skipped steps in a
//!    row stop the run with [`TrainError::Diverged`].
//!
//! A checkpoint is written every `checkpoint.every_steps` steps, at the end, and when
//! [`TrainOptions::interrupt`] is raised (the `train` binary raises it on SIGINT and SIGTERM).
//!
//! The model lives in one [`VarStore`]: the trunk under `trunk.` with torchvision's names
//! (`trunk.stem.0.weight`, `trunk.trunk_output.block1.block1-0.f.a.0.weight`, ...), the head
//! under `heads.0.` with VISSL's (`heads.0.projection_head.0.weight`, `heads.0.prototypes0.weight`),
//! so `trunk` is the prefix [`crate::export::export_trunk`] takes.
//!
//! **Precision.** `fp32` everywhere on CPU. On CUDA, `bf16` and `fp16` run the forward pass and
//! the loss under libtorch's CUDA autocast (weights, gradients and optimizer state stay
//! `float32`); `fp16` adds dynamic loss scaling as apex AMP O1 and `torch.cuda.amp.GradScaler`
//! do (seer.md §3): scale 2¹⁶, halved and the step skipped when a gradient overflows, doubled
//! after 2000 steps without overflow.
//!
//! **Exact resume.** Checkpoints hold every variable, the momentum buffers, the queue, the
//! loss scale, the step and the data stream's position after the last consumed batch; torch's
//! generator is reseeded from `(seed, step)` before every step. On CPU with a fixed
//! `threads`, N steps, a resume and N more steps give bit-identical weights to 2N steps straight
//! (tested in `trainer/tests/train_cli.rs`).
//!
//! **Data parallelism.** With [`TrainOptions::distributed`], this process is one rank of a run
//! (docs/distributed.md): every variable is broadcast from rank 0 before the first step (fresh
//! or resumed); each rank reads its own shards (the augmenter's rank split) and computes the
//! loss on its batch, Sinkhorn's sums running over all ranks; the gradients are averaged in
//! buckets after backward; the ranks agree on the loss (their mean is logged and decides a
//! skip) and on an interrupt, so they skip, stop and checkpoint together. Rank 0 alone writes
//! the configuration, the metrics and the checkpoints, which hold every rank's data position
//! and queue. A collective that fails (a peer died or hung past `distributed.timeout_s`)
//! stops the run with [`TrainError::Distributed`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use augment::{Layout, PipelineOptions};
use shards::StoreOptions;
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::checkpoint::{
    CheckpointError, CheckpointStore, LossScaleState, Snapshot, TrainState, load_checkpoint,
    restore_variables, step_seed,
};
use crate::collective::{Collective, SingleProcess, Timed};
use crate::config::{ConfigError, Precision, TrainConfig, WorldSizeChange};
use crate::data::{BatchLoader, DataError, ResolutionGroup};
use crate::dist::{DistError, Distributed, all_gather_bytes, all_gather_cat};
use crate::metrics::{MetricsWriter, plot_png};
use crate::optim::{LarcSgd, OptimError, trainable_parameters};
use crate::regnet::{InvalidParams, RegNetY};
use crate::swav::{SwavError, SwavHead, SwavLoss, SwavOutput};

/// The var-store prefix of the trunk.
pub const TRUNK_PREFIX: &str = "trunk";

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration does not fit this run (e.g. a half precision on CPU).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model cannot be built.
    #[error(transparent)]
    Model(#[from] InvalidParams),
    /// The loss cannot be configured, or a saved queue does not fit.
    #[error(transparent)]
    Loss(#[from] SwavError),
    /// The data stream failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A checkpoint's optimizer state does not fit the model.
    #[error("{url}: {source}")]
    OptimizerState {
        /// The checkpoint.
        url: String,
        /// What does not fit.
        #[source]
        source: OptimError,
    },
    /// The run directory could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A collective operation failed: a peer process exited or stopped responding.
    #[error("data-parallel run: {0}")]
    Distributed(#[from] DistError),
    /// Too many steps in a row were skipped.
    #[error(
        "step {step}: {skipped} steps in a row skipped (last loss {last_loss}): training \
         diverged; lower the learning rate, or resume from an earlier checkpoint"
    )]
    Diverged {
        /// The step (0-based) at which the run stopped.
        step: u64,
        /// Steps skipped in a row.
        skipped: u32,
        /// The last loss computed.
        last_loss: f64,
    },
    /// The model holds an infinity or a NaN when a checkpoint is due, though the loss may
    /// still be finite (a temperature or learning rate far off, say).
    #[error(
        "step {step}: the model holds non-finite values ({variable}): training diverged; no \
         checkpoint was written, the last good one stays the latest; lower the learning rate, \
         or resume from an earlier checkpoint"
    )]
    NonFiniteModel {
        /// The step at which the checkpoint was due.
        step: u64,
        /// The first variable found non-finite.
        variable: String,
    },
}

/// Where `--resume` resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest checkpoint of the run's checkpoint folder, if there is one (else a fresh
    /// start).
    Latest,
    /// A checkpoint root (its newest checkpoint) or one checkpoint folder.
    From(String),
}

/// How to run a [`TrainConfig`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Where to compute.
    pub device: Device,
    /// The run directory: resolved configuration, metrics, loss plot, default checkpoints.
    pub run_dir: PathBuf,
    /// Resume from a checkpoint.
    pub resume: Option<Resume>,
    /// Stop (with a checkpoint) once this many steps are done, as if preempted; the learning
    /// rate schedule still spans `schedule.steps`.
    pub stop_after: Option<u64>,
    /// Object-store options for the data and the checkpoints.
    pub store: StoreOptions,
    /// Once set (by a signal handler, say), the run stops after the step in progress, with a
    /// checkpoint.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// This process's groups in a data-parallel run; `None`: a single process.
    pub distributed: Option<Distributed>,
    /// Threads for libtorch and for the augmenter where the configuration leaves them at their
    /// defaults (`threads = 0`, `data.threads` unset); `None`: one per core. The `train` binary
    /// sets it to this process's share of the cores when several ranks share the machine. An
    /// `OMP_NUM_THREADS` in the environment (torchrun sets 1) still decides libtorch's.
    pub default_threads: Option<usize>,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Step the run started at (0, or the resumed checkpoint's).
    pub start_step: u64,
    /// Steps completed at the end.
    pub end_step: u64,
    /// Mean loss of the first logging window of this run.
    pub first_loss: Option<f64>,
    /// Mean loss of the last logging window.
    pub last_loss: Option<f64>,
    /// Steps skipped over the whole run (non-finite loss or fp16 overflow).
    pub skipped_steps: u64,
    /// URL of the last checkpoint written.
    pub checkpoint: Option<String>,
    /// Mean wall time per step of this run, in seconds.
    pub seconds_per_step: f64,
    /// Share of the step time spent waiting for data.
    pub data_wait_share: f64,
    /// Share of the run's time spent in collective operations (gradient all-reduce, Sinkhorn's
    /// sums, the loss agreement; SyncBatchNorm's not counted), waiting for slower ranks
    /// included; 0 for a single process.
    pub communication_share: f64,
    /// Whether [`TrainOptions::interrupt`] stopped the run early.
    pub interrupted: bool,
}

/// The trunk and the head on one var store.
pub struct SwavModel {
    /// Every variable: `trunk.*` and `heads.0.*`.
    pub vs: VarStore,
    /// The RegNetY trunk.
    pub trunk: RegNetY,
    /// The projection head and prototypes.
    pub head: SwavHead,
}

impl SwavModel {
    /// Builds the model of `config` on `device`, initialized from torch's generator as it is.
    pub fn new(config: &TrainConfig, device: Device) -> Result<Self, TrainError> {
        let vs = VarStore::new(device);
        let params = config.regnet_params();
        let trunk = RegNetY::new(&(vs.root() / TRUNK_PREFIX), &params)?;
        let mut head = SwavHead::new(
            &(vs.root() / "heads" / 0),
            config.head_config(trunk.out_channels()),
        );
        head.normalize_prototypes();
        if config.channels_last && device.is_cuda() {
            to_channels_last(&vs);
        }
        Ok(SwavModel { vs, trunk, head })
    }

    /// Embeddings and scores of a batch `[V·B, ·]`, crop-major: one trunk pass per resolution
    /// group (BN statistics per group, as SwAV), the pooled features concatenated in crop
    /// order, then the head once.
    pub fn forward(&self, groups: &[(ResolutionGroup, Tensor)], train: bool) -> SwavOutput {
        let features: Vec<Tensor> = groups
            .iter()
            .map(|(_, images)| self.trunk.forward_t(images, train)) // [n·B, C]
            .collect();
        let features = Tensor::cat(&features, 0); // [V·B, C]
        self.head.forward_t(&features, train)
    }
}

/// Lays out every 4-D variable of `vs` (the convolution weights) channels-last in memory, as
/// PyTorch's `model.to(memory_format=torch.channels_last)` does: same shapes and values, NHWC
/// strides. With channels-last inputs, cuDNN then runs its NHWC kernels without converting the
/// weights at every call. Checkpoints and exports write contiguous copies, so files do not
/// depend on the layout.
pub fn to_channels_last(vs: &VarStore) {
    tch::no_grad(|| {
        for (_, mut variable) in vs.variables() {
            if variable.dim() == 4 {
                let nhwc = variable
                    .permute([0, 2, 3, 1])
                    .contiguous()
                    .permute([0, 3, 1, 2]);
                variable.set_data(&nhwc);
            }
        }
    });
}

/// The torch seed the model is initialized with: the run's seed, within `i64`.
pub fn init_seed(seed: u64) -> i64 {
    (seed & i64::MAX as u64) as i64
}

/// fp16 dynamic loss scaling (seer.md §3 "Mixed precision"; `GradScaler`'s defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
struct LossScaler {
    scale: f64,
    good_steps: u64,
}

impl LossScaler {
    const INITIAL_SCALE: f64 = 65_536.0;
    const GROWTH_INTERVAL: u64 = 2000;

    fn new() -> Self {
        LossScaler {
            scale: Self::INITIAL_SCALE,
            good_steps: 0,
        }
    }

    fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
    }

    fn state(&self) -> LossScaleState {
        LossScaleState {
            scale: self.scale,
            good_steps: self.good_steps,
        }
    }
}

/// What became of one step.
enum StepOutcome {
    Applied,
    /// The loss was not finite.
    NonFiniteLoss,
    /// fp16: a gradient overflowed at the current scale.
    Overflow,
}

/// Selects the dtype libtorch's CUDA autocast casts to (switching autocast on leaves it alone,
/// and libtorch's default is `float16`).
fn set_cuda_autocast_dtype(kind: Kind) {
    // c10's `enum class ScalarType : int8_t` (Half = 5, BFloat16 = 15).
    let dtype: i8 = match kind {
        Kind::Half => 5,
        Kind::BFloat16 => 15,
        other => panic!("autocast to {other:?} is not supported"),
    };
    // SAFETY: see the declarations below; it accepts any floating dtype.
    unsafe { at_autocast_set_autocast_dtype(CUDA_DEVICE_TYPE, dtype) }
}

// libtorch's autocast state for CUDA, through the calls that name the device type. tch's
// `autocast` uses `at::autocast::is_enabled()` and `set_enabled(bool)`, which libtorch 2.11
// deprecates: they printed three warnings at the start of every run on a CUDA machine.
// SAFETY (for every call below): plain libtorch_cpu functions (linked by torch-sys) of `int8_t`
// enums and `bool`s by value, returning `bool`, `int` or nothing, which under the Itanium C++
// ABI is the C calling convention; they read or write thread-locals, for any device type.
unsafe extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_autocast_is_autocast_enabled(device_type: i8) -> bool;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_autocast_set_autocast_enabled(device_type: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_autocast_increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_autocast_decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_autocast_clear_cache();
}

/// c10's `enum class DeviceType : int8_t`: CUDA.
const CUDA_DEVICE_TYPE: i8 = 1;

/// Whether libtorch's CUDA autocast is on in this thread.
fn cuda_autocast_enabled() -> bool {
    // SAFETY: see the declarations.
    unsafe { at_autocast_is_autocast_enabled(CUDA_DEVICE_TYPE) }
}

/// Runs `f` with libtorch's CUDA autocast switched on or off, then restores the state, as
/// `torch.autocast("cuda")` does (and tch's `autocast`, without its deprecated calls). Where
/// libtorch sees no CUDA device, `f` simply runs.
fn cuda_autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !tch::Cuda::is_available() {
        return f();
    }
    autocast_scope(enabled, f)
}

/// [`cuda_autocast`] without its device check (so that tests run it on machines without a GPU).
fn autocast_scope<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    let before = cuda_autocast_enabled();
    // SAFETY: see the declarations.
    unsafe {
        at_autocast_set_autocast_enabled(CUDA_DEVICE_TYPE, enabled);
        at_autocast_increment_nesting();
    }
    let result = f();
    // SAFETY: see the declarations. The cache of casted weights lives as long as the outermost
    // scope.
    unsafe {
        if at_autocast_decrement_nesting() == 0 {
            at_autocast_clear_cache();
        }
        at_autocast_set_autocast_enabled(CUDA_DEVICE_TYPE, before);
    }
    result
}

/// The dtype libtorch's CUDA autocast casts to, as c10's `ScalarType` number.
#[cfg(test)]
fn cuda_autocast_dtype() -> i8 {
    unsafe extern "C" {
        #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
        fn at_autocast_get_autocast_dtype(device_type: i8) -> i8;
    }
    // SAFETY: as for the declarations above: a plain libtorch function of one `int8_t` enum
    // returning one, reading a thread-local.
    unsafe { at_autocast_get_autocast_dtype(CUDA_DEVICE_TYPE) }
}

/// Measures over one logging window.
struct Window {
    started: Instant,
    steps: u64,
    images: u64,
    wait: Duration,
    loss_sum: f64,
    losses: u64,
}

impl Window {
    fn new() -> Self {
        Window {
            started: Instant::now(),
            steps: 0,
            images: 0,
            wait: Duration::ZERO,
            loss_sum: 0.0,
            losses: 0,
        }
    }

    fn mean_loss(&self) -> f64 {
        if self.losses == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.losses as f64
        }
    }
}

/// Runs (or resumes) training as `config` and `options` say. See the module documentation.
pub fn train(config: &TrainConfig, options: &TrainOptions) -> Result<TrainSummary, TrainError> {
    crate::dist::set_sync_batch_norm_group(
        options.distributed.as_ref().and_then(|d| d.sync_bn.clone()),
    );
    let result = crate::dist::catch_collective_failure(|| train_inner(config, options));
    crate::dist::set_sync_batch_norm_group(None);
    result?
}

fn train_inner(config: &TrainConfig, options: &TrainOptions) -> Result<TrainSummary, TrainError> {
    let device = options.device;
    if config.precision != Precision::Fp32 && !device.is_cuda() {
        return Err(ConfigError::Invalid {
            field: "precision".into(),
            message: format!(
                "{} needs a CUDA device; on {device:?} use --set precision=fp32",
                config.precision
            ),
        }
        .into());
    }
    let torch_threads = if config.threads > 0 {
        Some(config.threads)
    } else if std::env::var_os("OMP_NUM_THREADS").is_some() {
        None
    } else {
        options.default_threads
    };
    if let Some(threads) = torch_threads {
        tch::set_num_threads(threads as i32);
    }
    if device.is_cuda() {
        // The crop sizes are fixed, so cuDNN's search for the fastest convolution algorithms
        // runs once per size. CUDA results are then not bit-reproducible, which only the CPU
        // promises.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let timed = Timed::new(match &options.distributed {
        Some(distributed) => &*distributed.group,
        None => &SingleProcess,
    });
    let collective: &dyn Collective = &timed;
    let (rank, world) = (collective.rank(), collective.world_size());
    let leader = rank == 0;
    let run_dir = &options.run_dir;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TrainError::Io { path, source }
    };
    std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    // Held until the run ends (the system releases it however the process ends): a second
    // process writing the same run folder would interleave metrics and checkpoints.
    let _run_lock = if leader {
        Some(lock_run_dir(run_dir)?)
    } else {
        None
    };

    tch::manual_seed(init_seed(config.seed));
    let mut model = SwavModel::new(config, device)?;
    let mut loss_fn = SwavLoss::new(config.loss_config())?;
    let parameters = trainable_parameters(&model.vs);
    let mut optimizer = LarcSgd::new(config.larc_config());
    let schedule = config.lr_schedule(world);
    let mut scaler = (config.precision == Precision::Fp16).then(LossScaler::new);
    let mut state = TrainState::new(config.seed, config.data_seed(), config.digest());

    let checkpoint_url = match &config.checkpoint.url {
        Some(url) => url.clone(),
        None => run_dir.join("checkpoints").display().to_string(),
    };
    let checkpoints = CheckpointStore::open(&checkpoint_url, &options.store)?;
    // Before loading a checkpoint to resume from, which can take minutes for a large model.
    if leader {
        checkpoints.check_writable()?;
    }
    let resume_from = match &options.resume {
        // A fresh start where a run has published checkpoints would overwrite them one by one
        // and leave `latest` pointing into a mix of the two runs.
        None => match checkpoints.latest()? {
            Some(latest) => {
                return Err(ConfigError::Invalid {
                    field: "--run-dir".into(),
                    message: format!(
                        "{} already holds a run's checkpoints (the latest at step {}): pass \
                         --resume to continue it, or start the new run in another --run-dir \
                         (or checkpoint.url)",
                        checkpoints.url(),
                        latest.step
                    ),
                }
                .into());
            }
            None => {
                refuse_without_latest(&checkpoints, "--run-dir")?;
                None
            }
        },
        Some(Resume::From(url)) => Some(load_checkpoint(url, &options.store)?),
        Some(Resume::Latest) => match checkpoints.latest()? {
            Some(latest) => Some(checkpoints.load(&latest.checkpoint)?),
            None => {
                refuse_without_latest(&checkpoints, "--resume")?;
                info!(
                    url = checkpoints.url(),
                    "no checkpoint to resume from: starting afresh"
                );
                None
            }
        },
    };
    if let Some(checkpoint) = resume_from {
        restore_variables(&model.vs, &checkpoint.model, &checkpoint.url)?;
        optimizer
            .load_state(checkpoint.optimizer, &parameters)
            .map_err(|source| TrainError::OptimizerState {
                url: checkpoint.url.clone(),
                source,
            })?;
        let saved_world = checkpoint.state.streams.len().max(1);
        let world_changed = saved_world != world;
        if world_changed && config.distributed.on_world_size_change == WorldSizeChange::Error {
            return Err(ConfigError::Invalid {
                field: "distributed.on_world_size_change".into(),
                message: format!(
                    "{} was written by {saved_world} process(es), this run has {world}: \
                     resume with {saved_world}, or --set \
                     distributed.on_world_size_change=\"restart-data\" to keep the model and \
                     optimizer and restart the data streams",
                    checkpoint.url
                ),
            }
            .into());
        }
        // A queue exists from its start iteration on when it holds at least one global batch.
        if let Some(queue) = &config.loss.queue
            && checkpoint.queue.is_none()
            && checkpoint.state.step > queue.start_iter
            && queue.length >= config.data.batch_size * saved_world
        {
            warn!(
                checkpoint = checkpoint.url,
                "the checkpoint has no SwAV queue ({}): it starts empty",
                crate::checkpoint::QUEUE
            );
        }
        // A data-parallel checkpoint holds every rank's queue along the rows.
        let queue = checkpoint.queue.and_then(|q| {
            let rows = q.size().get(1).copied().unwrap_or(0);
            if world_changed {
                None
            } else if world > 1 && rows % world as i64 == 0 {
                let local = rows / world as i64;
                Some(q.narrow(1, rank as i64 * local, local))
            } else {
                Some(q)
            }
        });
        loss_fn.set_queue(queue.map(|q| q.to_device(device)))?;
        if checkpoint.state.config_digest != state.config_digest {
            warn!(
                checkpoint = checkpoint.url,
                "the checkpoint was written under another configuration; resuming with this one"
            );
        }
        if let (Some(scaler), Some(saved)) = (scaler.as_mut(), checkpoint.state.loss_scale) {
            scaler.scale = saved.scale;
            scaler.good_steps = saved.good_steps;
        }
        let saved = checkpoint.state;
        let stream = if world_changed {
            warn!(
                saved_world,
                world, "another number of processes: every rank's data stream starts afresh"
            );
            None
        } else if world > 1 {
            saved.streams.get(rank).cloned().flatten()
        } else {
            saved.stream.clone()
        };
        state = TrainState {
            config_digest: state.config_digest,
            stream,
            data_seed: if world_changed {
                crate::checkpoint::step_seed(saved.data_seed, saved.step) as u64
            } else {
                saved.data_seed
            },
            ..saved
        };
        info!(step = state.step, checkpoint = checkpoint.url, "resumed");
    }
    if world > 1 {
        // Every rank starts from rank 0's variables (its initialization, or its checkpoint).
        tch::no_grad(|| {
            let mut variables: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
            variables.sort_by(|a, b| a.0.cmp(&b.0));
            for (_, variable) in &mut variables {
                collective.broadcast(variable, 0);
            }
        });
    }
    let start_step = state.step;
    let end_step = options
        .stop_after
        .map_or(config.schedule.steps, |s| s.min(config.schedule.steps));

    let mut pipeline = PipelineOptions::new(config.augment.clone(), config.data.batch_size);
    pipeline.layout = Layout::U8Nhwc;
    if let Some(threads) = config.data.threads.or(options.default_threads) {
        pipeline.threads = threads;
    }
    let augment_threads = pipeline.threads;
    pipeline.prefetch = config.data.prefetch;
    pipeline.shuffle_buffer = config.data.shuffle_buffer;
    pipeline.seed = state.data_seed;
    pipeline.rank = rank;
    pipeline.world = world;
    pipeline.store = options.store.clone();
    let mut loader = BatchLoader::start(
        &config.data.url,
        pipeline,
        state.stream.clone(),
        device,
        config.data.staging_buffers,
    )?;
    loader.set_channels_last(config.channels_last);
    // The run's configuration, written once everything above has succeeded: a start that
    // fails (a wrong data URL, an unreadable checkpoint) leaves the run's file as it was.
    let config_text = config.to_toml();
    let config_path = run_dir.join("config.toml");
    if leader {
        std::fs::write(&config_path, &config_text).map_err(io(&config_path))?;
    }

    let run_name = run_dir
        .file_name()
        .map_or_else(|| "run".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut metrics = if leader {
        Some(MetricsWriter::create(run_dir, &run_name).map_err(io(run_dir))?)
    } else {
        None
    };
    info!(
        rank,
        world,
        start_step,
        end_step,
        steps = config.schedule.steps,
        device = ?device,
        precision = %config.precision,
        parameters = parameters.iter().map(|(_, t)| t.numel()).sum::<usize>(),
        torch_threads = tch::get_num_threads(),
        augment_threads,
        "training"
    );

    let half = match config.precision {
        Precision::Fp32 => None,
        Precision::Bf16 => Some(Kind::BFloat16),
        Precision::Fp16 => Some(Kind::Half),
    };
    if let Some(kind) = half {
        set_cuda_autocast_dtype(kind);
    }
    let run_started = Instant::now();
    let communication_before = timed.elapsed();
    let mut window_communication = communication_before;
    let mut total_wait = Duration::ZERO;
    let mut window = Window::new();
    let mut first_loss = None;
    let mut last_loss = None;
    let mut last_checkpoint = None;
    let mut saved_at = None;
    let mut interrupted = false;
    for step in start_step..end_step {
        let batch = loader.next_batch()?;
        window.wait += batch.wait;
        total_wait += batch.wait;
        tch::manual_seed(step_seed(config.seed, step));
        let lr = schedule.lr(step);

        let loss = cuda_autocast(half.is_some(), || {
            let out = model.forward(&batch.groups, true);
            loss_fn.loss(
                &out.embeddings,
                &out.scores,
                model.head.prototypes(),
                step,
                collective,
            )
        });
        let local_loss = loss.double_value(&[]);
        loader.device_synchronized();
        let raised = options
            .interrupt
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst));
        // The ranks agree on the loss (a skip is everyone's) and on stopping.
        let (loss_value, stop_requested) = if world > 1 {
            let mut agreed = Tensor::from_slice(&[local_loss, f64::from(u8::from(raised))]);
            collective.all_reduce_sum(&mut agreed);
            (
                agreed.double_value(&[0]) / world as f64,
                agreed.double_value(&[1]) > 0.0,
            )
        } else {
            (local_loss, raised)
        };
        let outcome = if !loss_value.is_finite() {
            if let Some(scaler) = scaler.as_mut() {
                scaler.update(false);
            }
            StepOutcome::NonFiniteLoss
        } else {
            let backward = match scaler.as_mut() {
                None => loss.f_backward(),
                Some(scaler) => (&loss * scaler.scale).f_backward(),
            };
            if let Err(error) = backward {
                match &options.distributed {
                    // SyncBatchNorm all-reduces inside autograd: a peer that died or hung
                    // surfaces here, as a collective failure (exit code 4), not a crash.
                    Some(distributed) => distributed
                        .group
                        .fail("backward (SyncBatchNorm all-reduce)", &error.to_string()),
                    None => panic!("backward failed: {error}"),
                }
            }
            model.head.cancel_prototype_gradients(step);
            if let Some(distributed) = &options.distributed {
                distributed.reducer.average(&parameters, collective);
            }
            let finite = match scaler.as_mut() {
                None => true,
                Some(scaler) => {
                    let finite = unscale_gradients(&parameters, scaler.scale);
                    scaler.update(finite);
                    finite
                }
            };
            if finite {
                optimizer.step(&parameters, lr);
                optimizer.zero_grad(&parameters);
                model.head.normalize_prototypes();
                StepOutcome::Applied
            } else {
                optimizer.zero_grad(&parameters);
                StepOutcome::Overflow
            }
        };
        drop(loss);

        state.step = step + 1;
        state.stream = Some((*batch.state).clone());
        state.images_seen += batch.batch_size as u64 * world as u64;
        window.steps += 1;
        window.images += batch.batch_size as u64 * world as u64;
        match outcome {
            StepOutcome::Applied => {
                state.skipped_in_a_row = 0;
                window.loss_sum += loss_value;
                window.losses += 1;
            }
            StepOutcome::NonFiniteLoss | StepOutcome::Overflow => {
                state.skipped_steps += 1;
                state.skipped_in_a_row += 1;
                let reason = if matches!(outcome, StepOutcome::Overflow) {
                    "fp16 gradient overflow"
                } else {
                    "non-finite loss"
                };
                warn!(step, loss = loss_value, reason, "step skipped");
                if state.skipped_in_a_row > config.max_skipped_steps {
                    return Err(TrainError::Diverged {
                        step,
                        skipped: state.skipped_in_a_row,
                        last_loss: loss_value,
                    });
                }
            }
        }
        state.loss_scale = scaler.map(|s| s.state());

        let done = step + 1;
        if done % config.logging.every_steps == 0 || done == end_step {
            let elapsed = window.started.elapsed().as_secs_f64();
            let loss = window.mean_loss();
            let imgs_per_s = window.images as f64 / elapsed;
            let data_wait = window.wait.as_secs_f64() / elapsed;
            let mut scalars = vec![
                ("train/loss", loss),
                ("train/lr", lr),
                ("train/imgs_per_s", imgs_per_s),
                ("train/data_wait", data_wait),
                ("train/step_time", elapsed / window.steps as f64),
                ("train/skipped_steps", state.skipped_steps as f64),
                ("train/epoch", batch.state.epoch as f64),
            ];
            if let Some(scaler) = &scaler {
                scalars.push(("train/loss_scale", scaler.scale));
            }
            if world > 1 {
                let communication = timed.elapsed();
                scalars.push((
                    "train/communication",
                    (communication - window_communication).as_secs_f64() / elapsed,
                ));
                window_communication = communication;
            }
            if let Some(metrics) = metrics.as_mut() {
                metrics.log(done, &scalars).map_err(io(run_dir))?;
                info!(step = done, loss, lr, imgs_per_s, data_wait, "train");
            }
            if window.losses > 0 {
                first_loss.get_or_insert(loss);
                last_loss = Some(loss);
            }
            window = Window::new();
        }
        if done % config.checkpoint.every_steps == 0 || done == end_step {
            let url = save(
                &checkpoints,
                &model,
                &optimizer,
                &loss_fn,
                &state,
                &config_text,
                config,
                collective,
            )?;
            if let Some(url) = &url {
                info!(step = done, url, "checkpoint");
            }
            last_checkpoint = url;
            saved_at = Some(done);
        }
        if stop_requested {
            info!(step = done, "interrupted: stopping with a checkpoint");
            interrupted = true;
            break;
        }
    }
    if saved_at != Some(state.step) && state.step > start_step {
        last_checkpoint = save(
            &checkpoints,
            &model,
            &optimizer,
            &loss_fn,
            &state,
            &config_text,
            config,
            collective,
        )?;
    }
    drop(loader);

    if let Some(metrics) = &metrics {
        let plot = run_dir.join("loss.png");
        if let Err(e) = plot_png(metrics.jsonl_path(), "train/loss", &plot) {
            warn!(error = %e, "no loss plot");
        }
    }
    let steps = (state.step - start_step).max(1) as f64;
    let elapsed = run_started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        start_step,
        end_step: state.step,
        first_loss,
        last_loss,
        skipped_steps: state.skipped_steps,
        checkpoint: last_checkpoint,
        seconds_per_step: elapsed / steps,
        data_wait_share: total_wait.as_secs_f64() / elapsed.max(f64::MIN_POSITIVE),
        communication_share: (timed.elapsed() - communication_before).as_secs_f64()
            / elapsed.max(f64::MIN_POSITIVE),
        interrupted,
    })
}

/// Writes a checkpoint (rank 0; every rank takes part in gathering the data positions and
/// queues, and gets `None` back but rank 0, which gets the URL).
#[allow(clippy::too_many_arguments)]
fn save(
    checkpoints: &CheckpointStore,
    model: &SwavModel,
    optimizer: &LarcSgd,
    loss_fn: &SwavLoss,
    state: &TrainState,
    config_text: &str,
    config: &TrainConfig,
    collective: &dyn Collective,
) -> Result<Option<String>, TrainError> {
    let world = collective.world_size();
    let mut state = state.clone();
    let mut queue = loss_fn.queue().map(Tensor::shallow_clone);
    if world > 1 {
        let own = serde_json::to_vec(&state.stream).unwrap_or_default();
        state.streams = all_gather_bytes(&own, collective)
            .iter()
            .map(|bytes| serde_json::from_slice(bytes).ok().flatten())
            .collect();
        // Queues exist on every rank or on none (same configuration, same step).
        queue = queue.map(|q| all_gather_cat(&q, 1, collective));
    } else {
        state.streams.clear();
    }
    if collective.rank() != 0 {
        return Ok(None);
    }
    // A diverging run (a learning rate far too high, say) can hold infinite or NaN weights
    // while its loss stays finite, so the loss guard never stops it: such a checkpoint would
    // become the latest and push good ones out of `keep_last`. It is not written, the last
    // good one stays the latest, and the run stops: its further steps are worth nothing.
    if let Some(variable) = first_non_finite(&model.vs) {
        return Err(TrainError::NonFiniteModel {
            step: state.step,
            variable,
        });
    }
    let optimizer_state = optimizer.state();
    let snapshot = Snapshot {
        vs: &model.vs,
        optimizer: &optimizer_state,
        queue: queue.as_ref(),
        state: &state,
        config: config_text,
    };
    Ok(Some(
        checkpoints.save(&snapshot, config.checkpoint.keep_last)?,
    ))
}

/// Refuses to start afresh where checkpoints were written to the end but `latest.json`, which
/// publishes them, is missing (lost or deleted): the new run would overwrite them. Folders
/// without their `state.json` are the remains of a save that never finished, and a start
/// afresh may overwrite those.
/// The file in a run folder that the process training into it holds locked.
pub const RUN_LOCK: &str = "train.lock";

/// Locks `run_dir` for this process (an advisory lock on [`RUN_LOCK`]), or says which process
/// holds it.
fn lock_run_dir(run_dir: &Path) -> Result<std::fs::File, TrainError> {
    use std::io::{Read, Seek, Write};
    let path = run_dir.join(RUN_LOCK);
    let io = |source| TrainError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                String::new()
            } else {
                format!(" ({holder})")
            };
            return Err(ConfigError::Invalid {
                field: "--run-dir".into(),
                message: format!(
                    "{} is in use by another train process{holder}: wait for it to end, or \
                     train into another --run-dir",
                    run_dir.display()
                ),
            }
            .into());
        }
        Err(std::fs::TryLockError::Error(source)) => return Err(io(source)),
    }
    // Who holds it, for the message above; the lock, not this text, is what counts.
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "pid {}", std::process::id());
    Ok(file)
}

fn refuse_without_latest(checkpoints: &CheckpointStore, field: &str) -> Result<(), TrainError> {
    match checkpoints.newest_complete()? {
        None => Ok(()),
        Some(name) => Err(ConfigError::Invalid {
            field: field.into(),
            message: format!(
                "{url} has no {LATEST} but holds checkpoints written to the end, the newest \
                 {name}: pass --resume {url}/{name} to continue from it, or start the new run \
                 in another --run-dir (or checkpoint.url)",
                url = checkpoints.url().trim_end_matches('/'),
                LATEST = crate::checkpoint::LATEST,
            ),
        }
        .into()),
    }
}

/// The name of a floating-point variable holding an infinite or NaN value, if any.
fn first_non_finite(vs: &tch::nn::VarStore) -> Option<String> {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    crate::checkpoint::first_non_finite(&variables).map(str::to_owned)
}

/// Divides every gradient by `scale` in place; returns whether all of them are finite (one
/// host synchronization).
fn unscale_gradients(parameters: &[(String, Tensor)], scale: f64) -> bool {
    tch::no_grad(|| {
        let mut total: Option<Tensor> = None;
        for (_, parameter) in parameters {
            let mut grad = parameter.grad();
            if !grad.defined() {
                continue;
            }
            grad *= 1.0 / scale;
            let magnitude = grad.abs().sum(Kind::Float);
            total = Some(match total {
                None => magnitude,
                Some(t) => t + magnitude,
            });
        }
        total.is_none_or(|t| t.isfinite().int64_value(&[]) != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_scale_halves_on_overflow_and_doubles_after_2000_good_steps() {
        let mut scaler = LossScaler::new();
        assert_eq!(scaler.scale, 65_536.0);
        scaler.update(false);
        assert_eq!(scaler.scale, 32_768.0);
        for _ in 0..1999 {
            scaler.update(true);
        }
        assert_eq!(scaler.scale, 32_768.0);
        scaler.update(true);
        assert_eq!((scaler.scale, scaler.good_steps), (65_536.0, 0));
    }

    #[test]
    fn autocast_dtype_is_set_through_libtorch() {
        set_cuda_autocast_dtype(Kind::BFloat16);
        assert_eq!(cuda_autocast_dtype(), 15);
        set_cuda_autocast_dtype(Kind::Half);
        assert_eq!(cuda_autocast_dtype(), 5);
    }

    #[test]
    fn autocast_scopes_switch_cuda_autocast_and_restore_it() {
        // The state is a thread-local flag, so it can be checked without a GPU.
        assert!(!cuda_autocast_enabled());
        let seen = autocast_scope(true, || {
            let inner = autocast_scope(false, cuda_autocast_enabled);
            (cuda_autocast_enabled(), inner)
        });
        assert_eq!(seen, (true, false));
        assert!(!cuda_autocast_enabled());
        // With no CUDA device, the scope leaves the state alone.
        if !tch::Cuda::is_available() {
            assert!(!cuda_autocast(true, cuda_autocast_enabled));
        }
    }

    #[test]
    fn unscaling_detects_overflow() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        (&w * 4.0).sum(Kind::Float).backward();
        let parameters = vec![("w".to_owned(), w.shallow_clone())];
        assert!(unscale_gradients(&parameters, 2.0));
        assert_eq!(Vec::<f32>::try_from(&w.grad()).unwrap(), [2.0, 2.0]);
        let v = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        (&v * f64::INFINITY).sum(Kind::Float).backward();
        assert!(!unscale_gradients(&[("v".to_owned(), v)], 2.0));
    }
}
