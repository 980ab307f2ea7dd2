//! RegNetY, the trunk SEER pretrains: generated from five numbers, built on libtorch with
//! torchvision's parameter names.
//!
//! A [`RegNetParams`] holds the RegNet design parameters (depth, `w0`, `wa`, `wm`, group width)
//! plus the RegNetY constants (squeeze-excitation ratio 0.25 of the block *input* width,
//! bottleneck ratio 1, stem width 32). [`RegNetParams::stages`] expands them into per-stage widths
//! and depths with the algorithm of torchvision's `BlockParams.from_init_params`
//! (seer.md §4), and [`RegNetParams::parameter_count`] counts the trunk's trainable parameters
//! without building it, so even SEER's 10B model can be checked on a laptop. [`preset`] knows the
//! torchvision models, SEER's 64GF, 128GF and 256GF, and SEER's 10B.
//!
//! [`RegNetY`] builds the model under a [`tch::nn::Path`]. Its variables are named exactly as the
//! keys of torchvision's `regnet_y_*().state_dict()` (`stem.0.weight`,
//! `trunk_output.block1.block1-0.f.se.fc1.bias`, ... including each batch norm's
//! `num_batches_tracked`), so a trunk built on the root of a var store moves to and from
//! torchvision unchanged (see [`crate::export`]). Its forward pass ends with global average
//! pooling: it returns `[B, C]` features for the SwAV head, with no classifier.
//!
//! ```
//! use tch::nn::ModuleT;
//! use trainer::regnet::{RegNetY, preset};
//!
//! let params = preset("400MF").unwrap();
//! assert_eq!(params.parameter_count(), 3_903_144);
//! let vs = tch::nn::VarStore::new(tch::Device::Cpu);
//! let model = RegNetY::new(&vs.root(), &params).unwrap();
//! let images = tch::Tensor::zeros([1, 3, 32, 32], tch::kind::FLOAT_CPU);
//! let features = model.forward_t(&images, false);
//! assert_eq!(features.size(), [1, model.out_channels()]);
//! ```

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// Widths are quantized to multiples of this (pycls and torchvision's `QUANT`).
const WIDTH_QUANTUM: f32 = 8.0;
/// The first block of every stage halves the resolution, as does the stem.
const STAGE_STRIDE: i64 = 2;
/// torchvision's `nn.BatchNorm2d` defaults, which `regnet_y_*` keep (seer.md §4).
const BATCH_NORM_EPS: f64 = 1e-5;
const BATCH_NORM_MOMENTUM: f64 = 0.1;

/// The design of one RegNetY: the RegNet generator's inputs and the block constants.
///
/// Per-block widths grow linearly (`u_j = w0 + wa·j`), are snapped to the nearest power of `wm`
/// times `w0` and quantized to multiples of 8; runs of equal widths form the stages (seer.md §4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegNetParams {
    /// Number of blocks, over all stages.
    pub depth: usize,
    /// Initial width; a positive multiple of 8.
    pub w0: i64,
    /// Width slope per block; at least 0.
    pub wa: f64,
    /// Width multiplier between stages, in log space; greater than 1.
    pub wm: f64,
    /// Channels per group of the 3×3 convolutions (capped at the stage's bottleneck width).
    pub group_width: i64,
    /// Squeeze-excitation width as a fraction of the block's *input* width (torchvision's
    /// `BottleneckTransform`, seer.md §4); 0 leaves the squeeze-excitation out. RegNetY: 0.25.
    pub se_ratio: f64,
    /// Bottleneck width as a fraction of the block's output width. RegNetY: 1.
    pub bottleneck_ratio: f64,
    /// Output channels of the stem's 3×3 convolution. torchvision and VISSL: 32.
    pub stem_width: i64,
}

/// One stage of a RegNet: `depth` blocks of output width `width`, the first with stride 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    /// Output channels of every block in the stage.
    pub width: i64,
    /// Number of blocks.
    pub depth: usize,
    /// Channels per group of the stage's 3×3 convolutions.
    pub group_width: i64,
}

/// The widest layer a RegNet may have, in channels.
const MAX_WIDTH: i64 = 65_536;

