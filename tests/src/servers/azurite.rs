//! [`AzuriteServer`]: Azurite, Microsoft's Azure Blob Storage emulator.
//!
//! # How object_store 0.14 finds the emulator
//!
//! With `AZURE_STORAGE_USE_EMULATOR=true`, `MicrosoftAzureBuilder::build` takes the service
//! URL from the process environment variable `AZURITE_BLOB_STORAGE_URL` (default
//! `http://127.0.0.1:10000`; note it has no `AZURE_` prefix and no builder method sets it), the
//! account from `AZURE_STORAGE_ACCOUNT_NAME` (default `devstoreaccount1`), the key from
//! `AZURE_STORAGE_ACCOUNT_KEY` (default: the emulator's well-known key), allows plain HTTP, and
//! puts the account in the first path segment (`http://127.0.0.1:PORT/devstoreaccount1/...`).
//!
//! Because that URL can only come from the process environment, [`AzuriteServer::store`]
//! cannot use emulator mode for a server on a port of its own without racing other tests. It
//! configures the same requests explicitly instead: endpoint `http://127.0.0.1:PORT/<account>`,
//! the emulator's account and key, plain HTTP. The requests and signatures are identical; the
//! one difference is that `list_with_offset` sends `startFrom`, which Azurite ignores, where
//! emulator mode filters on the client. [`AzuriteServer::env_vars`] gives a program under test
//! the real emulator configuration.

use std::path::Path;
use std::time::Duration;

use object_store::azure::{
    AzureAccessKey, AzureAuthorizer, AzureCredential, MicrosoftAzure, MicrosoftAzureBuilder,
};
use object_store::client::{HttpRequest, HttpRequestBody};
use tempfile::TempDir;

use super::{ServerProcess, data_dir, find_tool, path_argument, send, start_on_free_port};

/// The account every Azurite has.
pub const ACCOUNT: &str = "devstoreaccount1";

/// The well-known key of [`ACCOUNT`], published in Azurite's documentation.
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The container that [`AzuriteServer::start`] creates.
pub const CONTAINER: &str = "seer-test";

/// An Azurite blob server on a free loopback port, with a fresh data folder and one empty
/// container ([`CONTAINER`]). Azurite checks Shared Key signatures.
///
/// The process (node) is killed, by its id, when the handle is dropped; the data folder is
/// removed.
#[derive(Debug)]
pub struct AzuriteServer {
    // Declared before `data` so that the process is killed before its folder is removed.
    process: ServerProcess,
    data: TempDir,
}

impl AzuriteServer {
    /// Starts Azurite and creates [`CONTAINER`] with a signed Create Container request.
    ///
    /// # Panics
    ///
    /// When Azurite is not installed (run `scripts/install-test-servers.sh`), does not start,
    /// or refuses to create the container.
    pub async fn start() -> Self {
        let program = find_tool(
            "SEER_AZURITE_BLOB",
            "azurite/node_modules/.bin/azurite-blob",
            "azurite-blob",
        );
        let data = data_dir("azurite");
        let arguments = |port: u16| {
            vec![
                "--blobHost".into(),
                "127.0.0.1".into(),
                "--blobPort".into(),
                port.to_string(),
                "--location".into(),
                path_argument(data.path()),
                // The account is always the first path segment, never taken from the host name.
                "--disableProductStyleUrl".into(),
                // object_store may send a newer x-ms-version than this Azurite knows.
                "--skipApiVersionCheck".into(),
                // No network here, and nothing to report from tests.
                "--disableTelemetry".into(),
                // No access log: staging a thousand photos would fill the log with it.
                "--silent".into(),
            ]
        };
        let process = start_on_free_port("azurite-blob", program, arguments).await;
        let server = Self { process, data };
        server.create_container(CONTAINER).await;
        server
    }

    /// `http://127.0.0.1:<port>`, the value of `AZURITE_BLOB_STORAGE_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port)
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// The container created at start: [`CONTAINER`].
    pub fn container(&self) -> &str {
        CONTAINER
    }

    /// `az://<container>`, for code that takes a store URL.
    pub fn url(&self) -> String {
        format!("az://{CONTAINER}")
    }

    /// The folder Azurite keeps its database and blobs in.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The process id of the running server, or `None` while it is stopped.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// The variables that `MicrosoftAzureBuilder::from_env()` (and `build`) read to reach this
    /// emulator, for a program under test: `AZURE_STORAGE_USE_EMULATOR=true`,
    /// `AZURITE_BLOB_STORAGE_URL`, `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY` and
    /// `AZURE_CONTAINER_NAME` (a container given by URL, `az://other`, takes precedence).
    ///
    /// Pass them to a child process (`Command::envs`); setting them in the test process itself
    /// would race with other tests running in parallel.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_USE_EMULATOR", "true".to_owned()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint()),
            ("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT.to_owned()),
            ("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY.to_owned()),
            ("AZURE_CONTAINER_NAME", CONTAINER.to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    /// A builder for [`CONTAINER`] on this server, without emulator mode (see the module
    /// documentation for why), for tests that change something before building.
    pub fn builder(&self) -> MicrosoftAzureBuilder {
        MicrosoftAzureBuilder::new()
            .with_endpoint(format!("{}/{ACCOUNT}", self.endpoint()))
            .with_allow_http(true)
            .with_account(ACCOUNT)
            .with_access_key(ACCOUNT_KEY)
            .with_container_name(CONTAINER)
    }

    /// A client for [`CONTAINER`] with object_store's default retry configuration.
    ///
    /// # Panics
    ///
    /// When object_store rejects the configuration, which would be a bug here.
    pub fn store(&self) -> MicrosoftAzure {
        self.builder().build().expect("build the Azure client")
    }

    /// Creates another container with a signed Create Container request.
    ///
    /// # Panics
    ///
    /// When the server does not answer 201 Created.
    pub async fn create_container(&self, container: &str) {
        let key = AzureAccessKey::try_new(ACCOUNT_KEY).expect("the emulator key is valid base64");
        let credential = AzureCredential::AccessKey(key);
        let mut request = HttpRequest::new(HttpRequestBody::empty());
        *request.method_mut() = "PUT".parse().expect("a valid method");
        *request.uri_mut() = format!(
            "{}/{ACCOUNT}/{container}?restype=container",
            self.endpoint()
        )
        .parse()
        .expect("a valid URI");
        request.headers_mut().insert("content-length", 0.into());
        AzureAuthorizer::new(&credential, ACCOUNT)
            .try_authorize(&mut request)
            .expect("sign Create Container");
        let (status, body) = send(request).await;
        assert_eq!(
            status, 201,
            "Create Container {container} answered {status}: {body}"
        );
    }

    /// Stops the server as an orderly shutdown would: SIGTERM (by its process id), so that
    /// Azurite saves its database, then SIGKILL if it has not exited within 5 seconds. Requests
    /// fail with connection errors until [`Self::restart`]. Does nothing if it is already
    /// stopped.
    ///
    /// Azurite keeps its metadata (containers, blob lists) in memory and saves it only every
    /// few seconds and on shutdown, so a SIGKILL loses recent writes, unlike s3s-fs, whose
    /// objects are plain files.
    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(5));
    }

    /// Starts Azurite again on the same port with the same data folder; everything written
    /// before [`Self::stop`] is still there.
    ///
    /// # Panics
    ///
    /// When the server does not come back within a few seconds.
    pub async fn restart(&mut self) {
        self.process.restart().await;
    }
}
