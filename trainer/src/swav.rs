//! SwAV: the projection head with its prototypes, Sinkhorn-Knopp, and the swapped-prediction loss
//! with its optional queue.
//!
//! The semantics follow SwAV's `main_swav.py` and VISSL's `swav_loss.py` as summarized in
//! `shared/reference/seer.md` §2 (cited below as "seer.md §2"). One training step uses them so:
//!
//! ```no_run
//! use tch::{nn, Device, Kind, Tensor};
//! use trainer::collective::SingleProcess;
//! use trainer::swav::{SwavHead, SwavHeadConfig, SwavLoss, SwavLossConfig};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let mut head = SwavHead::new(&(vs.root() / "heads" / 0), SwavHeadConfig::seer(440));
//! let mut loss_fn = SwavLoss::new(SwavLossConfig::default()).unwrap();
//! head.normalize_prototypes(); // before the first forward, then after every optimizer step
//! let features = Tensor::randn([6 * 4, 440], (Kind::Float, Device::Cpu)); // [V·B, C], crop-major
//! let out = head.forward_t(&features, true);
//! let loss = loss_fn.loss(&out.embeddings, &out.scores, head.prototypes(), 0, &SingleProcess);
//! loss.backward();
//! head.cancel_prototype_gradients(0); // frozen for the first `freeze_prototypes_iters`
//! ```

use std::fmt;

use tch::nn::{self, Module, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::collective::Collective;

/// Smallest norm `F.normalize` divides by (PyTorch's default `eps`).
const NORMALIZE_EPS: f64 = 1e-12;

/// What VISSL adds to every entry when a prototype row has no mass left (seer.md §2).
const EMPTY_ROW_EPS: f64 = 1e-12;

/// Errors from configuring the SwAV loss or restoring its queue.
#[derive(Debug, Clone, PartialEq)]
pub enum SwavError {
    /// The loss configuration cannot work; the message says which field and why.
    InvalidConfig(String),
    /// A queue handed to [`SwavLoss::set_queue`] does not fit the configuration.
    QueueShape {
        /// What fits: `[len(crops_for_assign), rows, embedding dim]` (`-1` where any size fits).
        expected: Vec<i64>,
        /// What was given.
        found: Vec<i64>,
    },
}

impl fmt::Display for SwavError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwavError::InvalidConfig(message) => {
                write!(f, "invalid SwAV loss configuration: {message}")
            }
            SwavError::QueueShape { expected, found } => {
                write!(
                    f,
                    "SwAV queue of shape {found:?} does not fit the expected {expected:?}"
                )
            }
        }
    }
}

impl std::error::Error for SwavError {}

/// Shape of the projection head and its prototypes.
#[derive(Debug, Clone, PartialEq)]
pub struct SwavHeadConfig {
    /// Width of the trunk's pooled features (RegNetY-256GF: 10444; ResNet-50: 2048).
    pub input_dim: i64,
    /// Widths of the hidden layers; each is `Linear`, optional `BatchNorm1d`, `ReLU`.
    pub hidden_dims: Vec<i64>,
    /// Width of the embedding, the last `Linear` (no BN or ReLU after it).
    pub output_dim: i64,
    /// BatchNorm after each hidden `Linear` (SwAV ResNet-50: yes; SEER: no, `noBNhead`).
    pub use_bn: bool,
    /// Number of prototypes K (SwAV: 3000; SEER: 16,000).
    pub num_prototypes: i64,
    /// Iterations from the start during which the prototypes receive no update (seer.md §2
    /// "Freezing": 313 in SwAV's bs-4096 recipe and in the VISSL configs SEER inherits).
    pub freeze_prototypes_iters: u64,
    /// BatchNorm epsilon (VISSL `HEAD.BATCHNORM_EPS`, default 1e-5).
    pub batch_norm_eps: f64,
    /// BatchNorm running-statistics momentum (VISSL `HEAD.BATCHNORM_MOMENTUM`, default 0.1).
    pub batch_norm_momentum: f64,
}

impl SwavHeadConfig {
    /// SEER 2021: `input_dim`→8192→8192→256 without BN, 16,000 prototypes, frozen for 313
    /// iterations (`d10444_d8192_d8192_d256_proto16k.yaml`, seer.md §2).
    pub fn seer(input_dim: i64) -> Self {
        SwavHeadConfig {
            input_dim,
            hidden_dims: vec![8192, 8192],
            output_dim: 256,
            use_bn: false,
            num_prototypes: 16_000,
            freeze_prototypes_iters: 313,
            batch_norm_eps: 1e-5,
            batch_norm_momentum: 0.1,
        }
    }

    /// SwAV ResNet-50: 2048→2048 (BN, ReLU)→128, 3000 prototypes, frozen for 313 iterations
    /// (`src/resnet50.py`, `main_swav.py` defaults).
    pub fn swav_resnet50() -> Self {
        SwavHeadConfig {
            input_dim: 2048,
            hidden_dims: vec![2048],
            output_dim: 128,
            use_bn: true,
            num_prototypes: 3000,
            freeze_prototypes_iters: 313,
            batch_norm_eps: 1e-5,
            batch_norm_momentum: 0.1,
        }
    }
}

#[derive(Debug)]
enum Layer {
    Linear(nn::Linear),
    BatchNorm(nn::BatchNorm),
    Relu,
}

/// The outputs of [`SwavHead::forward_t`] for `N = V·B` crop-major rows.
#[derive(Debug)]
pub struct SwavOutput {
    /// L2-normalized embeddings, `[N, output_dim]`.
    pub embeddings: Tensor,
    /// Prototype scores `z·cₖ` (cosines once the prototypes are normalized), `[N, K]`.
    pub scores: Tensor,
}

