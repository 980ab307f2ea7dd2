//! `RandomResizedCrop`'s pixel work: crop, then Pillow's bilinear resampling.
//!
//! On a PIL image torchvision's `F.resized_crop` is `img.crop(box).resize(size, BILINEAR)`.
//! Pillow's "bilinear" is not a 2x2 interpolation but a separable convolution with a triangle
//! filter whose support grows with the reduction factor (an antialiasing filter), computed in
//! two passes with 22-bit fixed-point weights and a `u8` intermediate image. Every detail of
//! that arithmetic shows in the output, so [`CropResizer`] repeats it exactly: the weights from
//! `precompute_coeffs` and `normalize_coeffs_8bpc` (`libImaging/Resample.c`), the order of the
//! two passes, the rows the first pass produces, the rounding and the clipping.
//!
//! `fast_image_resize` (whose convolution comes from Pillow-SIMD) is close but not equal: it
//! keeps 16-bit weights, always resizes horizontally first and, with its crop option, reads
//! pixels outside the crop box, so its output differs from Pillow's (the reference test prints
//! the measured difference).
//!
//! Speed comes from the loop order, not from different arithmetic: the vertical pass sums whole
//! rows (it vectorizes as is), and the horizontal pass works on eight rows at once, interleaved
//! byte by byte, so that each multiply-add covers the same pixel of eight rows. Where the CPU
//! has AVX-512 VBMI and VNNI, both passes run as written by hand in the `gather` module: byte
//! permutes gather two taps per 32-bit lane and `vpdpwssd` multiplies and adds them, with
//! Pillow's weights split in two 16-bit parts so that the sums stay exact.

use super::{CropBox, RgbMut, RgbRef, grown};

#[cfg(target_arch = "x86_64")]
mod gather;

/// Pillow's fixed-point precision for 8-bit resampling: 32 bits minus 8 for the value and 2
/// for headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Half of one output step in fixed point: what Pillow adds before shifting, so the shift
/// rounds to nearest.
const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);

/// Support of Pillow's bilinear (triangle) filter at scale 1.
const BILINEAR_SUPPORT: f64 = 1.0;

/// Crops and resizes RGB8 images exactly as Pillow's `Image.resize(size, Image.BILINEAR)` does
/// after `Image.crop`, reusing its weight tables and intermediate image between calls.
#[derive(Debug, Default)]
pub struct CropResizer {
    horizontal: HorizontalPass,
    vertical: Weights,
    /// The image between the two passes.
    intermediate: Vec<u8>,
    scratch: Scratch,
}

/// The horizontal pass's weights, and the same weights as tables for the VBMI pass.
#[derive(Debug, Default)]
struct HorizontalPass {
    weights: Weights,
    #[cfg(target_arch = "x86_64")]
    gather: gather::GatherPlan,
}

impl HorizontalPass {
    /// Resamples every row of `src` into `out` with the weights: the VBMI pass where the CPU
    /// has it and the filter's groups fit its window, the compiled one otherwise.
    fn run(&mut self, src: &CropView<'_>, out: &mut [u8], out_width: usize, scratch: &mut Scratch) {
        #[cfg(target_arch = "x86_64")]
        if gather::available() && self.gather.build(&self.weights) {
            // SAFETY: `available` checked the CPU, and the plan was just built from the
            // weights for this source width and `out_width`.
            unsafe {
                gather::horizontal_pass(src, &self.gather, out, out_width, &mut scratch.planes)
            };
            return;
        }
        horizontal_pass(src, &self.weights, out, out_width, scratch);
    }
}

/// Buffers of the two passes.
#[derive(Debug, Default)]
struct Scratch {
    /// One row of accumulators for the vertical pass.
    sums: Vec<i32>,
    /// [`ROWS`] input rows interleaved byte by byte, for the horizontal pass.
    interleaved: Vec<u8>,
    /// [`ROWS`] output rows interleaved byte by byte, from the horizontal pass.
    results: Vec<u8>,
    /// One input row split into channel planes, for the VBMI horizontal pass.
    #[cfg(target_arch = "x86_64")]
    planes: Vec<u8>,
}

