//! JPEG specifics: a bounds-checked marker walker (orientation, Adobe transform, frame type),
//! lossless metadata stripping, lossless rewriting of progressive JPEGs as sequential ones, and
//! decoding through libjpeg-turbo.
//!
//! The walker only reads the segments before the first scan; it never trusts a length field
//! without checking it against the buffer, so a hostile header can end the walk early but never
//! index out of bounds.

use std::cell::RefCell;

use image::metadata::Orientation;
use turbojpeg::{
    Colorspace, Decompressor, Image, PixelFormat, ScalingFactor, Transform, TransformOp,
    Transformer,
};

/// The most progressive scans libjpeg-turbo may read before giving up. libjpeg-turbo's own
/// documentation recommends a limit (it suggests 500) against progressive JPEGs crafted with
/// thousands of tiny scans, whose decode time grows with the scan count rather than with the
/// pixel count. Real encoders write about 10.
const MAX_PROGRESSIVE_SCANS: u32 = 500;

/// What the segments before the first scan say about a JPEG.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct JpegMarkers {
    /// EXIF orientation from the first APP1 "Exif" segment, if it names a valid value (1..=8).
    pub orientation: Option<Orientation>,
    /// Whether an APP14 "Adobe" segment exists: Photoshop writes CMYK/YCCK inverted, and
    /// readers (Pillow, browsers) take its presence as the sign of inverted CMYK.
    pub has_adobe_marker: bool,
    /// The start-of-frame marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...).
    pub frame_marker: Option<u8>,
    /// Sample precision in bits from the frame header (8 for nearly every JPEG).
    pub precision: u8,
    /// Number of components (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK).
    pub components: u8,
}

impl JpegMarkers {
    /// Huffman-coded 8-bit baseline or progressive: the kinds every JPEG reader supports.
    pub fn is_plain_huffman_8bit(&self) -> bool {
        matches!(self.frame_marker, Some(0xC0..=0xC2)) && self.precision == 8
    }
}

/// Whether a marker stands alone, without a length field.
fn is_standalone(marker: u8) -> bool {
    matches!(marker, 0x01 | 0xD0..=0xD9)
}

/// One segment before the first scan: its marker, where it starts (at the 0xFF), where it ends
/// (one past its last byte) and its payload (after the length field).
struct Segment<'a> {
    marker: u8,
    start: usize,
    end: usize,
    payload: &'a [u8],
}

/// Walks the segments after SOI up to and including SOS (whose payload is its header only).
/// Stops at the first malformed structure; the caller learns this from `complete == false`.
struct SegmentWalker<'a> {
    bytes: &'a [u8],
    position: usize,
    done: bool,
    /// Set when the walk reached SOS cleanly.
    reached_scan: bool,
}

impl<'a> SegmentWalker<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let valid_start = bytes.len() >= 2 && bytes[0] == 0xFF && bytes[1] == 0xD8;
        Self {
            bytes,
            position: 2,
            done: !valid_start,
            reached_scan: false,
        }
    }
}

impl<'a> Iterator for SegmentWalker<'a> {
    type Item = Segment<'a>;

    fn next(&mut self) -> Option<Segment<'a>> {
        if self.done {
            return None;
        }
        let bytes = self.bytes;
        let start = self.position;
        if bytes.get(start) != Some(&0xFF) {
            self.done = true;
            return None;
        }
        // Any number of 0xFF fill bytes may precede a marker.
        let mut marker_at = start + 1;
        while bytes.get(marker_at) == Some(&0xFF) {
            marker_at += 1;
        }
        let Some(&marker) = bytes.get(marker_at) else {
            self.done = true;
            return None;
        };
        if is_standalone(marker) {
            if marker == 0xD9 {
                self.done = true;
                return None;
            }
            self.position = marker_at + 1;
            return Some(Segment {
                marker,
                start,
                end: marker_at + 1,
                payload: &[],
            });
        }
        let length_at = marker_at + 1;
        let Some(length_bytes) = bytes.get(length_at..length_at + 2) else {
            self.done = true;
            return None;
        };
        let length = usize::from(u16::from_be_bytes([length_bytes[0], length_bytes[1]]));
        let end = length_at + length;
        if length < 2 || end > bytes.len() {
            self.done = true;
            return None;
        }
        self.position = end;
        if marker == 0xDA {
            self.done = true;
            self.reached_scan = true;
        }
        Some(Segment {
            marker,
            start,
            end,
            payload: &bytes[length_at + 2..end],
        })
    }
}

