//! The job's plan: which source goes into which shard.
//!
//! Before any image is fetched the input is streamed once and cut into
//! chunks of `samples_per_shard` items, stored in the output under
//! `_plan/` (`_plan/000000.jsonl`, ..., then `_plan/plan.json` last, which
//! marks the plan complete). Shard `N` is made from chunk `N`, always: a
//! rerun or resume, on any machine, finds the same plan and so makes the same
//! shards with the same keys, and `--partition I/N` workers split the shards
//! (`id % N == I`) without talking to each other. Streaming keeps memory at
//! one chunk whatever the input's size (img2dataset plans the same way).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shards::{Location, StoreOptions};

use crate::IngestError;
use crate::input::{InputSpec, SourceItem, items};

/// The plan's summary document, `_plan/plan.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Format version.
    pub version: u32,
    /// The input it was made from.
    pub input: InputSpec,
    /// Items per shard.
    pub samples_per_shard: u64,
    /// Shard name prefix.
    pub shard_prefix: String,
    /// Number of shards.
    pub shards: u64,
    /// Number of items.
    pub items: u64,
}

/// Name of the plan's summary document.
pub const PLAN: &str = "_plan/plan.json";

/// Name of the chunk of shard `id`.
pub fn chunk_name(id: u64) -> String {
    format!("_plan/{id:06}.jsonl")
}

/// Reads the plan if there is one and checks that it was made for this job.
pub async fn existing(
    output: &Location,
    input: &InputSpec,
    samples_per_shard: u64,
    shard_prefix: &str,
) -> Result<Option<Plan>, IngestError> {
    let Some(plan) = output
        .get_json_opt::<Plan>(PLAN)
        .await
        .map_err(IngestError::Output)?
    else {
        return Ok(None);
    };
    if plan.input != *input
        || plan.samples_per_shard != samples_per_shard
        || plan.shard_prefix != shard_prefix
    {
        return Err(IngestError::Config(format!(
            "{} already holds a plan for another job (input {}, {} samples per shard, prefix {:?}); \
             rerun with the same input and settings to resume it, or write to a new output",
            output.url, plan.input.url, plan.samples_per_shard, plan.shard_prefix
        )));
    }
    Ok(Some(plan))
}

/// Streams the input into chunks and stores the plan.
pub async fn make(
    output: &Location,
    input: &InputSpec,
    samples_per_shard: u64,
    shard_prefix: &str,
    options: &StoreOptions,
) -> Result<Plan, IngestError> {
    let mut stream = items(input, options).await?;
    let mut chunk = Vec::new();
    let mut shards = 0u64;
    let mut total = 0u64;
    let started = Instant::now();
    while let Some(item) = stream.next().await {
        let item = item?;
        serde_json::to_writer(&mut chunk, &item).expect("items serialize");
        chunk.push(b'\n');
        total += 1;
        if total.is_multiple_of(samples_per_shard) {
            output
                .put_bytes(&chunk_name(shards), std::mem::take(&mut chunk))
                .await
                .map_err(IngestError::Output)?;
            shards += 1;
        }
    }
    if !chunk.is_empty() {
        output
            .put_bytes(&chunk_name(shards), chunk)
            .await
            .map_err(IngestError::Output)?;
        shards += 1;
    }
    if total == 0 {
        return Err(IngestError::Config(format!(
            "the input {} holds no image (looked for extensions {})",
            input.url,
            input.extensions.join(", ")
        )));
    }
    let plan = Plan {
        version: 1,
        input: input.clone(),
        samples_per_shard,
        shard_prefix: shard_prefix.to_string(),
        shards,
        items: total,
    };
    output
        .put_json(PLAN, &plan)
        .await
        .map_err(IngestError::Output)?;
    tracing::info!(
        items = total,
        shards,
        seconds = started.elapsed().as_secs_f64(),
        "planned"
    );
    Ok(plan)
}

/// Waits for another partition (index 0) to store the plan.
pub async fn wait(
    output: &Location,
    input: &InputSpec,
    samples_per_shard: u64,
    shard_prefix: &str,
    timeout: Duration,
) -> Result<Plan, IngestError> {
    let started = Instant::now();
    loop {
        if let Some(plan) = existing(output, input, samples_per_shard, shard_prefix).await? {
            return Ok(plan);
        }
        if started.elapsed() > timeout {
            return Err(IngestError::Config(format!(
                "no plan appeared in {} within {} s: partition 0 makes it; is it running?",
                output.url,
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Reads the items of shard `id`.
pub async fn chunk(output: &Location, id: u64) -> Result<Vec<SourceItem>, IngestError> {
    let name = chunk_name(id);
    let bytes = output.get_bytes(&name).await.map_err(IngestError::Output)?;
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_slice(line).map_err(|e| {
                IngestError::Config(format!(
                    "{} line {}: corrupt plan: {e}",
                    output.url_of(&output.child(&name)),
                    i + 1
                ))
            })
        })
        .collect()
}
