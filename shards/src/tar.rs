//! A minimal, strict POSIX ustar writer and a sans-IO parser.
//!
//! Shards hold only regular files with short names, so the writer emits plain
//! ustar headers and nothing else. The parser accepts exactly that (plus
//! directory entries, which it skips) and rejects every extension header (PAX,
//! GNU long names, sparse files): extension headers are where tar readers have
//! disagreed about member sizes (CVE-2025-62518), and a shard reader that
//! guesses there can bleed one member into the next.

use bytes::{Buf, Bytes, BytesMut};

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// Largest name that fits the ustar `name` field without the `prefix` field.
pub const MAX_NAME: usize = 100;

/// Largest member size the 11 octal digits of the ustar `size` field hold.
pub const MAX_MEMBER_SIZE: u64 = 0o77777777777;

/// Why a tar stream could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarError {
    /// The stream ended inside a header, a member or before the end-of-archive marker.
    #[error("truncated at byte {offset}: {what}")]
    Truncated {
        /// Byte offset where the stream ended.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A header is malformed.
    #[error("bad tar header at byte {offset}: {reason}")]
    BadHeader {
        /// Byte offset of the header.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A member is larger than the reader allows.
    #[error("member {name:?} at byte {offset} is {size} bytes, over the limit of {limit}")]
    MemberTooLarge {
        /// Member name.
        name: String,
        /// Byte offset of its header.
        offset: u64,
        /// Its declared size.
        size: u64,
        /// The reader's limit.
        limit: u64,
    },
}

/// Number of zero bytes that pad `size` up to a whole block.
pub fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Bytes a member of `size` bytes occupies in the archive, header included.
pub fn member_span(size: u64) -> u64 {
    BLOCK as u64 + size + padding(size)
}

fn write_octal(field: &mut [u8], value: u64) {
    // `field.len() - 1` octal digits followed by a NUL, as GNU tar writes them.
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    debug_assert_eq!(
        text.len(),
        digits,
        "value {value} does not fit {digits} octal digits"
    );
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

/// Builds the header block of a regular file.
///
/// `name` must be at most [`MAX_NAME`] bytes of ASCII and `size` at most
/// [`MAX_MEMBER_SIZE`]; callers validate both (sample keys are checked by
/// [`crate::validate_key`]).
pub fn file_header(name: &str, size: u64, mtime: u64) -> [u8; BLOCK] {
    assert!(
        name.len() <= MAX_NAME && name.is_ascii(),
        "tar member name {name:?} must be ASCII of at most {MAX_NAME} bytes"
    );
    assert!(
        size <= MAX_MEMBER_SIZE,
        "tar member {name:?} is too large for ustar"
    );
    let mut header = [0u8; BLOCK];
    header[..name.len()].copy_from_slice(name.as_bytes());
    write_octal(&mut header[100..108], 0o644);
    write_octal(&mut header[108..116], 0);
    write_octal(&mut header[116..124], 0);
    write_octal(&mut header[124..136], size);
    write_octal(&mut header[136..148], mtime);
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].fill(b' ');
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{checksum:06o}\0 ");
    header[148..156].copy_from_slice(text.as_bytes());
    header
}

/// One regular-file member read from a tar stream.
#[derive(Debug, Clone)]
pub struct Member {
    /// The member's name.
    pub name: String,
    /// Byte offset of the member's header in the archive.
    pub header_offset: u64,
    /// Byte offset of the member's data in the archive.
    pub data_offset: u64,
    /// The member's data.
    pub data: Bytes,
}

fn parse_octal(field: &[u8], offset: u64, what: &str) -> Result<u64, TarError> {
    let text: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let text = std::str::from_utf8(&text).map_err(|_| TarError::BadHeader {
        offset,
        reason: format!("{what} field is not ASCII"),
    })?;
    let text = text.trim_matches(' ');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| TarError::BadHeader {
        offset,
        reason: format!("{what} field {text:?} is not an octal number"),
    })
}

enum State {
    /// Expecting a header block.
    Header,
    /// Expecting `size` data bytes (and then padding) of a member.
    Data {
        name: String,
        header_offset: u64,
        size: u64,
    },
    /// Skipping the data of an entry that is not a regular file.
    Skip { remaining: u64 },
    /// Seen the first zero block of the end-of-archive marker.
    FirstZero,
    /// Seen the end-of-archive marker; anything after it must be zeros.
    End,
}

/// A sans-IO tar parser: feed it bytes, take members out.
///
/// Memory stays bounded by the largest member plus what the caller buffers:
/// members are returned whole and nothing else is kept.
pub struct TarParser {
    state: State,
    /// Offset in the archive of the first byte of the caller's buffer.
    offset: u64,
    max_member_size: u64,
}

impl TarParser {
    /// A parser that refuses members larger than `max_member_size` bytes.
    pub fn new(max_member_size: u64) -> Self {
        Self::starting_at(max_member_size, 0)
    }

