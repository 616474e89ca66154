//! GGUF (llama.cpp's single-file format) import: a bounds-checked reader for versions 2 and 3,
//! dequantisation of the common ggml block types to f32, the mapping of a `llama` GGUF onto HF
//! `LlamaForCausalLM` names (undoing llama.cpp's Q/K row permutation), a [`TextConfig`] from the
//! metadata, and a `tokenizers` tokenizer rebuilt from the vocabulary the file carries.
//!
//! The reference is transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`,
//! `integrations/gguf/*`, transformers 5.23) and, for the block layouts, ggml's `ggml-quants.c` as
//! mirrored by gguf-py's `quants.py`; dequantised values are bit-identical to gguf-py's.
//!
//! File layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64`
//! metadata count, the metadata key/values, the tensor infos (name, `u32` n_dims, `u64` dims
//! fastest-first, `u32` ggml type, `u64` offset), padding to `general.alignment` (default 32), then
//! the tensor data, each tensor at its offset from the start of that data section.

use crate::error::{Error, Result};
use crate::model::config::TextConfig;
use crate::tensor::{HostBuf, Plain, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside arrays we accept in metadata.
const MAX_ARRAY_DEPTH: usize = 8;

// ---------------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type (`enum ggml_type`), with its block geometry.
///
/// Every type llama.cpp writes is known here, so a file's bounds can be checked whatever it holds;
/// [`GgmlType::can_dequantize`] tells which ones this crate turns into numbers.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

impl GgmlType {
    /// `(type, id, elements per block, bytes per block)` for every known type.
    const TABLE: [(GgmlType, u32, usize, usize); 34] = [
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q8_1, 9, 32, 36),
        (GgmlType::Q2_K, 10, 256, 84),
        (GgmlType::Q3_K, 11, 256, 110),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q5_K, 13, 256, 176),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::Q8_K, 15, 256, 292),
        (GgmlType::IQ2_XXS, 16, 256, 66),
        (GgmlType::IQ2_XS, 17, 256, 74),
        (GgmlType::IQ3_XXS, 18, 256, 98),
        (GgmlType::IQ1_S, 19, 256, 50),
        (GgmlType::IQ4_NL, 20, 32, 18),
        (GgmlType::IQ3_S, 21, 256, 110),
        (GgmlType::IQ2_S, 22, 256, 82),
        (GgmlType::IQ4_XS, 23, 256, 136),
        (GgmlType::I8, 24, 1, 1),
        (GgmlType::I16, 25, 1, 2),
        (GgmlType::I32, 26, 1, 4),
        (GgmlType::I64, 27, 1, 8),
        (GgmlType::F64, 28, 1, 8),
        (GgmlType::IQ1_M, 29, 256, 56),
        (GgmlType::BF16, 30, 1, 2),
        (GgmlType::TQ1_0, 34, 256, 54),
        (GgmlType::TQ2_0, 35, 256, 66),
        (GgmlType::MXFP4, 39, 32, 17),
        (GgmlType::NVFP4, 40, 64, 36),
        (GgmlType::Q1_0, 41, 128, 18),
    ];

    fn row(self) -> (GgmlType, u32, usize, usize) {
        // The table lists every variant, so the search always succeeds.
        Self::TABLE
            .iter()
            .copied()
            .find(|r| r.0 == self)
            .unwrap_or((self, u32::MAX, 1, 1))
    }

    /// The type with ggml id `id`, if it is one ggml defines.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> usize {
        self.row().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().3
    }

    /// ggml's name for the type (`Q4_1`, `BF16`, ...).
    pub fn name(self) -> String {
        format!("{self:?}")
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::F64
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number of blocks or
    /// the size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// One metadata value (`gguf_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// A typed array, stored compactly.
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// The GGUF type name of this value (`u32`, `string`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    /// Any integer type holding a value that fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }

    /// A float, or an integer read as a float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A metadata array: one vector of its element type, so a file's arrays take about as much memory
/// as their bytes on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF type name of the elements.
    pub fn elem_type_name(&self) -> &'static str {
        match self {
            MetaArray::U8(_) => "u8",
            MetaArray::I8(_) => "i8",
            MetaArray::U16(_) => "u16",
            MetaArray::I16(_) => "i16",
            MetaArray::U32(_) => "u32",
            MetaArray::I32(_) => "i32",
            MetaArray::F32(_) => "f32",
            MetaArray::Bool(_) => "bool",
            MetaArray::String(_) => "string",
            MetaArray::Array(_) => "array",
            MetaArray::U64(_) => "u64",
            MetaArray::I64(_) => "i64",
            MetaArray::F64(_) => "f64",
        }
    }

    /// The strings of a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            MetaArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an integer array as `i64` (`None` for other arrays or a `u64` past `i64`).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            MetaArray::U8(v) => all(v, |x| Some(x.into())),
            MetaArray::I8(v) => all(v, |x| Some(x.into())),
            MetaArray::U16(v) => all(v, |x| Some(x.into())),
            MetaArray::I16(v) => all(v, |x| Some(x.into())),
            MetaArray::U32(v) => all(v, |x| Some(x.into())),
            MetaArray::I32(v) => all(v, |x| Some(x.into())),
            MetaArray::U64(v) => all(v, |x| i64::try_from(x).ok()),
            MetaArray::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The name as the file spells it (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml's `ne`: dimensions fastest-varying first (the reverse of a row-major shape).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Row-major shape: `ne = [k, n]` is an `[n, k]` matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An opened GGUF file: parsed header, metadata and tensor infos over a memory map of the data.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_start: u64,
    map: std::sync::Arc<memmap2::Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian cursor over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: String) -> Error {
        Error::Weights {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {} needs {n} bytes at offset {}, but the file is {} bytes long",
                what(),
                self.pos,
                self.buf.len()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each taking at least `min_size` bytes; rejects counts the rest of the
    /// file cannot hold, so no allocation is ever sized by an unchecked number.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_size.max(1)) as u64;
        if n > fits {
            return Err(self.err(format!(
                "truncated or corrupt: {} = {n} at offset {at}, but the {} bytes left hold at most {fits}",
                what(),
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(1, &|| format!("length of {}", what()))?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.err(format!("{} at offset {at} is not valid UTF-8: {e}", what())))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(self.err(format!(
                            "{} at offset {at}: bool byte {b} is not 0 or 1",
                            what()
                        )));
                    }
                }
            }
            8 => MetaValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels",
                        what()
                    )));
                }
                let at = self.pos;
                let elem = self.u32(what)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => {
                        return Err(self.err(format!(
                            "{} at offset {at}: unknown array element type {t}",
                            what()
                        )));
                    }
                };
                let n = self.count(min, &|| format!("element count of {}", what()))?;
                MetaValue::Array(self.array_items(elem, n, depth, what)?)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            t => {
                return Err(self.err(format!(
                    "{}: unknown metadata value type {t} at offset {}",
                    what(),
                    self.pos - 4
                )));
            }
        })
    }
}

