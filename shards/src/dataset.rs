//! A dataset opened from its manifest.

use object_store::path::Path;

use crate::StoreError;
use crate::meta::{MANIFEST, Manifest, ManifestShard, ShardIndex, ShardNames, ShardStats};
use crate::reader::{Sample, ShardStream, read_indexed_sample};
use crate::store::{Location, StoreOptions};

/// A dataset: a location and its manifest.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where the dataset lives.
    pub location: Location,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Dataset {
    /// Opens the dataset at `url` by reading its manifest.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let location = Location::open(url, options, false)?;
        let manifest_url = location.url_of(&location.child(MANIFEST));
        let manifest: Manifest = location.get_json_opt(MANIFEST).await?.ok_or_else(|| StoreError::BadUrl {
            url: url.to_string(),
            reason: format!("no {manifest_url}: not a dataset, or its ingest has not completed a shard yet (with --partition, run `ingest merge`)"),
        })?;
        manifest.check().map_err(|reason| StoreError::BadDocument {
            url: manifest_url,
            reason,
        })?;
        Ok(Self { location, manifest })
    }

    /// The path of a shard's tar.
    pub fn shard_path(&self, shard: &ManifestShard) -> Path {
        self.location.child(&shard.name)
    }

    /// Reads a shard's index.
    pub async fn index(&self, shard: &ManifestShard) -> Result<ShardIndex, StoreError> {
        self.location
            .get_json(&ShardNames::for_tar(&shard.name).index)
            .await
    }

    /// Reads a shard's stats.
    pub async fn stats(&self, shard: &ManifestShard) -> Result<ShardStats, StoreError> {
        self.location
            .get_json(&ShardNames::for_tar(&shard.name).stats)
            .await
    }

    /// Streams a shard's samples.
    pub async fn stream(&self, shard: &ManifestShard) -> Result<ShardStream, StoreError> {
        Ok(ShardStream::open(
            self.location.store.as_ref(),
            &self.shard_path(shard),
            &shard.name,
        )
        .await?)
    }

    /// Finds a sample by key through the shard indexes (one index read per
    /// shard until found, then one ranged read).
    pub async fn find(&self, key: &str) -> Result<Option<(ManifestShard, Sample)>, StoreError> {
        for shard in &self.manifest.shards {
            let index = self.index(shard).await?;
            if let Some(entry) = index.samples.iter().find(|e| e.key == key) {
                let sample = read_indexed_sample(
                    self.location.store.as_ref(),
                    &self.shard_path(shard),
                    &shard.name,
                    entry,
                )
                .await?;
                return Ok(Some((shard.clone(), sample)));
            }
        }
        Ok(None)
    }
}
