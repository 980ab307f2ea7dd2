//! SwAV's Gaussian blur: PIL's `img.filter(ImageFilter.GaussianBlur(radius))`.
//!
//! Pillow approximates a Gaussian of standard deviation `radius` by three passes of an
//! "extended" box filter per axis (Gwosdek et al., SSVM 2011): a box of integer radius `r` plus
//! a fractional weight on the two pixels just outside it, with pixels beyond the image edge
//! taken equal to the edge pixel. Weights are 24-bit fixed point and every pass rounds back to
//! `u8` (`libImaging/BoxBlur.c`): three horizontal passes, then three vertical ones.
//! [`GaussianBlur`] repeats that arithmetic exactly. The vertical passes run along rows of
//! accumulators, one per byte of a row, so they vectorize.

use super::RgbMut;

/// Passes per axis: the default of `ImageFilter.GaussianBlur` (and of `ImagingGaussianBlur`).
const PASSES: u32 = 3;

/// Pillow's box-blur fixed point: weights sum to `1 << 24`.
const ONE: u32 = 1 << 24;

/// Gaussian blur with Pillow's arithmetic; keeps its intermediate image between calls.
#[derive(Debug, Default)]
pub struct GaussianBlur {
    /// The image between passes (passes alternate between it and the caller's image).
    scratch: Vec<u8>,
    /// One row of running sums for the vertical passes.
    sums: Vec<u32>,
}

impl GaussianBlur {
    /// A blur with empty scratch buffers; they grow to the largest image seen and stay.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blurs `image` in place like `image.filter(ImageFilter.GaussianBlur(radius))`.
    ///
    /// `radius` is the standard deviation in pixels, as in PIL (which narrows it to `float`,
    /// so an `f32` carries exactly PIL's value). A radius of 0 (or NaN, which PIL rejects)
    /// leaves the image unchanged; a negative radius blurs like its absolute value, as in PIL.
    ///
    /// # Panics
    ///
    /// When `image.data.len()` is not `width * height * 3`.
    pub fn apply(&mut self, image: RgbMut<'_>, radius: f32) {
        let (width, height) = (image.width as usize, image.height as usize);
        assert_eq!(
            image.data.len(),
            width * height * 3,
            "RGB8 buffer of the wrong length"
        );
        let box_radius = extended_box_radius(radius, PASSES);
        if box_radius.is_nan() || box_radius <= 0.0 || image.data.is_empty() {
            return;
        }
        let kernel = BoxKernel::new(box_radius);
        self.scratch.resize(image.data.len(), 0);
        let (data, scratch) = (image.data, self.scratch.as_mut_slice());

        // Six passes alternate between the two buffers and end in `data`.
        let row_bytes = width * 3;
        horizontal_pass(data, scratch, row_bytes, &kernel);
        horizontal_pass(scratch, data, row_bytes, &kernel);
        horizontal_pass(data, scratch, row_bytes, &kernel);
        vertical_pass(scratch, data, row_bytes, &kernel, &mut self.sums);
        vertical_pass(data, scratch, row_bytes, &kernel, &mut self.sums);
        vertical_pass(scratch, data, row_bytes, &kernel, &mut self.sums);
    }
}

/// `_gaussian_blur_radius` (`libImaging/BoxBlur.c`): the extended box radius whose `passes`-fold
/// repetition has the variance of a Gaussian of standard deviation `radius`. C's `float` and
/// `double` steps are kept as they are.
fn extended_box_radius(radius: f32, passes: u32) -> f32 {
    let sigma2: f32 = radius * radius / passes as f32;
    // Box length [7] and integer box radius [11] of the paper, in double, stored as float.
    let length = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let integer = ((f64::from(length) - 1.0) / 2.0).floor() as f32;
    // Fractional part [14], all float.
    let mut fraction = (2.0 * integer + 1.0) * (integer * (integer + 1.0) - 3.0 * sigma2);
    fraction /= 6.0 * (sigma2 - (integer + 1.0) * (integer + 1.0));
    integer + fraction
}

/// The weights of one extended box pass (`ImagingHorizontalBoxBlur`).
#[derive(Debug, Clone, Copy)]
struct BoxKernel {
    /// Integer radius: the box covers `2 * radius + 1` pixels of weight `inner`.
    radius: usize,
    /// Fixed-point weight of each pixel inside the box.
    inner: u32,
    /// Fixed-point weight of the two pixels just outside the box.
    outer: u32,
}

impl BoxKernel {
    fn new(box_radius: f32) -> Self {
        let radius = box_radius as u32;
        // (UINT32)((1 << 24) / (floatRadius * 2 + 1)), a float division.
        let inner = (ONE as f32 / (box_radius * 2.0 + 1.0)) as u32;
        // Unsigned C arithmetic; wrapping keeps Pillow's result should it ever underflow.
        let outer = ONE.wrapping_sub((radius * 2 + 1).wrapping_mul(inner)) / 2;
        Self {
            radius: radius as usize,
            inner,
            outer,
        }
    }

    /// `(acc * ww + (left + right) * fw + (1 << 23)) >> 24` in `UINT32`.
    #[inline(always)]
    fn output(&self, sum: u32, left: u8, right: u8) -> u8 {
        let far = (u32::from(left) + u32::from(right)).wrapping_mul(self.outer);
        (sum.wrapping_mul(self.inner)
            .wrapping_add(far)
            .wrapping_add(1 << 23)
            >> 24) as u8
    }
}

