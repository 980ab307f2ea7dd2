//! The SwAV head, Sinkhorn codes, swapped-prediction loss (with and without the queue) and one
//! LARC-SGD run against independent PyTorch transcriptions of SwAV's `main_swav.py`, VISSL's head
//! and apex's LARC (`tests/python/swav_reference.py`), run in the project's venv.
//!
//! Each test writes `case.json` and `inputs.safetensors` into its own folder, runs the script, and
//! compares `outputs.safetensors` with what the trainer computes from the same inputs. The venv
//! is part of the project's setup (`scripts/setup.sh`): without it these tests fail, they never
//! skip.
//!
//! Tolerances (`|actual − expected| ≤ atol + rtol·|expected|`, element-wise):
//! - `f32` loss, gradient, codes and head outputs: rtol 1e-5, atol 1e-7. The Rust side subtracts
//!   the global maximum before `exp` (VISSL) where SwAV does not, and folds the row count into an
//!   all-reduce, so results agree to rounding, not bit for bit.
//! - `f64` (VISSL `use_double_precision`): rtol 1e-12, atol 1e-15.
//! - LARC parameters and momentum buffers (`f32`): rtol 1e-6, atol 1e-9 (torch's `add_(alpha=)`
//!   rounds once where the Rust update rounds twice).
//!
//! The measured agreement is printed (`cargo test -p trainer --test swav_reference --
//! --nocapture`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor, nn};
use trainer::collective::SingleProcess;
use trainer::optim::{LarcSgd, LarcSgdConfig};
use trainer::swav::{QueueConfig, SwavHead, SwavHeadConfig, SwavLoss, SwavLossConfig};

const F32: Tolerance = Tolerance {
    rtol: 1e-5,
    atol: 1e-7,
};
const F64: Tolerance = Tolerance {
    rtol: 1e-12,
    atol: 1e-15,
};
const LARC: Tolerance = Tolerance {
    rtol: 1e-6,
    atol: 1e-9,
};

#[derive(Clone, Copy)]
struct Tolerance {
    rtol: f64,
    atol: f64,
}

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh to create the venv with torch 2.11.0 and safetensors",
        python.display()
    );
    python
}

fn script() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/swav_reference.py");
    assert!(
        script.exists(),
        "reference script {} is missing",
        script.display()
    );
    script
}

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("swav_reference")
        .join(name)
}

/// A reference case: its name, `case.json`, and its inputs.
struct Case {
    name: &'static str,
    json: String,
    inputs: Vec<(String, Tensor)>,
}

/// Writes every case and runs the reference once for all of them (importing torch takes
/// seconds); the tests then read their case's inputs and outputs back from disk.
fn run_reference_once() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let cases: Vec<Case> = loss_cases()
            .iter()
            .map(loss_case_inputs)
            .chain(head_cases().iter().map(head_case_inputs))
            .chain(larc_cases().iter().map(larc_case_inputs))
            .collect();
        for case in &cases {
            let dir = case_dir(case.name);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).unwrap();
            }
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("case.json"), &case.json).unwrap();
            Tensor::write_safetensors(&case.inputs, dir.join("inputs.safetensors")).unwrap();
        }
        let output = Command::new(python())
            .arg(script())
            .args(cases.iter().map(|c| case_dir(c.name)))
            .output()
            .expect("running the venv's python");
        assert!(
            output.status.success(),
            "reference script failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// The inputs and the reference outputs of case `name`, by tensor name.
fn load_case(name: &str) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    run_reference_once();
    let read = |file: &str| -> HashMap<String, Tensor> {
        Tensor::read_safetensors(case_dir(name).join(file))
            .unwrap_or_else(|e| panic!("case {name}: {file}: {e}"))
            .into_iter()
            .collect()
    };
    (read("inputs.safetensors"), read("outputs.safetensors"))
}

/// Asserts element-wise agreement and returns the largest absolute and relative deviations.
fn assert_close(
    what: &str,
    actual: &Tensor,
    expected: &Tensor,
    tolerance: Tolerance,
) -> (f64, f64) {
    assert_eq!(actual.size(), expected.size(), "{what}: shapes");
    let actual = actual.detach().to_kind(Kind::Double);
    let expected = expected.to_kind(Kind::Double);
    let difference = (&actual - &expected).abs();
    let allowed = expected.abs() * tolerance.rtol + tolerance.atol;
    let worst = (&difference - &allowed).max().double_value(&[]);
    let max_abs = difference.max().double_value(&[]);
    let max_rel = (&difference / expected.abs().clamp_min(1e-30))
        .max()
        .double_value(&[]);
    assert!(
        worst <= 0.0,
        "{what}: max |Δ| {max_abs:e}, max rel {max_rel:e}, beyond rtol {:e} atol {:e}",
        tolerance.rtol,
        tolerance.atol
    );
    (max_abs, max_rel)
}

