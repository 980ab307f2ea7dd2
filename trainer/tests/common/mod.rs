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

/// A tiny run on [`dataset`]: a RegNetY with stages 8, 16 and 32 wide, a small head with 16
/// prototypes and a queue of 32 embeddings (from step 1), 2×32 + 2×16 crops without color
/// distortion (as `configs/cpu-small.toml`), one torch thread (bit-exact results), a checkpoint
/// every 2 steps of which 2 are kept, every step logged. `top` adds top-level keys, `tail`
/// sections at the end.
pub fn tiny_config(
    batch_size: usize,
    shuffle_buffer: usize,
    steps: u64,
    top: &str,
    tail: &str,
) -> String {
    format!(
        r#"
seed = 3
threads = 1
{top}

[model]
depth = 4
w0 = 8
wa = 8.0
wm = 2.0
group_width = 8

[head]
hidden_dims = [32]
output_dim = 16
use_bn = true
num_prototypes = 16
freeze_prototypes_iters = 2

[loss]
sinkhorn_iterations = 3
queue = {{ length = 32, start_iter = 1 }}

[augment]
crops = [
    {{ count = 2, size = 32, scale = [0.14, 1.0] }},
    {{ count = 2, size = 16, scale = [0.05, 0.14] }},
]
jitter = {{ p = 0.0 }}
grayscale_p = 0.0
blur = {{ p = 0.0 }}

[data]
url = "{url}"
batch_size = {batch_size}
threads = 1
shuffle_buffer = {shuffle_buffer}

[optim]
lr_per_256 = 32.0
warmup_steps = 2

[schedule]
steps = {steps}

[checkpoint]
every_steps = 2
keep_last = 2

[logging]
every_steps = 1
{tail}"#,
        url = dataset().display()
    )
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
