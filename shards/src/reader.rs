//! Reading shards: streamed with constant memory, or one sample at a time
//! through the index.

use std::io::Read;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::meta::IndexEntry;
use crate::tar::{Member, TarParser};
use crate::{ShardError, printable};

/// Extensions of the image members the project stores.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Largest member a reader accepts by default (256 MiB): far above any image
/// ingest writes, small enough that a corrupt size field cannot exhaust memory.
pub const DEFAULT_MAX_MEMBER_SIZE: u64 = 256 << 20;

/// One sample: the members that share a key, in archive order.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The key: the member names up to their first dot.
    pub key: String,
    /// Byte offset of the sample's first header in its shard.
    pub offset: u64,
    /// `(extension, data)` per member.
    pub members: Vec<(String, Bytes)>,
}

impl Sample {
    /// The data of the member with extension `ext`.
    pub fn get(&self, ext: &str) -> Option<&Bytes> {
        self.members.iter().find(|(e, _)| e == ext).map(|(_, d)| d)
    }

    /// The first member whose extension is an image format the project stores.
    pub fn image(&self) -> Option<(&str, &Bytes)> {
        self.members
            .iter()
            .find(|(e, _)| IMAGE_EXTENSIONS.contains(&e.as_str()))
            .map(|(e, d)| (e.as_str(), d))
    }
}

/// Splits a member name WebDataset's way: the key is everything up to the
/// first dot of the file name (directories included), the extension the rest.
pub fn split_member_name(name: &str) -> Option<(&str, &str)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = file_start + name[file_start..].find('.')?;
    let (key, ext) = (&name[..dot], &name[dot + 1..]);
    if key.is_empty() || ext.is_empty() || key.ends_with('/') {
        return None;
    }
    Some((key, ext))
}

/// Whether the sample being assembled when damage is found (a tar error, truncation, a failed
/// read) is whole, so that it can still be returned before the error. Members of a sample are
/// adjacent, so it is whole when the header of a member with another key has been read, or the
/// end-of-archive marker. When the damage comes between members instead, nothing says whether
/// another member of the same sample would have followed; the sample is taken as whole when it
/// holds what the format defines a sample to be: an image member and `KEY.json`. A sample that
/// the damage cuts into (its own member's data is cut short) is never whole.
pub(crate) fn whole_at_damage<'a>(
    key: &str,
    extensions: impl IntoIterator<Item = &'a str>,
    parser: &TarParser,
) -> bool {
    if let Some(name) = parser.member_in_progress() {
        return split_member_name(name).is_none_or(|(member_key, _)| member_key != key);
    }
    if parser.at_end() {
        return true;
    }
    let (mut image, mut json) = (false, false);
    for ext in extensions {
        image |= IMAGE_EXTENSIONS.contains(&ext);
        json |= ext == "json";
    }
    image && json
}

/// Turns tar bytes into samples: parses members and groups adjacent ones
/// that share a key. Both readers below only feed it bytes.
struct Assembler {
    shard: String,
    parser: TarParser,
    buf: BytesMut,
    pending: Option<Sample>,
    /// The error to return once the whole sample before it has been returned.
    damage: Option<ShardError>,
}

impl Assembler {
    fn new(shard: String, max_member_size: u64) -> Self {
        Self {
            shard,
            parser: TarParser::new(max_member_size),
            buf: BytesMut::new(),
            pending: None,
            damage: None,
        }
    }

    fn tar_error(&self, source: crate::tar::TarError) -> ShardError {
        ShardError::Tar {
            shard: self.shard.clone(),
            source,
        }
    }

    /// The next sample known to be complete from the bytes fed so far;
    /// `None` when more bytes are needed (or the archive has ended).
    fn next_buffered(&mut self) -> Result<Option<Sample>, ShardError> {
        if let Some(error) = self.damage.take() {
            return Err(error);
        }
        loop {
            let member = match self.parser.next_member(&mut self.buf) {
                Ok(Some(member)) => member,
                Ok(None) => return Ok(None),
                Err(source) => {
                    let error = self.tar_error(source);
                    return self.fail(error);
                }
            };
            match self.push(member) {
                Ok(Some(sample)) => return Ok(Some(sample)),
                Ok(None) => {}
                Err(error) => return self.fail(error),
            }
        }
    }