/// A [`RegNetParams`] outside the range the generator accepts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid RegNet parameters: {field} = {value}, but it must be {requirement}")]
pub struct InvalidParams {
    /// The offending field of [`RegNetParams`].
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// What the generator needs.
    pub requirement: &'static str,
}

impl RegNetParams {
    /// A RegNetY: squeeze-excitation ratio 0.25, bottleneck ratio 1, stem width 32.
    pub const fn regnet_y(depth: usize, w0: i64, wa: f64, wm: f64, group_width: i64) -> Self {
        Self {
            depth,
            w0,
            wa,
            wm,
            group_width,
            se_ratio: 0.25,
            bottleneck_ratio: 1.0,
            stem_width: 32,
        }
    }

    /// Checks the ranges torchvision's `BlockParams.from_init_params` checks (`wa ≥ 0`,
    /// `w0 > 0`, `wm > 1`, `w0 % 8 == 0`), plus the ones it leaves to a crash.
    pub fn validate(&self) -> Result<(), InvalidParams> {
        let fail = |field, value: String, requirement| {
            Err(InvalidParams {
                field,
                value,
                requirement,
            })
        };
        if self.depth == 0 {
            return fail("depth", self.depth.to_string(), "at least 1");
        }
        if self.w0 <= 0 || self.w0 % 8 != 0 {
            return fail("w0", self.w0.to_string(), "a positive multiple of 8");
        }
        if !(self.wa >= 0.0 && self.wa.is_finite()) {
            return fail("wa", self.wa.to_string(), "finite and at least 0");
        }
        if !(self.wm > 1.0 && self.wm.is_finite()) {
            return fail("wm", self.wm.to_string(), "finite and greater than 1");
        }
        if self.group_width <= 0 {
            return fail("group_width", self.group_width.to_string(), "at least 1");
        }
        if !(self.se_ratio >= 0.0 && self.se_ratio.is_finite()) {
            return fail(
                "se_ratio",
                self.se_ratio.to_string(),
                "finite and at least 0",
            );
        }
        // Widths are at least 8, so this keeps every bottleneck at one channel or more.
        if !(self.bottleneck_ratio >= 0.125 && self.bottleneck_ratio.is_finite()) {
            return fail(
                "bottleneck_ratio",
                self.bottleneck_ratio.to_string(),
                "finite and at least 1/8",
            );
        }
        if self.stem_width <= 0 || self.stem_width > MAX_WIDTH {
            return fail(
                "stem_width",
                self.stem_width.to_string(),
                "at least 1 and at most 65536",
            );
        }
        if self.depth > 1000 {
            return fail("depth", self.depth.to_string(), "at most 1000");
        }
        if self.se_ratio > 4.0 {
            return fail("se_ratio", self.se_ratio.to_string(), "at most 4");
        }
        // Widths past this cannot be allocated (RegNetY-256GF's widest stage has 7,392).
        let widest = self.block_widths().into_iter().max().unwrap_or(0);
        if self.w0 > MAX_WIDTH || !(1..=MAX_WIDTH).contains(&widest) {
            return fail(
                "w0, wa, wm",
                format!(
                    "{}, {}, {} (widest stage: {widest} channels)",
                    self.w0, self.wa, self.wm
                ),
                "stage widths of at most 65536 channels",
            );
        }
        Ok(())
    }

    /// The quantized width of every block, before the group-width adjustment.
    ///
    /// Computed in `f32`, as torchvision computes it (its tensors take torch's default dtype), so
    /// that rounding near a half lands where torchvision's does; pycls and ClassyVision use numpy's
    /// `f64` and could differ in such ties. Both round half to even.
    fn block_widths(&self) -> Vec<i64> {
        let w0 = self.w0 as f32;
        let wa = self.wa as f32;
        let wm = self.wm as f32;
        // `torch.log(...) / math.log(w_m)`: the divisor is computed in f64, then cast.
        let log_wm = self.wm.ln() as f32;
        (0..self.depth)
            .map(|j| {
                let continuous = j as f32 * wa + w0;
                let exponent = ((continuous / w0).ln() / log_wm).round_ties_even();
                let quantized = (w0 * wm.powf(exponent) / WIDTH_QUANTUM).round_ties_even();
                (quantized as i64).saturating_mul(WIDTH_QUANTUM as i64)
            })
            .collect()
    }

