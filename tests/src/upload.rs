//! Staging local files in an object store.

use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// How many uploads run at once: enough to hide loopback latency, few enough not to overload a
/// server sharing a 2-core machine with the test.
const CONCURRENT_UPLOADS: usize = 8;

/// What [`upload_dir`] staged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSummary {
    /// Files uploaded.
    pub files: usize,
    /// Their total size in bytes.
    pub bytes: u64,
    /// The keys written, in the order of the local paths.
    pub keys: Vec<ObjectPath>,
}

/// Uploads every file under `local` to `store`, at `prefix/<path relative to local>`.
///
/// Each path segment becomes one key segment, encoded by object_store where needed (a space
/// or `#` in a file name is kept, percent-encoded), so `photos/plasma/Kay/1080x1920.png` lands at
/// `<prefix>/plasma/Kay/1080x1920.png`. An empty `prefix` uploads to the root. Symbolic links
/// are followed; hidden files are uploaded like any other.
///
/// # Errors
///
/// The first failed read or put, with the local path in the message.
pub async fn upload_dir(
    store: &dyn ObjectStore,
    local: &Path,
    prefix: &str,
) -> Result<UploadSummary, object_store::Error> {
    let files = files_under(local).map_err(|source| object_store::Error::Generic {
        store: "local",
        source: format!("cannot list {}: {source}", local.display()).into(),
    })?;
    let prefix: Vec<&str> = prefix.split('/').filter(|part| !part.is_empty()).collect();
    let keys: Vec<ObjectPath> = files
        .iter()
        .map(|file| {
            let relative = file.strip_prefix(local).expect("listed under the folder");
            let parts = relative
                .iter()
                .map(|part| part.to_string_lossy().into_owned());
            ObjectPath::from_iter(prefix.iter().map(|p| p.to_string()).chain(parts))
        })
        .collect();

    let sizes: Vec<u64> = futures::stream::iter(files.iter().zip(&keys))
        .map(|(file, key)| async move {
            let data =
                tokio::fs::read(file)
                    .await
                    .map_err(|source| object_store::Error::Generic {
                        store: "local",
                        source: format!("cannot read {}: {source}", file.display()).into(),
                    })?;
            let size = data.len() as u64;
            store.put(key, PutPayload::from(data)).await?;
            Ok::<_, object_store::Error>(size)
        })
        .buffered(CONCURRENT_UPLOADS)
        .try_collect()
        .await?;

    Ok(UploadSummary {
        files: files.len(),
        bytes: sizes.iter().sum(),
        keys,
    })
}

/// Every regular file under `root`, recursively, in sorted order (also the tests' and the
/// ingest examples' walk over test material).
pub fn files_under(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;
    use object_store::memory::InMemory;

    use super::*;

    #[tokio::test]
    async fn uploads_a_tree_under_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("top.txt"), b"1").unwrap();
        std::fs::write(dir.path().join("a/b/deep name.txt"), b"22").unwrap();

        let store = InMemory::new();
        let summary = upload_dir(&store, dir.path(), "/staged/raw/")
            .await
            .unwrap();

        assert_eq!(summary.files, 2);
        assert_eq!(summary.bytes, 3);
        let mut listed: Vec<String> = store
            .list(None)
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap();
        listed.sort();
        assert_eq!(
            listed,
            ["staged/raw/a/b/deep name.txt", "staged/raw/top.txt"]
        );
    }

    #[tokio::test]
    async fn a_missing_folder_is_an_error() {
        let error = upload_dir(&InMemory::new(), Path::new("/nonexistent/seer"), "")
            .await
            .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/seer"), "{error}");
    }
}
