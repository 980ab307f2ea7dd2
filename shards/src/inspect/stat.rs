//! `shards stat`: totals and distributions of a dataset.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use super::histogram::{Histogram, Scale, Unit, fmt_categories};
use super::scan::{sample_meta, scan_samples};
use super::{InspectError, Reporter, human_bytes};
use crate::meta::ShardNames;
use crate::{Dataset, printable};

/// Most examples of unparsable `KEY.json` kept for the report.
const MAX_EXAMPLES: usize = 10;

/// Totals and distributions of a dataset.
#[derive(Debug, Clone, Serialize)]
pub struct StatReport {
    /// The dataset's URL.
    pub url: String,
    /// Shards in the manifest.
    pub shards: usize,
    /// Samples in the manifest.
    pub samples: u64,
    /// Bytes of shards in the manifest.
    pub bytes: u64,
    /// Shards whose stats file could not be read, with the reason.
    pub stats_missing: Vec<String>,
    /// Sources planned (summed from the stats files).
    pub planned: u64,
    /// Sources that failed (summed from the stats files).
    pub failed: u64,
    /// Failures by reason (summed from the stats files).
    pub failed_by_reason: BTreeMap<String, u64>,
    /// Sources skipped as exact duplicates (summed from the stats files).
    pub duplicates: u64,
    /// Original bytes read by ingest (summed from the stats files).
    pub bytes_in: u64,
    /// Samples actually read from the shards.
    pub samples_read: u64,
    /// Samples whose `KEY.json` is missing or does not parse.
    pub bad_json: u64,
    /// A few of them: `shard: key: reason`.
    pub bad_json_examples: Vec<String>,
    /// Stored image sizes in bytes.
    pub image_bytes: Histogram,
    /// Stored widths.
    pub width: Histogram,
    /// Stored heights.
    pub height: Histogram,
    /// Stored short sides.
    pub short_side: Histogram,
    /// Original megapixels.
    pub original_megapixels: Histogram,
    /// Samples by stored format.
    pub formats: BTreeMap<String, u64>,
    /// Samples by label (`cls`), for samples that have one.
    pub labels: BTreeMap<String, u64>,
    /// Shards that could not be read to their end, with the reason.
    pub unreadable: Vec<String>,
}

struct Accumulator {
    samples: u64,
    bad_json: u64,
    bad_json_examples: Vec<String>,
    image_bytes: Histogram,
    width: Histogram,
    height: Histogram,
    short_side: Histogram,
    original_megapixels: Histogram,
    formats: BTreeMap<String, u64>,
    labels: BTreeMap<String, u64>,
}

