//! The RegNetY of `trainer::regnet` against torchvision's, through the reference script
//! `tests/python/regnet_reference.py` run by the project's venv (torch 2.11.0, torchvision
//! 0.26.0): the generated stages and parameter counts of every preset and of random designs, and
//! the features of exported 400MF and 800MF trunks loaded into torchvision with
//! `load_state_dict(strict=True)`.
//!
//! Without the venv or the script these tests fail (they never skip): run `scripts/setup.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use trainer::export::export_trunk;
use trainer::regnet::{PRESET_NAMES, RegNetParams, RegNetY, StageSpec, preset};

/// The presets torchvision has a builder for.
const TORCHVISION_BUILDERS: [(&str, &str); 6] = [
    ("400MF", "regnet_y_400mf"),
    ("800MF", "regnet_y_800mf"),
    ("8GF", "regnet_y_8gf"),
    ("16GF", "regnet_y_16gf"),
    ("32GF", "regnet_y_32gf"),
    ("128GF", "regnet_y_128gf"),
];

/// Features must agree to this relative error, ‖ours − torchvision‖ / ‖torchvision‖.
const FEATURE_TOLERANCE: f64 = 1e-5;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the trainer crate sits in the workspace")
        .to_owned()
}

/// Runs the reference script on `request` in `dir` and returns its response.
fn reference(request: &Value, dir: &Path) -> Value {
    let python = workspace().join(".venv/bin/python");
    let script = workspace().join("tests/python/regnet_reference.py");
    assert!(
        python.exists(),
        "{} is missing: this test needs the project's venv with torch and torchvision (run scripts/setup.sh)",
        python.display()
    );
    assert!(
        script.exists(),
        "{} is missing: the torchvision reference this test checks against",
        script.display()
    );
    let request_path = dir.join("request.json");
    let response_path = dir.join("response.json");
    std::fs::write(&request_path, request.to_string()).unwrap();
    let output = Command::new(&python)
        .arg(&script)
        .arg(&request_path)
        .arg(&response_path)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    assert!(
        output.status.success(),
        "the reference script failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&response_path).unwrap()).unwrap()
}

fn design_json(name: &str, params: &RegNetParams, torchvision: Option<&str>) -> Value {
    json!({
        "name": name,
        "depth": params.depth,
        "w0": params.w0,
        "wa": params.wa,
        "wm": params.wm,
        "group_width": params.group_width,
        "se_ratio": params.se_ratio,
        "bottleneck_ratio": params.bottleneck_ratio,
        "stem_width": params.stem_width,
        "torchvision": torchvision,
    })
}

fn params_from_json(design: &Value) -> RegNetParams {
    let int = |key: &str| design[key].as_i64().unwrap();
    let float = |key: &str| design[key].as_f64().unwrap();
    RegNetParams {
        depth: int("depth") as usize,
        w0: int("w0"),
        wa: float("wa"),
        wm: float("wm"),
        group_width: int("group_width"),
        se_ratio: float("se_ratio"),
        bottleneck_ratio: float("bottleneck_ratio"),
        stem_width: int("stem_width"),
    }
}

/// torchvision's stages of a response entry.
fn stages_from_json(design: &Value) -> Vec<StageSpec> {
    let list = |key: &str| -> Vec<i64> {
        let values = design[key].as_array().unwrap();
        values.iter().map(|v| v.as_i64().unwrap()).collect()
    };
    let (widths, depths, group_widths) = (list("widths"), list("depths"), list("group_widths"));
    (0..widths.len())
        .map(|i| StageSpec {
            width: widths[i],
            depth: depths[i] as usize,
            group_width: group_widths[i],
        })
        .collect()
}

/// Every preset and 1000 random designs (20 of them with parameter counts) give torchvision's
/// stages and parameter counts.
#[test]
fn designs_match_torchvision() {
    let dir = tempfile::tempdir().unwrap();
    let designs: Vec<Value> = PRESET_NAMES
        .iter()
        .map(|&name| {
            let builder = TORCHVISION_BUILDERS
                .iter()
                .find(|(preset_name, _)| *preset_name == name)
                .map(|(_, builder)| *builder);
            design_json(name, &preset(name).unwrap(), builder)
        })
        .collect();
    let request = json!({
        "designs": designs,
        "random": {"count": 1000, "seed": 0, "counted": 20},
    });
    let response = reference(&request, dir.path());

    for design in response["designs"].as_array().unwrap() {
        let name = design["name"].as_str().unwrap();
        let params = preset(name).unwrap();
        assert_eq!(params.stages(), stages_from_json(design), "{name}");
        let ours = params.parameter_count();
        let theirs = design["parameters"].as_u64().unwrap();
        assert_eq!(ours, theirs, "{name}: parameters");
        if let Some(builder) = design["torchvision_parameters"].as_u64() {
            assert_eq!(ours, builder, "{name}: parameters of torchvision's builder");
        }
        eprintln!("{name}: {ours} trunk parameters, torchvision {theirs}");
    }
    let random = response["random"].as_array().unwrap();
    assert_eq!(random.len(), 1000);
    for design in random {
        let name = design["name"].as_str().unwrap();
        let params = params_from_json(design);
        assert_eq!(
            params.stages(),
            stages_from_json(design),
            "{name}: {params:?}"
        );
        if let Some(theirs) = design["parameters"].as_u64() {
            assert_eq!(params.parameter_count(), theirs, "{name}: {params:?}");
        }
    }
}

/// A trunk built under `trunk` with every batch norm in a non-trivial state: random γ and β,
/// and running statistics moved by two training steps.
fn trained_trunk(params: &RegNetParams, seed: i64) -> (nn::VarStore, RegNetY) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = RegNetY::new(&(vs.root() / "trunk"), params).unwrap();
    // In name order: the var store's map iterates in a different order in every process.
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut variable) in variables {
            // Batch norms are the child `1` of torchvision's `Conv2dNormActivation`.
            if name.ends_with(".1.weight") {
                let _ = variable.uniform_(0.5, 1.5);
            } else if name.ends_with(".1.bias") {
                variable.copy_(&(Tensor::randn(variable.size(), tch::kind::FLOAT_CPU) * 0.1));
            }
        }
    });
    for _ in 0..2 {
        let images = Tensor::randn([4, 3, 64, 64], tch::kind::FLOAT_CPU);
        let _ = model.forward_t(&images, true);
    }
    (vs, model)
}

