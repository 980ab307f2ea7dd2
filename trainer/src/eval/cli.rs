//! `train eval knn` and `train eval linear`: the command-line arguments and what they run.
//!
//! Both extract (or take from the cache) the features of the training and test datasets, run
//! the probe, write a JSON report (and the confusion matrix as a PNG beside it) and return a
//! one-line summary for stdout. `--checkpoint random` evaluates the trunk of `--config` as a
//! run initializes it, `--checkpoint pixels` the normalized pixels of the crop (spell a
//! checkpoint folder named `random` or `pixels` as `./random`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::json;
use shards::StoreOptions;
use tch::{Device, Tensor};
use tracing::{info, warn};

use super::EvalError;
use super::features::{ExtractOptions, FeatureCache, Features, LoadedTrunk, Preprocess, Trunk};
use super::knn::{self, KnnConfig};
use super::linear::{self, LinearConfig};
use super::report::{Scores, confusion_png, score};
use crate::config::TrainConfig;

/// ImageNet's normalization, the augmenter's default, for `pixels` without a configuration.
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The evaluation protocols.
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Weighted kNN on frozen features (VISSL's: cosine similarity, top k, class score = sum
    /// of exp(similarity / T)).
    Knn {
        #[command(flatten)]
        common: CommonArgs,
        /// Neighbours.
        #[arg(long, default_value_t = 200)]
        k: i64,
        /// Temperature of the neighbours' votes.
        #[arg(long, default_value_t = 0.1)]
        temperature: f64,
    },
    /// A linear classifier trained on frozen features (SwAV's eval_linear: SGD, momentum 0.9,
    /// cosine schedule; random horizontal flips).
    Linear {
        #[command(flatten)]
        common: CommonArgs,
        /// Passes over the training features.
        #[arg(long, default_value_t = 100)]
        epochs: usize,
        /// Samples per SGD step.
        #[arg(long, default_value_t = 256)]
        probe_batch_size: i64,
        /// Peak learning rate per 256 samples of batch.
        #[arg(long, default_value_t = 0.3)]
        lr_per_256: f64,
        /// Weight decay.
        #[arg(long, default_value_t = 1e-6)]
        weight_decay: f64,
        /// A batch norm before the linear layer (VISSL's eval_mlp).
        #[arg(long)]
        batch_norm: bool,
        /// No flips: train on the center crops only.
        #[arg(long)]
        no_flip: bool,
        /// Seed of the probe's initialization, sample order and flips.
        #[arg(long, default_value_t = 0)]
        probe_seed: u64,
    },
}

/// What every protocol needs.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// The trunk: a checkpoint folder or checkpoint root (its newest), by path or URL;
    /// `random` (the architecture of --config, initialized with --seed); or `pixels`.
    #[arg(long, value_name = "CKPT|random|pixels")]
    checkpoint: String,
    /// Labeled shard dataset to fit on (kNN: the neighbours; linear: the classifier).
    #[arg(long, value_name = "DATA")]
    train: String,
    /// Labeled shard dataset to score.
    #[arg(long, value_name = "DATA")]
    test: String,
    /// Training configuration: the architecture for `random`; with `pixels`, the crop size and
    /// normalization.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Override a key of --config (repeatable), as `train --set`.
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
    /// Seed of the random initialization (default: the configuration's seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Center crop side (default: the largest crop of the training configuration).
    #[arg(long)]
    crop: Option<u32>,
    /// The shorter side is resized to this before the crop (default: crop x 256/224, rounded).
    #[arg(long)]
    resize: Option<u32>,
    /// cpu, cuda (the first GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Average-pool the trunk's last stage to N x N and flatten it (C x N² features): 1 is
    /// the global average pool; 2 is SwAV's `--global_pooling false` probe. Trunks only.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pool: u32,
    /// Images per trunk pass.
    #[arg(long, default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    batch_size: usize,
    /// torch threads (default: libtorch's, one per core).
    #[arg(long)]
    threads: Option<i32>,
    /// Keep features in this folder and reuse them (keyed by trunk, dataset and preprocessing).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The JSON report (the confusion matrix goes beside it as STEM-confusion.png; default
    /// eval-knn.json or eval-linear.json).
    #[arg(long, value_name = "FILE.json")]
    output: Option<PathBuf>,
}

