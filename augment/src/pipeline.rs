//! The streaming pipeline: shards in an object store to an endless, reproducible stream of
//! batches of views.
//!
//! ```text
//!  reader thread (tokio)                     worker threads (crossbeam)          consumer
//!  shard order of the epoch  ─┐
//!  read-ahead shard streams ──┼─► shuffle ─► batch jobs ──► decode once, render ──► reorder ─► Batch
//!  (retries, stall timeout)  ─┘   buffer      (bounded)       every view into      (in index
//!                                                             reused buffers        order)
//! ```
//!
//! **Order.** Epoch `e` permutes the manifest's shards with a generator seeded by
//! `(seed, e)`, the same on every rank; rank `r` of `world` takes positions `r, r + world, ...`
//! of that permutation, so ranks never share a shard. One reader streams the rank's shards in
//! that order through a shuffle buffer: each sample read is pushed, and once the buffer holds
//! `shuffle_buffer` samples one drawn uniformly (from a generator seeded by
//! `(seed, e, rank)`) leaves it; at the end of the epoch the buffer drains the same way.
//! Consecutive samples leaving the buffer form batches; the last partial batch of an epoch is
//! completed by the next epoch's first samples. The sequence of batches is thus a function of
//! (dataset, seed, rank, world, batch size, shuffle buffer) only: the number of worker threads
//! changes how fast batches come, never what they hold. Worker threads split the work by
//! batch, so no two threads ever touch one sample.
//!
//! **Views.** Every random choice of view `v` of sample `k` in epoch `e` comes from a stream
//! seeded by `(seed, e, k, v)` ([`crate::params`]), so a view is the same whatever the thread
//! count or batch.
//!
//! **Position.** Each [`Batch`] carries the [`StreamState`] just after it: epoch, the shard
//! being read and how many of its samples were taken, the shuffle buffer's content as
//! (shard, sample ordinal) references, and the buffer generator's state. Saving the state of the
//! last batch consumed and passing it to [`Pipeline::start`] resumes with exactly the next
//! batch: buffered samples are refetched with one ranged read each through the shard index, and
//! the partly read shard is reopened at its next sample. Batches prefetched but not consumed
//! are simply produced again.
//!
//! **Failures.** A sample whose image does not decode is skipped, counted and logged with
//! shard and key; its slot in the batch is filled with another sample of the same batch,
//! rendered with a fresh view stream (key `KEY~SLOT`), so batches keep their size. A store read
//! that fails or stalls (no bytes for `read_timeout`) is retried `read_attempts` times, reopening
//! the shard at the next unread sample; then the shard is reported and skipped. A broken shard
//! (bad tar) is reported and skipped after the samples before the damage. An epoch in which no
//! sample could be read stops the pipeline with an error, and so do dropped batches in a row
//! that hold two epochs of samples (as counted by the reader). Dropping the [`Pipeline`] stops
//! every thread and joins them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use object_store::{GetOptions, GetRange, ObjectStore};
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use shards::{Dataset, IndexEntry, ManifestShard, ShardIndex, ShardStream, StoreOptions};
use tracing::{debug, warn};

use crate::config::{AugmentConfig, Layout};
use crate::decode::Decoder;
use crate::params::{ViewRng, sample_views};
use crate::view::{Slot, StageTimes, ViewRenderer};

/// How the pipeline runs. Defaults are in [`PipelineOptions::new`].
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// The views to produce.
    pub augment: AugmentConfig,
    /// Buffer layout of the views.
    pub layout: Layout,
    /// Source images per batch.
    pub batch_size: usize,
    /// Worker threads that decode and render (default: the number of cores).
    pub threads: usize,
    /// Finished batches waiting for the consumer: the bounded channel's capacity (default 4).
    pub prefetch: usize,
    /// Shuffle buffer size in samples (default 10,000; 0 or 1 keeps the shard order).
    pub shuffle_buffer: usize,
    /// Shards streamed ahead of the one being consumed, to hide storage latency (default 2).
    pub read_ahead: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// This process's rank among `world` data-parallel processes.
    pub rank: usize,
    /// Number of data-parallel processes.
    pub world: usize,
    /// Stop after this many epochs (default: never).
    pub epochs: Option<u64>,
    /// Images announcing more pixels are skipped as corrupt (default 64 MP).
    pub max_pixels: u64,
    /// A read that delivers nothing for this long counts as failed (default 60 s).
    pub read_timeout: Duration,
    /// Attempts per shard read before the shard is reported and skipped (default 4).
    pub read_attempts: u32,
    /// First pause between attempts, doubled each time (default 1 s).
    pub retry_pause: Duration,
    /// Object-store connection options.
    pub store: StoreOptions,
}

impl PipelineOptions {
    /// Defaults for `augment` with `batch_size` samples per batch.
    pub fn new(augment: AugmentConfig, batch_size: usize) -> Self {
        Self {
            augment,
            layout: Layout::U8Nhwc,
            batch_size,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            prefetch: 4,
            shuffle_buffer: 10_000,
            read_ahead: 2,
            seed: 0,
            rank: 0,
            world: 1,
            epochs: None,
            max_pixels: 64 << 20,
            read_timeout: Duration::from_secs(60),
            read_attempts: 4,
            retry_pause: Duration::from_secs(1),
            store: StoreOptions::default(),
        }
    }

