//! The streaming pipeline on real photos stored by `ingest`: reproducibility across thread
//! counts, exact resume, rank and epoch coverage, failures, shutdown; `augment views`.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use augment::config::Layout;
use augment::pipeline::rank_shards;
use augment::{AugmentConfig, Batch, Pipeline, PipelineOptions, StreamState};
use shards::{Manifest, ManifestShard, ShardNames, ShardWriter};

/// The 58 small-set photos ingested at the default 512-px short side into shards of 8
/// samples; built once per test process.
fn dataset() -> &'static Path {
    static DATASET: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DATASET.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("dataset");
        let input = ingest::input::InputSpec {
            url: seer_tests::photos_small_dir().to_str().unwrap().to_string(),
            list: false,
            list_format: ingest::input::ListFormat::Auto,
            url_column: "url".into(),
            labels: ingest::input::LabelSource::None,
            extensions: ingest::input::DEFAULT_EXTENSIONS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let mut config = ingest::job::JobConfig::new(input, out.to_str().unwrap());
        config.samples_per_shard = 8;
        config.work_dir = dir.path().to_path_buf();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let summary = runtime
            .block_on(ingest::job::run(&config, &ingest::job::Silent))
            .expect("ingest the small photo set");
        assert!(summary.written >= 50, "{summary:?}");
        (dir, out)
    });
    path
}

/// A copy of the dataset with an extra shard `damaged-000000.tar` holding two good samples and
/// one whose JPEG is cut in half.
fn dataset_with_corrupt_image() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(dataset(), dir.path());
    let manifest_path = dir.path().join("manifest.json");
    let mut manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let first = &manifest.shards[0];
    let good: Vec<_> = shards::SampleReader::new(
        std::fs::File::open(dir.path().join(&first.name)).unwrap(),
        first.name.clone(),
    )
    .take(2)
    .map(|s| s.unwrap())
    .collect();
    let name = "damaged-000000.tar";
    let mut writer = ShardWriter::new(Vec::new(), name);
    for (i, sample) in good.iter().enumerate() {
        let (ext, bytes) = sample.image().unwrap();
        writer
            .add(
                &format!("damaged{i}"),
                &[(ext, &bytes[..]), ("json", b"{}".as_slice())],
            )
            .unwrap();
    }
    let (_, bytes) = good[0].image().unwrap();
    writer
        .add(
            "damagedcut",
            &[
                ("jpg", &bytes[..bytes.len() / 2]),
                ("json", b"{}".as_slice()),
            ],
        )
        .unwrap();
    manifest.upsert(store_shard(dir.path(), name, writer, 3));
    std::fs::write(manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    dir
}

/// Stores a finished shard and its index in `dir`; returns its manifest entry, claiming
/// `samples` samples.
fn store_shard(
    dir: &Path,
    name: &str,
    writer: ShardWriter<Vec<u8>>,
    samples: u64,
) -> ManifestShard {
    let finished = writer.finish().unwrap();
    std::fs::write(dir.join(name), &finished.out).unwrap();
    std::fs::write(
        dir.join(ShardNames::for_tar(name).index),
        serde_json::to_vec(&finished.index).unwrap(),
    )
    .unwrap();
    ManifestShard {
        name: name.into(),
        samples,
        bytes: finished.out.len() as u64,
        sha256: finished.sha256,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn options(batch_size: usize, threads: usize) -> PipelineOptions {
    let mut o = PipelineOptions::new(
        AugmentConfig::parse("2x64@0.14-1+3x32@0.05-0.14").unwrap(),
        batch_size,
    );
    o.threads = threads;
    o.shuffle_buffer = 16;
    o.seed = 42;
    o
}

fn url(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Keys and a digest of every view byte of a batch.
fn fingerprint(batch: &Batch) -> (Vec<String>, Vec<u64>) {
    let digests = batch
        .views
        .iter()
        .map(|v| match v {
            augment::ViewData::U8(b) => b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
                (h ^ u64::from(x)).wrapping_mul(0x100000001b3)
            }),
            augment::ViewData::F32(f) => f
                .iter()
                .fold(0u64, |h, x| h.rotate_left(5) ^ u64::from(x.to_bits())),
        })
        .collect();
    (batch.keys.clone(), digests)
}

fn take(pipeline: &mut Pipeline, n: usize) -> Vec<Batch> {
    (0..n)
        .map(|_| {
            pipeline
                .next()
                .expect("the stream is endless")
                .expect("batch")
        })
        .collect()
}

/// Every hostile file of the test data (truncated, bombs, fuzzer crashes, odd TIFFs) through
/// the decoder the workers use: an error or an image, never a panic, which would end the
/// worker thread and with it the stream.
#[test]
fn the_decoder_never_panics_on_hostile_files() {
    let mut decoder = augment::decode::Decoder::new(64 << 20);
    let mut files: Vec<PathBuf> = std::fs::read_dir(seer_tests::hostile_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() > 1000, "{} hostile files", files.len());
    let mut refused = 0;
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode(&bytes).is_ok()
        }));
        match outcome {
            Ok(decoded) => refused += usize::from(!decoded),
            Err(_) => panic!("{} panicked the decoder", file.display()),
        }
    }
    assert!(refused > 100, "{refused} refused");
}