/// Parses `cpu`, `cuda` or `cuda:N` and checks that the device exists.
pub fn parse_device(text: &str) -> Result<Device, EvalError> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => {
                return Err(EvalError::usage(
                    "--device",
                    format!("{other:?}: expected cpu, cuda or cuda:N"),
                ));
            }
        },
    };
    if let Device::Cuda(index) = device {
        let count = tch::Cuda::device_count();
        if index as i64 >= count {
            return Err(EvalError::usage(
                "--device",
                format!("{text}: libtorch sees {count} CUDA devices"),
            ));
        }
    }
    Ok(device)
}

impl EvalError {
    /// The `train` command's exit code for this error: 2 for usage, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            EvalError::Usage { .. } => 2,
            _ => 1,
        }
    }
}

fn trunk_of(common: &CommonArgs) -> Result<Trunk, EvalError> {
    let config = match &common.config {
        Some(path) => Some(
            TrainConfig::load(path, &common.overrides)
                .map_err(|e| EvalError::usage("--config", e.to_string()))?,
        ),
        None if !common.overrides.is_empty() => {
            return Err(EvalError::usage("--set", "needs --config"));
        }
        None => None,
    };
    Ok(match common.checkpoint.as_str() {
        "random" => {
            let config = config.ok_or_else(|| {
                EvalError::usage(
                    "--checkpoint random",
                    "needs --config FILE.toml for the architecture",
                )
            })?;
            let seed = common.seed.unwrap_or(config.seed);
            Trunk::Random {
                config: Box::new(config),
                seed,
            }
        }
        "pixels" => Trunk::Pixels,
        url => Trunk::Checkpoint(url.to_owned()),
    })
}

fn preprocess_of(
    common: &CommonArgs,
    trunk: &LoadedTrunk,
    given: Option<&TrainConfig>,
) -> Result<Preprocess, EvalError> {
    let config = trunk.config.as_ref().or(given);
    let crop = match (common.crop, config) {
        (Some(crop), _) => crop,
        (None, Some(config)) => config
            .augment
            .crops
            .iter()
            .map(|c| c.size)
            .max()
            .ok_or_else(|| EvalError::usage("augment.crops", "the configuration has none"))?,
        (None, None) => {
            return Err(EvalError::usage(
                "--crop",
                "needed with --checkpoint pixels unless --config gives the crop sizes",
            ));
        }
    };
    let resize = common
        .resize
        .unwrap_or_else(|| (f64::from(crop) * 256.0 / 224.0).round() as u32);
    let (mean, std) = config.map_or((IMAGENET_MEAN, IMAGENET_STD), |c| {
        (c.augment.mean, c.augment.std)
    });
    let preprocess = Preprocess {
        resize,
        crop,
        mean,
        std,
    };
    preprocess.validate()?;
    super::features::check_batch(common.batch_size, &preprocess)?;
    Ok(preprocess)
}

/// Class names (sorted), each sample's class index, and which classes have training samples
/// (only those can be predicted).
fn class_indices(train: &Features, test: &Features) -> (Vec<String>, Tensor, Tensor, Vec<bool>) {
    let train_classes: BTreeSet<&String> = train.labels.iter().collect();
    let all: BTreeSet<&String> = train_classes
        .iter()
        .copied()
        .chain(test.labels.iter())
        .collect();
    let unseen: Vec<&&String> = all.difference(&train_classes).collect();
    if !unseen.is_empty() {
        warn!(
            classes = ?unseen,
            "test classes absent from the training set: their samples count as errors"
        );
    }
    let classes: Vec<String> = all.into_iter().cloned().collect();
    let index = |labels: &[String]| {
        let indices: Vec<i64> = labels
            .iter()
            .map(|l| classes.binary_search(l).expect("every label is a class") as i64)
            .collect();
        Tensor::from_slice(&indices)
    };
    let (train_labels, test_labels) = (index(&train.labels), index(&test.labels));
    let trained = classes.iter().map(|c| train_classes.contains(c)).collect();
    (classes, train_labels, test_labels, trained)
}

