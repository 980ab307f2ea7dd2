//! The color pass written with AVX-512 intrinsics: sixteen pixels per step, every operation
//! of the pass done in registers (channels as `f32` holding PIL's integer values), with the
//! same bytes as [`super::block_pass`].
//!
//! Why by hand: the compiler vectorizes the portable pass, but it converts every channel from
//! bytes to `f32` and back around each operation, and leaves five `f32` divisions per pixel in
//! the hue round trip. Here the values stay in registers from load to store, and the divisions
//! become multiplications with an exact correction:
//! - `floor(a / b)` for PIL's hue and saturation bytes: a 14-bit reciprocal estimate is within
//!   one of the quotient, and the remainder `a - q b` (exact in `f32`: every value is an integer
//!   below 2^24) moves it to the right side. The same remainder says whether the quotient is an
//!   integer, which is what [`super::rounded_down`] depends on.
//! - `round(n / 255)` of `hsv2rgb`: the exact value is never closer than `1 / 510` to a half, and
//!   the product with the `f32` reciprocal is within `1e-4` of it, so its floor plus one half is
//!   exact without a correction.
//! - `round(n / 21675)`: `1 / 43350` from a half is closer than an `f32` product can promise,
//!   so it takes the remainder correction too.
//!
//! The module's tests run every hue shift of every color, and chains of every operation, at
//! every SIMD level (`super::tests`).

use std::arch::x86_64::*;

use super::{ColorOp, ROUNDED_DOWN};

/// `_mm512_roundscale_ps` to the integer below, without raising exceptions.
const FLOOR: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;

/// Pixels per step: one 512-bit register of `f32` per channel.
const LANES: usize = 16;

/// Blocks summed in 32-bit lanes before they are added to the 64-bit total: 4096 blocks of
/// gray levels up to 255 stay far below 2^31 in each lane.
const FLUSH_BLOCKS: usize = 4096;

/// Runs `ops` on every pixel, a contrast with `contrast_mean` as its gray level; returns the sum
/// of the gray levels of the result when `measure` is set (0 otherwise). The same contract and
/// bytes as [`super::block_pass`] over every block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub(super) fn pass(
    pixels: &mut [[u8; 3]],
    ops: &[ColorOp],
    contrast_mean: u8,
    measure: bool,
) -> u64 {
    let shuffles = Shuffles::new();
    let mut total = 0u64;
    let mut sums = _mm512_setzero_si512();
    let (blocks, tail) = pixels.as_chunks_mut::<LANES>();
    for (index, block) in blocks.iter_mut().enumerate() {
        let gray = block_pass(&shuffles, block, ops, contrast_mean, measure);
        sums = _mm512_add_epi32(sums, gray);
        if (index + 1) % FLUSH_BLOCKS == 0 {
            total += lane_total(sums);
            sums = _mm512_setzero_si512();
        }
    }
    if !tail.is_empty() {
        // The last pixels, padded to a block on the stack.
        let mut block = [[0u8; 3]; LANES];
        block[..tail.len()].copy_from_slice(tail);
        let gray = block_pass(&shuffles, &mut block, ops, contrast_mean, measure);
        tail.copy_from_slice(&block[..tail.len()]);
        // Lanes past the last pixel may hold anything after the operations.
        let real = ((1u32 << tail.len()) - 1) as u16;
        sums = _mm512_mask_add_epi32(sums, real, sums, gray);
    }
    total + lane_total(sums)
}

