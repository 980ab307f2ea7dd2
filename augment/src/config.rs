//! What to produce: the crop sets and the per-crop augmentation, with SwAV's and SEER's presets.
//!
//! Every default is the value of SwAV's `main_swav.py` / VISSL's SwAV configuration
//! (`../shared/reference/seer.md`, section 1).

use serde::{Deserialize, Serialize};

/// A group of crops of one output size, sampled with one scale range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropGroup {
    /// How many crops of this size per source image.
    pub count: usize,
    /// Output side in pixels (square crops, as in SwAV).
    pub size: u32,
    /// RandomResizedCrop area fraction range `[min, max]` of the source image.
    pub scale: [f64; 2],
}

/// ColorJitter wrapped in RandomApply, as SwAV's `get_color_distortion(s=1.0)` builds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JitterConfig {
    /// Probability that the jitter is applied to a crop (SwAV: 0.8).
    pub p: f64,
    /// Brightness factor drawn uniformly from `[max(0, 1 - b), 1 + b]` (SwAV: 0.8).
    pub brightness: f64,
    /// Contrast factor range, as brightness (SwAV: 0.8).
    pub contrast: f64,
    /// Saturation factor range, as brightness (SwAV: 0.8).
    pub saturation: f64,
    /// Hue shift drawn uniformly from `[-h, h]`, `h <= 0.5` (SwAV: 0.2).
    pub hue: f64,
}

impl Default for JitterConfig {
    fn default() -> Self {
        Self {
            p: 0.8,
            brightness: 0.8,
            contrast: 0.8,
            saturation: 0.8,
            hue: 0.2,
        }
    }
}

/// PIL Gaussian blur with a random radius, as SwAV's `PILRandomGaussianBlur`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlurConfig {
    /// Probability per crop (SwAV: 0.5, on every crop including the small ones).
    pub p: f64,
    /// Radius (PIL's radius is the standard deviation) drawn uniformly from this range
    /// (SwAV: 0.1 to 2.0).
    pub radius: [f64; 2],
}

impl Default for BlurConfig {
    fn default() -> Self {
        Self {
            p: 0.5,
            radius: [0.1, 2.0],
        }
    }
}

/// How batch buffers hold the views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// `uint8`, `[B, H, W, 3]` per crop index: four times fewer bytes to move; the trainer
    /// normalizes on the device.
    U8Nhwc,
    /// `float32`, `[B, 3, H, W]` per crop index, already normalized with `mean` and `std`.
    F32Nchw,
}

/// The whole per-image recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Crop groups in output order (large crops first, as SwAV's forward expects).
    pub crops: Vec<CropGroup>,
    /// RandomResizedCrop aspect-ratio range, sampled log-uniformly (torchvision: 3/4 to 4/3).
    #[serde(default = "default_ratio")]
    pub ratio: [f64; 2],
    /// Horizontal flip probability (SwAV: 0.5).
    #[serde(default = "default_flip")]
    pub flip_p: f64,
    /// Color jitter.
    #[serde(default)]
    pub jitter: JitterConfig,
    /// RandomGrayscale probability (SwAV: 0.2).
    #[serde(default = "default_grayscale")]
    pub grayscale_p: f64,
    /// Gaussian blur.
    #[serde(default)]
    pub blur: BlurConfig,
    /// Normalization mean (ImageNet's, as VISSL).
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    /// Normalization standard deviation (ImageNet's as VISSL: 0.229, 0.224, 0.225; SwAV's own
    /// code has the typo 0.228 for red).
    #[serde(default = "default_std")]
    pub std: [f32; 3],
}

fn default_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn default_flip() -> f64 {
    0.5
}
fn default_grayscale() -> f64 {
    0.2
}
fn default_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn default_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}

/// The largest crop side, in pixels.
pub const MAX_CROP_SIZE: u32 = 4096;

