//! From the augmenter's batches to normalized image tensors on the training device.
//!
//! The augmenter ([`augment::Pipeline`]) yields, per batch, one `[B, H, W, 3]` `uint8` buffer
//! per crop index. [`BatchLoader`] groups consecutive crops of equal size, as SwAV's
//! `ResNet.forward` and VISSL's `multi_res_input_forward` do (seer.md §1 "Batching / forward"),
//! so that the trunk runs once per resolution: for SEER's 2×224 + 4×96 that is one pass over
//! `[2B, 3, 224, 224]` and one over `[4B, 3, 96, 96]`, rows crop-major within each group.
//!
//! The bytes of a group are copied into a host staging tensor `[n·B, H, W, 3]`, moved to the
//! device as `uint8` (four times fewer bytes than `float32`), and only there permuted to
//! `[n·B, 3, H, W]`, scaled to `[0, 1]` and normalized with the augmentation's mean and
//! standard deviation with the operations of torchvision's `ToTensor` + `Normalize` (on CPU the
//! result equals the augmenter's own `float32` layout bit for bit; `trainer/tests/train_cli.rs`).
//!
//! On CUDA the staging tensors are pinned, so the copy to the device is a non-blocking DMA
//! transfer that overlaps with the host's work on the next batch. Staging tensors are reused
//! round-robin over `data.staging_buffers` slots; before a slot is overwritten its previous
//! transfer must be finished. libtorch gives no CUDA event to tch, so the loader counts: every
//! transfer gets a sequence number, and the trainer calls
//! [`BatchLoader::device_synchronized`] after anything that waits for the device (reading the
//! loss value does, every step); a slot whose transfer is not known to be finished makes the
//! loader synchronize the device itself before overwriting it. On CPU the same code runs without
//! pinning: the "transfer" is the identity and normalization copies, so a slot is free again as
//! soon as [`BatchLoader::next_batch`] returns.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use augment::{Batch, Pipeline, PipelineOptions, StreamState, ViewData};
use tch::{Device, Kind, Tensor};

