//! `shards`: inspect and verify a dataset of seer-rs shards.
//!
//! Parses arguments, sets up logging and progress, calls
//! [`shards::inspect`], prints the report and maps the outcome to an exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shards::inspect::{self, DupesOptions, GridOptions, Problem, Reporter, VerifyOptions};
use shards::{Dataset, StoreOptions, write_stdout};

const EXIT_CODES: &str = "\
Exit codes:
  0  success (for verify: no problem found)
  1  error: bad arguments, bad URL, missing or unreadable manifest, unknown key, unreadable shard
  2  verify found problems (each printed with its shard, key and byte offset)

DATASET_URL is a local folder or s3://bucket/prefix, gs://..., az://..., http(s)://..., file:///...
Credentials come from the environment (AWS_*, GOOGLE_*, AZURE_*); --store-option overrides them.
RUST_LOG overrides the log level that -v sets.";

#[derive(Debug, Parser)]
#[command(name = "shards", version, about = "Inspect and verify a seer-rs dataset of WebDataset tar shards", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Option for the object store's builder, e.g. `aws_endpoint=http://localhost:9000` (repeatable).
    #[arg(long = "store-option", value_name = "KEY=VALUE", value_parser = parse_key_value, global = true)]
    store_options: Vec<(String, String)>,

    /// More logging: -v info, -vv debug, -vvv trace (default: warnings only).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// Never draw a progress bar (it is drawn only when stderr is a terminal).
    #[arg(long, global = true)]
    no_progress: bool,

    /// Shards (or samples) processed at once [default: the number of cores].
    #[arg(short, long, value_name = "N", global = true)]
    jobs: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the manifest's shards: name, samples, size, SHA-256 prefix, and totals.
    Ls {
        /// The dataset (folder or URL holding manifest.json).
        dataset: String,
    },
    /// Totals from the stats files, and histograms of sizes, formats and labels from every KEY.json.
    Stat {
        /// The dataset (folder or URL holding manifest.json).
        dataset: String,
    },
    /// Check checksums, indexes, members, metadata and every image; exit 2 on any problem.
    #[command(
        after_help = "Exit codes: 0 no problem found, 1 error (nothing was checked), 2 problems found.\nEach problem is printed as SHARD[: sample KEY][ at byte OFFSET]: WHAT."
    )]
    Verify {
        /// The dataset (folder or URL holding manifest.json).
        dataset: String,
        /// Skip decoding images (faster; dimensions are then not checked).
        #[arg(long)]
        no_decode: bool,
    },
    /// Print a sample's KEY.json, with its shard and byte offset.
    Cat {
        /// The dataset (folder or URL holding manifest.json).
        dataset: String,
        /// The sample's key.
        key: String,
    },
    /// Write a sample's image bytes to a file (one ranged read through the index).
    Get {
        /// The dataset (folder or URL holding manifest.json).
        dataset: String,
        /// The sample's key.
        key: String,
        /// Output file (`-` for stdout).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a contact sheet (PNG) of random samples.
    Grid {
        /// The dataset (folder or URL holding manifest.json).
        dataset: String,
        /// Output PNG file.
        #[arg(short, long)]
        output: PathBuf,
        /// Samples shown.
        #[arg(long, default_value_t = 64,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        count: usize,
        /// Seed of the random choice: the same seed shows the same samples.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of each square tile in pixels.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(8..=2048))]
        tile: u32,
        /// Border between tiles in pixels.
        #[arg(long, default_value_t = 2)]
        border: u32,
    },
    /// Find exact duplicates (same SHA-256) and near duplicates (perceptual hashes within a distance).
    Dupes {
        /// The dataset (folder or URL holding manifest.json).
        dataset: String,
        /// Largest Hamming distance between 64-bit perceptual hashes of near duplicates.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=64))]
        max_distance: u32,
    },
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit 1 like every other error: 2 means "verify found problems".
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", shards::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn open(url: &str, cli: &Cli) -> Result<Dataset> {
    let options = StoreOptions {
        options: cli.store_options.clone(),
        ..StoreOptions::default()
    };
    let dataset = Dataset::open(url, &options)
        .await
        .with_context(|| format!("cannot open dataset {url}"))?;
    tracing::info!(url = %dataset.location.url, shards = dataset.manifest.shards.len(), samples = dataset.manifest.total_samples(), "opened");
    Ok(dataset)
}

