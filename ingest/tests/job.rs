//! End-to-end tests of the `ingest` binary on real photos, local folders and
//! real S3 (s3s-fs) and Azure (Azurite) servers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use seer_tests::WebServer;
use shards::{Manifest, SampleMeta, SampleReader, ShardIndex, ShardStats};

mod common;

use common::run_ok;

fn ingest() -> Command {
    common::ingest_with_env(&[])
}

/// The stats of the first shard of a local dataset.
fn first_shard_stats(dir: &Path) -> ShardStats {
    serde_json::from_slice(&std::fs::read(dir.join("data-000000_stats.json")).unwrap()).unwrap()
}

/// All samples of a local dataset: key -> (metadata, image bytes), checked against index and manifest.
fn read_dataset(dir: &Path) -> BTreeMap<String, (SampleMeta, Vec<u8>)> {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .unwrap();
    let mut samples = BTreeMap::new();
    for shard in &manifest.shards {
        let bytes = std::fs::read(dir.join(&shard.name)).unwrap();
        assert_eq!(bytes.len() as u64, shard.bytes, "{}", shard.name);
        let stem = shard.name.trim_end_matches(".tar");
        let index: ShardIndex =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.index.json"))).unwrap())
                .unwrap();
        let _stats: ShardStats =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}_stats.json"))).unwrap())
                .unwrap();
        let mut count = 0;
        for (sample, entry) in SampleReader::new(&bytes[..], shard.name.clone()).zip(&index.samples)
        {
            let sample = sample.unwrap();
            assert_eq!(sample.key, entry.key);
            let meta: SampleMeta =
                serde_json::from_slice(sample.get("json").expect("json member")).unwrap();
            assert_eq!(meta.key, sample.key);
            let (ext, image) = sample.image().expect("image member");
            assert_eq!(ext, meta.format);
            assert!(
                samples
                    .insert(sample.key.clone(), (meta, image.to_vec()))
                    .is_none(),
                "duplicate key {}",
                sample.key
            );
            count += 1;
        }
        assert_eq!(count, shard.samples, "{}", shard.name);
        assert_eq!(index.samples.len() as u64, shard.samples);
    }
    samples
}

fn small_photos() -> PathBuf {
    seer_tests::photos_small_dir()
}

/// The first `n` photos of one folder of the small set.
fn photos_in(folder: &str, n: usize) -> Vec<PathBuf> {
    let photos: Vec<PathBuf> = std::fs::read_dir(small_photos().join(folder))
        .unwrap()
        .map(|e| e.unwrap().path())
        .take(n)
        .collect();
    assert_eq!(
        photos.len(),
        n,
        "the small photo set has fewer than {n} photos in {folder}"
    );
    photos
}

