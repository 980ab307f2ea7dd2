//! The test servers work with object_store 0.14 as the pipeline uses it: put, get, ranged get,
//! list, signatures checked, outages and restarts, and configuration from the environment.

use std::process::Command;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use seer_tests::{AzuriteServer, S3Server, photos_small_dir, photos_small_index, upload_dir};

/// Fails fast instead of retrying for minutes against a server that is down on purpose.
fn no_retries() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        retry_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

/// Put, get, head, ranged get and list, the operations ingest and the shard reader use.
async fn exercise_store(store: &dyn ObjectStore) {
    let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let photo = Path::from("raw/2024/photo 1.jpg");
    store
        .put(&photo, PutPayload::from(body.clone()))
        .await
        .unwrap();
    store
        .put(
            &"raw/2024/photo2.jpg".into(),
            PutPayload::from_static(b"two"),
        )
        .await
        .unwrap();
    store
        .put(&"shards/000000.tar".into(), PutPayload::from_static(b"tar"))
        .await
        .unwrap();

    let got = store.get(&photo).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), body.as_slice());
    assert_eq!(store.head(&photo).await.unwrap().size, 100_000);

    let range = store.get_range(&photo, 1000..1010).await.unwrap();
    assert_eq!(range.as_ref(), &body[1000..1010]);

    let mut listed: Vec<String> = store
        .list(Some(&"raw".into()))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(listed, ["raw/2024/photo 1.jpg", "raw/2024/photo2.jpg"]);

    let missing = store.get(&"raw/none.jpg".into()).await.unwrap_err();
    assert!(
        matches!(missing, object_store::Error::NotFound { .. }),
        "{missing}"
    );
}

#[tokio::test]
async fn s3_put_get_range_list() {
    let server = S3Server::start().await;
    exercise_store(&server.store()).await;
}

#[tokio::test]
async fn s3_rejects_a_wrong_secret_and_an_unsigned_request() {
    let server = S3Server::start().await;
    let location = Path::from("secret.txt");
    server
        .store()
        .put(&location, PutPayload::from_static(b"ok"))
        .await
        .unwrap();

    let wrong_secret = server
        .builder()
        .with_secret_access_key("not-the-secret")
        .with_retry(no_retries())
        .build()
        .unwrap();
    let error = wrong_secret.get(&location).await.unwrap_err();
    assert!(
        error.to_string().contains("403"),
        "expected 403 Forbidden, got: {error}"
    );

    let unsigned = server
        .builder()
        .with_skip_signature(true)
        .with_retry(no_retries())
        .build()
        .unwrap();
    let error = unsigned.get(&location).await.unwrap_err();
    assert!(
        error.to_string().contains("403"),
        "expected 403 Forbidden, got: {error}"
    );
}

#[tokio::test]
async fn s3_stop_and_restart_keep_port_and_data() {
    let mut server = S3Server::start().await;
    let port = server.port();
    let store = server.builder().with_retry(no_retries()).build().unwrap();
    let before = Path::from("before-outage.txt");
    store
        .put(&before, PutPayload::from_static(b"kept"))
        .await
        .unwrap();

    server.stop();
    assert!(!server.is_running());
    assert!(
        store.get(&before).await.is_err(),
        "a stopped server must not answer"
    );

    server.restart().await;
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    // The same client, unchanged, works again: the endpoint did not move.
    let got = store.get(&before).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), b"kept");
    store
        .put(&"after.txt".into(), PutPayload::from_static(b"new"))
        .await
        .unwrap();
}

#[tokio::test]
async fn s3_dropping_the_server_kills_its_process() {
    let server = S3Server::start().await;
    let pid = server.pid().unwrap();
    let data = server.data_dir().to_path_buf();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(server);
    // The process was waited for, so its id is gone, not a zombie.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!data.exists(), "the data folder is removed with the server");
}

#[tokio::test]
async fn s3_stages_the_small_photo_set() {
    let server = S3Server::start().await;
    let store = server.store();
    let staged = upload_dir(&store, &photos_small_dir(), "raw")
        .await
        .unwrap();
    let index = photos_small_index();
    assert_eq!(staged.files, index.len());
    assert_eq!(
        staged.bytes,
        index.iter().map(|photo| photo.bytes).sum::<u64>()
    );

    let listed: Vec<_> = store.list(Some(&"raw".into())).try_collect().await.unwrap();
    assert_eq!(listed.len(), index.len());
    let first = &index[0];
    let meta = store
        .head(&Path::from(format!("raw/{}", first.path)))
        .await
        .unwrap();
    assert_eq!(meta.size, first.bytes);
}

#[tokio::test]
async fn azurite_put_get_range_list() {
    let server = AzuriteServer::start().await;
    exercise_store(&server.store()).await;
}

