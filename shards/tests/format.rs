//! Round trips and property tests of the shard format, and proof that
//! standard tools (GNU tar, Python's tarfile, the webdataset package) read it.

use std::process::Command;

use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use shards::reader::parse_indexed_sample;
use shards::{SampleReader, ShardStream, ShardWriter};

type SampleSpec = (String, Vec<(String, Vec<u8>)>);

/// `count` samples keyed PREFIX0, PREFIX1, ..., each a `size`-byte .jpg of its number and an
/// empty .json.
fn jpg_samples(prefix: &str, count: usize, size: usize) -> Vec<SampleSpec> {
    (0..count)
        .map(|i| {
            (
                format!("{prefix}{i}"),
                vec![
                    ("jpg".into(), vec![i as u8; size]),
                    ("json".into(), b"{}".to_vec()),
                ],
            )
        })
        .collect()
}

/// The streaming reader over `bytes` delivered in chunks of `size` bytes (chunk ends fall
/// anywhere in headers and members).
fn stream_in_chunks(bytes: &[u8], size: usize) -> ShardStream {
    let chunks: Vec<object_store::Result<Bytes>> = bytes
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    ShardStream::from_stream(
        futures::stream::iter(chunks).boxed(),
        "t-000000.tar",
        1 << 20,
    )
}

fn write(samples: &[SampleSpec]) -> shards::FinishedShard<Vec<u8>> {
    let mut writer = ShardWriter::new(Vec::new(), "t-000000.tar");
    for (key, members) in samples {
        let members: Vec<(&str, &[u8])> = members
            .iter()
            .map(|(e, d)| (e.as_str(), d.as_slice()))
            .collect();
        writer.add(key, &members).unwrap();
    }
    writer.finish().unwrap()
}

fn samples_strategy() -> impl Strategy<Value = Vec<SampleSpec>> {
    let member = (
        prop::sample::select(vec!["jpg", "json", "png", "cls", "seg.png"]),
        prop::collection::vec(any::<u8>(), 0..1500),
    );
    prop::collection::vec(prop::collection::vec(member, 1..4), 0..12).prop_map(|samples| {
        samples
            .into_iter()
            .enumerate()
            .map(|(i, members)| {
                let mut seen = std::collections::BTreeSet::new();
                let members = members
                    .into_iter()
                    .filter(|(e, _)| seen.insert(*e))
                    .map(|(e, d)| (e.to_string(), d))
                    .collect();
                (format!("k{i:04}"), members)
            })
            .collect()
    })
}

