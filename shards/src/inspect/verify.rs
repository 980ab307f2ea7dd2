//! `shards verify`: every check a reader of the dataset relies on.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use object_store::ObjectStoreExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{IMAGE_EXTENSIONS, Reporter, check_decoder, default_jobs, human_bytes};
use crate::meta::{ManifestShard, MemberSpan, SampleMeta, ShardIndex, ShardNames};
use crate::reader::{DEFAULT_MAX_MEMBER_SIZE, split_member_name, whole_at_damage};
use crate::tar::{Member, TarParser, padding};
use crate::{Dataset, printable, validate_key};

/// How [`verify()`] runs.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Shards verified at once, and images decoded at once per shard
    /// (default: the machine's cores).
    pub jobs: usize,
    /// Decode every image and compare its size with `KEY.json` (default true).
    pub decode: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            jobs: default_jobs(),
            decode: true,
        }
    }
}

/// One thing wrong with a dataset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    /// The shard.
    pub shard: String,
    /// Byte offset in the shard of the sample's first header, where it is about one sample.
    pub offset: Option<u64>,
    /// The sample's key, where it is about one sample.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.shard)?;
        if let Some(key) = &self.key {
            write!(f, ": sample {}", printable(key))?;
        }
        if let Some(offset) = self.offset {
            write!(f, " at byte {offset}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What [`verify()`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The dataset's URL.
    pub url: String,
    /// Shards checked.
    pub shards: usize,
    /// Samples read.
    pub samples: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Every problem, sorted by shard and offset.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.problems {
            writeln!(f, "{problem}")?;
        }
        let summary = format!(
            "{} shards, {} samples, {}",
            self.shards,
            self.samples,
            human_bytes(self.bytes)
        );
        if self.is_ok() {
            writeln!(f, "verified {summary}: OK")
        } else {
            let count = self.problems.len();
            let noun = if count == 1 { "problem" } else { "problems" };
            writeln!(f, "verified {summary}: {count} {noun}")
        }
    }
}

/// Verifies every shard in the manifest, `options.jobs` at once:
///
/// - the tar's SHA-256 and size equal the manifest's;
/// - the tar parses (strict ustar) to its end-of-archive marker;
/// - the index and stats files read, and agree with the manifest and with
///   the actual offsets and sizes of every sample and member;
/// - the stats agree with themselves (`failed` and `failed_by_reason`) and
///   give only the failure reasons the format defines;
/// - every sample has exactly one image member and a `KEY.json` that parses
///   as [`SampleMeta`] with the sample's key and the image's format;
/// - every image holds the format its extension names, and decodes with the
///   training pipeline's decoder ([`check_decoder`](super::check_decoder):
///   libjpeg-turbo for JPEG, which refuses a JPEG cut short) within limits, to
///   the size `KEY.json` gives;
/// - keys are unique across the dataset.
///
/// Problems are collected, never returned as errors: one bad sample does not
/// stop the check of the others.
pub async fn verify(
    dataset: &Dataset,
    options: &VerifyOptions,
    reporter: Arc<dyn Reporter>,
) -> VerifyReport {
    reporter.start(
        dataset.manifest.shards.len(),
        dataset.manifest.total_bytes(),
    );
    let outcomes: Vec<ShardOutcome> = futures::stream::iter(dataset.manifest.shards.clone())
        .map(|shard| {
            tokio::spawn(verify_shard(
                dataset.clone(),
                shard,
                options.clone(),
                reporter.clone(),
            ))
        })
        .buffered(options.jobs.max(1))
        .map(|joined| joined.expect("a verify task panicked"))
        .collect()
        .await;

    let mut report = VerifyReport {
        url: dataset.location.url.clone(),
        shards: outcomes.len(),
        samples: 0,
        bytes: 0,
        problems: Vec::new(),
    };
    let mut first_seen: HashMap<String, (String, u64)> = HashMap::new();
    for outcome in outcomes {
        report.samples += outcome.keys.len() as u64;
        report.bytes += outcome.bytes;
        report.problems.extend(outcome.problems);
        for (key, offset) in outcome.keys {
            if let Some((shard, first)) = first_seen.get(&key) {
                let problem = Problem {
                    shard: outcome.shard.clone(),
                    offset: Some(offset),
                    key: Some(key.clone()),
                    message: format!("duplicate key: also in {shard} at byte {first}"),
                };
                reporter.problem(&problem);
                report.problems.push(problem);
            } else {
                first_seen.insert(key, (outcome.shard.clone(), offset));
            }
        }
    }
    report.problems.sort();
    report
}

