//! The JSON documents of a dataset: per-sample metadata, per-shard index and
//! stats, and the dataset manifest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Metadata stored as `KEY.json` beside each image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleMeta {
    /// The sample key (also the member names' stem).
    pub key: String,
    /// Where the original came from (`s3://bucket/key`, `https://...`, `file:///...`).
    pub url: String,
    /// Size in bytes of the original object.
    pub source_size: u64,
    /// ETag of the original object, where the store reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Last modification time of the original object (RFC 3339), where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// Width of the original as displayed (after EXIF orientation).
    pub original_width: u32,
    /// Height of the original as displayed (after EXIF orientation).
    pub original_height: u32,
    /// Width of the stored image.
    pub width: u32,
    /// Height of the stored image.
    pub height: u32,
    /// Stored format: the image member's extension (`jpg`, `png`, `webp`).
    pub format: String,
    /// Hex SHA-256 of the original bytes.
    pub sha256: String,
    /// 64-bit perceptual hash of the stored pixels, 16 hex digits.
    pub phash: String,
    /// True when the stored bytes are the original JPEG with its metadata stripped.
    pub kept_original: bool,
    /// Label given at ingest, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cls: Option<String>,
}

/// Where one member of a sample lies in its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpan {
    /// Byte offset of the member's data.
    pub offset: u64,
    /// Size of the member's data in bytes.
    pub size: u64,
}

/// One sample in a shard index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// The sample key.
    pub key: String,
    /// Byte offset of the sample's first header.
    pub offset: u64,
    /// Bytes from `offset` to the end of the sample's last member (padding included):
    /// one ranged read of `offset..offset+size` returns the whole sample.
    pub size: u64,
    /// Members by extension.
    pub members: BTreeMap<String, MemberSpan>,
    /// Hex SHA-256 of the original the sample was made from, where the writer
    /// knows it (ingest uses it to skip exact duplicates on resume without
    /// rereading shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
}

/// The index beside each shard (`PREFIX-NNNNNN.index.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardIndex {
    /// Format version of this document.
    pub version: u32,
    /// The shard's file name.
    pub shard: String,
    /// Total size of the shard in bytes.
    pub bytes: u64,
    /// Samples in archive order.
    pub samples: Vec<IndexEntry>,
}

/// One failed sample, listed in the shard's stats so that it can be retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The source URL.
    pub url: String,
    /// Short, stable reason code (`fetch`, `undecodable`, `too_many_pixels`, ...).
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
}

/// Seconds spent in each stage of ingest, summed over the shard's samples
/// (stages overlap across workers, so the sum can exceed the wall time).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSeconds {
    /// Reading the original bytes from storage.
    pub fetch: f64,
    /// Decoding (and orientation and color conversion).
    pub decode: f64,
    /// Resizing.
    pub resize: f64,
    /// Encoding and hashing.
    pub encode: f64,
    /// Writing the shard and uploading it.
    pub write: f64,
}

/// Statistics beside each shard (`PREFIX-NNNNNN_stats.json`), modelled on img2dataset's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardStats {
    /// Format version of this document.
    pub version: u32,
    /// The shard's file name.
    pub shard: String,
    /// Sources planned into this shard.
    pub count: u64,
    /// Samples written.
    pub successes: u64,
    /// Sources that failed.
    pub failed: u64,
    /// Sources skipped as exact duplicates (same SHA-256) of a sample written earlier in the job.
    pub duplicates: u64,
    /// Failures by reason code.
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Original bytes read.
    pub bytes_in: u64,
    /// Bytes of the shard written.
    pub bytes_out: u64,
    /// Wall time of the shard in seconds.
    pub duration_s: f64,
    /// Start time (RFC 3339).
    pub start_time: String,
    /// End time (RFC 3339).
    pub end_time: String,
    /// Time split by stage.
    pub stage_seconds: StageSeconds,
    /// Every failed source with its reason (for `--retry-failed`).
    pub failures: Vec<Failure>,
}

/// One completed shard in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestShard {
    /// The shard's file name, relative to the dataset root.
    pub name: String,
    /// Number of samples.
    pub samples: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the shard's bytes.
    pub sha256: String,
}

/// The dataset manifest (`manifest.json` at the dataset root): every completed shard.
///
/// A shard appears here only after its tar, index and stats are all stored, so
/// readers that work from the manifest never see a partial shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version of this document.
    pub version: u32,
    /// Shards sorted by name.
    pub shards: Vec<ManifestShard>,
}

/// Current version of every document above.
pub const FORMAT_VERSION: u32 = 1;

/// Refuses a document version this build does not read: its fields may mean something else.
fn check_version(version: u32) -> Result<(), String> {
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}; this build reads version {FORMAT_VERSION}"
        ));
    }
    Ok(())
}

impl ShardIndex {
    /// Checks what serde cannot: a version this build reads.
    pub fn check(&self) -> Result<(), String> {
        check_version(self.version)
    }
}