fn unit_rows(rows: i64, dim: i64) -> Tensor {
    let xs = Tensor::randn([rows, dim], (Kind::Float, Device::Cpu));
    &xs / xs.norm_scalaropt_dim(2, [1], true)
}

// ------------------------------------------------------------------------------ the loss

struct LossCase {
    name: &'static str,
    seed: i64,
    batch: i64,
    prototypes: i64,
    dim: i64,
    config: SwavLossConfig,
    steps: u64,
}

fn loss_cases() -> Vec<LossCase> {
    vec![
        LossCase {
            name: "two_crops_b8_k16",
            seed: 10,
            batch: 8,
            prototypes: 16,
            dim: 8,
            config: SwavLossConfig {
                n_crops: 2,
                sinkhorn_iterations: 3,
                ..SwavLossConfig::default()
            },
            steps: 1,
        },
        LossCase {
            name: "seer_six_crops_b6_k40",
            seed: 11,
            batch: 6,
            prototypes: 40,
            dim: 10,
            config: SwavLossConfig::default(), // 6 crops, ε 0.05, 10 iterations
            steps: 2,
        },
        LossCase {
            name: "queue_b4_k24",
            seed: 12,
            batch: 4,
            prototypes: 24,
            dim: 8,
            config: SwavLossConfig {
                n_crops: 4,
                sinkhorn_iterations: 3,
                queue: Some(QueueConfig {
                    length: 10, // rounded down to 8 rows: used from step 3 on
                    start_iter: 1,
                }),
                ..SwavLossConfig::default()
            },
            steps: 5,
        },
        LossCase {
            name: "f64_queue_b5_k12",
            seed: 13,
            batch: 5,
            prototypes: 12,
            dim: 6,
            config: SwavLossConfig {
                n_crops: 3,
                crops_for_assign: vec![1, 2],
                epsilon: 0.03,
                use_f64: true,
                queue: Some(QueueConfig {
                    length: 10,
                    start_iter: 0,
                }),
                ..SwavLossConfig::default()
            },
            steps: 4,
        },
    ]
}

fn loss_case_inputs(case: &LossCase) -> Case {
    tch::manual_seed(case.seed);
    let config = &case.config;
    let (queue_length, queue_start) = config.queue.map_or((0, 0), |q| (q.length, q.start_iter));
    let json = format!(
        r#"{{"kind": "swav", "n_crops": {}, "crops_for_assign": {:?}, "temperature": {:?},
            "epsilon": {:?}, "sinkhorn_iterations": {}, "use_f64": {}, "queue_length": {},
            "queue_start": {}, "steps": {}}}"#,
        config.n_crops,
        config.crops_for_assign,
        config.temperature,
        config.epsilon,
        config.sinkhorn_iterations,
        config.use_f64,
        queue_length,
        queue_start,
        case.steps
    );
    let mut inputs = Vec::new();
    for step in 0..case.steps {
        let embeddings = unit_rows(config.n_crops as i64 * case.batch, case.dim);
        // Fresh prototypes each step: the queue must be scored with the current ones.
        let prototypes = unit_rows(case.prototypes, case.dim);
        let scores = embeddings.matmul(&prototypes.tr());
        inputs.push((format!("step{step}.embeddings"), embeddings));
        inputs.push((format!("step{step}.prototypes"), prototypes));
        inputs.push((format!("step{step}.scores"), scores));
    }
    Case {
        name: case.name,
        json,
        inputs,
    }
}