    /// The stages: widths, depths and group widths, as torchvision's
    /// `BlockParams.from_init_params` computes them.
    ///
    /// After the quantization the widths are adjusted so that the bottleneck width is a multiple
    /// of the group width (capped at the bottleneck width), rounding with torchvision's
    /// `_make_divisible`: to the nearest multiple, halves up, and one multiple more where that
    /// would lose over 10%. pycls and ClassyVision (thus VISSL's SEER models) round plainly
    /// (`round(w/g)·g`, seer.md §4). The two agree on SEER's models but not on 800MF (first two
    /// stages 64, 144 here; 64, 128 in pycls) and 8GF (first stage 224 here; 168 in pycls and in
    /// seer.md's table): this crate follows torchvision, whose checkpoints must load.
    ///
    /// # Panics
    /// If the parameters are invalid (see [`RegNetParams::validate`]).
    pub fn stages(&self) -> Vec<StageSpec> {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
        let mut stages: Vec<StageSpec> = Vec::new();
        for width in self.block_widths() {
            match stages.last_mut() {
                Some(stage) if stage.width == width => stage.depth += 1,
                _ => stages.push(StageSpec {
                    width,
                    depth: 1,
                    group_width: self.group_width,
                }),
            }
        }
        // torchvision's `_adjust_widths_groups_compatibilty`.
        for stage in &mut stages {
            let bottleneck = (stage.width as f64 * self.bottleneck_ratio) as i64;
            let group_width = self.group_width.min(bottleneck);
            let bottleneck = make_divisible(bottleneck, group_width);
            stage.width = (bottleneck as f64 / self.bottleneck_ratio) as i64;
            stage.group_width = group_width;
        }
        stages
    }

    /// Every block's shape, stage by stage, as torchvision's `RegNet.__init__` derives it from
    /// the stages.
    fn blocks(&self) -> Vec<Vec<BlockSpec>> {
        let mut width_in = self.stem_width;
        self.stages()
            .iter()
            .map(|stage| {
                (0..stage.depth)
                    .map(|index| {
                        let block = BlockSpec::new(self, width_in, stage, index);
                        width_in = stage.width;
                        block
                    })
                    .collect()
            })
            .collect()
    }

    /// The trunk's trainable parameters (stem and stages, no classifier), counted from the
    /// design without allocating the model.
    ///
    /// # Panics
    /// If the parameters are invalid (see [`RegNetParams::validate`]).
    pub fn parameter_count(&self) -> u64 {
        let batch_norm = |channels: i64| 2 * channels;
        let stem = self.stem_width * 3 * 3 * 3 + batch_norm(self.stem_width);
        let blocks: i64 = self
            .blocks()
            .iter()
            .flatten()
            .map(|b| {
                let projection = if b.has_projection() {
                    b.width_in * b.width_out + batch_norm(b.width_out)
                } else {
                    0
                };
                let a = b.width_in * b.bottleneck + batch_norm(b.bottleneck);
                let grouped = b.bottleneck * (b.bottleneck / b.groups) * 3 * 3;
                let squeeze = b.se_width.map_or(0, |se| {
                    (b.bottleneck * se + se) + (se * b.bottleneck + b.bottleneck)
                });
                let c = b.bottleneck * b.width_out + batch_norm(b.width_out);
                projection + a + grouped + batch_norm(b.bottleneck) + squeeze + c
            })
            .sum();
        (stem + blocks) as u64
    }

    /// Channels of the pooled features: the last stage's width.
    ///
    /// # Panics
    /// If the parameters are invalid (see [`RegNetParams::validate`]).
    pub fn out_channels(&self) -> i64 {
        self.stages().last().map_or(self.stem_width, |s| s.width)
    }
}

/// torchvision's `_make_divisible(value, divisor)` (from TensorFlow's MobileNet): the nearest
/// multiple of `divisor`, halves up, at least `divisor`, and never more than 10% below `value`.
fn make_divisible(value: i64, divisor: i64) -> i64 {
    let value_f = value as f64;
    let mut rounded = divisor.max((value_f + divisor as f64 / 2.0) as i64 / divisor * divisor);
    if (rounded as f64) < 0.9 * value_f {
        rounded += divisor;
    }
    rounded
}

