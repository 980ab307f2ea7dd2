//! The `ingest` command: see `ingest --help`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ingest::image::ImageConfig;
use ingest::input::{DEFAULT_EXTENSIONS, InputSpec, LabelSource, ListFormat};
use ingest::job::{self, JobConfig, Partition, Progress, Reporter};
use shards::{ShardStats, StoreOptions};

/// Turn unlabeled images in object storage into WebDataset shards.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Ingest images into shards (resumable: rerun the same command after a crash).
    Run(RunArgs),
    /// Combine the manifests written by `--partition I/N` workers into manifest.json.
    Merge {
        /// The dataset's output URL or folder.
        output: String,
        /// Write the manifest even when planned shards are missing.
        #[arg(long)]
        allow_incomplete: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct StoreArgs {
    /// Extra object-store builder option KEY=VALUE (repeatable), e.g.
    /// aws_endpoint=http://127.0.0.1:9000. The environment (AWS_*, GOOGLE_*, AZURE_*) is read first.
    #[arg(long = "store-option", value_name = "KEY=VALUE")]
    store_options: Vec<String>,
    /// Retries of a failed storage request (exponential backoff from 100 ms to 15 s).
    #[arg(long, default_value_t = 10)]
    retries: usize,
    /// Give up retrying a request after this many seconds.
    #[arg(long, default_value_t = 180)]
    retry_timeout: u64,
    /// Give up on one request (connection to last byte) after this many seconds: every request,
    /// to sources and to the output store (an upload part included). A source whose request
    /// timed out is fetched again (up to 4 attempts); an output request, retried as --retries says.
    #[arg(long, value_name = "SECONDS", default_value_t = StoreOptions::default().timeout.as_secs_f64(), value_parser = positive_seconds)]
    timeout: f64,
    /// Give up connecting to a server after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = StoreOptions::default().connect_timeout.as_secs_f64(), value_parser = positive_seconds)]
    connect_timeout: f64,
}

/// A number of seconds from 1 ms to a day: less would fail every request, and more is no
/// timeout at all.
fn positive_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if (0.001..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(format!(
            "{text} seconds is out of range: give from 0.001 to 86400"
        ))
    }
}

impl StoreArgs {
    fn options(&self) -> Result<StoreOptions> {
        let mut options = StoreOptions::default()
            .with_retries(self.retries, Duration::from_secs(self.retry_timeout));
        options.timeout = Duration::from_secs_f64(self.timeout);
        options.connect_timeout = Duration::from_secs_f64(self.connect_timeout);
        for pair in &self.store_options {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--store-option {pair:?} is not KEY=VALUE"))?;
            options.options.push((key.to_string(), value.to_string()));
        }
        Ok(options)
    }
}

