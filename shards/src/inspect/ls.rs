//! `shards ls`: the manifest's shards.

use std::fmt;

use serde::Serialize;

use super::human_bytes;
use crate::{Dataset, ManifestShard};

/// Hex digits of each checksum shown in the listing.
const SHA_PREFIX: usize = 12;

/// The shards of a dataset and their totals.
#[derive(Debug, Clone, Serialize)]
pub struct LsReport {
    /// The dataset's URL.
    pub url: String,
    /// Shards in manifest order.
    pub shards: Vec<ManifestShard>,
    /// Samples over all shards.
    pub total_samples: u64,
    /// Bytes over all shards.
    pub total_bytes: u64,
}

/// Lists the manifest (no other object is read).
pub fn ls(dataset: &Dataset) -> LsReport {
    LsReport {
        url: dataset.location.url.clone(),
        shards: dataset.manifest.shards.clone(),
        total_samples: dataset.manifest.total_samples(),
        total_bytes: dataset.manifest.total_bytes(),
    }
}

impl fmt::Display for LsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self
            .shards
            .iter()
            .map(|s| super::shown_name(&s.name))
            .collect();
        let name_width = names
            .iter()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        for (name, shard) in names.iter().zip(&self.shards) {
            let sha = shard.sha256.get(..SHA_PREFIX).unwrap_or(&shard.sha256);
            writeln!(
                f,
                "{:<name_width$} {:>9} samples {:>10} {sha}",
                name,
                shard.samples,
                human_bytes(shard.bytes)
            )?;
        }
        writeln!(
            f,
            "{:<name_width$} {:>9} samples {:>10} in {} shards",
            "total",
            self.total_samples,
            human_bytes(self.total_bytes),
            self.shards.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest may name a shard anything its checks let through: a name of any length is
    /// shown cut (a column width past 65,535 used to panic the formatter).
    #[test]
    fn a_shard_name_of_any_length_is_listed_cut() {
        let shard = |name: String| ManifestShard {
            name,
            samples: 1,
            bytes: 10,
            sha256: "ab".repeat(32),
        };
        let report = LsReport {
            url: "file:///d/".into(),
            shards: vec![
                shard(format!("{}.tar", "a".repeat(70_000))),
                shard("b.tar".into()),
            ],
            total_samples: 2,
            total_bytes: 20,
        };
        let listing = report.to_string();
        assert!(listing.contains("... (69804 more characters)"), "{listing}");
        assert!(listing.len() < 2000, "{} bytes", listing.len());
    }
}
