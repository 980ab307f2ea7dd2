//! Training metrics: one JSON line per logged step, TensorBoard event files, and a PNG chart
//! of one metric.
//!
//! A [`MetricsWriter`] owns a run's metrics folder. Every [`MetricsWriter::log`] call appends one
//! line to `metrics.jsonl` and one event to a TensorBoard event file, and hands both to the
//! operating system before it returns, so a crash of the trainer loses no logged step.
//!
//! ```
//! use trainer::metrics::{MetricsWriter, plot_png, read_jsonl};
//!
//! # fn main() -> std::io::Result<()> {
//! let run = tempfile::tempdir()?;
//! let mut metrics = MetricsWriter::create(run.path(), "swav-regnety-800mf")?;
//! for step in 0..100u64 {
//!     let loss = 8.0 / (1.0 + step as f64 / 10.0);
//!     metrics.log(step, &[("train/loss", loss), ("train/lr", 0.3)])?;
//! }
//! let records = read_jsonl(&run.path().join("metrics.jsonl"))?;
//! assert_eq!(records.len(), 100);
//! assert_eq!(records[99].1["train/lr"], 0.3);
//! plot_png(metrics.jsonl_path(), "train/loss", &run.path().join("loss.png"))?;
//! # Ok(())
//! # }
//! ```
//!
//! # Formats
//!
//! `metrics.jsonl` holds one object per `log` call, keys in call order:
//! `{"step":120,"wall_time":1767225600.25,"train/loss":4.71,"train/lr":0.3}`. JSON has no NaN
//! or infinity, so those values are written as the strings `"NaN"`, `"Infinity"` and
//! `"-Infinity"` (the spellings Python's `float()` accepts); [`read_jsonl`] turns them back into
//! numbers.
//!
//! The event file `events.out.tfevents.<unix-seconds>.<hostname>` uses TensorFlow's record
//! framing and `tensorboard.Event` messages (field numbers from tensorboard's `event.proto` and
//! `summary.proto`), encoded here by hand: the first record carries
//! `file_version = "brain.Event:2"`, the first `log` call also writes a `SessionLog.START` at
//! its step, and each `log` call writes one event with a `simple_value` per scalar, tagged with
//! the scalar's name (`train/loss`).
//!
//! # Resuming
//!
//! Creating a writer on a folder that already holds a run appends to its `metrics.jsonl` and
//! starts a new event file beside the old ones; TensorBoard reads every event file of a folder
//! as one run. A resumed run usually restarts from a checkpoint older than the last logged step,
//! so some steps are logged twice. The newer values win in both views: TensorBoard drops the
//! events at or after the step of a `SessionLog.START`, and [`metric_series`] (used by
//! [`plot_png`]) drops earlier values once the steps of a metric go back.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use image::{ImageFormat, Rgb, RgbImage};

/// Name of the JSON-lines file inside a metrics folder.
pub const JSONL_FILE_NAME: &str = "metrics.jsonl";

/// Prefix of TensorBoard event file names; TensorBoard reads every file whose name contains
/// `tfevents`.
pub const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

/// The event-file format version TensorBoard expects in the first record of each file.
const FILE_VERSION: &str = "brain.Event:2";

/// Keys of every JSON line that are not scalars; a scalar may not use them as its name.
const RESERVED_NAMES: [&str; 2] = ["step", "wall_time"];

/// Writes a run's metrics as JSON lines and as TensorBoard events.
///
/// Files are written without user-space buffering: each record is assembled in memory and
/// passed to the operating system in one `write` call, so whatever was logged survives a crash
/// of the process (not a crash of the machine: nothing is synced to disk).
#[derive(Debug)]
pub struct MetricsWriter {
    run_name: String,
    jsonl_path: PathBuf,
    jsonl: File,
    event_path: PathBuf,
    events: File,
    /// Whether the `SessionLog.START` event that opens this writer's part of the run is written.
    started: bool,
}

impl MetricsWriter {
    /// Opens the metrics folder `dir` for the run `run_name`, creating the folder if needed.
    ///
    /// Appends to `dir/metrics.jsonl` (created if missing; a last line cut short by a crash is
    /// removed first) and starts a new event file
    /// `dir/events.out.tfevents.<unix-seconds>.<hostname>`, with `.1`, `.2`, ... added when a
    /// file of that name already exists. The run name is recorded in the event file's
    /// `SessionLog.START` message; TensorBoard names runs after their folders.
    ///
    /// One writer at a time per folder: in data-parallel training only one process (rank 0)
    /// should log.
    pub fn create(dir: &Path, run_name: &str) -> io::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| with_path(e, "creating metrics folder", dir))?;

        let jsonl_path = dir.join(JSONL_FILE_NAME);
        remove_torn_last_line(&jsonl_path).map_err(|e| with_path(e, "repairing", &jsonl_path))?;
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl_path)
            .map_err(|e| with_path(e, "opening", &jsonl_path))?;

        let wall_time = unix_time();
        let (event_path, mut events) = create_event_file(dir, wall_time as u64)?;
        let header = tf_record(&encode_event(
            wall_time,
            0,
            EventBody::FileVersion(FILE_VERSION),
        ));
        events
            .write_all(&header)
            .map_err(|e| with_path(e, "writing", &event_path))?;

        Ok(Self {
            run_name: run_name.to_owned(),
            jsonl_path,
            jsonl,
            event_path,
            events,
            started: false,
        })
    }

    /// Logs the scalars of one training step: one line in `metrics.jsonl` and one TensorBoard
    /// event with a `simple_value` (stored as `f32`) for each scalar.
    ///
    /// Names are used as they are for JSON keys and TensorBoard tags (`train/loss`). NaN and
    /// infinite values are logged like any other. Fails with [`io::ErrorKind::InvalidInput`],
    /// writing nothing, when a name is empty, repeated within the call, or one of the reserved
    /// keys `step` and `wall_time`.
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> io::Result<()> {
        for (index, (name, _)) in scalars.iter().enumerate() {
            let problem = if name.is_empty() {
                Some("is empty")
            } else if RESERVED_NAMES.contains(name) {
                Some("is reserved for the record itself")
            } else if scalars[..index].iter().any(|(earlier, _)| earlier == name) {
                Some("appears twice in one log call")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("metric name {name:?} {problem} (run {:?})", self.run_name),
                ));
            }
        }

        let wall_time = unix_time();
        let mut records = Vec::new();
        if !self.started {
            let message = format!("run {}", self.run_name);
            records.extend(tf_record(&encode_event(
                wall_time,
                step,
                EventBody::SessionStart(&message),
            )));
        }
        let values: Vec<(&str, f32)> = scalars
            .iter()
            .map(|&(name, value)| (name, value as f32))
            .collect();
        records.extend(tf_record(&encode_event(
            wall_time,
            step,
            EventBody::Scalars(&values),
        )));
        self.events
            .write_all(&records)
            .map_err(|e| with_path(e, "writing", &self.event_path))?;
        self.started = true;

        self.jsonl
            .write_all(json_line(step, wall_time, scalars).as_bytes())
            .map_err(|e| with_path(e, "writing", &self.jsonl_path))
    }

    /// The run name given to [`MetricsWriter::create`].
    pub fn run_name(&self) -> &str {
        &self.run_name
    }

    /// Path of the JSON-lines file (`<dir>/metrics.jsonl`).
    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl_path
    }

    /// Path of the event file this writer started.
    pub fn event_path(&self) -> &Path {
        &self.event_path
    }
}

