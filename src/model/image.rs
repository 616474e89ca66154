//! Image preprocessing: HF `CLIPImageProcessor` exactly as LLaVA ran it, on PIL.
//!
//! LLaVA opens an image with `Image.open(path).convert("RGB")`, optionally pastes it on a square
//! canvas (`expand2square` in LLaVA's `mm_utils`), then calls the processor, which (PIL backend,
//! `CLIPImageProcessorPil` in transformers 5) does:
//! 1. resize with Pillow's BICUBIC so the shortest edge is `shortest_edge`
//!    (`get_resize_output_image_size(default_to_square=False)`: the long edge is truncated by `int()`),
//! 2. centre crop to `crop_height x crop_width`, zero-padding where the image is smaller,
//! 3. rescale: `(u8 as f64 * rescale_factor) as f32`,
//! 4. normalise in f32: `(x - mean) / std` with mean and std rounded to f32,
//!
//! and returns channels-first `[3, H, W]` f32. Every step here reproduces those semantics so the
//! output matches transformers bit for bit (checked by `tests/image_preprocess.rs`); the one part
//! with real arithmetic, Pillow's fixed-point bicubic resampler, is the section marked "Resampler".
//!
//! Reference versions: Pillow 13.0.0, transformers 5.23.0. Things to know:
//! - RGBA is converted the LLaVA way (alpha dropped). transformers 5 alone, handed an RGBA image,
//!   would composite it onto white first; LLaVA always converts to RGB before the processor.
//! - Pillow 13 runs the vertical resampling pass first for images more than twice as tall as
//!   wide (see `resample`); older Pillow always went horizontal first, which rounds differently.
//! - PNG and JPEG decoding are exact: JPEG goes through `super::jpeg`, a decoder written to match
//!   the libjpeg-turbo 3.2.0 in Pillow's wheels (see that module for its scope).
//! - The whole path, from the file to the f32 tensor, stays within [`IMAGE_MEMORY_BUDGET`]: each
//!   stage computes the bytes it will hold at once before it allocates them and refuses with an
//!   error naming the sizes when they exceed the budget.

use std::borrow::Cow;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub use image::RgbImage;

/// OpenAI CLIP's normalisation mean (`OPENAI_CLIP_MEAN` in transformers).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's normalisation std (`OPENAI_CLIP_STD` in transformers).
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

// ------------------------------------------------------------------------------------------------
// Memory budget

/// Bytes the image path may hold live at once for one image: [`load_image`] (the file, the
/// decoded pixels and their RGB conversion, or the JPEG decoder's whole working set) and then
/// [`ImageProcessorConfig::preprocess`] (the input image, the padded square, the resampler's
/// coefficients and passes, the crop and the f32 output).
///
/// 1 GiB. A 4000x3000 photo needs about 0.1 GiB at its largest stage (a progressive JPEG's
/// coefficients, or the 4000x4000 padded square); a 100-megapixel baseline or 4:2:0 progressive
/// JPEG about 0.5 to 0.75 GiB, so every real photo fits. What a file of a few hundred hostile
/// bytes can make the path allocate is capped at this, whatever its declared size.
pub const IMAGE_MEMORY_BUDGET: usize = 1 << 30;

/// Allowance in every stage's count for the small fixed-size state that goes with it (Huffman
/// and colour tables, inflate state, tensor shapes, bookkeeping).
pub(crate) const STATE_BYTES: u128 = 256 << 10;

/// The product of `factors` bytes, in `u128` and saturating, so that no declared size can
/// overflow it (a saturated count is always over any budget).
pub(crate) fn bytes(factors: &[usize]) -> u128 {
    factors
        .iter()
        .fold(1u128, |acc, &f| acc.saturating_mul(f as u128))
}

/// Saturating sum of byte counts.
pub(crate) fn total(parts: impl IntoIterator<Item = u128>) -> u128 {
    parts.into_iter().fold(0, u128::saturating_add)
}

/// Refuses a stage, described by `what`, that would hold `need` bytes at once when that is more
/// than `budget`.
pub(crate) fn check_budget(
    what: impl FnOnce() -> String,
    need: u128,
    budget: usize,
) -> std::result::Result<(), String> {
    if need <= budget as u128 {
        return Ok(());
    }
    Err(format!(
        "{}: {} held at once, which exceeds the {} image memory budget",
        what(),
        human_bytes(need),
        human_bytes(budget as u128)
    ))
}

