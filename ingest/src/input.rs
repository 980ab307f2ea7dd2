//! Where the images come from: a listed object-store prefix or a list file.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::stream::{BoxStream, StreamExt};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use shards::{Location, StoreOptions};

use crate::{IngestError, with_causes};

/// One image to ingest, as planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceItem {
    /// The image's URL (`s3://b/k`, `https://h/p`, `file:///p`).
    pub url: String,
    /// Its label, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cls: Option<String>,
}

/// How labels are attached to inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabelSource {
    /// No labels.
    #[default]
    None,
    /// The name of the folder holding each image (ImageFolder's convention).
    FolderName,
    /// A column of a CSV or JSONL list file.
    Column(String),
}

/// Format of a list file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ListFormat {
    /// Guess from the file's extension (`.csv`, `.jsonl`/`.ndjson`/`.json`, else text).
    Auto,
    /// One URL or path per line.
    Txt,
    /// CSV with a header row and a URL column.
    Csv,
    /// One JSON object per line with a URL field.
    Jsonl,
}

/// What the job reads, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    /// A prefix URL to list recursively, or a list file when `list` is set.
    pub url: String,
    /// Read `url` as a list file rather than listing it.
    pub list: bool,
    /// Format of the list file.
    pub list_format: ListFormat,
    /// Column (CSV) or field (JSONL) holding the URL.
    pub url_column: String,
    /// Labels.
    pub labels: LabelSource,
    /// File extensions kept when listing a prefix (lower case, no dot).
    pub extensions: Vec<String>,
}

/// Default extensions kept when listing a prefix.
pub const DEFAULT_EXTENSIONS: &[&str] =
    &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

fn extension_of(name: &str) -> Option<String> {
    let file = name.rsplit('/').next()?;
    let (_, ext) = file.rsplit_once('.')?;
    Some(ext.to_ascii_lowercase())
}

/// The label of a listed object under `--labels-from-folders`: ImageFolder's convention, the
/// first folder below the listed prefix (`root/CLASS/any/depth/x.jpg`); none for an object
/// directly in the prefix.
fn class_folder(prefix: &str, name: &str) -> Option<String> {
    let relative = name.strip_prefix(prefix)?.trim_start_matches('/');
    let (first, rest) = relative.split_once('/')?;
    (!first.is_empty() && !rest.is_empty()).then(|| first.to_string())
}

/// The label of a list entry under `--labels-from-folders`: the name of the folder holding
/// the file (a list has no root to count from), percent-decoded from a URL; none for a file
/// at a web server's root or with no folder.
fn parent_folder(entry: &str) -> Option<String> {
    let path = match url::Url::parse(entry) {
        Ok(url) if url.has_host() || url.scheme() == "file" => {
            let segments: Vec<&str> = url.path_segments()?.collect();
            let (_, folders) = segments.split_last()?;
            let folder = folders.iter().rev().find(|s| !s.is_empty())?;
            return Some(
                percent_encoding::percent_decode_str(folder)
                    .decode_utf8_lossy()
                    .into_owned(),
            );
        }
        // A plain path (a Windows drive letter parses as a scheme).
        _ => entry,
    };
    let mut parts = path.rsplit('/');
    parts.next()?;
    parts.find(|p| !p.is_empty()).map(str::to_string)
}

/// Streams the input's items, in the order the store lists them (or the
/// list file gives them). The stream holds one page of a listing or one
/// line of a list file at a time, whatever the input's size.
pub async fn items(
    spec: &InputSpec,
    options: &StoreOptions,
) -> Result<BoxStream<'static, Result<SourceItem, IngestError>>, IngestError> {
    if spec.list {
        list_file_items(spec, options).await
    } else {
        listed_items(spec, options)
    }
}

fn listed_items(
    spec: &InputSpec,
    options: &StoreOptions,
) -> Result<BoxStream<'static, Result<SourceItem, IngestError>>, IngestError> {
    // A local file named as the input is most likely a list that lacks --list.
    if let Some(path) = local_path(&spec.url)
        && path.is_file()
    {
        return Err(IngestError::Config(format!(
            "{} is a file, not a folder: a list of sources needs --list (to ingest one image, put it in a folder)",
            path.display()
        )));
    }
    let location = Location::open(&spec.url, options, false).map_err(IngestError::Input)?;
    let extensions = spec.extensions.clone();
    let by_folder = spec.labels == LabelSource::FolderName;
    if matches!(spec.labels, LabelSource::Column(_)) {
        return Err(IngestError::Config("--label-column needs a list file (--list); with a listed prefix use --labels-from-folders".into()));
    }
    if let Some(root) = local_path(&location.url) {
        return Ok(local_items(root, location, extensions, by_folder));
    }
    let prefix = (!location.prefix.as_ref().is_empty()).then(|| location.prefix.clone());
    let store = location.store.clone();
    let stream = store.list(prefix.as_ref()).filter_map(move |meta| {
        let location = location.clone();
        let extensions = extensions.clone();
        async move {
            match meta {
                Err(source) => Some(Err(IngestError::Listing {
                    url: location.url.clone(),
                    source,
                })),
                Ok(meta) => {
                    let name = meta.location.as_ref();
                    let ext = extension_of(name)?;
                    if !extensions.contains(&ext) {
                        return None;
                    }
                    let url = object_url(&location, &meta.location);
                    let cls = if by_folder {
                        class_folder(location.prefix.as_ref(), name)
                    } else {
                        None
                    };
                    Some(Ok(SourceItem { url, cls }))
                }
            }
        }
    });
    Ok(stream.boxed())
}

