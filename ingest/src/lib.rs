//! `ingest`: unlabeled images in object storage -> validated, normalized
//! images -> WebDataset shards with index, stats and manifest.
//!
//! - [`input`] lists a prefix or reads a list file (text, CSV, JSONL).
//! - [`plan`] cuts the input into shard-sized chunks, stored with the output,
//!   so that reruns, resumes and partitions agree on what goes where.
//! - [`image`] validates, decodes, orients, resizes and re-encodes one image.
//! - [`pool`] is the fixed set of threads the image work runs on.
//! - [`job`] runs it all with bounded concurrency and publishes each shard
//!   atomically; [`job::merge`] combines partitions' manifests.

pub mod image;
pub mod input;
pub mod job;
pub mod plan;
pub mod pool;

/// Errors that stop an ingest job. Per-image problems are not errors: they
/// are counted and listed in each shard's stats.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The configuration or command line is unusable.
    #[error("{0}")]
    Config(String),
    /// The input cannot be opened.
    #[error("input: {0}")]
    Input(shards::StoreError),
    /// Listing the input failed (after retries).
    #[error("listing {url}: {source}")]
    Listing {
        /// The prefix listed.
        url: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// Reading a list file failed.
    #[error("reading {url}: {source}")]
    Fetch {
        /// The list file.
        url: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A line of a list file is malformed.
    #[error("{url} line {line}: {reason}")]
    ListFile {
        /// The list file.
        url: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Writing the output failed (after retries); completed shards are kept
    /// and a rerun resumes.
    #[error("output: {0}")]
    Output(shards::StoreError),
    /// A local spool file failed.
    #[error("local work file: {0}")]
    Local(String),
    /// Too many sources failed.
    #[error(
        "stopping: {failed} of {seen} sources failed (shards completed by earlier runs included), more than the allowed rate of {max_rate}; completed shards are kept ({detail})"
    )]
    TooManyFailures {
        /// Failures so far.
        failed: u64,
        /// Sources seen so far.
        seen: u64,
        /// The configured maximum rate.
        max_rate: f64,
        /// Reasons and the last failure.
        detail: String,
    },
}

/// The causes of `error`, nearest first.
pub(crate) fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(error.source(), |cause| cause.source())
}

/// An error's text followed by its causes' (those it does not already include): the HTTP
/// client's errors say "error sending request" or "builder error" and keep the reason (a
/// timeout, a reset, too many redirects, a malformed proxy URL) in their sources.
pub(crate) fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    for cause in causes(error) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}
