//! The box passes with AVX-512 VNNI: Pillow's arithmetic in 16-bit lanes.
//!
//! A pass's output is `(sum * inner + far * outer + 2^23) >> 24` in `UINT32`, where `sum` is the
//! box's sum (at most `(2 * 8 + 1) * 255` here, so a 16-bit word) and `far` the sum of the two
//! pixels just outside it. `vpdpwssd` computes `sum * a + far * b` for a pair of words in one
//! instruction; the 24-bit weights are split into 12-bit halves (`inner = high * 2^12 + low`)
//! summed apart and recombined, which gives Pillow's `UINT32` value exactly. Sums are kept in
//! 16-bit lanes, twice as many per register as the compiled passes' 32-bit ones.
//!
//! The three horizontal passes run one row at a time, each row staying in two small buffers
//! extended by copies of its edge pixels; the vertical passes keep one running sum per byte of
//! a row, as the compiled ones do.

use std::arch::x86_64::*;

use super::{BoxKernel, initial_column_sums, moving_rows};

/// Bytes per step: 32 bytes widen to the 32 words of a 512-bit register.
const STEP: usize = 32;

/// Bits of a weight's low half.
const LOW_BITS: u32 = 12;

/// Largest box radius these passes take: its sum, `(2 * 8 + 1) * 255`, fits a word.
pub(super) const MAX_RADIUS: usize = 8;

/// Whether these passes run `kernel`: the kernels run at the AVX-512 level, this CPU has VNNI,
/// the box is at most [`MAX_RADIUS`], and both weights' high halves fit a signed word (they
/// do unless Pillow's unsigned arithmetic wrapped the outer weight).
pub(super) fn runs(kernel: BoxKernel) -> bool {
    kernel.radius <= MAX_RADIUS
        && kernel.inner >> LOW_BITS <= i16::MAX as u32
        && kernel.outer >> LOW_BITS <= i16::MAX as u32
        && super::super::simd() == super::super::Simd::Avx512
        && is_x86_feature_detected!("avx512vnni")
}

/// The kernel's weights as word pairs for `vpdpwssd`: (inner, outer) high halves and low
/// halves, the box sum in the low word of each lane and the far sum in the high one.
#[derive(Clone, Copy)]
struct Weights {
    high: __m512i,
    low: __m512i,
    rounding: __m512i,
}

impl Weights {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new(kernel: BoxKernel) -> Self {
        let pair = |inner: u32, outer: u32| _mm512_set1_epi32((inner | (outer << 16)) as i32);
        let mask = (1 << LOW_BITS) - 1;
        Self {
            high: pair(kernel.inner >> LOW_BITS, kernel.outer >> LOW_BITS),
            low: pair(kernel.inner & mask, kernel.outer & mask),
            rounding: _mm512_set1_epi32(1 << 23),
        }
    }

    /// The pass's output bytes for 32 box sums and far sums, in their order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn output(&self, sums: __m512i, far: __m512i) -> __m256i {
        // Within each 128-bit lane, unpacking pairs words 0-3 (low) and 4-7 (high), and the
        // pack below puts them back in that order.
        let value = |pairs: __m512i| {
            let high = _mm512_dpwssd_epi32(_mm512_setzero_si512(), pairs, self.high);
            let low = _mm512_dpwssd_epi32(self.rounding, pairs, self.low);
            _mm512_srli_epi32::<24>(_mm512_add_epi32(_mm512_slli_epi32::<LOW_BITS>(high), low))
        };
        let first = value(_mm512_unpacklo_epi16(sums, far));
        let second = value(_mm512_unpackhi_epi16(sums, far));
        _mm512_cvtepi16_epi8(_mm512_packus_epi32(first, second))
    }
}

/// Mask of the first `bytes` bytes (at most 32).
fn first_bytes(bytes: usize) -> u32 {
    if bytes >= 32 {
        u32::MAX
    } else {
        (1u32 << bytes) - 1
    }
}

/// 32 bytes at `at` widened to words, reading only `mask`'s bytes.
///
/// # Safety
///
/// The bytes `mask` selects must lie inside the allocation `base` points into.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn words(base: *const u8, at: usize, mask: u32) -> __m512i {
    // SAFETY: the caller's promise; masked-off bytes are neither read nor can they fault.
    let bytes = unsafe { _mm256_maskz_loadu_epi8(mask, base.wrapping_add(at).cast()) };
    _mm512_cvtepu8_epi16(bytes)
}

