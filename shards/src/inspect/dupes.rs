//! `shards dupes`: exact duplicates (same SHA-256 of the original) and near
//! duplicates (perceptual hashes within a Hamming distance).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use super::scan::{sample_meta, scan_samples};
use super::{Reporter, default_jobs};
use crate::{Dataset, printable};

/// How [`dupes()`] runs.
#[derive(Debug, Clone)]
pub struct DupesOptions {
    /// Largest Hamming distance between perceptual hashes of near duplicates (default 4).
    pub max_distance: u32,
    /// Shards read at once (default: the machine's cores).
    pub jobs: usize,
}

impl Default for DupesOptions {
    fn default() -> Self {
        Self {
            max_distance: 4,
            jobs: default_jobs(),
        }
    }
}

/// One sample of a duplicate group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DupeMember {
    /// The sample's key.
    pub key: String,
    /// Its shard.
    pub shard: String,
    /// SHA-256 of its original.
    pub sha256: String,
    /// Its perceptual hash.
    pub phash: String,
}

/// Samples that duplicate each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DupeGroup {
    /// The samples, in dataset order.
    pub members: Vec<DupeMember>,
    /// For near duplicates, the largest distance of a pair that linked the
    /// group (groups are connected components, so two members can be further
    /// apart than this through a chain); 0 for exact duplicates.
    pub max_distance: u32,
}

/// Duplicates found in a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct DupesReport {
    /// The dataset's URL.
    pub url: String,
    /// Samples read.
    pub samples: u64,
    /// Samples left out because their `KEY.json` is missing, does not parse or has a malformed hash.
    pub skipped: u64,
    /// The distance used for near duplicates.
    pub max_distance: u32,
    /// Groups of samples with the same SHA-256 of the original.
    pub exact: Vec<DupeGroup>,
    /// Groups linked by perceptual hashes within `max_distance` that are not all byte-identical.
    pub near: Vec<DupeGroup>,
    /// Shards that could not be read to their end, with the reason.
    pub unreadable: Vec<String>,
}

/// An index of 64-bit hashes that finds every pair within a Hamming distance
/// `d` without comparing all pairs (multi-index hashing).
///
/// The 64 bits are split into `d + 1` bands. Two hashes that differ in at most
/// `d` bits agree exactly on at least one band (pigeonhole), so only hashes
/// that share a band value are compared. With `d >= 64` every pair matches
/// and the index just lists them.
#[derive(Debug, Clone)]
pub struct NearDuplicateIndex {
    max_distance: u32,
    /// `(shift, mask)` of each band.
    bands: Vec<(u32, u64)>,
    /// Per band: band value -> ids of the hashes having it.
    tables: Vec<HashMap<u64, Vec<u32>>>,
    hashes: Vec<u64>,
}

impl NearDuplicateIndex {
    /// An empty index for pairs within `max_distance` bits.
    pub fn new(max_distance: u32) -> Self {
        let band_count = if max_distance >= 64 {
            0
        } else {
            max_distance + 1
        };
        let mut bands = Vec::with_capacity(band_count as usize);
        let mut shift = 0;
        for band in 0..band_count {
            // Spread the remainder over the first bands: widths differ by at most one bit.
            let width = 64 / band_count + u32::from(band < 64 % band_count);
            let mask = if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            };
            bands.push((shift, mask));
            shift += width;
        }
        let tables = vec![HashMap::new(); bands.len()];
        Self {
            max_distance,
            bands,
            tables,
            hashes: Vec::new(),
        }
    }

    /// Adds a hash; returns its id (0, 1, 2, ... in insertion order).
    pub fn insert(&mut self, hash: u64) -> usize {
        let id = self.hashes.len();
        for (table, &(shift, mask)) in self.tables.iter_mut().zip(&self.bands) {
            table
                .entry((hash >> shift) & mask)
                .or_default()
                .push(id as u32);
        }
        self.hashes.push(hash);
        id
    }

    /// Number of hashes added.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True when no hash has been added.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Every pair `(i, j, distance)` with `i < j` and `distance <= max_distance`, each once.
    pub fn pairs(&self) -> Vec<(usize, usize, u32)> {
        let distance = |i: usize, j: usize| (self.hashes[i] ^ self.hashes[j]).count_ones();
        let mut pairs = Vec::new();
        if self.bands.is_empty() {
            for i in 0..self.hashes.len() {
                for j in i + 1..self.hashes.len() {
                    pairs.push((i, j, distance(i, j)));
                }
            }
            return pairs;
        }
        let band_value = |hash: u64, band: usize| {
            let (shift, mask) = self.bands[band];
            (hash >> shift) & mask
        };
        for (i, &hash) in self.hashes.iter().enumerate() {
            for (band, table) in self.tables.iter().enumerate() {
                for &j in &table[&band_value(hash, band)] {
                    let j = j as usize;
                    // Count a pair only in the first band where the two agree.
                    if j <= i
                        || (0..band).any(|earlier| {
                            band_value(hash, earlier) == band_value(self.hashes[j], earlier)
                        })
                    {
                        continue;
                    }
                    let d = distance(i, j);
                    if d <= self.max_distance {
                        pairs.push((i, j, d));
                    }
                }
            }
        }
        pairs
    }
}

