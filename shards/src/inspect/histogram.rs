//! Histograms with fixed bucket rules, so that memory stays constant however
//! many values go in and partial histograms (one per shard) merge exactly.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// How values map to buckets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Buckets `[i*width, (i+1)*width)`.
    Linear {
        /// Bucket width.
        width: f64,
    },
    /// Buckets `[2^(i/steps), 2^((i+1)/steps))`: `steps` buckets per doubling.
    Log2 {
        /// Buckets per doubling.
        steps: u32,
    },
}

/// How bucket edges are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Byte sizes (`1.5 KiB`).
    Bytes,
    /// Whole numbers (pixels).
    Count,
    /// Fractions, two decimals (megapixels).
    Decimal,
}

/// A histogram of non-negative values. Serializes as
/// `{count, min, max, mean, buckets: [{lower, upper, count}]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// What is counted (a title).
    pub name: String,
    /// Bucket rule.
    pub scale: Scale,
    /// How edges print.
    pub unit: Unit,
    /// Values added.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Smallest value (0 when empty).
    pub min: f64,
    /// Largest value (0 when empty).
    pub max: f64,
    /// Count per bucket number.
    pub buckets: BTreeMap<i64, u64>,
}

/// Rows shown at most; adjacent buckets are merged to fit.
const MAX_ROWS: usize = 24;
/// Width of the longest bar in characters.
const BAR_WIDTH: usize = 40;

impl Histogram {
    /// An empty histogram.
    pub fn new(name: &str, scale: Scale, unit: Unit) -> Self {
        Self {
            name: name.to_string(),
            scale,
            unit,
            count: 0,
            sum: 0.0,
            min: 0.0,
            max: 0.0,
            buckets: BTreeMap::new(),
        }
    }

    fn bucket_of(&self, value: f64) -> i64 {
        match self.scale {
            Scale::Linear { width } => (value / width).floor() as i64,
            // Values below 1 share one bucket: nothing counted here is fractional
            // in a way that matters except megapixels, where < 1 MP is one class.
            Scale::Log2 { steps } => {
                if value < 1e-9 {
                    i64::MIN
                } else {
                    (value.log2() * f64::from(steps)).floor() as i64
                }
            }
        }
    }

    fn lower_edge(&self, bucket: i64) -> f64 {
        match self.scale {
            Scale::Linear { width } => bucket as f64 * width,
            Scale::Log2 { .. } if bucket == i64::MIN => 0.0,
            Scale::Log2 { steps } => 2f64.powf(bucket as f64 / f64::from(steps)),
        }
    }

    /// Adds one value.
    pub fn add(&mut self, value: f64) {
        let value = value.max(0.0);
        if self.count == 0 {
            self.min = value;
            self.max = value;
        } else {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
        self.count += 1;
        self.sum += value;
        *self.buckets.entry(self.bucket_of(value)).or_default() += 1;
    }

    /// Adds every value of `other` (built with the same scale).
    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.count += other.count;
        self.sum += other.sum;
        for (bucket, count) in &other.buckets {
            *self.buckets.entry(*bucket).or_default() += count;
        }
    }

    /// Mean of the values (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    fn format_value(&self, value: f64) -> String {
        match self.unit {
            Unit::Bytes => super::human_bytes(value.round() as u64),
            Unit::Count => format!("{}", value.round() as u64),
            Unit::Decimal => format!("{value:.2}"),
        }
    }

    /// Rows `(lower edge, upper edge, count)` from the lowest to the highest
    /// non-empty bucket, empty ones between included, merged to at most
    /// [`MAX_ROWS`] rows.
    fn rows(&self) -> Vec<(f64, f64, u64)> {
        let (Some(&first), Some(&last)) =
            (self.buckets.keys().next(), self.buckets.keys().next_back())
        else {
            return Vec::new();
        };
        // The "below 1" bucket of a log scale sits alone before the others.
        let mut rows = Vec::new();
        let mut first = first;
        if first == i64::MIN {
            let upper = self
                .buckets
                .keys()
                .nth(1)
                .map_or(1.0, |&b| self.lower_edge(b));
            rows.push((0.0, upper, self.buckets[&i64::MIN]));
            if last == i64::MIN {
                return rows;
            }
            first = *self.buckets.keys().nth(1).expect("a second bucket");
        }
        let span = (last - first + 1) as usize;
        let group = span.div_ceil(MAX_ROWS).max(1) as i64;
        let mut start = first;
        while start <= last {
            let end = (start + group).min(last + 1);
            let count = self.buckets.range(start..end).map(|(_, c)| c).sum();
            rows.push((self.lower_edge(start), self.lower_edge(end), count));
            start = end;
        }
        rows
    }
}

