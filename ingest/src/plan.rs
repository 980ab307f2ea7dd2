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
//!
//! Two guards keep one output to one job. Before writing any chunk, the planner claims the
//! output with `_plan/claim.json` (a create-only write), so a second job started into the same
//! empty output at the same moment is refused instead of mixing its chunks into the plan; the
//! same job started twice writes the same chunks and may go on. And the plan records the
//! number of partitions: each partition keeps its own manifest and drops exact duplicates
//! within its own shards, so a run with another count would make other shards under the same
//! names and overwrite those other partitions completed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shards::{Location, StoreOptions};

use crate::IngestError;
use crate::image::ImageConfig;
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
    /// The number of partitions (`--partition I/N`) the job runs in (absent in plans made
    /// before it was recorded, which then accept any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u64>,
    /// The per-image settings every shard is made with (absent in plans made before they were
    /// recorded, which then accept any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageConfig>,
}

impl Plan {
    /// The number of items the plan puts in shard `id`.
    pub fn items_in_shard(&self, id: u64) -> u64 {
        self.items
            .saturating_sub(id.saturating_mul(self.samples_per_shard))
            .min(self.samples_per_shard)
    }
}

/// What makes a job: everything its plan and shards depend on.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    /// The input.
    pub input: &'a InputSpec,
    /// Items per shard.
    pub samples_per_shard: u64,
    /// Shard name prefix.
    pub shard_prefix: &'a str,
    /// The number of partitions.
    pub partitions: u64,
    /// The per-image settings.
    pub image: &'a ImageConfig,
}

impl Job<'_> {
    /// The plan of this job, before its input is read (no shards and items yet).
    fn plan(&self, shards: u64, items: u64) -> Plan {
        Plan {
            version: 1,
            input: self.input.clone(),
            samples_per_shard: self.samples_per_shard,
            shard_prefix: self.shard_prefix.to_string(),
            shards,
            items,
            partitions: Some(self.partitions),
            image: Some(self.image.clone()),
        }
    }
}

/// Name of the plan's summary document.
pub const PLAN: &str = "_plan/plan.json";

/// Name of the claim a planner writes before its first chunk.
pub const CLAIM: &str = "_plan/claim.json";

/// Name of the chunk of shard `id`.
pub fn chunk_name(id: u64) -> String {
    format!("_plan/{id:06}.jsonl")
}