/// Reads what the header segments say; never fails, missing facts stay `None`/0.
pub(crate) fn read_markers(bytes: &[u8]) -> JpegMarkers {
    let mut markers = JpegMarkers::default();
    for segment in SegmentWalker::new(bytes) {
        match segment.marker {
            0xE1 if markers.orientation.is_none() => {
                if let Some(tiff) = segment.payload.strip_prefix(b"Exif\0\0") {
                    markers.orientation = Orientation::from_exif_chunk(tiff);
                }
            }
            0xEE if segment.payload.starts_with(b"Adobe") => markers.has_adobe_marker = true,
            // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
            marker @ (0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF)
                if markers.frame_marker.is_none() =>
            {
                markers.frame_marker = Some(marker);
                if segment.payload.len() >= 6 {
                    markers.precision = segment.payload[0];
                    markers.components = segment.payload[5];
                }
            }
            _ => {}
        }
    }
    markers
}

/// Returns the JPEG without APP1..APP15 and COM segments (EXIF, XMP, ICC profiles, Photoshop
/// IRB, comments), byte-for-byte otherwise: the entropy-coded data and every segment after the
/// first scan are copied unchanged, so decoding gives exactly the same pixels. APP0 (JFIF) stays
/// because some readers use its density and version. `None` when the header is malformed.
pub(crate) fn strip_metadata(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut walker = SegmentWalker::new(bytes);
    let mut output = Vec::with_capacity(bytes.len());
    output.extend_from_slice(&bytes[..2]);
    let mut scan_start = None;
    for segment in walker.by_ref() {
        let is_metadata = matches!(segment.marker, 0xE1..=0xEF | 0xFE);
        if segment.marker == 0xDA {
            scan_start = Some(segment.start);
            break;
        }
        if !is_metadata {
            output.extend_from_slice(&bytes[segment.start..segment.end]);
        }
    }
    if !walker.reached_scan {
        return None;
    }
    output.extend_from_slice(&bytes[scan_start?..]);
    Some(output)
}

thread_local! {
    // As DECOMPRESSOR below, one libjpeg-turbo transform handle per thread.
    static TRANSFORMER: RefCell<Option<Transformer>> = const { RefCell::new(None) };
}

/// Rewrites a progressive JPEG as a sequential (baseline) one with Huffman tables optimized for
/// it, copying none of its extra markers (EXIF, ICC, comments): a lossless transcode of the
/// quantized DCT coefficients (`jpegtran -optimize -copy none`), so decoders give the same
/// pixels from both, except where libjpeg-turbo smooths the blocks of a progressive JPEG whose
/// scans left coefficients incomplete (the caller checks, with [`decodes_to`]). libjpeg-turbo
/// decodes a progressive JPEG about 3 times slower than the same coefficients coded
/// sequentially (docs/benchmarks.md, "Progressive JPEGs stored sequential"), and a stored
/// sample is decoded again in every epoch. `None` when libjpeg-turbo refuses.
pub(crate) fn to_sequential(bytes: &[u8]) -> Option<Vec<u8>> {
    TRANSFORMER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Transformer::new().ok()?);
        }
        let transformer = slot.as_mut().expect("initialized just above");
        let mut transform = Transform::op(TransformOp::None);
        transform.optimize = true;
        transform.copy_none = true;
        transformer.transform_to_vec(&transform, bytes).ok()
    })
}

/// Whether `bytes` decode at full scale, without any warning, to exactly `rgb`.
pub(crate) fn decodes_to(bytes: &[u8], rgb: &[u8]) -> bool {
    let Ok(header) = read_header(bytes) else {
        return false;
    };
    decode(bytes, &header, 1, false)
        .is_ok_and(|decoded| decoded.warning.is_none() && decoded.rgb == rgb)
}

/// Header facts libjpeg-turbo reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JpegHeader {
    pub width: u32,
    pub height: u32,
    pub colorspace: Colorspace,
    pub is_lossless: bool,
    pub is_arithmetic: bool,
}