impl CropResizer {
    /// A resizer with empty scratch buffers; they grow to the largest size seen and stay.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `src` cropped to `crop` and resized to `dst`'s size into `dst`:
    /// `img.crop((left, top, left + width, top + height)).resize((dst.width, dst.height),
    /// Image.BILINEAR)`, which is torchvision's `F.resized_crop` on a PIL image.
    ///
    /// # Panics
    ///
    /// When `crop` is empty or reaches outside `src`, or when a buffer's length is not
    /// `width * height * 3`.
    pub fn resized_crop(&mut self, src: RgbRef<'_>, crop: CropBox, dst: RgbMut<'_>) {
        self.resized_crop_flipped(src, crop, false, dst);
    }

    /// [`resized_crop`](Self::resized_crop), then, when `flip` is set, a horizontal flip
    /// ([`super::flip_horizontal`]): torchvision's `RandomHorizontalFlip` after
    /// `RandomResizedCrop`. A flip only reorders the output columns, and the vertical pass
    /// treats columns alike, so it is folded into the horizontal pass's weights and costs
    /// nothing when the width changes; otherwise the columns are swapped afterwards.
    ///
    /// # Panics
    ///
    /// As [`resized_crop`](Self::resized_crop).
    pub fn resized_crop_flipped(
        &mut self,
        src: RgbRef<'_>,
        crop: CropBox,
        flip: bool,
        dst: RgbMut<'_>,
    ) {
        check_len("source", src.width, src.height, src.data.len());
        check_len("destination", dst.width, dst.height, dst.data.len());
        assert!(
            crop.width > 0
                && crop.height > 0
                && u64::from(crop.left) + u64::from(crop.width) <= u64::from(src.width)
                && u64::from(crop.top) + u64::from(crop.height) <= u64::from(src.height),
            "crop {crop:?} is empty or outside the {}x{} source",
            src.width,
            src.height
        );
        if dst.width == 0 || dst.height == 0 {
            return;
        }
        let view = CropView::new(src, crop);
        let (in_width, in_height) = (crop.width as usize, crop.height as usize);
        let (out_width, out_height) = (dst.width as usize, dst.height as usize);
        let need_horizontal = out_width != in_width;
        let need_vertical = out_height != in_height;
        // Pillow runs the vertical pass first when the height shrinks more than twice as much
        // as the width, and the pass order changes the rounding of the intermediate image.
        let horizontal_first = !(in_height > out_height
            && (in_height - out_height) as i64 > (in_width as i64 - out_width as i64) * 2);

        match (need_horizontal, need_vertical) {
            (false, false) => view.copy_to(dst.data),
            (true, false) => {
                self.horizontal.weights.compute(in_width, out_width, flip);
                self.horizontal
                    .run(&view, dst.data, out_width, &mut self.scratch);
            }
            (false, true) => {
                self.vertical.compute(in_height, out_height, false);
                vertical(&view, &self.vertical, 0, dst.data, &mut self.scratch.sums);
            }
            (true, true) if horizontal_first => {
                self.vertical.compute(in_height, out_height, false);
                self.horizontal.weights.compute(in_width, out_width, flip);
                // Only the rows the vertical pass reads are resampled horizontally.
                let first_row = self.vertical.starts[0] as usize;
                let last = out_height - 1;
                let end_row = (self.vertical.starts[last] + self.vertical.lens[last]) as usize;
                let rows = end_row - first_row;
                let buffer = grown(&mut self.intermediate, out_width * rows * 3);
                let scratch = &mut self.scratch;
                self.horizontal
                    .run(&view.rows(first_row, rows), buffer, out_width, scratch);
                let intermediate = CropView::whole(buffer, out_width, rows);
                let sums = &mut self.scratch.sums;
                vertical(&intermediate, &self.vertical, first_row, dst.data, sums);
            }
            (true, true) => {
                self.vertical.compute(in_height, out_height, false);
                self.horizontal.weights.compute(in_width, out_width, flip);
                let intermediate = grown(&mut self.intermediate, in_width * out_height * 3);
                let sums = &mut self.scratch.sums;
                vertical(&view, &self.vertical, 0, intermediate, sums);
                let view = CropView::whole(intermediate, in_width, out_height);
                self.horizontal
                    .run(&view, dst.data, out_width, &mut self.scratch);
            }
        }
        if flip && !need_horizontal {
            super::flip_horizontal(dst);
        }
    }
}