fn print_text(text: &impl std::fmt::Display) -> Result<()> {
    write_stdout(text.to_string().as_bytes())
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).context("cannot serialize JSON")?;
    text.push(b'\n');
    write_stdout(&text)
}

fn print_report(report: &(impl std::fmt::Display + serde::Serialize), json: bool) -> Result<()> {
    if json {
        print_json(report)
    } else {
        print_text(report)
    }
}

/// Output of a scan that could not read some shards to their end is incomplete: say so and fail.
fn fail_on_unreadable(unreadable: &[String]) -> Result<()> {
    if !unreadable.is_empty() {
        bail!(
            "{} shards could not be read to their end; `shards verify` tells more",
            unreadable.len()
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let jobs = cli.jobs.unwrap_or_else(inspect::default_jobs).max(1);
    match &cli.command {
        Command::Ls { dataset } => {
            let report = inspect::ls(&open(dataset, &cli).await?);
            print_report(&report, cli.json)?;
        }
        Command::Stat { dataset } => {
            let dataset = open(dataset, &cli).await?;
            let progress = ProgressReporter::new(&cli, "stat");
            let report = inspect::stat(&dataset, jobs, progress.clone()).await;
            progress.finish();
            let report = report?;
            print_report(&report, cli.json)?;
            fail_on_unreadable(&report.unreadable)?;
        }
        Command::Verify { dataset, no_decode } => {
            let dataset = open(dataset, &cli).await?;
            let progress = ProgressReporter::new(&cli, "verify");
            let options = VerifyOptions {
                jobs,
                decode: !no_decode,
            };
            let report = inspect::verify(&dataset, &options, progress.clone()).await;
            progress.finish();
            print_report(&report, cli.json)?;
            if !report.is_ok() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Cat { dataset, key } => {
            let found = inspect::lookup(&open(dataset, &cli).await?, key).await?;
            let json = found.sample.get("json").with_context(|| {
                format!(
                    "sample {} in {} has no .json member",
                    shards::printable(key),
                    shards::printable(&found.shard.name)
                )
            })?;
            let (pretty, meta) = cat_text(key, json, &found)?;
            if cli.json {
                let members: Vec<_> = found
                    .sample
                    .members
                    .iter()
                    .map(|(ext, data)| serde_json::json!({"ext": ext, "size": data.len()}))
                    .collect();
                print_json(&serde_json::json!({
                    "key": key, "shard": found.shard.name, "offset": found.sample.offset, "members": members, "meta": meta,
                }))?;
            } else {
                let members: Vec<_> = found
                    .sample
                    .members
                    .iter()
                    .map(|(ext, data)| format!(".{ext} {} bytes", data.len()))
                    .collect();
                print_text(&format!(
                    "# {} in {} at byte {} ({})\n",
                    shards::printable(key),
                    shards::printable(&found.shard.name),
                    found.sample.offset,
                    members.join(", ")
                ))?;
                print_text(&format!("{pretty}\n"))?;
            }
        }
        Command::Get {
            dataset,
            key,
            output,
        } => {
            let found = inspect::lookup(&open(dataset, &cli).await?, key).await?;
            let (ext, image) =
                found
                    .sample
                    .image()
                    .ok_or_else(|| inspect::InspectError::NoImage {
                        key: key.clone(),
                        shard: found.shard.name.clone(),
                    })?;
            if output.as_os_str() == "-" {
                write_stdout(image)?;
            } else {
                shards::write_file(output, image)
                    .with_context(|| format!("cannot write {}", output.display()))?;
                eprintln!(
                    "wrote {} ({} bytes, .{ext}) of {key} from {} at byte {}",
                    output.display(),
                    image.len(),
                    found.shard.name,
                    found.sample.offset
                );
            }
        }
        Command::Grid {
            dataset,
            output,
            count,
            seed,
            tile,
            border,
        } => {
            let dataset = open(dataset, &cli).await?;
            let options = GridOptions {
                count: *count,
                seed: *seed,
                tile: *tile,
                border: *border,
                jobs,
            };
            let sheet = inspect::grid(&dataset, &options).await?;
            let png = sheet.to_png()?;
            shards::write_file(output, &png)
                .with_context(|| format!("cannot write {}", output.display()))?;
            if cli.json {
                let samples: Vec<_> = sheet
                    .samples
                    .iter()
                    .map(|(shard, key)| serde_json::json!({"shard": shard, "key": key}))
                    .collect();
                print_json(&serde_json::json!({
                    "output": output, "width": sheet.image.width(), "height": sheet.image.height(), "columns": sheet.columns, "samples": samples,
                }))?;
            } else {
                print_text(&format!(
                    "wrote {}: {}x{} px, {} samples in {} columns\n",
                    output.display(),
                    sheet.image.width(),
                    sheet.image.height(),
                    sheet.samples.len(),
                    sheet.columns
                ))?;
            }
        }
        Command::Dupes {
            dataset,
            max_distance,
        } => {
            let dataset = open(dataset, &cli).await?;
            let progress = ProgressReporter::new(&cli, "dupes");
            let report = inspect::dupes(
                &dataset,
                &DupesOptions {
                    max_distance: *max_distance,
                    jobs,
                },
                progress.clone(),
            )
            .await;
            progress.finish();
            print_report(&report, cli.json)?;
            fail_on_unreadable(&report.unreadable)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A sample's KEY.json pretty-printed, and as a JSON value. Printed through
/// [`shards::SampleMeta`] where it is one, to keep the documented field order.
fn cat_text(key: &str, json: &[u8], found: &inspect::Found) -> Result<(String, serde_json::Value)> {
    let value: serde_json::Value = serde_json::from_slice(json).with_context(|| {
        format!(
            "{key}.json in {} at byte {} is not JSON",
            found.shard.name, found.sample.offset
        )
    })?;
    let pretty = match serde_json::from_slice::<shards::SampleMeta>(json) {
        Ok(meta) => serde_json::to_string_pretty(&meta),
        Err(e) => {
            tracing::warn!(key, error = %e, "KEY.json is not valid sample metadata; printing it as it is");
            serde_json::to_string_pretty(&value)
        }
    };
    Ok((pretty.expect("JSON serializes"), value))
}

/// Draws a byte-based progress bar on stderr when it is a terminal.
struct ProgressReporter {
    bar: ProgressBar,
    shards: AtomicUsize,
    problems: AtomicUsize,
}

impl ProgressReporter {
    fn new(cli: &Cli, what: &str) -> Arc<Self> {
        let bar = if cli.no_progress || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix} {bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}")
                    .expect("valid template"),
            );
            bar.set_prefix(what.to_string());
            bar
        };
        Arc::new(Self {
            bar,
            shards: AtomicUsize::new(0),
            problems: AtomicUsize::new(0),
        })
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn update_message(&self) {
        let shards = self.shards.load(Ordering::Relaxed);
        let problems = self.problems.load(Ordering::Relaxed);
        if problems > 0 {
            self.bar
                .set_message(format!("{shards} shards done, {problems} problems"));
        } else {
            self.bar.set_message(format!("{shards} shards done"));
        }
    }
}

impl Reporter for ProgressReporter {
    fn start(&self, _shards: usize, bytes: u64) {
        self.bar.set_length(bytes);
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn shard_done(&self, shard: &str) {
        self.shards.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(shard, "done");
        self.update_message();
    }

    fn problem(&self, problem: &Problem) {
        self.problems.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%problem, "problem");
        self.update_message();
    }
}