/// Reads a `metrics.jsonl` file: for each line, its step and every other field as a number
/// (`wall_time` included), in file order.
///
/// The strings `"NaN"`, `"Infinity"` and `"-Infinity"` and `null` are read as the values they
/// stand for (`null` as NaN). A last line without its newline that does not parse is skipped: a
/// writer may be in the middle of it. Any other malformed line fails with
/// [`io::ErrorKind::InvalidData`] naming the line.
pub fn read_jsonl(path: &Path) -> io::Result<Vec<(u64, BTreeMap<String, f64>)>> {
    let file = File::open(path).map_err(|e| with_path(e, "opening", path))?;
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut line = String::new();
    for line_number in 1.. {
        line.clear();
        if reader
            .read_line(&mut line)
            .map_err(|e| with_path(e, "reading", path))?
            == 0
        {
            break;
        }
        let complete = line.ends_with('\n');
        if line.trim().is_empty() {
            continue;
        }
        match parse_json_line(line.trim_end()) {
            Ok(record) => records.push(record),
            Err(_) if !complete => break,
            Err(problem) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} line {line_number}: {problem}", path.display()),
                ));
            }
        }
    }
    Ok(records)
}

/// The values of one metric in step order, from records as [`read_jsonl`] returns them.
///
/// When the steps of the metric go back (a run resumed from an older checkpoint), the values
/// logged earlier at that step or later are dropped: the newer attempt wins, as in TensorBoard.
/// Non-finite values are kept.
pub fn metric_series(records: &[(u64, BTreeMap<String, f64>)], metric: &str) -> Vec<(u64, f64)> {
    let mut series: Vec<(u64, f64)> = Vec::new();
    for (step, fields) in records {
        if let Some(&value) = fields.get(metric) {
            while series.last().is_some_and(|&(last, _)| last >= *step) {
                series.pop();
            }
            series.push((*step, value));
        }
    }
    series
}

/// Draws one metric of a `metrics.jsonl` file against the step and saves it as a PNG of
/// [`CHART_WIDTH`] x [`CHART_HEIGHT`] pixels.
///
/// The chart shows the raw values as a thin light line and an exponential moving average as a
/// thicker dark one, with the metric as its title, the smallest and largest value and the first
/// and last step as axis labels, and a line of summary figures. Values come from
/// [`metric_series`]; NaN and infinite values are left out (and counted in the summary line).
/// A single point is drawn as a dot and a constant metric as a level line. Fails with
/// [`io::ErrorKind::InvalidInput`] when no line of the file has the metric.
pub fn plot_png(jsonl: &Path, metric: &str, out: &Path) -> io::Result<()> {
    let records = read_jsonl(jsonl)?;
    if !records
        .iter()
        .any(|(_, fields)| fields.contains_key(metric))
    {
        let mut available: Vec<&str> = records
            .iter()
            .flat_map(|(_, fields)| fields.keys().map(String::as_str))
            .filter(|name| !RESERVED_NAMES.contains(name))
            .collect();
        available.sort_unstable();
        available.dedup();
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} has no metric {metric:?} (it has: {})",
                jsonl.display(),
                available.join(", ")
            ),
        ));
    }
    let chart = render_chart(metric, &metric_series(&records, metric));
    chart
        .save_with_format(out, ImageFormat::Png)
        .map_err(|e| match e {
            image::ImageError::IoError(e) => with_path(e, "writing", out),
            other => io::Error::other(format!("encoding {}: {other}", out.display())),
        })
}

// --- JSON lines ------------------------------------------------------------------------------

fn json_line(step: u64, wall_time: f64, scalars: &[(&str, f64)]) -> String {
    let mut line = format!("{{\"step\":{step},\"wall_time\":{}", json_number(wall_time));
    for (name, value) in scalars {
        let key = serde_json::Value::from(*name).to_string();
        line.push_str(&format!(",{key}:{}", json_number(*value)));
    }
    line.push_str("}\n");
    line
}

fn json_number(value: f64) -> String {
    if value.is_nan() {
        "\"NaN\"".to_owned()
    } else if value == f64::INFINITY {
        "\"Infinity\"".to_owned()
    } else if value == f64::NEG_INFINITY {
        "\"-Infinity\"".to_owned()
    } else {
        serde_json::Value::from(value).to_string()
    }
}

fn parse_json_line(line: &str) -> Result<(u64, BTreeMap<String, f64>), String> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let step = object
        .get("step")
        .ok_or("no \"step\"")?
        .as_u64()
        .ok_or("\"step\" is not a non-negative integer")?;
    let mut fields = BTreeMap::new();
    for (name, value) in object {
        if name == "step" {
            continue;
        }
        let number = match &value {
            serde_json::Value::Number(number) => number.as_f64(),
            serde_json::Value::Null => Some(f64::NAN),
            serde_json::Value::String(text) => match text.as_str() {
                "NaN" => Some(f64::NAN),
                "Infinity" => Some(f64::INFINITY),
                "-Infinity" => Some(f64::NEG_INFINITY),
                _ => None,
            },
            _ => None,
        }
        .ok_or_else(|| format!("{name:?} is not a number: {value}"))?;
        fields.insert(name, number);
    }
    Ok((step, fields))
}

/// Cuts a last line that has no newline (a write torn by a crash), so that the next record
/// starts on a line of its own.
fn remove_torn_last_line(path: &Path) -> io::Result<()> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let length = file.metadata()?.len();
    let mut end = length;
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let chunk = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(newline) = chunk.iter().rposition(|&byte| byte == b'\n') {
            end = start + newline as u64 + 1;
            break;
        }
        end = start;
    }
    if end < length {
        file.set_len(end)?;
    }
    Ok(())
}

// --- TensorBoard events ------------------------------------------------------------------------

fn create_event_file(dir: &Path, unix_seconds: u64) -> io::Result<(PathBuf, File)> {
    let base = format!("{EVENT_FILE_PREFIX}{unix_seconds}.{}", hostname());
    for attempt in 0u32.. {
        let name = match attempt {
            0 => base.clone(),
            n => format!("{base}.{n}"),
        };
        let path = dir.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(with_path(e, "creating", &path)),
        }
    }
    unreachable!("u32 attempts are not exhausted")
}

/// The machine's name, reduced to characters that are safe in a file name.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

