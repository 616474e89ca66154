//! The image path (decode, RGB conversion, pad-to-square, resize, crop, normalise) stays within
//! its memory budget: hostile inputs of a few bytes are refused with a message naming the sizes
//! and the budget while the heap stays small, and at the tightest budget an image is accepted
//! with, the measured peak stays within that budget.
//!
//! Peaks are measured with the counting allocator, which counts every thread: each test holds
//! one lock for its whole run, so that no other test allocates during a measurement.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use fineprune::Error;
use fineprune::bench::mem::{PeakAlloc, current_bytes, peak_bytes, reset_peak};
use fineprune::model::image::{
    IMAGE_MEMORY_BUDGET, ImageProcessorConfig, RgbImage, load_image, load_image_from_memory,
    load_image_from_memory_with_budget,
};

#[global_allocator]
static A: PeakAlloc = PeakAlloc;

static SERIAL: Mutex<()> = Mutex::new(());

/// What a refused hostile input may allocate while it is refused.
const SMALL: usize = 64 << 20;

/// Taken first by every test: tests of this binary run one at a time.
fn alone() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` and returns its result with the peak heap above what was live before it.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = current_bytes();
    reset_peak();
    let out = f();
    let peak = peak_bytes().saturating_sub(base);
    (out, peak)
}

/// Asserts `r` is a budget refusal of kind `Image`, mentioning `what`, and returns the message.
fn refused<T: std::fmt::Debug>(r: fineprune::Result<T>, what: &str) -> String {
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Image { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(what), "{msg}");
    assert!(msg.contains("image memory budget"), "{msg}");
    msg
}

fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/images")
}

/// A PNG written row by row (the raw image is never in memory).
fn png(w: u32, h: u32, color: png::ColorType, depth: png::BitDepth, row: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(color);
    enc.set_depth(depth);
    let mut writer = enc.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    for _ in 0..h {
        stream.write_all(row).unwrap();
    }
    stream.finish().unwrap();
    writer.finish().unwrap();
    out
}

fn rgb_png(w: u32, h: u32) -> Vec<u8> {
    let row: Vec<u8> = (0..w * 3).map(|i| (i * 7 % 251) as u8).collect();
    png(w, h, png::ColorType::Rgb, png::BitDepth::Eight, &row)
}

/// Replaces the frame header's height and width (SOF0 or SOF2).
fn jpeg_with_size(mut bytes: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
    let sof = bytes
        .windows(2)
        .position(|p| p == [0xFF, 0xC0] || p == [0xFF, 0xC2])
        .unwrap();
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

fn jpeg_fixture(name: &str) -> Vec<u8> {
    std::fs::read(images_dir().join("jpeg").join(name)).unwrap()
}

// ------------------------------------------------------------------------- hostile inputs

/// A few hundred bytes of PNG at an extreme aspect ratio once made the resize to the shortest
/// edge allocate 11 GB. Followed by the centre crop (CLIP's processor), only the crop's window
/// of the resize is computed (bit for bit that part of the whole, see `image.rs`'s
/// `resize_and_crop_equals_crop_of_the_whole_resize`): the answer costs the crop's pixels. Without
/// the crop the whole resize is needed, and it is refused against the budget before allocating.
#[test]
fn extreme_aspect_pngs_cost_only_the_crop() {
    let _alone = alone();
    for (w, h, want) in [
        (100_000, 1, "100000x1 resizes to 33600000x336"),
        (1, 100_000, "1x100000 resizes to 336x33600000"),
    ] {
        let file = rgb_png(w, h);
        assert!(file.len() < 2000, "{} bytes", file.len());
        let (img, peak) = measured(|| load_image_from_memory(&file).unwrap());
        assert!(peak < SMALL, "decode peak {peak}");
        let (r, peak) = measured(|| ImageProcessorConfig::default().preprocess(&img));
        assert_eq!(r.unwrap().shape(), &[3, 336, 336]);
        assert!(peak < 4 << 20, "{w}x{h}: preprocess peak {peak}");
        eprintln!(
            "{w}x{h} PNG ({} bytes): preprocessed, peak {peak} B",
            file.len()
        );
        let no_crop = ImageProcessorConfig {
            do_center_crop: false,
            ..Default::default()
        };
        let (r, peak) = measured(|| no_crop.preprocess(&img));
        let msg = refused(r, want);
        assert!(msg.contains("GiB held at once"), "{msg}");
        assert!(peak < SMALL, "{w}x{h}: preprocess peak {peak}");
    }
}

#[test]
fn pad_to_square_of_an_extreme_aspect_is_refused() {
    let _alone = alone();
    let img = RgbImage::from_pixel(50_000, 2, image::Rgb([9, 8, 7]));
    let c = ImageProcessorConfig {
        pad_to_square: true,
        ..Default::default()
    };
    let (r, peak) = measured(|| c.preprocess(&img));
    let msg = refused(r, "50000x2 pads to a 50000x50000 square");
    assert!(peak < SMALL, "peak {peak}");
    eprintln!("pad 50000x2: {msg}; peak {peak} B");
}

#[test]
fn one_bit_png_bomb_is_refused_before_decoding() {
    let _alone = alone();
    // 20000x20000 1-bit grey: 48 KiB of file, 381 MiB decoded (expanded to 8-bit), 1.1 GiB RGB
    let file = png(
        20_000,
        20_000,
        png::ColorType::Grayscale,
        png::BitDepth::One,
        &[0u8; 2500],
    );
    assert!(file.len() < 100_000, "{} bytes", file.len());
    let (r, peak) = measured(|| load_image_from_memory(&file));
    let msg = refused(r, "PNG 20000x20000 (1-bit grey) decodes to 381.5 MiB");
    assert!(peak < SMALL, "peak {peak}");
    eprintln!(
        "1-bit 20000x20000 PNG ({} bytes): {msg}; peak {peak} B",
        file.len()
    );
}

#[test]
fn png_metadata_gets_only_what_the_pixels_leave_of_the_budget() {
    let _alone = alone();
    // a 200x100 RGB PNG whose ICC profile inflates from a few KiB to 32 MiB
    let mut out = Vec::new();
    let mut info = png::Info::with_size(200, 100);
    info.color_type = png::ColorType::Rgb;
    info.bit_depth = png::BitDepth::Eight;
    info.icc_profile = Some(vec![0u8; 32 << 20].into());
    let mut writer = png::Encoder::with_info(&mut out, info)
        .unwrap()
        .write_header()
        .unwrap();
    writer.write_image_data(&[7u8; 200 * 100 * 3]).unwrap();
    writer.finish().unwrap();
    assert!(out.len() < 200_000, "{} bytes", out.len());
    let budget = 8 << 20;
    let (r, peak) = measured(|| load_image_from_memory_with_budget(&out, budget).map(|_| ()));
    eprintln!("32 MiB ICC profile under an 8 MiB budget: {r:?}; peak {peak} B");
    assert!(peak + out.len() <= budget, "peak {peak}");
    // under the default budget the profile fits and the image decodes
    let img = load_image_from_memory(&out).unwrap();
    assert_eq!(img.dimensions(), (200, 100));
}

#[test]
fn huge_jpeg_frames_are_refused_before_decoding() {
    let _alone = alone();
    for name in ["pil_q75_420_101x67.jpg", "pil_q75_420_prog_101x67.jpg"] {
        let file = jpeg_with_size(jpeg_fixture(name), 65_000, 65_000);
        let (r, peak) = measured(|| load_image_from_memory(&file));
        let msg = refused(r, "65000x65000 frame");
        assert!(peak < SMALL, "{name}: peak {peak}");
        eprintln!("{name} as 65000x65000: {msg}; peak {peak} B");
    }
}

#[test]
fn oversized_file_is_refused_before_it_is_read() {
    let _alone = alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.png");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(IMAGE_MEMORY_BUDGET as u64 + 1).unwrap(); // sparse: no disk used
    drop(f);
    let (r, peak) = measured(|| load_image(&path));
    let msg = refused(r, "huge.png");
    assert!(msg.contains("the file is 1073741825 bytes"), "{msg}");
    assert!(peak < SMALL, "peak {peak}");
}

#[test]
fn huge_preprocessor_sizes_are_refused_when_parsed() {
    let _alone = alone();
    let path = Path::new("preprocessor_config.json");
    for (json, key) in [
        (r#"{"size": 1000000000}"#, "`shortest_edge`"),
        (
            r#"{"size": {"shortest_edge": 1000000000}}"#,
            "`shortest_edge`",
        ),
        (r#"{"crop_size": 1000000000}"#, "`crop_size`"),
        (
            r#"{"crop_size": {"height": 1000000000, "width": 1}}"#,
            "`crop_size`",
        ),
        (
            r#"{"size": {"height": 1000000000, "width": 1000000000}}"#,
            "`size`",
        ),
        // without a crop, the f32 output of the resize must fit too (16384^2 * 15 B > 1 GiB)
        (
            r#"{"size": 16384, "do_center_crop": false}"#,
            "`shortest_edge`",
        ),
        (r#"{"size": 5000000000}"#, "`shortest_edge`"),
    ] {
        let (r, peak) = measured(|| ImageProcessorConfig::from_json(json, path));
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Config { .. }), "{json}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(key) && msg.contains("preprocessor_config.json"),
            "{json}: {msg}"
        );
        assert!(peak < SMALL, "{json}: peak {peak}");
        eprintln!("{json}: {msg}; peak {peak} B");
    }
    // at the limit of what fits: accepted
    ImageProcessorConfig::from_json(r#"{"size": 8000, "crop_size": 8000}"#, path).unwrap();
    // the same bound holds for a config built in code
    let c = ImageProcessorConfig {
        crop_width: 1 << 40,
        ..Default::default()
    };
    let e = c.preprocess(&RgbImage::new(4, 4)).unwrap_err();
    assert!(e.to_string().contains("crop_width"), "{e}");
    let c = ImageProcessorConfig {
        shortest_edge: 1 << 20,
        ..Default::default()
    };
    let e = c.preprocess(&RgbImage::new(4, 4)).unwrap_err();
    assert!(e.to_string().contains("shortest_edge"), "{e}");
}

#[test]
fn resize_beyond_u32_edges_is_refused_not_truncated() {
    let _alone = alone();
    // 1x16 with shortest_edge 2^28 would give a 2^32-pixel edge: the public size saturates,
    // preprocess refuses it (under any budget: it is far beyond it)
    let c = ImageProcessorConfig {
        shortest_edge: 1 << 28,
        ..Default::default()
    };
    assert_eq!(c.resized_size(1, 16), (1 << 28, u32::MAX));
    let img = RgbImage::new(1, 16);
    let e = c.preprocess_with_budget(&img, usize::MAX).unwrap_err();
    assert!(e.to_string().contains("1x16 resizes to"), "{e}");
}

#[test]
fn non_finite_normalisation_is_refused_when_parsed() {
    let _alone = alone();
    let path = Path::new("preprocessor_config.json");
    for (json, key) in [
        (r#"{"image_std": 1e-40}"#, "`image_std`"),
        (r#"{"image_std": [0.5, 0.5, 1e-50]}"#, "`image_std`"),
        (r#"{"image_mean": 1e300}"#, "`image_mean`"),
        (r#"{"rescale_factor": 1e300}"#, "`rescale_factor`"),
        // finite settings whose quotient overflows f32: 255 / 1e-37
        (
            r#"{"do_rescale": false, "image_std": 1e-37}"#,
            "`image_std`",
        ),
    ] {
        let e = ImageProcessorConfig::from_json(json, path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(key), "{json}: {msg}");
    }
}

// ----------------------------------------------------------------------- budget is a bound

/// The smallest budget under which `run` succeeds (every smaller one must be refused with a
/// budget message), found by bisection below [`IMAGE_MEMORY_BUDGET`].
fn tightest_budget<T>(what: &str, run: impl Fn(usize) -> fineprune::Result<T>) -> usize {
    let (mut lo, mut hi) = (0, IMAGE_MEMORY_BUDGET);
    if let Err(e) = run(hi) {
        panic!("{what}: {e}");
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match run(mid) {
            Ok(_) => hi = mid,
            Err(e) => {
                assert!(e.to_string().contains("image memory budget"), "{what}: {e}");
                lo = mid;
            }
        }
    }
    hi
}

/// At the tightest budget, the measured peak (plus `held`: input the caller holds, which the
/// budget counts) stays within it.
fn check_bound<T>(what: &str, held: usize, run: impl Fn(usize) -> fineprune::Result<T>) {
    let budget = tightest_budget(what, &run);
    let (r, peak) = measured(|| run(budget).map(|_| ()));
    r.unwrap();
    assert!(
        held + peak <= budget,
        "{what}: peak {peak} + held {held} over the budget {budget}"
    );
    eprintln!("{what}: tightest budget {budget} B, measured {peak} B + {held} B held");
}

#[test]
fn decoding_stays_within_the_tightest_budget() {
    let _alone = alone();
    let mut files = vec![];
    for dir in [images_dir(), images_dir().join("jpeg")] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "png" || x == "jpg")
                && !p.file_name().unwrap().to_string_lossy().starts_with("bad_")
            {
                files.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    assert!(files.len() > 30);
    // wide, tall, 16-bit and 1-bit synthetic PNGs; JPEG frames larger than their data
    files.push(("rgb 3000x5".into(), rgb_png(3000, 5)));
    files.push(("rgb 5x3000".into(), rgb_png(5, 3000)));
    let row16: Vec<u8> = (0..2000 * 8).map(|i| i as u8).collect();
    let rgba16 = png(
        2000,
        40,
        png::ColorType::Rgba,
        png::BitDepth::Sixteen,
        &row16,
    );
    files.push(("rgba16 2000x40".into(), rgba16));
    let bits = png(
        1600,
        900,
        png::ColorType::Grayscale,
        png::BitDepth::One,
        &[0x5a; 200],
    );
    files.push(("1-bit 1600x900".into(), bits));
    for name in ["pil_q75_420_101x67.jpg", "pil_q75_420_prog_101x67.jpg"] {
        let big = jpeg_with_size(jpeg_fixture(name), 900, 700);
        files.push((format!("{name} as 900x700"), big));
    }
    for (name, file) in &files {
        check_bound(name, file.len(), |b| {
            load_image_from_memory_with_budget(file, b)
        });
    }
}

#[test]
fn preprocessing_stays_within_the_tightest_budget() {
    let _alone = alone();
    let photo = load_image(images_dir().join("photo.png")).unwrap(); // 397x291
    let tall = load_image(images_dir().join("tall.png")).unwrap(); // 120x301
    let tiny = load_image(images_dir().join("tiny.png")).unwrap();
    let padded = ImageProcessorConfig {
        pad_to_square: true,
        ..Default::default()
    };
    let exact = ImageProcessorConfig {
        exact_size: Some((384, 200)),
        do_center_crop: false,
        ..Default::default()
    };
    let crop_only = ImageProcessorConfig {
        do_resize: false,
        crop_height: 500,
        crop_width: 100,
        ..Default::default()
    };
    let cases = [
        ("default photo", ImageProcessorConfig::default(), &photo),
        ("pad photo", padded.clone(), &photo),
        ("pad tall", padded, &tall),
        ("exact tall", exact, &tall),
        ("default tiny", ImageProcessorConfig::default(), &tiny),
        ("crop-only photo", crop_only, &photo),
    ];
    for (name, c, img) in cases {
        let held = img.as_raw().len();
        check_bound(name, held, |b| c.preprocess_with_budget(img, b));
    }
}

#[test]
fn a_4000x3000_photo_fits_the_default_budget() {
    let _alone = alone();
    // JPEG frames of 4000x3000 (baseline and progressive: the data covers only a corner, the
    // rest decodes grey as in libjpeg) and an RGB PNG, through the whole path with padding
    let padded = ImageProcessorConfig {
        pad_to_square: true,
        ..Default::default()
    };
    let mut files = vec![];
    for name in ["pil_q75_420_101x67.jpg", "pil_q75_420_prog_101x67.jpg"] {
        files.push((name, jpeg_with_size(jpeg_fixture(name), 4000, 3000)));
    }
    files.push(("rgb.png", rgb_png(4000, 3000)));
    for (name, file) in files {
        let (img, decode_peak) = measured(|| load_image_from_memory(&file).unwrap());
        assert_eq!(img.dimensions(), (4000, 3000));
        let (t, pre_peak) = measured(|| padded.preprocess(&img).unwrap());
        assert_eq!(t.shape(), &[3, 336, 336]);
        assert!(decode_peak + file.len() <= IMAGE_MEMORY_BUDGET);
        assert!(pre_peak + img.as_raw().len() <= IMAGE_MEMORY_BUDGET);
        eprintln!("4000x3000 {name}: decode peak {decode_peak} B, preprocess peak {pre_peak} B");
    }
}

/// A device that never ends (`--image /dev/zero`, `"image": "/dev/zero"`) is refused after its
/// first 8 bytes, not read up to the budget.
#[test]
fn endless_non_image_stream_is_refused_at_its_signature() {
    let _g = alone();
    let (r, peak) = measured(|| load_image("/dev/zero"));
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("/dev/zero") && msg.contains("not a PNG or JPEG"),
        "{msg}"
    );
    assert!(peak < 1 << 20, "peak {peak}");
}
