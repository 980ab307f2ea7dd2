//! The `train` command: see `train --help`.
//!
//! Exit codes: 0 done (or stopped by SIGINT/SIGTERM after writing a checkpoint: the summary
//! says `"interrupted": true`); 1 failed (data, storage, checkpoint); 2 bad command line or
//! configuration; 3 training diverged (too many skipped steps in a row); 130 a second signal
//! before the checkpoint was written.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use shards::StoreOptions;
use tch::Device;
use trainer::checkpoint::{load_checkpoint, restore_variables};
use trainer::config::TrainConfig;
use trainer::export::export_trunk;
use trainer::train::{Resume, SwavModel, TRUNK_PREFIX, TrainError, TrainOptions, train};

/// Pretrain a RegNetY with SwAV (SEER) on a shard dataset, on CPU or CUDA.
///
/// `train --config FILE.toml` starts (or with --resume continues) a run; `train export` writes a
/// checkpoint's trunk for torchvision. Logs go to stderr (JSON when stderr is not a terminal),
/// and a finished run prints a JSON summary on stdout.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Write the trunk of a checkpoint as safetensors with torchvision's names, loadable by
    /// `torchvision.models.regnet_y_*()` (with `fc` removed) under strict key checking.
    Export {
        /// A checkpoint folder (`.../ckpt-00001000`) or a checkpoint root (its latest).
        #[arg(long)]
        checkpoint: String,
        /// The safetensors file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Measure a trunk's features on labeled shards: weighted kNN or a linear probe
    /// (`train eval knn --help`). Exit codes: 0 done, 1 failed, 2 bad arguments.
    #[command(subcommand)]
    Eval(Box<trainer::eval::cli::EvalCommand>),
}

#[derive(Args)]
struct RunArgs {
    /// The run's configuration (see configs/).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Override one configuration key, e.g. --set optim.lr_per_256=0.6 (repeatable; the value
    /// is read as TOML, or as a string when it is not TOML).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
    /// cpu, cuda (the first GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Resume from the run's newest checkpoint (a fresh start when there is none), or from
    /// CKPT: a checkpoint folder or checkpoint root, by URL or path.
    #[arg(long, value_name = "CKPT", num_args = 0..=1, default_missing_value = "")]
    resume: Option<String>,
    /// The run directory (default: logging.dir of the configuration, else runs/NAME with NAME
    /// the configuration file's stem).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// Stop after this many steps (with a checkpoint), as if preempted; the learning-rate
    /// schedule still spans schedule.steps. Resume later with --resume.
    #[arg(long, value_name = "STEPS")]
    stop_after: Option<u64>,
}

/// A failure and the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 1, error }
    }
}

fn parse_device(text: &str) -> Result<Device> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => bail!("--device {other:?}: expected cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(index) = device {
        let count = tch::Cuda::device_count();
        if count == 0 {
            bail!("--device {text}: no CUDA device is available (libtorch sees none)");
        }
        if index as i64 >= count {
            bail!(
                "--device {text}: there are {count} CUDA devices (cuda:0 to cuda:{})",
                count - 1
            );
        }
    }
    Ok(device)
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let usage = |error: anyhow::Error| Failure { code: 2, error };
    let Some(config_path) = args.config else {
        return Err(usage(anyhow::anyhow!(
            "missing --config FILE.toml (or a subcommand: export); see train --help"
        )));
    };
    let config = TrainConfig::load(&config_path, &args.overrides).map_err(|e| usage(e.into()))?;
    let device = parse_device(&args.device).map_err(usage)?;
    let run_dir = args
        .run_dir
        .or_else(|| config.logging.dir.as_ref().map(PathBuf::from))
        .unwrap_or_else(|| {
            let stem = config_path
                .file_stem()
                .map_or_else(|| "run".into(), |s| s.to_string_lossy().into_owned());
            Path::new("runs").join(stem)
        });
    let options = TrainOptions {
        device,
        run_dir,
        resume: args.resume.map(|r| {
            if r.is_empty() {
                Resume::Latest
            } else {
                Resume::From(r)
            }
        }),
        stop_after: args.stop_after,
        store: StoreOptions::default().with_retries(10, Duration::from_secs(180)),
        interrupt: Some(stop_on_signals()),
    };
    let summary = train(&config, &options).map_err(|e| {
        let code = match e {
            TrainError::Config(_) => 2,
            TrainError::Diverged { .. } => 3,
            _ => 1,
        };
        Failure {
            code,
            error: anyhow::Error::new(e).context(format!("training {}", options.run_dir.display())),
        }
    })?;
    let json = serde_json::json!({
        "run_dir": options.run_dir,
        "start_step": summary.start_step,
        "end_step": summary.end_step,
        "first_loss": summary.first_loss.filter(|l| l.is_finite()),
        "last_loss": summary.last_loss.filter(|l| l.is_finite()),
        "skipped_steps": summary.skipped_steps,
        "checkpoint": summary.checkpoint,
        "seconds_per_step": summary.seconds_per_step,
        "data_wait_share": summary.data_wait_share,
        "interrupted": summary.interrupted,
    });
    println!("{json}");
    Ok(())
}

/// A flag raised by the first SIGINT or SIGTERM, so the run stops after its current step with a
/// checkpoint (a preempted job resumes from there); a second signal exits at once with 130.
fn stop_on_signals() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let raised = flag.clone();
    let watch = move || {
        use tokio::signal::unix::{SignalKind, signal};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the signal handler");
        runtime.block_on(async move {
            let (Ok(mut terminate), Ok(mut interrupt)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::warn!("cannot handle SIGINT and SIGTERM: they stop the run at once");
                return;
            };
            loop {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                if raised.swap(true, Ordering::SeqCst) {
                    eprintln!("second signal: stopping without a checkpoint");
                    std::process::exit(130);
                }
                tracing::warn!(
                    "signal: stopping after this step with a checkpoint (again: at once)"
                );
            }
        });
    };
    if let Err(e) = std::thread::Builder::new()
        .name("signals".into())
        .spawn(watch)
    {
        tracing::warn!(error = %e, "no signal handler thread: signals stop the run at once");
    }
    flag
}

fn export(checkpoint: &str, output: &Path) -> Result<()> {
    let options = StoreOptions::default();
    let saved = load_checkpoint(checkpoint, &options)
        .with_context(|| format!("reading checkpoint {checkpoint}"))?;
    let config = TrainConfig::from_toml_str(&saved.config, &[] as &[&str])
        .with_context(|| format!("{}: the configuration saved with it", saved.url))?;
    let model = SwavModel::new(&config, Device::Cpu)?;
    restore_variables(&model.vs, &saved.model, &saved.url)?;
    let written = export_trunk(&model.vs, TRUNK_PREFIX, output)
        .with_context(|| format!("exporting the trunk of {}", saved.url))?;
    println!(
        "{}: {written} tensors of the trunk (step {}) -> {}",
        saved.url,
        saved.state.step,
        output.display()
    );
    Ok(())
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        // One compact progress line per logged step.
        builder.compact().with_target(false).init();
    } else {
        builder.json().init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Some(Command::Export { checkpoint, output }) => {
            export(&checkpoint, &output).map_err(Failure::from)
        }
        Some(Command::Eval(command)) => match trainer::eval::cli::run(*command) {
            Ok(summary) => {
                println!("{summary}");
                Ok(())
            }
            Err(e) => Err(Failure {
                code: e.exit_code(),
                error: anyhow::Error::new(e).context("evaluating"),
            }),
        },
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}
