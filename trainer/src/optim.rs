//! LARC-wrapped SGD with momentum, and the warmup-plus-cosine learning-rate schedule.
//!
//! Both follow `shared/reference/seer.md` §3 (cited as "seer.md §3"): SwAV and SEER train with
//! apex's `LARC(SGD(momentum=0.9, weight_decay), trust_coefficient=0.001, clip=False)` and a
//! per-iteration schedule. The optimizer keeps its own momentum buffers, keyed by parameter name,
//! so a checkpoint can save and restore them (tch's optimizers cannot).
//!
//! ```no_run
//! use tch::{nn, Device};
//! use trainer::optim::{trainable_parameters, LarcSgd, LarcSgdConfig, LrSchedule};
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! // ... build the model on vs.root() ...
//! let parameters = trainable_parameters(&vs);
//! let mut optimizer = LarcSgd::new(LarcSgdConfig::default());
//! let schedule = LrSchedule::seer(8192, 122_070);
//! for iteration in 0..10 {
//!     // ... forward, loss.backward() ...
//!     optimizer.step(&parameters, schedule.lr(iteration));
//!     optimizer.zero_grad(&parameters);
//! }
//! let state = optimizer.state(); // save beside the weights
//! ```

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::fmt;

use tch::{Tensor, nn};

/// Errors from restoring the optimizer's state.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimError {
    /// The saved state has a momentum buffer for a parameter the model does not have.
    UnknownParameter(String),
    /// A saved momentum buffer does not have its parameter's shape.
    ShapeMismatch {
        /// The parameter's name.
        name: String,
        /// The parameter's shape.
        expected: Vec<i64>,
        /// The saved buffer's shape.
        found: Vec<i64>,
    },
}

impl fmt::Display for OptimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptimError::UnknownParameter(name) => {
                write!(
                    f,
                    "optimizer state has a momentum buffer for unknown parameter {name:?}"
                )
            }
            OptimError::ShapeMismatch {
                name,
                expected,
                found,
            } => write!(
                f,
                "momentum buffer of {name:?} has shape {found:?}, the parameter {expected:?}"
            ),
        }
    }
}

impl std::error::Error for OptimError {}

/// The trainable variables of `vs` with their names, sorted by name: what [`LarcSgd`] steps.
///
/// The tensors share storage and gradients with the variables, so one list serves the whole run.
/// BatchNorm running statistics are not trainable and are left out.
pub fn trainable_parameters(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut parameters: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    parameters.sort_by(|a, b| a.0.cmp(&b.0));
    parameters
}

/// Hyper-parameters of [`LarcSgd`]; `Default` is SEER's (seer.md §3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LarcSgdConfig {
    /// SGD momentum, no dampening, no Nesterov (default 0.9).
    pub momentum: f64,
    /// L2 weight decay folded into LARC's gradient (default 1e-5, SEER; SwAV: 1e-6).
    pub weight_decay: f64,
    /// LARC trust coefficient η (default 0.001).
    pub trust_coefficient: f64,
    /// Added to LARC's denominator (default 1e-8).
    pub eps: f64,
    /// LARC's clipping mode: effective lr `min(lr·α, lr)` instead of `lr·α` (default false, the
    /// "scale" mode SwAV and SEER use).
    pub clip: bool,
}

impl Default for LarcSgdConfig {
    fn default() -> Self {
        LarcSgdConfig {
            momentum: 0.9,
            weight_decay: 1e-5,
            trust_coefficient: 0.001,
            eps: 1e-8,
            clip: false,
        }
    }
}

