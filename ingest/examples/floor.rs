//! The single-thread floor of ingest's per-image work, for the ingest benchmark to compare the
//! whole job against: every image of a folder is loaded into memory first, then
//! `process_image` (decode, resize, encode, hash: the same libraries and settings as the job)
//! runs over all of them in a tight loop on one thread, three passes. `--threads N` runs N
//! such loops in one process, taking the images in turn: what the work scales to in one
//! address space, without the job's I/O and scheduling.
//!
//! ```text
//! cargo run --release -p ingest --example floor -- ~/.cache/seer-rs/photos \
//!     [--passes 3] [--threads 1]
//! ```
//!
//! Prints images/s and input megapixels/s of the median pass, and the median per-image time
//! of each stage over all passes.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ingest::image::{ImageConfig, StageTimings, process_image};
use seer_tests::files_under;

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const USAGE: &str = "usage: floor FOLDER [--passes N] [--threads N]";
    let mut arguments = std::env::args().skip(1);
    let folder = arguments.next().ok_or(USAGE)?;
    let (mut passes, mut threads) = (3usize, 1usize);
    while let Some(flag) = arguments.next() {
        let value: usize = arguments.next().ok_or(USAGE)?.parse()?;
        match flag.as_str() {
            "--passes" => passes = value,
            "--threads" => threads = value.max(1),
            _ => return Err(USAGE.into()),
        }
    }
    let config = ImageConfig::default();

    let mut images = Vec::new();
    for path in files_under(Path::new(&folder))? {
        images.push(std::fs::read(&path)?);
    }
    let input_bytes: usize = images.iter().map(Vec::len).sum();
    println!(
        "{} files, {:.1} MB, from {folder}",
        images.len(),
        input_bytes as f64 / 1e6
    );

    let mut pass_times = Vec::new();
    let mut stages: Vec<StageTimings> = Vec::new();
    let (mut accepted, mut kept, mut megapixels) = (0usize, 0usize, 0f64);
    let mut rejected = std::collections::BTreeMap::<&str, usize>::new();
    for pass in 0..passes {
        let started = Instant::now();
        // Each thread takes the next image in turn; the tally below does not depend on order.
        let next = AtomicUsize::new(0);
        // What the tally needs of each image; the image itself is dropped at once, as in a job.
        type Summary = Result<(StageTimings, bool, f64), &'static str>;
        let results: Vec<Summary> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(bytes) = images.get(i) else {
                                return done;
                            };
                            let summary = match process_image(bytes, &config) {
                                Ok(p) => Ok((
                                    p.timings,
                                    p.kept_original,
                                    f64::from(p.original_width) * f64::from(p.original_height)
                                        / 1e6,
                                )),
                                Err(rejection) => Err(rejection.reason()),
                            };
                            done.push(summary);
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a floor thread panicked"))
                .collect()
        });
        for summary in results {
            match summary {
                Ok((timings, kept_original, mp)) => {
                    if pass == 0 {
                        accepted += 1;
                        kept += usize::from(kept_original);
                        megapixels += mp;
                    }
                    stages.push(timings);
                }
                Err(reason) if pass == 0 => *rejected.entry(reason).or_default() += 1,
                Err(_) => {}
            }
        }
        pass_times.push(started.elapsed());
    }

    let pass_time = median(&mut pass_times.clone()).as_secs_f64();
    println!(
        "{accepted} accepted ({kept} kept as original), rejected {rejected:?}, {megapixels:.1} MP accepted input"
    );
    println!(
        "median of {passes} passes: {:.3} s, {:.1} images/s, {:.1} MP/s (accepted images, input pixels)",
        pass_time,
        images.len() as f64 / pass_time,
        megapixels / pass_time
    );
    println!("pass times: {:?}", pass_times);
    type Stage = fn(&StageTimings) -> Duration;
    let stage_list: [(&str, Stage); 5] = [
        ("decode", |t| t.decode),
        ("resize", |t| t.resize),
        ("encode", |t| t.encode),
        ("hash", |t| t.hash),
        ("total", StageTimings::total),
    ];
    for (name, stage) in stage_list {
        let mut times: Vec<Duration> = stages.iter().map(stage).collect();
        let sum: Duration = times.iter().sum();
        println!(
            "{name:>7}: median {:>8.3} ms/image, share of time {:>5.1} %",
            median(&mut times).as_secs_f64() * 1e3,
            100.0 * sum.as_secs_f64()
                / stages
                    .iter()
                    .map(|t| t.total().as_secs_f64())
                    .sum::<f64>()
                    .max(1e-9)
        );
    }
    Ok(())
}
