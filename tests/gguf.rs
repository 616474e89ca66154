//! GGUF import: synthetic files from a small writer (every block type on known values, v2/v3
//! headers, corrupt and unsupported variants, a tiny LLaMA with a tokenizer), gguf-py's
//! dequantisation of random blocks (tests/reference/gguf_dequant_ref.safetensors), and the real
//! SmolLM2-135M-Instruct Q4_1 file when it is present (`FINEPRUNE_SMOLLM2_GGUF`, default
//! `target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; required when `CI` is set).

mod common;

use common::smollm2_path;
use fineprune::Error;
use fineprune::model::gguf::{GgmlType, GgufFile, MetaArray, MetaValue, dequantize, load_llama};
use fineprune::tensor::Tensor;
use half::{bf16, f16};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// A minimal GGUF writer
// ---------------------------------------------------------------------------------------------

fn value_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.extend(x.to_le_bytes()),
        MetaValue::I8(x) => out.extend(x.to_le_bytes()),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    let (ty, n) = match a {
        MetaArray::U8(v) => (0u32, v.len()),
        MetaArray::I8(v) => (1, v.len()),
        MetaArray::U16(v) => (2, v.len()),
        MetaArray::I16(v) => (3, v.len()),
        MetaArray::U32(v) => (4, v.len()),
        MetaArray::I32(v) => (5, v.len()),
        MetaArray::F32(v) => (6, v.len()),
        MetaArray::Bool(v) => (7, v.len()),
        MetaArray::String(v) => (8, v.len()),
        MetaArray::Array(v) => (9, v.len()),
        MetaArray::U64(v) => (10, v.len()),
        MetaArray::I64(v) => (11, v.len()),
        MetaArray::F64(v) => (12, v.len()),
    };
    out.extend(ty.to_le_bytes());
    out.extend((n as u64).to_le_bytes());
    match a {
        MetaArray::U8(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::I8(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::U16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::I16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::Bool(v) => v.iter().for_each(|&x| out.push(u8::from(x))),
        MetaArray::String(v) => v.iter().for_each(|x| put_str(out, x)),
        MetaArray::Array(v) => v.iter().for_each(|x| put_array(out, x)),
        MetaArray::U64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        MetaArray::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
    }
}

fn strs(v: &[&str]) -> MetaValue {
    MetaValue::Array(MetaArray::String(v.iter().map(|x| x.to_string()).collect()))
}

struct RawTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

struct Writer {
    version: u32,
    alignment: u64,
    kv: Vec<(String, MetaValue)>,
    tensors: Vec<RawTensor>,
}

impl Writer {
    fn new() -> Self {
        Writer {
            version: 3,
            alignment: 32,
            kv: vec![],
            tensors: vec![],
        }
    }

    fn kv(mut self, key: &str, v: MetaValue) -> Self {
        if key == "general.alignment"
            && let MetaValue::U32(a) = v
        {
            self.alignment = a.into();
        }
        self.kv.push((key.to_string(), v));
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors.push(RawTensor {
            name: name.into(),
            dims: dims.to_vec(),
            type_id: ty.id(),
            data,
        });
        self
    }

    fn f32_tensor(self, name: &str, dims: &[u64], v: &[f32]) -> Self {
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, data)
    }

    /// The file's bytes; the last tensor's data ends the file (no trailing padding).
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = vec![];
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        if self.tensors.is_empty() {
            return out;
        }
        let start = (out.len() as u64).next_multiple_of(self.alignment);
        out.resize(start as usize, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize((start + off) as usize, 0);
            out.extend(&t.data);
        }
        out
    }
}

fn s(x: &str) -> MetaValue {
    MetaValue::String(x.into())
}

struct Tmp {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write_tmp(bytes: &[u8]) -> Tmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    Tmp { _dir: dir, path }
}

