//! The CPU backend: host tensors, f32 activations, the ops of [`crate::ops`].

use super::{Backend, Device, check_device, check_shape, linear_dims};
use crate::error::{Error, Result};
use crate::ops::attention::AttnShape;
use crate::ops::{act, attention, embed, matmul, norm, rope};
use crate::tensor::{HostBuf, Storage, Tensor};

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// `x` as `[rows, cols]` f32 host data, `cols` checked when given.
fn rows_of<'a>(what: &str, x: &'a Tensor, cols: Option<usize>) -> Result<(&'a [f32], usize)> {
    let v = x.f32s().map_err(|_| {
        Error::arg(
            "tensor",
            format!(
                "{what}: the CPU backend computes on f32 host activations, got {} on {}",
                x.dtype(),
                x.device()
            ),
        )
    })?;
    if let Some(c) = cols
        && x.cols() != c
    {
        return Err(Error::Shape {
            name: what.into(),
            expected: vec![x.rows(), c],
            got: x.shape().to_vec(),
        });
    }
    Ok((v, x.rows()))
}

fn mut_rows<'a>(what: &str, x: &'a mut Tensor) -> Result<&'a mut [f32]> {
    let (dt, dev) = (x.dtype(), x.device());
    x.f32s_mut().map_err(|_| {
        Error::arg(
            "tensor",
            format!("{what}: the CPU backend computes on f32 host activations, got {dt} on {dev}"),
        )
    })
}

impl Backend for Cpu {
    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        t.to_host()
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        check_device("linear", &Device::Cpu, &[x, w])?;
        let (out, inp) = linear_dims(w);
        let (xs, rows) = rows_of("linear input", x, Some(inp))?;
        if let Some(b) = b {
            check_device("linear", &Device::Cpu, &[b])?;
            check_shape("linear bias", &[out], b.shape())?;
        }
        Tensor::from_f32(&[rows, out], matmul::linear(xs, w, b)?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        check_device("rms_norm", &Device::Cpu, &[x, w])?;
        let (xs, _) = rows_of("rms_norm input", x, Some(w.len()))?;
        Tensor::from_f32(x.shape(), norm::rms_norm(xs, w, eps)?)
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        check_device("layer_norm", &Device::Cpu, &[x, w, b])?;
        let (xs, _) = rows_of("layer_norm input", x, Some(w.len()))?;
        Tensor::from_f32(x.shape(), norm::layer_norm(xs, w, b, eps)?)
    }

    fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()> {
        check_shape("silu_mul up", gate.shape(), up.shape())?;
        let (u, _) = rows_of("silu_mul up", up, None)?;
        act::silu_mul(mut_rows("silu_mul gate", gate)?, u);
        Ok(())
    }

    fn gelu(&self, x: &mut Tensor) -> Result<()> {
        act::gelu(mut_rows("gelu", x)?);
        Ok(())
    }

    fn quick_gelu(&self, x: &mut Tensor) -> Result<()> {
        act::quick_gelu(mut_rows("quick_gelu", x)?);
        Ok(())
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        check_shape("add", x.shape(), y.shape())?;
        let (ys, _) = rows_of("add", y, None)?;
        crate::ops::add(mut_rows("add", x)?, ys);
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
        rope::rope(mut_rows("rope", x)?, heads, d, positions, inv_freq);
        Ok(())
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sh: AttnShape,
        _lse: bool,
    ) -> Result<(Tensor, Option<Vec<f32>>)> {
        let (qs, _) = rows_of("attention q", q, None)?;
        let (ks, _) = rows_of("attention k", k, None)?;
        let (vs, _) = rows_of("attention v", v, None)?;
        let out = attention::attention(qs, ks, vs, sh)?;
        Ok((Tensor::from_f32(q.shape(), out)?, None))
    }

    fn selected_probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
        cols: &[usize],
        heads: usize,
        kv_heads: usize,
        _lse: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let (qs, _) = rows_of("selected_probs q", q, None)?;
        let (ks, _) = rows_of("selected_probs k", k, None)?;
        let d = q.cols() / heads.max(1);
        attention::selected_probs(qs, ks, rows, cols, heads, kv_heads, d)
    }

    fn embed(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        check_device("embed", &Device::Cpu, &[table])?;
        Tensor::from_f32(&[ids.len(), table.cols()], embed::embed(table, ids)?)
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let c = x.cols();
        let n = x.rows();
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            return Err(Error::arg(
                "gather_rows",
                format!("row {bad} of a {n}-row tensor"),
            ));
        }
        let storage = match x.storage() {
            Storage::F32(v) => Storage::F32(pick_rows(v, rows, c)),
            Storage::F16(v) => Storage::F16(pick_rows(v, rows, c)),
            Storage::BF16(v) => Storage::BF16(pick_rows(v, rows, c)),
            // Whole rows of blocks.
            Storage::Quant { ty, data } => Storage::Quant {
                ty: *ty,
                data: pick_rows(data, rows, data.len() / n.max(1)),
            },
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => return Err(not_host("gather_rows", x)),
        };
        Tensor::new(&[rows.len(), c], storage)
    }

    fn cat_rows(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let c = parts.first().map_or(0, |t| t.cols());
        let mut out = Vec::with_capacity(parts.iter().map(|t| t.len()).sum());
        for (i, t) in parts.iter().enumerate() {
            let (v, _) = rows_of(&format!("cat_rows part {i}"), t, Some(c))?;
            out.extend_from_slice(v);
        }
        Tensor::from_f32(&[out.len() / c.max(1), c], out)
    }

    fn cat_cols(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let n = parts.first().map_or(0, |t| t.rows());
        let width: usize = parts.iter().map(|t| t.cols()).sum();
        let host = parts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (v, rows) = rows_of(&format!("cat_cols part {i}"), t, None)?;
                check_shape("cat_cols rows", &[n], &[rows])?;
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(n * width);
        for r in 0..n {
            for (v, t) in host.iter().zip(parts) {
                out.extend_from_slice(&v[r * t.cols()..(r + 1) * t.cols()]);
            }
        }
        Tensor::from_f32(&[n, width], out)
    }

    fn append_rows(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        let c = src.cols();
        let (s, rows) = rows_of("append_rows source", src, None)?;
        if dst.is_empty() {
            *dst = Tensor::from_f32(&[rows, c], s.to_vec())?;
            return Ok(());
        }
        check_shape("append_rows width", &[dst.cols()], &[c])?;
        let n = dst.rows() + rows;
        let mut v = std::mem::replace(dst, Tensor::zeros(&[0, c])).into_f32_vec()?;
        v.extend_from_slice(s);
        *dst = Tensor::from_f32(&[n, c], v)?;
        Ok(())
    }

    fn first_nonfinite(&self, x: &Tensor) -> Result<Option<(usize, f32)>> {
        let (v, _) = rows_of("check_finite", x, None)?;
        Ok(crate::ops::first_nonfinite(v))
    }
}

/// Rows `rows` of `v: [n, c]`.
fn pick_rows<T: Copy>(v: &[T], rows: &[usize], c: usize) -> HostBuf<T> {
    let mut out = Vec::with_capacity(rows.len() * c);
    for &r in rows {
        out.extend_from_slice(&v[r * c..(r + 1) * c]);
    }
    out.into()
}

#[cfg(feature = "cuda")]
fn not_host(op: &str, t: &Tensor) -> Error {
    Error::arg(
        "device",
        format!("{op}: a tensor on {} given to the CPU backend", t.device()),
    )
}
