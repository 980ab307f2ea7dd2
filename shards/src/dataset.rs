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
        let manifest = location.get_checked_json_opt(MANIFEST, Manifest::check).await?.ok_or_else(|| StoreError::BadUrl {
            url: url.to_string(),
            reason: format!("no {manifest_url}: not a dataset, or its ingest has not completed a shard yet (with --partition, run `ingest merge`)"),
        })?;
        Ok(Self { location, manifest })
    }

    /// The path of a shard's tar.
    pub fn shard_path(&self, shard: &ManifestShard) -> Path {
        self.location.child(&shard.name)
    }

    /// Reads a shard's index, refusing a version this build does not read.
    pub async fn index(&self, shard: &ManifestShard) -> Result<ShardIndex, StoreError> {
        let name = ShardNames::for_tar(&shard.name).index;
        self.location
            .get_checked_json(&name, ShardIndex::check)
            .await
    }

    /// Reads a shard's stats, refusing a version this build does not read.
    pub async fn stats(&self, shard: &ManifestShard) -> Result<ShardStats, StoreError> {
        let name = ShardNames::for_tar(&shard.name).stats;
        self.location
            .get_checked_json(&name, ShardStats::check)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ShardWriter;
    use crate::meta::FORMAT_VERSION;

    /// A dataset of one shard of one sample in a new folder; `edit` changes its index first.
    fn one_shard_dataset(edit: impl FnOnce(&mut ShardIndex)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let names = ShardNames::new("data", 0);
        let mut writer = ShardWriter::new(Vec::new(), names.tar.clone());
        writer
            .add(
                "k0",
                &[("jpg", b"x".as_slice()), ("json", b"{}".as_slice())],
            )
            .unwrap();
        let mut finished = writer.finish().unwrap();
        edit(&mut finished.index);
        std::fs::write(dir.path().join(&names.tar), &finished.out).unwrap();
        std::fs::write(
            dir.path().join(&names.index),
            serde_json::to_vec(&finished.index).unwrap(),
        )
        .unwrap();
        let manifest = Manifest {
            version: FORMAT_VERSION,
            shards: vec![ManifestShard {
                name: names.tar,
                samples: 1,
                bytes: finished.out.len() as u64,
                sha256: finished.sha256,
            }],
        };
        std::fs::write(
            dir.path().join(MANIFEST),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        dir
    }

    #[tokio::test]
    async fn an_index_of_another_version_is_refused() {
        let dir = one_shard_dataset(|_| {});
        let url = dir.path().to_str().unwrap();
        let dataset = Dataset::open(url, &StoreOptions::default()).await.unwrap();
        let shard = &dataset.manifest.shards[0];
        assert_eq!(dataset.index(shard).await.unwrap().samples.len(), 1);

        let dir = one_shard_dataset(|index| index.version = 7);
        let url = dir.path().to_str().unwrap();
        let dataset = Dataset::open(url, &StoreOptions::default()).await.unwrap();
        let error = dataset
            .index(&dataset.manifest.shards[0])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("data-000000.index.json")
                && error.contains("format version 7; this build reads version 1"),
            "{error}"
        );
    }
}
