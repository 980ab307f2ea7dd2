//! The ingest job: plan, then make each of this partition's shards.
//!
//! Per shard, sources are fetched with a bounded number of requests in
//! flight and processed on a CPU pool sized to the cores. Each accepted
//! sample is appended to a local spool file as soon as it is ready, so memory
//! holds only the samples in flight. When every source of the shard is done
//! the samples are written to the shard in plan order (so a rerun gives the
//! same bytes), exact duplicates and sources listed twice are dropped (the
//! earliest in plan order is kept), and the shard is published: tar, then
//! index, then stats, then the manifest, each an atomic put. A shard is
//! complete exactly when the manifest lists it; a crash anywhere before leaves
//! at most an unlisted tar that the rerun overwrites.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shards::meta::{FORMAT_VERSION, MANIFEST};
use shards::{
    Failure, Location, Manifest, ManifestShard, SampleMeta, ShardNames, ShardStats, ShardWriter,
    StageSeconds, StoreOptions,
};

use crate::image::{ImageConfig, ProcessedImage, process_image};
use crate::input::{InputSpec, Resolver, Source, SourceItem};
use crate::pool::CpuPool;
use crate::{IngestError, causes, plan, with_causes};

/// Which share of the shards this worker makes: shards `id` with `id % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// This worker's index, from 0.
    pub index: u32,
    /// Number of workers.
    pub count: u32,
}

impl Default for Partition {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Partition {
    type Err = String;

    /// Parses `I/N`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (index, count) = text
            .split_once('/')
            .ok_or_else(|| format!("partition {text:?} is not I/N"))?;
        let index: u32 = index
            .trim()
            .parse()
            .map_err(|_| format!("partition index {index:?} is not a number"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("partition count {count:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!(
                "partition {index}/{count}: the index must be below the count"
            ));
        }
        Ok(Self { index, count })
    }
}

impl Partition {
    /// The manifest this partition writes: the dataset's own when it is the
    /// only one, else its part, which `ingest merge` combines.
    pub fn manifest_name(&self) -> String {
        if self.count == 1 {
            MANIFEST.to_string()
        } else {
            format!(
                "_parts/manifest-{:05}-of-{:05}.json",
                self.index, self.count
            )
        }
    }
}

/// Everything the job needs; `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct JobConfig {
    /// What to read.
    pub input: InputSpec,
    /// Where the dataset goes (a URL or local folder).
    pub output: String,
    /// Shard names are `PREFIX-000000.tar`. Default `data`.
    pub shard_prefix: String,
    /// Sources per shard. Default 10,000: at the default 512-px short side
    /// and JPEG q90 a sample is 40-60 KB, so a shard is 400-600 MB, inside
    /// WebDataset's 256 MiB - 1 GiB range (big enough that per-object
    /// latency is amortized, small enough that a failed shard costs minutes).
    pub samples_per_shard: u64,
    /// This worker's share.
    pub partition: Partition,
    /// Source fetches in flight. Default 32: hides object-store latency
    /// (~20-100 ms) at hundreds of images per second.
    pub fetch_concurrency: usize,
    /// Images processed at once (CPU threads). Default: the number of cores.
    pub workers: usize,
    /// Per-image settings.
    pub image: ImageConfig,
    /// Abort when more than this fraction of sources failed (after at least
    /// [`JobConfig::failure_rate_min_samples`]). Default 0.5.
    pub max_failure_rate: f64,
    /// Samples seen before the failure rate is judged. Default 200.
    pub failure_rate_min_samples: u64,
    /// Retry only the failed sources of completed shards.
    pub retry_failed: bool,
    /// Local folder for spool files. Default: the system's temporary folder.
    pub work_dir: PathBuf,
    /// Store access (retries, options).
    pub store: StoreOptions,
    /// How long partitions other than 0 wait for the plan. Default 1 hour.
    pub plan_wait: Duration,
}

impl JobConfig {
    /// A configuration with defaults for everything but input and output.
    pub fn new(input: InputSpec, output: impl Into<String>) -> Self {
        Self {
            input,
            output: output.into(),
            shard_prefix: "data".into(),
            samples_per_shard: 10_000,
            partition: Partition::default(),
            fetch_concurrency: 32,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            image: ImageConfig::default(),
            max_failure_rate: 0.5,
            failure_rate_min_samples: 200,
            retry_failed: false,
            work_dir: std::env::temp_dir(),
            store: StoreOptions::default(),
            plan_wait: Duration::from_secs(3600),
        }
    }
}

/// Progress, reported after each source and each shard.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Sources this worker has to go through (its shards' items).
    pub items_total: u64,
    /// Sources done (written, failed, duplicate, or in a shard done before).
    pub items_done: u64,
    /// Samples written.
    pub written: u64,
    /// Sources failed.
    pub failed: u64,
    /// Exact duplicates skipped.
    pub duplicates: u64,
    /// Original bytes read.
    pub bytes_in: u64,
    /// Shards of this worker done.
    pub shards_done: u64,
    /// Shards of this worker.
    pub shards_total: u64,
}

/// How often progress is reported while no source finishes.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// Receives progress; the CLI draws a bar or logs from it.
pub trait Reporter: Send + Sync {
    /// Called often (after each source, and every 10 s while none finishes); keep it cheap.
    fn progress(&self, progress: &Progress);
    /// Called once per shard published.
    fn shard_done(&self, _stats: &ShardStats) {}
}

/// A reporter that does nothing.
pub struct Silent;

impl Reporter for Silent {
    fn progress(&self, _: &Progress) {}
}

/// What a finished job did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobSummary {
    /// Shards this run published.
    pub shards_written: u64,
    /// Shards already complete before this run.
    pub shards_skipped: u64,
    /// Samples written by this run.
    pub written: u64,
    /// Sources that failed in this run.
    pub failed: u64,
    /// Exact duplicates skipped in this run.
    pub duplicates: u64,
    /// Failures by reason.
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Original bytes read.
    pub bytes_in: u64,
    /// Shard bytes written.
    pub bytes_out: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Time by stage, summed over samples.
    pub stage_seconds: StageSeconds,
}

/// Counters shared by the job's tasks.
#[derive(Default)]
struct Counters {
    seen: AtomicU64,
    failed: AtomicU64,
}