/// The projection MLP, the L2 normalization and the bias-free prototype layer.
///
/// Parameters are named as VISSL's `swav_head` names them, so weights move between the two:
/// `projection_head.{i}.weight|bias` with `i` the index in VISSL's `nn.Sequential` (Linear, BN,
/// ReLU each take an index) and `prototypes0.weight`. Initialization is PyTorch's default for
/// `nn.Linear` (weights and biases U(±1/√fan_in)) and `BatchNorm1d` (γ=1, β=0), which neither
/// SwAV nor VISSL override for the head.
#[derive(Debug)]
pub struct SwavHead {
    config: SwavHeadConfig,
    layers: Vec<Layer>,
    prototypes: nn::Linear,
}

impl SwavHead {
    /// Creates the head's variables under `path`.
    ///
    /// # Panics
    /// If a dimension or the number of prototypes is not positive.
    pub fn new(path: &nn::Path, config: SwavHeadConfig) -> Self {
        let dims: Vec<i64> = std::iter::once(config.input_dim)
            .chain(config.hidden_dims.iter().copied())
            .chain(std::iter::once(config.output_dim))
            .collect();
        assert!(
            dims.iter().all(|&d| d > 0) && config.num_prototypes > 0,
            "SwAV head dimensions must be positive: {dims:?}, {} prototypes",
            config.num_prototypes
        );
        let projection = path / "projection_head";
        let mut layers = Vec::new();
        for (i, pair) in dims.windows(2).enumerate() {
            let (fan_in, fan_out) = (pair[0], pair[1]);
            layers.push(Layer::Linear(nn::linear(
                &projection / layers.len(),
                fan_in,
                fan_out,
                torch_linear_init(fan_in, true),
            )));
            if i == dims.len() - 2 {
                break; // VISSL `skip_last_bn`: the embedding layer has no BN or ReLU
            }
            if config.use_bn {
                let bn_config = nn::BatchNormConfig {
                    eps: config.batch_norm_eps,
                    momentum: config.batch_norm_momentum,
                    ws_init: nn::Init::Const(1.0),
                    bs_init: nn::Init::Const(0.0),
                    ..Default::default()
                };
                layers.push(Layer::BatchNorm(nn::batch_norm1d(
                    &projection / layers.len(),
                    fan_out,
                    bn_config,
                )));
            }
            layers.push(Layer::Relu);
        }
        let prototypes = nn::linear(
            path / "prototypes0",
            config.output_dim,
            config.num_prototypes,
            torch_linear_init(config.output_dim, false),
        );
        SwavHead {
            config,
            layers,
            prototypes,
        }
    }

    /// The configuration the head was built with.
    pub fn config(&self) -> &SwavHeadConfig {
        &self.config
    }

    /// Projects, normalizes and scores `features` (`[N, input_dim]`); `train` selects batch
    /// statistics (and updates the running ones) in the BN layers.
    pub fn forward_t(&self, features: &Tensor, train: bool) -> SwavOutput {
        let embeddings = self.embed_t(features, train); // [N, D]
        let scores = self.prototypes.forward(&embeddings); // [N, K]
        SwavOutput { embeddings, scores }
    }

    /// The L2-normalized embeddings alone, `[N, output_dim]`.
    pub fn embed_t(&self, features: &Tensor, train: bool) -> Tensor {
        let mut xs = features.shallow_clone();
        for layer in &self.layers {
            xs = match layer {
                Layer::Linear(linear) => linear.forward(&xs),
                Layer::BatchNorm(bn) => match (&bn.ws, &bn.bs) {
                    // Through the SyncBatchNorm group when a data-parallel run has one.
                    (Some(weight), Some(bias)) if train => crate::dist::batch_norm(
                        &xs,
                        weight,
                        bias,
                        &bn.running_mean,
                        &bn.running_var,
                        train,
                        self.config.batch_norm_momentum,
                        self.config.batch_norm_eps,
                    ),
                    _ => bn.forward_t(&xs, train),
                },
                Layer::Relu => xs.relu(),
            };
        }
        l2_normalize_rows(&xs)
    }

    /// The prototype matrix `[K, output_dim]` (the weight of `prototypes0`); the loss needs it to
    /// score the queue.
    pub fn prototypes(&self) -> &Tensor {
        &self.prototypes.ws
    }

    /// Scales every prototype to unit L2 norm, in place and outside autograd.
    ///
    /// Call it once before the first forward and after every optimizer step: VISSL's
    /// `NormalizePrototypesHook` does it after each update and SwAV at the start of every
    /// iteration, which is the same sequence (seer.md §2 "Prototype normalization").
    pub fn normalize_prototypes(&mut self) {
        tch::no_grad(|| {
            let normalized = l2_normalize_rows(&self.prototypes.ws);
            self.prototypes.ws.copy_(&normalized);
        });
    }

    /// Whether the prototypes are frozen at `iteration` (`iteration < freeze_prototypes_iters`).
    pub fn prototypes_frozen(&self, iteration: u64) -> bool {
        iteration < self.config.freeze_prototypes_iters
    }

    /// After `backward`, zeroes the prototypes' gradient while they are frozen; returns whether it
    /// did.
    ///
    /// SwAV and VISSL set the gradient to `None` instead (seer.md §2 "Freezing"), which tch cannot
    /// express. With [`crate::optim::LarcSgd`] a zero gradient has the same effect from the start
    /// of training: LARC leaves a zero gradient unscaled and adds no weight decay to it, and the
    /// momentum buffer stays zero, so the prototypes do not move.
    pub fn cancel_prototype_gradients(&mut self, iteration: u64) -> bool {
        if !self.prototypes_frozen(iteration) {
            return false;
        }
        self.prototypes.ws.zero_grad();
        true
    }
}

