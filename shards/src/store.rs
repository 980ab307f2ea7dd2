//! Opening object stores from URLs, and small helpers on top of them.
//!
//! Every stage names its storage with a URL: `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `az://container/prefix`, `http(s)://host/prefix`,
//! `file:///abs/path`, or a plain local path (the default). Credentials and
//! endpoints are read the way object_store's builders read them from the
//! environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`), and `--store-option key=value`
//! pairs on the command line override them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};
use url::Url;

use crate::StoreError;

/// How to reach a store: retries and extra builder options.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Retries of failed requests, with exponential backoff. Defaults: 10
    /// retries within 3 minutes, backoff from 100 ms to 15 s (object_store's).
    pub retry: RetryConfig,
    /// Per-request timeout (default 30 s) and connect timeout (default 5 s).
    pub timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// `key=value` options passed to the store's builder (after the environment).
    pub options: Vec<(String, String)>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            retry: RetryConfig::default(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            options: Vec::new(),
        }
    }
}

impl StoreOptions {
    /// Options with `max_retries` retries within `retry_timeout`.
    pub fn with_retries(mut self, max_retries: usize, retry_timeout: Duration) -> Self {
        self.retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries,
            retry_timeout,
        };
        self
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions::new()
            .with_timeout(self.timeout)
            .with_connect_timeout(self.connect_timeout)
            .with_allow_http(true)
    }
}

/// A folder in an object store: the store and a prefix inside it.
#[derive(Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix of everything under this location.
    pub prefix: Path,
    /// The URL this location was opened from (for messages).
    pub url: String,
}

/// A JSON document as stored: pretty-printed, with a final newline.
fn json_document<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("documents serialize");
    bytes.push(b'\n');
    bytes
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Location").field("url", &self.url).finish()
    }
}

/// Whether `url_or_path` is a local path rather than a URL (`s3://...`, `file:///...`,
/// `file:/...`), as [`normalize_url`] reads it.
pub fn is_local_path(url_or_path: &str) -> bool {
    !(url_or_path.contains("://") || url_or_path.starts_with("file:"))
}

/// Turns a plain path into an absolute `file://` URL; other URLs pass through.
pub fn normalize_url(url_or_path: &str) -> Result<Url, StoreError> {
    // An empty argument (an unset shell variable, say) would otherwise name the current
    // folder, and a job would write into it or read all of it.
    if url_or_path.trim().is_empty() {
        return Err(StoreError::BadUrl {
            url: url_or_path.to_string(),
            reason: "empty URL or path (for the current folder, write .)".into(),
        });
    }
    if !is_local_path(url_or_path) {
        return Url::parse(url_or_path).map_err(|e| StoreError::BadUrl {
            url: url_or_path.to_string(),
            reason: e.to_string(),
        });
    }
    let path = PathBuf::from(url_or_path);
    let absolute = if path.is_absolute() {
        path
    } else {
        std::env::current_dir()
            .map_err(|e| StoreError::BadUrl {
                url: url_or_path.to_string(),
                reason: e.to_string(),
            })?
            .join(path)
    };
    Url::from_directory_path(&absolute).map_err(|()| StoreError::BadUrl {
        url: url_or_path.to_string(),
        reason: "not an absolute path".into(),
    })
}