/// One accepted sample waiting in the spool.
struct Spooled {
    plan_index: usize,
    key: String,
    sha256: [u8; 32],
    ext: &'static str,
    offset: u64,
    image_len: usize,
    json_len: usize,
}

/// A shard written to a local temporary file, not yet published.
struct Assembled {
    names: ShardNames,
    tar_file: tempfile::NamedTempFile,
    index: shards::ShardIndex,
    sha256: String,
    stats: ShardStats,
    /// The shard's earlier stats, when `--retry-failed` remade it.
    previous: Option<ShardStats>,
    started: Instant,
}

/// The outcome of one source.
enum Outcome {
    Accepted {
        plan_index: usize,
        item: SourceItem,
        meta: object_store::ObjectMeta,
        sha256: [u8; 32],
        image: Box<ProcessedImage>,
        fetch: Duration,
    },
    Failed {
        failure: Failure,
        bytes_in: u64,
        fetch: Duration,
    },
}

/// The sample key of a source: 24 hex digits (96 bits) of the SHA-256 of its
/// URL. Deterministic, so reruns and resumes give the same keys; collisions
/// are negligible (about 1e-11 for a billion sources).
pub fn sample_key(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..12])
}

/// Runs the job: plans (or finds the plan), then makes this partition's
/// shards that are not complete yet.
pub async fn run(config: &JobConfig, reporter: &dyn Reporter) -> Result<JobSummary, IngestError> {
    config
        .image
        .validate()
        .map_err(|e| IngestError::Config(e.to_string()))?;
    // Made here, so that a web client setting among the store options that cannot be used (a
    // proxy URL, say) stops the job before it starts, rather than failing every web source.
    let resolver = Resolver::new(config.store.clone()).map_err(IngestError::Config)?;
    for (what, value) in [
        ("samples per shard", config.samples_per_shard),
        ("fetch concurrency", config.fetch_concurrency as u64),
        ("workers", config.workers as u64),
    ] {
        if value == 0 {
            return Err(IngestError::Config(format!(
                "{what} must be at least 1, not 0"
            )));
        }
    }
    shards::validate_key(&config.shard_prefix).map_err(|e| {
        let reason = match e {
            shards::ShardError::BadKey { reason, .. } => reason.to_string(),
            other => other.to_string(),
        };
        IngestError::Config(format!("shard prefix {:?}: {reason}", config.shard_prefix))
    })?;
    let started = Instant::now();
    let output =
        Location::open(&config.output, &config.store, true).map_err(IngestError::Output)?;
    let job = plan::Job {
        input: &config.input,
        samples_per_shard: config.samples_per_shard,
        shard_prefix: &config.shard_prefix,
        partitions: u64::from(config.partition.count),
        image: &config.image,
    };
    let plan = match plan::existing(&output, &job).await? {
        Some(plan) => plan,
        None if config.partition.index == 0 => plan::make(&output, &job, &config.store).await?,
        None => plan::wait(&output, &job, config.plan_wait).await?,
    };
    let manifest_name = config.partition.manifest_name();
    let mut manifest: Manifest = output
        .get_checked_json_opt(&manifest_name, Manifest::check)
        .await
        .map_err(IngestError::Output)?
        .unwrap_or(Manifest {
            version: FORMAT_VERSION,
            shards: Vec::new(),
        });
    let my_shards: Vec<u64> = (0..plan.shards)
        .filter(|id| id % u64::from(config.partition.count) == u64::from(config.partition.index))
        .collect();

    // Exact duplicates, and sources listed twice, are written once per job: remember what
    // completed shards hold.
    let mut seen = Seen::default();
    // The failure rate is the partition's, not this run's: a rerun after a stop for too many
    // failures must not carry on until it has seen the minimum again. (With --retry-failed the
    // earlier failures are fetched again, and counted when they are.)
    let counters = Counters::default();
    // A listed shard that is no longer complete is made again (see `completed_shard`); the
    // stats of done shards with failures are kept for --retry-failed, which refetches those.
    let mut damaged = HashSet::new();
    let mut with_failures = BTreeMap::new();
    for shard in &manifest.shards {
        let (stats, index) = match completed_shard(&output, shard).await? {
            Ok(documents) => documents,
            Err(problem) => {
                tracing::warn!(shard = %shard.name, "{} {problem}: made again", shard.name);
                damaged.insert(shard.name.clone());
                continue;
            }
        };
        for entry in &index.samples {
            seen.hashes
                .extend(entry.source_sha256.as_deref().and_then(decode_hex));
            seen.keys.extend(decode_hex(&entry.key));
        }
        if !config.retry_failed {
            counters.seen.fetch_add(stats.count, Ordering::Relaxed);
            counters.failed.fetch_add(stats.failed, Ordering::Relaxed);
        } else if !stats.failures.is_empty() {
            with_failures.insert(shard.name.clone(), stats);
        }
    }
    manifest
        .shards
        .retain(|shard| !damaged.contains(&shard.name));

    let mut progress = Progress {
        items_total: my_shards.iter().map(|&id| plan.items_in_shard(id)).sum(),
        shards_total: my_shards.len() as u64,
        ..Progress::default()
    };
    let mut summary = JobSummary::default();
    let job = JobState {
        config,
        output: &output,
        resolver: Arc::new(resolver),
        cpu: CpuPool::new("ingest-cpu", config.workers).map_err(|e| {
            IngestError::Local(format!("starting {} CPU threads: {e}", config.workers))
        })?,
        counters: Arc::new(counters),
        reporter,
    };
    let mut publishing = None;
    for &id in &my_shards {
        let names = ShardNames::new(&plan.shard_prefix, id);
        let done = manifest.shards.iter().any(|s| s.name == names.tar);
        if done && !config.retry_failed {
            summary.shards_skipped += 1;
            progress.items_done += plan.items_in_shard(id);
            progress.shards_done += 1;
            reporter.progress(&progress);
            continue;
        }
        let items = plan::chunk(&output, &plan, id).await?;
        let kept = if done {
            let Some(stats) = with_failures.remove(&names.tar) else {
                summary.shards_skipped += 1;
                progress.items_done += items.len() as u64;
                progress.shards_done += 1;
                continue;
            };
            Some(stats)
        } else {
            None
        };
        // A shard is published (uploaded, then listed in the manifest) while the next one is
        // made, so the CPU threads do not wait for uploads. Shards are still assembled,
        // deduplicated and listed one after the other, in order.
        let making = job.make_shard(&names, items, kept, &mut seen, &mut progress);
        let assembled = match publishing.take() {
            Some(previous) => {
                let (assembled, published) = futures::join!(making, previous);
                // A published shard is listed even when making the next one failed.
                job.list_published(
                    published?,
                    &mut manifest,
                    &manifest_name,
                    &mut summary,
                    &mut progress,
                )
                .await?;
                assembled?
            }
            None => making.await?,
        };
        publishing = Some(job.publish(assembled));
    }
    if let Some(last) = publishing {
        job.list_published(
            last.await?,
            &mut manifest,
            &manifest_name,
            &mut summary,
            &mut progress,
        )
        .await?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn add_stage_seconds(total: &mut StageSeconds, add: &StageSeconds) {
    total.fetch += add.fetch;
    total.decode += add.decode;
    total.resize += add.resize;
    total.encode += add.encode;
    total.write += add.write;
}

/// What this partition has written: the content hashes of its sources (exact duplicates are
/// dropped) and its sample keys (a source listed twice is written once).
#[derive(Default)]
struct Seen {
    hashes: HashSet<[u8; 32]>,
    /// Keys as the 12 bytes their 24 hex digits spell ([`sample_key`]).
    keys: HashSet<[u8; 12]>,
}

/// The `N` bytes that hex `text` spells (a SHA-256, a sample key), if it spells that many.
fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    hex::decode(text).ok()?.try_into().ok()
}

struct JobState<'a> {
    config: &'a JobConfig,
    output: &'a Location,
    resolver: Arc<Resolver>,
    cpu: CpuPool,
    counters: Arc<Counters>,
    reporter: &'a dyn Reporter,
}