/// Holds an image member and `KEY.json`: a whole sample of the format.
fn is_format_sample(members: &[(String, Vec<u8>)]) -> bool {
    members.iter().any(|(e, _)| e == "json")
        && members
            .iter()
            .any(|(e, _)| shards::reader::IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// The samples read from `bytes` by both readers (which must agree) up to the first error,
/// and that error.
fn read_until_error(bytes: &[u8]) -> (Vec<SampleSpec>, Option<String>) {
    let spec = |s: shards::Sample| -> SampleSpec {
        let members = s
            .members
            .into_iter()
            .map(|(e, d)| (e, d.to_vec()))
            .collect();
        (s.key, members)
    };
    let mut yielded = Vec::new();
    let mut error = None;
    for item in SampleReader::new(bytes, "t-000000.tar") {
        match item {
            Ok(s) => yielded.push(spec(s)),
            Err(e) => error = Some(e.to_string()),
        }
    }
    // The stream reader, in chunks that end anywhere.
    let mut stream = stream_in_chunks(bytes, 333);
    let mut streamed = Vec::new();
    let stream_error = futures::executor::block_on(async {
        loop {
            match stream.next().await {
                Ok(Some(s)) => streamed.push(spec(s)),
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        }
    });
    assert_eq!(yielded, streamed, "both readers read the same samples");
    assert_eq!(error, stream_error, "both readers give the same error");
    (yielded, error)
}

fn read_all(bytes: &[u8]) -> Result<Vec<SampleSpec>, shards::ShardError> {
    SampleReader::new(bytes, "t-000000.tar")
        .map(|s| {
            s.map(|s| {
                (
                    s.key,
                    s.members
                        .into_iter()
                        .map(|(e, d)| (e, d.to_vec()))
                        .collect(),
                )
            })
        })
        .collect()
}

proptest! {
    #[test]
    fn round_trip(samples in samples_strategy()) {
        let finished = write(&samples);
        prop_assert_eq!(finished.out.len() % 512, 0);
        prop_assert_eq!(read_all(&finished.out).unwrap(), samples.clone());
        // Every index entry reads back its sample with one ranged read.
        for (entry, (key, members)) in finished.index.samples.iter().zip(&samples) {
            let range = &finished.out[entry.offset as usize..(entry.offset + entry.size) as usize];
            let sample = parse_indexed_sample(Bytes::copy_from_slice(range), "t", entry).unwrap();
            prop_assert_eq!(&sample.key, key);
            prop_assert_eq!(sample.members.len(), members.len());
        }
    }

    #[test]
    fn truncation_yields_the_whole_samples_before_it_and_no_cut_one(samples in samples_strategy(), cut in 0usize..100_000) {
        let finished = write(&samples);
        let cut = cut % finished.out.len().max(1);
        let (yielded, error) = read_until_error(&finished.out[..cut]);
        // A cut archive always ends in an error naming the shard ...
        let error = error.expect("a truncated shard must give an error");
        prop_assert!(error.contains("t-000000.tar"), "{}", error);
        // ... every sample it yielded before is the one written there, with members that
        // end before the cut ...
        prop_assert!(yielded.len() <= samples.len());
        for (sample, (entry, (key, members))) in yielded.iter().zip(finished.index.samples.iter().zip(&samples)) {
            prop_assert_eq!(&sample.0, key);
            prop_assert!(sample.1.len() <= members.len());
            prop_assert_eq!(&sample.1[..], &members[..sample.1.len()]);
            for (ext, _) in &sample.1 {
                let span = entry.members[ext];
                prop_assert!(span.offset + span.size <= cut as u64);
            }
            // ... and misses a member only when the cut fell between its members and it
            // holds what the format calls a sample (an image and KEY.json): nothing says
            // another member would have followed.
            if sample.1.len() < members.len() {
                prop_assert!(is_format_sample(&sample.1), "{:?}", sample.1);
            }
        }
        // Every sample before the cut is yielded; the last of them may be held back only when
        // the cut falls before the next header and it lacks an image or KEY.json.
        let whole = finished.index.samples.iter().take_while(|e| e.offset + e.size <= cut as u64).count();
        let next_header_read = match finished.index.samples.get(whole) {
            Some(next) => next.offset + 512 <= cut as u64,
            None => false, // the end-of-archive marker is the last 1024 bytes: never whole here
        };
        let least = if whole > 0 && !next_header_read && !is_format_sample(&samples[whole - 1].1) {
            whole - 1
        } else {
            whole
        };
        prop_assert!(yielded.len() >= least, "{} samples of {} whole ones", yielded.len(), whole);
    }

    #[test]
    fn corruption_is_detected_or_harmless(samples in samples_strategy(), at in 0usize..100_000, flip in 1u8..=255) {
        let finished = write(&samples);
        prop_assume!(!finished.out.is_empty());
        let mut bytes = finished.out.clone();
        let at = at % bytes.len();
        bytes[at] ^= flip;
        // A flipped byte inside member data is invisible to tar (the manifest's
        // checksum catches it); anywhere else it must be an error, never a panic.
        let _ = read_all(&bytes);
    }
}

#[test]
fn a_corrupt_sample_read_through_the_index_names_its_offset_in_the_shard() {
    let samples = jpg_samples("k", 3, 700);
    let finished = write(&samples);
    let entry = &finished.index.samples[2];
    assert!(entry.offset > 0);
    let mut range =
        finished.out[entry.offset as usize..(entry.offset + entry.size) as usize].to_vec();
    range[148..156].fill(0xff); // the header's checksum field
    let error = parse_indexed_sample(Bytes::from(range), "t-000000.tar", entry)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("bad tar header at byte {}", entry.offset)),
        "{error}"
    );
    // An index entry whose end overflows is an error naming the sample, not a panic.
    let mut huge = entry.clone();
    huge.size = u64::MAX;
    let store = object_store::memory::InMemory::new();
    let error = futures::executor::block_on(shards::reader::read_indexed_sample(
        &store,
        &object_store::path::Path::from("t-000000.tar"),
        "t-000000.tar",
        &huge,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("sample k2") && error.contains("2^64"),
        "{error}"
    );
}

#[tokio::test]
async fn streaming_reads_in_small_chunks_and_names_the_offset_of_truncation() {
    let samples = jpg_samples("s", 5, 3000);
    let finished = write(&samples);
    let mut stream = stream_in_chunks(&finished.out, 777);
    let mut keys = Vec::new();
    while let Some(sample) = stream.next().await.unwrap() {
        keys.push(sample.key);
    }
    assert_eq!(keys, ["s0", "s1", "s2", "s3", "s4"]);

    let cut = finished.index.samples[3].offset as usize + 1000;
    let mut stream = stream_in_chunks(&finished.out[..cut], cut);
    let mut got = 0;
    let err = loop {
        match stream.next().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("truncated shard read to the end"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        got, 3,
        "samples 0..3 are whole (3's header says 2 is over); 3 was cut and is not yielded"
    );
    let message = err.to_string();
    assert!(
        message.contains("t-000000.tar") && message.contains(&format!("byte {cut}")),
        "{message}"
    );
}

#[test]
fn every_whole_sample_before_damage_is_read_then_the_error() {
    let samples = jpg_samples("s", 4, 1500);
    let finished = write(&samples);
    let entries = &finished.index.samples;
    let end_of_samples = (entries[3].offset + entries[3].size) as usize;
    let keys = |bytes: &[u8]| {
        let (yielded, error) = read_until_error(bytes);
        let keys: Vec<String> = yielded.into_iter().map(|(key, _)| key).collect();
        (keys, error.expect("damage is an error"))
    };

    // Cut inside the data of s2's image: s1 is whole, s2 is not.
    let cut = entries[2].members["jpg"].offset as usize + 100;
    let (read, error) = keys(&finished.out[..cut]);
    assert_eq!(read, ["s0", "s1"], "{error}");
    assert!(
        error.contains(&format!("truncated at byte {cut}")),
        "{error}"
    );

    // Cut inside s2's KEY.json: s2 is cut into, and not returned.
    let cut = entries[2].members["json"].offset as usize + 1;
    let (read, error) = keys(&finished.out[..cut]);
    assert_eq!(read, ["s0", "s1"], "{error}");

    // Cut between s2's image and its KEY.json: s2 lacks KEY.json, and is not returned.
    let cut = entries[2].members["json"].offset as usize - 512;
    let (read, error) = keys(&finished.out[..cut]);
    assert_eq!(read, ["s0", "s1"], "{error}");

    // Cut after the last sample, before the end-of-archive marker.
    let (read, error) = keys(&finished.out[..end_of_samples]);
    assert_eq!(read, ["s0", "s1", "s2", "s3"], "{error}");
    assert!(error.contains("no end-of-archive marker"), "{error}");

    // A broken header where s2 starts.
    let mut bytes = finished.out.clone();
    bytes[entries[2].offset as usize + 148] ^= 0x01;
    let (read, error) = keys(&bytes);
    assert_eq!(read, ["s0", "s1"], "{error}");
    assert!(
        error.contains(&format!("bad tar header at byte {}", entries[2].offset)),
        "{error}"
    );

    // Data after a whole archive: every sample, then the error.
    let mut bytes = finished.out.clone();
    bytes.extend_from_slice(&[7u8; 512]);
    let (read, error) = keys(&bytes);
    assert_eq!(read, ["s0", "s1", "s2", "s3"], "{error}");
    assert!(error.contains("after the end-of-archive marker"), "{error}");
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn venv_python() -> std::path::PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh",
        python.display()
    );
    python
}

fn demo_shard(dir: &std::path::Path) -> (std::path::PathBuf, Vec<String>) {
    let samples: Vec<SampleSpec> = (0..20)
        .map(|i| {
            (
                format!("sample-{i:03}_x"),
                vec![
                    ("jpg".to_string(), vec![i as u8; 100 + i * 37]),
                    ("json".to_string(), format!("{{\"i\": {i}}}").into_bytes()),
                ],
            )
        })
        .collect();
    let finished = write(&samples);
    let path = dir.join("demo-000000.tar");
    std::fs::write(&path, &finished.out).unwrap();
    let names = samples
        .iter()
        .flat_map(|(k, m)| m.iter().map(move |(e, _)| format!("{k}.{e}")))
        .collect();
    (path, names)
}

#[test]
fn gnu_tar_lists_and_extracts_the_members() {
    let dir = tempfile::tempdir().unwrap();
    let (path, names) = demo_shard(dir.path());
    let out = Command::new("tar").arg("-tf").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(listed, names);
    let out = Command::new("tar")
        .arg("-xf")
        .arg(&path)
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dir.path().join("sample-003_x.json")).unwrap(),
        b"{\"i\": 3}"
    );
}

