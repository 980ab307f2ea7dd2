//! Per-image processing: bytes from object storage in, a validated, normalized image out.
//!
//! [`process_image`] takes the raw bytes of one object and either returns a
//! [`ProcessedImage`] (JPEG bytes ready for a shard, its sizes and a perceptual hash) or a
//! [`Rejection`] whose [`Rejection::reason`] is a stable short code for counters.
//!
//! The steps, in order, each able to reject:
//!
//! 1. **Caps before any decoding.** The byte size is checked first; the format is sniffed from
//!    magic bytes (never from a file name); the header alone gives the pixel count, which must
//!    not exceed [`ImageConfig::max_pixels`] (decompression bombs claim billions of pixels in a
//!    few bytes). The image crate's decoders additionally run under [`image::Limits`] as a
//!    second line of defence, and every decoder call runs inside
//!    [`std::panic::catch_unwind`] as the last one.
//! 2. **Decode** to 8-bit RGB. JPEG goes through libjpeg-turbo (the `turbojpeg` crate): it is
//!    the fastest decoder measured here and the reference for correctness (zune-jpeg, inside the
//!    `image` crate, decodes some valid JPEGs to garbage without an error). When the shorter
//!    side stays at least [`ImageConfig::max_short_side`], the JPEG is decoded at 1/2, 1/4 or
//!    1/8 scale directly in the DCT (measured +30 % throughput). PNG, WebP, GIF (first frame),
//!    BMP and TIFF go through the `image` crate.
//! 3. **Color.** Every mode becomes 8-bit RGB: gray is replicated, 16-bit is rounded to 8 bits,
//!    palette is expanded, CMYK/YCCK JPEGs are converted with the naive formula (un-inverting
//!    Adobe's inverted CMYK), and **alpha is composited over white**: transparent regions of web
//!    images (logos, product cut-outs) are meant to be seen on a light page, and dropping alpha
//!    would expose whatever color the encoder left under transparent pixels (often black or
//!    noise). No color management: ICC profiles are ignored and pixels are taken as sRGB, in
//!    both the re-encoded and the kept-original path, so both paths agree.
//! 4. **Size.** Images whose shorter side (orientation does not change it) is below
//!    [`ImageConfig::min_side`] are dropped, before decoding. Larger ones are shrunk so the
//!    shorter side is [`ImageConfig::max_short_side`] with `fast_image_resize`'s Catmull-Rom
//!    convolution (antialiased: the kernel is widened by the shrink factor), then the EXIF
//!    orientation is applied (all 8 values; after the resize, where it is cheaper).
//! 5. **Encode** as JPEG with libjpeg-turbo at [`ImageConfig::jpeg_quality`], 4:2:0 chroma,
//!    no metadata. Or, when the input is already a plain JPEG within limits and
//!    [`ImageConfig::keep_original_jpeg`] is set, keep its bytes, minus its metadata
//!    segments (removed losslessly); a progressive one has its DCT coefficients rewritten as a
//!    sequential JPEG, losslessly too (the same pixels, decoded several times faster in every
//!    epoch).
//! 6. **Hash**: a 64-bit DCT perceptual hash of the final pixels, for near-duplicate detection
//!    with [`phash_distance`].
//!
//! # Example
//!
//! ```
//! use ingest::image::{process_image, ImageConfig, StoredFormat};
//!
//! // A 1280x960 gray PNG, made here so the example needs no file.
//! let mut png = Vec::new();
//! image::DynamicImage::new_luma8(1280, 960)
//!     .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
//!     .unwrap();
//!
//! let processed = process_image(&png, &ImageConfig::default()).unwrap();
//! assert_eq!(processed.format, StoredFormat::Jpeg);
//! assert_eq!((processed.width, processed.height), (683, 512));
//! assert_eq!((processed.original_width, processed.original_height), (1280, 960));
//!
//! let rejection = process_image(b"not an image", &ImageConfig::default()).unwrap_err();
//! assert_eq!(rejection.reason(), "unsupported_format");
//! ```

mod jpeg;
mod phash;

use std::cell::RefCell;
use std::io::Cursor;
use std::time::{Duration, Instant};

