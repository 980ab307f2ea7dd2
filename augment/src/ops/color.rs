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
//! `hsv2rgb`), whose `float`/`double` mix and truncations this module reproduces bit for bit,
//! shifts the `u8` hue with wraparound as torchvision does, and converts back. Even a zero shift
//! changes pixels, because PIL's HSV round trip is lossy; so does this module.
//!
//! Factors are `f32`: torchvision's `ColorJitter` samples them in `float32` and PIL narrows the
//! blend factor to `float`, so an `f32` carries exactly the value PIL computes with.

use std::sync::LazyLock;

use super::RgbMut;

/// `ImageEnhance.Brightness(img).enhance(factor)`: blends with black.
pub fn adjust_brightness(image: RgbMut<'_>, factor: f32) {
    if factor == 1.0 {
        return;
    }
    let table: [u8; 256] = std::array::from_fn(|value| blend(0, value as u8, factor));
    apply_table(image.data, &table);
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blends with a uniform gray at the mean gray
/// level, rounded half up to an integer as Pillow 13's `ImageEnhance.Contrast` does.
pub fn adjust_contrast(image: RgbMut<'_>, factor: f32) {
    if factor == 1.0 || image.data.is_empty() {
        return;
    }
    let mean = mean_gray_level(image.data);
    let table: [u8; 256] = std::array::from_fn(|value| blend(mean, value as u8, factor));
    apply_table(image.data, &table);
}

/// `ImageEnhance.Color(img).enhance(factor)` (torchvision's `adjust_saturation`): blends each
/// pixel with its own gray level.
pub fn adjust_saturation(image: RgbMut<'_>, factor: f32) {
    if factor == 1.0 {
        return;
    }
    for pixel in image.data.chunks_exact_mut(3) {
        let gray = luma(pixel[0], pixel[1], pixel[2]);
        for value in pixel {
            *value = blend(gray, *value, factor);
        }
    }
}

/// torchvision's `F.adjust_hue` on a PIL image: RGB to PIL's HSV, hue plus
/// `(int)(hue_factor * 255)` modulo 256, back to RGB.
///
/// `hue_factor` is meant to be in `[-0.5, 0.5]` (torchvision rejects anything else); other
/// values wrap around like torchvision's `uint8` arithmetic would.
pub fn adjust_hue(image: RgbMut<'_>, hue_factor: f32) {
    // np.int32(hue_factor * 255) truncates toward zero; .astype(np.uint8) wraps.
    let shift = (f64::from(hue_factor) * 255.0) as i32 as u8;
    let tables = &*HSV_TABLES;
    for pixel in image.data.chunks_exact_mut(3) {
        let [red, green, blue] = [pixel[0], pixel[1], pixel[2]];
        let max = red.max(green).max(blue);
        let min = red.min(green).min(blue);
        if max == min {
            // Hue and saturation 0: HSV to RGB gives (v, v, v), the pixel itself.
            continue;
        }
        let (hue, saturation) = tables.hue_saturation(red, green, blue, max, min);
        let rgb = tables.hsv_to_rgb(hue.wrapping_add(shift), saturation, max);
        pixel.copy_from_slice(&rgb);
    }
}

/// `F.rgb_to_grayscale(img, num_output_channels=3)`: PIL's `convert("L")` copied to all three
/// channels.
pub fn to_grayscale(image: RgbMut<'_>) {
    for pixel in image.data.chunks_exact_mut(3) {
        let gray = luma(pixel[0], pixel[1], pixel[2]);
        pixel.fill(gray);
    }
}

/// PIL's RGB to L conversion (`L24` in `Convert.c`).
#[inline(always)]
fn luma(red: u8, green: u8, blue: u8) -> u8 {
    let weighted = u32::from(red) * 19595 + u32::from(green) * 38470 + u32::from(blue) * 7471;
    ((weighted + 0x8000) >> 16) as u8
}

/// One value of `ImagingBlend`. The sum is `float` arithmetic, as in C; `as u8` truncates
/// toward zero and saturates, which is both the plain cast of the interpolating branch and the
/// clipping of the extrapolating one.
#[inline(always)]
fn blend(degenerate: u8, value: u8, factor: f32) -> u8 {
    let difference = (i32::from(value) - i32::from(degenerate)) as f32;
    (f32::from(degenerate) + factor * difference) as u8
}

fn apply_table(data: &mut [u8], table: &[u8; 256]) {
    for value in data {
        *value = table[usize::from(*value)];
    }
}

/// `int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)`: the exact integer sum over the
/// histogram divided in `double` (Python's true division of ints is correctly rounded, as is
/// the division of two exactly represented doubles).
fn mean_gray_level(data: &[u8]) -> u8 {
    let sum: u64 = data
        .chunks_exact(3)
        .map(|p| u64::from(luma(p[0], p[1], p[2])))
        .sum();
    let count = (data.len() / 3) as f64;
    (sum as f64 / count + 0.5) as u8
}

/// Tables that make PIL's HSV conversions cheap per pixel while giving the same bytes.
///
/// RGB to HSV: the hue PIL computes depends only on which channel is the maximum and which the
/// minimum (six cases, ties resolved as PIL's `if` chain does), the chroma `max - min` and the
/// distance `max - mid`; the saturation only on `max` and the chroma. Both are tabulated from
/// the exact scalar conversion. HSV to RGB: the sector and fractional part of each hue byte and
/// the scaled saturation of each saturation byte are tabulated; the remaining products are
/// computed in the same `double` steps as in C.
struct HsvTables {
    /// Hue byte, indexed by `case << 16 | chroma << 8 | (max - mid)`.
    hue: Box<[u8]>,
    /// Saturation byte, indexed by `max << 8 | chroma`.
    saturation: Box<[u8]>,
    /// `i % 6` for each hue byte, where `i = floor(h * 6 / 255)`.
    sector: [u8; 256],
    /// The fractional part `f` (a C `float`) for each hue byte.
    fraction: [f32; 256],
    /// `fs = s / 255.0` (a C `float`) for each saturation byte.
    scaled_saturation: [f32; 256],
}

static HSV_TABLES: LazyLock<HsvTables> = LazyLock::new(HsvTables::build);

impl HsvTables {
    fn build() -> Self {
        let mut hue = vec![0u8; 6 << 16].into_boxed_slice();
        for chroma in 1..=255u8 {
            for distance in 0..=chroma {
                // Any representative works: PIL's hue depends on differences from the max.
                let max = 255u8;
                let mid = max - distance;
                let min = max - chroma;
                let representatives = [
                    [max, min, mid], // red max, green min
                    [max, mid, min], // red max, blue min
                    [min, max, mid], // green max, red min
                    [mid, max, min], // green max, blue min
                    [mid, min, max], // blue max, green min
                    [min, mid, max], // blue max, red min
                ];
                for (case, [red, green, blue]) in representatives.into_iter().enumerate() {
                    let index = case << 16 | usize::from(chroma) << 8 | usize::from(distance);
                    hue[index] = reference::rgb_to_hsv(red, green, blue)[0];
                }
            }
        }
        let mut saturation = vec![0u8; 1 << 16].into_boxed_slice();
        for max in 1..=255u8 {
            for chroma in 1..=max {
                // A pixel with this max and chroma (hue does not matter for saturation).
                let index = usize::from(max) << 8 | usize::from(chroma);
                saturation[index] = reference::rgb_to_hsv(max, max - chroma, max)[1];
            }
        }
        Self {
            hue,
            saturation,
            sector: std::array::from_fn(|h| reference::hue_sector(h as u8).0),
            fraction: std::array::from_fn(|h| reference::hue_sector(h as u8).1),
            scaled_saturation: std::array::from_fn(|s| reference::scaled_saturation(s as u8)),
        }
    }

    /// PIL's hue and saturation bytes of a pixel with chroma (`max > min`).
    #[inline(always)]
    fn hue_saturation(&self, red: u8, green: u8, blue: u8, max: u8, min: u8) -> (u8, u8) {
        let chroma = max - min;
        // The middle value: the sum minus the extremes (at most 3 * 255, fits u16).
        let mid = (u16::from(red) + u16::from(green) + u16::from(blue)
            - u16::from(max)
            - u16::from(min)) as u8;
        let case = if red == max {
            if green == min { 0 } else { 1 }
        } else if green == max {
            if red == min { 2 } else { 3 }
        } else if green == min {
            4
        } else {
            5
        };
        let index = case << 16 | usize::from(chroma) << 8 | usize::from(max - mid);
        let hue = self.hue[index];
        let saturation = self.saturation[usize::from(max) << 8 | usize::from(chroma)];
        (hue, saturation)
    }

    /// PIL's `hsv2rgb` for one pixel.
    #[inline(always)]
    fn hsv_to_rgb(&self, hue: u8, saturation: u8, value: u8) -> [u8; 3] {
        if saturation == 0 {
            return [value; 3];
        }
        let fraction = self.fraction[usize::from(hue)];
        let scaled = self.scaled_saturation[usize::from(saturation)];
        let [p, q, t] = reference::pqt(value, scaled, fraction);
        reference::arrange(self.sector[usize::from(hue)], value, p, q, t)
    }
}

/// PIL's HSV conversions written out scalar, step by step in C's types: the definition the
/// tables are built from and tested against.
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
    #[cfg(test)]
    pub(super) fn hsv_to_rgb(hue: u8, saturation: u8, value: u8) -> [u8; 3] {
        if saturation == 0 {
            return [value; 3];
        }
        let (sector, fraction) = hue_sector(hue);
        let [p, q, t] = pqt(value, scaled_saturation(saturation), fraction);
        arrange(sector, value, p, q, t)
    }

    /// `i % 6` and `f` of `hsv2rgb`: `i = floor(h * 6.0 / 255.0)` and `f = h * 6.0 / 255.0 - i`
    /// in double, `f` stored as float.
    pub(super) fn hue_sector(hue: u8) -> (u8, f32) {
        let scaled = f64::from(hue) * 6.0 / 255.0;
        let sector = scaled.floor();
        let fraction = (scaled - sector) as f32;
        ((sector as u8) % 6, fraction)
    }

    /// `fs = s / 255.0` in double, stored as float.
    pub(super) fn scaled_saturation(saturation: u8) -> f32 {
        (f64::from(saturation) / 255.0) as f32
    }

    /// `p`, `q` and `t` of `hsv2rgb`. `fs * f` is a float product; everything else is double.
    #[inline(always)]
    pub(super) fn pqt(value: u8, scaled: f32, fraction: f32) -> [u8; 3] {
        let value = f64::from(value);
        let p = value * (1.0 - f64::from(scaled));
        let q = value * (1.0 - f64::from(scaled * fraction));
        let t = value * (1.0 - f64::from(scaled) * (1.0 - f64::from(fraction)));
        [round(p), round(q), round(t)]
    }

    /// C's `round` (half away from zero) for the non-negative values of `pqt`, clipped to a
    /// byte. `x - trunc(x)` is exact, so the comparison with 0.5 is too (unlike `x + 0.5`).
    #[inline(always)]
    fn round(x: f64) -> u8 {
        let whole = x as i32;
        let rounded = whole + i32::from(x - f64::from(whole) >= 0.5);
        clip8(rounded)
    }

    /// The channel order of `hsv2rgb`'s `switch (i % 6)`.
    #[inline(always)]
    pub(super) fn arrange(sector: u8, v: u8, p: u8, q: u8, t: u8) -> [u8; 3] {
        match sector {
            0 => [v, t, p],
            1 => [q, v, p],
            2 => [p, v, t],
            3 => [p, q, v],
            4 => [t, p, v],
            _ => [v, p, q],
        }
    }

    fn clip8(value: i32) -> u8 {
        value.clamp(0, 255) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(data: &mut [u8]) -> RgbMut<'_> {
        RgbMut {
            width: (data.len() / 3) as u32,
            height: 1,
            data,
        }
    }

    fn sample_pixels() -> Vec<u8> {
        // A deterministic spread of colors, grays and extremes.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut data: Vec<u8> = (0..3000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
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
        assert_eq!(mean_gray_level(&data), 1);
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

    /// The tables against the scalar conversion, for every RGB color.
    #[test]
    fn rgb_to_hsv_tables_match_every_color() {
        let tables = &*HSV_TABLES;
        for red in 0..=255u8 {
            for green in 0..=255u8 {
                for blue in 0..=255u8 {
                    let max = red.max(green).max(blue);
                    let min = red.min(green).min(blue);
                    if max == min {
                        continue;
                    }
                    let expected = reference::rgb_to_hsv(red, green, blue);
                    let (hue, saturation) = tables.hue_saturation(red, green, blue, max, min);
                    assert_eq!([hue, saturation], expected[..2], "rgb {red} {green} {blue}");
                }
            }
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
        let tables = &*HSV_TABLES;
        for ([h, s, v], rgb) in to_rgb {
            assert_eq!(reference::hsv_to_rgb(h, s, v), rgb, "hsv {h} {s} {v}");
            assert_eq!(tables.hsv_to_rgb(h, s, v), rgb, "hsv {h} {s} {v}");
        }
    }
}