/// Runs `ops` on the 16 pixels of `block`; returns their gray levels after them when `measure`
/// is set (zeros otherwise).
///
/// Loads and stores are three unmasked 16-byte moves: a masked or wider store would cover
/// bytes of the next block, and the CPU would hold that block's load until the store was done.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
fn block_pass(
    shuffles: &Shuffles,
    block: &mut [[u8; 3]; LANES],
    ops: &[ColorOp],
    contrast_mean: u8,
    measure: bool,
) -> __m512i {
    let bytes: &mut [u8; 3 * LANES] = block.as_flattened_mut().try_into().expect("48 bytes");
    let pointer = bytes.as_mut_ptr().cast::<__m128i>();
    // SAFETY: `bytes` holds the 48 bytes of the three unaligned 16-byte loads.
    let raw = unsafe {
        [
            _mm_loadu_si128(pointer),
            _mm_loadu_si128(pointer.add(1)),
            _mm_loadu_si128(pointer.add(2)),
        ]
    };
    let [mut red, mut green, mut blue] = shuffles.split(raw);
    for &op in ops {
        match op {
            _ if op.is_identity() => {}
            ColorOp::Brightness(factor) | ColorOp::Contrast(factor) => {
                let degenerate = if matches!(op, ColorOp::Contrast(_)) {
                    _mm512_set1_ps(f32::from(contrast_mean))
                } else {
                    _mm512_setzero_ps()
                };
                let factor = _mm512_set1_ps(factor);
                red = blend(degenerate, red, factor);
                green = blend(degenerate, green, factor);
                blue = blend(degenerate, blue, factor);
            }
            ColorOp::Saturation(factor) => {
                let gray = luma(red, green, blue);
                let factor = _mm512_set1_ps(factor);
                red = blend(gray, red, factor);
                green = blend(gray, green, factor);
                blue = blend(gray, blue, factor);
            }
            ColorOp::Hue(factor) => {
                // np.int32(hue_factor * 255) truncates toward zero; .astype(np.uint8) wraps.
                let shift = (f64::from(factor) * 255.0) as i32 as u8;
                [red, green, blue] = hue_shift(shuffles, red, green, blue, shift);
            }
            ColorOp::Grayscale => {
                let gray = luma(red, green, blue);
                [red, green, blue] = [gray; 3];
            }
        }
    }
    if !ops.is_empty() {
        let [first, second, third] = shuffles.merge(red, green, blue);
        // SAFETY: as for the loads.
        unsafe {
            _mm_storeu_si128(pointer, first);
            _mm_storeu_si128(pointer.add(1), second);
            _mm_storeu_si128(pointer.add(2), third);
        }
    }
    if measure {
        _mm512_cvtps_epi32(luma(red, green, blue))
    } else {
        _mm512_setzero_si512()
    }
}

/// The sum of sixteen non-negative 32-bit lanes, without overflow.
#[target_feature(enable = "avx512f")]
fn lane_total(sums: __m512i) -> u64 {
    let low = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(sums));
    let high = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(sums));
    _mm512_reduce_add_epi64(_mm512_add_epi64(low, high)) as u64
}

/// A vector of sixteen 32-bit lanes from an array.
#[target_feature(enable = "avx512f")]
fn lanes_of(values: [i32; LANES]) -> __m512i {
    // SAFETY: `values` holds exactly the 64 bytes the unaligned load reads.
    unsafe { _mm512_loadu_epi32(values.as_ptr()) }
}

/// The permutations between 48 interleaved bytes (16 RGB pixels) and three channel registers.
struct Shuffles {
    /// Per channel: the index of each pixel's byte among the first 32 bytes (as 32-bit lanes),
    /// for `_mm512_permutex2var_epi32`.
    split_low: [__m512i; 3],
    /// Per channel: its index among bytes 32 to 47, for the lanes in `split_high_lanes`.
    split_high: [__m512i; 3],
    /// Per channel: the pixels whose byte is among bytes 32 to 47.
    split_high_lanes: [u16; 3],
    /// Per output register of 16 bytes: the lane of red (0-15) or green (16-31) each byte
    /// comes from, for `_mm512_permutex2var_epi32`.
    merge_red_green: [__m512i; 3],
    /// Per output register: the lane of blue each byte comes from, for `merge_blue_lanes`.
    merge_blue: [__m512i; 3],
    /// Per output register: the bytes that are blue.
    merge_blue_lanes: [u16; 3],
    /// The bits of [`ROUNDED_DOWN`] in the first eight lanes.
    rounded_down: __m512i,
}