struct ShardOutcome {
    shard: String,
    bytes: u64,
    keys: Vec<(String, u64)>,
    problems: Vec<Problem>,
}

/// A sample being assembled from adjacent members.
struct Pending {
    key: String,
    offset: u64,
    end: u64,
    /// `(extension, data offset, data)` in archive order.
    members: Vec<(String, u64, Bytes)>,
}

/// An image to decode off the async threads.
struct DecodeJob {
    shard: String,
    key: String,
    offset: u64,
    ext: String,
    data: Bytes,
    expected: Option<(u32, u32)>,
}

impl DecodeJob {
    fn run(self) -> Option<Problem> {
        // The decoder finds the format from the bytes, as augment's does; the format must
        // still be the one the extension (and KEY.json) names.
        let declared = image::ImageFormat::from_extension(&self.ext);
        let found = image::guess_format(&self.data).ok();
        let message = match (declared, found) {
            (Some(declared), Some(found)) if declared != found => format!(
                "image member .{} holds {} data",
                self.ext,
                format!("{found:?}").to_uppercase()
            ),
            _ => match check_decoder().decode(&self.data) {
                Err(e) => format!("image member .{} does not decode: {e}", self.ext),
                Ok(image) => match self.expected {
                    Some((width, height)) if (image.width, image.height) != (width, height) => {
                        format!(
                            "image is {}x{}, KEY.json says {width}x{height}",
                            image.width, image.height
                        )
                    }
                    _ => return None,
                },
            },
        };
        Some(Problem {
            shard: self.shard,
            offset: Some(self.offset),
            key: Some(self.key),
            message,
        })
    }
}

struct ShardVerifier {
    shard: ManifestShard,
    index: Option<ShardIndex>,
    reporter: Arc<dyn Reporter>,
    decode: bool,
    problems: Vec<Problem>,
    keys: Vec<(String, u64)>,
    pending: Option<Pending>,
    jobs: Vec<DecodeJob>,
}

impl ShardVerifier {
    fn problem(&mut self, key: Option<&str>, offset: Option<u64>, message: String) {
        let problem = Problem {
            shard: self.shard.name.clone(),
            offset,
            key: key.map(str::to_string),
            message,
        };
        self.reporter.problem(&problem);
        self.problems.push(problem);
    }

    fn member(&mut self, member: Member) {
        let Some((key, ext)) = split_member_name(&member.name) else {
            self.problem(
                None,
                Some(member.header_offset),
                format!("member {:?} has no KEY.EXT name", member.name),
            );
            return;
        };
        let end = member.data_offset + member.data.len() as u64 + padding(member.data.len() as u64);
        if let Some(pending) = &mut self.pending
            && pending.key == key
        {
            if pending.members.iter().any(|(e, _, _)| e == ext) {
                let (key, offset) = (pending.key.clone(), pending.offset);
                self.problem(
                    Some(&key),
                    Some(offset),
                    format!(
                        "second .{} member at byte {}",
                        printable(ext),
                        member.header_offset
                    ),
                );
                return;
            }
            pending
                .members
                .push((ext.to_string(), member.data_offset, member.data));
            pending.end = end;
            return;
        }
        let next = Pending {
            key: key.to_string(),
            offset: member.header_offset,
            end,
            members: vec![(ext.to_string(), member.data_offset, member.data)],
        };
        if let Some(done) = self.pending.replace(next) {
            self.finish_sample(done);
        }
    }

    /// Damage was found: checks the sample being assembled if it is whole (see
    /// [`whole_at_damage`]), and drops it otherwise.
    fn finish_if_whole(&mut self, parser: &TarParser) {
        if let Some(sample) = self.pending.take()
            && whole_at_damage(
                &sample.key,
                sample.members.iter().map(|(ext, _, _)| ext.as_str()),
                parser,
            )
        {
            self.finish_sample(sample);
        }
    }

