//! The CUDA implementation of [`Backend`]: tensors in GPU memory ([`Buffer`]) in one compute dtype
//! (f32, f16 or bf16; the kernels take one dtype throughout and compute in f32), GEMMs through
//! cuBLAS, everything else through the kernels of `kernels/` ([`super::ops`]). Every shape is
//! checked on the host before a launch.
//!
//! Host round trips, by design: token ids, positions and row indices go up (a few kilobytes); the
//! ranking's probabilities, log-sum-exps, the kept rows' hidden states (for the diversity report)
//! and the logits come down. `first_nonfinite` downloads its tensor and scans it on the host.

use super::Device;
use super::ops::Storage as Kernel;
use crate::backend::{Backend, check_shape, linear_dims};
use crate::error::{Error, Result};
use crate::ops::attention::AttnShape;
use crate::tensor::{DType, Storage, Tensor};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use std::sync::Arc;

/// A tensor's memory on a GPU: the device it lives on and its values in one of the kernel dtypes.
#[derive(Clone)]
pub struct Buffer {
    device: Arc<Device>,
    /// Elements in use (a zero-length tensor still holds a one-element allocation).
    len: usize,
    data: Data,
}

/// Device values in one of the kernel dtypes.
#[derive(Clone)]
pub enum Data {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Buffer({} x {} on cuda:{})",
            self.len,
            self.dtype(),
            self.device.ordinal
        )
    }
}

impl Buffer {
    /// The device the values live on.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values copied to host storage of the same dtype.
    pub fn download(&self) -> Result<Storage> {
        let d = &self.device;
        let n = self.len;
        Ok(match &self.data {
            Data::F32(s) => Storage::F32(d.download(s)?.into_iter().take(n).collect()),
            Data::F16(s) => Storage::F16(d.download(s)?.into_iter().take(n).collect()),
            Data::BF16(s) => Storage::BF16(d.download(s)?.into_iter().take(n).collect()),
        })
    }
}

/// A kernel dtype and its place in [`Data`].
trait Elem: Kernel + Send + Sync {
    fn get(d: &Data) -> Option<&CudaSlice<Self>>;
    fn get_mut(d: &mut Data) -> Option<&mut CudaSlice<Self>>;
    fn wrap(s: CudaSlice<Self>) -> Data;
    /// [`Device::linear`] (whose cuBLAS bound a generic caller cannot name).
    fn linear(
        dev: &Device,
        x: &CudaSlice<Self>,
        w: &CudaSlice<Self>,
        mkn: (usize, usize, usize),
    ) -> Result<CudaSlice<Self>>;
}

macro_rules! elem {
    ($t:ty, $v:ident) => {
        impl Elem for $t {
            fn get(d: &Data) -> Option<&CudaSlice<Self>> {
                match d {
                    Data::$v(s) => Some(s),
                    _ => None,
                }
            }
            fn get_mut(d: &mut Data) -> Option<&mut CudaSlice<Self>> {
                match d {
                    Data::$v(s) => Some(s),
                    _ => None,
                }
            }
            fn wrap(s: CudaSlice<Self>) -> Data {
                Data::$v(s)
            }
            fn linear(
                dev: &Device,
                x: &CudaSlice<Self>,
                w: &CudaSlice<Self>,
                mkn: (usize, usize, usize),
            ) -> Result<CudaSlice<Self>> {
                dev.linear(x, w, mkn)
            }
        }
    };
}
elem!(f32, F32);
elem!(f16, F16);
elem!(bf16, BF16);

/// Runs `$e` with `$T` the element type of `$dt`.
macro_rules! by_dtype {
    ($dt:expr, $T:ident => $e:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $e
            }
            DType::F16 => {
                type $T = f16;
                $e
            }
            DType::BF16 => {
                type $T = bf16;
                $e
            }
            // Weights reach the GPU dequantised to its compute dtype (`Weights::place`).
            DType::Quant(t) => {
                return Err(Error::Unsupported {
                    what: "quantized tensor in a GPU op",
                    value: t.name(),
                })
            }
        }
    };
}

