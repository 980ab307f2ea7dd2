//! Where this process sits in a data-parallel run: read from torchrun's or Slurm's environment,
//! or set by `train --nproc N`, which spawns N local ranks ([`spawn_local`]).
//!
//! | launcher | rank | world size | local rank | store |
//! |---|---|---|---|---|
//! | torchrun (and `--nproc`) | `RANK` | `WORLD_SIZE` | `LOCAL_RANK` | `MASTER_ADDR:MASTER_PORT`; hosted by torchrun's agent when `TORCHELASTIC_USE_AGENT_STORE=True`, else by rank 0 |
//! | Slurm (`srun`) | `SLURM_PROCID` | `SLURM_NTASKS` | `SLURM_LOCALID` | `MASTER_ADDR` (default: the first node of `SLURM_NODELIST`) : `MASTER_PORT` (default 29500), hosted by rank 0 |
//!
//! torchrun's variables win when both are set (torchrun inside a Slurm allocation).
//!
//! ```
//! use trainer::launch::{Launch, Launcher};
//!
//! let env = [("SLURM_PROCID", "3"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"),
//!            ("SLURM_NODELIST", "gpu[07-08]")];
//! let launch = Launch::from_vars(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
//!     .unwrap()
//!     .unwrap();
//! assert_eq!((launch.rank, launch.world_size, launch.local_rank), (3, 8, 1));
//! assert_eq!(launch.master_addr, "gpu07");
//! assert_eq!(launch.launcher, Launcher::Slurm);
//! ```

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The default port of the rendezvous store (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

/// A launch environment that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// A variable is missing or malformed.
    #[error("environment variable {name}={value:?}: {message}")]
    Variable {
        /// The variable.
        name: &'static str,
        /// Its value ("" when unset).
        value: String,
        /// What is wrong.
        message: String,
    },
}

/// Who started the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun (or anything setting `RANK` and `WORLD_SIZE`, like `train --nproc`).
    Torchrun,
    /// Slurm's `srun`.
    Slurm,
}

/// This process's place in the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// Who launched it.
    pub launcher: Launcher,
    /// Global rank, in `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this machine (the GPU index on CUDA).
    pub local_rank: usize,
    /// Processes that share this machine's cores: torchrun's `LOCAL_WORLD_SIZE` (set by
    /// `--nproc` too; 1 when unset). 1 under Slurm, which confines each task to its
    /// `--cpus-per-task` CPUs, so the cores a task sees are already its own.
    pub local_world_size: usize,
    /// The store's host.
    pub master_addr: String,
    /// The store's port.
    pub master_port: u16,
    /// Whether a launcher's agent hosts the store (then rank 0 connects as a client too).
    pub agent_store: bool,
    /// torchrun's restart round (`TORCHELASTIC_RESTART_COUNT`): keys of each round are kept
    /// apart in the agent's store.
    pub restart_count: u64,
}

