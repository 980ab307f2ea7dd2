//! The pixel operations of `augment::ops` against the real reference: torchvision 0.26's
//! functional API on PIL 13 images (what SwAV and VISSL run), through
//! `tests/python/augment_reference.py` in the project's `.venv`.
//!
//! Inputs are real photos from the test cache (`$SEER_CACHE/photos`, default
//! `~/.cache/seer-rs/photos`; `scripts/fetch-testdata.sh` fetches them), decoded to RGB8 and
//! shrunk to a 512-pixel short side as the pipeline stores them, plus synthetic images (random
//! colors, every RGB color once, images of one to nine pixels). Rust and Python read the very
//! same bytes. All cases are prepared and the reference runs once per test binary; each test
//! then checks one operation, prints its measured error and asserts the stated tolerance.
//! Missing photos or a missing reference make the tests fail, never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use augment::ops::{
    self, CropBox, RgbMut, RgbRef, blur::GaussianBlur, color, pack, resize::CropResizer,
};
use fast_image_resize as fir;
use serde_json::json;

/// Photos drawn from the cache.
const PHOTOS: usize = 20;
/// Short side of the stored images the pipeline decodes.
const SHORT_SIDE: u32 = 512;
const FACTORS: [f32; 5] = [0.2, 0.7, 1.0, 1.5, 1.8];
const HUES: [f32; 7] = [-0.5, -0.2, -0.05, 0.0, 0.1, 0.2, 0.5];
const BLUR_RADII: [f32; 8] = [0.1, 0.5, 1.0, 1.37, 2.0, 6.0, 20.0, 300.0];
/// SwAV's normalization (its std keeps the 0.228 typo) and VISSL's.
const NORMALIZATIONS: [([f32; 3], [f32; 3]); 2] = [
    ([0.485, 0.456, 0.406], [0.228, 0.224, 0.225]),
    ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
];

#[derive(Debug, Clone)]
struct Image {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl Image {
    fn view(&self) -> RgbRef<'_> {
        RgbRef {
            width: self.width,
            height: self.height,
            data: &self.data,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    ResizedCrop {
        crop: CropBox,
        width: u32,
        height: u32,
    },
    Flip,
    Brightness(f32),
    Contrast(f32),
    Saturation(f32),
    Hue(f32),
    Grayscale,
    Blur(f32),
    ToTensorNormalize {
        mean: [f32; 3],
        std: [f32; 3],
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::ResizedCrop { .. } => "resized_crop",
            Op::Flip => "flip",
            Op::Brightness(_) => "brightness",
            Op::Contrast(_) => "contrast",
            Op::Saturation(_) => "saturation",
            Op::Hue(_) => "hue",
            Op::Grayscale => "grayscale",
            Op::Blur(_) => "blur",
            Op::ToTensorNormalize { .. } => "to_tensor_normalize",
        }
    }

    fn to_json(self, input: usize, output: &str) -> serde_json::Value {
        let mut case = json!({ "op": self.name(), "input": input, "output": output });
        let fields = match self {
            Op::ResizedCrop {
                crop,
                width,
                height,
            } => json!({
                "top": crop.top, "left": crop.left,
                "crop_height": crop.height, "crop_width": crop.width,
                "out_height": height, "out_width": width,
            }),
            Op::Brightness(f) | Op::Contrast(f) | Op::Saturation(f) | Op::Hue(f) | Op::Blur(f) => {
                json!({ "factor": f })
            }
            Op::ToTensorNormalize { mean, std } => json!({ "mean": mean, "std": std }),
            Op::Flip | Op::Grayscale => json!({}),
        };
        for (key, value) in fields.as_object().unwrap() {
            case[key] = value.clone();
        }
        case
    }
}

struct Case {
    op: Op,
    input: usize,
}

/// Everything prepared once: inputs, cases, and the reference outputs on disk.
struct Fixture {
    dir: tempfile::TempDir,
    inputs: Vec<Image>,
    cases: Vec<Case>,
}

impl Fixture {
    fn reference_bytes(&self, case: usize) -> Vec<u8> {
        std::fs::read(self.dir.path().join(output_name(case)))
            .unwrap_or_else(|e| panic!("reference output of case {case} missing: {e}"))
    }
}

fn output_name(case: usize) -> String {
    format!("out/{case}.raw")
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(prepare)
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("SEER_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").expect("neither SEER_CACHE nor HOME is set"))
            .join(".cache/seer-rs"),
    }
}