#[test]
fn python_tarfile_and_webdataset_read_the_samples() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = demo_shard(dir.path());
    let script = r#"
import sys, tarfile, json
import webdataset as wds
path = sys.argv[1]
with tarfile.open(path) as tf:
    members = tf.getmembers()
    assert len(members) == 40, len(members)
    assert all(m.isfile() for m in members)
    assert tf.extractfile("sample-007_x.json").read() == b'{"i": 7}'
samples = list(wds.WebDataset(path, shardshuffle=False))
assert len(samples) == 20, len(samples)
for i, s in enumerate(samples):
    assert s["__key__"] == f"sample-{i:03}_x", s["__key__"]
    assert set(k for k in s if not k.startswith("__")) == {"jpg", "json"}, s.keys()
    assert len(s["jpg"]) == 100 + i * 37
    assert json.loads(s["json"]) == {"i": i}
print("ok")
"#;
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shards_written_by_python_tarfile_in_ustar_format_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("py-000000.tar");
    let script = r#"
import sys, tarfile, io
with tarfile.open(sys.argv[1], "w", format=tarfile.USTAR_FORMAT) as tf:
    for i in range(3):
        for ext, data in (("jpg", bytes([i]) * 700), ("json", b"{}")):
            info = tarfile.TarInfo(f"k{i}.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
"#;
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&path).unwrap();
    let samples = read_all(&bytes).unwrap();
    assert_eq!(samples.len(), 3);
    assert_eq!(samples[2].1[0].1, vec![2u8; 700]);
}

#[test]
fn data_after_the_end_of_archive_is_an_error_in_both_readers() {
    let samples: Vec<SampleSpec> = vec![("a".into(), vec![("jpg".into(), vec![1u8; 10])])];
    let mut bytes = write(&samples).out;
    bytes.extend_from_slice(&[0u8; 512]);
    assert_eq!(
        read_all(&bytes).unwrap().len(),
        1,
        "zero padding after the marker is fine"
    );
    bytes.extend_from_slice(&[7u8; 512]);
    let err = read_all(&bytes).unwrap_err();
    assert!(
        err.to_string().contains("after the end-of-archive marker"),
        "{err}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut stream = stream_in_chunks(&bytes, bytes.len());
    let err = rt.block_on(async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("trailing data was accepted"),
                Err(e) => break e,
            }
        }
    });
    assert!(
        err.to_string().contains("after the end-of-archive marker"),
        "{err}"
    );
}
