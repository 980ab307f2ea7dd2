//! Writing shards: samples in, a WebDataset tar plus its index out.

use std::collections::BTreeMap;
use std::io::Write;

use sha2::{Digest, Sha256};

use crate::meta::{FORMAT_VERSION, IndexEntry, MemberSpan, ShardIndex};
use crate::tar::{self, BLOCK};
use crate::{ShardError, validate_extension, validate_key};

/// Writes samples as adjacent tar members `KEY.EXT` into any [`Write`] and
/// records where each one lands.
///
/// Member modification times are zero, so the same samples always give the
/// same bytes and the same checksum.
pub struct ShardWriter<W: Write> {
    out: W,
    shard: String,
    offset: u64,
    hasher: Sha256,
    samples: Vec<IndexEntry>,
}

/// What [`ShardWriter::finish`] returns.
pub struct FinishedShard<W> {
    /// The writer given to [`ShardWriter::new`].
    pub out: W,
    /// The shard's index.
    pub index: ShardIndex,
    /// Hex SHA-256 of the shard's bytes.
    pub sha256: String,
}

impl<W: Write> ShardWriter<W> {
    /// A writer for the shard named `shard` (used in the index and in errors).
    pub fn new(out: W, shard: impl Into<String>) -> Self {
        Self {
            out,
            shard: shard.into(),
            offset: 0,
            hasher: Sha256::new(),
            samples: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), ShardError> {
        self.out.write_all(bytes).map_err(|source| ShardError::Io {
            shard: self.shard.clone(),
            source,
        })?;
        self.hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Appends one sample: its members, in the order given, as `KEY.EXT`.
    pub fn add(&mut self, key: &str, members: &[(&str, &[u8])]) -> Result<(), ShardError> {
        self.add_with_source_hash(key, members, None)
    }

    /// As [`ShardWriter::add`], recording the SHA-256 of the sample's original in the index.
    pub fn add_with_source_hash(
        &mut self,
        key: &str,
        members: &[(&str, &[u8])],
        source_sha256: Option<&str>,
    ) -> Result<(), ShardError> {
        validate_key(key)?;
        if members.is_empty() {
            return Err(ShardError::Invalid {
                shard: self.shard.clone(),
                reason: format!("sample {key} has no members"),
            });
        }
        let mut spans = BTreeMap::new();
        let start = self.offset;
        for (ext, data) in members {
            validate_extension(ext)?;
            let name = format!("{key}.{ext}");
            if name.len() > tar::MAX_NAME {
                return Err(ShardError::Invalid {
                    shard: self.shard.clone(),
                    reason: format!("member name {name} is longer than {} bytes", tar::MAX_NAME),
                });
            }
            let size = data.len() as u64;
            if spans
                .insert(
                    ext.to_string(),
                    MemberSpan {
                        offset: self.offset + BLOCK as u64,
                        size,
                    },
                )
                .is_some()
            {
                return Err(ShardError::Invalid {
                    shard: self.shard.clone(),
                    reason: format!("sample {key} has two members with extension {ext}"),
                });
            }
            self.emit(&tar::file_header(&name, size, 0))?;
            self.emit(data)?;
            let pad = tar::padding(size) as usize;
            self.emit(&[0u8; BLOCK][..pad])?;
        }
        self.samples.push(IndexEntry {
            key: key.to_string(),
            offset: start,
            size: self.offset - start,
            members: spans,
            source_sha256: source_sha256.map(str::to_string),
        });
        Ok(())
    }

    /// Number of samples written so far.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when no sample has been written.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// Writes the end-of-archive marker and flushes.
    pub fn finish(mut self) -> Result<FinishedShard<W>, ShardError> {
        self.emit(&tar::END_OF_ARCHIVE)?;
        self.out.flush().map_err(|source| ShardError::Io {
            shard: self.shard.clone(),
            source,
        })?;
        let sha256 = hex::encode(self.hasher.finalize());
        let index = ShardIndex {
            version: FORMAT_VERSION,
            shard: self.shard,
            bytes: self.offset,
            samples: self.samples,
        };
        Ok(FinishedShard {
            out: self.out,
            index,
            sha256,
        })
    }
}