fn collect_photos(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_photos(&path, found);
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["jpg", "jpeg", "png", "webp"].contains(&e.to_ascii_lowercase().as_str())
        }) {
            found.push(path);
        }
    }
}

/// `PHOTOS` photos spread evenly over the sorted cache, the same ones on every machine.
fn photo_paths() -> Vec<PathBuf> {
    let dir = cache_dir().join("photos");
    assert!(
        dir.is_dir(),
        "test photos missing: {} does not exist; run scripts/fetch-testdata.sh",
        dir.display()
    );
    let mut all = Vec::new();
    collect_photos(&dir, &mut all);
    all.sort();
    assert!(
        all.len() >= PHOTOS,
        "only {} photos in {}; run scripts/fetch-testdata.sh",
        all.len(),
        dir.display()
    );
    (0..PHOTOS)
        .map(|i| all[i * all.len() / PHOTOS].clone())
        .collect()
}

/// Decodes to RGB8 and shrinks to a `SHORT_SIDE` short side (any resampler will do: both sides
/// of the comparison read the result).
fn load_photo(path: &Path) -> Image {
    let decoded = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    let (width, height) = decoded.dimensions();
    let photo = Image {
        width,
        height,
        data: decoded.into_raw(),
    };
    let short = width.min(height);
    if short <= SHORT_SIDE {
        return photo;
    }
    let scale = f64::from(SHORT_SIDE) / f64::from(short);
    let out_width = ((f64::from(width) * scale).round() as u32).max(1);
    let out_height = ((f64::from(height) * scale).round() as u32).max(1);
    fir_resize(&photo, None, out_width, out_height)
}

/// `fast_image_resize`'s bilinear convolution, with its crop option (which, like Pillow's
/// `box` argument, lets the filter read pixels outside the crop).
fn fir_resize(src: &Image, crop: Option<CropBox>, width: u32, height: u32) -> Image {
    let source =
        fir::images::ImageRef::new(src.width, src.height, &src.data, fir::PixelType::U8x3).unwrap();
    let mut out = fir::images::Image::new(width, height, fir::PixelType::U8x3);
    let mut options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    if let Some(c) = crop {
        options = options.crop(c.left.into(), c.top.into(), c.width.into(), c.height.into());
    }
    fir::Resizer::new()
        .resize(&source, &mut out, &options)
        .unwrap();
    Image {
        width,
        height,
        data: out.into_vec(),
    }
}

/// `fast_image_resize` on a view of the crop: the filter sees only the crop, as after
/// `img.crop(...)` in torchvision, so what differs from Pillow is the arithmetic alone.
fn fir_resize_cropped_view(src: &Image, crop: CropBox, width: u32, height: u32) -> Image {
    let source =
        fir::images::ImageRef::new(src.width, src.height, &src.data, fir::PixelType::U8x3).unwrap();
    let view =
        fir::images::CroppedImage::new(&source, crop.left, crop.top, crop.width, crop.height)
            .unwrap();
    let mut out = fir::images::Image::new(width, height, fir::PixelType::U8x3);
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    fir::Resizer::new()
        .resize(&view, &mut out, &options)
        .unwrap();
    Image {
        width,
        height,
        data: out.into_vec(),
    }
}

/// A small deterministic generator for crop boxes and noise.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A crop of about `scale` of the area with aspect ratio in (3/4, 4/3), as RandomResizedCrop
/// draws them, clamped into the image.
fn random_crop(rng: &mut Rng, image: &Image, scale: (f64, f64)) -> CropBox {
    let area = f64::from(image.width) * f64::from(image.height);
    let target = area * (scale.0 + (scale.1 - scale.0) * rng.unit());
    let ratio = ((3.0f64 / 4.0).ln() + (16.0f64 / 9.0).ln() * rng.unit()).exp();
    let width = ((target * ratio).sqrt().round() as u32).clamp(1, image.width);
    let height = ((target / ratio).sqrt().round() as u32).clamp(1, image.height);
    CropBox {
        top: rng.below(image.height - height + 1),
        left: rng.below(image.width - width + 1),
        height,
        width,
    }
}