/// The local file or folder an input URL or path names, without the trailing slash a local
/// path gets as a folder URL; `None` for other stores.
fn local_path(url: &str) -> Option<std::path::PathBuf> {
    let url = shards::store::normalize_url(url).ok()?;
    if url.scheme() != "file" {
        return None;
    }
    Some(url.to_file_path().ok()?.components().collect())
}

/// Files listed in a local folder per batch of the blocking walk.
const LOCAL_LISTING_BATCH: usize = 1024;

/// A local folder's files, walked as object_store's local listing walks them (recursively,
/// following links; a dangling link or an entry removed while listed is skipped; a folder that
/// cannot be read stops the job, named), with three differences, each where object_store's
/// listing ends at the first such entry and loses every file after it:
/// - a file whose name is not UTF-8 (an archive from an old system, say) or holds characters
///   object_store's paths refuse is planned under its percent-encoded URL like any other, and
///   read with the file system's calls ([`Source::File`]);
/// - a link to a folder above it is not followed, with a warning (its files are listed once);
/// - a file whose metadata cannot be read (in a folder that may be listed but not entered) is
///   planned too, and fails alone with its reason, instead of being left out unnamed; so is a
///   FIFO, socket or device with an image's name (`not_a_file`).
fn local_items(
    root: std::path::PathBuf,
    location: Location,
    extensions: Vec<String>,
    by_folder: bool,
) -> BoxStream<'static, Result<SourceItem, IngestError>> {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<Result<SourceItem, IngestError>>>(2);
    let walk = move || {
        let mut batch = Vec::with_capacity(LOCAL_LISTING_BATCH);
        let entries = walkdir::WalkDir::new(&root).min_depth(1).follow_links(true);
        for entry in entries {
            let item = match entry {
                // A link back to a folder being walked: its files are listed once, there.
                Err(error) if error.loop_ancestor().is_some() => {
                    let path = error.path().unwrap_or(&root).display().to_string();
                    tracing::warn!("{path}: a link to a folder above it, not followed");
                    continue;
                }
                // A dangling link, or an entry removed while listed: nothing to read (as
                // object_store's listing skips them).
                Err(error)
                    if error
                        .io_error()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                // A folder that cannot be read: its files are unknown, so the job stops and
                // names it rather than go on without them.
                Err(error) => Err(IngestError::Listing {
                    url: location.url.clone(),
                    source: object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(error),
                    },
                }),
                Ok(entry) => {
                    match std::fs::metadata(entry.path()) {
                        Ok(metadata) if metadata.is_dir() => continue,
                        // A FIFO, socket or device with an image's name: planned, it fails
                        // alone (not_a_file, named in the shard's stats, never opened)
                        // instead of being left out without a word.
                        Ok(_) => {}
                        // Gone since it was listed.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        // Unreadable (in a folder that may be listed but not entered): planned
                        // like any file, it fails alone with its reason (permission_denied)
                        // instead of being left out unnamed.
                        Err(_) => {}
                    }
                    let relative = entry.path().strip_prefix(&root).unwrap_or(entry.path());
                    let name = relative.to_string_lossy().replace('\\', "/");
                    match extension_of(&name) {
                        Some(ext) if extensions.contains(&ext) => {}
                        _ => continue,
                    }
                    let Ok(url) = url::Url::from_file_path(entry.path()) else {
                        continue;
                    };
                    let cls = if by_folder {
                        class_folder("", &name)
                    } else {
                        None
                    };
                    Ok(SourceItem {
                        url: url.to_string(),
                        cls,
                    })
                }
            };
            let stop = item.is_err();
            batch.push(item);
            if (batch.len() == LOCAL_LISTING_BATCH || stop)
                && sender.blocking_send(std::mem::take(&mut batch)).is_err()
            {
                return;
            }
            if stop {
                return;
            }
        }
        if !batch.is_empty() {
            // The receiver may be gone (the plan stopped); nothing is left to do then.
            let _ = sender.blocking_send(batch);
        }
    };
    tokio::task::spawn_blocking(walk);
    tokio_stream::wrappers::ReceiverStream::new(receiver)
        .flat_map(futures::stream::iter)
        .boxed()
}

/// The URL of an object of a location, as stored in metadata and plans.
pub fn object_url(location: &Location, path: &Path) -> String {
    if location.url.starts_with("file:") {
        // The local store is rooted at the location's folder: rebuild an absolute file URL.
        let base = url::Url::parse(&location.url)
            .ok()
            .and_then(|u| u.to_file_path().ok());
        if let Some(base) = base {
            let mut file = base;
            for part in path.parts() {
                file.push(part.as_ref());
            }
            if let Ok(url) = url::Url::from_file_path(&file) {
                return url.to_string();
            }
        }
    }
    location.url_of(path)
}

