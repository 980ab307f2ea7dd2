//! SwAV's Gaussian blur: PIL's `img.filter(ImageFilter.GaussianBlur(radius))`.
//!
//! Pillow approximates a Gaussian of standard deviation `radius` by three passes of an
//! "extended" box filter per axis (Gwosdek et al., SSVM 2011): a box of integer radius `r` plus
//! a fractional weight on the two pixels just outside it, with pixels beyond the image edge
//! taken equal to the edge pixel. Weights are 24-bit fixed point and every pass rounds back to
//! `u8` (`libImaging/BoxBlur.c`): three horizontal passes, then three vertical ones.
//! [`GaussianBlur`] repeats that arithmetic exactly, in an order that vectorizes: vertical
//! passes keep one running sum per byte of a row and move down the image a whole row at a
//! time; horizontal passes sum shifted copies of an edge-extended row (for SwAV's radii the box
//! is one to three pixels wide). Where the CPU has AVX-512 VNNI, boxes of radius up to 8 run
//! the same arithmetic written by hand in 16-bit lanes (the `vnni` module).
//!
//! In Pillow's notation, with indices clamped to the image, one pass is
//! `out(x) = (sum(x) * ww + (in[x - r - 1] + in[x + r + 1]) * fw + 2^23) >> 24` in `UINT32`,
//! where `sum(x) = in[x - r] + ... + in[x + r]`.

use super::RgbMut;

#[cfg(target_arch = "x86_64")]
mod vnni;

/// Passes per axis: the default of `ImageFilter.GaussianBlur` (and of `ImagingGaussianBlur`).
const PASSES: u32 = 3;

/// Pillow's box-blur fixed point: weights sum to `1 << 24`.
const ONE: u32 = 1 << 24;

/// Largest integer box radius the horizontal pass handles by summing shifted rows; wider boxes
/// (a blur radius above about 11) use a running sum along the row, whose cost does not grow
/// with the radius.
const MAX_SHIFTED_RADIUS: usize = 8;

/// Gaussian blur with Pillow's arithmetic; keeps its scratch buffers between calls.
#[derive(Debug, Default)]
pub struct GaussianBlur {
    /// The image between passes (passes alternate between it and the caller's image).
    scratch: Vec<u8>,
    /// One row of sums.
    sums: Vec<u32>,
    /// One row extended by `r + 1` copies of its edge pixels on each side.
    extended: Vec<u8>,
    /// Two extended rows, for the VNNI horizontal passes.
    #[cfg(target_arch = "x86_64")]
    rows: Vec<u8>,
    /// One row of 16-bit sums, for the VNNI vertical passes.
    #[cfg(target_arch = "x86_64")]
    words: Vec<u16>,
}

impl GaussianBlur {
    /// A blur with empty scratch buffers; they grow to the largest image seen and stay.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blurs `image` in place like `image.filter(ImageFilter.GaussianBlur(radius))`.
    ///
    /// `radius` is the standard deviation in pixels, as in PIL (which narrows it to `float`,
    /// so an `f32` carries exactly PIL's value). A negative radius blurs like its absolute
    /// value, as in PIL. A radius of 0 leaves the image unchanged, and so do the radii PIL
    /// rejects with an error: NaN and infinity, and those whose box radius reaches 2^31.
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
        let pil_accepts = box_radius < 2_147_483_648.0;
        if !pil_accepts || box_radius.is_nan() || box_radius <= 0.0 || image.data.is_empty() {
            return;
        }
        let kernel = BoxKernel::new(box_radius);
        let scratch = super::grown(&mut self.scratch, image.data.len());
        let data = image.data;