impl JobState<'_> {
    /// A failed read or write of a local work file (in `--work-dir`), naming the folder.
    fn work_file_error(&self, what: &str, error: &std::io::Error) -> IngestError {
        IngestError::Local(format!(
            "{what} in {}: {error}",
            self.config.work_dir.display()
        ))
    }

    /// One read of an object from its store.
    async fn store_get(&self, location: &Location, path: &Path) -> Fetched {
        let result = match location.store.get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Fetched::NotFound("no such object".into());
            }
            Err(error) => return Fetched::from_store_error(&error),
        };
        let meta = result.meta.clone();
        let cap = self.config.image.max_input_bytes;
        if meta.size > cap {
            // Refused from the object's size alone, before reading its bytes.
            return Fetched::too_large(meta.size, cap);
        }
        match result.bytes().await {
            Ok(bytes) => Fetched::Bytes(meta, bytes),
            Err(error) => Fetched::from_store_error(&error),
        }
    }

    /// A local file read with the file system's calls (for names object_store cannot hold),
    /// with the same cap and the same metadata as a store's read.
    async fn file_get(&self, file: &std::path::Path) -> Fetched {
        let cap = self.config.image.max_input_bytes;
        let file = file.to_path_buf();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Result<_, u64>> {
            use std::io::Read;
            let mut opened = std::fs::File::open(&file)?;
            let metadata = opened.metadata()?;
            if metadata.len() > cap {
                return Ok(Err(metadata.len()));
            }
            // Read one byte past the cap, in case the file grew since its size was read.
            let mut bytes = Vec::with_capacity(metadata.len() as usize);
            (&mut opened).take(cap + 1).read_to_end(&mut bytes)?;
            Ok(Ok((metadata, bytes)))
        })
        .await;
        let (metadata, bytes) = match read {
            Ok(Ok(Ok(read))) => read,
            Ok(Ok(Err(size))) => return Fetched::too_large(size, cap),
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => {
                return Fetched::NotFound("no such file".into());
            }
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                return Fetched::Denied(error.to_string());
            }
            Ok(Err(error)) => return Fetched::Failed(error.to_string()),
            Err(error) => return Fetched::Failed(format!("the read stopped: {error}")),
        };
        if bytes.len() as u64 > cap {
            return Fetched::TooLarge(format!(
                "input grew past the {cap}-byte cap while it was read"
            ));
        }
        let meta = object_store::ObjectMeta {
            location: Path::default(),
            last_modified: metadata
                .modified()
                .map(chrono::DateTime::<chrono::Utc>::from)
                .unwrap_or_default(),
            size: bytes.len() as u64,
            e_tag: None,
            version: None,
        };
        Fetched::Bytes(meta, bytes.into())
    }

    /// One plain GET of an http(s) URL, query included, read up to the input byte cap.
    async fn http_get(&self, client: &reqwest::Client, url: &str, path: &Path) -> Fetched {
        use reqwest::StatusCode;
        let cap = self.config.image.max_input_bytes;
        let mut response = match client.get(url).send().await {
            Ok(response) => response,
            // A redirect loop, or a chain longer than the client follows, stays so.
            // So does a redirect to a URL the client cannot follow (a scheme other than http
            // and https), which it reports as a request it could not build.
            Err(error) if error.is_redirect() || error.is_builder() => {
                return Fetched::Refused(with_causes(&error));
            }
            // A server whose TLS the client refuses (a certificate it does not trust, a
            // handshake it cannot complete) gives the same refusal next time.
            Err(error) => {
                let message = with_causes(&error);
                return match tls_refusal(&error) {
                    Some(rustls::Error::InvalidCertificate(_)) => Fetched::Refused(format!(
                        "{message} (the store option allow_invalid_certificates=true accepts \
                         such a certificate)"
                    )),
                    Some(_) => Fetched::Refused(message),
                    None => Fetched::Failed(message),
                };
            }
        };
        let status = response.status();
        let mut answered = format!("the server answered {status}");
        // After redirects the answer is the last URL's, which the message names.
        if reqwest::Url::parse(url).ok().as_ref() != Some(response.url()) {
            answered.push_str(&format!(" at {}, where it was redirected", response.url()));
        }
        match status {
            StatusCode::NOT_FOUND | StatusCode::GONE => return Fetched::NotFound(answered),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Fetched::Denied(answered),
            // A timeout, "too early", "too many requests" and server errors may pass; the
            // server may say when to ask again.
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS => {
                return Fetched::Busy(answered, retry_after(response.headers()));
            }
            _ if status.is_server_error() => {
                return Fetched::Busy(answered, retry_after(response.headers()));
            }
            // A redirect the client did not follow (no usable Location: file:, data:, a
            // broken URL) is the same answer next time; it names where it pointed.
            _ if status.is_redirection() => {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
                return Fetched::Refused(match location {
                    Some(location) => format!(
                        "{answered}, a redirect to {location:?}, which is not followed (only \
                         http and https URLs are)"
                    ),
                    None => answered,
                });
            }
            // Any other client error (400, 405, 414, 451, ...) is the same answer next time.
            _ if !status.is_success() => return Fetched::Refused(answered),
            _ => {}
        }
        if let Some(length) = response.content_length()
            && length > cap
        {
            return Fetched::too_large(length, cap);
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|value: &reqwest::header::HeaderValue| value.to_str().ok())
                .map(str::to_owned)
        };
        let e_tag = header(reqwest::header::ETAG);
        let last_modified = header(reqwest::header::LAST_MODIFIED)
            .and_then(|date| http_date(&date))
            .map_or_else(chrono::Utc::now, chrono::DateTime::<chrono::Utc>::from);
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > cap {
                        return Fetched::TooLarge(format!(
                            "input is more than the {cap}-byte cap (the server sent no length)"
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => return Fetched::Failed(with_causes(&error)),
            }
        }
        let meta = object_store::ObjectMeta {
            location: path.clone(),
            last_modified,
            size: body.len() as u64,
            e_tag,
            version: None,
        };
        Fetched::Bytes(meta, Bytes::from(body))
    }

    /// Makes one shard from its plan chunk, in a local file, for [`JobState::publish`].
    /// With `previous` (a completed shard's stats, for `--retry-failed`) the samples
    /// already in the shard are kept and only the listed failures are fetched again.
    async fn make_shard(
        &self,
        names: &ShardNames,
        items: Vec<SourceItem>,
        previous: Option<ShardStats>,
        seen: &mut Seen,
        progress: &mut Progress,
    ) -> Result<Assembled, IngestError> {
        let started = Instant::now();
        let start_time = chrono::Utc::now().to_rfc3339();
        let spool_file = tempfile::tempfile_in(&self.config.work_dir).map_err(|e| {
            IngestError::Local(format!(
                "spool file in {}: {e}",
                self.config.work_dir.display()
            ))
        })?;
        let mut spool = BufWriter::with_capacity(1 << 20, spool_file);
        let mut spool_len = 0u64;
        let mut spooled: Vec<Spooled> = Vec::new();
        let mut stats = ShardStats {
            version: FORMAT_VERSION,
            shard: names.tar.clone(),
            count: items.len() as u64,
            start_time,
            ..ShardStats::default()
        };

        // Which plan items to fetch: all, or (retrying) only the failed ones,
        // after copying the shard's existing samples into the spool.
        let mut todo: Vec<(usize, SourceItem)> = items.iter().cloned().enumerate().collect();
        if let Some(previous) = &previous {
            let failed: HashSet<&str> = previous.failures.iter().map(|f| f.url.as_str()).collect();
            let position: BTreeMap<String, usize> = items
                .iter()
                .enumerate()
                .map(|(i, item)| (sample_key(&item.url), i))
                .collect();
            let index: shards::ShardIndex = self
                .output
                .get_checked_json(&names.index, shards::ShardIndex::check)
                .await
                .map_err(IngestError::Output)?;
            let mut stream = shards::ShardStream::open(
                self.output.store.as_ref(),
                &self.output.child(&names.tar),
                &names.tar,
            )
            .await
            .map_err(|e| IngestError::Output(e.into()))?;
            let mut entries = index.samples.iter();
            while let Some(sample) = stream
                .next()
                .await
                .map_err(|e| IngestError::Output(e.into()))?
            {
                let entry = entries
                    .next()
                    .filter(|e| e.key == sample.key)
                    .ok_or_else(|| {
                        IngestError::Config(format!(
                            "{}: index does not match the shard at key {}",
                            names.tar, sample.key
                        ))
                    })?;
                let (ext, image) = sample.image().ok_or_else(|| {
                    IngestError::Config(format!(
                        "{}: sample {} has no image",
                        names.tar, sample.key
                    ))
                })?;
                let ext: &'static str = match ext {
                    "png" => "png",
                    "webp" => "webp",
                    _ => "jpg",
                };
                let json = sample.get("json").ok_or_else(|| {
                    IngestError::Config(format!("{}: sample {} has no json", names.tar, sample.key))
                })?;
                let sha256 = entry
                    .source_sha256
                    .as_deref()
                    .and_then(decode_hex)
                    .unwrap_or_default();
                let plan_index = *position.get(&sample.key).ok_or_else(|| {
                    IngestError::Config(format!(
                        "{}: sample {} is not in the plan",
                        names.tar, sample.key
                    ))
                })?;
                spool
                    .write_all(image)
                    .and_then(|()| spool.write_all(json))
                    .map_err(|e| self.work_file_error("spool", &e))?;
                spooled.push(Spooled {
                    plan_index,
                    key: sample.key.clone(),
                    sha256,
                    ext,
                    offset: spool_len,
                    image_len: image.len(),
                    json_len: json.len(),
                });
                spool_len += (image.len() + json.len()) as u64;
                seen.hashes.remove(&sha256);
                if let Some(key) = decode_hex(&sample.key) {
                    seen.keys.remove(&key);
                }
            }
            todo.retain(|(_, item)| failed.contains(item.url.as_str()));
            progress.items_done += (items.len() - todo.len()) as u64;
        }

        let mut results = futures::stream::iter(
            todo.into_iter()
                .map(|(plan_index, item)| self.fetch_and_process(plan_index, item)),
        )
        .buffer_unordered(self.config.fetch_concurrency);
        // Progress goes out as sources finish, and also on a clock: when every source in
        // flight is stalled (a slow server, a long retry), the log still shows the job alive.
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        loop {
            let outcome = tokio::select! {
                outcome = results.next() => match outcome {
                    Some(outcome) => outcome,
                    None => break,
                },
                _ = heartbeat.tick() => {
                    self.reporter.progress(progress);
                    continue;
                }
            };
            progress.items_done += 1;
            let seen = self.counters.seen.fetch_add(1, Ordering::Relaxed) + 1;
            match outcome {
                Outcome::Failed {
                    failure,
                    bytes_in,
                    fetch,
                } => {
                    stats.failed += 1;
                    stats.bytes_in += bytes_in;
                    stats.stage_seconds.fetch += fetch.as_secs_f64();
                    *stats
                        .failed_by_reason
                        .entry(failure.reason.clone())
                        .or_default() += 1;
                    tracing::debug!(url = %failure.url, reason = %failure.reason, message = %failure.message, "source failed");
                    stats.failures.push(failure);
                    progress.failed += 1;
                    let failed = self.counters.failed.fetch_add(1, Ordering::Relaxed) + 1;
                    let rate = failed as f64 / seen as f64;
                    if seen >= self.config.failure_rate_min_samples
                        && rate > self.config.max_failure_rate
                    {
                        let mut reasons: Vec<_> = stats
                            .failed_by_reason
                            .iter()
                            .map(|(r, n)| format!("{r}: {n}"))
                            .collect();
                        reasons.sort();
                        return Err(IngestError::TooManyFailures {
                            failed,
                            seen,
                            max_rate: self.config.max_failure_rate,
                            detail: format!(
                                "in shard {} so far: {}; last: {} ({})",
                                names.tar,
                                reasons.join(", "),
                                stats.failures.last().map_or("", |f| f.url.as_str()),
                                stats.failures.last().map_or("", |f| f.message.as_str())
                            ),
                        });
                    }
                }
                Outcome::Accepted {
                    plan_index,
                    item,
                    meta,
                    sha256,
                    image,
                    fetch,
                } => {
                    let key = sample_key(&item.url);
                    let sample_meta = SampleMeta {
                        key: key.clone(),
                        url: item.url,
                        source_size: meta.size,
                        etag: meta.e_tag,
                        last_modified: Some(meta.last_modified.to_rfc3339()),
                        original_width: image.original_width,
                        original_height: image.original_height,
                        width: image.width,
                        height: image.height,
                        format: image.format.extension().to_string(),
                        sha256: hex::encode(sha256),
                        phash: format!("{:016x}", image.phash),
                        kept_original: image.kept_original,
                        cls: item.cls,
                    };
                    let json = serde_json::to_vec(&sample_meta).expect("metadata serializes");
                    spool
                        .write_all(&image.bytes)
                        .and_then(|()| spool.write_all(&json))
                        .map_err(|e| self.work_file_error("spool", &e))?;
                    spooled.push(Spooled {
                        plan_index,
                        key,
                        sha256,
                        ext: image.format.extension(),
                        offset: spool_len,
                        image_len: image.bytes.len(),
                        json_len: json.len(),
                    });
                    spool_len += (image.bytes.len() + json.len()) as u64;
                    stats.bytes_in += meta.size;
                    progress.bytes_in += meta.size;
                    let t = &image.timings;
                    stats.stage_seconds.fetch += fetch.as_secs_f64();
                    stats.stage_seconds.decode += t.decode.as_secs_f64();
                    stats.stage_seconds.resize += t.resize.as_secs_f64();
                    stats.stage_seconds.encode += (t.encode + t.hash).as_secs_f64();
                }
            }
            self.reporter.progress(progress);
        }
        drop(results);

        // Write the shard in plan order, dropping exact duplicates.
        let write_started = Instant::now();
        let spool_file = spool
            .into_inner()
            .map_err(|e| self.work_file_error("spool", e.error()))?;
        spooled.sort_by_key(|s| s.plan_index);
        let tar_file = tempfile::NamedTempFile::new_in(&self.config.work_dir).map_err(|e| {
            IngestError::Local(format!(
                "shard file in {}: {e}",
                self.config.work_dir.display()
            ))
        })?;
        let tar_handle = tar_file
            .as_file()
            .try_clone()
            .map_err(|e| self.work_file_error("shard file", &e))?;
        let mut writer = ShardWriter::new(
            BufWriter::with_capacity(1 << 20, tar_handle),
            names.tar.clone(),
        );
        let mut buf = Vec::new();
        for sample in &spooled {
            // A source listed twice has one key: it is written once (its content may even
            // differ between the two fetches, as from a random-image endpoint).
            if decode_hex(&sample.key).is_some_and(|key| !seen.keys.insert(key))
                || sample.sha256 != [0; 32] && !seen.hashes.insert(sample.sha256)
            {
                stats.duplicates += 1;
                continue;
            }
            buf.resize(sample.image_len + sample.json_len, 0);
            spool_file
                .read_exact_at(&mut buf, sample.offset)
                .map_err(|e| self.work_file_error("spool", &e))?;
            let (image, json) = buf.split_at(sample.image_len);
            let sha = (sample.sha256 != [0; 32]).then(|| hex::encode(sample.sha256));
            writer
                .add_with_source_hash(
                    &sample.key,
                    &[(sample.ext, image), ("json", json)],
                    sha.as_deref(),
                )
                .map_err(|e| IngestError::Output(e.into()))?;
        }
        progress.duplicates += stats.duplicates;
        let finished = writer.finish().map_err(|e| IngestError::Output(e.into()))?;
        let (index, sha256) = (finished.index, finished.sha256);
        finished
            .out
            .into_inner()
            .map_err(|e| self.work_file_error("shard file", e.error()))?;
        stats.successes = index.samples.len() as u64;
        progress.written += stats.successes;
        stats.bytes_out = index.bytes;
        stats.stage_seconds.write += write_started.elapsed().as_secs_f64();
        Ok(Assembled {
            names: names.clone(),
            tar_file,
            index,
            sha256,
            stats,
            previous,
            started,
        })
    }

    /// Lists a published shard in this partition's manifest, and counts it.
    async fn list_published(
        &self,
        (stats, sha256): (ShardStats, String),
        manifest: &mut Manifest,
        manifest_name: &str,
        summary: &mut JobSummary,
        progress: &mut Progress,
    ) -> Result<(), IngestError> {
        manifest.upsert(ManifestShard {
            name: stats.shard.clone(),
            samples: stats.successes,
            bytes: stats.bytes_out,
            sha256,
        });
        self.output
            .put_json(manifest_name, manifest)
            .await
            .map_err(IngestError::Output)?;
        self.reporter.shard_done(&stats);
        summary.shards_written += 1;
        summary.written += stats.successes;
        summary.failed += stats.failed;
        summary.duplicates += stats.duplicates;
        summary.bytes_in += stats.bytes_in;
        summary.bytes_out += stats.bytes_out;
        for (reason, n) in &stats.failed_by_reason {
            *summary.failed_by_reason.entry(reason.clone()).or_default() += n;
        }
        add_stage_seconds(&mut summary.stage_seconds, &stats.stage_seconds);
        progress.shards_done += 1;
        self.reporter.progress(progress);
        Ok(())
    }

    /// Uploads an assembled shard, its index and its stats; the caller then lists it in the
    /// manifest. Runs while the next shard is being made.
    async fn publish(&self, shard: Assembled) -> Result<(ShardStats, String), IngestError> {
        let Assembled {
            names,
            tar_file,
            index,
            sha256,
            mut stats,
            previous,
            started,
        } = shard;
        let upload_started = Instant::now();
        self.output
            .put_file(&names.tar, tar_file.path())
            .await
            .map_err(IngestError::Output)?;
        drop(tar_file);
        self.output
            .put_json(&names.index, &index)
            .await
            .map_err(IngestError::Output)?;
        stats.stage_seconds.write += upload_started.elapsed().as_secs_f64();
        stats.duration_s = started.elapsed().as_secs_f64();
        stats.end_time = chrono::Utc::now().to_rfc3339();
        if let Some(previous) = previous {
            // Keep the account of the whole shard: earlier successes stay counted.
            stats.bytes_in += previous.bytes_in;
            stats.duration_s += previous.duration_s;
            stats.start_time = previous.start_time;
        }
        self.output
            .put_json(&names.stats, &stats)
            .await
            .map_err(IngestError::Output)?;
        tracing::info!(shard = %names.tar, written = stats.successes, failed = stats.failed, duplicates = stats.duplicates, bytes = stats.bytes_out, seconds = stats.duration_s, "shard published");
        Ok((stats, sha256))
    }

    /// Fetches one source and processes it on the CPU pool.
    async fn fetch_and_process(&self, plan_index: usize, item: SourceItem) -> Outcome {
        let fetch_started = Instant::now();
        let fail =
            |reason: &str, message: String, bytes_in: u64, item: &SourceItem| Outcome::Failed {
                failure: Failure {
                    url: item.url.clone(),
                    reason: reason.to_string(),
                    message,
                },
                bytes_in,
                fetch: fetch_started.elapsed(),
            };
        let source = match self.resolver.resolve(&item.url) {
            Ok(source) => source,
            Err(message) => return fail("bad_url", message, 0, &item),
        };
        // A local name that is not a regular file is refused before it is opened: opening a
        // FIFO waits for a writer that may never come, and would hold its shard for ever.
        if let Source::Store {
            local_file: Some(file),
            ..
        }
        | Source::File(file) = &source
        {
            let file = file.clone();
            let kind = tokio::task::spawn_blocking(move || std::fs::metadata(file)).await;
            if let Ok(Ok(metadata)) = kind
                && !metadata.is_file()
            {
                let what = if metadata.is_dir() {
                    "a folder"
                } else {
                    "not a regular file (a FIFO, socket or device)"
                };
                return fail("not_a_file", what.to_string(), 0, &item);
            }
        }
        // object_store retries each request, but its jittered backoff can spend all
        // its retries within two seconds, and it never restarts a body that breaks
        // off mid-transfer (a server restarting, a connection reset). So a failed
        // fetch is started again, up to 4 attempts with 1, 2 and 4 s pauses, each
        // with object_store's own retries: a storage outage of several seconds
        // costs time, not samples.
        const FETCH_ATTEMPTS: u32 = 4;
        let mut attempt = 1;
        let (meta, bytes) = loop {
            let fetched = match &source {
                Source::Http { client, path } => self.http_get(client, &item.url, path).await,
                Source::Store { location, path, .. } => self.store_get(location, path).await,
                Source::File(file) => self.file_get(file).await,
            };
            let (message, asked_wait) = match fetched {
                Fetched::Bytes(meta, bytes) => break (meta, bytes),
                Fetched::NotFound(message) => return fail("not_found", message, 0, &item),
                Fetched::TooLarge(message) => return fail("too_large_bytes", message, 0, &item),
                // Refused, not failed: asking again only costs the pauses.
                Fetched::Denied(message) => return fail("permission_denied", message, 0, &item),
                Fetched::Refused(message) => return fail("fetch", message, 0, &item),
                Fetched::Failed(message) => (message, None),
                Fetched::Busy(message, wait) => (message, wait),
            };
            let attempts = if attempt == 1 {
                "1 attempt".to_string()
            } else {
                format!("{attempt} attempts")
            };
            if attempt == FETCH_ATTEMPTS {
                return fail("fetch", format!("{message} (after {attempts})"), 0, &item);
            }
            // Retry-After is honored, but a source may not hold its place in the shard for
            // longer than MAX_RETRY_AFTER: a server that asks for more is given up on now.
            if let Some(wait) = asked_wait
                && wait > MAX_RETRY_AFTER
            {
                return fail(
                    "fetch",
                    format!(
                        "{message} and asks to wait {} s, more than the {} s a source may wait \
                         (after {attempts})",
                        wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                        MAX_RETRY_AFTER.as_secs()
                    ),
                    0,
                    &item,
                );
            }
            let pause = Duration::from_millis(500 << attempt).max(asked_wait.unwrap_or_default());
            tracing::debug!(url = %item.url, attempt, %message, ?pause, "fetch failed; trying again");
            tokio::time::sleep(pause).await;
            attempt += 1;
        };
        let fetch = fetch_started.elapsed();
        let config = self.config.image.clone();
        let size = bytes.len() as u64;
        let processed = self
            .cpu
            .run(move || {
                let sha256: [u8; 32] = Sha256::digest(&bytes).into();
                (sha256, process_image(&bytes, &config))
            })
            .await;
        match processed {
            Ok((sha256, Ok(image))) => Outcome::Accepted {
                plan_index,
                item,
                meta,
                sha256,
                image: Box::new(image),
                fetch,
            },
            Ok((_, Err(rejection))) => Outcome::Failed {
                failure: Failure {
                    url: item.url,
                    reason: rejection.reason().to_string(),
                    message: rejection.to_string(),
                },
                bytes_in: size,
                fetch,
            },
            Err(panic) => Outcome::Failed {
                failure: Failure {
                    url: item.url,
                    reason: "decoder_panic".into(),
                    message: panic,
                },
                bytes_in: size,
                fetch,
            },
        }
    }
}