use fast_image_resize::images::{Image as ResizeImage, ImageRef as ResizeImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use turbojpeg::{Colorspace, Compressor, Subsamp};

const MIB: u64 = 1024 * 1024;

/// Settings for [`process_image`]. `Default` gives the values ingest runs with; each field
/// documents its default and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Inputs larger than this are refused without being parsed. Default **50 MiB**: a 24 MP
    /// camera JPEG is 5-15 MB and a 6000x4000 wallpaper PNG about 40 MB; anything larger is
    /// rare in web data, usually not a photo, and would hold a worker's memory for one sample.
    pub max_input_bytes: u64,
    /// Images whose header claims more pixels than this are refused before decoding.
    /// Default **64 MP** (e.g. 8000x8000): above the 61 MP of the largest full-frame cameras,
    /// and an RGB decode buffer of at most 192 MiB per worker. Decompression bombs (a 24 KB BMP
    /// claiming 3,000,000 x 2,000,000 pixels) stop here.
    pub max_pixels: u64,
    /// Images whose shorter side is below this are dropped. Default **96**, the size of SwAV's
    /// small crops: a smaller image cannot give even one crop at native resolution, and its
    /// 224-px global crops would be upsampled more than 2.3x, i.e. mostly blur.
    pub min_side: u32,
    /// Larger images are shrunk so that their shorter side is this. Default **512**: a global
    /// 224 crop then keeps native resolution down to a RandomResizedCrop scale of about 0.19
    /// (sqrt(0.19) x 512 = 224) and is at most ~2x upsampled at the smallest scale 0.05
    /// (115 px); the 96-px local crops never upsample at scale 0.05 or more (115 >= 96).
    /// Storing at 1000 px to avoid all upsampling would cost ~4x the bytes and decode time in
    /// every epoch. It is also the size FFCV's ImageNet recipe stores (512, q90, ~51 KB).
    pub max_short_side: u32,
    /// JPEG quality of re-encoded images. Default **90**: artifacts are invisible at training
    /// resolution and under color jitter, and files are about half the size of q95 (FFCV uses
    /// 90 for the same purpose).
    pub jpeg_quality: u8,
    /// Keep the original bytes (minus metadata) of JPEGs that are already within limits instead
    /// of re-encoding them. Default **true**: re-encoding would add a second generation of
    /// compression loss and cost encode time for no gain (img2dataset's `skip_reencode`).
    pub keep_original_jpeg: bool,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            max_input_bytes: 50 * MIB,
            max_pixels: 64_000_000,
            min_side: 96,
            max_short_side: 512,
            jpeg_quality: 90,
            keep_original_jpeg: true,
        }
    }
}

/// A configuration that [`process_image`] cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("jpeg_quality must be between 1 and 100, got {0}")]
    JpegQuality(u8),
    #[error("max_short_side ({max_short_side}) must be at least min_side ({min_side}) and above 0")]
    ShortSides { min_side: u32, max_short_side: u32 },
    #[error("max_pixels and max_input_bytes must be above 0")]
    ZeroCap,
}

impl ImageConfig {
    /// Checks the settings; call it once before processing so that a bad configuration is a
    /// clear message instead of every image being rejected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=100).contains(&self.jpeg_quality) {
            return Err(ConfigError::JpegQuality(self.jpeg_quality));
        }
        if self.max_short_side == 0 || self.max_short_side < self.min_side {
            return Err(ConfigError::ShortSides {
                min_side: self.min_side,
                max_short_side: self.max_short_side,
            });
        }
        if self.max_pixels == 0 || self.max_input_bytes == 0 {
            return Err(ConfigError::ZeroCap);
        }
        Ok(())
    }
}

/// The encoding of [`ProcessedImage::bytes`]. Ingest currently always stores JPEG; PNG and WebP
/// are reserved for a lossless mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredFormat {
    Jpeg,
    Png,
    Webp,
}

impl StoredFormat {
    /// The file extension used as the WebDataset key suffix.
    pub fn extension(self) -> &'static str {
        match self {
            StoredFormat::Jpeg => "jpg",
            StoredFormat::Png => "png",
            StoredFormat::Webp => "webp",
        }
    }
}

/// Time spent in each stage of one [`process_image`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    /// Header parsing, decoding and conversion to 8-bit RGB.
    pub decode: Duration,
    /// Shrinking and applying the EXIF orientation.
    pub resize: Duration,
    /// JPEG encoding, or stripping metadata from a kept original.
    pub encode: Duration,
    /// The perceptual hash.
    pub hash: Duration,
}

impl StageTimings {
    pub fn total(&self) -> Duration {
        self.decode + self.resize + self.encode + self.hash
    }
}