/// PyTorch's default `nn.Linear` initialization: `kaiming_uniform_(a=√5)` for the weight, which
/// is U(±1/√fan_in), and U(±1/√fan_in) for the bias.
fn torch_linear_init(fan_in: i64, bias: bool) -> nn::LinearConfig {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let uniform = nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    nn::LinearConfig {
        ws_init: uniform,
        bs_init: Some(uniform),
        bias,
    }
}

/// `F.normalize(xs, dim=1, p=2)`: each row divided by `max(‖row‖₂, 1e-12)`.
fn l2_normalize_rows(xs: &Tensor) -> Tensor {
    let norms = xs.norm_scalaropt_dim(2, [1], true).clamp_min(NORMALIZE_EPS); // [N, 1]
    xs / norms.expand_as(xs)
}

/// Soft cluster assignments by Sinkhorn-Knopp, as SwAV's `distributed_sinkhorn` computes them,
/// with VISSL's stabilizations (seer.md §2 "Sinkhorn-Knopp").
///
/// `scores` are this rank's raw prototype scores `[B_local, K]` (not yet divided by `epsilon`).
/// Returns `Q` `[B_local, K]` whose rows each sum to 1 and whose columns, summed over all ranks,
/// approach `B_global / K` as `iterations` grow. No autograd. The work runs in `f32` whatever the
/// input kind (`exp(1/0.05)` overflows `f16`), or in `f64` with `use_f64`; `Q` is returned in
/// that working kind.
///
/// Steps: `exp(scores/ε − global max)`, transposed to `[K, B]`; divided by its global total;
/// then `iterations` times rows (each prototype gets 1/K, row sums all-reduced) and columns
/// (each sample gets 1/B_global, columns are local); finally ×B_global. The global maximum only
/// changes `exp`'s range (the total normalization cancels it) and keeps every entry ≤ 1, so
/// VISSL's replacement of infinities is never needed. `B_global` is the all-reduced count of rows,
/// which equals SwAV's `B_local · world_size` when ranks hold equal batches. If a prototype's row
/// sum is zero (every entry underflowed), 1e-12 is added to all entries as VISSL does, instead of
/// dividing 0 by 0.
///
/// # Panics
/// If `scores` is not 2-D with at least one row and column, or `epsilon` is not positive.
pub fn sinkhorn(
    scores: &Tensor,
    epsilon: f64,
    iterations: usize,
    collective: &dyn Collective,
    use_f64: bool,
) -> Tensor {
    let size = scores.size();
    assert!(
        size.len() == 2 && size[0] > 0 && size[1] > 0,
        "Sinkhorn needs scores [B, K] with B, K > 0, got {size:?}"
    );
    assert!(
        epsilon > 0.0,
        "Sinkhorn epsilon must be positive, got {epsilon}"
    );
    let kind = if use_f64 { Kind::Double } else { Kind::Float };
    tch::no_grad(|| {
        let mut scaled = scores.detach().to_kind(kind) / epsilon; // [B_local, K]
        let mut max = scaled.max();
        collective.all_reduce_max(&mut max);
        scaled -= &max;
        let mut q = scaled.exp().tr(); // [K, B_local]
        let prototypes = size[1] as f64;

        // The total mass and the number of samples in one all-reduce.
        let local_rows = Tensor::scalar_tensor(size[0] as f64, (kind, scores.device()));
        let mut totals = Tensor::stack(&[q.sum(kind), local_rows], 0);
        collective.all_reduce_sum(&mut totals);
        let samples = totals.double_value(&[1]); // B_global
        q /= totals.get(0);

        for _ in 0..iterations {
            // Each prototype gets mass 1/K over all ranks' samples.
            let mut row_sums = q.sum_dim_intlist(1, true, kind); // [K, 1]
            collective.all_reduce_sum(&mut row_sums);
            // All ranks see the same all-reduced sums, so they take this branch together. The test
            // reads one value back to the host per iteration, as VISSL's does.
            if row_sums.eq(0.0).any().int64_value(&[]) != 0 {
                q += EMPTY_ROW_EPS;
                row_sums = q.sum_dim_intlist(1, true, kind);
                collective.all_reduce_sum(&mut row_sums);
            }
            q /= &row_sums;
            q /= prototypes;
            // Each sample gets mass 1/B_global; a sample's column lives on one rank.
            let column_sums = q.sum_dim_intlist(0, true, kind); // [1, B_local]
            q /= &column_sums;
            q /= samples;
        }
        q *= samples; // columns sum to 1: each is a sample's assignment
        q.tr() // [B_local, K]
    })
}

/// The optional queue of past embeddings (seer.md §2 "Queue").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Rows over all ranks per assignment crop; rounded down to a multiple of the global batch,
    /// then split evenly over the ranks (SwAV recipe: 3840 at batch 256; SEER: no queue).
    pub length: usize,
    /// First iteration at which the queue exists; it is filled from then on and used in Sinkhorn
    /// once full (SwAV `epoch_queue_starts`, counted in iterations here).
    pub start_iter: u64,
}

