//! The seer-rs shard format, shared by every stage.
//!
//! A dataset is a folder in an object store (or a local folder) holding:
//!
//! - **shards**: plain POSIX (ustar) tar files named `PREFIX-000000.tar`,
//!   `PREFIX-000001.tar`, ... in the WebDataset convention: a sample is the
//!   adjacent members `KEY.jpg` (or `.png`, `.webp`) and `KEY.json`
//!   ([`SampleMeta`]); keys are unique in the dataset and contain no dots.
//!   GNU `tar`, Python's `tarfile` and the `webdataset` package read them.
//! - beside each shard an **index** (`PREFIX-000000.index.json`, [`ShardIndex`]:
//!   member offsets and sizes, so one sample costs one ranged read) and a
//!   **stats** file (`PREFIX-000000_stats.json`, [`ShardStats`]).
//! - at the root a **manifest** (`manifest.json`, [`Manifest`]) listing every
//!   completed shard with its sample count, size and SHA-256. Readers work
//!   from it; no bucket listing is needed.
//!
//! ```
//! use shards::{ShardWriter, SampleReader};
//! let mut writer = ShardWriter::new(Vec::new(), "demo-000000.tar");
//! writer.add("a1b2", &[("jpg", b"...jpeg bytes...".as_slice()), ("json", b"{}".as_slice())]).unwrap();
//! let finished = writer.finish().unwrap();
//! let samples: Vec<_> = SampleReader::new(&finished.out[..], "demo-000000.tar").collect::<Result<_, _>>().unwrap();
//! assert_eq!(samples[0].key, "a1b2");
//! assert_eq!(finished.index.samples[0].members["json"].size, 2);
//! ```

pub mod dataset;
pub mod decode;
pub mod inspect;
pub mod meta;
pub mod reader;
pub mod store;
pub mod tar;
pub mod writer;

pub use dataset::Dataset;
pub use meta::{
    Failure, IndexEntry, Manifest, ManifestShard, MemberSpan, SampleMeta, ShardIndex, ShardNames,
    ShardStats, StageSeconds,
};
pub use reader::{Sample, SampleReader, ShardStream};
pub use store::{Location, StoreOptions};
pub use writer::{FinishedShard, ShardWriter};

/// Where output written to a path goes, once a link there is followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// A regular file, or nothing yet: written under a temporary name and renamed into place.
    File(std::path::PathBuf),
    /// A device, FIFO or socket (`/dev/stdout`, `/dev/null`, a named pipe): written to as it
    /// is, never renamed over.
    Special(std::path::PathBuf),
}

/// What output to `path` writes to: a link is followed to the file it names (the link stays);
/// a folder, or a link to nothing, is refused.
pub fn output_target(path: &std::path::Path) -> std::io::Result<OutputTarget> {
    use std::io::{Error, ErrorKind};
    let path = match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_symlink() => {
            std::fs::canonicalize(path).map_err(|error| {
                if error.kind() == ErrorKind::NotFound {
                    Error::new(ErrorKind::NotFound, "a link to a file that does not exist")
                } else {
                    error
                }
            })?
        }
        _ => path.to_path_buf(),
    };
    match std::fs::metadata(&path) {
        Ok(metadata) if metadata.is_dir() => {
            Err(Error::new(ErrorKind::IsADirectory, "is a folder"))
        }
        Ok(metadata) if !metadata.is_file() => Ok(OutputTarget::Special(path)),
        _ => Ok(OutputTarget::File(path)),
    }
}

/// The folder a file `path` is in (`.` for a bare name).
pub fn folder_of(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => std::path::Path::new("."),
    }
}

