//! Both resampling passes with AVX-512 VBMI and VNNI: Pillow's arithmetic without transposes
//! and with two taps per multiply-add.
//!
//! `vpdpwssd` multiplies two pairs of 16-bit words and adds both products to a 32-bit lane.
//! Pillow's 22-bit weights do not fit a word, so each is split into a high and a low part
//! (`w = high * 2^11 + low`) summed apart and recombined: the sum is Pillow's `i32` sum
//! exactly, then rounded and clipped as Pillow does.
//!
//! Horizontally, each input row is split into one plane per channel, and sixteen output pixels
//! of a plane form a group, one lane each: their taps lie within 128 input pixels of the
//! group's first tap, the two 64-byte registers of `vpermt2b`, which gathers the two taps of
//! every lane as words. Crops whose groups span more than 128 input pixels (a reduction of
//! more than about seven and a half times) take the compiled pass. Vertically, the same byte permute
//! interleaves two input rows, so a multiply-add covers two taps of sixteen bytes of a row.

use std::arch::x86_64::*;

use super::{CropView, PRECISION_BITS, ROUNDING, Weights};

/// Output pixels per group: one 32-bit lane of a 512-bit register each.
const GROUP: usize = 16;

/// Input pixels a group's taps may span: the two 64-byte table registers of `vpermt2b`.
const SPAN: usize = 128;

/// Bits of a weight's low part; the high part is the rest (Pillow's weights stay below 2^23,
/// so both parts fit a signed 16-bit word).
const LOW_BITS: u32 = 11;

/// Whether this CPU runs these passes and the kernels run at the AVX-512 level.
pub(super) fn available() -> bool {
    super::super::simd() == super::super::Simd::Avx512
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("avx512vnni")
}

/// The per-group tables of one axis's weights: where each group's window starts, which bytes
/// of the window each lane takes for each pair of taps, and the two parts of their weights.
#[derive(Debug, Default)]
pub(super) struct GatherPlan {
    /// Groups of [`GROUP`] output pixels (the last may be partial).
    groups: usize,
    /// Pairs of taps per output pixel: half the longest filter, rounded up.
    pairs: usize,
    /// First input pixel of each group's window.
    bases: Vec<u32>,
    /// Per group and pair, 64 bytes: byte `4m` and `4m + 2` of lane `m` are the offsets in the
    /// window of the pair's two taps (0 for taps past the filter, whose weights are 0).
    indices: Vec<u8>,
    /// Per group and pair, 32 words: the high parts of the two taps' weights of each lane.
    high: Vec<i16>,
    /// The low parts, laid out as `high`.
    low: Vec<i16>,
}

impl GatherPlan {
    /// Fills the tables for `weights`; false when a group spans more than [`SPAN`] input
    /// pixels (then the tables are unusable and the compiled pass must run).
    pub(super) fn build(&mut self, weights: &Weights) -> bool {
        let outputs = weights.starts.len();
        let longest = weights.lens.iter().copied().max().unwrap_or(0) as usize;
        self.groups = outputs.div_ceil(GROUP);
        self.pairs = longest.div_ceil(2);
        self.bases.clear();
        for group in 0..self.groups {
            let members = group * GROUP..outputs.min((group + 1) * GROUP);
            let base = members
                .clone()
                .map(|x| weights.starts[x])
                .min()
                .unwrap_or(0);
            let end = members
                .map(|x| weights.starts[x] + weights.lens[x])
                .max()
                .unwrap_or(0);
            if (end - base) as usize > SPAN {
                return false;
            }
            self.bases.push(base);
        }
        let entries = self.groups * self.pairs;
        self.indices.clear();
        self.indices.resize(entries * 64, 0);
        self.high.clear();
        self.high.resize(entries * 32, 0);
        self.low.clear();
        self.low.resize(entries * 32, 0);
        for group in 0..self.groups {
            let base = self.bases[group] as usize;
            for lane in 0..GROUP {
                let x = group * GROUP + lane;
                if x >= outputs {
                    break;
                }
                let (start, taps) = weights.taps(x);
                for (tap, &weight) in taps.iter().enumerate() {
                    let entry = group * self.pairs + tap / 2;
                    let word = lane * 2 + tap % 2;
                    self.indices[entry * 64 + word * 2] = (start + tap - base) as u8;
                    self.high[entry * 32 + word] = (weight >> LOW_BITS) as i16;
                    self.low[entry * 32 + word] = (weight & ((1 << LOW_BITS) - 1)) as i16;
                }
            }
        }
        true
    }
}

