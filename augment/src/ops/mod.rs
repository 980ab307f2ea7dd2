//! Pixel operations of the SwAV multi-crop recipe, each equal to what torchvision does on a PIL
//! image (SwAV and VISSL run every augmentation on PIL images, so PIL's integer arithmetic is
//! the reference, not torchvision's tensor kernels).
//!
//! All images are interleaved RGB8 (`data.len() == width * height * 3`, rows packed).
//! Operations work in place on the small crop after the resize, so they never allocate in the
//! steady state: buffers they need are kept in the structs that own them.

/// Defines a function that runs `$portable` compiled for the widest instruction set [`simd`]
/// allows: a copy with AVX-512 enabled, one with AVX2, or the portable build. The CPU is checked
/// at run time, so the binary still runs on any x86-64. `$portable` must be `#[inline(always)]`
/// so that its body is compiled into each copy. The hot loops of these operations are written
/// to autovectorize: with AVX2 they run on eight 32-bit lanes with a native 32-bit multiply,
/// which SSE2 lacks; with AVX-512 on sixteen. Without fast-math flags the compiler keeps every
/// floating-point operation as written (no fused multiply-add), so all copies compute the same
/// bytes; the tests compare them.
macro_rules! dispatch_simd {
    (
        $(#[$meta:meta])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $portable:path
    ) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                match $crate::ops::simd() {
                    // SAFETY: the only precondition of a `#[target_feature]` function is that
                    // the CPU supports the features, and `simd` returns a level only when it
                    // does.
                    $crate::ops::Simd::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::ops::Simd::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::ops::Simd::Portable => {}
                }
            }
            $portable($($arg),*)
        }
    };
}

/// The instruction sets the vectorized kernels are compiled for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// The baseline of the target (SSE2 on x86-64).
    Portable,
    /// AVX2.
    Avx2,
    /// AVX-512 F, BW, VL and DQ.
    Avx512,
}

impl Simd {
    /// The widest level this CPU supports.
    pub fn detected() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
                return Simd::Avx512;
            }
            if has!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// The level named by `SEER_SIMD` (`portable`, `avx2` or `avx512`), when it is set.
    fn from_env() -> Option<Simd> {
        let value = std::env::var("SEER_SIMD").ok()?;
        match value.to_ascii_lowercase().as_str() {
            "portable" => Some(Simd::Portable),
            "avx2" => Some(Simd::Avx2),
            "avx512" => Some(Simd::Avx512),
            _ => {
                eprintln!("augment: SEER_SIMD={value:?} is not portable, avx2 or avx512; ignored");
                None
            }
        }
    }
}

/// The level the kernels run at: the widest the CPU supports, lowered by `SEER_SIMD` when that
/// names a narrower one (to compare them, or to avoid a wide unit's clock penalty). Decided on
/// first use.
pub fn simd() -> Simd {
    #[cfg(test)]
    if let Some(forced) = FORCED_SIMD.with(std::cell::Cell::get) {
        return forced;
    }
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = Simd::detected();
        Simd::from_env().map_or(detected, |wanted| wanted.min(detected))
    })
}

