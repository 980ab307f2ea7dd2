//! The `train` command: see `train --help`.
//!
//! Exit codes: 0 done (or stopped by SIGINT/SIGTERM after writing a checkpoint: the summary
//! says `"interrupted": true`); 1 failed (data, storage, checkpoint, an error inside libtorch
//! such as an allocation that fails); 2 bad command line or
//! configuration; 3 training diverged (too many skipped steps in a row); 4 a data-parallel peer
//! failed (exited, or stopped responding within `distributed.timeout_s`); 130 a second signal
//! before the checkpoint was written.
//!
//! Data parallelism (docs/distributed.md): under torchrun or Slurm each process is one rank;
//! `--nproc N` spawns N local ranks of the same command.

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
use trainer::config::{DistributedBackend, TrainConfig};
use trainer::dist::{Backend, Distributed};
use trainer::export::export_trunk;
use trainer::launch::{Launch, spawn_local, threads_per_process};
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
    /// Run N processes on this machine as one data-parallel run (Gloo on CPU; on CUDA one GPU
    /// each, NCCL). Under torchrun or Slurm, leave it out: their variables say the rank.
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
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
    let launch = Launch::from_env().map_err(|e| usage(e.into()))?;
    if let Some(nproc) = args.nproc {
        if nproc == 0 {
            return Err(usage(anyhow::anyhow!("--nproc 0: expected at least 1")));
        }
        if launch.is_some() {
            return Err(usage(anyhow::anyhow!(
                "--nproc {nproc} under a launcher (RANK/WORLD_SIZE or SLURM_PROCID are set): \
                 leave --nproc out, the launcher starts the ranks"
            )));
        }
        if nproc > 1 {
            return spawn_ranks(nproc);
        }
    }
    // Ranks on one machine share its cores.
    let default_threads = launch
        .as_ref()
        .map(|l| l.local_world_size)
        .filter(|&local| local > 1)
        .map(|local| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            threads_per_process(cores, local)
        });
    let launch =
        launch.filter(|l| l.world_size > 1 || config.distributed.process_group_for_one_rank);
    let mut device = parse_device(&args.device).map_err(usage)?;
    if let (Some(launch), Device::Cuda(_)) = (&launch, device) {
        // One GPU per local rank.
        device = parse_device(&format!("cuda:{}", launch.local_rank)).map_err(usage)?;
    }
    let distributed = match &launch {
        None => None,
        Some(launch) => {
            let backend = match (config.distributed.backend, device) {
                (DistributedBackend::Gloo, _) => Backend::Gloo,
                (DistributedBackend::Nccl, _) => Backend::Nccl,
                (DistributedBackend::Auto, Device::Cuda(_)) => Backend::Nccl,
                (DistributedBackend::Auto, _) => Backend::Gloo,
            };
            let group_size = config.distributed.sync_bn_group_size;
            if group_size > 1 && launch.world_size % group_size != 0 {
                return Err(usage(anyhow::anyhow!(
                    "distributed.sync_bn_group_size = {group_size} does not divide the {} \
                     processes of this run",
                    launch.world_size
                )));
            }
            let timeout = Duration::from_secs_f64(config.distributed.timeout_s);
            let bucket_bytes = (config.distributed.bucket_mb * 1024.0 * 1024.0) as usize;
            let distributed = Distributed::init(launch, backend, timeout, bucket_bytes, group_size)
                .map_err(|e| Failure {
                    code: 4,
                    error: anyhow::Error::new(e).context(format!(
                        "joining the run as rank {} of {}",
                        launch.rank, launch.world_size
                    )),
                })?;
            Some(distributed)
        }
    };
    let rank = launch.as_ref().map_or(0, |l| l.rank);
    let _span = launch
        .as_ref()
        .map(|l| tracing::info_span!("rank", rank = l.rank).entered());
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
        distributed,
        default_threads,
    };
    let summary = train(&config, &options).map_err(|e| {
        let code = match e {
            TrainError::Config(_) => 2,
            TrainError::Diverged { .. } | TrainError::NonFiniteModel { .. } => 3,
            TrainError::Distributed(_) => 4,
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
        "communication_share": summary.communication_share,
        "interrupted": summary.interrupted,
    });
    if rank == 0 {
        println!("{json}");
    }
    Ok(())
}