/// SGD with momentum and weight decay, wrapped by LARC exactly as apex's `LARC.step` does
/// (seer.md §3 "LARC/LARS").
///
/// For each parameter `w` with a gradient `g`:
/// - if `‖w‖ ≠ 0` and `‖g‖ ≠ 0`: `α = η·‖w‖ / (‖g‖ + wd·‖w‖ + eps)` (clip mode: `min(α/lr, 1)`),
///   `g ← (g + wd·w)·α`;
/// - otherwise `g` is left as it is, *without* weight decay (apex zeroes the group's weight decay
///   around the inner step), so a zero-initialized bias takes a plain SGD step at the full lr;
/// - then `buf ← momentum·buf + g` (`buf ← g` on a parameter's first step) and `w ← w − lr·buf`.
///
/// No parameter is excluded: SwAV wraps every parameter, and SwAV's VISSL configuration, which
/// SEER inherits, regularizes BN and biases. Parameters without a gradient (`grad` undefined) are
/// skipped entirely, momentum included, as `torch.optim.SGD` skips `grad=None`. The norms and the
/// branch stay on the device: no host synchronization per parameter.
#[derive(Debug)]
pub struct LarcSgd {
    config: LarcSgdConfig,
    momentum_buffers: BTreeMap<String, Tensor>,
}

impl LarcSgd {
    /// An optimizer without momentum buffers yet.
    pub fn new(config: LarcSgdConfig) -> Self {
        LarcSgd {
            config,
            momentum_buffers: BTreeMap::new(),
        }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LarcSgdConfig {
        &self.config
    }

    /// One update of `parameters` (named, as from [`trainable_parameters`]) from their
    /// gradients, at learning rate `lr`. The gradients are read, not modified.
    pub fn step(&mut self, parameters: &[(String, Tensor)], lr: f64) {
        let LarcSgdConfig {
            momentum,
            weight_decay,
            trust_coefficient,
            eps,
            clip,
        } = self.config;
        tch::no_grad(|| {
            for (name, parameter) in parameters {
                let grad = parameter.grad();
                if !grad.defined() {
                    continue;
                }
                let parameter_norm = parameter.norm(); // 0-dim, on the device
                let grad_norm = grad.norm();
                let scaled = parameter_norm.ne(0.0).logical_and(&grad_norm.ne(0.0));
                // apex: trust * param_norm / (grad_norm + param_norm * weight_decay + eps)
                let mut adaptive_lr = (&parameter_norm * trust_coefficient)
                    / ((&grad_norm + &parameter_norm * weight_decay) + eps);
                if clip {
                    adaptive_lr = (adaptive_lr / lr).clamp_max(1.0);
                }
                let ones = adaptive_lr.ones_like();
                let adaptive_lr = adaptive_lr.where_self(&scaled, &ones);
                let decay = (ones * weight_decay).where_self(&scaled, &adaptive_lr.zeros_like());
                // apex: grad += weight_decay * param; grad *= adaptive_lr (here into a new tensor)
                let update = (&grad + parameter * &decay) * &adaptive_lr;

                // torch.optim.SGD, dampening 0, no Nesterov, its weight decay 0 under LARC.
                let buffer = match self.momentum_buffers.get_mut(name) {
                    Some(buffer) => {
                        *buffer *= momentum;
                        *buffer += &update;
                        buffer
                    }
                    None => self.momentum_buffers.entry(name.clone()).or_insert(update),
                };
                let mut parameter = parameter.shallow_clone();
                parameter -= &*buffer * lr;
            }
        });
    }

    /// Zeroes the gradients of `parameters` (call after [`step`](Self::step)).
    pub fn zero_grad(&self, parameters: &[(String, Tensor)]) {
        for (_, parameter) in parameters {
            parameter.shallow_clone().zero_grad();
        }
    }

    /// The momentum buffers by parameter name, sorted by name, for a checkpoint. Parameters that
    /// have not taken a step yet have none. The tensors share storage with the optimizer's.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.momentum_buffers
            .iter()
            .map(|(name, buffer)| (name.clone(), buffer.shallow_clone()))
            .collect()
    }