/// The named recipes.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "swav",
        "SwAV's default: 2x224 at scale 0.14-1 + 6x96 at 0.05-0.14",
    ),
    (
        "swav-2x224",
        "SwAV's two-crop baseline: 2x224 at scale 0.08-1",
    ),
    (
        "seer",
        "SEER 2021 (RegNetY-256GF): 2x224 at 0.14-1 + 4x96 at 0.05-0.14",
    ),
    (
        "seer-10b",
        "SEER 2022 (RegNet-10B): 2x160 at 0.14-1 + 4x96 at 0.05-0.14",
    ),
];

/// A configuration error, found before any work starts.
#[derive(Debug, thiserror::Error)]
#[error("augment config: {0}")]
pub struct ConfigError(pub String);

impl AugmentConfig {
    /// SwAV's recipe with the given crop groups.
    pub fn with_crops(crops: Vec<CropGroup>) -> Self {
        Self {
            crops,
            ratio: default_ratio(),
            flip_p: default_flip(),
            jitter: JitterConfig::default(),
            grayscale_p: default_grayscale(),
            blur: BlurConfig::default(),
            mean: default_mean(),
            std: default_std(),
        }
    }

    /// A preset by name (see [`PRESETS`]), or a free crop set written
    /// `COUNTxSIZE@MIN-MAX+COUNTxSIZE@MIN-MAX...`, e.g. `2x224@0.14-1+6x96@0.05-0.14`.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let group = |count, size, lo, hi| CropGroup {
            count,
            size,
            scale: [lo, hi],
        };
        let crops = match spec {
            "swav" => vec![group(2, 224, 0.14, 1.0), group(6, 96, 0.05, 0.14)],
            "swav-2x224" => vec![group(2, 224, 0.08, 1.0)],
            "seer" => vec![group(2, 224, 0.14, 1.0), group(4, 96, 0.05, 0.14)],
            "seer-10b" => vec![group(2, 160, 0.14, 1.0), group(4, 96, 0.05, 0.14)],
            free => free.split('+').map(parse_group).collect::<Result<_, _>>()?,
        };
        let config = Self::with_crops(crops);
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; a bad configuration is refused before any work starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.crops.is_empty() {
            return err("no crops".into());
        }
        for (i, g) in self.crops.iter().enumerate() {
            if g.count == 0 || g.count > 64 || g.size == 0 || g.size > MAX_CROP_SIZE {
                return err(format!(
                    "crops[{i}]: count {} and size {} must be positive (count <= 64, size <= \
                     {MAX_CROP_SIZE})",
                    g.count, g.size
                ));
            }
            let [lo, hi] = g.scale;
            if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                return err(format!(
                    "crops[{i}].scale: [{lo}, {hi}] must satisfy 0 < min <= max <= 1"
                ));
            }
        }
        let [rlo, rhi] = self.ratio;
        if !(rlo > 0.0 && rlo <= rhi && rhi.is_finite()) {
            return err(format!("ratio: [{rlo}, {rhi}] must satisfy 0 < min <= max"));
        }
        for (name, p) in [
            ("flip_p", self.flip_p),
            ("jitter.p", self.jitter.p),
            ("grayscale_p", self.grayscale_p),
            ("blur.p", self.blur.p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return err(format!("{name}: {p} is not a probability"));
            }
        }
        for (name, v) in [
            ("jitter.brightness", self.jitter.brightness),
            ("jitter.contrast", self.jitter.contrast),
            ("jitter.saturation", self.jitter.saturation),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return err(format!("{name}: {v} must be >= 0"));
            }
        }
        if !(0.0..=0.5).contains(&self.jitter.hue) {
            return err(format!(
                "jitter.hue: {} must be in [0, 0.5]",
                self.jitter.hue
            ));
        }
        let [blo, bhi] = self.blur.radius;
        if !(blo >= 0.0 && blo <= bhi && bhi <= 50.0) {
            return err(format!(
                "blur.radius: [{blo}, {bhi}] must satisfy 0 <= min <= max <= 50"
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return err(format!("mean: {:?} must be finite numbers", self.mean));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return err(format!("std: {:?} must be positive", self.std));
        }
        Ok(())
    }

    /// Crops per source image.
    pub fn views_per_image(&self) -> usize {
        self.crops.iter().map(|g| g.count).sum()
    }

    /// The output side of every crop index, in order.
    pub fn view_sizes(&self) -> Vec<u32> {
        self.crops
            .iter()
            .flat_map(|g| std::iter::repeat_n(g.size, g.count))
            .collect()
    }

    /// The crop group of every crop index, in order.
    pub fn view_groups(&self) -> Vec<&CropGroup> {
        self.crops
            .iter()
            .flat_map(|g| std::iter::repeat_n(g, g.count))
            .collect()
    }

    /// A short human description, e.g. `2x224@0.14-1+6x96@0.05-0.14`.
    pub fn crops_spec(&self) -> String {
        self.crops
            .iter()
            .map(|g| format!("{}x{}@{}-{}", g.count, g.size, g.scale[0], g.scale[1]))
            .collect::<Vec<_>>()
            .join("+")
    }
}

