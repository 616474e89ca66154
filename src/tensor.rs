//! `Tensor`: a shape plus contiguous row-major storage. Weights keep the dtype they were stored in
//! (f32, f16 or bf16); activations are always f32.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element type of a tensor's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// Contiguous CPU storage in one of the supported dtypes.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A dense row-major tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// An f32 tensor from data; fails if the element count does not match the shape.
    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        Self::new(shape, Storage::F32(data))
    }

    /// A tensor from storage of any dtype; fails if the element count does not match the shape.
    pub fn new(shape: &[usize], storage: Storage) -> Result<Self> {
        let len = match &storage {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
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
            storage: Storage::F32(vec![0.0; shape.iter().product()]),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
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

    /// Size of the last dimension (1 for a scalar).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Product of all but the last dimension.
    pub fn rows(&self) -> usize {
        self.len() / self.cols().max(1)
    }

    /// The data as an f32 slice; fails for f16/bf16 storage (use [`Tensor::to_f32`]).
    pub fn f32s(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::Unsupported {
                what: "dtype for an f32 view",
                value: self.dtype().to_string(),
            }),
        }
    }

    /// Mutable f32 data; fails for f16/bf16 storage.
    pub fn f32s_mut(&mut self) -> Result<&mut [f32]> {
        let dt = self.dtype();
        match &mut self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::Unsupported {
                what: "dtype for an f32 view",
                value: dt.to_string(),
            }),
        }
    }

    /// Consumes the tensor and returns its data as f32 (converted if stored narrower).
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::F32(v) => v,
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// An f32 copy of this tensor (a cheap clone when already f32).
    pub fn to_f32(&self) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::F32(self.clone().into_f32_vec()),
        }
    }

    /// Borrow as f32, converting only when the storage is narrower.
    pub fn f32_cow(&self) -> std::borrow::Cow<'_, [f32]> {
        match &self.storage {
            Storage::F32(v) => std::borrow::Cow::Borrowed(v),
            _ => std::borrow::Cow::Owned(self.clone().into_f32_vec()),
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

    /// Rows `start..end` of a tensor viewed as [rows, cols], as a new f32 tensor.
    pub fn rows_f32(&self, start: usize, end: usize) -> Vec<f32> {
        let c = self.cols();
        match &self.storage {
            Storage::F32(v) => v[start * c..end * c].to_vec(),
            Storage::F16(v) => v[start * c..end * c].iter().map(|x| x.to_f32()).collect(),
            Storage::BF16(v) => v[start * c..end * c].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Writes row `r` of a tensor viewed as [rows, cols] into `out` as f32.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let c = self.cols();
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            Storage::F16(v) => out
                .iter_mut()
                .zip(&v[r * c..(r + 1) * c])
                .for_each(|(o, x)| *o = x.to_f32()),
            // bf16 is the top half of an f32: a shift, which vectorises (unlike `to_f32`).
            Storage::BF16(v) => out
                .iter_mut()
                .zip(&v[r * c..(r + 1) * c])
                .for_each(|(o, x)| *o = f32::from_bits((x.to_bits() as u32) << 16)),
        }
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

    /// Size in bytes of the storage.
    pub fn nbytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => v.len() * 4,
            Storage::F16(v) => v.len() * 2,
            Storage::BF16(v) => v.len() * 2,
        }
    }
}