/// `1 GiB`, `31.5 GiB`, `370 B`.
fn human_bytes(n: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// An error of a preprocessing stage; the image has no path here (callers that know it, like
/// the engine, put it in).
fn preprocess_error(msg: String) -> Error {
    Error::Image {
        path: PathBuf::from("<image>"),
        msg,
    }
}

/// Settings of the CLIP image processor plus LLaVA's pad-to-square option.
///
/// Field names follow HF's `preprocessor_config.json`. `Default` is the processor of
/// `openai/clip-vit-large-patch14-336`, the vision tower of LLaVA-1.5.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Target length of the shorter image edge when resizing (`size: {"shortest_edge": N}`).
    pub shortest_edge: usize,
    /// `(height, width)` to resize to exactly, ignoring the aspect ratio, when the config says
    /// `size: {"height": H, "width": W}` (SigLIP-style processors); overrides `shortest_edge`.
    pub exact_size: Option<(usize, usize)>,
    /// Height of the centre crop.
    pub crop_height: usize,
    /// Width of the centre crop.
    pub crop_width: usize,
    /// Resize before cropping.
    pub do_resize: bool,
    /// Centre-crop (zero-padding where the image is smaller than the crop).
    pub do_center_crop: bool,
    /// Multiply pixel values by `rescale_factor`.
    pub do_rescale: bool,
    /// Usually 1/255.
    pub rescale_factor: f64,
    /// Normalise with `image_mean` / `image_std`.
    pub do_normalize: bool,
    /// Per-channel mean (RGB), on the rescaled scale.
    pub image_mean: [f64; 3],
    /// Per-channel std (RGB), on the rescaled scale.
    pub image_std: [f64; 3],
    /// LLaVA's `image_aspect_ratio == "pad"`: paste the image centred on a square canvas filled
    /// with `int(mean * 255)` before the processor runs.
    pub pad_to_square: bool,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            shortest_edge: 336,
            exact_size: None,
            crop_height: 336,
            crop_width: 336,
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            pad_to_square: false,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads an HF `preprocessor_config.json`.
    ///
    /// `size` may be an integer (shortest edge), `{"shortest_edge": N}` or `{"height", "width"}`;
    /// `crop_size` an integer (square) or `{"height", "width"}`. Keys that are absent take
    /// transformers' `CLIPImageProcessor` class defaults (note: 224, not this struct's 336).
    /// `resample` must be 3 (bicubic), the only filter implemented. `pad_to_square` is not part
    /// of this file (it is LLaVA's `image_aspect_ratio`) and is left `false`.
    pub fn from_preprocessor_config(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// The image processor of an HF model directory: `preprocessor_config.json` (transformers 4.x),
    /// else the `image_processor` object of `processor_config.json` (5.x), else CLIP's settings at
    /// the vision tower's `image_size`.
    ///
    /// A processor whose output size is fixed (a centre crop, or an exact resize) must give the
    /// `image_size x image_size` the vision tower takes: a mismatch is an [`Error::Config`] at
    /// load, not a shape error at the first image.
    pub fn from_model_dir(dir: &Path, image_size: usize) -> Result<Self> {
        let read = |path: PathBuf, cfg: Self| -> Result<Self> {
            let out = if cfg.do_center_crop {
                Some((cfg.crop_height, cfg.crop_width, "crop_size"))
            } else {
                cfg.exact_size
                    .filter(|_| cfg.do_resize)
                    .map(|(h, w)| (h, w, "size"))
            };
            match out {
                Some((h, w, key)) if (h, w) != (image_size, image_size) => Err(Error::Config {
                    path,
                    msg: format!(
                        "`{key}` gives {h}x{w} images but the vision tower takes \
                         {image_size}x{image_size} (config.json `vision_config.image_size`)"
                    ),
                }),
                _ => Ok(cfg),
            }
        };
        let pre = dir.join("preprocessor_config.json");
        if pre.exists() {
            let cfg = Self::from_preprocessor_config(&pre)?;
            return read(pre, cfg);
        }
        let proc = dir.join("processor_config.json");
        if proc.exists() {
            let text = std::fs::read_to_string(&proc).map_err(|e| Error::io(&proc, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: proc.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
            if let Some(ip) = v.get("image_processor") {
                let cfg = Self::from_json(&ip.to_string(), &proc)?;
                return read(proc, cfg);
            }
        }
        Ok(ImageProcessorConfig {
            shortest_edge: image_size,
            crop_height: image_size,
            crop_width: image_size,
            ..Default::default()
        })
    }

    /// Parses the text of a `preprocessor_config.json`; `path` only names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| err("top level is not a JSON object".into()))?;
        let r = JsonReader { o, err: &err };

        let (shortest_edge, exact_size) = match o.get("size") {
            None | Some(Value::Null) => (224, None),
            Some(v) => match r.size("size", v, true)? {
                Size::Shortest(n) => (n, None),
                Size::Exact(h, w) => (h.min(w), Some((h, w))),
            },
        };
        let (crop_height, crop_width) = match o.get("crop_size") {
            None | Some(Value::Null) => (224, 224),
            Some(v) => match r.size("crop_size", v, false)? {
                Size::Exact(h, w) => (h, w),
                Size::Shortest(n) => (n, n), // not returned when shortest_ok is false
            },
        };
        if let Some(v) = o
            .get("resample")
            .filter(|v| !v.is_null() && v.as_u64() != Some(3))
        {
            return Err(err(format!(
                "`resample` is {v}; only 3 (PIL bicubic) is implemented"
            )));
        }
        let cfg = ImageProcessorConfig {
            shortest_edge,
            exact_size,
            crop_height,
            crop_width,
            do_resize: r.bool("do_resize", true)?,
            do_center_crop: r.bool("do_center_crop", true)?,
            do_rescale: r.bool("do_rescale", true)?,
            rescale_factor: r.number("rescale_factor", 1.0 / 255.0)?,
            do_normalize: r.bool("do_normalize", true)?,
            image_mean: r.triple("image_mean", CLIP_MEAN)?,
            image_std: r.triple("image_std", CLIP_STD)?,
            pad_to_square: false,
        };
        cfg.check(IMAGE_MEMORY_BUDGET).map_err(|e| match e {
            Error::Arg { name, msg } => err(format!("`{name}` {msg}")),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Rejects settings that cannot produce an image within `budget` bytes (zero sizes, a
    /// resize, crop or output that cannot fit whatever the image, a normalisation that gives
    /// non-finite values).
    fn check(&self, budget: usize) -> Result<()> {
        let sizes = [
            (
                "shortest_edge",
                self.do_resize && self.exact_size.is_none(),
                self.shortest_edge,
            ),
            (
                "size.height",
                self.do_resize,
                self.exact_size.map_or(1, |s| s.0),
            ),
            (
                "size.width",
                self.do_resize,
                self.exact_size.map_or(1, |s| s.1),
            ),
            ("crop_height", self.do_center_crop, self.crop_height),
            ("crop_width", self.do_center_crop, self.crop_width),
        ];
        for (name, used, value) in sizes {
            if used && value == 0 {
                return Err(Error::arg(name, "must be at least 1"));
            }
            if used && u32::try_from(value).is_err() {
                return Err(Error::arg(
                    name,
                    format!("is {value}, more than an image edge can be ({})", u32::MAX),
                ));
            }
        }
        // The smallest output each size setting can give, whatever the image: the resize is at
        // least `shortest_edge` square; without a crop the f32 tensor is that size too.
        let f32_out = if self.do_center_crop { 0 } else { 4 * 3 };
        let resize = match self.exact_size {
            _ if !self.do_resize => None,
            Some((h, w)) => Some(("size", h, w)),
            None => Some(("shortest_edge", self.shortest_edge, self.shortest_edge)),
        };
        let crop =
            Some(("crop_size", self.crop_height, self.crop_width)).filter(|_| self.do_center_crop);
        for (name, h, w, per_px) in [
            resize.map(|(n, h, w)| (n, h, w, 3 + f32_out)),
            crop.map(|(n, h, w)| (n, h, w, 3 + 4 * 3)),
        ]
        .into_iter()
        .flatten()
        {
            let what = || format!("of {h}x{w} pixels (u8 image and f32 output)");
            check_budget(what, bytes(&[h, w, per_px]), budget).map_err(|m| Error::arg(name, m))?;
        }
        self.check_normalisation()
    }

    /// Every output value must be finite: checked at the ends of the u8 range (the mapping is
    /// monotone in the value), after the settings themselves.
    fn check_normalisation(&self) -> Result<()> {
        if self.do_rescale && !((255.0 * self.rescale_factor) as f32).is_finite() {
            return Err(Error::arg("rescale_factor", "must be a finite f32 number"));
        }
        if self.do_normalize {
            if let Some(m) = self.image_mean.iter().find(|m| !(**m as f32).is_finite()) {
                return Err(Error::arg(
                    "image_mean",
                    format!("must be finite f32 numbers, got {m}"),
                ));
            }
            if let Some(s) = self.image_std.iter().find(|s| !(**s as f32).is_normal()) {
                return Err(Error::arg(
                    "image_std",
                    format!("must be nonzero finite f32 numbers, got {s}"),
                ));
            }
        }
        let value = self.normaliser();
        for c in 0..3 {
            for v in [0, 255] {
                let x = value(v, c);
                if !x.is_finite() {
                    return Err(Error::arg(
                        "image_std",
                        format!("is so small that channel {c} value {v} normalises to {x}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// One output value from a u8 sample of channel `c`: transformers' rescale upcasts to f64,
    /// multiplies, then casts to f32; normalize then works in f32 (uint8 input is cast to f32
    /// first).
    fn normaliser(&self) -> impl Fn(u8, usize) -> f32 + use<> {
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let (rescale, factor, normalize) =
            (self.do_rescale, self.rescale_factor, self.do_normalize);
        move |v, c| {
            let x = if rescale {
                (v as f64 * factor) as f32
            } else {
                v as f32
            };
            if normalize { (x - mean[c]) / std[c] } else { x }
        }
    }

    /// `(width, height)` the resize step produces for an image of `width x height`.
    ///
    /// For `shortest_edge` this is transformers' `get_resize_output_image_size` with
    /// `default_to_square=False`: short edge = `shortest_edge`, long edge =
    /// `int(shortest_edge * long / short)` (truncated, computed in f64 like Python). An edge
    /// beyond `u32::MAX` saturates there; [`preprocess`](Self::preprocess) refuses such sizes
    /// (and any that do not fit its memory budget) before resizing.
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        let (w, h) = self.resize_target(width, height);
        let edge = |e: u64| u32::try_from(e).unwrap_or(u32::MAX);
        (edge(w), edge(h))
    }

    /// [`resized_size`](Self::resized_size) without the saturation at `u32::MAX`.
    fn resize_target(&self, width: u32, height: u32) -> (u64, u64) {
        if let Some((h, w)) = self.exact_size {
            return (w as u64, h as u64);
        }
        let (short, long) = if width <= height {
            (width, height)
        } else {
            (height, width)
        };
        let s = self.shortest_edge as u64;
        let new_long = ((s as u128 * long as u128) as f64 / short as f64) as u64;
        if width <= height {
            (s, new_long)
        } else {
            (new_long, s)
        }
    }

    /// LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// Runs the whole pipeline on an RGB image: optional pad-to-square, resize, centre crop,
    /// rescale, normalise. Returns an f32 tensor `[3, H, W]`: `[3, crop_height, crop_width]`
    /// when `do_center_crop`, otherwise the resized size.
    ///
    /// Holds at most [`IMAGE_MEMORY_BUDGET`] bytes at once, `img` included; a larger need (an
    /// extreme aspect ratio, a huge target size) is an [`Error::Image`] naming the stage.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Tensor> {
        self.preprocess_with_budget(img, IMAGE_MEMORY_BUDGET)
    }

    /// Loads an image file ([`load_image`]) and preprocesses it; every error, the memory budget's
    /// included, names `path`.
    pub fn preprocess_file(&self, path: &Path) -> Result<Tensor> {
        let img = load_image(path)?;
        self.preprocess(&img).map_err(|e| match e {
            Error::Image { msg, .. } => Error::Image {
                path: path.to_path_buf(),
                msg,
            },
            e => e,
        })
    }

    /// [`preprocess`](Self::preprocess) within `budget` bytes instead of the default: every
    /// stage's size is planned and checked before the first allocation.
    pub fn preprocess_with_budget(&self, img: &RgbImage, budget: usize) -> Result<Tensor> {
        self.check(budget)?;
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::arg("image", "is empty (0 pixels)"));
        }
        let plan = self.plan(img.width(), img.height(), budget)?;
        let mut img = Cow::Borrowed(img);
        if plan.pad {
            img = Cow::Owned(expand_to_square(&img, self.pad_color()));
        }
        match (plan.resize, self.do_center_crop) {
            (Some(size), true) => img = Cow::Owned(resize_and_crop(&img, size, plan.crop)),
            (Some((w, h)), false) => img = Cow::Owned(resize_bicubic(&img, w, h)),
            (None, true) => img = Cow::Owned(center_crop(&img, plan.crop.0, plan.crop.1)),
            (None, false) => {}
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let value = self.normaliser();
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * h * w + i] = value(px.0[c], c);
            }
        }
        Tensor::from_f32(&[3, h, w], out)
    }

    /// The sizes `preprocess` produces from a `width x height` image, each stage checked
    /// against `budget` with everything it holds at once: the caller's image, the intermediate
    /// image this function keeps, and what the stage allocates.
    fn plan(&self, width: u32, height: u32, budget: usize) -> Result<Plan> {
        let fits = |what: &dyn Fn() -> String, need: u128| {
            check_budget(what, need, budget).map_err(preprocess_error)
        };
        let input = bytes(&[width as usize, height as usize, 3]);
        // the current image size and the bytes of the copy `preprocess` holds (0: the input)
        let (mut w, mut h, mut held) = (width as u64, height as u64, 0);
        let pad = self.pad_to_square && width != height;
        if pad {
            let side = w.max(h);
            held = bytes(&[side as usize, side as usize, 3]);
            fits(
                &|| format!("{width}x{height} pads to a {side}x{side} square"),
                total([input, held, STATE_BYTES]),
            )?;
            (w, h) = (side, side);
        }
        let mut resize = None;
        let crop = (self.crop_width as u32, self.crop_height as u32);
        if self.do_resize {
            let (rw, rh) = self.resize_target(w as u32, h as u32);
            let what = || format!("{w}x{h} resizes to {rw}x{rh}");
            let (Ok(rw32), Ok(rh32)) = (u32::try_from(rw), u32::try_from(rh)) else {
                return Err(preprocess_error(format!(
                    "{}: an edge is longer than {}",
                    what(),
                    u32::MAX
                )));
            };
            // Followed by a crop, only the window the crop keeps is computed.
            let (win_w, win_h) = if self.do_center_crop {
                (crop_axis(rw32, crop.0).2, crop_axis(rh32, crop.1).2)
            } else {
                (rw32, rh32)
            };
            let (win_w, win_h) = (win_w as u64, win_h as u64);
            let out = bytes(&[win_w as usize, win_h as usize, 3]);
            let need = total([
                input,
                held,
                resample_bytes(w, h, rw, rh, win_w, win_h),
                STATE_BYTES,
            ]);
            fits(&what, need)?;
            resize = Some((rw32, rh32));
            (w, h, held) = (rw, rh, out);
        }
        if self.do_center_crop {
            let cropped = bytes(&[crop.0 as usize, crop.1 as usize, 3]);
            fits(
                &|| format!("{w}x{h} crops to {}x{}", crop.0, crop.1),
                total([input, held, cropped, STATE_BYTES]),
            )?;
            (w, h, held) = (crop.0 as u64, crop.1 as u64, cropped);
        }
        let tensor = bytes(&[3, w as usize, h as usize, size_of::<f32>()]);
        fits(
            &|| format!("{w}x{h} normalises to a [3, {h}, {w}] f32 tensor"),
            total([input, held, tensor, STATE_BYTES]),
        )?;
        Ok(Plan { pad, resize, crop })
    }
}

/// What [`ImageProcessorConfig::plan`] decided: pad or not, the resize target, the crop size.
struct Plan {
    pad: bool,
    resize: Option<(u32, u32)>,
    crop: (u32, u32),
}

enum Size {
    Shortest(usize),
    Exact(usize, usize),
}

struct JsonReader<'a, F: Fn(String) -> Error> {
    o: &'a Map<String, Value>,
    err: &'a F,
}

impl<F: Fn(String) -> Error> JsonReader<'_, F> {
    /// `size` / `crop_size`: an integer, `{"shortest_edge"}` (only when `shortest_ok`) or
    /// `{"height", "width"}`. An integer is a shortest edge for `size` and a square for
    /// `crop_size`, as transformers' `get_size_dict` decides for CLIP.
    fn size(&self, key: &str, v: &Value, shortest_ok: bool) -> Result<Size> {
        let int = |k: &str, v: &Value| {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| (self.err)(format!("`{k}` must be a non-negative integer, got {v}")))
        };
        if v.is_number() {
            let n = int(key, v)?;
            return Ok(if shortest_ok {
                Size::Shortest(n)
            } else {
                Size::Exact(n, n)
            });
        }
        let allowed = if shortest_ok {
            "an integer, {\"shortest_edge\": N} or {\"height\": H, \"width\": W}"
        } else {
            "an integer or {\"height\": H, \"width\": W}"
        };
        let Some(m) = v.as_object() else {
            return Err((self.err)(format!("`{key}` must be {allowed}, got {v}")));
        };
        let get = |k: &str| m.get(k).filter(|v| !v.is_null());
        match (
            get("shortest_edge"),
            get("height"),
            get("width"),
            get("longest_edge"),
        ) {
            (Some(s), None, None, None) if shortest_ok => {
                Ok(Size::Shortest(int(&format!("{key}.shortest_edge"), s)?))
            }
            (None, Some(h), Some(w), None) => Ok(Size::Exact(
                int(&format!("{key}.height"), h)?,
                int(&format!("{key}.width"), w)?,
            )),
            _ => Err((self.err)(format!(
                "`{key}` must be {allowed} (other combinations are not supported), got {v}"
            ))),
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.o.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| (self.err)(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    fn number(&self, key: &str, default: f64) -> Result<f64> {
        match self.o.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| (self.err)(format!("`{key}` must be a number, got {v}"))),
        }
    }

    /// Three per-channel numbers; a single number applies to all channels (as in transformers).
    fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
        let bad = |v: &Value| (self.err)(format!("`{key}` must be 3 numbers (RGB), got {v}"));
        match self.o.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) if v.is_number() => v.as_f64().map(|x| [x; 3]).ok_or_else(|| bad(v)),
            Some(v) => {
                let a = v
                    .as_array()
                    .filter(|a| a.len() == 3)
                    .ok_or_else(|| bad(v))?;
                let mut out = [0.0; 3];
                for (o, x) in out.iter_mut().zip(a) {
                    *o = x.as_f64().ok_or_else(|| bad(v))?;
                }
                Ok(out)
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Loading: decode, then convert to RGB with PIL's `convert("RGB")` semantics.

/// Loads a PNG or JPEG file (format sniffed from the content, not the extension) as RGB, the way
/// `PIL.Image.open(path).convert("RGB")` does. A missing file is an [`Error::Io`]; an unreadable,
/// truncated or non-image file an [`Error::Image`]; both name the path.
///
/// Holds at most [`IMAGE_MEMORY_BUDGET`] bytes at once (the file included): a file or an image
/// that needs more is refused before it is read or decoded.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    use std::io::Read;
    let path = path.as_ref();
    let budget = IMAGE_MEMORY_BUDGET;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    check_budget(|| format!("the file is {len} bytes"), len as u128, budget).map_err(|msg| {
        Error::Image {
            path: path.to_path_buf(),
            msg,
        }
    })?;
    // The signature first: a device or pipe (`/dev/zero` has length 0 and never ends) that is
    // not an image is refused after 8 bytes instead of being read up to the budget.
    let mut file = file.take(budget as u64 + 1);
    let mut bytes = Vec::with_capacity((len as usize).clamp(8, budget));
    (&mut file)
        .take(8)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
    let jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    if !png && !jpeg {
        return Err(Error::Image {
            path: path.to_path_buf(),
            msg: "not a PNG or JPEG file".into(),
        });
    }
    // `len` fits the budget, so it fits a usize; a stream longer than the budget is refused.
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    check_budget(|| "the stream".into(), bytes.len() as u128, budget).map_err(|msg| {
        Error::Image {
            path: path.to_path_buf(),
            msg,
        }
    })?;
    decode(&bytes, path, budget)
}

/// Decodes an in-memory PNG or JPEG as RGB (see [`load_image`]); errors name `<memory>`.
pub fn load_image_from_memory(bytes: &[u8]) -> Result<RgbImage> {
    load_image_from_memory_with_budget(bytes, IMAGE_MEMORY_BUDGET)
}

/// [`load_image_from_memory`] holding at most `budget` bytes at once, `bytes` included, instead
/// of [`IMAGE_MEMORY_BUDGET`].
pub fn load_image_from_memory_with_budget(bytes: &[u8], budget: usize) -> Result<RgbImage> {
    decode(bytes, Path::new("<memory>"), budget)
}

fn decode(bytes: &[u8], path: &Path, budget: usize) -> Result<RgbImage> {
    let err = |msg: String| Error::Image {
        path: PathBuf::from(path),
        msg,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png) => decode_png(reader, bytes, budget).map_err(err),
        Some(ImageFormat::Jpeg) => decode_jpeg(bytes, budget).map_err(err),
        _ => Err(err("not a PNG or JPEG file".into())),
    }
}

/// PNG through the image crate, within `budget`. The need is computed from the header chunk
/// (IHDR, first in every PNG) before the decoder reads anything else, and what is left of the
/// budget bounds the decoder's allocations for the rest (text, ICC profile and other chunks).
fn decode_png(
    mut reader: ImageReader<Cursor<&[u8]>>,
    file: &[u8],
    budget: usize,
) -> std::result::Result<RgbImage, String> {
    let (w, h, colour, depth) = png_header(file)?;
    // samples as the image crate expands them: below 8 bits to 8, palette to RGB or (with a
    // tRNS chunk, which comes later) RGBA, so counted as RGBA
    let (channels, kind) = match colour {
        0 => (1, "grey"),
        2 => (3, "RGB"),
        3 => (4, "palette"),
        4 => (2, "grey+alpha"),
        6 => (4, "RGBA"),
        _ => return Err(format!("cannot decode PNG: invalid colour type {colour}")),
    };
    let sample = if depth == 16 { 2 } else { 1 };
    let (w, h) = (w as usize, h as usize);
    let row = w.saturating_mul(channels * sample).saturating_add(1);
    let decoded = bytes(&[w, h, channels, sample]);
    // `into_rgb8` keeps an 8-bit RGB buffer, anything else is converted into a new one
    let rgb = if colour == 2 && depth == 8 {
        0
    } else {
        bytes(&[w, h, 3])
    };
    // the decoder's unfiltering buffer (a few rows, at least 128 KiB) and one output row
    let rows = total([bytes(&[row, PNG_BUFFERED_ROWS]), 128 << 10]);
    let need = total([bytes(&[file.len()]), STATE_BYTES, rows, decoded, rgb]);
    check_budget(
        || {
            format!(
                "PNG {w}x{h} ({depth}-bit {kind}) decodes to {} and converts to {} of RGB",
                human_bytes(decoded),
                human_bytes(rgb)
            )
        },
        need,
        budget,
    )?;
    // The decoder's own limit covers the output row it reserves and the chunks it keeps. It
    // gets half of what the pixels leave: an inflated chunk grows its Vec by amortized
    // doubling, so up to twice what the limit lets it keep may be reserved.
    let mut limits = Limits::default();
    limits.max_alloc = Some(((budget as u128 - need) / 2 + row as u128) as u64);
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode PNG: {e}"))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode PNG: {e}"))?;
    Ok(to_rgb_like_pil(img))
}

/// Rows of raw data the PNG decoder buffers at most (its unfiltering buffer keeps about four
/// before it shifts them out, plus the rows being filtered and the output row).
const PNG_BUFFERED_ROWS: usize = 8;

/// Width, height, colour type and bit depth from a PNG's IHDR chunk.
fn png_header(bytes: &[u8]) -> std::result::Result<(u32, u32, u8, u8), String> {
    match bytes.get(8..26) {
        Some(ihdr) if &ihdr[4..8] == b"IHDR" => {
            let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            Ok((be(&ihdr[8..12]), be(&ihdr[12..16]), ihdr[17], ihdr[16]))
        }
        _ => Err("cannot decode PNG: no header (IHDR) chunk".into()),
    }
}

/// JPEG through our own decoder (`super::jpeg`), which reproduces the libjpeg-turbo that PIL
/// uses bit for bit: ISLOW IDCT, fancy upsampling, libjpeg's YCbCr tables, Pillow's CMYK
/// conversion. Its whole working set, `bytes` included, is bounded by `budget`.
fn decode_jpeg(bytes: &[u8], budget: usize) -> std::result::Result<RgbImage, String> {
    let img = super::jpeg::decode(bytes, budget).map_err(|e| format!("cannot decode JPEG: {e}"))?;
    RgbImage::from_raw(img.width, img.height, img.rgb)
        .ok_or_else(|| "JPEG decoder returned a short buffer".into())
}

/// PIL's `convert("RGB")`: alpha is dropped (not composited), grey is replicated. For 16-bit PNGs
/// PIL keeps the high byte of RGB(A) and grey+alpha samples, but opens 16-bit grey as mode
/// `I;16`, whose conversion to RGB clamps the value to 255 instead of scaling it.
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let rgb = |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    match img {
        DynamicImage::ImageLuma16(im) => rgb(&|x, y| [im.get_pixel(x, y).0[0].min(255) as u8; 3]),
        DynamicImage::ImageLumaA16(im) => rgb(&|x, y| [(im.get_pixel(x, y).0[0] >> 8) as u8; 3]),
        DynamicImage::ImageRgb16(im) => rgb(&|x, y| im.get_pixel(x, y).0.map(|v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(im) => rgb(&|x, y| {
            let p = im.get_pixel(x, y).0;
            [p[0], p[1], p[2]].map(|v| (v >> 8) as u8)
        }),
        // 8-bit grey, grey+alpha, RGB and RGBA: image's own conversion replicates grey and drops
        // alpha, exactly like PIL (and keeps an 8-bit RGB buffer as it is).
        other => other.into_rgb8(),
    }
}

// ------------------------------------------------------------------------------------------------
// Geometry: LLaVA's expand2square and transformers' center_crop.

/// LLaVA's `expand2square`: paste the image on a square canvas of side `max(w, h)` filled with
/// `background`, at offset `((side - w) / 2, (side - h) / 2)` (floor division; only one is nonzero).
/// Allocates the `side x side` canvas unchecked; [`ImageProcessorConfig::preprocess`] checks it
/// against the memory budget first.
pub fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(background));
    image::imageops::replace(
        &mut out,
        img,
        ((side - w) / 2) as i64,
        ((side - h) / 2) as i64,
    );
    out
}

/// transformers' `center_crop`: crop `width x height` from the centre, starting at
/// `(size - crop) // 2`; along an edge shorter than the crop, the image is instead placed at
/// `ceil((crop - size) / 2)` on a zero canvas. Allocates the `width x height` output unchecked
/// ([`ImageProcessorConfig::preprocess`] checks it against the memory budget first).
pub fn center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (sx, dx, lx) = crop_axis(img.width(), width);
    let (sy, dy, ly) = crop_axis(img.height(), height);
    let mut out = RgbImage::new(width, height);
    for y in 0..ly {
        for x in 0..lx {
            out.put_pixel(dx + x, dy + y, *img.get_pixel(sx + x, sy + y));
        }
    }
    out
}