fn unix_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// What an event carries besides its wall time and step.
enum EventBody<'a> {
    /// `Event.file_version`: the first record of every event file.
    FileVersion(&'a str),
    /// `Event.session_log` with status `START` and a message: marks where a (resumed) run
    /// starts writing, so readers drop older events at or after this step.
    SessionStart(&'a str),
    /// `Event.summary` with one `Summary.Value { tag, simple_value }` per scalar.
    Scalars(&'a [(&'a str, f32)]),
}

// Field numbers of tensorboard/compat/proto/event.proto and summary.proto.
const EVENT_WALL_TIME: u32 = 1; // double
const EVENT_STEP: u32 = 2; // int64
const EVENT_FILE_VERSION: u32 = 3; // string
const EVENT_SUMMARY: u32 = 5; // Summary
const EVENT_SESSION_LOG: u32 = 7; // SessionLog
const SESSION_LOG_STATUS: u32 = 1; // enum SessionStatus
const SESSION_LOG_STATUS_START: u64 = 1;
const SESSION_LOG_MSG: u32 = 3; // string
const SUMMARY_VALUE: u32 = 1; // repeated Summary.Value
const VALUE_TAG: u32 = 1; // string
const VALUE_SIMPLE_VALUE: u32 = 2; // float

/// Serializes a `tensorboard.Event`, fields in number order as protobuf encoders write them.
fn encode_event(wall_time: f64, step: u64, body: EventBody<'_>) -> Vec<u8> {
    let mut event = ProtoWriter::default();
    event.double(EVENT_WALL_TIME, wall_time);
    // int64 on the wire is the two's-complement varint, which for a u64 is its own bits.
    event.varint_field(EVENT_STEP, step);
    match body {
        EventBody::FileVersion(version) => event.bytes(EVENT_FILE_VERSION, version.as_bytes()),
        EventBody::SessionStart(message) => {
            let mut session_log = ProtoWriter::default();
            session_log.varint_field(SESSION_LOG_STATUS, SESSION_LOG_STATUS_START);
            if !message.is_empty() {
                session_log.bytes(SESSION_LOG_MSG, message.as_bytes());
            }
            event.bytes(EVENT_SESSION_LOG, &session_log.0);
        }
        EventBody::Scalars(values) => {
            let mut summary = ProtoWriter::default();
            for (tag, value) in values {
                let mut entry = ProtoWriter::default();
                entry.bytes(VALUE_TAG, tag.as_bytes());
                entry.float(VALUE_SIMPLE_VALUE, *value);
                summary.bytes(SUMMARY_VALUE, &entry.0);
            }
            event.bytes(EVENT_SUMMARY, &summary.0);
        }
    }
    event.0
}

/// Just enough of the protobuf wire format for the messages above.
#[derive(Default)]
struct ProtoWriter(Vec<u8>);

impl ProtoWriter {
    const VARINT: u32 = 0;
    const FIXED64: u32 = 1;
    const LENGTH_DELIMITED: u32 = 2;
    const FIXED32: u32 = 5;

    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.0.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
    }

    fn key(&mut self, field: u32, wire_type: u32) {
        self.varint(u64::from((field << 3) | wire_type));
    }

    fn varint_field(&mut self, field: u32, value: u64) {
        self.key(field, Self::VARINT);
        self.varint(value);
    }

    fn double(&mut self, field: u32, value: f64) {
        self.key(field, Self::FIXED64);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn float(&mut self, field: u32, value: f32) {
        self.key(field, Self::FIXED32);
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn bytes(&mut self, field: u32, bytes: &[u8]) {
        self.key(field, Self::LENGTH_DELIMITED);
        self.varint(bytes.len() as u64);
        self.0.extend_from_slice(bytes);
    }
}

/// Frames `data` as a TFRecord: length (u64 little-endian), masked CRC32C of the length, the
/// data, masked CRC32C of the data.
fn tf_record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// TFRecord's checksum: CRC32C, rotated and offset so that a CRC of data holding CRCs is not
/// itself trivially related to them.
fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78), one table lookup per byte: event
/// records are small and few, so a hardware or slicing implementation is not worth a dependency.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut index = 0;
        while index < 256 {
            let mut crc = index as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[index] = crc;
            index += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, &byte| {
        TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
    })
}

fn with_path(error: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("{action} {}: {error}", path.display()),
    )
}

// --- Chart ---------------------------------------------------------------------------------------

/// Width in pixels of the charts [`plot_png`] draws.
pub const CHART_WIDTH: u32 = 800;
/// Height in pixels of the charts [`plot_png`] draws.
pub const CHART_HEIGHT: u32 = 400;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const RAW_COLOR: Rgb<u8> = Rgb([168, 200, 232]);
const SMOOTHED_COLOR: Rgb<u8> = Rgb([24, 92, 168]);
const FRAME_COLOR: Rgb<u8> = Rgb([150, 150, 150]);
const GUIDE_COLOR: Rgb<u8> = Rgb([228, 228, 228]);
const TEXT_COLOR: Rgb<u8> = Rgb([40, 40, 40]);
const NOTE_COLOR: Rgb<u8> = Rgb([110, 110, 110]);

/// Text is drawn at twice the font's size: 12 x 16 pixels a character.
const TEXT_SCALE: i32 = 2;
const PLOT_TOP: i32 = 40;
const PLOT_BOTTOM: i32 = CHART_HEIGHT as i32 - 60;
const PLOT_RIGHT: i32 = CHART_WIDTH as i32 - 24;
/// Room between the frame and the first and last step, so end points are not on the frame.
const PLOT_INSET: f64 = 6.0;