/// Merges the partitions' manifests into the dataset's `manifest.json`.
/// Fails, naming them, when planned shards are missing, unless `allow_incomplete`.
pub async fn merge(
    output_url: &str,
    options: &StoreOptions,
    allow_incomplete: bool,
) -> Result<Manifest, IngestError> {
    let output = Location::open(output_url, options, false).map_err(IngestError::Output)?;
    let plan: plan::Plan = output
        .get_json_opt(plan::PLAN)
        .await
        .map_err(IngestError::Output)?
        .ok_or_else(|| {
            IngestError::Config(format!("{} has no plan: no ingest ran there", output.url))
        })?;
    let mut parts = Vec::new();
    for (name, _) in list_objects(&output, Some("_parts")).await? {
        if name.ends_with(".json") {
            let part = output
                .get_json::<Manifest>(&name)
                .await
                .map_err(IngestError::Output)?;
            parts.push((output.url_of(&output.child(&name)), part));
        }
    }
    let mut merged = Manifest::merge(parts.iter().map(|(name, part)| (name.as_str(), part)))
        .map_err(IngestError::Config)?;
    // Without partition manifests, the dataset's own manifest (a single-partition run) is
    // what there is to merge; beside them, an old one is replaced, not read.
    if parts.is_empty()
        && let Some(single) = output
            .get_checked_json_opt(MANIFEST, Manifest::check)
            .await
            .map_err(IngestError::Output)?
    {
        merged = single;
    }
    let merged_names: HashSet<&str> = merged.shards.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<String> = (0..plan.shards)
        .map(|id| ShardNames::new(&plan.shard_prefix, id).tar)
        .filter(|name| !merged_names.contains(name.as_str()))
        .collect();
    if !missing.is_empty() && !allow_incomplete {
        return Err(IngestError::Config(format!(
            "{} of {} planned shards are not complete yet ({}); rerun their partitions, or merge with --allow-incomplete",
            missing.len(),
            plan.shards,
            first_ten(&missing, ", "),
        )));
    }
    check_stored_shards(&output, &merged).await?;
    output
        .put_json(MANIFEST, &merged)
        .await
        .map_err(IngestError::Output)?;
    Ok(merged)
}

