//! How fast a JPEG decoder alone goes on one core, for the ingest benchmark's ceiling: every
//! JPEG of a folder is loaded into memory, then decoded at full size, one image at a time, by
//! each of these paths in turn (the order rotates from image to image, so that a drift of the
//! machine's speed reaches them alike):
//!
//! - `turbo-rgb`: libjpeg-turbo to RGB with its default (fancy) chroma upsampling, what ingest
//!   does;
//! - `turbo-rgb-fast`: the same with libjpeg-turbo's fast upsampling;
//! - `turbo-yuv`: libjpeg-turbo to its YUV planes, which skips chroma upsampling and color
//!   conversion: the least work that yields pixels;
//! - `zune`: zune-jpeg, the `image` crate's JPEG decoder, to RGB.
//!
//! ```text
//! cargo run --release -p ingest --example decoders -- ~/.cache/seer-rs/bench-0.5-2mp [--rounds 3]
//! ```
//!
//! Prints, per path, the images/s of each round and their median and range. Files that are not
//! JPEGs, or that a path fails to decode, are counted and left out of every path's figures.

use std::path::Path;
use std::time::{Duration, Instant};

use turbojpeg::{Decompressor, Image, PixelFormat, YuvImage};

mod common;
use common::median_and_range;

const PATHS: [&str; 4] = ["turbo-rgb", "turbo-rgb-fast", "turbo-yuv", "zune"];

struct Decoders {
    turbo: Decompressor,
    rgb: Vec<u8>,
    yuv: Vec<u8>,
}

impl Decoders {
    /// Decodes `jpeg` through path `path` of [`PATHS`].
    fn decode(&mut self, path: usize, jpeg: &[u8]) -> Result<(), String> {
        let header = self.turbo.read_header(jpeg).map_err(|e| e.to_string())?;
        let (width, height) = (header.width, header.height);
        match PATHS[path] {
            "turbo-rgb" | "turbo-rgb-fast" => {
                self.turbo
                    .set_fast_upsample(PATHS[path] == "turbo-rgb-fast")
                    .map_err(|e| e.to_string())?;
                self.rgb.resize(width * height * 3, 0);
                let image = Image {
                    pixels: &mut self.rgb[..],
                    width,
                    pitch: width * 3,
                    height,
                    format: PixelFormat::RGB,
                };
                self.turbo
                    .decompress(jpeg, image)
                    .map_err(|e| e.to_string())
            }
            "turbo-yuv" => {
                let length = turbojpeg::yuv_pixels_len(width, 1, height, header.subsamp)
                    .map_err(|e| e.to_string())?;
                self.yuv.resize(length, 0);
                let image = YuvImage {
                    pixels: &mut self.yuv[..],
                    width,
                    align: 1,
                    height,
                    subsamp: header.subsamp,
                };
                self.turbo
                    .decompress_to_yuv(jpeg, image)
                    .map_err(|e| e.to_string())
            }
            _ => image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const USAGE: &str = "usage: decoders FOLDER [--rounds N]";
    let mut arguments = std::env::args().skip(1);
    let folder = arguments.next().ok_or(USAGE)?;
    let mut rounds = 3usize;
    while let Some(flag) = arguments.next() {
        match flag.as_str() {
            "--rounds" => rounds = arguments.next().ok_or(USAGE)?.parse::<usize>()?.max(1),
            _ => return Err(USAGE.into()),
        }
    }
    let mut paths: Vec<_> = std::fs::read_dir(Path::new(&folder))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    let mut decoders = Decoders {
        turbo: Decompressor::new()?,
        rgb: Vec::new(),
        yuv: Vec::new(),
    };
    // Keep the files every path decodes, so that each path's figure covers the same images.
    let mut images = Vec::new();
    let mut left_out = 0;
    for path in paths {
        let bytes = std::fs::read(&path)?;
        if (0..PATHS.len()).all(|p| decoders.decode(p, &bytes).is_ok()) {
            images.push(bytes);
        } else {
            left_out += 1;
        }
    }
    if images.is_empty() {
        return Err(format!("no JPEG in {folder} that every path decodes").into());
    }
    let bytes: usize = images.iter().map(Vec::len).sum();
    println!(
        "{} JPEGs, {:.1} MB, from {folder} ({left_out} files left out); {rounds} rounds",
        images.len(),
        bytes as f64 / 1e6
    );

    let mut rates = vec![Vec::new(); PATHS.len()];
    for round in 0..rounds {
        let mut spent = [Duration::ZERO; PATHS.len()];
        for (i, jpeg) in images.iter().enumerate() {
            for k in 0..PATHS.len() {
                let path = (i + k) % PATHS.len();
                let started = Instant::now();
                decoders.decode(path, jpeg)?;
                spent[path] += started.elapsed();
            }
        }
        let line: Vec<String> = PATHS
            .iter()
            .zip(&spent)
            .zip(&mut rates)
            .map(|((name, time), rates)| {
                let rate = images.len() as f64 / time.as_secs_f64();
                rates.push(rate);
                format!("{name} {rate:.1}")
            })
            .collect();
        println!("round {round}: images/s {}", line.join(", "));
    }
    for (name, rates) in PATHS.iter().zip(&rates) {
        let (median, low, high) = median_and_range(rates);
        println!(
            "{name:>15}: {median:.1} ({low:.1}-{high:.1}) images/s, {:.2} ms/image",
            1e3 / median
        );
    }
    Ok(())
}