/// Union-find over sample ids.
struct Components(Vec<u32>);

impl Components {
    fn find(&mut self, mut x: u32) -> u32 {
        while self.0[x as usize] != x {
            let parent = self.0[x as usize];
            self.0[x as usize] = self.0[parent as usize];
            x = parent;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[a.max(b) as usize] = a.min(b);
        }
    }
}

#[derive(Default)]
struct Collected {
    /// `(key, sha256, phash)` of usable samples.
    samples: Vec<(String, String, u64)>,
    read: u64,
    skipped: u64,
}

/// Reads every `KEY.json` (streaming the shards) and groups exact and near duplicates.
pub async fn dupes(
    dataset: &Dataset,
    options: &DupesOptions,
    reporter: Arc<dyn Reporter>,
) -> DupesReport {
    let scans = scan_samples(dataset, options.jobs, reporter, |acc: &mut Collected, shard, sample| {
        acc.read += 1;
        let parsed = sample_meta(&sample).and_then(|meta| {
            let phash = u64::from_str_radix(&meta.phash, 16).ok().filter(|_| meta.phash.len() == 16).ok_or_else(|| format!("malformed phash {:?}", meta.phash))?;
            Ok((meta.key, meta.sha256, phash))
        });
        match parsed {
            Ok(entry) => acc.samples.push(entry),
            Err(reason) => {
                tracing::warn!(shard = %printable(&shard.name), key = %printable(&sample.key), %reason, "sample left out");
                acc.skipped += 1;
            }
        }
    })
    .await;

    let mut report = DupesReport {
        url: dataset.location.url.clone(),
        samples: 0,
        skipped: 0,
        max_distance: options.max_distance,
        exact: Vec::new(),
        near: Vec::new(),
        unreadable: Vec::new(),
    };
    // Flatten: one id per sample, in dataset order.
    let mut members: Vec<DupeMember> = Vec::new();
    let mut hashes: Vec<u64> = Vec::new();
    for scan in scans {
        report.samples += scan.acc.read;
        report.skipped += scan.acc.skipped;
        if let Some(error) = scan.error {
            report.unreadable.push(error);
        }
        for (key, sha256, phash) in scan.acc.samples {
            members.push(DupeMember {
                key,
                shard: scan.shard.name.clone(),
                sha256,
                phash: format!("{phash:016x}"),
            });
            hashes.push(phash);
        }
    }

    let mut by_sha: HashMap<&str, Vec<usize>> = HashMap::new();
    for (id, member) in members.iter().enumerate() {
        by_sha.entry(member.sha256.as_str()).or_default().push(id);
    }
    let mut exact: Vec<Vec<usize>> = by_sha.into_values().filter(|ids| ids.len() > 1).collect();
    exact.sort();
    report.exact = exact
        .into_iter()
        .map(|ids| DupeGroup {
            members: ids.into_iter().map(|i| members[i].clone()).collect(),
            max_distance: 0,
        })
        .collect();

    let mut index = NearDuplicateIndex::new(options.max_distance);
    for &hash in &hashes {
        index.insert(hash);
    }
    let pairs = index.pairs();
    let mut components = Components((0..members.len() as u32).collect());
    for &(i, j, _) in &pairs {
        components.union(i as u32, j as u32);
    }
    let mut groups: HashMap<u32, (Vec<usize>, u32)> = HashMap::new();
    for &(i, _, d) in &pairs {
        let root = components.find(i as u32);
        let group = groups.entry(root).or_default();
        group.1 = group.1.max(d);
    }
    for id in 0..members.len() {
        let root = components.find(id as u32);
        if let Some(group) = groups.get_mut(&root) {
            group.0.push(id);
        }
    }
    let mut near: Vec<(Vec<usize>, u32)> = groups
        .into_values()
        .filter(|(ids, _)| {
            ids.iter()
                .map(|&i| members[i].sha256.as_str())
                .collect::<BTreeSet<_>>()
                .len()
                > 1
        })
        .collect();
    near.sort();
    report.near = near
        .into_iter()
        .map(|(ids, d)| DupeGroup {
            members: ids.into_iter().map(|i| members[i].clone()).collect(),
            max_distance: d,
        })
        .collect();
    report
}