/// Three horizontal passes over every row of `src` into `dst` (rows of `row_bytes`). `rows` is
/// scratch space.
///
/// # Safety
///
/// [`runs`] must be true for `kernel`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn horizontal_passes(
    src: &[u8],
    dst: &mut [u8],
    row_bytes: usize,
    kernel: BoxKernel,
    rows: &mut Vec<u8>,
) {
    assert!(kernel.radius <= MAX_RADIUS && src.len() == dst.len() && row_bytes > 0);
    let weights = Weights::new(kernel);
    let radius = kernel.radius;
    // Each buffer: `r + 1` copies of the first pixel (`pad` bytes), the row, `r + 1` copies of
    // the last, then room for a step's loads past the end. The value of x sits at pad + 3x.
    let pad = (radius + 1) * 3;
    let len = row_bytes + 2 * pad + STEP;
    if rows.len() < 2 * len {
        rows.resize(2 * len, 0);
    }
    let (first, second) = rows[..2 * len].split_at_mut(len);
    let extend = |buffer: &mut [u8]| {
        let (left, rest) = buffer.split_at_mut(pad);
        let (middle, right) = rest.split_at_mut(row_bytes);
        for pixel in left.chunks_exact_mut(3) {
            pixel.copy_from_slice(&middle[..3]);
        }
        for pixel in right[..pad].chunks_exact_mut(3) {
            pixel.copy_from_slice(&middle[row_bytes - 3..]);
        }
    };
    // One pass from an extended row into `out` (`row_bytes` long, or longer: whole steps are
    // written into the next buffer; `extend` then rewrites its right pad, and the bytes past
    // the pad, left stale, reach only lanes whose outputs fall past the row).
    let pass = |from: &[u8], out: &mut [u8], whole_steps: bool| {
        debug_assert!(from.len() == len);
        for at in (0..row_bytes).step_by(STEP) {
            let mask = if whole_steps {
                u32::MAX
            } else {
                first_bytes(row_bytes - at)
            };
            // SAFETY: `from` holds at + 2 * pad + STEP bytes for every at < row_bytes (its
            // length is row_bytes + 2 * pad + STEP), the farthest any load here reaches.
            let (sums, far) = unsafe {
                let base = from.as_ptr();
                let mut sums = words(base, at + pad - radius * 3, u32::MAX);
                for k in 1..=2 * radius {
                    sums = _mm512_add_epi16(
                        sums,
                        words(base, at + pad - radius * 3 + k * 3, u32::MAX),
                    );
                }
                let far = _mm512_add_epi16(
                    words(base, at, u32::MAX),
                    words(base, at + 2 * pad, u32::MAX),
                );
                (sums, far)
            };
            let values = weights.output(sums, far);
            // SAFETY: with whole steps, `out` is the next buffer from `pad` on, which holds
            // row_bytes + pad + STEP bytes; otherwise the mask covers only bytes inside `out`.
            unsafe { _mm256_mask_storeu_epi8(out.as_mut_ptr().add(at).cast(), mask, values) };
        }
    };
    for (row, out) in src
        .chunks_exact(row_bytes)
        .zip(dst.chunks_exact_mut(row_bytes))
    {
        first[pad..pad + row_bytes].copy_from_slice(row);
        extend(first);
        pass(first, &mut second[pad..], true);
        extend(second);
        pass(second, &mut first[pad..], true);
        extend(first);
        pass(first, out, false);
    }
}

/// One vertical pass of `src` into `dst` (rows of `row_bytes`): a running sum per byte of a
/// row, in 16-bit words. `wide` and `sums` are scratch space.
///
/// # Safety
///
/// [`runs`] must be true for `kernel`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn vertical_pass(
    src: &[u8],
    dst: &mut [u8],
    row_bytes: usize,
    kernel: BoxKernel,
    wide: &mut Vec<u32>,
    sums: &mut Vec<u16>,
) {
    assert!(kernel.radius <= MAX_RADIUS && src.len() == dst.len() && row_bytes > 0);
    let weights = Weights::new(kernel);
    // The window before the first output, as the compiled pass starts it (those sums stay
    // below 2^16, so the words hold them whole).
    initial_column_sums(src, row_bytes, kernel, wide);
    sums.clear();
    sums.extend(wide.iter().map(|&sum| sum as u16));
    sums.resize(row_bytes + STEP, 0);
    for (y, out) in dst.chunks_exact_mut(row_bytes).enumerate() {
        let [add, remove, far_right] = moving_rows(src, row_bytes, kernel.radius, y);
        for at in (0..row_bytes).step_by(STEP) {
            let mask = first_bytes(row_bytes - at);
            // SAFETY: the masks cover only bytes inside the rows and `out`; `sums` holds
            // row_bytes + STEP words, so a whole step of 32 words from `at` stays inside.
            unsafe {
                let removed = words(remove.as_ptr(), at, mask);
                let sum_at = sums.as_mut_ptr().add(at).cast::<__m512i>();
                let running = _mm512_sub_epi16(
                    _mm512_add_epi16(_mm512_loadu_si512(sum_at), words(add.as_ptr(), at, mask)),
                    removed,
                );
                _mm512_storeu_si512(sum_at, running);
                let far = _mm512_add_epi16(removed, words(far_right.as_ptr(), at, mask));
                let values = weights.output(running, far);
                _mm256_mask_storeu_epi8(out.as_mut_ptr().add(at).cast(), mask, values);
            }
        }
    }
}