fn open_bytes(bytes: &[u8]) -> (Tmp, fineprune::Result<GgufFile>) {
    let t = write_tmp(bytes);
    let r = GgufFile::open(&t.path);
    (t, r)
}

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn reference() -> Vec<u8> {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_dequant_ref.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn st_f32(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn st_u64(st: &SafeTensors, name: &str) -> Vec<u64> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data()
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dequantisation against gguf-py
// ---------------------------------------------------------------------------------------------

#[test]
fn random_blocks_match_gguf_py_bit_for_bit() {
    let bytes = reference();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ];
    let mut w = Writer::new();
    let mut expected = vec![];
    for ty in types {
        let raw = st
            .tensor(&format!("synth.raw.{ty}"))
            .unwrap()
            .data()
            .to_vec();
        let (_, want) = st_f32(&st, &format!("synth.deq.{ty}"));
        let got = dequantize(ty, &raw, want.len()).unwrap();
        assert_eq!(bits(&got), bits(&want), "{ty} differs from gguf-py");
        // The same blocks through a file, as a [rows, block] matrix.
        let bs = ty.block_size().max(32) as u64;
        let dims = [bs, want.len() as u64 / bs];
        w = w.tensor(&format!("t.{ty}"), &dims, ty, raw);
        expected.push((ty, dims, want));
    }
    let (_t, f) = open_bytes(&w.bytes());
    let f = f.unwrap();
    for (ty, dims, want) in expected {
        let t = f.tensor(&format!("t.{ty}")).unwrap();
        assert_eq!(t.shape(), &[dims[1] as usize, dims[0] as usize]);
        assert_eq!(
            bits(&t.into_f32_vec().unwrap()),
            bits(&want),
            "{ty} via file"
        );
    }
}

#[test]
fn every_block_type_on_known_values() {
    // Q8_0: d = 0.5, q = j - 16.
    let mut q8 = f16b(0.5).to_vec();
    q8.extend((0..32).map(|j| (j as i8 - 16) as u8));
    // Q4_0: d = 0.25, low nibble j, high nibble 15 - j, minus 8.
    let mut q40 = f16b(0.25).to_vec();
    q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Q4_1: d = 2, m = -3, nibble j / high nibble 1.
    let mut q41 = f16b(2.0).to_vec();
    q41.extend(f16b(-3.0));
    q41.extend((0..16u8).map(|j| j | (1 << 4)));
    // Q5_1: d = 1, m = 0.5, nibbles 0 with the fifth bit on for even elements.
    let mut q51 = f16b(1.0).to_vec();
    q51.extend(f16b(0.5));
    q51.extend(0x5555_5555u32.to_le_bytes());
    q51.extend([0u8; 16]);
    let halfs: Vec<u8> = [1.5f32, -2.0, 65504.0, 0.0]
        .iter()
        .flat_map(|&x| f16b(x))
        .collect();
    let bf: Vec<u8> = [1.0f32, -0.5, 3.0e38, 7.0]
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    let w = Writer::new()
        .tensor("q8", &[32], GgmlType::Q8_0, q8)
        .tensor("q40", &[32], GgmlType::Q4_0, q40)
        .tensor("q41", &[32], GgmlType::Q4_1, q41)
        .tensor("q51", &[32], GgmlType::Q5_1, q51)
        .tensor("h", &[2, 2], GgmlType::F16, halfs)
        .tensor("b", &[4], GgmlType::BF16, bf)
        .f32_tensor("f", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let (_t, f) = open_bytes(&w.bytes());
    let f = f.unwrap();
    let get = |n: &str| f.tensor(n).unwrap().into_f32_vec().unwrap();
    assert_eq!(
        get("q8"),
        (0..32).map(|j| (j as f32 - 16.0) * 0.5).collect::<Vec<_>>()
    );
    let q40: Vec<f32> = (0..16)
        .map(|j| 0.25 * (j as f32 - 8.0))
        .chain((0..16).map(|j| 0.25 * (7.0 - j as f32)))
        .collect();
    assert_eq!(get("q40"), q40);
    let q41: Vec<f32> = (0..16)
        .map(|j| 2.0 * j as f32 - 3.0)
        .chain([-1.0; 16])
        .collect();
    assert_eq!(get("q41"), q41);
    assert_eq!(
        get("q51"),
        (0..32)
            .map(|j| if j % 2 == 0 { 16.5 } else { 0.5 })
            .collect::<Vec<_>>()
    );
    let h = f.tensor("h").unwrap();
    assert_eq!(h.dtype(), fineprune::DType::F16, "F16 keeps its storage");
    assert_eq!(h.shape(), &[2, 2]);
    assert_eq!(h.into_f32_vec().unwrap(), vec![1.5, -2.0, 65504.0, 0.0]);
    let b = f.tensor("b").unwrap();
    assert_eq!(b.dtype(), fineprune::DType::BF16);
    assert_eq!(b.into_f32_vec().unwrap()[..2], [1.0, -0.5]);
    let t = f.tensor("f").unwrap();
    assert_eq!(
        t.shape(),
        &[2, 3],
        "ne = [3, 2] is a row-major [2, 3] matrix"
    );
    assert_eq!(t.rows_f32(1, 2).unwrap(), vec![4.0, 5.0, 6.0]);
}

// ---------------------------------------------------------------------------------------------
// Header, metadata, alignment
// ---------------------------------------------------------------------------------------------

fn all_kinds() -> Vec<(String, MetaValue)> {
    vec![
        ("u8".into(), MetaValue::U8(200)),
        ("i8".into(), MetaValue::I8(-100)),
        ("u16".into(), MetaValue::U16(60000)),
        ("i16".into(), MetaValue::I16(-30000)),
        ("u32".into(), MetaValue::U32(4_000_000_000)),
        ("i32".into(), MetaValue::I32(-2_000_000_000)),
        ("f32".into(), MetaValue::F32(1.5e-5)),
        ("bool".into(), MetaValue::Bool(true)),
        ("str".into(), s("héllo ✓")),
        ("empty".into(), s("")),
        (
            "arr.u8".into(),
            MetaValue::Array(MetaArray::U8(vec![1, 255])),
        ),
        ("arr.i8".into(), MetaValue::Array(MetaArray::I8(vec![-1]))),
        (
            "arr.u16".into(),
            MetaValue::Array(MetaArray::U16(vec![7, 65535])),
        ),
        ("arr.i16".into(), MetaValue::Array(MetaArray::I16(vec![-7]))),
        (
            "arr.u32".into(),
            MetaValue::Array(MetaArray::U32(vec![1, 2])),
        ),
        (
            "arr.i32".into(),
            MetaValue::Array(MetaArray::I32(vec![-3, 4])),
        ),
        (
            "arr.f32".into(),
            MetaValue::Array(MetaArray::F32(vec![0.5, -1.0])),
        ),
        (
            "arr.bool".into(),
            MetaValue::Array(MetaArray::Bool(vec![true, false, true])),
        ),
        ("arr.str".into(), strs(&["a", "", "c d"])),
        (
            "arr.nested".into(),
            MetaValue::Array(MetaArray::Array(vec![
                MetaArray::I64(vec![-1]),
                MetaArray::String(vec!["x".into()]),
            ])),
        ),
        (
            "arr.u64".into(),
            MetaValue::Array(MetaArray::U64(vec![u64::MAX])),
        ),
        (
            "arr.i64".into(),
            MetaValue::Array(MetaArray::I64(vec![i64::MIN])),
        ),
        (
            "arr.f64".into(),
            MetaValue::Array(MetaArray::F64(vec![1e300])),
        ),
        ("arr.empty".into(), MetaValue::Array(MetaArray::U8(vec![]))),
        ("u64".into(), MetaValue::U64(u64::MAX)),
        ("i64".into(), MetaValue::I64(i64::MIN)),
        ("f64".into(), MetaValue::F64(-2.5e300)),
    ]
}

#[test]
fn v2_and_v3_headers_with_every_value_type() {
    for version in [2, 3] {
        let mut w = Writer::new().f32_tensor("x", &[2], &[1.0, 2.0]);
        w.version = version;
        for (k, v) in all_kinds() {
            w = w.kv(&k, v);
        }
        let (_t, f) = open_bytes(&w.bytes());
        let f = f.unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.alignment(), 32);
        for (k, v) in all_kinds() {
            assert_eq!(f.get(&k), Some(&v), "{k} in v{version}");
        }
        assert_eq!(f.metadata().len(), all_kinds().len());
        assert_eq!(
            f.tensor("x").unwrap().into_f32_vec().unwrap(),
            vec![1.0, 2.0]
        );
        assert_eq!(f.data_start() % 32, 0);
    }
}

#[test]
fn custom_alignment_is_used() {
    let w = Writer::new()
        .kv("general.alignment", MetaValue::U32(64))
        .f32_tensor("a", &[3], &[1.0, 2.0, 3.0])
        .f32_tensor("b", &[2], &[4.0, 5.0]);
    let bytes = w.bytes();
    let (_t, f) = open_bytes(&bytes);
    let f = f.unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_start() % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(
        f.tensor("b").unwrap().into_f32_vec().unwrap(),
        vec![4.0, 5.0]
    );
}

// ---------------------------------------------------------------------------------------------
// Corrupt and unsupported files
// ---------------------------------------------------------------------------------------------

fn small_file() -> Writer {
    Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("list", strs(&["x", "yz"]))
        .f32_tensor("first", &[4], &[1.0, 2.0, 3.0, 4.0])
        .tensor("second", &[32, 2], GgmlType::Q8_0, vec![0u8; 68])
}

fn expect_weights_err(bytes: &[u8], needles: &[&str]) {
    let (t, r) = open_bytes(bytes);
    match r {
        Err(e @ Error::Weights { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&t.path.display().to_string()),
                "no path in: {msg}"
            );
            for n in needles {
                assert!(msg.contains(n), "`{n}` not in: {msg}");
            }
        }
        Err(e) => panic!("expected Error::Weights, got {e:?}"),
        Ok(_) => panic!("corrupt file opened (wanted {needles:?})"),
    }
}

