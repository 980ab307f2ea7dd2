//! The `train` binary end to end on CPU, on the small photo set ingested into shards: the
//! configuration's error messages and exit codes, a run whose loss goes down, exact resume,
//! checkpoint retention, the guard against non-finite losses, and `train export`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use augment::{AugmentConfig, Layout, Pipeline, PipelineOptions};
use tch::nn::VarStore;
use tch::{Device, Tensor};
use trainer::config::TrainConfig;
use trainer::data::{BatchLoader, ResolutionGroup};
use trainer::export::load_trunk;
use trainer::metrics::{metric_series, read_jsonl};
use trainer::regnet::RegNetY;

mod common;
use common::{dataset, text, train, train_ok};

/// The tiny run of [`common::tiny_config`] with batches of 8 and 8 steps; two skipped steps in
/// a row stop it.
fn tiny_config() -> String {
    common::tiny_config(8, 16, 8, "max_skipped_steps = 2", "")
}

/// A folder with the tiny configuration as `tiny.toml`.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), tiny_config()).unwrap();
    dir
}

/// Every tensor of a safetensors file, by name.
fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Names of the tensors that differ (in shape, dtype or any bit) between two files.
fn differing(a: &Path, b: &Path) -> Vec<String> {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the files hold different tensors"
    );
    a.iter()
        .filter(|(name, t)| !t.equal(&b[*name]))
        .map(|(name, _)| name.clone())
        .collect()
}

fn checkpoint_folders(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-"))
        .collect();
    names.sort();
    names
}

#[test]
fn the_loader_normalizes_the_bytes_as_the_augmenter_does_in_float() {
    let mut bytes = PipelineOptions::new(
        AugmentConfig::parse("2x32@0.14-1+2x16@0.05-0.14").unwrap(),
        4,
    );
    (bytes.threads, bytes.shuffle_buffer, bytes.seed) = (1, 8, 5);
    let mut floats = bytes.clone();
    floats.layout = Layout::F32Nchw;
    let url = dataset().to_str().unwrap();
    let mut loader = BatchLoader::start(url, bytes, None, Device::Cpu, 2).unwrap();
    let mut reference = Pipeline::start(url, floats, None).unwrap();
    for _ in 0..2 {
        let batch = loader.next_batch().unwrap();
        let expected = reference.next().unwrap().unwrap();
        assert_eq!(batch.keys, expected.keys);
        let groups: Vec<_> = batch.groups.iter().map(|(g, _)| g.clone()).collect();
        assert_eq!(
            groups,
            [
                ResolutionGroup {
                    size: 32,
                    crops: 0..2
                },
                ResolutionGroup {
                    size: 16,
                    crops: 2..4
                }
            ]
        );
        for (group, images) in &batch.groups {
            let side = i64::from(group.size);
            assert_eq!(images.size(), [group.crops.len() as i64 * 4, 3, side, side]);
            for (position, crop) in group.crops.clone().enumerate() {
                let ours = images.narrow(0, position as i64 * 4, 4); // [B, 3, H, W]
                let theirs = Tensor::from_slice(expected.views[crop].as_f32().unwrap())
                    .view([4, 3, side, side]);
                assert!(ours.equal(&theirs), "crop {crop} differs");
            }
        }
    }
}

#[test]
fn bad_configurations_exit_2_naming_the_field() {
    let dir = workspace();
    for (args, expected) in [
        (
            &["--set", "optim.lr_per_256=-1"][..],
            "optim.lr_per_256: -1 must be positive",
        ),
        (
            &["--set", "optim.lr=1"],
            "optim.lr: give either lr (absolute) or lr_per_256",
        ),
        (&["--set", "optim.momentom=0.9"], "unknown field `momentom`"),
        (
            &["--set", "schedule.steps=0"],
            "schedule.steps: must be at least 1",
        ),
        (
            &["--set", "loss.crops_for_assign=[0, 4]"],
            "loss.crops_for_assign: crop 4",
        ),
        (
            &["--set", "precision=fp16"],
            "precision: fp16 needs a CUDA device",
        ),
        (
            &["--device", "gpu"],
            "--device \"gpu\": expected cpu, cuda or cuda:N",
        ),
    ] {
        let mut all = vec!["--config", "tiny.toml"];
        all.extend_from_slice(args);
        let output = train(dir.path(), &all);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: {stderr:?} lacks {expected:?}"
        );
    }
    let output = train(dir.path(), &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("missing --config"));
}

