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
    let differences = differences(&plan, input, samples_per_shard, shard_prefix);
    if !differences.is_empty() {
        return Err(IngestError::Config(format!(
            "{} already holds a plan for another job: {}; rerun with the plan's input and \
             settings to resume it, or write to a new output",
            output.url,
            differences.join("; ")
        )));
    }
    Ok(Some(plan))
}

/// What differs between a stored plan's job and this one, as "what: the plan's, this run's".
/// Two spellings of one local folder (`in`, `./in/`, its absolute path) are the same input.
fn differences(
    plan: &Plan,
    input: &InputSpec,
    samples_per_shard: u64,
    shard_prefix: &str,
) -> Vec<String> {
    fn same_place(a: &str, b: &str) -> bool {
        let canonical = |url: &str| {
            shards::store::normalize_url(url)
                .map(|u| u.as_str().trim_end_matches('/').to_string())
                .unwrap_or_else(|_| url.to_string())
        };
        a == b || canonical(a) == canonical(b)
    }
    let mut out = Vec::new();
    let mut differ = |what: &str, planned: String, now: String| {
        if planned != now {
            out.push(format!("{what}: {planned} in the plan, {now} in this run"));
        }
    };
    let (p, i) = (&plan.input, input);
    if !same_place(&p.url, &i.url) {
        differ("input", p.url.clone(), i.url.clone());
    }
    let list = |l: bool| if l { "a list file" } else { "a prefix to list" }.to_string();
    differ("input kind", list(p.list), list(i.list));
    if p.list || i.list {
        differ(
            "list format",
            format!("{:?}", p.list_format),
            format!("{:?}", i.list_format),
        );
        differ("URL column", p.url_column.clone(), i.url_column.clone());
    }
    differ(
        "labels",
        format!("{:?}", p.labels),
        format!("{:?}", i.labels),
    );
    differ("extensions", p.extensions.join(","), i.extensions.join(","));
    differ(
        "samples per shard",
        plan.samples_per_shard.to_string(),
        samples_per_shard.to_string(),
    );
    differ(
        "shard prefix",
        format!("{:?}", plan.shard_prefix),
        format!("{shard_prefix:?}"),
    );
    out
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
    let mut next_note = Duration::ZERO;
    loop {
        if let Some(plan) = existing(output, input, samples_per_shard, shard_prefix).await? {
            return Ok(plan);
        }
        // Say what the partition waits for, at once and then every minute, so that a typo in
        // partition 0's output is not an hour of silence.
        let waited = started.elapsed();
        if waited >= next_note {
            tracing::info!(
                output = %output.url,
                waited_s = waited.as_secs(),
                timeout_s = timeout.as_secs(),
                "waiting for partition 0 to write the plan (_plan/plan.json)"
            );
            next_note = waited + Duration::from_secs(60);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{LabelSource, ListFormat};

    fn spec(url: &str) -> InputSpec {
        InputSpec {
            url: url.into(),
            list: false,
            list_format: ListFormat::Auto,
            url_column: "url".into(),
            labels: LabelSource::None,
            extensions: vec!["jpg".into()],
        }
    }

    #[test]
    fn a_mismatched_plan_names_what_differs() {
        let cwd = std::env::current_dir().unwrap();
        let plan = Plan {
            version: 1,
            input: spec("in"),
            samples_per_shard: 10,
            shard_prefix: "data".into(),
            shards: 1,
            items: 3,
        };
        // One folder, three spellings: the same job.
        for same in ["in", "in/", cwd.join("in").to_str().unwrap()] {
            assert!(
                differences(&plan, &spec(same), 10, "data").is_empty(),
                "{same}"
            );
        }
        let mut other = spec("in");
        other.labels = LabelSource::FolderName;
        let found = differences(&plan, &other, 20, "data");
        assert_eq!(
            found,
            [
                "labels: None in the plan, FolderName in this run",
                "samples per shard: 10 in the plan, 20 in this run"
            ]
        );
        assert_eq!(differences(&plan, &spec("elsewhere"), 10, "data").len(), 1);
    }
}
