//! Where the real test material lives, as `scripts/fetch-testdata.sh` lays it out.
//!
//! ```text
//! $SEER_CACHE (default ~/.cache/seer-rs)
//! ├── photos/<source>/...        ~1100 real photos: JPEG (baseline, progressive, grayscale), PNG, WebP
//! ├── photos.tsv                 their index: path, format, width, height, mode, progressive, bytes
//! ├── photos-small/<source>/...  ~60 of them, spanning every format and mode, for fast tests
//! ├── photos-small.tsv
//! ├── hostile/<source>__<path>   ~1300 broken, truncated, bomb and odd files, flat
//! ├── hostile.tsv                name, bytes, origin
//! ├── fashion-mnist/             {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
//! ├── unpacked/<package>/        the packages everything above is hardlinked from
//! └── tools/                     the test servers (scripts/install-test-servers.sh)
//! ```
//!
//! Hostile names keep the original file name, prefixed by the source, with `/` written as
//! `__`: `pillow__hopper_orientation_6.jpg`, `pillow__bmp__b__reallybig.bmp`,
//! `gdk-pixbuf__issue205.jpg`, `gdk-pixbuf__test-images__fail__bug793470-crasher.png`,
//! `go__video-001.q50.410.jpeg`, `go-png__invalid-crc32.png`, `libsixel__xc1n0g08.png`,
//! `skimage__truncated.jpg`.

use std::path::{Path, PathBuf};

const FETCH_HINT: &str = "run scripts/fetch-testdata.sh";

/// The cache folder: `$SEER_CACHE`, or `~/.cache/seer-rs` when it is unset.
///
/// # Panics
///
/// When neither `SEER_CACHE` nor `HOME` is set.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("SEER_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME")
                .expect("neither SEER_CACHE nor HOME is set: cannot find the test data cache");
            PathBuf::from(home).join(".cache/seer-rs")
        }
    }
}

fn required_dir(name: &str) -> PathBuf {
    let dir = cache_dir().join(name);
    if !dir.is_dir() {
        panic!(
            "test material missing: {} does not exist; {FETCH_HINT}",
            dir.display()
        );
    }
    dir
}

/// The real photos, about 1100 files in one folder per source package.
///
/// # Panics
///
/// When the folder is missing: run `scripts/fetch-testdata.sh`.
pub fn photos_dir() -> PathBuf {
    required_dir("photos")
}

/// About 60 photos, chosen the same way on every machine, covering baseline, progressive and
/// grayscale JPEG, RGB, RGBA, palette and grayscale PNG, and WebP. Same layout as
/// [`photos_dir`].
///
/// # Panics
///
/// When the folder is missing: run `scripts/fetch-testdata.sh`.
pub fn photos_small_dir() -> PathBuf {
    required_dir("photos-small")
}

/// Broken and hostile inputs (truncated files, decompression bombs, fuzzer crashes, EXIF
/// orientations, CMYK JPEGs, every JPEG chroma subsampling, corrupted PngSuite), flat.
///
/// # Panics
///
/// When the folder is missing: run `scripts/fetch-testdata.sh`.
pub fn hostile_dir() -> PathBuf {
    required_dir("hostile")
}

/// Fashion-MNIST as Debian ships it: four gzipped IDX files, 60,000 train and 10,000 test
/// 28x28 grayscale images in 10 classes.
///
/// # Panics
///
/// When the folder is missing: run `scripts/fetch-testdata.sh`.
pub fn fashion_mnist_dir() -> PathBuf {
    required_dir("fashion-mnist")
}

/// One photo as listed in `photos.tsv`, read from its header by the fetch script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhotoEntry {
    /// Path relative to the photo folder, with `/` separators: `endless-sky/fog2.jpg`.
    pub path: String,
    /// `jpeg`, `png` or `webp`.
    pub format: String,
    pub width: u32,
    pub height: u32,
    /// JPEG: `ycbcr`, `gray`; PNG: color type and bit depth (`rgb8`, `rgba8`, `palette8`,
    /// `gray8`, `gray-alpha8`, `rgb16`); WebP: `lossy`, `lossless`, `alpha`, `extended`.
    pub mode: String,
    /// Progressive JPEG.
    pub progressive: bool,
    /// File size in bytes.
    pub bytes: u64,
}

/// Every photo in [`photos_dir`], in path order.
///
/// # Panics
///
/// When the index is missing or malformed: run `scripts/fetch-testdata.sh`.
pub fn photos_index() -> Vec<PhotoEntry> {
    read_index(&cache_dir().join("photos.tsv"))
}

/// Every photo in [`photos_small_dir`], in path order.
///
/// # Panics
///
/// When the index is missing or malformed: run `scripts/fetch-testdata.sh`.
pub fn photos_small_index() -> Vec<PhotoEntry> {
    read_index(&cache_dir().join("photos-small.tsv"))
}

fn read_index(path: &Path) -> Vec<PhotoEntry> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}; {FETCH_HINT}", path.display()));
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert_eq!(
        header,
        "path\tformat\twidth\theight\tmode\tprogressive\tbytes",
        "unexpected header in {}; {FETCH_HINT}",
        path.display()
    );
    lines
        .enumerate()
        .map(|(number, line)| {
            parse_entry(line).unwrap_or_else(|| {
                panic!(
                    "{}:{}: malformed line {line:?}; {FETCH_HINT}",
                    path.display(),
                    number + 2
                )
            })
        })
        .collect()
}

fn parse_entry(line: &str) -> Option<PhotoEntry> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [path, format, width, height, mode, progressive, bytes] = fields[..] else {
        return None;
    };
    Some(PhotoEntry {
        path: path.to_owned(),
        format: format.to_owned(),
        width: width.parse().ok()?,
        height: height.parse().ok()?,
        mode: mode.to_owned(),
        progressive: progressive == "1",
        bytes: bytes.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_index_line() {
        let entry = parse_entry("endless-sky/fog2.jpg\tjpeg\t720\t360\tycbcr\t1\t43102").unwrap();
        assert_eq!(entry.path, "endless-sky/fog2.jpg");
        assert_eq!((entry.width, entry.height), (720, 360));
        assert!(entry.progressive);
        assert_eq!(entry.bytes, 43102);
    }

    #[test]
    fn rejects_a_short_line() {
        assert_eq!(parse_entry("a\tjpeg\t1"), None);
    }
}