/// Every object under `output` (under its folder `under`, when given): names relative to
/// `output`, and sizes.
async fn list_objects(
    output: &Location,
    under: Option<&str>,
) -> Result<Vec<(String, u64)>, IngestError> {
    let prefix = under.map_or_else(|| output.prefix.clone(), |folder| output.child(folder));
    let mut listing = output.store.list(Some(&prefix));
    let mut objects = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|source| IngestError::Listing {
            url: output.url.clone(),
            source,
        })?;
        let name = meta
            .location
            .as_ref()
            .strip_prefix(output.prefix.as_ref())
            .unwrap_or(meta.location.as_ref())
            .trim_start_matches('/')
            .to_string();
        objects.push((name, meta.size));
    }
    Ok(objects)
}

/// Checks, with one listing, that every shard of `manifest` is stored at the size its
/// partition recorded: a shard that is gone, or that another run rewrote or that was cut short,
/// must not be published. (Its bytes are not hashed here: `shards verify` does that.)
async fn check_stored_shards(output: &Location, manifest: &Manifest) -> Result<(), IngestError> {
    let stored: BTreeMap<String, u64> = list_objects(output, None).await?.into_iter().collect();
    let wrong: Vec<String> = manifest
        .shards
        .iter()
        .filter_map(|shard| match stored.get(&shard.name) {
            None => Some(format!("{} is missing", shard.name)),
            Some(&size) if size != shard.bytes => Some(format!(
                "{} holds {size} bytes, its partition wrote {}",
                shard.name, shard.bytes
            )),
            Some(_) => None,
        })
        .collect();
    if wrong.is_empty() {
        return Ok(());
    }
    Err(IngestError::Config(format!(
        "{} of the {} shards do not match their partitions' manifests ({}); rerun the \
         partitions that wrote them, then merge again",
        wrong.len(),
        manifest.shards.len(),
        first_ten(&wrong, "; "),
    )))
}

