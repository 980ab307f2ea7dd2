//! Decoding a stored image to RGB8, once per image, into a reused buffer.
//!
//! One decoder for every stage, so that they agree on which images are good: `augment` and the
//! trainer's evaluation decode with it, and `shards verify` and `shards grid` check with it, so
//! an image that verify passes is one the training pipeline accepts.
//!
//! JPEG (what `ingest` stores) goes through libjpeg-turbo, the fastest decoder measured on this
//! machine kind (`../shared/reference/pipeline.md` §9: 633 stored 512-px images/s per core,
//! against 457 for zune-jpeg). It is strict: a JPEG cut short, or with less data than its header
//! announces, is an error ("Premature end of JPEG file"), where zune-jpeg (the `image` crate's
//! JPEG decoder) fills in the missing rows. Anything else, and the rare JPEG libjpeg-turbo cannot
//! convert to RGB directly (CMYK), goes through the `image` crate, which finds the format from
//! the bytes.
//!
//! ```
//! use shards::decode::Decoder;
//! let mut png = Vec::new();
//! image::RgbImage::new(3, 2)
//!     .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
//!     .unwrap();
//! let mut decoder = Decoder::new(64 << 20);
//! let image = decoder.decode(&png).unwrap();
//! assert_eq!((image.width, image.height, image.data.len()), (3, 2, 18));
//! ```

use turbojpeg::{Decompressor, Image, PixelFormat};

/// A borrowed interleaved RGB8 image.
#[derive(Debug, Clone, Copy)]
pub struct RgbRef<'a> {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes, row-major, R G B per pixel.
    pub data: &'a [u8],
}

/// Why a stored image could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The decoder refused the bytes.
    #[error("cannot decode image: {0}")]
    Corrupt(String),
    /// The header announces more pixels than the limit allows.
    #[error("image of {width}x{height} exceeds the limit of {limit} pixels")]
    TooLarge {
        /// Width from the header.
        width: u64,
        /// Height from the header.
        height: u64,
        /// The limit.
        limit: u64,
    },
    /// The header announces a side longer than the limit allows.
    #[error("image of {width}x{height} exceeds the limit of {limit} pixels a side")]
    SideTooLong {
        /// Width from the header.
        width: u64,
        /// Height from the header.
        height: u64,
        /// The limit.
        limit: u64,
    },
}

/// A reusable decoder: the RGB8 output buffer lives as long as the decoder.
pub struct Decoder {
    turbo: Option<Decompressor>,
    pixels: Vec<u8>,
    width: u32,
    height: u32,
    limits: Limits,
}

impl Decoder {
    /// A decoder refusing images above `max_pixels` (from their header, before decoding).
    pub fn new(max_pixels: u64) -> Self {
        Self {
            turbo: Decompressor::new().ok(),
            pixels: Vec::new(),
            width: 0,
            height: 0,
            limits: Limits {
                max_pixels,
                max_side: u64::MAX,
            },
        }
    }

    /// Also refuses images wider or taller than `max_side` pixels (default: no such limit).
    pub fn with_max_side(mut self, max_side: u32) -> Self {
        self.limits.max_side = u64::from(max_side);
        self
    }

    /// Decodes `bytes`; the result borrows the decoder's buffer until the next call.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<RgbRef<'_>, DecodeError> {
        let is_jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
        let decoded_by_turbo = is_jpeg && self.turbo.is_some() && self.decode_jpeg(bytes)?;
        if !decoded_by_turbo {
            // The `image` crate's decoders assert on some malformed files (tiled planar TIFFs,
            // for one) instead of returning an error: such an image is as corrupt as any other,
            // not the end of the thread that decodes it.
            match crate::catch_panic(|| self.decode_other(bytes)) {
                Ok(result) => result?,
                Err(reason) => {
                    return Err(DecodeError::Corrupt(format!(
                        "the decoder failed on this image ({reason})"
                    )));
                }
            }
        }
        Ok(RgbRef {
            width: self.width,
            height: self.height,
            data: &self.pixels[..self.width as usize * self.height as usize * 3],
        })
    }

    /// Returns `Ok(false)` when libjpeg-turbo cannot produce RGB from this JPEG (CMYK) and the
    /// general decoder should try.
    fn decode_jpeg(&mut self, bytes: &[u8]) -> Result<bool, DecodeError> {
        let limits = self.limits;
        let turbo = self.turbo.as_mut().expect("checked by the caller");
        let header = turbo
            .read_header(bytes)
            .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        if matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        ) {
            return Ok(false);
        }
        limits.check(header.width as u64, header.height as u64)?;
        let (width, height) = (header.width, header.height);
        let needed = width * height * 3;
        if self.pixels.len() < needed {
            self.pixels.resize(needed, 0);
        }
        let output = Image {
            pixels: &mut self.pixels[..needed],
            width,
            pitch: width * 3,
            height,
            format: PixelFormat::RGB,
        };
        turbo
            .decompress(bytes, output)
            .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        self.width = width as u32;
        self.height = height as u32;
        Ok(true)
    }

    fn decode_other(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        let (width, height) = reader
            .into_dimensions()
            .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        self.limits.check(u64::from(width), u64::from(height))?;
        let image = image::load_from_memory(bytes)
            .map_err(|e| DecodeError::Corrupt(e.to_string()))?
            .into_rgb8();
        self.width = image.width();
        self.height = image.height();
        self.pixels.clear();
        self.pixels.extend_from_slice(image.as_raw());
        Ok(())
    }
}

/// A decoder's limits, checked against an image's header before decoding.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_pixels: u64,
    max_side: u64,
}

impl Limits {
    fn check(self, width: u64, height: u64) -> Result<(), DecodeError> {
        if width == 0 || height == 0 {
            return Err(DecodeError::Corrupt(format!(
                "empty image {width}x{height}"
            )));
        }
        if width > self.max_side || height > self.max_side {
            return Err(DecodeError::SideTooLong {
                width,
                height,
                limit: self.max_side,
            });
        }
        if width * height > self.max_pixels {
            return Err(DecodeError::TooLarge {
                width,
                height,
                limit: self.max_pixels,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&image)
            .unwrap();
        out
    }

    #[test]
    fn a_jpeg_cut_short_is_refused() {
        let whole = jpeg(64, 48);
        let mut decoder = Decoder::new(1 << 20);
        let image = decoder.decode(&whole).unwrap();
        assert_eq!((image.width, image.height), (64, 48));
        // zune-jpeg, the `image` crate's decoder, fills in what is missing.
        assert!(image::load_from_memory(&whole[..whole.len() / 2]).is_ok());
        let error = decoder
            .decode(&whole[..whole.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(error.contains("Premature end of JPEG file"), "{error}");
    }

    #[test]
    fn limits_are_checked_from_the_header() {
        let bytes = jpeg(64, 48);
        let error = Decoder::new(64 * 47).decode(&bytes).unwrap_err();
        assert!(
            matches!(error, DecodeError::TooLarge { width: 64, height: 48, limit } if limit == 64 * 47),
            "{error}"
        );
        let error = Decoder::new(1 << 20)
            .with_max_side(63)
            .decode(&bytes)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "image of 64x48 exceeds the limit of 63 pixels a side"
        );
        assert!(
            Decoder::new(64 * 48)
                .with_max_side(64)
                .decode(&bytes)
                .is_ok()
        );
    }
}