impl fmt::Display for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} (n={}, min {}, mean {}, max {})",
            self.name,
            self.count,
            self.format_value(self.min),
            self.format_value(self.mean()),
            self.format_value(self.max)
        )?;
        let rows = self.rows();
        let biggest = rows.iter().map(|r| r.2).max().unwrap_or(0).max(1);
        let labels: Vec<String> = rows
            .iter()
            .map(|(lo, hi, _)| format!("[{}, {})", self.format_value(*lo), self.format_value(*hi)))
            .collect();
        let label_width = labels.iter().map(String::len).max().unwrap_or(0);
        for ((_, _, count), label) in rows.iter().zip(&labels) {
            let bar = (*count as usize * BAR_WIDTH).div_ceil(biggest as usize);
            writeln!(f, "  {label:>label_width$} {count:>8} {}", "#".repeat(bar))?;
        }
        Ok(())
    }
}

/// Counts of named categories (formats, labels) as a bar chart, biggest first.
pub(crate) fn fmt_categories(
    f: &mut fmt::Formatter<'_>,
    title: &str,
    counts: &BTreeMap<String, u64>,
) -> fmt::Result {
    let total: u64 = counts.values().sum();
    writeln!(f, "{title} ({} distinct)", counts.len())?;
    let mut sorted: Vec<_> = counts.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let shown = sorted.len().min(MAX_ROWS);
    let biggest = sorted.first().map_or(1, |(_, c)| **c).max(1);
    // Labels come from the data: escaped, so that none can break the layout or fake a line.
    let names: Vec<_> = sorted[..shown]
        .iter()
        .map(|(n, _)| super::shown_name(n))
        .collect();
    let label_width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    for (name, (_, count)) in names.iter().zip(&sorted[..shown]) {
        let bar = (**count as usize * BAR_WIDTH).div_ceil(biggest as usize);
        let percent = **count as f64 * 100.0 / total.max(1) as f64;
        writeln!(
            f,
            "  {name:>label_width$} {count:>8} {percent:>5.1}% {}",
            "#".repeat(bar)
        )?;
    }
    if sorted.len() > shown {
        let rest: u64 = sorted[shown..].iter().map(|(_, c)| **c).sum();
        writeln!(f, "  ... {} more with {rest} samples", sorted.len() - shown)?;
    }
    Ok(())
}

#[derive(Serialize)]
struct BucketJson {
    lower: f64,
    upper: f64,
    count: u64,
}

impl Serialize for Histogram {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl Histogram {
    /// The histogram as plain rows, for JSON output.
    pub fn to_json(&self) -> serde_json::Value {
        let buckets: Vec<BucketJson> = {
            let mut all = Vec::new();
            for (&bucket, &count) in &self.buckets {
                let upper = if bucket == i64::MIN {
                    self.buckets
                        .keys()
                        .nth(1)
                        .map_or(1.0, |&b| self.lower_edge(b))
                } else {
                    self.lower_edge(bucket + 1)
                };
                all.push(BucketJson {
                    lower: self.lower_edge(bucket),
                    upper,
                    count,
                });
            }
            all
        };
        serde_json::json!({
            "name": self.name, "count": self.count, "min": self.min, "max": self.max, "mean": self.mean(), "buckets": buckets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels come from the data: one of any length is shown cut, and the table is made
    /// (a column width past 65,535 used to panic the formatter).
    #[test]
    fn a_label_of_any_length_is_shown_cut() {
        struct Categories(BTreeMap<String, u64>);
        impl fmt::Display for Categories {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt_categories(f, "labels", &self.0)
            }
        }
        let long = "L".repeat(70_000);
        let table = Categories(BTreeMap::from([(long, 3), ("cat".to_string(), 1)])).to_string();
        assert!(table.contains("... (69800 more characters)"), "{table}");
        assert!(table.len() < 1000, "{} bytes", table.len());
    }

    #[test]
    fn linear_buckets_and_merge() {
        let mut a = Histogram::new("w", Scale::Linear { width: 64.0 }, Unit::Count);
        let mut b = a.clone();
        for v in [0.0, 63.0, 64.0, 300.0] {
            a.add(v);
        }
        b.add(1000.0);
        a.merge(&b);
        assert_eq!(a.count, 5);
        assert_eq!(a.buckets[&0], 2);
        assert_eq!(a.buckets[&1], 1);
        assert_eq!(a.max, 1000.0);
        let text = a.to_string();
        assert!(text.contains("[0, 64)"), "{text}");
    }

    #[test]
    fn log_buckets() {
        let mut h = Histogram::new("bytes", Scale::Log2 { steps: 2 }, Unit::Bytes);
        for v in [0.0, 1024.0, 1500.0, 4096.0] {
            h.add(v);
        }
        assert_eq!(h.buckets[&i64::MIN], 1);
        assert_eq!(h.buckets[&20], 1);
        assert_eq!(h.buckets[&21], 1);
        let rows = h.rows();
        assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), 4);
        assert_eq!(rows[0].0, 0.0);
    }
}