/// The device buffer of `t` as `T`, or an error naming `what` (a host tensor, another dtype).
fn slice<'a, T: Elem>(what: &str, t: &'a Tensor) -> Result<&'a CudaSlice<T>> {
    match t.storage() {
        Storage::Cuda(b) => T::get(&b.data).ok_or_else(|| mismatch(what, t)),
        _ => Err(mismatch(what, t)),
    }
}

fn slice_mut<'a, T: Elem>(what: &str, t: &'a mut Tensor) -> Result<&'a mut CudaSlice<T>> {
    let err = mismatch(what, t);
    match t.storage_mut() {
        Storage::Cuda(b) => T::get_mut(&mut b.data).ok_or(err),
        _ => Err(err),
    }
}

fn mismatch(what: &str, t: &Tensor) -> Error {
    Error::arg(
        "tensor",
        format!(
            "{what}: the CUDA backend needs every operand on the GPU in one dtype, got {} on {}",
            t.dtype(),
            t.device()
        ),
    )
}

/// The device handle a tensor keeps (the first GPU operand's).
fn handle(t: &Tensor) -> Result<&Arc<Device>> {
    match t.storage() {
        Storage::Cuda(b) => Ok(&b.device),
        _ => Err(mismatch("operand", t)),
    }
}

/// A tensor of `shape` over device values `s` on `dev`.
fn wrap<T: Elem>(dev: &Arc<Device>, shape: &[usize], s: CudaSlice<T>) -> Result<Tensor> {
    Tensor::new(
        shape,
        Storage::Cuda(Buffer {
            device: dev.clone(),
            len: shape.iter().product(),
            data: T::wrap(s),
        }),
    )
}

fn u32s(what: &str, v: &[usize]) -> Result<Vec<u32>> {
    v.iter()
        .map(|&i| {
            u32::try_from(i).map_err(|_| Error::arg(what, format!("{i} does not fit in 32 bits")))
        })
        .collect()
}

impl Device {
    fn linear_t<T: Elem>(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let (n, k) = linear_dims(w);
        let m = x.rows();
        check_shape("linear input", &[m, k], &[m, x.cols()])?;
        let mut y = T::linear(
            self,
            slice("linear x", x)?,
            slice("linear weight", w)?,
            (m, k, n),
        )?;
        if let Some(b) = b {
            check_shape("linear bias", &[n], b.shape())?;
            self.add_bias(&mut y, slice("linear bias", b)?)?;
        }
        wrap(handle(x)?, &[m, n], y)
    }

    fn cat_rows_t<T: Elem>(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let c = parts[0].cols();
        let rows: usize = parts.iter().map(|t| t.rows()).sum();
        let mut out = self.zeros::<T>(rows * c)?;
        let mut at = 0;
        for (i, t) in parts.iter().enumerate() {
            check_shape(&format!("cat_rows part {i}"), &[t.rows(), c], t.shape())?;
            let n = t.len();
            if n > 0 {
                let src = slice::<T>("cat_rows", t)?;
                self.stream
                    .memcpy_dtod(&src.slice(..n), &mut out.slice_mut(at..at + n))
                    .map_err(|e| Error::Cuda(format!("cat_rows copy: {e}")))?;
            }
            at += n;
        }
        wrap(handle(parts[0])?, &[rows, c], out)
    }

    fn cat_cols_t<T: Elem>(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let n = parts[0].rows();
        let width: usize = parts.iter().map(|t| t.cols()).sum();
        let mut out = self.zeros::<T>(n * width)?;
        let mut offset = 0;
        for (i, t) in parts.iter().enumerate() {
            check_shape(&format!("cat_cols part {i} rows"), &[n], &[t.rows()])?;
            let src = slice::<T>("cat_cols", t)?;
            self.copy_cols(src, &mut out, (n, t.cols()), width, offset)?;
            offset += t.cols();
        }
        wrap(handle(parts[0])?, &[n, width], out)
    }
}

