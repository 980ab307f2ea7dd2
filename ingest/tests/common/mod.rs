//! Helpers shared by the ingest binary's integration tests.

use std::process::{Command, Output};

/// The `ingest` binary with quiet logs and `env` added to its environment.
pub fn ingest_with_env(env: &[(String, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ingest"));
    command.env("RUST_LOG", "warn").envs(env.iter().cloned());
    command
}

/// Runs a command and fails the test, with its output, unless it succeeds.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("ingest runs");
    assert!(
        output.status.success(),
        "ingest failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
