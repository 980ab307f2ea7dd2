//! The `shards` binary against small datasets built here: real images,
//! metadata, indexes, stats and a manifest written the way ingest writes them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{Rgb, RgbImage};
use sha2::{Digest, Sha256};
use shards::meta::FORMAT_VERSION;
use shards::{
    Manifest, ManifestShard, SampleMeta, ShardIndex, ShardNames, ShardStats, ShardWriter,
};

/// A picture of 9x8 flat cells of 8 px whose neighbours in a row always differ
/// by at least 50 grey levels, so a difference hash survives re-encoding.
fn blocks(seed: u64) -> RgbImage {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    const LEVELS: [u8; 5] = [20, 70, 120, 170, 220];
    let mut cells = [[0u8; 9]; 8];
    for row in &mut cells {
        let mut previous = usize::MAX;
        for cell in row.iter_mut() {
            let mut level = (next() % 5) as usize;
            if level == previous {
                level = (level + 1 + (next() % 4) as usize) % 5;
            }
            previous = level;
            *cell = LEVELS[level];
        }
    }
    let tint = [
        (next() % 40) as u8,
        (next() % 40) as u8,
        (next() % 40) as u8,
    ];
    RgbImage::from_fn(72, 64, |x, y| {
        let v = cells[(y / 8) as usize][(x / 8) as usize];
        Rgb([
            v.saturating_add(tint[0]),
            v.saturating_add(tint[1]),
            v.saturating_add(tint[2]),
        ])
    })
}

fn jpeg(image: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(image)
        .unwrap();
    out
}

