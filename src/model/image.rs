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

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, ImageReader};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub use image::RgbImage;

/// OpenAI CLIP's normalisation mean (`OPENAI_CLIP_MEAN` in transformers).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's normalisation std (`OPENAI_CLIP_STD` in transformers).
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

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
    pub fn from_model_dir(dir: &Path, image_size: usize) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        if pre.exists() {
            return Self::from_preprocessor_config(&pre);
        }
        let proc = dir.join("processor_config.json");
        if proc.exists() {
            let text = std::fs::read_to_string(&proc).map_err(|e| Error::io(&proc, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: proc.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
            if let Some(ip) = v.get("image_processor") {
                return Self::from_json(&ip.to_string(), &proc);
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
        cfg.check().map_err(|e| match e {
            Error::Arg { name, msg } => err(format!("`{name}` {msg}")),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Rejects settings that cannot produce an image (zero sizes, zero std).
    fn check(&self) -> Result<()> {
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
        }
        if self.do_normalize && self.image_std.contains(&0.0) {
            return Err(Error::arg("image_std", "must not contain 0"));
        }
        Ok(())
    }

    /// `(width, height)` the resize step produces for an image of `width x height`.
    ///
    /// For `shortest_edge` this is transformers' `get_resize_output_image_size` with
    /// `default_to_square=False`: short edge = `shortest_edge`, long edge =
    /// `int(shortest_edge * long / short)` (truncated, computed in f64 like Python).
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        if let Some((h, w)) = self.exact_size {
            return (w as u32, h as u32);
        }
        let (short, long) = if width <= height {
            (width, height)
        } else {
            (height, width)
        };
        let s = self.shortest_edge as u64;
        let new_long = ((s * long as u64) as f64 / short as f64) as u32;
        if width <= height {
            (s as u32, new_long)
        } else {
            (new_long, s as u32)
        }
    }

    /// LLaVA's pad colour: `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }

    /// Runs the whole pipeline on an RGB image: optional pad-to-square, resize, centre crop,
    /// rescale, normalise. Returns an f32 tensor `[3, H, W]`: `[3, crop_height, crop_width]`
    /// when `do_center_crop`, otherwise the resized size.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Tensor> {
        self.check()?;
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::arg("image", "is empty (0 pixels)"));
        }
        let squared;
        let mut img = img;
        if self.pad_to_square {
            squared = expand_to_square(img, self.pad_color());
            img = &squared;
        }
        let resized;
        if self.do_resize {
            let (w, h) = self.resized_size(img.width(), img.height());
            if w == 0 || h == 0 {
                return Err(Error::arg(
                    "image",
                    format!("{}x{} resizes to nothing", img.width(), img.height()),
                ));
            }
            resized = resize_bicubic(img, w, h);
            img = &resized;
        }
        let cropped;
        if self.do_center_crop {
            cropped = center_crop(img, self.crop_width as u32, self.crop_height as u32);
            img = &cropped;
        }
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                // transformers' rescale upcasts to f64, multiplies, then casts to f32;
                // normalize then works in f32 (uint8 input is cast to f32 first).
                let mut x = if self.do_rescale {
                    (px.0[c] as f64 * self.rescale_factor) as f32
                } else {
                    px.0[c] as f32
                };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                out[c * h * w + i] = x;
            }
        }
        Tensor::from_f32(&[3, h, w], out)
    }
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
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes, path)
}

/// Decodes an in-memory PNG or JPEG as RGB (see [`load_image`]); errors name `<memory>`.
pub fn load_image_from_memory(bytes: &[u8]) -> Result<RgbImage> {
    decode(bytes, Path::new("<memory>"))
}

/// Decoded images larger than this many bytes are refused (decompression bombs).
const MAX_DECODED_BYTES: usize = 512 << 20;

fn decode(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let err = |msg: String| Error::Image {
        path: PathBuf::from(path),
        msg,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png) => {
            let img = reader
                .decode()
                .map_err(|e| err(format!("cannot decode PNG: {e}")))?;
            Ok(to_rgb_like_pil(img))
        }
        Some(ImageFormat::Jpeg) => decode_jpeg(bytes).map_err(err),
        _ => Err(err("not a PNG or JPEG file".into())),
    }
}

