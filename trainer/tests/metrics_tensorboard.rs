//! The trainer's hand-written TensorBoard event files, read back by TensorBoard's own reader
//! (`tests/python/read_tensorboard.py` in the project's `.venv`, installed by
//! `scripts/setup.sh`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use trainer::metrics::{JSONL_FILE_NAME, MetricsWriter, metric_series, read_jsonl};

/// Points of each tag as TensorBoard reads them: `(step, value)`.
type Scalars = BTreeMap<String, Vec<(u64, f32)>>;

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ sits in the workspace root")
        .to_owned()
}

/// Runs TensorBoard's reader over `dir`; panics, saying how to install it, when it is missing.
fn read_with_tensorboard(dir: &Path) -> Scalars {
    let python = project_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh to create the project's Python environment \
         (it installs tensorboard, which this test needs)",
        python.display()
    );
    let script = project_root().join("tests/python/read_tensorboard.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}); if tensorboard is missing, run scripts/setup.sh\n{stderr}",
        script.display(),
        output.status
    );
    let json: BTreeMap<String, Vec<(u64, serde_json::Value)>> =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&output.stdout))
        });
    json.into_iter()
        .map(|(tag, points)| {
            let points = points
                .into_iter()
                .map(|(step, value)| {
                    let value = match &value {
                        serde_json::Value::Number(number) => number.as_f64().unwrap() as f32,
                        serde_json::Value::String(text) if text == "NaN" => f32::NAN,
                        serde_json::Value::String(text) if text == "Infinity" => f32::INFINITY,
                        serde_json::Value::String(text) if text == "-Infinity" => f32::NEG_INFINITY,
                        other => panic!("{tag} step {step}: unexpected value {other}"),
                    };
                    (step, value)
                })
                .collect();
            (tag, points)
        })
        .collect()
}

/// A loss-like and a learning-rate-like curve, deterministic and not exactly representable in
/// `f32`, so the comparison checks the conversion too.
fn scalars_at(step: u64, attempt: u64) -> [(&'static str, f64); 2] {
    let noise = ((step * 7919 + attempt * 104_729) % 1009) as f64 / 1009.0;
    let loss = 8.0 * (-(step as f64) / 120.0).exp() + 0.1 * noise + 0.01 * attempt as f64;
    let lr = 0.3 * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / 400.0).cos());
    [("train/loss", loss), ("train/lr", lr)]
}

/// Compares TensorBoard's points with the expected ones, values as `f32` (NaN equal to NaN).
fn assert_same(read: &Scalars, expected: &BTreeMap<&str, Vec<(u64, f64)>>) {
    let tags: Vec<&str> = read.keys().map(String::as_str).collect();
    let expected_tags: Vec<&str> = expected.keys().copied().collect();
    assert_eq!(tags, expected_tags);
    for (tag, points) in expected {
        let got = &read[*tag];
        assert_eq!(got.len(), points.len(), "{tag}: number of points");
        for (&(step, value), &(got_step, got_value)) in points.iter().zip(got) {
            let value = value as f32;
            assert_eq!(got_step, step, "{tag}");
            assert!(
                got_value.to_bits() == value.to_bits() || (got_value.is_nan() && value.is_nan()),
                "{tag} step {step}: TensorBoard read {got_value}, written {value}"
            );
        }
    }
}

#[test]
fn tensorboard_reads_every_logged_scalar() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = MetricsWriter::create(dir.path(), "tensorboard-check").unwrap();
    let mut expected: BTreeMap<&str, Vec<(u64, f64)>> = BTreeMap::new();
    for step in 0..300u64 {
        let mut scalars = scalars_at(step, 0);
        if step == 123 {
            // A diverging step: TensorBoard keeps NaN as a value.
            scalars[0].1 = f64::NAN;
        }
        writer.log(step, &scalars).unwrap();
        for (tag, value) in scalars {
            expected.entry(tag).or_default().push((step, value));
        }
    }
    drop(writer);

    let read = read_with_tensorboard(dir.path());
    assert_same(&read, &expected);
    // The JSON lines hold the same points.
    let records = read_jsonl(&dir.path().join(JSONL_FILE_NAME)).unwrap();
    assert_eq!(records.len(), 300);
    for (tag, points) in &expected {
        let series = metric_series(&records, tag);
        assert_eq!(series.len(), points.len());
        for (&(step, value), &(read_step, read_value)) in points.iter().zip(&series) {
            assert_eq!(read_step, step);
            assert!(read_value == value || (read_value.is_nan() && value.is_nan()));
        }
    }
}

#[test]
fn a_resumed_run_reads_as_its_newest_attempt() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The first attempt logs up to step 199, then dies after its checkpoint at step 150.
        let mut writer = MetricsWriter::create(dir.path(), "resumed").unwrap();
        for step in 0..200u64 {
            writer.log(step, &scalars_at(step, 0)).unwrap();
        }
    }
    {
        let mut writer = MetricsWriter::create(dir.path(), "resumed").unwrap();
        for step in 150..320u64 {
            writer.log(step, &scalars_at(step, 1)).unwrap();
        }
    }
    let event_files = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("tfevents")
        })
        .count();
    assert_eq!(event_files, 2);

    let mut expected: BTreeMap<&str, Vec<(u64, f64)>> = BTreeMap::new();
    for step in 0..320u64 {
        let attempt = u64::from(step >= 150);
        for (tag, value) in scalars_at(step, attempt) {
            expected.entry(tag).or_default().push((step, value));
        }
    }
    assert_same(&read_with_tensorboard(dir.path()), &expected);

    let records = read_jsonl(&dir.path().join(JSONL_FILE_NAME)).unwrap();
    assert_eq!(records.len(), 200 + 170);
    for (tag, points) in &expected {
        assert_eq!(&metric_series(&records, tag), points, "{tag}");
    }
}