fn check_len(what: &str, width: u32, height: u32, len: usize) {
    let expected = width as usize * height as usize * 3;
    assert_eq!(
        len, expected,
        "{what} buffer of {len} bytes for a {width}x{height} RGB8 image"
    );
}

/// A rectangle of an interleaved RGB8 image, addressed by rows.
#[derive(Debug, Clone, Copy)]
struct CropView<'a> {
    data: &'a [u8],
    /// Bytes from one source row to the next.
    stride: usize,
    /// Byte offset of the first pixel.
    offset: usize,
    /// Bytes per row of the rectangle.
    row_bytes: usize,
    /// Rows of the rectangle.
    height: usize,
}

impl<'a> CropView<'a> {
    fn new(src: RgbRef<'a>, crop: CropBox) -> Self {
        let stride = src.width as usize * 3;
        Self {
            data: src.data,
            stride,
            offset: crop.top as usize * stride + crop.left as usize * 3,
            row_bytes: crop.width as usize * 3,
            height: crop.height as usize,
        }
    }

    /// Rows `first..first + count` of this rectangle.
    fn rows(&self, first: usize, count: usize) -> Self {
        debug_assert!(first + count <= self.height);
        Self {
            offset: self.offset + first * self.stride,
            height: count,
            ..*self
        }
    }

    fn whole(data: &'a [u8], width: usize, height: usize) -> Self {
        debug_assert_eq!(data.len(), width * height * 3);
        Self {
            data,
            stride: width * 3,
            offset: 0,
            row_bytes: width * 3,
            height,
        }
    }

    fn row(&self, y: usize) -> &'a [u8] {
        let start = self.offset + y * self.stride;
        &self.data[start..start + self.row_bytes]
    }

    fn copy_to(&self, out: &mut [u8]) {
        for (y, out_row) in out
            .chunks_exact_mut(self.row_bytes)
            .take(self.height)
            .enumerate()
        {
            out_row.copy_from_slice(self.row(y));
        }
    }
}

/// Pillow's resampling weights for one axis: for each output pixel, the first input pixel and
/// the fixed-point weights of `lens[i]` consecutive input pixels (stored `window` apart).
#[derive(Debug, Default)]
struct Weights {
    starts: Vec<u32>,
    lens: Vec<u32>,
    window: usize,
    fixed: Vec<i32>,
    /// The floating-point weights before quantization, kept to reuse the allocation.
    exact: Vec<f64>,
}