fn check_loss_case(name: &str) {
    let case = loss_cases().into_iter().find(|c| c.name == name).unwrap();
    let (inputs, expected) = load_case(name);
    let tolerance = if case.config.use_f64 { F64 } else { F32 };
    let mut loss_fn = SwavLoss::new(case.config.clone()).unwrap();
    let (mut worst_loss, mut worst_grad, mut worst_codes) = (0.0f64, 0.0f64, 0.0f64);
    for step in 0..case.steps {
        let input = |what: &str| &inputs[&format!("step{step}.{what}")];
        let output = |what: &str| &expected[&format!("step{step}.{what}")];
        let label = |what: &str| format!("{name} step {step} {what}");
        let scores = input("scores").copy().set_requires_grad(true);
        let (loss, codes) = loss_fn.loss_and_codes(
            input("embeddings"),
            &scores,
            input("prototypes"),
            step,
            &SingleProcess,
        );
        loss.backward();
        let (_, rel) = assert_close(&label("loss"), &loss, output("loss"), tolerance);
        worst_loss = worst_loss.max(rel);
        let (abs, _) = assert_close(&label("grad"), &scores.grad(), output("grad"), tolerance);
        worst_grad = worst_grad.max(abs);
        assert_eq!(codes.len(), case.config.crops_for_assign.len());
        for (i, q) in codes.iter().enumerate() {
            let q_name = format!("q{i}");
            let (abs, _) = assert_close(&label(&q_name), q, output(&q_name), tolerance);
            worst_codes = worst_codes.max(abs);
        }
    }
    match (loss_fn.queue(), expected.get("queue")) {
        (Some(queue), Some(reference)) => {
            assert_close(&format!("{name} queue"), queue, reference, tolerance);
        }
        (None, None) => {}
        (ours, theirs) => panic!(
            "{name}: queue present here {}, in the reference {}",
            ours.is_some(),
            theirs.is_some()
        ),
    }
    println!(
        "{name}: loss max rel {worst_loss:.1e}, d loss/d scores max |Δ| {worst_grad:.1e}, \
         codes max |Δ| {worst_codes:.1e}"
    );
}

#[test]
fn loss_and_codes_match_swav_without_queue() {
    check_loss_case("two_crops_b8_k16");
    check_loss_case("seer_six_crops_b6_k40");
}

#[test]
fn loss_and_codes_match_swav_with_queue() {
    check_loss_case("queue_b4_k24");
}

#[test]
fn loss_and_codes_match_in_double_precision() {
    check_loss_case("f64_queue_b5_k12");
}

// ------------------------------------------------------------------------------ the head

fn head_cases() -> Vec<(&'static str, SwavHeadConfig)> {
    let config = |hidden_dims: Vec<i64>, use_bn| SwavHeadConfig {
        input_dim: 12,
        hidden_dims,
        output_dim: 8,
        use_bn,
        num_prototypes: 10,
        freeze_prototypes_iters: 0,
        batch_norm_eps: 1e-5,
        batch_norm_momentum: 0.1,
    };
    vec![
        ("head_bn", config(vec![16], true)),
        ("head_seer_like", config(vec![16, 16], false)),
    ]
}

fn head_case_inputs((name, config): &(&'static str, SwavHeadConfig)) -> Case {
    tch::manual_seed(20);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut head = SwavHead::new(&vs.root(), config.clone());
    head.normalize_prototypes();
    let mut inputs: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    inputs.push((
        "features".into(),
        Tensor::randn([6, 12], (Kind::Float, Device::Cpu)),
    ));
    let dims: Vec<i64> = std::iter::once(config.input_dim)
        .chain(config.hidden_dims.iter().copied())
        .chain([config.output_dim])
        .collect();
    let json = format!(
        r#"{{"kind": "head", "dims": {dims:?}, "use_bn": {}, "num_prototypes": {},
            "bn_eps": {:?}, "bn_momentum": {:?}}}"#,
        config.use_bn, config.num_prototypes, config.batch_norm_eps, config.batch_norm_momentum
    );
    Case { name, json, inputs }
}

#[test]
fn head_matches_vissl() {
    for (name, config) in head_cases() {
        let (inputs, expected) = load_case(name);
        let vs = nn::VarStore::new(Device::Cpu);
        let head = SwavHead::new(&vs.root(), config);
        // The reference loaded these weights under VISSL's names (strictly); load them here too.
        let variables = vs.variables();
        assert_eq!(variables.len() + 1, inputs.len(), "{name}: variables");
        tch::no_grad(|| {
            for (variable_name, variable) in &variables {
                variable.shallow_clone().copy_(&inputs[variable_name]);
            }
        });
        let out = tch::no_grad(|| head.forward_t(&inputs["features"], true));
        let (e, _) = assert_close(
            &format!("{name} embeddings"),
            &out.embeddings,
            &expected["embeddings"],
            F32,
        );
        let (s, _) = assert_close(
            &format!("{name} scores"),
            &out.scores,
            &expected["scores"],
            F32,
        );
        for (key, reference) in expected.iter().filter(|(k, _)| k.contains("running_")) {
            assert_close(&format!("{name} {key}"), &variables[key], reference, F32);
        }
        println!("{name}: embeddings max |Δ| {e:.1e}, scores max |Δ| {s:.1e}");
    }
}

// ------------------------------------------------------------------------------ LARC-SGD