    fn validate(&self) -> Result<(), PipelineError> {
        self.augment
            .validate()
            .map_err(|e| PipelineError::Config(e.to_string()))?;
        let bad = |m: &str| Err(PipelineError::Config(m.to_string()));
        if self.batch_size == 0 {
            return bad("batch size must be positive");
        }
        if self.threads == 0 || self.prefetch == 0 {
            return bad("threads and prefetch must be positive");
        }
        if self.threads > MAX_THREADS {
            return bad(&format!("{} threads: at most {MAX_THREADS}", self.threads));
        }
        if self.prefetch > MAX_PREFETCH {
            return bad(&format!(
                "prefetch {}: at most {MAX_PREFETCH} batches",
                self.prefetch
            ));
        }
        // One batch's views are allocated whole (and `prefetch` of them wait in the channel):
        // a size that cannot be allocated is refused here, with the settings that make it.
        let pixel_bytes = match self.layout {
            Layout::U8Nhwc => 3u64,
            Layout::F32Nchw => 12,
        };
        let image_bytes: u64 = self
            .augment
            .view_sizes()
            .iter()
            .map(|&s| u64::from(s) * u64::from(s) * pixel_bytes)
            .sum();
        let batch_bytes = image_bytes.saturating_mul(self.batch_size as u64);
        if batch_bytes > MAX_BATCH_BYTES {
            return bad(&format!(
                "a batch of {} images with crops {} takes {:.1} GiB, over the limit of {} GiB: lower the batch size or the crop sizes",
                self.batch_size,
                self.augment.crops_spec(),
                batch_bytes as f64 / f64::from(1u32 << 30),
                MAX_BATCH_BYTES >> 30
            ));
        }
        if self.world == 0 || self.rank >= self.world {
            return bad(&format!(
                "rank {} is not below world size {}",
                self.rank, self.world
            ));
        }
        if self.read_attempts == 0 {
            return bad("read attempts must be positive");
        }
        Ok(())
    }
}

/// The most worker threads a pipeline starts.
pub const MAX_THREADS: usize = 1024;
/// The most finished batches a pipeline keeps waiting.
pub const MAX_PREFETCH: usize = 1024;
/// The largest batch of views, in bytes (16 GiB).
pub const MAX_BATCH_BYTES: u64 = 16 << 30;

/// A sample waiting in the shuffle buffer: its shard (index in the manifest) and its ordinal
/// in that shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleRef {
    /// Index of the shard in the dataset manifest.
    pub shard: u32,
    /// Position of the sample in the shard (0-based).
    pub ordinal: u32,
}

/// The stream position just after a batch: save it with a checkpoint, pass it back to
/// [`Pipeline::start`] to continue with the next batch. See the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamState {
    /// Format version of this record.
    pub version: u32,
    /// Settings the position only makes sense with; checked on resume.
    pub seed: u64,
    /// Rank.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Shuffle buffer size.
    pub shuffle_buffer: usize,
    /// Number of shards in the manifest.
    pub shards: usize,
    /// Batches produced before this point.
    pub batches: u64,
    /// The epoch being read.
    pub epoch: u64,
    /// Position, in this rank's shard order for `epoch`, of the shard being read (equal to the
    /// number of the rank's shards when the epoch's buffer is draining).
    pub shard_position: usize,
    /// Samples already taken from that shard.
    pub samples_taken: u32,
    /// Samples in the shuffle buffer, in buffer order.
    pub buffer: Vec<SampleRef>,
    /// The shuffle buffer's generator.
    pub rng: Xoshiro256PlusPlus,
}

const STATE_VERSION: u32 = 1;

/// Views of one batch: one buffer per crop index.
#[derive(Debug)]
pub enum ViewData {
    /// `[B, H, W, 3]` bytes.
    U8(Vec<u8>),
    /// `[B, 3, H, W]` normalized floats.
    F32(Vec<f32>),
}

impl ViewData {
    /// The bytes of a `U8` buffer.
    pub fn as_u8(&self) -> Option<&[u8]> {
        match self {
            ViewData::U8(v) => Some(v),
            ViewData::F32(_) => None,
        }
    }
    /// The floats of an `F32` buffer.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            ViewData::F32(v) => Some(v),
            ViewData::U8(_) => None,
        }
    }
}

