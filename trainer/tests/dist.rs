//! Data parallelism on c10d's Gloo, on CPU, with real processes: the collectives of the bridge,
//! SyncBatchNorm and Sinkhorn against their single-process results on the concatenated batch,
//! 2 ranks with batch B against 1 process with batch 2B, a rank killed or hung (the other stops
//! with an error, not a hang), and `train --nproc 2` with its checkpoints, resume and world-size
//! checks.
//!
//! Multi-process tests run this test binary again, filtered to the one test, as each rank:
//! `SEER_DIST_TEST_WORKER` tells the copy that it is a rank, and torchrun's variables which.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};
use trainer::checkpoint::TrainState;
use trainer::collective::{Collective, SingleProcess};
use trainer::config::TrainConfig;
use trainer::dist::{
    Backend, Distributed, GradientReducer, ProcessGroup, ReduceOp, Store, all_gather_bytes,
    all_gather_cat, set_sync_batch_norm_group,
};
use trainer::launch::{Launch, free_port, threads_per_process};
use trainer::optim::{LarcSgd, trainable_parameters};
use trainer::swav::{SwavLoss, sinkhorn};
use trainer::train::SwavModel;

mod common;
use common::text;

const WORKER: &str = "SEER_DIST_TEST_WORKER";
const OUT: &str = "SEER_DIST_TEST_OUT";

/// Whether this process is a rank started by [`run_ranks`].
fn is_worker() -> bool {
    std::env::var_os(WORKER).is_some()
}