impl Cursor<'_> {
    fn array_items(
        &mut self,
        elem: u32,
        n: usize,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<MetaArray> {
        fn fixed<T, const N: usize>(
            c: &mut Cursor<'_>,
            n: usize,
            what: &dyn Fn() -> String,
            conv: impl Fn([u8; N]) -> T,
        ) -> Result<Vec<T>> {
            let bytes = c.take(n * N, what)?;
            Ok(bytes
                .chunks_exact(N)
                .map(|b| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(b);
                    conv(a)
                })
                .collect())
        }
        Ok(match elem {
            0 => MetaArray::U8(fixed(self, n, what, u8::from_le_bytes)?),
            1 => MetaArray::I8(fixed(self, n, what, i8::from_le_bytes)?),
            2 => MetaArray::U16(fixed(self, n, what, u16::from_le_bytes)?),
            3 => MetaArray::I16(fixed(self, n, what, i16::from_le_bytes)?),
            4 => MetaArray::U32(fixed(self, n, what, u32::from_le_bytes)?),
            5 => MetaArray::I32(fixed(self, n, what, i32::from_le_bytes)?),
            6 => MetaArray::F32(fixed(self, n, what, f32::from_le_bytes)?),
            10 => MetaArray::U64(fixed(self, n, what, u64::from_le_bytes)?),
            11 => MetaArray::I64(fixed(self, n, what, i64::from_le_bytes)?),
            12 => MetaArray::F64(fixed(self, n, what, f64::from_le_bytes)?),
            7 => {
                let at = self.pos;
                let bytes = self.take(n, what)?;
                if let Some(i) = bytes.iter().position(|&b| b > 1) {
                    return Err(self.err(format!(
                        "{}[{i}] at offset {}: bool byte {} is not 0 or 1",
                        what(),
                        at + i,
                        bytes[i]
                    )));
                }
                MetaArray::Bool(bytes.iter().map(|&b| b == 1).collect())
            }
            8 => {
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&|| format!("{}[{i}]", what()))?);
                }
                MetaArray::String(v)
            }
            _ => {
                // 9: arrays of arrays (element types were checked by the caller).
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    let w = || format!("{}[{i}]", what());
                    match self.value(9, depth + 1, &w)? {
                        MetaValue::Array(a) => v.push(a),
                        other => return Err(self.err(format!("{}: not an array: {other:?}", w()))),
                    }
                }
                MetaArray::Array(v)
            }
        })
    }
}