/// `--nproc N`: this command again as N local ranks (without --nproc); the first rank to fail
/// stops the others, and its exit code is ours.
fn spawn_ranks(nproc: usize) -> Result<(), Failure> {
    let program = std::env::current_exe().context("the path of this program")?;
    let mut args = Vec::new();
    let mut rest = std::env::args().skip(1);
    while let Some(arg) = rest.next() {
        if arg == "--nproc" {
            rest.next();
        } else if !arg.starts_with("--nproc=") {
            args.push(arg);
        }
    }
    let stop = stop_on_signals();
    let failure = spawn_local(&program, &args, nproc, Duration::from_secs(30), &stop)
        .context("starting the local ranks")?;
    match failure {
        None => Ok(()),
        Some((rank, status)) => Err(Failure {
            code: status.code().map_or(1, |c| c.clamp(1, 255) as u8),
            error: anyhow::anyhow!("rank {rank} of {nproc} failed ({status}): stopped the others"),
        }),
    }
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
                    // `_exit`, not `exit`: the main thread is inside libtorch, whose static
                    // destructors `exit` would run under it (libtorch then asserts and aborts
                    // with a message that asks for a PyTorch bug report).
                    // SAFETY: `_exit` ends the process at once; nothing runs after it.
                    unsafe { libc::_exit(130) };
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

/// Where an export is written: `output`, or the file a link there names. Refused: a folder, a
/// device, FIFO or socket (an export is a file, renamed into place), a link to nothing, and a
/// place inside the folder that holds the checkpoint read (`checkpoint_url`, when local),
/// where the export would overwrite or mix with checkpoints.
fn export_target(output: &Path, checkpoint_url: &str) -> Result<PathBuf> {
    let shown = output.display();
    let target = match shards::output_target(output) {
        Ok(shards::OutputTarget::File(target)) => target,
        Ok(shards::OutputTarget::Special(_)) => anyhow::bail!(
            "{shown} is not a regular file (a device, FIFO or socket): the export is a file, written under a temporary name and renamed into place"
        ),
        Err(error) => anyhow::bail!("{shown}: {error}"),
    };
    let checkpoints = shards::store::normalize_url(checkpoint_url)
        .ok()
        .filter(|url| url.scheme() == "file")
        .and_then(|url| url.to_file_path().ok())
        .and_then(|folder| folder.parent().map(Path::to_path_buf))
        .and_then(|folder| std::fs::canonicalize(folder).ok());
    let parent = std::fs::canonicalize(shards::folder_of(&target));
    if let (Some(checkpoints), Ok(parent)) = (checkpoints, parent) {
        anyhow::ensure!(
            !parent.starts_with(&checkpoints),
            "{shown} is inside {}, the folder of the checkpoints: the export would overwrite or mix with them; write it elsewhere",
            checkpoints.display()
        );
    }
    Ok(target)
}

fn export(checkpoint: &str, output: &Path) -> Result<()> {
    let options = StoreOptions::default();
    let saved = load_checkpoint(checkpoint, &options)
        .with_context(|| format!("reading checkpoint {checkpoint}"))?;
    let target = export_target(output, &saved.url)?;
    let config = TrainConfig::from_toml_str(&saved.config, &[] as &[&str])
        .with_context(|| format!("{}: the configuration saved with it", saved.url))?;
    let model = SwavModel::new(&config, Device::Cpu)?;
    restore_variables(&model.vs, &saved.model, &saved.url)?;
    let written = export_trunk(&model.vs, TRUNK_PREFIX, &target)
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
    trainer::dist::quiet_collective_failures();
    trainer::torch_errors::quiet_libtorch_panics();
    let result = trainer::torch_errors::catch_libtorch(|| match cli.command {
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
    })
    .unwrap_or_else(|message| {
        let hint = trainer::torch_errors::memory_hint(&message);
        Err(Failure {
            code: 1,
            error: anyhow::anyhow!(
                "libtorch failed: {message}{}",
                hint.map(|h| format!(" ({h})")).unwrap_or_default()
            ),
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("error: {}", shards::error_chain(&error));
            ExitCode::from(code)
        }
    }
}