/// The reasons a source fails, as `failed_by_reason` and [`Failure::reason`] give them
/// (`docs/format.md` says what each means; ingest gives no other).
pub const FAILURE_REASONS: [&str; 13] = [
    "bad_url",
    "not_found",
    "not_a_file",
    "permission_denied",
    "fetch",
    "too_large_bytes",
    "too_many_pixels",
    "too_small",
    "unsupported_format",
    "undecodable",
    "over_memory_limit",
    "decoder_panic",
    "encode_failed",
];

impl ShardStats {
    /// Checks what serde cannot: a version this build reads.
    pub fn check(&self) -> Result<(), String> {
        check_version(self.version)
    }

    /// What disagrees within the stats, one line each naming the field: `failed` against the
    /// sum of `failed_by_reason`, and reasons that [`FAILURE_REASONS`] does not hold. Empty
    /// when nothing does.
    pub fn inconsistencies(&self) -> Vec<String> {
        let mut found = Vec::new();
        let sum = self
            .failed_by_reason
            .values()
            .try_fold(0u64, |total, &count| total.checked_add(count));
        match sum {
            None => found.push(format!(
                "the counts in failed_by_reason add up to more than 64 bits hold; failed is {}",
                self.failed
            )),
            Some(sum) if sum != self.failed => found.push(format!(
                "failed is {}, the counts in failed_by_reason add up to {sum}",
                self.failed
            )),
            Some(_) => {}
        }
        for reason in self.failed_by_reason.keys() {
            if !FAILURE_REASONS.contains(&reason.as_str()) {
                found.push(format!("failed_by_reason has an unknown reason {reason:?}"));
            }
        }
        let unknown: std::collections::BTreeSet<&str> = self
            .failures
            .iter()
            .map(|failure| failure.reason.as_str())
            .filter(|reason| !FAILURE_REASONS.contains(reason))
            .collect();
        for reason in unknown {
            found.push(format!("failures has an unknown reason {reason:?}"));
        }
        found
    }
}

impl Manifest {
    /// Total samples over all shards (saturating; [`Manifest::check`] refuses a manifest whose
    /// totals overflow).
    pub fn total_samples(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |total, s| total.saturating_add(s.samples))
    }

    /// Total bytes over all shards (saturating, as [`Manifest::total_samples`]).
    pub fn total_bytes(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |total, s| total.saturating_add(s.bytes))
    }

    /// Checks what serde cannot: a version this build reads, shard names that are plain
    /// `.tar` file names beside the manifest, each once, and totals that fit in 64 bits.
    pub fn check(&self) -> Result<(), String> {
        check_version(self.version)?;
        let mut names = std::collections::HashSet::new();
        let (mut samples, mut bytes) = (0u64, 0u64);
        for shard in &self.shards {
            let name = &shard.name;
            if name.is_empty()
                || !name.ends_with(".tar")
                || name.contains(['/', '\\'])
                || name.starts_with('.')
            {
                return Err(format!(
                    "shard name {name:?} is not a .tar file name beside the manifest"
                ));
            }
            // Shard names are printed in every report: a newline or a terminal escape in one
            // could fake or hide a line.
            if name.chars().any(char::is_control) {
                return Err(format!("shard name {name:?} holds a control character"));
            }
            if !names.insert(name.as_str()) {
                return Err(format!("shard {name} is listed twice"));
            }
            samples = samples
                .checked_add(shard.samples)
                .ok_or_else(|| format!("the shards' sample counts overflow at {name}"))?;
            bytes = bytes
                .checked_add(shard.bytes)
                .ok_or_else(|| format!("the shards' byte sizes overflow at {name}"))?;
        }
        Ok(())
    }

    /// Adds or replaces a shard, keeping the list sorted by name.
    pub fn upsert(&mut self, shard: ManifestShard) {
        match self.shards.binary_search_by(|s| s.name.cmp(&shard.name)) {
            Ok(i) => self.shards[i] = shard,
            Err(i) => self.shards.insert(i, shard),
        }
    }

    /// Merges several manifests (for example one per partition), each given with its name,
    /// into one. Each must pass [`Manifest::check`], and a shard named in two manifests with
    /// different contents is an error; both name the manifests concerned.
    pub fn merge<'a>(
        parts: impl IntoIterator<Item = (&'a str, &'a Manifest)>,
    ) -> Result<Manifest, String> {
        let mut merged = Manifest {
            version: FORMAT_VERSION,
            shards: Vec::new(),
        };
        let mut listed_by: std::collections::HashMap<&str, &str> = Default::default();
        for (part_name, part) in parts {
            part.check().map_err(|e| format!("{part_name}: {e}"))?;
            for shard in &part.shards {
                if let Ok(i) = merged.shards.binary_search_by(|s| s.name.cmp(&shard.name))
                    && merged.shards[i] != *shard
                {
                    return Err(format!(
                        "shard {} is listed by {} and {part_name} with different contents",
                        shard.name,
                        listed_by.get(shard.name.as_str()).unwrap_or(&"?")
                    ));
                }
                listed_by.insert(&shard.name, part_name);
                merged.upsert(shard.clone());
            }
        }
        merged.check()?;
        Ok(merged)
    }
}

