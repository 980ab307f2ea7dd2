//! Weighted k-nearest-neighbour classification, as VISSL's `knn_utils` (NPID's protocol,
//! seer.md §6): features L2-normalized (cosine similarity), the k most similar training
//! samples, each voting for its class with weight exp(similarity / T); classes ranked by the
//! sum of their votes.

use tch::{Kind, Tensor};

/// The kNN settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnConfig {
    /// Neighbours (default 200, VISSL's).
    pub k: i64,
    /// Temperature T of the vote weights exp(similarity / T) (default 0.1, VISSL's σ).
    pub temperature: f64,
    /// Test samples compared at once (bounds the `[chunk, N_train]` similarity matrix).
    pub chunk: i64,
}

impl Default for KnnConfig {
    fn default() -> Self {
        KnnConfig {
            k: 200,
            temperature: 0.1,
            chunk: 256,
        }
    }
}

/// Each test sample's classes ranked by their kNN score, `[N_test, classes]` (`int64`, best
/// first), for `classes` classes. `train` is `[N_train, D]`, `train_labels` `[N_train]` class
/// indices, `test` `[N_test, D]`; features need not be normalized. k is capped at `N_train`.
pub fn predict(
    train: &Tensor,
    train_labels: &Tensor,
    test: &Tensor,
    classes: i64,
    config: &KnnConfig,
) -> Tensor {
    tch::no_grad(|| {
        let normalize = |x: &Tensor| {
            let x = x.to_kind(Kind::Float);
            let norm = x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
            x / norm
        };
        let train = normalize(train);
        let train_t = train.tr().contiguous(); // [D, N_train]
        let test = normalize(test);
        let k = config.k.clamp(1, train.size()[0]);
        let n_test = test.size()[0];
        let mut ranked = Vec::new();
        let mut start = 0;
        while start < n_test {
            let len = config.chunk.max(1).min(n_test - start);
            let similarity = test.narrow(0, start, len).matmul(&train_t); // [len, N_train]
            let (top, indices) = similarity.topk(k, 1, true, true); // [len, k]
            let neighbour_labels = train_labels.index_select(0, &indices.flatten(0, -1));
            let weights = (top / config.temperature).exp(); // [len, k]
            let scores = Tensor::zeros([len, classes], (Kind::Float, test.device())).scatter_add(
                1,
                &neighbour_labels.view([len, k]),
                &weights,
            ); // [len, classes]
            ranked.push(scores.argsort(1, true));
            start += len;
        }
        Tensor::cat(&ranked, 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weighted_vote_beats_the_majority() {
        // Three far class-1 neighbours against one very close class-0 neighbour: with a low
        // temperature the close one wins, with a high one the majority does.
        let train = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 0.1, 1.0, -0.1, 1.0]).view([4, 2]);
        let labels = Tensor::from_slice(&[0i64, 1, 1, 1]);
        let test = Tensor::from_slice(&[1.0f32, 0.3]).view([1, 2]);
        let top1 = |temperature| {
            let config = KnnConfig {
                k: 4,
                temperature,
                chunk: 1,
            };
            predict(&train, &labels, &test, 2, &config).int64_value(&[0, 0])
        };
        assert_eq!(top1(0.05), 0);
        assert_eq!(top1(10.0), 1);
    }

    #[test]
    fn k_is_capped_and_chunks_agree() {
        let train = Tensor::randn([20, 5], (Kind::Float, tch::Device::Cpu));
        let labels = Tensor::arange(20, (Kind::Int64, tch::Device::Cpu)).remainder(3);
        let test = Tensor::randn([7, 5], (Kind::Float, tch::Device::Cpu));
        let whole = predict(&train, &labels, &test, 3, &KnnConfig::default());
        let chunked = predict(
            &train,
            &labels,
            &test,
            3,
            &KnnConfig {
                chunk: 3,
                ..KnnConfig::default()
            },
        );
        assert_eq!(whole.size(), [7, 3]);
        assert!(whole.equal(&chunked));
    }
}