/// The shape of one residual bottleneck block (torchvision's `ResBottleneckBlock`).
#[derive(Debug, Clone, Copy)]
struct BlockSpec {
    width_in: i64,
    width_out: i64,
    stride: i64,
    bottleneck: i64,
    /// Number of groups of the 3×3 convolution.
    groups: i64,
    /// Squeeze-excitation width, if the block has one.
    se_width: Option<i64>,
}

impl BlockSpec {
    fn new(params: &RegNetParams, width_in: i64, stage: &StageSpec, index: usize) -> Self {
        // Python's `int(round(x))` rounds half to even, as `round_ties_even` does.
        let bottleneck = (stage.width as f64 * params.bottleneck_ratio).round_ties_even() as i64;
        let se_width = (params.se_ratio > 0.0)
            .then(|| (params.se_ratio * width_in as f64).round_ties_even() as i64);
        Self {
            width_in,
            width_out: stage.width,
            stride: if index == 0 { STAGE_STRIDE } else { 1 },
            bottleneck,
            groups: bottleneck / stage.group_width,
            se_width,
        }
    }

    /// A 1×1 convolution on the shortcut wherever the shape changes.
    fn has_projection(&self) -> bool {
        self.width_in != self.width_out || self.stride != 1
    }
}

/// The names [`preset`] knows, smallest first.
pub const PRESET_NAMES: [&str; 10] = [
    "200MF", "400MF", "800MF", "8GF", "16GF", "32GF", "64GF", "128GF", "256GF", "10B",
];

/// A named RegNetY design (seer.md §4, "Configs").
///
/// - `200MF`: pycls' RegNetY-200MF (torchvision has none).
/// - `400MF`, `800MF`, `8GF`, `16GF`, `32GF`, `128GF`: torchvision's `regnet_y_*`; `128GF` is
///   also the SEER RG-128 of VISSL.
/// - `64GF`: SEER's RegNetY-64GF (VISSL `regnet64Gf_3`).
/// - `256GF`: SEER's RegNetY-256GF (VISSL `regnet256Gf_1`: `w0` 640, `wa` 230.83, `wm` 2.53,
///   group width 373), *not* ClassyVision's `regnet_y_256gf`.
/// - `10B`: SEER's RG-10B (VISSL `regnet10B`).
///
/// Names match case-insensitively, with or without a `regnet_y_` or `RegNetY-` prefix
/// (`"regnet_y_400mf"`). Unknown names give `None`.
pub fn preset(name: &str) -> Option<RegNetParams> {
    let lower = name.to_ascii_lowercase();
    let short = ["regnet_y_", "regnety-", "regnety_", "regnet-y-"]
        .iter()
        .find_map(|prefix| lower.strip_prefix(prefix))
        .unwrap_or(&lower);
    let p = RegNetParams::regnet_y;
    Some(match short {
        "200mf" => p(13, 24, 36.44, 2.49, 8),
        "400mf" => p(16, 48, 27.89, 2.09, 8),
        "800mf" => p(14, 56, 38.84, 2.4, 16),
        "8gf" => p(17, 192, 76.82, 2.19, 56),
        "16gf" => p(18, 200, 106.23, 2.48, 112),
        "32gf" => p(20, 232, 115.89, 2.53, 232),
        "64gf" => p(20, 352, 147.48, 2.4, 328),
        "128gf" => p(27, 456, 160.83, 2.52, 264),
        "256gf" => p(27, 640, 230.83, 2.53, 373),
        "10b" => p(27, 1744, 620.83, 2.52, 1010),
        _ => return None,
    })
}

/// Batch normalization with torchvision's state: `weight`, `bias`, `running_mean`,
/// `running_var` and the `num_batches_tracked` counter (an `i64` scalar), so that the var store
/// holds every key of torchvision's state dict.
#[derive(Debug)]
struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    fn new(path: &nn::Path, channels: i64) -> Self {
        let counter = Tensor::zeros([], (Kind::Int64, path.device()));
        Self {
            weight: path.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: path.var("bias", &[channels], nn::Init::Const(0.0)),
            running_mean: path.zeros_no_train("running_mean", &[channels]),
            running_var: path.ones_no_train("running_var", &[channels]),
            num_batches_tracked: path.add("num_batches_tracked", counter, false),
        }
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train {
            // Bookkeeping only: with a fixed momentum torch never reads the counter.
            let mut counter = self.num_batches_tracked.shallow_clone();
            counter += 1;
        }
        // In training libtorch updates the running statistics in place; with a SyncBatchNorm
        // group configured (data-parallel runs), over the group's batches.
        crate::dist::batch_norm(
            xs,
            &self.weight,
            &self.bias,
            &self.running_mean,
            &self.running_var,
            train,
            BATCH_NORM_MOMENTUM,
            BATCH_NORM_EPS,
        )
    }
}