/// What one read of a source gave.
enum Fetched {
    /// The object and its bytes.
    Bytes(object_store::ObjectMeta, Bytes),
    /// The store has no such object.
    NotFound(String),
    /// Over the input byte cap.
    TooLarge(String),
    /// The store refused access.
    Denied(String),
    /// An answer that will not change when asked again (a client error, a redirect loop).
    Refused(String),
    /// An answer that may change (a server error, "too many requests"), with the wait the
    /// server asked for in `Retry-After`, if any.
    Busy(String, Option<Duration>),
    /// Anything else: worth another try.
    Failed(String),
}

/// The stats and index of a shard the manifest lists, or why it is no longer complete: its
/// tar gone or not of the listed size, its stats or index gone (deleted by hand, or by a
/// bucket's lifecycle rule). Such a shard is made again from its plan chunk. A document that
/// does not parse, or is of another format version (a newer build's), stops the job, named:
/// it is not for this build to overwrite; so does a failed read.
async fn completed_shard(
    output: &Location,
    shard: &ManifestShard,
) -> Result<Result<(ShardStats, shards::ShardIndex), String>, IngestError> {
    let names = ShardNames::for_tar(&shard.name);
    let tar = output.child(&names.tar);
    match output.store.head(&tar).await {
        Ok(meta) if meta.size != shard.bytes => {
            return Ok(Err(format!(
                "holds {} bytes, not the {} listed",
                meta.size, shard.bytes
            )));
        }
        Ok(_) => {}
        Err(object_store::Error::NotFound { .. }) => return Ok(Err("is missing".into())),
        Err(source) => {
            return Err(IngestError::Output(shards::StoreError::Store {
                url: output.url_of(&tar),
                source,
            }));
        }
    }
    let stats = output
        .get_checked_json_opt(&names.stats, ShardStats::check)
        .await
        .map_err(IngestError::Output)?;
    let index = output
        .get_checked_json_opt(&names.index, shards::ShardIndex::check)
        .await
        .map_err(IngestError::Output)?;
    Ok(match (stats, index) {
        (Some(stats), Some(index)) => Ok((stats, index)),
        (None, _) => Err(format!("has no {}", names.stats)),
        (_, None) => Err(format!("has no {}", names.index)),
    })
}