/// transformers' centre crop along one axis of `size` cropped to `crop`: (first source index,
/// first destination index, length).
fn crop_axis(size: u32, crop: u32) -> (u32, u32, u32) {
    if size >= crop {
        ((size - crop) / 2, 0, crop)
    } else {
        (0, (crop - size).div_ceil(2), size)
    }
}

// ------------------------------------------------------------------------------------------------
// Resampler: Pillow's `ImagingResample` with the BICUBIC filter on 8-bit images
// (src/libImaging/Resample.c), reproduced bit for bit.
//
// Two separable passes (a pass is skipped when that size is unchanged), each rounded and clamped
// to u8; horizontal first unless the height shrinks by more than twice as much as the width.
// For an axis of `n_in` -> `n_out` samples:
//   scale   = n_in / n_out,  fscale = max(scale, 1)      (downscaling widens the kernel)
//   support = 2 * fscale                                  (bicubic support 2)
//   for output i: center = (i + 0.5) * scale
//     taps j in [xmin, xmax), xmin = max(0, int(center - support + 0.5)),
//                             xmax = min(n_in, int(center + support + 0.5))   (int() truncates)
//     w_j = K((j - center + 0.5) / fscale), then w_j /= sum(w)
//     K(x) = (a+2)|x|^3 - (a+3)|x|^2 + 1 for |x| < 1, a(|x|^3 - 5|x|^2 + 8|x| - 4) for |x| < 2,
//            0 otherwise, with a = -0.5
//   fixed point: k_j = trunc(w_j * 2^22 +/- 0.5) (away from zero), PRECISION_BITS = 32 - 8 - 2
//   out = clamp((2^21 + sum_j k_j * in_j) >> 22, 0, 255)   (arithmetic shift = floor)

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point taps for a range of outputs of one axis: the range's `i`-th output reads inputs
/// `start[i]..start[i] + taps[i].len()`.
struct Coeffs {
    start: Vec<usize>,
    taps: Vec<Vec<i32>>,
}

