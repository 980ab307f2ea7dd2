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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(data: &mut [u8], width: u32, height: u32) -> RgbMut<'_> {
        RgbMut {
            width,
            height,
            data,
        }
    }

    fn image(width: u32, height: u32, seed: u8) -> Vec<u8> {
        (0..width * height * 3)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn flip_reverses_pixels_not_channels() {
        let mut data = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        flip_horizontal(RgbMut {
            width: 3,
            height: 1,
            data: &mut data,
        });
        assert_eq!(data, [7, 8, 9, 4, 5, 6, 1, 2, 3]);
        let mut one = vec![1, 2, 3];
        flip_horizontal(RgbMut {
            width: 1,
            height: 1,
            data: &mut one,
        });
        assert_eq!(one, [1, 2, 3]);
        flip_horizontal(RgbMut {
            width: 0,
            height: 4,
            data: &mut [],
        });
    }

    proptest! {
        #[test]
        fn flip_twice_is_identity(width in 0u32..20, height in 0u32..6, seed: u8) {
            let original = image(width, height, seed);
            let mut data = original.clone();
            flip_horizontal(RgbMut { width, height, data: &mut data });
            flip_horizontal(RgbMut { width, height, data: &mut data });
            prop_assert_eq!(data, original);
        }

        /// Any crop of any small image to any small size: no panic, and a crop of the output's
        /// size is a plain copy.
        #[test]
        fn resized_crop_handles_every_geometry(
            (width, height, left, top, crop_width, crop_height) in (1u32..40, 1u32..40)
                .prop_flat_map(|(w, h)| (Just(w), Just(h), 0..w, 0..h))
                .prop_flat_map(|(w, h, l, t)| {
                    (Just(w), Just(h), Just(l), Just(t), 1..=w - l, 1..=h - t)
                }),
            out_width in 1u32..50,
            out_height in 1u32..50,
            seed: u8,
        ) {
            let src = image(width, height, seed);
            let crop = CropBox { top, left, height: crop_height, width: crop_width };
            let source = RgbRef { width, height, data: &src };
            let mut resizer = resize::CropResizer::new();
            let mut out = vec![0; (out_width * out_height * 3) as usize];
            let target = RgbMut { width: out_width, height: out_height, data: &mut out };
            resizer.resized_crop(source, crop, target);
            let mut same = vec![0; (crop_width * crop_height * 3) as usize];
            let target = RgbMut { width: crop_width, height: crop_height, data: &mut same };
            resizer.resized_crop(source, crop, target);
            for y in 0..crop_height as usize {
                let start = ((top as usize + y) * width as usize + left as usize) * 3;
                let row = crop_width as usize * 3;
                prop_assert_eq!(&same[y * row..(y + 1) * row], &src[start..start + row]);
            }
        }

        #[test]
        fn color_and_blur_never_panic(
            width in 0u32..12,
            height in 0u32..12,
            factor in -1.0f32..3.0,
            hue in -0.5f32..=0.5,
            radius in 0.0f32..30.0,
            seed: u8,
        ) {
            let mut data = image(width, height, seed);
            color::adjust_brightness(view(&mut data, width, height), factor);
            color::adjust_contrast(view(&mut data, width, height), factor);
            color::adjust_saturation(view(&mut data, width, height), factor);
            color::adjust_hue(view(&mut data, width, height), hue);
            color::to_grayscale(view(&mut data, width, height));
            blur::GaussianBlur::new().apply(view(&mut data, width, height), radius);
        }
    }
}