impl Fetched {
    /// An input of `size` bytes, over the byte cap `cap`.
    fn too_large(size: u64, cap: u64) -> Self {
        Fetched::TooLarge(format!(
            "input is {size} bytes, more than the {cap}-byte cap"
        ))
    }
}

/// The TLS error behind a failed request, if the client refused the server's TLS. The TLS
/// library's errors travel inside `io::Error`s (nested ones), whose `source` skips them.
fn tls_refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    std::iter::once(error)
        .chain(causes(error))
        .find_map(|cause| {
            let mut cause = cause;
            loop {
                if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
                    return Some(tls);
                }
                cause = cause.downcast_ref::<std::io::Error>()?.get_ref()?;
            }
        })
}

/// The longest `Retry-After` a source waits for before its next attempt.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The wait a `Retry-After` header asks for: a number of seconds or an HTTP date (RFC 9110
/// section 10.2.3); `None` when it is absent or unreadable, zero for a date in the past.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        // Seconds too many for a u64 are still too many to wait.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = http_date(value)?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// An HTTP date in any of the three formats HTTP has used, which a recipient must all read
/// (RFC 9110 section 5.6.7), or in RFC 2822's wider syntax (a zone such as "+0000" instead of
/// "GMT"), which some servers send.
fn http_date(value: &str) -> Option<std::time::SystemTime> {
    httpdate::parse_http_date(value).ok().or_else(|| {
        let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
        Some(date.with_timezone(&chrono::Utc).into())
    })
}

