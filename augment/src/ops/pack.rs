//! Writing a finished view into its batch slot: raw bytes (`uint8` HWC) or torchvision's
//! `ToTensor` then `Normalize(mean, std)` (`float32` CHW).

use super::RgbRef;

/// Copies the view's interleaved RGB8 bytes (HWC) into `out`.
///
/// # Panics
///
/// When `out.len()` or the image buffer is not `width * height * 3`.
pub fn pack_u8_hwc(image: RgbRef<'_>, out: &mut [u8]) {
    let len = checked_len(image);
    assert_eq!(
        out.len(),
        len,
        "u8 slot of {} values for a {}x{} view",
        out.len(),
        image.width,
        image.height
    );
    out.copy_from_slice(image.data);
}

/// `Normalize(mean, std)(ToTensor()(img))` into `out`, as `3 * height * width` floats in channel
/// planes (CHW).
///
/// Each value is `(x / 255 - mean[c]) / std[c]` in `f32` with true divisions, the operations
/// torchvision performs (`img.float().div(255)`, then `sub_(mean).div_(std)`), so the result is
/// bit-identical to torchvision's tensor. A byte has 256 values, so each channel's 256 results
/// are computed once per call and the planes filled by lookup: measured faster than
/// vectorized divisions (which cost two per value), with the same bits.
///
/// # Panics
///
/// When `out.len()` or the image buffer does not match `width * height * 3`.
pub fn pack_f32_chw(image: RgbRef<'_>, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let len = checked_len(image);
    assert_eq!(
        out.len(),
        len,
        "f32 slot of {} values for a {}x{} view",
        out.len(),
        image.width,
        image.height
    );
    let plane = len / 3;
    if plane == 0 {
        return;
    }
    for (channel, out_plane) in out.chunks_exact_mut(plane).enumerate() {
        let (mean, std) = (mean[channel], std[channel]);
        // 256 possible inputs: normalize each once, then the plane is a table lookup.
        let table: [f32; 256] = std::array::from_fn(|value| (value as f32 / 255.0 - mean) / std);
        for (out_value, pixel) in out_plane.iter_mut().zip(image.data.chunks_exact(3)) {
            *out_value = table[usize::from(pixel[channel])];
        }
    }
}

fn checked_len(image: RgbRef<'_>) -> usize {
    let len = image.width as usize * image.height as usize * 3;
    assert_eq!(
        image.data.len(),
        len,
        "RGB8 buffer of the wrong length for {}x{}",
        image.width,
        image.height
    );
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.228, 0.224, 0.225];

    #[test]
    fn u8_is_a_copy() {
        let data: Vec<u8> = (0..2 * 3 * 3).collect();
        let mut out = vec![0; data.len()];
        pack_u8_hwc(
            RgbRef {
                width: 3,
                height: 2,
                data: &data,
            },
            &mut out,
        );
        assert_eq!(out, data);
    }

    #[test]
    fn f32_is_planar_and_normalized() {
        let data = [0, 128, 255, 10, 20, 30];
        let mut out = [0.0; 6];
        pack_f32_chw(
            RgbRef {
                width: 2,
                height: 1,
                data: &data,
            },
            MEAN,
            STD,
            &mut out,
        );
        for (channel, plane) in out.chunks_exact(2).enumerate() {
            for (pixel, &value) in plane.iter().enumerate() {
                let x = data[pixel * 3 + channel] as f32;
                assert_eq!(value, (x / 255.0 - MEAN[channel]) / STD[channel]);
            }
        }
        assert!((out[0] - (-0.485 / 0.228)).abs() < 1e-6);
    }

    #[test]
    fn empty_image_packs_nothing() {
        pack_f32_chw(
            RgbRef {
                width: 0,
                height: 5,
                data: &[],
            },
            MEAN,
            STD,
            &mut [],
        );
        pack_u8_hwc(
            RgbRef {
                width: 5,
                height: 0,
                data: &[],
            },
            &mut [],
        );
    }

    #[test]
    #[should_panic(expected = "f32 slot")]
    fn f32_length_is_checked() {
        pack_f32_chw(
            RgbRef {
                width: 1,
                height: 1,
                data: &[1, 2, 3],
            },
            MEAN,
            STD,
            &mut [0.0; 4],
        );
    }

    #[test]
    #[should_panic(expected = "u8 slot")]
    fn u8_length_is_checked() {
        pack_u8_hwc(
            RgbRef {
                width: 1,
                height: 1,
                data: &[1, 2, 3],
            },
            &mut [0; 2],
        );
    }
}