/// Why the next batch cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The augmenter failed (configuration, dataset, resume position, thread).
    #[error(transparent)]
    Pipeline(#[from] augment::pipeline::PipelineError),
    /// The augmenter stopped: its epoch limit was reached.
    #[error("the data stream ended after {batches} batches")]
    Ended {
        /// Batches delivered.
        batches: u64,
    },
    /// A batch that does not have the shape the loader expects (a bug in the augmenter).
    #[error("batch {index}: {reason}")]
    BadBatch {
        /// The batch's position in the stream.
        index: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Consecutive crop indices of one size: one trunk pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolutionGroup {
    /// Side of the crops in pixels.
    pub size: u32,
    /// The crop indices (crop-major order) of the group.
    pub crops: Range<usize>,
}

/// The runs of equal sizes in `sizes` (SwAV's `unique_consecutive` on the crop widths): crops
/// of one size that are not adjacent form separate groups, as in SwAV.
pub fn resolution_groups(sizes: &[u32]) -> Vec<ResolutionGroup> {
    let mut groups: Vec<ResolutionGroup> = Vec::new();
    for (crop, &size) in sizes.iter().enumerate() {
        match groups.last_mut() {
            Some(group) if group.size == size => group.crops.end = crop + 1,
            _ => groups.push(ResolutionGroup {
                size,
                crops: crop..crop + 1,
            }),
        }
    }
    groups
}

/// One batch on the device, ready for the trunk.
#[derive(Debug)]
pub struct DeviceBatch {
    /// Position of the batch in the stream.
    pub index: u64,
    /// Images per crop, `B`.
    pub batch_size: i64,
    /// The samples' keys, one per row.
    pub keys: Vec<String>,
    /// Crops per image, `V`.
    pub crops: usize,
    /// Per resolution group, in crop order: the group and its images `[n·B, 3, H, W]`
    /// (`float32`, normalized; rows crop-major: crop `crops.start` first).
    pub groups: Vec<(ResolutionGroup, Tensor)>,
    /// The stream position just after this batch (save it to resume with the next one).
    pub state: Arc<StreamState>,
    /// Time spent waiting for the augmenter to deliver the batch.
    pub wait: Duration,
    /// Rows refilled because their image did not decode.
    pub refilled: usize,
}

/// One slot of the staging ring: a host tensor per resolution group.
struct StagingSlot {
    tensors: Vec<Tensor>,
    /// Sequence number of the last transfer from this slot (0: none yet).
    transfer: u64,
}

/// Turns the augmenter's stream into [`DeviceBatch`]es. See the module documentation.
pub struct BatchLoader {
    pipeline: Pipeline,
    device: Device,
    /// The normalization's mean and standard deviation per channel, `[1, 3, 1, 1]` on the
    /// device.
    mean: Tensor,
    std: Tensor,
    slots: Vec<StagingSlot>,
    next_slot: usize,
    /// Sequence number of the last transfer issued.
    transfers: u64,
    /// Deliver images in the channels-last memory layout (CUDA only).
    channels_last: bool,
    /// Transfers up to this number are known to be complete.
    completed: u64,
    delivered: u64,
}

impl BatchLoader {
    /// Starts the augmenter on the dataset at `url` (resuming after the batch `resume` was taken
    /// from), delivering to `device` through `staging_buffers` staging slots (at least 2 on
    /// CUDA).
    pub fn start(
        url: &str,
        options: PipelineOptions,
        resume: Option<StreamState>,
        device: Device,
        staging_buffers: usize,
    ) -> Result<Self, DataError> {
        assert!(
            options.layout == augment::Layout::U8Nhwc,
            "the loader normalizes on the device: it needs uint8 views"
        );
        let per_channel = |values: [f32; 3]| {
            Tensor::from_slice(&values)
                .view([1, 3, 1, 1])
                .to_device(device)
        };
        let mean = per_channel(options.augment.mean);
        let std = per_channel(options.augment.std);
        let pipeline = Pipeline::start(url, options, resume)?;
        let slot_count = if device.is_cuda() {
            staging_buffers.max(2)
        } else {
            1
        };
        Ok(BatchLoader {
            pipeline,
            device,
            mean,
            std,
            slots: (0..slot_count)
                .map(|_| StagingSlot {
                    tensors: Vec::new(),
                    transfer: 0,
                })
                .collect(),
            next_slot: 0,
            transfers: 0,
            channels_last: false,
            completed: 0,
            delivered: 0,
        })
    }

    /// On CUDA, delivers images in the channels-last (NHWC) memory layout from now on, for
    /// convolutions whose weights are channels-last too ([`crate::train::to_channels_last`]);
    /// the values are the same. On CPU the layout stays NCHW.
    pub fn set_channels_last(&mut self, channels_last: bool) {
        self.channels_last = channels_last && self.device.is_cuda();
    }

    /// The augmenter, for its counters.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Tells the loader that every transfer issued so far has finished, because the caller
    /// waited for the device (e.g. read a value computed from the last batch).
    pub fn device_synchronized(&mut self) {
        self.completed = self.transfers;
    }

    /// Waits for the next batch (the wait is recorded in [`DeviceBatch::wait`]) and moves it
    /// to the device.
    pub fn next_batch(&mut self) -> Result<DeviceBatch, DataError> {
        let started = Instant::now();
        let batch = match self.pipeline.next() {
            Some(batch) => batch?,
            None => {
                return Err(DataError::Ended {
                    batches: self.delivered,
                });
            }
        };
        let wait = started.elapsed();
        let groups = self.upload(&batch)?;
        self.delivered += 1;
        Ok(DeviceBatch {
            index: batch.index,
            batch_size: batch.len() as i64,
            keys: batch.keys.clone(),
            crops: batch.sizes.len(),
            groups,
            state: batch.state.clone(),
            wait,
            refilled: batch.refilled,
        })
    }

    fn upload(&mut self, batch: &Batch) -> Result<Vec<(ResolutionGroup, Tensor)>, DataError> {
        let bad = |reason: String| DataError::BadBatch {
            index: batch.index,
            reason,
        };
        let rows = batch.len() as i64;
        if batch.views.len() != batch.sizes.len() || rows == 0 {
            return Err(bad(format!(
                "{} view buffers for {} crop sizes, {rows} rows",
                batch.views.len(),
                batch.sizes.len()
            )));
        }
        let groups = resolution_groups(&batch.sizes);
        let slot_index = self.next_slot;
        self.next_slot = (self.next_slot + 1) % self.slots.len();
        if self.slots[slot_index].transfer > self.completed {
            // The slot's last transfer may still be reading it.
            if let Device::Cuda(index) = self.device {
                tch::Cuda::synchronize(index as i64);
            }
            self.completed = self.transfers;
        }
        let device = self.device;
        let slot = &mut self.slots[slot_index];
        let shapes: Vec<[i64; 4]> = groups
            .iter()
            .map(|g| {
                let side = i64::from(g.size);
                [g.crops.len() as i64 * rows, side, side, 3]
            })
            .collect();
        let reusable = slot.tensors.len() == shapes.len()
            && slot.tensors.iter().zip(&shapes).all(|(t, s)| t.size() == s);
        if !reusable {
            slot.tensors = shapes
                .iter()
                .map(|s| staging_tensor(s, device).map_err(&bad))
                .collect::<Result<_, _>>()?;
        }

        let mut out = Vec::with_capacity(groups.len());
        for (group, staging) in groups.into_iter().zip(&slot.tensors) {
            let crop_bytes = (rows * i64::from(group.size) * i64::from(group.size) * 3) as usize;
            // SAFETY: `staging` is a contiguous `uint8` CPU tensor (plain or pinned) of
            // `crops.len() · crop_bytes` bytes, created by `staging_tensor` and owned by this
            // slot alone. No other tensor aliases its storage: on CPU normalization below
            // copies out of it before `upload` returns, and on CUDA the last transfer that read
            // it is finished (checked against `completed` above). Each crop's bytes go to their
            // own disjoint `crop_bytes` range, in bounds by the tensor's shape.
            let base = staging.data_ptr() as *mut u8;
            for (position, crop) in group.crops.clone().enumerate() {
                let bytes = match &batch.views[crop] {
                    ViewData::U8(bytes) => bytes.as_slice(),
                    ViewData::F32(_) => {
                        return Err(bad("float views; the loader needs uint8".into()));
                    }
                };
                if bytes.len() != crop_bytes || batch.sizes[crop] != group.size {
                    return Err(bad(format!(
                        "crop {crop}: {} bytes, expected {crop_bytes}",
                        bytes.len()
                    )));
                }
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        base.add(position * crop_bytes),
                        crop_bytes,
                    );
                }
            }
            // On CUDA a non-blocking copy from pinned memory; on CPU the same tensor.
            let on_device = staging.to_device_(device, Kind::Uint8, device.is_cuda(), false);
            // torchvision's `ToTensor` + `Normalize`, op for op: `x.float().div(255)`, then
            // `.sub(mean).div(std)`.
            let pixels = on_device
                .permute([0, 3, 1, 2]) // [n·B, 3, H, W], a view of the NHWC bytes
                .to_kind(Kind::Float);
            // NCHW in memory; with channels-last the view's NHWC layout is kept instead (the
            // conversion keeps strides, and so do the element-wise operations below).
            let pixels = if self.channels_last {
                pixels
            } else {
                pixels.contiguous()
            };
            let images = (pixels / 255.0 - &self.mean) / &self.std;
            // Channels-last: the same `[n·B, 3, H, W]` values laid out as NHWC in memory, the
            // layout PyTorch's `x.contiguous(memory_format=torch.channels_last)` gives (no copy
            // when the layout was kept above).
            let images = if self.channels_last {
                images
                    .permute([0, 2, 3, 1])
                    .contiguous()
                    .permute([0, 3, 1, 2])
            } else {
                images
            };
            out.push((group, images));
        }
        if device.is_cuda() {
            self.transfers += 1;
            slot.transfer = self.transfers;
        }
        Ok(out)
    }
}

/// A host tensor to stage one group's bytes: pinned for fast, asynchronous copies when the
/// device is CUDA (pinning needs a CUDA runtime, so never on CPU).
fn staging_tensor(shape: &[i64; 4], device: Device) -> Result<Tensor, String> {
    let tensor = Tensor::empty(shape.as_slice(), (Kind::Uint8, Device::Cpu));
    if device.is_cuda() {
        crate::dist::pinned(&tensor)
            .map_err(|e| format!("pinning a {shape:?} uint8 staging buffer: {e}"))
    } else {
        Ok(tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_consecutive_sizes_form_one_group() {
        let groups = resolution_groups(&[224, 224, 96, 96, 96, 96]);
        assert_eq!(
            groups,
            [
                ResolutionGroup {
                    size: 224,
                    crops: 0..2
                },
                ResolutionGroup {
                    size: 96,
                    crops: 2..6
                }
            ]
        );
        let sizes: Vec<u32> = resolution_groups(&[64, 32, 64])
            .iter()
            .map(|g| g.size)
            .collect();
        assert_eq!(sizes, [64, 32, 64]);
        assert!(resolution_groups(&[]).is_empty());
    }
}
