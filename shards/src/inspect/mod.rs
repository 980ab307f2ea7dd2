//! Inspecting a dataset: what the `shards` tool does, as a library.
//!
//! Each subcommand of `shards` is one function here that returns a report
//! (printable with `Display`, machine-readable with `serde`), so the binary
//! only parses arguments, draws progress and prints:
//!
//! - [`ls()`]: the manifest's shards and totals;
//! - [`stat()`]: totals from the stats files and histograms from every `KEY.json`;
//! - [`verify()`]: checksums, indexes, members, metadata, decodable images, unique keys;
//! - [`lookup`]: one sample by key (`cat`, `get`);
//! - [`grid()`]: a contact sheet of random samples;
//! - [`dupes()`]: exact and near duplicates (perceptual hash within a Hamming distance).
//!
//! Long scans report progress through a [`Reporter`]; only the binary draws bars.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shards::inspect::InspectError> {
//! use shards::{Dataset, StoreOptions};
//! use shards::inspect::{verify, NoReporter, VerifyOptions};
//! let dataset = Dataset::open("s3://bucket/dataset", &StoreOptions::default()).await?;
//! let report = verify(&dataset, &VerifyOptions::default(), std::sync::Arc::new(NoReporter)).await;
//! println!("{report}");
//! # Ok(()) }
//! ```

mod dupes;
mod grid;
mod histogram;
mod lookup;
mod ls;
mod scan;
mod stat;
mod verify;

pub use dupes::{DupeGroup, DupeMember, DupesOptions, DupesReport, NearDuplicateIndex, dupes};
pub use grid::{ContactSheet, GridOptions, grid};
pub use histogram::{Histogram, Scale};
pub use lookup::{Found, lookup};
pub use ls::{LsReport, ls};
pub use stat::{StatReport, stat};
pub use verify::{Problem, VerifyOptions, VerifyReport, verify};

use crate::StoreError;

/// Longest name or label a table shows whole; a longer one (data can hold anything) is cut,
/// with how much was left out, so that it neither floods the screen nor overflows a column
/// width (which panics the formatter past 65,535).
const MAX_SHOWN_CHARS: usize = 200;

/// `name` as [`crate::printable`] shows it, cut to [`MAX_SHOWN_CHARS`] characters.
pub(crate) fn shown_name(name: &str) -> String {
    let printable = crate::printable(name);
    let length = printable.chars().count();
    if length <= MAX_SHOWN_CHARS {
        return printable.into_owned();
    }
    let kept: String = printable.chars().take(MAX_SHOWN_CHARS).collect();
    format!("{kept}... ({} more characters)", length - MAX_SHOWN_CHARS)
}

/// Errors of the inspection functions (problems found by [`verify()`] are data, not errors).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Opening the dataset or reading one of its objects failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No shard index lists the key.
    #[error("no sample with key {key:?} in {url}")]
    KeyNotFound {
        /// The key asked for.
        key: String,
        /// The dataset's URL.
        url: String,
    },
    /// A sample has no image member.
    #[error(
        "sample {} in shard {} has no image member",
        crate::printable(key),
        crate::printable(shard)
    )]
    NoImage {
        /// The sample's key.
        key: String,
        /// Its shard.
        shard: String,
    },
    /// The stats files' counts add up to more than 64 bits hold.
    #[error("the stats files' {field} totals overflow at {url}")]
    StatsOverflow {
        /// The field, as the stats files name it.
        field: String,
        /// The stats file at which the total overflows.
        url: String,
    },
    /// The dataset's manifest lists no samples.
    #[error("{url} holds no samples")]
    Empty {
        /// The dataset's URL.
        url: String,
    },
    /// The contact sheet asked for would be too large.
    #[error(
        "a contact sheet of {count} tiles of {tile} pixels with {border}-pixel borders would be over {} pixels; ask for fewer samples, smaller tiles or a narrower border",
        grid::MAX_SHEET_PIXELS
    )]
    SheetTooLarge {
        /// Samples asked for.
        count: usize,
        /// Tile side.
        tile: u32,
        /// Border width.
        border: u32,
    },
    /// Encoding an output image failed.
    #[error("cannot encode the contact sheet: {0}")]
    Encode(#[source] image::ImageError),
}

/// Receives progress of long scans. Every method has an empty default.
pub trait Reporter: Send + Sync {
    /// A scan of `shards` shards totalling `bytes` bytes starts.
    fn start(&self, _shards: usize, _bytes: u64) {}
    /// `bytes` more bytes of shards have been read.
    fn advance(&self, _bytes: u64) {}
    /// A shard has been read to its end (or to its first error).
    fn shard_done(&self, _shard: &str) {}
    /// [`verify()`] found a problem (reported as found; the report lists them again, sorted).
    fn problem(&self, _problem: &Problem) {}
}

/// A [`Reporter`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReporter;

impl Reporter for NoReporter {}

pub use crate::reader::IMAGE_EXTENSIONS;

/// Largest width or height a stored image may have when decoded for checks
/// (default 32768): ingest resizes far below this, so larger means corrupt.
pub const MAX_DECODE_SIDE: u32 = 32_768;

/// Largest decoded image (RGB8) when decoded for checks (default 1 GiB).
pub const MAX_DECODE_ALLOC: u64 = 1 << 30;

/// The decoder [`verify()`] and [`grid()`] check images with: the one `augment` and the
/// trainer's evaluation decode with ([`crate::decode`], libjpeg-turbo for JPEG), so that
/// verify passes exactly the images they accept; refusing images over [`MAX_DECODE_SIDE`]
/// a side or [`MAX_DECODE_ALLOC`] bytes of RGB8, from their header.
pub fn check_decoder() -> crate::decode::Decoder {
    crate::decode::Decoder::new(MAX_DECODE_ALLOC / 3).with_max_side(MAX_DECODE_SIDE)
}

/// `1536` -> `"1.5 KiB"`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A small seeded generator (SplitMix64) for reproducible sampling; no
/// statistical quality beyond that is needed here.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), by rejection so there is no modulo bias.
    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

/// Number of shards read at once by default: the machine's cores.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn below_stays_in_range() {
        let mut rng = SplitMix64::new(7);
        assert!((0..1000).all(|_| rng.below(3) < 3));
    }
}