/// An accepted image, ready to be written to a shard.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// The encoded image, without metadata.
    pub bytes: Vec<u8>,
    pub format: StoredFormat,
    /// Size of the input as displayed, i.e. after the EXIF orientation.
    pub original_width: u32,
    pub original_height: u32,
    /// Size of the stored image (already oriented; it carries no orientation tag).
    pub width: u32,
    pub height: u32,
    /// 64-bit DCT perceptual hash of the stored pixels; compare with [`phash_distance`].
    pub phash: u64,
    /// Whether `bytes` are the input's own JPEG data (metadata removed; a progressive one's
    /// coefficients rewritten as sequential) rather than a re-encode: either way they decode to
    /// the input's pixels.
    pub kept_original: bool,
    pub timings: StageTimings,
}

/// Why an input was not turned into a [`ProcessedImage`]. Every variant carries the numbers
/// that decided it; [`Rejection::reason`] gives a stable code for counters and logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("input is {bytes} bytes, more than the {max_bytes}-byte cap")]
    TooLargeBytes { bytes: u64, max_bytes: u64 },
    #[error(
        "{format} header claims {width}x{height} = {pixels} pixels, more than the {max_pixels}-pixel cap"
    )]
    TooManyPixels {
        format: &'static str,
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    #[error("{width}x{height} (as displayed) has a shorter side below the minimum of {min_side}")]
    TooSmall {
        width: u32,
        height: u32,
        min_side: u32,
    },
    #[error("not a supported image format ({detail})")]
    UnsupportedFormat { detail: String },
    #[error("{format} data could not be decoded: {detail}")]
    Undecodable {
        format: &'static str,
        detail: String,
    },
    #[error("the {format} decoder needed more memory than allowed: {detail}")]
    OverMemoryLimit {
        format: &'static str,
        detail: String,
    },
    #[error("the {format} decoder panicked: {message}")]
    DecoderPanic {
        format: &'static str,
        message: String,
    },
    #[error("encoding the {width}x{height} result failed: {detail}")]
    EncodeFailed {
        width: u32,
        height: u32,
        detail: String,
    },
}

impl Rejection {
    /// A stable short code: `too_large_bytes`, `too_many_pixels`, `too_small`,
    /// `unsupported_format`, `undecodable`, `over_memory_limit` (the decoder itself wanted more
    /// than [`image::Limits`] allowed), `decoder_panic` or `encode_failed`.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::TooLargeBytes { .. } => "too_large_bytes",
            Rejection::TooManyPixels { .. } => "too_many_pixels",
            Rejection::TooSmall { .. } => "too_small",
            Rejection::UnsupportedFormat { .. } => "unsupported_format",
            Rejection::Undecodable { .. } => "undecodable",
            Rejection::OverMemoryLimit { .. } => "over_memory_limit",
            Rejection::DecoderPanic { .. } => "decoder_panic",
            Rejection::EncodeFailed { .. } => "encode_failed",
        }
    }

    /// Every code [`Rejection::reason`] can return, for registering counters up front.
    pub const REASONS: [&'static str; 8] = [
        "too_large_bytes",
        "too_many_pixels",
        "too_small",
        "unsupported_format",
        "undecodable",
        "over_memory_limit",
        "decoder_panic",
        "encode_failed",
    ];
}