impl Launch {
    /// Reads the process's environment. `Ok(None)`: no launcher's variables (a single process).
    pub fn from_env() -> Result<Option<Launch>, LaunchError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), with the variables from `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, LaunchError> {
        let number = |name: &'static str, default: Option<u64>| -> Result<u64, LaunchError> {
            match var(name) {
                Some(text) => text.trim().parse().map_err(|_| LaunchError::Variable {
                    name,
                    value: text.clone(),
                    message: "expected a non-negative integer".into(),
                }),
                None => default.ok_or_else(|| LaunchError::Variable {
                    name,
                    value: String::new(),
                    message: "not set".into(),
                }),
            }
        };
        let port = || -> Result<u16, LaunchError> {
            let port = number("MASTER_PORT", Some(u64::from(DEFAULT_PORT)))?;
            u16::try_from(port)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| LaunchError::Variable {
                    name: "MASTER_PORT",
                    value: port.to_string(),
                    message: "expected a port in 1..=65535".into(),
                })
        };
        let (
            launcher,
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            agent_store,
            restart_count,
        ) = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            let agent_store = var("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
            (
                Launcher::Torchrun,
                number("RANK", None)?,
                number("WORLD_SIZE", None)?,
                number("LOCAL_RANK", Some(0))?,
                number("LOCAL_WORLD_SIZE", Some(1))?.max(1),
                var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                agent_store,
                number("TORCHELASTIC_RESTART_COUNT", Some(0))?,
            )
        } else if var("SLURM_PROCID").is_some() {
            let master_addr = match var("MASTER_ADDR") {
                Some(addr) => addr,
                None => {
                    let list = var("SLURM_STEP_NODELIST")
                        .or_else(|| var("SLURM_NODELIST"))
                        .or_else(|| var("SLURM_JOB_NODELIST"))
                        .unwrap_or_default();
                    first_node(&list).ok_or_else(|| LaunchError::Variable {
                        name: "SLURM_NODELIST",
                        value: list.clone(),
                        message: "cannot read its first node; set MASTER_ADDR".into(),
                    })?
                }
            };
            (
                Launcher::Slurm,
                number("SLURM_PROCID", None)?,
                number("SLURM_NTASKS", None)?,
                number("SLURM_LOCALID", Some(0))?,
                1,
                master_addr,
                false,
                0,
            )
        } else {
            return Ok(None);
        };
        if world_size == 0 || rank >= world_size {
            let (name, value) = match launcher {
                Launcher::Torchrun => ("RANK", rank),
                Launcher::Slurm => ("SLURM_PROCID", rank),
            };
            return Err(LaunchError::Variable {
                name,
                value: value.to_string(),
                message: format!("the rank must be below the world size {world_size}"),
            });
        }
        Ok(Some(Launch {
            launcher,
            rank: rank as usize,
            world_size: world_size as usize,
            local_rank: local_rank as usize,
            local_world_size: local_world_size as usize,
            master_addr,
            master_port: port()?,
            agent_store,
            restart_count,
        }))
    }

    /// Whether this process hosts the store.
    pub fn hosts_store(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }
}

/// The threads each of `local_processes` processes gets by default out of `cores` (at least
/// one): without this, every rank of `train --nproc N` (or torchrun) on a CPU would start as
/// many libtorch and augmenter threads as the machine has cores, N times over.
pub fn threads_per_process(cores: usize, local_processes: usize) -> usize {
    (cores / local_processes.max(1)).max(1)
}

/// The first host of a Slurm node list: `gpu[07-08,11],cpu3` → `gpu07`.
pub fn first_node(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find(',').unwrap_or(list.len());
    let bracket = list.find('[');
    match bracket {
        Some(open) if open < end => {
            let close = list[open..].find(']')? + open;
            let first = list[open + 1..close].split([',', '-']).next()?;
            (!first.is_empty()).then(|| format!("{}{first}", &list[..open]))
        }
        _ => {
            let host = &list[..end];
            (!host.is_empty()).then(|| host.to_owned())
        }
    }
}

/// A free TCP port on the loopback interface (for `--nproc`'s store).
///
/// The port is checked free by binding it, then released for the store to bind, so something
/// else may take it in between. The kernel's own choice (port 0) comes from the ephemeral range,
/// where every outgoing connection (Gloo opens one per peer) and every Gloo listener also takes
/// its port; so this picks, where it can, a random free port below that range (from 10000 on),
/// which only an explicit bind takes. It falls back to the kernel's choice when the range cannot
/// be read or no such port is free.
pub fn free_port() -> std::io::Result<u16> {
    use std::hash::BuildHasher;
    const FIRST: u32 = 10_000;
    if let Some(low) = ephemeral_low().filter(|&low| low > FIRST + 100) {
        // std's hasher keys are random per process and differ between calls: random ports.
        let random = std::collections::hash_map::RandomState::new();
        for attempt in 0..64u32 {
            let port = (FIRST + (random.hash_one(attempt) % u64::from(low - FIRST)) as u32) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range (Linux), when it can be read.
fn ephemeral_low() -> Option<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// Runs `nproc` copies of `program` with `args`, as ranks 0..nproc of one run on this machine
/// (torchrun's variables, the store on a free loopback port), and waits for all of them. When
/// one fails, the others get SIGTERM (so they write no half state: a rank whose peer is gone
/// fails its next collective anyway), then SIGKILL after `grace`. Returns the first failure's
/// rank and status, or `None` when every rank succeeded.
pub fn spawn_local(
    program: &std::path::Path,
    args: &[String],
    nproc: usize,
    grace: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Option<(usize, ExitStatus)>> {
    let port = free_port()?;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        // Their own process group: a terminal's Ctrl-C reaches this process alone, which
        // forwards one SIGTERM (a second signal would stop a rank without a checkpoint).
        let child = Command::new(program)
            .process_group(0)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .env_remove("SLURM_PROCID")
            .spawn();
        match child {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                terminate(&mut children, grace);
                return Err(e);
            }
        }
    }
    let mut failure = None;
    let mut forwarded = false;
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait()? {
                Some(status) => {
                    *slot = None;
                    if !status.success() && failure.is_none() {
                        failure = Some((rank, status));
                    }
                }
                None => running += 1,
            }
        }
        if running == 0 {
            return Ok(failure);
        }
        if failure.is_some() {
            terminate(&mut children, grace);
            return Ok(failure);
        }
        if !forwarded && stop.load(std::sync::atomic::Ordering::SeqCst) {
            // Every rank stops after the same step with a checkpoint.
            for child in children.iter().flatten() {
                signal(child, 15);
            }
            forwarded = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, signal: i32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    unsafe { kill(child.id() as i32, signal) };
}

/// SIGTERM to every running child, SIGKILL to those still running after `grace`.
fn terminate(children: &mut [Option<Child>], grace: Duration) {
    for child in children.iter().flatten() {
        signal(child, 15);
    }
    let deadline = Instant::now() + grace;
    for slot in children.iter_mut() {
        let Some(child) = slot else { continue };
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        *slot = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>, LaunchError> {
        Launch::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn free_ports_are_bindable_distinct_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        for &port in &ports {
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
            if let Some(low) = ephemeral_low() {
                assert!(
                    (10_000..low).contains(&u32::from(port)),
                    "{port} (range from {low})"
                );
            }
        }
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() >= 18, "{ports:?}");
    }

    #[test]
    fn torchrun_environment() {
        let l = launch(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (1, 4, 1));
        assert_eq!(l.local_world_size, 1, "LOCAL_WORLD_SIZE unset");
        assert_eq!((l.master_addr.as_str(), l.master_port), ("node0", 1234));
        assert!(l.agent_store && !l.hosts_store());
        assert_eq!(l.restart_count, 2);
    }

    #[test]
    fn local_processes_share_the_cores() {
        let l = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
        ]);
        assert_eq!(l.unwrap().unwrap().local_world_size, 4);
        assert_eq!(threads_per_process(16, 4), 4);
        assert_eq!(threads_per_process(16, 3), 5);
        assert_eq!(threads_per_process(2, 4), 1);
        assert_eq!(threads_per_process(8, 0), 8);
    }

    #[test]
    fn slurm_environment_and_precedence() {
        let slurm = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODELIST", "a100-[003-004]"),
        ];
        let l = launch(&slurm).unwrap().unwrap();
        assert_eq!(l.launcher, Launcher::Slurm);
        assert_eq!((l.master_addr.as_str(), l.master_port), ("a100-003", 29500));
        assert!(l.hosts_store());
        let mut both = slurm.to_vec();
        both.extend([("RANK", "5"), ("WORLD_SIZE", "6")]);
        assert_eq!(launch(&both).unwrap().unwrap().launcher, Launcher::Torchrun);
        assert_eq!(launch(&[]).unwrap(), None);
    }

    #[test]
    fn bad_variables_are_named() {
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK=\"2\""), "{e}");
        let e = launch(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
        let e =
            launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT"), "{e}");
        let e = launch(&[("RANK", "0")]).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE"), "{e}");
    }

    #[test]
    fn first_nodes() {
        assert_eq!(first_node("gpu[07-08,11],cpu3").as_deref(), Some("gpu07"));
        assert_eq!(first_node("host1,host2").as_deref(), Some("host1"));
        assert_eq!(first_node("single").as_deref(), Some("single"));
        assert_eq!(first_node("n[5]").as_deref(), Some("n5"));
        assert_eq!(first_node(""), None);
    }
}