#[cfg(test)]
thread_local! {
    /// A level the unit tests force on their thread, to compare the compiled copies.
    static FORCED_SIMD: std::cell::Cell<Option<Simd>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` once at every level this CPU supports, on this thread; returns the levels run.
#[cfg(test)]
pub(crate) fn at_every_simd_level(mut f: impl FnMut(Simd)) -> Vec<Simd> {
    let levels: Vec<Simd> = [Simd::Portable, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|&level| level <= Simd::detected())
        .collect();
    for &level in &levels {
        FORCED_SIMD.with(|forced| forced.set(Some(level)));
        f(level);
    }
    FORCED_SIMD.with(|forced| forced.set(None));
    levels
}

/// `len` pseudo-random bytes from `seed` (xorshift64), for the kernels' tests.
#[cfg(test)]
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// The first `len` bytes of `buffer`, grown (never shrunk) to hold them: crops of every size
/// follow each other, and resizing down then up would zero the buffer again each time.
pub(crate) fn grown(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

pub mod blur;
pub mod color;
pub mod pack;
pub mod resize;

/// A borrowed interleaved RGB8 image: the decoder's output type ([`shards::decode`]).
pub use shards::decode::RgbRef;

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

        /// Any crop of any small image to any small size: no panic, the same bytes at every
        /// SIMD level (odd widths, partial row blocks and vectors, either pass order), and a
        /// crop of the output's size is a plain copy.
        #[test]
        fn resized_crop_handles_every_geometry(
            (width, height, left, top, crop_width, crop_height) in (1u32..90, 1u32..60)
                .prop_flat_map(|(w, h)| (Just(w), Just(h), 0..w, 0..h))
                .prop_flat_map(|(w, h, l, t)| {
                    (Just(w), Just(h), Just(l), Just(t), 1..=w - l, 1..=h - t)
                }),
            out_width in 1u32..70,
            out_height in 1u32..70,
            seed: u8,
        ) {
            let src = image(width, height, seed);
            let crop = CropBox { top, left, height: crop_height, width: crop_width };
            let source = RgbRef { width, height, data: &src };
            let mut outputs = Vec::new();
            at_every_simd_level(|_| {
                let mut out = vec![0; (out_width * out_height * 3) as usize];
                let target = RgbMut { width: out_width, height: out_height, data: &mut out };
                resize::CropResizer::new().resized_crop(source, crop, target);
                outputs.push(out);
            });
            for other in &outputs[1..] {
                prop_assert_eq!(other, &outputs[0]);
            }
            // The flip folded into the resize equals a flip after it, at every level.
            let mut flipped_outputs = Vec::new();
            at_every_simd_level(|_| {
                let mut out = vec![0; (out_width * out_height * 3) as usize];
                let target = RgbMut { width: out_width, height: out_height, data: &mut out };
                resize::CropResizer::new().resized_crop_flipped(source, crop, true, target);
                flipped_outputs.push(out);
            });
            let mut flipped = outputs[0].clone();
            flip_horizontal(RgbMut { width: out_width, height: out_height, data: &mut flipped });
            for other in &flipped_outputs {
                prop_assert_eq!(other, &flipped);
            }
            let mut same = vec![0; (crop_width * crop_height * 3) as usize];
            let target = RgbMut { width: crop_width, height: crop_height, data: &mut same };
            resize::CropResizer::new().resized_crop(source, crop, target);
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

    /// Every compiled copy of the kernels (portable, AVX2, AVX-512, as far as this CPU goes)
    /// gives the same bytes for the whole chain of operations: resized crops up and down in
    /// size, every color operation and blurs of small and large radius, on sizes that leave
    /// partial vectors and blocks.
    #[test]
    fn every_simd_level_gives_the_same_bytes() {
        let (width, height) = (203, 157);
        let src = image(width, height, 7);
        let mut results: Vec<(Simd, Vec<Vec<u8>>)> = Vec::new();
        let levels = at_every_simd_level(|level| {
            let mut resizer = resize::CropResizer::new();
            let mut blur = blur::GaussianBlur::new();
            let mut outputs = Vec::new();
            let crops = [
                (
                    CropBox {
                        top: 3,
                        left: 5,
                        height: 150,
                        width: 190,
                    },
                    96,
                ),
                (
                    CropBox {
                        top: 40,
                        left: 17,
                        height: 33,
                        width: 41,
                    },
                    67,
                ),
                (
                    CropBox {
                        top: 0,
                        left: 0,
                        height: 157,
                        width: 203,
                    },
                    224,
                ),
            ];
            for (crop, size) in crops {
                let mut out = vec![0; size * size * 3];
                let (side, src) = (
                    size as u32,
                    RgbRef {
                        width,
                        height,
                        data: &src,
                    },
                );
                resizer.resized_crop(src, crop, view(&mut out, side, side));
                outputs.push(out.clone());
                color::adjust_brightness(view(&mut out, side, side), 1.37);
                color::adjust_contrast(view(&mut out, side, side), 0.61);
                color::adjust_saturation(view(&mut out, side, side), 1.73);
                color::adjust_hue(view(&mut out, side, side), -0.29);
                let jittered = out.clone();
                outputs.push(out.clone());
                color::to_grayscale(view(&mut out, side, side));
                outputs.push(out.clone());
                for radius in [0.3, 1.9, 14.0] {
                    let mut blurred = jittered.clone();
                    blur.apply(view(&mut blurred, side, side), radius);
                    outputs.push(blurred);
                }
            }
            results.push((level, outputs));
        });
        assert_eq!(levels[0], Simd::Portable);
        eprintln!("compared levels: {levels:?}");
        for (level, outputs) in &results[1..] {
            for (i, (got, want)) in outputs.iter().zip(&results[0].1).enumerate() {
                assert!(got == want, "{level:?} differs from portable at output {i}");
            }
        }
    }
}