    /// Replaces the momentum buffers by a saved `state`, checked against `parameters` and moved
    /// to each parameter's device and kind. Parameters missing from `state` start afresh.
    pub fn load_state(
        &mut self,
        state: Vec<(String, Tensor)>,
        parameters: &[(String, Tensor)],
    ) -> Result<(), OptimError> {
        let by_name: BTreeMap<&str, &Tensor> = parameters
            .iter()
            .map(|(name, t)| (name.as_str(), t))
            .collect();
        let mut buffers = BTreeMap::new();
        for (name, buffer) in state {
            let Some(parameter) = by_name.get(name.as_str()) else {
                return Err(OptimError::UnknownParameter(name));
            };
            if buffer.size() != parameter.size() {
                return Err(OptimError::ShapeMismatch {
                    expected: parameter.size(),
                    found: buffer.size(),
                    name,
                });
            }
            let buffer = buffer
                .detach()
                .to_device(parameter.device())
                .to_kind(parameter.kind())
                .copy();
            buffers.insert(name, buffer);
        }
        self.momentum_buffers = buffers;
        Ok(())
    }
}

/// The per-iteration learning rate of SwAV's `main_swav.py` (seer.md §3 "LR rule & schedule"):
/// `np.linspace(start_warmup_lr, base_lr, warmup_iters)` for the first `warmup_iters` iterations
/// (so the last warmup iteration is at `base_lr`), then
/// `final_lr + ½(base_lr − final_lr)(1 + cos(π·t/T))` for `t = 0..T`, `T = total_iters −
/// warmup_iters`; from `total_iters` on, `final_lr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Learning rate of iteration 0 when there is a warmup.
    pub start_warmup_lr: f64,
    /// Peak learning rate, reached at the end of the warmup; usually [`LrSchedule::scaled_lr`].
    pub base_lr: f64,
    /// Learning rate the cosine ends at (SwAV and SEER: `base_lr / 1000`).
    pub final_lr: f64,
    /// Iterations of linear warmup (0: start the cosine at once).
    pub warmup_iters: u64,
    /// Iterations of the whole run, warmup included.
    pub total_iters: u64,
}

impl LrSchedule {
    /// The linear scaling rule: `lr_per_256 · global_batch / 256` (VISSL `auto_lr_scaling`;
    /// SwAV and SEER use 0.3 per 256 images, so 4.8 at 4096 and 9.6 at 8192).
    pub fn scaled_lr(lr_per_256: f64, global_batch: usize) -> f64 {
        lr_per_256 * global_batch as f64 / 256.0
    }

    /// SEER 2021 (seer.md §3): base 0.3 per 256 images scaled to `global_batch` (9.6 at 8192),
    /// warmup from 0.15 over 8,000 iterations, cosine to base/1000 at `total_iters` (122K for
    /// one pass over 1B images at batch 8192).
    pub fn seer(global_batch: usize, total_iters: u64) -> Self {
        let base_lr = Self::scaled_lr(0.3, global_batch);
        LrSchedule {
            start_warmup_lr: 0.15,
            base_lr,
            final_lr: base_lr / 1000.0,
            warmup_iters: 8_000,
            total_iters,
        }
    }

    /// The learning rate of `iteration` (0-based).
    pub fn lr(&self, iteration: u64) -> f64 {
        if iteration < self.warmup_iters {
            if self.warmup_iters == 1 {
                return self.start_warmup_lr; // np.linspace(a, b, 1) == [a]
            }
            if iteration == self.warmup_iters - 1 {
                return self.base_lr; // np.linspace sets its last element to the end exactly
            }
            let step = (self.base_lr - self.start_warmup_lr) / (self.warmup_iters - 1) as f64;
            return iteration as f64 * step + self.start_warmup_lr;
        }
        if iteration >= self.total_iters {
            return self.final_lr;
        }
        let t = (iteration - self.warmup_iters) as f64;
        let cosine_iters = (self.total_iters - self.warmup_iters) as f64;
        self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1.0 + (PI * t / cosine_iters).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A named parameter whose gradient is `grad` (via backward of `Σ w·grad`), or none.
    fn parameter(values: &[f32], grad: Option<&[f32]>) -> Tensor {
        let w = Tensor::from_slice(values).set_requires_grad(true);
        if let Some(grad) = grad {
            (&w * Tensor::from_slice(grad)).sum(Kind::Float).backward();
        }
        w
    }

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap()
    }