#[test]
fn batches_do_not_depend_on_the_number_of_threads() {
    let one: Vec<_> = take(
        &mut Pipeline::start(&url(dataset()), options(5, 1), None).unwrap(),
        14,
    )
    .iter()
    .map(fingerprint)
    .collect();
    let three: Vec<_> = take(
        &mut Pipeline::start(&url(dataset()), options(5, 3), None).unwrap(),
        14,
    )
    .iter()
    .map(fingerprint)
    .collect();
    assert_eq!(one, three);
    // And another seed gives another stream.
    let mut other = options(5, 2);
    other.seed = 43;
    let reseeded: Vec<_> = take(
        &mut Pipeline::start(&url(dataset()), other, None).unwrap(),
        2,
    )
    .iter()
    .map(fingerprint)
    .collect();
    assert_ne!(one[..2], reseeded[..]);
}

#[test]
fn every_sample_once_per_epoch_and_ranks_never_share_a_shard() {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dataset().join("manifest.json")).unwrap()).unwrap();
    let total = manifest.total_samples() as usize;
    let mut seen_by_rank = Vec::new();
    for rank in 0..2 {
        let mut o = options(4, 2);
        (o.rank, o.world, o.epochs) = (rank, 2, Some(1));
        let keys: Vec<String> = Pipeline::start(&url(dataset()), o, None)
            .unwrap()
            .flat_map(|b| b.unwrap().keys.clone())
            .collect();
        let unique: HashSet<_> = keys.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            keys.len(),
            "rank {rank} repeated a sample within one epoch"
        );
        let expected: u64 = rank_shards(manifest.shards.len(), 42, 0, rank, 2)
            .iter()
            .map(|&s| manifest.shards[s as usize].samples)
            .sum();
        // Whole batches only: at most batch_size - 1 samples of the epoch wait for the next one.
        assert!(
            expected as usize - keys.len() < 4,
            "rank {rank}: {} of {expected}",
            keys.len()
        );
        seen_by_rank.push(unique);
    }
    assert!(seen_by_rank[0].is_disjoint(&seen_by_rank[1]));
    assert!(seen_by_rank[0].len() + seen_by_rank[1].len() > total - 8);
    // Shard order changes with the epoch, and the shuffle buffer mixes shards within a batch.
    assert_ne!(rank_shards(8, 42, 0, 0, 1), rank_shards(8, 42, 1, 0, 1));
}

