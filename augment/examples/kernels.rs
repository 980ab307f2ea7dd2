//! Times each pixel kernel of the recipe on crops of a real photo, one after the other in one
//! run (ns per output pixel, fastest of the rounds): the split behind `augment bench`'s stages.
//!
//! `cargo run --release -p augment --example kernels -- PHOTO.jpg [ROUNDS] [resize]` (`resize`:
//! time only the resizes, to profile them alone with `perf record`)

use augment::ops::{
    CropBox, RgbMut, RgbRef, blur::GaussianBlur, color, color::ColorOp, resize::CropResizer,
};
use std::time::Instant;

/// The fastest round: on a shared machine the other rounds measure the neighbours too.
fn fastest(values: Vec<f64>) -> f64 {
    values.into_iter().fold(f64::INFINITY, f64::min)
}

fn time(rounds: usize, pixels: usize, mut f: impl FnMut()) -> f64 {
    let reps = 200;
    let samples = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            start.elapsed().as_nanos() as f64 / (reps * pixels) as f64
        })
        .collect();
    fastest(samples)
}

fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .context("usage: kernels PHOTO.jpg [ROUNDS] [resize]")?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let rounds = match args.get(2) {
        None => 9,
        Some(rounds) => rounds
            .parse()
            .ok()
            .filter(|&rounds| rounds > 0)
            .with_context(|| format!("ROUNDS {rounds:?} is not a positive whole number"))?,
    };
    let mut decoder = shards::decode::Decoder::new(1 << 26);
    let image = decoder
        .decode(&bytes)
        .with_context(|| format!("decoding {path}"))?;
    anyhow::ensure!(
        image.width.min(image.height) >= 224,
        "{path} is {}x{}: the kernels need a shorter side of at least 224 pixels",
        image.width,
        image.height
    );
    let (w, h) = (image.width, image.height);
    let src: Vec<u8> = image.data.to_vec();
    let src = RgbRef {
        width: w,
        height: h,
        data: &src,
    };
    let side = w.min(h) * 3 / 4;
    let crop = CropBox {
        top: 0,
        left: 0,
        height: side,
        width: side,
    };
    let mut resizer = CropResizer::new();
    let mut out = vec![0u8; 224 * 224 * 3];
    let px = 224 * 224;
    let t = time(rounds, px, || {
        resizer.resized_crop(
            src,
            crop,
            RgbMut {
                width: 224,
                height: 224,
                data: &mut out,
            },
        )
    });
    println!("resize {side}x{side} -> 224: {t:.2} ns/px");
    let small = CropBox {
        top: 10,
        left: 10,
        height: 160,
        width: 160,
    };
    let mut out96 = vec![0u8; 96 * 96 * 3];
    let t = time(rounds, 96 * 96, || {
        resizer.resized_crop(
            src,
            small,
            RgbMut {
                width: 96,
                height: 96,
                data: &mut out96,
            },
        )
    });
    println!("resize 160x160 -> 96: {t:.2} ns/px");
    if args.get(3).is_some_and(|only| only == "resize") {
        return Ok(());
    }
    let base = out.clone();
    let mut work = base.clone();
    let cases: [(&str, Vec<ColorOp>); 7] = [
        ("brightness", vec![ColorOp::Brightness(1.3)]),
        ("contrast", vec![ColorOp::Contrast(0.7)]),
        ("saturation", vec![ColorOp::Saturation(1.4)]),
        ("hue", vec![ColorOp::Hue(0.1)]),
        ("grayscale", vec![ColorOp::Grayscale]),
        (
            "b,s,h chain",
            vec![
                ColorOp::Brightness(1.3),
                ColorOp::Saturation(1.4),
                ColorOp::Hue(0.1),
            ],
        ),
        (
            "b,c,s,h chain",
            vec![
                ColorOp::Brightness(1.3),
                ColorOp::Contrast(0.7),
                ColorOp::Saturation(1.4),
                ColorOp::Hue(0.1),
            ],
        ),
    ];
    for (name, ops) in cases {
        let t = time(rounds, px, || {
            work.copy_from_slice(&base);
            color::apply(
                RgbMut {
                    width: 224,
                    height: 224,
                    data: &mut work,
                },
                &ops,
            );
        });
        println!("{name}: {t:.2} ns/px (copy included)");
    }
    let t = time(rounds, px, || work.copy_from_slice(&base));
    println!("copy alone: {t:.2} ns/px");
    let mut blur = GaussianBlur::new();
    for sigma in [0.5f32, 1.0, 1.9] {
        let t = time(rounds, px, || {
            work.copy_from_slice(&base);
            blur.apply(
                RgbMut {
                    width: 224,
                    height: 224,
                    data: &mut work,
                },
                sigma,
            );
        });
        println!("blur sigma {sigma}: {t:.2} ns/px (copy included)");
    }
    Ok(())
}
