//! Pixel operations of the SwAV multi-crop recipe, each equal to what torchvision does on a PIL
//! image (SwAV and VISSL run every augmentation on PIL images, so PIL's integer arithmetic is
//! the reference, not torchvision's tensor kernels).
//!
//! All images are interleaved RGB8 (`data.len() == width * height * 3`, rows packed).
//! Operations work in place on the small crop after the resize, so they never allocate in the
//! steady state: buffers they need are kept in the structs that own them.

pub mod blur;
pub mod color;
pub mod pack;
pub mod resize;

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

/// A mutably borrowed interleaved RGB8 image.
#[derive(Debug)]
pub struct RgbMut<'a> {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes, row-major, R G B per pixel.
    pub data: &'a mut [u8],
}

impl RgbMut<'_> {
    /// Reborrows as a shared view.
    pub fn as_ref(&self) -> RgbRef<'_> {
        RgbRef {
            width: self.width,
            height: self.height,
            data: self.data,
        }
    }
}

/// A crop rectangle in source pixels, as torchvision's `RandomResizedCrop.get_params` returns
/// it (`top, left, height, width`), always inside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// Mirrors the image left to right (`PIL.Image.transpose(FLIP_LEFT_RIGHT)`).
pub fn flip_horizontal(image: RgbMut<'_>) {
    let row_bytes = image.width as usize * 3;
    for row in image.data.chunks_exact_mut(row_bytes) {
        let pixels = row.len() / 3;
        for i in 0..pixels / 2 {
            let j = pixels - 1 - i;
            for c in 0..3 {
                row.swap(i * 3 + c, j * 3 + c);
            }
        }
    }
}