    /// A parser for bytes that start at `offset` in the archive (a ranged read): the offsets
    /// it reports, in members and errors, are the archive's.
    pub fn starting_at(max_member_size: u64, offset: u64) -> Self {
        Self {
            state: State::Header,
            offset,
            max_member_size,
        }
    }

    /// Offset in the archive of the next byte the parser will consume.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True once the end-of-archive marker has been read.
    pub fn at_end(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// The name of the member whose data the parser is reading: its header has been read,
    /// its data not yet all.
    pub fn member_in_progress(&self) -> Option<&str> {
        match &self.state {
            State::Data { name, .. } => Some(name),
            _ => None,
        }
    }

    /// How many bytes the parser wants in `buf` before [`TarParser::next_member`] can make progress.
    pub fn wanted(&self) -> usize {
        match &self.state {
            State::Header | State::FirstZero | State::End => BLOCK,
            State::Data { size, .. } => (*size + padding(*size)) as usize,
            State::Skip { remaining } => (*remaining).min(1 << 20) as usize,
        }
    }

    /// Consumes whole blocks from the front of `buf` and returns the next member
    /// once it is complete. `Ok(None)` means: give me more bytes (or, if
    /// [`TarParser::at_end`], the archive is over).
    pub fn next_member(&mut self, buf: &mut BytesMut) -> Result<Option<Member>, TarError> {
        loop {
            match &mut self.state {
                State::End => {
                    // Trailing blocks after the marker (GNU tar pads to 10 KiB records) must be zeros.
                    while buf.len() >= BLOCK {
                        if buf[..BLOCK].iter().any(|&b| b != 0) {
                            return Err(TarError::BadHeader {
                                offset: self.offset,
                                reason: "data after the end-of-archive marker".into(),
                            });
                        }
                        buf.advance(BLOCK);
                        self.offset += BLOCK as u64;
                    }
                    return Ok(None);
                }
                State::Skip { remaining } => {
                    if *remaining == 0 {
                        self.state = State::Header;
                        continue;
                    }
                    let take = (*remaining).min(buf.len() as u64);
                    if take == 0 {
                        return Ok(None);
                    }
                    buf.advance(take as usize);
                    self.offset += take;
                    *remaining -= take;
                }
                State::Data {
                    name,
                    header_offset,
                    size,
                } => {
                    let span = (*size + padding(*size)) as usize;
                    if buf.len() < span {
                        buf.reserve(span - buf.len());
                        return Ok(None);
                    }
                    let mut block = buf.split_to(span);
                    block.truncate(*size as usize);
                    let member = Member {
                        name: std::mem::take(name),
                        header_offset: *header_offset,
                        data_offset: *header_offset + BLOCK as u64,
                        data: block.freeze(),
                    };
                    self.offset += span as u64;
                    self.state = State::Header;
                    return Ok(Some(member));
                }
                State::Header | State::FirstZero => {
                    if buf.len() < BLOCK {
                        return Ok(None);
                    }
                    let header_offset = self.offset;
                    let header: [u8; BLOCK] = buf[..BLOCK].try_into().expect("block length");
                    buf.advance(BLOCK);
                    self.offset += BLOCK as u64;
                    if header.iter().all(|&b| b == 0) {
                        self.state = match self.state {
                            State::Header => State::FirstZero,
                            _ => State::End,
                        };
                        continue;
                    }
                    if matches!(self.state, State::FirstZero) {
                        return Err(TarError::BadHeader {
                            offset: header_offset,
                            reason: "a lone zero block followed by more headers".into(),
                        });
                    }
                    self.parse_header(&header, header_offset)?;
                }
            }
        }
    }

    fn parse_header(&mut self, header: &[u8; BLOCK], offset: u64) -> Result<(), TarError> {
        let stored = parse_octal(&header[148..156], offset, "checksum")?;
        let mut unsigned: u64 = 0;
        for (i, &b) in header.iter().enumerate() {
            unsigned += if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            };
        }
        if stored != unsigned {
            return Err(TarError::BadHeader {
                offset,
                reason: format!("checksum {stored} does not match the header's {unsigned}"),
            });
        }
        let magic = &header[257..263];
        if magic != b"ustar\0" && magic != b"ustar " {
            return Err(TarError::BadHeader {
                offset,
                reason: "not a ustar header".into(),
            });
        }
        let name_field: Vec<u8> = header[..100]
            .iter()
            .copied()
            .take_while(|&b| b != 0)
            .collect();
        let prefix_field: Vec<u8> = if magic == b"ustar\0" {
            header[345..500]
                .iter()
                .copied()
                .take_while(|&b| b != 0)
                .collect()
        } else {
            Vec::new()
        };
        let mut name = String::from_utf8(prefix_field)
            .and_then(|prefix| String::from_utf8(name_field).map(|n| (prefix, n)))
            .map(|(prefix, n)| {
                if prefix.is_empty() {
                    n
                } else {
                    format!("{prefix}/{n}")
                }
            })
            .map_err(|_| TarError::BadHeader {
                offset,
                reason: "member name is not UTF-8".into(),
            })?;
        if name.is_empty() {
            return Err(TarError::BadHeader {
                offset,
                reason: "empty member name".into(),
            });
        }
        if header[124] & 0x80 != 0 {
            return Err(TarError::BadHeader {
                offset,
                reason: "base-256 size fields are not supported".into(),
            });
        }
        let size = parse_octal(&header[124..136], offset, "size")?;
        match header[156] {
            b'0' | 0 => {
                if size > self.max_member_size {
                    return Err(TarError::MemberTooLarge {
                        name,
                        offset,
                        size,
                        limit: self.max_member_size,
                    });
                }
                if let Some(stripped) = name.strip_prefix("./") {
                    name = stripped.to_string();
                }
                self.state = State::Data {
                    name,
                    header_offset: offset,
                    size,
                };
                Ok(())
            }
            b'5' => {
                self.state = State::Skip {
                    remaining: size + padding(size),
                };
                Ok(())
            }
            other => Err(TarError::BadHeader {
                offset,
                reason: format!(
                    "member {name:?} has type {:?}; shards hold only plain ustar regular files (no PAX or GNU extension headers, links or devices)",
                    other as char
                ),
            }),
        }
    }

