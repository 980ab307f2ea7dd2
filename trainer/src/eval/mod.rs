//! What the features of a pretrained trunk are worth: weighted kNN and linear probes on labeled
//! shards, as VISSL and SwAV measure them (seer.md §6).
//!
//! 1. [`features::extract`] runs a frozen trunk ([`features::Trunk`]: a checkpoint, the same
//!    architecture randomly initialized, or raw pixels as a baseline) in eval mode over every
//!    sample of a labeled shard dataset (`ingest --labels-from-folders` or `--label-column` put
//!    each label in the sample's `cls`): decode, resize the shorter side, center crop, normalize
//!    as the augmenter does, global average pool. It also keeps the features of the horizontally
//!    flipped crop, the linear probe's light augmentation. [`features::FeatureCache`] stores them
//!    on disk so that several probes share one extraction.
//! 2. [`knn::predict`] classifies each test sample by VISSL's weighted kNN (cosine similarity,
//!    the top k training samples, class score Σ exp(similarity / T)).
//! 3. [`linear::train`] trains a linear classifier (optionally after a batch norm) on the
//!    frozen features with SGD, momentum and a cosine schedule; its logits rank the test set's
//!    classes.
//! 4. [`report::score`] turns either ranking into [`report::Scores`]: top-1, top-5, per-class
//!    accuracy and the confusion matrix, written as JSON and the matrix also as a PNG.
//!
//! The `train eval` command ([`cli`]) drives it all.
//!
//! ```
//! use tch::{Kind, Tensor};
//! use trainer::eval::knn::{KnnConfig, predict};
//!
//! // Two training samples per class, on opposite sides of the circle.
//! let train = Tensor::from_slice(&[1.0f32, 0.0, 0.9, 0.1, -1.0, 0.0, -0.9, -0.1]).view([4, 2]);
//! let train_labels = Tensor::from_slice(&[0i64, 0, 1, 1]);
//! let test = Tensor::from_slice(&[0.8f32, 0.3, -0.7, 0.2]).view([2, 2]);
//! let ranked = predict(&train, &train_labels, &test, 2, &KnnConfig { k: 3, temperature: 0.1, chunk: 1024 });
//! assert_eq!(Vec::<i64>::try_from(ranked.select(1, 0)).unwrap(), [0, 1]);
//! ```

pub mod cli;
pub mod features;
pub mod knn;
pub mod linear;
pub mod report;

use std::path::PathBuf;

use tch::TchError;

/// Why an evaluation cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A setting that cannot work (caught before any work starts).
    #[error("{field}: {message}")]
    Usage {
        /// The option or configuration field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The dataset could not be opened or read.
    #[error("dataset {url}: {source}")]
    Dataset {
        /// The dataset.
        url: String,
        /// The storage or shard error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A sample cannot be used.
    #[error("dataset {url}, shard {shard}, sample {key}: {reason}")]
    Sample {
        /// The dataset.
        url: String,
        /// The shard holding it.
        shard: String,
        /// The sample's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint could not be read or does not fit its configuration.
    #[error("checkpoint {url}: {reason}")]
    Checkpoint {
        /// The checkpoint.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A feature cache or report file could not be read or written.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

impl EvalError {
    pub(crate) fn usage(field: impl Into<String>, message: impl Into<String>) -> Self {
        EvalError::Usage {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        EvalError::File {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}