    fn assert_close(actual: &[f64], expected: &[f64], tolerance: f64) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert!(
                (a - e).abs() <= tolerance * e.abs().max(1.0),
                "{actual:?} vs {expected:?}"
            );
        }
    }

    #[test]
    fn one_larc_step_by_hand() {
        let config = LarcSgdConfig {
            momentum: 0.9,
            weight_decay: 0.1,
            trust_coefficient: 0.001,
            eps: 1e-8,
            clip: false,
        };
        let parameters = vec![
            // ‖w‖ = 5, ‖g‖ = 1.
            (
                "weight".to_string(),
                parameter(&[3.0, 4.0], Some(&[0.6, 0.8])),
            ),
            // ‖w‖ = 0: no LARC, no weight decay, a plain SGD step.
            (
                "bias".to_string(),
                parameter(&[0.0, 0.0], Some(&[1.0, -2.0])),
            ),
            // ‖g‖ = 0 (frozen prototypes): no movement at all.
            (
                "frozen".to_string(),
                parameter(&[1.0, 2.0], Some(&[0.0, 0.0])),
            ),
            // No gradient: skipped, no momentum buffer.
            ("unused".to_string(), parameter(&[5.0, 6.0], None)),
        ];
        let mut optimizer = LarcSgd::new(config);
        optimizer.step(&parameters, 0.5);

        // α = 0.001·5 / (1 + 0.1·5 + 1e-8) = 0.005 / 1.50000001 = 0.0033333333111...
        // g' = α·(g + 0.1·w) = α·[0.9, 1.2] = [0.0029999999800, 0.0039999999733]
        // w ← w − 0.5·g' = [2.9985000000100, 3.9980000000133]
        assert_close(
            &values(&parameters[0].1),
            &[2.99850000001, 3.99800000001],
            1e-7,
        );
        // w ← 0 − 0.5·[1, −2]
        assert_close(&values(&parameters[1].1), &[-0.5, 1.0], 1e-7);
        assert_close(&values(&parameters[2].1), &[1.0, 2.0], 0.0);
        assert_close(&values(&parameters[3].1), &[5.0, 6.0], 0.0);
        let state = optimizer.state();
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bias", "frozen", "weight"]);
        assert_close(&values(&state[2].1), &[0.00299999998, 0.00399999997], 1e-7);
        assert_close(&values(&state[1].1), &[0.0, 0.0], 0.0);

        // Second step, same gradients, lr 0.25: momentum carries the first update.
        // ‖w‖ = 5·(1 − 0.0005) = 4.9975000000166 (w stayed parallel to [3, 4]),
        // α = 0.0049975 / (1 + 0.49975 + 1e-8) = 0.0033322220148...
        // g' = α·([0.6, 0.8] + 0.1·w) = α·[0.89985, 1.1998] = [0.0029985000, 0.0039980000]
        // buf = 0.9·[0.00299999998, 0.00399999997] + g' = [0.0056985000, 0.0075980000]
        // w ← w − 0.25·buf = [2.9970753750, 3.9961005000]
        optimizer.step(&parameters, 0.25);
        assert_close(&values(&parameters[0].1), &[2.997075375, 3.9961005], 1e-6);
        // bias, now ‖w‖ = √1.25 = 1.1180339887 ≠ 0, so LARC applies: ‖g‖ = √5 = 2.2360679775,
        // α = 0.001·1.1180339887 / (2.2360679775 + 0.1·1.1180339887 + 1e-8) = 0.00047619047,
        // g' = α·([1, −2] + 0.1·[−0.5, 1]) = [0.00045238095, −0.00090476190],
        // buf = 0.9·[1, −2] + g' = [0.90045238095, −1.80090476190], w = [−0.5, 1] − 0.25·buf
        assert_close(
            &values(&parameters[1].1),
            &[-0.72511309524, 1.45022619048],
            1e-6,
        );
    }

    #[test]
    fn clip_mode_caps_the_effective_lr() {
        let config = LarcSgdConfig {
            momentum: 0.0,
            weight_decay: 0.0,
            trust_coefficient: 1.0,
            clip: true,
            ..LarcSgdConfig::default()
        };
        // α = 1·5/1 = 5 > lr: clip keeps the lr, so the step is lr·g.
        let w = ("w".to_string(), parameter(&[3.0, 4.0], Some(&[0.6, 0.8])));
        LarcSgd::new(config).step(std::slice::from_ref(&w), 0.1);
        assert_close(&values(&w.1), &[2.94, 3.92], 1e-6);
    }

    #[test]
    fn state_round_trips_and_is_checked() {
        let parameters = vec![("w".to_string(), parameter(&[3.0, 4.0], Some(&[0.6, 0.8])))];
        let mut optimizer = LarcSgd::new(LarcSgdConfig::default());
        optimizer.step(&parameters, 0.1);
        let saved: Vec<(String, Tensor)> = optimizer
            .state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let mut restored = LarcSgd::new(LarcSgdConfig::default());
        restored.load_state(saved, &parameters).unwrap();
        assert_eq!(restored.state()[0].1, optimizer.state()[0].1);

        let unknown = vec![(
            "v".to_string(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        )];
        assert_eq!(
            restored.load_state(unknown, &parameters),
            Err(OptimError::UnknownParameter("v".into()))
        );
        let wrong = vec![(
            "w".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )];
        assert!(matches!(
            restored.load_state(wrong, &parameters),
            Err(OptimError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn trainable_parameters_skip_running_statistics() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _bn = nn::batch_norm1d(vs.root() / "bn", 3, Default::default());
        let _linear = nn::linear(vs.root() / "fc", 3, 2, Default::default());
        let names: Vec<String> = trainable_parameters(&vs)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["bn.bias", "bn.weight", "fc.bias", "fc.weight"]);
    }

    #[test]
    fn schedule_values() {
        // SwAV's 800-epoch recipe in miniature: 0.3 → 4.8 over 10 iterations, cosine to 0.0048
        // over 90 more.
        let schedule = LrSchedule {
            start_warmup_lr: 0.3,
            base_lr: 4.8,
            final_lr: 0.0048,
            warmup_iters: 10,
            total_iters: 100,
        };
        assert_eq!(schedule.lr(0), 0.3); // warmup start
        assert!((schedule.lr(1) - 0.8).abs() < 1e-12); // step (4.8 − 0.3)/9 = 0.5
        assert_eq!(schedule.lr(9), 4.8); // warmup end = base
        assert_eq!(schedule.lr(10), 4.8); // cosine t = 0
        // Mid cosine, t = 45 of 90: the mean of base and final.
        assert!((schedule.lr(55) - (4.8 + 0.0048) / 2.0).abs() < 1e-12);
        // Last iteration, t = 89: final + ½(base − final)(1 + cos(89π/90)).
        let last = 0.0048 + 0.5 * (4.8 - 0.0048) * (1.0 + (89.0 * PI / 90.0).cos());
        assert!((schedule.lr(99) - last).abs() < 1e-12);
        assert!(schedule.lr(99) < 0.0065);
        assert_eq!(schedule.lr(100), 0.0048);
        assert_eq!(schedule.lr(10_000), 0.0048);
        // Monotone: up through the warmup, down through the cosine.
        assert!((1..10).all(|i| schedule.lr(i) > schedule.lr(i - 1)));
        assert!((11..101).all(|i| schedule.lr(i) < schedule.lr(i - 1)));
    }

    #[test]
    fn seer_schedule_and_scaling() {
        assert_eq!(LrSchedule::scaled_lr(0.3, 4096), 4.8);
        assert_eq!(LrSchedule::scaled_lr(0.3, 8192), 9.6);
        let seer = LrSchedule::seer(8192, 122_070);
        assert_eq!(seer.lr(0), 0.15);
        assert_eq!(seer.lr(7_999), 9.6);
        assert!((seer.lr(122_069) - 0.0096).abs() < 1e-6);
        assert_eq!(seer.lr(122_070), 9.6 / 1000.0);
        // Without warmup the cosine starts at base.
        let plain = LrSchedule {
            warmup_iters: 0,
            ..seer
        };
        assert_eq!(plain.lr(0), 9.6);
    }
}