impl fmt::Display for DupesReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let in_groups =
            |groups: &[DupeGroup]| groups.iter().map(|g| g.members.len()).sum::<usize>();
        writeln!(
            f,
            "exact duplicates (same SHA-256 of the original): {} groups, {} samples",
            self.exact.len(),
            in_groups(&self.exact)
        )?;
        for group in &self.exact {
            writeln!(f, "  sha256 {}", group.members[0].sha256)?;
            for member in &group.members {
                writeln!(
                    f,
                    "    {}  {}",
                    printable(&member.key),
                    printable(&member.shard)
                )?;
            }
        }
        writeln!(
            f,
            "near duplicates (perceptual hashes within {} bits): {} groups, {} samples",
            self.max_distance,
            self.near.len(),
            in_groups(&self.near)
        )?;
        for (number, group) in self.near.iter().enumerate() {
            writeln!(
                f,
                "  group {} (distance up to {})",
                number + 1,
                group.max_distance
            )?;
            for member in &group.members {
                writeln!(
                    f,
                    "    {}  {}  phash {}  sha256 {}",
                    printable(&member.key),
                    printable(&member.shard),
                    member.phash,
                    &member.sha256[..member.sha256.len().min(16)]
                )?;
            }
        }
        write!(f, "{} samples read", self.samples)?;
        if self.skipped > 0 {
            write!(f, ", {} left out (no usable KEY.json)", self.skipped)?;
        }
        writeln!(f)?;
        for error in &self.unreadable {
            writeln!(f, "unreadable: {error}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brute_force(hashes: &[u64], max_distance: u32) -> Vec<(usize, usize, u32)> {
        let mut pairs = Vec::new();
        for i in 0..hashes.len() {
            for j in i + 1..hashes.len() {
                let d = (hashes[i] ^ hashes[j]).count_ones();
                if d <= max_distance {
                    pairs.push((i, j, d));
                }
            }
        }
        pairs
    }

    /// Random hashes plus near copies of them (a few bits flipped), so that
    /// there are pairs at every small distance.
    fn hashes_strategy() -> impl Strategy<Value = Vec<u64>> {
        let base = prop::collection::vec(any::<u64>(), 1..40);
        let flips =
            prop::collection::vec((0usize..40, prop::collection::vec(0u32..64, 0..8)), 0..60);
        (base, flips).prop_map(|(mut hashes, flips)| {
            for (source, bits) in flips {
                let mut hash = hashes[source % hashes.len()];
                for bit in bits {
                    hash ^= 1 << bit;
                }
                hashes.push(hash);
            }
            hashes
        })
    }

    proptest! {
        #[test]
        fn index_matches_brute_force(hashes in hashes_strategy(), max_distance in 0u32..70) {
            let mut index = NearDuplicateIndex::new(max_distance);
            for &hash in &hashes {
                index.insert(hash);
            }
            let mut found = index.pairs();
            found.sort();
            prop_assert_eq!(found, brute_force(&hashes, max_distance));
        }
    }

    #[test]
    fn bands_cover_all_bits() {
        for d in 0..64 {
            let index = NearDuplicateIndex::new(d);
            assert_eq!(index.bands.len() as u32, d + 1);
            let covered = index.bands.iter().fold(0u64, |acc, (shift, mask)| {
                assert_eq!(acc & (mask << shift), 0, "bands overlap for d={d}");
                acc | (mask << shift)
            });
            assert_eq!(covered, u64::MAX, "d={d}");
        }
    }
}