/// The number of differing bits between two perceptual hashes: 0 for identical images, small
/// (about <= 8 of 64) for resized, recompressed or slightly edited copies.
pub fn phash_distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// Validates, decodes, normalizes, re-encodes and hashes one image; see the module
/// documentation for the steps. Never panics; `config` should have passed
/// [`ImageConfig::validate`] (an out-of-range quality is clamped).
pub fn process_image(bytes: &[u8], config: &ImageConfig) -> Result<ProcessedImage, Rejection> {
    let mut timings = StageTimings::default();
    let byte_count = bytes.len() as u64;
    if byte_count > config.max_input_bytes {
        return Err(Rejection::TooLargeBytes {
            bytes: byte_count,
            max_bytes: config.max_input_bytes,
        });
    }
    let format = sniff(bytes)?;

    let started = Instant::now();
    let decoded = guarded(format_name(format), || match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, config),
        other => decode_with_image_crate(bytes, other, config),
    })?;
    timings.decode = started.elapsed();

    let started = Instant::now();
    // From the full size, not the DCT-reduced one, whose rounding would skew the aspect ratio.
    let target = shrunk_size(
        decoded.full_width,
        decoded.full_height,
        config.max_short_side,
    );
    let (mut rgb, mut width, mut height) = (decoded.rgb, decoded.width, decoded.height);
    if target != (width, height) {
        rgb = guarded("resize", || resize_rgb(&rgb, width, height, target))?;
        (width, height) = target;
    }
    if decoded.orientation != Orientation::NoTransforms {
        (rgb, width, height) = orient(rgb, width, height, decoded.orientation);
    }
    timings.resize = started.elapsed();

    let started = Instant::now();
    let kept = match &decoded.keep_candidate {
        Some(_) if !config.keep_original_jpeg => None,
        Some(_) if target != (decoded.width, decoded.height) => None,
        // The rewrite decodes to the same pixels unless the progressive scans left some
        // coefficients incomplete: libjpeg-turbo then smooths blocks when decoding the
        // progressive file, and never the sequential one. Such a file stays progressive.
        Some(Frame::Progressive) => jpeg::to_sequential(bytes)
            .filter(|sequential| jpeg::decodes_to(sequential, &rgb))
            .or_else(|| jpeg::strip_metadata(bytes)),
        Some(Frame::Sequential) => jpeg::strip_metadata(bytes),
        None => None,
    };
    let kept_original = kept.is_some();
    let output = match kept {
        Some(stripped) => stripped,
        None => encode_jpeg(&rgb, width, height, config.jpeg_quality)?,
    };
    timings.encode = started.elapsed();

    let started = Instant::now();
    let phash = phash::phash_rgb(&rgb, width, height);
    timings.hash = started.elapsed();

    Ok(ProcessedImage {
        bytes: output,
        format: StoredFormat::Jpeg,
        original_width: decoded.original_width,
        original_height: decoded.original_height,
        width,
        height,
        phash,
        kept_original,
        timings,
    })
}

/// Decoded pixels in stored (not yet oriented) layout, plus what the later steps need.
struct Decoded {
    rgb: Vec<u8>,
    width: u32,
    height: u32,
    /// The stored size before any DCT reduction.
    full_width: u32,
    full_height: u32,
    orientation: Orientation,
    original_width: u32,
    original_height: u32,
    /// Set for JPEGs whose original bytes may be kept: plain 8-bit Huffman YCbCr or gray, no
    /// orientation to apply, decoded at full scale without any libjpeg warning.
    keep_candidate: Option<Frame>,
}

/// How a kept JPEG's scans are coded, which decides how it is kept.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// Baseline or extended sequential: kept as is, minus metadata.
    Sequential,
    /// Progressive: rewritten as sequential, losslessly.
    Progressive,
}

/// The start-of-frame marker of a JPEG (0xC0 baseline, 0xC1 extended sequential, 0xC2
/// progressive, ...), read from its header segments; `None` when there is none to read.
pub fn jpeg_frame_marker(bytes: &[u8]) -> Option<u8> {
    jpeg::read_markers(bytes).frame_marker
}

/// A progressive JPEG rewritten as a sequential one from the same DCT coefficients, losslessly
/// (what [`process_image`] stores for a progressive JPEG it keeps), without metadata; `None`
/// when libjpeg-turbo refuses the input.
pub fn progressive_to_sequential(bytes: &[u8]) -> Option<Vec<u8>> {
    jpeg::to_sequential(bytes)
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "image",
    }
}

/// The format from magic bytes. File names and Content-Type headers lie; the first bytes of a
/// file decide what its decoder will do.
fn sniff(bytes: &[u8]) -> Result<ImageFormat, Rejection> {
    let format = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        ImageFormat::Jpeg
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        ImageFormat::Png
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        ImageFormat::Gif
    } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
        ImageFormat::WebP
    } else if bytes.starts_with(b"BM") {
        ImageFormat::Bmp
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        ImageFormat::Tiff
    } else {
        let detail = match bytes.len() {
            0 => "empty input".to_string(),
            // What the bytes are when they are no image, where it says what to do.
            _ if bytes.starts_with(&[0x1f, 0x8b]) => "gzip-compressed data, not an image (a \
                 .gz file, or a server that sends its images with Content-Encoding: gzip)"
                .to_string(),
            _ if bytes.trim_ascii_start().starts_with(b"<") => {
                "an HTML or XML document (an SVG drawing, or an error or login page?), not a raster \
                 image"
                    .to_string()
            }
            n => format!("unrecognized magic bytes {:02x?}", &bytes[..n.min(8)]),
        };
        return Err(Rejection::UnsupportedFormat { detail });
    };
    Ok(format)
}

