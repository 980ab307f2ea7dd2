//! The training configuration: one TOML file, command-line overrides, validation, and the
//! resolved copy saved beside each run.
//!
//! A file names the model, the SwAV head and loss, the augmentation, the data, the optimizer,
//! the schedule, the precision, checkpointing and logging (`configs/*.toml` are complete
//! examples). Every section and field is documented on its struct below, with its default;
//! unknown keys are refused, so a typo is an error rather than a silently ignored setting.
//!
//! ```
//! use trainer::config::TrainConfig;
//!
//! let text = r#"
//!     model = "400MF"
//!     augment = "2x64@0.14-1+2x32@0.05-0.14"
//!     [data]
//!     url = "/data/shards"
//!     batch_size = 32
//!     [schedule]
//!     steps = 300
//! "#;
//! let config = TrainConfig::from_toml_str(text, &["optim.lr_per_256=1.2"]).unwrap();
//! assert_eq!(config.optim.lr_per_256, Some(1.2));
//! assert_eq!(config.loss_config().n_crops, 4);
//! let saved = config.to_toml(); // what the run directory's config.toml holds
//! assert_eq!(TrainConfig::from_toml_str(&saved, &[] as &[&str]).unwrap(), config);
//! ```
//!
//! **Overrides.** `--set key.path=value` replaces (or adds) one key before the file is
//! interpreted: `value` is read as a TOML value (`--set optim.lr=9.6`,
//! `--set augment.crops=[{count=2,size=96,scale=[0.14,1]}]`) and, when it is not valid TOML, as a
//! plain string (`--set data.url=s3://bucket/shards`, `--set precision=bf16`). Missing tables on
//! the path are created. Where the file gives a preset name (`model = "400MF"`,
//! `augment = "seer"`), overriding a key below it turns the name into `{ preset = NAME }` and
//! sets the key beside it, so `--set augment.blur.p=0.2` works on a preset.
//!
//! **Presets.** `model` and `augment` are either a preset name or a table; a table may hold
//! `preset = NAME` plus any fields, which then replace the preset's values. The resolved
//! configuration ([`TrainConfig::to_toml`]) spells every field out.

use std::fmt;
use std::path::{Path, PathBuf};

use augment::AugmentConfig;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use crate::optim::{LarcSgdConfig, LrSchedule};
use crate::regnet::{PRESET_NAMES, RegNetParams, preset};
use crate::swav::{QueueConfig, SwavHeadConfig, SwavLossConfig};

/// Why a configuration cannot be used. Every variant says where: the file, the override, or
/// the field (as a dotted key path).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, or a key has a value of the wrong type (toml's message names the
    /// line or the key).
    #[error("{origin}: {message}")]
    Syntax {
        /// The file name, or `config` for text.
        origin: String,
        /// toml's message.
        message: String,
    },
    /// A `--set` argument that cannot be applied.
    #[error("--set {argument:?}: {reason}")]
    Override {
        /// The argument as given.
        argument: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value out of range, or settings that contradict each other.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted key path of the field, e.g. `optim.lr`.
        field: String,
        /// What is wrong and what would be right.
        message: String,
    },
}

impl ConfigError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Arithmetic of the forward and backward passes. Parameters, optimizer state and Sinkhorn
/// stay in `float32` (or higher) in every mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in `float32` (the default; the only mode on CPU).
    #[default]
    Fp32,
    /// CUDA autocast to `bfloat16`; no loss scaling is needed (same exponent range as `f32`).
    Bf16,
    /// CUDA autocast to `float16` with dynamic loss scaling, as SwAV and SEER trained with
    /// apex AMP O1 (seer.md §3 "Mixed precision").
    Fp16,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

/// The whole configuration of a training run.
///
/// Scalar fields come first: TOML needs top-level keys before the first table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of the model's initialization, of every per-step torch generator, and of the data
    /// stream unless `data.seed` is given (default 0).
    #[serde(default)]
    pub seed: u64,
    /// `fp32`, `bf16` or `fp16` (default `fp32`). The half modes need a CUDA device.
    #[serde(default)]
    pub precision: Precision,
    /// libtorch's intra-op threads (default 0: libtorch's own choice, one per core; with
    /// several ranks on one machine, each rank's share of the cores). Fix it for
    /// bit-exact reproduction on CPU: results can depend on how work is split over threads.
    #[serde(default)]
    pub threads: usize,
    /// A run stops with an error after this many skipped steps in a row (non-finite loss, or
    /// fp16 gradient overflow) (default 20).
    #[serde(default = "default_max_skipped_steps")]
    pub max_skipped_steps: u32,
    /// On CUDA, run the convolutions in the channels-last (NHWC) memory layout, which cuDNN's
    /// tensor-core kernels prefer (default true; no effect on CPU, where the layout stays NCHW).
    /// PyTorch's own step of RegNetY-8GF in bf16 on an H200 took 17 % less time in channels-last
    /// (docs/benchmarks.md, "Train on a GPU").
    #[serde(default = "default_channels_last")]
    pub channels_last: bool,
    /// The trunk.
    #[serde(deserialize_with = "deserialize_model")]
    pub model: ModelConfig,
    /// The projection head and prototypes (default: SEER's).
    #[serde(default)]
    pub head: HeadConfig,
    /// The swapped-prediction loss (default: SEER's).
    #[serde(default)]
    pub loss: LossConfig,
    /// The multi-crop augmentation: a preset name of `augment::config::PRESETS` or a table
    /// of `augment::AugmentConfig` (optionally with `preset = NAME` under its fields).
    #[serde(deserialize_with = "deserialize_augment")]
    pub augment: AugmentConfig,
    /// The training data.
    pub data: DataConfig,
    /// The optimizer and its learning rate.
    #[serde(default)]
    pub optim: OptimConfig,
    /// How long to train.
    pub schedule: ScheduleConfig,
    /// Checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Metrics and logs.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Data-parallel runs (several processes): see `docs/distributed.md`.
    #[serde(default)]
    pub distributed: DistributedConfig,
}