impl Coeffs {
    fn len(&self) -> usize {
        self.start.len()
    }

    /// The inputs the taps read, `min(start)..max(start + taps)`.
    fn span(&self) -> Range<usize> {
        let lo = self.start.iter().copied().min().unwrap_or(0);
        let hi = (self.start.iter().zip(&self.taps))
            .map(|(s, t)| s + t.len())
            .max()
            .unwrap_or(lo);
        lo..hi
    }

    /// The same taps reading an input that starts at input `first`.
    fn shifted(mut self, first: usize) -> Coeffs {
        for s in &mut self.start {
            *s -= first;
        }
        self
    }
}

/// `(scale, fscale)` of an axis: Pillow takes the box edges as C floats, `(float)n_in - 0.0f`,
/// then widens to double; downscaling widens the kernel by `fscale`.
fn filter_scale(n_in: u64, n_out: u64) -> (f64, f64) {
    let scale = (n_in as f32) as f64 / n_out as f64;
    (scale, scale.max(1.0))
}

/// Bytes [`coeffs`] holds at most for `computed` outputs of an axis: `start` and one tap vector
/// per output, each at most `2 * support + 1` taps (plus one for rounding), and the f64 weights
/// of the output being computed.
fn coeffs_bytes(n_in: u64, n_out: u64, computed: u64) -> u128 {
    let (_, fscale) = filter_scale(n_in, n_out);
    let taps = ((4.0 * fscale) as u128 + 2).min(n_in as u128);
    let per_output =
        (size_of::<usize>() + size_of::<Vec<i32>>()) as u128 + taps * size_of::<i32>() as u128;
    total([
        per_output.saturating_mul(computed as u128),
        taps * size_of::<f64>() as u128,
    ])
}