impl GgufFile {
    /// Opens and validates a GGUF file (versions 2 and 3, little-endian): the header, every
    /// metadata value, and every tensor's type, shape, alignment and extent within the file.
    /// Tensor data is memory-mapped and only read by [`GgufFile::tensor`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "GGUF file",
                path: path.to_path_buf(),
            });
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 24 {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                msg: format!("truncated: {len} bytes is shorter than a GGUF header (24 bytes)"),
            });
        }
        // SAFETY: the map is read-only, shared only with the tensors read in place from it. As
        // with every memory-mapped loader, another process truncating the file while it is mapped
        // is outside our control.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, std::sync::Arc::new(map))
    }

    fn parse(path: &Path, map: std::sync::Arc<memmap2::Mmap>) -> Result<Self> {
        let (version, alignment, metadata, tensors, data_start) = {
            let mut c = Cursor {
                buf: &map,
                pos: 0,
                path,
            };
            let magic: [u8; 4] = c.array(&|| "magic".into())?;
            if magic != GGUF_MAGIC {
                return Err(c.err(format!(
                    "not a GGUF file: magic {magic:02x?} ({:?}), expected \"GGUF\"",
                    String::from_utf8_lossy(&magic)
                )));
            }
            let version = c.u32(&|| "version".into())?;
            match version {
                2 | 3 => {}
                1 => {
                    return Err(Error::Unsupported {
                        what: "GGUF version (2 and 3 are read)",
                        value: format!("1 in {}", path.display()),
                    });
                }
                v if v.swap_bytes() <= 3 => {
                    return Err(Error::Unsupported {
                        what: "GGUF byte order (little-endian only)",
                        value: format!(
                            "big-endian version {} in {}",
                            v.swap_bytes(),
                            path.display()
                        ),
                    });
                }
                v => {
                    return Err(Error::Unsupported {
                        what: "GGUF version (2 and 3 are read)",
                        value: format!("{v} in {}", path.display()),
                    });
                }
            }
            // Minimum sizes: a tensor info is a name length, n_dims, type and offset (24 bytes);
            // a key/value is a key length, a type and at least one byte of value (13 bytes).
            let n_tensors = c.count(24, &|| "tensor count".into())?;
            let n_kv = c.count(13, &|| "metadata count".into())?;

            let mut metadata = BTreeMap::new();
            for i in 0..n_kv {
                let key = c.string(&|| format!("metadata key #{i}"))?;
                let ty = c.u32(&|| format!("type of metadata `{key}`"))?;
                let value = c.value(ty, 0, &|| format!("metadata `{key}`"))?;
                if metadata.insert(key.clone(), value).is_some() {
                    return Err(c.err(format!("duplicate metadata key `{key}`")));
                }
            }

            let alignment = match metadata.get("general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
                Some(v) => {
                    return Err(c.err(format!(
                        "`general.alignment` must be a power-of-two u32, got {v:?}"
                    )));
                }
            };

            let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
            for i in 0..n_tensors {
                let name = c.string(&|| format!("name of tensor #{i}"))?;
                let n_dims = c.u32(&|| format!("n_dims of tensor `{name}`"))? as usize;
                if n_dims > MAX_DIMS {
                    return Err(c.err(format!(
                        "tensor `{name}` has {n_dims} dimensions, more than ggml's {MAX_DIMS}"
                    )));
                }
                let mut dims = Vec::with_capacity(n_dims);
                for d in 0..n_dims {
                    dims.push(c.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
                }
                let type_id = c.u32(&|| format!("type of tensor `{name}`"))?;
                let offset = c.u64(&|| format!("offset of tensor `{name}`"))?;
                let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| Error::Unsupported {
                    what: "ggml tensor type",
                    value: format!("id {type_id} of tensor `{name}` in {}", path.display()),
                })?;
                let n = dims
                    .iter()
                    .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                    .filter(|&n| n <= i64::MAX as u64)
                    .ok_or_else(|| c.err(format!("tensor `{name}`: dims {dims:?} overflow")))?;
                let ne0 = dims.first().copied().unwrap_or(1);
                if ne0 % ggml_type.block_size() as u64 != 0 {
                    return Err(c.err(format!(
                        "tensor `{name}`: first dimension {ne0} is not a multiple of the {} block size {}",
                        ggml_type,
                        ggml_type.block_size()
                    )));
                }
                let n_bytes = ggml_type.bytes_for(n).ok_or_else(|| {
                    c.err(format!("tensor `{name}`: size of {n} elements overflows"))
                })?;
                if offset % alignment != 0 {
                    return Err(c.err(format!(
                        "tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}"
                    )));
                }
                tensors.push(TensorInfo {
                    name,
                    dims,
                    ggml_type,
                    offset,
                    n_bytes,
                });
            }
            let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
            (version, alignment, metadata, tensors, data_start)
        };

        let file_len = map.len() as u64;
        let mut index = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::Weights {
                        path: path.to_path_buf(),
                        msg: format!(
                            "truncated: tensor `{}` ({} {:?}, {} bytes at data offset {}) ends past the end of the {file_len}-byte file (data starts at {data_start})",
                            t.name, t.ggml_type, t.dims, t.n_bytes, t.offset
                        ),
                    });
                }
            }
            if index.insert(t.name.clone(), i).is_some() {
                return Err(Error::Weights {
                    path: path.to_path_buf(),
                    msg: format!("duplicate tensor name `{}`", t.name),
                });
            }
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            metadata,
            tensors,
            index,
            data_start,
            map,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the tensor data.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// File offset where the tensor data section starts.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// Tensor infos in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor named `name` (GGUF spelling).
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (still quantised) bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        Ok(&self.map[self.tensor_range(info)?])
    }

    /// Where a tensor's bytes lie in the file; checked to lie inside it.
    fn tensor_range(&self, info: &TensorInfo) -> Result<std::ops::Range<usize>> {
        // The file's own infos were checked in `parse`; this guards hand-made ones.
        self.data_start
            .checked_add(info.offset)
            .and_then(|s| Some((s, s.checked_add(info.n_bytes)?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?))
            .filter(|r| r.end <= self.map.len())
            .ok_or_else(|| Error::Weights {
                path: self.path.clone(),
                msg: format!(
                    "tensor `{}`: {} bytes at data offset {} lie outside the file",
                    info.name, info.n_bytes, info.offset
                ),
            })
    }

    /// Loads the tensor named `name` (GGUF spelling) with its row-major shape. F32, F16 and BF16
    /// keep their storage, and so do the quantizations [`dequantize`] knows (Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): their blocks stay as stored ([`Storage::Quant`]), and matrix
    /// products read them directly. All of these are read in place from the file's memory map
    /// (a copy only where a tensor is not aligned for its type). F64 is converted to f32.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            tried: name.to_string(),
            source_desc: self.path.display().to_string(),
        })?;
        let range = self.tensor_range(info)?;
        let bytes = &self.map[range.clone()];
        let n = info.n_elements() as usize;
        // F32/F16/BF16 and blocks are read in place from the mapping where aligned (GGUF aligns
        // every tensor, 32 bytes by default), else copied one tensor at a time.
        let storage = match info.ggml_type {
            GgmlType::F32 => Storage::F32(self.in_place(name, range.start, n)?),
            GgmlType::F16 => Storage::F16(self.in_place(name, range.start, n)?),
            GgmlType::BF16 => Storage::BF16(self.in_place(name, range.start, n)?),
            t if t.block_size() > 1 && t.can_dequantize() => Storage::Quant {
                ty: t,
                data: self.in_place(name, range.start, bytes.len())?,
            },
            t => Storage::F32(
                dequantize(t, bytes, n)
                    .map_err(|e| match e {
                        Error::Unsupported { what, value } => Error::Unsupported {
                            what,
                            value: format!("{value} (tensor `{name}` in {})", self.path.display()),
                        },
                        other => other,
                    })?
                    .into(),
            ),
        };
        Tensor::new(&info.shape(), storage)
    }

    /// `len` values of tensor `name` at byte `start` of the file, in place where aligned.
    fn in_place<T: Plain>(&self, name: &str, start: usize, len: usize) -> Result<HostBuf<T>> {
        HostBuf::from_map(&self.map, start, len).ok_or_else(|| Error::Weights {
            path: self.path.clone(),
            msg: format!("tensor `{name}`: {len} values at byte {start} lie outside the file"),
        })
    }

    fn config_err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg,
        }
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.config_err(format!(
                    "`{key}` must be a non-negative integer, got {} {v:?}",
                    v.type_name()
                ))
            }),
        }
    }

    fn meta_usize_req(&self, key: &str) -> Result<usize> {
        self.meta_u64(key)?
            .map(|v| v as usize)
            .ok_or_else(|| self.config_err(format!("missing GGUF key `{key}`")))
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.config_err(format!(
                    "`{key}` must be a number, got {} {v:?}",
                    v.type_name()
                ))
            }),
        }
    }

    fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.config_err(format!("`{key}` must be a string, got {}", v.type_name()))
            }),
        }
    }

    fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.config_err(format!("`{key}` must be a bool, got {}", v.type_name()))
            }),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")?
            .ok_or_else(|| self.config_err("missing GGUF key `general.architecture`".into()))
    }

    /// `tokenizer.chat_template`, the Jinja chat template, when the file has one.
    pub fn chat_template(&self) -> Result<Option<String>> {
        Ok(self
            .meta_str("tokenizer.chat_template")?
            .map(str::to_string))
    }

    /// The language model's configuration from `llama.*` metadata, as transformers'
    /// `GGUF_CONFIG_MAPPING` reads it. Fails with [`Error::Unsupported`] unless
    /// `general.architecture` is `llama`.
    pub fn text_config(&self) -> Result<TextConfig> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(Error::Unsupported {
                what: "GGUF architecture (only llama)",
                value: format!("`{arch}` in {}", self.path.display()),
            });
        }
        let hidden = self.meta_usize_req("llama.embedding_length")?;
        let heads = self.meta_usize_req("llama.attention.head_count")?;
        let kv = match self.meta_u64("llama.attention.head_count_kv")? {
            Some(v) => v as usize,
            None => heads,
        };
        if heads == 0 || kv == 0 || heads % kv != 0 {
            return Err(self.config_err(format!(
                "llama.attention.head_count {heads} must be a positive multiple of head_count_kv {kv}"
            )));
        }
        let head_dim = match (
            self.meta_u64("llama.attention.key_length")?,
            self.meta_u64("llama.rope.dimension_count")?,
        ) {
            (Some(k), _) => k as usize,
            (None, Some(r)) => r as usize,
            (None, None) => hidden / heads,
        };
        if let Some(v) = self.meta_u64("llama.attention.value_length")?
            && v as usize != head_dim
        {
            return Err(Error::Unsupported {
                what: "GGUF attention value_length different from key_length",
                value: format!("{v} vs {head_dim} in {}", self.path.display()),
            });
        }
        if let Some(s) = self.meta_str("llama.rope.scaling.type")?
            && !matches!(s, "none" | "")
        {
            return Err(Error::Unsupported {
                what: "rope scaling type (only none)",
                value: format!("`{s}` in {}", self.path.display()),
            });
        }
        let vocab_size = match self.meta_u64("llama.vocab_size")? {
            Some(v) => v as usize,
            None => match self
                .get("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
            {
                Some(t) => t.len(),
                None => match self.tensor_info("token_embd.weight") {
                    Some(t) => t.shape().first().copied().unwrap_or(0),
                    None => {
                        return Err(self.config_err(
                            "no `llama.vocab_size`, `tokenizer.ggml.tokens` or `token_embd.weight` to size the vocabulary".into(),
                        ));
                    }
                },
            },
        };
        let has = |n: &str| self.index.contains_key(n);
        let layers = self.meta_usize_req("llama.block_count")?;
        // Every layer holds 9 tensors: a block count the file cannot hold is refused before
        // anything is sized by it.
        let held = self.tensors.len() / 9;
        if layers > held {
            return Err(self.config_err(format!(
                "`llama.block_count` is {layers} but the file holds {} tensors, enough for at most {held} layers (9 tensors each)",
                self.tensors.len()
            )));
        }
        let layer_has = |suffix: &str| {
            self.tensors.iter().any(|t| {
                t.name
                    .strip_prefix("blk.")
                    .and_then(|r| r.split_once('.'))
                    .is_some_and(|(i, rest)| {
                        rest == suffix && i.parse::<usize>().is_ok_and(|i| i < layers)
                    })
            })
        };
        let attention_bias = layer_has("attn_q.bias");
        let mlp_bias = layer_has("ffn_up.bias");
        let id = |key: &str| -> Result<Option<u32>> {
            match self.meta_u64(key)? {
                None => Ok(None),
                Some(v) => u32::try_from(v)
                    .map(Some)
                    .map_err(|_| self.config_err(format!("`{key}` = {v} does not fit a token id"))),
            }
        };
        let c = TextConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: self.meta_usize_req("llama.feed_forward_length")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: self
                .meta_f64("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-6),
            rope_theta: self.meta_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
            max_position_embeddings: self.meta_usize_req("llama.context_length")?,
            tie_word_embeddings: !has("output.weight"),
            attention_bias,
            mlp_bias,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        };
        c.check().map_err(|(field, msg)| {
            let key = match field {
                "vocab_size" => "llama.vocab_size (or the tokenizer's token count)",
                "hidden_size" => "llama.embedding_length",
                "intermediate_size" => "llama.feed_forward_length",
                "num_hidden_layers" => "llama.block_count",
                "num_attention_heads" => "llama.attention.head_count",
                "num_key_value_heads" => "llama.attention.head_count_kv",
                "head_dim" => "llama.attention.key_length (head_dim)",
                "max_position_embeddings" => "llama.context_length",
                "rms_norm_eps" => "llama.attention.layer_norm_rms_epsilon",
                "rope_theta" => "llama.rope.freq_base",
                other => other,
            };
            self.config_err(format!("`{key}` {msg}"))
        })?;
        Ok(c)
    }

    fn tok_err(&self, msg: String) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            msg,
        }
    }

    fn string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::String(a))) => {
                Ok(Some(a.iter().map(String::as_str).collect()))
            }
            Some(MetaValue::Array(a)) => Err(self.tok_err(format!(
                "`{key}` must be an array of strings, got an array of {}",
                a.elem_type_name()
            ))),
            Some(v) => {
                Err(self.tok_err(format!("`{key}` must be an array, got {}", v.type_name())))
            }
        }
    }

    /// The tokenizer the metadata describes, built the way transformers 5.23 builds it from a GGUF
    /// (`integrations/gguf/gguf_tokenizer_mapping.py`), so it gives transformers' ids:
    ///
    /// - `tokenizer.ggml.model == "gpt2"`: byte-level BPE over `tokens` and `merges` (tokens
    ///   spelled outside the byte alphabet respelled from their UTF-8 bytes); the split regex
    ///   chosen by `tokenizer.ggml.pre` where transformers knows it ([`split_regex`]), else GPT-2's
    ///   byte-level regex -- which is what transformers runs for SmolLM2's `smollm`; no BOS/EOS
    ///   unless `tokenizer.ggml.add_bos_token`/`add_eos_token` say so.
    /// - `"llama"` (SentencePiece): BPE with byte fallback over `tokens`, merges from the file or
    ///   derived from `scores` as transformers' `generate_merges` does, `Metaspace` pre-tokenizer
    ///   (prepend `▁` to the first section only; transformers ignores `add_space_prefix`); BOS
    ///   added unless `add_bos_token` is false.
    ///
    /// Both: control tokens (`token_type` 3) and the BOS/EOS/UNK/PAD tokens are added as special
    /// tokens, user-defined ones (4) as plain added tokens. `Ok(None)` when the file has no
    /// tokenizer; [`Error::Unsupported`] for other models (`t5`, `rwkv`, ...).
    pub fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>> {
        let Some(model) = self.meta_str("tokenizer.ggml.model")? else {
            return Ok(None);
        };
        let json = match model {
            "gpt2" => self.tokenizer_json(true)?,
            "llama" => self.tokenizer_json(false)?,
            other => {
                return Err(Error::Unsupported {
                    what: "GGUF tokenizer model (gpt2, llama)",
                    value: format!("`{other}` in {}", self.path.display()),
                });
            }
        };
        let text = serde_json::to_string(&json).map_err(|e| self.tok_err(e.to_string()))?;
        let tok: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| self.tok_err(format!("cannot build the `{model}` tokenizer: {e}")))?;
        Ok(Some(tok))
    }

    /// The `tokenizer.json` transformers builds: byte-level BPE (`gpt2`) or SentencePiece BPE.
    fn tokenizer_json(&self, byte_level: bool) -> Result<Value> {
        let tokens = self
            .string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.tok_err("missing `tokenizer.ggml.tokens`".into()))?;
        let types: Vec<i64> = match self.metadata.get("tokenizer.ggml.token_type") {
            None => vec![],
            Some(MetaValue::Array(a)) => a.to_i64s().ok_or_else(|| {
                self.tok_err(format!(
                    "`tokenizer.ggml.token_type` must be an integer array, got an array of {}",
                    a.elem_type_name()
                ))
            })?,
            Some(v) => {
                return Err(self.tok_err(format!(
                    "`tokenizer.ggml.token_type` must be an array, got {}",
                    v.type_name()
                )));
            }
        };

        // Byte-level: tokens spelled outside the byte alphabet are respelled from their bytes.
        let spelling = bytes_to_unicode();
        let alphabet: HashSet<char> = spelling.iter().copied().collect();
        let in_alphabet = |t: &str| !byte_level || t.chars().all(|c| alphabet.contains(&c));
        let mut vocab: HashMap<String, usize> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let key = if in_alphabet(t) {
                (*t).to_string()
            } else {
                t.bytes().map(|b| spelling[b as usize]).collect()
            };
            vocab.insert(key, i);
        }

        let merges: Vec<(String, String)> = match self.string_array("tokenizer.ggml.merges")? {
            Some(m) => m
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| {
                            self.tok_err(format!(
                                "`tokenizer.ggml.merges`[{i}] = {m:?} has no space"
                            ))
                        })
                })
                .collect::<Result<_>>()?,
            None if byte_level => {
                return Err(self.tok_err(
                    "missing `tokenizer.ggml.merges` (needed for a gpt2 tokenizer)".into(),
                ));
            }
            None => {
                let scores = match self.metadata.get("tokenizer.ggml.scores") {
                    Some(MetaValue::Array(MetaArray::F32(s))) if s.len() == tokens.len() => s,
                    _ => {
                        return Err(self.tok_err(format!(
                            "a llama tokenizer without merges needs `tokenizer.ggml.scores`: one f32 per token ({})",
                            tokens.len()
                        )));
                    }
                };
                merges_from_scores(&tokens, scores, &vocab)
            }
        };

        // Special tokens: BOS/EOS/UNK/PAD by id, then control tokens (3); user-defined tokens (4)
        // are matched whole but are not special. In a byte-level vocabulary a control token spelled
        // outside the alphabet is a llama.cpp mislabel, which transformers skips.
        let mut added_tokens = Vec::new();
        let mut seen = HashSet::new();
        let mut add = |token: &str, special: bool| {
            if let Some(&id) = vocab.get(token)
                && seen.insert(token.to_string())
            {
                added_tokens.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }));
            }
        };
        for key in ["unknown", "bos", "eos", "padding"] {
            if let Some(id) = self.meta_u64(&format!("tokenizer.ggml.{key}_token_id"))?
                && let Some(t) = tokens.get(id as usize)
                && in_alphabet(t)
            {
                add(t, true);
            }
        }
        for (t, &ty) in tokens.iter().zip(&types) {
            if ty == 3 && in_alphabet(t) {
                add(t, true);
            }
        }
        for (t, &ty) in tokens.iter().zip(&types) {
            if ty == 4 {
                add(t, false);
            }
        }
        added_tokens.sort_by_key(|a| a["id"].as_u64());

        // transformers' `update_post_processor`: BOS/EOS as the file asks (SentencePiece: BOS
        // unless told otherwise).
        let special =
            |id_key: &str, flag_key: &str, default: bool| -> Result<Option<(String, u64)>> {
                if !self.meta_bool(flag_key)?.unwrap_or(default) {
                    return Ok(None);
                }
                let Some(id) = self.meta_u64(id_key)? else {
                    return Ok(None);
                };
                let tok = tokens.get(id as usize).ok_or_else(|| {
                    self.tok_err(format!(
                        "`{id_key}` = {id} is past the {} tokens",
                        tokens.len()
                    ))
                })?;
                Ok(Some(((*tok).to_string(), id)))
            };
        let bos = special(
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.add_bos_token",
            !byte_level,
        )?;
        let eos = special(
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_eos_token",
            false,
        )?;
        let piece = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
        let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
        let mut single = Vec::new();
        let mut second = Vec::new();
        for (part, type_id, list) in [("A", 0, &mut single), ("B", 1, &mut second)] {
            if let Some((t, _)) = &bos {
                list.push(piece(t, type_id));
            }
            list.push(seq(part, type_id));
            if let Some((t, _)) = &eos {
                list.push(piece(t, type_id));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(second).collect();
        let mut specials = serde_json::Map::new();
        for (t, id) in bos.iter().chain(eos.iter()) {
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        let post = json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials});

        let vocab: serde_json::Map<String, Value> =
            vocab.into_iter().map(|(k, v)| (k, json!(v))).collect();
        let merges: Vec<Value> = merges.into_iter().map(|(a, b)| json!([a, b])).collect();
        Ok(if byte_level {
            let pre = self.meta_str("tokenizer.ggml.pre")?;
            let pre_tokenizer = match pre.and_then(split_regex) {
                Some(re) => json!({
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
                    ],
                }),
                None => json!({
                    "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true,
                }),
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                    "ignore_merges": false, "vocab": vocab, "merges": merges,
                },
            })
        } else {
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens,
                "normalizer": null,
                "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                ]},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                    "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                    "ignore_merges": false, "vocab": vocab, "merges": merges,
                },
            })
        })
    }
}

