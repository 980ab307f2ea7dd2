//! `ColorJitter` and `RandomGrayscale` on RGB8 images, in place, with PIL's arithmetic.
//!
//! torchvision's PIL backend (`transforms/_functional_pil.py`) implements brightness, contrast
//! and saturation with `PIL.ImageEnhance`, which is `Image.blend(degenerate, image, factor)`:
//! `out = (u8)(degenerate + factor * (image - degenerate))` in `float`, truncated, and clipped
//! to 0..=255 when `factor` extrapolates (`libImaging/Blend.c`). The degenerate image is black
//! (brightness), the mean gray level rounded to an integer (contrast) or the pixel's own gray
//! level (saturation). Gray levels are PIL's `convert("L")`: ITU-R 601-2 luma in 16-bit fixed
//! point, `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
//!
//! Hue goes through PIL's HSV conversion (`libImaging/Convert.c`, `rgb2hsv_row` and
//! `hsv2rgb`), whose results (a `float`/`double` mix, truncated) this module reproduces bit for
//! bit, shifts the `u8` hue with wraparound as torchvision does, and converts back. Even a zero shift
//! changes pixels, because PIL's HSV round trip is lossy; so does this module.
//!
//! Factors are `f32`: torchvision's `ColorJitter` samples them in `float32` and PIL narrows the
//! blend factor to `float`, so an `f32` carries exactly the value PIL computes with.
//!
//! Speed: [`apply`] runs a whole chain of operations in one pass over blocks of 64 pixels
//! (plus one pass per contrast, whose mean depends on the image before it), each block split
//! into channel arrays once, with branch-free arithmetic that vectorizes (compiled for AVX2 and
//! AVX-512 when the CPU has them); with AVX-512 VBMI, brightness and contrast are byte tables
//! looked up 64 bytes at a time. The HSV conversions compute PIL's results in integers and
//! `f32` divisions and multiplications instead of its `float`/`double` steps; they are checked against a
//! statement-by-statement transcription of PIL's C code for every one of the 2^24 inputs, and
//! the whole hue shift at every SIMD level for every color.

use super::RgbMut;

/// One color operation of SwAV's recipe, with its factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorOp {
    /// [`adjust_brightness`].
    Brightness(f32),
    /// [`adjust_contrast`].
    Contrast(f32),
    /// [`adjust_saturation`].
    Saturation(f32),
    /// [`adjust_hue`].
    Hue(f32),
    /// [`to_grayscale`].
    Grayscale,
}

impl ColorOp {
    /// Whether the operation leaves every image as it is: a blend with factor 1 (PIL's blend
    /// returns the image unchanged). A hue shift never does: PIL's HSV round trip is lossy.
    fn is_identity(self) -> bool {
        matches!(
            self,
            ColorOp::Brightness(1.0) | ColorOp::Contrast(1.0) | ColorOp::Saturation(1.0)
        )
    }

    /// A contrast that changes the image: the operations before it must be done, and the mean
    /// gray level of their result known, before it can run.
    fn needs_mean(self) -> bool {
        matches!(self, ColorOp::Contrast(_)) && !self.is_identity()
    }
}

/// Applies `ops` in order, in place, with the same result as calling the single-operation
/// functions one after the other, but in as few passes over the image as the data allow: one,
/// plus one per contrast (which needs the mean gray level of the image it applies to, so the
/// pass before it sums the gray levels as it goes). Each pass splits a block of 64 pixels into
/// channel arrays once, runs every operation of the pass on them and interleaves them back once.
///
/// Brightness and contrast map each byte to a byte whatever the other channels hold, so within
/// a pass they become 256-byte tables (consecutive ones composed into one), looked up 64 bytes
/// per instruction pair where the CPU has AVX-512 VBMI and byte by byte elsewhere.
pub fn apply(image: RgbMut<'_>, ops: &[ColorOp]) {
    let pixels = image.data.as_chunks_mut::<3>().0;
    if pixels.is_empty() {
        return;
    }
    let byte_lookup = ByteLookup::detected();
    // Each pass runs `rest` up to the next contrast; a pass after the first starts with the
    // contrast whose `mean` the pass before it measured.
    let mut rest = ops;
    let mut mean = None;
    loop {
        let first = usize::from(mean.is_some());
        let end = rest[first..]
            .iter()
            .position(|op| op.needs_mean())
            .map_or(rest.len(), |i| first + i);
        let (pass, next) = rest.split_at(end);
        let measure = !next.is_empty();
        if !measure && pass.iter().all(|op| op.is_identity()) {
            return;
        }
        // A pass longer than the step list holds runs as several; only the last measures.
        let mut sum = 0u64;
        let mut remaining = pass;
        loop {
            let mut plan = PassPlan::default();
            let taken = plan.add(remaining, mean.unwrap_or(0), byte_lookup);
            remaining = &remaining[taken..];
            let last = remaining.is_empty();
            if !plan.is_empty() || (measure && last) {
                for block in pixels.chunks_mut(BLOCK) {
                    sum += block_pass(block, &plan, byte_lookup, measure && last);
                }
            }
            if last {
                break;
            }
        }
        if !measure {
            return;
        }
        // int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5): the exact integer sum divided
        // in double (Python's true division of ints is correctly rounded, as is the division of
        // two exactly represented doubles).
        mean = Some((sum as f64 / pixels.len() as f64 + 0.5) as u8);
        rest = next;
    }
}