/// Writes `bytes` to the file `path` as a whole or not at all: into a temporary file beside
/// it, then renamed over it. A write that fails (a full disk, say) leaves an earlier file of
/// that name as it was, and no partial file.
///
/// Only a regular file is ever replaced ([`output_target`]): a link is written through, a
/// device, FIFO or socket is written to as it is, a folder or a link to nothing is refused.
pub fn write_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let path = match output_target(path)? {
        OutputTarget::Special(path) => {
            return std::fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .write_all(bytes);
        }
        OutputTarget::File(path) => path,
    };
    let folder = folder_of(&path);
    let mut builder = tempfile::Builder::new();
    // As a plain create would make it (0666 less the umask), not a temporary file's 0600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut file = builder.tempfile_in(folder)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(&path).map_err(|e| e.error)?;
    Ok(())
}

/// Runs `work`, turning a panic inside it into `Err` with the panic's text: the last line of
/// defence around third-party decoders, which are meant not to panic, so that one hostile file
/// cannot take a worker thread down. The panic hook stays silent for panics caught here (it
/// would print them to stderr with no file name, in the middle of a JSON log); the caller
/// reports them with the file.
pub fn catch_panic<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    quiet_caught_panics();
    CATCHING.with(|depth| depth.set(depth.get() + 1));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
    CATCHING.with(|depth| depth.set(depth.get() - 1));
    outcome.map_err(|payload| panic_message(payload.as_ref()))
}

thread_local! {
    /// How many [`catch_panic`] calls this thread is inside.
    static CATCHING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Installs, once per process, a panic hook that is silent for panics inside [`catch_panic`]
/// and defers to the hook it replaces for every other panic.
fn quiet_caught_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(|depth| depth.get()) == 0 {
                previous(info);
            }
        }));
    });
}

/// The text a panic was raised with (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_string())
}

/// An error and its causes on one line, as anyhow's `{:#}` prints them, for the command-line
/// tools; a cause whose text the line already holds is left out. The library's errors embed
/// their source in their own message (`"shard X: {source}"`), and `{:#}` printed it again.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Writes `bytes` to standard output for the command-line tools; a closed pipe
/// (`shards stat DATASET | head`, `augment bench ... | head`) ends the output quietly.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("cannot write to stdout"),
    }
}

