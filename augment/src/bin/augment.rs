//! `augment`: run the multi-crop pipeline on a shard dataset: measure it (`bench`), or look at
//! the views of one sample (`views`).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use augment::config::{Layout, PRESETS};
use augment::decode::Decoder;
use augment::params::sample_views;
use augment::view::{Slot, StageTimes, ViewRenderer};
use augment::{AugmentConfig, Pipeline, PipelineOptions};
use clap::{Parser, Subcommand};
use shards::{Dataset, StoreOptions, write_stdout};

#[derive(Parser)]
#[command(version, about = "SwAV multi-crop views from seer-rs shards")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the real pipeline on a dataset for a while and reports source images per second,
    /// the time per stage and peak memory.
    Bench(BenchArgs),
    /// Renders the views of one sample side by side into a PNG.
    Views(ViewsArgs),
}

#[derive(clap::Args)]
struct Recipe {
    /// A preset (swav, swav-2x224, seer, seer-10b) or crop groups COUNTxSIZE@MIN-MAX joined
    /// by '+', e.g. 2x224@0.14-1+6x96@0.05-0.14.
    #[arg(long, default_value = "swav")]
    preset: String,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl Recipe {
    fn config(&self) -> Result<AugmentConfig> {
        AugmentConfig::parse(&self.preset).with_context(|| {
            let names: Vec<String> = PRESETS.iter().map(|(n, d)| format!("{n} ({d})")).collect();
            format!("--preset {:?}; presets: {}", self.preset, names.join("; "))
        })
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Dataset URL or folder (the one `ingest` wrote, with its manifest.json).
    #[arg(long)]
    data: String,
    #[command(flatten)]
    recipe: Recipe,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 20.0, value_parser = seconds_measured)]
    seconds: f64,
    /// Seconds run before measuring (fills the buffers and caches).
    #[arg(long, default_value_t = 3.0, value_parser = seconds_of_warmup)]
    warmup: f64,
    /// Source images per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Shuffle buffer in samples.
    #[arg(long, default_value_t = 1000)]
    shuffle_buffer: usize,
    /// Output layout.
    #[arg(long, value_enum, default_value = "u8-nhwc")]
    layout: Layout,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ViewsArgs {
    /// Dataset URL or folder.
    #[arg(long)]
    data: String,
    /// The sample's key (default: the first sample of the first shard).
    key: Option<String>,
    /// Output PNG.
    #[arg(short, long)]
    output: std::path::PathBuf,
    #[command(flatten)]
    recipe: Recipe,
    /// Epoch whose views to draw.
    #[arg(long, default_value_t = 0)]
    epoch: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench(args),
        Command::Views(args) => views(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", shards::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn bench(args: BenchArgs) -> Result<()> {
    let config = args.recipe.config()?;
    let crops = config.crops_spec();
    let mut options = PipelineOptions::new(config, args.batch_size);
    options.threads = args.threads;
    options.seed = args.recipe.seed;
    options.layout = args.layout;
    options.shuffle_buffer = args.shuffle_buffer;
    let mut pipeline = Pipeline::start(&args.data, options, None)
        .with_context(|| format!("starting the pipeline on {}", args.data))?;
    let warmup_end = Instant::now() + Duration::from_secs_f64(args.warmup);
    while Instant::now() < warmup_end {
        pipeline
            .next()
            .context("the stream ended during the warm-up")??;
    }
    let read_wait_before = pipeline.counters().read_wait_ns.load(Ordering::Relaxed);
    let started = Instant::now();
    let (mut images, mut batches, mut times) = (0usize, 0usize, StageTimes::default());
    while started.elapsed().as_secs_f64() < args.seconds {
        let batch = pipeline.next().context("the stream ended")??;
        images += batch.len();
        batches += 1;
        times.add(&batch.times);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let read_wait = Duration::from_nanos(
        pipeline.counters().read_wait_ns.load(Ordering::Relaxed) - read_wait_before,
    );
    let counters = pipeline.counters();
    let images_failed = counters.images_failed.load(Ordering::Relaxed);
    drop(pipeline);
    let per_image_ms = |d: Duration| d.as_secs_f64() * 1e3 / images.max(1) as f64;
    let stages = [
        ("decode", times.decode),
        ("crop_resize", times.crop_resize),
        ("color", times.color),
        ("blur", times.blur),
        ("pack", times.pack),
    ];
    let rate = images as f64 / elapsed;
    let mut out = String::new();
    if args.json {
        let stage_ms: serde_json::Map<String, serde_json::Value> = stages
            .iter()
            .map(|(n, d)| (n.to_string(), per_image_ms(*d).into()))
            .collect();
        let report = serde_json::json!({
            "crops": crops, "threads": args.threads, "batch_size": args.batch_size, "seconds": elapsed,
            "images": images, "batches": batches, "images_per_s": rate,
            "images_per_s_per_thread": rate / args.threads as f64,
            "stage_ms_per_image": stage_ms, "reader_wait_ms_per_image": per_image_ms(read_wait),
            "images_failed": images_failed, "peak_rss_mib": peak_rss_mib(),
            "simd": format!("{:?}", augment::ops::simd()),
        });
        writeln!(out, "{report}")?;
    } else {
        writeln!(
            out,
            "{crops}, {} threads, batch {}: {images} source images in {elapsed:.1} s = {rate:.1} images/s ({:.1} per thread)",
            args.threads,
            args.batch_size,
            rate / args.threads as f64
        )?;
        writeln!(
            out,
            "  kernels      {:?} (SEER_SIMD caps it)",
            augment::ops::simd()
        )?;
        let worker_total = per_image_ms(times.total());
        for (name, d) in stages {
            writeln!(
                out,
                "  {name:<12} {:7.3} ms/image ({:4.1} %)",
                per_image_ms(d),
                100.0 * per_image_ms(d) / worker_total.max(1e-9)
            )?;
        }
        writeln!(
            out,
            "  reader waited for storage {:.3} ms/image (on its own thread)",
            per_image_ms(read_wait)
        )?;
        if let Some(rss) = peak_rss_mib() {
            writeln!(out, "  peak RSS {rss:.0} MiB")?;
        }
    }
    write_stdout(out.as_bytes())?;
    Ok(())
}

fn views(args: ViewsArgs) -> Result<()> {
    let config = args.recipe.config()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let dataset = runtime.block_on(Dataset::open(&args.data, &StoreOptions::default()))?;
    let key = match &args.key {
        Some(key) => key.clone(),
        None => {
            let first = dataset
                .manifest
                .shards
                .first()
                .with_context(|| format!("{}: the dataset has no shards", args.data))?;
            let index = runtime.block_on(dataset.index(first))?;
            index
                .samples
                .first()
                .with_context(|| format!("{}: shard {} is empty", args.data, first.name))?
                .key
                .clone()
        }
    };
    let Some((shard, sample)) = runtime.block_on(dataset.find(&key))? else {
        bail!("{}: no sample with key {key:?}", args.data);
    };
    let (_, bytes) = sample
        .image()
        .with_context(|| format!("{}: sample {key} has no image", shard.name))?;
    let mut decoder = Decoder::new(64 << 20);
    let source = decoder
        .decode(bytes)
        .with_context(|| format!("{}: sample {key}", shard.name))?;
    let params = sample_views(
        &config,
        args.recipe.seed,
        args.epoch,
        &key,
        source.width,
        source.height,
    );
    let mut renderer = ViewRenderer::new();
    let mut rendered = Vec::new();
    for view in &params {
        let mut pixels = vec![0u8; view.size as usize * view.size as usize * 3];
        renderer.render(
            source,
            view,
            config.mean,
            config.std,
            Slot::U8(&mut pixels),
            &mut StageTimes::default(),
        );
        rendered.push((view.size, pixels));
    }
    // The source, scaled to the largest view's height (or, for a panorama, to four times that
    // width: the sheet of a 67-million-pixel-wide image would not fit in memory), then every
    // view, left to right.
    let tallest = rendered.iter().map(|(s, _)| *s).max().unwrap_or(1);
    let original = image::RgbImage::from_raw(source.width, source.height, source.data.to_vec())
        .context("source buffer")?;
    let widest = u64::from(tallest) * 4;
    let at_full_height = u64::from(source.width) * u64::from(tallest) / u64::from(source.height);
    let (thumb_width, thumb_height) = if at_full_height <= widest {
        (at_full_height.max(1), u64::from(tallest))
    } else {
        (
            widest,
            (u64::from(source.height) * widest / u64::from(source.width)).max(1),
        )
    };
    let (thumb_width, thumb_height) = (thumb_width as u32, thumb_height as u32);
    let thumb = image::imageops::resize(
        &original,
        thumb_width,
        thumb_height,
        image::imageops::FilterType::Triangle,
    );
    let gap = 8;
    let width = thumb_width + rendered.iter().map(|(s, _)| s + gap).sum::<u32>();
    let mut sheet = image::RgbImage::from_pixel(width, tallest, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut sheet, &thumb, 0, 0);
    let mut x = i64::from(thumb_width + gap);
    for (size, pixels) in rendered {
        let view = image::RgbImage::from_raw(size, size, pixels).context("view buffer")?;
        image::imageops::replace(&mut sheet, &view, x, 0);
        x += i64::from(size + gap);
    }
    if args.output.is_dir() {
        anyhow::bail!(
            "{}: is a folder; -o takes the file to write (PNG unless its name says otherwise)",
            args.output.display()
        );
    }
    // The format from the name's extension; PNG when it names none.
    let format = image::ImageFormat::from_path(&args.output).unwrap_or(image::ImageFormat::Png);
    let mut encoded = std::io::Cursor::new(Vec::new());
    sheet
        .write_to(&mut encoded, format)
        .with_context(|| format!("encoding {}", args.output.display()))?;
    shards::write_file(&args.output, encoded.get_ref())
        .with_context(|| format!("writing {}", args.output.display()))?;
    write_stdout(
        format!(
            "{}: {} views of {} ({}x{}, shard {}) -> {}\n",
            config.crops_spec(),
            params.len(),
            key,
            source.width,
            source.height,
            shard.name,
            args.output.display()
        )
        .as_bytes(),
    )
}

/// `--seconds`: a positive number of seconds, at most a week.
fn seconds_measured(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 604_800.0 => Ok(s),
        Ok(s) => Err(format!(
            "{s} is not a number of seconds above 0 and at most 604800"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// `--warmup`: seconds, 0 to a day.
fn seconds_of_warmup(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.0..=86_400.0).contains(&s) => Ok(s),
        Ok(s) => Err(format!("{s} is not a number of seconds from 0 to 86400")),
        Err(e) => Err(e.to_string()),
    }
}