#[test]
fn the_loss_goes_down() {
    let dir = workspace();
    let steps = 40;
    let summary = train_ok(
        dir.path(),
        &[
            "--config",
            "tiny.toml",
            "--run-dir",
            "run",
            "--set",
            &format!("schedule.steps={steps}"),
            "--set",
            "checkpoint.every_steps=100",
        ],
    );
    let run = dir.path().join("run");
    let records = read_jsonl(&run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metric_series(&records, "train/loss")
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert_eq!(losses.len(), steps);
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (start, end) = (mean(&losses[..5]), mean(&losses[steps - 5..]));
    eprintln!("loss: first 5 steps {start:.4}, last 5 steps {end:.4}; summary {summary}");
    assert!(
        end < start - 0.2,
        "the loss did not go down: {start:.4} -> {end:.4} ({losses:?})"
    );
    assert_eq!(summary["end_step"], steps);
    assert_eq!(summary["skipped_steps"], 0);
    for file in ["config.toml", "metrics.jsonl", "loss.png"] {
        assert!(run.join(file).is_file(), "{file} missing from the run");
    }
    assert!(
        std::fs::read_dir(&run).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("tfevents")),
        "no TensorBoard event file"
    );
    // The resolved configuration reproduces the run's.
    let saved = TrainConfig::load(&run.join("config.toml"), &[] as &[&str]).unwrap();
    assert_eq!(saved.schedule.steps, steps as u64);
}

#[test]
fn resuming_gives_the_same_weights_as_running_straight() {
    let dir = workspace();
    let config = ["--config", "tiny.toml"];
    let straight = train_ok(
        dir.path(),
        &[&config[..], &["--run-dir", "straight"]].concat(),
    );
    assert_eq!(straight["end_step"], 8);
    let first = train_ok(
        dir.path(),
        &[&config[..], &["--run-dir", "resumed", "--stop-after", "4"]].concat(),
    );
    assert_eq!(first["end_step"], 4);
    let second = train_ok(
        dir.path(),
        &[&config[..], &["--run-dir", "resumed", "--resume"]].concat(),
    );
    assert_eq!(
        (&second["start_step"], &second["end_step"]),
        (&4.into(), &8.into())
    );

    let final_checkpoint = |run: &str| dir.path().join(run).join("checkpoints/ckpt-00000008");
    let (a, b) = (final_checkpoint("straight"), final_checkpoint("resumed"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let differ = differing(&a.join(file), &b.join(file));
        assert!(
            differ.is_empty(),
            "{file}: {} tensors differ, e.g. {:?}",
            differ.len(),
            differ.first()
        );
    }
    let state = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap()
    };
    assert_eq!(state(&a)["stream"], state(&b)["stream"]);

    // Retention: a checkpoint every 2 steps, the newest 2 kept.
    let root = dir.path().join("straight/checkpoints");
    assert_eq!(
        checkpoint_folders(&root),
        ["ckpt-00000006", "ckpt-00000008"]
    );
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("latest.json")).unwrap()).unwrap();
    assert_eq!(latest["checkpoint"], "ckpt-00000008");

    // Resuming a finished run does nothing, and an explicit checkpoint folder resumes too.
    let again = train_ok(
        dir.path(),
        &[&config[..], &["--run-dir", "straight", "--resume"]].concat(),
    );
    assert_eq!(again["end_step"], 8);
    let from_folder = train_ok(
        dir.path(),
        &[
            &config[..],
            &[
                "--run-dir",
                "from-folder",
                "--resume",
                "straight/checkpoints/ckpt-00000006",
            ],
        ]
        .concat(),
    );
    assert_eq!(
        (&from_folder["start_step"], &from_folder["end_step"]),
        (&6.into(), &8.into())
    );
    let differ = differing(
        &a.join("model.safetensors"),
        &dir.path()
            .join("from-folder/checkpoints/ckpt-00000008/model.safetensors"),
    );
    assert!(differ.is_empty(), "{differ:?}");
}

