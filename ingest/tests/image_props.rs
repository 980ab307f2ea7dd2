//! Property tests of `process_image` on synthetic images: the size invariant, and no panic on
//! random bytes or on mutations of a valid JPEG.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, RgbImage};
use ingest::image::{ImageConfig, process_image};
use proptest::prelude::*;

fn synthetic(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let noise = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed) >> 24;
        image::Rgb([(x * 7) as u8, (y * 3) as u8, noise as u8])
    })
}

fn encode(image: RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    DynamicImage::ImageRgb8(image)
        .write_to(&mut Cursor::new(&mut bytes), format)
        .expect("encodes");
    bytes
}

fn valid_jpeg() -> Vec<u8> {
    encode(synthetic(160, 120, 7), ImageFormat::Jpeg)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn short_side_is_capped_and_aspect_kept(
        width in 1u32..1400,
        height in 1u32..1400,
        seed in any::<u32>(),
        format in prop::sample::select(vec![ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Bmp]),
        max_short_side in 96u32..600,
    ) {
        let config = ImageConfig { max_short_side, ..ImageConfig::default() };
        let bytes = encode(synthetic(width, height, seed), format);
        match process_image(&bytes, &config) {
            Err(rejection) => {
                prop_assert_eq!(rejection.reason(), "too_small");
                prop_assert!(width.min(height) < config.min_side);
            }
            Ok(processed) => {
                let short = width.min(height);
                let expected_short = short.min(max_short_side);
                prop_assert_eq!(processed.width.min(processed.height), expected_short);
                let expected_long = f64::from(width.max(height)) * f64::from(expected_short) / f64::from(short);
                prop_assert!((f64::from(processed.width.max(processed.height)) - expected_long).abs() <= 1.0);
                // The orientation is kept, though two sides that differ by less than the
                // scale factor may round to one length (941x942 capped at 96 is 96x96).
                prop_assert!(processed.width.cmp(&processed.height) == width.cmp(&height)
                    || processed.width == processed.height);
                prop_assert_eq!((processed.original_width, processed.original_height), (width, height));
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(
        magic in prop::sample::select(vec![
            &b"\xFF\xD8\xFF"[..], b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM", b"II*\0", b"MM\0*", b"",
        ]),
        tail in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let mut bytes = magic.to_vec();
        bytes.extend_from_slice(&tail);
        if let Err(rejection) = process_image(&bytes, &ImageConfig::default()) {
            prop_assert_ne!(rejection.reason(), "decoder_panic", "{}", rejection);
        }
    }

    #[test]
    fn mutated_jpegs_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = valid_jpeg();
        for (index, value) in flips {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let config = ImageConfig { min_side: 1, ..ImageConfig::default() };
        match process_image(&bytes, &config) {
            Ok(processed) => prop_assert!(processed.width.min(processed.height) <= config.max_short_side),
            Err(rejection) => prop_assert_ne!(rejection.reason(), "decoder_panic", "{}", rejection),
        }
    }
}