#[test]
fn resume_continues_exactly_where_the_saved_batch_ended() {
    // 58 samples in batches of 5 with a 16-sample buffer: 30 batches run through two epoch
    // boundaries; resume points fall mid-shard, mid-drain and right after an epoch change.
    let straight: Vec<_> = take(
        &mut Pipeline::start(&url(dataset()), options(5, 2), None).unwrap(),
        30,
    )
    .iter()
    .map(fingerprint)
    .collect();
    for stop_after in [1, 7, 11, 12, 13, 23] {
        let state: StreamState = {
            let mut first = Pipeline::start(&url(dataset()), options(5, 2), None).unwrap();
            let batches = take(&mut first, stop_after);
            // The position travels as JSON, as in a checkpoint.
            serde_json::from_str(&serde_json::to_string(&*batches.last().unwrap().state).unwrap())
                .unwrap()
        };
        assert_eq!(state.batches, stop_after as u64);
        let mut resumed = Pipeline::start(&url(dataset()), options(5, 3), Some(state)).unwrap();
        let rest: Vec<_> = take(&mut resumed, 30 - stop_after)
            .iter()
            .map(fingerprint)
            .collect();
        assert_eq!(
            rest,
            straight[stop_after..],
            "resumed after batch {stop_after}"
        );
    }
}

#[test]
fn resume_refuses_other_settings() {
    let mut first = Pipeline::start(&url(dataset()), options(5, 1), None).unwrap();
    let state = (*take(&mut first, 1)[0].state).clone();
    drop(first);
    let mut other = options(6, 1);
    other.seed = 42;
    let error = Pipeline::start(&url(dataset()), other, Some(state))
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("batch size was 5"), "{error}");
}

#[test]
fn resume_refuses_a_position_no_run_saves() {
    let mut first = Pipeline::start(&url(dataset()), options(5, 1), None).unwrap();
    let state = serde_json::to_value(&*take(&mut first, 1)[0].state).unwrap();
    drop(first);
    let start = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut edited = state.clone();
        edit(&mut edited);
        let edited: StreamState = serde_json::from_value(edited).unwrap();
        match Pipeline::start(&url(dataset()), options(5, 1), Some(edited)) {
            Err(error) => error.to_string(),
            // Checks that need a shard's index come with the first batch.
            Ok(mut pipeline) => match pipeline.next() {
                Some(Err(error)) => error.to_string(),
                other => panic!("accepted: {:?}", other.map(|b| b.map(|b| b.index))),
            },
        }
    };
    // A generator stuck at zero drew zeros for ever: the first batch never came.
    let error = start(&|s| s["rng"]["s"] = serde_json::json!([0, 0, 0, 0]));
    assert!(
        error.contains("random generator state is all zeros"),
        "{error}"
    );
    let error = start(&|s| s["epoch"] = serde_json::json!(u64::MAX));
    assert!(error.contains("no room to count on"), "{error}");
    let error = start(&|s| {
        let buffer = s["buffer"].as_array().unwrap().clone();
        s["buffer"] = serde_json::json!([buffer.clone(), buffer].concat());
    });
    assert!(error.contains("more than its size of 16"), "{error}");
    let error = start(&|s| s["samples_taken"] = serde_json::json!(1_000_000));
    assert!(
        error.contains("has taken 1000000 samples of it, but its index holds"),
        "{error}"
    );
}