fn resize_ops(rng: &mut Rng, image: &Image) -> Vec<Op> {
    let (w, h) = (image.width, image.height);
    let full = CropBox {
        top: 0,
        left: 0,
        height: h,
        width: w,
    };
    let resized = |crop, size| Op::ResizedCrop {
        crop,
        width: size,
        height: size,
    };
    let mut ops = vec![
        resized(full, 224),
        resized(full, 96),
        // One pixel and a 3x2 sliver, blown up.
        resized(
            CropBox {
                top: h / 2,
                left: w / 2,
                height: 1,
                width: 1,
            },
            96,
        ),
        resized(
            CropBox {
                top: h - 2,
                left: w - 3,
                height: 2,
                width: 3,
            },
            224,
        ),
        // Exactly the output size: a copy.
        resized(
            CropBox {
                top: h - h.min(96),
                left: 0,
                height: h.min(96),
                width: w.min(96),
            },
            96,
        ),
        // Tall and narrow: Pillow resamples vertically first.
        resized(
            CropBox {
                top: 0,
                left: w / 3,
                height: h,
                width: (w / 5).max(1),
            },
            224,
        ),
        // A non-square output.
        Op::ResizedCrop {
            crop: full,
            width: 160,
            height: 96,
        },
    ];
    for _ in 0..3 {
        ops.push(resized(random_crop(rng, image, (0.14, 1.0)), 224));
        ops.push(resized(random_crop(rng, image, (0.05, 0.14)), 96));
    }
    ops
}

fn view_ops() -> Vec<Op> {
    let mut ops = vec![Op::Flip, Op::Grayscale];
    for f in FACTORS {
        ops.extend([Op::Brightness(f), Op::Contrast(f), Op::Saturation(f)]);
    }
    ops.extend(HUES.map(Op::Hue));
    ops.extend(BLUR_RADII.map(Op::Blur));
    ops.extend(NORMALIZATIONS.map(|(mean, std)| Op::ToTensorNormalize { mean, std }));
    ops
}

fn noise_image(rng: &mut Rng, width: u32, height: u32) -> Image {
    let data = (0..width * height * 3).map(|_| rng.next() as u8).collect();
    Image {
        width,
        height,
        data,
    }
}

/// Every RGB color exactly once (4096 x 4096), for exhaustive checks of the color ops.
fn all_colors() -> Image {
    let data = (0..1u32 << 24)
        .flat_map(|c| [(c >> 16) as u8, (c >> 8) as u8, c as u8])
        .collect();
    Image {
        width: 4096,
        height: 4096,
        data,
    }
}