/// A bias-free convolution and a batch norm: torchvision's `Conv2dNormActivation`, whose
/// children are `0` (convolution) and `1` (norm); the activation has no parameters and is
/// applied by the caller.
#[derive(Debug)]
struct ConvNorm {
    conv: nn::Conv2D,
    norm: BatchNorm2d,
}

impl ConvNorm {
    fn new(path: &nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64, groups: i64) -> Self {
        let config = nn::ConvConfig {
            stride,
            padding: (kernel - 1) / 2,
            groups,
            bias: false,
            ws_init: conv_weight_init(kernel, c_out),
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(path / "0", c_in, c_out, kernel, config),
            norm: BatchNorm2d::new(&(path / "1"), c_out),
        }
    }
}

impl ModuleT for ConvNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply(&self.conv).apply_t(&self.norm, train)
    }
}

/// torchvision's RegNet init for every convolution: N(0, √(2 / fan_out)) with
/// fan_out = k²·C_out, not divided by the groups (seer.md §4).
fn conv_weight_init(kernel: i64, c_out: i64) -> nn::Init {
    let fan_out = (kernel * kernel * c_out) as f64;
    nn::Init::Randn {
        mean: 0.0,
        stdev: (2.0 / fan_out).sqrt(),
    }
}

/// torchvision's `SqueezeExcitation`: pool, 1×1 conv `fc1` (with bias), ReLU, 1×1 conv `fc2`
/// (with bias), sigmoid, scale.
#[derive(Debug)]
struct SqueezeExcitation {
    fc1: nn::Conv2D,
    fc2: nn::Conv2D,
}

impl SqueezeExcitation {
    fn new(path: &nn::Path, channels: i64, squeeze: i64) -> Self {
        // RegNet's init replaces the weights only; the biases keep `nn.Conv2d`'s default,
        // U(-1/√fan_in, 1/√fan_in).
        let conv = |name: &str, c_in: i64, c_out: i64| {
            let bound = 1.0 / (c_in as f64).sqrt();
            let config = nn::ConvConfig {
                ws_init: conv_weight_init(1, c_out),
                bs_init: nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                ..Default::default()
            };
            nn::conv2d(path / name, c_in, c_out, 1, config)
        };
        Self {
            fc1: conv("fc1", channels, squeeze),
            fc2: conv("fc2", squeeze, channels),
        }
    }
}

impl nn::Module for SqueezeExcitation {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let scale = xs
            .adaptive_avg_pool2d([1, 1]) // [B, C, 1, 1]
            .apply(&self.fc1) // [B, S, 1, 1]
            .relu()
            .apply(&self.fc2) // [B, C, 1, 1]
            .sigmoid();
        xs * scale // [B, C, H, W]
    }
}

/// torchvision's `ResBottleneckBlock`: `relu(shortcut(x) + f(x))`, where `f` is the
/// `BottleneckTransform` `a` (1×1), `b` (grouped 3×3, strided), `se`, `c` (1×1, no ReLU).
#[derive(Debug)]
struct Block {
    projection: Option<ConvNorm>,
    a: ConvNorm,
    b: ConvNorm,
    se: Option<SqueezeExcitation>,
    c: ConvNorm,
}