impl Backend for Device {
    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        let dev = Device::shared(self.ordinal)?;
        let host = t.to_host()?;
        let shape = host.shape().to_vec();
        match host.storage() {
            Storage::F32(v) => wrap(&dev, &shape, self.upload(v)?),
            Storage::F16(v) => wrap(&dev, &shape, self.upload(v)?),
            Storage::BF16(v) => wrap(&dev, &shape, self.upload(v)?),
            // Quantized blocks go up as f32 values.
            Storage::Quant { .. } => Backend::upload(self, &host.to_f32()?),
            Storage::Cuda(_) => Err(mismatch("upload", t)),
        }
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        by_dtype!(x.dtype(), T => self.linear_t::<T>(x, w, b))
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        check_shape("rms_norm input", &[x.rows(), w.len()], x.shape())?;
        by_dtype!(x.dtype(), T => {
            let y = Device::rms_norm::<T>(
                self,
                slice("rms_norm x", x)?,
                slice("rms_norm weight", w)?,
                x.rows(),
                x.cols(),
                eps as f32,
            )?;
            wrap(handle(x)?, x.shape(), y)
        })
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        check_shape("layer_norm input", &[x.rows(), w.len()], x.shape())?;
        by_dtype!(x.dtype(), T => {
            let y = Device::layer_norm::<T>(
                self,
                slice("layer_norm x", x)?,
                slice("layer_norm weight", w)?,
                slice("layer_norm bias", b)?,
                x.rows(),
                x.cols(),
                eps as f32,
            )?;
            wrap(handle(x)?, x.shape(), y)
        })
    }

    fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()> {
        check_shape("silu_mul up", gate.shape(), up.shape())?;
        *gate = by_dtype!(gate.dtype(), T => {
            let y = Device::silu_mul::<T>(self, slice("silu_mul gate", gate)?, slice("silu_mul up", up)?)?;
            wrap(handle(gate)?, gate.shape(), y)?
        });
        Ok(())
    }

    fn gelu(&self, x: &mut Tensor) -> Result<()> {
        *x = by_dtype!(x.dtype(), T => {
            let y = Device::gelu::<T>(self, slice("gelu", x)?)?;
            wrap(handle(x)?, x.shape(), y)?
        });
        Ok(())
    }

    fn quick_gelu(&self, x: &mut Tensor) -> Result<()> {
        *x = by_dtype!(x.dtype(), T => {
            let y = Device::quick_gelu::<T>(self, slice("quick_gelu", x)?)?;
            wrap(handle(x)?, x.shape(), y)?
        });
        Ok(())
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        check_shape("add", x.shape(), y.shape())?;
        *x = by_dtype!(x.dtype(), T => {
            let z = Device::add::<T>(self, slice("add x", x)?, slice("add y", y)?)?;
            wrap(handle(x)?, x.shape(), z)?
        });
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Tensor,
        heads: usize,
        positions: &[usize],
        inv_freq: &[f32],
    ) -> Result<()> {
        let d = 2 * inv_freq.len();
        check_shape("rope input", &[positions.len(), heads * d], x.shape())?;
        let pos = self.upload(&u32s("rope position", positions)?)?;
        let freq = self.upload(inv_freq)?;
        by_dtype!(x.dtype(), T => {
            Device::rope::<T>(self, slice_mut("rope", x)?, &pos, &freq, heads, d)
        })
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sh: AttnShape,
        lse: bool,
    ) -> Result<(Tensor, Option<Vec<f32>>)> {
        sh.check(q.len(), k.len(), v.len())?;
        let heads = (sh.heads, sh.kv_heads, sh.head_dim);
        by_dtype!(q.dtype(), T => {
            let (qs, ks, vs) = (
                slice::<T>("attention q", q)?,
                slice::<T>("attention k", k)?,
                slice::<T>("attention v", v)?,
            );
            if sh.t == 1 && sh.causal && !lse {
                let out = Device::attention_decode(self, qs, ks, vs, sh.s, heads)?;
                return Ok((wrap(handle(q)?, q.shape(), out)?, None));
            }
            let start = if sh.causal { sh.s - sh.t } else { 0 };
            let (out, l) = Device::attention(self, qs, ks, vs, (sh.t, sh.s), heads, start, sh.causal)?;
            let l = if lse { Some(self.download(&l)?) } else { None };
            Ok((wrap(handle(q)?, q.shape(), out)?, l))
        })
    }

    fn selected_probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
        cols: &[usize],
        heads: usize,
        kv_heads: usize,
        lse: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let d = q.cols() / heads.max(1);
        let (rows, cols) = (u32s("row", rows)?, u32s("column", cols)?);
        let probs = by_dtype!(q.dtype(), T => {
            let (qs, ks) = (slice("selected_probs q", q)?, slice("selected_probs k", k)?);
            // The attention's own log-sum-exps, or (ranking by keys no attention ran on yet)
            // computed here.
            let lse = match lse {
                Some(l) => {
                    check_shape("selected_probs lse", &[heads * rows.len()], &[l.len()])?;
                    self.upload(l)?
                }
                None => Device::selected_lse::<T>(self, qs, ks, &rows, (heads, kv_heads, d))?,
            };
            Device::selected_probs::<T>(self, qs, ks, &lse, &rows, &cols, (heads, kv_heads, d))?
        });
        let mut v = self.download(&probs)?;
        v.truncate(heads * rows.len() * cols.len());
        Ok(v)
    }

    fn embed(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let vocab = table.rows();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::arg(
                "token id",
                format!("{id} is outside the vocabulary of {vocab}"),
            ));
        }
        let c = table.cols();
        by_dtype!(table.dtype(), T => {
            let y = Device::gather_rows::<T>(self, slice("embed table", table)?, ids, c)?;
            wrap(handle(table)?, &[ids.len(), c], y)
        })
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let c = x.cols();
        let idx = u32s("row", rows)?;
        by_dtype!(x.dtype(), T => {
            let y = Device::gather_rows::<T>(self, slice("gather_rows", x)?, &idx, c)?;
            wrap(handle(x)?, &[rows.len(), c], y)
        })
    }

    fn cat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        if parts.is_empty() {
            return Err(Error::arg(
                "cat_rows",
                "no tensors to concatenate".to_string(),
            ));
        }
        by_dtype!(parts[0].dtype(), T => self.cat_rows_t::<T>(parts))
    }

    fn cat_cols(&self, parts: &[&Tensor]) -> Result<Tensor> {
        if parts.is_empty() {
            return Err(Error::arg(
                "cat_cols",
                "no tensors to concatenate".to_string(),
            ));
        }
        by_dtype!(parts[0].dtype(), T => self.cat_cols_t::<T>(parts))
    }

    fn append_rows(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        *dst = if dst.is_empty() {
            src.clone()
        } else {
            self.cat_rows(&[&*dst, src])?
        };
        Ok(())
    }

    fn first_nonfinite(&self, x: &Tensor) -> Result<Option<(usize, f32)>> {
        Ok(crate::ops::first_nonfinite(&x.to_vec_f32()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u32s_converts_and_refuses_indices_past_32_bits() {
        assert_eq!(
            u32s("row", &[0, 7, u32::MAX as usize]).unwrap(),
            vec![0, 7, u32::MAX]
        );
        let e = u32s("rope position", &[3, 1 << 32])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rope position") && e.contains("4294967296"),
            "{e}"
        );
    }

    #[test]
    fn host_operands_are_errors_naming_the_operand_and_device() {
        let host = Tensor::from_f32(&[2, 3], vec![0.0; 6]).unwrap();
        let e = slice::<f32>("linear weight", &host)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linear weight") && e.contains("f32 on cpu"),
            "{e}"
        );
        assert!(handle(&host).is_err());
        let mut host = host;
        let e = slice_mut::<bf16>("rope", &mut host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope") && e.contains("on the GPU"), "{e}");
    }
}