fn default_max_skipped_steps() -> u32 {
    20
}

fn default_channels_last() -> bool {
    true
}

/// The RegNetY trunk: a preset, explicit design parameters, or a preset with some of them
/// replaced.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// One of `trainer::regnet::PRESET_NAMES` (`"400MF"`, `"256GF"`: SEER's, ...); any field
    /// below replaces the preset's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Number of blocks over all stages.
    pub depth: Option<usize>,
    /// Initial width, a positive multiple of 8.
    pub w0: Option<i64>,
    /// Width slope per block.
    pub wa: Option<f64>,
    /// Width multiplier between stages.
    pub wm: Option<f64>,
    /// Channels per group of the 3×3 convolutions.
    pub group_width: Option<i64>,
    /// Squeeze-excitation width over the block input width (default 0.25, RegNetY).
    pub se_ratio: Option<f64>,
    /// Bottleneck ratio (default 1, RegNetY).
    pub bottleneck_ratio: Option<f64>,
    /// Stem width (default 32).
    pub stem_width: Option<i64>,
}

impl ModelConfig {
    /// The design: the preset's values, replaced by every field given.
    pub fn params(&self) -> Result<RegNetParams, ConfigError> {
        let base = match &self.preset {
            Some(name) => Some(preset(name).ok_or_else(|| {
                ConfigError::invalid(
                    "model.preset",
                    format!(
                        "unknown preset {name:?}; known: {}",
                        PRESET_NAMES.join(", ")
                    ),
                )
            })?),
            None => None,
        };
        let need = |field: &str| {
            ConfigError::invalid(
                format!("model.{field}"),
                "missing: give a preset or all of depth, w0, wa, wm and group_width",
            )
        };
        let defaults = RegNetParams::regnet_y(1, 8, 0.0, 2.0, 8);
        let params = RegNetParams {
            depth: self
                .depth
                .or(base.map(|b| b.depth))
                .ok_or_else(|| need("depth"))?,
            w0: self.w0.or(base.map(|b| b.w0)).ok_or_else(|| need("w0"))?,
            wa: self.wa.or(base.map(|b| b.wa)).ok_or_else(|| need("wa"))?,
            wm: self.wm.or(base.map(|b| b.wm)).ok_or_else(|| need("wm"))?,
            group_width: self
                .group_width
                .or(base.map(|b| b.group_width))
                .ok_or_else(|| need("group_width"))?,
            se_ratio: self
                .se_ratio
                .or(base.map(|b| b.se_ratio))
                .unwrap_or(defaults.se_ratio),
            bottleneck_ratio: self
                .bottleneck_ratio
                .or(base.map(|b| b.bottleneck_ratio))
                .unwrap_or(defaults.bottleneck_ratio),
            stem_width: self
                .stem_width
                .or(base.map(|b| b.stem_width))
                .unwrap_or(defaults.stem_width),
        };
        params
            .validate()
            .map_err(|e| ConfigError::invalid(format!("model.{}", e.field), e.to_string()))?;
        Ok(params)
    }

    /// The preset name (if any) with every field spelled out, as the resolved file shows it.
    fn resolved(&self) -> Result<Self, ConfigError> {
        let p = self.params()?;
        Ok(ModelConfig {
            preset: self.preset.clone(),
            depth: Some(p.depth),
            w0: Some(p.w0),
            wa: Some(p.wa),
            wm: Some(p.wm),
            group_width: Some(p.group_width),
            se_ratio: Some(p.se_ratio),
            bottleneck_ratio: Some(p.bottleneck_ratio),
            stem_width: Some(p.stem_width),
        })
    }
}

/// The projection head and prototypes (`trainer::swav::SwavHeadConfig`; its input width is the
/// trunk's). Defaults are SEER 2021's head (seer.md §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    /// Hidden layer widths, each `Linear` (+ `BatchNorm1d` with `use_bn`) + `ReLU` (default
    /// `[8192, 8192]`).
    pub hidden_dims: Vec<i64>,
    /// Embedding width, the last `Linear` (default 256).
    pub output_dim: i64,
    /// Batch norm after the hidden layers (default false, SEER's `noBNhead`).
    pub use_bn: bool,
    /// Number of prototypes K (default 16,000).
    pub num_prototypes: i64,
    /// Iterations from the start during which the prototypes do not move (default 313).
    pub freeze_prototypes_iters: u64,
    /// Batch-norm epsilon of the head (default 1e-5).
    pub batch_norm_eps: f64,
    /// Batch-norm momentum of the head (default 0.1).
    pub batch_norm_momentum: f64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        let seer = SwavHeadConfig::seer(1);
        HeadConfig {
            hidden_dims: seer.hidden_dims,
            output_dim: seer.output_dim,
            use_bn: seer.use_bn,
            num_prototypes: seer.num_prototypes,
            freeze_prototypes_iters: seer.freeze_prototypes_iters,
            batch_norm_eps: seer.batch_norm_eps,
            batch_norm_momentum: seer.batch_norm_momentum,
        }
    }
}