fn expect_unsupported(bytes: &[u8], needles: &[&str]) {
    let (t, r) = open_bytes(bytes);
    match r {
        Err(e @ Error::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&t.path.display().to_string()),
                "no path in: {msg}"
            );
            for n in needles {
                assert!(msg.contains(n), "`{n}` not in: {msg}");
            }
        }
        Err(e) => panic!("expected Error::Unsupported, got {e:?}"),
        Ok(_) => panic!("unsupported file opened (wanted {needles:?})"),
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = small_file().bytes();
    assert!(open_bytes(&bytes).1.is_ok());
    let t = write_tmp(b"");
    for len in 0..bytes.len() {
        std::fs::write(&t.path, &bytes[..len]).unwrap();
        match GgufFile::open(&t.path) {
            Err(Error::Weights { path, msg }) => {
                assert_eq!(path, t.path);
                assert!(msg.contains("truncated"), "len {len}: {msg}");
            }
            other => panic!("len {len}: {other:?}"),
        }
    }
    // Cut inside the last tensor's data: the message names it.
    expect_weights_err(&bytes[..bytes.len() - 1], &["`second`", "truncated"]);
}

#[test]
fn bad_magic_and_versions() {
    let good = small_file().bytes();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    expect_weights_err(&b, &["not a GGUF file"]);
    for (v, needle) in [
        (1u32, "version"),
        (4, "version"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        expect_unsupported(&b, &[needle]);
    }
    let (_t, r) = open_bytes(b"GGUF");
    assert!(matches!(r, Err(Error::Weights { .. })));
    let missing = GgufFile::open("/nonexistent/dir/model.gguf");
    assert!(matches!(missing, Err(Error::MissingFile { .. })));
}

#[test]
fn absurd_counts_and_lengths_are_rejected_without_allocating() {
    let good = small_file().bytes();
    // tensor count, then metadata count.
    for (at, needle) in [(8, "tensor count"), (16, "metadata count")] {
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_weights_err(&b, &[needle, "truncated or corrupt"]);
    }
    // The first key's length.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    expect_weights_err(&b, &["length of metadata key #0"]);
    // The string array's element count: key "list" starts after the first key/value.
    let first_kv = 8 + "general.architecture".len() + 4 + 8 + "llama".len();
    let count_at = 24 + first_kv + 8 + "list".len() + 4 + 4;
    let mut b = good.clone();
    b[count_at..count_at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_weights_err(
        &b,
        &["element count of metadata `list`", "truncated or corrupt"],
    );
    // An array element's string length.
    let mut b = good.clone();
    b[count_at + 8..count_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_weights_err(&b, &["metadata `list`[0]"]);
}

/// Byte position of a tensor's info fields, found by name.
fn info_at(bytes: &[u8], name: &str) -> usize {
    let needle: Vec<u8> = (name.len() as u64)
        .to_le_bytes()
        .into_iter()
        .chain(name.bytes())
        .collect();
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len()
}

#[test]
fn bad_tensor_infos_are_rejected() {
    let good = small_file().bytes();
    let second = info_at(&good, "second"); // n_dims u32, dims 2 x u64, type u32, offset u64
    let (dims_at, type_at, offset_at) = (second + 4, second + 20, second + 24);

    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    expect_unsupported(&b, &["id 99", "`second`"]);

    let mut b = good.clone();
    b[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_weights_err(&b, &["`second`", "past the end"]);

    let mut b = good.clone();
    b[offset_at..offset_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_weights_err(&b, &["`second`"]);

    let mut b = good.clone();
    b[offset_at..offset_at + 8].copy_from_slice(&33u64.to_le_bytes());
    expect_weights_err(&b, &["`second`", "alignment"]);

    let mut b = good.clone();
    b[dims_at..dims_at + 8].copy_from_slice(&33u64.to_le_bytes());
    expect_weights_err(&b, &["`second`", "block size"]);

    let mut b = good.clone();
    b[dims_at + 8..dims_at + 16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    expect_weights_err(&b, &["`second`"]);

    let mut b = good.clone();
    b[second..second + 4].copy_from_slice(&5u32.to_le_bytes());
    expect_weights_err(&b, &["`second`", "5 dimensions"]);
}

#[test]
fn bad_metadata_is_rejected() {
    let dup = Writer::new()
        .kv("a", MetaValue::U8(1))
        .kv("a", MetaValue::U8(2))
        .bytes();
    expect_weights_err(&dup, &["duplicate metadata key `a`"]);
    let align = Writer::new()
        .kv("general.alignment", MetaValue::U32(24))
        .bytes();
    expect_weights_err(&align, &["general.alignment"]);
    let align_type = Writer::new()
        .kv("general.alignment", MetaValue::U64(32))
        .bytes();
    expect_weights_err(&align_type, &["general.alignment"]);
    let mut b = Writer::new().kv("flag", MetaValue::Bool(true)).bytes();
    let n = b.len();
    b[n - 1] = 2;
    expect_weights_err(&b, &["metadata `flag`", "bool"]);
    let mut b = Writer::new().kv("k", MetaValue::U8(1)).bytes();
    let n = b.len();
    b[n - 5..n - 1].copy_from_slice(&13u32.to_le_bytes());
    expect_weights_err(&b, &["unknown metadata value type 13"]);
    let mut b = Writer::new().kv("k", s("ab")).bytes();
    let n = b.len();
    b[n - 1] = 0xff;
    expect_weights_err(&b, &["metadata `k`", "UTF-8"]);
    let mut b = Writer::new()
        .kv(
            "flags",
            MetaValue::Array(MetaArray::Bool(vec![true, false])),
        )
        .bytes();
    let n = b.len();
    b[n - 1] = 7;
    expect_weights_err(&b, &["metadata `flags`[1]", "bool"]);
    // Arrays nested 9 deep.
    let mut deep = MetaArray::U8(vec![1]);
    for _ in 0..9 {
        deep = MetaArray::Array(vec![deep]);
    }
    let b = Writer::new().kv("deep", MetaValue::Array(deep)).bytes();
    expect_weights_err(&b, &["metadata `deep`", "nested deeper"]);
    let dup_t = Writer::new()
        .f32_tensor("x", &[1], &[1.0])
        .f32_tensor("x", &[1], &[2.0])
        .bytes();
    expect_weights_err(&dup_t, &["duplicate tensor name `x`"]);
}

#[test]
fn types_known_but_not_dequantised_are_unsupported_on_load() {
    let w = Writer::new().tensor("iq", &[256], GgmlType::IQ2_XXS, vec![0u8; 66]);
    let (t, f) = open_bytes(&w.bytes());
    let f = f.unwrap();
    assert_eq!(f.tensor_info("iq").unwrap().ggml_type, GgmlType::IQ2_XXS);
    match f.tensor("iq") {
        Err(e @ Error::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("IQ2_XXS")
                    && msg.contains("`iq`")
                    && msg.contains(&t.path.display().to_string()),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(f.tensor("nope"), Err(Error::MissingTensor { .. })));
}

// ---------------------------------------------------------------------------------------------
// A tiny LLaMA
// ---------------------------------------------------------------------------------------------

const HID: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 8;
const INTER: usize = 64;

/// llama.cpp's `permute`: w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).
fn llama_cpp_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + j * half + i;
                out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn ramp(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + seed).sin() * 100.0).round() / 64.0)
        .collect()
}

/// Byte tokens, "ab", two control tokens, one user-defined token.
fn tiny_vocab() -> (MetaValue, MetaValue) {
    let alphabet = fineprune::model::gguf::bytes_to_unicode();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend([
        "ab".into(),
        "<|s|>".into(),
        "<|e|>".into(),
        "<think>".into(),
    ]);
    let mut types = vec![1i32; 256];
    types.extend([1, 3, 3, 4]);
    (
        MetaValue::Array(MetaArray::String(tokens)),
        MetaValue::Array(MetaArray::I32(types)),
    )
}

fn tiny_llama(layers: usize, tied: bool) -> (Writer, Vec<Vec<f32>>) {
    let (tokens, types) = tiny_vocab();
    let vocab = tokens.as_array().unwrap().len();
    let mut w = Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("llama.block_count", MetaValue::U32(layers as u32))
        .kv("llama.context_length", MetaValue::U32(128))
        .kv("llama.embedding_length", MetaValue::U32(HID as u32))
        .kv("llama.feed_forward_length", MetaValue::U32(INTER as u32))
        .kv("llama.attention.head_count", MetaValue::U32(HEADS as u32))
        .kv("llama.attention.head_count_kv", MetaValue::U32(KV as u32))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .kv("llama.rope.freq_base", MetaValue::F32(50000.0))
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv("tokenizer.ggml.tokens", tokens)
        .kv("tokenizer.ggml.token_type", types)
        .kv("tokenizer.ggml.merges", strs(&["a b"]))
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(257))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(258))
        .kv("tokenizer.chat_template", s("{{ messages }}"));
    // Embeddings as Q8_0 with d = 1: value = (row + col) % 50 - 25.
    let mut emb = vec![];
    for r in 0..vocab {
        emb.extend(f16b(1.0));
        emb.extend((0..32).map(|c| (((r + c) % 50) as i8 - 25) as u8));
    }
    w = w.tensor(
        "token_embd.weight",
        &[HID as u64, vocab as u64],
        GgmlType::Q8_0,
        emb,
    );
    let mut hf_qk = vec![];
    for l in 0..layers {
        let q = ramp(HEADS * HD * HID, l as f32);
        let k = ramp(KV * HD * HID, 10.0 + l as f32);
        w = w
            .f32_tensor(
                &format!("blk.{l}.attn_q.weight"),
                &[HID as u64, (HEADS * HD) as u64],
                &llama_cpp_permute(&q, HEADS, HID),
            )
            .f32_tensor(
                &format!("blk.{l}.attn_k.weight"),
                &[HID as u64, (KV * HD) as u64],
                &llama_cpp_permute(&k, KV, HID),
            )
            .f32_tensor(
                &format!("blk.{l}.attn_v.weight"),
                &[HID as u64, (KV * HD) as u64],
                &ramp(KV * HD * HID, 3.0),
            )
            .f32_tensor(
                &format!("blk.{l}.attn_output.weight"),
                &[(HEADS * HD) as u64, HID as u64],
                &ramp(HID * HEADS * HD, 4.0),
            )
            .f32_tensor(
                &format!("blk.{l}.attn_norm.weight"),
                &[HID as u64],
                &ramp(HID, 5.0),
            )
            .f32_tensor(
                &format!("blk.{l}.ffn_norm.weight"),
                &[HID as u64],
                &ramp(HID, 6.0),
            )
            .tensor(
                &format!("blk.{l}.ffn_gate.weight"),
                &[HID as u64, INTER as u64],
                GgmlType::Q4_0,
                vec![0x88; INTER * 18],
            )
            .tensor(
                &format!("blk.{l}.ffn_up.weight"),
                &[HID as u64, INTER as u64],
                GgmlType::Q4_1,
                vec![0; INTER * 20],
            )
            .f32_tensor(
                &format!("blk.{l}.ffn_down.weight"),
                &[INTER as u64, HID as u64],
                &ramp(HID * INTER, 7.0),
            );
        hf_qk.push(q);
        hf_qk.push(k);
    }
    w = w.f32_tensor("output_norm.weight", &[HID as u64], &[1.0; HID]);
    if !tied {
        w = w.f32_tensor(
            "output.weight",
            &[HID as u64, vocab as u64],
            &ramp(vocab * HID, 8.0),
        );
    }
    (w, hf_qk)
}

#[test]
fn tiny_llama_loads_in_hf_layout() {
    for tied in [true, false] {
        let (w, hf_qk) = tiny_llama(2, tied);
        let t = write_tmp(&w.bytes());
        let m = load_llama(&t.path).unwrap();
        let c = &m.config;
        assert_eq!(
            (
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim
            ),
            (2, HID, INTER, HEADS, KV, HD)
        );
        assert_eq!((c.vocab_size, c.max_position_embeddings), (260, 128));
        assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.tie_word_embeddings, tied);
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(257), vec![258])
        );
        assert!(!c.attention_bias && !c.mlp_bias);
        assert_eq!(m.tensors.len(), 2 * 9 + 2 + usize::from(!tied));
        assert_eq!(m.tensors.contains_key("lm_head.weight"), !tied);
        // Read in place from the file mapping, except Q and K, whose rows are permuted back.
        for (name, t) in &m.tensors {
            let permuted = name.contains("q_proj") || name.contains("k_proj");
            assert_eq!(t.is_mapped(), !permuted, "{name} ({})", t.dtype());
        }
        for l in 0..2 {
            let q = &m.tensors[&format!("model.layers.{l}.self_attn.q_proj.weight")];
            assert_eq!(q.shape(), &[HEADS * HD, HID]);
            assert_eq!(
                q.f32s().unwrap(),
                &hf_qk[2 * l][..],
                "q rows back in HF order"
            );
            let k = &m.tensors[&format!("model.layers.{l}.self_attn.k_proj.weight")];
            assert_eq!(k.shape(), &[KV * HD, HID]);
            assert_eq!(
                k.f32s().unwrap(),
                &hf_qk[2 * l + 1][..],
                "k rows back in HF order"
            );
            let gate = &m.tensors[&format!("model.layers.{l}.mlp.gate_proj.weight")];
            assert_eq!(gate.shape(), &[INTER, HID]);
            // Q4_0 stays in its blocks, and reads back as its values (nibbles 8 - 8).
            assert_eq!(gate.dtype(), fineprune::DType::Quant(GgmlType::Q4_0));
            assert!(gate.to_vec_f32().unwrap().iter().all(|&x| x == 0.0));
            let down = &m.tensors[&format!("model.layers.{l}.mlp.down_proj.weight")];
            assert_eq!(down.shape(), &[HID, INTER]);
        }
        let emb = &m.tensors["model.embed_tokens.weight"];
        assert_eq!(emb.shape(), &[260, HID]);
        assert_eq!(emb.rows_f32(3, 4).unwrap()[..3], [-22.0, -21.0, -20.0]);
        assert_eq!(m.chat_template.as_deref(), Some("{{ messages }}"));

        let tok = m.tokenizer.as_ref().unwrap();
        let enc = tok.encode("ab<|s|>a b<think><|e|>", true).unwrap();
        let (a, b_, space) = (u32::from(b'a'), u32::from(b'b'), u32::from(b' ')); // token id = byte
        assert_eq!(tok.id_to_token(space).as_deref(), Some("Ġ"));
        assert_eq!(enc.get_ids(), &[256, 257, a, space, b_, 259, 258]);
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            "ab<|s|>a b<think><|e|>"
        );
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "aba b<think>");
    }
}