/// Configuration of [`SwavLoss`]. `Default` is SEER 2021 (seer.md §2 "Hyper-parameters").
#[derive(Debug, Clone, PartialEq)]
pub struct SwavLossConfig {
    /// Crops per image, `V` (SEER: 2×224 + 4×96 = 6; SwAV: 2×224 + 6×96 = 8).
    pub n_crops: usize,
    /// Crops whose codes are predicted by all other crops (default `[0, 1]`, the global crops).
    pub crops_for_assign: Vec<usize>,
    /// Softmax temperature τ of the predictions (default 0.1).
    pub temperature: f64,
    /// Entropic regularization ε of Sinkhorn (default 0.05; SEER RG-10B: 0.03).
    pub epsilon: f64,
    /// Sinkhorn iterations (SEER: 10, `sinkhorn10`; SwAV: 3).
    pub sinkhorn_iterations: usize,
    /// Sinkhorn and the loss in `f64` (VISSL `use_double_precision`; default off).
    pub use_f64: bool,
    /// Iterations from the start that use hard (one-hot argmax) codes (VISSL
    /// `temp_hard_assignment_iters`; default 0, never).
    pub hard_assignment_iters: u64,
    /// The queue, if any (default none, as for SEER and SwAV at batch 4096).
    pub queue: Option<QueueConfig>,
}

impl Default for SwavLossConfig {
    fn default() -> Self {
        SwavLossConfig {
            n_crops: 6,
            crops_for_assign: vec![0, 1],
            temperature: 0.1,
            epsilon: 0.05,
            sinkhorn_iterations: 10,
            use_f64: false,
            hard_assignment_iters: 0,
            queue: None,
        }
    }
}

impl SwavLossConfig {
    /// SwAV ResNet-50 at batch 4096: 8 crops, ε 0.05, 3 Sinkhorn iterations, no queue.
    pub fn swav_resnet50() -> Self {
        SwavLossConfig {
            n_crops: 8,
            sinkhorn_iterations: 3,
            ..SwavLossConfig::default()
        }
    }

    fn validate(&self) -> Result<(), SwavError> {
        let invalid = |message: String| Err(SwavError::InvalidConfig(message));
        if self.n_crops < 2 {
            return invalid(format!(
                "n_crops is {}, swapped prediction needs at least 2",
                self.n_crops
            ));
        }
        if self.crops_for_assign.is_empty() {
            return invalid("crops_for_assign is empty".into());
        }
        if let Some(&crop) = self.crops_for_assign.iter().find(|&&c| c >= self.n_crops) {
            return invalid(format!(
                "crops_for_assign has crop {crop}, but there are {} crops",
                self.n_crops
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return invalid(format!(
                "temperature is {}, must be positive",
                self.temperature
            ));
        }
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return invalid(format!("epsilon is {}, must be positive", self.epsilon));
        }
        if self.queue.is_some_and(|q| q.length == 0) {
            return invalid("queue length is 0; leave the queue out instead".into());
        }
        Ok(())
    }
}

/// The swapped-prediction loss with its queue state.
#[derive(Debug)]
pub struct SwavLoss {
    config: SwavLossConfig,
    /// `[len(crops_for_assign), local rows, D]` embeddings, newest first.
    queue: Option<Tensor>,
    /// Once the queue's last row is filled it stays filled, so the check can stop.
    queue_full: bool,
}

impl SwavLoss {
    /// Checks the configuration; the queue is created at its start iteration.
    pub fn new(config: SwavLossConfig) -> Result<Self, SwavError> {
        config.validate()?;
        Ok(SwavLoss {
            config,
            queue: None,
            queue_full: false,
        })
    }

    /// The configuration the loss was built with.
    pub fn config(&self) -> &SwavLossConfig {
        &self.config
    }

    /// The swapped-prediction loss of one step, a scalar in the working kind (`f32`, or `f64`
    /// with `use_f64`), differentiable with respect to `scores`.
    ///
    /// `embeddings` `[V·B, D]` (L2-normalized) and `scores` `[V·B, K]` hold this rank's `V` crops
    /// of `B` images crop-major: rows `[v·B, (v+1)·B)` are crop `v`. `prototypes` `[K, D]` score the
    /// queue. As in SwAV's `main_swav.py` (seer.md §2 "Swapped prediction loss"): for each
    /// assignment crop `a`, `q_a` = Sinkhorn of crop `a`'s scores, with the queue's scores
    /// prepended once the queue is full and only the last `B` rows kept; then
    /// `mean over v ≠ a of −mean_b Σ_k q_a[b,k] · log_softmax(scores_v[b] / τ)[k]`, averaged over
    /// the assignment crops. Each assignment crop's embeddings enter the front of its queue after
    /// its queue scores are taken.
    ///
    /// # Panics
    /// If the shapes disagree with each other or with `n_crops`.
    pub fn loss(
        &mut self,
        embeddings: &Tensor,
        scores: &Tensor,
        prototypes: &Tensor,
        iteration: u64,
        collective: &dyn Collective,
    ) -> Tensor {
        self.loss_and_codes(embeddings, scores, prototypes, iteration, collective)
            .0
    }