impl Weights {
    /// `precompute_coeffs` then `normalize_coeffs_8bpc` for a box from 0 to `in_size`; with
    /// `mirror`, the outputs in reverse order (output `x` takes the taps of `out_size - 1 - x`).
    fn compute(&mut self, in_size: usize, out_size: usize, mirror: bool) {
        // The crop box is (0, 0, w, h) of the cropped image, so in0 = 0 and in1 = in_size
        // (Pillow holds both as float; integers below 2^24 are exact there).
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = BILINEAR_SUPPORT * filter_scale;
        self.window = support.ceil() as usize * 2 + 1;
        let inverse_filter_scale = 1.0 / filter_scale;

        self.starts.clear();
        self.lens.clear();
        self.exact.clear();
        self.exact.resize(out_size * self.window, 0.0);
        for (out_x, weights) in self.exact.chunks_exact_mut(self.window).enumerate() {
            let center = (out_x as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; both bounds are clamped to the image.
            let min = ((center - support + 0.5) as i32).max(0) as usize;
            let max = ((center + support + 0.5) as i32).min(in_size as i32) as usize;
            let len = max - min;
            let mut total = 0.0;
            for (x, weight) in weights[..len].iter_mut().enumerate() {
                let distance = ((x + min) as f64 - center + 0.5) * inverse_filter_scale;
                *weight = bilinear(distance);
                total += *weight;
            }
            if total != 0.0 {
                for weight in &mut weights[..len] {
                    *weight /= total;
                }
            }
            self.starts.push(min as u32);
            self.lens.push(len as u32);
        }
        let one = f64::from(1u32 << PRECISION_BITS);
        self.fixed.clear();
        self.fixed.extend(self.exact.iter().map(|&weight| {
            if weight < 0.0 {
                (-0.5 + weight * one) as i32
            } else {
                (0.5 + weight * one) as i32
            }
        }));
        if mirror {
            self.starts.reverse();
            self.lens.reverse();
            let window = self.window;
            for x in 0..out_size / 2 {
                let (front, back) = self.fixed.split_at_mut((out_size - 1 - x) * window);
                front[x * window..(x + 1) * window].swap_with_slice(&mut back[..window]);
            }
        }
    }

    fn taps(&self, out_x: usize) -> (usize, &[i32]) {
        let start = out_x * self.window;
        (
            self.starts[out_x] as usize,
            &self.fixed[start..start + self.lens[out_x] as usize],
        )
    }
}

/// Pillow's `bilinear_filter`: the triangle 1 - |x| on (-1, 1).
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Pillow's `clip8`: the fixed-point sum back to a byte, saturating.
#[inline(always)]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rows the horizontal pass resamples together: with their bytes interleaved, one 32-bit
/// multiply-add per weight covers the same pixel of all of them (a 256-bit vector with AVX2).
const ROWS: usize = 8;

dispatch_simd! {
    /// Resamples every row of `src` horizontally into `out` (rows of `out_width` pixels).
    fn horizontal_pass(
        src: &CropView<'_>,
        weights: &Weights,
        out: &mut [u8],
        out_width: usize,
        scratch: &mut Scratch,
    ) => horizontal_pass_portable
}

#[inline(always)]
fn horizontal_pass_portable(
    src: &CropView<'_>,
    weights: &Weights,
    out: &mut [u8],
    out_width: usize,
    scratch: &mut Scratch,
) {
    let (in_bytes, out_bytes) = (src.row_bytes, out_width * 3);
    scratch.interleaved.resize(in_bytes * ROWS, 0);
    scratch.results.resize(out_bytes * ROWS, 0);
    let rows = src.height;
    for (block, out_rows) in out[..rows * out_bytes]
        .chunks_mut(out_bytes * ROWS)
        .enumerate()
    {
        let first = block * ROWS;
        let count = out_rows.len() / out_bytes;
        // A short last block repeats its last row; those results are not written out.
        let inputs: [&[u8]; ROWS] =
            std::array::from_fn(|l| &src.row(first + l.min(count - 1))[..in_bytes]);
        // Equal, visible lengths let the compiler drop bounds checks and vectorize.
        let columns = &mut scratch.interleaved.as_chunks_mut::<ROWS>().0[..in_bytes];
        for i in 0..in_bytes {
            for l in 0..ROWS {
                columns[i][l] = inputs[l][i];
            }
        }
        // Per input pixel: R of the eight rows, then G, then B.
        let pixels = scratch.interleaved.as_chunks::<{ 3 * ROWS }>().0;
        let results = scratch.results.as_chunks_mut::<{ 3 * ROWS }>().0;
        for (out_x, result) in results.iter_mut().enumerate() {
            let (start, taps) = weights.taps(out_x);
            let mut sums = [[ROUNDING; ROWS]; 3];
            for (pixel, &weight) in pixels[start..start + taps.len()].iter().zip(taps) {
                for (c, channel_sums) in sums.iter_mut().enumerate() {
                    for (sum, &value) in channel_sums.iter_mut().zip(&pixel[c * ROWS..]) {
                        *sum += i32::from(value) * weight;
                    }
                }
            }
            for (c, channel_sums) in sums.iter().enumerate() {
                for (value, &sum) in result[c * ROWS..(c + 1) * ROWS]
                    .iter_mut()
                    .zip(channel_sums)
                {
                    *value = clip8(sum);
                }
            }
        }
        // Back to rows: byte i of row l is at i * ROWS + l.
        let results = scratch.results.as_chunks::<ROWS>().0;
        if count == ROWS {
            let mut rows = out_rows.chunks_exact_mut(out_bytes);
            let outputs: [&mut [u8]; ROWS] =
                std::array::from_fn(|_| &mut rows.next().unwrap()[..out_bytes]);
            let results = &results[..out_bytes];
            for i in 0..out_bytes {
                for l in 0..ROWS {
                    outputs[l][i] = results[i][l];
                }
            }
        } else {
            for (l, output) in out_rows.chunks_exact_mut(out_bytes).enumerate() {
                for (value, column) in output.iter_mut().zip(results) {
                    *value = column[l];
                }
            }
        }
    }
}

dispatch_simd! {
    /// Resamples `src` vertically into `out`; the weights' row numbers are `row_offset` ahead
    /// of `src`'s (the horizontal pass produced only the rows from `row_offset` on).
    fn vertical_pass(
        src: &CropView<'_>,
        weights: &Weights,
        row_offset: usize,
        out: &mut [u8],
        sums: &mut Vec<i32>,
    ) => vertical_pass_portable
}

/// The vertical pass: the VBMI and VNNI one where the CPU has them (at the AVX-512 level),
/// the compiled one otherwise.
fn vertical(
    src: &CropView<'_>,
    weights: &Weights,
    row_offset: usize,
    out: &mut [u8],
    sums: &mut Vec<i32>,
) {
    #[cfg(target_arch = "x86_64")]
    if gather::available() {
        // SAFETY: `available` checked the CPU.
        unsafe { gather::vertical_pass(src, weights, row_offset, out) };
        return;
    }
    vertical_pass(src, weights, row_offset, out, sums);
}

#[inline(always)]
fn vertical_pass_portable(
    src: &CropView<'_>,
    weights: &Weights,
    row_offset: usize,
    out: &mut [u8],
    sums: &mut Vec<i32>,
) {
    let row_bytes = src.row_bytes;
    sums.clear();
    sums.resize(row_bytes, 0);
    for (out_y, out_row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (start, taps) = weights.taps(out_y);
        sums.fill(ROUNDING);
        for (y, &weight) in taps.iter().enumerate() {
            let row = src.row(start - row_offset + y);
            // Integer sums are exact in any order, so this runs along the row (and
            // vectorizes) rather than along the taps as Pillow does.
            for (sum, &value) in sums.iter_mut().zip(row) {
                *sum += i32::from(value) * weight;
            }
        }
        for (out_value, &sum) in out_row.iter_mut().zip(sums.iter()) {
            *out_value = clip8(sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> Vec<u8> {
        (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect()
    }

    fn resize(src: &[u8], size: (u32, u32), crop: CropBox, out: (u32, u32)) -> Vec<u8> {
        let mut dst = vec![0; (out.0 * out.1 * 3) as usize];
        let source = RgbRef {
            width: size.0,
            height: size.1,
            data: src,
        };
        let target = RgbMut {
            width: out.0,
            height: out.1,
            data: &mut dst,
        };
        CropResizer::new().resized_crop(source, crop, target);
        dst
    }

    #[test]
    fn same_size_crop_is_a_copy() {
        let src = gradient(10, 8);
        let crop = CropBox {
            top: 2,
            left: 3,
            height: 4,
            width: 5,
        };
        let out = resize(&src, (10, 8), crop, (5, 4));
        for y in 0..4 {
            let start = ((y + 2) * 10 + 3) * 3;
            assert_eq!(&out[y * 15..(y + 1) * 15], &src[start..start + 15]);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77; 40 * 30 * 3];
        let full = CropBox {
            top: 0,
            left: 0,
            height: 30,
            width: 40,
        };
        for out in [(1, 1), (7, 3), (40, 29), (96, 96), (13, 60)] {
            assert!(
                resize(&src, (40, 30), full, out).iter().all(|&v| v == 77),
                "{out:?}"
            );
        }
    }

    #[test]
    fn tiny_images_do_not_panic() {
        let one = [1, 2, 3];
        let whole = CropBox {
            top: 0,
            left: 0,
            height: 1,
            width: 1,
        };
        assert_eq!(resize(&one, (1, 1), whole, (3, 2)), [1, 2, 3].repeat(6));
        let src = gradient(2, 3);
        let crop = CropBox {
            top: 1,
            left: 1,
            height: 2,
            width: 1,
        };
        assert_eq!(resize(&src, (2, 3), crop, (224, 224)).len(), 224 * 224 * 3);
        assert_eq!(resize(&src, (2, 3), crop, (0, 5)).len(), 0);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        let mut weights = Weights::default();
        for (input, output) in [(1000, 224), (224, 224), (50, 224), (3, 1), (97, 96)] {
            weights.compute(input, output, false);
            for x in 0..output {
                let (start, taps) = weights.taps(x);
                assert!(start + taps.len() <= input);
                let sum: i32 = taps.iter().sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= taps.len() as i32,
                    "{sum}"
                );
            }
        }
    }

    /// The VBMI passes (at the AVX-512 level, where the CPU has them) against the compiled
    /// ones on the geometries of the recipes and beyond: reductions of up to three times with
    /// filters of up to seven taps; output widths that leave a partial group; reductions of
    /// about seven times, whose groups reach into the window's second register: 600 pixels
    /// to 80 (groups spanning exactly the window's 128 input pixels), 701 to 94 (127) and to
    /// 93 (129: the compiled pass, as for wider reductions).
    #[test]
    fn every_level_resizes_realistic_crops_alike() {
        let (width, height) = (701, 523);
        let src = crate::ops::noise(width * height * 3, 11);
        let source = RgbRef {
            width: width as u32,
            height: height as u32,
            data: &src,
        };
        let cases = [
            ((0, 0, 701, 523), (224, 224)),
            ((13, 0, 523, 523), (224, 224)),
            ((100, 50, 391, 300), (224, 224)),
            ((5, 9, 150, 171), (96, 96)),
            ((0, 0, 97, 61), (96, 96)),
            ((1, 2, 700, 20), (9, 20)),
            ((0, 0, 701, 523), (3, 2)),
            ((1, 1, 33, 700 - 180), (160, 160)),
            ((0, 0, 600, 40), (80, 40)),
            ((0, 0, 701, 40), (93, 40)),
            ((0, 0, 701, 40), (94, 40)),
            ((0, 0, 701, 40), (97, 17)),
            ((7, 3, 683, 500), (217, 101)),
        ];
        let mut results: Vec<Vec<Vec<u8>>> = Vec::new();
        let levels = crate::ops::at_every_simd_level(|_| {
            let mut resizer = CropResizer::new();
            let mut outputs = Vec::new();
            for ((left, top, crop_width, crop_height), (out_width, out_height)) in cases {
                let crop = CropBox {
                    left,
                    top,
                    width: crop_width,
                    height: crop_height,
                };
                let mut out = vec![0; (out_width * out_height * 3) as usize];
                let target = RgbMut {
                    width: out_width,
                    height: out_height,
                    data: &mut out,
                };
                resizer.resized_crop(source, crop, target);
                outputs.push(out);
                let mut flipped = vec![0; (out_width * out_height * 3) as usize];
                let target = RgbMut {
                    width: out_width,
                    height: out_height,
                    data: &mut flipped,
                };
                resizer.resized_crop_flipped(source, crop, true, target);
                outputs.push(flipped);
            }
            results.push(outputs);
        });
        // Each flipped output is its unflipped one, flipped.
        for outputs in &results {
            for ((_, (width, height)), pair) in cases.iter().zip(outputs.chunks_exact(2)) {
                let mut expected = pair[0].clone();
                let image = RgbMut {
                    width: *width,
                    height: *height,
                    data: &mut expected,
                };
                super::super::flip_horizontal(image);
                assert!(pair[1] == expected, "flipped {width}x{height}");
            }
        }
        for (level, outputs) in levels.iter().zip(&results).skip(1) {
            for (case, (got, want)) in cases
                .iter()
                .flat_map(|case| [case, case])
                .zip(outputs.iter().zip(&results[0]))
            {
                assert!(got == want, "{level:?} differs from portable for {case:?}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn crop_outside_the_source_panics() {
        let src = gradient(4, 4);
        resize(
            &src,
            (4, 4),
            CropBox {
                top: 1,
                left: 1,
                height: 4,
                width: 2,
            },
            (2, 2),
        );
    }
}
