//! DCT perceptual hash, the variant the Python `imagehash.phash` computes: shrink to 32x32 gray,
//! 2-D DCT-II, keep the 8x8 lowest frequencies (DC included), set a bit where a coefficient is
//! above their median. Bit 63 is coefficient (0, 0), then row-major, so the hash printed as
//! 16 hex digits reads like imagehash's.

use std::sync::OnceLock;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

const SIDE: usize = 32;
const KEPT: usize = 8;

/// The DCT-II basis cos(pi (2x + 1) u / 64) for u < 8, x < 32: only 8 output frequencies are
/// needed, so the transform is two small matrix products instead of a full 32x32 DCT.
fn basis() -> &'static [[f64; SIDE]; KEPT] {
    static BASIS: OnceLock<[[f64; SIDE]; KEPT]> = OnceLock::new();
    BASIS.get_or_init(|| {
        let mut basis = [[0.0; SIDE]; KEPT];
        for (frequency, row) in basis.iter_mut().enumerate() {
            for (x, value) in row.iter_mut().enumerate() {
                let angle = std::f64::consts::PI * (2 * x + 1) as f64 * frequency as f64;
                *value = (angle / (2 * SIDE) as f64).cos();
            }
        }
        basis
    })
}

/// Hashes a tightly packed 8-bit RGB image. Images of any size (at least 1x1) are shrunk with
/// an antialiasing filter to 32x32, ignoring aspect ratio, as imagehash does.
pub(crate) fn phash_rgb(rgb: &[u8], width: u32, height: u32) -> u64 {
    let Ok(source) = fast_image_resize::images::ImageRef::new(width, height, rgb, PixelType::U8x3)
    else {
        return 0;
    };
    let mut small = Image::new(SIDE as u32, SIDE as u32, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    if Resizer::new()
        .resize(&source, &mut small, &options)
        .is_err()
    {
        return 0;
    }
    // ITU-R 601 luma, as Pillow's "L" conversion.
    let gray: Vec<f64> = small
        .buffer()
        .chunks_exact(3)
        .map(|p| {
            (299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2])) as f64 / 1000.0
        })
        .collect();
    let basis = basis();
    // Rows first: for each of the 32 rows, its 8 lowest horizontal frequencies.
    let mut row_frequencies = [[0.0f64; KEPT]; SIDE];
    for (y, frequencies) in row_frequencies.iter_mut().enumerate() {
        let row = &gray[y * SIDE..(y + 1) * SIDE];
        for (u, frequency) in frequencies.iter_mut().enumerate() {
            *frequency = row.iter().zip(&basis[u]).map(|(g, b)| g * b).sum();
        }
    }
    let mut low = [0.0f64; KEPT * KEPT];
    for v in 0..KEPT {
        for u in 0..KEPT {
            low[v * KEPT + u] = (0..SIDE).map(|y| row_frequencies[y][u] * basis[v][y]).sum();
        }
    }
    // DCT scaling factors are positive per coefficient pair and imagehash's median compares
    // scaled values, so use orthonormal scaling to match it exactly.
    let scale = |frequency: usize| {
        if frequency == 0 {
            (1.0 / SIDE as f64).sqrt()
        } else {
            (2.0 / SIDE as f64).sqrt()
        }
    };
    for v in 0..KEPT {
        for u in 0..KEPT {
            low[v * KEPT + u] *= scale(u) * scale(v);
        }
    }
    let mut sorted = low;
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[KEPT * KEPT / 2 - 1] + sorted[KEPT * KEPT / 2]) / 2.0;
    low.iter().fold(0u64, |hash, &coefficient| {
        (hash << 1) | u64::from(coefficient > median)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth pattern defined on normalized coordinates, so every size shows the same picture.
    fn pattern(width: u32, height: u32, mirrored: bool) -> Vec<u8> {
        let mut rgb = Vec::new();
        for y in 0..height {
            for x in 0..width {
                let mut u = f64::from(x) / f64::from(width);
                if mirrored {
                    u = 1.0 - u;
                }
                let v = f64::from(y) / f64::from(height);
                let value =
                    128.0 + 90.0 * (7.0 * u).sin() * (5.0 * v).cos() + 30.0 * (13.0 * u * v).sin();
                rgb.extend_from_slice(&[value as u8, (value * 0.8) as u8, 255 - value as u8]);
            }
        }
        rgb
    }

    #[test]
    fn resized_copies_hash_alike_and_different_images_do_not() {
        let large = phash_rgb(&pattern(640, 480, false), 640, 480);
        let small = phash_rgb(&pattern(160, 120, false), 160, 120);
        let mirrored = phash_rgb(&pattern(640, 480, true), 640, 480);
        assert!(
            (large ^ small).count_ones() <= 4,
            "{large:016x} vs {small:016x}"
        );
        assert!(
            (large ^ mirrored).count_ones() >= 16,
            "{large:016x} vs {mirrored:016x}"
        );
    }

    #[test]
    fn tiny_and_bad_inputs_do_not_panic() {
        let _ = phash_rgb(&[1, 2, 3], 1, 1);
        assert_eq!(phash_rgb(&[1, 2], 1, 1), 0);
    }
}