        // Six passes alternate between the two buffers and end in `data`.
        let row_bytes = width * 3;
        #[cfg(target_arch = "x86_64")]
        if vnni::runs(kernel) {
            let sums = (&mut self.sums, &mut self.words);
            // SAFETY: `runs` checked the CPU and the kernel.
            unsafe {
                vnni::horizontal_passes(data, scratch, row_bytes, kernel, &mut self.rows);
                vnni::vertical_pass(scratch, data, row_bytes, kernel, sums.0, sums.1);
                vnni::vertical_pass(data, scratch, row_bytes, kernel, sums.0, sums.1);
                vnni::vertical_pass(scratch, data, row_bytes, kernel, sums.0, sums.1);
            }
            return;
        }
        let (extended, sums) = (&mut self.extended, &mut self.sums);
        horizontal_pass(data, scratch, row_bytes, kernel, extended, sums);
        horizontal_pass(scratch, data, row_bytes, kernel, extended, sums);
        horizontal_pass(data, scratch, row_bytes, kernel, extended, sums);
        vertical_pass(scratch, data, row_bytes, kernel, sums);
        vertical_pass(data, scratch, row_bytes, kernel, sums);
        vertical_pass(scratch, data, row_bytes, kernel, sums);
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
        let box_width = radius.wrapping_mul(2).wrapping_add(1);
        let outer = ONE.wrapping_sub(box_width.wrapping_mul(inner)) / 2;
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

dispatch_simd! {
    /// One horizontal pass over every row of `src` into `dst`.
    fn horizontal_pass(
        src: &[u8],
        dst: &mut [u8],
        row_bytes: usize,
        kernel: BoxKernel,
        extended: &mut Vec<u8>,
        sums: &mut Vec<u32>,
    ) => horizontal_pass_portable
}

#[inline(always)]
fn horizontal_pass_portable(
    src: &[u8],
    dst: &mut [u8],
    row_bytes: usize,
    kernel: BoxKernel,
    extended: &mut Vec<u8>,
    sums: &mut Vec<u32>,
) {
    let radius = kernel.radius;
    if radius > MAX_SHIFTED_RADIUS {
        for (row, out) in src
            .chunks_exact(row_bytes)
            .zip(dst.chunks_exact_mut(row_bytes))
        {
            running_sum_row(row, out, kernel);
        }
        return;
    }
    // `pad` edge pixels on each side: x - r - 1 and x + r + 1 stay inside the extended row.
    let pad = (radius + 1) * 3;
    extended.resize(row_bytes + 2 * pad, 0);
    sums.resize(row_bytes, 0);
    for (row, out) in src
        .chunks_exact(row_bytes)
        .zip(dst.chunks_exact_mut(row_bytes))
    {
        let (left, rest) = extended.split_at_mut(pad);
        let (middle, right) = rest.split_at_mut(row_bytes);
        middle.copy_from_slice(row);
        for pixel in left.chunks_exact_mut(3) {
            pixel.copy_from_slice(&row[..3]);
        }
        for pixel in right.chunks_exact_mut(3) {
            pixel.copy_from_slice(&row[row_bytes - 3..]);
        }
        // sum(x) over the 2r + 1 shifted copies; the value of x sits at pad + 3x.
        let shifted = |offset: usize| &extended[offset..offset + row_bytes];
        for (sum, &value) in sums.iter_mut().zip(shifted(pad - radius * 3)) {
            *sum = u32::from(value);
        }
        for k in 1..=2 * radius {
            for (sum, &value) in sums.iter_mut().zip(shifted(pad - radius * 3 + k * 3)) {
                *sum += u32::from(value);
            }
        }
        let (far_left, far_right) = (shifted(0), shifted(2 * pad));
        for (((out, &sum), &left), &right) in
            out.iter_mut().zip(sums.iter()).zip(far_left).zip(far_right)
        {
            *out = kernel.output(sum, left, right);
        }
    }
}

/// Pillow's `ImagingLineBoxBlur` for one row, as a running sum that moves one pixel per step:
/// the path for wide boxes.
fn running_sum_row(row: &[u8], out: &mut [u8], kernel: BoxKernel) {
    let len = row.len() / 3;
    let last = len as isize - 1;
    let radius = kernel.radius as isize;
    let at = |x: isize| x.clamp(0, last) as usize * 3;
    let (first_copies, inside, last_copies) = initial_window(kernel.radius, len);
    let mut sums: [u32; 3] = std::array::from_fn(|c| {
        let first = u32::from(row[c]).wrapping_mul(first_copies);
        let end = u32::from(row[at(last) + c]).wrapping_mul(last_copies);
        (0..inside).fold(first.wrapping_add(end), |sum, x| {
            sum.wrapping_add(u32::from(row[x * 3 + c]))
        })
    });
    for x in 0..=last {
        let (add, remove, far_right) = (at(x + radius), at(x - radius - 1), at(x + radius + 1));
        for c in 0..3 {
            sums[c] = sums[c].wrapping_add(u32::from(row[add + c]));
            sums[c] = sums[c].wrapping_sub(u32::from(row[remove + c]));
            out[x as usize * 3 + c] = kernel.output(sums[c], row[remove + c], row[far_right + c]);
        }
    }
}

/// The running sum before the first output covers positions `-r - 1 ..= r - 1` of a line of
/// `len` values, edges extended: as (copies of the first value, values `0..inside` once each,
/// copies of the last value). Its cost follows the line, not the radius, as in Pillow.
fn initial_window(radius: usize, len: usize) -> (u32, usize, u32) {
    let inside = radius.min(len);
    ((radius + 1) as u32, inside, (radius - inside) as u32)
}

/// The rows a vertical pass's output row `y` adds to its running sums, removes from them, and
/// takes as the far pixel below the box (`y + r`, `y - r - 1` and `y + r + 1`), clamped to the
/// image as Pillow extends its edges.
#[inline(always)]
fn moving_rows(src: &[u8], row_bytes: usize, radius: usize, y: usize) -> [&[u8]; 3] {
    let last = (src.len() / row_bytes) as isize - 1;
    let row = |y: isize| {
        let start = y.clamp(0, last) as usize * row_bytes;
        &src[start..start + row_bytes]
    };
    let (y, radius) = (y as isize, radius as isize);
    [row(y + radius), row(y - radius - 1), row(y + radius + 1)]
}

/// The running sum of each byte of a row before a vertical pass's first output: positions
/// `-r - 1 ..= r - 1` of its column, edges extended, in Pillow's wrapping `UINT32` arithmetic.
#[inline(always)]
fn initial_column_sums(src: &[u8], row_bytes: usize, kernel: BoxKernel, sums: &mut Vec<u32>) {
    let last = src.len() / row_bytes - 1;
    let row = |y: usize| &src[y * row_bytes..(y + 1) * row_bytes];
    let (first_copies, inside, last_copies) = initial_window(kernel.radius, last + 1);
    sums.clear();
    sums.extend(row(0).iter().zip(row(last)).map(|(&first, &end)| {
        u32::from(first)
            .wrapping_mul(first_copies)
            .wrapping_add(u32::from(end).wrapping_mul(last_copies))
    }));
    for y in 0..inside {
        for (sum, &value) in sums.iter_mut().zip(row(y)) {
            *sum = sum.wrapping_add(u32::from(value));
        }
    }
}

dispatch_simd! {
    /// One vertical pass of `src` into `dst`: the same arithmetic along columns, with one
    /// running sum per byte of a row, moving down a row at a time.
    fn vertical_pass(
        src: &[u8],
        dst: &mut [u8],
        row_bytes: usize,
        kernel: BoxKernel,
        sums: &mut Vec<u32>,
    ) => vertical_pass_portable
}

#[inline(always)]
fn vertical_pass_portable(
    src: &[u8],
    dst: &mut [u8],
    row_bytes: usize,
    kernel: BoxKernel,
    sums: &mut Vec<u32>,
) {
    initial_column_sums(src, row_bytes, kernel, sums);
    for (y, out) in dst.chunks_exact_mut(row_bytes).enumerate() {
        let [add, remove, far_right] = moving_rows(src, row_bytes, kernel.radius, y);
        let sums = &mut sums[..row_bytes];
        for i in 0..row_bytes {
            let sum = sums[i]
                .wrapping_add(u32::from(add[i]))
                .wrapping_sub(u32::from(remove[i]));
            sums[i] = sum;
            out[i] = kernel.output(sum, remove[i], far_right[i]);
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
        crate::ops::noise(len, 0x9e37_79b9_7f4a_7c15)
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
    fn huge_radii_are_quick_and_do_not_panic() {
        let mut data = noise(9 * 4 * 3);
        let started = std::time::Instant::now();
        for radius in [1e3, 1e6, 1e9, f32::MAX, f32::INFINITY] {
            blur(9, 4, &mut data, radius);
        }
        assert!(started.elapsed().as_secs() < 5);
        // A box wider than the image averages each line with its edges extended.
        let mut flat = vec![100; 9 * 4 * 3];
        blur(9, 4, &mut flat, 1e3);
        assert!(flat.iter().all(|&v| v == 100));
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

    /// The compiled copies at every SIMD level this CPU has (the reference test exercises the
    /// widest) against the portable code they are compiled from.
    #[test]
    fn dispatched_passes_match_portable_ones() {
        let levels = crate::ops::at_every_simd_level(|level| {
            for (width, height, radius) in [(37, 23, 0.4), (64, 9, 2.0), (5, 40, 30.0), (1, 1, 1.0)]
            {
                let src = noise(width * height * 3);
                let kernel = BoxKernel::new(extended_box_radius(radius, PASSES));
                let row_bytes = width * 3;
                let (mut extended, mut sums) = (Vec::new(), Vec::new());
                let (mut fast, mut portable) = (vec![0; src.len()], vec![0; src.len()]);
                horizontal_pass(&src, &mut fast, row_bytes, kernel, &mut extended, &mut sums);
                horizontal_pass_portable(
                    &src,
                    &mut portable,
                    row_bytes,
                    kernel,
                    &mut extended,
                    &mut sums,
                );
                assert_eq!(fast, portable, "{level:?}");
                vertical_pass(&src, &mut fast, row_bytes, kernel, &mut sums);
                vertical_pass_portable(&src, &mut portable, row_bytes, kernel, &mut sums);
                assert_eq!(fast, portable, "{level:?}");
            }
        });
        assert!(!levels.is_empty());
    }

    /// The whole blur at every SIMD level this CPU has against the portable code: with VNNI at
    /// the AVX-512 level that is the VNNI passes for every box radius they take (0 to 8, with
    /// fractions) and the compiled ones beyond, on sizes that leave partial steps and on
    /// images narrower or shorter than the box.
    #[test]
    fn every_level_blurs_alike() {
        let sizes = [
            (1, 1),
            (1, 9),
            (9, 1),
            (2, 2),
            (11, 3),
            (37, 23),
            (64, 9),
            (96, 96),
            (224, 224),
            (5, 40),
        ];
        let radii: Vec<f32> = (0..52).map(|i| 0.05 + i as f32 * 0.2).collect();
        // One blur per level for every case, so its buffers are reused at other sizes.
        let mut results: Vec<Vec<Vec<u8>>> = Vec::new();
        let levels = crate::ops::at_every_simd_level(|_| {
            let mut blur = GaussianBlur::new();
            let mut outputs = Vec::new();
            for (width, height) in sizes {
                let original = crate::ops::noise(width * height * 3, (width * height) as u64);
                for &radius in &radii {
                    let mut data = original.clone();
                    let image = RgbMut {
                        width: width as u32,
                        height: height as u32,
                        data: &mut data,
                    };
                    blur.apply(image, radius);
                    outputs.push(data);
                }
            }
            results.push(outputs);
        });
        let cases: Vec<_> = sizes
            .iter()
            .flat_map(|size| radii.iter().map(move |radius| (size, radius)))
            .collect();
        for (level, outputs) in levels.iter().zip(&results).skip(1) {
            for (case, (got, want)) in cases.iter().zip(outputs.iter().zip(&results[0])) {
                assert!(got == want, "{level:?} differs from portable: {case:?}");
            }
        }
        assert_eq!(
            BoxKernel::new(extended_box_radius(*radii.last().unwrap(), PASSES)).radius,
            9,
            "the largest radius is past the VNNI passes"
        );
    }

    #[test]
    fn box_radius_matches_pillow() {
        // Pillow's formula evaluated by hand for sigma 2 (sigma2 = 4/3): L = sqrt(17) = 4.123,
        // l = 1, a = 3 * (2 - 4) / (6 * (4/3 - 4)) = 0.375.
        assert!((extended_box_radius(2.0, 3) - 1.375).abs() < 1e-6);
        assert_eq!(extended_box_radius(0.0, 3), 0.0);
    }
}
