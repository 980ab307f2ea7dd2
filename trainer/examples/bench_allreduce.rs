//! Gradient averaging of RegNetY-400MF + its SwAV head (VISSL's regnet400mf head: 440 -> 440
//! -> 128, 3000 prototypes; 230 tensors, 18.2 MB of float32 gradients) over N local Gloo
//! processes, by bucket size: one all-reduce per tensor, and buckets of 1, 5, 25 and 100 MiB.
//!
//! `cargo run --release -p trainer --example bench_allreduce -- [NPROC] [REPEATS]` (defaults
//! 2 and 20) prints one JSON line per bucket size: median, min and max milliseconds per
//! averaging of all gradients, over REPEATS after 3 warm-up rounds. Run by
//! `scripts/bench-dist.sh`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use trainer::config::TrainConfig;
use trainer::dist::{Backend, GradientReducer, ProcessGroup, Store};
use trainer::launch::{Launch, spawn_local};
use trainer::optim::trainable_parameters;
use trainer::train::SwavModel;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nproc: usize = args.first().map_or(2, |a| a.parse().expect("NPROC"));
    let repeats: usize = args.get(1).map_or(20, |a| a.parse().expect("REPEATS"));
    let Some(launch) = Launch::from_env().expect("launch variables") else {
        let program = std::env::current_exe().expect("this program");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let failure = spawn_local(&program, &args, nproc, Duration::from_secs(5), &stop)
            .expect("spawn the ranks");
        if let Some((rank, status)) = failure {
            eprintln!("rank {rank} failed: {status}");
            std::process::exit(1);
        }
        return;
    };
    tch::set_num_threads(1);
    let config = TrainConfig::from_toml_str(
        r#"
model = "400MF"
[head]
hidden_dims = [440]
output_dim = 128
use_bn = true
num_prototypes = 3000
[augment]
preset = "swav"
[data]
url = "unused"
batch_size = 8
[schedule]
steps = 1
"#,
        &[] as &[&str],
    )
    .expect("the benchmark's configuration");
    tch::manual_seed(0);
    let model = SwavModel::new(&config, Device::Cpu).expect("RegNetY-400MF");
    let parameters = trainable_parameters(&model.vs);
    for (_, p) in &parameters {
        let mut grad = p.grad();
        if !grad.defined() {
            (p * 1.0).sum(Kind::Float).backward();
            grad = p.grad();
        }
        grad.copy_(&Tensor::randn_like(&grad));
    }
    let bytes: usize = parameters.iter().map(|(_, p)| p.numel() * 4).sum();
    let timeout = Duration::from_secs(120);
    let store = Arc::new(
        Store::connect(
            &launch.master_addr,
            launch.master_port,
            launch.hosts_store(),
            timeout,
        )
        .expect("rendezvous"),
    );
    let group = ProcessGroup::new(
        &store,
        "bench",
        launch.rank,
        launch.world_size,
        Backend::Gloo,
        timeout,
    )
    .expect("Gloo group");
    const MIB: usize = 1 << 20;
    for (label, bucket_bytes) in [
        ("per tensor", 0),
        ("1 MiB", MIB),
        ("5 MiB", 5 * MIB),
        ("25 MiB", 25 * MIB),
        ("100 MiB", 100 * MIB),
    ] {
        let reducer = GradientReducer { bucket_bytes };
        let mut times = Vec::with_capacity(repeats);
        for round in 0..repeats + 3 {
            trainer::collective::Collective::barrier(&group);
            let started = Instant::now();
            reducer.average(&parameters, &group);
            if round >= 3 {
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        if launch.rank == 0 {
            println!(
                "{}",
                serde_json::json!({
                    "bucket": label,
                    "processes": launch.world_size,
                    "gradient_mb": bytes as f64 / 1e6,
                    "tensors": parameters.len(),
                    "median_ms": times[times.len() / 2],
                    "min_ms": times[0],
                    "max_ms": times[times.len() - 1],
                })
            );
        }
    }
}