/// Names of the objects that belong to one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardNames {
    /// `PREFIX-NNNNNN.tar`
    pub tar: String,
    /// `PREFIX-NNNNNN.index.json`
    pub index: String,
    /// `PREFIX-NNNNNN_stats.json` (img2dataset's naming)
    pub stats: String,
}

impl ShardNames {
    /// Names of shard number `id` of a dataset whose shards are called `prefix`.
    pub fn new(prefix: &str, id: u64) -> Self {
        let stem = format!("{prefix}-{id:06}");
        Self {
            tar: format!("{stem}.tar"),
            index: format!("{stem}.index.json"),
            stats: format!("{stem}_stats.json"),
        }
    }

    /// The names of the index and stats that go with a shard's tar name.
    pub fn for_tar(tar: &str) -> Self {
        let stem = tar.strip_suffix(".tar").unwrap_or(tar);
        Self {
            tar: tar.to_string(),
            index: format!("{stem}.index.json"),
            stats: format!("{stem}_stats.json"),
        }
    }
}

/// File name of the manifest at the dataset root.
pub const MANIFEST: &str = "manifest.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let n = ShardNames::new("data", 12);
        assert_eq!(n.tar, "data-000012.tar");
        assert_eq!(n.index, "data-000012.index.json");
        assert_eq!(n.stats, "data-000012_stats.json");
        assert_eq!(ShardNames::for_tar("data-000012.tar"), n);
    }

    #[test]
    fn merge_rejects_conflicts() {
        let a = ManifestShard {
            name: "a-000000.tar".into(),
            samples: 1,
            bytes: 10,
            sha256: "x".into(),
        };
        let mut b = a.clone();
        let m1 = Manifest {
            version: 1,
            shards: vec![a.clone()],
        };
        let m2 = Manifest {
            version: 1,
            shards: vec![a.clone()],
        };
        assert_eq!(
            Manifest::merge([("p0", &m1), ("p1", &m2)])
                .unwrap()
                .shards
                .len(),
            1
        );
        b.samples = 2;
        let m3 = Manifest {
            version: 1,
            shards: vec![b],
        };
        let err = Manifest::merge([("p0.json", &m1), ("p1.json", &m3)]).unwrap_err();
        assert!(err.contains("listed by p0.json and p1.json"), "{err}");
    }

    #[test]
    fn stats_whose_failure_counts_disagree_are_found() {
        let stats = |failed: u64, reasons: &[(&str, u64)]| ShardStats {
            version: FORMAT_VERSION,
            failed,
            failed_by_reason: reasons.iter().map(|&(r, n)| (r.to_string(), n)).collect(),
            failures: reasons
                .iter()
                .map(|&(r, _)| Failure {
                    url: "file:///x".into(),
                    reason: r.into(),
                    message: "m".into(),
                })
                .collect(),
            ..ShardStats::default()
        };
        assert!(stats(0, &[]).inconsistencies().is_empty());
        assert!(
            stats(3, &[("fetch", 1), ("undecodable", 2)])
                .inconsistencies()
                .is_empty()
        );
        assert_eq!(
            stats(3, &[("fetch", 1)]).inconsistencies(),
            ["failed is 3, the counts in failed_by_reason add up to 1"]
        );
        assert_eq!(
            stats(3, &[("weird", u64::MAX), ("not_found", 5)]).inconsistencies(),
            [
                "the counts in failed_by_reason add up to more than 64 bits hold; failed is 3",
                "failed_by_reason has an unknown reason \"weird\"",
                "failures has an unknown reason \"weird\"",
            ]
        );
        let mut other_version = stats(0, &[]);
        other_version.version = 2;
        assert_eq!(
            other_version.check().unwrap_err(),
            "format version 2; this build reads version 1"
        );
    }

    #[test]
    fn manifests_are_checked_beyond_their_schema() {
        let shard = |name: &str, samples: u64| ManifestShard {
            name: name.into(),
            samples,
            bytes: 10,
            sha256: "x".into(),
        };
        let manifest = |version: u32, shards: Vec<ManifestShard>| Manifest { version, shards };
        assert!(manifest(1, vec![shard("d-000000.tar", 3)]).check().is_ok());
        for (bad, expected) in [
            (manifest(99, vec![]), "format version 99"),
            (manifest(1, vec![shard("", 1)]), "not a .tar file name"),
            (
                manifest(1, vec![shard("../../evil.tar", 1)]),
                "not a .tar file name",
            ),
            (
                manifest(1, vec![shard("a/b.tar", 1)]),
                "not a .tar file name",
            ),
            (
                manifest(1, vec![shard("a.tar", 1), shard("a.tar", 1)]),
                "listed twice",
            ),
            (
                manifest(1, vec![shard("a\nverified: OK\n.tar", 1)]),
                "holds a control character",
            ),
            (
                manifest(1, vec![shard("a.tar", u64::MAX), shard("b.tar", 1)]),
                "sample counts overflow at b.tar",
            ),
        ] {
            let err = bad.check().unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
        let err = Manifest::merge([("p.json", &manifest(2, vec![]))]).unwrap_err();
        assert!(err.starts_with("p.json: format version 2"), "{err}");
    }
}