async fn list_file_items(
    spec: &InputSpec,
    options: &StoreOptions,
) -> Result<BoxStream<'static, Result<SourceItem, IngestError>>, IngestError> {
    let format = match (spec.list_format, extension_of(&spec.url).as_deref()) {
        (ListFormat::Auto, Some("csv")) => ListFormat::Csv,
        (ListFormat::Auto, Some("jsonl" | "ndjson" | "json")) => ListFormat::Jsonl,
        (ListFormat::Auto, _) => ListFormat::Txt,
        (other, _) => other,
    };
    if let (ListFormat::Txt, LabelSource::Column(column)) = (format, &spec.labels) {
        return Err(IngestError::Config(format!(
            "--label-column {column}: {} is read as a text list, one URL per line, which has no columns; labels from a column need a CSV or JSONL list (--list-format, or a .csv/.jsonl name)",
            spec.url
        )));
    }
    if let Some(path) = local_path(&spec.url)
        && let Ok(metadata) = std::fs::metadata(path)
    {
        if metadata.is_dir() {
            return Err(IngestError::Config(format!(
                "{}: is a folder; --list takes a list file (to ingest the images in a folder, name it without --list)",
                spec.url
            )));
        }
        // A pipe or a device cannot be read as an object (and a process substitution gives
        // one): the plan may need to read the list again.
        if !metadata.is_file() {
            return Err(IngestError::Config(format!(
                "{}: is not a regular file (a pipe or a device?); --list takes a list file: write the list to a file first",
                spec.url
            )));
        }
    }
    let (base, object) = shards::store::split_object_url(&spec.url).map_err(IngestError::Input)?;
    let location = Location::open(&base, options, false).map_err(IngestError::Input)?;
    let path = Path::from_url_path(&object)
        .map_err(|e| IngestError::Config(format!("{}: {e}", spec.url)))?;
    let result = location
        .store
        .get(&path)
        .await
        .map_err(|source| IngestError::Fetch {
            url: spec.url.clone(),
            source,
        })?;
    let reader = tokio_util::io::StreamReader::new(
        result
            .into_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other)),
    );
    // Lines longer than a record may be are refused as they are read, not gathered whole
    // into memory (a list with no line breaks, or the wrong file).
    let lines = tokio_util::codec::FramedRead::new(
        reader,
        tokio_util::codec::LinesCodec::new_with_max_length(MAX_CSV_RECORD_BYTES),
    )
    .map(|line| {
        line.map_err(|e| match e {
            tokio_util::codec::LinesCodecError::MaxLineLengthExceeded => format!(
                "line longer than {MAX_CSV_RECORD_BYTES} bytes (a list holds one source per line)"
            ),
            tokio_util::codec::LinesCodecError::Io(e) => e.to_string(),
        })
    });
    // `None` marks the end, where a CSV record still open is an error, not dropped.
    let lines = lines.map(Some).chain(futures::stream::once(async { None }));
    let list_url = spec.url.clone();
    let url_column = spec.url_column.clone();
    let labels = spec.labels.clone();
    let mut header: Option<Vec<String>> = None;
    let mut line_number = 0usize;
    // A CSV record whose quoted field spans lines (a caption with a line break, say), with
    // the number of its first line.
    let mut open_record: Option<(CsvRecord, usize)> = None;
    let stream = lines.filter_map(move |line| {
        let error = |line: usize, reason: String| {
            Some(Err(IngestError::ListFile {
                url: list_url.clone(),
                line,
                reason,
            }))
        };
        let Some(line) = line else {
            let parsed = open_record.take().and_then(|(_, first)| {
                error(
                    first,
                    format!(
                        "a quoted field opened here is not closed by the end of the file ({UNTERMINATED_QUOTE})"
                    ),
                )
            });
            return std::future::ready(parsed);
        };
        line_number += 1;
        // A byte-order mark (spreadsheets write one) is not part of the first line's text.
        let line = line.map(|l| match l.strip_prefix('\u{feff}') {
            Some(rest) if line_number == 1 => rest.to_string(),
            _ => l,
        });
        let parsed = match line {
            Err(reason) => error(line_number, reason),
            // Lines are split at LF (a CR before it is dropped): a CR left inside a line is a
            // file whose lines end in CR alone, all read as one line, or a stray control
            // character that no URL, label or JSON line holds.
            Ok(line) if line.contains('\r') => error(
                line_number,
                "holds a carriage return inside the line: lines must end in LF or CRLF, not in \
                 CR alone (as on classic Mac OS); convert the file's line endings"
                    .to_string(),
            ),
            Ok(line) if format == ListFormat::Csv => {
                let (mut record, first) = match open_record.take() {
                    Some(open) => open,
                    None if line.trim().is_empty() => return std::future::ready(None),
                    None => (CsvRecord::default(), line_number),
                };
                if record.push_line(&line) {
                    match parse_csv_fields(record.finish(), &mut header, &url_column, &labels) {
                        Ok(item) => item.map(Ok),
                        Err(reason) => error(first, reason),
                    }
                } else if record.bytes > MAX_CSV_RECORD_BYTES {
                    error(
                        first,
                        format!(
                            "a quoted field opened here runs past {MAX_CSV_RECORD_BYTES} bytes, the most a record may hold ({UNTERMINATED_QUOTE})"
                        ),
                    )
                } else {
                    open_record = Some((record, first));
                    None
                }
            }
            Ok(line)
                if line.trim().is_empty() || line.starts_with('#') && format == ListFormat::Txt =>
            {
                None
            }
            Ok(line) => match parse_list_line(&line, format, &mut header, &url_column, &labels) {
                Ok(item) => item.map(Ok),
                Err(reason) => error(line_number, reason),
            },
        };
        std::future::ready(parsed.map(|item| item.map(absolutize)))
    });
    Ok(stream.boxed())
}

/// The longest line, and CSV record, of a list file read: a quoted field may hold line breaks,
/// but one left open by mistake, or a file with no line breaks, must not be gathered whole
/// into memory.
const MAX_CSV_RECORD_BYTES: usize = 1 << 20;

/// What an open quote in a CSV list usually is.
const UNTERMINATED_QUOTE: &str = "a field that starts with a quote must end with one; a quote inside a quoted field is written twice";

/// Relative paths in a list file are relative to the current folder, like a shell's. A URL
/// that cannot be read as one stays as written: it is that source's failure (`bad_url`, named
/// when the shard is made), not the job's.
fn absolutize(mut item: SourceItem) -> SourceItem {
    if let Ok(url) = shards::store::normalize_url(&item.url) {
        item.url = url.as_str().trim_end_matches('/').to_string();
    }
    item
}

