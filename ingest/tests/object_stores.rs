//! Ingest from a bucket and write the shards back to it, against real
//! servers on loopback: s3s-fs (S3 with SigV4) and Azurite (Azure Blob).
//! Then `shards verify` (its library function) checks the dataset in the
//! bucket, and a server outage mid-run is survived or resumed.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::path::Path;
use shards::inspect::NoReporter;
use shards::inspect::{VerifyOptions, verify};
use shards::{Dataset, Location, Manifest};

mod common;

use common::{ingest_with_env as ingest, run_ok};

async fn open_dataset(store: Arc<dyn ObjectStore>, prefix: &str, url: String) -> Dataset {
    let location = Location {
        store,
        prefix: Path::from(prefix),
        url,
    };
    let manifest: Manifest = location
        .get_json(shards::meta::MANIFEST)
        .await
        .expect("the dataset has a manifest");
    Dataset { location, manifest }
}

async fn verify_ok(dataset: &Dataset) {
    let report = verify(
        dataset,
        &VerifyOptions {
            jobs: 2,
            decode: true,
        },
        Arc::new(NoReporter),
    )
    .await;
    assert!(
        report.is_ok(),
        "verify found problems: {:#?}",
        report.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_bucket_to_s3_bucket_verifies_and_survives_an_outage() {
    let mut server = seer_tests::S3Server::start().await;
    let store: Arc<dyn ObjectStore> = Arc::new(server.store());
    let staged = seer_tests::upload_dir(store.as_ref(), &seer_tests::photos_small_dir(), "raw")
        .await
        .unwrap();
    let env = server.env_vars();
    let bucket = server.url();

    let output = run_ok(
        ingest(&env)
            .arg("run")
            .arg(format!("{bucket}/raw"))
            .arg("-o")
            .arg(format!("{bucket}/dataset"))
            .args(["--samples-per-shard", "16", "--no-progress", "--json"]),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        summary["written"].as_u64().unwrap() + summary["duplicates"].as_u64().unwrap(),
        staged.files as u64,
        "{summary}"
    );
    let dataset = open_dataset(store.clone(), "dataset", format!("{bucket}/dataset")).await;
    assert_eq!(
        dataset.manifest.total_samples(),
        summary["written"].as_u64().unwrap()
    );
    verify_ok(&dataset).await;
    let (_, sample) = dataset
        .find(
            &dataset
                .index(&dataset.manifest.shards[0])
                .await
                .unwrap()
                .samples[0]
                .key,
        )
        .await
        .unwrap()
        .unwrap();
    let meta: shards::SampleMeta = serde_json::from_slice(sample.get("json").unwrap()).unwrap();
    assert!(
        meta.url.starts_with(&format!("{bucket}/raw/")),
        "{}",
        meta.url
    );
    assert!(meta.etag.is_some(), "S3 gives ETags");

    // The same job again, with the server killed for a few seconds once a shard is out.
    let child = ingest(&env)
        .arg("run")
        .arg(format!("{bucket}/raw"))
        .arg("-o")
        .arg(format!("{bucket}/again"))
        .args([
            "--samples-per-shard",
            "8",
            "--no-progress",
            "--workers",
            "1",
            "--fetch-concurrency",
            "1",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let again = Location {
        store: store.clone(),
        prefix: Path::from("again"),
        url: format!("{bucket}/again"),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let manifest: Option<Manifest> = again
            .get_json_opt(shards::meta::MANIFEST)
            .await
            .ok()
            .flatten();
        if manifest.is_some_and(|m| !m.shards.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no shard published in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().await;
    let first = child.wait_with_output().unwrap();
    if first.status.success() {
        // Requests failing during the outage were retried with backoff until it ended: nothing failed.
        let summary: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
        if summary["failed"] != 0 {
            let dataset = open_dataset(store.clone(), "again", format!("{bucket}/again")).await;
            let mut failures = Vec::new();
            for shard in &dataset.manifest.shards {
                failures.extend(dataset.stats(shard).await.unwrap().failures);
            }
            panic!("sources failed during the outage: {summary}\n{failures:#?}");
        }
    } else {
        // It stopped cleanly, with a message; the rerun resumes.
        let stderr = String::from_utf8_lossy(&first.stderr);
        assert!(stderr.contains("error:"), "{stderr}");
        run_ok(
            ingest(&env)
                .arg("run")
                .arg(format!("{bucket}/raw"))
                .arg("-o")
                .arg(format!("{bucket}/again"))
                .args(["--samples-per-shard", "8", "--no-progress"]),
        );
    }
    let resumed = open_dataset(store.clone(), "again", format!("{bucket}/again")).await;
    verify_ok(&resumed).await;
    let keys = |m: &Manifest| m.total_samples();
    assert_eq!(
        keys(&resumed.manifest),
        keys(&dataset.manifest),
        "no sample lost or doubled by the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_container_to_azure_container_verifies() {
    let server = seer_tests::AzuriteServer::start().await;
    let store: Arc<dyn ObjectStore> = Arc::new(server.store());
    let staged = seer_tests::upload_dir(store.as_ref(), &seer_tests::photos_small_dir(), "raw")
        .await
        .unwrap();
    let env = server.env_vars();
    let container = server.url();
    let output = run_ok(
        ingest(&env)
            .arg("run")
            .arg(format!("{container}/raw"))
            .arg("-o")
            .arg(format!("{container}/dataset"))
            .args(["--samples-per-shard", "25", "--no-progress", "--json"]),
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        summary["written"].as_u64().unwrap() + summary["duplicates"].as_u64().unwrap(),
        staged.files as u64,
        "{summary}"
    );
    let dataset = open_dataset(store, "dataset", format!("{container}/dataset")).await;
    assert_eq!(
        dataset.manifest.total_samples(),
        summary["written"].as_u64().unwrap()
    );
    verify_ok(&dataset).await;
}
