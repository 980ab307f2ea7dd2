//! Round trips and property tests of the shard format, and proof that
//! standard tools (GNU tar, Python's tarfile, the webdataset package) read it.

use std::process::Command;

use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use shards::reader::parse_indexed_sample;
use shards::{SampleReader, ShardStream, ShardWriter};

type SampleSpec = (String, Vec<(String, Vec<u8>)>);

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
    fn truncation_never_yields_a_partial_sample(samples in samples_strategy(), cut in 0usize..100_000) {
        let finished = write(&samples);
        let cut = cut % finished.out.len().max(1);
        let mut yielded = Vec::new();
        let mut error = None;
        for item in SampleReader::new(&finished.out[..cut], "t-000000.tar") {
            match item {
                Ok(s) => yielded.push(s),
                Err(e) => error = Some(e),
            }
        }
        // A cut archive always ends in an error naming the shard ...
        let error = error.expect("a truncated shard must give an error");
        prop_assert!(error.to_string().contains("t-000000.tar"), "{}", error);
        // ... and every sample it yielded before is whole and ends before the cut.
        for (sample, entry) in yielded.iter().zip(&finished.index.samples) {
            prop_assert_eq!(&sample.key, &entry.key);
            prop_assert_eq!(sample.members.len(), entry.members.len());
            prop_assert!(entry.offset + entry.size <= cut as u64);
        }
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
    let samples: Vec<SampleSpec> = (0..3)
        .map(|i| {
            (
                format!("k{i}"),
                vec![
                    ("jpg".into(), vec![i as u8; 700]),
                    ("json".into(), b"{}".to_vec()),
                ],
            )
        })
        .collect();
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
    let samples: Vec<SampleSpec> = (0..5)
        .map(|i| {
            (
                format!("s{i}"),
                vec![
                    ("jpg".into(), vec![i as u8; 3000]),
                    ("json".into(), b"{}".to_vec()),
                ],
            )
        })
        .collect();
    let finished = write(&samples);
    let chunks: Vec<object_store::Result<Bytes>> = finished
        .out
        .chunks(777)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut stream = ShardStream::from_stream(
        futures::stream::iter(chunks).boxed(),
        "t-000000.tar",
        1 << 20,
    );
    let mut keys = Vec::new();
    while let Some(sample) = stream.next().await.unwrap() {
        keys.push(sample.key);
    }
    assert_eq!(keys, ["s0", "s1", "s2", "s3", "s4"]);

    let cut = finished.index.samples[3].offset as usize + 1000;
    let chunks: Vec<object_store::Result<Bytes>> =
        vec![Ok(Bytes::copy_from_slice(&finished.out[..cut]))];
    let mut stream = ShardStream::from_stream(
        futures::stream::iter(chunks).boxed(),
        "t-000000.tar",
        1 << 20,
    );
    let mut got = 0;
    let err = loop {
        match stream.next().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("truncated shard read to the end"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        got, 2,
        "samples 0..2 are whole; 3 was cut and is not yielded; 2 cannot be known whole until 3's header"
    );
    let message = err.to_string();
    assert!(
        message.contains("t-000000.tar") && message.contains(&format!("byte {cut}")),
        "{message}"
    );
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
    let chunks: Vec<object_store::Result<Bytes>> = vec![Ok(Bytes::from(bytes))];
    let mut stream = ShardStream::from_stream(
        futures::stream::iter(chunks).boxed(),
        "t-000000.tar",
        1 << 20,
    );
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