/// Runs one `train eval` command; returns the one-line summary to print.
pub fn run(command: EvalCommand) -> Result<serde_json::Value, EvalError> {
    let (common, protocol) = match &command {
        EvalCommand::Knn { common, .. } => (common, "knn"),
        EvalCommand::Linear { common, .. } => (common, "linear"),
    };
    // Settings first, so that a bad one fails before any work.
    let knn_config;
    let linear_config;
    match &command {
        EvalCommand::Knn { k, temperature, .. } => {
            if *k < 1 {
                return Err(EvalError::usage("--k", format!("{k}: at least 1")));
            }
            if !(*temperature > 0.0 && temperature.is_finite()) {
                return Err(EvalError::usage(
                    "--temperature",
                    format!("{temperature}: must be positive"),
                ));
            }
            knn_config = Some(KnnConfig {
                k: *k,
                temperature: *temperature,
                ..KnnConfig::default()
            });
            linear_config = None;
        }
        EvalCommand::Linear {
            epochs,
            probe_batch_size,
            lr_per_256,
            weight_decay,
            batch_norm,
            no_flip,
            probe_seed,
            ..
        } => {
            if *epochs == 0 || *probe_batch_size < 1 {
                return Err(EvalError::usage(
                    "--epochs/--probe-batch-size",
                    "both must be at least 1",
                ));
            }
            let valid_lr = *lr_per_256 > 0.0 && lr_per_256.is_finite();
            let valid_decay = *weight_decay >= 0.0 && weight_decay.is_finite();
            if !(valid_lr && valid_decay) {
                return Err(EvalError::usage(
                    "--lr-per-256/--weight-decay",
                    "the learning rate must be positive, the weight decay at least 0",
                ));
            }
            linear_config = Some(LinearConfig {
                epochs: *epochs,
                batch_size: *probe_batch_size,
                lr_per_256: *lr_per_256,
                weight_decay: *weight_decay,
                batch_norm: *batch_norm,
                flip: !*no_flip,
                seed: *probe_seed,
                ..LinearConfig::default()
            });
            knn_config = None;
        }
    }
    if common.pool < 1 {
        return Err(EvalError::usage("--pool", "at least 1"));
    }
    let device = parse_device(&common.device)?;
    if let Some(threads) = common.threads {
        if threads < 1 {
            return Err(EvalError::usage("--threads", "at least 1"));
        }
        tch::set_num_threads(threads);
    }
    let output = common
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("eval-{protocol}.json")));
    let trunk_spec = trunk_of(common)?;
    if common.pool > 1 && matches!(trunk_spec, Trunk::Pixels) {
        return Err(EvalError::usage(
            "--pool",
            "pools a trunk's last feature map; pixels are the crop itself (leave --pool at 1)",
        ));
    }
    let given_config = match &trunk_spec {
        Trunk::Random { config, .. } => Some((**config).clone()),
        _ => common
            .config
            .as_ref()
            .map(|p| TrainConfig::load(p, &common.overrides))
            .transpose()
            .map_err(|e| EvalError::usage("--config", e.to_string()))?,
    };
    let store = StoreOptions::default();
    let trunk = LoadedTrunk::load(&trunk_spec, device, &store)?;
    let preprocess = preprocess_of(common, &trunk, given_config.as_ref())?;
    info!(
        trunk = trunk.description,
        ?preprocess,
        protocol,
        "evaluating"
    );
    let options = ExtractOptions {
        batch_size: common.batch_size,
        preprocess,
        pool: common.pool,
        store,
    };
    // After every check of the arguments (a usage error creates no folder), before the
    // features are extracted.
    check_output(&output)?;
    let cache = common.cache_dir.as_ref().map(FeatureCache::new);
    let started = Instant::now();
    let train = super::features::features_of(&common.train, &trunk, &options, cache.as_ref())?;
    let test = super::features::features_of(&common.test, &trunk, &options, cache.as_ref())?;
    let feature_seconds = started.elapsed().as_secs_f64();
    let (classes, train_labels, test_labels, trained) = class_indices(&train, &test);
    let class_count = classes.len() as i64;

    let started = Instant::now();
    let (ranked, settings) = match (knn_config, linear_config) {
        (Some(config), _) => {
            let ranked = knn::predict(
                &train.features.to_device(device),
                &train_labels.to_device(device),
                &test.features.to_device(device),
                class_count,
                &config,
            )
            .to_device(Device::Cpu);
            (
                ranked,
                json!({"k": config.k, "temperature": config.temperature}),
            )
        }
        (None, Some(config)) => {
            let probe = linear::train(
                &train.features,
                &train.flipped,
                &train_labels,
                class_count,
                &config,
                device,
            );
            let logits = probe.logits(&test.features.to_device(device));
            let ranked = logits.argsort(1, true).to_device(Device::Cpu);
            (
                ranked,
                json!({
                    "epochs": config.epochs,
                    "batch_size": config.batch_size,
                    "lr_per_256": config.lr_per_256,
                    "lr": config.lr_per_256 * config.batch_size as f64 / 256.0,
                    "weight_decay": config.weight_decay,
                    "momentum": config.momentum,
                    "batch_norm": config.batch_norm,
                    "flip": config.flip,
                    "seed": config.seed,
                    "final_train_loss": probe.epoch_losses.last(),
                }),
            )
        }
        (None, None) => unreachable!("one protocol is configured above"),
    };
    let probe_seconds = started.elapsed().as_secs_f64();
    let scores = score(&ranked, &test_labels, &classes, &trained);
    let png = confusion_path(&output);
    write_report(
        &output,
        &png,
        protocol,
        &trunk,
        common,
        &preprocess,
        settings,
        &train,
        &test,
        &classes,
        &scores,
        (feature_seconds, probe_seconds),
    )?;
    info!(
        protocol,
        top1 = scores.top1,
        top5 = scores.top5,
        report = %output.display(),
        "evaluated"
    );
    Ok(json!({
        "protocol": protocol,
        "trunk": trunk.description,
        "top1": scores.top1,
        "top5": scores.top5,
        "report": output,
        "confusion_png": png,
    }))
}