impl Fetched {
    fn from_store_error(error: &object_store::Error) -> Fetched {
        if is_permission_denied(error) {
            Fetched::Denied(with_causes(error))
        } else if has_io_error(error, std::io::ErrorKind::InvalidFilename) {
            // A local name too long for the file system stays too long.
            Fetched::Refused(with_causes(error))
        } else {
            Fetched::Failed(with_causes(error))
        }
    }
}

/// Whether a store refused access (HTTP 401 or 403, or a local file the process may not read):
/// an answer that does not change when asked again.
fn is_permission_denied(error: &object_store::Error) -> bool {
    matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || has_io_error(error, std::io::ErrorKind::PermissionDenied)
}

/// Whether an I/O error of `kind` is among the causes of `error`.
fn has_io_error(error: &object_store::Error, kind: std::io::ErrorKind) -> bool {
    causes(error).any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
    })
}

/// The first ten of `items` joined with `separator`, and the separator and "..." after them
/// when there are more: for messages that name what is wrong without flooding the terminal.
fn first_ten(items: &[String], separator: &str) -> String {
    let mut text = items
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(separator);
    if items.len() > 10 {
        text.push_str(separator);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that, like the HTTP client's, keeps its reason in its source.
    #[derive(Debug)]
    struct Sending(std::io::Error);

    impl std::fmt::Display for Sending {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error sending request")
        }
    }

    impl std::error::Error for Sending {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            retry_after(&headers)
        };
        assert_eq!(retry_after(&HeaderMap::new()), None);
        assert_eq!(with("120"), Some(Duration::from_secs(120)));
        assert_eq!(with(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(with("soon"), None);
        assert_eq!(
            with("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(with("-3"), None);
        // A date in the past: ask again without waiting longer.
        assert_eq!(with("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        // The obsolete forms: RFC 850 and asctime.
        assert_eq!(
            with("Wednesday, 21-Oct-15 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(with("Wed Oct 21 07:28:00 2015"), Some(Duration::ZERO));
        // asctime, ahead: "Sun Nov  6 08:49:37 1994".
        let ahead = (chrono::Utc::now() + chrono::TimeDelta::seconds(90))
            .format("%a %b %e %H:%M:%S %Y")
            .to_string();
        let wait = with(&ahead).unwrap();
        assert!(
            (Duration::from_secs(85)..=Duration::from_secs(90)).contains(&wait),
            "{ahead}: {wait:?}"
        );
        let ahead = (chrono::Utc::now() + chrono::TimeDelta::seconds(90)).to_rfc2822();
        let wait = with(&ahead).unwrap();
        assert!(
            (Duration::from_secs(85)..=Duration::from_secs(90)).contains(&wait),
            "{wait:?}"
        );
    }

    #[test]
    fn a_name_too_long_for_the_file_system_is_not_asked_again() {
        let error = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(Sending(std::io::Error::from_raw_os_error(
                libc::ENAMETOOLONG,
            ))),
        };
        assert!(matches!(
            Fetched::from_store_error(&error),
            Fetched::Refused(_)
        ));
        let error = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(Sending(std::io::Error::from_raw_os_error(libc::EIO))),
        };
        assert!(matches!(
            Fetched::from_store_error(&error),
            Fetched::Failed(_)
        ));
    }

    #[test]
    fn failure_messages_carry_the_causes_their_errors_hide() {
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "operation timed out");
        let error = object_store::Error::Generic {
            store: "HTTP",
            source: Box::new(Sending(timeout)),
        };
        let message = with_causes(&error);
        assert!(
            message.contains("error sending request: operation timed out"),
            "{message}"
        );
        // A cause the text already holds is not repeated.
        assert_eq!(
            message.matches("error sending request").count(),
            1,
            "{message}"
        );
    }
}
