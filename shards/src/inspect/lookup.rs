//! `shards cat` and `shards get`: one sample by key.

use super::InspectError;
use crate::{Dataset, ManifestShard, Sample};

/// A sample found by key.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its shard.
    pub shard: ManifestShard,
    /// The sample (its `offset` is the byte offset of its first header).
    pub sample: Sample,
}

/// Finds a sample through the shard indexes and reads it with one ranged read.
pub async fn lookup(dataset: &Dataset, key: &str) -> Result<Found, InspectError> {
    match dataset.find(key).await? {
        Some((shard, sample)) => Ok(Found { shard, sample }),
        None => Err(InspectError::KeyNotFound {
            key: key.to_string(),
            url: dataset.location.url.clone(),
        }),
    }
}