impl Block {
    fn new(path: &nn::Path, spec: &BlockSpec) -> Self {
        let f = path / "f";
        let w_b = spec.bottleneck;
        Self {
            projection: spec.has_projection().then(|| {
                ConvNorm::new(
                    &(path / "proj"),
                    spec.width_in,
                    spec.width_out,
                    1,
                    spec.stride,
                    1,
                )
            }),
            a: ConvNorm::new(&(&f / "a"), spec.width_in, w_b, 1, 1, 1),
            b: ConvNorm::new(&(&f / "b"), w_b, w_b, 3, spec.stride, spec.groups),
            se: spec
                .se_width
                .map(|se| SqueezeExcitation::new(&(&f / "se"), w_b, se)),
            c: ConvNorm::new(&(&f / "c"), w_b, spec.width_out, 1, 1, 1),
        }
    }
}

impl ModuleT for Block {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // xs: [B, C_in, H, W]; s = the block's stride
        let f = self.a.forward_t(xs, train).relu_(); // [B, W_b, H, W]
        let f = self.b.forward_t(&f, train).relu_(); // [B, W_b, H/s, W/s]
        let f = match &self.se {
            Some(se) => f.apply(se),
            None => f,
        };
        let f = self.c.forward_t(&f, train); // [B, C_out, H/s, W/s]
        let mut out = match &self.projection {
            Some(projection) => projection.forward_t(xs, train) + f,
            None => xs + f,
        };
        out.relu_() // [B, C_out, H/s, W/s]
    }
}

/// A RegNetY trunk: stem, four (or however many the design gives) stages, global average pool.
///
/// Variables live under the [`nn::Path`] given to [`RegNetY::new`] with torchvision's names
/// (see the module docs). Initialization follows torchvision's `RegNet`: convolutions
/// N(0, √(2/(k²·C_out))), batch norms γ = 1 and β = 0 (no zero-init of a block's last γ,
/// seer.md §4), squeeze-excitation biases U(±1/√fan_in).
#[derive(Debug)]
pub struct RegNetY {
    stem: ConvNorm,
    stages: Vec<Vec<Block>>,
    params: RegNetParams,
    out_channels: i64,
}