#[test]
fn float_output_is_the_normalized_byte_output() {
    let mut o = options(4, 2);
    let bytes = take(
        &mut Pipeline::start(&url(dataset()), o.clone(), None).unwrap(),
        2,
    );
    o.layout = Layout::F32Nchw;
    let floats = take(
        &mut Pipeline::start(&url(dataset()), o.clone(), None).unwrap(),
        2,
    );
    let (mean, std) = (o.augment.mean, o.augment.std);
    for (b, f) in bytes.iter().zip(&floats) {
        assert_eq!(b.keys, f.keys);
        for ((vb, vf), &size) in b.views.iter().zip(&f.views).zip(&b.sizes) {
            let (vb, vf) = (vb.as_u8().unwrap(), vf.as_f32().unwrap());
            let plane = size as usize * size as usize;
            assert_eq!(vb.len(), vf.len());
            for (i, &x) in vb.iter().enumerate() {
                let (row, within) = (i / (plane * 3), i % (plane * 3));
                let (pixel, channel) = (within / 3, within % 3);
                let expected = (f32::from(x) / 255.0 - mean[channel]) / std[channel];
                let got = vf[row * plane * 3 + channel * plane + pixel];
                assert!(
                    (got - expected).abs() < 1e-5,
                    "row {row} channel {channel} pixel {pixel}: {got} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn a_corrupt_image_is_skipped_counted_and_its_slot_refilled() {
    let dir = dataset_with_corrupt_image();
    let mut o = options(4, 2);
    o.epochs = Some(1);
    let mut pipeline = Pipeline::start(&url(dir.path()), o, None).unwrap();
    let batches: Vec<Batch> = pipeline.by_ref().map(|b| b.unwrap()).collect();
    assert_eq!(pipeline.counters().images_failed.load(Ordering::Relaxed), 1);
    let keys: Vec<&String> = batches.iter().flat_map(|b| &b.keys).collect();
    assert!(!keys.iter().any(|k| *k == "damagedcut"));
    let refills: Vec<_> = keys.iter().filter(|k| k.contains('~')).collect();
    assert_eq!(refills.len(), 1, "{keys:?}");
    assert_eq!(batches.iter().map(|b| b.refilled).sum::<usize>(), 1);
    assert!(batches.iter().all(|b| b.len() == 4));
}

#[test]
fn a_missing_shard_is_retried_then_skipped_and_the_rest_is_read() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(dataset(), dir.path());
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    let lost = &manifest.shards[1];
    std::fs::remove_file(dir.path().join(&lost.name)).unwrap();
    let mut o = options(2, 2);
    o.epochs = Some(1);
    o.retry_pause = Duration::from_millis(5);
    let mut pipeline = Pipeline::start(&url(dir.path()), o, None).unwrap();
    let read: usize = pipeline.by_ref().map(|b| b.unwrap().len()).sum();
    let counters = pipeline.counters();
    assert_eq!(counters.shards_failed.load(Ordering::Relaxed), 1);
    assert_eq!(counters.read_retries.load(Ordering::Relaxed), 3);
    let expected = manifest.total_samples() - lost.samples;
    assert!(expected as usize - read < 2, "read {read} of {expected}");
}

#[test]
fn no_readable_shard_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(dataset(), dir.path());
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir.path().join("manifest.json")).unwrap()).unwrap();
    for shard in &manifest.shards {
        std::fs::write(dir.path().join(&shard.name), b"not a tar").unwrap();
    }
    let mut o = options(2, 2);
    o.retry_pause = Duration::from_millis(1);
    let outcome = Pipeline::start(&url(dir.path()), o, None)
        .unwrap()
        .next()
        .expect("an error");
    let error = outcome.expect_err("no batch can come").to_string();
    assert!(error.contains("no sample"), "{error}");
}

#[test]
fn settings_that_cannot_be_honoured_are_refused_before_anything_starts() {
    let refused = |change: &dyn Fn(&mut PipelineOptions)| {
        let mut o = options(2, 2);
        change(&mut o);
        Pipeline::start(&url(dataset()), o, None)
            .err()
            .expect("refused")
            .to_string()
    };
    let e = refused(&|o| o.threads = 100_000);
    assert!(e.contains("100000 threads: at most 1024"), "{e}");
    let e = refused(&|o| o.prefetch = 1 << 40);
    assert!(e.contains("at most 1024 batches"), "{e}");
    let e = refused(&|o| o.batch_size = 1 << 40);
    assert!(e.contains("GiB, over the limit of 16 GiB"), "{e}");
}