/// The swapped-prediction loss (`trainer::swav::SwavLossConfig`; the number of crops comes from
/// the augmentation). Defaults are SEER 2021's (seer.md §2 "Hyper-parameters").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Crops whose codes the other crops predict (default `[0, 1]`, the two large crops).
    pub crops_for_assign: Vec<usize>,
    /// Softmax temperature τ (default 0.1).
    pub temperature: f64,
    /// Sinkhorn's entropic regularization ε (default 0.05).
    pub epsilon: f64,
    /// Sinkhorn iterations (default 10, SEER's `sinkhorn10`; SwAV: 3).
    pub sinkhorn_iterations: usize,
    /// Sinkhorn and the loss in `float64` (default false).
    pub use_f64: bool,
    /// Iterations from the start with one-hot codes (default 0).
    pub hard_assignment_iters: u64,
    /// The queue of past embeddings (default none, as SEER).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSection>,
}

/// The optional embedding queue (seer.md §2 "Queue").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Rows per assignment crop over all processes, rounded down to a multiple of the global
    /// batch (SwAV at batch 256: 3840).
    pub length: usize,
    /// Iteration at which the queue starts filling (default 0); it is used once full.
    #[serde(default)]
    pub start_iter: u64,
}

impl Default for LossConfig {
    fn default() -> Self {
        let seer = SwavLossConfig::default();
        LossConfig {
            crops_for_assign: seer.crops_for_assign,
            temperature: seer.temperature,
            epsilon: seer.epsilon,
            sinkhorn_iterations: seer.sinkhorn_iterations,
            use_f64: seer.use_f64,
            hard_assignment_iters: seer.hard_assignment_iters,
            queue: None,
        }
    }
}

/// Where the images come from and how the augmenter runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The shard dataset: a URL (`s3://`, `gs://`, `az://`, `http(s)://`, `file://`) or a
    /// local folder holding `manifest.json`. Required.
    pub url: String,
    /// Images per step in this process (the global batch is this times the number of
    /// processes). Required.
    pub batch_size: usize,
    /// Augmentation worker threads (default: the number of cores; with several ranks on one
    /// machine, each rank's share of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Finished batches queued ahead of the trainer (default 4).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Shuffle buffer in samples (default 10,000; 0 keeps the shard order).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Seed of the data order and of every crop (default: the top-level `seed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Pinned host staging buffers reused round-robin on CUDA (default 3; unused on CPU).
    #[serde(default = "default_staging_buffers")]
    pub staging_buffers: usize,
}

fn default_prefetch() -> usize {
    4
}
fn default_shuffle_buffer() -> usize {
    10_000
}
fn default_staging_buffers() -> usize {
    3
}

/// LARC-wrapped SGD and its learning rate (seer.md §3). Defaults are SEER's.
///
/// The peak learning rate is `lr`, or else `lr_per_256 · global batch / 256` (the linear
/// scaling rule; default 0.3 per 256 images). The schedule warms up linearly from
/// `start_warmup_lr` over `warmup_steps`, then follows a cosine to `final_lr` (default
/// `final_lr_ratio · peak`, 1/1000 as SwAV and SEER) at `schedule.steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate per 256 images of global batch (default 0.3 when `lr` is not given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_per_256: Option<f64>,
    /// Absolute peak learning rate; replaces `lr_per_256`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Learning rate of step 0 when there is a warmup (default 0, `main_swav.py`'s
    /// `--start_warmup`; SEER: 0.15).
    pub start_warmup_lr: f64,
    /// Steps of linear warmup (default 0; SEER: 8,000).
    pub warmup_steps: u64,
    /// Final learning rate as a fraction of the peak (default 0.001).
    pub final_lr_ratio: f64,
    /// Absolute final learning rate; replaces `final_lr_ratio`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_lr: Option<f64>,
    /// Weight decay inside LARC's trust ratio (default 1e-5, SEER; SwAV: 1e-6).
    pub weight_decay: f64,
    /// SGD momentum (default 0.9).
    pub momentum: f64,
    /// LARC trust coefficient (default 0.001).
    pub trust_coefficient: f64,
    /// LARC clipping mode instead of scaling (default false, as SwAV and SEER).
    pub larc_clip: bool,
    /// LARC's denominator epsilon (default 1e-8).
    pub larc_eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        let larc = LarcSgdConfig::default();
        OptimConfig {
            lr_per_256: None,
            lr: None,
            start_warmup_lr: 0.0,
            warmup_steps: 0,
            final_lr_ratio: 0.001,
            final_lr: None,
            weight_decay: larc.weight_decay,
            momentum: larc.momentum,
            trust_coefficient: larc.trust_coefficient,
            larc_clip: larc.clip,
            larc_eps: larc.eps,
        }
    }
}