/// Most steps one pass runs; a longer chain runs in more passes.
const MAX_STEPS: usize = 8;

/// One step of a pass over a block of channel arrays.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Maps every byte through the pass's table of this index.
    Table(usize),
    /// Blends every byte with this degenerate value by this factor (brightness or contrast
    /// where no fast table lookup is at hand).
    Blend(u8, f32),
    /// [`adjust_saturation`] with this factor.
    Saturation(f32),
    /// [`adjust_hue`] with this hue byte shift.
    Hue(u8),
    /// [`to_grayscale`].
    Grayscale,
}

/// The steps of one pass and the byte tables they use.
struct PassPlan {
    steps: [Step; MAX_STEPS],
    len: usize,
    tables: [[u8; 256]; MAX_STEPS],
    tables_len: usize,
}

impl Default for PassPlan {
    fn default() -> Self {
        Self {
            steps: [Step::Grayscale; MAX_STEPS],
            len: 0,
            tables: [[0; 256]; MAX_STEPS],
            tables_len: 0,
        }
    }
}

impl PassPlan {
    /// Adds steps for the leading operations of `ops` while they fit; a contrast blends with
    /// `contrast_mean`. Brightness and contrast become tables only where `byte_lookup` looks
    /// them up faster than the arithmetic. Returns how many operations were taken.
    fn add(&mut self, ops: &[ColorOp], contrast_mean: u8, byte_lookup: ByteLookup) -> usize {
        for (taken, &op) in ops.iter().enumerate() {
            let step = match op {
                _ if op.is_identity() => continue,
                ColorOp::Brightness(factor) | ColorOp::Contrast(factor) => {
                    let degenerate = if matches!(op, ColorOp::Contrast(_)) {
                        contrast_mean
                    } else {
                        0
                    };
                    let map = |value: u8| blend(degenerate, value, factor);
                    if !byte_lookup.is_fast() {
                        Step::Blend(degenerate, factor)
                    } else if let Some(&Step::Table(index)) = self.steps[..self.len].last() {
                        // A table right after another composes with it.
                        for value in &mut self.tables[index] {
                            *value = map(*value);
                        }
                        continue;
                    } else if self.len == MAX_STEPS {
                        return taken;
                    } else {
                        let index = self.tables_len;
                        self.tables[index] = std::array::from_fn(|value| map(value as u8));
                        self.tables_len += 1;
                        Step::Table(index)
                    }
                }
                ColorOp::Saturation(factor) => Step::Saturation(factor),
                // np.int32(hue_factor * 255) truncates toward zero; .astype(np.uint8) wraps.
                ColorOp::Hue(factor) => Step::Hue((f64::from(factor) * 255.0) as i32 as u8),
                ColorOp::Grayscale => Step::Grayscale,
            };
            if self.len == MAX_STEPS {
                return taken;
            }
            self.steps[self.len] = step;
            self.len += 1;
        }
        ops.len()
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn steps(&self) -> &[Step] {
        &self.steps[..self.len]
    }
}

/// How a byte table is looked up: AVX-512 VBMI's two-register byte permutes, 64 bytes at a
/// time, or one byte at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteLookup {
    Bytewise,
    #[cfg(target_arch = "x86_64")]
    Vbmi,
}

