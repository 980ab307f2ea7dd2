//! Real object storage servers on loopback, one per test.
//!
//! Each server gets a free port on 127.0.0.1 and a fresh temporary data folder, and is stopped
//! by the process id it was started with (never by name), when the handle is dropped. Its
//! standard output and error go to `server.log` in a temporary folder of its own; a server that
//! fails to start panics with the end of that log.

pub mod azurite;
pub mod s3;
pub mod web;

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::ClientOptions;
use object_store::client::{HttpClient, HttpConnector, HttpRequest, ReqwestConnector};
use tempfile::TempDir;

/// How long a server may take to accept connections. s3s-fs is ready in about 0.1 s and
/// Azurite in about 1 s; the margin is for a loaded 2-core CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

const INSTALL_HINT: &str = "run scripts/install-test-servers.sh";

/// Finds a server program: `$override_variable`, then `$SEER_CACHE/tools/<relative>`, then
/// `PATH`.
fn find_tool(override_variable: &str, relative_to_tools: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_variable) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{override_variable}={} is not a file",
            path.display()
        );
        return path;
    }
    let in_cache = crate::cache_dir().join("tools").join(relative_to_tools);
    if in_cache.is_file() {
        return in_cache;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "{name} not found (looked at ${override_variable}, {} and PATH); {INSTALL_HINT}",
            in_cache.display()
        )
    })
}

/// A port on 127.0.0.1 that nothing listens on right now.
///
/// Another process could take it before the server binds it; [`ServerProcess::start`] notices
/// (the server exits or never answers) and the callers retry on a new port.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// `bytes` random bytes from the kernel, hex-encoded.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0; bytes];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut buffer))
        .expect("read /dev/urandom");
    hex::encode(buffer)
}

/// A server program started by the harness: the command that starts it, its port, and the
/// running process if there is one.
#[derive(Debug)]
struct ServerProcess {
    name: &'static str,
    program: PathBuf,
    arguments: Vec<String>,
    port: u16,
    log_dir: TempDir,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `program arguments` and waits until it accepts connections on `port`.
    ///
    /// Returns `Err` with the log's end when it exits or never becomes ready, so that the
    /// caller can retry on another port.
    async fn start(
        name: &'static str,
        program: PathBuf,
        arguments: Vec<String>,
        port: u16,
    ) -> Result<Self, String> {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("seer-{name}-log-"))
            .tempdir()
            .expect("create a temporary folder");
        let mut server = Self {
            name,
            program,
            arguments,
            port,
            log_dir,
            child: None,
        };
        server.spawn_and_wait().await?;
        Ok(server)
    }

    fn log_path(&self) -> PathBuf {
        self.log_dir.path().join("server.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the server log");
        let child = Command::new(&self.program)
            .args(&self.arguments)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", self.program.display()));
        self.child = Some(child);

        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "{} exited with {status} before it was ready on port {}\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                ));
            }
            if tokio::net::TcpStream::connect(address).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "{} did not accept connections on port {} within {READY_TIMEOUT:?}\n{}",
                    self.name,
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process (SIGKILL, by its id) and waits for it, so the port is free on return.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error here means the process has already exited, which is what we want.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the process to exit (SIGTERM, by its id), so that it can save its state, and kills
    /// it if it has not exited within `grace`.
    fn terminate(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // std has no way to send SIGTERM; util-linux's kill (essential in Debian) does it.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if sent {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the same command again on the same port. A port just released can stay briefly
    /// in use on some systems, so this retries for a few seconds.
    async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(error) if Instant::now() > deadline => {
                    panic!("cannot restart {}: {error}", self.name)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(30);
        format!(
            "--- end of {} ---\n{}",
            self.log_path().display(),
            lines[start..].join("\n")
        )
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a server on a free port, trying a few ports in case another process takes the one
/// chosen before the server binds it. `arguments` builds the command line for a port.
async fn start_on_free_port(
    name: &'static str,
    program: PathBuf,
    arguments: impl Fn(u16) -> Vec<String>,
) -> ServerProcess {
    let mut errors = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        match ServerProcess::start(name, program.clone(), arguments(port), port).await {
            Ok(server) => return server,
            Err(error) => errors.push(error),
        }
    }
    panic!(
        "cannot start {name} ({}):\n{}",
        program.display(),
        errors.join("\n\n")
    );
}

/// A fresh temporary data folder for a server.
fn data_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("seer-{name}-data-"))
        .tempdir()
        .expect("create a temporary folder")
}

fn path_argument(path: &Path) -> String {
    path.to_str()
        .expect("temporary folders have UTF-8 paths")
        .to_owned()
}

/// Sends a request with object_store's own HTTP client and returns the status and body.
pub(crate) async fn send(request: HttpRequest) -> (u16, String) {
    let client: HttpClient = ReqwestConnector::default()
        .connect(&ClientOptions::new().with_allow_http(true))
        .expect("build an HTTP client");
    let response = client.execute(request).await.expect("send the request");
    let status = response.status().as_u16();
    let body = response.into_body().bytes().await.unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}