impl RegNetY {
    /// Builds the trunk described by `params`, creating its variables under `path`.
    pub fn new(path: &nn::Path, params: &RegNetParams) -> Result<Self, InvalidParams> {
        params.validate()?;
        let stem = ConvNorm::new(&(path / "stem"), 3, params.stem_width, 3, 2, 1);
        let trunk = path / "trunk_output";
        let stages: Vec<Vec<Block>> = params
            .blocks()
            .iter()
            .enumerate()
            .map(|(stage_index, blocks)| {
                let stage_name = format!("block{}", stage_index + 1);
                let stage = &trunk / stage_name.as_str();
                blocks
                    .iter()
                    .enumerate()
                    .map(|(index, spec)| {
                        Block::new(&(&stage / format!("{stage_name}-{index}")), spec)
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            stem,
            stages,
            params: *params,
            out_channels: params.out_channels(),
        })
    }

    /// Channels of the features [`forward_t`](ModuleT::forward_t) returns.
    pub fn out_channels(&self) -> i64 {
        self.out_channels
    }

    /// The design the trunk was built from.
    pub fn params(&self) -> &RegNetParams {
        &self.params
    }
}

impl RegNetY {
    /// The last stage's feature map `[B, C, H/2^(S+1), W/2^(S+1)]` of images `[B, 3, H, W]`
    /// (S stages), before the global pool. `train` selects batch statistics (and updates the
    /// running ones).
    pub fn feature_map(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = self.stem.forward_t(xs, train).relu_(); // [B, 32, H/2, W/2]
        for stage in &self.stages {
            for block in stage {
                x = block.forward_t(&x, train); // stage k of 4: [B, C_k, H/2^(k+1), W/2^(k+1)]
            }
        }
        x
    }
}

impl ModuleT for RegNetY {
    /// Pooled trunk features `[B, C]` of images `[B, 3, H, W]` (any H, W; multiples of 32 keep
    /// every stride exact). `train` selects batch statistics (and updates the running ones).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.feature_map(xs, train)
            .adaptive_avg_pool2d([1, 1]) // [B, C, 1, 1]
            .flatten(1, -1) // [B, C]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widths(stages: &[StageSpec]) -> Vec<i64> {
        stages.iter().map(|s| s.width).collect()
    }

    fn depths(stages: &[StageSpec]) -> Vec<usize> {
        stages.iter().map(|s| s.depth).collect()
    }

    /// seer.md §4 "Configs": stage widths, depths, and trunk parameters (millions, to the
    /// precision the table prints them). The exact counts are torchvision's, which
    /// trainer/tests/regnet_torchvision.rs checks again.
    #[test]
    fn presets_match_the_reference_table() {
        /// Name, stage widths, stage depths, parameters, (millions, precision printed).
        type Row = (&'static str, [i64; 4], [usize; 4], u64, (f64, f64));
        #[rustfmt::skip]
        let table: [Row; 10] = [
            ("200MF", [24, 56, 152, 368], [1, 1, 4, 7], 2_793_996, (2.8, 0.1)),
            ("400MF", [48, 104, 208, 440], [1, 3, 6, 6], 3_903_144, (3.9, 0.1)),
            // Not in seer.md's table; torchvision's regnet_y_800mf (pycls: 64, 128, 320, 768).
            ("800MF", [64, 144, 320, 784], [1, 3, 8, 2], 5_647_512, (5.6, 0.1)),
            // seer.md (from pycls) has 168 and 37.2M: pycls rounds the first stage's 192 to a
            // multiple of 56 plainly (168), torchvision refuses to lose >10% and takes 224.
            ("8GF", [224, 448, 896, 2016], [2, 4, 10, 1], 37_364_472, (37.4, 0.1)),
            ("16GF", [224, 448, 1232, 3024], [2, 4, 11, 1], 80_565_140, (80.6, 0.1)),
            ("32GF", [232, 696, 1392, 3712], [2, 5, 12, 1], 141_333_770, (141.3, 0.1)),
            ("64GF", [328, 984, 1968, 4920], [2, 5, 12, 1], 276_457_786, (276.5, 0.1)),
            ("128GF", [528, 1056, 2904, 7392], [2, 7, 17, 1], 637_419_894, (637.4, 0.1)),
            ("256GF", [746, 1492, 4103, 10444], [2, 7, 17, 1], 1_272_156_138, (1272.0, 1.0)),
            ("10B", [2020, 4040, 11110, 28280], [2, 7, 17, 1], 9_323_934_872, (9320.0, 10.0)),
        ];
        for (name, stage_widths, stage_depths, exact, (millions, precision)) in table {
            let params = preset(name).unwrap();
            let stages = params.stages();
            assert_eq!(widths(&stages), stage_widths, "{name} widths");
            assert_eq!(depths(&stages), stage_depths, "{name} depths");
            let count = params.parameter_count();
            assert_eq!(count, exact, "{name} parameters");
            let rounded = (count as f64 / 1e6 / precision).round() * precision;
            assert!(
                (rounded - millions).abs() < 1e-6,
                "{name}: {count} rounds to {rounded}M, table {millions}M"
            );
            assert_eq!(params.out_channels(), stage_widths[3]);
            assert_eq!(stage_depths.iter().sum::<usize>(), params.depth);
        }
    }

    /// seer.md §4: the group adjustment moves RG-128 and SEER's RG-256 a long way.
    #[test]
    fn group_adjustment_of_seer_models() {
        let quantized = |name: &str| {
            let mut w = preset(name).unwrap().block_widths();
            w.dedup();
            w
        };
        assert_eq!(quantized("128GF"), [456, 1152, 2896, 7296]);
        assert_eq!(quantized("256GF"), [640, 1616, 4096, 10368]);
        let stages = preset("256GF").unwrap().stages();
        assert!(stages.iter().all(|s| s.group_width == 373));
    }

    /// The 400MF vectors of seer.md §4: per-block widths [48, 104×3, 208×6, 440×6].
    #[test]
    fn block_widths_of_400mf() {
        let mut expected = vec![48];
        expected.extend([104; 3]);
        expected.extend([208; 6]);
        expected.extend([440; 6]);
        assert_eq!(preset("400MF").unwrap().block_widths(), expected);
    }

    /// SEER's models come from ClassyVision, which rounds group widths plainly; they must not
    /// depend on which rounding is used.
    #[test]
    fn seer_presets_agree_with_plain_group_rounding() {
        for name in ["64GF", "128GF", "256GF", "10B"] {
            let params = preset(name).unwrap();
            let mut quantized = params.block_widths();
            quantized.dedup();
            let plain: Vec<i64> = quantized
                .iter()
                .map(|&w| {
                    let g = params.group_width.min(w);
                    (w as f64 / g as f64).round_ties_even() as i64 * g
                })
                .collect();
            assert_eq!(widths(&params.stages()), plain, "{name}");
        }
    }

    #[test]
    fn make_divisible_follows_torchvision() {
        assert_eq!(make_divisible(192, 56), 224); // 168 would lose 12.5%
        assert_eq!(make_divisible(640, 373), 746);
        assert_eq!(make_divisible(4096, 373), 4103);
        assert_eq!(make_divisible(4, 8), 8); // at least the divisor
        assert_eq!(make_divisible(12, 8), 16); // halves go up
        assert_eq!(make_divisible(20, 8), 24); // 2.5 → 3, not to even
    }

    #[test]
    fn presets_by_any_spelling() {
        assert_eq!(preset("regnet_y_400mf"), preset("400MF"));
        assert_eq!(preset("RegNetY-256GF"), preset("256gf"));
        assert!(preset("regnet_y_256gf").is_some_and(|p| p.group_width == 373));
        assert_eq!(preset("1.6GF"), None);
        for name in PRESET_NAMES {
            assert!(preset(name).is_some(), "{name}");
        }
    }

    #[test]
    fn invalid_params_are_named() {
        let mut params = preset("400MF").unwrap();
        params.w0 = 50;
        let error = params.validate().unwrap_err();
        assert_eq!(error.field, "w0");
        assert!(error.to_string().contains("multiple of 8"), "{error}");
        params.w0 = 48;
        params.wm = 1.0;
        assert_eq!(params.validate().unwrap_err().field, "wm");
        let vs = nn::VarStore::new(tch::Device::Cpu);
        assert!(RegNetY::new(&vs.root(), &params).is_err());
    }

    /// The var store holds torchvision's state-dict keys of regnet_y_400mf (384, less
    /// `fc.weight` and `fc.bias`), with the shapes torchvision gives them.
    #[test]
    fn variable_names_are_torchvision_state_dict_keys() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let params = preset("400MF").unwrap();
        let model = RegNetY::new(&vs.root(), &params).unwrap();
        let variables = vs.variables();
        assert_eq!(variables.len(), 382);
        let shape = |name: &str| variables[name].size();
        assert_eq!(shape("stem.0.weight"), [32, 3, 3, 3]);
        assert_eq!(shape("stem.1.num_batches_tracked"), Vec::<i64>::new());
        assert_eq!(
            shape("trunk_output.block1.block1-0.proj.0.weight"),
            [48, 32, 1, 1]
        );
        assert_eq!(
            shape("trunk_output.block1.block1-0.f.b.0.weight"),
            [48, 8, 3, 3]
        );
        assert_eq!(
            shape("trunk_output.block1.block1-0.f.se.fc1.weight"),
            [8, 48, 1, 1]
        );
        assert_eq!(shape("trunk_output.block1.block1-0.f.se.fc2.bias"), [48]);
        assert_eq!(
            shape("trunk_output.block4.block4-5.f.c.1.running_var"),
            [440]
        );
        assert!(!variables.contains_key("trunk_output.block2.block2-1.proj.0.weight"));
        assert_eq!(
            variables["stem.1.num_batches_tracked"].kind(),
            tch::Kind::Int64
        );
        let trainable: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(trainable as u64, params.parameter_count());
        assert_eq!(model.out_channels(), 440);
    }

    #[test]
    fn training_forward_moves_batch_norm_state() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = RegNetY::new(&vs.root(), &preset("200MF").unwrap()).unwrap();
        let input = Tensor::randn([2, 3, 32, 32], tch::kind::FLOAT_CPU);
        let features = model.forward_t(&input, true);
        assert_eq!(features.size(), [2, 368]);
        let variables = vs.variables();
        assert_eq!(variables["stem.1.num_batches_tracked"].int64_value(&[]), 1);
        let running_mean = &variables["trunk_output.block4.block4-6.f.c.1.running_mean"];
        assert!(running_mean.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        let eval = model.forward_t(&input, false);
        assert_eq!(eval.size(), [2, 368]);
        assert_eq!(variables["stem.1.num_batches_tracked"].int64_value(&[]), 1);
    }
}