/// One batch of views.
#[derive(Debug)]
pub struct Batch {
    /// Position of the batch in the stream (0-based, counting from the run's start).
    pub index: u64,
    /// Sample keys, one per row (`KEY~SLOT` for a slot refilled after a corrupt image).
    pub keys: Vec<String>,
    /// The epoch each row's sample was drawn in.
    pub epochs: Vec<u64>,
    /// Side of each crop index's views.
    pub sizes: Vec<u32>,
    /// One buffer per crop index, crop-major.
    pub views: Vec<ViewData>,
    /// Layout of `views`.
    pub layout: Layout,
    /// The stream position just after this batch.
    pub state: Arc<StreamState>,
    /// Time the worker spent per stage on this batch.
    pub times: StageTimes,
    /// Rows refilled because their image did not decode.
    pub refilled: usize,
    recycle: Option<Sender<Vec<ViewData>>>,
}

impl Batch {
    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    /// Whether the batch has no rows (never, for batches the pipeline yields).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // The buffers go back to the workers, so the steady state allocates nothing.
        if let Some(recycle) = self.recycle.take() {
            let _ = recycle.send(std::mem::take(&mut self.views));
        }
    }
}

/// Counters of the whole run, readable while it goes.
#[derive(Debug, Default)]
pub struct Counters {
    /// Samples read from shards (including refetches on resume).
    pub samples_read: AtomicU64,
    /// Compressed bytes read.
    pub bytes_read: AtomicU64,
    /// Images that did not decode.
    pub images_failed: AtomicU64,
    /// Samples with no image member.
    pub samples_without_image: AtomicU64,
    /// Shards skipped after failed reads or damage.
    pub shards_failed: AtomicU64,
    /// Read attempts repeated.
    pub read_retries: AtomicU64,
    /// Batches dropped because none of their images decoded.
    pub batches_dropped: AtomicU64,
    /// Nanoseconds the reader waited for storage.
    pub read_wait_ns: AtomicU64,
}

/// Why the pipeline cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A bad setting, found before any work.
    #[error("pipeline configuration: {0}")]
    Config(String),
    /// The dataset cannot be opened.
    #[error(transparent)]
    Store(#[from] shards::StoreError),
    /// A saved position that does not fit this dataset or these settings.
    #[error("cannot resume from the saved stream position: {0}")]
    Resume(String),
    /// Nothing could be read.
    #[error("{0}")]
    NoData(String),
    /// A thread of the pipeline failed.
    #[error("pipeline thread failed: {0}")]
    Thread(String),
}

/// A sample as read: bytes still compressed.
struct RawSample {
    key: String,
    epoch: u64,
    shard: Arc<str>,
    image: Option<Bytes>,
}

struct BatchJob {
    index: u64,
    samples: Vec<RawSample>,
    state: Arc<StreamState>,
}

enum WorkerResult {
    Done(Box<Batch>),
    Dropped(u64),
}

/// The running pipeline: iterate it for batches; drop it to stop.
pub struct Pipeline {
    results: Option<Receiver<WorkerResult>>,
    pending: BTreeMap<u64, Batch>,
    dropped: std::collections::BTreeSet<u64>,
    /// Batches dropped in a row (none of their images decoded): as many as hold two epochs of
    /// samples make the stream an error (see [`Pipeline::dropped_two_epochs`]).
    dropped_in_a_row: u64,
    /// The most samples the reader has read in one complete epoch (0 before the first one
    /// ends); shared with the reader thread.
    samples_read_per_epoch: Arc<AtomicU64>,
    batch_size: u64,
    next_index: u64,
    stop: Arc<AtomicBool>,
    error: Arc<std::sync::Mutex<Option<PipelineError>>>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    dataset: Arc<Dataset>,
}

