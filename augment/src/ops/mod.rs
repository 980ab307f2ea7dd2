//! Pixel operations of the SwAV multi-crop recipe, each equal to what torchvision does on a PIL
//! image (SwAV and VISSL run every augmentation on PIL images, so PIL's integer arithmetic is
//! the reference, not torchvision's tensor kernels).
//!
//! All images are interleaved RGB8 (`data.len() == width * height * 3`, rows packed).
//! Operations work in place on the small crop after the resize, so they never allocate in the
//! steady state: buffers they need are kept in the structs that own them.

/// Defines a function that runs `$portable` compiled a second time with AVX2 enabled when the
/// CPU has it (decided at run time, so the binary still runs on any x86-64), and the portable
/// build otherwise. `$portable` must be `#[inline(always)]` so that its body is compiled into
/// the AVX2 copy. The hot loops of these operations are written to autovectorize; with AVX2
/// they run on eight 32-bit lanes with a native 32-bit multiply, which SSE2 lacks.
macro_rules! dispatch_avx2 {
    (
        $(#[$meta:meta])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $portable:path
    ) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the only precondition of a `#[target_feature]` function is that
                    // the CPU supports the feature, which the line above checked.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

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
    if row_bytes == 0 {
        return;
    }
    for row in image.data.chunks_exact_mut(row_bytes) {
        let (pixels, _) = row.as_chunks_mut::<3>();
        pixels.reverse();
    }
}
