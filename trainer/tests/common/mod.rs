//! What the trainer's integration tests share: the small photo set as a shard dataset, and
//! running the `train` binary. Each test file includes it with `mod common;` and uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The 58 small-set photos ingested at the default 512-px short side into shards of 8
/// samples; built once per test process (as `augment/tests/pipeline.rs` builds it).
pub fn dataset() -> &'static Path {
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

/// The `train` binary with `args`, run in `dir`, with info logging and without the launch
/// variables of torchrun or Slurm that the test process may have inherited.
pub fn train_command(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID");
    command
}

/// Runs `train` with `args` in `dir`.
pub fn train(dir: &Path, args: &[&str]) -> Output {
    train_command(dir, args)
        .output()
        .expect("run the train binary")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `train` and expects success; returns the summary it prints (rank 0's in a
/// multi-process run: the other ranks print none).
pub fn train_ok(dir: &Path, args: &[&str]) -> serde_json::Value {
    let output = train(dir, args);
    assert!(
        output.status.success(),
        "train {args:?} failed ({}):\n{}",
        output.status,
        text(&output.stderr)
    );
    let stdout = text(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("summary {stdout:?}: {e}"))
}