impl Pipeline {
    /// Opens the dataset at `url` and starts the threads; with `resume`, continues right after
    /// the batch that state was taken from.
    pub fn start(
        url: &str,
        options: PipelineOptions,
        resume: Option<StreamState>,
    ) -> Result<Self, PipelineError> {
        options.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("augment-io")
            .enable_all()
            .build()
            .map_err(|e| PipelineError::Thread(e.to_string()))?;
        let dataset = Arc::new(runtime.block_on(Dataset::open(url, &options.store))?);
        let shard_count = dataset.manifest.shards.len();
        if shard_count < options.world {
            return Err(PipelineError::NoData(format!(
                "{url}: {shard_count} shards for {} ranks: every rank needs at least one shard",
                options.world
            )));
        }
        let state = match resume {
            Some(state) => {
                check_resume(&state, &options, shard_count)?;
                state
            }
            None => StreamState {
                version: STATE_VERSION,
                seed: options.seed,
                rank: options.rank,
                world: options.world,
                batch_size: options.batch_size,
                shuffle_buffer: options.shuffle_buffer,
                shards: shard_count,
                batches: 0,
                epoch: 0,
                shard_position: 0,
                samples_taken: 0,
                buffer: Vec::new(),
                rng: buffer_rng(options.seed, 0, options.rank),
            },
        };
        let stop = Arc::new(AtomicBool::new(false));
        let samples_read_per_epoch = Arc::new(AtomicU64::new(0));
        let error = Arc::new(std::sync::Mutex::new(None));
        let counters = Arc::new(Counters::default());
        let (job_tx, job_rx) = bounded::<BatchJob>(options.threads);
        let (result_tx, result_rx) = bounded::<WorkerResult>(options.prefetch);
        let (recycle_tx, recycle_rx) = unbounded::<Vec<ViewData>>();
        let next_index = state.batches;
        let mut threads = Vec::new();
        for worker in 0..options.threads {
            let (jobs, results) = (job_rx.clone(), result_tx.clone());
            let (recycle_tx, recycle_rx) = (recycle_tx.clone(), recycle_rx.clone());
            let (options, counters, stop) = (options.clone(), counters.clone(), stop.clone());
            let handle = std::thread::Builder::new()
                .name(format!("augment-{worker}"))
                .spawn(move || {
                    work(
                        &options,
                        &jobs,
                        &results,
                        &recycle_tx,
                        &recycle_rx,
                        &counters,
                        &stop,
                    )
                })
                .map_err(|e| PipelineError::Thread(e.to_string()))?;
            threads.push(handle);
        }
        drop((job_rx, result_tx));
        let reader = Reader {
            dataset: dataset.clone(),
            options: options.clone(),
            counters: counters.clone(),
            stop: stop.clone(),
            jobs: job_tx,
            index_cache: HashMap::new(),
            samples_read_per_epoch: samples_read_per_epoch.clone(),
        };
        let reader_error = error.clone();
        let handle = std::thread::Builder::new()
            .name("augment-reader".into())
            .spawn(move || {
                let mut reader = reader;
                let result = runtime.block_on(reader.run(state));
                if let Err(e) = result {
                    *reader_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
                // Only now close the job channel: the workers' exit then closes the results
                // channel, and the consumer, seeing it closed, must find the error already
                // here (dropping the reader first let a failed stream end as if complete).
                drop(reader);
                // Tasks still reading ahead are abandoned, not awaited.
                runtime.shutdown_background();
            })
            .map_err(|e| PipelineError::Thread(e.to_string()))?;
        threads.push(handle);
        Ok(Self {
            results: Some(result_rx),
            pending: BTreeMap::new(),
            dropped: Default::default(),
            dropped_in_a_row: 0,
            samples_read_per_epoch,
            batch_size: options.batch_size as u64,
            next_index,
            stop,
            error,
            counters,
            threads,
            dataset,
        })
    }

    /// The run's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The dataset being read.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Whether `dropped_in_a_row` batches hold two epochs of samples, by the most samples the
    /// reader has read in a complete epoch; never before an epoch has ended, since a manifest
    /// may claim more or fewer samples than its shards hold. Any two epochs' worth of
    /// consecutive samples hold every sample of one epoch: each epoch's samples all leave the
    /// shuffle buffer before the next epoch's come in.
    fn dropped_two_epochs(&self) -> Option<u64> {
        match self.samples_read_per_epoch.load(Ordering::Relaxed) {
            0 => None,
            epoch => (self.dropped_in_a_row.saturating_mul(self.batch_size)
                >= epoch.saturating_mul(2))
            .then_some(epoch),
        }
    }
}

impl Iterator for Pipeline {
    type Item = Result<Batch, PipelineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(batch) = self.pending.remove(&self.next_index) {
                self.next_index += 1;
                self.dropped_in_a_row = 0;
                return Some(Ok(batch));
            }
            if self.dropped.remove(&self.next_index) {
                self.next_index += 1;
                self.dropped_in_a_row += 1;
                if let Some(epoch) = self.dropped_two_epochs() {
                    // Workers would go on dropping batches for ever: no image decodes.
                    self.results = None;
                    self.stop.store(true, Ordering::SeqCst);
                    return Some(Err(PipelineError::NoData(format!(
                        "{}: no image decoded in {} batches in a row, two epochs of samples ({epoch} per epoch): its images do not decode (see the warnings above)",
                        self.dataset.location.url, self.dropped_in_a_row,
                    ))));
                }
                continue;
            }
            let Some(results) = &self.results else {
                // Every worker has finished: what is left is in order, or the stream is over.
                if let Some(error) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Some(Err(error));
                }
                let first = *self.pending.keys().next()?;
                self.next_index = first;
                continue;
            };
            match results.recv() {
                Ok(WorkerResult::Done(batch)) => {
                    self.pending.insert(batch.index, *batch);
                }
                Ok(WorkerResult::Dropped(index)) => {
                    self.dropped.insert(index);
                }
                Err(_) => self.results = None,
            }
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Closing the results channel makes workers' sends fail; their exit closes the job
        // channel, which stops the reader.
        self.results = None;
        self.pending.clear();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn check_resume(
    state: &StreamState,
    options: &PipelineOptions,
    shards: usize,
) -> Result<(), PipelineError> {
    let mismatch = |what: &str, saved: String, now: String| {
        Err(PipelineError::Resume(format!(
            "{what} was {saved} when the position was saved, now {now}"
        )))
    };
    if state.version != STATE_VERSION {
        return mismatch(
            "the state version",
            state.version.to_string(),
            STATE_VERSION.to_string(),
        );
    }
    for (what, saved, now) in [
        ("the seed", state.seed, options.seed),
        ("the rank", state.rank as u64, options.rank as u64),
        ("the world size", state.world as u64, options.world as u64),
        (
            "the batch size",
            state.batch_size as u64,
            options.batch_size as u64,
        ),
        (
            "the shuffle buffer",
            state.shuffle_buffer as u64,
            options.shuffle_buffer as u64,
        ),
        (
            "the dataset's shard count",
            state.shards as u64,
            shards as u64,
        ),
    ] {
        if saved != now {
            return mismatch(what, saved.to_string(), now.to_string());
        }
    }
    if state.buffer.len() > options.shuffle_buffer.max(1) {
        return Err(PipelineError::Resume(format!(
            "the shuffle buffer holds {} samples, more than its size of {}",
            state.buffer.len(),
            options.shuffle_buffer
        )));
    }
    // Counters that cannot step on: the epoch and batch numbers go up by one.
    if state.epoch == u64::MAX || state.batches == u64::MAX {
        return Err(PipelineError::Resume(format!(
            "epoch {} and batch {} leave no room to count on",
            state.epoch, state.batches
        )));
    }
    // xoshiro256++ repeats its state only when that is all zeros, which it never reaches from
    // a seed and from which it draws only zeros (the shuffle buffer would wait for ever).
    let mut probe = state.rng.clone();
    probe.next_u64();
    if probe == state.rng {
        return Err(PipelineError::Resume(
            "the shuffle buffer's random generator state is all zeros, which no run produces"
                .into(),
        ));
    }
    if let Some(bad) = state.buffer.iter().find(|r| r.shard as usize >= shards) {
        return Err(PipelineError::Resume(format!(
            "buffered sample refers to shard {} of {shards}",
            bad.shard
        )));
    }
    Ok(())
}

fn buffer_rng(seed: u64, epoch: u64, rank: usize) -> Xoshiro256PlusPlus {
    let mut rng = ViewRng::new(seed, epoch, "shuffle-buffer", rank as u32);
    Xoshiro256PlusPlus::seed_from_u64((rng.unit() * (1u64 << 53) as f64) as u64)
}

/// The shards of `rank` in `epoch`, as indexes into the manifest.
pub fn rank_shards(shards: usize, seed: u64, epoch: u64, rank: usize, world: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..shards as u32).collect();
    let mut rng = ViewRng::new(seed, epoch, "shard-order", 0);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order.into_iter().skip(rank).step_by(world).collect()
}