fn png(image: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Difference hash of the decoded pixels (what ingest's perceptual hash is for).
fn dhash(bytes: &[u8]) -> u64 {
    let gray = image::load_from_memory(bytes).unwrap().to_luma8();
    let small = image::imageops::resize(&gray, 9, 8, image::imageops::FilterType::Triangle);
    let mut hash = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            hash = (hash << 1) | u64::from(small.get_pixel(x, y)[0] > small.get_pixel(x + 1, y)[0]);
        }
    }
    hash
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One sample to write.
struct Spec {
    key: String,
    format: &'static str,
    bytes: Vec<u8>,
    cls: Option<String>,
    /// Stored size written to KEY.json, when it should lie.
    claimed_size: Option<(u32, u32)>,
}

fn spec(key: &str, seed: u64, format: &'static str) -> Spec {
    let image = blocks(seed);
    let bytes = if format == "png" {
        png(&image)
    } else {
        jpeg(&image, 90)
    };
    Spec {
        key: key.to_string(),
        format,
        bytes,
        cls: Some(format!("class{}", seed % 2)),
        claimed_size: None,
    }
}

fn meta(spec: &Spec) -> SampleMeta {
    let decoded = image::load_from_memory(&spec.bytes).unwrap();
    let (width, height) = spec
        .claimed_size
        .unwrap_or((decoded.width(), decoded.height()));
    SampleMeta {
        key: spec.key.clone(),
        url: format!("file:///originals/{}.{}", spec.key, spec.format),
        source_size: spec.bytes.len() as u64,
        etag: None,
        last_modified: None,
        original_width: decoded.width() * 10,
        original_height: decoded.height() * 10,
        width,
        height,
        format: spec.format.to_string(),
        sha256: sha256_hex(&spec.bytes),
        phash: format!("{:016x}", dhash(&spec.bytes)),
        kept_original: true,
        cls: spec.cls.clone(),
    }
}

/// Writes shards `data-000000.tar`, ... with their index and stats, and the manifest.
fn write_dataset(dir: &Path, shards: Vec<Vec<Spec>>) {
    let mut manifest = Manifest {
        version: FORMAT_VERSION,
        shards: Vec::new(),
    };
    for (id, samples) in shards.into_iter().enumerate() {
        let names = ShardNames::new("data", id as u64);
        let mut writer = ShardWriter::new(Vec::new(), names.tar.clone());
        for sample in &samples {
            let json = serde_json::to_vec(&meta(sample)).unwrap();
            writer
                .add(
                    &sample.key,
                    &[
                        (sample.format, sample.bytes.as_slice()),
                        ("json", json.as_slice()),
                    ],
                )
                .unwrap();
        }
        let finished = writer.finish().unwrap();
        std::fs::write(dir.join(&names.tar), &finished.out).unwrap();
        std::fs::write(
            dir.join(&names.index),
            serde_json::to_vec_pretty(&finished.index).unwrap(),
        )
        .unwrap();
        let stats = ShardStats {
            version: FORMAT_VERSION,
            shard: names.tar.clone(),
            count: samples.len() as u64 + 2,
            successes: samples.len() as u64,
            failed: 2,
            duplicates: 1,
            failed_by_reason: [("undecodable".to_string(), 1), ("fetch".to_string(), 1)]
                .into_iter()
                .collect(),
            bytes_in: 1000,
            bytes_out: finished.out.len() as u64,
            ..ShardStats::default()
        };
        std::fs::write(
            dir.join(&names.stats),
            serde_json::to_vec_pretty(&stats).unwrap(),
        )
        .unwrap();
        manifest.upsert(ManifestShard {
            name: names.tar,
            samples: samples.len() as u64,
            bytes: finished.out.len() as u64,
            sha256: finished.sha256,
        });
    }
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

/// Two shards of three samples: jpg and png, two labels.
fn good_dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(
        dir.path(),
        vec![
            vec![
                spec("a0", 1, "jpg"),
                spec("a1", 2, "png"),
                spec("a2", 3, "jpg"),
            ],
            vec![
                spec("b0", 4, "jpg"),
                spec("b1", 5, "jpg"),
                spec("b2", 6, "png"),
            ],
        ],
    );
    dir
}

fn shards(args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_shards"))
        .arg("--no-progress")
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ shards {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path(dir: &tempfile::TempDir) -> &str {
    dir.path().to_str().unwrap()
}

fn read_index(dir: &Path, shard: &str) -> ShardIndex {
    serde_json::from_slice(&std::fs::read(dir.join(ShardNames::for_tar(shard).index)).unwrap())
        .unwrap()
}

#[test]
fn ls_lists_shards_and_totals() {
    let dir = good_dataset();
    let out = shards(&["ls", path(&dir)]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("data-000000.tar") && text.contains("data-000001.tar"),
        "{text}"
    );
    assert!(text.lines().last().unwrap().contains("6 samples"), "{text}");
    assert!(text.contains("in 2 shards"), "{text}");

    let out = shards(&["ls", "--json", path(&dir)]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["total_samples"], 6);
    assert_eq!(json["shards"].as_array().unwrap().len(), 2);
}

#[test]
fn stat_totals_and_histograms() {
    let dir = good_dataset();
    let out = shards(&["stat", "--json", path(&dir)]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["shards"], 2);
    assert_eq!(json["samples"], 6);
    assert_eq!(json["samples_read"], 6);
    assert_eq!(json["failed"], 4);
    assert_eq!(json["failed_by_reason"]["undecodable"], 2);
    assert_eq!(json["duplicates"], 2);
    assert_eq!(json["formats"]["jpg"], 4);
    assert_eq!(json["formats"]["png"], 2);
    assert_eq!(json["width"]["count"], 6);
    assert_eq!(json["width"]["min"], 72.0);
    assert_eq!(json["short_side"]["max"], 64.0);
    assert_eq!(
        json["labels"]["class0"].as_u64().unwrap() + json["labels"]["class1"].as_u64().unwrap(),
        6
    );

    let text = stdout(&shards(&["stat", path(&dir)]));
    assert!(text.contains("failed by reason"), "{text}");
    assert!(text.contains("stored image bytes"), "{text}");
    assert!(text.contains('#'), "bar charts: {text}");
}

#[test]
fn verify_passes_on_a_good_dataset() {
    let dir = good_dataset();
    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("6 samples"), "{}", stdout(&out));
    assert!(stdout(&out).contains("OK"));
}

#[test]
fn verify_finds_a_flipped_byte_in_an_image() {
    let dir = good_dataset();
    // a1 is a PNG: its chunk CRCs catch any flipped byte.
    let index = read_index(dir.path(), "data-000000.tar");
    let entry = index.samples.iter().find(|e| e.key == "a1").unwrap();
    let span = entry.members["png"];
    let tar = dir.path().join("data-000000.tar");
    let mut bytes = std::fs::read(&tar).unwrap();
    bytes[(span.offset + span.size / 2) as usize] ^= 0x55;
    std::fs::write(&tar, bytes).unwrap();

    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(text.contains("data-000000.tar: SHA-256 is"), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("sample a1"))
        .unwrap_or_else(|| panic!("no problem names a1: {text}"));
    assert!(
        line.starts_with("data-000000.tar") && line.contains(&format!("at byte {}", entry.offset)),
        "{line}"
    );
    assert!(
        line.contains("does not decode") || line.contains("KEY.json says"),
        "{line}"
    );
    assert!(
        !text.contains("data-000001.tar"),
        "the other shard is fine: {text}"
    );
}

#[test]
fn verify_finds_a_truncated_shard() {
    let dir = good_dataset();
    let tar = dir.path().join("data-000001.tar");
    let bytes = std::fs::read(&tar).unwrap();
    std::fs::write(&tar, &bytes[..bytes.len() / 2]).unwrap();
    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(
        text.contains("data-000001.tar: truncated at byte"),
        "{text}"
    );
    assert!(
        text.contains(&format!("size is {} bytes", bytes.len() / 2)),
        "{text}"
    );
}

#[test]
fn every_whole_sample_before_damage_is_read() {
    let dir = good_dataset();
    let tar = dir.path().join("data-000001.tar");
    let bytes = std::fs::read(&tar).unwrap();
    // Cut inside b2's image: b0 and b1 are whole.
    let cut = read_index(dir.path(), "data-000001.tar").samples[2].members["png"].offset + 10;
    std::fs::write(&tar, &bytes[..cut as usize]).unwrap();

    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("data-000001.tar: truncated at byte {cut}")),
        "{text}"
    );
    assert!(text.contains("verified 2 shards, 5 samples"), "{text}");
    for command in ["stat", "dupes"] {
        let out = shards(&[command, "--json", path(&dir)]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{command}: a shard is unreadable"
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let read = if command == "stat" {
            "samples_read"
        } else {
            "samples"
        };
        assert_eq!(json[read], 5, "{command}: {json}");
    }
}

/// Rewrites the stats file of `shard` in the dataset at `dir`.
fn edit_stats(dir: &Path, shard: &str, change: impl FnOnce(&mut ShardStats)) {
    let file = dir.join(ShardNames::for_tar(shard).stats);
    let mut stats: ShardStats = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    change(&mut stats);
    std::fs::write(&file, serde_json::to_vec(&stats).unwrap()).unwrap();
}

#[test]
fn stats_whose_totals_overflow_are_an_error_naming_the_file() {
    let dir = good_dataset();
    edit_stats(dir.path(), "data-000000.tar", |s| s.count = u64::MAX);
    let out = shards(&["stat", path(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    let error = stderr(&out);
    assert!(
        error.contains("the stats files' count totals overflow at")
            && error.contains("data-000001_stats.json"),
        "{error}"
    );

    let dir = good_dataset();
    for shard in ["data-000000.tar", "data-000001.tar"] {
        edit_stats(dir.path(), shard, |s| {
            s.failed_by_reason
                .insert("undecodable".into(), u64::MAX / 2 + 1);
        });
    }
    let out = shards(&["stat", path(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    let error = stderr(&out);
    assert!(
        error.contains("the stats files' failed_by_reason \"undecodable\" totals overflow at")
            && error.contains("data-000001_stats.json"),
        "{error}"
    );
}

#[test]
fn verify_finds_stats_that_disagree_with_themselves() {
    let dir = good_dataset();
    edit_stats(dir.path(), "data-000001.tar", |s| {
        s.failed = 3;
        s.failed_by_reason.insert("weird".into(), 5);
    });
    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    for problem in [
        "data-000001.tar: data-000001_stats.json: failed is 3, the counts in failed_by_reason add up to 7",
        "data-000001.tar: data-000001_stats.json: failed_by_reason has an unknown reason \"weird\"",
    ] {
        assert!(text.contains(problem), "{problem}: {text}");
    }
    assert!(text.contains("2 problems"), "{text}");
}

/// Renames the first sample of `data-000000.tar` to `key`, which `ShardWriter` would refuse:
/// rewrites its members' tar headers, its index entry and the manifest's checksum.
fn rekey_first_sample(dir: &Path, key: &str) {
    let tar = dir.join("data-000000.tar");
    let mut bytes = std::fs::read(&tar).unwrap();
    let mut index = read_index(dir, "data-000000.tar");
    let entry = &mut index.samples[0];
    for (ext, span) in &entry.members {
        let header = &mut bytes[(span.offset - 512) as usize..span.offset as usize];
        let name = format!("{key}.{ext}");
        header[..100].fill(0);
        header[..name.len()].copy_from_slice(name.as_bytes());
        header[148..156].fill(b' ');
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
    entry.key = key.to_string();
    std::fs::write(&tar, &bytes).unwrap();
    std::fs::write(
        dir.join(ShardNames::for_tar("data-000000.tar").index),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let manifest_path = dir.join("manifest.json");
    let mut manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest.shards[0].sha256 = sha256_hex(&bytes);
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

#[test]
fn verify_finds_keys_that_break_the_key_rule_and_prints_them_escaped() {
    let long = "a".repeat(90);
    let fake = "x\nverified 1 shards, 4 samples: OK\n";
    for (key, shown, reason) in [
        (long.as_str(), long.as_str(), "longer than 80 characters"),
        ("a b+c", "\"a b+c\"", "only ASCII letters"),
        ("ключ", "\"ключ\"", "only ASCII letters"),
        (
            fake,
            r#""x\nverified 1 shards, 4 samples: OK\n""#,
            "only ASCII letters",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(
            dir.path(),
            vec![vec![spec("k0", 1, "jpg"), spec("k1", 2, "png")]],
        );
        rekey_first_sample(dir.path(), key);
        let out = shards(&["verify", path(&dir)]);
        assert_eq!(out.status.code(), Some(2), "{key:?}");
        let text = stdout(&out);
        assert!(
            text.contains(&format!(
                "data-000000.tar: sample {shown} at byte 0: invalid key: {reason}"
            )),
            "{key:?}: {text}"
        );
        // Every line but the summary names the shard: no key breaks a line.
        let lines: Vec<&str> = text.lines().collect();
        let (summary, problems) = lines.split_last().unwrap();
        assert!(
            summary.starts_with("verified 1 shards, 2 samples"),
            "{text}"
        );
        assert!(
            problems.iter().all(|l| l.starts_with("data-000000.tar")),
            "{text}"
        );
    }
}

#[test]
fn verify_finds_a_manifest_count_mismatch() {
    let dir = good_dataset();
    let manifest_path = dir.path().join("manifest.json");
    let mut manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest.shards[1].samples = 4;
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(
        text.contains("data-000001.tar: the shard holds 3 samples, the manifest lists 4"),
        "{text}"
    );

    let out = shards(&["verify", "--json", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["shard"] == "data-000001.tar")
    );
}

#[test]
fn verify_finds_wrong_dimensions_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut liar = spec("liar", 8, "jpg");
    liar.claimed_size = Some((100, 64));
    write_dataset(
        dir.path(),
        vec![vec![spec("ok0", 7, "jpg"), liar, spec("ok1", 9, "png")]],
    );
    let offset = read_index(dir.path(), "data-000000.tar").samples[1].offset;
    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "data-000000.tar: sample liar at byte {offset}: image is 72x64, KEY.json says 100x64"
        )),
        "{text}"
    );
    assert!(text.contains("1 problem"), "{text}");
}

#[test]
fn verify_refuses_the_images_the_training_pipeline_refuses() {
    let dir = tempfile::tempdir().unwrap();
    // A JPEG missing its last eighth: the `image` crate's decoder fills in the rest;
    // libjpeg-turbo, which augment decodes with, refuses it.
    let mut cut = spec("cut", 8, "jpg");
    let keep = cut.bytes.len() - cut.bytes.len() / 8;
    cut.bytes.truncate(keep);
    assert!(image::load_from_memory(&cut.bytes).is_ok());
    // A .png member holding a JPEG.
    let mut misnamed = spec("misnamed", 9, "jpg");
    misnamed.format = "png";
    write_dataset(dir.path(), vec![vec![spec("ok0", 7, "jpg"), cut, misnamed]]);
    let index = read_index(dir.path(), "data-000000.tar");
    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    for problem in [
        format!(
            "data-000000.tar: sample cut at byte {}: image member .jpg does not decode: cannot decode image: TurboJPEG error: Premature end of JPEG file",
            index.samples[1].offset
        ),
        format!(
            "data-000000.tar: sample misnamed at byte {}: image member .png holds JPEG data",
            index.samples[2].offset
        ),
    ] {
        assert!(text.contains(&problem), "{problem}: {text}");
    }
    assert!(text.contains("2 problems"), "{text}");
}

#[test]
fn verify_finds_keys_repeated_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(
        dir.path(),
        vec![vec![spec("same", 1, "jpg")], vec![spec("same", 2, "jpg")]],
    );
    let out = shards(&["verify", path(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("data-000001.tar: sample same at byte 0: duplicate key: also in data-000000.tar at byte 0"), "{}", stdout(&out));
}

#[test]
fn cat_and_get_round_trip() {
    let dir = good_dataset();
    let original = spec("b1", 5, "jpg");
    let entry = read_index(dir.path(), "data-000001.tar").samples[1].clone();

    let out = shards(&["cat", path(&dir), "b1"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("# b1 in data-000001.tar at byte {}", entry.offset)),
        "{text}"
    );
    let json_start = text.find('{').unwrap();
    let shown: SampleMeta = serde_json::from_str(&text[json_start..]).unwrap();
    assert_eq!(shown, meta(&original));

    let out = shards(&["cat", "--json", path(&dir), "b1"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["shard"], "data-000001.tar");
    assert_eq!(json["offset"], entry.offset);
    assert_eq!(json["meta"]["sha256"], sha256_hex(&original.bytes));

    let file = dir.path().join("out.jpg");
    let out = shards(&["get", path(&dir), "b1", "-o", file.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(std::fs::read(&file).unwrap(), original.bytes);

    let out = shards(&["get", path(&dir), "a1", "-o", "-"]);
    assert_eq!(out.stdout, spec("a1", 2, "png").bytes);
}

#[test]
fn errors_name_what_is_missing_and_exit_1() {
    let dir = good_dataset();
    let out = shards(&["cat", path(&dir), "nosuchkey"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no sample with key \"nosuchkey\""),
        "{}",
        stderr(&out)
    );

    let empty = tempfile::tempdir().unwrap();
    let out = shards(&["ls", path(&empty)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("cannot open dataset {}", path(&empty))),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("manifest.json"), "{}", stderr(&out));

    std::fs::write(empty.path().join("manifest.json"), b"{ not json").unwrap();
    let out = shards(&["verify", path(&empty)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("malformed document"),
        "{}",
        stderr(&out)
    );

    let out = shards(&["ls", "nosuchscheme://bucket/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nosuchscheme://bucket/x"),
        "{}",
        stderr(&out)
    );

    let out = shards(&["ls", "/definitely/not/here"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/definitely/not/here"),
        "{}",
        stderr(&out)
    );

    let out = shards(&["frobnicate"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "usage errors are not verify failures"
    );
    let help = stdout(&shards(&["--help"]));
    assert!(help.contains("2  verify found problems"), "{help}");
}

#[test]
fn grid_writes_a_png_of_the_expected_size() {
    let dir = good_dataset();
    let file: PathBuf = dir.path().join("grid.png");
    let out = shards(&[
        "grid",
        path(&dir),
        "-o",
        file.to_str().unwrap(),
        "--count",
        "5",
        "--tile",
        "32",
        "--seed",
        "3",
    ]);
    assert!(out.status.success());
    let sheet = image::open(&file).unwrap();
    // 5 tiles: 3 columns, 2 rows of 32 px tiles with 2 px borders.
    assert_eq!((sheet.width(), sheet.height()), (3 * 34 + 2, 2 * 34 + 2));

    // More than there are: every sample once.
    let out = shards(&[
        "grid",
        "--json",
        path(&dir),
        "-o",
        file.to_str().unwrap(),
        "--tile",
        "16",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<_> = json["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    assert_eq!(keys, ["a0", "a1", "a2", "b0", "b1", "b2"]);
    assert_eq!(image::open(&file).unwrap().width(), 3 * 18 + 2);

    // No samples asked for: a usage error naming the flag (it said the dataset was empty).
    let out = shards(&[
        "grid",
        path(&dir),
        "-o",
        file.to_str().unwrap(),
        "--count",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(1), "usage errors exit 1 in shards");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--count"));
}

#[test]
fn dupes_finds_exact_and_near_duplicates_only() {
    let dir = tempfile::tempdir().unwrap();
    let original = spec("original", 11, "jpg");
    // The same bytes ingested again under another key (another partition).
    let copy = Spec {
        key: "copy".into(),
        format: "jpg",
        bytes: original.bytes.clone(),
        cls: None,
        claimed_size: None,
    };
    // The same picture re-encoded at another quality: other bytes, same look.
    let reencoded = Spec {
        key: "reencoded".into(),
        format: "jpg",
        bytes: jpeg(&blocks(11), 40),
        cls: None,
        claimed_size: None,
    };
    assert_ne!(sha256_hex(&reencoded.bytes), sha256_hex(&original.bytes));
    assert!((dhash(&reencoded.bytes) ^ dhash(&original.bytes)).count_ones() <= 4);
    write_dataset(
        dir.path(),
        vec![
            vec![original, spec("other1", 12, "jpg"), reencoded],
            vec![spec("other2", 13, "png"), copy, spec("other3", 14, "jpg")],
        ],
    );

    let out = shards(&["dupes", "--json", path(&dir)]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = |group: &serde_json::Value| {
        let mut keys: Vec<String> = group["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["key"].as_str().unwrap().to_string())
            .collect();
        keys.sort();
        keys
    };
    let exact = json["exact"].as_array().unwrap();
    assert_eq!(exact.len(), 1);
    assert_eq!(keys(&exact[0]), ["copy", "original"]);
    let near = json["near"].as_array().unwrap();
    assert_eq!(near.len(), 1);
    assert_eq!(keys(&near[0]), ["copy", "original", "reencoded"]);

    let text = stdout(&shards(&["dupes", path(&dir)]));
    assert!(text.contains("copy  data-000001.tar"), "{text}");
    assert!(!text.contains("other"), "{text}");
}