#[test]
fn a_dataset_whose_images_never_decode_is_an_error_not_an_endless_stream() {
    // Its manifest may claim the samples it holds, or far more: the error comes from what
    // the reader counted in an epoch, not from the manifest. (With the manifest's claim, the
    // second run went on dropping batches for ever.)
    for claimed in [5, 500_000_000_000_000] {
        let dir = undecodable_dataset(claimed);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let path = url(dir.path());
        std::thread::spawn(move || {
            let mut pipeline = Pipeline::start(&path, options(3, 2), None).unwrap();
            let outcome = pipeline.next();
            let dropped = pipeline.counters().batches_dropped.load(Ordering::Relaxed);
            done_tx
                .send((outcome.map(|o| o.map(|_| ())), dropped))
                .unwrap();
        });
        let (outcome, dropped) = done_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the pipeline gave up within two minutes");
        let error = outcome
            .expect("an item")
            .expect_err("no batch can come")
            .to_string();
        // 10 samples per epoch in batches of 3: 7 batches dropped in a row hold two epochs.
        assert!(
            error.contains(
                "no image decoded in 7 batches in a row, two epochs of samples (10 per epoch)"
            ),
            "claimed {claimed}: {error}"
        );
        assert!(dropped >= 7, "{dropped}");
    }
}

/// Two well-formed shards of 5 samples each whose image members are not images (every batch
/// is dropped), with a manifest that claims `claimed` samples per shard.
fn undecodable_dataset(claimed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = Manifest {
        version: 1,
        shards: Vec::new(),
    };
    for s in 0..2 {
        let name = format!("bad-{s:06}.tar");
        let mut writer = ShardWriter::new(Vec::new(), &name);
        for i in 0..5 {
            writer
                .add(
                    &format!("bad{s}x{i}"),
                    &[
                        ("jpg", b"AAAAAAAAAAAAAAAA".as_slice()),
                        ("json", b"{}".as_slice()),
                    ],
                )
                .unwrap();
        }
        manifest.upsert(store_shard(dir.path(), &name, writer, claimed));
    }
    std::fs::write(
        dir.path().join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn dropping_the_pipeline_stops_every_thread() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut pipeline = Pipeline::start(&url(dataset()), options(3, 3), None).unwrap();
        let _ = take(&mut pipeline, 2);
        drop(pipeline);
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the pipeline shut down");
    // Batches outlive the pipeline that made them.
    let mut pipeline = Pipeline::start(&url(dataset()), options(3, 1), None).unwrap();
    let batch = take(&mut pipeline, 1).pop().unwrap();
    drop(pipeline);
    assert_eq!(batch.len(), 3);
    let sizes: BTreeSet<u32> = batch.sizes.iter().copied().collect();
    assert_eq!(sizes, BTreeSet::from([32, 64]));
}

/// A panorama (20,000 by 2 pixels) is drawn in a sheet of bounded size: its thumbnail at the
/// views' height would be millions of pixels wide (a 67-million-pixel-wide image aborted on
/// the allocation).
#[test]
fn views_of_a_panorama_fit_a_bounded_sheet() {
    let dir = tempfile::tempdir().unwrap();
    let mut png = Vec::new();
    image::RgbImage::from_fn(20_000, 2, |x, _| image::Rgb([(x % 251) as u8, 0, 0]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let name = "wide-000000.tar";
    let mut writer = ShardWriter::new(Vec::new(), name);
    writer
        .add("wide", &[("png", &png[..]), ("json", b"{}".as_slice())])
        .unwrap();
    let mut manifest = Manifest {
        version: 1,
        shards: Vec::new(),
    };
    manifest.upsert(store_shard(dir.path(), name, writer, 1));
    std::fs::write(
        dir.path().join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let sheet = dir.path().join("sheet.png");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_augment"))
        .args(["views", "--data", &url(dir.path()), "-o"])
        .arg(&sheet)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (width, height) = image::image_dimensions(&sheet).unwrap();
    assert!(width < 4 * 224 + 8 * 300, "{width}x{height}");
    assert_eq!(height, 224);
}

#[test]
fn views_writes_a_png_whatever_the_name_and_refuses_a_folder() {
    let out = tempfile::tempdir().unwrap();
    let views = |output: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_augment"))
            .args(["views", "--data", &url(dataset()), "-o"])
            .arg(output)
            .output()
            .unwrap()
    };
    let refused = views(out.path());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("is a folder"), "{stderr}");
    let file = out.path().join("sheet");
    let made = views(&file);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert_eq!(
        image::ImageFormat::from_path(out.path().join("x.png")).unwrap(),
        image::guess_format(&std::fs::read(&file).unwrap()).unwrap()
    );
}