    fn finish_sample(&mut self, sample: Pending) {
        let position = self.keys.len();
        self.keys.push((sample.key.clone(), sample.offset));
        let (key, offset) = (Some(sample.key.as_str()), Some(sample.offset));
        if let Err(crate::ShardError::BadKey { reason, .. }) = validate_key(&sample.key) {
            self.problem(key, offset, format!("invalid key: {reason}"));
        }

        let entry = self
            .index
            .as_ref()
            .map(|index| (index.samples.len(), index.samples.get(position).cloned()));
        match entry {
            None => {}
            Some((listed, None)) => self.problem(
                key,
                offset,
                format!("not in the index (it lists {listed} samples)"),
            ),
            Some((_, Some(entry))) if entry.key != sample.key => {
                self.problem(
                    key,
                    offset,
                    format!(
                        "index entry {position} is {} at byte {}, the shard has {} here",
                        printable(&entry.key),
                        entry.offset,
                        printable(&sample.key)
                    ),
                );
            }
            Some((_, Some(entry))) => {
                if entry.offset != sample.offset {
                    self.problem(key, offset, format!("index gives offset {}", entry.offset));
                }
                if entry.size != sample.end - sample.offset {
                    self.problem(
                        key,
                        offset,
                        format!(
                            "index gives size {}, the sample spans {} bytes",
                            entry.size,
                            sample.end - sample.offset
                        ),
                    );
                }
                let actual: BTreeMap<String, MemberSpan> = sample
                    .members
                    .iter()
                    .map(|(ext, data_offset, data)| {
                        (
                            ext.clone(),
                            MemberSpan {
                                offset: *data_offset,
                                size: data.len() as u64,
                            },
                        )
                    })
                    .collect();
                if actual != entry.members {
                    let describe = |spans: &BTreeMap<String, MemberSpan>| {
                        spans
                            .iter()
                            .map(|(ext, s)| format!(".{} {}+{}", printable(ext), s.offset, s.size))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    self.problem(
                        key,
                        offset,
                        format!(
                            "index gives members [{}], the shard has [{}]",
                            describe(&entry.members),
                            describe(&actual)
                        ),
                    );
                }
            }
        }

        let images: Vec<&(String, u64, Bytes)> = sample
            .members
            .iter()
            .filter(|(ext, _, _)| IMAGE_EXTENSIONS.contains(&ext.as_str()))
            .collect();
        if images.len() != 1 {
            self.problem(
                key,
                offset,
                format!("{} image members, expected exactly one", images.len()),
            );
        }
        let image = (images.len() == 1).then(|| images[0].clone());
        let meta = match sample.members.iter().find(|(ext, _, _)| ext == "json") {
            None => {
                self.problem(key, offset, "no .json member".into());
                None
            }
            Some((_, _, json)) => match serde_json::from_slice::<SampleMeta>(json) {
                Err(e) => {
                    self.problem(
                        key,
                        offset,
                        format!("KEY.json does not parse as sample metadata: {e}"),
                    );
                    None
                }
                Ok(meta) => Some(meta),
            },
        };
        if let Some(meta) = &meta {
            if meta.key != sample.key {
                self.problem(key, offset, format!("KEY.json gives key {:?}", meta.key));
            }
            if let Some((ext, _, _)) = &image
                && &meta.format != ext
            {
                self.problem(
                    key,
                    offset,
                    format!(
                        "KEY.json gives format {:?}, the image member is .{ext}",
                        meta.format
                    ),
                );
            }
        }
        if self.decode
            && let Some((ext, _, data)) = image
        {
            self.jobs.push(DecodeJob {
                shard: self.shard.name.clone(),
                key: sample.key,
                offset: sample.offset,
                ext,
                data,
                expected: meta.map(|m| (m.width, m.height)),
            });
        }
    }
}

async fn verify_shard(
    dataset: Dataset,
    shard: ManifestShard,
    options: VerifyOptions,
    reporter: Arc<dyn Reporter>,
) -> ShardOutcome {
    let mut verifier = ShardVerifier {
        shard: shard.clone(),
        index: None,
        reporter: reporter.clone(),
        decode: options.decode,
        problems: Vec::new(),
        keys: Vec::new(),
        pending: None,
        jobs: Vec::new(),
    };
    let bytes = check_shard(&dataset, &shard, &options, &mut verifier).await;
    reporter.advance(shard.bytes.saturating_sub(bytes));
    reporter.shard_done(&shard.name);
    ShardOutcome {
        shard: shard.name,
        bytes,
        keys: verifier.keys,
        problems: verifier.problems,
    }
}

/// Runs every check of one shard; returns the bytes read.
async fn check_shard(
    dataset: &Dataset,
    shard: &ManifestShard,
    options: &VerifyOptions,
    verifier: &mut ShardVerifier,
) -> u64 {
    match dataset.index(shard).await {
        Ok(index) => {
            if index.shard != shard.name {
                verifier.problem(None, None, format!("index names shard {:?}", index.shard));
            }
            if index.bytes != shard.bytes {
                verifier.problem(
                    None,
                    None,
                    format!(
                        "index gives {} bytes, the manifest {}",
                        index.bytes, shard.bytes
                    ),
                );
            }
            if index.samples.len() as u64 != shard.samples {
                verifier.problem(
                    None,
                    None,
                    format!(
                        "index lists {} samples, the manifest {}",
                        index.samples.len(),
                        shard.samples
                    ),
                );
            }
            verifier.index = Some(index);
        }
        Err(e) => verifier.problem(None, None, format!("index unreadable: {e}")),
    }
    match dataset.stats(shard).await {
        Ok(stats) => {
            if stats.successes != shard.samples {
                verifier.problem(
                    None,
                    None,
                    format!(
                        "stats give {} samples written, the manifest {}",
                        stats.successes, shard.samples
                    ),
                );
            }
            let file = ShardNames::for_tar(&shard.name).stats;
            for inconsistency in stats.inconsistencies() {
                verifier.problem(None, None, format!("{file}: {inconsistency}"));
            }
        }
        Err(e) => verifier.problem(None, None, format!("stats unreadable: {e}")),
    }

    let path = dataset.shard_path(shard);
    let mut body = match dataset.location.store.get(&path).await {
        Ok(result) => result.into_stream(),
        Err(e) => {
            verifier.problem(None, None, format!("cannot read the shard: {e}"));
            return 0;
        }
    };
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut parser = Some(TarParser::new(DEFAULT_MAX_MEMBER_SIZE));
    let mut buf = BytesMut::new();
    let mut decoding = FuturesUnordered::new();
    let max_in_flight = options.jobs.max(1) * 2;
    let mut read_error = false;
    loop {
        let chunk = match body.next().await {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                verifier.problem(None, Some(total), format!("reading failed: {e}"));
                read_error = true;
                break;
            }
        };
        hasher.update(&chunk);
        total += chunk.len() as u64;
        verifier.reporter.advance(chunk.len() as u64);
        // After a tar error only the checksum goes on: nothing after a broken header can be trusted.
        if let Some(tar) = &mut parser {
            buf.extend_from_slice(&chunk);
            loop {
                match tar.next_member(&mut buf) {
                    Ok(Some(member)) => verifier.member(member),
                    Ok(None) => break,
                    Err(e) => {
                        verifier.problem(None, None, e.to_string());
                        verifier.finish_if_whole(tar);
                        parser = None;
                        buf.clear();
                        break;
                    }
                }
            }
        }
        for job in verifier.jobs.drain(..) {
            decoding.push(tokio::task::spawn_blocking(move || job.run()));
        }
        while decoding.len() > max_in_flight {
            collect_decode(verifier, decoding.next().await);
        }
    }
    let clean = !read_error
        && match &parser {
            Some(tar) => match tar.check_eof(buf.len()) {
                Ok(()) => true,
                Err(e) => {
                    verifier.problem(None, None, e.to_string());
                    false
                }
            },
            None => false,
        };
    // A sample cut short by an error is not checked: the error already names where.
    match &parser {
        Some(tar) if !clean => verifier.finish_if_whole(tar),
        _ => {
            if let Some(last) = verifier.pending.take() {
                verifier.finish_sample(last);
            }
        }
    }
    for job in verifier.jobs.drain(..) {
        decoding.push(tokio::task::spawn_blocking(move || job.run()));
    }
    while let Some(result) = decoding.next().await {
        collect_decode(verifier, Some(result));
    }

