//! RegNetY + SwAV pretraining on libtorch (tch): the model, the loss, the optimizer, and the
//! training loop fed by the augmenter's batch channel; and the evaluation of pretrained trunks
//! (kNN and linear probes, [`eval`]).

pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod dist;
pub mod eval;
pub mod export;
pub mod launch;
pub mod metrics;
pub mod optim;
pub mod regnet;
pub mod swav;
pub mod torch_errors;
pub mod train;