/// Byte indices that take channel `channel` of 64 interleaved RGB pixels (192 bytes in three
/// registers): for the first two registers, then for the third, and the lanes the third fills.
const fn split_indices(channel: usize) -> ([u8; 64], [u8; 64], u64) {
    let (mut first, mut third, mut from_third) = ([0u8; 64], [0u8; 64], 0u64);
    let mut i = 0;
    while i < 64 {
        let byte = 3 * i + channel;
        if byte < 128 {
            first[i] = byte as u8;
        } else {
            third[i] = (byte - 128) as u8;
            from_third |= 1 << i;
        }
        i += 1;
    }
    (first, third, from_third)
}

const SPLIT: [([u8; 64], [u8; 64], u64); 3] =
    [split_indices(0), split_indices(1), split_indices(2)];

/// Where element `m` of vector `v` lands in [`pack_sums`]'s result.
const fn packed(v: usize, m: usize) -> u8 {
    (16 * (m / 4) + 4 * v + m % 4) as u8
}

/// Byte indices that turn [`pack_sums`] of the red, green and blue sums of 16 pixels into
/// 48 bytes of RGB pixels.
const MERGE: [u8; 64] = {
    let mut indices = [0u8; 64];
    let mut i = 0;
    while i < 48 {
        indices[i] = packed(i % 3, i / 3);
        i += 1;
    }
    indices
};

/// Byte indices that put [`pack_sums`] of four vectors back in their order: element `m` of
/// vector `v` at byte `16 v + m`.
const IN_ORDER: [u8; 64] = {
    let mut indices = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        indices[i] = packed(i / 16, i % 16);
        i += 1;
    }
    indices
};

/// Pillow's rounding shift and clip to a byte for four vectors of 16 sums, each kept as the
/// sums of its high and low weight parts (the rounding term already in `low`). The 64 bytes
/// come out in the packing instructions' order: element `m` of vector `v` at byte
/// [`packed`]`(v, m)`. The saturating packs clip as `clip8` does: with weights that sum to
/// one, a shifted sum stays far inside the 16-bit range the first pack keeps.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pack_sums(high: [__m512i; 4], low: [__m512i; 4]) -> __m512i {
    let value = |v: usize| {
        let sum = _mm512_add_epi32(_mm512_slli_epi32::<LOW_BITS>(high[v]), low[v]);
        _mm512_srai_epi32::<PRECISION_BITS>(sum)
    };
    let (first, second) = (
        _mm512_packus_epi32(value(0), value(1)),
        _mm512_packus_epi32(value(2), value(3)),
    );
    _mm512_packus_epi16(first, second)
}

/// Mask of the first `bytes` bytes (at most 64).
fn first_bytes(bytes: usize) -> u64 {
    if bytes >= 64 {
        u64::MAX
    } else {
        (1u64 << bytes) - 1
    }
}

