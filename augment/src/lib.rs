//! SwAV multi-crop augmentation, and the streaming pipeline that turns a shard dataset into an
//! endless, reproducible stream of batches of views for the trainer.
//!
//! No libtorch here: batches are plain buffers (uint8 NHWC or normalized float32 NCHW, one per
//! crop index, crop-major as SwAV's forward expects) that the trainer wraps.

pub mod config;
pub mod ops;
pub mod params;

pub use config::{AugmentConfig, CropGroup, Layout};
pub use params::{ViewParams, ViewRng};
pub mod decode;
pub mod pipeline;
pub mod view;

pub use pipeline::{Batch, Pipeline, PipelineOptions, StreamState, ViewData};