/// Runs the test `name` of this binary as `world` processes and returns their outputs.
fn run_ranks(name: &str, world: usize, out: &Path) -> Vec<Output> {
    let port = free_port().unwrap();
    let children: Vec<Child> = (0..world)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(WORKER, "1")
                .env(OUT, out)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (rank, output) in outputs.iter().enumerate() {
        assert!(
            output.status.success(),
            "rank {rank} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    outputs
}

/// The worker's launch and main Gloo group.
fn join(timeout: Duration) -> (Launch, Arc<Store>, ProcessGroup) {
    let launch = Launch::from_env().unwrap().expect("RANK and WORLD_SIZE");
    let store = Arc::new(
        Store::connect(
            &launch.master_addr,
            launch.master_port,
            launch.hosts_store(),
            timeout,
        )
        .unwrap(),
    );
    let group = ProcessGroup::new(
        &store,
        "test",
        launch.rank,
        launch.world_size,
        Backend::Gloo,
        timeout,
    )
    .unwrap();
    (launch, store, group)
}

fn floats(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn gloo_collectives_sync_batch_norm_and_sinkhorn_across_two_processes() {
    if !is_worker() {
        let out = tempfile::tempdir().unwrap();
        run_ranks(
            "gloo_collectives_sync_batch_norm_and_sinkhorn_across_two_processes",
            2,
            out.path(),
        );
        return;
    }
    let (launch, _store, group) = join(Duration::from_secs(60));
    let (rank, world) = (launch.rank, launch.world_size);
    assert_eq!((group.rank(), group.world_size()), (rank, 2));
    let r = rank as f32 + 1.0;

    let mut sum = Tensor::from_slice(&[r, 10.0 * r]);
    group.all_reduce_sum(&mut sum);
    assert_eq!(floats(&sum), [3.0, 30.0]);
    let mut max = Tensor::from_slice(&[r, -r]);
    group.all_reduce_max(&mut max);
    assert_eq!(floats(&max), [2.0, -1.0]);
    // Not contiguous: reduced through a copy.
    let mut transposed = Tensor::from_slice(&[r, 2.0 * r, 3.0 * r, 4.0 * r])
        .view([2, 2])
        .tr();
    group.all_reduce_sum(&mut transposed);
    assert_eq!(floats(&transposed), [3.0, 9.0, 6.0, 12.0]);
    for kind in [Kind::Double, Kind::Int64, Kind::Int] {
        let mut t = Tensor::from_slice(&[rank as i64 + 1, 5]).to_kind(kind);
        group.all_reduce_sum(&mut t);
        assert_eq!(floats(&t), [3.0, 10.0], "{kind:?}");
    }
    let mut many = vec![
        Tensor::from_slice(&[r]),
        Tensor::from_slice(&[r, r, r]),
        Tensor::full([2, 2], f64::from(r), (Kind::Float, Device::Cpu)),
    ];
    group.all_reduce_sum_coalesced(&mut many);
    assert_eq!(floats(&many[1]), [3.0; 3]);
    assert_eq!(floats(&many[2]), [3.0; 4]);
    group
        .all_reduce(&mut [Tensor::from_slice(&[r])], ReduceOp::Max)
        .unwrap();
    let mut broadcast = Tensor::from_slice(&[r, r]);
    Collective::broadcast(&group, &mut broadcast, 1);
    assert_eq!(floats(&broadcast), [2.0, 2.0]);
    group.barrier().unwrap();
    assert_eq!(group.sum_f64(0.5), 1.0);

    let gathered = all_gather_bytes(&vec![b'a' + rank as u8; rank * 3 + 1], &group);
    assert_eq!(gathered, [b"a".to_vec(), b"bbbb".to_vec()]);
    let cat = all_gather_cat(&Tensor::from_slice(&[r]).view([1, 1]), 0, &group);
    assert_eq!(floats(&cat), [1.0, 2.0]);

    // Gradient averaging in buckets of 16 bytes: several buckets, one oversized gradient.
    let parameters: Vec<(String, Tensor)> = [3i64, 1, 10, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let p = Tensor::ones([n], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            (&p * f64::from(r * (i as f32 + 1.0)))
                .sum(Kind::Float)
                .backward();
            (format!("p{i}"), p)
        })
        .collect();
    GradientReducer { bucket_bytes: 16 }.average(&parameters, &group);
    for (i, (_, p)) in parameters.iter().enumerate() {
        let expected = 1.5 * (i as f64 + 1.0);
        assert!(floats(&p.grad()).iter().all(|&g| g == expected), "p{i}");
    }

    // SyncBatchNorm over two halves equals batch norm over the whole batch, forward and
    // backward (2-D and 4-D inputs).
    for shape in [vec![8i64, 3], vec![4, 3, 5, 5]] {
        tch::manual_seed(11);
        let whole = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 3.0 + 1.0;
        let output_grad = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        let weight = Tensor::from_slice(&[1.5f32, 0.5, -1.0]);
        let bias = Tensor::from_slice(&[0.1f32, 0.2, 0.3]);
        let half = shape[0] / world as i64;

        let reference = {
            let x = whole.copy().set_requires_grad(true);
            let w = weight.copy().set_requires_grad(true);
            let b = bias.copy().set_requires_grad(true);
            let (mean, var) = (
                Tensor::zeros([3], (Kind::Float, Device::Cpu)),
                Tensor::ones([3], (Kind::Float, Device::Cpu)),
            );
            let y = x.batch_norm(
                Some(&w),
                Some(&b),
                Some(&mean),
                Some(&var),
                true,
                0.1,
                1e-5,
                false,
            );
            (&y * &output_grad).sum(Kind::Float).backward();
            (
                y.narrow(0, rank as i64 * half, half),
                x.grad().narrow(0, rank as i64 * half, half),
                w.grad(),
                b.grad(),
                mean,
                var,
            )
        };
        let x = whole
            .narrow(0, rank as i64 * half, half)
            .copy()
            .set_requires_grad(true);
        let w = weight.copy().set_requires_grad(true);
        let b = bias.copy().set_requires_grad(true);
        let (mean, var) = (
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        );
        let y = group
            .sync_batch_norm(&x, &w, &b, &mean, &var, 0.1, 1e-5)
            .unwrap();
        (&y * output_grad.narrow(0, rank as i64 * half, half))
            .sum(Kind::Float)
            .backward();
        let (mut w_grad, mut b_grad) = (w.grad(), b.grad());
        group.all_reduce_sum(&mut w_grad); // the weight's gradient is local, as in PyTorch
        group.all_reduce_sum(&mut b_grad);
        let tolerance = 1e-5;
        for (what, ours, theirs) in [
            ("output", &y, &reference.0),
            ("input grad", &x.grad(), &reference.1),
            ("weight grad", &w_grad, &reference.2),
            ("bias grad", &b_grad, &reference.3),
            ("running mean", &mean, &reference.4),
            ("running var", &var, &reference.5),
        ] {
            let d = max_difference(ours, theirs);
            assert!(d < tolerance, "{shape:?} {what}: differs by {d}");
        }
    }

    // Distributed Sinkhorn equals Sinkhorn on the concatenated batch.
    tch::manual_seed(5);
    let scores = Tensor::randn([12, 20], (Kind::Float, Device::Cpu)) * 0.3;
    let whole = sinkhorn(&scores, 0.05, 10, &SingleProcess, false);
    let ours = sinkhorn(
        &scores.narrow(0, rank as i64 * 6, 6),
        0.05,
        10,
        &group,
        false,
    );
    let d = max_difference(&ours, &whole.narrow(0, rank as i64 * 6, 6));
    assert!(d < 1e-6, "Sinkhorn differs by {d}");
}

/// The tiny model of these tests: RegNetY with stages 8, 16, 32 wide, a head with BN and 16
/// prototypes, no queue, 2×32 + 2×16 crops.
fn tiny_config() -> TrainConfig {
    TrainConfig::from_toml_str(
        r#"
seed = 3
threads = 1
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
freeze_prototypes_iters = 1
[loss]
sinkhorn_iterations = 3
[augment]
crops = [
    { count = 2, size = 32, scale = [0.14, 1.0] },
    { count = 2, size = 16, scale = [0.05, 0.14] },
]
[data]
url = "unused"
batch_size = 4
[schedule]
steps = 3
"#,
        &[] as &[&str],
    )
    .unwrap()
}

/// `steps` SwAV steps on synthetic batches of `global_batch` images, of which this rank
/// takes its consecutive share; returns every variable at the end.
fn train_synthetic(
    collective: &dyn Collective,
    global_batch: i64,
    steps: u64,
) -> BTreeMap<String, Tensor> {
    let config = tiny_config();
    tch::set_num_threads(1);
    tch::manual_seed(3);
    let mut model = SwavModel::new(&config, Device::Cpu).unwrap();
    let mut loss_fn = SwavLoss::new(config.loss_config()).unwrap();
    let parameters = trainable_parameters(&model.vs);
    let mut optimizer = LarcSgd::new(config.larc_config());
    let reducer = GradientReducer { bucket_bytes: 4096 };
    let (rank, world) = (collective.rank() as i64, collective.world_size() as i64);
    let local = global_batch / world;
    for step in 0..steps {
        tch::manual_seed(100 + step as i64);
        let mut features = Vec::new();
        for side in [32i64, 16] {
            // [crops, global B, 3, H, W]: this rank's rows of each crop, crop-major.
            let images =
                Tensor::randn([2, global_batch, 3, side, side], (Kind::Float, Device::Cpu));
            let mine = images
                .narrow(1, rank * local, local)
                .reshape([2 * local, 3, side, side]);
            features.push(model.trunk.forward_t(&mine, true)); // [2·B_local, C]
        }
        let out = model.head.forward_t(&Tensor::cat(&features, 0), true);
        let loss = loss_fn.loss(
            &out.embeddings,
            &out.scores,
            model.head.prototypes(),
            step,
            collective,
        );
        loss.backward();
        model.head.cancel_prototype_gradients(step);
        reducer.average(&parameters, collective);
        optimizer.step(&parameters, 2.0);
        optimizer.zero_grad(&parameters);
        model.head.normalize_prototypes();
    }
    model
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect()
}

/// Largest difference over all variables, and the variable where it is.
fn largest_difference(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> (f64, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(name, t)| (max_difference(t, &b[name]), name.clone()))
        .fold(
            (0.0, String::new()),
            |best, x| if x.0 > best.0 { x } else { best },
        )
}

#[test]
fn two_ranks_with_batch_b_train_as_one_process_with_batch_2b() {
    const GLOBAL_BATCH: i64 = 8;
    const STEPS: u64 = 3;
    if is_worker() {
        let (launch, _store, group) = join(Duration::from_secs(60));
        let group = Arc::new(group);
        // SyncBatchNorm over both ranks, so batch statistics are the whole batch's.
        set_sync_batch_norm_group(Some(Arc::clone(&group)));
        let variables = train_synthetic(&*group, GLOBAL_BATCH, STEPS);
        set_sync_batch_norm_group(None);
        let out = PathBuf::from(std::env::var_os(OUT).unwrap());
        let named: Vec<(String, Tensor)> = variables.into_iter().collect();
        Tensor::write_safetensors(&named, out.join(format!("rank{}.safetensors", launch.rank)))
            .unwrap();
        return;
    }
    let out = tempfile::tempdir().unwrap();
    run_ranks(
        "two_ranks_with_batch_b_train_as_one_process_with_batch_2b",
        2,
        out.path(),
    );
    let read = |rank: usize| -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(out.path().join(format!("rank{rank}.safetensors")))
            .unwrap()
            .into_iter()
            .collect()
    };
    let (rank0, rank1) = (read(0), read(1));
    // The ranks hold bit-identical weights (same averaged gradients, same updates).
    assert_eq!(largest_difference(&rank0, &rank1).0, 0.0);
    let single = train_synthetic(&SingleProcess, GLOBAL_BATCH, STEPS);
    let initial = {
        tch::manual_seed(3);
        let model = SwavModel::new(&tiny_config(), Device::Cpu).unwrap();
        model
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect()
    };
    let (moved, _) = largest_difference(&single, &initial);
    let (difference, name) = largest_difference(&rank0, &single);
    eprintln!(
        "after {STEPS} steps: weights moved by up to {moved:.3e}; 2 ranks x {} vs 1 x \
         {GLOBAL_BATCH}: largest difference {difference:.3e} ({name})",
        GLOBAL_BATCH / 2
    );
    assert!(moved > 1e-3, "the weights hardly moved ({moved})");
    // float32 sums in another order (per-rank partial sums, the all-reduce) differ in the last
    // bits; LARC and three steps amplify that a little.
    assert!(
        difference < 1e-4,
        "2 ranks differ from 1 process by {difference} at {name}"
    );
}

// --- The train binary -------------------------------------------------------------------------

/// The tiny run of [`common::tiny_config`] with batches of 4 per rank and SyncBatchNorm over
/// 2 ranks.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = common::tiny_config(
        4,
        8,
        6,
        "",
        "[distributed]\nsync_bn_group_size = 2\ntimeout_s = 60\n",
    );
    std::fs::write(dir.path().join("tiny.toml"), config).unwrap();
    dir
}