/// A decoded JPEG as 8-bit RGB, possibly at a DCT-reduced scale.
pub(crate) struct DecodedJpeg {
    pub rgb: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// A harmless libjpeg warning the decode produced; such a file is never kept as is,
    /// because a strict reader downstream would refuse it.
    pub warning: Option<String>,
}

thread_local! {
    // A libjpeg-turbo handle costs an allocation and some setup; ingest workers decode many
    // images per thread, so each thread keeps one.
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

fn with_decompressor<T>(
    work: impl FnOnce(&mut Decompressor) -> Result<T, String>,
) -> Result<T, String> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decompressor::new().map_err(|error| error.to_string())?);
        }
        let decompressor = slot.as_mut().expect("initialized just above");
        work(decompressor)
    })
}

pub(crate) fn read_header(bytes: &[u8]) -> Result<JpegHeader, String> {
    with_decompressor(|decompressor| {
        let header = decompressor
            .read_header(bytes)
            .map_err(|error| error.to_string())?;
        let to_u32 = |value: usize| u32::try_from(value).map_err(|_| "dimension overflows u32");
        Ok(JpegHeader {
            width: to_u32(header.width)?,
            height: to_u32(header.height)?,
            colorspace: header.colorspace,
            is_lossless: header.is_lossless,
            is_arithmetic: header.is_arithmetic,
        })
    })
}

/// The largest DCT reduction (1/8, 1/4, 1/2) that keeps the shorter side at or above
/// `target_short_side`; 1 when none does. libjpeg-turbo rounds scaled sizes up.
pub(crate) fn reduction_for(width: u32, height: u32, target_short_side: u32) -> u32 {
    let short_side = width.min(height);
    [8, 4, 2]
        .into_iter()
        .find(|&denominator| short_side.div_ceil(denominator) >= target_short_side)
        .unwrap_or(1)
}

/// libjpeg warnings that leave a complete, correct image: libjpeg-turbo reports every warning as
/// a failure, so the message decides. Warnings that mean lost data (premature end of file, bad
/// Huffman code, missing restart marker) are not listed: such images have grey or smeared
/// regions and are rejected.
fn is_harmless_warning(message: &str) -> bool {
    const HARMLESS: [&str; 5] = [
        "extraneous bytes before marker",
        "Warning: unknown JFIF revision",
        "Unknown Adobe color transform",
        "Corrupt JPEG data: bad ICC marker",
        "Invalid SOS parameters for sequential JPEG",
    ];
    HARMLESS.iter().any(|harmless| message.contains(harmless))
}

/// Decodes to 8-bit RGB at 1/`reduction` scale. CMYK and YCCK JPEGs are decoded to CMYK and
/// converted with the naive formula readers use without a color profile
/// (R = (255 - C)(255 - K) / 255, ...), un-inverting first when an Adobe marker says the
/// values are stored inverted.
pub(crate) fn decode(
    bytes: &[u8],
    header: &JpegHeader,
    reduction: u32,
    inverted_cmyk: bool,
) -> Result<DecodedJpeg, String> {
    with_decompressor(|decompressor| {
        decompressor
            .set_scan_limit(MAX_PROGRESSIVE_SCANS)
            .map_err(|error| error.to_string())?;
        let scaling = ScalingFactor::new(1, reduction as usize);
        decompressor
            .set_scaling_factor(scaling)
            .map_err(|error| error.to_string())?;
        let width = scaling.scale(header.width as usize);
        let height = scaling.scale(header.height as usize);
        let is_cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
        let format = if is_cmyk {
            PixelFormat::CMYK
        } else {
            PixelFormat::RGB
        };
        let mut pixels = vec![0u8; width * height * format.size()];
        let output = Image {
            pixels: pixels.as_mut_slice(),
            width,
            pitch: width * format.size(),
            height,
            format,
        };
        let mut warning = None;
        if let Err(error) = decompressor.decompress(bytes, output) {
            let message = error.to_string();
            if !is_harmless_warning(&message) {
                return Err(message);
            }
            warning = Some(message);
        }
        let rgb = if is_cmyk {
            cmyk_to_rgb(&pixels, inverted_cmyk)
        } else {
            pixels
        };
        Ok(DecodedJpeg {
            rgb,
            width: width as u32,
            height: height as u32,
            warning,
        })
    })
}

fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for pixel in cmyk.chunks_exact(4) {
        // Without inversion a component is the ink amount; with it, 255 minus the ink amount.
        let [c, m, y, k] = if inverted {
            [pixel[0], pixel[1], pixel[2], pixel[3]]
        } else {
            [
                255 - pixel[0],
                255 - pixel[1],
                255 - pixel[2],
                255 - pixel[3],
            ]
        };
        let blend = |paper: u8| ((u32::from(paper) * u32::from(k) + 127) / 255) as u8;
        rgb.extend_from_slice(&[blend(c), blend(m), blend(y)]);
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SOI, APP0 JFIF, APP1 Exif (big-endian, orientation 6), COM, APP14 Adobe, SOF0 (8-bit,
    /// 3 components), SOS header, two entropy bytes, EOI.
    fn synthetic_header() -> Vec<u8> {
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x07, b'J', b'F', b'I', b'F', 0]);
        let tiff: [u8; 26] = [
            b'M', b'M', 0, 42, 0, 0, 0, 8, // header, IFD0 at 8
            0, 1, // one entry
            0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, // orientation = 6
            0, 0, 0, 0, // no next IFD
        ];
        let app1_length = (2 + 6 + tiff.len()) as u16;
        jpeg.extend_from_slice(&[0xFF, 0xE1]);
        jpeg.extend_from_slice(&app1_length.to_be_bytes());
        jpeg.extend_from_slice(b"Exif\0\0");
        jpeg.extend_from_slice(&tiff);
        jpeg.extend_from_slice(&[0xFF, 0xFE, 0x00, 0x04, b'h', b'i']);
        jpeg.extend_from_slice(&[0xFF, 0xEE, 0x00, 0x0E]);
        jpeg.extend_from_slice(b"Adobe\0\x64\0\0\0\0\x02");
        jpeg.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 8, 0, 16, 0, 16, 3]);
        jpeg.extend_from_slice(&[1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        jpeg.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 1, 1, 0, 0, 0x3F, 0]);
        jpeg.extend_from_slice(&[0x12, 0x34, 0xFF, 0xD9]);
        jpeg
    }

    #[test]
    fn reads_orientation_adobe_and_frame() {
        let markers = read_markers(&synthetic_header());
        assert_eq!(markers.orientation, Some(Orientation::Rotate90));
        assert!(markers.has_adobe_marker);
        assert_eq!(markers.frame_marker, Some(0xC0));
        assert_eq!((markers.precision, markers.components), (8, 3));
        assert!(markers.is_plain_huffman_8bit());
    }

    #[test]
    fn strips_app1_to_app15_and_comments_only() {
        let stripped = strip_metadata(&synthetic_header()).expect("well-formed");
        let kept: Vec<u8> = SegmentWalker::new(&stripped)
            .map(|segment| segment.marker)
            .collect();
        assert_eq!(kept, vec![0xE0, 0xC0, 0xDA]);
        assert!(stripped.ends_with(&[0x12, 0x34, 0xFF, 0xD9]));
        assert_eq!(read_markers(&stripped).orientation, None);
    }

    #[test]
    fn malformed_headers_never_panic() {
        let header = synthetic_header();
        for cut in 0..header.len() {
            let _ = read_markers(&header[..cut]);
            let _ = strip_metadata(&header[..cut]);
        }
        assert_eq!(strip_metadata(&header[..20]), None);
    }

    #[test]
    fn reductions_keep_the_short_side() {
        assert_eq!(reduction_for(4000, 3000, 512), 4); // 750 >= 512, 375 < 512
        assert_eq!(reduction_for(1024, 2000, 512), 2);
        assert_eq!(reduction_for(1023, 2000, 512), 2); // 512 after rounding up
        assert_eq!(reduction_for(1022, 2000, 512), 1);
        assert_eq!(reduction_for(8192, 8192, 512), 8);
        assert_eq!(reduction_for(300, 200, 512), 1);
    }

    #[test]
    fn cmyk_conversion_handles_inversion() {
        // Pure cyan ink, no black: (0, 255, 255).
        assert_eq!(cmyk_to_rgb(&[255, 0, 0, 0], false), vec![0, 255, 255]);
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255], true), vec![0, 255, 255]);
        // Full black.
        assert_eq!(cmyk_to_rgb(&[0, 0, 0, 255], false), vec![0, 0, 0]);
    }
}