#[test]
fn sigterm_stops_the_run_with_a_checkpoint() {
    let dir = workspace();
    let child = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["--config", "tiny.toml", "--run-dir", "run"])
        .args([
            "--set",
            "schedule.steps=100000",
            "--set",
            "checkpoint.every_steps=100000",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the train binary");
    let metrics = dir.path().join("run/metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(
            started.elapsed().as_secs() < 120,
            "no 3 steps logged within 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // A second process into the same run folder meanwhile is refused, naming the first.
    let second = train(
        dir.path(),
        &["--config", "tiny.toml", "--run-dir", "run", "--resume"],
    );
    let stderr = text(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is in use by another train process")
            && stderr.contains(&format!("pid {}", child.id())),
        "{stderr}"
    );
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let summary: serde_json::Value = serde_json::from_str(text(&output.stdout).trim()).unwrap();
    assert_eq!(summary["interrupted"], true);
    let end = summary["end_step"].as_u64().unwrap();
    assert!((3..1000).contains(&end), "{summary}");
    let root = dir.path().join("run/checkpoints");
    assert_eq!(checkpoint_folders(&root), [format!("ckpt-{end:08}")]);
}

#[test]
fn a_new_run_never_overwrites_an_earlier_one_and_a_failed_start_changes_nothing() {
    let dir = workspace();
    let args = ["--config", "tiny.toml", "--run-dir", "run"];
    train_ok(dir.path(), &args);
    let run = dir.path().join("run");
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let checkpoints = checkpoint_folders(&run.join("checkpoints"));
    // Started again without --resume: refused, naming the flag.
    let output = train(dir.path(), &[&args[..], &["--set", "seed=5"]].concat());
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("already holds a run's checkpoints") && stderr.contains("--resume"),
        "{stderr}"
    );
    // Resumed with a data URL that does not open: fails, and the run's config is untouched.
    let missing = dir.path().join("no-such-dataset");
    let set_url = format!("data.url={}", missing.display());
    let output = train(
        dir.path(),
        &[&args[..], &["--resume", "--set", &set_url]].concat(),
    );
    assert!(!output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        std::fs::read_to_string(run.join("config.toml")).unwrap(),
        config
    );
    assert_eq!(checkpoint_folders(&run.join("checkpoints")), checkpoints);

    // latest.json lost: the checkpoints are still there, so neither a new start nor --resume
    // may start afresh over them; both name the newest one.
    let latest = run.join("checkpoints/latest.json");
    let published = std::fs::read(&latest).unwrap();
    std::fs::remove_file(&latest).unwrap();
    let newest = checkpoints.last().unwrap();
    for extra in [&[][..], &["--resume"][..]] {
        let output = train(dir.path(), &[&args[..], extra].concat());
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("has no latest.json")
                && stderr.contains(&format!("checkpoints/{newest}"))
                && !stderr.contains("//ckpt-"),
            "{extra:?}: {stderr}"
        );
    }
    assert_eq!(checkpoint_folders(&run.join("checkpoints")), checkpoints);

    // A checkpoint that lost its SwAV queue resumes with an empty one, and says so.
    std::fs::write(&latest, published).unwrap();
    let queue = run
        .join("checkpoints")
        .join(newest)
        .join("queue.safetensors");
    std::fs::remove_file(&queue).unwrap();
    let output = train(dir.path(), &[&args[..], &["--resume"]].concat());
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("has no SwAV queue"), "{stderr}");

    // A checkpoint whose weights turned to NaN on disk is refused, naming the file.
    let model = run
        .join("checkpoints")
        .join(newest)
        .join("model.safetensors");
    let mut damaged: Vec<(String, Tensor)> = tensors(&model).into_iter().collect();
    let (name, first) = damaged
        .iter_mut()
        .find(|(_, t)| t.is_floating_point())
        .unwrap();
    let name = name.clone();
    *first = first.full_like(f64::NAN);
    Tensor::write_safetensors(&damaged, &model).unwrap();
    let output = train(dir.path(), &[&args[..], &["--resume"]].concat());
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("model.safetensors") && stderr.contains(&name) && stderr.contains("NaN"),
        "{stderr}"
    );
}

#[test]
fn a_checkpoint_root_that_cannot_be_written_stops_the_run_before_it_trains() {
    // A web server over an empty folder: reads find nothing, and every write is refused (403),
    // as in a read-only bucket.
    let empty = tempfile::tempdir().unwrap();
    let server = seer_tests::WebServer::start(empty.path());
    let url = format!("{}/checkpoints", server.url());
    let dir = workspace();
    let set_url = format!("checkpoint.url={url}");
    let args = [
        "--config",
        "tiny.toml",
        "--run-dir",
        "run",
        "--set",
        &set_url,
    ];
    let output = train(dir.path(), &args);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("checkpoints cannot be written to") && stderr.contains(&url),
        "{stderr}"
    );
    // Refused before the first step: the run's configuration was not even written.
    assert!(!dir.path().join("run/config.toml").exists(), "{stderr}");
}

#[test]
fn non_finite_losses_stop_the_run() {
    let dir = workspace();
    // Checkpoints far apart: the loss guard stops the run.
    let output = train(
        dir.path(),
        &[
            "--config",
            "tiny.toml",
            "--run-dir",
            "run",
            "--set",
            "optim.lr_per_256=1e31",
            "--set",
            "schedule.steps=20",
            "--set",
            "checkpoint.every_steps=1000",
        ],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("3 steps in a row skipped") && stderr.contains("training diverged"),
        "{stderr}"
    );
    assert!(
        stderr.contains("step skipped"),
        "skipped steps are logged: {stderr}"
    );
}