impl Shuffles {
    #[target_feature(enable = "avx512f")]
    fn new() -> Shuffles {
        let split = |channel: usize, high: bool| {
            let mut indices = [0i32; LANES];
            let mut lanes = 0u16;
            for (pixel, index) in indices.iter_mut().enumerate() {
                let byte = 3 * pixel + channel;
                if (byte >= 32) == high {
                    *index = (byte % 32) as i32;
                    lanes |= 1 << pixel;
                }
            }
            (lanes_of(indices), lanes)
        };
        let merge = |register: usize, blue: bool| {
            let mut indices = [0i32; LANES];
            let mut lanes = 0u16;
            for (slot, index) in indices.iter_mut().enumerate() {
                let byte = 16 * register + slot;
                let (pixel, channel) = (byte / 3, byte % 3);
                if (channel == 2) == blue {
                    // Green lanes follow red's in the two-source permutation.
                    *index = if blue { pixel } else { pixel + 16 * channel } as i32;
                    lanes |= 1 << slot;
                }
            }
            (lanes_of(indices), lanes)
        };
        Shuffles {
            split_low: std::array::from_fn(|c| split(c, false).0),
            split_high: std::array::from_fn(|c| split(c, true).0),
            split_high_lanes: std::array::from_fn(|c| split(c, true).1),
            merge_red_green: std::array::from_fn(|r| merge(r, false).0),
            merge_blue: std::array::from_fn(|r| merge(r, true).0),
            merge_blue_lanes: std::array::from_fn(|r| merge(r, true).1),
            rounded_down: lanes_of(std::array::from_fn(|i| {
                ROUNDED_DOWN.get(i).map_or(0, |&word| word as i32)
            })),
        }
    }

    /// The three channels of the 16 pixels in `raw` (48 bytes), as `f32`.
    #[target_feature(enable = "avx512f")]
    fn split(&self, raw: [__m128i; 3]) -> [__m512; 3] {
        let first = _mm512_cvtepu8_epi32(raw[0]);
        let second = _mm512_cvtepu8_epi32(raw[1]);
        let third = _mm512_cvtepu8_epi32(raw[2]);
        let channel = |c: usize| {
            let low = _mm512_permutex2var_epi32(first, self.split_low[c], second);
            let all = _mm512_mask_permutexvar_epi32(
                low,
                self.split_high_lanes[c],
                self.split_high[c],
                third,
            );
            _mm512_cvtepi32_ps(all)
        };
        [channel(0), channel(1), channel(2)]
    }

    /// The inverse of [`Shuffles::split`], for channel values that are integers in 0..=255.
    #[target_feature(enable = "avx512f")]
    fn merge(&self, red: __m512, green: __m512, blue: __m512) -> [__m128i; 3] {
        let red = _mm512_cvtps_epi32(red);
        let green = _mm512_cvtps_epi32(green);
        let blue = _mm512_cvtps_epi32(blue);
        let register = |r: usize| {
            let red_green = _mm512_permutex2var_epi32(red, self.merge_red_green[r], green);
            let all = _mm512_mask_permutexvar_epi32(
                red_green,
                self.merge_blue_lanes[r],
                self.merge_blue[r],
                blue,
            );
            _mm512_cvtepi32_epi8(all)
        };
        [register(0), register(1), register(2)]
    }
}

/// [`super::blend`]: `degenerate + factor * (value - degenerate)`, a rounded product and a
/// rounded sum (no fused multiply-add, as PIL computes), clamped to 0..=255 and floored.
#[target_feature(enable = "avx512f")]
fn blend(degenerate: __m512, value: __m512, factor: __m512) -> __m512 {
    let blended = _mm512_add_ps(
        degenerate,
        _mm512_mul_ps(factor, _mm512_sub_ps(value, degenerate)),
    );
    let clamped = _mm512_min_ps(
        _mm512_max_ps(blended, _mm512_setzero_ps()),
        _mm512_set1_ps(255.0),
    );
    _mm512_roundscale_ps::<FLOOR>(clamped)
}