#[test]
fn tiny_llama_errors() {
    // Another architecture.
    let mut w = tiny_llama(1, true).0;
    w.kv[0].1 = s("gpt2");
    let t = write_tmp(&w.bytes());
    match load_llama(&t.path) {
        Err(e @ Error::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("`gpt2`") && msg.contains(&t.path.display().to_string()),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A tensor outside the LLaMA layout.
    let w = tiny_llama(1, true)
        .0
        .f32_tensor("rope_freqs.weight", &[4], &[1.0; 4]);
    let t = write_tmp(&w.bytes());
    assert!(
        matches!(load_llama(&t.path), Err(Error::Unsupported { value, .. }) if value.contains("rope_freqs.weight"))
    );
    // A layer past block_count.
    let w = tiny_llama(1, true)
        .0
        .f32_tensor("blk.1.attn_norm.weight", &[HID as u64], &[1.0; HID]);
    let t = write_tmp(&w.bytes());
    assert!(
        matches!(load_llama(&t.path), Err(Error::Unsupported { value, .. }) if value.contains("blk.1.attn_norm"))
    );
    // A missing tensor.
    let mut w = tiny_llama(1, true).0;
    w.tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
    let t = write_tmp(&w.bytes());
    match load_llama(&t.path) {
        Err(Error::MissingTensor { name, tried, .. }) => {
            assert_eq!(
                (name.as_str(), tried.as_str()),
                ("model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight")
            );
        }
        other => panic!("{other:?}"),
    }
    // A wrong shape.
    let mut w = tiny_llama(1, true).0;
    for t in &mut w.tensors {
        if t.name == "blk.0.attn_norm.weight" {
            t.dims = vec![HID as u64 / 2, 2];
        }
    }
    let t = write_tmp(&w.bytes());
    assert!(
        matches!(load_llama(&t.path), Err(Error::Shape { name, .. }) if name.contains("input_layernorm"))
    );
    // A missing config key.
    let mut w = tiny_llama(1, true).0;
    w.kv.retain(|(k, _)| k != "llama.feed_forward_length");
    let t = write_tmp(&w.bytes());
    assert!(
        matches!(load_llama(&t.path), Err(Error::Config { msg, .. }) if msg.contains("llama.feed_forward_length"))
    );
    // Unigram (T5) vocabularies are not built.
    let mut w = tiny_llama(1, true).0;
    for (k, v) in &mut w.kv {
        if k == "tokenizer.ggml.model" {
            *v = s("t5");
        }
    }
    let t = write_tmp(&w.bytes());
    assert!(
        matches!(load_llama(&t.path), Err(Error::Unsupported { value, .. }) if value.contains("`t5`"))
    );
}

/// Sizes and numbers the metadata cannot mean are refused at load with the GGUF key named,
/// before anything is sized by them: a block count of 10^7 once built 90 million tensor names
/// (gigabytes) and 2^32 - 1 hung.
#[test]
fn impossible_metadata_is_refused_with_the_key_named() {
    let cases: Vec<(&str, MetaValue, &str)> = vec![
        (
            "llama.block_count",
            MetaValue::U32(10_000_000),
            "at most 1 layers",
        ),
        (
            "llama.block_count",
            MetaValue::U32(u32::MAX),
            "at most 1 layers",
        ),
        ("llama.block_count", MetaValue::U32(0), "must be at least 1"),
        ("llama.rope.freq_base", MetaValue::F32(0.0), "> 0"),
        ("llama.rope.freq_base", MetaValue::F32(-10000.0), "> 0"),
        ("llama.rope.freq_base", MetaValue::F32(f32::NAN), "> 0"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(-1e-5),
            ">= 0",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(f32::INFINITY),
            ">= 0",
        ),
        (
            "llama.context_length",
            MetaValue::U32(0),
            "must be at least 1",
        ),
        (
            "llama.embedding_length",
            MetaValue::U32(0),
            "must be at least 1",
        ),
        (
            "llama.feed_forward_length",
            MetaValue::U32(0),
            "must be at least 1",
        ),
    ];
    for (key, value, needle) in cases {
        let mut w = tiny_llama(1, true).0;
        for (k, v) in &mut w.kv {
            if k == key {
                *v = value.clone();
            }
        }
        let t = write_tmp(&w.bytes());
        let t0 = std::time::Instant::now();
        match load_llama(&t.path) {
            Err(e @ Error::Config { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(key) && msg.contains(needle), "{key}: {msg}");
            }
            other => panic!("{key} = {value:?}: {:?}", other.map(|_| ())),
        }
        assert!(t0.elapsed().as_secs() < 5, "{key}: took {:?}", t0.elapsed());
    }
}

#[test]
fn add_bos_token_adds_bos() {
    let w = tiny_llama(1, true)
        .0
        .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
    let t = write_tmp(&w.bytes());
    let f = GgufFile::open(&t.path).unwrap();
    let tok = f.tokenizer().unwrap().unwrap();
    assert_eq!(tok.encode("ab", true).unwrap().get_ids(), &[257, 256]);
    assert_eq!(tok.encode("ab", false).unwrap().get_ids(), &[256]);
}

/// `tokenizer.ggml.pre` picks transformers' split regex (Llama 3's splits digits in threes), and
/// tokens stored outside the byte alphabet are respelled from their bytes.
#[test]
fn byte_level_pre_tokenizer_and_respelling() {
    let alphabet = fineprune::model::gguf::bytes_to_unicode();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend(["12", "34", "123", " x"].map(String::from)); // " x" is stored raw
    let build = |pre: Option<&str>| {
        let mut w = Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("tokenizer.ggml.model", s("gpt2"))
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(tokens.clone())),
            )
            .kv(
                "tokenizer.ggml.merges",
                strs(&["3 4", "1 2", "12 3", "Ġ x"]),
            );
        if let Some(p) = pre {
            w = w.kv("tokenizer.ggml.pre", s(p));
        }
        let (_t, f) = open_bytes(&w.bytes());
        f.unwrap().tokenizer().unwrap().unwrap()
    };
    // GPT-2's regex keeps "1234" whole: "3 4" merges first.
    let gpt2 = build(Some("smollm"));
    assert_eq!(
        gpt2.encode("1234 x", false).unwrap().get_ids(),
        &[256, 257, 259]
    );
    assert_eq!(
        build(None).encode("1234", false).unwrap().get_ids(),
        &[256, 257]
    );
    // Llama 3's regex splits "123" | "4".
    let llama3 = build(Some("llama-bpe"));
    assert_eq!(
        llama3.encode("1234 x", false).unwrap().get_ids(),
        &[258, u32::from(b'4'), 259]
    );
    assert_eq!(llama3.id_to_token(259).as_deref(), Some("Ġx"));
    assert_eq!(llama3.decode(&[258, 259], false).unwrap(), "123 x");
}