/// Errors reading or writing shards.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The tar structure is broken (names the shard and byte offset).
    #[error("shard {shard}: {source}")]
    Tar {
        /// The shard.
        shard: String,
        /// What is wrong, with the byte offset.
        source: tar::TarError,
    },
    /// The tar is well-formed but breaks a rule of the format.
    #[error("shard {shard}: {reason}")]
    Invalid {
        /// The shard.
        shard: String,
        /// The rule broken.
        reason: String,
    },
    /// A sample key breaks the key rules.
    #[error("invalid sample key {key:?}: {reason}")]
    BadKey {
        /// The key.
        key: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// Reading or writing bytes failed.
    #[error("shard {shard}: {source}")]
    Io {
        /// The shard.
        shard: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The object store failed.
    #[error("shard {shard}: {source}")]
    Store {
        /// The shard.
        shard: String,
        /// The store's error.
        source: object_store::Error,
    },
}

/// Errors opening stores and reading the dataset's documents.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL cannot be opened.
    #[error("cannot open {url}: {reason}")]
    BadUrl {
        /// The URL or path given.
        url: String,
        /// Why.
        reason: String,
    },
    /// A request to the store failed (after retries).
    #[error("{url}: {source}")]
    Store {
        /// The object's URL.
        url: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// A JSON document does not parse.
    #[error("{url}: malformed document: {reason}")]
    BadDocument {
        /// The document's URL.
        url: String,
        /// The parse error.
        reason: String,
    },
    /// A local file could not be read.
    #[error("{}: {source}", path.display())]
    Local {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A shard is broken.
    #[error(transparent)]
    Shard(#[from] ShardError),
}

/// `text` (a key, a label, a member extension: anything a dataset supplies) made safe to print
/// in a message or report line: as it is when it is printable ASCII without spaces or quotes, as
/// every valid key is; otherwise in quotes with escapes (`"a b"`, `"x\nverified: OK"`,
/// `"\u{1b}[2J"`). Printed raw, a newline or a terminal escape in data could fake or hide a line
/// of the report.
///
/// ```
/// assert_eq!(shards::printable("a1b2_c-d"), "a1b2_c-d");
/// assert_eq!(shards::printable("x\nverified: OK"), r#""x\nverified: OK""#);
/// assert_eq!(shards::printable(""), r#""""#);
/// ```
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
        std::borrow::Cow::Borrowed(text)
    } else {
        std::borrow::Cow::Owned(format!("\"{}\"", text.escape_debug()))
    }
}

/// Longest key accepted: member names must fit a ustar name field.
pub const MAX_KEY_LEN: usize = 80;

/// Checks a sample key: 1 to [`MAX_KEY_LEN`] ASCII letters, digits, `_` or `-`.
/// No dots (WebDataset splits member names at the first dot) and no slashes.
pub fn validate_key(key: &str) -> Result<(), ShardError> {
    let bad = |reason| {
        Err(ShardError::BadKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("longer than 80 characters");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return bad("only ASCII letters, digits, '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks a member extension: lower-case ASCII letters, digits and dots.
pub fn validate_extension(ext: &str) -> Result<(), ShardError> {
    if ext.is_empty()
        || ext.len() > 16
        || !ext
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.')
    {
        return Err(ShardError::BadKey {
            key: ext.to_string(),
            reason: "extensions are 1 to 16 lower-case letters, digits or dots",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only regular files are replaced: a link is written through, a device is written to and
    /// stays one, a folder and a dangling link are refused.
    #[cfg(unix)]
    #[test]
    fn write_file_replaces_only_regular_files() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.png");
        std::fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_file(&link, b"new").unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"new");

        // A named pipe (as /dev/stdout or /dev/null would be, which a test must not risk).
        let fifo = dir.path().join("pipe.png");
        seer_tests::make_fifo(&fifo);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_file(&fifo, b"bytes").unwrap();
        // Checked before joining: a pipe renamed over would leave the reader waiting.
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        assert_eq!(reader.join().unwrap(), b"bytes");

        let error = write_file(dir.path(), b"x").unwrap_err();
        assert_eq!(error.to_string(), "is a folder");
        let dangling = dir.path().join("dangling.png");
        std::os::unix::fs::symlink(dir.path().join("missing"), &dangling).unwrap();
        let error = write_file(&dangling, b"x").unwrap_err();
        assert_eq!(error.to_string(), "a link to a file that does not exist");

        let plain = dir.path().join("plain.png");
        write_file(&plain, b"first").unwrap();
        write_file(&plain, b"second").unwrap();
        assert_eq!(std::fs::read(&plain).unwrap(), b"second");
    }

    #[test]
    fn error_chain_prints_each_cause_once() {
        let tar = tar::TarError::BadHeader {
            offset: 1024,
            reason: "checksum field is not ASCII".into(),
        };
        let error = anyhow::Error::new(ShardError::Tar {
            shard: "data-000001.tar".into(),
            source: tar,
        })
        .context("reading sample k5");
        assert_eq!(
            error_chain(&error),
            "reading sample k5: shard data-000001.tar: bad tar header at byte 1024: checksum field is not ASCII"
        );
        // Causes the message does not hold are kept, as `{:#}` keeps them.
        let error = anyhow::anyhow!("disk full").context("writing shard 3");
        assert_eq!(error_chain(&error), "writing shard 3: disk full");
    }

    #[test]
    fn files_are_replaced_whole_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sheet.png");
        write_file(&path, b"old").unwrap();
        write_file(&path, b"new bytes").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new bytes");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
            let plain = dir.path().join("plain");
            std::fs::write(&plain, b"x").unwrap();
            assert_eq!(mode(&path), mode(&plain), "the mode a plain write gives");
            std::fs::remove_file(&plain).unwrap();
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
        // A write that cannot happen leaves the earlier file as it was.
        assert!(write_file(dir.path(), b"a folder is not a file").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"new bytes");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