/// [`super::luma`]: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`. Every product and partial
/// sum is an integer below 2^24, so the `f32` arithmetic is exact.
#[target_feature(enable = "avx512f")]
fn luma(red: __m512, green: __m512, blue: __m512) -> __m512 {
    let weighted = _mm512_fmadd_ps(
        red,
        _mm512_set1_ps(19595.0),
        _mm512_fmadd_ps(
            green,
            _mm512_set1_ps(38470.0),
            _mm512_fmadd_ps(blue, _mm512_set1_ps(7471.0), _mm512_set1_ps(32768.0)),
        ),
    );
    _mm512_roundscale_ps::<FLOOR>(_mm512_mul_ps(weighted, _mm512_set1_ps(1.0 / 65536.0)))
}

/// `floor(dividend / divisor)` and whether the division is exact, for integers with
/// `0 <= dividend < 2^19`, `1 <= divisor < 2^11` and a quotient below 256.
#[target_feature(enable = "avx512f")]
fn floor_divide(dividend: __m512, divisor: __m512) -> (__m512, __mmask16) {
    let one = _mm512_set1_ps(1.0);
    // Within 256 * 2^-14 of the quotient, so its floor is within one of the true floor.
    let estimate = _mm512_mul_ps(dividend, _mm512_rcp14_ps(divisor));
    let mut quotient = _mm512_roundscale_ps::<FLOOR>(estimate);
    // Exact: `quotient * divisor` and the difference are integers below 2^24.
    let mut remainder = _mm512_fnmadd_ps(quotient, divisor, dividend);
    let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(remainder, _mm512_setzero_ps());
    quotient = _mm512_mask_sub_ps(quotient, low, quotient, one);
    remainder = _mm512_mask_add_ps(remainder, low, remainder, divisor);
    let high = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(remainder, divisor);
    quotient = _mm512_mask_add_ps(quotient, high, quotient, one);
    remainder = _mm512_mask_sub_ps(remainder, high, remainder, divisor);
    let exact = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(remainder, _mm512_setzero_ps());
    (quotient, exact)
}

/// `round(numerator / 21675)` for integers `0 <= numerator <= 255 * 21675`, as
/// [`super::hsv_to_rgb`] computes it: `floor((numerator + 10837.5) / 21675)`, whose exact value
/// is never an integer.
#[target_feature(enable = "avx512f")]
fn round_over_21675(numerator: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    let denominator = _mm512_set1_ps(21675.0);
    // Below 2^23, so the half is kept exactly.
    let shifted = _mm512_add_ps(numerator, _mm512_set1_ps(10837.5));
    let mut quotient = _mm512_roundscale_ps::<FLOOR>(_mm512_mul_ps(
        shifted,
        _mm512_set1_ps(1.0 / 21675.0),
    ));
    // Exact, as in `floor_divide`; never zero, as the shifted value is not a multiple.
    let remainder = _mm512_fnmadd_ps(quotient, denominator, shifted);
    let low = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(remainder, _mm512_setzero_ps());
    let high = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(remainder, denominator);
    quotient = _mm512_mask_sub_ps(quotient, low, quotient, one);
    _mm512_mask_add_ps(quotient, high, quotient, one)
}