/// The SwAV/SEER learning rate per 256 images (seer.md §3 "LR rule").
pub const DEFAULT_LR_PER_256: f64 = 0.3;

/// How long to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Total optimizer iterations; the learning-rate schedule spans them (SEER: 122,070 = 1B
    /// images at batch 8,192). Required.
    pub steps: u64,
}

/// Where and how often checkpoints are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// An object-store URL or local folder (default: `checkpoints` in the run directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Write one every this many steps (default 1000); the last step always gets one.
    pub every_steps: u64,
    /// Keep this many of the newest checkpoints, deleting older ones (default 3).
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            url: None,
            every_steps: 1000,
            keep_last: 3,
        }
    }
}

/// The process group of a data-parallel run (ignored by a single process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// `auto` (default: NCCL on CUDA, Gloo on CPU), `gloo` or `nccl`.
    pub backend: DistributedBackend,
    /// Gradients are averaged in all-reduces of about this many MiB each (default 25, as
    /// PyTorch's DDP).
    pub bucket_mb: f64,
    /// A collective operation (and the rendezvous) fails after this many seconds without its
    /// peers, so a rank that died or hung stops the others with an error (default 600: a rank
    /// may wait this long while rank 0 writes a checkpoint).
    pub timeout_s: f64,
    /// Batch norm statistics are shared by groups of this many consecutive ranks
    /// (SyncBatchNorm; SEER: 64); 0 or 1 (default 0): each rank's own batch. Must divide the
    /// world size.
    pub sync_bn_group_size: usize,
    /// What resuming a checkpoint written with another number of processes does: `error`
    /// (default), or `restart-data`: model, optimizer and step resume, each rank's data stream
    /// starts afresh (with a seed derived from the step, so no batch order repeats) and the
    /// SwAV queue refills.
    pub on_world_size_change: WorldSizeChange,
    /// Under a launcher that starts one process (torchrun or Slurm with a world size of 1),
    /// train through the process group anyway, as PyTorch's DDP does at world size 1: a store,
    /// a Gloo or NCCL group of one, bucketed all-reduces. Default false: such a run takes the
    /// single-process path and opens no port. The GPU check sets it to run NCCL on one GPU.
    pub process_group_for_one_rank: bool,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            backend: DistributedBackend::Auto,
            bucket_mb: 25.0,
            timeout_s: 600.0,
            sync_bn_group_size: 0,
            on_world_size_change: WorldSizeChange::Error,
            process_group_for_one_rank: false,
        }
    }
}

/// [`DistributedConfig::backend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DistributedBackend {
    /// NCCL on CUDA, Gloo on CPU.
    #[default]
    Auto,
    /// c10d's ProcessGroupGloo.
    Gloo,
    /// c10d's ProcessGroupNCCL.
    Nccl,
}

/// [`DistributedConfig::on_world_size_change`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorldSizeChange {
    /// Refuse to resume.
    #[default]
    Error,
    /// Resume the model and optimizer, restart the data streams.
    RestartData,
}

/// Metrics and logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Log and record metrics every this many steps (default 10).
    pub every_steps: u64,
    /// The run directory: resolved configuration, metrics, loss plot, default checkpoint
    /// folder (default `runs/NAME`, NAME the configuration file's stem); `--run-dir` replaces
    /// it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            every_steps: 10,
            dir: None,
        }
    }
}

/// Reads `model` as a preset name, or a table with an optional `preset`.
fn deserialize_model<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ModelConfig, D::Error> {
    use serde::de::Error;
    match toml::Value::deserialize(deserializer)? {
        toml::Value::String(name) => Ok(ModelConfig {
            preset: Some(name),
            ..ModelConfig::default()
        }),
        value @ toml::Value::Table(_) => {
            ModelConfig::deserialize(value).map_err(|e| D::Error::custom(one_line(&e)))
        }
        other => Err(D::Error::custom(format!(
            "expected a preset name or a table, found {}",
            other.type_str()
        ))),
    }
}

/// Reads `augment` as a preset or crop spec (`augment::AugmentConfig::parse`), or a table of
/// `AugmentConfig` fields, with an optional `preset` whose values the other fields replace.
fn deserialize_augment<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<AugmentConfig, D::Error> {
    use serde::de::Error;
    let parse =
        |spec: &str| AugmentConfig::parse(spec).map_err(|e| D::Error::custom(e.to_string()));
    match toml::Value::deserialize(deserializer)? {
        toml::Value::String(spec) => parse(&spec),
        toml::Value::Table(mut table) => {
            let mut merged = match table.remove("preset") {
                None => toml::Table::new(),
                Some(toml::Value::String(spec)) => {
                    toml::Table::try_from(parse(&spec)?).map_err(D::Error::custom)?
                }
                Some(other) => {
                    return Err(D::Error::custom(format!(
                        "preset: expected a string, found {}",
                        other.type_str()
                    )));
                }
            };
            merge_tables(&mut merged, table);
            AugmentConfig::deserialize(toml::Value::Table(merged))
                .map_err(|e| D::Error::custom(one_line(&e)))
        }
        other => Err(D::Error::custom(format!(
            "expected a preset name or a table, found {}",
            other.type_str()
        ))),
    }
}