impl ByteLookup {
    /// VBMI when the kernels run at the AVX-512 level and the CPU has VBMI.
    fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::simd() == super::Simd::Avx512 && std::arch::is_x86_feature_detected!("avx512vbmi")
        {
            return ByteLookup::Vbmi;
        }
        ByteLookup::Bytewise
    }

    /// Whether a table lookup beats the blend's arithmetic. One byte at a time it does not
    /// (measured with AVX2: 1.6 against 1.2 ns per pixel for a brightness).
    fn is_fast(self) -> bool {
        self != ByteLookup::Bytewise
    }

    /// Replaces each byte of `channel` by its entry in `table`.
    #[inline(always)]
    fn map(self, channel: &mut [u8; BLOCK], table: &[u8; 256]) {
        match self {
            ByteLookup::Bytewise => {
                for value in channel.iter_mut() {
                    *value = table[usize::from(*value)];
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detected` returns `Vbmi` only when the CPU has the features the
            // function enables.
            ByteLookup::Vbmi => unsafe { map_vbmi(channel, table) },
        }
    }
}

/// [`ByteLookup::map`] with AVX-512 VBMI: `vpermi2b` looks up each byte's low seven bits in
/// two 128-byte halves of the table, and its high bit picks the half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn map_vbmi(channel: &mut [u8; BLOCK], table: &[u8; 256]) {
    use std::arch::x86_64::*;
    const _: () = assert!(BLOCK == 64);
    // SAFETY: every load and store covers 64 bytes inside `table` (256 bytes) or `channel`
    // (64 bytes); the unaligned forms accept any address.
    unsafe {
        let part = |i: usize| _mm512_loadu_si512(table.as_ptr().add(i * 64).cast());
        let (low_a, low_b, high_a, high_b) = (part(0), part(1), part(2), part(3));
        let values = _mm512_loadu_si512(channel.as_ptr().cast());
        let low = _mm512_permutex2var_epi8(low_a, values, low_b);
        let high = _mm512_permutex2var_epi8(high_a, values, high_b);
        let mapped = _mm512_mask_blend_epi8(_mm512_movepi8_mask(values), low, high);
        _mm512_storeu_si512(channel.as_mut_ptr().cast(), mapped);
    }
}

dispatch_simd! {
    /// Runs the steps of `plan` on up to [`BLOCK`] pixels; returns the sum of the gray levels
    /// of the result when `measure` is set (0 otherwise), counting only the real pixels.
    fn block_pass(
        pixels: &mut [[u8; 3]],
        plan: &PassPlan,
        byte_lookup: ByteLookup,
        measure: bool,
    ) -> u64 => block_pass_portable
}

#[inline(always)]
fn block_pass_portable(
    pixels: &mut [[u8; 3]],
    plan: &PassPlan,
    byte_lookup: ByteLookup,
    measure: bool,
) -> u64 {
    let mut channels = split(pixels);
    for &step in plan.steps() {
        match step {
            Step::Table(index) => {
                let table = &plan.tables[index];
                for channel in &mut channels {
                    byte_lookup.map(channel, table);
                }
            }
            Step::Blend(degenerate, factor) => {
                for channel in &mut channels {
                    for value in channel.iter_mut() {
                        *value = blend(degenerate, *value, factor);
                    }
                }
            }
            Step::Saturation(factor) => {
                let gray = luma_block(&channels);
                for channel in &mut channels {
                    for (value, &gray) in channel.iter_mut().zip(&gray) {
                        *value = blend(gray, *value, factor);
                    }
                }
            }
            Step::Hue(shift) => {
                let mut shifted = [[0u8; BLOCK]; 3];
                for i in 0..BLOCK {
                    let [red, green, blue] = [channels[0][i], channels[1][i], channels[2][i]];
                    let [hue, saturation, value] = rgb_to_hsv(red, green, blue);
                    let rgb = hsv_to_rgb(hue.wrapping_add(shift), saturation, value);
                    for c in 0..3 {
                        shifted[c][i] = rgb[c];
                    }
                }
                channels = shifted;
            }
            Step::Grayscale => channels = [luma_block(&channels); 3],
        }
    }
    if !plan.is_empty() {
        merge(&channels, pixels);
    }
    if !measure {
        return 0;
    }
    // Padding lanes past the last pixel may hold anything after the operations.
    luma_block(&channels)[..pixels.len().min(BLOCK)]
        .iter()
        .map(|&gray| u64::from(gray))
        .sum()
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blends with black.
pub fn adjust_brightness(image: RgbMut<'_>, factor: f32) {
    apply(image, &[ColorOp::Brightness(factor)]);
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blends with a uniform gray at the mean gray
/// level, rounded half up to an integer as Pillow 13's `ImageEnhance.Contrast` does.
pub fn adjust_contrast(image: RgbMut<'_>, factor: f32) {
    apply(image, &[ColorOp::Contrast(factor)]);
}

/// `ImageEnhance.Color(img).enhance(factor)` (torchvision's `adjust_saturation`): blends each
/// pixel with its own gray level.
pub fn adjust_saturation(image: RgbMut<'_>, factor: f32) {
    apply(image, &[ColorOp::Saturation(factor)]);
}

/// torchvision's `F.adjust_hue` on a PIL image: RGB to PIL's HSV, hue plus
/// `(int)(hue_factor * 255)` modulo 256, back to RGB.
///
/// `hue_factor` is meant to be in `[-0.5, 0.5]` (torchvision rejects anything else); other
/// values wrap around like torchvision's `uint8` arithmetic would.
pub fn adjust_hue(image: RgbMut<'_>, hue_factor: f32) {
    apply(image, &[ColorOp::Hue(hue_factor)]);
}

/// `F.rgb_to_grayscale(img, num_output_channels=3)`: PIL's `convert("L")` copied to all three
/// channels.
pub fn to_grayscale(image: RgbMut<'_>) {
    apply(image, &[ColorOp::Grayscale]);
}

/// PIL's `rgb2hsv_row` (`libImaging/Convert.c`), in integers and exact `f32` divisions, written
/// without branches so that it vectorizes. Tested against `reference::rgb_to_hsv` (in the
/// tests), the step-by-step transcription of PIL's `float`/`double` code, for every color.
///
/// PIL's hue is `255 * fmod(h / 6 + 1, 1)` truncated, where `h` is the hue in sixths of a turn;
/// its exact value is `255 * sixths / (6 * chroma)` with `sixths` the integer below. The `f32`
/// quotient of those two integers (both below 2^19) is within half an ulp of the rational, and
/// a rational that is not an integer is at least `1 / (6 * chroma)` away from one, so the
/// truncated quotient is the truncated rational. PIL's `float` steps compute that rational
/// exactly except when it is an integer: then they land just below it for the hue bytes
/// [`rounded_down`] lists, and PIL's byte is one less. The saturation byte is
/// `floor(255 * chroma / max)` by the same argument, with no exception.
#[inline(always)]
fn rgb_to_hsv(red: u8, green: u8, blue: u8) -> [u8; 3] {
    let (r, g, b) = (i32::from(red), i32::from(green), i32::from(blue));
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let chroma = max - min;
    // The hue in sixths of a turn, times the chroma, in [0, 6 * chroma); 0 for gray pixels.
    let sixths = if r == max {
        let difference = g - b;
        if difference < 0 {
            difference + 6 * chroma
        } else {
            difference
        }
    } else if g == max {
        2 * chroma + b - r
    } else {
        4 * chroma + r - g
    };
    // Gray pixels divide 0 by 1: hue and saturation 0, as PIL sets them.
    let turns = (255 * sixths) as f32 / (6 * chroma.max(1)) as f32;
    let hue = floor_byte(turns);
    let exact = f32::from(hue) == turns;
    let hue = hue - (u8::from(exact) & u8::from(rounded_down(hue)));
    let saturation = floor_byte((255 * chroma) as f32 / max.max(1) as f32);
    [hue, saturation, max as u8]
}

/// Whether PIL's `rgb2hsv_row` computes hue byte `hue` one too low when the exact hue is that
/// integer (its `float` division, subtraction and `fmod` end just below it). Found by comparing
/// every color with the transcription of PIL's code; the exhaustive test
/// `rgb_to_hsv_matches_pil_for_every_color` checks it.
///
/// A bit per hue byte, looked up without indexing memory (which would not vectorize): the
/// 32-bit word is chosen by comparisons, the bit by a shift.
#[inline(always)]
fn rounded_down(hue: u8) -> bool {
    let (hue, index) = (u32::from(hue), u32::from(hue >> 5));
    let word = |i: u32| ROUNDED_DOWN[i as usize] & 0u32.wrapping_sub(u32::from(index == i));
    let bits = word(0) | word(1) | word(2) | word(3) | word(4) | word(5) | word(6) | word(7);
    (bits >> (hue & 31)) & 1 == 1
}

/// The bits of [`rounded_down`], hue byte `h` at bit `h % 32` of word `h / 32`: 1 to 31; 88 to
/// 104 in steps of 4; the odd bytes 129 to 149; 153 to 209 in steps of 4; 176 and 184.
const ROUNDED_DOWN: [u32; 8] = {
    let mut words = [0u32; 8];
    let mut hue = 0;
    while hue < 256 {
        let set = (hue >= 1 && hue <= 31)
            || (hue >= 88 && hue <= 104 && hue % 4 == 0)
            || (hue >= 129 && hue <= 149 && hue % 2 == 1)
            || (hue >= 153 && hue <= 209 && hue % 4 == 1)
            || hue == 176
            || hue == 184;
        if set {
            words[hue / 32] |= 1 << (hue % 32);
        }
        hue += 1;
    }
    words
};

/// PIL's `hsv2rgb`, branch-free, in integers and `f32` arithmetic (with saturation 0 the
/// formulas give `(v, v, v)`, PIL's special case). Tested against `reference::hsv_to_rgb` (in
/// the tests), the transcription of PIL's `float`/`double` code, for every HSV triple.
///
/// PIL computes `i = floor(6 h / 255)`, `f = 6 h / 255 - i` (so `f = m / 85` with
/// `m = 2 h mod 85`), `fs = s / 255`, and rounds `v (1 - fs)`, `v (1 - fs f)` and
/// `v (1 - fs (1 - f))`. Their exact values are `v (255 - s) / 255`,
/// `v (21675 - s m) / 21675` and `v (21675 - s (85 - m)) / 21675`: never a half (twice the
/// numerator is even, the denominator odd), and at least `1 / 43350` (`2.3e-5`) away from one.
/// PIL's `float` roundings move them less than that. Here the divisions are multiplications by
/// the `f32` reciprocals of 255 and 21675 (cheaper than vector divisions), which with the
/// addition move them by up to about `4.5e-5` by the error bound alone; the exhaustive test
/// shows that for every input they still round to PIL's integer.
#[inline(always)]
fn hsv_to_rgb(hue: u8, saturation: u8, value: u8) -> [u8; 3] {
    let twice_hue = i32::from(hue) * 2;
    // floor(twice_hue / 85) for twice_hue in 0..=510 (the exhaustive test covers them).
    let sector = (twice_hue * 772) >> 16;
    let m = twice_hue - sector * 85;
    let (s, v) = (i32::from(saturation), i32::from(value));
    let round = |numerator: i32, reciprocal: f32| floor_byte(numerator as f32 * reciprocal + 0.5);
    let p = i32::from(round(v * (255 - s), 1.0 / 255.0));
    let q = i32::from(round(v * (21675 - s * m), 1.0 / 21675.0));
    let t = i32::from(round(v * (21675 - s * (85 - m)), 1.0 / 21675.0));
    // switch (i % 6): 0 (v, t, p), 1 (q, v, p), 2 (p, v, t), 3 (p, q, v), 4 (t, p, v),
    // 5 (v, p, q); i is 6 only for hue 255, where it acts as 0.
    let red = match sector {
        0 | 5 | 6 => v,
        1 => q,
        2 | 3 => p,
        _ => t,
    };
    let green = match sector {
        0 | 6 => t,
        1 | 2 => v,
        3 => q,
        _ => p,
    };
    let blue = match sector {
        0 | 1 | 6 => p,
        2 => t,
        3 | 4 => v,
        _ => q,
    };
    [red as u8, green as u8, blue as u8]
}

/// Pixels per step of the block-wise operations: a block is split into one array per channel,
/// computed a channel array at a time (which vectorizes), and interleaved back.
const BLOCK: usize = 64;

/// The channels of up to [`BLOCK`] pixels, as arrays (zero past the last pixel).
#[inline(always)]
fn split(pixels: &[[u8; 3]]) -> [[u8; BLOCK]; 3] {
    let mut channels = [[0u8; BLOCK]; 3];
    if let Ok(full) = <&[[u8; 3]; BLOCK]>::try_from(pixels) {
        // A whole block: a loop of constant length, which the compiler turns into shuffles.
        for i in 0..BLOCK {
            for c in 0..3 {
                channels[c][i] = full[i][c];
            }
        }
        return channels;
    }
    for (i, pixel) in pixels.iter().take(BLOCK).enumerate() {
        for c in 0..3 {
            channels[c][i] = pixel[c];
        }
    }
    channels
}

/// The inverse of [`split`], for as many pixels as `pixels` holds.
#[inline(always)]
fn merge(channels: &[[u8; BLOCK]; 3], pixels: &mut [[u8; 3]]) {
    if let Ok(full) = <&mut [[u8; 3]; BLOCK]>::try_from(&mut *pixels) {
        for i in 0..BLOCK {
            for c in 0..3 {
                full[i][c] = channels[c][i];
            }
        }
        return;
    }
    for (i, pixel) in pixels.iter_mut().take(BLOCK).enumerate() {
        for c in 0..3 {
            pixel[c] = channels[c][i];
        }
    }
}

/// [`luma`] of a block of channel arrays.
#[inline(always)]
fn luma_block(channels: &[[u8; BLOCK]; 3]) -> [u8; BLOCK] {
    std::array::from_fn(|i| luma(channels[0][i], channels[1][i], channels[2][i]))
}

/// PIL's RGB to L conversion (`L24` in `Convert.c`).
#[inline(always)]
fn luma(red: u8, green: u8, blue: u8) -> u8 {
    // i32, not u32: vectorizes to plain 32-bit multiplies.
    let weighted = i32::from(red) * 19595 + i32::from(green) * 38470 + i32::from(blue) * 7471;
    ((weighted + 0x8000) >> 16) as u8
}

/// One value of `ImagingBlend`: `degenerate + factor * (value - degenerate)` in `float` (the
/// integer difference converts exactly), then C's cast to `UINT8` of the interpolating branch
/// or the clipping to 0..=255 of the extrapolating one; both are the truncation of the value
/// clamped to 0..=255.
#[inline(always)]
fn blend(degenerate: u8, value: u8, factor: f32) -> u8 {
    let degenerate = f32::from(degenerate);
    let blended = degenerate + factor * (f32::from(value) - degenerate);
    floor_byte(blended.clamp(0.0, 255.0))
}

/// `floor(x)` for `x` in `[0, 255]` without a float-to-int conversion, which vectorizes
/// poorly: adding 2^23 rounds to the nearest integer and leaves it in the low mantissa bits, and
/// one comparison turns nearest into floor.
#[inline(always)]
fn floor_byte(x: f32) -> u8 {
    const TWO_POW_23: f32 = 8_388_608.0;
    let shifted = x + TWO_POW_23;
    let nearest = shifted - TWO_POW_23;
    (shifted.to_bits() as u8).wrapping_sub(u8::from(nearest > x))
}

/// PIL's HSV conversions transcribed statement by statement, in C's types and with its
/// branches: the definition the branch-free versions are tested against.
#[cfg(test)]
mod reference {
    /// `rgb2hsv_row`.
    pub(super) fn rgb_to_hsv(red: u8, green: u8, blue: u8) -> [u8; 3] {
        let max = red.max(green).max(blue);
        let min = red.min(green).min(blue);
        if max == min {
            return [0, 0, max];
        }
        let chroma = f32::from(max - min);
        let saturation = chroma / f32::from(max);
        let red_distance = f32::from(max - red) / chroma;
        let green_distance = f32::from(max - green) / chroma;
        let blue_distance = f32::from(max - blue) / chroma;
        // `h` is a C float; the literals 2.0 and 4.0 are doubles, so those sums are double.
        let hue: f32 = if red == max {
            blue_distance - green_distance
        } else if green == max {
            (2.0 + f64::from(red_distance) - f64::from(blue_distance)) as f32
        } else {
            (4.0 + f64::from(green_distance) - f64::from(red_distance)) as f32
        };
        // h = fmod(h / 6.0 + 1.0, 1.0), stored back into the float.
        let hue = ((f64::from(hue) / 6.0 + 1.0) % 1.0) as f32;
        let hue_byte = clip8((f64::from(hue) * 255.0) as i32);
        let saturation_byte = clip8((f64::from(saturation) * 255.0) as i32);
        [hue_byte, saturation_byte, max]
    }

    /// `hsv2rgb` for one pixel.
    pub(super) fn hsv_to_rgb(hue: u8, saturation: u8, value: u8) -> [u8; 3] {
        if saturation == 0 {
            return [value; 3];
        }
        // i = floor((float)h * 6.0 / 255.0); f = (float)h * 6.0 / 255.0 - (float)i;
        let scaled_hue = f64::from(hue) * 6.0 / 255.0;
        let i = scaled_hue.floor() as i32;
        let f = (scaled_hue - f64::from(i)) as f32;
        let fs = (f64::from(saturation) / 255.0) as f32;
        let v = f64::from(value);
        // `fs * f` multiplies two floats; everything else is double.
        let p = clip8(round(v * (1.0 - f64::from(fs))));
        let q = clip8(round(v * (1.0 - f64::from(fs * f))));
        let t = clip8(round(v * (1.0 - f64::from(fs) * (1.0 - f64::from(f)))));
        match i % 6 {
            0 => [value, t, p],
            1 => [q, value, p],
            2 => [p, value, t],
            3 => [p, q, value],
            4 => [t, p, value],
            _ => [value, p, q],
        }
    }

    /// C's `round` (half away from zero) for non-negative values. `x - trunc(x)` is exact, so
    /// the comparison with 0.5 is too (unlike `x + 0.5`).
    fn round(x: f64) -> i32 {
        let whole = x as i32;
        whole + i32::from(x - f64::from(whole) >= 0.5)
    }

    fn clip8(value: i32) -> u8 {
        value.clamp(0, 255) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(data: &mut [u8]) -> RgbMut<'_> {
        RgbMut {
            width: (data.len() / 3) as u32,
            height: 1,
            data,
        }
    }

    fn sample_pixels() -> Vec<u8> {
        // A deterministic spread of colors, grays and extremes.
        let mut data = crate::ops::noise(3000, 0x2545_f491_4f6c_dd1d);
        data.extend_from_slice(&[0, 0, 0, 255, 255, 255, 128, 128, 128, 255, 0, 0, 1, 0, 0]);
        data
    }

    #[test]
    fn factor_one_is_identity() {
        let original = sample_pixels();
        type Op = fn(RgbMut<'_>, f32);
        let ops: [Op; 3] = [adjust_brightness, adjust_contrast, adjust_saturation];
        for op in ops {
            let mut data = original.clone();
            op(image(&mut data), 1.0);
            assert_eq!(data, original);
        }
    }

    #[test]
    fn factor_zero_gives_the_degenerate_image() {
        let original = sample_pixels();
        let mut data = original.clone();
        adjust_brightness(image(&mut data), 0.0);
        assert!(data.iter().all(|&v| v == 0));

        let mut data = original.clone();
        adjust_saturation(image(&mut data), 0.0);
        let mut gray = original.clone();
        to_grayscale(image(&mut gray));
        assert_eq!(data, gray);

        let mut data = original.clone();
        adjust_contrast(image(&mut data), 0.0);
        let first = data[0];
        assert!(data.iter().all(|&v| v == first));
    }

    #[test]
    fn blend_truncates_and_clips() {
        assert_eq!(blend(0, 100, 0.5), 50);
        assert_eq!(blend(0, 101, 0.5), 50);
        assert_eq!(blend(0, 200, 1.8), 255);
        assert_eq!(blend(200, 0, 1.8), 0);
        assert_eq!(blend(100, 50, 1.5), 25);
    }

    /// Brightness and contrast run as byte tables (looked up with VBMI where the CPU has it,
    /// composed when consecutive): every byte value, at every level, equals the blend itself.
    #[test]
    fn byte_tables_equal_the_blend_at_every_level() {
        // Each channel holds all 256 values, in a different order.
        let original: Vec<u8> = (0..=255u8)
            .flat_map(|v| [v, v.wrapping_mul(7).wrapping_add(3), 255 - v])
            .collect();
        let gray_mean = |data: &[u8]| {
            let sum: u64 = data
                .as_chunks::<3>()
                .0
                .iter()
                .map(|&[r, g, b]| u64::from(luma(r, g, b)))
                .sum();
            (sum as f64 / (data.len() / 3) as f64 + 0.5) as u8
        };
        for factor in [0.0f32, 0.2, 0.61, 0.999, 1.001, 1.37, 1.8, 2.0] {
            crate::ops::at_every_simd_level(|level| {
                let mut data = original.clone();
                adjust_brightness(image(&mut data), factor);
                let expected: Vec<u8> = original.iter().map(|&v| blend(0, v, factor)).collect();
                assert_eq!(data, expected, "brightness {factor} at {level:?}");

                let mut data = original.clone();
                adjust_contrast(image(&mut data), factor);
                let mean = gray_mean(&original);
                let expected: Vec<u8> = original.iter().map(|&v| blend(mean, v, factor)).collect();
                assert_eq!(data, expected, "contrast {factor} at {level:?}");

                // A contrast then a brightness share one pass and one composed table.
                let mut data = original.clone();
                apply(
                    image(&mut data),
                    &[ColorOp::Contrast(factor), ColorOp::Brightness(1.3)],
                );
                let expected: Vec<u8> = original
                    .iter()
                    .map(|&v| blend(0, blend(mean, v, factor), 1.3))
                    .collect();
                assert_eq!(data, expected, "contrast {factor}, brightness at {level:?}");
            });
        }
    }

    #[test]
    fn grayscale_is_idempotent_and_uses_pil_luma() {
        let mut data = sample_pixels();
        to_grayscale(image(&mut data));
        let once = data.clone();
        to_grayscale(image(&mut data));
        assert_eq!(data, once);
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
    }

    #[test]
    fn contrast_mean_rounds_half_up() {
        // Gray levels 0 and 1 in equal numbers: mean 0.5, rounded to 1.
        let mut data = vec![0, 0, 0, 1, 1, 1];
        adjust_contrast(image(&mut data), 0.0);
        assert_eq!(data, [1; 6]);
    }

    #[test]
    fn empty_and_single_pixel_images_do_not_panic() {
        for len in [0, 3] {
            let mut data = vec![200; len];
            adjust_brightness(image(&mut data), 1.5);
            adjust_contrast(image(&mut data), 0.3);
            adjust_saturation(image(&mut data), 1.8);
            adjust_hue(image(&mut data), -0.5);
            to_grayscale(image(&mut data));
        }
    }

    #[test]
    fn hue_of_gray_pixels_is_unchanged() {
        let mut data: Vec<u8> = (0..=255).flat_map(|v| [v, v, v]).collect();
        let original = data.clone();
        adjust_hue(image(&mut data), 0.3);
        assert_eq!(data, original);
    }

    /// The branch-free conversion against the transcription, for every RGB color.
    #[test]
    fn rgb_to_hsv_matches_pil_for_every_color() {
        for red in 0..=255u8 {
            for green in 0..=255u8 {
                for blue in 0..=255u8 {
                    let expected = reference::rgb_to_hsv(red, green, blue);
                    assert_eq!(
                        rgb_to_hsv(red, green, blue),
                        expected,
                        "rgb {red} {green} {blue}"
                    );
                }
            }
        }
    }

    /// The branch-free conversion (no special case for saturation 0, `floor(x + 0.5)` for
    /// `round`) against the transcription, for every HSV triple.
    #[test]
    fn hsv_to_rgb_matches_pil_for_every_hsv() {
        for hue in 0..=255u8 {
            for saturation in 0..=255u8 {
                for value in 0..=255u8 {
                    assert_eq!(
                        hsv_to_rgb(hue, saturation, value),
                        reference::hsv_to_rgb(hue, saturation, value),
                        "hsv {hue} {saturation} {value}"
                    );
                }
            }
        }
    }

    fn single(image: RgbMut<'_>, op: ColorOp) {
        match op {
            ColorOp::Brightness(f) => adjust_brightness(image, f),
            ColorOp::Contrast(f) => adjust_contrast(image, f),
            ColorOp::Saturation(f) => adjust_saturation(image, f),
            ColorOp::Hue(f) => adjust_hue(image, f),
            ColorOp::Grayscale => to_grayscale(image),
        }
    }

    fn color_op() -> impl Strategy<Value = ColorOp> {
        // Factor 1 is the skipped identity; keep it likely.
        let factor = prop_oneof![Just(1.0f32), 0.0f32..2.0];
        prop_oneof![
            factor.clone().prop_map(ColorOp::Brightness),
            factor.clone().prop_map(ColorOp::Contrast),
            factor.prop_map(ColorOp::Saturation),
            (-0.5f32..=0.5).prop_map(ColorOp::Hue),
            Just(ColorOp::Grayscale),
        ]
    }

    proptest! {
        /// Several operations in one call (fewer passes, contrasts measured on the fly) equal
        /// the same operations one call each, for any order, any number of contrasts and
        /// images that end in a partial block.
        #[test]
        fn applying_together_equals_one_at_a_time(
            ops in proptest::collection::vec(color_op(), 0..20),
            pixels in 0usize..300,
            seed: u64,
        ) {
            let original = crate::ops::noise(pixels * 3, seed);
            let mut together = original.clone();
            apply(image(&mut together), &ops);
            let mut one_at_a_time = original;
            for &op in &ops {
                single(image(&mut one_at_a_time), op);
            }
            prop_assert_eq!(together, one_at_a_time);
        }
    }

    /// `adjust_hue` at every SIMD level this CPU has, on an image of all 2^24 colors, against
    /// the transcription of PIL's round trip.
    #[test]
    fn hue_shift_matches_pil_for_every_color_at_every_level() {
        let colors: Vec<u8> = (0..1u32 << 24)
            .flat_map(|c| [(c >> 16) as u8, (c >> 8) as u8, c as u8])
            .collect();
        for hue_factor in [0.37f32, -0.5] {
            let shift = (f64::from(hue_factor) * 255.0) as i32 as u8;
            let expected: Vec<u8> = colors
                .as_chunks::<3>()
                .0
                .iter()
                .flat_map(|&[r, g, b]| {
                    let [h, s, v] = reference::rgb_to_hsv(r, g, b);
                    reference::hsv_to_rgb(h.wrapping_add(shift), s, v)
                })
                .collect();
            crate::ops::at_every_simd_level(|level| {
                let mut data = colors.clone();
                adjust_hue(image(&mut data), hue_factor);
                let first_wrong = data.iter().zip(&expected).position(|(a, b)| a != b);
                assert_eq!(first_wrong, None, "{level:?}, hue factor {hue_factor}");
            });
        }
    }

    #[test]
    fn pil_hsv_known_values() {
        // Computed with PIL 13: Image.new(mode, (1, 1), color).convert(other).getpixel((0, 0)).
        let to_hsv = [
            ([255, 0, 0], [0, 255, 255]),
            ([0, 255, 0], [85, 255, 255]),
            ([0, 0, 255], [170, 255, 255]),
            ([10, 200, 37], [91, 242, 200]),
            ([200, 37, 10], [6, 242, 200]),
            ([1, 0, 0], [0, 255, 1]),
            ([255, 254, 0], [42, 255, 255]),
            ([37, 10, 200], [176, 242, 200]),
            ([128, 127, 129], [191, 3, 129]),
        ];
        for ([r, g, b], hsv) in to_hsv {
            assert_eq!(reference::rgb_to_hsv(r, g, b), hsv, "rgb {r} {g} {b}");
        }
        let to_rgb = [
            ([0, 255, 255], [255, 0, 0]),
            ([43, 200, 100], [99, 100, 22]),
            ([255, 255, 255], [255, 0, 0]),
            ([128, 1, 77], [77, 77, 77]),
            ([200, 100, 250], [221, 152, 250]),
        ];
        for ([h, s, v], rgb) in to_rgb {
            assert_eq!(reference::hsv_to_rgb(h, s, v), rgb, "hsv {h} {s} {v}");
            assert_eq!(hsv_to_rgb(h, s, v), rgb, "hsv {h} {s} {v}");
        }
    }
}