/// Runs decoder code, turning a panic into a rejection. The decoders are meant not to panic;
/// this is the last line of defence so one hostile file cannot take a worker down.
///
/// The panic's text becomes the rejection's reason, recorded with the file's URL; the default
/// panic hook, which would also print it to stderr (with no file name, in the middle of the
/// JSON log, with a backtrace under `RUST_BACKTRACE`), stays silent for panics caught here.
fn guarded<T>(
    format: &'static str,
    work: impl FnOnce() -> Result<T, Rejection>,
) -> Result<T, Rejection> {
    shards::catch_panic(work)
        .unwrap_or_else(|message| Err(Rejection::DecoderPanic { format, message }))
}

fn check_pixel_cap(
    format: &'static str,
    width: u32,
    height: u32,
    config: &ImageConfig,
) -> Result<(), Rejection> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > config.max_pixels {
        return Err(Rejection::TooManyPixels {
            format,
            width,
            height,
            pixels,
            max_pixels: config.max_pixels,
        });
    }
    Ok(())
}

/// Width and height from the fixed-position header fields of PNG (IHDR), GIF (logical screen)
/// and BMP (DIB header); `None` for other formats or a too-short header.
fn header_dimensions(format: ImageFormat, bytes: &[u8]) -> Option<(u32, u32)> {
    let u16_le = |at: usize| {
        Some(u32::from(u16::from_le_bytes(
            bytes.get(at..at + 2)?.try_into().ok()?,
        )))
    };
    let u32_be = |at: usize| Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let i32_le = |at: usize| Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    match format {
        ImageFormat::Png if bytes.get(12..16) == Some(b"IHDR") => Some((u32_be(16)?, u32_be(20)?)),
        ImageFormat::Gif => Some((u16_le(6)?, u16_le(8)?)),
        ImageFormat::Bmp => match i32_le(14)? {
            // OS/2 BITMAPCOREHEADER: 16-bit sizes.
            12 => Some((u16_le(18)?, u16_le(20)?)),
            // Negative height means top-down rows.
            _ => Some((i32_le(18)?.unsigned_abs(), i32_le(22)?.unsigned_abs())),
        },
        _ => None,
    }
}

fn check_caps(
    format: &'static str,
    width: u32,
    height: u32,
    orientation: Orientation,
    config: &ImageConfig,
) -> Result<(u32, u32), Rejection> {
    check_pixel_cap(format, width, height, config)?;
    let displayed = if swaps_axes(orientation) {
        (height, width)
    } else {
        (width, height)
    };
    if width.min(height) < config.min_side {
        return Err(Rejection::TooSmall {
            width: displayed.0,
            height: displayed.1,
            min_side: config.min_side,
        });
    }
    Ok(displayed)
}