/// A model gone non-finite stops the run when a checkpoint is due, whatever its loss does
/// (with a temperature far off the loss stays finite, and the run used to end with exit 0 and
/// no checkpoint at all); none with non-finite weights is published, so the run's
/// checkpoints (if any) can all be resumed from.
#[test]
fn a_non_finite_model_stops_the_run_at_a_checkpoint() {
    let dir = workspace();
    for (run, setting) in [
        ("hot", "loss.temperature=1e-30"),
        ("fast", "optim.lr_per_256=1e31"),
    ] {
        let output = train(
            dir.path(),
            &[
                "--config",
                "tiny.toml",
                "--run-dir",
                run,
                "--set",
                setting,
                "--set",
                "schedule.steps=12",
                "--set",
                "checkpoint.every_steps=1",
            ],
        );
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{setting}: {stderr}");
        assert!(
            stderr.contains("the model holds non-finite values")
                && stderr.contains("training diverged"),
            "{setting}: {stderr}"
        );
        let root = dir.path().join(run).join("checkpoints");
        for folder in checkpoint_folders(&root) {
            for (name, tensor) in tensors(&root.join(&folder).join("model.safetensors")) {
                if tensor.is_floating_point() {
                    assert!(
                        tensor.isfinite().all().int64_value(&[]) != 0,
                        "{setting}: {folder}: {name} is not finite"
                    );
                }
            }
        }
    }
}

#[test]
fn export_writes_a_trunk_that_load_trunk_reads() {
    let dir = workspace();
    train_ok(
        dir.path(),
        &[
            "--config",
            "tiny.toml",
            "--run-dir",
            "run",
            "--set",
            "schedule.steps=2",
        ],
    );
    let output = train(
        dir.path(),
        &[
            "export",
            "--checkpoint",
            "run/checkpoints",
            "--output",
            "trunk.safetensors",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains("(step 2)"),
        "{}",
        text(&output.stdout)
    );

    let config = TrainConfig::load(&dir.path().join("tiny.toml"), &[] as &[&str]).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _trunk = RegNetY::new(&vs.root(), &config.regnet_params()).unwrap();
    let exported = dir.path().join("trunk.safetensors");
    let unused = load_trunk(&vs, "", &exported).unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    // Every trunk tensor of the checkpoint, under torchvision's names.
    let model = tensors(
        &dir.path()
            .join("run/checkpoints/ckpt-00000002/model.safetensors"),
    );
    let loaded = vs.variables();
    let trunk: Vec<_> = model
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("trunk.")?, t)))
        .collect();
    assert_eq!(trunk.len(), loaded.len());
    for (name, saved) in trunk {
        assert!(loaded[name].equal(saved), "{name} differs");
    }
    assert!(loaded.contains_key("stem.0.weight"));

    // Places an export must not go: the checkpoints' own folder (it would overwrite the
    // checkpoint it reads), a folder, a named pipe (renamed over, it would be gone).
    seer_tests::make_fifo(&dir.path().join("pipe.safetensors"));
    let model_file = "run/checkpoints/ckpt-00000002/model.safetensors";
    let before = std::fs::read(dir.path().join(model_file)).unwrap();
    for (target, says) in [
        (model_file, "the folder of the checkpoints"),
        (
            "run/checkpoints/trunk.safetensors",
            "the folder of the checkpoints",
        ),
        ("run", "is a folder"),
        ("pipe.safetensors", "is not a regular file"),
    ] {
        let output = train(
            dir.path(),
            &[
                "export",
                "--checkpoint",
                "run/checkpoints",
                "--output",
                target,
            ],
        );
        let stderr = text(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(says),
            "{target}: {stderr}"
        );
    }
    assert_eq!(std::fs::read(dir.path().join(model_file)).unwrap(), before);
    assert!(
        !dir.path()
            .join("run/checkpoints/trunk.safetensors")
            .exists()
    );
    // A link is written through: the file it names is replaced, the link stays.
    std::os::unix::fs::symlink("trunk.safetensors", dir.path().join("link.safetensors")).unwrap();
    std::fs::write(&exported, b"old").unwrap();
    let output = train(
        dir.path(),
        &[
            "export",
            "--checkpoint",
            "run/checkpoints",
            "--output",
            "link.safetensors",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        std::fs::symlink_metadata(dir.path().join("link.safetensors"))
            .unwrap()
            .is_symlink()
    );
    assert!(std::fs::metadata(&exported).unwrap().len() > 3);
}