fn parse_group(text: &str) -> Result<CropGroup, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "crop group {text:?}: expected COUNTxSIZE@MIN-MAX (e.g. 6x96@0.05-0.14), or a preset: {}",
            PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
        ))
    };
    let (shape, scale) = text.split_once('@').ok_or_else(bad)?;
    let (count, size) = shape.split_once('x').ok_or_else(bad)?;
    let (lo, hi) = scale.split_once('-').ok_or_else(bad)?;
    Ok(CropGroup {
        count: count.trim().parse().map_err(|_| bad())?,
        size: size.trim().parse().map_err(|_| bad())?,
        scale: [
            lo.trim().parse().map_err(|_| bad())?,
            hi.trim().parse().map_err(|_| bad())?,
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_papers() {
        let swav = AugmentConfig::parse("swav").unwrap();
        assert_eq!(swav.view_sizes(), [224, 224, 96, 96, 96, 96, 96, 96]);
        assert_eq!(swav.crops[1].scale, [0.05, 0.14]);
        assert_eq!(AugmentConfig::parse("seer").unwrap().views_per_image(), 6);
        assert_eq!(
            AugmentConfig::parse("seer-10b").unwrap().view_sizes(),
            [160, 160, 96, 96, 96, 96]
        );
        assert_eq!(
            AugmentConfig::parse("swav-2x224").unwrap().crops[0].scale,
            [0.08, 1.0]
        );
    }

    #[test]
    fn free_specs_parse_and_round_trip() {
        let c = AugmentConfig::parse("2x224@0.14-1+6x96@0.05-0.14").unwrap();
        assert_eq!(c, AugmentConfig::parse("swav").unwrap());
        assert_eq!(AugmentConfig::parse(&c.crops_spec()).unwrap(), c);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, needle) in [
            ("3x", "expected COUNTxSIZE"),
            ("0x224@0.1-1", "must be positive"),
            ("2x224@0.5-0.1", "0 < min <= max <= 1"),
            ("2x224@0-1", "0 < min"),
            ("swa", "preset"),
        ] {
            let e = AugmentConfig::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn toml_like_round_trip_keeps_defaults() {
        let json = r#"{"crops":[{"count":2,"size":64,"scale":[0.2,1.0]}],"jitter":{"hue":0.1}}"#;
        let c: AugmentConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.jitter.p, 0.8);
        assert_eq!(c.jitter.hue, 0.1);
        assert_eq!(c.blur.radius, [0.1, 2.0]);
        c.validate().unwrap();
        let unknown = r#"{"crops":[],"colour":1}"#;
        assert!(serde_json::from_str::<AugmentConfig>(unknown).is_err());
    }
}