    /// The input is over: the last sample, and an error if the archive did not end properly.
    fn finish(&mut self) -> Result<Option<Sample>, ShardError> {
        if let Err(source) = self.parser.check_eof(self.buf.len()) {
            let error = self.tar_error(source);
            return self.fail(error);
        }
        Ok(self.pending.take())
    }

    /// Damage was found: returns the sample being assembled first if it is whole (see
    /// [`whole_at_damage`]) and keeps the error for the next call; otherwise the error.
    fn fail(&mut self, error: ShardError) -> Result<Option<Sample>, ShardError> {
        match self.pending.take() {
            Some(sample)
                if whole_at_damage(
                    &sample.key,
                    sample.members.iter().map(|(ext, _)| ext.as_str()),
                    &self.parser,
                ) =>
            {
                self.damage = Some(error);
                Ok(Some(sample))
            }
            _ => Err(error),
        }
    }

    /// Adds a member to the sample being assembled; returns the previous
    /// sample when this member starts a new one.
    fn push(&mut self, member: Member) -> Result<Option<Sample>, ShardError> {
        let (key, ext) = split_member_name(&member.name).ok_or_else(|| ShardError::Invalid {
            shard: self.shard.clone(),
            reason: format!(
                "member {:?} at byte {} has no KEY.EXT name",
                member.name, member.header_offset
            ),
        })?;
        if let Some(sample) = &mut self.pending
            && sample.key == key
        {
            if sample.get(ext).is_some() {
                // This sample is the damaged one: it is not returned.
                self.pending = None;
                return Err(ShardError::Invalid {
                    shard: self.shard.clone(),
                    reason: format!(
                        "sample {} has two .{} members (the second at byte {})",
                        printable(key),
                        printable(ext),
                        member.header_offset
                    ),
                });
            }
            sample.members.push((ext.to_string(), member.data));
            return Ok(None);
        }
        let next = Sample {
            key: key.to_string(),
            offset: member.header_offset,
            members: vec![(ext.to_string(), member.data)],
        };
        Ok(self.pending.replace(next))
    }
}

/// Reads samples from a shard through any [`Read`], with memory bounded by
/// the largest sample.
///
/// A truncated or corrupt shard yields an error naming the shard and byte
/// offset, after every whole sample before the damage; a sample the damage
/// cuts into is never yielded (see `docs/format.md`).
pub struct SampleReader<R> {
    input: R,
    assembler: Assembler,
    finished: bool,
}

impl<R: Read> SampleReader<R> {
    /// A reader of the shard called `shard` (for error messages).
    pub fn new(input: R, shard: impl Into<String>) -> Self {
        Self::with_max_member_size(input, shard, DEFAULT_MAX_MEMBER_SIZE)
    }

    /// As [`SampleReader::new`], refusing members over `max_member_size` bytes.
    pub fn with_max_member_size(input: R, shard: impl Into<String>, max_member_size: u64) -> Self {
        Self {
            input,
            assembler: Assembler::new(shard.into(), max_member_size),
            finished: false,
        }
    }

    fn next_sample(&mut self) -> Result<Option<Sample>, ShardError> {
        loop {
            if let Some(sample) = self.assembler.next_buffered()? {
                return Ok(Some(sample));
            }
            let buf = &mut self.assembler.buf;
            let start = buf.len();
            buf.resize(
                start + self.assembler.parser.wanted().clamp(4096, 1 << 20),
                0,
            );
            let read = loop {
                match self.input.read(&mut buf[start..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        buf.truncate(start);
                        let error = ShardError::Io {
                            shard: self.assembler.shard.clone(),
                            source,
                        };
                        return self.assembler.fail(error);
                    }
                }
            };
            buf.truncate(start + read);
            if read == 0 {
                return self.assembler.finish();
            }
        }
    }
}

impl<R: Read> Iterator for SampleReader<R> {
    type Item = Result<Sample, ShardError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let item = self.next_sample().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.finished = true;
        }
        item
    }
}

/// Streams the samples of a shard stored in an object store, with memory
/// bounded by the largest sample whatever the shard's size.
pub struct ShardStream {
    body: BoxStream<'static, object_store::Result<Bytes>>,
    assembler: Assembler,
    finished: bool,
}