fn render_chart(title: &str, series: &[(u64, f64)]) -> RgbImage {
    let mut canvas = Canvas::new(CHART_WIDTH, CHART_HEIGHT);
    let legend_smoothed = "ema";
    let legend_raw = "raw";
    let mut legend_x = PLOT_RIGHT - text_width(legend_smoothed);
    canvas.text(legend_x, 10, legend_smoothed, TEXT_COLOR);
    legend_x -= 34;
    canvas.stroke(
        &[
            (f64::from(legend_x), 18.0),
            (f64::from(legend_x + 26), 18.0),
        ],
        2.5,
        SMOOTHED_COLOR,
    );
    legend_x -= 24 + text_width(legend_raw);
    canvas.text(legend_x, 10, legend_raw, TEXT_COLOR);
    legend_x -= 34;
    canvas.stroke(
        &[
            (f64::from(legend_x), 18.0),
            (f64::from(legend_x + 26), 18.0),
        ],
        1.5,
        RAW_COLOR,
    );
    canvas.text(16, 10, &fit(title, legend_x - 16 - 16), TEXT_COLOR);

    let points: Vec<(u64, f64)> = series
        .iter()
        .copied()
        .filter(|(_, value)| value.is_finite())
        .collect();
    let skipped = series.len() - points.len();
    let mut summary = match points.len() {
        1 => "1 point".to_owned(),
        n => format!("{n} points"),
    };
    if skipped > 0 {
        summary.push_str(&format!(", {skipped} non-finite skipped"));
    }
    let summary_y = CHART_HEIGHT as i32 - 24;
    let summary_width = PLOT_RIGHT - 16;

    let Some(layout) = Layout::new(&points) else {
        canvas.frame(80, PLOT_TOP, PLOT_RIGHT, PLOT_BOTTOM);
        let message = "no finite values";
        canvas.text(
            (80 + PLOT_RIGHT - text_width(message)) / 2,
            (PLOT_TOP + PLOT_BOTTOM) / 2 - 8,
            message,
            NOTE_COLOR,
        );
        canvas.text(16, summary_y, &fit(&summary, summary_width), NOTE_COLOR);
        return canvas.image;
    };

    // Guides and labels at the smallest and largest value.
    let mut levels = vec![layout.max];
    if layout.min != layout.max {
        levels.push(layout.min);
    }
    for level in levels {
        let y = layout.y(level).round() as i32;
        canvas.fill_rect(layout.left + 1, y, PLOT_RIGHT - 1, y, GUIDE_COLOR);
        canvas.fill_rect(layout.left - 5, y, layout.left - 1, y, FRAME_COLOR);
        let label = format_value(level);
        canvas.text(
            layout.left - 10 - text_width(&label),
            y - 7,
            &label,
            TEXT_COLOR,
        );
    }
    canvas.frame(layout.left, PLOT_TOP, PLOT_RIGHT, PLOT_BOTTOM);

    let (first_step, last_step) = (points[0].0, points[points.len() - 1].0);
    let label_y = PLOT_BOTTOM + 8;
    let first_label = first_step.to_string();
    let first_x = layout.x(first_step).round() as i32;
    canvas.fill_rect(
        first_x,
        PLOT_BOTTOM + 1,
        first_x,
        PLOT_BOTTOM + 4,
        FRAME_COLOR,
    );
    canvas.text(layout.left, label_y, &first_label, TEXT_COLOR);
    if last_step != first_step {
        let last_label = last_step.to_string();
        let last_x = layout.x(last_step).round() as i32;
        canvas.fill_rect(
            last_x,
            PLOT_BOTTOM + 1,
            last_x,
            PLOT_BOTTOM + 4,
            FRAME_COLOR,
        );
        canvas.text(
            PLOT_RIGHT - text_width(&last_label),
            label_y,
            &last_label,
            TEXT_COLOR,
        );
    }
    canvas.text(
        (layout.left + PLOT_RIGHT - text_width("step")) / 2,
        label_y,
        "step",
        NOTE_COLOR,
    );

    let values: Vec<f64> = points.iter().map(|&(_, value)| value).collect();
    let smoothed = exponential_moving_average(&values);
    let to_pixels = |values: &[f64]| -> Vec<(f64, f64)> {
        points
            .iter()
            .zip(values)
            .map(|(&(step, _), &value)| (layout.x(step), layout.y(value)))
            .collect()
    };
    if points.len() == 1 {
        canvas.stroke(&to_pixels(&values), 8.0, SMOOTHED_COLOR);
    } else {
        canvas.stroke(&to_pixels(&values), 1.4, RAW_COLOR);
        canvas.stroke(&to_pixels(&smoothed), 2.4, SMOOTHED_COLOR);
    }

    // The smallest and largest value are on the axis already.
    let summary = format!(
        "last {}  ema {}  {summary}",
        format_value(values[values.len() - 1]),
        format_value(smoothed[smoothed.len() - 1]),
    );
    canvas.text(16, summary_y, &fit(&summary, summary_width), NOTE_COLOR);
    canvas.image
}

/// Where steps and values land in the chart.
struct Layout {
    left: i32,
    first_step: u64,
    last_step: u64,
    min: f64,
    max: f64,
    /// The value range drawn, a little wider than `min..max` so the curve stays off the frame.
    low: f64,
    high: f64,
}

impl Layout {
    /// `None` without points; `points` are finite and in step order.
    fn new(points: &[(u64, f64)]) -> Option<Self> {
        let (first, last) = (points.first()?, points.last()?);
        let min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        // Halves, so that the span of values near f64::MAX stays finite.
        let half_span = max / 2.0 - min / 2.0;
        let half_padding = if half_span > 0.0 {
            half_span * 0.08
        } else if min != 0.0 {
            min.abs() * 0.05
        } else {
            0.5
        };
        let low = min - half_padding * 2.0;
        let high = max + half_padding * 2.0;
        let (low, high) = if low.is_finite() && high.is_finite() {
            (low, high)
        } else {
            (min, max)
        };
        let label_width = text_width(&format_value(min)).max(text_width(&format_value(max)));
        Some(Self {
            left: (16 + label_width + 10).max(80),
            first_step: first.0,
            last_step: last.0,
            min,
            max,
            low,
            high,
        })
    }

    fn x(&self, step: u64) -> f64 {
        let (left, right) = (
            f64::from(self.left) + PLOT_INSET,
            f64::from(PLOT_RIGHT) - PLOT_INSET,
        );
        if self.last_step == self.first_step {
            return (left + right) / 2.0;
        }
        let fraction = (step - self.first_step) as f64 / (self.last_step - self.first_step) as f64;
        left + fraction * (right - left)
    }

    fn y(&self, value: f64) -> f64 {
        let (top, bottom) = (f64::from(PLOT_TOP), f64::from(PLOT_BOTTOM));
        let span = self.high / 2.0 - self.low / 2.0;
        if span <= 0.0 {
            return (top + bottom) / 2.0;
        }
        let fraction = (value / 2.0 - self.low / 2.0) / span;
        bottom - fraction * (bottom - top)
    }
}

/// Debiased exponential moving average (as TensorBoard's smoothing) whose span grows with the
/// number of points: about a fortieth of the curve, so long runs get as smooth as short ones.
fn exponential_moving_average(values: &[f64]) -> Vec<f64> {
    let span = (values.len() as f64 / 40.0).max(1.0);
    let alpha = 2.0 / (span + 1.0);
    let mut average = 0.0;
    let mut weight = 0.0;
    values
        .iter()
        .map(|&value| {
            average = (1.0 - alpha) * average + alpha * value;
            weight = (1.0 - alpha) * weight + alpha;
            average / weight
        })
        .collect()
}

/// A value in at most about 5 significant digits: `0.0123`, `4.71`, `12346`, `1.5e-5`.
fn format_value(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 || !value.is_finite() {
        return if value == 0.0 {
            "0".to_owned()
        } else {
            value.to_string()
        };
    }
    if !(1e-3..1e6).contains(&magnitude) {
        let text = format!("{value:.3e}");
        let (mantissa, exponent) = text.split_once('e').expect("LowerExp writes an exponent");
        return format!("{}e{exponent}", trim_fraction(mantissa));
    }
    let decimals = (4 - magnitude.log10().floor() as i32).max(0) as usize;
    trim_fraction(&format!("{value:.decimals$}")).to_owned()
}

