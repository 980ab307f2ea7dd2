//! What rewriting progressive JPEGs as sequential ones (as `ingest` does with the progressive
//! JPEGs it keeps) buys at decode time: every progressive JPEG under a folder is loaded, rewritten
//! with [`ingest::image::progressive_to_sequential`], checked to decode to the same pixels (a
//! file whose rewrite does not, which `ingest` keeps progressive, is named and left out), then
//! both versions are decoded at full size by libjpeg-turbo to RGB (what `augment` and Pillow
//! do), one image at a time, alternating which version goes first from image to image.
//!
//! ```text
//! cargo run --release -p ingest --example progressive -- ~/.cache/seer-rs/photos [--rounds 5]
//! ```
//!
//! Prints the files' sizes, then per round the decode time per image of each version and their
//! ratio, then the median and range over the rounds.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use turbojpeg::{Decompressor, Image, PixelFormat};

mod common;
use common::median_and_range;
use seer_tests::files_under;

fn decode(turbo: &mut Decompressor, jpeg: &[u8], rgb: &mut Vec<u8>) -> Result<(), String> {
    let header = turbo.read_header(jpeg).map_err(|e| e.to_string())?;
    rgb.resize(header.width * header.height * 3, 0);
    let image = Image {
        pixels: &mut rgb[..],
        width: header.width,
        pitch: header.width * 3,
        height: header.height,
        format: PixelFormat::RGB,
    };
    turbo.decompress(jpeg, image).map_err(|e| e.to_string())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const USAGE: &str = "usage: progressive FOLDER [--rounds N]";
    let mut arguments = std::env::args().skip(1);
    let folder = PathBuf::from(arguments.next().ok_or(USAGE)?);
    let mut rounds = 5usize;
    while let Some(flag) = arguments.next() {
        match flag.as_str() {
            "--rounds" => rounds = arguments.next().ok_or(USAGE)?.parse::<usize>()?.max(1),
            _ => return Err(USAGE.into()),
        }
    }
    let mut turbo = Decompressor::new()?;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut pairs = Vec::new();
    let mut pixels = 0usize;
    for path in files_under(&folder)? {
        let bytes = std::fs::read(&path)?;
        if ingest::image::jpeg_frame_marker(&bytes) != Some(0xC2)
            || decode(&mut turbo, &bytes, &mut first).is_err()
        {
            continue;
        }
        let sequential = ingest::image::progressive_to_sequential(&bytes)
            .ok_or_else(|| format!("{}: libjpeg-turbo refused to rewrite it", path.display()))?;
        decode(&mut turbo, &sequential, &mut second)?;
        if first != second {
            // Incomplete progressive scans, which libjpeg-turbo smooths: `ingest` keeps such a
            // file progressive.
            println!(
                "{}: the rewrite decodes to other pixels; left out",
                path.display()
            );
            continue;
        }
        pixels += first.len() / 3;
        pairs.push((bytes, sequential));
    }
    if pairs.is_empty() {
        return Err(format!("no progressive JPEG under {}", folder.display()).into());
    }
    let size = |pick: fn(&(Vec<u8>, Vec<u8>)) -> usize| pairs.iter().map(pick).sum::<usize>();
    let (progressive_bytes, sequential_bytes) = (size(|p| p.0.len()), size(|p| p.1.len()));
    println!(
        "{} progressive JPEGs under {} ({:.2} MP on average), each rewritten as sequential \
         with the same pixels; {:.2} MB progressive, {:.2} MB sequential ({:+.1} %); {rounds} rounds",
        pairs.len(),
        folder.display(),
        pixels as f64 / pairs.len() as f64 / 1e6,
        progressive_bytes as f64 / 1e6,
        sequential_bytes as f64 / 1e6,
        (sequential_bytes as f64 / progressive_bytes as f64 - 1.0) * 100.0
    );
    let mut ratios = Vec::new();
    let mut per_image = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let mut spent = [Duration::ZERO; 2];
        for (i, (progressive, sequential)) in pairs.iter().enumerate() {
            let versions = [progressive, sequential];
            for k in 0..2 {
                let which = (i + k) % 2;
                let started = Instant::now();
                decode(&mut turbo, versions[which], &mut first)?;
                spent[which] += started.elapsed();
            }
        }
        let ms = spent.map(|time| time.as_secs_f64() * 1e3 / pairs.len() as f64);
        let ratio = ms[0] / ms[1];
        println!(
            "round {round}: ms/image progressive {:.3}, sequential {:.3}, ratio {ratio:.2}",
            ms[0], ms[1]
        );
        ratios.push(ratio);
        per_image[0].push(ms[0]);
        per_image[1].push(ms[1]);
    }
    for (name, values) in ["progressive", "sequential"].iter().zip(&per_image) {
        let (median, low, high) = median_and_range(values);
        println!("{name:>12}: {median:.3} ({low:.3}-{high:.3}) ms/image");
    }
    let (median, low, high) = median_and_range(&ratios);
    println!("progressive / sequential decode time: {median:.2} ({low:.2}-{high:.2})");
    Ok(())
}
