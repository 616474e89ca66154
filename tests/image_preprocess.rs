//! Image preprocessing against transformers' `CLIPImageProcessorPil` (Pillow 13.0.0,
//! transformers 5.23.0): fixtures from tests/reference/gen_images.py.
//!
//! Tolerance: 1e-5 max-abs on `pixel_values` for every case, PNG or JPEG (in practice the output
//! is bit-identical: both decoders reproduce PIL exactly, the u8 resampling is exact and
//! rescale/normalise follow numpy's f64 -> f32 steps). The resized u8 images and the PNG and
//! JPEG decodes must match exactly (JPEG in detail: tests/jpeg_decode.rs).

use std::path::{Path, PathBuf};

use fineprune::Error;
use fineprune::model::image::{
    ImageProcessorConfig, RgbImage, load_image, load_image_from_memory, resize_bicubic,
};
use safetensors::SafeTensors;
use serde_json::Value;

/// pixel_values tolerance.
const TOL: f32 = 1e-5;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

fn with_fixtures(f: impl FnOnce(&SafeTensors, &[Value])) {
    let bytes = std::fs::read(reference_dir().join("preprocess_ref.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<Value> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    f(&st, &cases)
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

fn u8s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data().to_vec())
}

fn image(file: &str) -> RgbImage {
    load_image(reference_dir().join("images").join(file)).unwrap()
}

fn config(c: &Value) -> ImageProcessorConfig {
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    ImageProcessorConfig {
        shortest_edge: n("shortest_edge"),
        crop_height: n("crop_height"),
        crop_width: n("crop_width"),
        do_resize: c["do_resize"].as_bool().unwrap(),
        pad_to_square: c["pad_to_square"].as_bool().unwrap(),
        ..Default::default()
    }
}

#[test]
fn pixel_values_match_transformers() {
    with_fixtures(|st, cases| {
        assert!(cases.len() >= 15);
        let mut failures = vec![];
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let file = c["file"].as_str().unwrap();
            let got = config(c).preprocess(&image(file)).unwrap();
            let (shape, want) = f32s(st, &format!("case/{name}/pixel_values"));
            assert_eq!(got.shape(), &shape[..], "{name}");
            let got = got.f32s().unwrap();
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let bitexact = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            println!("{name:28} max |diff| = {max:.3e} (bit-exact: {bitexact})");
            if max > TOL {
                failures.push(format!("{name}: max diff {max} > {TOL}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    });
}

#[test]
fn resize_is_bit_exact_with_pillow() {
    with_fixtures(|st, cases| {
        let mut n = 0;
        for c in cases {
            let name = c["name"].as_str().unwrap();
            let key = format!("resized/{name}");
            if st.tensor(&key).is_err() {
                continue;
            }
            let cfg = config(c);
            let img = image(c["file"].as_str().unwrap());
            let (w, h) = cfg.resized_size(img.width(), img.height());
            let got = resize_bicubic(&img, w, h);
            let (shape, want) = u8s(st, &key);
            assert_eq!(shape, [h as usize, w as usize, 3], "{name}");
            let diffs = got
                .as_raw()
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(diffs, 0, "{name}: {diffs} u8 values differ from Pillow");
            n += 1;
        }
        assert!(n >= 3);
    });
}

#[test]
fn png_decode_matches_pil_convert_rgb() {
    with_fixtures(|st, _| {
        for file in [
            "rgba.png",
            "gray.png",
            "rgb16.png",
            "gray16.png",
            "la16.png",
            "palette.png",
            "bw1.png",
            "la.png",
        ] {
            let got = image(file);
            let (shape, want) = u8s(st, &format!("decode/{file}"));
            assert_eq!(
                shape,
                [got.height() as usize, got.width() as usize, 3],
                "{file}"
            );
            assert_eq!(got.as_raw(), &want, "{file} decodes differently from PIL");
        }
    });
}

/// PIL decodes JPEG with libjpeg-turbo (3.2.0 in the Pillow 13.0.0 wheel); ours matches it
/// exactly.
#[test]
fn jpeg_decode_matches_pil() {
    with_fixtures(|st, _| {
        for file in ["photo.jpg", "gray.jpg", "cmyk.jpg"] {
            let got = image(file);
            let (shape, want) = u8s(st, &format!("decode/{file}"));
            assert_eq!(
                shape,
                [got.height() as usize, got.width() as usize, 3],
                "{file}"
            );
            assert_eq!(got.as_raw(), &want, "{file} decodes differently from PIL");
        }
    });
}

// ------------------------------------------------------------------------------------ errors

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn missing_file_names_the_path() {
    let e = load_image("/nonexistent/dir/cat.png").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(message(e).contains("/nonexistent/dir/cat.png"));
}

#[test]
fn truncated_png_is_an_image_error() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(reference_dir().join("images/tall.png")).unwrap();
    for cut in [20, full.len() / 2, full.len() - 13] {
        let path = dir.path().join(format!("cut{cut}.png"));
        std::fs::write(&path, &full[..cut]).unwrap();
        let e = load_image(&path).unwrap_err();
        assert!(matches!(e, Error::Image { .. }), "{cut}: {e:?}");
        assert!(message(e).contains(&format!("cut{cut}.png")));
    }
}

#[test]
fn text_file_named_jpg_is_an_image_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.jpg");
    std::fs::write(&path, "this is not a picture\n").unwrap();
    let e = load_image(&path).unwrap_err();
    assert!(matches!(e, Error::Image { .. }), "{e:?}");
    assert!(message(e).contains("notes.jpg"));
    // an empty file and garbage from memory too
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(load_image(&path), Err(Error::Image { .. })));
    assert!(matches!(
        load_image_from_memory(&[0xff, 0xd8, 0xff, 0x00, 1, 2, 3]),
        Err(Error::Image { .. })
    ));
}

#[test]
fn format_is_sniffed_not_taken_from_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("really_a_png.jpg");
    std::fs::copy(reference_dir().join("images/tiny.png"), &path).unwrap();
    assert_eq!(load_image(&path).unwrap(), image("tiny.png"));
}

fn config_err(json: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    std::fs::write(&path, json).unwrap();
    let e = ImageProcessorConfig::from_preprocessor_config(&path).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    let msg = message(e);
    assert!(msg.contains("preprocessor_config.json"), "{msg}");
    msg
}

#[test]
fn config_errors_are_clear() {
    assert!(config_err("{not json").contains("not valid JSON"));
    assert!(config_err("[1, 2]").contains("not a JSON object"));
    assert!(config_err(r#"{"size": "big"}"#).contains("`size`"));
    assert!(
        config_err(r#"{"size": {"shortest_edge": 224, "longest_edge": 500}}"#).contains("`size`")
    );
    assert!(config_err(r#"{"size": {"height": 224}}"#).contains("`size`"));
    assert!(config_err(r#"{"crop_size": {"shortest_edge": 224}}"#).contains("`crop_size`"));
    assert!(config_err(r#"{"crop_size": -3}"#).contains("`crop_size`"));
    assert!(config_err(r#"{"image_mean": [0.5, 0.5]}"#).contains("`image_mean`"));
    assert!(config_err(r#"{"image_std": [0.5, 0, 0.5]}"#).contains("`image_std`"));
    assert!(config_err(r#"{"resample": 2}"#).contains("`resample`"));
    assert!(config_err(r#"{"do_resize": "yes"}"#).contains("`do_resize`"));
    assert!(config_err(r#"{"size": 0}"#).contains("shortest_edge"));
    let e = ImageProcessorConfig::from_preprocessor_config("/nonexistent/preprocessor_config.json")
        .unwrap_err();
    assert!(message(e).contains("/nonexistent/preprocessor_config.json"));
}

#[test]
fn config_parses_hf_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    // openai/clip-vit-large-patch14-336 (transformers 4.x era file)
    std::fs::write(
        &path,
        r#"{"crop_size": 336, "do_center_crop": true, "do_normalize": true, "do_resize": true,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}"#,
    )
    .unwrap();
    let c = ImageProcessorConfig::from_preprocessor_config(&path).unwrap();
    assert_eq!(c, ImageProcessorConfig::default());
    // llava-hf style dicts
    std::fs::write(
        &path,
        r#"{"crop_size": {"height": 336, "width": 300}, "size": {"shortest_edge": 320},
            "rescale_factor": 0.00392156862745098, "image_mean": 0.5}"#,
    )
    .unwrap();
    let c = ImageProcessorConfig::from_preprocessor_config(&path).unwrap();
    assert_eq!(
        (c.shortest_edge, c.crop_height, c.crop_width),
        (320, 336, 300)
    );
    assert_eq!(c.image_mean, [0.5; 3]);
    // exact resize (SigLIP style)
    std::fs::write(
        &path,
        r#"{"size": {"height": 384, "width": 384}, "do_center_crop": false}"#,
    )
    .unwrap();
    let c = ImageProcessorConfig::from_preprocessor_config(&path).unwrap();
    assert_eq!(c.exact_size, Some((384, 384)));
    assert_eq!(c.resized_size(640, 480), (384, 384));
    let t = c.preprocess(&image("tiny.png")).unwrap();
    assert_eq!(t.shape(), &[3, 384, 384]);
}

#[test]
fn degenerate_inputs_are_errors_not_panics() {
    let c = ImageProcessorConfig::default();
    assert!(matches!(
        c.preprocess(&RgbImage::new(0, 0)),
        Err(Error::Arg { .. })
    ));
    let c = ImageProcessorConfig {
        crop_width: 0,
        ..Default::default()
    };
    assert!(matches!(
        c.preprocess(&image("tiny.png")),
        Err(Error::Arg { .. })
    ));
    // a 1-pixel-wide image still works (long edge = 336 * 17)
    let thin = RgbImage::from_pixel(1, 17, image::Rgb([1, 2, 3]));
    let t = ImageProcessorConfig::default().preprocess(&thin).unwrap();
    assert_eq!(t.shape(), &[3, 336, 336]);
}

/// LLaVA-NeXT's any-resolution tiles (`fineprune::model::anyres`) against transformers'
/// `LlavaNextImageProcessor` (PIL backend; tests/reference/gen_anyres.py): landscape, portrait
/// and up-scaled images on two pinpoint sets, best resolution, tile count and pixel values
/// within `TOL`.
#[test]
fn anyres_tiles_match_llava_next_image_processor() {
    use fineprune::model::anyres;
    let dir = reference_dir();
    let bytes = std::fs::read(dir.join("anyres_ref.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("anyres_ref.json")).unwrap())
            .unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let img = image(c["file"].as_str().unwrap());
        let tile = c["tile"].as_u64().unwrap() as usize;
        let pair = |v: &Value| {
            let v = v.as_array().unwrap();
            (
                v[0].as_u64().unwrap() as usize,
                v[1].as_u64().unwrap() as usize,
            )
        };
        let pins: Vec<(usize, usize)> = (c["image_grid_pinpoints"].as_array().unwrap().iter())
            .map(pair)
            .collect();
        let size = (img.height() as usize, img.width() as usize);
        assert_eq!(size, pair(&c["image_size"]), "{name}");
        let best = anyres::select_best_resolution(size, &pins);
        assert_eq!(best, Some(pair(&c["best_resolution"])), "{name}");
        let cfg = ImageProcessorConfig {
            shortest_edge: tile,
            crop_height: tile,
            crop_width: tile,
            ..Default::default()
        };
        let got = anyres::preprocess(&cfg, &img, &pins).unwrap();
        let (shape, want) = f32s(&st, &format!("{name}/pixel_values"));
        assert_eq!(got.shape(), &shape[..], "{name}");
        let max = (got.f32s().unwrap().iter().zip(&want))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{name:12} {} tiles, max |diff| = {max:.3e}", shape[0]);
        assert!(max <= TOL, "{name}: max diff {max}");
    }
}

/// The prompt's image-token count and the unpadded feature grid at LLaVA-NeXT-7B's geometry
/// against transformers' processor count and `unpad_image` (tests/reference/gen_anyres.py),
/// over tiny, common and extreme-aspect image sizes (one keeps zero columns, as transformers does).
#[test]
fn anyres_token_counts_match_transformers() {
    use fineprune::model::anyres;
    let text = std::fs::read_to_string(reference_dir().join("anyres_ref.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    let t = &meta["token_counts"];
    let n = |v: &Value| v.as_u64().unwrap() as usize;
    let pair = |v: &Value| (n(&v[0]), n(&v[1]));
    let pins: Vec<(usize, usize)> = t["image_grid_pinpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(pair)
        .collect();
    let (tile, patch) = (n(&t["tile"]), n(&t["patch"]));
    let sizes = t["sizes"].as_array().unwrap();
    assert!(sizes.len() >= 20);
    for s in sizes {
        let size = pair(&s["image_size"]);
        let (gh, gw) = pair(&s["grid"]);
        let (rows, cols) = anyres::unpad(size, (gh * tile / patch, gw * tile / patch));
        assert_eq!((rows.len(), cols.len()), pair(&s["unpadded"]), "{size:?}");
        let count = anyres::image_token_count(size, &pins, tile, patch, false).unwrap();
        assert_eq!(count, n(&s["image_tokens"]), "{size:?}");
    }
    assert!(anyres::image_token_count((10, 10), &pins, 336, 15, false).is_err());
    assert!(anyres::image_token_count((10, 10), &[], 336, 14, false).is_err());
}

/// `anyres::pack` against `LlavaNextModel.pack_image_features` (default strategy, with
/// `image_newline`) on random tile features: the same rows in the same order, bit for bit (it
/// only moves values).
#[test]
fn anyres_pack_matches_pack_image_features() {
    use fineprune::model::anyres;
    let dir = reference_dir();
    let bytes = std::fs::read(dir.join("anyres_ref.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let text = std::fs::read_to_string(dir.join("anyres_ref.json")).unwrap();
    let meta: Value = serde_json::from_str(&text).unwrap();
    let pins: Vec<(usize, usize)> = [[30, 60], [60, 30], [60, 60], [30, 90], [90, 30]]
        .iter()
        .map(|p| (p[0], p[1]))
        .collect();
    let sizes = meta["pack_sizes"].as_array().unwrap();
    assert!(sizes.len() >= 5);
    for (i, s) in sizes.iter().enumerate() {
        let size = (
            s[0].as_u64().unwrap() as usize,
            s[1].as_u64().unwrap() as usize,
        );
        let (_, feats) = f32s(&st, &format!("pack/{i}/features"));
        let (_, nl) = f32s(&st, &format!("pack/{i}/newline"));
        let (shape, want) = f32s(&st, &format!("pack/{i}/packed"));
        let got = anyres::pack(&feats, 3, size, &pins, (30, 6), Some(&nl)).unwrap();
        assert_eq!(got.len(), want.len(), "{size:?}: {shape:?}");
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{size:?}"
        );
        let count = anyres::image_token_count(size, &pins, 30, 6, false).unwrap();
        assert_eq!(count, shape[0], "{size:?}");
        assert!(anyres::pack(&feats[3..], 3, size, &pins, (30, 6), Some(&nl)).is_err());
    }
}