/// Reads the plan if there is one and checks that it was made for this job.
pub async fn existing(output: &Location, job: &Job<'_>) -> Result<Option<Plan>, IngestError> {
    let Some(plan) = output
        .get_json_opt::<Plan>(PLAN)
        .await
        .map_err(IngestError::Output)?
    else {
        return Ok(None);
    };
    let differences = differences(&plan, job);
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
/// Spellings of one local folder or file (`in`, `./in/`, `../here/in`, its absolute path, a
/// link to it) are the same input.
fn differences(plan: &Plan, job: &Job<'_>) -> Vec<String> {
    let (samples_per_shard, shard_prefix) = (job.samples_per_shard, job.shard_prefix);
    fn same_place(a: &str, b: &str) -> bool {
        let canonical = |url: &str| {
            let Ok(normalized) = shards::store::normalize_url(url) else {
                return url.to_string();
            };
            // A local path that exists: where it really is, `..` and links resolved.
            if normalized.scheme() == "file"
                && let Ok(path) = normalized.to_file_path()
                && let Ok(real) = std::fs::canonicalize(path)
            {
                return real.display().to_string();
            }
            normalized.as_str().trim_end_matches('/').to_string()
        };
        a == b || canonical(a) == canonical(b)
    }
    let mut out = Vec::new();
    let mut differ = |what: &str, planned: String, now: String| {
        if planned != now {
            out.push(format!("{what}: {planned} in the plan, {now} in this run"));
        }
    };
    let (p, i) = (&plan.input, job.input);
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
    if let Some(partitions) = plan.partitions {
        differ(
            "partitions (the N of --partition I/N)",
            partitions.to_string(),
            job.partitions.to_string(),
        );
    }
    // Shards made with other image settings would mix two datasets under one manifest.
    if let Some(planned) = &plan.image {
        let now = job.image;
        for (option, planned, now) in [
            ("--max-bytes", planned.max_input_bytes, now.max_input_bytes),
            ("--max-pixels", planned.max_pixels, now.max_pixels),
            ("--min-side", planned.min_side.into(), now.min_side.into()),
            (
                "--max-short-side",
                planned.max_short_side.into(),
                now.max_short_side.into(),
            ),
            (
                "--quality",
                planned.jpeg_quality.into(),
                now.jpeg_quality.into(),
            ),
        ] {
            differ(option, planned.to_string(), now.to_string());
        }
        differ(
            "--always-reencode",
            (!planned.keep_original_jpeg).to_string(),
            (!now.keep_original_jpeg).to_string(),
        );
    }
    out
}

/// Claims the output for this job, streams the input into chunks and stores the plan.
pub async fn make(
    output: &Location,
    job: &Job<'_>,
    options: &StoreOptions,
) -> Result<Plan, IngestError> {
    let input = job.input;
    // The input opens (or fails, naming it) before anything is written to the output.
    let stream = items(input, options).await?;
    let claimed = output
        .create_json(CLAIM, &job.plan(0, 0))
        .await
        .map_err(IngestError::Output)?;
    if !claimed {
        // The same job (running now, or stopped while planning) writes the same chunks, so it
        // may go on; another job may not.
        let theirs: Option<Plan> = output
            .get_json_opt(CLAIM)
            .await
            .map_err(IngestError::Output)?;
        let differences = theirs
            .map(|plan| differences(&plan, job))
            .unwrap_or_default();
        if !differences.is_empty() {
            return Err(IngestError::Config(format!(
                "{} is being planned by another job (running now, or stopped while planning): \
                 {}; write to a new output, or delete its _plan folder if no such job runs",
                output.url,
                differences.join("; ")
            )));
        }
    }
    let planned = write_chunks(output, job, stream).await;
    if claimed && matches!(planned, Err(_) | Ok((0, _))) {
        // Nothing was planned: take the claim back, so that the output is as it was.
        let _ = output.delete(CLAIM).await;
    }
    let (shards, total) = planned?;
    if total == 0 {
        return Err(IngestError::Config(format!(
            "the input {} holds no image (looked for extensions {})",
            input.url,
            input.extensions.join(", ")
        )));
    }
    let plan = job.plan(shards, total);
    output
        .put_json(PLAN, &plan)
        .await
        .map_err(IngestError::Output)?;
    Ok(plan)
}

/// Writes the chunks of the items of `stream`; returns how many chunks and items.
async fn write_chunks(
    output: &Location,
    job: &Job<'_>,
    mut stream: impl futures::Stream<Item = Result<SourceItem, IngestError>> + Unpin,
) -> Result<(u64, u64), IngestError> {
    let samples_per_shard = job.samples_per_shard;
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
    tracing::info!(
        items = total,
        shards,
        seconds = started.elapsed().as_secs_f64(),
        "planned"
    );
    Ok((shards, total))
}

/// Waits for another partition (index 0) to store the plan.
pub async fn wait(
    output: &Location,
    job: &Job<'_>,
    timeout: Duration,
) -> Result<Plan, IngestError> {
    let started = Instant::now();
    let mut next_note = Duration::ZERO;
    loop {
        if let Some(plan) = existing(output, job).await? {
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

/// Reads the items of shard `id`, which must be as many as the plan put there: a chunk cut
/// short (at a line boundary, so every line still parses) would otherwise lose its sources
/// without a trace.
pub async fn chunk(
    output: &Location,
    plan: &Plan,
    id: u64,
) -> Result<Vec<SourceItem>, IngestError> {
    let name = chunk_name(id);
    let url = || output.url_of(&output.child(&name));
    let bytes = output.get_bytes(&name).await.map_err(IngestError::Output)?;
    let items = bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_slice(line).map_err(|e| {
                IngestError::Config(format!("{} line {}: corrupt plan: {e}", url(), i + 1))
            })
        })
        .collect::<Result<Vec<SourceItem>, _>>()?;
    let planned = plan.items_in_shard(id);
    if items.len() as u64 != planned {
        return Err(IngestError::Config(format!(
            "{}: corrupt plan: {} sources where the plan put {planned} ({} items in {} shards of \
             {}); plan the job again into a new output",
            url(),
            items.len(),
            plan.items,
            plan.shards,
            plan.samples_per_shard
        )));
    }
    Ok(items)
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

    static DEFAULT_IMAGE: std::sync::LazyLock<ImageConfig> =
        std::sync::LazyLock::new(ImageConfig::default);

    fn job(input: &InputSpec, samples_per_shard: u64, partitions: u64) -> Job<'_> {
        Job {
            input,
            samples_per_shard,
            shard_prefix: "data",
            partitions,
            image: &DEFAULT_IMAGE,
        }
    }

    #[test]
    fn a_mismatched_plan_names_what_differs() {
        let cwd = std::env::current_dir().unwrap();
        let input = spec("in");
        let plan = job(&input, 10, 2).plan(1, 3);
        // One folder, three spellings: the same job.
        for same in ["in", "in/", cwd.join("in").to_str().unwrap()] {
            let same = spec(same);
            assert!(
                differences(&plan, &job(&same, 10, 2)).is_empty(),
                "{same:?}"
            );
        }
        // Spellings that only resolve on disk: `..` through another folder, and a link.
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("in");
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        std::fs::create_dir_all(&folder).unwrap();
        std::os::unix::fs::symlink(&folder, dir.path().join("link")).unwrap();
        let planned = spec(folder.to_str().unwrap());
        let plan_here = job(&planned, 10, 2).plan(1, 3);
        for same in ["other/../in", "link", "link/"] {
            let same = spec(dir.path().join(same).to_str().unwrap());
            assert!(
                differences(&plan_here, &job(&same, 10, 2)).is_empty(),
                "{same:?}"
            );
        }
        let elsewhere = spec(dir.path().join("other").to_str().unwrap());
        assert_eq!(differences(&plan_here, &job(&elsewhere, 10, 2)).len(), 1);
        let mut other = spec("in");
        other.labels = LabelSource::FolderName;
        let found = differences(&plan, &job(&other, 20, 1));
        assert_eq!(
            found,
            [
                "labels: None in the plan, FolderName in this run",
                "samples per shard: 10 in the plan, 20 in this run",
                "partitions (the N of --partition I/N): 2 in the plan, 1 in this run"
            ]
        );
        assert_eq!(differences(&plan, &job(&spec("elsewhere"), 10, 2)).len(), 1);
        // Other image settings: shards of two kinds under one manifest.
        let image = ImageConfig {
            max_short_side: 100,
            jpeg_quality: 20,
            keep_original_jpeg: false,
            ..ImageConfig::default()
        };
        let found = differences(
            &plan,
            &Job {
                image: &image,
                ..job(&input, 10, 2)
            },
        );
        assert_eq!(
            found,
            [
                "--max-short-side: 512 in the plan, 100 in this run",
                "--quality: 90 in the plan, 20 in this run",
                "--always-reencode: false in the plan, true in this run"
            ]
        );
        // A plan made before the count and the image settings were recorded accepts any.
        let old = Plan {
            partitions: None,
            image: None,
            ..plan
        };
        assert!(differences(&old, &job(&input, 10, 3)).is_empty());
        assert!(
            differences(
                &old,
                &Job {
                    image: &image,
                    ..job(&input, 10, 2)
                }
            )
            .is_empty()
        );
    }

    #[tokio::test]
    async fn a_chunk_cut_short_is_a_corrupt_plan_not_lost_sources() {
        let dir = tempfile::tempdir().unwrap();
        let input_dir = dir.path().join("in");
        std::fs::create_dir(&input_dir).unwrap();
        for i in 0..5 {
            std::fs::write(input_dir.join(format!("{i}.jpg")), b"not read").unwrap();
        }
        let options = StoreOptions::default();
        let output_dir = dir.path().join("out");
        let output = Location::open(output_dir.to_str().unwrap(), &options, true).unwrap();
        let input = spec(input_dir.to_str().unwrap());
        let plan = make(&output, &job(&input, 2, 1), &options).await.unwrap();
        assert_eq!((plan.shards, plan.items), (3, 5));
        assert_eq!(chunk(&output, &plan, 1).await.unwrap().len(), 2);
        assert_eq!(chunk(&output, &plan, 2).await.unwrap().len(), 1);
        // Cut after its first line: every line left still parses.
        let path = output_dir.join(chunk_name(1));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..=text.find('\n').unwrap()]).unwrap();
        let message = chunk(&output, &plan, 1).await.unwrap_err().to_string();
        assert!(
            message.contains("000001.jsonl: corrupt plan: 1 sources where the plan put 2"),
            "{message}"
        );
        std::fs::write(&path, "").unwrap();
        let message = chunk(&output, &plan, 1).await.unwrap_err().to_string();
        assert!(
            message.contains("0 sources where the plan put 2"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_second_job_cannot_plan_into_an_output_another_has_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let input_dir = dir.path().join("in");
        std::fs::create_dir(&input_dir).unwrap();
        std::fs::write(input_dir.join("a.jpg"), b"not read while planning").unwrap();
        let output_dir = dir.path().join("out");
        let options = StoreOptions::default();
        let output = Location::open(output_dir.to_str().unwrap(), &options, true).unwrap();
        let input = spec(input_dir.to_str().unwrap());
        // Another job's claim, as a planner that started a moment earlier leaves it.
        let theirs = job(&input, 5, 1);
        assert!(output.create_json(CLAIM, &theirs.plan(0, 0)).await.unwrap());
        let message = make(&output, &job(&input, 8, 1), &options)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("being planned by another job")
                && message.contains("samples per shard: 5 in the plan, 8 in this run"),
            "{message}"
        );
        assert!(!output_dir.join(chunk_name(0)).exists(), "no chunk written");
        // The same job again (a rerun after a crash while planning) goes on.
        let plan = make(&output, &theirs, &options).await.unwrap();
        assert_eq!((plan.shards, plan.items), (1, 1));

        // A planner that finds nothing to plan takes its claim back.
        let empty_dir = dir.path().join("empty");
        std::fs::create_dir(&empty_dir).unwrap();
        let fresh_dir = dir.path().join("fresh");
        let fresh = Location::open(fresh_dir.to_str().unwrap(), &options, true).unwrap();
        let empty = spec(empty_dir.to_str().unwrap());
        let message = make(&fresh, &job(&empty, 5, 1), &options)
            .await
            .unwrap_err()
            .to_string();
        assert!(message.contains("holds no image"), "{message}");
        assert!(!fresh_dir.join(CLAIM).exists());
    }
}