/// BPE merges implied by a SentencePiece vocabulary, as transformers' `generate_merges` derives
/// them: every split of every token into two vocabulary pieces, ordered by the token's score
/// (best first), then by the lengths of the two pieces (longer first); ties keep vocabulary order.
pub fn merges_from_scores(
    tokens: &[&str],
    scores: &[f32],
    vocab: &HashMap<String, usize>,
) -> Vec<(String, String)> {
    // Python's dict(zip(tokens, scores)): first position of a token, last score.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (&t, &s) in tokens.iter().zip(scores) {
        if score.insert(t, s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(String, String, f32, usize, usize)> = Vec::new();
    for t in order {
        let s = score[t];
        let mut local = Vec::new();
        let bounds: Vec<usize> = t.char_indices().map(|(i, _)| i).skip(1).collect();
        for b in bounds {
            let (l, r) = t.split_at(b);
            if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        for (_, _, l, r) in local {
            merges.push((
                l.to_string(),
                r.to_string(),
                s,
                l.chars().count(),
                r.chars().count(),
            ));
        }
    }
    // Stable sort, descending on (score, len(left), len(right)).
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(l, r, ..)| (l, r)).collect()
}

// ---------------------------------------------------------------------------------------------
// Tokenizer helpers
// ---------------------------------------------------------------------------------------------

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable Latin-1 bytes stand for
/// themselves, the others for the code points from U+0100 on.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let cp = if printable {
            b as u32
        } else {
            next += 1;
            255 + next
        };
        *slot = char::from_u32(cp).unwrap_or('\u{fffd}');
    }
    table
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex transformers 5.23 uses for a `tokenizer.ggml.pre` value
/// (`GGUF_PRE_TOKENIZER_SPLITS`); `None` means GPT-2's byte-level regex. llama.cpp's own regexes
/// for the other values (`smollm` isolates each `\p{N}` first) are not what transformers runs.
pub fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Dequantisation
// ---------------------------------------------------------------------------------------------

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Runs `f(block_bytes, block_out)` over every block, in parallel over runs of blocks.
fn per_block(
    data: &[u8],
    out: &mut [f32],
    bs: usize,
    ts: usize,
    f: impl Fn(&[u8], &mut [f32]) + Sync,
) {
    const RUN: usize = 256;
    if data.len() <= ts * RUN {
        // One run (a few weight rows): not worth a parallel split.
        for (ob, db) in out.chunks_exact_mut(bs).zip(data.chunks_exact(ts)) {
            f(db, ob);
        }
        return;
    }
    out.par_chunks_mut(bs * RUN)
        .zip(data.par_chunks(ts * RUN))
        .for_each(|(o, d)| {
            for (ob, db) in o.chunks_exact_mut(bs).zip(d.chunks_exact(ts)) {
                f(db, ob);
            }
        });
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Dequantises `n` elements of type `ty` from `data` to f32, with the same float operations as
/// gguf-py's `quants.py` (and so bit-identical to it). `data` must hold exactly the bytes of
/// `n` elements.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    dequantize_into(ty, data, &mut out)?;
    Ok(out)
}

