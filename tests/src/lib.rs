//! The harness for seer-rs's end-to-end tests: real test material and real object storage
//! servers.
//!
//! Nothing here is mocked. Photos and hostile inputs come from the cache folder that
//! `scripts/fetch-testdata.sh` fills (see [`testdata`]); S3 and Azure Blob servers are real
//! programs that `scripts/install-test-servers.sh` installs and that each test starts on its own
//! loopback port with its own data folder (see [`S3Server`] and [`AzuriteServer`]); a plain
//! web server with misbehaving paths is Python's standard one (see [`WebServer`]).
//!
//! Missing material is a failure, not a skip: every accessor panics with the command that
//! provides it, so a test run can never pass by testing nothing.
//!
//! # Example
//!
//! Stage the small photo set in a fresh S3 bucket and read it back:
//!
//! ```no_run
//! use futures::TryStreamExt;
//! use object_store::ObjectStore;
//! use seer_tests::{S3Server, photos_small_dir, upload_dir};
//!
//! # #[tokio::main] async fn main() {
//! let server = S3Server::start().await;
//! let store = server.store();
//! let staged = upload_dir(&store, &photos_small_dir(), "raw").await.unwrap();
//! let listed: Vec<_> = store.list(Some(&"raw".into())).try_collect().await.unwrap();
//! assert_eq!(listed.len(), staged.files);
//!
//! // A program under test reads the same bucket through object_store's from_env builders.
//! let output = std::process::Command::new("ingest").envs(server.env_vars()).output();
//! # }
//! ```

pub mod servers;
pub mod testdata;
pub mod upload;

pub use servers::azurite::AzuriteServer;
pub use servers::s3::S3Server;
pub use servers::web::WebServer;
pub use testdata::{
    PhotoEntry, cache_dir, fashion_mnist_dir, hostile_dir, photos_dir, photos_index,
    photos_small_dir, photos_small_index,
};
pub use upload::{UploadSummary, files_under, upload_dir};

/// Makes a named pipe (FIFO) at `path`, for tests of what meets one where a file was expected.
#[cfg(unix)]
pub fn make_fifo(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    // SAFETY: a valid NUL-terminated path and a mode; mkfifo touches nothing else.
    let made = unsafe { libc::mkfifo(name.as_ptr(), 0o644) };
    assert_eq!(
        made,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}