/// Resamples every row of `src` horizontally into `out` (rows of `out_width` pixels) with the
/// tables `plan` built from the weights; `planes` is scratch space.
///
/// # Safety
///
/// The CPU must have the features enabled here ([`available`] says so), and `plan` must come
/// from a successful [`GatherPlan::build`] for weights from `src`'s width to `out_width`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn horizontal_pass(
    src: &CropView<'_>,
    plan: &GatherPlan,
    out: &mut [u8],
    out_width: usize,
    planes: &mut Vec<u8>,
) {
    let in_width = src.row_bytes / 3;
    let out_bytes = out_width * 3;
    assert!(plan.groups == out_width.div_ceil(GROUP) && out.len() >= src.height * out_bytes);
    // Each plane holds a row split in 64-pixel chunks (the last one zero-filled past the row),
    // then room for a window that starts at the last pixel. A window loads bytes past the row,
    // but no tap's index points at them: padded taps take offset 0, with weight 0.
    let stride = in_width.next_multiple_of(64) + SPAN;
    if planes.len() < stride * 3 {
        planes.resize(stride * 3, 0);
    }
    let split: [(__m512i, __m512i, u64); 3] = std::array::from_fn(|c| {
        let (first, third, mask) = &SPLIT[c];
        // SAFETY: 64-byte unaligned loads of 64-byte arrays.
        unsafe {
            (
                _mm512_loadu_si512(first.as_ptr().cast()),
                _mm512_loadu_si512(third.as_ptr().cast()),
                *mask,
            )
        }
    });
    // SAFETY: a 64-byte unaligned load of a 64-byte array.
    let merge = unsafe { _mm512_loadu_si512(MERGE.as_ptr().cast()) };
    let even_bytes = 0x5555_5555_5555_5555u64;
    let rounding = _mm512_set1_epi32(ROUNDING);
    let zero = _mm512_setzero_si512();
    for y in 0..src.height {
        let row = src.row(y);
        let out_row = &mut out[y * out_bytes..(y + 1) * out_bytes];
        // Split the row into its channel planes, 64 pixels at a time.
        for chunk in 0..in_width.div_ceil(64) {
            let at = chunk * 192;
            let load = |offset: usize| {
                let mask = first_bytes(row.len().saturating_sub(at + offset));
                // SAFETY: the mask covers only bytes inside `row`; masked-off bytes are not
                // read (nor can they fault).
                unsafe {
                    _mm512_maskz_loadu_epi8(mask, row.as_ptr().wrapping_add(at + offset).cast())
                }
            };
            let (a, b, c) = (load(0), load(64), load(128));
            for (channel, &(first, third, from_third)) in split.iter().enumerate() {
                let values = _mm512_permutex2var_epi8(a, first, b);
                let values = _mm512_mask_permutexvar_epi8(values, from_third, third, c);
                // SAFETY: chunk * 64 + 64 <= stride, inside plane `channel`.
                unsafe {
                    let to = planes.as_mut_ptr().add(channel * stride + chunk * 64);
                    _mm512_storeu_si512(to.cast(), values);
                }
            }
        }
        for group in 0..plan.groups {
            let base = plan.bases[group] as usize;
            // SAFETY: base < in_width, so base + 128 <= stride: both loads of each plane stay
            // in it.
            let windows: [(__m512i, __m512i); 3] = std::array::from_fn(|channel| unsafe {
                let from = planes.as_ptr().add(channel * stride + base);
                (
                    _mm512_loadu_si512(from.cast()),
                    _mm512_loadu_si512(from.add(64).cast()),
                )
            });
            let mut high_sums = [zero; 3];
            let mut low_sums = [rounding; 3];
            for entry in group * plan.pairs..(group + 1) * plan.pairs {
                // SAFETY: entry < groups * pairs; each table holds 64 bytes per entry.
                let (index, high, low) = unsafe {
                    (
                        _mm512_loadu_si512(plan.indices.as_ptr().add(entry * 64).cast()),
                        _mm512_loadu_si512(plan.high.as_ptr().add(entry * 32).cast()),
                        _mm512_loadu_si512(plan.low.as_ptr().add(entry * 32).cast()),
                    )
                };
                for (channel, &(first, second)) in windows.iter().enumerate() {
                    let taps = _mm512_maskz_permutex2var_epi8(even_bytes, first, index, second);
                    high_sums[channel] = _mm512_dpwssd_epi32(high_sums[channel], taps, high);
                    low_sums[channel] = _mm512_dpwssd_epi32(low_sums[channel], taps, low);
                }
            }
            let [red, green, blue] = high_sums;
            let [red_low, green_low, blue_low] = low_sums;
            let pixels = pack_sums(
                [red, green, blue, zero],
                [red_low, green_low, blue_low, zero],
            );
            let pixels = _mm512_permutexvar_epi8(merge, pixels);
            let at = group * GROUP * 3;
            let mask = first_bytes((out_bytes - at).min(GROUP * 3));
            // SAFETY: the mask covers only bytes inside `out_row`.
            unsafe { _mm512_mask_storeu_epi8(out_row.as_mut_ptr().add(at).cast(), mask, pixels) };
        }
    }
}