fn prepare() -> Fixture {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/augment_reference.py");
    assert!(
        python.exists(),
        "reference python missing: {}; run scripts/setup.sh",
        python.display()
    );
    assert!(
        script.exists(),
        "reference script missing: {}",
        script.display()
    );

    let mut rng = Rng(0x5eed_0bc6_6a16_0001);
    let mut inputs = Vec::new();
    let mut cases = Vec::new();
    for path in photo_paths() {
        let photo = load_photo(&path);
        let source = inputs.len();
        for op in resize_ops(&mut rng, &photo) {
            cases.push(Case { op, input: source });
        }
        // A view as the color ops see it: a crop resized to 224 or 96 (alternating).
        let size = if source % 2 == 0 { 224 } else { 96 };
        let crop = random_crop(&mut rng, &photo, (0.14, 1.0));
        let view = fir_resize(&photo, Some(crop), size, size);
        inputs.push(photo);
        let view_index = inputs.len();
        inputs.push(view);
        cases.extend(view_ops().into_iter().map(|op| Case {
            op,
            input: view_index,
        }));
    }
    // Synthetic inputs: noise covers hue sectors photos rarely reach; tiny images the edges.
    for (width, height) in [(128, 128), (1, 1), (2, 3), (1, 9), (9, 1)] {
        inputs.push(noise_image(&mut rng, width, height));
        let index = inputs.len() - 1;
        cases.extend(view_ops().into_iter().map(|op| Case { op, input: index }));
    }
    inputs.push(all_colors());
    let index = inputs.len() - 1;
    for op in [
        Op::Hue(0.2),
        Op::Hue(-0.5),
        Op::Saturation(1.8),
        Op::Grayscale,
    ] {
        cases.push(Case { op, input: index });
    }

    let dir = tempfile::tempdir().expect("temporary folder");
    std::fs::create_dir(dir.path().join("in")).unwrap();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let mut input_specs = Vec::new();
    for (i, image) in inputs.iter().enumerate() {
        let name = format!("in/{i}.rgb");
        std::fs::write(dir.path().join(&name), &image.data).unwrap();
        input_specs.push(json!({ "path": name, "width": image.width, "height": image.height }));
    }
    let case_specs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| c.op.to_json(c.input, &output_name(i)))
        .collect();
    let spec = json!({ "inputs": input_specs, "cases": case_specs });
    let spec_path = dir.path().join("cases.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();

    let output = Command::new(&python)
        .arg(&script)
        .arg(&spec_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "reference failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
    Fixture { dir, inputs, cases }
}

/// Absolute differences between Rust and the reference over all cases of one op.
#[derive(Debug, Default)]
struct Errors {
    cases: usize,
    values: u64,
    sum: f64,
    max: f64,
    /// Values that differ at all.
    differing: u64,
    worst_case: Option<usize>,
}

impl Errors {
    fn add(&mut self, case: usize, differences: impl Iterator<Item = f64>) {
        self.cases += 1;
        for difference in differences {
            self.values += 1;
            self.sum += difference;
            if difference > 0.0 {
                self.differing += 1;
            }
            if difference > self.max {
                self.max = difference;
                self.worst_case = Some(case);
            }
        }
    }

    fn mean(&self) -> f64 {
        self.sum / self.values.max(1) as f64
    }

    fn report(&self, what: &str) {
        eprintln!(
            "{what:<28} cases {:>4}  values {:>10}  max |err| {:<10.3e} mean |err| {:.3e}  \
             differing {:.4}%",
            self.cases,
            self.values,
            self.max,
            self.mean(),
            100.0 * self.differing as f64 / self.values.max(1) as f64
        );
    }

    fn assert_within(&self, what: &str, max: f64, mean: f64) {
        self.report(what);
        assert!(self.cases > 0, "{what}: no cases");
        assert!(
            self.max <= max && self.mean() <= mean,
            "{what}: max |err| {} (allowed {max}), mean {} (allowed {mean}), worst case {:?}",
            self.max,
            self.mean(),
            self.worst_case
        );
    }
}

fn byte_differences<'a>(ours: &'a [u8], reference: &'a [u8]) -> impl Iterator<Item = f64> + 'a {
    assert_eq!(ours.len(), reference.len(), "output lengths differ");
    ours.iter()
        .zip(reference)
        .map(|(&a, &b)| f64::from(a.abs_diff(b)))
}

/// Runs every case whose op `select` accepts through `run` and compares bytes.
fn check_u8_op(select: impl Fn(&Op) -> bool, mut run: impl FnMut(&Op, &Image) -> Image) -> Errors {
    let fixture = fixture();
    let mut errors = Errors::default();
    for (i, case) in fixture
        .cases
        .iter()
        .enumerate()
        .filter(|(_, c)| select(&c.op))
    {
        let ours = run(&case.op, &fixture.inputs[case.input]);
        let reference = fixture.reference_bytes(i);
        errors.add(i, byte_differences(&ours.data, &reference));
    }
    errors
}

/// Applies an in-place op to a copy of the input.
fn in_place(image: &Image, op: impl FnOnce(RgbMut<'_>)) -> Image {
    let mut out = image.clone();
    op(RgbMut {
        width: out.width,
        height: out.height,
        data: &mut out.data,
    });
    out
}

#[test]
fn resized_crop_matches_pillow() {
    let mut resizer = CropResizer::new();
    let errors = check_u8_op(
        |op| matches!(op, Op::ResizedCrop { .. }),
        |op, src| {
            let Op::ResizedCrop {
                crop,
                width,
                height,
            } = *op
            else {
                unreachable!()
            };
            let mut out = Image {
                width,
                height,
                data: vec![0; (width * height * 3) as usize],
            };
            let dst = RgbMut {
                width,
                height,
                data: &mut out.data,
            };
            resizer.resized_crop(src.view(), crop, dst);
            out
        },
    );
    errors.assert_within("resized_crop", 0.0, 0.0);
}

/// Not an assertion about our code: how far `fast_image_resize` is from Pillow on the same
/// cases, with its crop option and on a view of the crop, printed for the documentation.
#[test]
fn fast_image_resize_distance_from_pillow() {
    let resized = |op: &Op| match *op {
        Op::ResizedCrop {
            crop,
            width,
            height,
        } => (crop, width, height),
        _ => unreachable!(),
    };
    let is_resize = |op: &Op| matches!(op, Op::ResizedCrop { .. });
    let with_crop_option = check_u8_op(is_resize, |op, src| {
        let (crop, width, height) = resized(op);
        fir_resize(src, Some(crop), width, height)
    });
    let on_cropped_view = check_u8_op(is_resize, |op, src| {
        let (crop, width, height) = resized(op);
        fir_resize_cropped_view(src, crop, width, height)
    });
    with_crop_option.report("fir crop option (info)");
    on_cropped_view.report("fir cropped view (info)");
}

#[test]
fn flip_matches_pillow() {
    check_u8_op(
        |op| *op == Op::Flip,
        |_, src| in_place(src, ops::flip_horizontal),
    )
    .assert_within("flip", 0.0, 0.0);
}

#[test]
fn brightness_matches_pillow() {
    check_u8_op(
        |op| matches!(op, Op::Brightness(_)),
        |op, src| {
            let Op::Brightness(f) = *op else {
                unreachable!()
            };
            in_place(src, |img| color::adjust_brightness(img, f))
        },
    )
    .assert_within("brightness", 0.0, 0.0);
}

#[test]
fn contrast_matches_pillow() {
    check_u8_op(
        |op| matches!(op, Op::Contrast(_)),
        |op, src| {
            let Op::Contrast(f) = *op else { unreachable!() };
            in_place(src, |img| color::adjust_contrast(img, f))
        },
    )
    .assert_within("contrast", 0.0, 0.0);
}

#[test]
fn saturation_matches_pillow() {
    check_u8_op(
        |op| matches!(op, Op::Saturation(_)),
        |op, src| {
            let Op::Saturation(f) = *op else {
                unreachable!()
            };
            in_place(src, |img| color::adjust_saturation(img, f))
        },
    )
    .assert_within("saturation", 0.0, 0.0);
}

#[test]
fn hue_matches_torchvision() {
    check_u8_op(
        |op| matches!(op, Op::Hue(_)),
        |op, src| {
            let Op::Hue(f) = *op else { unreachable!() };
            in_place(src, |img| color::adjust_hue(img, f))
        },
    )
    .assert_within("hue", 0.0, 0.0);
}

#[test]
fn grayscale_matches_torchvision() {
    check_u8_op(
        |op| *op == Op::Grayscale,
        |_, src| in_place(src, color::to_grayscale),
    )
    .assert_within("grayscale", 0.0, 0.0);
}

#[test]
fn gaussian_blur_matches_pillow() {
    let mut blur = GaussianBlur::new();
    check_u8_op(
        |op| matches!(op, Op::Blur(_)),
        |op, src| {
            let Op::Blur(radius) = *op else {
                unreachable!()
            };
            in_place(src, |img| blur.apply(img, radius))
        },
    )
    .assert_within("gaussian_blur", 0.0, 0.0);
}

#[test]
fn to_tensor_normalize_matches_torchvision() {
    let fixture = fixture();
    let mut errors = Errors::default();
    for (i, case) in fixture.cases.iter().enumerate() {
        let Op::ToTensorNormalize { mean, std } = case.op else {
            continue;
        };
        let input = &fixture.inputs[case.input];
        let mut ours = vec![0.0f32; input.data.len()];
        pack::pack_f32_chw(input.view(), mean, std, &mut ours);
        let reference: Vec<f32> = fixture
            .reference_bytes(i)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(ours.len(), reference.len());
        errors.add(
            i,
            ours.iter()
                .zip(&reference)
                .map(|(&a, &b)| f64::from((a - b).abs())),
        );

        let mut bytes = vec![0u8; input.data.len()];
        pack::pack_u8_hwc(input.view(), &mut bytes);
        assert_eq!(bytes, input.data);
    }
    errors.assert_within("to_tensor_normalize", 0.0, 0.0);
}

/// Time per operation on views of a real photo, for the documentation; not an assertion
/// (timings are never asserted). Run it optimized:
/// `cargo test --release -p augment --test reference -- --ignored --nocapture timing`.
#[test]
#[ignore = "timing, run on demand with --release"]
fn timing_per_op() {
    let photo = load_photo(&photo_paths()[0]);
    let (w, h) = (photo.width, photo.height);
    let mut rng = Rng(0x7157_0bc6_6a16_0002);
    eprintln!("source {w}x{h}; median of 15 rounds, each the mean of its iterations");
    let mut resizer = CropResizer::new();
    let mut blur = GaussianBlur::new();
    for size in [224u32, 96] {
        let iterations = if size == 224 { 40 } else { 200 };
        // Crops as RandomResizedCrop draws them for this size in SwAV's recipe.
        let scale = if size == 224 {
            (0.14, 1.0)
        } else {
            (0.05, 0.14)
        };
        let crops: Vec<CropBox> = (0..iterations)
            .map(|_| random_crop(&mut rng, &photo, scale))
            .collect();
        let mut view = Image {
            width: size,
            height: size,
            data: vec![0; (size * size * 3) as usize],
        };
        let mut floats = vec![0f32; view.data.len()];
        let mut bytes = vec![0u8; view.data.len()];
        let mut timings: Vec<(String, f64)> = Vec::new();
        let mut time = |name: &str, run: &mut dyn FnMut(usize)| {
            let mut rounds: Vec<f64> = (0..15)
                .map(|_| {
                    let start = std::time::Instant::now();
                    for i in 0..iterations {
                        run(i);
                    }
                    start.elapsed().as_secs_f64() * 1e6 / iterations as f64
                })
                .collect();
            rounds.sort_by(f64::total_cmp);
            timings.push((name.to_string(), rounds[rounds.len() / 2]));
        };
        time("resized_crop", &mut |i| {
            resizer.resized_crop(photo.view(), crops[i], square(&mut view.data, size))
        });
        time("resized_crop (fast_image_resize)", &mut |i| {
            std::hint::black_box(fir_resize(&photo, Some(crops[i]), size, size));
        });
        resizer.resized_crop(photo.view(), crops[0], square(&mut view.data, size));
        let original = view.data.clone();
        let mut in_place = |name: &str, op: &mut dyn FnMut(RgbMut<'_>)| {
            time(name, &mut |_| {
                view.data.copy_from_slice(&original);
                op(square(&mut view.data, size));
            });
        };
        in_place("copy (included in each below)", &mut |_| {});
        in_place("flip", &mut |img| ops::flip_horizontal(img));
        in_place("brightness 1.5", &mut |img| {
            color::adjust_brightness(img, 1.5)
        });
        in_place("contrast 0.7", &mut |img| color::adjust_contrast(img, 0.7));
        in_place("saturation 1.5", &mut |img| {
            color::adjust_saturation(img, 1.5)
        });
        in_place("hue 0.1", &mut |img| color::adjust_hue(img, 0.1));
        in_place("grayscale", &mut |img| color::to_grayscale(img));
        in_place("gaussian blur 1.0", &mut |img| blur.apply(img, 1.0));
        in_place("gaussian blur 2.0", &mut |img| blur.apply(img, 2.0));
        let finished = Image {
            width: size,
            height: size,
            data: original.clone(),
        };
        time("pack f32 (normalize)", &mut |_| {
            pack::pack_f32_chw(
                finished.view(),
                NORMALIZATIONS[0].0,
                NORMALIZATIONS[0].1,
                &mut floats,
            )
        });
        time("pack u8", &mut |_| {
            pack::pack_u8_hwc(finished.view(), &mut bytes)
        });
        for (name, micros) in timings {
            eprintln!("{size:>3}x{size:<3} {name:<34} {micros:>8.1} us");
        }
    }
}

fn square(data: &mut [u8], size: u32) -> RgbMut<'_> {
    RgbMut {
        width: size,
        height: size,
        data,
    }
}
