//! A linear classifier on frozen features (SwAV's `eval_linear.py`, seer.md §6): optionally a
//! batch norm first (VISSL's `eval_mlp` head), then `Linear` initialized N(0, 0.01) with zero
//! bias, trained with SGD (momentum 0.9, no Nesterov), weight decay and a cosine learning-rate
//! schedule to 0, on cached features. The light augmentation is the horizontal flip: each
//! epoch every sample's features come from its center crop or its flipped center crop, at
//! random. The test set is classified with the center crop and the final weights (no model
//! selection on the test set).

use tch::nn::{self, Module, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use tracing::info;

/// The linear probe's settings. Defaults are SwAV's `eval_linear.py`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearConfig {
    /// Passes over the training features (default 100).
    pub epochs: usize,
    /// Samples per step (default 256).
    pub batch_size: i64,
    /// Peak learning rate for a batch of 256, scaled linearly with the batch (default 0.3).
    pub lr_per_256: f64,
    /// Weight decay (default 1e-6).
    pub weight_decay: f64,
    /// SGD momentum (default 0.9).
    pub momentum: f64,
    /// A `BatchNorm1d` (with affine parameters) before the linear layer (default false).
    pub batch_norm: bool,
    /// Draw each sample's center crop or its flip per epoch (default true); false uses the
    /// center crop only.
    pub flip: bool,
    /// Seed of the initialization, the sample order and the flips (default 0).
    pub seed: u64,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            epochs: 100,
            batch_size: 256,
            lr_per_256: 0.3,
            weight_decay: 1e-6,
            momentum: 0.9,
            batch_norm: false,
            flip: true,
            seed: 0,
        }
    }
}

/// The learning rate of `step` out of `steps`: cosine from `peak` to 0.
pub fn cosine_lr(peak: f64, step: usize, steps: usize) -> f64 {
    let progress = step as f64 / steps.max(1) as f64;
    0.5 * peak * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// A trained probe.
pub struct LinearProbe {
    _vs: nn::VarStore,
    norm: Option<nn::BatchNorm>,
    linear: nn::Linear,
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f64>,
}

impl LinearProbe {
    /// Logits `[N, classes]` of features `[N, D]` (eval mode).
    pub fn logits(&self, features: &Tensor) -> Tensor {
        tch::no_grad(|| self.forward(features, false))
    }

    fn forward(&self, features: &Tensor, train: bool) -> Tensor {
        match &self.norm {
            Some(norm) => self.linear.forward(&norm.forward_t(features, train)),
            None => self.linear.forward(features),
        }
    }
}

/// Trains a probe on `features` `[N, D]` (and their flips, same shape) with labels `[N]` over
/// `classes` classes, on `device`.
pub fn train(
    features: &Tensor,
    flipped: &Tensor,
    labels: &Tensor,
    classes: i64,
    config: &LinearConfig,
    device: Device,
) -> LinearProbe {
    tch::manual_seed(crate::train::init_seed(config.seed));
    let vs = nn::VarStore::new(device);
    let dim = features.size()[1];
    let norm = config
        .batch_norm
        .then(|| nn::batch_norm1d(vs.root() / "norm", dim, Default::default()));
    let linear = nn::linear(
        vs.root() / "linear",
        dim,
        classes,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    );
    let features = features.to_device(device);
    let flipped = flipped.to_device(device);
    let labels = labels.to_device(device);
    let n = features.size()[0];
    let batch = config.batch_size.clamp(1, n);
    let steps_per_epoch = ((n + batch - 1) / batch) as usize;
    let steps = steps_per_epoch * config.epochs;
    let peak = config.lr_per_256 * batch as f64 / 256.0;
    let mut optimizer = nn::Sgd {
        momentum: config.momentum,
        dampening: 0.0,
        wd: config.weight_decay,
        nesterov: false,
    }
    .build(&vs, peak)
    .expect("SGD over the probe's variables");
    let mut probe = LinearProbe {
        _vs: vs,
        norm,
        linear,
        epoch_losses: Vec::with_capacity(config.epochs),
    };
    let mut step = 0;
    for epoch in 0..config.epochs {
        let order = Tensor::randperm(n, (Kind::Int64, device));
        let take_flip = if config.flip {
            Tensor::rand([n, 1], (Kind::Float, device)).lt(0.5)
        } else {
            Tensor::zeros([n, 1], (Kind::Bool, device))
        };
        let mut loss_sum = 0.0;
        for start in (0..n).step_by(batch as usize) {
            let len = batch.min(n - start);
            let rows = order.narrow(0, start, len);
            let x = features.index_select(0, &rows).where_self(
                &take_flip.index_select(0, &rows).logical_not(),
                &flipped.index_select(0, &rows),
            );
            let y = labels.index_select(0, &rows);
            optimizer.set_lr(cosine_lr(peak, step, steps));
            let loss = probe.forward(&x, true).cross_entropy_for_logits(&y);
            optimizer.backward_step(&loss);
            loss_sum += loss.double_value(&[]) * len as f64;
            step += 1;
        }
        let mean = loss_sum / n as f64;
        if epoch + 1 == config.epochs || (epoch + 1) % 10 == 0 {
            info!(epoch = epoch + 1, loss = mean, "linear probe");
        }
        probe.epoch_losses.push(mean);
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_falls_from_the_peak_to_zero() {
        assert_eq!(cosine_lr(0.3, 0, 10), 0.3);
        assert!((cosine_lr(0.3, 5, 10) - 0.15).abs() < 1e-12);
        assert!(cosine_lr(0.3, 10, 10).abs() < 1e-12);
    }

    #[test]
    fn a_separable_problem_is_learned() {
        tch::manual_seed(1);
        let labels = Tensor::arange(300, (Kind::Int64, Device::Cpu)).remainder(3);
        let centers = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 3.0, -3.0, -3.0]).view([3, 2]);
        let features = centers.index_select(0, &labels)
            + Tensor::randn([300, 2], (Kind::Float, Device::Cpu)) * 0.5;
        for batch_norm in [false, true] {
            let config = LinearConfig {
                epochs: 20,
                batch_size: 32,
                batch_norm,
                ..LinearConfig::default()
            };
            let probe = train(&features, &features, &labels, 3, &config, Device::Cpu);
            let predicted = probe.logits(&features).argmax(1, false);
            let accuracy = predicted
                .eq_tensor(&labels)
                .to_kind(Kind::Float)
                .mean(Kind::Float);
            assert!(accuracy.double_value(&[]) > 0.97, "batch norm {batch_norm}");
            assert!(probe.epoch_losses.last().unwrap() < &probe.epoch_losses[0]);
        }
    }
}