impl Location {
    /// Opens the location named by a URL or local path. A local folder is
    /// created when `create` is set, else it must exist.
    pub fn open(
        url_or_path: &str,
        options: &StoreOptions,
        create: bool,
    ) -> Result<Self, StoreError> {
        let url = normalize_url(url_or_path)?;
        let bad = |reason: String| StoreError::BadUrl {
            url: url_or_path.to_string(),
            reason,
        };
        let bucket_url = || format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        let prefix_of = |url: &Url| Path::from_url_path(url.path()).map_err(|e| bad(e.to_string()));
        // The three cloud builders share no trait, so one macro configures each the same way:
        // environment first, then the bucket URL, retries, client options and `options`.
        macro_rules! cloud_store {
            ($builder:ty) => {{
                let mut builder = <$builder>::from_env()
                    .with_url(bucket_url())
                    .with_retry(options.retry.clone())
                    .with_client_options(options.client_options());
                for (key, value) in &options.options {
                    let key = key
                        .parse()
                        .map_err(|e: object_store::Error| bad(e.to_string()))?;
                    builder = builder.with_config(key, value);
                }
                Arc::new(builder.build().map_err(|e| bad(e.to_string()))?)
            }};
        }
        let (store, prefix): (Arc<dyn ObjectStore>, Path) = match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|()| bad("not a local path".into()))?;
                if create {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                } else if !dir.is_dir() {
                    // Without the trailing slash a folder URL has (with it, a file reads as
                    // "not a directory").
                    let named: std::path::PathBuf = dir.components().collect();
                    let why = match std::fs::metadata(&named) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
                        Err(_) => "cannot be read",
                        Ok(_) => "is a file, not a folder",
                    };
                    return Err(bad(format!("{} {why}", named.display())));
                }
                let store = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(store), Path::default())
            }
            "s3" | "s3a" => (cloud_store!(AmazonS3Builder), prefix_of(&url)?),
            "gs" => (cloud_store!(GoogleCloudStorageBuilder), prefix_of(&url)?),
            "az" | "azure" | "abfs" | "abfss" | "adl" => {
                (cloud_store!(MicrosoftAzureBuilder), prefix_of(&url)?)
            }
            "http" | "https" => {
                let base = &url[..url::Position::BeforePath];
                let store = HttpBuilder::new()
                    .with_url(base)
                    .with_retry(options.retry.clone())
                    .with_client_options(options.client_options());
                (
                    Arc::new(store.build().map_err(|e| bad(e.to_string()))?),
                    prefix_of(&url)?,
                )
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other:?} (use s3://, gs://, az://, http(s)://, file:// or a path)"
                )));
            }
        };
        Ok(Self {
            store,
            prefix,
            url: url.to_string(),
        })
    }

    /// The path of `name` (which may contain `/`) under this location.
    pub fn child(&self, name: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// A URL naming `path` of this location's store, for messages and metadata.
    pub fn url_of(&self, path: &Path) -> String {
        let base = self.url.trim_end_matches('/');
        let rel = path
            .as_ref()
            .strip_prefix(self.prefix.as_ref())
            .unwrap_or(path.as_ref())
            .trim_start_matches('/');
        format!("{base}/{rel}")
    }

    /// Reads a whole object.
    pub async fn get_bytes(&self, name: &str) -> Result<Bytes, StoreError> {
        let path = self.child(name);
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|source| StoreError::Store {
                url: self.url_of(&path),
                source,
            })?;
        result.bytes().await.map_err(|source| StoreError::Store {
            url: self.url_of(&path),
            source,
        })
    }

    /// Reads an object if it exists.
    pub async fn get_bytes_opt(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get_bytes(name).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StoreError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads and parses a JSON document.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<T, StoreError> {
        let bytes = self.get_bytes(name).await?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::BadDocument {
            url: self.url_of(&self.child(name)),
            reason: e.to_string(),
        })
    }

    /// Reads and parses a JSON document if it exists.
    pub async fn get_json_opt<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.get_bytes_opt(name).await? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::BadDocument {
                        url: self.url_of(&self.child(name)),
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Reads a JSON document and checks it with `check` (a version this build reads, and what
    /// else serde cannot check), whose reason names no file: the error names the document's
    /// URL.
    pub async fn get_checked_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        check: fn(&T) -> Result<(), String>,
    ) -> Result<T, StoreError> {
        let document: T = self.get_json(name).await?;
        self.checked(name, document, check)
    }

    /// [`Location::get_checked_json`] for a document that may not exist.
    pub async fn get_checked_json_opt<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        check: fn(&T) -> Result<(), String>,
    ) -> Result<Option<T>, StoreError> {
        self.get_json_opt(name)
            .await?
            .map(|document| self.checked(name, document, check))
            .transpose()
    }

    fn checked<T>(
        &self,
        name: &str,
        document: T,
        check: fn(&T) -> Result<(), String>,
    ) -> Result<T, StoreError> {
        check(&document).map_err(|reason| StoreError::BadDocument {
            url: self.url_of(&self.child(name)),
            reason,
        })?;
        Ok(document)
    }

    /// Writes a whole object. Every store's `put` is atomic: readers see the
    /// old object or the new one, never a part.
    pub async fn put_bytes(&self, name: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let path = self.child(name);
        self.store
            .put(&path, PutPayload::from(bytes.into()))
            .await
            .map_err(|source| StoreError::Store {
                url: self.url_of(&path),
                source,
            })?;
        Ok(())
    }

    /// Writes a JSON document (pretty-printed, for people reading it).
    pub async fn put_json<T: serde::Serialize>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.put_bytes(name, json_document(value)).await
    }

    /// Writes a JSON document only if nothing is stored under `name` yet, atomically where
    /// the store can (a create-only put: local folders, S3, GCS, Azure): returns whether it
    /// was written. A store that has no create-only put gets a read, then a put, which two
    /// writers at the same moment can both pass.
    pub async fn create_json<T: serde::Serialize>(
        &self,
        name: &str,
        value: &T,
    ) -> Result<bool, StoreError> {
        let path = self.child(name);
        let bytes = Bytes::from(json_document(value));
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes.clone()), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.get_bytes_opt(name).await?.is_some() {
                    return Ok(false);
                }
                self.put_bytes(name, bytes).await?;
                Ok(true)
            }
            Err(source) => Err(StoreError::Store {
                url: self.url_of(&path),
                source,
            }),
        }
    }

    /// Uploads a local file: one `put` when small, else a multipart upload in
    /// 16 MiB parts (at most 4 in flight), which the store completes atomically.
    pub async fn put_file(&self, name: &str, file: &std::path::Path) -> Result<(), StoreError> {
        use tokio::io::AsyncReadExt;
        const PART: usize = 16 << 20;
        let path = self.child(name);
        let io_err = |e: std::io::Error| StoreError::Local {
            path: file.to_path_buf(),
            source: e,
        };
        let store_err = |source| StoreError::Store {
            url: self.url_of(&path),
            source,
        };
        let size = tokio::fs::metadata(file).await.map_err(io_err)?.len();
        if size <= PART as u64 {
            let bytes = tokio::fs::read(file).await.map_err(io_err)?;
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(store_err)?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&path).await.map_err(store_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut input = tokio::fs::File::open(file).await.map_err(io_err)?;
        let mut buf = vec![0u8; PART];
        loop {
            let n = input.read(&mut buf).await.map_err(io_err)?;
            if n == 0 {
                break;
            }
            if let Err(source) = writer.wait_for_capacity(4).await {
                let _ = writer.abort().await;
                return Err(store_err(source));
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(store_err)?;
        Ok(())
    }

    /// Writes a small object and deletes it again, to find out before long work that results
    /// can be stored here (a read-only bucket, credentials that may only read, a full or
    /// read-only disk). The object's name starts with `.write-check-` and is unique to this
    /// process and moment.
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        let name = format!(".write-check-{}-{nanos}", std::process::id());
        self.put_bytes(&name, Bytes::from_static(b"seer-rs write check\n"))
            .await?;
        self.delete(&name).await
    }

    /// Deletes an object; a missing one is fine.
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let path = self.child(name);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(StoreError::Store {
                url: self.url_of(&path),
                source,
            }),
        }
    }
}