    /// Explains why the stream cannot end here, if it cannot.
    pub fn check_eof(&self, buffered: usize) -> Result<(), TarError> {
        let offset = self.offset + buffered as u64;
        match self.state {
            State::End => Ok(()),
            State::Header if buffered == 0 => Err(TarError::Truncated {
                offset,
                what: "no end-of-archive marker",
            }),
            State::FirstZero if buffered == 0 => Err(TarError::Truncated {
                offset,
                what: "end-of-archive marker cut short",
            }),
            State::Header | State::FirstZero => Err(TarError::Truncated {
                offset,
                what: "inside a header block",
            }),
            State::Data { .. } | State::Skip { .. } => Err(TarError::Truncated {
                offset,
                what: "inside a member's data",
            }),
        }
    }
}

/// The two zero blocks that end an archive.
pub const END_OF_ARCHIVE: [u8; 2 * BLOCK] = [0; 2 * BLOCK];

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in members {
            out.extend_from_slice(&file_header(name, data.len() as u64, 0));
            out.extend_from_slice(data);
            out.resize(out.len() + padding(data.len() as u64) as usize, 0);
        }
        out.extend_from_slice(&END_OF_ARCHIVE);
        out
    }

    fn parse_all(bytes: &[u8], chunk: usize) -> Result<Vec<Member>, TarError> {
        let mut parser = TarParser::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(m) = parser.next_member(&mut buf)? {
                out.push(m);
            }
        }
        parser.check_eof(buf.len())?;
        Ok(out)
    }

    #[test]
    fn round_trip_in_any_chunking() {
        let bytes = archive(&[("a.jpg", b"hello"), ("a.json", &[7u8; 512]), ("b.jpg", &[])]);
        for chunk in [1, 7, 511, 512, 513, 4096] {
            let members = parse_all(&bytes, chunk).unwrap();
            assert_eq!(members.len(), 3);
            assert_eq!(members[0].name, "a.jpg");
            assert_eq!(&members[0].data[..], b"hello");
            assert_eq!(members[1].data_offset, 512 + 512 + 512);
            assert_eq!(members[2].data.len(), 0);
        }
    }

    #[test]
    fn truncation_is_an_error_with_offset() {
        let bytes = archive(&[("a.jpg", &[1u8; 1000])]);
        let err = parse_all(&bytes[..700], 64).unwrap_err();
        assert_eq!(
            err,
            TarError::Truncated {
                offset: 700,
                what: "inside a member's data"
            }
        );
        let err = parse_all(&bytes[..bytes.len() - 1024], 64).unwrap_err();
        assert!(matches!(
            err,
            TarError::Truncated {
                what: "no end-of-archive marker",
                ..
            }
        ));
    }

    #[test]
    fn corrupt_header_is_rejected() {
        let mut bytes = archive(&[("a.jpg", b"x")]);
        bytes[5] ^= 1;
        assert!(matches!(
            parse_all(&bytes, 512),
            Err(TarError::BadHeader { offset: 0, .. })
        ));
    }

    #[test]
    fn pax_headers_are_rejected() {
        let mut bytes = archive(&[("a.jpg", b"x")]);
        bytes[156] = b'x';
        bytes[148..156].fill(b' ');
        let sum: u32 = bytes[..512].iter().map(|&b| u32::from(b)).sum();
        bytes[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let err = parse_all(&bytes, 512).unwrap_err();
        assert!(err.to_string().contains("type 'x'"), "{err}");
    }
}
