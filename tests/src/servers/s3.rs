//! [`S3Server`]: s3s-fs, a real S3 server with SigV4 authentication over a local folder.

use std::path::Path;

use object_store::aws::{AmazonS3, AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::client::{HttpRequest, HttpRequestBody};
use tempfile::TempDir;

use super::{
    ServerProcess, data_dir, find_tool, path_argument, random_hex, send, start_on_free_port,
};

/// The region the server and every client agree on. s3s-fs accepts any; object_store signs
/// with whichever it is given.
pub const REGION: &str = "us-east-1";

/// The bucket that [`S3Server::start`] creates.
pub const BUCKET: &str = "seer-test";

/// An s3s-fs server on a free loopback port, with a fresh data folder, random credentials and
/// one empty bucket ([`BUCKET`]).
///
/// s3s-fs checks SigV4 signatures, so a wrong key or an unsigned request is refused as S3
/// would refuse it. Buckets are folders of [`Self::data_dir`] and objects are files in them.
///
/// The process is killed, by its id, when the handle is dropped; the data folder is removed.
/// [`Self::stop`] and [`Self::restart`] simulate an outage: the server comes back on the same
/// port with the same data.
///
/// ```no_run
/// # #[tokio::main] async fn main() {
/// use object_store::{ObjectStoreExt, PutPayload};
/// let server = seer_tests::S3Server::start().await;
/// let store = server.store();
/// store.put(&"a/b.txt".into(), PutPayload::from_static(b"hello")).await.unwrap();
/// # }
/// ```
#[derive(Debug)]
pub struct S3Server {
    // Declared before `data` so that the process is killed before its folder is removed.
    process: ServerProcess,
    data: TempDir,
    access_key: String,
    secret_key: String,
}

impl S3Server {
    /// Starts a server and creates [`BUCKET`] with a signed CreateBucket request.
    ///
    /// # Panics
    ///
    /// When s3s-fs is not installed (run `scripts/install-test-servers.sh`), does not start, or
    /// refuses to create the bucket.
    pub async fn start() -> Self {
        let program = find_tool("SEER_S3S_FS", "bin/s3s-fs", "s3s-fs");
        let data = data_dir("s3");
        let access_key = format!("seer{}", random_hex(8));
        let secret_key = random_hex(20);
        let arguments = |port: u16| {
            vec![
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--access-key".into(),
                access_key.clone(),
                "--secret-key".into(),
                secret_key.clone(),
                path_argument(data.path()),
            ]
        };
        let process = start_on_free_port("s3s-fs", program, arguments).await;
        let server = Self {
            process,
            data,
            access_key,
            secret_key,
        };
        server.create_bucket(BUCKET).await;
        server
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port)
    }

    /// The loopback port the server listens on; it stays the same across [`Self::restart`].
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// The bucket created at start: [`BUCKET`].
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    /// `s3://<bucket>`, for code that takes a store URL.
    pub fn url(&self) -> String {
        format!("s3://{BUCKET}")
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The folder the server keeps its buckets in (one subfolder per bucket).
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

    /// The variables that `AmazonS3Builder::from_env()` reads, for a program under test:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true`,
    /// `AWS_REGION=us-east-1`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=false` and `AWS_BUCKET`
    /// (a bucket given by URL, `s3://other`, takes precedence over `AWS_BUCKET`).
    ///
    /// Pass them to a child process (`Command::envs`); setting them in the test process itself
    /// would race with other tests running in parallel.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".into()),
            ("AWS_BUCKET", BUCKET.into()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    /// A builder configured exactly as [`Self::env_vars`] would configure it, for tests that
    /// change something (a retry configuration, another bucket) before building.
    pub fn builder(&self) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region(REGION)
            .with_virtual_hosted_style_request(false)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_bucket_name(BUCKET)
    }

    /// A client for [`BUCKET`] with object_store's default retry configuration.
    ///
    /// # Panics
    ///
    /// When object_store rejects the configuration, which would be a bug here.
    pub fn store(&self) -> AmazonS3 {
        self.builder().build().expect("build the S3 client")
    }

    /// Creates another bucket with a signed CreateBucket request.
    ///
    /// # Panics
    ///
    /// When the server does not answer 200 OK.
    pub async fn create_bucket(&self, bucket: &str) {
        let credential = AwsCredential {
            key_id: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            token: None,
        };
        let mut request = HttpRequest::new(HttpRequestBody::empty());
        *request.method_mut() = "PUT".parse().expect("a valid method");
        *request.uri_mut() = format!("{}/{bucket}", self.endpoint())
            .parse()
            .expect("a valid URI");
        AwsAuthorizer::new(&credential, "s3", REGION)
            .try_authorize(&mut request, None)
            .expect("sign CreateBucket");
        let (status, body) = send(request).await;
        assert_eq!(
            status, 200,
            "CreateBucket {bucket} answered {status}: {body}"
        );
    }

    /// Kills the server (SIGKILL, by its process id), as in a crash or a network outage.
    /// Requests fail with connection errors until [`Self::restart`]. Does nothing if the server
    /// is already stopped.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port with the same data folder and credentials;
    /// everything written before [`Self::stop`] is still there.
    ///
    /// # Panics
    ///
    /// When the server does not come back within a few seconds.
    pub async fn restart(&mut self) {
        self.process.restart().await;
    }
}