impl Default for Accumulator {
    fn default() -> Self {
        let pixels = |name| Histogram::new(name, Scale::Linear { width: 64.0 }, Unit::Count);
        Self {
            samples: 0,
            bad_json: 0,
            bad_json_examples: Vec::new(),
            image_bytes: Histogram::new(
                "stored image bytes",
                Scale::Log2 { steps: 2 },
                Unit::Bytes,
            ),
            width: pixels("stored width (px)"),
            height: pixels("stored height (px)"),
            short_side: pixels("stored short side (px)"),
            original_megapixels: Histogram::new(
                "original megapixels",
                Scale::Log2 { steps: 2 },
                Unit::Decimal,
            ),
            formats: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }
}

impl Accumulator {
    fn merge_into(self, report: &mut StatReport) {
        report.samples_read += self.samples;
        report.bad_json += self.bad_json;
        for example in self.bad_json_examples {
            if report.bad_json_examples.len() < MAX_EXAMPLES {
                report.bad_json_examples.push(example);
            }
        }
        report.image_bytes.merge(&self.image_bytes);
        report.width.merge(&self.width);
        report.height.merge(&self.height);
        report.short_side.merge(&self.short_side);
        report.original_megapixels.merge(&self.original_megapixels);
        for (name, count) in self.formats {
            *report.formats.entry(name).or_default() += count;
        }
        for (name, count) in self.labels {
            *report.labels.entry(name).or_default() += count;
        }
    }
}

/// Reads every stats file and streams every shard (constant memory per
/// shard, `jobs` shards at once) to total and histogram the dataset.
///
/// Fails when the stats files' counts add up to more than 64 bits hold, naming the stats
/// file where they do: such numbers are not counts of anything.
pub async fn stat(
    dataset: &Dataset,
    jobs: usize,
    reporter: Arc<dyn Reporter>,
) -> Result<StatReport, InspectError> {
    let empty = Accumulator::default();
    let mut report = StatReport {
        url: dataset.location.url.clone(),
        shards: dataset.manifest.shards.len(),
        samples: dataset.manifest.total_samples(),
        bytes: dataset.manifest.total_bytes(),
        stats_missing: Vec::new(),
        planned: 0,
        failed: 0,
        failed_by_reason: BTreeMap::new(),
        duplicates: 0,
        bytes_in: 0,
        samples_read: 0,
        bad_json: 0,
        bad_json_examples: Vec::new(),
        image_bytes: empty.image_bytes,
        width: empty.width,
        height: empty.height,
        short_side: empty.short_side,
        original_megapixels: empty.original_megapixels,
        formats: BTreeMap::new(),
        labels: BTreeMap::new(),
        unreadable: Vec::new(),
    };

    let stats: Vec<_> = futures::stream::iter(&dataset.manifest.shards)
        .map(|shard| async move { (shard, dataset.stats(shard).await) })
        .buffered(16)
        .collect()
        .await;
    for (shard, stats) in stats {
        match stats {
            Ok(stats) => {
                let overflow = |field: String| {
                    let location = &dataset.location;
                    InspectError::StatsOverflow {
                        field,
                        url: location
                            .url_of(&location.child(&ShardNames::for_tar(&shard.name).stats)),
                    }
                };
                let add = |total: &mut u64, count: u64, field: &str| {
                    *total = total
                        .checked_add(count)
                        .ok_or_else(|| overflow(field.to_string()))?;
                    Ok::<(), InspectError>(())
                };
                add(&mut report.planned, stats.count, "count")?;
                add(&mut report.failed, stats.failed, "failed")?;
                add(&mut report.duplicates, stats.duplicates, "duplicates")?;
                add(&mut report.bytes_in, stats.bytes_in, "bytes_in")?;
                for (reason, count) in stats.failed_by_reason {
                    let field = format!("failed_by_reason {reason:?}");
                    add(
                        report.failed_by_reason.entry(reason).or_default(),
                        count,
                        &field,
                    )?;
                }
            }
            Err(e) => {
                tracing::warn!(shard = %shard.name, error = %e, "stats file unreadable");
                report
                    .stats_missing
                    .push(format!("{}: {e}", printable(&shard.name)));
            }
        }
    }

    let scans = scan_samples(
        dataset,
        jobs,
        reporter,
        |acc: &mut Accumulator, shard, sample| {
            acc.samples += 1;
            if let Some((_, image)) = sample.image() {
                acc.image_bytes.add(image.len() as f64);
            }
            match sample_meta(&sample) {
                Ok(meta) => {
                    acc.width.add(f64::from(meta.width));
                    acc.height.add(f64::from(meta.height));
                    acc.short_side.add(f64::from(meta.width.min(meta.height)));
                    acc.original_megapixels.add(
                        f64::from(meta.original_width) * f64::from(meta.original_height) / 1e6,
                    );
                    *acc.formats.entry(meta.format).or_default() += 1;
                    if let Some(cls) = meta.cls {
                        *acc.labels.entry(cls).or_default() += 1;
                    }
                }
                Err(reason) => {
                    acc.bad_json += 1;
                    if acc.bad_json_examples.len() < MAX_EXAMPLES {
                        acc.bad_json_examples.push(format!(
                            "{}: {}: {reason}",
                            printable(&shard.name),
                            printable(&sample.key)
                        ));
                    }
                }
            }
        },
    )
    .await;
    for scan in scans {
        if let Some(error) = scan.error {
            report.unreadable.push(error);
        }
        scan.acc.merge_into(&mut report);
    }
    Ok(report)
}

impl fmt::Display for StatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset     {}", self.url)?;
        writeln!(f, "shards      {}", self.shards)?;
        writeln!(
            f,
            "samples     {} in the manifest, {} read",
            self.samples, self.samples_read
        )?;
        writeln!(
            f,
            "bytes       {} ({})",
            human_bytes(self.bytes),
            self.bytes
        )?;
        writeln!(
            f,
            "sources     {} planned, {} failed, {} duplicates skipped",
            self.planned, self.failed, self.duplicates
        )?;
        writeln!(f, "bytes in    {}", human_bytes(self.bytes_in))?;
        if !self.stats_missing.is_empty() {
            writeln!(
                f,
                "stats files missing or unreadable for {} shards (sums above leave them out)",
                self.stats_missing.len()
            )?;
        }
        if !self.failed_by_reason.is_empty() {
            writeln!(f, "failed by reason:")?;
            for (reason, count) in &self.failed_by_reason {
                writeln!(f, "  {:<24} {count}", printable(reason))?;
            }
        }
        if self.bad_json > 0 {
            writeln!(f, "samples without a valid KEY.json: {}", self.bad_json)?;
            for example in &self.bad_json_examples {
                writeln!(f, "  {example}")?;
            }
        }
        for histogram in [
            &self.image_bytes,
            &self.width,
            &self.height,
            &self.short_side,
            &self.original_megapixels,
        ] {
            writeln!(f)?;
            write!(f, "{histogram}")?;
        }
        writeln!(f)?;
        fmt_categories(f, "formats", &self.formats)?;
        if !self.labels.is_empty() {
            writeln!(f)?;
            fmt_categories(f, "labels", &self.labels)?;
        }
        for error in &self.unreadable {
            writeln!(f, "unreadable: {error}")?;
        }
        Ok(())
    }
}
