//! `Tensor`: a shape plus contiguous row-major storage on a [`Device`]. Weights keep the dtype
//! they were stored in (f32, f16, bf16, or a GGUF quantization's blocks); on the CPU activations
//! are f32, on a GPU they are in the model's compute dtype. What runs on a tensor is its device's [`Backend`](crate::backend::Backend).

pub use crate::backend::Device;
use crate::error::{Error, Result};
pub use crate::model::gguf::GgmlType;
use half::{bf16, f16};

mod host;
pub use host::{HostBuf, MappedRegion, Plain};

/// Element type of a tensor's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// GGUF blocks of a quantization (Q4_1, Q8_0, Q4_K, ...): a matrix's rows, each a whole
    /// number of blocks ([`Storage::Quant`]).
    Quant(GgmlType),
}

impl DType {
    /// Bytes per element (a quantization's, rounded up to a whole byte).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Quant(t) => t.type_size().div_ceil(t.block_size()),
        }
    }

    /// Whether it is a quantization's blocks.
    pub fn is_quant(self) -> bool {
        matches!(self, DType::Quant(_))
    }
}

impl std::str::FromStr for DType {
    type Err = Error;

    /// `f32`, `f16` or `bf16`.
    fn from_str(s: &str) -> Result<DType> {
        match s.trim() {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => Err(Error::Unsupported {
                what: "dtype (f32, f16, bf16)",
                value: other.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DType::F32 => f.write_str("f32"),
            DType::F16 => f.write_str("f16"),
            DType::BF16 => f.write_str("bf16"),
            DType::Quant(t) => f.write_str(&t.name().to_lowercase()),
        }
    }
}

/// Contiguous storage: host memory in one of the supported dtypes (owned, or read in place from
/// the memory-mapped file it was loaded from: [`HostBuf`]), or a GPU buffer. Cloning a mapped
/// tensor shares the mapping.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(HostBuf<f32>),
    F16(HostBuf<f16>),
    BF16(HostBuf<bf16>),
    /// A matrix in GGUF blocks of `ty`, row by row (each row a whole number of blocks), as the
    /// file stores it: matrix products read the blocks directly
    /// ([`crate::ops::matmul::linear`]); everything else dequantises.
    Quant {
        ty: GgmlType,
        data: HostBuf<u8>,
    },
    /// Memory of a CUDA device (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::Buffer),
}

/// A dense row-major tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

/// Equal shapes, dtypes and values (device tensors are compared by their downloaded values; one
/// that cannot be read compares unequal).
impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        if self.shape != other.shape || self.dtype() != other.dtype() {
            return false;
        }
        let (Ok(a), Ok(b)) = (self.to_host(), other.to_host()) else {
            return false;
        };
        match (&a.storage, &b.storage) {
            (Storage::F32(x), Storage::F32(y)) => x[..] == y[..],
            (Storage::F16(x), Storage::F16(y)) => x[..] == y[..],
            (Storage::BF16(x), Storage::BF16(y)) => x[..] == y[..],
            (Storage::Quant { data: x, .. }, Storage::Quant { data: y, .. }) => x[..] == y[..],
            _ => false,
        }
    }
}