#[derive(Args)]
struct RunArgs {
    /// What to ingest: a prefix to list recursively (s3://bucket/photos, gs://..., az://...,
    /// file:///data or a local folder), or with --list a list file of URLs or paths.
    input: String,
    /// Where the shards go: a URL (s3://bucket/dataset, ...) or a local folder.
    #[arg(short, long, default_value = "dataset")]
    output: String,
    /// Read INPUT as a list file (one URL per line, CSV or JSONL) instead of listing it.
    #[arg(long)]
    list: bool,
    /// Format of the list file.
    #[arg(long, value_enum, default_value_t = ListFormat::Auto)]
    list_format: ListFormat,
    /// Column (CSV) or field (JSONL) of the list file that holds the URL.
    #[arg(long, default_value = "url")]
    url_column: String,
    /// Column (CSV) or field (JSONL) holding each image's label.
    #[arg(long, conflicts_with = "labels_from_folders")]
    label_column: Option<String>,
    /// Label each image with the name of its folder (ImageFolder's convention: the first
    /// folder below the input, at any depth; in a list file, the folder holding the file).
    #[arg(long)]
    labels_from_folders: bool,
    /// Extensions kept when listing a prefix (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_EXTENSIONS.iter().map(|s| s.to_string()))]
    extensions: Vec<String>,
    /// Sources per shard (10,000 x ~50 KB at 512 px = ~500 MB shards).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    samples_per_shard: u64,
    /// Shard names are PREFIX-000000.tar.
    #[arg(long, default_value = "data")]
    shard_prefix: String,
    /// This worker's share, I/N: it makes shards whose number is I modulo N. Read from
    /// Slurm arrays (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) or Kubernetes Indexed Jobs
    /// (JOB_COMPLETION_INDEX with --partitions) when not given.
    #[arg(long)]
    partition: Option<Partition>,
    /// Number of partitions, for Kubernetes Indexed Jobs (JOB_COMPLETION_INDEX gives the index).
    #[arg(long, env = "INGEST_PARTITIONS")]
    partitions: Option<u32>,
    /// Source fetches in flight.
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    fetch_concurrency: usize,
    /// Images processed at once (default: the number of cores).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    workers: Option<usize>,
    /// Refuse sources larger than this many bytes, before reading them.
    #[arg(long, default_value_t = ImageConfig::default().max_input_bytes, value_parser = clap::value_parser!(u64).range(1..))]
    max_bytes: u64,
    /// Refuse images whose header claims more pixels than this, before decoding.
    #[arg(long, default_value_t = ImageConfig::default().max_pixels, value_parser = clap::value_parser!(u64).range(1..))]
    max_pixels: u64,
    /// Drop images whose shorter side is below this.
    #[arg(long, default_value_t = ImageConfig::default().min_side)]
    min_side: u32,
    /// Shrink images so that their shorter side is at most this.
    #[arg(long, default_value_t = ImageConfig::default().max_short_side)]
    max_short_side: u32,
    /// JPEG quality of re-encoded images.
    #[arg(long, default_value_t = ImageConfig::default().jpeg_quality)]
    quality: u8,
    /// Re-encode every image, even JPEGs already within limits.
    #[arg(long)]
    always_reencode: bool,
    /// Stop when more than this fraction of sources fail (judged after 200 sources; the
    /// partition's sources, shards completed by earlier runs included).
    #[arg(long, default_value_t = 0.5)]
    max_failure_rate: f64,
    /// Retry only the sources that failed in completed shards (and finish incomplete ones).
    #[arg(long)]
    retry_failed: bool,
    /// Local folder for temporary spool files (about two shards' size at a time).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// No progress bar (also off when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

fn partition_from_env(partitions: Option<u32>) -> Result<Option<Partition>> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(count)) = (var("SLURM_ARRAY_TASK_ID"), var("SLURM_ARRAY_TASK_COUNT")) {
        let min: u32 = var("SLURM_ARRAY_TASK_MIN")
            .map_or(Ok(0), |m| m.parse())
            .context("SLURM_ARRAY_TASK_MIN")?;
        let id: u32 = id.parse().context("SLURM_ARRAY_TASK_ID is not a number")?;
        let index = id
            .checked_sub(min)
            .context("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
        return Ok(Some(
            format!("{index}/{count}")
                .parse()
                .map_err(anyhow::Error::msg)
                .context("Slurm array variables")?,
        ));
    }
    if let Some(index) = var("JOB_COMPLETION_INDEX") {
        let count = partitions.context("JOB_COMPLETION_INDEX is set: give the number of partitions with --partitions N (or INGEST_PARTITIONS)")?;
        return Ok(Some(
            format!("{index}/{count}")
                .parse()
                .map_err(anyhow::Error::msg)
                .context("JOB_COMPLETION_INDEX")?,
        ));
    }
    Ok(None)
}

/// Draws a bar on a terminal, or logs a line every 10 seconds.
struct CliReporter {
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
}

impl Reporter for CliReporter {
    fn progress(&self, p: &Progress) {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (p.written + p.failed + p.duplicates) as f64 / seconds;
        let mb_s = p.bytes_in as f64 / 1e6 / seconds;
        if let Some(bar) = &self.bar {
            bar.set_length(p.items_total);
            bar.set_position(p.items_done);
            bar.set_message(format!(
                "{rate:.0} img/s, {mb_s:.1} MB/s, {} failed, shards {}/{}",
                p.failed, p.shards_done, p.shards_total
            ));
            return;
        }
        let mut last = self.last_log.lock().expect("log lock");
        if last.elapsed() >= Duration::from_secs(10) {
            *last = Instant::now();
            // No estimate until a source has finished: the rate is still zero.
            let remaining = p.items_total.saturating_sub(p.items_done) as f64 / rate;
            let eta_s = remaining.is_finite().then(|| remaining.round());
            tracing::info!(
                done = p.items_done,
                total = p.items_total,
                images_per_s = rate,
                mb_per_s = mb_s,
                failed = p.failed,
                eta_s,
                "progress"
            );
        }
    }