fn swaps_axes(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn decode_jpeg(bytes: &[u8], config: &ImageConfig) -> Result<Decoded, Rejection> {
    let undecodable = |detail: String| Rejection::Undecodable {
        format: "JPEG",
        detail,
    };
    let markers = jpeg::read_markers(bytes);
    let header = jpeg::read_header(bytes).map_err(undecodable)?;
    let orientation = markers.orientation.unwrap_or(Orientation::NoTransforms);
    let (original_width, original_height) =
        check_caps("JPEG", header.width, header.height, orientation, config)?;
    // Lossless JPEGs cannot be DCT-scaled.
    let reduction = if header.is_lossless {
        1
    } else {
        jpeg::reduction_for(header.width, header.height, config.max_short_side)
    };
    let decoded =
        jpeg::decode(bytes, &header, reduction, markers.has_adobe_marker).map_err(undecodable)?;
    let plain = decoded.warning.is_none()
        && markers.is_plain_huffman_8bit()
        && !header.is_arithmetic
        && !header.is_lossless
        && matches!(header.colorspace, Colorspace::YCbCr | Colorspace::Gray);
    let frame = if markers.frame_marker == Some(0xC2) {
        Frame::Progressive
    } else {
        Frame::Sequential
    };
    let keep_candidate =
        (plain && reduction == 1 && orientation == Orientation::NoTransforms).then_some(frame);
    Ok(Decoded {
        rgb: decoded.rgb,
        width: decoded.width,
        height: decoded.height,
        full_width: header.width,
        full_height: header.height,
        orientation,
        original_width,
        original_height,
        keep_candidate,
    })
}

fn decode_with_image_crate(
    bytes: &[u8],
    format: ImageFormat,
    config: &ImageConfig,
) -> Result<Decoded, Rejection> {
    let name = format_name(format);
    let undecodable = |error: image::ImageError| match error {
        image::ImageError::Limits(limit) => Rejection::OverMemoryLimit {
            format: name,
            detail: limit.to_string(),
        },
        other => Rejection::Undecodable {
            format: name,
            detail: other.to_string(),
        },
    };
    // Some decoders refuse huge sizes with a generic format error, and some allocate from the
    // header while being created: check the pixel cap from our own header read first.
    if let Some((width, height)) = header_dimensions(format, bytes) {
        check_pixel_cap(name, width, height, config)?;
    }
    // Worst case a decoder holds RGBA16 (8 bytes a pixel) plus working buffers.
    let max_alloc = config.max_pixels.saturating_mul(8).saturating_add(32 * MIB);
    let mut header_limits = Limits::default();
    header_limits.max_alloc = Some(max_alloc);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(header_limits.clone());
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    let orientation = exif_orientation(&mut decoder);
    let (original_width, original_height) = check_caps(name, width, height, orientation, config)?;

    // Second line of defence: the decoder may not produce or allocate beyond what was checked.
    let mut limits = header_limits;
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    decoder.set_limits(limits).map_err(undecodable)?;
    let image = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    if (image.width(), image.height()) != (width, height) {
        return Err(Rejection::Undecodable {
            format: name,
            detail: format!(
                "decoded {}x{} but the header said {width}x{height}",
                image.width(),
                image.height()
            ),
        });
    }
    let rgb = to_rgb8(image);
    Ok(Decoded {
        rgb,
        width,
        height,
        full_width: width,
        full_height: height,
        orientation,
        original_width,
        original_height,
        keep_candidate: None,
    })
}

/// The EXIF orientation of a non-JPEG image. Some writers (Pillow's WebP among them) keep the
/// JPEG APP1 prefix `Exif\0\0` in front of the TIFF structure, which `image` does not expect,
/// so it is removed before parsing. Unreadable EXIF counts as no orientation.
fn exif_orientation(decoder: &mut impl ImageDecoder) -> Orientation {
    match decoder.exif_metadata() {
        Ok(Some(exif)) => {
            let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(&exif);
            Orientation::from_exif_chunk(tiff).unwrap_or(Orientation::NoTransforms)
        }
        _ => decoder.orientation().unwrap_or(Orientation::NoTransforms),
    }
}

/// Any color mode to tightly packed 8-bit RGB; alpha is composited over white.
fn to_rgb8(image: DynamicImage) -> Vec<u8> {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb.into_raw(),
        image if image.color().has_alpha() => {
            let rgba = image.into_rgba8();
            let mut rgb = Vec::with_capacity(rgba.len() / 4 * 3);
            for pixel in rgba.as_raw().chunks_exact(4) {
                let alpha = u32::from(pixel[3]);
                let over_white = |value: u8| {
                    ((u32::from(value) * alpha + 255 * (255 - alpha) + 127) / 255) as u8
                };
                rgb.extend_from_slice(&[
                    over_white(pixel[0]),
                    over_white(pixel[1]),
                    over_white(pixel[2]),
                ]);
            }
            rgb
        }
        image => image.into_rgb8().into_raw(),
    }
}

/// The size that makes the shorter side at most `max_short_side`, keeping the aspect ratio
/// (the longer side is rounded to nearest and at least 1).
fn shrunk_size(width: u32, height: u32, max_short_side: u32) -> (u32, u32) {
    let short_side = width.min(height);
    if short_side <= max_short_side || short_side == 0 {
        return (width, height);
    }
    let scale = |long: u32| {
        let scaled = (u64::from(long) * u64::from(max_short_side) + u64::from(short_side) / 2)
            / u64::from(short_side);
        (scaled as u32).max(1)
    };
    if width <= height {
        (max_short_side, scale(height))
    } else {
        (scale(width), max_short_side)
    }
}