fn confusion_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "eval".into(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}-confusion.png"))
}

/// Finds an `--output` the report could not be written to before the features are extracted
/// (minutes to hours of work): a folder at that path, or a folder for it that cannot be
/// created or written (a temporary file is made in it and removed).
fn check_output(output: &Path) -> Result<(), EvalError> {
    if output.is_dir() {
        return Err(EvalError::usage(
            "--output",
            format!("{} is a folder: name the report's file", output.display()),
        ));
    }
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| EvalError::file(parent, e))?;
    tempfile::NamedTempFile::new_in(parent).map_err(|e| EvalError::file(parent, e))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    output: &Path,
    png: &Path,
    protocol: &str,
    trunk: &LoadedTrunk,
    common: &CommonArgs,
    preprocess: &Preprocess,
    settings: serde_json::Value,
    train: &Features,
    test: &Features,
    classes: &[String],
    scores: &Scores,
    (feature_seconds, probe_seconds): (f64, f64),
) -> Result<(), EvalError> {
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| EvalError::file(parent, e))?;
    }
    confusion_png(&scores.confusion, png)?;
    let report = json!({
        "protocol": protocol,
        "trunk": trunk.description,
        "train": common.train,
        "test": common.test,
        "train_samples": train.len(),
        "test_samples": test.len(),
        "feature_dim": train.dim(),
        "device": common.device,
        "preprocess": preprocess,
        "pool": common.pool,
        "settings": settings,
        "top1": scores.top1,
        "top5": scores.top5,
        "classes": classes,
        "per_class": scores.per_class,
        "confusion": scores.confusion,
        "confusion_png": png,
        "seconds": {"features": feature_seconds, "probe": probe_seconds},
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| EvalError::file(output, e))?;
    std::fs::write(output, text + "\n").map_err(|e| EvalError::file(output, e))
}