fn trim_fraction(number: &str) -> &str {
    if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    }
}

/// An image with the few drawing operations a chart needs.
struct Canvas {
    image: RgbImage,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Self {
            image: RgbImage::from_pixel(width, height, BACKGROUND),
        }
    }

    /// Fills the rectangle with corners `(x0, y0)` and `(x1, y1)`, both included.
    fn fill_rect(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, color: Rgb<u8>) {
        let (width, height) = (self.image.width() as i32, self.image.height() as i32);
        for y in y0.max(0)..=y1.min(height - 1) {
            for x in x0.max(0)..=x1.min(width - 1) {
                self.image.put_pixel(x as u32, y as u32, color);
            }
        }
    }

    fn frame(&mut self, left: i32, top: i32, right: i32, bottom: i32) {
        self.fill_rect(left, top, right, top, FRAME_COLOR);
        self.fill_rect(left, bottom, right, bottom, FRAME_COLOR);
        self.fill_rect(left, top, left, bottom, FRAME_COLOR);
        self.fill_rect(right, top, right, bottom, FRAME_COLOR);
    }

    /// Draws an anti-aliased polyline of the given width through `points` (pixel coordinates;
    /// a single point is a dot). Coverage is collected for the whole line before blending, so
    /// joints are not darker than the segments.
    fn stroke(&mut self, points: &[(f64, f64)], width: f64, color: Rgb<u8>) {
        let (columns, rows) = (self.image.width() as usize, self.image.height() as usize);
        let mut coverage = vec![0f32; columns * rows];
        let half_width = width / 2.0;
        let reach = half_width + 1.0;
        let segments: Vec<((f64, f64), (f64, f64))> = match points {
            [] => Vec::new(),
            [point] => vec![(*point, *point)],
            _ => points.windows(2).map(|pair| (pair[0], pair[1])).collect(),
        };
        for (start, end) in segments {
            let pixel_range = |low: f64, high: f64, count: usize| {
                let first = (low - reach).floor().max(0.0) as usize;
                let last = ((high + reach).ceil().max(0.0) as usize).min(count - 1);
                first..=last
            };
            let xs = pixel_range(start.0.min(end.0), start.0.max(end.0), columns);
            for y in pixel_range(start.1.min(end.1), start.1.max(end.1), rows) {
                for x in xs.clone() {
                    let center = (x as f64 + 0.5, y as f64 + 0.5);
                    let distance = distance_to_segment(center, start, end);
                    let covered = (half_width + 0.5 - distance).clamp(0.0, 1.0) as f32;
                    let cell = &mut coverage[y * columns + x];
                    *cell = cell.max(covered);
                }
            }
        }
        for (index, &covered) in coverage.iter().enumerate() {
            if covered > 0.0 {
                let (x, y) = ((index % columns) as u32, (index / columns) as u32);
                let pixel = self.image.get_pixel_mut(x, y);
                for channel in 0..3 {
                    let under = f32::from(pixel.0[channel]);
                    let over = f32::from(color.0[channel]);
                    pixel.0[channel] = (under + (over - under) * covered).round() as u8;
                }
            }
        }
    }

    /// Writes `text` with its top-left corner at `(x, y)` in the built-in font.
    fn text(&mut self, x: i32, y: i32, text: &str, color: Rgb<u8>) {
        for (index, character) in text.chars().enumerate() {
            let glyph_x = x + index as i32 * GLYPH_ADVANCE * TEXT_SCALE;
            for (row, bits) in glyph(character).iter().enumerate() {
                for (column, mark) in bits.bytes().enumerate() {
                    if mark == b'#' {
                        let left = glyph_x + column as i32 * TEXT_SCALE;
                        let top = y + row as i32 * TEXT_SCALE;
                        self.fill_rect(
                            left,
                            top,
                            left + TEXT_SCALE - 1,
                            top + TEXT_SCALE - 1,
                            color,
                        );
                    }
                }
            }
        }
    }
}

fn distance_to_segment(point: (f64, f64), start: (f64, f64), end: (f64, f64)) -> f64 {
    let (dx, dy) = (end.0 - start.0, end.1 - start.1);
    let length_squared = dx * dx + dy * dy;
    let t = if length_squared == 0.0 {
        0.0
    } else {
        (((point.0 - start.0) * dx + (point.1 - start.1) * dy) / length_squared).clamp(0.0, 1.0)
    };
    let (nearest_x, nearest_y) = (start.0 + t * dx, start.1 + t * dy);
    (point.0 - nearest_x).hypot(point.1 - nearest_y)
}

/// `text`, cut and ended with `..` where it is wider than `width` pixels.
fn fit(text: &str, width: i32) -> String {
    if text_width(text) <= width {
        return text.to_owned();
    }
    let mut cut = text.to_owned();
    while !cut.is_empty() && text_width(&format!("{cut}..")) > width {
        cut.pop();
    }
    format!("{cut}..")
}

/// Width in pixels of `text` drawn by [`Canvas::text`].
fn text_width(text: &str) -> i32 {
    let characters = text.chars().count() as i32;
    (characters * GLYPH_ADVANCE - 1).max(0) * TEXT_SCALE
}

/// Horizontal distance between glyphs, in font pixels: 5 columns and a gap.
const GLYPH_ADVANCE: i32 = 6;

/// The 5 x 8 font pixels of a character (printable ASCII; anything else is drawn as `?`). Rows
/// 0-6 hold capitals and digits, row 7 the descenders of `g j p q y` and the underscore.
fn glyph(character: char) -> &'static [&'static str; 8] {
    FONT.iter()
        .find(|(known, _)| *known == character)
        .or_else(|| FONT.iter().find(|(known, _)| *known == '?'))
        .map(|(_, rows)| rows)
        .expect("the font has '?'")
}

