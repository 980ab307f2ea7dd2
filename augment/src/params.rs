//! The random half of the augmentation: per-view parameters drawn exactly from torchvision's
//! distributions, from a random stream that depends only on (seed, epoch, sample key, crop
//! index). So a view is the same whatever the number of threads, the batch it lands in, or
//! whether the run was resumed.

use crate::config::{AugmentConfig, CropGroup};
use crate::ops::CropBox;
use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// One of ColorJitter's four operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JitterOp {
    /// `adjust_brightness`.
    Brightness,
    /// `adjust_contrast`.
    Contrast,
    /// `adjust_saturation`.
    Saturation,
    /// `adjust_hue`.
    Hue,
}

/// ColorJitter's parameters for one crop: the four factors and the order they apply in
/// (torchvision draws `randperm(4)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    /// Application order.
    pub order: [JitterOp; 4],
    /// Brightness factor.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Hue shift in [-0.5, 0.5].
    pub hue: f32,
}

/// Everything random about one view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewParams {
    /// Source rectangle.
    pub crop: CropBox,
    /// Whether the RandomResizedCrop fell back to the center crop after ten attempts.
    pub fallback: bool,
    /// Output side.
    pub size: u32,
    /// Horizontal flip.
    pub flip: bool,
    /// Color jitter, when RandomApply fired.
    pub jitter: Option<Jitter>,
    /// RandomGrayscale.
    pub grayscale: bool,
    /// Gaussian blur radius, when it fired.
    pub blur_radius: Option<f32>,
}

/// The random stream of one view: xoshiro256++ seeded from a hash of (seed, epoch, key, crop
/// index). The hash and generator are fixed algorithms, so streams are stable across releases
/// and platforms.
#[derive(Debug, Clone)]
pub struct ViewRng(Xoshiro256PlusPlus);

impl ViewRng {
    /// The stream of crop `crop_index` of sample `key` in `epoch`.
    pub fn new(seed: u64, epoch: u64, key: &str, crop_index: u32) -> Self {
        let mut h = splitmix(seed ^ 0x5EE2_5EE2_5EE2_5EE2);
        h = splitmix(h ^ epoch);
        h = splitmix(h ^ fnv1a(key.as_bytes()));
        h = splitmix(h ^ u64::from(crop_index));
        Self(Xoshiro256PlusPlus::seed_from_u64(h))
    }