/// One horizontal extended box pass over every row of `src` into `dst`.
///
/// Pillow's `ImagingLineBoxBlur` in closed form: with indices clamped to the row,
/// `sum(x) = Σ in[x - r ..= x + r]`, and `out(x)` adds `in[x - r - 1]` and `in[x + r + 1]` at
/// the outer weight. The running sum starts at `x = -1` and moves one pixel per step.
fn horizontal_pass(src: &[u8], dst: &mut [u8], row_bytes: usize, kernel: &BoxKernel) {
    let last = (row_bytes / 3) as isize - 1;
    let radius = kernel.radius as isize;
    let at = |x: isize| x.clamp(0, last) as usize * 3;
    for (row, out) in src
        .chunks_exact(row_bytes)
        .zip(dst.chunks_exact_mut(row_bytes))
    {
        let mut sums = [0u32; 3];
        for x in -radius - 1..radius {
            let i = at(x);
            for c in 0..3 {
                sums[c] = sums[c].wrapping_add(u32::from(row[i + c]));
            }
        }
        for x in 0..=last {
            let (add, remove) = (at(x + radius), at(x - radius - 1));
            let far_right = at(x + radius + 1);
            let out_pixel = &mut out[x as usize * 3..x as usize * 3 + 3];
            for c in 0..3 {
                sums[c] = sums[c]
                    .wrapping_add(u32::from(row[add + c]))
                    .wrapping_sub(u32::from(row[remove + c]));
                out_pixel[c] = kernel.output(sums[c], row[remove + c], row[far_right + c]);
            }
        }
    }
}

/// One vertical extended box pass of `src` into `dst`: the same arithmetic as
/// [`horizontal_pass`] along columns, run for a whole row of columns at a time.
fn vertical_pass(
    src: &[u8],
    dst: &mut [u8],
    row_bytes: usize,
    kernel: &BoxKernel,
    sums: &mut Vec<u32>,
) {
    let last = (src.len() / row_bytes) as isize - 1;
    let radius = kernel.radius as isize;
    let row = |y: isize| {
        let start = y.clamp(0, last) as usize * row_bytes;
        &src[start..start + row_bytes]
    };
    sums.clear();
    sums.resize(row_bytes, 0);
    for y in -radius - 1..radius {
        for (sum, &value) in sums.iter_mut().zip(row(y)) {
            *sum = sum.wrapping_add(u32::from(value));
        }
    }
    for (y, out) in dst.chunks_exact_mut(row_bytes).enumerate() {
        let y = y as isize;
        let (add, remove, far_right) = (row(y + radius), row(y - radius - 1), row(y + radius + 1));
        for ((((sum, out), &add), &remove), &far_right) in
            sums.iter_mut().zip(out).zip(add).zip(remove).zip(far_right)
        {
            *sum = sum
                .wrapping_add(u32::from(add))
                .wrapping_sub(u32::from(remove));
            *out = kernel.output(*sum, remove, far_right);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blur(width: u32, height: u32, data: &mut [u8], radius: f32) {
        GaussianBlur::new().apply(
            RgbMut {
                width,
                height,
                data,
            },
            radius,
        );
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn constant_image_stays_constant() {
        for value in [0, 1, 127, 254, 255] {
            for radius in [0.1, 0.5, 1.0, 2.0, 7.5] {
                let mut data = vec![value; 17 * 9 * 3];
                blur(17, 9, &mut data, radius);
                assert!(
                    data.iter().all(|&v| v == value),
                    "value {value} radius {radius}"
                );
            }
        }
    }

    #[test]
    fn zero_radius_is_identity() {
        let original = noise(20 * 10 * 3);
        let mut data = original.clone();
        blur(20, 10, &mut data, 0.0);
        assert_eq!(data, original);
        blur(20, 10, &mut data, f32::NAN);
        assert_eq!(data, original);
    }

    #[test]
    fn negative_radius_blurs_like_positive() {
        let original = noise(20 * 10 * 3);
        let (mut positive, mut negative) = (original.clone(), original.clone());
        blur(20, 10, &mut positive, 1.5);
        blur(20, 10, &mut negative, -1.5);
        assert_eq!(positive, negative);
        assert_ne!(positive, original);
    }

    #[test]
    fn blur_smooths_noise() {
        let original = noise(64 * 64 * 3);
        let mut data = original.clone();
        blur(64, 64, &mut data, 2.0);
        let spread = |d: &[u8]| {
            d.windows(2)
                .map(|w| w[0].abs_diff(w[1]) as u64)
                .sum::<u64>()
        };
        assert!(spread(&data) * 4 < spread(&original));
    }

    #[test]
    fn tiny_images_do_not_panic() {
        for (width, height) in [(1, 1), (1, 7), (7, 1), (2, 2), (0, 3), (3, 0)] {
            let mut data = noise(width * height * 3);
            for radius in [0.1, 2.0, 50.0] {
                blur(width as u32, height as u32, &mut data, radius);
            }
        }
        let mut pixel = [10, 20, 30];
        blur(1, 1, &mut pixel, 2.0);
        assert_eq!(pixel, [10, 20, 30]);
    }

    #[test]
    fn box_radius_matches_pillow() {
        // Pillow's formula evaluated by hand for sigma 2 (sigma2 = 4/3): L = sqrt(17) = 4.123,
        // l = 1, a = 3 * (2 - 4) / (6 * (4/3 - 4)) = 0.375.
        assert!((extended_box_radius(2.0, 3) - 1.375).abs() < 1e-6);
        assert_eq!(extended_box_radius(0.0, 3), 0.0);
    }
}