/// Exported 400MF and 800MF trunks load into torchvision strictly and give the same features.
#[test]
fn features_match_torchvision() {
    tch::set_num_threads(2);
    let dir = tempfile::tempdir().unwrap();
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    for (seed, (name, builder)) in [
        (1, ("400MF", "regnet_y_400mf")),
        (2, ("800MF", "regnet_y_800mf")),
    ] {
        let params = preset(name).unwrap();
        let (vs, model) = trained_trunk(&params, seed);
        let trainable: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(trainable as u64, params.parameter_count(), "{name}");
        let counter = &vs.variables()["trunk.stem.1.num_batches_tracked"];
        assert_eq!(counter.int64_value(&[]), 2);

        let weights = dir.path().join(format!("{builder}.safetensors"));
        let written = export_trunk(&vs, "trunk", &weights).unwrap();
        assert_eq!(written, vs.len());
        let input_path = dir.path().join(format!("{builder}-input.safetensors"));
        let images = Tensor::randn([2, 3, 64, 64], tch::kind::FLOAT_CPU);
        Tensor::write_safetensors(&[("input", &images)], &input_path).unwrap();
        let features = tch::no_grad(|| model.forward_t(&images, false));
        assert_eq!(features.size(), [2, model.out_channels()]);
        let output = dir.path().join(format!("{builder}-features.safetensors"));
        jobs.push(json!({
            "arch": builder,
            "weights": weights,
            "input": input_path,
            "output": output,
        }));
        ours.push((name, written, features, output));
    }

    let response = reference(&json!({ "forward": jobs }), dir.path());
    let answers = response["forward"].as_array().unwrap();
    for ((name, written, features, output), answer) in ours.into_iter().zip(answers) {
        assert_eq!(answer["keys"].as_u64(), Some(written as u64), "{name}");
        let (_, reference) = Tensor::read_safetensors(&output)
            .unwrap()
            .into_iter()
            .find(|(key, _)| key == "features")
            .unwrap();
        assert_eq!(reference.size(), features.size(), "{name}");
        let norm = reference.norm().double_value(&[]);
        let error = (&features - &reference).norm().double_value(&[]) / norm;
        let max_abs = (&features - &reference)
            .abs()
            .max()
            .to_kind(Kind::Double)
            .double_value(&[]);
        eprintln!(
            "{name}: relative error {error:.3e}, max abs {max_abs:.3e}, ‖features‖ {norm:.4}"
        );
        assert!(norm > 0.0, "{name}: torchvision's features are all zero");
        assert!(
            error < FEATURE_TOLERANCE,
            "{name}: relative error {error:e} against torchvision"
        );
    }
}