/// SentencePiece (`llama`) vocabularies against transformers (tests/reference/gguf_spm_ref.py):
/// merges derived from scores, byte fallback, `Metaspace`, BOS/EOS flags.
#[test]
fn sentencepiece_tokenizer_matches_transformers() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_spm_ref.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let tokens: Vec<String> = j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    let types: Vec<i32> = j["token_type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect();
    let scores: Vec<f32> = j["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    for v in j["variants"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let mut w = Writer::new()
            .kv("general.architecture", s("llama"))
            .kv("tokenizer.ggml.model", s("llama"))
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(tokens.clone())),
            )
            .kv(
                "tokenizer.ggml.token_type",
                MetaValue::Array(MetaArray::I32(types.clone())),
            )
            .kv(
                "tokenizer.ggml.scores",
                MetaValue::Array(MetaArray::F32(scores.clone())),
            )
            .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
            .kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(0));
        for (key, flag) in [
            ("add_space_prefix", "add_space_prefix"),
            ("add_bos_token", "add_bos_token"),
            ("add_eos_token", "add_eos_token"),
        ] {
            if let Some(b) = v.get(key).and_then(|x| x.as_bool()) {
                w = w.kv(&format!("tokenizer.ggml.{flag}"), MetaValue::Bool(b));
            }
        }
        let (_t, f) = open_bytes(&w.bytes());
        let tok = f.unwrap().tokenizer().unwrap().unwrap();
        for case in v["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let with = tok.encode(text, true).unwrap();
            assert_eq!(with.get_ids(), &ids(&case["ids"])[..], "{name}: {text:?}");
            assert_eq!(
                tok.encode(text, false).unwrap().get_ids(),
                &ids(&case["plain"])[..],
                "{name}: {text:?} plain"
            );
            assert_eq!(
                tok.decode(with.get_ids(), false).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{name}: decode {text:?}"
            );
        }
        let mut ours: serde_json::Value =
            serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        ours["model"].as_object_mut().unwrap().remove("vocab");
        assert_eq!(ours, v["backend_without_vocab"], "{name}: tokenizer.json");
    }
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct Q4_1 file
// ---------------------------------------------------------------------------------------------