fn uniform_below(rng: &mut Xoshiro256PlusPlus, n: usize) -> usize {
    loop {
        let product = u128::from(rng.next_u64()) * n as u128;
        if (product as u64) >= (n as u64).wrapping_neg() % n as u64 {
            return (product >> 64) as usize;
        }
    }
}

/// A buffered sample: its reference and its bytes.
struct Buffered {
    reference: SampleRef,
    sample: RawSample,
}

enum ShardItem {
    Sample(RawSample),
    /// The shard ended early; the reason.
    Failed(String),
}

struct Reader {
    dataset: Arc<Dataset>,
    options: PipelineOptions,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    jobs: Sender<BatchJob>,
    index_cache: HashMap<u32, Arc<ShardIndex>>,
    /// [`Pipeline::samples_read_per_epoch`].
    samples_read_per_epoch: Arc<AtomicU64>,
}

impl Reader {
    async fn run(&mut self, mut state: StreamState) -> Result<(), PipelineError> {
        let shard_count = self.dataset.manifest.shards.len();
        let mut buffer = self.refetch_buffer(&state).await?;
        self.check_samples_taken(&state).await?;
        let mut batch: Vec<RawSample> = Vec::with_capacity(self.options.batch_size);
        let capacity = self.options.shuffle_buffer.max(1);
        loop {
            if self
                .options
                .epochs
                .is_some_and(|epochs| state.epoch >= epochs)
            {
                return Ok(());
            }
            let order = rank_shards(
                shard_count,
                self.options.seed,
                state.epoch,
                self.options.rank,
                self.options.world,
            );
            let mut samples_in_epoch = buffer.len() as u64;
            let mut streams = std::collections::VecDeque::new();
            while state.shard_position < order.len() {
                // Keep `read_ahead` shards streaming beyond the current one.
                while streams.len() <= self.options.read_ahead
                    && state.shard_position + streams.len() < order.len()
                {
                    let position = state.shard_position + streams.len();
                    let skip = if streams.is_empty() {
                        state.samples_taken
                    } else {
                        0
                    };
                    streams.push_back(self.spawn_shard(order[position], skip, state.epoch));
                }
                let mut receiver = streams.pop_front().expect("filled just above");
                let shard = order[state.shard_position];
                loop {
                    let waited = Instant::now();
                    let item = receiver.recv().await;
                    self.counters
                        .read_wait_ns
                        .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    if self.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    match item {
                        None => break,
                        Some(ShardItem::Failed(reason)) => {
                            self.counters.shards_failed.fetch_add(1, Ordering::Relaxed);
                            warn!(shard = %self.dataset.manifest.shards[shard as usize].name, %reason, "shard skipped");
                            break;
                        }
                        Some(ShardItem::Sample(sample)) => {
                            samples_in_epoch += 1;
                            let reference = SampleRef {
                                shard,
                                ordinal: state.samples_taken,
                            };
                            state.samples_taken += 1;
                            buffer.push(Buffered { reference, sample });
                            if buffer.len() >= capacity {
                                let taken =
                                    buffer.swap_remove(uniform_below(&mut state.rng, buffer.len()));
                                if !self.emit(taken.sample, &mut batch, &mut state, &buffer)? {
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
                state.shard_position += 1;
                state.samples_taken = 0;
            }
            while !buffer.is_empty() {
                let taken = buffer.swap_remove(uniform_below(&mut state.rng, buffer.len()));
                if !self.emit(taken.sample, &mut batch, &mut state, &buffer)? {
                    return Ok(());
                }
            }
            if samples_in_epoch == 0 {
                return Err(PipelineError::NoData(format!(
                    "epoch {}: no sample of this rank's {} shards could be read (see the warnings above)",
                    state.epoch,
                    order.len()
                )));
            }
            // Before the next epoch's first sample can reach a batch.
            self.samples_read_per_epoch
                .fetch_max(samples_in_epoch, Ordering::Relaxed);
            state.epoch += 1;
            state.shard_position = 0;
            state.samples_taken = 0;
            state.rng = buffer_rng(self.options.seed, state.epoch, self.options.rank);
        }
    }

    /// Adds a sample to the batch being formed; sends the batch when full. `Ok(false)` once the
    /// workers are gone.
    fn emit(
        &self,
        sample: RawSample,
        batch: &mut Vec<RawSample>,
        state: &mut StreamState,
        buffer: &[Buffered],
    ) -> Result<bool, PipelineError> {
        batch.push(sample);
        if batch.len() < self.options.batch_size {
            return Ok(true);
        }
        state.batches += 1;
        let mut snapshot = state.clone();
        snapshot.buffer = buffer.iter().map(|b| b.reference).collect();
        let job = BatchJob {
            index: state.batches - 1,
            samples: std::mem::take(batch),
            state: Arc::new(snapshot),
        };
        batch.reserve(self.options.batch_size);
        Ok(self.jobs.send(job).is_ok())
    }

    /// Streams one shard from sample `skip` on into a bounded channel, retrying failed or
    /// stalled reads from the next unread sample.
    fn spawn_shard(
        &mut self,
        shard: u32,
        skip: u32,
        epoch: u64,
    ) -> tokio::sync::mpsc::Receiver<ShardItem> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let dataset = self.dataset.clone();
        let options = self.options.clone();
        let counters = self.counters.clone();
        let cached_index = self.index_cache.get(&shard).cloned();
        tokio::spawn(async move {
            let manifest_shard = &dataset.manifest.shards[shard as usize];
            let name: Arc<str> = Arc::from(manifest_shard.name.as_str());
            let mut next = skip;
            let mut index = cached_index;
            let mut attempt = 1;
            loop {
                let outcome = stream_shard(
                    &dataset,
                    manifest_shard,
                    &name,
                    &mut index,
                    &mut next,
                    epoch,
                    &options,
                    &counters,
                    &tx,
                )
                .await;
                match outcome {
                    Ok(()) => return,
                    Err(ReadFailure::Receiver) => return,
                    // Nobody reads this shard any more (the pipeline is stopping, and its
                    // runtime cancels the reads in flight): no retry, and nothing to report.
                    Err(_) if tx.is_closed() => return,
                    Err(ReadFailure::Damaged(reason)) => {
                        let _ = tx.send(ShardItem::Failed(reason)).await;
                        return;
                    }
                    Err(ReadFailure::Retryable(reason)) if attempt < options.read_attempts => {
                        counters.read_retries.fetch_add(1, Ordering::Relaxed);
                        let pause = options.retry_pause * 2u32.pow(attempt - 1);
                        warn!(shard = %name, sample = next, attempt, %reason, "read failed, retrying in {pause:?}");
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                    }
                    Err(ReadFailure::Retryable(reason)) => {
                        let _ = tx
                            .send(ShardItem::Failed(format!(
                                "{reason} (after {attempt} attempts)"
                            )))
                            .await;
                        return;
                    }
                }
            }
        });
        rx
    }

    /// Refuses a saved position that has taken more samples of its shard than the shard holds
    /// (by its index): reading on from there would silently skip the rest of the shard.
    async fn check_samples_taken(&mut self, state: &StreamState) -> Result<(), PipelineError> {
        if state.samples_taken == 0 {
            return Ok(());
        }
        let order = rank_shards(
            self.dataset.manifest.shards.len(),
            self.options.seed,
            state.epoch,
            self.options.rank,
            self.options.world,
        );
        let Some(&shard_number) = order.get(state.shard_position) else {
            return Ok(());
        };
        // An index that cannot be read now is the stream's to retry and report.
        let Ok(index) = self.index_of(shard_number).await else {
            return Ok(());
        };
        let shard = &self.dataset.manifest.shards[shard_number as usize];
        if state.samples_taken as usize > index.samples.len() {
            return Err(PipelineError::Resume(format!(
                "{}: the saved position has taken {} samples of it, but its index holds {}",
                shard.name,
                state.samples_taken,
                index.samples.len()
            )));
        }
        Ok(())
    }

    /// The index of shard `number` of the manifest, read once and kept.
    async fn index_of(&mut self, number: u32) -> Result<Arc<ShardIndex>, PipelineError> {
        if let Some(index) = self.index_cache.get(&number) {
            return Ok(index.clone());
        }
        let shard = &self.dataset.manifest.shards[number as usize];
        let index = Arc::new(self.dataset.index(shard).await?);
        self.index_cache.insert(number, index.clone());
        Ok(index)
    }

    /// The samples of a saved shuffle buffer, refetched with one ranged read each.
    async fn refetch_buffer(
        &mut self,
        state: &StreamState,
    ) -> Result<Vec<Buffered>, PipelineError> {
        let mut buffered = Vec::with_capacity(state.buffer.len());
        for reference in &state.buffer {
            let index = self.index_of(reference.shard).await?;
            let shard = &self.dataset.manifest.shards[reference.shard as usize];
            let entry = index
                .samples
                .get(reference.ordinal as usize)
                .ok_or_else(|| {
                    PipelineError::Resume(format!(
                        "{}: the index has no sample {}",
                        shard.name, reference.ordinal
                    ))
                })?;
            let sample = shards::reader::read_indexed_sample(
                self.dataset.location.store.as_ref(),
                &self.dataset.shard_path(shard),
                &shard.name,
                entry,
            )
            .await
            .map_err(|e| PipelineError::Resume(e.to_string()))?;
            self.counters.samples_read.fetch_add(1, Ordering::Relaxed);
            buffered.push(Buffered {
                reference: *reference,
                sample: RawSample {
                    image: sample.image().map(|(_, b)| b.clone()),
                    key: sample.key,
                    epoch: state.epoch,
                    shard: Arc::from(shard.name.as_str()),
                },
            });
        }
        debug!(samples = buffered.len(), "shuffle buffer restored");
        Ok(buffered)
    }
}

enum ReadFailure {
    /// The consumer side is gone.
    Receiver,
    /// The shard's bytes are wrong: rereading will not help.
    Damaged(String),
    /// The store failed or stalled.
    Retryable(String),
}

#[allow(clippy::too_many_arguments)]
async fn stream_shard(
    dataset: &Dataset,
    shard: &ManifestShard,
    name: &Arc<str>,
    index: &mut Option<Arc<ShardIndex>>,
    next: &mut u32,
    epoch: u64,
    options: &PipelineOptions,
    counters: &Counters,
    tx: &tokio::sync::mpsc::Sender<ShardItem>,
) -> Result<(), ReadFailure> {
    let retryable = |e: &dyn std::fmt::Display| ReadFailure::Retryable(e.to_string());
    let mut stream = if *next == 0 {
        tokio::time::timeout(options.read_timeout, dataset.stream(shard))
            .await
            .map_err(|_| {
                ReadFailure::Retryable(format!("no response in {:?}", options.read_timeout))
            })?
            .map_err(|e| retryable(&e))?
    } else {
        // Start at the next unread sample: its offset comes from the shard index.
        if index.is_none() {
            *index = Some(Arc::new(
                dataset.index(shard).await.map_err(|e| retryable(&e))?,
            ));
        }
        let entries: &[IndexEntry] = &index.as_ref().expect("loaded just above").samples;
        let Some(entry) = entries.get(*next as usize) else {
            return Ok(());
        };
        let get = GetOptions {
            range: Some(GetRange::Offset(entry.offset)),
            ..Default::default()
        };
        let store: &dyn ObjectStore = dataset.location.store.as_ref();
        let result = tokio::time::timeout(
            options.read_timeout,
            store.get_opts(&dataset.shard_path(shard), get),
        )
        .await
        .map_err(|_| ReadFailure::Retryable(format!("no response in {:?}", options.read_timeout)))?
        .map_err(|e| retryable(&e))?;
        ShardStream::from_stream(
            result.into_stream(),
            name.to_string(),
            shards::reader::DEFAULT_MAX_MEMBER_SIZE,
        )
    };
    loop {
        let sample = match tokio::time::timeout(options.read_timeout, stream.next()).await {
            Err(_) => {
                return Err(ReadFailure::Retryable(format!(
                    "stalled: no bytes for {:?}",
                    options.read_timeout
                )));
            }
            Ok(Err(shards::ShardError::Store { source, .. })) => return Err(retryable(&source)),
            Ok(Err(other)) => return Err(ReadFailure::Damaged(other.to_string())),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(sample))) => sample,
        };
        *next += 1;
        counters.samples_read.fetch_add(1, Ordering::Relaxed);
        let image = sample.image().map(|(_, bytes)| bytes.clone());
        counters.bytes_read.fetch_add(
            image.as_ref().map_or(0, |b| b.len() as u64),
            Ordering::Relaxed,
        );
        let raw = RawSample {
            key: sample.key,
            epoch,
            shard: name.clone(),
            image,
        };
        if tx.send(ShardItem::Sample(raw)).await.is_err() {
            return Err(ReadFailure::Receiver);
        }
    }
}

/// A worker: takes batch jobs, decodes each image once, renders every view into the batch
/// buffers.
fn work(
    options: &PipelineOptions,
    jobs: &Receiver<BatchJob>,
    results: &Sender<WorkerResult>,
    recycle_tx: &Sender<Vec<ViewData>>,
    recycle_rx: &Receiver<Vec<ViewData>>,
    counters: &Counters,
    stop: &AtomicBool,
) {
    let config = &options.augment;
    let sizes = config.view_sizes();
    let mut decoder = Decoder::new(options.max_pixels);
    let mut renderer = ViewRenderer::new();
    while let Ok(job) = jobs.recv() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let rows = job.samples.len();
        let mut views = recycle_rx.try_recv().unwrap_or_default();
        if views.len() != sizes.len() {
            views = sizes
                .iter()
                .map(|&s| {
                    let n = rows * s as usize * s as usize * 3;
                    match options.layout {
                        Layout::U8Nhwc => ViewData::U8(vec![0; n]),
                        Layout::F32Nchw => ViewData::F32(vec![0.0; n]),
                    }
                })
                .collect();
        }
        let mut times = StageTimes::default();
        let mut keys: Vec<String> = job.samples.iter().map(|s| s.key.clone()).collect();
        let epochs: Vec<u64> = job.samples.iter().map(|s| s.epoch).collect();
        let mut failed = Vec::new();
        for (row, sample) in job.samples.iter().enumerate() {
            if !render_sample(
                options,
                &sizes,
                &mut decoder,
                &mut renderer,
                sample,
                &sample.key,
                row,
                &mut views,
                &mut times,
                counters,
            ) {
                failed.push(row);
            }
        }
        let good: Vec<usize> = (0..rows).filter(|r| !failed.contains(r)).collect();
        if good.is_empty() {
            counters.batches_dropped.fetch_add(1, Ordering::Relaxed);
            warn!(
                batch = job.index,
                rows, "batch dropped: none of its images decoded"
            );
            if results.send(WorkerResult::Dropped(job.index)).is_err() {
                return;
            }
            continue;
        }
        for &row in &failed {
            // The next good row after this one, cyclically; a fresh view stream keyed by slot.
            let source = *good.iter().find(|&&g| g > row).unwrap_or(&good[0]);
            let key = format!("{}~{row}", job.samples[source].key);
            render_sample(
                options,
                &sizes,
                &mut decoder,
                &mut renderer,
                &job.samples[source],
                &key,
                row,
                &mut views,
                &mut times,
                counters,
            );
            keys[row] = key;
        }
        let batch = Batch {
            index: job.index,
            keys,
            epochs,
            sizes: sizes.clone(),
            views,
            layout: options.layout,
            state: job.state,
            times,
            refilled: failed.len(),
            recycle: Some(recycle_tx.clone()),
        };
        if results.send(WorkerResult::Done(Box::new(batch))).is_err() {
            return;
        }
    }
}

/// Decodes one sample and renders its views into row `row`; false (logged and counted) when
/// the image is missing or does not decode.
#[allow(clippy::too_many_arguments)]
fn render_sample(
    options: &PipelineOptions,
    sizes: &[u32],
    decoder: &mut Decoder,
    renderer: &mut ViewRenderer,
    sample: &RawSample,
    view_key: &str,
    row: usize,
    views: &mut [ViewData],
    times: &mut StageTimes,
    counters: &Counters,
) -> bool {
    let Some(bytes) = &sample.image else {
        counters
            .samples_without_image
            .fetch_add(1, Ordering::Relaxed);
        warn!(shard = %sample.shard, key = %sample.key, "sample has no image member; skipped");
        return false;
    };
    let started = Instant::now();
    let source = match decoder.decode(bytes) {
        Ok(source) => source,
        Err(error) => {
            counters.images_failed.fetch_add(1, Ordering::Relaxed);
            warn!(shard = %sample.shard, key = %sample.key, %error, "image skipped");
            return false;
        }
    };
    times.decode += started.elapsed();
    let config = &options.augment;
    let params = sample_views(
        config,
        options.seed,
        sample.epoch,
        view_key,
        source.width,
        source.height,
    );
    for ((view, data), &size) in params.iter().zip(views.iter_mut()).zip(sizes) {
        let slot_len = size as usize * size as usize * 3;
        let range = row * slot_len..(row + 1) * slot_len;
        let slot = match data {
            ViewData::U8(v) => Slot::U8(&mut v[range]),
            ViewData::F32(v) => Slot::F32(&mut v[range]),
        };
        renderer.render(source, view, config.mean, config.std, slot, times);
    }
    true
}