    /// A float uniform in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A float uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// An integer uniform in [0, n), without modulo bias (Lemire's method with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        loop {
            let product = u128::from(self.0.next_u64()) * u128::from(n);
            let low = product as u64;
            if low >= n.wrapping_neg() % n {
                return (product >> 64) as u64;
            }
        }
    }

    /// True with probability `p` (torchvision's `torch.rand(1) < p`).
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// SplitMix64's finalizer: a bijective mixer.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over the key bytes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// torchvision's `RandomResizedCrop.get_params`: up to ten tries of an area fraction uniform in
/// `scale` and an aspect ratio log-uniform in `ratio` (sides rounded half to even as Python's
/// `round`), accepted when the box fits; otherwise the center crop clamped to `ratio`.
/// Returns the box and whether it is the fallback.
pub fn sample_crop(
    rng: &mut ViewRng,
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
) -> (CropBox, bool) {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform(scale[0], scale[1]);
        let aspect = rng.uniform(log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= f64::from(width) && h > 0.0 && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = rng.below(u64::from(height - h) + 1) as u32;
            let left = rng.below(u64::from(width - w) + 1) as u32;
            return (
                CropBox {
                    top,
                    left,
                    height: h,
                    width: w,
                },
                false,
            );
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < ratio[0] {
        (
            width,
            ((f64::from(width) / ratio[0]).round_ties_even() as u32).clamp(1, height),
        )
    } else if in_ratio > ratio[1] {
        (
            ((f64::from(height) * ratio[1]).round_ties_even() as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    (
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        },
        true,
    )
}

/// ColorJitter's factor draw: uniform in `[max(0, 1 - amount), 1 + amount]`.
fn jitter_factor(rng: &mut ViewRng, amount: f64) -> f32 {
    rng.uniform((1.0 - amount).max(0.0), 1.0 + amount) as f32
}

/// Draws every parameter of one view of a `width` x `height` source image.
pub fn sample_view(
    rng: &mut ViewRng,
    config: &AugmentConfig,
    group: &CropGroup,
    width: u32,
    height: u32,
) -> ViewParams {
    let (crop, fallback) = sample_crop(rng, width, height, group.scale, config.ratio);
    let flip = rng.bernoulli(config.flip_p);
    let j = &config.jitter;
    let jitter = rng.bernoulli(j.p).then(|| {
        let mut order = [
            JitterOp::Brightness,
            JitterOp::Contrast,
            JitterOp::Saturation,
            JitterOp::Hue,
        ];
        // Fisher-Yates: every permutation equally likely, as randperm(4).
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        Jitter {
            order,
            brightness: jitter_factor(rng, j.brightness),
            contrast: jitter_factor(rng, j.contrast),
            saturation: jitter_factor(rng, j.saturation),
            hue: rng.uniform(-j.hue, j.hue) as f32,
        }
    });
    let grayscale = rng.bernoulli(config.grayscale_p);
    let blur_radius = rng
        .bernoulli(config.blur.p)
        .then(|| rng.uniform(config.blur.radius[0], config.blur.radius[1]) as f32);
    ViewParams {
        crop,
        fallback,
        size: group.size,
        flip,
        jitter,
        grayscale,
        blur_radius,
    }
}

/// The parameters of every view of one source image.
pub fn sample_views(
    config: &AugmentConfig,
    seed: u64,
    epoch: u64,
    key: &str,
    width: u32,
    height: u32,
) -> Vec<ViewParams> {
    config
        .view_groups()
        .into_iter()
        .enumerate()
        .map(|(i, group)| {
            sample_view(
                &mut ViewRng::new(seed, epoch, key, i as u32),
                config,
                group,
                width,
                height,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! Statistical checks of the sampled parameters against the analytic distributions of
    //! torchvision's procedure. Seeds are fixed, so the tests are deterministic; the bounds are
    //! the 0.1 % critical values, so a correct sampler passes with any seed almost surely.
    use super::*;

    /// The Kolmogorov-Smirnov statistic of `samples` against the CDF `cdf`.
    fn ks(samples: &mut [f64], cdf: impl Fn(f64) -> f64) -> f64 {
        samples.sort_by(f64::total_cmp);
        let n = samples.len() as f64;
        samples
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = cdf(x);
                (f - i as f64 / n).abs().max((f - (i + 1) as f64 / n).abs())
            })
            .fold(0.0, f64::max)
    }

    /// KS critical value at significance 0.001.
    fn ks_limit(n: usize) -> f64 {
        1.95 / (n as f64).sqrt()
    }

    /// The analytic law of one accepted RandomResizedCrop attempt on a `width` x `height` image
    /// (large enough that rounding the sides is negligible): (area fraction s, log aspect t) is
    /// uniform on the part of the rectangle where the box fits: s * r <= W/H and s / r <= H/W.
    struct CropLaw {
        scale: [f64; 2],
        t_range: [f64; 2],
        aspect: f64,
    }

    impl CropLaw {
        const STEPS: usize = 4_000;
        fn bound(&self, t: f64) -> f64 {
            let r = t.exp();
            (self.aspect / r).min(r / self.aspect)
        }
        /// Integral over t (optionally only t <= t_max) of the accepted length of s below x.
        fn mass(&self, x: f64, t_max: f64) -> f64 {
            let [t0, t1] = self.t_range;
            let dt = (t1 - t0) / Self::STEPS as f64;
            (0..Self::STEPS)
                .map(|k| t0 + (k as f64 + 0.5) * dt)
                .filter(|&t| t <= t_max)
                .map(|t| (x.min(self.scale[1]).min(self.bound(t)) - self.scale[0]).max(0.0) * dt)
                .sum()
        }
        fn accept_probability(&self) -> f64 {
            self.mass(f64::INFINITY, f64::INFINITY)
                / ((self.scale[1] - self.scale[0]) * (self.t_range[1] - self.t_range[0]))
        }
    }

    /// `f` on a fine grid of [lo, hi], linearly interpolated (the law's CDFs are smooth).
    fn tabulate(lo: f64, hi: f64, f: impl Fn(f64) -> f64) -> impl Fn(f64) -> f64 {
        const POINTS: usize = 1_000;
        let table: Vec<f64> = (0..=POINTS)
            .map(|k| f(lo + (hi - lo) * k as f64 / POINTS as f64))
            .collect();
        move |x| {
            let position = ((x - lo) / (hi - lo) * POINTS as f64).clamp(0.0, POINTS as f64);
            let k = (position as usize).min(POINTS - 1);
            table[k] + (table[k + 1] - table[k]) * (position - k as f64)
        }
    }

    fn crops(width: u32, height: u32, scale: [f64; 2], n: usize) -> Vec<(CropBox, bool)> {
        let ratio = [3.0 / 4.0, 4.0 / 3.0];
        (0..n)
            .map(|i| {
                sample_crop(
                    &mut ViewRng::new(7, 0, &format!("k{i}"), 0),
                    width,
                    height,
                    scale,
                    ratio,
                )
            })
            .collect()
    }

    fn check_crop_law(width: u32, height: u32, scale: [f64; 2], n: usize) {
        let law = CropLaw {
            scale,
            t_range: [(3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln()],
            aspect: f64::from(width) / f64::from(height),
        };
        let sampled = crops(width, height, scale, n);
        let total = law.mass(f64::INFINITY, f64::INFINITY);
        let area_cdf = tabulate(scale[0], scale[1], |x| law.mass(x, f64::INFINITY) / total);
        let aspect_cdf = tabulate(law.t_range[0], law.t_range[1], |y| {
            law.mass(f64::INFINITY, y) / total
        });
        let accepted: Vec<CropBox> = sampled.iter().filter(|c| !c.1).map(|c| c.0).collect();
        let area = f64::from(width) * f64::from(height);
        let mut fractions: Vec<f64> = accepted
            .iter()
            .map(|c| f64::from(c.width) * f64::from(c.height) / area)
            .collect();
        let d = ks(&mut fractions, &area_cdf);
        assert!(
            d < ks_limit(accepted.len()),
            "area fraction KS {d} for {width}x{height} {scale:?}"
        );
        let mut log_ratios: Vec<f64> = accepted
            .iter()
            .map(|c| (f64::from(c.width) / f64::from(c.height)).ln())
            .collect();
        let d = ks(&mut log_ratios, &aspect_cdf);
        assert!(
            d < ks_limit(accepted.len()),
            "aspect KS {d} for {width}x{height} {scale:?}"
        );
        // Fallback after ten failed attempts: binomial count, checked at 5 standard deviations.
        let p = (1.0 - law.accept_probability()).powi(10);
        let fallbacks = sampled.iter().filter(|c| c.1).count() as f64;
        let (mean, sd) = (p * n as f64, (n as f64 * p * (1.0 - p)).sqrt());
        assert!(
            (fallbacks - mean).abs() <= 5.0 * sd + 1.0,
            "fallbacks {fallbacks}, expected {mean:.1} ± {sd:.1}"
        );
        for c in &sampled {
            assert!(
                c.0.left + c.0.width <= width
                    && c.0.top + c.0.height <= height
                    && c.0.width > 0
                    && c.0.height > 0
            );
        }
    }

    #[test]
    fn crop_area_aspect_and_fallback_follow_torchvision() {
        check_crop_law(4000, 3000, [0.14, 1.0], 20_000);
        check_crop_law(4000, 3000, [0.05, 0.14], 20_000);
        check_crop_law(3000, 3000, [0.08, 1.0], 20_000);
        // A wide image where about 3 % of crops fall back to the center crop.
        check_crop_law(4000, 2000, [0.3, 1.0], 20_000);
    }

    #[test]
    fn fallback_is_torchvisions_center_crop() {
        // A panorama where no attempt can fit: the center crop at the largest allowed ratio.
        let (c, fallback) = sample_crop(
            &mut ViewRng::new(1, 0, "p", 0),
            4000,
            1000,
            [0.5, 1.0],
            [0.75, 4.0 / 3.0],
        );
        assert!(fallback);
        assert_eq!(
            c,
            CropBox {
                top: 0,
                left: (4000 - 1333) / 2,
                height: 1000,
                width: 1333
            }
        );
        let (c, _) = sample_crop(
            &mut ViewRng::new(1, 0, "p", 0),
            500,
            4000,
            [0.9, 1.0],
            [0.75, 4.0 / 3.0],
        );
        assert_eq!(
            c,
            CropBox {
                top: (4000 - 667) / 2,
                left: 0,
                height: 667,
                width: 500
            }
        );
        // Tiny images never produce an empty or out-of-bounds box.
        for (w, h) in [(1, 1), (1, 7), (9, 1), (2, 3)] {
            for i in 0..200 {
                let (c, _) = sample_crop(
                    &mut ViewRng::new(3, 0, &i.to_string(), 0),
                    w,
                    h,
                    [0.05, 0.14],
                    [0.75, 4.0 / 3.0],
                );
                assert!(
                    c.width >= 1 && c.height >= 1 && c.left + c.width <= w && c.top + c.height <= h,
                    "{w}x{h}: {c:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_probabilities_factors_and_order_follow_torchvision() {
        let config = AugmentConfig::parse("swav").unwrap();
        let group = &config.crops[0];
        let n = 40_000;
        let views: Vec<ViewParams> = (0..n)
            .map(|i| {
                sample_view(
                    &mut ViewRng::new(11, 3, &format!("s{i}"), 1),
                    &config,
                    group,
                    640,
                    480,
                )
            })
            .collect();
        let rate = |count: usize, p: f64| {
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (count as f64 - p * n as f64).abs() <= 5.0 * sd,
                "{count} of {n}, p = {p}"
            );
        };
        rate(views.iter().filter(|v| v.flip).count(), 0.5);
        rate(views.iter().filter(|v| v.jitter.is_some()).count(), 0.8);
        rate(views.iter().filter(|v| v.grayscale).count(), 0.2);
        rate(
            views.iter().filter(|v| v.blur_radius.is_some()).count(),
            0.5,
        );
        let jitters: Vec<Jitter> = views.iter().filter_map(|v| v.jitter).collect();
        let uniform_cdf = |lo: f64, hi: f64| move |x: f64| ((x - lo) / (hi - lo)).clamp(0.0, 1.0);
        for (name, values, lo, hi) in [
            (
                "brightness",
                jitters.iter().map(|j| j.brightness).collect::<Vec<_>>(),
                0.2,
                1.8,
            ),
            (
                "contrast",
                jitters.iter().map(|j| j.contrast).collect(),
                0.2,
                1.8,
            ),
            (
                "saturation",
                jitters.iter().map(|j| j.saturation).collect(),
                0.2,
                1.8,
            ),
            ("hue", jitters.iter().map(|j| j.hue).collect(), -0.2, 0.2),
        ] {
            let mut v: Vec<f64> = values.into_iter().map(f64::from).collect();
            let d = ks(&mut v, uniform_cdf(lo, hi));
            assert!(d < ks_limit(v.len()), "{name}: KS {d}");
        }
        let mut radii: Vec<f64> = views
            .iter()
            .filter_map(|v| v.blur_radius)
            .map(f64::from)
            .collect();
        let d = ks(&mut radii, uniform_cdf(0.1, 2.0));
        assert!(d < ks_limit(radii.len()), "blur radius: KS {d}");
        // randperm(4): each of the 24 orders equally likely (chi-square, 23 degrees of freedom,
        // 0.1 % critical value 49.7).
        let mut counts = std::collections::HashMap::new();
        for j in &jitters {
            *counts.entry(j.order).or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 24);
        let expected = jitters.len() as f64 / 24.0;
        let chi2: f64 = counts
            .values()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 49.7, "order chi-square {chi2}");
    }

    #[test]
    fn streams_depend_only_on_seed_epoch_key_and_crop() {
        let config = AugmentConfig::parse("swav").unwrap();
        let a = sample_views(&config, 5, 2, "000123", 683, 512);
        assert_eq!(a, sample_views(&config, 5, 2, "000123", 683, 512));
        assert_eq!(a.len(), 8);
        assert_ne!(a, sample_views(&config, 6, 2, "000123", 683, 512));
        assert_ne!(a, sample_views(&config, 5, 3, "000123", 683, 512));
        assert_ne!(a, sample_views(&config, 5, 2, "000124", 683, 512));
        let crops: std::collections::HashSet<_> = a
            .iter()
            .map(|v| (v.crop.left, v.crop.top, v.crop.width))
            .collect();
        assert!(crops.len() > 4, "crops of one image should differ: {a:?}");
        // The integer draw is unbiased and in range.
        let mut rng = ViewRng::new(0, 0, "", 0);
        let mut seen = [0usize; 3];
        for _ in 0..30_000 {
            seen[rng.below(3) as usize] += 1;
        }
        assert!(
            seen.iter().all(|&c| (c as f64 - 10_000.0).abs() < 500.0),
            "{seen:?}"
        );
    }
}