/// toml's message of a nested error on one line (`... in `blur.p``).
fn one_line(error: &toml::de::Error) -> String {
    error.to_string().trim().replace('\n', " ")
}

/// Puts every key of `from` into `into`, merging tables key by key.
fn merge_tables(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(table)) => {
                merge_tables(existing, table)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// The top-level keys whose value may be a preset name instead of a table.
const PRESET_KEYS: [&str; 2] = ["model", "augment"];

/// One parsed `--set key.path=value`.
fn apply_override(table: &mut toml::Table, argument: &str) -> Result<(), ConfigError> {
    let fail = |reason: &str| ConfigError::Override {
        argument: argument.to_owned(),
        reason: reason.to_owned(),
    };
    let (path, text) = argument
        .split_once('=')
        .ok_or_else(|| fail("expected KEY.PATH=VALUE"))?;
    let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(fail("empty key in the path"));
    }
    let value = parse_value(text.trim());
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut current = table;
    for (depth, key) in parents.iter().enumerate() {
        let entry = current
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::String(name) = entry
            && depth == 0
            && PRESET_KEYS.contains(key)
        {
            // A preset name: keep it beside the overridden field.
            let mut preset = toml::Table::new();
            preset.insert("preset".into(), toml::Value::String(name.clone()));
            *entry = toml::Value::Table(preset);
        }
        current = match entry {
            toml::Value::Table(t) => t,
            other => {
                return Err(fail(&format!(
                    "{key} is a {}, not a table",
                    other.type_str()
                )));
            }
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// A TOML value, or the text as a string when it is not one.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {text}"))
        .ok()
        .and_then(|mut t| t.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

impl TrainConfig {
    /// Reads `path`, applies `overrides` (`key.path=value`), interprets and validates the result.
    pub fn load(path: &Path, overrides: &[impl AsRef<str>]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// [`load`](Self::load) on text.
    pub fn from_toml_str(text: &str, overrides: &[impl AsRef<str>]) -> Result<Self, ConfigError> {
        Self::parse(text, "config", overrides)
    }

    fn parse(text: &str, origin: &str, overrides: &[impl AsRef<str>]) -> Result<Self, ConfigError> {
        let syntax = |origin: &str| {
            let origin = origin.to_owned();
            move |e: toml::de::Error| ConfigError::Syntax {
                origin,
                message: one_line(&e),
            }
        };
        let mut table: toml::Table = toml::from_str(text).map_err(syntax(origin))?;
        for argument in overrides {
            apply_override(&mut table, argument.as_ref())?;
        }
        // Deserializing the table (not the text) makes toml name the key path of a bad value;
        // the origin then names the overrides too, as the bad key may be one of theirs.
        let origin = if overrides.is_empty() {
            origin.to_owned()
        } else {
            let sets: Vec<&str> = overrides.iter().map(AsRef::as_ref).collect();
            format!("{origin} with --set {}", sets.join(" --set "))
        };
        let mut config =
            TrainConfig::deserialize(toml::Value::Table(table)).map_err(syntax(&origin))?;
        config.model = config.model.resolved()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field and their agreement; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| Err(ConfigError::invalid(field, message));
        let positive = |field: &str, value: f64| {
            if value > 0.0 && value.is_finite() {
                Ok(())
            } else {
                bad(field, format!("{value} must be positive and finite"))
            }
        };
        positive("distributed.bucket_mb", self.distributed.bucket_mb)?;
        positive("distributed.timeout_s", self.distributed.timeout_s)?;
        if self.distributed.timeout_s > 604_800.0 {
            return bad(
                "distributed.timeout_s",
                format!(
                    "{} s is more than a week (604800 s)",
                    self.distributed.timeout_s
                ),
            );
        }
        // Sizes past these cannot be allocated or started; refused here, by name, rather than
        // failing inside libtorch or the thread library.
        for (field, value, most) in [
            ("threads", self.threads as u64, 1024),
            ("data.threads", self.data.threads.unwrap_or(1) as u64, 1024),
            ("data.prefetch", self.data.prefetch as u64, 1024),
            ("data.batch_size", self.data.batch_size as u64, 65_536),
            (
                "head.output_dim",
                self.head.output_dim.max(0) as u64,
                65_536,
            ),
            (
                "head.num_prototypes",
                self.head.num_prototypes.max(0) as u64,
                1 << 20,
            ),
            (
                "head.hidden_dims",
                self.head
                    .hidden_dims
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(0)
                    .max(0) as u64,
                65_536,
            ),
            (
                "loss.queue.length",
                self.loss.queue.as_ref().map_or(0, |q| q.length) as u64,
                1 << 20,
            ),
            // SwAV uses 3 and SEER 10; a step with billions would never end.
            (
                "loss.sinkhorn_iterations",
                self.loss.sinkhorn_iterations as u64,
                1000,
            ),
        ] {
            if value > most {
                return bad(field, format!("{value} is more than {most}"));
            }
        }
        let non_negative = |field: &str, value: f64| {
            if value >= 0.0 && value.is_finite() {
                Ok(())
            } else {
                bad(field, format!("{value} must be at least 0 and finite"))
            }
        };
        if self.max_skipped_steps == 0 {
            return bad("max_skipped_steps", "must be at least 1".into());
        }
        self.model.params()?;

        let head = &self.head;
        if let Some(d) = head.hidden_dims.iter().find(|&&d| d <= 0) {
            return bad("head.hidden_dims", format!("{d} must be positive"));
        }
        if head.output_dim <= 0 {
            return bad(
                "head.output_dim",
                format!("{} must be positive", head.output_dim),
            );
        }
        if head.num_prototypes <= 0 {
            return bad(
                "head.num_prototypes",
                format!("{} must be positive", head.num_prototypes),
            );
        }
        positive("head.batch_norm_eps", head.batch_norm_eps)?;
        non_negative("head.batch_norm_momentum", head.batch_norm_momentum)?;
        // The running statistics are (1 - m) * running + m * batch: beyond 1 they diverge.
        if head.batch_norm_momentum > 1.0 {
            return bad(
                "head.batch_norm_momentum",
                format!("{:?} must be at most 1", head.batch_norm_momentum),
            );
        }

        self.augment
            .validate()
            .map_err(|e| ConfigError::invalid("augment", e.0))?;
        let crops = self.augment.views_per_image();
        let loss = &self.loss;
        if crops < 2 {
            return bad(
                "augment.crops",
                format!("{crops} crop per image; swapped prediction needs at least 2"),
            );
        }
        if loss.crops_for_assign.is_empty() {
            return bad("loss.crops_for_assign", "is empty".into());
        }
        if let Some(c) = loss.crops_for_assign.iter().find(|&&c| c >= crops) {
            return bad(
                "loss.crops_for_assign",
                format!("crop {c} does not exist: the augmentation makes {crops} crops"),
            );
        }
        positive("loss.temperature", loss.temperature)?;
        positive("loss.epsilon", loss.epsilon)?;
        if loss.sinkhorn_iterations == 0 {
            return bad("loss.sinkhorn_iterations", "must be at least 1".into());
        }
        if let Some(queue) = &loss.queue
            && queue.length < self.data.batch_size
        {
            return bad(
                "loss.queue.length",
                format!(
                    "{} is shorter than one batch ({}): leave the queue out instead",
                    queue.length, self.data.batch_size
                ),
            );
        }

        let data = &self.data;
        if data.url.trim().is_empty() {
            return bad("data.url", "is empty".into());
        }
        if data.batch_size == 0 {
            return bad("data.batch_size", "must be at least 1".into());
        }
        if data.threads == Some(0) {
            return bad("data.threads", "must be at least 1".into());
        }
        if data.prefetch == 0 {
            return bad("data.prefetch", "must be at least 1".into());
        }
        if data.staging_buffers < 2 {
            return bad(
                "data.staging_buffers",
                format!(
                    "{} is too few: the next batch is staged while the last one copies (at least 2)",
                    data.staging_buffers
                ),
            );
        }

        let optim = &self.optim;
        if optim.lr.is_some() && optim.lr_per_256.is_some() {
            return bad(
                "optim.lr",
                "give either lr (absolute) or lr_per_256 (scaled), not both".into(),
            );
        }
        if let Some(lr) = optim.lr {
            positive("optim.lr", lr)?;
        }
        if let Some(lr) = optim.lr_per_256 {
            positive("optim.lr_per_256", lr)?;
        }
        non_negative("optim.start_warmup_lr", optim.start_warmup_lr)?;
        non_negative("optim.final_lr_ratio", optim.final_lr_ratio)?;
        if let Some(lr) = optim.final_lr {
            non_negative("optim.final_lr", lr)?;
        }
        non_negative("optim.weight_decay", optim.weight_decay)?;
        non_negative("optim.momentum", optim.momentum)?;
        if optim.momentum >= 1.0 {
            return bad(
                "optim.momentum",
                format!("{} must be below 1", optim.momentum),
            );
        }
        positive("optim.trust_coefficient", optim.trust_coefficient)?;
        non_negative("optim.larc_eps", optim.larc_eps)?;

        if self.schedule.steps == 0 {
            return bad("schedule.steps", "must be at least 1".into());
        }
        if optim.warmup_steps > self.schedule.steps {
            return bad(
                "optim.warmup_steps",
                format!(
                    "{} is more than schedule.steps ({})",
                    optim.warmup_steps, self.schedule.steps
                ),
            );
        }
        if self.checkpoint.every_steps == 0 {
            return bad("checkpoint.every_steps", "must be at least 1".into());
        }
        if self.checkpoint.keep_last == 0 {
            return bad("checkpoint.keep_last", "must be at least 1".into());
        }
        if self.logging.every_steps == 0 {
            return bad("logging.every_steps", "must be at least 1".into());
        }
        Ok(())
    }

    /// The resolved configuration as TOML, every field spelled out: what a run saves as
    /// `config.toml` and what reproduces it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the configuration serializes to TOML")
    }

    /// A short digest of [`to_toml`](Self::to_toml), recorded in checkpoints to notice a resume
    /// under another configuration.
    pub fn digest(&self) -> String {
        let hash = Sha256::digest(self.to_toml().as_bytes());
        hex::encode(&hash[..8])
    }

    /// The trunk's design.
    pub fn regnet_params(&self) -> RegNetParams {
        self.model.params().expect("validated")
    }

    /// The head for a trunk of `input_dim` features.
    pub fn head_config(&self, input_dim: i64) -> SwavHeadConfig {
        let h = &self.head;
        SwavHeadConfig {
            input_dim,
            hidden_dims: h.hidden_dims.clone(),
            output_dim: h.output_dim,
            use_bn: h.use_bn,
            num_prototypes: h.num_prototypes,
            freeze_prototypes_iters: h.freeze_prototypes_iters,
            batch_norm_eps: h.batch_norm_eps,
            batch_norm_momentum: h.batch_norm_momentum,
        }
    }

    /// The loss, with one view per crop of the augmentation.
    pub fn loss_config(&self) -> SwavLossConfig {
        let l = &self.loss;
        SwavLossConfig {
            n_crops: self.augment.views_per_image(),
            crops_for_assign: l.crops_for_assign.clone(),
            temperature: l.temperature,
            epsilon: l.epsilon,
            sinkhorn_iterations: l.sinkhorn_iterations,
            use_f64: l.use_f64,
            hard_assignment_iters: l.hard_assignment_iters,
            queue: l.queue.map(|q| QueueConfig {
                length: q.length,
                start_iter: q.start_iter,
            }),
        }
    }

    /// The optimizer's hyper-parameters.
    pub fn larc_config(&self) -> LarcSgdConfig {
        let o = &self.optim;
        LarcSgdConfig {
            momentum: o.momentum,
            weight_decay: o.weight_decay,
            trust_coefficient: o.trust_coefficient,
            eps: o.larc_eps,
            clip: o.larc_clip,
        }
    }

    /// The learning-rate schedule for `world_size` processes of `data.batch_size` images.
    pub fn lr_schedule(&self, world_size: usize) -> LrSchedule {
        let o = &self.optim;
        let global_batch = self.data.batch_size * world_size;
        let base_lr = o.lr.unwrap_or_else(|| {
            LrSchedule::scaled_lr(o.lr_per_256.unwrap_or(DEFAULT_LR_PER_256), global_batch)
        });
        LrSchedule {
            start_warmup_lr: o.start_warmup_lr,
            base_lr,
            final_lr: o.final_lr.unwrap_or(base_lr * o.final_lr_ratio),
            warmup_iters: o.warmup_steps,
            total_iters: self.schedule.steps,
        }
    }

    /// The data seed: `data.seed`, else `seed`.
    pub fn data_seed(&self) -> u64 {
        self.data.seed.unwrap_or(self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        model = "400MF"
        augment = "swav"
        [data]
        url = "/tmp/shards"
        batch_size = 32
        [schedule]
        steps = 100
    "#;

    fn parse(text: &str, overrides: &[&str]) -> Result<TrainConfig, ConfigError> {
        TrainConfig::from_toml_str(text, overrides)
    }

    fn error(text: &str, overrides: &[&str]) -> String {
        parse(text, overrides).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_seers() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.head.num_prototypes, 16_000);
        assert_eq!(c.head.hidden_dims, [8192, 8192]);
        assert_eq!(c.loss.sinkhorn_iterations, 10);
        assert_eq!(c.optim.weight_decay, 1e-5);
        assert_eq!(c.precision, Precision::Fp32);
        assert_eq!(c.loss_config().n_crops, 8);
        assert_eq!(c.regnet_params(), preset("400MF").unwrap());
        // 0.3 per 256 at batch 32, cosine to 1/1000 of it.
        let schedule = c.lr_schedule(1);
        assert!((schedule.base_lr - 0.0375).abs() < 1e-12);
        assert!((schedule.final_lr - 0.0375e-3).abs() < 1e-15);
        assert!((c.lr_schedule(256).base_lr - 9.6).abs() < 1e-12);
    }

    #[test]
    fn resolved_configuration_round_trips() {
        let c = parse(MINIMAL, &["loss.queue.length=64", "augment.blur.p=0.25"]).unwrap();
        let text = c.to_toml();
        assert!(text.contains("[augment.blur]"), "{text}");
        let again = parse(&text, &[]).unwrap();
        assert_eq!(again, c);
        assert_eq!(again.digest(), c.digest());
        assert_eq!(again.augment.blur.p, 0.25);
        assert_eq!(again.loss.queue.unwrap().length, 64);
    }

    #[test]
    fn overrides_replace_add_and_parse_values() {
        let c = parse(
            MINIMAL,
            &[
                "optim.lr=1.5",
                "data.url=s3://bucket/some path",
                "precision=bf16",
                "head.hidden_dims=[64]",
                "model.depth=13",
                "augment=2x64@0.14-1+2x32@0.05-0.14",
            ],
        )
        .unwrap();
        assert_eq!(c.optim.lr, Some(1.5));
        assert_eq!(c.data.url, "s3://bucket/some path");
        assert_eq!(c.precision, Precision::Bf16);
        assert_eq!(c.head.hidden_dims, [64]);
        assert_eq!(c.model.preset.as_deref(), Some("400MF"));
        assert_eq!(c.model.depth, Some(13));
        assert_eq!(c.augment.view_sizes(), [64, 64, 32, 32]);
    }

    #[test]
    fn explicit_models_need_every_design_field() {
        let text = MINIMAL.replace(
            "model = \"400MF\"",
            "model = { depth = 4, w0 = 8, wa = 8.0, wm = 2.0, group_width = 8 }",
        );
        let c = parse(&text, &[]).unwrap();
        assert_eq!(c.regnet_params().stages().len(), 3);
        let text = MINIMAL.replace("model = \"400MF\"", "model = { depth = 4, w0 = 8 }");
        assert!(error(&text, &[]).starts_with("model.wa: missing"));
    }

    #[test]
    fn errors_name_the_field() {
        for (overrides, expected) in [
            (&["optim.lr=-1"][..], "optim.lr: -1 must be positive"),
            (&["optim.momentom=0.9"], "unknown field `momentom`"),
            (&["optim.lr=\"x\""], "optim.lr"),
            (
                &["model=\"999GF\""],
                "model.preset: unknown preset \"999GF\"",
            ),
            (&["model.w0=12"], "model.w0"),
            (
                &["loss.crops_for_assign=[0, 8]"],
                "loss.crops_for_assign: crop 8",
            ),
            (
                &["loss.queue.length=16"],
                "loss.queue.length: 16 is shorter",
            ),
            (&["schedule.steps=0"], "schedule.steps: must be at least 1"),
            (
                &["optim.warmup_steps=1000"],
                "optim.warmup_steps: 1000 is more",
            ),
            (
                &["augment.blur.p=2"],
                "augment: blur.p: 2 is not a probability",
            ),
            (&["precision=fp8"], "precision"),
            (&["checkpoint.keep_last=0"], "checkpoint.keep_last"),
            (
                &["optim.lr=1", "optim.lr_per_256=0.3"],
                "optim.lr: give either",
            ),
            (
                &["threads=4294967296"],
                "threads: 4294967296 is more than 1024",
            ),
            (&["data.prefetch=1000000000000000"], "data.prefetch: "),
            (
                &["head.num_prototypes=1000000000000"],
                "head.num_prototypes: 1000000000000 is more than",
            ),
            (&["head.output_dim=100000000000"], "head.output_dim: "),
            (&["head.hidden_dims=[100000000000]"], "head.hidden_dims: "),
            (&["distributed.timeout_s=1e30"], "more than a week"),
            (
                &["loss.sinkhorn_iterations=4294967296"],
                "loss.sinkhorn_iterations: 4294967296 is more than 1000",
            ),
            (
                &["head.batch_norm_momentum=1e300"],
                "head.batch_norm_momentum: 1e300 must be at most 1",
            ),
            (&["model.wa=1e30"], "stage widths of at most 65536 channels"),
            (&["data.batch_size"], "expected KEY.PATH=VALUE"),
            (&["data.url.x=1"], "url is a string, not a table"),
        ] {
            let message = error(MINIMAL, overrides);
            assert!(
                message.contains(expected),
                "{overrides:?}: {message:?} lacks {expected:?}"
            );
        }
        let message = error("seed = 1", &[]);
        assert!(message.contains("missing field `model`"), "{message}");
        let message = error("seed = [", &[]);
        assert!(
            message.starts_with("config: TOML parse error at line 1"),
            "{message}"
        );
    }

    #[test]
    fn ready_made_configurations_parse() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&configs).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = TrainConfig::load(&path, &[] as &[&str])
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let again = TrainConfig::from_toml_str(&c.to_toml(), &[] as &[&str]).unwrap();
                assert_eq!(again, c, "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 3, "configs/ has {seen} configurations");
    }

    #[test]
    fn the_seer_configuration_is_the_published_recipe() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/seer-regnety-256gf.toml");
        let c = TrainConfig::load(&path, &[] as &[&str]).unwrap();
        let params = c.regnet_params();
        assert_eq!(params, preset("256GF").unwrap());
        assert_eq!(c.head_config(params.out_channels()).input_dim, 10444);
        assert_eq!(c.head.hidden_dims, [8192, 8192]);
        assert_eq!((c.head.output_dim, c.head.num_prototypes), (256, 16_000));
        assert!(!c.head.use_bn);
        assert_eq!(c.augment.view_sizes(), [224, 224, 96, 96, 96, 96]);
        let loss = c.loss_config();
        assert_eq!((loss.epsilon, loss.temperature), (0.05, 0.1));
        assert_eq!(loss.sinkhorn_iterations, 10);
        assert_eq!(loss.queue, None);
        assert_eq!(c.optim.trust_coefficient, 0.001);
        assert_eq!(c.optim.weight_decay, 1e-5);
        assert_eq!(c.precision, Precision::Fp16);
        // 16 images on each of 512 GPUs: 8,192, lr 0.15 -> 9.6 over 8K steps, cosine to 0.0096.
        let schedule = c.lr_schedule(512);
        assert!((schedule.base_lr - 9.6).abs() < 1e-12);
        assert!((schedule.final_lr - 0.0096).abs() < 1e-12);
        assert_eq!(
            (schedule.start_warmup_lr, schedule.warmup_iters),
            (0.15, 8000)
        );
        assert_eq!(schedule.total_iters, 122_070);
    }
}