impl ShardStream {
    /// Starts reading `path` from `store`; `shard` names it in errors.
    pub async fn open(
        store: &dyn ObjectStore,
        path: &Path,
        shard: impl Into<String>,
    ) -> Result<Self, ShardError> {
        let shard = shard.into();
        let result = store.get(path).await.map_err(|source| ShardError::Store {
            shard: shard.clone(),
            source,
        })?;
        Ok(Self::from_stream(
            result.into_stream(),
            shard,
            DEFAULT_MAX_MEMBER_SIZE,
        ))
    }

    /// Reads samples from any stream of byte chunks.
    pub fn from_stream(
        body: BoxStream<'static, object_store::Result<Bytes>>,
        shard: impl Into<String>,
        max_member_size: u64,
    ) -> Self {
        Self {
            body,
            assembler: Assembler::new(shard.into(), max_member_size),
            finished: false,
        }
    }

    /// The next sample, `Ok(None)` at the end of the shard. After an error the stream is over.
    pub async fn next(&mut self) -> Result<Option<Sample>, ShardError> {
        if self.finished {
            return Ok(None);
        }
        let result = self.next_inner().await;
        if !matches!(result, Ok(Some(_))) {
            self.finished = true;
        }
        result
    }

    async fn next_inner(&mut self) -> Result<Option<Sample>, ShardError> {
        loop {
            if let Some(sample) = self.assembler.next_buffered()? {
                return Ok(Some(sample));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.assembler.buf.extend_from_slice(&chunk),
                Some(Err(source)) => {
                    let error = ShardError::Store {
                        shard: self.assembler.shard.clone(),
                        source,
                    };
                    return self.assembler.fail(error);
                }
                None => return self.assembler.finish(),
            }
        }
    }
}

/// Reads one sample with a single ranged read, using its index entry.
pub async fn read_indexed_sample(
    store: &dyn ObjectStore,
    path: &Path,
    shard: &str,
    entry: &IndexEntry,
) -> Result<Sample, ShardError> {
    let end = entry
        .offset
        .checked_add(entry.size)
        .ok_or_else(|| ShardError::Invalid {
            shard: shard.to_string(),
            reason: format!(
                "the index entry of sample {} (offset {}, size {}) runs past 2^64 bytes",
                printable(&entry.key),
                entry.offset,
                entry.size
            ),
        })?;
    let bytes = store
        .get_range(path, entry.offset..end)
        .await
        .map_err(|source| ShardError::Store {
            shard: shard.to_string(),
            source,
        })?;
    parse_indexed_sample(bytes, shard, entry)
}

/// Parses the bytes of one sample read through its index entry, checking
/// them against the entry.
pub fn parse_indexed_sample(
    bytes: Bytes,
    shard: &str,
    entry: &IndexEntry,
) -> Result<Sample, ShardError> {
    let mut parser = TarParser::starting_at(DEFAULT_MAX_MEMBER_SIZE, entry.offset);
    let mut buf = BytesMut::from(&bytes[..]);
    let mut sample = Sample {
        key: entry.key.clone(),
        offset: entry.offset,
        members: Vec::new(),
    };
    let invalid = |reason: String| ShardError::Invalid {
        shard: shard.to_string(),
        reason,
    };
    while !buf.is_empty() {
        let member = parser
            .next_member(&mut buf)
            .map_err(|source| ShardError::Tar {
                shard: shard.to_string(),
                source,
            })?
            .ok_or_else(|| {
                invalid(format!(
                    "sample {} at byte {} ends inside a member",
                    printable(&entry.key),
                    entry.offset
                ))
            })?;
        let (key, ext) = split_member_name(&member.name).ok_or_else(|| {
            invalid(format!(
                "member {:?} of sample {} has no KEY.EXT name",
                member.name,
                printable(&entry.key)
            ))
        })?;
        let span = entry.members.get(ext);
        if key != entry.key
            || span.map(|s| (s.offset, s.size))
                != Some((member.data_offset, member.data.len() as u64))
        {
            return Err(invalid(format!(
                "index entry for {} does not match member {:?} at byte {}",
                printable(&entry.key),
                member.name,
                member.header_offset
            )));
        }
        sample.members.push((ext.to_string(), member.data));
    }
    if sample.members.len() != entry.members.len() {
        return Err(invalid(format!(
            "sample {} has {} members, its index entry {}",
            printable(&entry.key),
            sample.members.len(),
            entry.members.len()
        )));
    }
    Ok(sample)
}
