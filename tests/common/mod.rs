//! Helpers shared by the integration tests: reading reference dumps and comparing tensors.
#![allow(dead_code)]

use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A reference tensor: shape and values (floats as f32, integers as i64).
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f: Vec<f32>,
    pub i: Vec<i64>,
}

pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

/// Every tensor of a reference safetensors file.
pub fn load_ref(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let (f, i) = match v.dtype() {
                Dtype::F32 => (
                    d.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                Dtype::I64 => (
                    vec![],
                    d.chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                Dtype::U8 => (vec![], d.iter().map(|&b| b as i64).collect()),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (
                name,
                RefTensor {
                    shape: v.shape().to_vec(),
                    f,
                    i,
                },
            )
        })
        .collect()
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn ids_u32(t: &RefTensor) -> Vec<u32> {
    t.i.iter().map(|&x| x as u32).collect()
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (`FINEPRUNE_SMOLLM2_GGUF`, default
/// `target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, where `.ci/run` puts it). `None` (the test
/// prints that it skipped) when absent, unless `CI` is set: then its absence is a failure.
pub fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("FINEPRUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but the SmolLM2 GGUF is missing at {}",
            p.display()
        );
    }
    println!(
        "skipped: {} is absent (set FINEPRUNE_SMOLLM2_GGUF)",
        p.display()
    );
    None
}