fn train_command(dir: &Path, args: &[&str]) -> Command {
    let mut all = vec!["--config", "tiny.toml"];
    all.extend_from_slice(args);
    common::train_command(dir, &all)
}

fn train_ok(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--config", "tiny.toml"];
    all.extend_from_slice(args);
    common::train_ok(dir, &all)
}

/// The model weights of `dir/run`'s checkpoint at step 6 (the end of the workspace's run).
fn weights_at_step_6(dir: &Path, run: &str) -> BTreeMap<String, Tensor> {
    let folder = dir.join(run).join("checkpoints/ckpt-00000006");
    Tensor::read_safetensors(folder.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

/// Asserts that runs `a` and `b` of `dir` end with bit-identical weights at step 6; the message
/// names the parameters that differ.
fn assert_same_weights_at_step_6(dir: &Path, a: &str, b: &str) {
    let (a_weights, b_weights) = (weights_at_step_6(dir, a), weights_at_step_6(dir, b));
    let differing: Vec<&String> = a_weights
        .keys()
        .filter(|k| !a_weights[*k].equal(&b_weights[*k]))
        .collect();
    assert!(
        differing.is_empty(),
        "{b}'s weights differ from {a}'s: {differing:?}"
    );
}

fn state_of(checkpoints: &Path) -> TrainState {
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoints.join("latest.json")).unwrap()).unwrap();
    let folder = checkpoints.join(latest["checkpoint"].as_str().unwrap());
    serde_json::from_slice(&std::fs::read(folder.join("state.json")).unwrap()).unwrap()
}