/// [`super::rgb_to_hsv`], the hue shifted by `shift` with wraparound, and
/// [`super::hsv_to_rgb`].
#[target_feature(enable = "avx512f")]
fn hue_shift(
    shuffles: &Shuffles,
    red: __m512,
    green: __m512,
    blue: __m512,
    shift: u8,
) -> [__m512; 3] {
    let splat = _mm512_set1_ps;
    let max = _mm512_max_ps(_mm512_max_ps(red, green), blue);
    let min = _mm512_min_ps(_mm512_min_ps(red, green), blue);
    let chroma = _mm512_sub_ps(max, min);
    let six_chroma = _mm512_mul_ps(chroma, splat(6.0));

    // The hue in sixths of a turn, times the chroma, as in `rgb_to_hsv`.
    let red_is_max = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(red, max);
    let green_is_max = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(green, max) & !red_is_max;
    let difference = _mm512_sub_ps(green, blue);
    let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(difference, _mm512_setzero_ps());
    let from_red = _mm512_mask_add_ps(difference, negative, difference, six_chroma);
    let two_chroma = _mm512_add_ps(chroma, chroma);
    let from_green = _mm512_add_ps(two_chroma, _mm512_sub_ps(blue, red));
    let from_blue = _mm512_add_ps(
        _mm512_add_ps(two_chroma, two_chroma),
        _mm512_sub_ps(red, green),
    );
    let sixths = _mm512_mask_blend_ps(
        red_is_max,
        _mm512_mask_blend_ps(green_is_max, from_blue, from_green),
        from_red,
    );

    let one = splat(1.0);
    let (hue, exact) = floor_divide(
        _mm512_mul_ps(sixths, splat(255.0)),
        _mm512_mul_ps(_mm512_max_ps(chroma, one), splat(6.0)),
    );
    let hue_byte = _mm512_cvtps_epi32(hue);
    let word = _mm512_permutexvar_epi32(_mm512_srli_epi32::<5>(hue_byte), shuffles.rounded_down);
    let bit = _mm512_srlv_epi32(word, _mm512_and_si512(hue_byte, _mm512_set1_epi32(31)));
    let rounded_down = _mm512_test_epi32_mask(bit, _mm512_set1_epi32(1));
    let hue_byte = _mm512_mask_sub_epi32(
        hue_byte,
        exact & rounded_down,
        hue_byte,
        _mm512_set1_epi32(1),
    );
    let (saturation, _) = floor_divide(
        _mm512_mul_ps(chroma, splat(255.0)),
        _mm512_max_ps(max, one),
    );
    let value = max;

    // Back to RGB, from the shifted hue byte.
    let shifted = _mm512_and_si512(
        _mm512_add_epi32(hue_byte, _mm512_set1_epi32(i32::from(shift))),
        _mm512_set1_epi32(255),
    );
    let twice_hue = _mm512_cvtepi32_ps(_mm512_slli_epi32::<1>(shifted));
    // floor(twice_hue / 85) as (twice_hue * 772) >> 16, exactly (772 / 2^16 is an `f32`).
    let sector = _mm512_roundscale_ps::<FLOOR>(_mm512_mul_ps(twice_hue, splat(772.0 / 65536.0)));
    let m = _mm512_fnmadd_ps(sector, splat(85.0), twice_hue);
    let p = _mm512_roundscale_ps::<FLOOR>(_mm512_mul_ps(
        _mm512_fmadd_ps(value, _mm512_sub_ps(splat(255.0), saturation), splat(127.5)),
        splat(1.0 / 255.0),
    ));
    let q = round_over_21675(_mm512_mul_ps(
        value,
        _mm512_fnmadd_ps(saturation, m, splat(21675.0)),
    ));
    let t = round_over_21675(_mm512_mul_ps(
        value,
        _mm512_fnmadd_ps(saturation, _mm512_sub_ps(splat(85.0), m), splat(21675.0)),
    ));

    let sector_is = |s: f32| _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(sector, splat(s));
    let (s0, s1, s2, s3) = (sector_is(0.0), sector_is(1.0), sector_is(2.0), sector_is(3.0));
    let (s4, s5, s6) = (sector_is(4.0), sector_is(5.0), sector_is(6.0));
    // switch (i % 6) of `hsv2rgb`, sector 6 (hue 255) acting as 0.
    let red = _mm512_mask_blend_ps(s1, p, q);
    let red = _mm512_mask_blend_ps(s4, red, t);
    let red = _mm512_mask_blend_ps(s0 | s5 | s6, red, value);
    let green = _mm512_mask_blend_ps(s3, p, q);
    let green = _mm512_mask_blend_ps(s0 | s6, green, t);
    let green = _mm512_mask_blend_ps(s1 | s2, green, value);
    let blue = _mm512_mask_blend_ps(s2, p, t);
    let blue = _mm512_mask_blend_ps(s5, blue, q);
    let blue = _mm512_mask_blend_ps(s3 | s4, blue, value);
    [red, green, blue]
}