#[tokio::test]
async fn azurite_rejects_a_wrong_key() {
    let server = AzuriteServer::start().await;
    let location = Path::from("secret.txt");
    server
        .store()
        .put(&location, PutPayload::from_static(b"ok"))
        .await
        .unwrap();

    // Valid base64, wrong key.
    let wrong_key = server
        .builder()
        .with_access_key("d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nIQ==")
        .with_retry(no_retries())
        .build()
        .unwrap();
    let error = wrong_key.get(&location).await.unwrap_err();
    assert!(
        error.to_string().contains("403"),
        "expected 403 Forbidden, got: {error}"
    );
}

#[tokio::test]
async fn azurite_stop_and_restart() {
    let mut server = AzuriteServer::start().await;
    let port = server.port();
    let pid = server.pid().unwrap();
    let store = server.builder().with_retry(no_retries()).build().unwrap();
    store
        .put(&"before.txt".into(), PutPayload::from_static(b"x"))
        .await
        .unwrap();

    server.stop();
    assert!(
        store.get(&"before.txt".into()).await.is_err(),
        "a stopped server must not answer"
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

    server.restart().await;
    assert_eq!(server.port(), port);
    let got = store
        .get(&"before.txt".into())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), b"x");
    store
        .put(&"after.txt".into(), PutPayload::from_static(b"y"))
        .await
        .unwrap();
}

/// Runs one of the `*_child` tests below in a child process with the server's variables, the
/// way the pipeline's binaries will be run, and checks what it wrote. The variables cannot be
/// set in this process: other tests run in parallel threads.
fn run_child_test(test_name: &str, variables: Vec<(String, String)>) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            test_name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(variables)
        .env("SEER_TESTS_CHILD", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{test_name} failed in the child process:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // libtest prints this when the filter matched nothing, and exits 0.
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "{test_name} did not run in the child process"
    );
}

fn assert_in_child() {
    assert!(
        std::env::var_os("SEER_TESTS_CHILD").is_some(),
        "this test runs in a child process started by another test, with a server's variables"
    );
}

/// The parent's half of an env-var check: it writes an object, a child process
/// configured only by `env` reads it and writes one back, and the parent reads that.
async fn exchange_with_child(
    store: &dyn ObjectStore,
    child_test: &str,
    env: Vec<(String, String)>,
) {
    store
        .put(&"from-parent.txt".into(), PutPayload::from_static(b"p"))
        .await
        .unwrap();
    run_child_test(child_test, env);
    let got = store
        .get(&"from-child.txt".into())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), b"c");
}

/// The child's half: the store built from the environment alone sees the parent's object.
async fn child_side(store: &dyn ObjectStore) {
    assert_in_child();
    let got = store
        .get(&"from-parent.txt".into())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), b"p");
    store
        .put(&"from-child.txt".into(), PutPayload::from_static(b"c"))
        .await
        .unwrap();
}

#[tokio::test]
async fn s3_env_vars_configure_amazon_s3_builder_from_env() {
    let server = S3Server::start().await;
    exchange_with_child(&server.store(), "from_env_s3_child", server.env_vars()).await;
}

#[tokio::test]
#[ignore = "run by s3_env_vars_configure_amazon_s3_builder_from_env"]
async fn from_env_s3_child() {
    child_side(
        &object_store::aws::AmazonS3Builder::from_env()
            .build()
            .unwrap(),
    )
    .await;
}

#[tokio::test]
async fn azurite_env_vars_configure_microsoft_azure_builder_from_env() {
    let server = AzuriteServer::start().await;
    exchange_with_child(&server.store(), "from_env_azure_child", server.env_vars()).await;
}

#[tokio::test]
#[ignore = "run by azurite_env_vars_configure_microsoft_azure_builder_from_env"]
async fn from_env_azure_child() {
    child_side(
        &object_store::azure::MicrosoftAzureBuilder::from_env()
            .build()
            .unwrap(),
    )
    .await;
}

#[tokio::test]
async fn two_servers_of_each_kind_run_side_by_side() {
    let (s3_a, s3_b) = tokio::join!(S3Server::start(), S3Server::start());
    let (azure_a, azure_b) = tokio::join!(AzuriteServer::start(), AzuriteServer::start());
    assert_ne!(s3_a.port(), s3_b.port());
    assert_ne!(azure_a.port(), azure_b.port());
    assert_ne!(s3_a.access_key(), s3_b.access_key());
    s3_a.store()
        .put(&"only-in-a".into(), PutPayload::from_static(b"a"))
        .await
        .unwrap();
    let in_b = s3_b.store().get(&"only-in-a".into()).await;
    assert!(
        matches!(in_b, Err(object_store::Error::NotFound { .. })),
        "data folders are separate"
    );
}