thread_local! {
    // The resizer keeps its coefficient and row buffers between calls.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Catmull-Rom (bicubic, a = -0.5): sharper than bilinear, which blurs fine texture the
/// augmenter's crops then magnify, and with less ringing and a third less time than Lanczos3
/// (measured 428 vs 458 vs 321 images/s for CatmullRom / Bilinear / Lanczos3; resizing is a small
/// part of the chain). It is also Pillow's BICUBIC, what most Python ingesters used. The
/// convolution widens the kernel by the shrink factor, so shrinking is antialiased.
fn resize_rgb(
    rgb: &[u8],
    width: u32,
    height: u32,
    target: (u32, u32),
) -> Result<Vec<u8>, Rejection> {
    let failed = |detail: String| Rejection::Undecodable {
        format: "resize",
        detail,
    };
    let source = ResizeImageRef::new(width, height, rgb, PixelType::U8x3)
        .map_err(|error| failed(error.to_string()))?;
    let mut destination = ResizeImage::new(target.0, target.1, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    RESIZER
        .with(|resizer| {
            resizer
                .borrow_mut()
                .resize(&source, &mut destination, &options)
        })
        .map_err(|error| failed(error.to_string()))?;
    Ok(destination.into_vec())
}

fn orient(rgb: Vec<u8>, width: u32, height: u32, orientation: Orientation) -> (Vec<u8>, u32, u32) {
    let buffer =
        RgbImage::from_raw(width, height, rgb).expect("buffer size matches its dimensions");
    let mut image = DynamicImage::ImageRgb8(buffer);
    image.apply_orientation(orientation);
    let (width, height) = (image.width(), image.height());
    (image.into_rgb8().into_raw(), width, height)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<Compressor>> = const { RefCell::new(None) };
}

/// 4:2:0 chroma: what nearly every photo on the web already has, a third smaller than 4:4:4,
/// and invisible at training resolution.
fn encode_jpeg(rgb: &[u8], width: u32, height: u32, quality: u8) -> Result<Vec<u8>, Rejection> {
    let failed = |detail: String| Rejection::EncodeFailed {
        width,
        height,
        detail,
    };
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Compressor::new().map_err(|error| failed(error.to_string()))?);
        }
        let compressor = slot.as_mut().expect("initialized just above");
        compressor
            .set_quality(i32::from(quality.clamp(1, 100)))
            .map_err(|error| failed(error.to_string()))?;
        compressor
            .set_subsamp(Subsamp::Sub2x2)
            .map_err(|error| failed(error.to_string()))?;
        let image = turbojpeg::Image {
            pixels: rgb,
            width: width as usize,
            pitch: width as usize * 3,
            height: height as usize,
            format: turbojpeg::PixelFormat::RGB,
        };
        compressor
            .compress_to_vec(image)
            .map_err(|error| failed(error.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shards verify` refuses stats with a reason it does not know: every reason the image
    /// step gives must be in its list.
    #[test]
    fn every_rejection_reason_is_one_shards_knows() {
        for reason in Rejection::REASONS {
            assert!(
                shards::meta::FAILURE_REASONS.contains(&reason),
                "{reason} is missing from shards::meta::FAILURE_REASONS"
            );
        }
    }

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), format)
            .expect("encodes");
        bytes
    }

    #[test]
    fn default_config_is_valid() {
        ImageConfig::default().validate().unwrap();
        let bad = ImageConfig {
            jpeg_quality: 0,
            ..ImageConfig::default()
        };
        assert_eq!(bad.validate(), Err(ConfigError::JpegQuality(0)));
    }

    #[test]
    fn shrunk_size_keeps_aspect() {
        assert_eq!(shrunk_size(4000, 3000, 512), (683, 512));
        assert_eq!(shrunk_size(3000, 4000, 512), (512, 683));
        assert_eq!(shrunk_size(500, 400, 512), (500, 400));
        assert_eq!(shrunk_size(100_000, 513, 512), (99_805, 512));
    }

    #[test]
    fn sniffs_magic_bytes() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0").unwrap(), ImageFormat::Jpeg);
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 ").unwrap(), ImageFormat::WebP);
        assert_eq!(sniff(b"").unwrap_err().reason(), "unsupported_format");
        assert_eq!(sniff(b"<svg").unwrap_err().reason(), "unsupported_format");
        // What the bytes are, when they are a usual mistake.
        let said = |bytes: &[u8]| sniff(bytes).unwrap_err().to_string();
        assert!(said(b"\x1f\x8b\x08\0").contains("gzip-compressed data"));
        assert!(said(b"\n <!DOCTYPE html>").contains("an HTML or XML document"));
        assert!(said(b"\0\x01\x02").contains("unrecognized magic bytes"));
    }

    #[test]
    fn caps_are_checked_before_decoding() {
        let config = ImageConfig::default();
        let too_big = vec![0u8; (config.max_input_bytes + 1) as usize];
        let rejection = process_image(&too_big, &config).unwrap_err();
        assert_eq!(rejection.reason(), "too_large_bytes");
        assert!(rejection.to_string().contains("52428801"), "{rejection}");

        let strict = ImageConfig {
            max_pixels: 1000,
            ..ImageConfig::default()
        };
        let png = encode(DynamicImage::new_rgb8(200, 200), ImageFormat::Png);
        let rejection = process_image(&png, &strict).unwrap_err();
        assert_eq!(rejection.reason(), "too_many_pixels");
        assert!(
            rejection.to_string().contains("200x200 = 40000"),
            "{rejection}"
        );
    }

    #[test]
    fn header_dimensions_of_bmp_png_gif() {
        for format in [ImageFormat::Png, ImageFormat::Gif, ImageFormat::Bmp] {
            let bytes = encode(DynamicImage::new_rgb8(321, 123), format);
            assert_eq!(
                header_dimensions(format, &bytes),
                Some((321, 123)),
                "{format:?}"
            );
            assert_eq!(header_dimensions(format, &bytes[..6]), None, "{format:?}");
        }
    }

    #[test]
    fn small_images_are_dropped() {
        let png = encode(DynamicImage::new_rgb8(300, 95), ImageFormat::Png);
        assert_eq!(
            process_image(&png, &ImageConfig::default())
                .unwrap_err()
                .reason(),
            "too_small"
        );
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let transparent = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            128,
            128,
            image::Rgba([0, 0, 0, 0]),
        ));
        let config = ImageConfig::default();
        let processed = process_image(&encode(transparent, ImageFormat::Png), &config).unwrap();
        let decoded = image::load_from_memory(&processed.bytes)
            .unwrap()
            .into_rgb8();
        assert!(
            decoded
                .pixels()
                .all(|pixel| pixel.0.iter().all(|&value| value >= 250))
        );
    }

    #[test]
    fn a_progressive_jpeg_whose_rewrite_would_change_pixels_stays_progressive() {
        // Its AC scans stop short of the last bit (tests/data/README.md): libjpeg-turbo
        // smooths its blocks, and would not smooth a sequential rewrite's.
        let original = include_bytes!("../tests/data/progressive-incomplete.jpg");
        let rewrite = jpeg::to_sequential(original).expect("libjpeg-turbo rewrites it");
        let decode = |bytes: &[u8]| {
            turbojpeg::decompress(bytes, turbojpeg::PixelFormat::RGB)
                .unwrap()
                .pixels
        };
        assert_ne!(
            decode(&rewrite),
            decode(original),
            "the file no longer shows the case"
        );
        let processed = process_image(original, &ImageConfig::default()).unwrap();
        assert!(processed.kept_original);
        assert_eq!(
            jpeg::read_markers(&processed.bytes).frame_marker,
            Some(0xC2)
        );
        assert_eq!(decode(&processed.bytes), decode(original));
    }

    #[test]
    fn small_jpeg_is_kept_and_large_is_resized() {
        let gradient = RgbImage::from_fn(400, 300, |x, y| image::Rgb([x as u8, y as u8, 128]));
        let small = encode(DynamicImage::ImageRgb8(gradient), ImageFormat::Jpeg);
        let processed = process_image(&small, &ImageConfig::default()).unwrap();
        assert!(processed.kept_original);
        assert_eq!((processed.width, processed.height), (400, 300));

        let no_keep = ImageConfig {
            keep_original_jpeg: false,
            ..ImageConfig::default()
        };
        assert!(!process_image(&small, &no_keep).unwrap().kept_original);

        let large = encode(
            DynamicImage::ImageRgb8(RgbImage::new(2100, 1100)),
            ImageFormat::Jpeg,
        );
        let processed = process_image(&large, &ImageConfig::default()).unwrap();
        assert!(!processed.kept_original);
        assert_eq!((processed.width, processed.height), (977, 512));
        assert_eq!(
            (processed.original_width, processed.original_height),
            (2100, 1100)
        );
    }

    #[test]
    fn phash_distance_counts_bits() {
        assert_eq!(phash_distance(0, u64::MAX), 64);
        assert_eq!(phash_distance(0b1010, 0b0110), 2);
    }
}