/// Splits a full object URL into a location for its bucket (or host, or the
/// local root) and the object's path, for inputs given as lists of URLs.
pub fn split_object_url(object_url: &str) -> Result<(String, String), StoreError> {
    let url = normalize_url(object_url)?;
    let bad = |reason: &str| StoreError::BadUrl {
        url: object_url.to_string(),
        reason: reason.to_string(),
    };
    if url.scheme() == "file" {
        let path = url.to_file_path().map_err(|()| bad("not a local path"))?;
        let parent = path.parent().ok_or_else(|| bad("no parent folder"))?;
        let name = path
            .file_name()
            .ok_or_else(|| bad("no file name"))?
            .to_string_lossy()
            .to_string();
        return Ok((parent.to_string_lossy().to_string(), name));
    }
    let host = url.host_str().ok_or_else(|| bad("no host or bucket"))?;
    let mut base = format!("{}://{host}", url.scheme());
    if let Some(port) = url.port() {
        base.push_str(&format!(":{port}"));
    }
    let mut object = url.path().trim_start_matches('/').to_string();
    if let Some(query) = url.query() {
        object.push('?');
        object.push_str(query);
    }
    Ok((base, object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(options: &[(&str, &str)]) -> StoreOptions {
        StoreOptions {
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..StoreOptions::default()
        }
    }

    /// A local location that is not a folder is refused with what it is instead.
    #[test]
    fn a_local_location_that_is_no_folder_says_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let file = dir.path().join("file.csv");
        std::fs::write(&file, b"url\n").unwrap();
        for (path, says) in [
            (&missing, "does not exist"),
            (&file, "is a file, not a folder"),
        ] {
            let error = Location::open(path.to_str().unwrap(), &StoreOptions::default(), false)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("{} {says}", path.display())),
                "{error}"
            );
        }
    }

    #[test]
    fn a_write_check_leaves_nothing_and_names_a_location_that_cannot_be_written() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("out");
        let location =
            Location::open(folder.to_str().unwrap(), &StoreOptions::default(), true).unwrap();
        runtime.block_on(location.check_writable()).unwrap();
        assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);

        // The folder replaced by a file: nothing can be written under it any more.
        std::fs::remove_dir(&folder).unwrap();
        std::fs::write(&folder, b"not a folder").unwrap();
        let message = runtime
            .block_on(location.check_writable())
            .unwrap_err()
            .to_string();
        assert!(message.contains(folder.to_str().unwrap()), "{message}");
        assert!(message.contains(".write-check-"), "{message}");
    }

    #[test]
    fn cloud_urls_open_with_builder_options() {
        let s3 = with(&[
            ("aws_access_key_id", "k"),
            ("aws_secret_access_key", "s"),
            ("aws_region", "us-east-1"),
            ("aws_endpoint", "http://127.0.0.1:1"),
        ]);
        let location = Location::open("s3://bucket/some/prefix", &s3, false).unwrap();
        assert_eq!(location.prefix.as_ref(), "some/prefix");
        assert_eq!(location.child("a/b.tar").as_ref(), "some/prefix/a/b.tar");
        let azure = with(&[("azure_storage_use_emulator", "true")]);
        assert_eq!(
            Location::open("az://container/x", &azure, false)
                .unwrap()
                .prefix
                .as_ref(),
            "x"
        );
    }

    #[test]
    fn an_empty_url_is_refused_not_taken_for_the_current_folder() {
        for empty in ["", "  "] {
            let err = Location::open(empty, &StoreOptions::default(), true).unwrap_err();
            assert!(err.to_string().contains("empty URL or path"), "{err}");
        }
        assert!(normalize_url(".").is_ok());
    }

    #[test]
    fn unknown_options_and_schemes_are_named() {
        let err =
            Location::open("gs://bucket/x", &with(&[("no_such_key", "1")]), false).unwrap_err();
        assert!(err.to_string().contains("gs://bucket/x"), "{err}");
        let err = Location::open("ftp://host/x", &StoreOptions::default(), false).unwrap_err();
        assert!(
            err.to_string().contains("unsupported scheme \"ftp\""),
            "{err}"
        );
    }
}