    if clean {
        let count = verifier.keys.len() as u64;
        if count != shard.samples {
            verifier.problem(
                None,
                None,
                format!(
                    "the shard holds {count} samples, the manifest lists {}",
                    shard.samples
                ),
            );
        }
        if let Some(index) = &verifier.index
            && index.samples.len() as u64 > count
        {
            let missing = index.samples[count as usize].clone();
            verifier.problem(
                Some(&missing.key),
                Some(missing.offset),
                format!(
                    "in the index but not in the shard ({} such samples)",
                    index.samples.len() as u64 - count
                ),
            );
        }
    }
    if !read_error {
        let sha256 = hex::encode(hasher.finalize());
        if sha256 != shard.sha256 {
            verifier.problem(
                None,
                None,
                format!("SHA-256 is {sha256}, the manifest gives {}", shard.sha256),
            );
        }
        if total != shard.bytes {
            verifier.problem(
                None,
                None,
                format!("size is {total} bytes, the manifest gives {}", shard.bytes),
            );
        }
    }
    total
}

fn collect_decode(
    verifier: &mut ShardVerifier,
    result: Option<Result<Option<Problem>, tokio::task::JoinError>>,
) {
    match result {
        Some(Ok(Some(problem))) => {
            verifier.reporter.problem(&problem);
            verifier.problems.push(problem);
        }
        Some(Ok(None)) | None => {}
        Some(Err(e)) => verifier.problem(None, None, format!("decoding task failed: {e}")),
    }
}