fn parse_list_line(
    line: &str,
    format: ListFormat,
    header: &mut Option<Vec<String>>,
    url_column: &str,
    labels: &LabelSource,
) -> Result<Option<SourceItem>, String> {
    match format {
        ListFormat::Txt | ListFormat::Auto => {
            let url = line.trim().to_string();
            let cls = if *labels == LabelSource::FolderName {
                parent_folder(&url)
            } else {
                None
            };
            Ok(Some(SourceItem { url, cls }))
        }
        ListFormat::Csv => {
            let fields = split_csv_line(line)
                .ok_or_else(|| format!("unterminated quote ({UNTERMINATED_QUOTE})"))?;
            parse_csv_fields(fields, header, url_column, labels)
        }
        ListFormat::Jsonl => {
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
            if !value.is_object() {
                return Err(format!(
                    "{} where a JSON object was expected: the list must hold one object per line (JSON Lines)",
                    if value.is_array() {
                        "an array"
                    } else {
                        "a value"
                    }
                ));
            }
            let text = |name: &str| -> Result<String, String> {
                match value.get(name) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    // An integer is its digits; a fraction (5.0 beside 5 would make two
                    // classes) or an integer too large for 64 bits (read as an inexact
                    // float) is refused rather than guessed.
                    Some(serde_json::Value::Number(n)) if !n.is_f64() => Ok(n.to_string()),
                    Some(serde_json::Value::Number(n)) => Err(format!(
                        "field {name:?} is the number {n}, not an integer of at most 64 bits: \
                         give it as a string"
                    )),
                    Some(_) => Err(format!("field {name:?} is not a string or number")),
                    None => Err(format!("no field {name:?}")),
                }
            };
            let url = match value.get(url_column) {
                Some(serde_json::Value::String(url)) => checked_url(url, url_column)?,
                Some(other) => return Err(format!("field {url_column:?} is {other}, not a URL")),
                None => text(url_column)?,
            };
            let cls = match labels {
                LabelSource::Column(name) => Some(text(name)?),
                LabelSource::FolderName => parent_folder(&url),
                LabelSource::None => None,
            };
            Ok(Some(SourceItem { url, cls }))
        }
    }
}

/// A CSV record's fields: the header (the first record), or an item.
fn parse_csv_fields(
    fields: Vec<String>,
    header: &mut Option<Vec<String>>,
    url_column: &str,
    labels: &LabelSource,
) -> Result<Option<SourceItem>, String> {
    let Some(names) = header.as_ref() else {
        let label = match labels {
            LabelSource::Column(name) => Some(name.as_str()),
            _ => None,
        };
        // A name given twice is ambiguous; unnamed columns (the empty trailing ones a
        // spreadsheet exports, say) are not, unless the job reads a column of that name.
        let read = |name: &str| name == url_column || label == Some(name);
        let mut seen = std::collections::HashSet::with_capacity(fields.len());
        if let Some(twice) = fields
            .iter()
            .find(|name| !seen.insert(name.as_str()) && (!name.is_empty() || read(name)))
        {
            return Err(format!(
                "the CSV header names the column {} twice",
                shown(twice)
            ));
        }
        // The columns the job reads must be there: said at the header's line, not the first
        // row's.
        for name in std::iter::once(url_column).chain(label) {
            if !fields.iter().any(|field| field == name) {
                return Err(no_column(name, &fields));
            }
        }
        *header = Some(fields);
        return Ok(None);
    };
    // A row with more fields than the header (an unquoted comma in a label, say)
    // would shift or cut its values.
    if fields.len() != names.len() {
        return Err(format!(
            "row has {} fields, the header {} (a field holding a comma must be quoted)",
            fields.len(),
            names.len()
        ));
    }
    let column = |name: &str| -> Result<usize, String> {
        names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| no_column(name, names))
    };
    let url = fields.get(column(url_column)?).ok_or_else(|| {
        format!(
            "row has {} fields, the header {}",
            fields.len(),
            names.len()
        )
    })?;
    let url = checked_url(url, url_column)?;
    let cls = match labels {
        LabelSource::Column(name) => Some(
            fields
                .get(column(name)?)
                .cloned()
                .ok_or_else(|| format!("row has no {name:?} field"))?,
        ),
        LabelSource::FolderName => parent_folder(&url),
        LabelSource::None => None,
    };
    Ok(Some(SourceItem { url, cls }))
}

/// The error for a column the header lacks, naming the columns it has (at most 20, each cut
/// to 40 characters: a header line may be a megabyte of one name).
fn no_column(name: &str, names: &[String]) -> String {
    let mut columns: Vec<String> = names.iter().take(20).map(|n| shown(n)).collect();
    if names.len() > 20 {
        columns.push(format!("and {} more", names.len() - 20));
    }
    format!(
        "the CSV header has no column {} (columns: {})",
        shown(name),
        columns.join(", ")
    )
}

/// A field as an error message quotes it: escaped, and cut to 40 characters.
fn shown(field: &str) -> String {
    let mut chars = field.chars();
    let head: String = chars.by_ref().take(40).collect();
    if chars.next().is_some() {
        format!("{head:?}...")
    } else {
        format!("{head:?}")
    }
}

/// A list file's URL field, trimmed (as text lists are); an empty one is an error, not the
/// current folder.
fn checked_url(url: &str, column: &str) -> Result<String, String> {
    let url = url.trim();
    if url.is_empty() {
        return Err(format!("the {column:?} field is empty"));
    }
    Ok(url.to_string())
}