/// Bytes [`resample_window`] holds at once besides its input, for RGB `w x h` -> `out_w x out_h`
/// of which a `win_w x win_h` window is computed: the larger of its two passes, (coefficients +
/// intermediate) and (intermediate + coefficients + output).
fn resample_bytes(w: u64, h: u64, out_w: u64, out_h: u64, win_w: u64, win_h: u64) -> u128 {
    let rgb = |w: u64, h: u64| bytes(&[w as usize, h as usize, 3]);
    let (tmp, first, second) = if vertical_first(w, h, out_w, out_h) {
        (
            rgb(w, win_h),
            coeffs_bytes(h, out_h, win_h),
            coeffs_bytes(w, out_w, win_w),
        )
    } else {
        (
            rgb(win_w, h),
            coeffs_bytes(w, out_w, win_w),
            coeffs_bytes(h, out_h, win_h),
        )
    };
    total([tmp, first.max(total([second, rgb(win_w, win_h)]))])
}

/// The taps of outputs `outputs` (a sub-range of `0..n_out`) of an `n_in -> n_out` axis; each
/// output's taps depend on its index alone, so a window is exactly that part of the whole.
fn coeffs(n_in: usize, n_out: usize, outputs: Range<usize>) -> Coeffs {
    let (scale, fscale) = filter_scale(n_in as u64, n_out as u64);
    let support = 2.0 * fscale;
    let ss = 1.0 / fscale;
    let mut start = Vec::with_capacity(outputs.len());
    let mut taps = Vec::with_capacity(outputs.len());
    for i in outputs {
        let center = (i as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(n_in as i64);
        let w: Vec<f64> = (xmin..xmax)
            .map(|j| bicubic_kernel((j as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let f = w * (1u32 << PRECISION_BITS) as f64;
                (if w < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
            })
            .collect();
        start.push(xmin as usize);
        taps.push(fixed);
    }
    Coeffs { start, taps }
}

/// One output sample: `clamp((2^21 + sum k_j * s_j) >> 22, 0, 255)` over samples `s_j`.
fn apply(taps: &[i32], samples: impl Iterator<Item = u8>) -> u8 {
    let acc = taps
        .iter()
        .zip(samples)
        .fold(1i64 << (PRECISION_BITS - 1), |acc, (&k, s)| {
            acc + k as i64 * s as i64
        });
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples interleaved `ch`-channel u8 pixels from `w x h` to `out_w x out_h`.
#[cfg(test)]
fn resample(src: &[u8], w: usize, h: usize, ch: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    resample_window(src, (w, h), ch, (out_w, out_h), 0..out_w, 0..out_h)
}

/// The window `xs x ys` of [`resample`]'s `out_w x out_h` output, computing only what it needs:
/// the second pass's outputs in the window, and the first pass's outputs that those read. Every
/// output sample depends only on its own taps and the samples they read, and the pass order is
/// decided by the whole sizes as Pillow does, so the window equals that part of the whole
/// resize bit for bit. (An unchanged axis gets the taps `[0, 1, 0, ..]`, exactly the copy
/// Pillow makes when it skips that pass.)
fn resample_window(
    src: &[u8],
    (w, h): (usize, usize),
    ch: usize,
    (out_w, out_h): (usize, usize),
    xs: Range<usize>,
    ys: Range<usize>,
) -> Vec<u8> {
    let cx = coeffs(w, out_w, xs);
    let cy = coeffs(h, out_h, ys);
    if vertical_first(w as u64, h as u64, out_w as u64, out_h as u64) {
        let cols = cx.span();
        let tmp = resample_vertical(src, w, ch, cols.clone(), &cy);
        resample_horizontal(&tmp, cols.len(), 0..cy.len(), ch, &cx.shifted(cols.start))
    } else {
        let rows = cy.span();
        let tmp = resample_horizontal(src, w, rows.clone(), ch, &cx);
        resample_vertical(&tmp, cx.len(), ch, 0..cx.len(), &cy.shifted(rows.start))
    }
}

/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width (fewer rows for the horizontal pass); otherwise horizontal first.
/// (Older Pillow always went horizontal first; the rounding between passes makes the order
/// visible in the output.)
fn vertical_first(w: u64, h: u64, out_w: u64, out_h: u64) -> bool {
    let (dw, dh) = (w as i128 - out_w as i128, h as i128 - out_h as i128);
    dh > 0 && dh > dw * 2
}

/// The horizontal pass over rows `rows` of `src` (`w` pixels wide): one output column per
/// entry of `c`, `rows.len()` rows.
fn resample_horizontal(src: &[u8], w: usize, rows: Range<usize>, ch: usize, c: &Coeffs) -> Vec<u8> {
    let n = c.len();
    let mut out = vec![0u8; n * rows.len() * ch];
    for (oy, y) in rows.enumerate() {
        let row = &src[y * w * ch..(y + 1) * w * ch];
        for x in 0..n {
            for k in 0..ch {
                let s = row[c.start[x] * ch + k..].iter().step_by(ch).copied();
                out[(oy * n + x) * ch + k] = apply(&c.taps[x], s);
            }
        }
    }
    out
}

/// The vertical pass over columns `cols` of `src` (`w` pixels wide): `cols.len()` columns, one
/// output row per entry of `c`.
fn resample_vertical(src: &[u8], w: usize, ch: usize, cols: Range<usize>, c: &Coeffs) -> Vec<u8> {
    let stride = w * ch;
    let width = cols.len() * ch;
    let mut out = vec![0u8; c.len() * width];
    for y in 0..c.len() {
        for (o, i) in (cols.start * ch..cols.end * ch).enumerate() {
            let s = src[c.start[y] * stride + i..]
                .iter()
                .step_by(stride)
                .copied();
            out[y * width + o] = apply(&c.taps[y], s);
        }
    }
    out
}

/// Resizes with Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit-exact
/// (no `reducing_gap`, full-image box). An unchanged size returns a copy. Allocates the output
/// and the intermediate pass unchecked ([`ImageProcessorConfig::preprocess`] checks them against
/// the memory budget first).
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (width as usize, height as usize);
    let data = resample_window(img.as_raw(), dims(img), 3, (w, h), 0..w, 0..h);
    RgbImage::from_raw(width, height, data).expect("resample returns width * height * 3 bytes")
}

/// `center_crop(&resize_bicubic(img, width, height), crop_w, crop_h)`, bit for bit, computing
/// only the resized pixels the crop keeps: an extreme aspect ratio resized to a 336-pixel short
/// edge (100000x1 -> 33600000x336) costs the crop's pixels, not the whole resize's.
pub fn resize_and_crop(img: &RgbImage, (width, height): (u32, u32), crop: (u32, u32)) -> RgbImage {
    let (sx, dx, lx) = crop_axis(width, crop.0);
    let (sy, dy, ly) = crop_axis(height, crop.1);
    let xs = sx as usize..(sx + lx) as usize;
    let ys = sy as usize..(sy + ly) as usize;
    let (w, h) = (width as usize, height as usize);
    let data = resample_window(img.as_raw(), dims(img), 3, (w, h), xs, ys);
    let window = RgbImage::from_raw(lx, ly, data).expect("the window has lx * ly * 3 bytes");
    if (dx, dy, lx, ly) == (0, 0, crop.0, crop.1) {
        return window;
    }
    let mut out = RgbImage::new(crop.0, crop.1);
    image::imageops::replace(&mut out, &window, dx as i64, dy as i64);
    out
}

fn dims(img: &RgbImage) -> (usize, usize) {
    (img.width() as usize, img.height() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_values() {
        assert_eq!(bicubic_kernel(0.0), 1.0);
        assert_eq!(bicubic_kernel(1.0), 0.0);
        assert_eq!(bicubic_kernel(-2.0), 0.0);
        assert_eq!(bicubic_kernel(0.5), 0.5625);
        assert_eq!(bicubic_kernel(1.5), -0.0625);
    }

    #[test]
    fn downscale_4_to_2_by_hand() {
        // scale 2, fscale 2, support 4. Output 0: center 1.0, taps 0..4 at
        // (j - 1 + 0.5) / 2 = -0.25, 0.25, 0.75, 1.25 -> K = 0.8671875, 0.8671875, 0.2265625,
        // -0.0703125 (sum 1.890625). Row [0, 0, 255, 255] -> 255 * (0.2265625 - 0.0703125)
        // / 1.890625 = 21.07 -> 21; by symmetry output 1 is 255 - 21.
        let out = resample(&[0, 0, 255, 255], 4, 1, 1, 2, 1);
        assert_eq!(out, vec![21, 234]);
        // Pillow 13.0.0: Image.frombytes("L", (4, 1), bytes([0, 0, 255, 255])).resize((2, 1), 3)
    }

    #[test]
    fn upscale_2_to_5_matches_pillow() {
        // Pillow 13.0.0: Image.frombytes("L", (2, 1), bytes([10, 200])).resize((5, 1), 3)
        assert_eq!(
            resample(&[10, 200], 2, 1, 1, 5, 1),
            vec![0, 22, 105, 188, 219]
        );
        // overshoot past 255 / below 0 is clamped:
        // Image.frombytes("L", (4, 1), bytes([0, 255, 0, 255])).resize((7, 1), 3)
        assert_eq!(
            resample(&[0, 255, 0, 255], 4, 1, 1, 7, 1),
            vec![0, 87, 251, 128, 4, 168, 255]
        );
    }

    #[test]
    fn vertical_pass_and_channels() {
        // the same column twice in 2 channels, resized only vertically (horizontal pass skipped)
        let src = [0, 0, 0, 0, 255, 255, 255, 255];
        let out = resample(&src, 1, 4, 2, 1, 2);
        assert_eq!(out, vec![21, 21, 234, 234]);
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        // 3x7 -> 2x3: the height shrinks by 4 > 2 * 1, so Pillow 13 runs the vertical pass first;
        // horizontal-first would give [.., 150, 111, 138] (rounding between passes differs).
        // Pillow 13.0.0: Image.fromarray(np.array(src).reshape(7, 3), "L").resize((2, 3), 3)
        let src = [
            168, 229, 184, 171, 238, 171, 20, 206, 245, 153, 204, 5, 37, 53, 213, 206, 192, 173, 6,
            120, 63,
        ];
        assert_eq!(
            resample(&src, 3, 7, 1, 2, 3),
            vec![176, 209, 119, 149, 111, 137]
        );
        let tmp = resample_horizontal(&src, 3, 0..7, 1, &coeffs(3, 2, 0..2));
        let h_first = resample_vertical(&tmp, 2, 1, 0..2, &coeffs(7, 3, 0..3));
        assert_eq!(h_first, vec![176, 209, 119, 150, 111, 138]);
    }

    #[test]
    fn constant_images_stay_constant() {
        for (w, h, ow, oh) in [(7, 5, 3, 11), (13, 2, 40, 1), (9, 9, 2, 2)] {
            let src = vec![173u8; w * h * 3];
            assert!(resample(&src, w, h, 3, ow, oh).iter().all(|&v| v == 173));
        }
    }

    #[test]
    fn coeffs_bytes_bounds_what_coeffs_allocates() {
        for (n_in, n_out) in [
            (4000, 336),
            (336, 4000),
            (100_000, 1),
            (1, 336),
            (7, 5),
            (5, 7),
            (397, 305),
            (3, 2),
            (1 << 20, 3),
        ] {
            let c = coeffs(n_in, n_out, 0..n_out);
            let taps = c.taps.iter().map(Vec::len);
            let held = n_out * (size_of::<usize>() + size_of::<Vec<i32>>())
                + taps.clone().sum::<usize>() * size_of::<i32>()
                + taps.max().unwrap() * size_of::<f64>();
            let bound = coeffs_bytes(n_in as u64, n_out as u64, n_out as u64);
            assert!(held as u128 <= bound, "{n_in} -> {n_out}: {held} > {bound}");
            // and not wildly above: at most twice, plus the rounding tap
            assert!(
                bound <= 2 * held as u128 + 16 * n_out as u128,
                "{n_in} -> {n_out}"
            );
        }
    }

    /// The crop window of a resize equals the crop of the whole resize, bit for bit, in both pass
    /// orders, for crops inside the resized image, larger than it (zero padding) and mixed.
    #[test]
    fn resize_and_crop_equals_crop_of_the_whole_resize() {
        let mut seed = 0x2545_f491u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let cases = [
            ((40, 7), (300, 52), (30, 30)), // upscale, horizontal first
            ((7, 40), (52, 300), (30, 30)), // upscale, tall
            ((90, 33), (30, 11), (8, 8)),   // downscale, horizontal first
            ((33, 90), (11, 30), (8, 8)),   // height shrinks most: vertical first
            ((25, 25), (9, 9), (12, 5)),    // crop wider than the image: padded
            ((13, 2), (40, 6), (40, 9)),    // crop as wide, taller
            ((17, 60), (17, 20), (10, 10)), // width unchanged: horizontal pass skipped
            ((60, 17), (20, 17), (30, 10)), // height unchanged
        ];
        for ((w, h), (rw, rh), (cw, ch)) in cases {
            let img = RgbImage::from_fn(w, h, |_, _| {
                let v = next();
                image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
            });
            let whole = center_crop(&resize_bicubic(&img, rw, rh), cw, ch);
            let window = resize_and_crop(&img, (rw, rh), (cw, ch));
            assert_eq!(whole, window, "{w}x{h} -> {rw}x{rh} -> crop {cw}x{ch}");
        }
    }

    #[test]
    fn budget_messages() {
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(370), "370 B");
        assert_eq!(human_bytes(33_868_800_000), "31.5 GiB");
        assert_eq!(bytes(&[usize::MAX, usize::MAX, 3]), u128::MAX); // saturates
        assert!(check_budget(|| "x".into(), 1 << 30, 1 << 30).is_ok());
        let msg = check_budget(|| "100x1 resizes".into(), (1 << 30) + 1, 1 << 30).unwrap_err();
        assert_eq!(
            msg,
            "100x1 resizes: 1.0 GiB held at once, which exceeds the 1 GiB image memory budget"
        );
    }

    #[test]
    fn resized_size_truncates_like_python() {
        let c = ImageProcessorConfig {
            shortest_edge: 224,
            ..Default::default()
        };
        assert_eq!(c.resized_size(397, 291), (305, 224)); // 224 * 397 / 291 = 305.56
        assert_eq!(c.resized_size(120, 301), (224, 561)); // 561.87
        assert_eq!(c.resized_size(50, 50), (224, 224));
    }

    #[test]
    fn crop_and_pad_offsets() {
        let mut img = RgbImage::new(3, 5);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8 + 1, y as u8 + 1, 9]);
        }
        // width 3 -> 6: placed at ceil(3/2) = 2; height 5 -> 2: starts at (5-2)//2 = 1
        let c = center_crop(&img, 6, 2);
        let row0: Vec<u8> = (0..6).map(|x| c.get_pixel(x, 0).0[0]).collect();
        assert_eq!(row0, vec![0, 0, 1, 2, 3, 0]);
        assert_eq!(c.get_pixel(2, 0).0[1], 2);
        let sq = expand_to_square(&img, [7, 8, 9]);
        assert_eq!(sq.dimensions(), (5, 5));
        assert_eq!(sq.get_pixel(0, 0).0, [7, 8, 9]);
        assert_eq!(sq.get_pixel(1, 0).0, [1, 1, 9]);
        assert_eq!(sq.get_pixel(4, 0).0, [7, 8, 9]);
    }
}