#[test]
fn nproc_2_checkpoints_every_rank_and_resumes_bit_exact() {
    if is_worker() {
        return;
    }
    let dir = workspace();
    let straight = train_ok(dir.path(), &["--nproc", "2", "--run-dir", "straight"]);
    assert_eq!(straight["end_step"], 6);
    let first = train_ok(
        dir.path(),
        &["--nproc", "2", "--run-dir", "resumed", "--stop-after", "4"],
    );
    assert_eq!(first["end_step"], 4);
    let state = state_of(&dir.path().join("resumed/checkpoints"));
    assert_eq!(state.step, 4);
    assert_eq!(state.images_seen, 4 * 2 * 4);
    assert_eq!(state.streams.len(), 2);
    for (rank, stream) in state.streams.iter().enumerate() {
        let stream = stream.as_ref().expect("a data position per rank");
        assert_eq!((stream.rank, stream.world, stream.batches), (rank, 2, 4));
    }
    let second = train_ok(
        dir.path(),
        &["--nproc", "2", "--run-dir", "resumed", "--resume"],
    );
    assert_eq!(
        (second["start_step"].as_u64(), second["end_step"].as_u64()),
        (Some(4), Some(6))
    );
    assert_same_weights_at_step_6(dir.path(), "straight", "resumed");
    // Only rank 0 writes metrics: one record per step.
    let metrics = std::fs::read_to_string(dir.path().join("straight/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);

    // Another number of processes: refused, naming the option; accepted with restart-data.
    let output = train_command(
        dir.path(),
        &[
            "--run-dir",
            "resumed",
            "--resume",
            "--set",
            "schedule.steps=8",
        ],
    )
    .output()
    .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("distributed.on_world_size_change") && stderr.contains("2 process"),
        "{stderr}"
    );
    let summary = train_ok(
        dir.path(),
        &[
            "--run-dir",
            "resumed",
            "--resume",
            "--set",
            "schedule.steps=8",
            "--set",
            "distributed.on_world_size_change=\"restart-data\"",
        ],
    );
    assert_eq!(summary["end_step"], 8);
}

/// torchrun itself (from the venv that `scripts/setup.sh` installs with torch) starts the ranks:
/// its c10d rendezvous, its agent's store (`TORCHELASTIC_USE_AGENT_STORE`) and its variables,
/// not a copy of them. The run's result is the same as `--nproc 2`'s.
#[test]
fn torchrun_starts_the_ranks_and_they_train_as_nproc_does() {
    if is_worker() {
        return;
    }
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/torchrun");
    assert!(
        torchrun.exists(),
        "{} is missing: run scripts/setup.sh (it installs torch into .venv)",
        torchrun.display()
    );
    let dir = workspace();
    let output = Command::new(&torchrun)
        .args(["--standalone", "--nproc-per-node", "2", "--no-python"])
        .arg(env!("CARGO_BIN_EXE_train"))
        .args(["--config", "tiny.toml", "--run-dir", "torchrun"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID")
        .output()
        .unwrap();
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "torchrun: {stderr}");
    // torchrun passes the ranks' stdout through: rank 0's summary is the one JSON object.
    let stdout = text(&output.stdout);
    let summary: serde_json::Value = stdout
        .lines()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no summary in {stdout:?}"));
    assert_eq!(summary["end_step"], 6);
    for rank in 0..2 {
        assert!(
            stderr.contains(&format!(r#""rank":{rank},"world":2"#)),
            "rank {rank} did not report world 2: {stderr}"
        );
    }
    let state = state_of(&dir.path().join("torchrun/checkpoints"));
    assert_eq!(state.streams.len(), 2);
    assert_eq!(state.images_seen, 6 * 2 * 4);

    let nproc = train_ok(dir.path(), &["--nproc", "2", "--run-dir", "nproc"]);
    assert_eq!(nproc["end_step"], 6);
    assert_same_weights_at_step_6(dir.path(), "nproc", "torchrun");
}

/// A launcher's world of one process takes the single-process path unless
/// `distributed.process_group_for_one_rank` is set; then it trains through a process group of
/// one (what the GPU check does to run NCCL on one GPU), to the same weights.
#[test]
fn one_rank_through_a_process_group_trains_as_a_single_process() {
    if is_worker() {
        return;
    }
    let dir = workspace();
    let single = train_ok(dir.path(), &["--run-dir", "single"]);
    assert_eq!(single["end_step"], 6);
    let as_rank = |run: &str, extra: &[&str]| {
        let mut args = vec!["--run-dir", run];
        args.extend_from_slice(extra);
        let output = train_command(dir.path(), &args)
            .env("RANK", "0")
            .env("WORLD_SIZE", "1")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", free_port().unwrap().to_string())
            .output()
            .unwrap();
        let stderr = text(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        stderr
    };
    // The rank's span appears only when a process group was joined.
    let plain = as_rank("plain", &[]);
    assert!(!plain.contains(r#""name":"rank""#), "{plain}");
    let grouped = as_rank(
        "grouped",
        &[
            "--set",
            "distributed.process_group_for_one_rank=true",
            "--set",
            "distributed.sync_bn_group_size=1",
        ],
    );
    assert!(grouped.contains(r#""name":"rank""#), "{grouped}");
    for run in ["plain", "grouped"] {
        assert_same_weights_at_step_6(dir.path(), "single", run);
    }
}

/// `--nproc 2` ranks left at the default thread counts take half the cores each for libtorch
/// and for the augmenter, instead of every core each (twice as many threads as cores: on 2
/// cores a step of 2 ranks took 4.2x as long that way, `scripts/bench-dist.sh`).
#[test]
fn ranks_on_one_machine_share_its_cores() {
    if is_worker() {
        return;
    }
    let dir = workspace();
    let tiny = std::fs::read_to_string(dir.path().join("tiny.toml")).unwrap();
    let defaults = tiny
        .replacen("threads = 1\n", "", 2)
        .replace("[data]\nthreads = 1\n", "[data]\n");
    assert!(!defaults.contains("threads"), "{defaults}");
    std::fs::write(dir.path().join("defaults.toml"), defaults).unwrap();
    let output = common::train_command(
        dir.path(),
        &[
            "--config",
            "defaults.toml",
            "--nproc",
            "2",
            "--run-dir",
            "shared",
        ],
    )
    .args(["--stop-after", "1"])
    .env_remove("OMP_NUM_THREADS")
    .output()
    .unwrap();
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let cores = std::thread::available_parallelism().unwrap().get();
    let share = threads_per_process(cores, 2);
    for rank in 0..2 {
        let said = format!(
            r#""rank":{rank},"world":2,"start_step":0,"end_step":1,"steps":6,"device":"Cpu","precision":"fp32","#
        );
        let line = stderr
            .lines()
            .find(|l| l.contains(&said))
            .unwrap_or_else(|| panic!("rank {rank} did not log its start: {stderr}"));
        assert!(
            line.contains(&format!(
                r#""torch_threads":{share},"augment_threads":{share}"#
            )),
            "rank {rank} on {cores} cores: {line}"
        );
    }
}

/// Starts ranks 0 and 1 of a long run by hand (as torchrun would), waits until rank 0 has
/// logged a step, does `harm` to rank 1, and returns rank 0's exit status, stderr and how long
/// it took to exit after the harm.
fn harm_rank_1(harm: &str, timeout_s: u32) -> (Option<i32>, String, Duration) {
    let dir = workspace();
    let port = free_port().unwrap().to_string();
    let start = |rank: &str| {
        train_command(
            dir.path(),
            &[
                "--run-dir",
                "run",
                "--set",
                "schedule.steps=100000",
                "--set",
                "checkpoint.every_steps=100000",
                "--set",
                &format!("distributed.timeout_s={timeout_s}"),
            ],
        )
        .env("RANK", rank)
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let mut ranks = [start("0"), start("1")];
    let metrics = dir.path().join("run/metrics.jsonl");
    let waiting = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        // A rank that fails to start (say, its store port taken) fails the test at once, with
        // what it printed.
        let exited = (0..2).find(|&r| ranks[r].try_wait().unwrap().is_some());
        if exited.is_some() || waiting.elapsed() > Duration::from_secs(300) {
            let mut said = String::new();
            for (rank, child) in ranks.iter_mut().enumerate() {
                let _ = child.kill();
                let output = child.wait().unwrap();
                let mut stderr = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                said += &format!("rank {rank} ({output}):\n{stderr}\n");
            }
            panic!("the run never logged a step; rank {exited:?} exited first\n{said}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let [rank0, mut rank1] = ranks;
    let signal = match harm {
        "kill" => "-KILL",
        "stop" => "-STOP",
        other => panic!("{other}"),
    };
    let harmed = Instant::now();
    let status = Command::new("kill")
        .args([signal, &rank1.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = rank0.wait_with_output().unwrap();
    let took = harmed.elapsed();
    let _ = rank1.kill();
    let _ = rank1.wait();
    (output.status.code(), text(&output.stderr), took)
}

#[test]
fn a_killed_rank_stops_the_other_with_an_error() {
    if is_worker() {
        return;
    }
    let (code, stderr, took) = harm_rank_1("kill", 60);
    eprintln!("rank 0 exited {took:?} after rank 1 was killed");
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("data-parallel run: rank 0"), "{stderr}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

#[test]
fn a_hung_rank_stops_the_other_within_the_timeout() {
    if is_worker() {
        return;
    }
    let (code, stderr, took) = harm_rank_1("stop", 5);
    eprintln!("rank 0 exited {took:?} after rank 1 was stopped (timeout 5 s)");
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("within 5 s"), "{stderr}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn distributed_init_checks_the_launch() {
    if is_worker() {
        return;
    }
    // Nobody hosts the store: the rendezvous times out with the address in the message.
    let port = free_port().unwrap();
    let launch = Launch::from_vars(|k| match k {
        "RANK" => Some("1".into()),
        "WORLD_SIZE" => Some("2".into()),
        "MASTER_PORT" => Some(port.to_string()),
        _ => None,
    })
    .unwrap()
    .unwrap();
    let started = Instant::now();
    let error = Distributed::init(&launch, Backend::Gloo, Duration::from_secs(2), 1 << 20, 0)
        .unwrap_err()
        .to_string();
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(started.elapsed() < Duration::from_secs(30));
}
