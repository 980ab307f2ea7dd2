//! One view from a decoded source image: SwAV's per-crop chain, in SwAV's order
//! (RandomResizedCrop, flip, color jitter, grayscale, blur, ToTensor + Normalize), on the small
//! crop after the resize so every later operation touches only output pixels.

use std::time::{Duration, Instant};

use crate::config::Layout;
use crate::ops::color::{self, ColorOp};
use crate::ops::{self, RgbMut, RgbRef, blur::GaussianBlur, pack, resize::CropResizer};
use crate::params::{JitterOp, ViewParams};

/// Time spent per stage, summed over views.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StageTimes {
    /// Waiting for shard bytes from storage (the reader's blocking time).
    pub read: Duration,
    /// Decoding source images.
    pub decode: Duration,
    /// Crop and resize, with the horizontal flip folded in.
    pub crop_resize: Duration,
    /// Color jitter and grayscale.
    pub color: Duration,
    /// Gaussian blur.
    pub blur: Duration,
    /// Writing into the batch buffer (and normalizing, for float output).
    pub pack: Duration,
}

impl StageTimes {
    /// Adds another split to this one.
    pub fn add(&mut self, other: &StageTimes) {
        self.read += other.read;
        self.decode += other.decode;
        self.crop_resize += other.crop_resize;
        self.color += other.color;
        self.blur += other.blur;
        self.pack += other.pack;
    }

    /// The sum of every stage.
    pub fn total(&self) -> Duration {
        self.read + self.decode + self.crop_resize + self.color + self.blur + self.pack
    }
}

/// Where one view goes: its slot in a batch buffer.
pub enum Slot<'a> {
    /// `[H, W, 3]` bytes.
    U8(&'a mut [u8]),
    /// `[3, H, W]` normalized floats.
    F32(&'a mut [f32]),
}

impl Slot<'_> {
    /// The layout this slot has.
    pub fn layout(&self) -> Layout {
        match self {
            Slot::U8(_) => Layout::U8Nhwc,
            Slot::F32(_) => Layout::F32Nchw,
        }
    }
}

/// Renders views; owns every scratch buffer, so rendering allocates nothing once warm.
pub struct ViewRenderer {
    resizer: CropResizer,
    blur: GaussianBlur,
    crop: Vec<u8>,
}

impl Default for ViewRenderer {
    fn default() -> Self {
        Self::new()
    }
}

impl ViewRenderer {
    /// A renderer with empty scratch buffers.
    pub fn new() -> Self {
        Self {
            resizer: CropResizer::new(),
            blur: GaussianBlur::new(),
            crop: Vec::new(),
        }
    }

    /// Renders the view `params` of `source` into `out`, normalizing float output with
    /// `mean` and `std`; adds the time of each stage to `times`.
    pub fn render(
        &mut self,
        source: RgbRef<'_>,
        params: &ViewParams,
        mean: [f32; 3],
        std: [f32; 3],
        out: Slot<'_>,
        times: &mut StageTimes,
    ) {
        let size = params.size;
        let pixels = size as usize * size as usize * 3;
        // Grown to the largest crop and never shrunk: crops of different sizes alternate.
        let crop = ops::grown(&mut self.crop, pixels);
        let mut clock = Instant::now();
        let mut lap = |stage: &mut Duration| {
            let now = Instant::now();
            *stage += now - clock;
            clock = now;
        };
        // The flip rides along with the resize, which folds it into its weights.
        self.resizer.resized_crop_flipped(
            source,
            params.crop,
            params.flip,
            RgbMut {
                width: size,
                height: size,
                data: &mut *crop,
            },
        );
        lap(&mut times.crop_resize);
        let mut color_ops = [ColorOp::Grayscale; 5];
        let mut count = 0;
        if let Some(jitter) = &params.jitter {
            for op in jitter.order {
                color_ops[count] = match op {
                    JitterOp::Brightness => ColorOp::Brightness(jitter.brightness),
                    JitterOp::Contrast => ColorOp::Contrast(jitter.contrast),
                    JitterOp::Saturation => ColorOp::Saturation(jitter.saturation),
                    JitterOp::Hue => ColorOp::Hue(jitter.hue),
                };
                count += 1;
            }
        }
        if params.grayscale {
            color_ops[count] = ColorOp::Grayscale;
            count += 1;
        }
        color::apply(square(crop, size), &color_ops[..count]);
        lap(&mut times.color);
        if let Some(radius) = params.blur_radius {
            self.blur.apply(square(crop, size), radius);
        }
        lap(&mut times.blur);
        let finished = RgbRef {
            width: size,
            height: size,
            data: crop,
        };
        match out {
            Slot::U8(out) => pack::pack_u8_hwc(finished, out),
            Slot::F32(out) => pack::pack_f32_chw(finished, mean, std, out),
        }
        lap(&mut times.pack);
    }
}

fn square(data: &mut [u8], size: u32) -> RgbMut<'_> {
    RgbMut {
        width: size,
        height: size,
        data,
    }
}
