//! Decoding a stored image to RGB8, once per source image, into a reused buffer.
//!
//! JPEG (what `ingest` stores) goes through libjpeg-turbo, the fastest decoder measured on this
//! machine kind (`../shared/reference/pipeline.md` §9: 633 stored 512-px images/s per core,
//! against 457 for zune-jpeg); anything else, and the rare JPEG libjpeg-turbo cannot convert
//! to RGB directly (CMYK), through the `image` crate.

use crate::ops::RgbRef;
use turbojpeg::{Decompressor, Image, PixelFormat};

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
}

/// A reusable decoder: the RGB8 output buffer lives as long as the decoder.
pub struct Decoder {
    turbo: Option<Decompressor>,
    pixels: Vec<u8>,
    width: u32,
    height: u32,
    max_pixels: u64,
}

impl Decoder {
    /// A decoder refusing images above `max_pixels` (from their header, before decoding).
    pub fn new(max_pixels: u64) -> Self {
        Self {
            turbo: Decompressor::new().ok(),
            pixels: Vec::new(),
            width: 0,
            height: 0,
            max_pixels,
        }
    }

    /// Decodes `bytes`; the result borrows the decoder's buffer until the next call.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<RgbRef<'_>, DecodeError> {
        let is_jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
        let decoded_by_turbo = is_jpeg && self.turbo.is_some() && self.decode_jpeg(bytes)?;
        if !decoded_by_turbo {
            self.decode_other(bytes)?;
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
        check_size(header.width as u64, header.height as u64, self.max_pixels)?;
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
        check_size(u64::from(width), u64::from(height), self.max_pixels)?;
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

fn check_size(width: u64, height: u64, limit: u64) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt(format!(
            "empty image {width}x{height}"
        )));
    }
    if width * height > limit {
        return Err(DecodeError::TooLarge {
            width,
            height,
            limit,
        });
    }
    Ok(())
}