/// JPEG through our own decoder (`super::jpeg`), which reproduces the libjpeg-turbo that PIL
/// uses bit for bit: ISLOW IDCT, fancy upsampling, libjpeg's YCbCr tables, Pillow's CMYK
/// conversion.
fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let img = super::jpeg::decode(bytes, MAX_DECODED_BYTES)
        .map_err(|e| format!("cannot decode JPEG: {e}"))?;
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
        // alpha, exactly like PIL.
        other => other.to_rgb8(),
    }
}

// ------------------------------------------------------------------------------------------------
// Geometry: LLaVA's expand2square and transformers' center_crop.

/// LLaVA's `expand2square`: paste the image on a square canvas of side `max(w, h)` filled with
/// `background`, at offset `((side - w) / 2, (side - h) / 2)` (floor division; only one is nonzero).
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
/// `ceil((crop - size) / 2)` on a zero canvas.
pub fn center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    // (first source index, first destination index, length) along one axis
    let axis = |size: u32, crop: u32| {
        if size >= crop {
            ((size - crop) / 2, 0, crop)
        } else {
            (0, (crop - size).div_ceil(2), size)
        }
    };
    let (sx, dx, lx) = axis(img.width(), width);
    let (sy, dy, ly) = axis(img.height(), height);
    let mut out = RgbImage::new(width, height);
    for y in 0..ly {
        for x in 0..lx {
            out.put_pixel(dx + x, dy + y, *img.get_pixel(sx + x, sy + y));
        }
    }
    out
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

/// Fixed-point taps for one axis: output `i` reads inputs `start[i]..start[i] + taps[i].len()`.
struct Coeffs {
    start: Vec<usize>,
    taps: Vec<Vec<i32>>,
}

fn coeffs(n_in: usize, n_out: usize) -> Coeffs {
    // Pillow takes the box edges as C floats: (float)n_in - 0.0f, then widens to double.
    let scale = (n_in as f32) as f64 / n_out as f64;
    let fscale = scale.max(1.0);
    let support = 2.0 * fscale;
    let ss = 1.0 / fscale;
    let mut start = Vec::with_capacity(n_out);
    let mut taps = Vec::with_capacity(n_out);
    for i in 0..n_out {
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
fn resample(src: &[u8], w: usize, h: usize, ch: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    // pixels as the width (fewer rows for the horizontal pass); otherwise horizontal first.
    // (Older Pillow always went horizontal first; the rounding between passes makes the order
    // visible in the output.)
    let (dw, dh) = (w as i64 - out_w as i64, h as i64 - out_h as i64);
    let vertical_first = dh > 0 && dh > dw * 2;
    if vertical_first {
        let tmp = resample_vertical(src, w, h, ch, out_h);
        resample_horizontal(&tmp, w, out_h, ch, out_w)
    } else {
        let tmp = resample_horizontal(src, w, h, ch, out_w);
        resample_vertical(&tmp, out_w, h, ch, out_h)
    }
}

/// The horizontal pass over every row; a copy when the width is unchanged.
fn resample_horizontal(src: &[u8], w: usize, h: usize, ch: usize, out_w: usize) -> Vec<u8> {
    if out_w == w {
        return src.to_vec();
    }
    let c = coeffs(w, out_w);
    let mut out = vec![0u8; out_w * h * ch];
    for y in 0..h {
        let row = &src[y * w * ch..(y + 1) * w * ch];
        for x in 0..out_w {
            for k in 0..ch {
                let s = row[c.start[x] * ch + k..].iter().step_by(ch).copied();
                out[(y * out_w + x) * ch + k] = apply(&c.taps[x], s);
            }
        }
    }
    out
}

/// The vertical pass over every column; a copy when the height is unchanged.
fn resample_vertical(src: &[u8], w: usize, h: usize, ch: usize, out_h: usize) -> Vec<u8> {
    if out_h == h {
        return src.to_vec();
    }
    let c = coeffs(h, out_h);
    let stride = w * ch;
    let mut out = vec![0u8; out_h * stride];
    for y in 0..out_h {
        for i in 0..stride {
            let s = src[c.start[y] * stride + i..]
                .iter()
                .step_by(stride)
                .copied();
            out[y * stride + i] = apply(&c.taps[y], s);
        }
    }
    out
}

/// Resizes with Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit-exact
/// (no `reducing_gap`, full-image box). An unchanged size returns a copy.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = resample(img.as_raw(), w, h, 3, width as usize, height as usize);
    RgbImage::from_raw(width, height, data).expect("resample returns width * height * 3 bytes")
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
        let h_first = resample_vertical(&resample_horizontal(&src, 3, 7, 1, 2), 2, 7, 1, 3);
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