/// [`dequantize`] into `out` (`out.len()` elements; `data` must hold exactly their bytes), so a
/// caller that dequantises a matrix a few rows at a time reuses one buffer.
pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    let want = ty.bytes_for(n as u64);
    if want != Some(data.len() as u64) {
        return Err(Error::Shape {
            name: format!("{ty} data bytes for {n} elements"),
            expected: want.map(|w| vec![w as usize]).unwrap_or_default(),
            got: vec![data.len()],
        });
    }
    let (bs, ts) = (ty.block_size(), ty.type_size());
    match ty {
        GgmlType::F32 => per_block(data, out, 1, 4, |b, o| {
            o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }),
        GgmlType::F16 => per_block(data, out, 1, 2, |b, o| o[0] = f16_at(b, 0)),
        GgmlType::BF16 => per_block(data, out, 1, 2, |b, o| {
            o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()
        }),
        GgmlType::F64 => per_block(data, out, 1, 8, |b, o| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            o[0] = f64::from_le_bytes(a) as f32
        }),
        // d: f16, qs: 16 bytes of nibbles; low nibbles are elements 0..16, high ones 16..32.
        GgmlType::Q4_0 => per_block(data, out, bs, ts, |b, o| {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                o[j] = d * ((q & 0x0f) as i8 - 8) as f32;
                o[j + 16] = d * ((q >> 4) as i8 - 8) as f32;
            }
        }),
        // d, m: f16, qs: 16 bytes; x = d * q + m.
        GgmlType::Q4_1 => per_block(data, out, bs, ts, |b, o| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                o[j] = d * (q & 0x0f) as f32 + m;
                o[j + 16] = d * (q >> 4) as f32 + m;
            }
        }),
        // d: f16, qh: u32 of fifth bits, qs: 16 bytes of nibbles; x = d * (q - 16).
        GgmlType::Q5_0 => per_block(data, out, bs, ts, |b, o| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for (j, &q) in b[6..22].iter().enumerate() {
                let lo = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                o[j] = d * (lo as i8 - 16) as f32;
                o[j + 16] = d * (hi as i8 - 16) as f32;
            }
        }),
        // d, m: f16, qh: u32, qs: 16 bytes; x = d * q + m.
        GgmlType::Q5_1 => per_block(data, out, bs, ts, |b, o| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for (j, &q) in b[8..24].iter().enumerate() {
                let lo = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
                let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                o[j] = d * lo as f32 + m;
                o[j + 16] = d * hi as f32 + m;
            }
        }),
        // d: f16, qs: 32 x i8; x = q * d.
        GgmlType::Q8_0 => per_block(data, out, bs, ts, |b, o| {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..34].iter().enumerate() {
                o[j] = (q as i8) as f32 * d;
            }
        }),
        // d, dmin: f16, scales: 12 bytes of 6-bit (scale, min) x 8, qs: 128 bytes. Sub-block j
        // (32 elements) takes the low (j even) or high (j odd) nibbles of qs[32 * (j / 2)..].
        GgmlType::Q4_K => per_block(data, out, bs, ts, |b, o| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let (dl, ml) = (d * sc as f32, dmin * m as f32);
                let shift = 4 * (j % 2);
                for (e, &q) in qs[32 * (j / 2)..32 * (j / 2) + 32].iter().enumerate() {
                    o[32 * j + e] = dl * ((q >> shift) & 0x0f) as f32 - ml;
                }
            }
        }),
        // As Q4_K plus qh: 32 bytes whose bit j is the fifth bit of sub-block j.
        GgmlType::Q5_K => per_block(data, out, bs, ts, |b, o| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let (dl, ml) = (d * sc as f32, dmin * m as f32);
                let shift = 4 * (j % 2);
                for e in 0..32 {
                    let q = ((qs[32 * (j / 2) + e] >> shift) & 0x0f) | (((qh[e] >> j) & 1) << 4);
                    o[32 * j + e] = dl * q as f32 - ml;
                }
            }
        }),
        // ql: 128 bytes (low 4 bits), qh: 64 bytes (high 2 bits), scales: 16 x i8, d: f16;
        // x = (d * scale) * (q - 32), one scale per 16 elements.
        GgmlType::Q6_K => per_block(data, out, bs, ts, |b, o| {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for (f, x) in o.iter_mut().enumerate() {
                let (h, r) = (f / 128, f % 128);
                let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
                let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
                let q = (lo | (hi << 4)) as i8 - 32;
                *x = (d * (sc[f / 16] as i8) as f32) * q as f32;
            }
        }),
        other => {
            return Err(Error::Unsupported {
                what: "ggml tensor type for dequantisation (F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                value: other.to_string(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// LLaMA mapping
// ---------------------------------------------------------------------------------------------

/// The HF `LlamaForCausalLM` name of a llama.cpp tensor name, or `None` for names outside the
/// LLaMA layout.
pub fn hf_name(gguf: &str) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(format!("{t}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's RoPE row permutation of `attn_q`/`attn_k` (convert_hf_to_gguf.py's
/// `permute`), as transformers' `_reverse_permute_weights` does:
/// `w.reshape(n_head, rows / n_head / 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
/// Within each head of `2 * half` rows, HF row `j * half + i` is GGUF row `2 * i + j`.
/// `rows` is the tensor's first (slowest) dimension; a 1-D bias has `cols == 1`.
pub fn reverse_permute_rows(t: Tensor, n_head: usize, name: &str) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let rows = shape.first().copied().unwrap_or(0);
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(Error::Shape {
            name: format!("{name} (rows must split into {n_head} heads of even size)"),
            expected: vec![rows.next_multiple_of((2 * n_head).max(1))],
            got: shape,
        });
    }
    let cols = t.len() / rows.max(1);
    let head = rows / n_head;
    let half = head / 2;
    let perm: Vec<usize> = (0..rows)
        .map(|r| {
            let (h, k) = (r / head, r % head);
            let (j, i) = (k / half, k % half);
            h * head + 2 * i + j
        })
        .collect();
    t.reshape(&[rows, cols])?
        .gather_rows(&perm)?
        .reshape(&shape)
}

/// A LLaMA model read from a GGUF file, in HF terms.
#[derive(Debug)]
pub struct GgufModel {
    pub config: TextConfig,
    /// Weights by HF `LlamaForCausalLM` name (`model.layers.0.self_attn.q_proj.weight`, ...), Q/K
    /// rows in HF order. `lm_head.weight` is absent when the embeddings are tied.
    pub tensors: HashMap<String, Tensor>,
    /// The tokenizer from the metadata, when the file has one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// Loads a `llama` GGUF: config from metadata, every tensor dequantised (F16/BF16 kept) under its
/// HF name with llama.cpp's Q/K permutation undone and its shape checked against the config, and
/// the tokenizer. Unknown tensor names, architectures and tensor types are errors.
pub fn load_llama(path: impl AsRef<Path>) -> Result<GgufModel> {
    let file = GgufFile::open(path)?;
    let config = file.text_config()?;
    let c = &config;
    let q_rows = c.num_attention_heads * c.head_dim;
    let kv_rows = c.num_key_value_heads * c.head_dim;
    let expected = |hf: &str| -> Option<Vec<usize>> {
        let bias = hf.ends_with(".bias");
        let w = |rows: usize, cols: usize| if bias { vec![rows] } else { vec![rows, cols] };
        let part = hf.rsplit('.').nth(1)?;
        Some(match part {
            "embed_tokens" | "lm_head" => w(c.vocab_size, c.hidden_size),
            "norm" | "input_layernorm" | "post_attention_layernorm" => vec![c.hidden_size],
            "q_proj" => w(q_rows, c.hidden_size),
            "k_proj" | "v_proj" => w(kv_rows, c.hidden_size),
            "o_proj" => w(c.hidden_size, q_rows),
            "gate_proj" | "up_proj" => w(c.intermediate_size, c.hidden_size),
            "down_proj" => w(c.hidden_size, c.intermediate_size),
            _ => return None,
        })
    };

    let mut tensors = HashMap::with_capacity(file.tensor_infos().len());
    for info in file.tensor_infos() {
        let name = &info.name;
        let hf = hf_name(name)
            .filter(|hf| {
                !hf.starts_with("model.layers.")
                    || hf
                        .split('.')
                        .nth(2)
                        .and_then(|l| l.parse::<usize>().ok())
                        .is_some_and(|l| l < c.num_hidden_layers)
            })
            .ok_or_else(|| Error::Unsupported {
                what: "GGUF tensor for a llama model",
                value: format!(
                    "`{name}` ({} {:?}) in {}",
                    info.ggml_type,
                    info.dims,
                    file.path().display()
                ),
            })?;
        let mut t = file.tensor(name)?;
        if let Some(want) = expected(&hf) {
            t.expect_shape(&hf, &want)?;
        }
        if hf.contains(".self_attn.q_proj.") {
            t = reverse_permute_rows(t, c.num_attention_heads, &hf)?;
        } else if hf.contains(".self_attn.k_proj.") {
            t = reverse_permute_rows(t, c.num_key_value_heads, &hf)?;
        }
        tensors.insert(hf, t);
    }

    let mut required = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    for l in 0..c.num_hidden_layers {
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "input_layernorm",
            "post_attention_layernorm",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            required.push(format!("model.layers.{l}.{p}.weight"));
        }
    }
    for r in required {
        if !tensors.contains_key(&r) {
            let gguf = gguf_name_of(&r);
            return Err(Error::MissingTensor {
                name: r,
                tried: gguf,
                source_desc: file.path().display().to_string(),
            });
        }
    }

    Ok(GgufModel {
        tokenizer: file.tokenizer()?,
        chat_template: file.chat_template()?,
        config,
        tensors,
    })
}

/// The llama.cpp name of an HF LLaMA tensor name (inverse of [`hf_name`]); the name itself when
/// it has none.
fn gguf_name_of(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.", "token_embd."),
        ("model.norm.", "output_norm."),
        ("lm_head.", "output."),
        ("model.layers.", "blk."),
        (".self_attn.q_proj.", ".attn_q."),
        (".self_attn.k_proj.", ".attn_k."),
        (".self_attn.v_proj.", ".attn_v."),
        (".self_attn.o_proj.", ".attn_output."),
        (".input_layernorm.", ".attn_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
        (".mlp.gate_proj.", ".ffn_gate."),
        (".mlp.up_proj.", ".ffn_up."),
        (".mlp.down_proj.", ".ffn_down."),
    ];
    let mut s = hf.to_string();
    for (a, b) in map {
        s = s.replacen(a, b, 1);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn type_table_is_consistent() {
        for (t, id, bs, ts) in GgmlType::TABLE {
            assert_eq!(GgmlType::from_id(id), Some(t));
            assert_eq!((t.id(), t.block_size(), t.type_size()), (id, bs, ts));
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
    }

    #[test]
    fn q4_0_block() {
        let mut b = f16b(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(v[j + 16], 0.5 * (7.0 - j as f32));
        }
    }

    #[test]
    fn q4_1_block() {
        let mut b = f16b(0.25).to_vec();
        b.extend(f16b(-1.0));
        b.extend((0..16u8).map(|j| j | (3 << 4)));
        let v = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], 0.25 * j as f32 - 1.0);
            assert_eq!(v[j + 16], 0.25 * 3.0 - 1.0);
        }
    }

    #[test]
    fn q8_0_block() {
        let mut b = f16b(2.0).to_vec();
        b.extend((0..32i8).map(|j| (j * 4 - 64) as u8));
        let v = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (j, x) in v.iter().enumerate() {
            assert_eq!(*x, 2.0 * (j as f32 * 4.0 - 64.0));
        }
    }

    #[test]
    fn q5_0_block_uses_high_bits() {
        let mut b = f16b(1.0).to_vec();
        b.extend(0xffff_0000u32.to_le_bytes()); // fifth bit set for elements 16..32
        b.extend([0x00u8; 16]);
        let v = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        assert!(v[..16].iter().all(|&x| x == -16.0));
        assert!(v[16..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn dequantize_rejects_wrong_length() {
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], 32).is_err());
        assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31).is_err());
        assert!(matches!(
            dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256),
            Err(Error::Unsupported { .. })
        ));
    }

    #[test]
    fn permutation_inverts_llama_cpp() {
        // llama.cpp: w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, rows, cols) = (3usize, 12usize, 2usize);
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let half = rows / n_head / 2;
        let mut gguf = vec![0f32; rows * cols];
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let dst = h * 2 * half + 2 * i + j; // [h, i, j]
                    let src = h * 2 * half + j * half + i; // [h, j, i]
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let t = Tensor::from_f32(&[rows, cols], gguf).unwrap();
        let back = reverse_permute_rows(t, n_head, "q").unwrap();
        assert_eq!(back.f32s().unwrap(), &hf[..]);
        let bad = Tensor::from_f32(&[10, 1], vec![0.0; 10]).unwrap();
        assert!(reverse_permute_rows(bad, 3, "q").is_err());
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_name("output_norm.weight").unwrap(), "model.norm.weight");
        assert_eq!(
            hf_name("blk.12.attn_output.weight").unwrap(),
            "model.layers.12.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
        for n in [
            "blk.7.attn_q.weight",
            "blk.0.ffn_down.weight",
            "output.weight",
            "token_embd.weight",
        ] {
            assert_eq!(gguf_name_of(&hf_name(n).unwrap()), n);
        }
    }

    #[test]
    fn byte_alphabet() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        let set: HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
    }

    #[test]
    fn meta_value_conversions() {
        assert_eq!(MetaValue::I32(-1).as_u64(), None);
        assert_eq!(MetaValue::U32(7).as_u64(), Some(7));
        assert_eq!(MetaValue::F32(0.5).as_f64(), Some(0.5));
        assert_eq!(MetaValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(MetaValue::String("x".into()).as_str(), Some("x"));
    }
}