#[test]
fn smollm2_every_tensor_matches_gguf_py() {
    let Some(path) = smollm2_path() else { return };
    let f = GgufFile::open(&path).unwrap();
    let bytes = reference();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for info in f.tensor_infos() {
        *counts.entry(info.ggml_type.name()).or_insert(0) += 1;
        let t = f.tensor(&info.name).unwrap();
        let v = t.to_vec_f32().unwrap();
        let (mut s1, mut s2) = (0u64, 0u64);
        for (i, x) in v.iter().enumerate() {
            let b = u64::from(x.to_bits());
            s1 = s1.wrapping_add(b);
            s2 = s2.wrapping_add(b.wrapping_mul(i as u64 + 1));
        }
        assert_eq!(
            [v.len() as u64, s1, s2],
            st_u64(&st, &format!("smol.sum.{}", info.name))[..],
            "{}",
            info.name
        );
        if let Ok(idx) = st.tensor(&format!("smol.rowidx.{}", info.name)) {
            let rows: Vec<usize> = idx
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
                .collect();
            let (shape, want) = st_f32(&st, &format!("smol.rows.{}", info.name));
            let cols = shape[1];
            let n_rows = t.len() / cols;
            let t = t.reshape(&[n_rows, cols]).unwrap();
            for (k, &r) in rows.iter().enumerate() {
                assert_eq!(
                    bits(&t.rows_f32(r, r + 1).unwrap()),
                    bits(&want[k * cols..(k + 1) * cols]),
                    "{} row {r}",
                    info.name
                );
            }
        }
    }
    println!("SmolLM2 tensor types: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 272);
}

#[test]
fn smollm2_loads_as_llama() {
    let Some(path) = smollm2_path() else { return };
    let m = load_llama(&path).unwrap();
    let c = &m.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (49152, 8192));
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5f32 as f64);
    assert!(c.tie_word_embeddings);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert_eq!(m.tensors.len(), 272);
    assert!(!m.tensors.contains_key("lm_head.weight"));
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));

    // Un-permuted q/k rows against gguf-py's rows in llama.cpp order: within a head of 64 rows,
    // GGUF row 2i + j is HF row 32j + i.
    let bytes = reference();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (gguf, hf, n) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            9,
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            3,
        ),
    ] {
        let idx = st.tensor(&format!("smol.rowidx.{gguf}")).unwrap();
        let rows: Vec<usize> = idx
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
            .collect();
        let (_, want) = st_f32(&st, &format!("smol.rows.{gguf}"));
        let t = &m.tensors[hf];
        assert_eq!(t.shape()[0], n * 64);
        for (k, &g) in rows.iter().enumerate() {
            let (h, r) = (g / 64, g % 64);
            let hf_row = h * 64 + (r % 2) * 32 + r / 2;
            assert_eq!(
                bits(&t.rows_f32(hf_row, hf_row + 1).unwrap()),
                bits(&want[k * 576..(k + 1) * 576]),
                "{hf} row {hf_row}"
            );
        }
    }
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(path) = smollm2_path() else { return };
    let f = GgufFile::open(&path).unwrap();
    let tok = f.tokenizer().unwrap().unwrap();
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_tokenizer_ref.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut n = 0;
    for case in j["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), &want[..], "ids for {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        n += 1;
    }
    assert!(n >= 20);
    // The pipeline (everything but vocabulary and merges) is the one transformers builds.
    let mut ours: serde_json::Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    let model = ours["model"].as_object_mut().unwrap();
    model.remove("vocab");
    model.remove("merges");
    assert_eq!(ours, j["backend_without_vocab"]);
}

