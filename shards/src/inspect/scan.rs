//! Streaming every shard of a dataset, several shards at once, each on its
//! own task so that parsing and visiting samples use every core.

use std::sync::Arc;

use futures::StreamExt;

use super::Reporter;
use crate::meta::{ManifestShard, SampleMeta};
use crate::{Dataset, Sample};

/// What scanning one shard produced.
pub(crate) struct ShardScan<A> {
    /// The shard.
    pub shard: ManifestShard,
    /// What the visitor accumulated.
    pub acc: A,
    /// Why the shard could not be read to its end, if it could not.
    pub error: Option<String>,
}

/// Streams every shard in the manifest (at most `jobs` at once) and calls
/// `visit` on each sample with the shard's accumulator. Results come back in
/// manifest order. A shard that cannot be read keeps what was visited before
/// the error and reports the error.
pub(crate) async fn scan_samples<A, F>(
    dataset: &Dataset,
    jobs: usize,
    reporter: Arc<dyn Reporter>,
    visit: F,
) -> Vec<ShardScan<A>>
where
    A: Default + Send + 'static,
    F: Fn(&mut A, &ManifestShard, Sample) + Send + Sync + 'static,
{
    let visit = Arc::new(visit);
    reporter.start(
        dataset.manifest.shards.len(),
        dataset.manifest.total_bytes(),
    );
    let tasks = futures::stream::iter(dataset.manifest.shards.clone())
        .map(|shard| {
            let dataset = dataset.clone();
            let visit = visit.clone();
            let reporter = reporter.clone();
            tokio::spawn(async move {
                let mut acc = A::default();
                let mut read = 0u64;
                let error = match dataset.stream(&shard).await {
                    Err(e) => Some(e.to_string()),
                    Ok(mut stream) => loop {
                        match stream.next().await {
                            Ok(Some(sample)) => {
                                reporter.advance(sample.offset.saturating_sub(read));
                                read = read.max(sample.offset);
                                visit(&mut acc, &shard, sample);
                            }
                            Ok(None) => break None,
                            Err(e) => break Some(e.to_string()),
                        }
                    },
                };
                reporter.advance(shard.bytes.saturating_sub(read));
                reporter.shard_done(&shard.name);
                ShardScan { shard, acc, error }
            })
        })
        .buffered(jobs.max(1));
    tasks
        .map(|joined| joined.expect("a shard scan task panicked"))
        .collect()
        .await
}

/// Parses a sample's `KEY.json` as [`SampleMeta`].
pub(crate) fn sample_meta(sample: &Sample) -> Result<SampleMeta, String> {
    let json = sample
        .get("json")
        .ok_or_else(|| "no .json member".to_string())?;
    serde_json::from_slice(json).map_err(|e| format!("KEY.json does not parse: {e}"))
}
