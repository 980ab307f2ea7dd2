//! [`WebServer`]: a read-only web server over a folder, with paths that misbehave on purpose
//! (`tests/python/web_server.py`: Python's standard library, nothing to install).

use std::path::{Path, PathBuf};

use super::{ServerProcess, path_argument, start_on_free_port};

/// Python's standard web server over a folder, on a free loopback port, killed when the handle
/// is dropped.
///
/// Beside the folder's files it answers 403 under `/forbidden/`, serves files under `/slow/`
/// after 15 s, under `/signed/` only with the query `?sig=abc` (as a presigned URL) and under
/// `/nolength/` without a Content-Length; it refuses every write with 403 and lists nothing.
#[derive(Debug)]
pub struct WebServer {
    process: ServerProcess,
    scheme: &'static str,
}

impl WebServer {
    /// Starts a server over `folder` and waits until it accepts connections. Callable from
    /// synchronous tests (it runs its own small runtime while it waits).
    pub fn start(folder: &Path) -> WebServer {
        Self::start_with(folder, false)
    }

    /// [`WebServer::start`] speaking HTTPS, with a self-signed certificate for 127.0.0.1
    /// (`tests/python/tls/`) that clients refuse unless told to accept invalid certificates.
    pub fn start_tls(folder: &Path) -> WebServer {
        Self::start_with(folder, true)
    }

    fn start_with(folder: &Path, tls: bool) -> WebServer {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
        let script = path_argument(&python.join("web_server.py"));
        let folder = path_argument(folder);
        let tls_files = if tls {
            vec![
                path_argument(&python.join("tls/cert.pem")),
                path_argument(&python.join("tls/key.pem")),
            ]
        } else {
            Vec::new()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime to wait for the server");
        let process = runtime.block_on(start_on_free_port(
            "web-server",
            PathBuf::from("python3"),
            |port| {
                let mut args = vec![script.clone(), port.to_string(), folder.clone()];
                args.extend(tls_files.iter().cloned());
                args
            },
        ));
        let scheme = if tls { "https" } else { "http" };
        WebServer { process, scheme }
    }

    /// `http://127.0.0.1:<port>` (`https://` for [`WebServer::start_tls`]).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.process.port)
    }
}