/// Chats through the GGUF's own chat template (its `tokenizer.chat_template` metadata) give the
/// text and ids of transformers' `tokenizer.apply_chat_template` (string content, no special
/// tokens added: the template writes them).
#[test]
fn smollm2_chats_match_transformers_apply_chat_template() {
    use fineprune::model::chat::ChatMessage;
    let Some(path) = smollm2_path() else { return };
    let engine =
        fineprune::Engine::new(std::sync::Arc::new(fineprune::Model::load(&path).unwrap()));
    let template = (engine.model().chat_template.as_ref()).expect("the GGUF has a chat template");
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gguf_tokenizer_ref.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let chats = j["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 3);
    for c in chats {
        let messages: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let text = template.render(&messages, true).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap());
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        let req = fineprune::Request::chat(messages, vec![]);
        assert_eq!(
            engine.prepare(&req).unwrap().prompt.ids,
            want,
            "ids of {text:?}"
        );
    }
}

/// transformers' own dequantised and un-permuted weights and tokenizer ids
/// (tests/reference/gen_smollm2.py), when that fixture is present.
#[test]
fn smollm2_matches_transformers_weights() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let (st_path, json_path) = (
        dir.join("smollm2_ref.safetensors"),
        dir.join("smollm2_ref.json"),
    );
    if !st_path.exists() || !json_path.exists() {
        println!("skipped: {} is absent", st_path.display());
        return;
    }
    let Some(path) = smollm2_path() else { return };
    let m = load_llama(&path).unwrap();
    let bytes = std::fs::read(&st_path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let l0 = "model.layers.0.";
    let pairs = [
        ("w_embed_rows", "model.embed_tokens.weight".to_string()),
        ("w_q0_rows", format!("{l0}self_attn.q_proj.weight")),
        ("w_k0_rows", format!("{l0}self_attn.k_proj.weight")),
        ("w_v0_rows", format!("{l0}self_attn.v_proj.weight")),
        ("w_o0_rows", format!("{l0}self_attn.o_proj.weight")),
        ("w_gate0_rows", format!("{l0}mlp.gate_proj.weight")),
        ("w_up0_rows", format!("{l0}mlp.up_proj.weight")),
        ("w_down0_rows", format!("{l0}mlp.down_proj.weight")),
        ("w_attn_norm0", format!("{l0}input_layernorm.weight")),
        ("w_final_norm", "model.norm.weight".to_string()),
    ];
    for (key, name) in pairs {
        let (shape, want) = st_f32(&st, key);
        let t: &Tensor = &m.tensors[&name];
        let rows = if shape.len() == 2 { shape[0] } else { 1 };
        let got = if shape.len() == 2 {
            t.rows_f32(0, rows).unwrap()
        } else {
            t.to_vec_f32().unwrap()
        };
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{key}: max |ours - transformers| = {max:e}");
        assert_eq!(got.len(), want.len(), "{key}");
        assert!(max <= 1e-6, "{key}: {max}");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut n = 0;
    for case in j["tokenizer_checks"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap().get_ids(),
            &ids(&case["ids"])[..],
            "{text:?}"
        );
        let with = case.get("ids_with_special").unwrap_or(&case["ids"]);
        assert_eq!(
            tok.encode(text, true).unwrap().get_ids(),
            &ids(with)[..],
            "{text:?} with specials"
        );
        n += 1;
    }
    for p in j["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, false).unwrap().get_ids(),
            &ids(&p["input_ids"])[..],
            "{text:?}"
        );
        n += 1;
    }
    println!("{n} tokenizer strings match transformers");
    let hf = &j["config"];
    let c = &m.config;
    let u = |k: &str| hf[k].as_u64().unwrap() as usize;
    assert_eq!(
        (
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads
        ),
        (
            u("hidden_size"),
            u("intermediate_size"),
            u("num_hidden_layers"),
            u("num_attention_heads")
        )
    );
    assert_eq!(
        (
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size,
            c.max_position_embeddings
        ),
        (
            u("num_key_value_heads"),
            u("head_dim"),
            u("vocab_size"),
            u("max_position_embeddings")
        )
    );
    assert_eq!(c.rms_norm_eps, hf["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        c.rope_theta,
        hf["rope_parameters"]["rope_theta"].as_f64().unwrap()
    );
    assert_eq!(
        c.tie_word_embeddings,
        hf["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(c.bos_token_id, Some(u("bos_token_id") as u32));
    assert_eq!(c.eos_token_ids, vec![u("eos_token_id") as u32]);
    if let Some(t) = j["chat_template"].as_str() {
        assert_eq!(m.chat_template.as_deref(), Some(t));
    }
}