impl Tensor {
    /// An f32 tensor from data; fails if the element count does not match the shape.
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        Self::new(shape, Storage::F32(data.into()))
    }

    /// A tensor from storage of any dtype; fails if the element count does not match the shape
    /// (for quantized blocks: unless every row is a whole number of blocks and the bytes are
    /// exactly those of the shape).
    pub fn new(shape: &[usize], storage: Storage) -> Result<Self> {
        let len = match &storage {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::Quant { ty, data } => {
                let cols = shape.last().copied().unwrap_or(1);
                let n: usize = shape.iter().product();
                let want = ty.bytes_for(n as u64);
                if !cols.is_multiple_of(ty.block_size()) || want != Some(data.len() as u64) {
                    return Err(Error::Shape {
                        name: format!(
                            "{ty} tensor data ({} bytes; rows of {cols} must be whole blocks of {})",
                            data.len(),
                            ty.block_size()
                        ),
                        expected: shape.to_vec(),
                        got: vec![data.len()],
                    });
                }
                n
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.len(),
        };
        let want: usize = shape.iter().product();
        if len != want {
            return Err(Error::Shape {
                name: "tensor data".into(),
                expected: shape.to_vec(),
                got: vec![len],
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    /// An f32 tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::F32(vec![0.0; shape.iter().product()].into()),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::Quant { ty, .. } => DType::Quant(*ty),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.dtype(),
        }
    }

    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.device().clone()),
            _ => Device::Cpu,
        }
    }

    /// Whether the storage is host memory (the CPU backend's).
    pub fn is_host(&self) -> bool {
        self.device().is_cpu()
    }

    /// The backend that runs ops on this tensor (its device's).
    pub fn backend(&self) -> &dyn crate::backend::Backend {
        match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => &**b.device(),
            _ => &crate::backend::Cpu,
        }
    }

    /// This tensor on `device` in the same dtype (a cheap clone when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        let host = self.to_host()?;
        device.backend().upload(&host)
    }

    /// A host copy of this tensor in the same dtype (a clone when it is on the host).
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Tensor::new(&self.shape, b.download()?),
            _ => Ok(self.clone()),
        }
    }

    /// The values as host f32, downloaded and widened as needed (logits, scores, checks).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_host()?.into_f32_vec()
    }

    /// A host tensor of this one's values in `dtype` (rounded to nearest when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return self.to_host();
        }
        let v = self.to_vec_f32()?;
        let storage = match dtype {
            DType::F32 => Storage::F32(v.into()),
            DType::F16 => Storage::F16(
                v.iter()
                    .map(|&x| f16::from_f32(x))
                    .collect::<Vec<_>>()
                    .into(),
            ),
            DType::BF16 => Storage::BF16(
                v.iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect::<Vec<_>>()
                    .into(),
            ),
            DType::Quant(t) => {
                return Err(Error::Unsupported {
                    what: "conversion to a quantized dtype",
                    value: t.name(),
                });
            }
        };
        Tensor::new(&self.shape, storage)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The storage, mutable (the GPU backend writes results in place).
    #[cfg(feature = "cuda")]
    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// Size of the last dimension (1 for a scalar).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Product of all but the last dimension.
    pub fn rows(&self) -> usize {
        self.len() / self.cols().max(1)
    }

    /// The data as an f32 slice; fails for f16/bf16 or device storage (use [`Tensor::to_f32`]).
    pub fn f32s(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::Unsupported {
                what: "dtype for an f32 view",
                value: self.dtype().to_string(),
            }),
        }
    }

    /// Mutable f32 data (a tensor mapped from its file is first copied); fails for f16/bf16 or
    /// device storage.
    pub fn f32s_mut(&mut self) -> Result<&mut [f32]> {
        let dt = self.dtype();
        match &mut self.storage {
            Storage::F32(v) => Ok(v.make_mut()),
            _ => Err(Error::Unsupported {
                what: "dtype for an f32 view",
                value: dt.to_string(),
            }),
        }
    }

    /// Consumes the tensor and returns its data as f32 (converted if stored narrower, downloaded
    /// if on a device).
    pub fn into_f32_vec(self) -> Result<Vec<f32>> {
        let n = self.len();
        Ok(match self.storage {
            Storage::F32(v) => v.into_vec(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::Quant { ty, data } => crate::model::gguf::dequantize(ty, &data, n)?,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => return self.to_vec_f32(),
        })
    }

    /// An f32 host copy of this tensor (a cheap clone when already f32 on the host).
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(Tensor {
            shape: self.shape.clone(),
            storage: Storage::F32(self.to_vec_f32()?.into()),
        })
    }

    /// Borrow as host f32, converting only when the storage is narrower or on a device.
    pub fn f32_cow(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        match &self.storage {
            Storage::F32(v) => Ok(std::borrow::Cow::Borrowed(v)),
            _ => Ok(std::borrow::Cow::Owned(self.to_vec_f32()?)),
        }
    }

    /// Same data, new shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::Shape {
                name: "reshape".into(),
                expected: shape.to_vec(),
                got: self.shape,
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Rows `start..end` of a tensor viewed as [rows, cols], as host f32 values.
    pub fn rows_f32(&self, start: usize, end: usize) -> Result<Vec<f32>> {
        let c = self.cols();
        if start > end || end > self.rows() {
            return Err(Error::Shape {
                name: format!("rows {start}..{end}"),
                expected: vec![self.rows(), c],
                got: self.shape.clone(),
            });
        }
        Ok(match &self.storage {
            Storage::F32(v) => v[start * c..end * c].to_vec(),
            Storage::F16(v) => v[start * c..end * c].iter().map(|x| x.to_f32()).collect(),
            Storage::BF16(v) => v[start * c..end * c].iter().map(|x| x.to_f32()).collect(),
            Storage::Quant { ty, data } => {
                let row = data.len() / self.rows().max(1);
                crate::model::gguf::dequantize(
                    *ty,
                    &data[start * row..end * row],
                    (end - start) * c,
                )?
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => self.to_host()?.rows_f32(start, end)?,
        })
    }

    /// Fails with a shape error naming `name` unless the shape is `expected`.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::Shape {
                name: name.into(),
                expected: expected.to_vec(),
                got: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Whether the values are read in place from the memory-mapped file they were loaded from.
    pub fn is_mapped(&self) -> bool {
        self.mapped_region().is_some()
    }

    /// The file range the values are read in place from, if they are.
    pub fn mapped_region(&self) -> Option<MappedRegion> {
        match &self.storage {
            Storage::F32(v) => v.region(),
            Storage::F16(v) => v.region(),
            Storage::BF16(v) => v.region(),
            Storage::Quant { data, .. } => data.region(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// Size in bytes of the storage.
    pub fn nbytes(&self) -> usize {
        match &self.storage {
            Storage::Quant { data, .. } => data.len(),
            _ => self.len() * self.dtype().size(),
        }
    }
}