/// A CSV record read line by line (RFC 4180 quoting: a quoted field may hold line breaks,
/// which come back as `\n`).
#[derive(Debug, Default)]
struct CsvRecord {
    fields: Vec<String>,
    field: String,
    quoted: bool,
    /// Bytes read so far, line breaks included.
    bytes: usize,
}

impl CsvRecord {
    /// Reads the record's next line; returns whether the record is complete (no quoted field
    /// left open). Each line is scanned once, however many the record spans.
    fn push_line(&mut self, line: &str) -> bool {
        if self.bytes > 0 {
            self.field.push('\n');
        }
        self.bytes += line.len() + 1;
        let mut chars = line.trim_end_matches('\r').chars().peekable();
        while let Some(c) = chars.next() {
            match (self.quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    self.field.push('"');
                    chars.next();
                }
                (true, '"') => self.quoted = false,
                (true, c) => self.field.push(c),
                (false, '"') if self.field.is_empty() => self.quoted = true,
                (false, ',') => self.fields.push(std::mem::take(&mut self.field)),
                (false, c) => self.field.push(c),
            }
        }
        !self.quoted
    }

    /// The fields of a complete record.
    fn finish(mut self) -> Vec<String> {
        self.fields.push(self.field);
        self.fields
    }
}

/// Splits one CSV record held in one string; `None` when it ends inside a quoted field.
fn split_csv_line(record: &str) -> Option<Vec<String>> {
    let mut parsed = CsvRecord::default();
    parsed.push_line(record).then(|| parsed.finish())
}

/// The longest URL (percent-encoded) fetched from a store: far above real ones (S3 keys stop at
/// 1 KiB, browsers at 64 KiB), below what an HTTP request line can carry.
pub const MAX_URL_BYTES: usize = 32 * 1024;

/// Where an item's bytes are read from.
#[derive(Debug)]
pub enum Source {
    /// An object in a store, and for a `file:` URL the local file it names.
    Store {
        /// The bucket, host or local root.
        location: Location,
        /// The object in it.
        path: Path,
        /// The file a `file:` URL names.
        local_file: Option<std::path::PathBuf>,
    },
    /// A local file whose name object_store's paths cannot hold (not UTF-8, as in an archive
    /// from an old system, or with control characters), read with the file system's own calls.
    File(std::path::PathBuf),
    /// An http(s) URL, read with a plain GET of the URL as given: object_store's HTTP store
    /// speaks WebDAV, which drops a URL's query and needs a Content-Length.
    Http {
        /// The job's HTTP client.
        client: reqwest::Client,
        /// The URL's path, for the object's metadata.
        path: Path,
    },
}

/// Opens the stores that items' URLs point into, once per bucket or host, on first use; reads
/// web URLs with one client.
pub struct Resolver {
    options: StoreOptions,
    locations: Mutex<HashMap<String, Location>>,
    http: reqwest::Client,
}

impl Resolver {
    /// A resolver whose stores use `options`, and its web client (with the settings among
    /// `options` that apply to one); fails, with the option named, when such a setting cannot
    /// be used.
    pub fn new(options: StoreOptions) -> Result<Self, String> {
        Ok(Self {
            http: web_client(&options)?,
            options,
            locations: Mutex::default(),
        })
    }

    /// Where an item's URL is read from.
    pub fn resolve(&self, url: &str) -> Result<Source, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
        // The HTTP client under object_store panics on a request line it cannot hold (about
        // 64 KiB); a URL this long is a broken line of a list, not an object anyone stores.
        if parsed.scheme() != "file" && parsed.as_str().len() > MAX_URL_BYTES {
            return Err(format!(
                "URL of {} bytes once encoded, more than the {MAX_URL_BYTES} a request may carry",
                parsed.as_str().len()
            ));
        }
        if parsed.scheme() == "file" {
            let file = parsed
                .to_file_path()
                .map_err(|()| "not a local path".to_string())?;
            let Ok(path) = Path::from_absolute_path(&file) else {
                return Ok(Source::File(file));
            };
            return Ok(Source::Store {
                location: self.location("/")?,
                path,
                local_file: Some(file),
            });
        }
        if matches!(parsed.scheme(), "http" | "https") {
            // The path only names the object in its metadata: a web URL's query (which may
            // hold "//", as a URL passed to an image proxy does) and empty segments are no
            // reason to refuse it.
            let segments = parsed.path_segments().into_iter().flatten();
            let path = Path::from_iter(segments.filter(|segment| !segment.is_empty()));
            return Ok(Source::Http {
                client: self.http.clone(),
                path,
            });
        }
        let (base, object) = shards::store::split_object_url(url).map_err(|e| e.to_string())?;
        let path = Path::from_url_path(&object).map_err(|e| e.to_string())?;
        Ok(Source::Store {
            location: self.location(&base)?,
            path,
            local_file: None,
        })
    }

    /// The store at `base`, opened on first use.
    fn location(&self, base: &str) -> Result<Location, String> {
        let mut locations = self.locations.lock().expect("resolver lock");
        if let Some(location) = locations.get(base) {
            return Ok(location.clone());
        }
        let location = Location::open(base, &self.options, false).map_err(|e| e.to_string())?;
        locations.insert(base.to_string(), location.clone());
        Ok(location)
    }
}