const LRS: [f64; 3] = [0.5, 0.3, 0.1];

/// `(name, config)`; both run the same parameters and gradients.
fn larc_cases() -> Vec<(&'static str, LarcSgdConfig)> {
    let config = |trust_coefficient, clip| LarcSgdConfig {
        momentum: 0.9,
        weight_decay: 0.01,
        trust_coefficient,
        eps: 1e-8,
        clip,
    };
    // apex's default trust 0.02 makes clip mode bind for some steps and not others.
    vec![
        ("larc_scale", config(0.001, false)),
        ("larc_clip", config(0.02, true)),
    ]
}

/// Parameter names in the order both sides step them.
const LARC_PARAMETERS: [&str; 5] = [
    "projection_head.0.weight",
    "projection_head.0.bias", // ‖w‖ = 0 at first: plain SGD, no decay
    "projection_head.1.weight",
    "prototypes0.weight", // frozen on step 0
    "unused",             // never has a gradient
];

fn larc_case_inputs((name, config): &(&'static str, LarcSgdConfig)) -> Case {
    tch::manual_seed(30);
    let f = (Kind::Float, Device::Cpu);
    let initial = [
        Tensor::randn([4, 3], f),
        Tensor::zeros([4], f),
        Tensor::ones([4], f),
        unit_rows(5, 3),
        Tensor::randn([2], f),
    ];
    let mut inputs: Vec<(String, Tensor)> = LARC_PARAMETERS
        .iter()
        .zip(&initial)
        .map(|(n, t)| (format!("param.{n}"), t.copy()))
        .collect();
    // No entry = no gradient: the reference sets the frozen prototypes' gradient to None on
    // step 0, as SwAV does, where the trainer zeroes it (SwavHead::cancel_prototype_gradients).
    for step in 0..LRS.len() {
        for (n, t) in LARC_PARAMETERS.iter().zip(&initial) {
            if *n == "unused" || (*n == "prototypes0.weight" && step == 0) {
                continue;
            }
            inputs.push((
                format!("grad{step}.{n}"),
                Tensor::randn(t.size().as_slice(), f) * 0.1,
            ));
        }
    }
    let json = format!(
        r#"{{"kind": "larc", "momentum": {:?}, "weight_decay": {:?}, "trust_coefficient": {:?},
            "eps": {:?}, "clip": {}, "lrs": {LRS:?}, "names": {LARC_PARAMETERS:?}}}"#,
        config.momentum, config.weight_decay, config.trust_coefficient, config.eps, config.clip
    );
    Case { name, json, inputs }
}

#[test]
fn larc_sgd_matches_apex() {
    for (name, config) in larc_cases() {
        let (inputs, expected) = load_case(name);
        let parameters: Vec<(String, Tensor)> = LARC_PARAMETERS
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    inputs[&format!("param.{n}")].copy().set_requires_grad(true),
                )
            })
            .collect();
        let mut optimizer = LarcSgd::new(config);
        let mut worst = 0.0f64;
        for (step, lr) in LRS.iter().enumerate() {
            optimizer.zero_grad(&parameters);
            // Gradients exactly as given: ∂(Σ w·g)/∂w = g.
            let mut objective = Tensor::zeros([], (Kind::Float, Device::Cpu));
            for (n, w) in &parameters {
                match inputs.get(&format!("grad{step}.{n}")) {
                    Some(g) => objective += (w * g).sum(Kind::Float),
                    // The frozen prototypes: a zero gradient, as the trainer's helper leaves it.
                    None if n == "prototypes0.weight" => objective += (w * 0.0).sum(Kind::Float),
                    None => {}
                }
            }
            objective.backward();
            optimizer.step(&parameters, *lr);
            for (n, w) in &parameters {
                let label = format!("{name} step {step} {n}");
                let (abs, _) = assert_close(&label, w, &expected[&format!("step{step}.{n}")], LARC);
                worst = worst.max(abs);
            }
        }
        let state: HashMap<String, Tensor> = optimizer.state().into_iter().collect();
        for n in LARC_PARAMETERS {
            match (state.get(n), expected.get(&format!("momentum.{n}"))) {
                (Some(ours), Some(theirs)) => {
                    assert_close(&format!("{name} momentum {n}"), ours, theirs, LARC);
                }
                (None, None) => {}
                (ours, theirs) => panic!(
                    "{name}: momentum buffer of {n} here {}, in the reference {}",
                    ours.is_some(),
                    theirs.is_some()
                ),
            }
        }
        println!(
            "{name}: parameters max |Δ| {worst:.1e} over {} steps",
            LRS.len()
        );
    }
}
