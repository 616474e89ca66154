//! JPEG decoding against Pillow 13.0.0 (libjpeg-turbo 3.2.0): `Image.open(p).convert("RGB")`
//! must be reproduced bit for bit. Fixtures: tests/reference/gen_jpeg.py (images/jpeg/*.jpg and
//! jpeg_ref.safetensors) and gen_images.py (photo.jpg, gray.jpg, cmyk.jpg, whose decodes are in
//! preprocess_ref.safetensors).

use std::path::{Path, PathBuf};

use fineprune::Error;
use fineprune::model::image::{load_image, load_image_from_memory};
use safetensors::SafeTensors;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

/// Compares our decode of `path` with PIL's `[H, W, 3]` u8 tensor; returns a failure message.
fn check(path: &Path, st: &SafeTensors, key: &str) -> Option<String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let want = st.tensor(key).unwrap();
    let got = match load_image(path) {
        Ok(img) => img,
        Err(e) => return Some(format!("{name}: {e}")),
    };
    let shape = [got.height() as usize, got.width() as usize, 3];
    if want.shape() != shape {
        return Some(format!("{name}: shape {shape:?}, PIL {:?}", want.shape()));
    }
    let diffs: Vec<u8> = got
        .as_raw()
        .iter()
        .zip(want.data())
        .map(|(a, b)| a.abs_diff(*b))
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let n = diffs.iter().filter(|&&d| d > 0).count();
    println!(
        "{name:40} {:>4}x{:<4} max |ours - PIL| = {max}",
        shape[1], shape[0]
    );
    (max > 0).then(|| format!("{name}: {n} values differ, by up to {max}"))
}

#[test]
fn generated_jpegs_match_pil_exactly() {
    let bytes = std::fs::read(reference_dir().join("jpeg_ref.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dir = reference_dir().join("images/jpeg");
    let mut names = st.names();
    names.sort();
    assert!(names.len() >= 60, "{} fixtures", names.len());
    let failures: Vec<String> = names
        .iter()
        .filter_map(|name| check(&dir.join(name), &st, name))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn preprocess_fixture_jpegs_match_pil_exactly() {
    let bytes = std::fs::read(reference_dir().join("preprocess_ref.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let failures: Vec<String> = ["photo.jpg", "gray.jpg", "cmyk.jpg"]
        .iter()
        .filter_map(|f| {
            let path = reference_dir().join("images").join(f);
            check(&path, &st, &format!("decode/{f}"))
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

// ------------------------------------------------------------------------------------ errors

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(reference_dir().join("images/jpeg").join(name)).unwrap()
}

/// Decoding must give an image or an `Error::Image`, never panic or hang.
fn decodes_or_errors(bytes: &[u8]) -> bool {
    match load_image_from_memory(bytes) {
        Ok(img) => img.width() > 0 && img.height() > 0,
        Err(Error::Image { msg, .. }) => !msg.is_empty(),
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
}

#[test]
fn truncated_files_are_errors() {
    // Pillow reports "image file is truncated" for any file that ends before EOI
    for name in [
        "pil_q75_420_101x67.jpg",
        "pil_q75_420_prog_101x67.jpg",
        "pil_q75_420_rst5_101x67.jpg",
    ] {
        let full = fixture(name);
        for cut in [
            0,
            1,
            2,
            3,
            20,
            150,
            full.len() / 3,
            full.len() / 2,
            full.len() - 3,
        ] {
            cut_is_error(&full[..cut], &format!("{name}[..{cut}]"));
        }
        cut_is_error(&full[..full.len() - 2], &format!("{name} without EOI"));
    }
}

fn cut_is_error(bytes: &[u8], what: &str) {
    match load_image_from_memory(bytes) {
        Err(Error::Image { msg, .. }) => assert!(!msg.is_empty()),
        other => panic!("{what}: expected an image error, got {other:?}"),
    }
}

#[test]
fn error_messages_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let full = fixture("pil_q75_420_101x67.jpg");
    let path = dir.path().join("half.jpg");
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    let msg = load_image(&path).unwrap_err().to_string();
    assert!(
        msg.contains("half.jpg") && msg.contains("truncated"),
        "{msg}"
    );
}

/// Replaces the SOF0 segment's height and width.
fn with_size(mut bytes: Vec<u8>, w: u16, h: u16) -> Vec<u8> {
    let sof = bytes.windows(2).position(|p| p == [0xFF, 0xC0]).unwrap();
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

#[test]
fn malformed_headers_are_errors() {
    let good = fixture("pil_q75_420_101x67.jpg");
    for (w, h) in [(0, 67), (101, 0), (0, 0)] {
        let e = load_image_from_memory(&with_size(good.clone(), w, h)).unwrap_err();
        assert!(e.to_string().contains("empty image"), "{w}x{h}: {e}");
    }
    // a frame far larger than its data decodes (grey where data is missing) or errors
    assert!(decodes_or_errors(&with_size(good.clone(), 1000, 700)));
    // garbage after SOI
    let mut junk = vec![0xFF, 0xD8, 0xFF];
    junk.extend((0..4000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    decodes_or_errors(&junk);
    cut_is_error(&[0xFF, 0xD8, 0xFF, 0xD9], "SOI EOI");
    cut_is_error(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2], "SOS without SOF");
    // arithmetic coding (SOF9) and 12-bit precision are refused with a clear message
    let mut arith = good.clone();
    let sof = arith.windows(2).position(|p| p == [0xFF, 0xC0]).unwrap();
    arith[sof + 1] = 0xC9;
    let msg = load_image_from_memory(&arith).unwrap_err().to_string();
    assert!(msg.contains("arithmetic"), "{msg}");
    let mut p12 = good.clone();
    p12[sof + 4] = 12;
    let msg = load_image_from_memory(&p12).unwrap_err().to_string();
    assert!(msg.contains("12-bit"), "{msg}");
}

#[test]
fn corrupted_bytes_never_panic() {
    // deterministic fuzzing: flip, zero or duplicate bytes of several fixtures
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for name in [
        "pil_q75_420_101x67.jpg",
        "pil_q75_420_prog_101x67.jpg",
        "pil_q80_420_prog_rst3_64x48.jpg",
        "enc_mixed_37x29.jpg",
        "pil_cmyk_q80_prog_37x29.jpg",
    ] {
        let good = fixture(name);
        for round in 0..300 {
            let mut b = good.clone();
            for _ in 0..1 + round % 4 {
                let i = (rand() as usize) % b.len();
                match rand() % 3 {
                    0 => b[i] ^= 1 << (rand() % 8),
                    1 => b[i] = rand() as u8,
                    _ => b.insert(i, b[i]),
                }
            }
            decodes_or_errors(&b);
        }
    }
}