/// Byte indices that interleave 16 bytes of two rows as 16-bit word pairs, for quarter
/// `quarter` of a 64-byte chunk: lane `m` takes byte `16 * quarter + m` of the first row (index
/// below 64) and of the second (index 64 and up). The odd bytes are zeroed by the mask.
const fn pair_indices(quarter: usize) -> [u8; 64] {
    let mut indices = [0u8; 64];
    let mut lane = 0;
    while lane < 16 {
        indices[lane * 4] = (16 * quarter + lane) as u8;
        indices[lane * 4 + 2] = (64 + 16 * quarter + lane) as u8;
        lane += 1;
    }
    indices
}

const PAIRS: [[u8; 64]; 4] = [
    pair_indices(0),
    pair_indices(1),
    pair_indices(2),
    pair_indices(3),
];

/// Resamples `src` vertically into `out`, as the compiled `vertical_pass` does: the weights'
/// row numbers are `row_offset` ahead of `src`'s. Two input rows at a time go through
/// `vpdpwssd`, 64 bytes of a row per step, with the sums in registers.
///
/// # Safety
///
/// The CPU must have the features enabled here ([`available`] says so).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
pub(super) unsafe fn vertical_pass(
    src: &CropView<'_>,
    weights: &Weights,
    row_offset: usize,
    out: &mut [u8],
) {
    let row_bytes = src.row_bytes;
    let even_bytes = 0x5555_5555_5555_5555u64;
    let rounding = _mm512_set1_epi32(ROUNDING);
    let zero = _mm512_setzero_si512();
    // SAFETY: a 64-byte unaligned load of a 64-byte array.
    let in_order = unsafe { _mm512_loadu_si512(IN_ORDER.as_ptr().cast()) };
    // SAFETY: 64-byte unaligned loads of 64-byte arrays.
    let pairs: [__m512i; 4] =
        std::array::from_fn(|q| unsafe { _mm512_loadu_si512(PAIRS[q].as_ptr().cast()) });
    for (out_y, out_row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (start, taps) = weights.taps(out_y);
        let first = start - row_offset;
        for at in (0..row_bytes).step_by(64) {
            let mask = first_bytes(row_bytes - at);
            let mut high_sums = [zero; 4];
            let mut low_sums = [rounding; 4];
            for (pair, weights) in taps.chunks(2).enumerate() {
                let load = |tap: usize| {
                    // A missing second tap reads the first row again with weight 0.
                    let row = src.row(first + 2 * pair + tap.min(weights.len() - 1));
                    // SAFETY: the mask covers only bytes inside the row.
                    unsafe { _mm512_maskz_loadu_epi8(mask, row.as_ptr().add(at).cast()) }
                };
                let (upper, lower) = (load(0), load(1));
                let weight = |tap: usize| weights.get(tap).copied().unwrap_or(0);
                let broadcast = |part: fn(i32) -> i32| {
                    let pair =
                        (part(weight(0)) as u16 as u32) | ((part(weight(1)) as u16 as u32) << 16);
                    _mm512_set1_epi32(pair as i32)
                };
                let high = broadcast(|w| w >> LOW_BITS);
                let low = broadcast(|w| w & ((1 << LOW_BITS) - 1));
                for q in 0..4 {
                    let taps = _mm512_maskz_permutex2var_epi8(even_bytes, upper, pairs[q], lower);
                    high_sums[q] = _mm512_dpwssd_epi32(high_sums[q], taps, high);
                    low_sums[q] = _mm512_dpwssd_epi32(low_sums[q], taps, low);
                }
            }
            let result = _mm512_permutexvar_epi8(in_order, pack_sums(high_sums, low_sums));
            // SAFETY: the mask covers only bytes inside `out_row`.
            unsafe { _mm512_mask_storeu_epi8(out_row.as_mut_ptr().add(at).cast(), mask, result) };
        }
    }
}