/// The client that reads http(s) sources, with the stores' timeouts, at most 10 redirects, and
/// the object_store client options among `options.options` that apply to a plain web client,
/// under the same names: `proxy_url` (with `proxy_excludes`, a comma-separated list of hosts),
/// `allow_invalid_certificates` and `user_agent`. The others name a store's settings and are
/// left to the stores. Without `proxy_url`, the usual proxy variables of the environment apply
/// (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`).
fn web_client(options: &StoreOptions) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(options.timeout)
        .connect_timeout(options.connect_timeout)
        .redirect(reqwest::redirect::Policy::limited(10))
        .user_agent(concat!("seer-rs-ingest/", env!("CARGO_PKG_VERSION")));
    let option = |name: &str| {
        options
            .options
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let bad = |name: &str, value: &str, reason: String| {
        format!("--store-option {name}={value}: {reason}")
    };
    if let Some(url) = option("proxy_url") {
        let mut proxy =
            reqwest::Proxy::all(url).map_err(|e| bad("proxy_url", url, with_causes(&e)))?;
        if let Some(excludes) = option("proxy_excludes") {
            proxy = proxy.no_proxy(reqwest::NoProxy::from_string(excludes));
        }
        builder = builder.proxy(proxy);
    }
    if let Some(value) = option("allow_invalid_certificates") {
        // object_store's spelling of a boolean.
        let allow = match value.to_ascii_lowercase().as_str() {
            "1" | "true" | "on" | "yes" | "y" => true,
            "0" | "false" | "off" | "no" | "n" => false,
            _ => {
                let reason = "not a boolean (true or false)".to_string();
                return Err(bad("allow_invalid_certificates", value, reason));
            }
        };
        builder = builder.tls_danger_accept_invalid_certs(allow);
    }
    if let Some(agent) = option("user_agent") {
        let header = reqwest::header::HeaderValue::from_str(agent)
            .map_err(|e| bad("user_agent", agent, e.to_string()))?;
        builder = builder.user_agent(header);
    }
    builder
        .build()
        .map_err(|e| format!("starting the HTTP client: {}", with_causes(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_too_long_for_a_request_is_refused_not_fetched() {
        let resolver = Resolver::new(StoreOptions::default()).unwrap();
        let long = format!("http://127.0.0.1:9/{}.jpg", "é".repeat(6000));
        let message = resolver.resolve(&long).unwrap_err();
        assert!(message.contains("36023 bytes once encoded"), "{message}");
        let fine = format!("http://127.0.0.1:9/{}.jpg", "a".repeat(4000));
        assert!(resolver.resolve(&fine).is_ok());
    }

    #[test]
    fn web_urls_with_slashes_in_their_query_or_path_are_fetched_as_given() {
        let resolver = Resolver::new(StoreOptions::default()).unwrap();
        for url in [
            "http://127.0.0.1:9/img/p2.jpg?next=https%3A%2F%2Fcdn.example.com%2Fa.jpg",
            "http://127.0.0.1:9/img/p2.jpg?next=https://cdn.example.com/a.jpg",
            "https://127.0.0.1:9/a//b.jpg",
        ] {
            match resolver.resolve(url) {
                Ok(Source::Http { path, .. }) => assert!(path.as_ref().ends_with(".jpg"), "{url}"),
                Ok(_) => panic!("{url}: not read as a web source"),
                Err(message) => panic!("{url}: {message}"),
            }
        }
    }

    #[test]
    fn csv_lines() {
        assert_eq!(
            split_csv_line(r#"a,"b,c","d""e",,"#).unwrap(),
            vec!["a", "b,c", "d\"e", "", ""]
        );
        assert!(split_csv_line(r#"a,"b"#).is_none());
        assert_eq!(
            split_csv_line("a,\"two\nlines\",c").unwrap(),
            vec!["a", "two\nlines", "c"]
        );
    }

    #[test]
    fn csv_list_with_labels() {
        let mut header = None;
        let labels = LabelSource::Column("label".into());
        assert_eq!(
            parse_list_line("url,label", ListFormat::Csv, &mut header, "url", &labels).unwrap(),
            None
        );
        let item = parse_list_line(
            "s3://b/x.jpg,cat",
            ListFormat::Csv,
            &mut header,
            "url",
            &labels,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            item,
            SourceItem {
                url: "s3://b/x.jpg".into(),
                cls: Some("cat".into())
            }
        );
        let err = parse_list_line(
            "s3://b/x.jpg,cat",
            ListFormat::Csv,
            &mut header,
            "link",
            &labels,
        )
        .unwrap_err();
        assert!(err.contains("no column \"link\""), "{err}");
        // An unquoted comma in a label: more fields than the header, refused.
        let err = parse_list_line(
            "s3://b/x.jpg,New York, NY",
            ListFormat::Csv,
            &mut header,
            "url",
            &labels,
        )
        .unwrap_err();
        assert!(err.contains("row has 3 fields, the header 2"), "{err}");
        let err =
            parse_list_line("url,url", ListFormat::Csv, &mut None, "url", &labels).unwrap_err();
        assert!(err.contains("names the column \"url\" twice"), "{err}");
        // Unnamed columns, as a spreadsheet exports them, may come more than once.
        let mut header = None;
        let none = LabelSource::None;
        assert!(
            parse_list_line("url,,", ListFormat::Csv, &mut header, "url", &none)
                .unwrap()
                .is_none()
        );
        let item = parse_list_line("s3://b/x.jpg,,", ListFormat::Csv, &mut header, "url", &none)
            .unwrap()
            .unwrap();
        assert_eq!(item.url, "s3://b/x.jpg");
        // Unless the job reads a column of that name.
        let err = parse_list_line(",url,", ListFormat::Csv, &mut None, "", &none).unwrap_err();
        assert!(err.contains("names the column \"\" twice"), "{err}");
    }

    #[test]
    fn jsonl_list() {
        let item = parse_list_line(
            r#"{"url": "https://h/a.png", "cls": 3}"#,
            ListFormat::Jsonl,
            &mut None,
            "url",
            &LabelSource::Column("cls".into()),
        )
        .unwrap()
        .unwrap();
        assert_eq!(item.cls.as_deref(), Some("3"));
        for number in ["5.0", "18446744073709551616"] {
            let err = parse_list_line(
                &format!(r#"{{"url": "https://h/a.png", "cls": {number}}}"#),
                ListFormat::Jsonl,
                &mut None,
                "url",
                &LabelSource::Column("cls".into()),
            )
            .unwrap_err();
            assert!(err.contains("not an integer of at most 64 bits"), "{err}");
        }
        assert!(
            parse_list_line("{", ListFormat::Jsonl, &mut None, "url", &LabelSource::None).is_err()
        );
    }

    #[test]
    fn list_urls_are_trimmed_and_must_be_text() {
        let none = &LabelSource::None;
        let csv = |lines: &[&str]| -> Result<Option<SourceItem>, String> {
            let mut header = None;
            let mut last = Ok(None);
            for line in lines {
                last = parse_list_line(line, ListFormat::Csv, &mut header, "url", none);
            }
            last
        };
        assert_eq!(
            csv(&["url,x", " /a.jpg ,1"]).unwrap().unwrap().url,
            "/a.jpg"
        );
        let err = csv(&["url,x", ",1"]).unwrap_err();
        assert!(err.contains("\"url\" field is empty"), "{err}");
        let jsonl = |line: &str| parse_list_line(line, ListFormat::Jsonl, &mut None, "url", none);
        assert_eq!(
            jsonl(r#"{"url": " s3://b/k "}"#).unwrap().unwrap().url,
            "s3://b/k"
        );
        for (line, expected) in [
            (r#"{"url": ""}"#, "field is empty"),
            (r#"{"url": 5}"#, "is 5, not a URL"),
            (r#"{"url": null}"#, "is null, not a URL"),
            (r#"[{"url": "a"}]"#, "one object per line"),
        ] {
            let err = jsonl(line).unwrap_err();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    /// A quoted CSV field may span lines (a caption with a line break, as img2dataset-style
    /// lists have): the record is read whole and errors name its first line; a quote left open
    /// is named at the line that opened it, at the end of the file, not dropped.
    #[tokio::test]
    async fn csv_records_may_span_lines() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |path: &std::path::Path| InputSpec {
            url: path.to_str().unwrap().to_string(),
            list: true,
            list_format: ListFormat::Auto,
            url_column: "url".into(),
            labels: LabelSource::Column("cls".into()),
            extensions: Vec::new(),
        };
        let options = StoreOptions::default();
        let read = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let spec = spec(&path);
            let options = options.clone();
            async move {
                let stream = items(&spec, &options).await.unwrap();
                stream.collect::<Vec<_>>().await
            }
        };
        let got = read(
            "captions.csv",
            "url,caption,cls\r\n/a.jpg,\"first line\r\n\r\nthird, with \"\"quotes\"\"\",cat\r\n/b.jpg,plain,dog\r\n",
        )
        .await;
        let got: Vec<SourceItem> = got.into_iter().map(Result::unwrap).collect();
        let item = |url: &str, cls: &str| SourceItem {
            url: url.into(),
            cls: Some(cls.into()),
        };
        assert_eq!(
            got,
            [item("file:///a.jpg", "cat"), item("file:///b.jpg", "dog")]
        );

        // The bad row starts on line 4, after a record of lines 2-3.
        let got = read(
            "bad.csv",
            "url,caption,cls\n/a.jpg,\"two\nlines\",cat\n/b.jpg,x\n",
        )
        .await;
        let err = got[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("bad.csv line 4: row has 2 fields"), "{err}");

        let got = read(
            "open.csv",
            "url,caption,cls\n/a.jpg,ok,cat\n/b.jpg,\"never closed,dog\n/c.jpg,x,y\n",
        )
        .await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_ref().unwrap(), &item("file:///a.jpg", "cat"));
        let err = got[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains(
                "open.csv line 3: a quoted field opened here is not closed by the end of the file"
            ),
            "{err}"
        );

        // Lines ending in CR alone read as one line holding CRs: refused, said at that line,
        // in a CSV and in a JSONL list alike (not "no image", or one source of two URLs).
        for (name, text) in [
            ("mac.csv", "url,cls\r/a.jpg,cat\r/b.jpg,dog\r"),
            (
                "mac.jsonl",
                "{\"url\": \"/a.jpg\", \"cls\": 1}\r{\"url\": \"/b.jpg\", \"cls\": 2}\r",
            ),
        ] {
            let got = read(name, text).await;
            let err = got[0].as_ref().unwrap_err().to_string();
            assert!(
                err.contains(&format!(
                    "{name} line 1: holds a carriage return inside the line"
                )),
                "{err}"
            );
        }

        // A line too long for a record is refused as it is read, quoted or not.
        let long = format!("url,caption,cls\n/a.jpg,{},cat\n", "x".repeat(2 << 20));
        let got = read("long.csv", &long).await;
        let err = got[0].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("long.csv line 2: line longer than 1048576 bytes"),
            "{err}"
        );

        // A column the job reads is missing: said at the header's line, the header's names
        // cut short.
        let header = format!("link,{},cls", "n".repeat(100));
        let got = read("nocol.csv", &format!("\n\n\n{header}\n/a.jpg,x,cat\n")).await;
        let err = got[0].as_ref().unwrap_err().to_string();
        assert!(
            err.contains(
                "nocol.csv line 4: the CSV header has no column \"url\" (columns: \"link\", \"nnnn"
            ),
            "{err}"
        );
        assert!(err.len() < 300, "{err}");

        // A quote left open in a large list stops at the size limit, each line read once.
        let rows: String = (0..40_000)
            .map(|i| format!("/r{i}.jpg,a caption of some length,y\n"))
            .collect();
        let got = read(
            "runaway.csv",
            &format!("url,caption,cls\n/b.jpg,\"oops,dog\n{rows}"),
        )
        .await;
        // (The reader stops at the first error; the lines after it are not looked at.)
        let err = got
            .iter()
            .find_map(|item| item.as_ref().err())
            .unwrap()
            .to_string();
        assert!(
            err.contains("runaway.csv line 2: a quoted field opened here runs past 1048576 bytes"),
            "{err}"
        );
    }

    proptest::proptest! {
        /// Any fields written as RFC 4180 CSV (quoted when they hold a quote, comma or line
        /// break) read back the same, line by line as the list reader feeds them.
        #[test]
        fn csv_records_round_trip(
            fields in proptest::collection::vec("[a-c\",\n ]{0,6}", 1..5)
        ) {
            let written: Vec<String> = fields
                .iter()
                .map(|field| {
                    if field.contains(['"', ',', '\n']) || field.is_empty() {
                        format!("\"{}\"", field.replace('"', "\"\""))
                    } else {
                        field.clone()
                    }
                })
                .collect();
            let text = written.join(",");
            let mut record = CsvRecord::default();
            let lines: Vec<&str> = text.split('\n').collect();
            for (i, line) in lines.iter().enumerate() {
                let complete = record.push_line(line);
                proptest::prop_assert_eq!(complete, i + 1 == lines.len(), "{:?}", text);
            }
            proptest::prop_assert_eq!(record.finish(), fields);
        }
    }

    #[tokio::test]
    async fn list_files_are_checked_before_reading() {
        let dir = std::env::temp_dir().join(format!("seer-list-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = |url: &std::path::Path, labels: LabelSource| InputSpec {
            url: url.to_str().unwrap().to_string(),
            list: true,
            list_format: ListFormat::Auto,
            url_column: "url".into(),
            labels,
            extensions: Vec::new(),
        };
        let options = StoreOptions::default();
        let err = items(&spec(&dir, LabelSource::None), &options)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("is a folder"), "{err}");
        let fifo = dir.join("urls.fifo");
        seer_tests::make_fifo(&fifo);
        let err = items(&spec(&fifo, LabelSource::None), &options)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("is not a regular file"), "{err}");
        let txt = dir.join("urls.txt");
        std::fs::write(&txt, "/a.jpg\n").unwrap();
        // The same file without --list: a hint, not "not a folder".
        let unlisted = InputSpec {
            list: false,
            ..spec(&txt, LabelSource::None)
        };
        let err = items(&unlisted, &options).await.err().unwrap();
        assert!(
            err.to_string()
                .contains("is a file, not a folder: a list of sources needs --list"),
            "{err}"
        );
        let err = items(&spec(&txt, LabelSource::Column("cls".into())), &options)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("--label-column cls"), "{err}");
        // A spreadsheet's byte-order mark before the header; a .json name read as JSON Lines.
        let csv = dir.join("urls.csv");
        std::fs::write(&csv, "\u{feff}url,cls\n/a.jpg,cat\n").unwrap();
        let upper = dir.join("URLS.CSV");
        std::fs::write(&upper, "url,cls\n/a.jpg,cat\n").unwrap();
        let json = dir.join("urls.json");
        std::fs::write(&json, "{\"url\": \"/a.jpg\", \"cls\": \"cat\"}\n").unwrap();
        for list in [csv, upper, json] {
            let stream = items(&spec(&list, LabelSource::Column("cls".into())), &options)
                .await
                .unwrap();
            let read: Vec<SourceItem> = stream.map(Result::unwrap).collect().await;
            assert_eq!(
                read,
                [SourceItem {
                    url: "file:///a.jpg".into(),
                    cls: Some("cat".into())
                }],
                "{}",
                list.display()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn folder_labels() {
        // Listed: the first folder below the prefix, at any depth, as ImageFolder does.
        let listed = |prefix, name| class_folder(prefix, name);
        assert_eq!(
            listed("data/train", "data/train/n01/images/a.jpg").as_deref(),
            Some("n01")
        );
        assert_eq!(
            listed("data/train", "data/train/cat/a.jpg").as_deref(),
            Some("cat")
        );
        assert_eq!(listed("data/train", "data/train/a.jpg"), None);
        assert_eq!(listed("", "cat/a.jpg").as_deref(), Some("cat"));
        assert_eq!(listed("", "a.jpg"), None);
        // A list: the folder holding the file, decoded.
        assert_eq!(parent_folder("photos/cats/a.jpg").as_deref(), Some("cats"));
        assert_eq!(parent_folder("a.jpg"), None);
        assert_eq!(parent_folder("/data/cats//a.jpg").as_deref(), Some("cats"));
        assert_eq!(
            parent_folder("file:///data/a%20b/x.jpg").as_deref(),
            Some("a b")
        );
        assert_eq!(
            parent_folder("http://h:80/%C3%BCn%C3%AF/x.jpg?s=1").as_deref(),
            Some("\u{fc}n\u{ef}")
        );
        assert_eq!(parent_folder("http://127.0.0.1:8080/x.jpg"), None);
        assert_eq!(parent_folder("https://h/a//x.jpg").as_deref(), Some("a"));
        assert_eq!(extension_of("x/Y.JPEG").as_deref(), Some("jpeg"));
    }
}