    fn shard_done(&self, stats: &ShardStats) {
        let line = format!(
            "{}: {} written, {} failed, {} duplicates, {:.1} MB",
            stats.shard,
            stats.successes,
            stats.failed,
            stats.duplicates,
            stats.bytes_out as f64 / 1e6
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let labels = match (&args.label_column, args.labels_from_folders) {
        (Some(column), _) => LabelSource::Column(column.clone()),
        (None, true) => LabelSource::FolderName,
        (None, false) => LabelSource::None,
    };
    let mut extensions: Vec<String> = args
        .extensions
        .iter()
        .map(|e| e.trim().trim_start_matches('.').to_ascii_lowercase())
        .collect();
    extensions.sort();
    extensions.dedup();
    // A local path is kept absolute in the plan, so that a rerun from another folder that
    // names another folder the same way is not taken for this job.
    let url = match std::path::absolute(&args.input) {
        Ok(path) if shards::store::is_local_path(&args.input) => {
            path.to_string_lossy().into_owned()
        }
        _ => args.input.clone(),
    };
    let input = InputSpec {
        url,
        list: args.list,
        list_format: args.list_format,
        url_column: args.url_column.clone(),
        labels,
        extensions,
    };
    let mut config = JobConfig::new(input, args.output.clone());
    config.samples_per_shard = args.samples_per_shard;
    config.shard_prefix = args.shard_prefix.clone();
    config.partition = match args.partition {
        Some(p) => p,
        None => partition_from_env(args.partitions)?.unwrap_or_default(),
    };
    // A count that this worker's partition does not use is a mistake somewhere: a missing
    // index variable, or a --partition written for another job.
    if let Some(count) = args.partitions
        && count != config.partition.count
    {
        bail!(
            "--partitions {count} (or INGEST_PARTITIONS) but this worker's partition is {}/{}: \
             give --partition I/{count}, or run it where JOB_COMPLETION_INDEX is set",
            config.partition.index,
            config.partition.count
        );
    }
    config.fetch_concurrency = args.fetch_concurrency;
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    config.image = ImageConfig {
        max_input_bytes: args.max_bytes,
        max_pixels: args.max_pixels,
        min_side: args.min_side,
        max_short_side: args.max_short_side,
        jpeg_quality: args.quality,
        keep_original_jpeg: !args.always_reencode,
    };
    if !(0.0..=1.0).contains(&args.max_failure_rate) {
        bail!(
            "--max-failure-rate must be between 0 and 1, got {}",
            args.max_failure_rate
        );
    }
    config.max_failure_rate = args.max_failure_rate;
    config.retry_failed = args.retry_failed;
    if let Some(dir) = &args.work_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the work folder {}", dir.display()))?;
        config.work_dir = dir.clone();
    }
    config.store = args.store.options()?;

    let show_bar = !args.no_progress && std::io::stderr().is_terminal();
    let bar = show_bar.then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} (ETA {eta}) {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar
    });
    let reporter = CliReporter {
        bar,
        started: Instant::now(),
        last_log: std::sync::Mutex::new(Instant::now()),
    };
    tracing::info!(input = %args.input, output = %args.output, partition = %format!("{}/{}", config.partition.index, config.partition.count), "ingest starting");
    // The local folders this run creates for the output are removed again if the job fails
    // before writing anything into them (a wrong input path, say): a typo leaves nothing behind.
    let new_local_folders: Vec<std::path::PathBuf> = shards::store::normalize_url(&args.output)
        .ok()
        .filter(|url| url.scheme() == "file")
        .and_then(|url| url.to_file_path().ok())
        .map(|path| {
            path.ancestors()
                .take_while(|folder| !folder.exists())
                .map(|folder| folder.to_path_buf())
                .collect()
        })
        .unwrap_or_default();
    let result = job::run(&config, &reporter).await;
    if result.is_err() {
        for folder in &new_local_folders {
            // Fails, leaving it and every folder above, unless the folder is empty.
            if std::fs::remove_dir(folder).is_err() {
                break;
            }
        }
    }
    if let Some(bar) = &reporter.bar {
        bar.finish_and_clear();
    }
    let summary =
        result.with_context(|| format!("ingesting {} into {}", args.input, args.output))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let seconds = summary.seconds.max(1e-9);
        println!(
            "done: {} shards written ({} already complete), {} images written, {} failed, {} duplicates skipped, {:.1} MB in, {:.1} MB out, {:.1} s ({:.0} images/s)",
            summary.shards_written,
            summary.shards_skipped,
            summary.written,
            summary.failed,
            summary.duplicates,
            summary.bytes_in as f64 / 1e6,
            summary.bytes_out as f64 / 1e6,
            summary.seconds,
            (summary.written + summary.failed + summary.duplicates) as f64 / seconds
        );
        for (reason, n) in &summary.failed_by_reason {
            println!("  failed {reason}: {n}");
        }
        if config.partition.count > 1 {
            println!(
                "partition {}/{} done; when all are, run: ingest merge {}",
                config.partition.index, config.partition.count, args.output
            );
        }
    }
    Ok(())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        // rustls logs every refused certificate as an error, once per attempt; the source's
        // failure already says it, in its shard's stats.
        0 => "info,rustls=off",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Merge {
                output,
                allow_incomplete,
                store,
            } => {
                let manifest = job::merge(&output, &store.options()?, allow_incomplete)
                    .await
                    .with_context(|| format!("merging the manifests of {output}"))?;
                println!(
                    "manifest.json: {} shards, {} samples, {:.1} MB",
                    manifest.shards.len(),
                    manifest.total_samples(),
                    manifest.total_bytes() as f64 / 1e6
                );
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", shards::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