    /// [`loss`](Self::loss), and the codes `q` `[B, K]` of each crop in `crops_for_assign` (for
    /// diagnostics such as cluster usage, and for the reference tests).
    pub fn loss_and_codes(
        &mut self,
        embeddings: &Tensor,
        scores: &Tensor,
        prototypes: &Tensor,
        iteration: u64,
        collective: &dyn Collective,
    ) -> (Tensor, Vec<Tensor>) {
        let (rows, prototype_count) = match scores.size().as_slice() {
            &[rows, k] => (rows, k),
            other => panic!("SwAV scores must be [V·B, K], got {other:?}"),
        };
        let n_crops = self.config.n_crops as i64;
        assert!(
            rows > 0 && rows % n_crops == 0,
            "{rows} score rows are not {n_crops} crops of a batch"
        );
        let embedding_size = embeddings.size();
        assert!(
            embedding_size.len() == 2 && embedding_size[0] == rows,
            "embeddings {embedding_size:?} do not match scores [{rows}, {prototype_count}]"
        );
        assert_eq!(
            prototypes.size(),
            [prototype_count, embedding_size[1]],
            "prototypes must be [K, D]"
        );
        let batch = rows / n_crops;
        let kind = if self.config.use_f64 {
            Kind::Double
        } else {
            Kind::Float
        };
        self.start_queue(
            iteration,
            batch,
            embedding_size[1],
            embeddings.device(),
            collective,
        );
        if let Some(queue) = &self.queue {
            let size = queue.size();
            assert!(
                size[1] >= batch && size[2] == embedding_size[1],
                "SwAV queue {size:?} does not fit batches of {batch} embeddings of width {}",
                embedding_size[1]
            );
        }

        let mut total = Tensor::zeros([], (kind, scores.device()));
        let mut all_codes = Vec::with_capacity(self.config.crops_for_assign.len());
        for (slot, &crop) in self.config.crops_for_assign.clone().iter().enumerate() {
            let codes = tch::no_grad(|| {
                self.codes(
                    slot,
                    crop as i64,
                    batch,
                    embeddings,
                    scores,
                    prototypes,
                    iteration,
                    collective,
                )
            }); // [B, K]
            let mut subloss = Tensor::zeros([], (kind, scores.device()));
            for view in (0..n_crops).filter(|&v| v != crop as i64) {
                let logits =
                    scores.narrow(0, view * batch, batch).to_kind(kind) / self.config.temperature;
                let log_probabilities = logits.log_softmax(1, kind); // [B, K]
                subloss -= (&codes * log_probabilities)
                    .sum_dim_intlist(1, false, kind)
                    .mean(kind);
            }
            total += subloss / (n_crops - 1) as f64;
            all_codes.push(codes);
        }
        (total / all_codes.len() as f64, all_codes)
    }

    /// The codes of one assignment crop (`slot` is its index in `crops_for_assign`), updating
    /// that crop's queue.
    #[allow(clippy::too_many_arguments)]
    fn codes(
        &mut self,
        slot: usize,
        crop: i64,
        batch: i64,
        embeddings: &Tensor,
        scores: &Tensor,
        prototypes: &Tensor,
        iteration: u64,
        collective: &dyn Collective,
    ) -> Tensor {
        let mut out = scores.narrow(0, crop * batch, batch).detach(); // [B, K]
        if let Some(queue) = &self.queue {
            let queue = queue.get(slot as i64); // [L, D], a view into the queue
            // SwAV uses the queue once its oldest row has been written.
            if !self.queue_full && queue.get(-1).ne(0.0).any().int64_value(&[]) != 0 {
                self.queue_full = true;
            }
            if self.queue_full {
                let queue_scores = queue.matmul(&prototypes.detach().to_kind(Kind::Float).tr()); // [L, K]
                out = Tensor::cat(&[queue_scores, out.to_kind(Kind::Float)], 0); // [L + B, K]
            }
            let length = queue.size()[0];
            let older = queue.narrow(0, 0, length - batch).copy();
            queue.narrow(0, batch, length - batch).copy_(&older);
            let newest = embeddings.narrow(0, crop * batch, batch).detach();
            queue.narrow(0, 0, batch).copy_(&newest);
        }
        let q = sinkhorn(
            &out,
            self.config.epsilon,
            self.config.sinkhorn_iterations,
            collective,
            self.config.use_f64,
        ); // [L + B, K]
        let mut q = q.narrow(0, q.size()[0] - batch, batch); // [B, K]
        if iteration < self.config.hard_assignment_iters {
            let best = q.argmax(1, true); // [B, 1]
            q = q.zeros_like().scatter_value_(1, &best, 1.0);
        }
        q
    }

    /// Creates the zero queue at its start iteration (SwAV rounds the global length down to a
    /// multiple of the global batch and gives each rank an equal share).
    fn start_queue(
        &mut self,
        iteration: u64,
        batch: i64,
        embedding_dim: i64,
        device: Device,
        collective: &dyn Collective,
    ) {
        let Some(config) = self.config.queue else {
            // A queue restored from a checkpoint of a run whose configuration had one.
            if self.queue.take().is_some() {
                tracing::warn!(
                    "the checkpoint holds a SwAV queue, but the configuration has none: not used"
                );
            }
            return;
        };
        if iteration < config.start_iter {
            return;
        }
        let global_batch = batch as usize * collective.world_size();
        let length = config.length - config.length % global_batch;
        if length == 0 {
            self.queue = None;
            return; // shorter than one global batch: SwAV runs without a queue then
        }
        let slots = self.config.crops_for_assign.len() as i64;
        let local_rows = (length / collective.world_size()) as i64;
        let shape = [slots, local_rows, embedding_dim];
        if let Some(queue) = &self.queue {
            if queue.size() == shape {
                return;
            }
            // Restored from a checkpoint written with another loss.queue.length (or batch):
            // the configuration wins, and the queue fills again, as a queue does at its start.
            tracing::warn!(
                checkpoint_queue = ?queue.size(),
                configured = ?shape,
                "the checkpoint's SwAV queue does not fit loss.queue.length and the batch: it starts empty"
            );
        }
        self.queue = Some(Tensor::zeros(shape, (Kind::Float, device)));
        self.queue_full = false;
    }