#[rustfmt::skip]
const FONT: &[(char, [&str; 8])] = &[
    (' ', [".....", ".....", ".....", ".....", ".....", ".....", ".....", "....."]),
    ('!', ["..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#..", "....."]),
    ('"', [".#.#.", ".#.#.", ".....", ".....", ".....", ".....", ".....", "....."]),
    ('#', [".#.#.", ".#.#.", "#####", ".#.#.", "#####", ".#.#.", ".#.#.", "....."]),
    ('$', ["..#..", ".####", "#.#..", ".###.", "..#.#", "####.", "..#..", "....."]),
    ('%', ["##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##", "....."]),
    ('&', [".##..", "#..#.", "#.#..", ".#...", "#.#.#", "#..#.", ".##.#", "....."]),
    ('\'', ["..#..", "..#..", ".....", ".....", ".....", ".....", ".....", "....."]),
    ('(', ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#.", "....."]),
    (')', [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#...", "....."]),
    ('*', [".....", "..#..", "#.#.#", ".###.", "#.#.#", "..#..", ".....", "....."]),
    ('+', [".....", "..#..", "..#..", "#####", "..#..", "..#..", ".....", "....."]),
    (',', [".....", ".....", ".....", ".....", ".....", "..#..", "..#..", ".#..."]),
    ('-', [".....", ".....", ".....", "#####", ".....", ".....", ".....", "....."]),
    ('.', [".....", ".....", ".....", ".....", ".....", ".##..", ".##..", "....."]),
    ('/', [".....", "....#", "...#.", "..#..", ".#...", "#....", ".....", "....."]),
    ('0', [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.", "....."]),
    ('1', ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.", "....."]),
    ('2', [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####", "....."]),
    ('3', ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###.", "....."]),
    ('4', ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.", "....."]),
    ('5', ["#####", "#....", "####.", "....#", "....#", "#...#", ".###.", "....."]),
    ('6', ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###.", "....."]),
    ('7', ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...", "....."]),
    ('8', [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.", "....."]),
    ('9', [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##..", "....."]),
    (':', [".....", ".##..", ".##..", ".....", ".##..", ".##..", ".....", "....."]),
    (';', [".....", ".##..", ".##..", ".....", ".##..", "..#..", ".#...", "....."]),
    ('<', ["...#.", "..#..", ".#...", "#....", ".#...", "..#..", "...#.", "....."]),
    ('=', [".....", ".....", "#####", ".....", "#####", ".....", ".....", "....."]),
    ('>', [".#...", "..#..", "...#.", "....#", "...#.", "..#..", ".#...", "....."]),
    ('?', [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#..", "....."]),
    ('@', [".###.", "#...#", "....#", ".##.#", "#.#.#", "#.#.#", ".###.", "....."]),
    ('A', [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#", "....."]),
    ('B', ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####.", "....."]),
    ('C', [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###.", "....."]),
    ('D', ["###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###..", "....."]),
    ('E', ["#####", "#....", "#....", "####.", "#....", "#....", "#####", "....."]),
    ('F', ["#####", "#....", "#....", "####.", "#....", "#....", "#....", "....."]),
    ('G', [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####", "....."]),
    ('H', ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#", "....."]),
    ('I', [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.", "....."]),
    ('J', ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##..", "....."]),
    ('K', ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#", "....."]),
    ('L', ["#....", "#....", "#....", "#....", "#....", "#....", "#####", "....."]),
    ('M', ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#", "....."]),
    ('N', ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "....."]),
    ('O', [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.", "....."]),
    ('P', ["####.", "#...#", "#...#", "####.", "#....", "#....", "#....", "....."]),
    ('Q', [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#", "....."]),
    ('R', ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#", "....."]),
    ('S', [".####", "#....", "#....", ".###.", "....#", "....#", "####.", "....."]),
    ('T', ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "....."]),
    ('U', ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###.", "....."]),
    ('V', ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#..", "....."]),
    ('W', ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#.", "....."]),
    ('X', ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#", "....."]),
    ('Y', ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#..", "....."]),
    ('Z', ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####", "....."]),
    ('[', [".###.", ".#...", ".#...", ".#...", ".#...", ".#...", ".###.", "....."]),
    ('\\', [".....", "#....", ".#...", "..#..", "...#.", "....#", ".....", "....."]),
    (']', [".###.", "...#.", "...#.", "...#.", "...#.", "...#.", ".###.", "....."]),
    ('^', ["..#..", ".#.#.", "#...#", ".....", ".....", ".....", ".....", "....."]),
    ('_', [".....", ".....", ".....", ".....", ".....", ".....", ".....", "#####"]),
    ('`', [".#...", "..#..", ".....", ".....", ".....", ".....", ".....", "....."]),
    ('a', [".....", ".....", ".###.", "....#", ".####", "#...#", ".####", "....."]),
    ('b', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####.", "....."]),
    ('c', [".....", ".....", ".###.", "#....", "#....", "#...#", ".###.", "....."]),
    ('d', ["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####", "....."]),
    ('e', [".....", ".....", ".###.", "#...#", "#####", "#....", ".###.", "....."]),
    ('f', ["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#...", "....."]),
    ('g', [".....", ".....", ".####", "#...#", "#...#", ".####", "....#", ".###."]),
    ('h', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#", "....."]),
    ('i', ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###.", "....."]),
    ('j', ["...#.", ".....", "..##.", "...#.", "...#.", "...#.", "#..#.", ".##.."]),
    ('k', ["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "....."]),
    ('l', [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###.", "....."]),
    ('m', [".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#", "....."]),
    ('n', [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#", "....."]),
    ('o', [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###.", "....."]),
    ('p', [".....", ".....", "####.", "#...#", "#...#", "####.", "#....", "#...."]),
    ('q', [".....", ".....", ".####", "#...#", "#...#", ".####", "....#", "....#"]),
    ('r', [".....", ".....", "#.##.", "##..#", "#....", "#....", "#....", "....."]),
    ('s', [".....", ".....", ".####", "#....", ".###.", "....#", "####.", "....."]),
    ('t', [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##.", "....."]),
    ('u', [".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#", "....."]),
    ('v', [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#..", "....."]),
    ('w', [".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#.", "....."]),
    ('x', [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "....."]),
    ('y', [".....", ".....", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('z', [".....", ".....", "#####", "...#.", "..#..", ".#...", "#####", "....."]),
    ('{', ["...#.", "..#..", "..#..", ".#...", "..#..", "..#..", "...#.", "....."]),
    ('|', ["..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "..#..", "....."]),
    ('}', [".#...", "..#..", "..#..", "...#.", "..#..", "..#..", ".#...", "....."]),
    ('~', [".....", ".....", ".#...", "#.#.#", "...#.", ".....", ".....", "....."]),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn fields(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs
            .iter()
            .map(|&(name, value)| (name.to_owned(), value))
            .collect()
    }

    fn event_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(EVENT_FILE_PREFIX)
            })
            .collect();
        files.sort();
        files
    }

    /// Splits an event file into its records' payloads, checking the framing and checksums.
    fn read_records(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        let mut records = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let length_bytes: [u8; 8] = rest[..8].try_into().unwrap();
            let length = u64::from_le_bytes(length_bytes) as usize;
            let length_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
            assert_eq!(length_crc, masked_crc32c(&length_bytes));
            let data = &rest[12..12 + length];
            let data_crc = u32::from_le_bytes(rest[12 + length..16 + length].try_into().unwrap());
            assert_eq!(data_crc, masked_crc32c(data));
            records.push(data.to_vec());
            rest = &rest[16 + length..];
        }
        records
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720 appendix B.4 family of vectors).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        // 32 bytes of zeros, from RFC 3720 B.4.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn masked_crc32c_matches_tensorboard() {
        // Values from tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c.
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(&26u64.to_le_bytes()), 0x2dd8_9b12);
        let crc = crc32c(b"123456789");
        #[expect(
            clippy::manual_rotate,
            reason = "the mask as TFRecord's documentation writes it"
        )]
        let documented = ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), documented);
    }

    #[test]
    fn events_encode_as_tensorboard_serializes_them() {
        // Expected bytes from tensorboard.compat.proto.event_pb2.Event(...).SerializeToString().
        assert_eq!(
            hex(&encode_event(
                1.5,
                7,
                EventBody::FileVersion("brain.Event:2")
            )),
            "09000000000000f83f10071a0d627261696e2e4576656e743a32"
        );
        assert_eq!(
            hex(&encode_event(
                1.5,
                7,
                EventBody::Scalars(&[("train/loss", 0.25)])
            )),
            "09000000000000f83f10072a130a110a0a747261696e2f6c6f7373150000803e"
        );
        assert_eq!(
            hex(&encode_event(
                2.0,
                300,
                EventBody::Scalars(&[("train/loss", f32::NAN), ("lr", 1e-3)])
            )),
            "09000000000000004010ac022a1e0a110a0a747261696e2f6c6f7373150000c07f\
             0a090a026c72156f12833a"
        );
        assert_eq!(
            hex(&encode_event(
                1.5,
                7,
                EventBody::SessionStart("run swav-800mf")
            )),
            "09000000000000f83f10073a1208011a0e72756e20737761762d3830306d66"
        );
    }

    #[test]
    fn varints_use_seven_bits_a_byte() {
        let mut writer = ProtoWriter::default();
        for value in [0, 1, 127, 128, 300, u64::MAX] {
            writer.varint(value);
        }
        assert_eq!(hex(&writer.0), "00017f8001ac02ffffffffffffffffff01",);
    }

    #[test]
    fn tf_record_frames_length_and_data_with_checksums() {
        let record = tf_record(b"hello");
        assert_eq!(record.len(), 8 + 4 + 5 + 4);
        assert_eq!(&record[..8], &5u64.to_le_bytes());
        assert_eq!(
            &record[8..12],
            &masked_crc32c(&5u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&record[12..17], b"hello");
        assert_eq!(&record[17..], &masked_crc32c(b"hello").to_le_bytes());
    }

    #[test]
    fn writer_creates_jsonl_and_event_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = MetricsWriter::create(&dir.path().join("run"), "test-run").unwrap();
        assert_eq!(writer.run_name(), "test-run");
        writer
            .log(0, &[("train/loss", 2.5), ("train/lr", 0.1)])
            .unwrap();
        writer.log(1, &[("train/loss", 2.25)]).unwrap();

        let text = std::fs::read_to_string(writer.jsonl_path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("{\"step\":0,\"wall_time\":"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].ends_with(",\"train/loss\":2.5,\"train/lr\":0.1}"),
            "{}",
            lines[0]
        );

        let name = writer
            .event_path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with(EVENT_FILE_PREFIX), "{name}");
        let records = read_records(writer.event_path());
        // file_version, SessionLog.START, two summaries.
        assert_eq!(records.len(), 4);
        assert!(hex(&records[0]).ends_with(&hex(b"\x1a\x0dbrain.Event:2")));
        assert!(
            records[1]
                .windows(b"run test-run".len())
                .any(|window| window == b"run test-run")
        );
        assert!(
            records[2]
                .windows(b"train/lr".len())
                .any(|window| window == b"train/lr")
        );
    }

    #[test]
    fn resuming_appends_to_jsonl_and_starts_a_new_event_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut writer = MetricsWriter::create(dir.path(), "run").unwrap();
            for step in 0..3 {
                writer.log(step, &[("loss", step as f64)]).unwrap();
            }
        }
        {
            let mut writer = MetricsWriter::create(dir.path(), "run").unwrap();
            for step in 2..5 {
                writer.log(step, &[("loss", 10.0 + step as f64)]).unwrap();
            }
        }
        let records = read_jsonl(&dir.path().join(JSONL_FILE_NAME)).unwrap();
        let steps: Vec<u64> = records.iter().map(|(step, _)| *step).collect();
        assert_eq!(steps, [0, 1, 2, 2, 3, 4]);
        assert!(records.iter().all(|(_, fields)| fields["wall_time"] > 1e9));
        assert_eq!(
            metric_series(&records, "loss"),
            [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]
        );
        let files = event_files(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        for file in files {
            assert_eq!(read_records(&file).len(), 2 + 3);
        }
    }

    #[test]
    fn resuming_removes_a_line_torn_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut writer = MetricsWriter::create(dir.path(), "run").unwrap();
            writer.log(0, &[("loss", 1.0)]).unwrap();
        }
        let jsonl = dir.path().join(JSONL_FILE_NAME);
        let mut file = OpenOptions::new().append(true).open(&jsonl).unwrap();
        file.write_all(b"{\"step\":1,\"wall_ti").unwrap();
        drop(file);
        // A reader skips the torn line while a writer may still be finishing it.
        assert_eq!(read_jsonl(&jsonl).unwrap().len(), 1);

        let mut writer = MetricsWriter::create(dir.path(), "run").unwrap();
        writer.log(1, &[("loss", 0.5)]).unwrap();
        let records = read_jsonl(&jsonl).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].0, 1);
        assert_eq!(records[1].1["loss"], 0.5);
    }

    #[test]
    fn non_finite_values_round_trip_through_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = MetricsWriter::create(dir.path(), "run").unwrap();
        writer
            .log(
                3,
                &[
                    ("nan", f64::NAN),
                    ("inf", f64::INFINITY),
                    ("-inf", f64::NEG_INFINITY),
                    ("tiny", 1e-300),
                    ("quote\"name", 0.1 + 0.2),
                ],
            )
            .unwrap();
        let line = std::fs::read_to_string(writer.jsonl_path()).unwrap();
        assert!(line.contains("\"nan\":\"NaN\",\"inf\":\"Infinity\",\"-inf\":\"-Infinity\""));
        let records = read_jsonl(writer.jsonl_path()).unwrap();
        let (step, fields) = &records[0];
        assert_eq!(*step, 3);
        assert!(fields["nan"].is_nan());
        assert_eq!(fields["inf"], f64::INFINITY);
        assert_eq!(fields["-inf"], f64::NEG_INFINITY);
        assert_eq!(fields["tiny"], 1e-300);
        assert_eq!(fields["quote\"name"], 0.1 + 0.2);
    }

    #[test]
    fn bad_names_are_rejected_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = MetricsWriter::create(dir.path(), "run").unwrap();
        for scalars in [
            &[("", 1.0)][..],
            &[("step", 1.0)],
            &[("wall_time", 1.0)],
            &[("loss", 1.0), ("loss", 2.0)],
        ] {
            let error = writer.log(0, scalars).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
        }
        assert_eq!(std::fs::read(writer.jsonl_path()).unwrap().len(), 0);
        assert_eq!(read_records(writer.event_path()).len(), 1);
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JSONL_FILE_NAME);
        std::fs::write(&path, "{\"step\":1,\"a\":1}\n\n{\"step\":-2}\n").unwrap();
        let error = read_jsonl(&path).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("line 3"), "{error}");
        std::fs::write(&path, "{\"step\":1,\"a\":[1]}\n").unwrap();
        assert!(read_jsonl(&path).unwrap_err().to_string().contains("\"a\""));
        std::fs::write(&path, "{\"step\":1,\"a\":null}\n").unwrap();
        assert!(read_jsonl(&path).unwrap()[0].1["a"].is_nan());
    }

    #[test]
    fn metric_series_keeps_the_newest_attempt() {
        let records = vec![
            (0, fields(&[("loss", 5.0)])),
            (10, fields(&[("loss", 4.0), ("eval", 1.0)])),
            (20, fields(&[("loss", 3.0)])),
            (30, fields(&[("loss", 2.0)])),
            (20, fields(&[("loss", 3.5)])),
            (25, fields(&[("other", 0.0)])),
            (30, fields(&[("loss", f64::NAN)])),
        ];
        let series = metric_series(&records, "loss");
        assert_eq!(&series[..3], &[(0, 5.0), (10, 4.0), (20, 3.5)]);
        assert_eq!(series[3].0, 30);
        assert!(series[3].1.is_nan());
        assert_eq!(metric_series(&records, "eval"), [(10, 1.0)]);
        assert!(metric_series(&records, "missing").is_empty());
    }

    #[test]
    fn values_are_formatted_compactly() {
        let cases = [
            (0.0, "0"),
            (1.0, "1"),
            (4.71234567, "4.7123"),
            (-0.25, "-0.25"),
            (0.0123, "0.0123"),
            (12345.6, "12346"),
            (123456.0, "123456"),
            (1.5e-5, "1.5e-5"),
            (2.0e7, "2e7"),
            (-3.25e-9, "-3.25e-9"),
        ];
        for (value, expected) in cases {
            assert_eq!(format_value(value), expected, "{value}");
        }
    }

    fn write_series(dir: &Path, values: &[f64]) -> PathBuf {
        let mut writer = MetricsWriter::create(dir, "plot").unwrap();
        for (step, value) in values.iter().enumerate() {
            writer
                .log(step as u64 * 10, &[("train/loss", *value), ("lr", 0.1)])
                .unwrap();
        }
        writer.jsonl_path().to_owned()
    }

    fn is_smoothed_color(pixel: &Rgb<u8>) -> bool {
        let [r, _, b] = pixel.0;
        b > 120 && r < 120 && b as i32 - r as i32 > 60
    }

    fn plot(values: &[f64]) -> RgbImage {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = write_series(dir.path(), values);
        let out = dir.path().join("loss.png");
        plot_png(&jsonl, "train/loss", &out).unwrap();
        let image = image::open(&out).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (CHART_WIDTH, CHART_HEIGHT));
        image
    }

    /// Columns of the plot area that hold the dark (smoothed) curve.
    fn curve_columns(image: &RgbImage) -> Vec<u32> {
        (0..CHART_WIDTH)
            .filter(|&x| {
                (PLOT_TOP as u32 + 1..PLOT_BOTTOM as u32)
                    .any(|y| is_smoothed_color(image.get_pixel(x, y)))
            })
            .collect()
    }

    #[test]
    fn png_shows_the_curve_across_the_plot() {
        let values: Vec<f64> = (0..300)
            .map(|i| 5.0 * (-(i as f64) / 80.0).exp() + 0.3 * ((i * 7919 % 101) as f64 / 101.0))
            .collect();
        let image = plot(&values);
        let layout = Layout::new(
            &values
                .iter()
                .enumerate()
                .map(|(i, v)| (i as u64 * 10, *v))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let first = layout.x(0).round() as u32;
        let last = layout.x(2990).round() as u32;
        let columns = curve_columns(&image);
        for x in first..=last {
            assert!(columns.contains(&x), "no curve in column {x}");
        }
        // The raw values are drawn too, lighter, and reach the extremes.
        let raw_pixels = image
            .pixels()
            .filter(|pixel| (0..3).all(|c| pixel.0[c].abs_diff(RAW_COLOR.0[c]) < 12))
            .count();
        assert!(raw_pixels > 300, "{raw_pixels} raw pixels");
        // The curve falls: the smoothed line is lower at the end than at the start.
        let height_in = |x: u32| {
            (PLOT_TOP as u32..PLOT_BOTTOM as u32)
                .find(|&y| is_smoothed_color(image.get_pixel(x, y)))
                .unwrap()
        };
        assert!(height_in(first + 2) < height_in(last - 2));
        // Title and labels are drawn.
        let text_pixels = image.pixels().filter(|pixel| **pixel == TEXT_COLOR).count();
        assert!(text_pixels > 500, "{text_pixels} text pixels");
    }

    #[test]
    fn png_handles_one_point_constant_and_non_finite_values() {
        let dot = curve_columns(&plot(&[3.0]));
        assert!(!dot.is_empty() && dot.len() < 20, "{dot:?}");

        let constant = plot(&[2.0; 50]);
        let columns = curve_columns(&constant);
        assert!(columns.len() > 600, "{} columns", columns.len());
        let rows: Vec<u32> = (0..CHART_HEIGHT)
            .filter(|&y| is_smoothed_color(constant.get_pixel(400, y)))
            .collect();
        assert!(rows.len() <= 4, "{rows:?}");

        let mut values: Vec<f64> = (0..100).map(|i| i as f64).collect();
        values[10] = f64::NAN;
        values[50] = f64::INFINITY;
        values[90] = f64::NEG_INFINITY;
        assert!(curve_columns(&plot(&values)).len() > 600);

        let nothing = plot(&[f64::NAN, f64::NAN]);
        assert!(curve_columns(&nothing).is_empty());

        let huge = plot(&[f64::MAX, -f64::MAX, 0.0]);
        assert!(curve_columns(&huge).len() > 600);
    }

    #[test]
    fn png_of_a_missing_metric_lists_the_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = write_series(dir.path(), &[1.0, 2.0]);
        let error = plot_png(&jsonl, "train/los", &dir.path().join("x.png")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("lr, train/loss"), "{error}");
    }

    #[test]
    fn every_glyph_is_five_by_eight() {
        for (character, rows) in FONT {
            for row in rows {
                assert_eq!(row.len(), 5, "{character:?}");
                assert!(row.bytes().all(|b| b == b'#' || b == b'.'), "{character:?}");
            }
        }
        for character in ' '..='~' {
            assert!(
                FONT.iter().any(|(known, _)| *known == character),
                "{character:?}"
            );
        }
    }
}