fn count_images(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(ext) = path.extension().and_then(|e| e.to_str())
                && ingest::input::DEFAULT_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
            {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn local_folder_to_local_dataset_keeps_every_photo_with_its_dimensions() {
    let out = tempfile::tempdir().unwrap();
    let output = run_ok(
        ingest()
            .arg("run")
            .arg(small_photos())
            .arg("-o")
            .arg(out.path())
            .args(["--samples-per-shard", "16", "--no-progress", "--json"]),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let samples = read_dataset(out.path());
    let inputs = count_images(&small_photos());
    assert_eq!(
        samples.len() as u64
            + summary["failed"].as_u64().unwrap()
            + summary["duplicates"].as_u64().unwrap(),
        inputs as u64
    );
    assert_eq!(
        summary["failed"], 0,
        "every photo of the small set decodes: {summary}"
    );
    for (key, (meta, bytes)) in &samples {
        let decoded = image::load_from_memory(bytes)
            .unwrap_or_else(|e| panic!("{key} ({}) does not decode: {e}", meta.url));
        assert_eq!(
            (decoded.width(), decoded.height()),
            (meta.width, meta.height),
            "{}",
            meta.url
        );
        let short = meta.original_width.min(meta.original_height);
        assert_eq!(meta.width.min(meta.height), short.min(512), "{}", meta.url);
        assert!(meta.url.starts_with("file:///"), "{}", meta.url);
        assert_eq!(meta.key, ingest::job::sample_key(&meta.url));
    }
}

#[test]
fn rerun_is_a_no_op_and_gives_the_same_bytes() {
    let out = tempfile::tempdir().unwrap();
    let args = ["--samples-per-shard", "25", "--no-progress", "--json"];
    run_ok(
        ingest()
            .arg("run")
            .arg(small_photos())
            .arg("-o")
            .arg(out.path())
            .args(args),
    );
    let first = std::fs::read(out.path().join("manifest.json")).unwrap();
    let output = run_ok(
        ingest()
            .arg("run")
            .arg(small_photos())
            .arg("-o")
            .arg(out.path())
            .args(args),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["shards_written"], 0);
    assert_eq!(
        std::fs::read(out.path().join("manifest.json")).unwrap(),
        first
    );
    // A different job into the same output is refused, not mixed in.
    let output = ingest()
        .arg("run")
        .arg(small_photos())
        .arg("-o")
        .arg(out.path())
        .args(["--samples-per-shard", "7"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("already holds a plan"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A rerun reads what earlier runs wrote (the partition's manifest, each done shard's stats and
/// index) with the same version check as every reader: a document of another format version is
/// named and refused, not counted or mixed in, and nothing stored is touched.
#[test]
fn rerun_refuses_documents_of_another_format_version() {
    let out = tempfile::tempdir().unwrap();
    let args = ["--samples-per-shard", "25", "--no-progress"];
    let command = || {
        let mut command = ingest();
        command
            .arg("run")
            .arg(small_photos())
            .arg("-o")
            .arg(out.path())
            .args(args);
        command
    };
    run_ok(&mut command());
    for name in [
        "data-000000_stats.json",
        "data-000000.index.json",
        "manifest.json",
    ] {
        let path = out.path().join(name);
        let original = std::fs::read(&path).unwrap();
        let mut document: serde_json::Value = serde_json::from_slice(&original).unwrap();
        document["version"] = serde_json::json!(99);
        std::fs::write(&path, serde_json::to_vec(&document).unwrap()).unwrap();
        let output = command().output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains("format version 99"),
            "{name}: {stderr}"
        );
        std::fs::write(&path, &original).unwrap();
    }
    run_ok(&mut command());
}

/// A file whose name is not UTF-8 (from an old archive, say) or holds a control character is
/// ingested like any other, named by its percent-encoded URL (object_store's paths cannot
/// hold such names, so it is read with the file system's calls); the files listed after it
/// are ingested too (the listing used to end there), beside a dangling link and a link loop.
#[cfg(unix)]
#[test]
fn files_named_in_any_bytes_are_ingested_and_do_not_end_the_listing() {
    use std::os::unix::ffi::OsStrExt;
    let input = tempfile::tempdir().unwrap();
    let photos = photos_in("endless-sky", 4);
    let extension = |photo: &Path| photo.extension().unwrap().to_str().unwrap().to_string();
    let latin1 = [b"caf\xe9.".as_slice(), extension(&photos[0]).as_bytes()].concat();
    let control = [b"new\nline.".as_slice(), extension(&photos[1]).as_bytes()].concat();
    for (photo, name) in photos.iter().zip([&latin1, &control]) {
        std::fs::copy(photo, input.path().join(std::ffi::OsStr::from_bytes(name))).unwrap();
    }
    for (i, photo) in photos[2..].iter().enumerate() {
        let name = format!("p{i}.{}", extension(photo));
        std::fs::copy(photo, input.path().join(name)).unwrap();
    }
    // A dangling link is skipped, and a link back to the folder is not followed: neither
    // stops the listing either.
    std::os::unix::fs::symlink("/nonexistent/x.jpg", input.path().join("dangling.jpg")).unwrap();
    std::fs::create_dir(input.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("..", input.path().join("sub/up")).unwrap();
    let out = tempfile::tempdir().unwrap();
    run_ok(
        ingest()
            .arg("run")
            .arg(input.path())
            .arg("-o")
            .arg(out.path())
            .arg("--no-progress"),
    );
    let dataset = read_dataset(out.path());
    let stats = first_shard_stats(out.path());
    assert_eq!(stats.failures.len(), 0, "{:?}", stats.failures);
    assert_eq!(dataset.len(), 4);
    let urls: BTreeSet<&str> = dataset
        .values()
        .map(|(meta, _)| meta.url.as_str())
        .collect();
    for name in ["/caf%E9.", "/new%0Aline."] {
        assert!(
            urls.iter().any(|url| url.contains(name)),
            "{name} in {urls:?}"
        );
    }
    // The odd names' samples hold the photos' own bytes (kept JPEGs) or images of their size.
    let latin1_sample = dataset
        .values()
        .find(|(meta, _)| meta.url.contains("/caf%E9."))
        .unwrap();
    assert_eq!(
        latin1_sample.0.source_size,
        std::fs::metadata(&photos[0]).unwrap().len()
    );
    // Read that way, such a file keeps to the byte cap as a store's object does.
    let capped = tempfile::tempdir().unwrap();
    run_ok(
        ingest()
            .arg("run")
            .arg(input.path())
            .arg("-o")
            .arg(capped.path())
            .args(["--no-progress", "--max-bytes", "1000"]),
    );
    let stats = first_shard_stats(capped.path());
    assert_eq!(stats.failures.len(), 4, "{:?}", stats.failures);
    assert!(
        stats
            .failures
            .iter()
            .all(|failure| failure.reason == "too_large_bytes"),
        "{:?}",
        stats.failures
    );
}

/// A rerun does not take a shard for done because the manifest lists it: one whose tar was
/// deleted or cut short, or whose index or stats is gone, is made again, and the dataset ends
/// as the first run left it. (A document that does not parse stops the rerun, named:
/// `rerun_refuses_documents_of_another_format_version`.)
#[test]
fn a_rerun_makes_again_the_shards_damaged_since() {
    let out = tempfile::tempdir().unwrap();
    let run = || {
        let output = run_ok(
            ingest()
                .arg("run")
                .arg(small_photos())
                .arg("-o")
                .arg(out.path())
                .args(["--samples-per-shard", "8", "--no-progress", "--json"]),
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    run();
    let before = read_dataset(out.path());
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert!(
        manifest.shards.len() >= 5,
        "{} shards",
        manifest.shards.len()
    );
    let stem = |i: usize| manifest.shards[i].name.trim_end_matches(".tar").to_string();
    std::fs::remove_file(out.path().join(&manifest.shards[0].name)).unwrap();
    let cut = std::fs::read(out.path().join(&manifest.shards[1].name)).unwrap();
    std::fs::write(out.path().join(&manifest.shards[1].name), &cut[..1000]).unwrap();
    std::fs::remove_file(out.path().join(format!("{}.index.json", stem(2)))).unwrap();
    std::fs::remove_file(out.path().join(format!("{}_stats.json", stem(3)))).unwrap();
    let summary = run();
    assert_eq!(summary["shards_written"], 4, "{summary}");
    assert_eq!(read_dataset(out.path()), before);
}

#[test]
fn kill_9_then_rerun_equals_an_uninterrupted_run() {
    // A bigger input so that the job is still running when killed: the full photo set.
    let photos = seer_tests::photos_dir();
    let straight = tempfile::tempdir().unwrap();
    let interrupted = tempfile::tempdir().unwrap();
    let args = [
        "--samples-per-shard",
        "40",
        "--no-progress",
        "--workers",
        "1",
    ];
    run_ok(
        ingest()
            .arg("run")
            .arg(&photos)
            .arg("-o")
            .arg(straight.path())
            .args(args),
    );

    let mut child = ingest()
        .arg("run")
        .arg(&photos)
        .arg("-o")
        .arg(interrupted.path())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once at least one shard is published, in the middle of the next.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let manifest = std::fs::read(interrupted.path().join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok());
        if manifest.is_some_and(|m| !m.shards.is_empty()) {
            std::thread::sleep(Duration::from_millis(700));
            break;
        }
        assert!(Instant::now() < deadline, "no shard published in time");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial: Manifest =
        serde_json::from_slice(&std::fs::read(interrupted.path().join("manifest.json")).unwrap())
            .unwrap();
    let full: Manifest =
        serde_json::from_slice(&std::fs::read(straight.path().join("manifest.json")).unwrap())
            .unwrap();
    assert!(
        partial.shards.len() < full.shards.len(),
        "killed too late to test anything"
    );

    let output = run_ok(
        ingest()
            .arg("run")
            .arg(&photos)
            .arg("-o")
            .arg(interrupted.path())
            .args(args)
            .arg("--json"),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        summary["shards_skipped"].as_u64().unwrap(),
        partial.shards.len() as u64,
        "completed shards are not redone"
    );
    let resumed: Manifest =
        serde_json::from_slice(&std::fs::read(interrupted.path().join("manifest.json")).unwrap())
            .unwrap();
    // Same shards with the same checksums: no duplicate, no missing sample, same bytes.
    assert_eq!(resumed, full);
    let a = read_dataset(straight.path());
    let b = read_dataset(interrupted.path());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
}

#[test]
fn exact_duplicates_are_written_once_and_labels_come_from_folders() {
    let input = tempfile::tempdir().unwrap();
    let photos = photos_in("endless-sky", 3);
    // The class is the first folder below the input, however deep the file (Tiny-ImageNet
    // keeps its training photos in CLASS/images/).
    for (folder, files) in [("cats", &photos[..2]), ("dogs/images", &photos[..])] {
        std::fs::create_dir_all(input.path().join(folder)).unwrap();
        for file in files {
            std::fs::copy(
                file,
                input.path().join(folder).join(file.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    let out = tempfile::tempdir().unwrap();
    let output = run_ok(
        ingest()
            .arg("run")
            .arg(input.path())
            .arg("-o")
            .arg(out.path())
            .args(["--labels-from-folders", "--no-progress", "--json"]),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["written"], 3);
    assert_eq!(summary["duplicates"], 2);
    let samples = read_dataset(out.path());
    let labels: BTreeSet<_> = samples
        .values()
        .map(|(m, _)| m.cls.clone().unwrap())
        .collect();
    assert!(
        labels.iter().all(|l| l == "cats" || l == "dogs"),
        "{labels:?}"
    );
    let hashes: BTreeSet<_> = samples.values().map(|(m, _)| m.sha256.clone()).collect();
    assert_eq!(hashes.len(), 3);
}

#[test]
fn list_file_with_labels_and_retry_of_failed_samples() {
    let dir = tempfile::tempdir().unwrap();
    let photos = photos_in("endless-sky", 4);
    let late = dir.path().join("late.jpg");
    let mut csv = String::from("label,url\n");
    for (i, p) in photos.iter().enumerate() {
        csv.push_str(&format!("class{},{}\n", i % 2, p.display()));
    }
    csv.push_str(&format!("late,{}\n", late.display()));
    let list = dir.path().join("list.csv");
    std::fs::write(&list, csv).unwrap();
    let out = dir.path().join("out");
    let args = [
        "--list",
        "--label-column",
        "label",
        "--no-progress",
        "--json",
    ];
    let output = run_ok(
        ingest()
            .arg("run")
            .arg(&list)
            .arg("-o")
            .arg(&out)
            .args(args),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(4), Some(1))
    );
    let stats = first_shard_stats(&out);
    assert_eq!(stats.failures.len(), 1);
    assert_eq!(stats.failures[0].reason, "not_found");
    assert!(stats.failures[0].url.ends_with("late.jpg"));
    let before = read_dataset(&out);

    // The missing file appears; --retry-failed fetches only it and keeps the rest as they were.
    let other = photos_in("endless-sky-2x", 1).remove(0);
    std::fs::copy(other, &late).unwrap();
    let output = run_ok(
        ingest()
            .arg("run")
            .arg(&list)
            .arg("-o")
            .arg(&out)
            .args(args)
            .arg("--retry-failed"),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    let after = read_dataset(&out);
    assert_eq!(after.len(), 5);
    for (key, (meta, bytes)) in &before {
        assert_eq!(&after[key].1, bytes, "{key} changed");
        assert_eq!(&after[key].0, meta);
    }
    let late_sample = after
        .values()
        .find(|(m, _)| m.url.ends_with("late.jpg"))
        .unwrap();
    assert_eq!(late_sample.0.cls.as_deref(), Some("late"));
    let stats = first_shard_stats(&out);
    assert_eq!(
        (stats.successes, stats.failed, stats.failures.len()),
        (5, 0, 0)
    );
}

#[test]
fn a_list_naming_a_fifo_or_a_folder_finishes_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.jpg");
    seer_tests::make_fifo(&fifo);
    let folder = dir.path().join("folder.jpg");
    std::fs::create_dir(&folder).unwrap();
    let mut lines: Vec<String> = photos_in("endless-sky", 2)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    lines.push(fifo.display().to_string());
    lines.push(folder.display().to_string());
    let list = dir.path().join("list.txt");
    std::fs::write(&list, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    // Opening the FIFO would wait for a writer for ever: the job must end on its own.
    let mut child = ingest()
        .arg("run")
        .arg(&list)
        .args(["--list", "--no-progress", "--json", "-o"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("ingest still runs after 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(2)),
        "{summary}"
    );
    let stats = first_shard_stats(&out);
    let reasons: BTreeSet<_> = stats.failures.iter().map(|f| f.reason.as_str()).collect();
    assert_eq!(reasons, BTreeSet::from(["not_a_file"]));
}

#[test]
fn a_fifo_in_a_listed_folder_fails_alone_named() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for (i, photo) in photos_in("endless-sky", 2).iter().enumerate() {
        std::fs::copy(photo, input.join(format!("{i}.jpg"))).unwrap();
    }
    seer_tests::make_fifo(&input.join("pipe.jpg"));
    // A FIFO without an image's name is not planned at all.
    seer_tests::make_fifo(&input.join("pipe.txt"));
    let out = dir.path().join("out");
    let output = run_ok(
        ingest()
            .arg("run")
            .arg(&input)
            .args(["--no-progress", "--json", "-o"])
            .arg(&out),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(2), Some(1)),
        "{summary}"
    );
    let stats = first_shard_stats(&out);
    assert_eq!(stats.failures.len(), 1);
    assert_eq!(stats.failures[0].reason, "not_a_file");
    assert!(
        stats.failures[0].url.ends_with("pipe.jpg"),
        "{:?}",
        stats.failures[0]
    );
}

#[test]
fn partitions_write_disjoint_shards_and_merge_to_the_single_run() {
    let single = tempfile::tempdir().unwrap();
    let parts = tempfile::tempdir().unwrap();
    let args = ["--samples-per-shard", "9", "--no-progress"];
    run_ok(
        ingest()
            .arg("run")
            .arg(small_photos())
            .arg("-o")
            .arg(single.path())
            .args(args),
    );
    // Partition 1 starts first and waits for partition 0's plan.
    let mut second = ingest()
        .arg("run")
        .arg(small_photos())
        .arg("-o")
        .arg(parts.path())
        .args(args)
        .args(["--partition", "1/2"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    run_ok(
        ingest()
            .arg("run")
            .arg(small_photos())
            .arg("-o")
            .arg(parts.path())
            .args(args)
            .env("SLURM_ARRAY_TASK_ID", "0")
            .env("SLURM_ARRAY_TASK_COUNT", "2"),
    );
    assert!(second.wait().unwrap().success());
    assert!(
        !parts.path().join("manifest.json").exists(),
        "partitions write their own manifests"
    );
    // A stale manifest.json beside the partitions' (one of a format this build does not
    // read, say) is replaced by the merge, not read.
    std::fs::write(parts.path().join("manifest.json"), r#"{"version": 99}"#).unwrap();
    run_ok(ingest().arg("merge").arg(parts.path()));
    let a: Manifest =
        serde_json::from_slice(&std::fs::read(single.path().join("manifest.json")).unwrap())
            .unwrap();
    let b: Manifest =
        serde_json::from_slice(&std::fs::read(parts.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(a, b);

    // A run with another partition count (here none: 0/1, as a Slurm array of one resubmitted
    // index gives) would remake the other partitions' shards under the same names: refused.
    let tars = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let before = tars(parts.path());
    let output = ingest()
        .arg("run")
        .arg(small_photos())
        .arg("-o")
        .arg(parts.path())
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("partitions (the N of --partition I/N): 2 in the plan, 1 in this run"),
        "{stderr}"
    );
    assert!(tars(parts.path()) == before, "the shards were rewritten");

    // A shard cut short, or gone, after its partition finished: merge refuses to publish it.
    let shard = parts.path().join(&b.shards[0].name);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let other = parts.path().join(&b.shards[1].name);
    std::fs::remove_file(&other).unwrap();
    std::fs::remove_file(parts.path().join("manifest.json")).unwrap();
    let output = ingest().arg("merge").arg(parts.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let cut = format!(
        "{} holds {} bytes, its partition wrote {}",
        b.shards[0].name,
        bytes.len() / 2,
        bytes.len()
    );
    let gone = format!("{} is missing", b.shards[1].name);
    assert!(stderr.contains(&cut) && stderr.contains(&gone), "{stderr}");
    assert!(!parts.path().join("manifest.json").exists(), "{stderr}");

    // A partition whose manifest is gone has not finished: its shards are named as missing.
    let part = parts.path().join("_parts/manifest-00001-of-00002.json");
    let lost: Manifest = serde_json::from_slice(&std::fs::read(&part).unwrap()).unwrap();
    std::fs::remove_file(&part).unwrap();
    let output = ingest().arg("merge").arg(parts.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} of {} planned shards are not complete yet",
            lost.shards.len(),
            b.shards.len()
        )) && stderr.contains(&lost.shards[0].name),
        "{stderr}"
    );
}

fn max_child_rss_kib() -> i64 {
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage), 0);
        usage.ru_maxrss
    }
}

#[test]
fn hostile_inputs_never_crash_and_every_bad_file_is_listed_with_its_reason() {
    let hostile = seer_tests::hostile_dir();
    let out = tempfile::tempdir().unwrap();
    let output = run_ok(
        ingest()
            .arg("run")
            .arg(&hostile)
            .arg("-o")
            .arg(out.path())
            .args([
                "--max-failure-rate",
                "1",
                "--no-progress",
                "--json",
                "--samples-per-shard",
                "200",
            ])
            .env("RUST_BACKTRACE", "1"),
    );
    // Panics the decoders raise are caught and recorded as failures (below), not printed: the
    // log on stderr stays one JSON object per line, without backtraces.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON log line: {line}"
        );
    }
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let samples = read_dataset(out.path());
    let inputs = count_images(&hostile) as u64;
    let failed = summary["failed"].as_u64().unwrap();
    assert_eq!(
        samples.len() as u64 + failed + summary["duplicates"].as_u64().unwrap(),
        inputs
    );
    assert!(
        failed > 20,
        "the hostile set holds many bad files: {summary}"
    );
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    let mut listed = 0;
    let mut reasons = BTreeMap::new();
    for shard in &manifest.shards {
        let stats: ShardStats = serde_json::from_slice(
            &std::fs::read(out.path().join(shard.name.replace(".tar", "_stats.json"))).unwrap(),
        )
        .unwrap();
        for failure in &stats.failures {
            assert!(
                !failure.reason.is_empty() && !failure.message.is_empty(),
                "{failure:?}"
            );
            *reasons.entry(failure.reason.clone()).or_insert(0) += 1;
            listed += 1;
        }
    }
    assert_eq!(listed, failed);
    for expected in ["too_many_pixels", "undecodable"] {
        assert!(
            reasons.contains_key(expected),
            "no {expected} among {reasons:?}"
        );
    }
    // Bombs are refused from their headers: the job never approaches their claimed sizes.
    let rss_mib = max_child_rss_kib() / 1024;
    assert!(rss_mib < 3 * 1024, "peak RSS of a child was {rss_mib} MiB");
}

#[test]
fn too_many_failures_stop_the_job_with_a_clear_message_and_keep_completed_shards() {
    let input = tempfile::tempdir().unwrap();
    let good = photos_in("endless-sky", 4);
    for (i, p) in good.iter().enumerate() {
        std::fs::copy(p, input.path().join(format!("a{i}.jpg"))).unwrap();
    }
    for i in 0..300 {
        std::fs::write(
            input.path().join(format!("z{i:03}.jpg")),
            format!("not an image {i}"),
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let run = || {
        ingest()
            .arg("run")
            .arg(input.path())
            .arg("-o")
            .arg(out.path())
            .args([
                "--samples-per-shard",
                "4",
                "--no-progress",
                "--workers",
                "1",
                "--fetch-concurrency",
                "1",
            ])
            .output()
            .unwrap()
    };
    let output = run();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("more than the allowed rate of 0.5")
            && stderr.contains("unsupported_format"),
        "{stderr}"
    );
    assert!(read_dataset(out.path()).len() <= 4);
    // Every shard before the one that stopped the job is published and listed, including the
    // one whose upload ran while the stopping shard was being made.
    let stopped_in: u64 = stderr
        .split("in shard data-")
        .nth(1)
        .and_then(|rest| rest.get(..6))
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no shard named in: {stderr}"));
    assert!(stopped_in > 0, "{stderr}");
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    let listed: Vec<&str> = manifest.shards.iter().map(|s| s.name.as_str()).collect();
    let expected: Vec<String> = (0..stopped_in)
        .map(|id| format!("data-{id:06}.tar"))
        .collect();
    assert_eq!(listed, expected);
    // The same command again: the rate counts the completed shards' failures, so the rerun
    // stops at its first failure instead of making the rest of the shards (it has not seen
    // 200 sources itself), and lists nothing more.
    let rerun = run();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(!rerun.status.success(), "{stderr}");
    assert!(
        stderr.contains("shards completed by earlier runs included"),
        "{stderr}"
    );
    let again: Manifest =
        serde_json::from_slice(&std::fs::read(out.path().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(again.shards.len(), manifest.shards.len());
}

#[test]
fn list_of_http_urls_is_fetched_from_a_plain_web_server() {
    // Python's standard web server on a free loopback port serves the small photo set.
    let server = WebServer::start(&small_photos().join("endless-sky"));
    let url = server.url();
    let names: Vec<String> = std::fs::read_dir(small_photos().join("endless-sky"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    let mut text: String = names.iter().map(|n| format!("{url}/{n}\n")).collect();
    text.push_str(&format!("{url}/missing.jpg\n"));
    let (dir, output) = ingest_list(&text);
    drop(server);
    let out = dir.path().join("out");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(names.len() as u64), Some(1)),
        "{summary}"
    );
    let samples = read_dataset(&out);
    assert!(
        samples
            .values()
            .all(|(m, _)| m.url.starts_with(&format!("{url}/")))
    );
}

/// Runs `ingest run LIST --list -o OUT --no-progress --json` on the list `text`, logging at
/// `info` (JSON lines), and expects it to succeed; returns its folder (`out` inside) and output.
fn ingest_list(text: &str) -> (tempfile::TempDir, std::process::Output) {
    ingest_list_with(text, &[])
}

/// [`ingest_list`] with more arguments.
fn ingest_list_with(text: &str, args: &[&str]) -> (tempfile::TempDir, std::process::Output) {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("urls.txt");
    std::fs::write(&list, text).unwrap();
    let output = run_ok(
        ingest()
            .env("RUST_LOG", "info")
            .arg("run")
            .arg(&list)
            .arg("--list")
            .arg("-o")
            .arg(dir.path().join("out"))
            .args(["--no-progress", "--json"])
            .args(args),
    );
    (dir, output)
}

/// [`ingest_list`] on one photo of the small set served by a [`WebServer`] twice: plainly, and
/// under `/{special}/` (one of its misbehaving paths).
fn ingest_plain_and(special: &str) -> (tempfile::TempDir, std::process::Output) {
    ingest_plain_and_with(special, &[])
}

/// [`ingest_plain_and`] with more arguments.
fn ingest_plain_and_with(
    special: &str,
    args: &[&str],
) -> (tempfile::TempDir, std::process::Output) {
    let folder = small_photos().join("endless-sky");
    let server = WebServer::start(&folder);
    let entry = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap();
    let (url, name) = (server.url(), entry.file_name());
    let name = name.to_string_lossy();
    let query = if special == "signed" { "?sig=abc" } else { "" };
    let result = ingest_list_with(
        &format!("{url}/{name}\n{url}/{special}/{name}{query}\n"),
        args,
    );
    drop(server);
    result
}

/// The one failure of a run of two sources (an [`ingest_plain_and`] run, say), after checking
/// that the other source was written.
fn the_failure(dir: &tempfile::TempDir, output: &std::process::Output) -> shards::meta::Failure {
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(1)),
        "{summary}"
    );
    let mut stats = first_shard_stats(&dir.path().join("out"));
    assert_eq!(stats.failures.len(), 1, "{:?}", stats.failures);
    stats.failures.pop().unwrap()
}

/// Checks an [`ingest_plain_and`] run of `special` where both sources were fetched: the same
/// bytes twice, so the second copy is dropped as a duplicate and nothing failed.
fn assert_second_copy_was_a_duplicate(output: &std::process::Output, special: &str) {
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["failed"].as_u64(), summary["duplicates"].as_u64()),
        (Some(0), Some(1)),
        "{special}: {summary}"
    );
}

#[test]
fn a_source_the_store_refuses_fails_at_once_as_permission_denied() {
    let (dir, output) = ingest_plain_and("forbidden");
    let failure = the_failure(&dir, &output);
    assert_eq!(failure.reason, "permission_denied", "{failure:?}");
    assert!(failure.url.contains("/forbidden/"), "{failure:?}");
    assert!(
        !failure.message.contains("attempts"),
        "asked once: {failure:?}"
    );
}

#[test]
fn a_url_that_does_not_parse_fails_alone_as_bad_url_instead_of_stopping_the_plan() {
    let photo = &photos_in("endless-sky", 1)[0];
    for bad in [
        "http://127.0.0.1:99999/x.jpg",
        "http://[::1:8080/x.jpg",
        "http://",
    ] {
        let (dir, output) = ingest_list(&format!("{}\n{bad}\n", photo.display()));
        let failure = the_failure(&dir, &output);
        assert_eq!(failure.reason, "bad_url", "{failure:?}");
        assert_eq!(failure.url, bad);
        assert!(failure.message.starts_with("bad URL: "), "{failure:?}");
    }
}

#[test]
fn a_url_too_long_for_a_request_fails_alone_instead_of_crashing_the_job() {
    // Before the check, the HTTP client under object_store panicked on it: exit 101, and
    // every rerun of the job again.
    let photo = std::fs::read_dir(small_photos().join("endless-sky"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let long = format!("http://127.0.0.1:9/{}.jpg", "L".repeat(70_000));
    let (dir, output) = ingest_list(&format!("{}\n{long}\n", photo.display()));
    let failure = the_failure(&dir, &output);
    assert_eq!(failure.reason, "bad_url");
    assert!(
        failure.message.contains("once encoded"),
        "{:?}",
        failure.message
    );
}

#[test]
fn http_sources_keep_their_query_and_may_omit_the_length() {
    for special in ["signed", "nolength"] {
        let (_dir, output) = ingest_plain_and(special);
        assert_second_copy_was_a_duplicate(&output, special);
    }
}

#[test]
fn a_client_error_fails_at_once_and_server_errors_are_retried() {
    let (dir, output) = ingest_plain_and("status/451");
    let failure = the_failure(&dir, &output);
    assert_eq!(failure.reason, "fetch", "{failure:?}");
    assert!(failure.message.contains("451"), "{failure:?}");
    assert!(
        !failure.message.contains("attempts"),
        "asked once: {failure:?}"
    );

    let (dir, output) = ingest_plain_and("tofile");
    let failure = the_failure(&dir, &output);
    assert_eq!(failure.reason, "fetch", "{failure:?}");
    assert!(
        failure
            .message
            .contains(r#"302 Found, a redirect to "file:///etc/passwd", which is not followed"#),
        "{failure:?}"
    );

    // Followed to a missing object, the failure names where the redirect led.
    let (dir, output) = ingest_plain_and("moved/status/404");
    let failure = the_failure(&dir, &output);
    assert_eq!(failure.reason, "not_found", "{failure:?}");
    let (listed, _) = failure.url.split_once("/moved").unwrap();
    assert!(
        failure
            .message
            .contains(&format!("404 Not Found at {listed}/status/404/"))
            && failure.message.ends_with(", where it was redirected"),
        "{failure:?}"
    );

    let (dir, output) = ingest_plain_and("status/502");
    let failure = the_failure(&dir, &output);
    assert_eq!(failure.reason, "fetch", "{failure:?}");
    assert!(failure.message.contains("502"), "{failure:?}");
    assert!(failure.message.contains("after 4 attempts"), "{failure:?}");
}

#[test]
fn a_certificate_the_client_does_not_trust_fails_at_once_unless_the_store_option_accepts_it() {
    let folder = small_photos().join("endless-sky");
    let name = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap();
    let name = name.file_name();
    let name = name.to_string_lossy();
    let (https, http) = (WebServer::start_tls(&folder), WebServer::start(&folder));
    // The photo over HTTPS, and another copy that asks the plain server for TLS.
    let list = format!(
        "{}/{name}\n{}/{name}\n",
        https.url(),
        http.url().replace("http://", "https://")
    );

    let (dir, output) = ingest_list(&list);
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["failed"].as_u64(), Some(2), "{summary}");
    let failures = first_shard_stats(&dir.path().join("out")).failures;
    let untrusted = failures.iter().find(|f| f.url.starts_with(&https.url()));
    let untrusted = untrusted.unwrap_or_else(|| panic!("{failures:?}"));
    for failure in &failures {
        assert_eq!(failure.reason, "fetch", "{failure:?}");
        assert!(
            !failure.message.contains("attempts"),
            "asked once: {failure:?}"
        );
    }
    assert!(
        untrusted.message.contains("invalid peer certificate")
            && untrusted
                .message
                .contains("allow_invalid_certificates=true accepts"),
        "{untrusted:?}"
    );

    // Told to accept it, the client fetches the photo (the plain server stays no TLS server).
    let (_dir, output) = ingest_list_with(
        &list,
        &["--store-option", "allow_invalid_certificates=true"],
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(1)),
        "{summary}"
    );
}

#[test]
fn a_busy_server_is_asked_again_after_the_wait_it_names() {
    // The server answers 503 with Retry-After: 3 s (or the date 3 s ahead) once, then the
    // photo: it is fetched, and dropped as a duplicate of the plain copy.
    for special in ["busy", "busydate"] {
        let started = Instant::now();
        let (_dir, output) = ingest_plain_and(special);
        assert_second_copy_was_a_duplicate(&output, special);
        // The first pause without Retry-After would be 1 s. A date has whole seconds, so
        // it may name a moment up to 1 s nearer.
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{special}: {:?}",
            started.elapsed()
        );
    }
    // A server that asks for an hour is given up on at once.
    let (dir, output) = ingest_plain_and("toobusy");
    let failure = the_failure(&dir, &output);
    assert!(
        failure.message.contains(
            "asks to wait 3600 s, more than the 60 s a source may wait (after 1 attempt)"
        ),
        "{failure:?}"
    );
}

#[test]
fn web_sources_follow_the_client_store_options() {
    // The server serves /agent/ only to the agent named.
    let (_dir, output) =
        ingest_plain_and_with("agent", &["--store-option", "user_agent=seer-test-agent"]);
    assert_second_copy_was_a_duplicate(&output, "agent");

    // Through the server as a proxy, a host that cannot be reached (port 1) is read.
    let folder = small_photos().join("endless-sky");
    let server = WebServer::start(&folder);
    let entry = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap();
    let name = entry.file_name();
    let proxy = format!("proxy_url={}", server.url());
    let list = format!("http://127.0.0.1:1/viaproxy/{}\n", name.to_string_lossy());
    let (_dir, output) = ingest_list_with(&list, &["--store-option", &proxy]);
    drop(server);
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(0)),
        "{summary}"
    );

    // A proxy URL that cannot be one stops the job before it starts, named.
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("urls.txt");
    std::fs::write(&list, "http://127.0.0.1:1/a.jpg\n").unwrap();
    let output = ingest()
        .arg("run")
        .arg(&list)
        .args([
            "--list",
            "--no-progress",
            "--store-option",
            "proxy_url=::bad",
        ])
        .arg("-o")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--store-option proxy_url=::bad: builder error: relative URL"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists(), "{stderr}");
}

#[test]
fn a_request_that_outlasts_timeout_is_tried_again_then_fails() {
    // The slow path answers after 15 s; with --timeout 1 each of the 4 attempts gives up
    // (without the option the source would be fetched, and dropped as a duplicate).
    let (dir, output) = ingest_plain_and_with("slow", &["--timeout", "1"]);
    let failure = the_failure(&dir, &output);
    assert_eq!(failure.reason, "fetch", "{failure:?}");
    assert!(failure.message.contains("timed out"), "{failure:?}");
    assert!(failure.message.contains("after 4 attempts"), "{failure:?}");

    for bad in ["0", "-1", "soon", "1e-9", "1e20"] {
        let output = ingest()
            .args(["run", "in", &format!("--timeout={bad}")])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--timeout"), "{stderr}");
    }
}

#[test]
fn progress_is_logged_while_every_source_in_flight_is_stalled() {
    let (_dir, output) = ingest_plain_and("slow");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // A line logged while the slow source was in flight: one of two done.
    assert!(
        stderr
            .lines()
            .any(|line| line.contains(r#""message":"progress""#)
                && line.contains(r#""done":1,"#)
                && line.contains(r#""total":2,"#)),
        "{stderr}"
    );
}

#[test]
fn a_job_that_fails_before_writing_leaves_no_output_folder_behind() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("new/out");
    let result = ingest()
        .arg("run")
        .arg(dir.path().join("no-such-input"))
        .arg("-o")
        .arg(&output)
        .arg("--no-progress")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{stderr}");
    assert!(stderr.contains("no-such-input"), "{stderr}");
    assert!(!dir.path().join("new").exists(), "{stderr}");
}

#[test]
fn a_partition_count_this_worker_does_not_use_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    let run = |args: &[&str], index: Option<&str>| {
        let mut command = ingest();
        command
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("INGEST_PARTITIONS")
            .arg("run")
            .arg(small_photos())
            .arg("-o")
            .arg(&output)
            .arg("--no-progress")
            .args(args);
        if let Some(index) = index {
            command.env("JOB_COMPLETION_INDEX", index);
        }
        let result = command.output().unwrap();
        (
            result.status.code(),
            String::from_utf8_lossy(&result.stderr).into_owned(),
        )
    };
    // No index: the worker would have run alone, as 0/1.
    let (code, stderr) = run(&["--partitions=3"], None);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--partitions 3 (or INGEST_PARTITIONS) but this worker's partition is 0/1"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--partition", "0/2", "--partitions", "3"], None);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("this worker's partition is 0/2"),
        "{stderr}"
    );
    assert!(!output.exists());
    // With the index the count belongs to, the job runs.
    let (code, stderr) = run(&["--partitions", "1"], Some("0"));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_relative_input_is_planned_as_the_folder_it_names_from_where_it_ran() {
    let dir = tempfile::tempdir().unwrap();
    let photos = photos_in("endless-sky", 2);
    for (parent, photo) in ["a", "b"].iter().zip(&photos) {
        let folder = dir.path().join(parent).join("img");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(photo, folder.join(photo.file_name().unwrap())).unwrap();
    }
    let output = dir.path().join("out");
    let run = |from: &str| {
        ingest()
            .current_dir(dir.path().join(from))
            .args(["run", "img", "-o"])
            .arg(&output)
            .arg("--no-progress")
            .output()
            .unwrap()
    };
    assert!(run("a").status.success());
    // "img" from b is another folder: not a rerun of a's job.
    let result = run("b");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("already holds a plan for another job: input:")
            && stderr.contains(&format!(
                "{} in the plan",
                dir.path().join("a/img").display()
            )),
        "{stderr}"
    );
    assert!(run("a").status.success());
    // A file: URL with one slash is a URL, not a relative path: the same folder, the same job.
    let url = format!("file:{}", dir.path().join("a/img").display());
    run_ok(
        ingest()
            .args(["run", &url, "-o"])
            .arg(&output)
            .arg("--no-progress"),
    );
}

#[test]
fn a_source_listed_twice_is_written_once_even_when_it_answers_other_bytes() {
    let folder = small_photos().join("endless-sky");
    let server = WebServer::start(&folder);
    let name = std::fs::read_dir(&folder).unwrap().next().unwrap().unwrap();
    let url = format!(
        "{}/changing/{}",
        server.url(),
        name.file_name().to_string_lossy()
    );
    // Twice in one shard, and once more in the next.
    let (dir, output) = ingest_list_with(
        &format!("{url}\n{url}\n{url}\n"),
        &["--samples-per-shard", "2"],
    );
    drop(server);
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (summary["written"].as_u64(), summary["duplicates"].as_u64()),
        (Some(1), Some(2)),
        "{summary}"
    );
    // One sample under the source's key (read_dataset refuses a key seen twice).
    let samples = read_dataset(&dir.path().join("out"));
    assert_eq!(samples.len(), 1);
}