    /// This rank's queue `[len(crops_for_assign), rows, D]`, newest rows first, for
    /// checkpointing; `None` before the queue starts or without one. SwAV saves it per rank.
    pub fn queue(&self) -> Option<&Tensor> {
        self.queue.as_ref()
    }

    /// Restores this rank's queue from a checkpoint (`None` clears it; it is then created again
    /// at its start iteration). Whether it is full is read from its last row, as SwAV does.
    pub fn set_queue(&mut self, queue: Option<Tensor>) -> Result<(), SwavError> {
        if let Some(queue) = &queue {
            let found = queue.size();
            let slots = self.config.crops_for_assign.len() as i64;
            if found.len() != 3 || found[0] != slots || found[1] == 0 {
                return Err(SwavError::QueueShape {
                    expected: vec![slots, -1, -1],
                    found,
                });
            }
        }
        self.queue = queue.map(|q| q.detach().to_kind(Kind::Float));
        self.queue_full = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{SingleProcess, ThreadGroup};
    use rand_core::{RngCore, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn cpu(kind: Kind) -> (Kind, Device) {
        (kind, Device::Cpu)
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    /// Random test data from a generator of the test's own. Libtorch's generator is one per
    /// process, and the tests of this binary run on parallel threads: a test that seeded it and
    /// then drew could get numbers another test's draws had moved on (CI once saw Sinkhorn's
    /// marginals converge on different data than the bounds below were measured on).
    struct Draws(Xoshiro256PlusPlus);

    impl Draws {
        fn new(seed: u64) -> Self {
            Self(Xoshiro256PlusPlus::seed_from_u64(seed))
        }

        /// Standard normal f32 values (Box-Muller).
        fn normal(&mut self, shape: &[i64]) -> Tensor {
            let n: i64 = shape.iter().product();
            let mut uniform = || (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    let (u, v) = (1.0 - uniform(), uniform()); // u in (0, 1]
                    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
                })
                .collect();
            Tensor::from_slice(&values).view(shape)
        }

        /// Unit rows, uniform on the sphere, as the head produces them.
        fn unit_rows(&mut self, rows: i64, dim: i64) -> Tensor {
            l2_normalize_rows(&self.normal(&[rows, dim]))
        }
    }

    /// Largest relative deviation of the prototypes' masses from their target B/K.
    fn row_marginal_error(q: &Tensor) -> f64 {
        let (b, k) = (q.size()[0] as f64, q.size()[1] as f64);
        let rows = q.sum_dim_intlist(0, false, Kind::Double); // [K]
        max_abs(&(rows / (b / k) - 1.0))
    }

    #[test]
    fn sinkhorn_marginals() {
        let mut draw = Draws::new(1);
        let (b, k) = (64, 16);
        let scores = draw.unit_rows(b, 8).matmul(&draw.unit_rows(k, 8).tr()); // cosines
        let mut previous = f64::INFINITY;
        for iterations in [1, 3, 10, 30, 100] {
            let q = sinkhorn(&scores, 0.05, iterations, &SingleProcess, false);
            assert_eq!(q.size(), [b, k]);
            assert_eq!(q.kind(), Kind::Float);
            // The last step normalizes columns, so each sample's code sums to 1.
            let columns = q.sum_dim_intlist(1, false, Kind::Double);
            assert!(
                max_abs(&(columns - 1.0)) < 1e-5,
                "columns after {iterations}"
            );
            let error = row_marginal_error(&q);
            assert!(
                error <= previous,
                "{iterations} iterations: {error} > {previous}"
            );
            // Geometric convergence (this data: 0.74, 0.39, 0.040, 4.8e-4, 1.3e-7), down to f32
            // rounding; the bounds leave a factor of 3 or more.
            let bound = match iterations {
                10 => 0.15,
                30 => 2e-3,
                100 => 1e-5,
                _ => f64::INFINITY,
            };
            assert!(
                error < bound,
                "rows after {iterations} iterations are {error} off B/K"
            );
            previous = error;
        }
        // In f64 the marginals converge to rounding.
        let q = sinkhorn(&scores, 0.05, 300, &SingleProcess, true);
        assert_eq!(q.kind(), Kind::Double);
        assert!(row_marginal_error(&q) < 1e-9);
    }

    #[test]
    fn sinkhorn_over_ranks_equals_the_whole_batch() {
        let mut draw = Draws::new(2);
        let k = 12;
        let scores = draw.unit_rows(8, 6).matmul(&draw.unit_rows(k, 6).tr()); // [8, K]
        let whole = sinkhorn(&scores, 0.05, 5, &SingleProcess, true);
        // Unequal shares (3 + 5) also check that B_global is counted, not assumed.
        let parts: Vec<Tensor> = std::thread::scope(|scope| {
            let handles: Vec<_> = ThreadGroup::new(2)
                .into_iter()
                .zip([(0, 3), (3, 5)])
                .map(|(group, (start, len))| {
                    let local = scores.narrow(0, start, len).copy();
                    scope.spawn(move || sinkhorn(&local, 0.05, 5, &group, true))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let split = Tensor::cat(&parts, 0);
        assert!(max_abs(&(split - &whole)) < 1e-12);
    }

    #[test]
    fn sinkhorn_of_half_precision_scores_runs_in_f32() {
        let mut draw = Draws::new(3);
        let scores = draw.unit_rows(16, 8).matmul(&draw.unit_rows(10, 8).tr());
        let reference = sinkhorn(&scores, 0.03, 3, &SingleProcess, false);
        for kind in [Kind::Half, Kind::BFloat16] {
            let low = scores.to_kind(kind);
            let q = sinkhorn(&low, 0.03, 3, &SingleProcess, false);
            assert_eq!(q.kind(), Kind::Float);
            assert!(q.isfinite().all().int64_value(&[]) != 0, "{kind:?}");
            // Only the input rounding differs: 1/ε times a half ulp moves exp's argument a little.
            let exact = sinkhorn(&low.to_kind(Kind::Float), 0.03, 3, &SingleProcess, false);
            assert!(max_abs(&(&q - exact)) < 1e-6, "{kind:?}");
            assert!(max_abs(&(q - &reference)) < 0.5, "{kind:?}");
        }
    }

    #[test]
    fn sinkhorn_survives_an_empty_prototype() {
        // Prototype 2 scores so low that exp underflows to 0 for every sample in f32.
        let scores = Tensor::from_slice(&[1.0f32, 0.5, -100.0, 0.2, 0.9, -100.0]).view([2, 3]);
        let q = sinkhorn(&scores, 0.05, 3, &SingleProcess, false);
        assert!(q.isfinite().all().int64_value(&[]) != 0);
        let columns = q.sum_dim_intlist(1, false, Kind::Double);
        assert!(max_abs(&(columns - 1.0)) < 1e-5);
    }

    #[test]
    fn initial_loss_is_ln_k() {
        let mut draw = Draws::new(4);
        let (crops, b, k, d) = (4, 16, 300, 32);
        let config = SwavLossConfig {
            n_crops: crops,
            ..SwavLossConfig::default()
        };
        let embeddings = draw.unit_rows(crops as i64 * b, d);
        let prototypes = draw.unit_rows(k, d);
        // Equal scores everywhere: uniform codes and predictions, loss exactly ln K.
        let flat = Tensor::zeros([crops as i64 * b, k], cpu(Kind::Float));
        let loss = SwavLoss::new(config.clone()).unwrap().loss(
            &embeddings,
            &flat,
            &prototypes,
            0,
            &SingleProcess,
        );
        assert!((loss.double_value(&[]) - (k as f64).ln()).abs() < 1e-5);
        // Small random scores, as from a freshly initialized network: close to ln K.
        let small = draw.normal(&[crops as i64 * b, k]) * 0.01;
        let loss = SwavLoss::new(config).unwrap().loss(
            &embeddings,
            &small,
            &prototypes,
            0,
            &SingleProcess,
        );
        assert!(
            (loss.double_value(&[]) - (k as f64).ln()).abs() < 0.01,
            "{loss}"
        );
    }

    #[test]
    fn loss_is_differentiable_in_scores_only() {
        let mut draw = Draws::new(5);
        let (b, k, d) = (4, 10, 6);
        let embeddings = draw.unit_rows(2 * b, d);
        let prototypes = draw.unit_rows(k, d);
        let scores = embeddings.matmul(&prototypes.tr()).set_requires_grad(true);
        let config = SwavLossConfig {
            n_crops: 2,
            ..SwavLossConfig::default()
        };
        let loss = SwavLoss::new(config).unwrap().loss(
            &embeddings,
            &scores,
            &prototypes,
            0,
            &SingleProcess,
        );
        loss.backward();
        let grad = scores.grad();
        assert!(grad.defined());
        // Softmax gradients: each row of ∂loss/∂scores sums to zero.
        assert!(max_abs(&grad.sum_dim_intlist(1, false, Kind::Double)) < 1e-6);
    }

    #[test]
    fn hard_assignment_gives_one_hot_codes() {
        let mut draw = Draws::new(6);
        let (b, k, d) = (8, 5, 4);
        let embeddings = draw.unit_rows(2 * b, d);
        let prototypes = draw.unit_rows(k, d);
        let scores = embeddings.matmul(&prototypes.tr());
        let mut loss = SwavLoss::new(SwavLossConfig {
            n_crops: 2,
            hard_assignment_iters: 1,
            ..SwavLossConfig::default()
        })
        .unwrap();
        let q = loss.codes(
            0,
            0,
            b,
            &embeddings,
            &scores,
            &prototypes,
            0,
            &SingleProcess,
        );
        assert_eq!(
            q.sum_dim_intlist(1, false, Kind::Float),
            Tensor::ones([b], cpu(Kind::Float))
        );
        assert_eq!(q.eq(1.0).sum(Kind::Int64).int64_value(&[]), b);
        let soft = loss.codes(
            0,
            0,
            b,
            &embeddings,
            &scores,
            &prototypes,
            1,
            &SingleProcess,
        );
        assert!(
            soft.gt(0.0)
                .logical_and(&soft.lt(1.0))
                .any()
                .int64_value(&[])
                != 0
        );
    }

    #[test]
    fn queue_starts_fills_and_restores() {
        let mut draw = Draws::new(7);
        let (b, k, d) = (4, 6, 3);
        let config = SwavLossConfig {
            n_crops: 3,
            queue: Some(QueueConfig {
                length: 10, // rounded down to 8 = 2 batches
                start_iter: 1,
            }),
            ..SwavLossConfig::default()
        };
        let mut loss = SwavLoss::new(config.clone()).unwrap();
        let prototypes = draw.unit_rows(k, d);
        let mut batches = Vec::new();
        for iteration in 0..4 {
            let embeddings = draw.unit_rows(3 * b, d);
            let scores = embeddings.matmul(&prototypes.tr());
            let _ = loss.loss(&embeddings, &scores, &prototypes, iteration, &SingleProcess);
            assert_eq!(loss.queue().is_some(), iteration >= 1);
            // Full (and so used) only once two batches went in: after iteration 2.
            assert_eq!(loss.queue_full, iteration >= 3);
            batches.push(embeddings);
        }
        let queue = loss.queue().unwrap().shallow_clone();
        assert_eq!(queue.size(), [2, 8, d]);
        // Newest first: iteration 3's crop-a embeddings, then iteration 2's.
        for (slot, crop) in [(0, 0), (1, 1)] {
            let expected = Tensor::cat(
                &[
                    batches[3].narrow(0, crop * b, b),
                    batches[2].narrow(0, crop * b, b),
                ],
                0,
            );
            assert_eq!(queue.get(slot), expected);
        }
        let mut restored = SwavLoss::new(config.clone()).unwrap();
        restored.set_queue(Some(queue.copy())).unwrap();
        assert_eq!(restored.queue().unwrap(), &queue);
        let wrong = Tensor::zeros([3, 8, d], cpu(Kind::Float));
        assert!(matches!(
            restored.set_queue(Some(wrong)),
            Err(SwavError::QueueShape { .. })
        ));
        // Resumed with another length, or without a queue: the configuration wins.
        let embeddings = draw.unit_rows(3 * b, d);
        let scores = embeddings.matmul(&prototypes.tr());
        let longer = SwavLossConfig {
            queue: Some(QueueConfig {
                length: 16,
                start_iter: 1,
            }),
            ..config.clone()
        };
        let mut resumed = SwavLoss::new(longer).unwrap();
        resumed.set_queue(Some(queue.copy())).unwrap();
        let _ = resumed.loss(&embeddings, &scores, &prototypes, 4, &SingleProcess);
        assert_eq!(resumed.queue().unwrap().size(), [2, 16, d]);
        assert!(!resumed.queue_full);
        let mut without = SwavLoss::new(SwavLossConfig {
            queue: None,
            ..config
        })
        .unwrap();
        without.set_queue(Some(queue.copy())).unwrap();
        let _ = without.loss(&embeddings, &scores, &prototypes, 4, &SingleProcess);
        assert!(without.queue().is_none());
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let bad = [
            SwavLossConfig {
                n_crops: 1,
                crops_for_assign: vec![0],
                ..SwavLossConfig::default()
            },
            SwavLossConfig {
                crops_for_assign: vec![0, 6],
                ..SwavLossConfig::default()
            },
            SwavLossConfig {
                epsilon: 0.0,
                ..SwavLossConfig::default()
            },
            SwavLossConfig {
                queue: Some(QueueConfig {
                    length: 0,
                    start_iter: 0,
                }),
                ..SwavLossConfig::default()
            },
        ];
        for config in bad {
            assert!(matches!(
                SwavLoss::new(config),
                Err(SwavError::InvalidConfig(_))
            ));
        }
    }

    fn head_variable_names(config: SwavHeadConfig) -> Vec<String> {
        let vs = nn::VarStore::new(Device::Cpu);
        let _head = SwavHead::new(&vs.root(), config);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        names
    }

    #[test]
    fn head_parameter_names_follow_vissl() {
        let seer_like = SwavHeadConfig {
            input_dim: 12,
            hidden_dims: vec![8, 8],
            output_dim: 4,
            num_prototypes: 5,
            ..SwavHeadConfig::seer(12)
        };
        // Linear, ReLU, Linear, ReLU, Linear.
        assert_eq!(
            head_variable_names(seer_like),
            [
                "projection_head.0.bias",
                "projection_head.0.weight",
                "projection_head.2.bias",
                "projection_head.2.weight",
                "projection_head.4.bias",
                "projection_head.4.weight",
                "prototypes0.weight",
            ]
        );
        let swav_like = SwavHeadConfig {
            input_dim: 12,
            hidden_dims: vec![8],
            output_dim: 4,
            num_prototypes: 5,
            ..SwavHeadConfig::swav_resnet50()
        };
        // Linear, BN, ReLU, Linear.
        assert_eq!(
            head_variable_names(swav_like),
            [
                "projection_head.0.bias",
                "projection_head.0.weight",
                "projection_head.1.bias",
                "projection_head.1.running_mean",
                "projection_head.1.running_var",
                "projection_head.1.weight",
                "projection_head.3.bias",
                "projection_head.3.weight",
                "prototypes0.weight",
            ]
        );
    }

    #[test]
    fn head_normalizes_and_freezes() {
        let mut draw = Draws::new(8);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = SwavHeadConfig {
            input_dim: 12,
            hidden_dims: vec![8],
            output_dim: 4,
            num_prototypes: 5,
            freeze_prototypes_iters: 2,
            ..SwavHeadConfig::swav_resnet50()
        };
        let mut head = SwavHead::new(&vs.root(), config);
        head.normalize_prototypes();
        let unit = |t: &Tensor| max_abs(&(t.norm_scalaropt_dim(2, [1], false) - 1.0)) < 1e-6;
        assert!(unit(head.prototypes()));
        let out = head.forward_t(&draw.normal(&[6, 12]), true);
        assert_eq!(out.embeddings.size(), [6, 4]);
        assert_eq!(out.scores.size(), [6, 5]);
        assert!(unit(&out.embeddings));
        out.scores.sum(Kind::Float).backward();
        assert!(max_abs(&head.prototypes().grad()) > 0.0);
        assert!(!head.cancel_prototype_gradients(2));
        assert!(max_abs(&head.prototypes().grad()) > 0.0);
        assert!(head.cancel_prototype_gradients(1));
        assert_eq!(max_abs(&head.prototypes().grad()), 0.0);
    }
}
