//! Quantizers f32 -> GGUF blocks (the inverse of [`super::gguf::dequantize`]), and quantize on
//! load ([`Quantize`]): a checkpoint's linear weights turned into blocks one tensor at a time as
//! they are read, so a safetensors model runs on the quantized kernels of
//! [`crate::ops::quant`].
//!
//! Every quantizer reproduces llama.cpp's reference one (`quantize_row_<type>_ref` in
//! ggml-quants.c, what `llama-quantize` writes without an importance matrix) operation for
//! operation in f32, so the blocks are bit-identical to llama.cpp's
//! (`tests/reference/quantize_ref.py` checks them against its library):
//!
//! | type | per block | levels |
//! |------|-----------|--------|
//! | Q8_0 | `d = amax / 127` | `q = round(x / d)` (half away from zero) |
//! | Q4_0, Q5_0 | `d = max / -2^(b-1)` (`max`: the element of largest magnitude) | `q = min(2^b - 1, trunc(x / d + 2^(b-1) + 0.5))` |
//! | Q4_1, Q5_1 | `d = (max - min) / (2^b - 1)`, `m = min` | `q = min(2^b - 1, trunc((x - min) / d + 0.5))` |
//! | Q4_K, Q5_K | per 32: scale and min by `make_qkx2_quants` (a weighted least-squares search over 21 / 16 candidate steps); 6-bit scales and mins relative to the block's largest | `q = clamp(nearest_int((x + m) / (d · sc)), 0, 2^b - 1)` |
//! | Q6_K | per 16: scale by `make_qx_quants` (x²-weighted search over 19 candidates); 8-bit scales relative to the largest | `q = clamp(nearest_int(x / (d · sc)), -32, 31) + 32` |
//!
//! Scales are stored as f16 (round to nearest even). Dequantised, the error per element is at most
//! half a step for Q8_0 and Q4_1/Q5_1, one step for Q4_0/Q5_0 (the side opposite the largest
//! element has one level fewer), plus the f16 rounding of the scales (2⁻¹¹ relative); the
//! K-quants trade the worst case for a smaller weighted squared error.

use super::gguf::{GgmlType, f16_at, scale_min_k4};
use super::nn::Param;
use crate::error::{Error, Result};
use crate::ops::quant::nearest_int;
use crate::tensor::{Storage, Tensor};
use half::f16;
use rayon::prelude::*;

/// The types [`quantize`] writes.
pub const TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Whether [`quantize`] writes blocks of `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    TYPES.contains(&ty)
}

/// The quantization type named `s` (`q8_0`, `q4_k`, ...; any case), one of [`TYPES`]: the
/// parser of `--quantize`.
pub fn parse_type(s: &str) -> Result<GgmlType> {
    let want = s.trim().to_ascii_uppercase();
    TYPES
        .iter()
        .copied()
        .find(|t| t.name() == want)
        .ok_or_else(|| Error::Unsupported {
            what: "quantization type (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k)",
            value: s.to_string(),
        })
}

/// `x` in GGUF blocks of `ty`, bit-identical to llama.cpp's `quantize_row_<ty>_ref`. `x.len()`
/// must be a whole number of blocks; `ty` one of [`TYPES`]. Blocks are quantized in parallel.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let block: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::Q4_0 => |x, y| q_sym::<4>(x, y),
        GgmlType::Q5_0 => |x, y| q_sym::<5>(x, y),
        GgmlType::Q4_1 => |x, y| q_affine::<4>(x, y),
        GgmlType::Q5_1 => |x, y| q_affine::<5>(x, y),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_K => |x, y| q_k45::<4>(x, y),
        GgmlType::Q5_K => |x, y| q_k45::<5>(x, y),
        GgmlType::Q6_K => q6_k,
        other => {
            return Err(Error::Unsupported {
                what: "quantization type to quantize to (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                value: other.name(),
            });
        }
    };
    if !x.len().is_multiple_of(bs) {
        return Err(Error::Shape {
            name: format!("{ty} quantizer input (whole blocks of {bs})"),
            expected: vec![x.len().next_multiple_of(bs)],
            got: vec![x.len()],
        });
    }
    let mut out = vec![0u8; x.len() / bs * ts];
    const RUN: usize = 64;
    out.par_chunks_mut(ts * RUN)
        .zip(x.par_chunks(bs * RUN))
        .for_each(|(o, x)| {
            for (ob, xb) in o.chunks_exact_mut(ts).zip(x.chunks_exact(bs)) {
                block(xb, ob);
            }
        });
    Ok(out)
}

/// `t` (a host matrix `[rows, cols]`, any dtype) as blocks of `ty`: a [`Storage::Quant`] tensor
/// of the same shape. Fails unless `cols` is a whole number of blocks. Rows are converted to f32
/// a few at a time, so no f32 copy of the whole matrix is made.
pub fn quantize_tensor(t: &Tensor, ty: GgmlType) -> Result<Tensor> {
    let (rows, cols) = (t.rows(), t.cols());
    if !cols.is_multiple_of(ty.block_size()) || t.shape().len() < 2 {
        return Err(Error::Shape {
            name: format!(
                "matrix to quantize to {ty} (rows of whole blocks of {})",
                ty.block_size()
            ),
            expected: vec![rows, cols.next_multiple_of(ty.block_size())],
            got: t.shape().to_vec(),
        });
    }
    let step = (1 << 20) / cols.max(1) + 1;
    let mut data = Vec::with_capacity(rows * cols / ty.block_size() * ty.type_size());
    for start in (0..rows).step_by(step) {
        let end = (start + step).min(rows);
        let x = match t.storage() {
            Storage::F32(v) => std::borrow::Cow::Borrowed(&v[start * cols..end * cols]),
            _ => std::borrow::Cow::Owned(t.rows_f32(start, end)?),
        };
        data.extend(quantize(ty, &x)?);
    }
    Tensor::new(
        t.shape(),
        Storage::Quant {
            ty,
            data: data.into(),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Quantize on load
// ---------------------------------------------------------------------------------------------

/// Quantize on load (`--quantize`): the language model's linear weights (attention q/k/v/o, MLP
/// gate/up/down, and the LM head, which is the embedding table when tied) become blocks of `ty`
/// as each is read; norms, biases and untied embeddings stay as loaded. The vision tower and
/// projector stay as loaded (bf16 in released LLaVA checkpoints) unless `vision`, which
/// quantizes their linear weights too (CLIP's q/k/v/out projections and MLP, the projector's two
/// linears; not the patch or position embeddings). A matrix whose rows are not whole blocks (for
/// the K-types, 256 elements) stays as loaded; [`Quantize::summary`] names them. CPU only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantize {
    /// One of [`TYPES`].
    pub ty: GgmlType,
    /// Quantize the vision tower's and projector's linear weights too.
    pub vision: bool,
}

impl Quantize {
    /// Whether `name` (canonical, [`super::weights`]) is a weight this quantizes; `tied`: the LM
    /// head is the embedding table.
    pub fn wants(&self, name: &str, tied: bool) -> bool {
        let Some(stem) = name.strip_suffix(".weight") else {
            return false;
        };
        let part = stem.rsplit('.').next().unwrap_or(stem);
        if stem.starts_with("lm.layers.") {
            return matches!(
                part,
                "q_proj" | "k_proj" | "v_proj" | "o_proj" | "gate_proj" | "up_proj" | "down_proj"
            );
        }
        if stem.starts_with("vision.encoder.layers.") {
            return self.vision
                && matches!(
                    part,
                    "q_proj" | "k_proj" | "v_proj" | "out_proj" | "fc1" | "fc2"
                );
        }
        match stem {
            "lm_head" => true,
            "lm.embed_tokens" => tied,
            "projector.linear_1" | "projector.linear_2" => self.vision,
            _ => false,
        }
    }

    /// `t` in blocks of `ty` when [`Quantize::wants`] `name` and its rows are whole blocks, with
    /// `true`; `t` as it is, with `false`, otherwise. (A wanted tensor already in blocks of `ty`
    /// is returned as it is, with `true`.)
    pub fn apply(&self, name: &str, tied: bool, t: Tensor) -> Result<(Tensor, bool)> {
        if !self.wants(name, tied)
            || t.shape().len() != 2
            || !t.cols().is_multiple_of(self.ty.block_size())
        {
            return Ok((t, false));
        }
        if t.dtype() == crate::tensor::DType::Quant(self.ty) {
            return Ok((t, true));
        }
        Ok((quantize_tensor(&t, self.ty)?, true))
    }

    /// One line on what quantizing a model's `params` did: how many of the weights it wants are
    /// in blocks of `ty` and their bytes, and the ones kept as loaded because their rows are not
    /// whole blocks (layer indices folded to `*`, with a count and the shape).
    pub fn summary(&self, params: &[Param], tied: bool) -> String {
        let ty = crate::tensor::DType::Quant(self.ty);
        let wanted: Vec<&Param> = params
            .iter()
            .filter(|p| self.wants(&p.name, tied))
            .collect();
        let done: Vec<&&Param> = wanted.iter().filter(|p| p.value.dtype() == ty).collect();
        let bytes: usize = done.iter().map(|p| p.value.nbytes()).sum();
        let mut kept: Vec<(String, Vec<usize>, String, usize)> = Vec::new();
        for p in wanted.iter().filter(|p| p.value.dtype() != ty) {
            let folded = p
                .name
                .split('.')
                .map(|s| if s.parse::<usize>().is_ok() { "*" } else { s })
                .collect::<Vec<_>>()
                .join(".");
            let (shape, dtype) = (p.value.shape().to_vec(), p.value.dtype().to_string());
            match kept.iter_mut().find(|k| k.0 == folded && k.1 == shape) {
                Some(k) => k.3 += 1,
                None => kept.push((folded, shape, dtype, 1)),
            }
        }
        let mut line = format!(
            "quantize {}: {} of {} linear weights in {} blocks ({:.1} MB)",
            self.ty.name().to_lowercase(),
            done.len(),
            wanted.len(),
            self.ty,
            bytes as f64 / 1e6
        );
        if !kept.is_empty() {
            let list: Vec<String> = kept
                .iter()
                .map(|(n, s, d, c)| format!("{n} x{c} {s:?} {d}"))
                .collect();
            line += &format!(
                "; kept as loaded (rows not whole blocks of {}): {}",
                self.ty.block_size(),
                list.join(", ")
            );
        }
        if !self.vision && params.iter().any(|p| p.name.starts_with("vision.")) {
            line += "; vision tower and projector as loaded";
        }
        line
    }
}

// ---------------------------------------------------------------------------------------------
// Block quantizers (one block of `x` into `y`, laid out as in ggml-common.h)
// ---------------------------------------------------------------------------------------------

#[inline]
fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// 32 levels of `B` bits as GGUF's 32-element blocks store them: low nibbles of elements 0..16
/// and 16..32 share `qs[j]`; the fifth bits (B = 5) go to the u32 `qh`, bit j for element j.
fn pack32(l: &[u8; 32], qs: &mut [u8], qh: Option<&mut [u8]>) {
    let mut h = 0u32;
    for j in 0..16 {
        qs[j] = (l[j] & 0x0f) | ((l[j + 16] & 0x0f) << 4);
        h |= ((l[j] as u32 >> 4) & 1) << j | ((l[j + 16] as u32 >> 4) & 1) << (j + 16);
    }
    if let Some(qh) = qh {
        qh.copy_from_slice(&h.to_le_bytes());
    }
}

/// Q4_0 / Q5_0 (`quantize_row_q{4,5}_0_ref`): `d = max / -2^(B-1)` with `max` the first element
/// of largest magnitude, `q = min(2^B - 1, trunc(x / d + 2^(B-1) + 0.5))`.
fn q_sym<const B: u32>(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let half = (1u32 << (B - 1)) as f32;
    let d = max / -half;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let top = ((1u32 << B) - 1) as u8;
    let mut l = [0u8; 32];
    for (l, &v) in l.iter_mut().zip(x) {
        *l = ((v * id + (half + 0.5)) as i8 as u8).min(top);
    }
    put_f16(y, 0, d);
    match B {
        4 => pack32(&l, &mut y[2..18], None),
        _ => {
            let (qh, qs) = y[2..22].split_at_mut(4);
            pack32(&l, qs, Some(qh))
        }
    }
}

/// Q4_1 / Q5_1 (`quantize_row_q{4,5}_1_ref`): `d = (max - min) / (2^B - 1)`, `m = min`,
/// `q = min(2^B - 1, trunc((x - min) / d + 0.5))`.
fn q_affine<const B: u32>(x: &[f32], y: &mut [u8]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let top = (1u32 << B) - 1;
    let d = (max - min) / top as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; 32];
    for (l, &v) in l.iter_mut().zip(x) {
        *l = (((v - min) * id + 0.5) as u8).min(top as u8);
    }
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    match B {
        4 => pack32(&l, &mut y[4..20], None),
        _ => {
            let (qh, qs) = y[4..24].split_at_mut(4);
            pack32(&l, qs, Some(qh))
        }
    }
}

/// Q8_0 (`quantize_row_q8_0_ref`): `d = amax / 127`, `q = round(x / d)` (half away from zero).
fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x
        .iter()
        .fold(0.0f32, |a, v| if a > v.abs() { a } else { v.abs() });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for (q, &v) in y[2..34].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

/// Eight f32 lanes: lane `j` is sub-block `j` of a K-quant super-block.
type Lanes = [f32; 8];

#[inline]
fn lanes(f: impl Fn(usize) -> f32) -> Lanes {
    std::array::from_fn(f)
}

/// ggml's `make_qkx2_quants` (without MAD) on the eight 32-element sub-blocks of a super-block at
/// once (`x[i][j]`: element `i` of sub-block `j`): for each, levels `l` in `0..=nmax` and
/// `(scale, min)` with `x ≈ scale · l - min`, minimising `Σ w (scale · l - min - x)²` over the
/// steps `(rmin + rdelta · is + nmax) / (max - min)`, `is = 0..=nstep`, each refined by weighted
/// least squares (the min clamped to at most 0). Every sub-block's sums run in ggml's order, so
/// the result is bit-identical to it; the eight sub-blocks run side by side in vector lanes
/// (ggml's sequential sums leave nothing to vectorise within one).
fn make_qkx2_quants_x8(
    nmax: u8,
    x: &[Lanes; 32],
    w: &[Lanes; 32],
    l: &mut [[u8; 8]; 32],
    (rmin, rdelta, nstep): (f32, f32, i32),
) -> (Lanes, Lanes) {
    let (mut min, mut max, mut sum_w) = (x[0], x[0], w[0]);
    let mut sum_x = lanes(|j| sum_w[j] * x[0][j]);
    for i in 1..32 {
        for j in 0..8 {
            let v = x[i][j];
            min[j] = if v < min[j] { v } else { min[j] };
            max[j] = if v > max[j] { v } else { max[j] };
            sum_w[j] += w[i][j];
            sum_x[j] += w[i][j] * v;
        }
    }
    let min0 = lanes(|j| if min[j] > 0.0 { 0.0 } else { min[j] });
    let mut min = min0;
    let nmaxf = nmax as f32;
    let level =
        |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, nmax as i32) as u8;
    let iscale = lanes(|j| nmaxf / (max[j] - min[j]));
    let mut scale = lanes(|j| 1.0 / iscale[j]);
    let mut best_error = [0.0f32; 8];
    for i in 0..32 {
        for j in 0..8 {
            l[i][j] = level(iscale[j], x[i][j], min[j]);
            let diff = scale[j] * l[i][j] as f32 + min[j] - x[i][j];
            best_error[j] += w[i][j] * (diff * diff);
        }
    }
    let mut aux = [[0u8; 8]; 32];
    for is in 0..=nstep {
        let step = rmin + rdelta * is as f32 + nmaxf;
        // ggml divides by `max - min` with the min as the search has moved it.
        let iscale = lanes(|j| step / (max[j] - min[j]));
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
        for i in 0..32 {
            for j in 0..8 {
                aux[i][j] = level(iscale[j], x[i][j], min[j]);
                let lf = aux[i][j] as f32;
                sum_l[j] += w[i][j] * lf;
                sum_l2[j] += w[i][j] * lf * lf;
                sum_xl[j] += w[i][j] * lf * x[i][j];
            }
        }
        let det = lanes(|j| sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]);
        let mut this_scale = lanes(|j| (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / det[j]);
        let mut this_min = lanes(|j| (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / det[j]);
        for j in 0..8 {
            if this_min[j] > 0.0 {
                this_min[j] = 0.0;
                this_scale[j] = sum_xl[j] / sum_l2[j];
            }
        }
        let mut cur_error = [0.0f32; 8];
        for i in 0..32 {
            for j in 0..8 {
                let diff = this_scale[j] * aux[i][j] as f32 + this_min[j] - x[i][j];
                cur_error[j] += w[i][j] * (diff * diff);
            }
        }
        let take: [bool; 8] = std::array::from_fn(|j| det[j] > 0.0 && cur_error[j] < best_error[j]);
        for i in 0..32 {
            for j in 0..8 {
                l[i][j] = if take[j] { aux[i][j] } else { l[i][j] };
            }
        }
        for j in 0..8 {
            if take[j] {
                best_error[j] = cur_error[j];
                scale[j] = this_scale[j];
                min[j] = this_min[j];
            }
        }
    }
    // A constant sub-block (max == min): all levels 0, scale 0.
    for j in (0..8).filter(|&j| max[j] == min0[j]) {
        for row in l.iter_mut() {
            row[j] = 0;
        }
        scale[j] = 0.0;
        min[j] = min0[j];
    }
    (scale, lanes(|j| -min[j]))
}

/// Q4_K / Q5_K (`quantize_row_q{4,5}_K_ref`): per 32 elements a scale and min from
/// [`make_qkx2_quants`] (weights `sqrt(mean x²) + |x|`), both stored as 6 bits relative to the
/// block's largest (`d`, `dmin` in f16), then every level recomputed against the stored scales.
fn q_k45<const B: u32>(x: &[f32], y: &mut [u8]) {
    let nmax = ((1u32 << B) - 1) as u8;
    let search = if B == 4 {
        (-1.0, 0.1, 20)
    } else {
        (-0.5, 0.1, 15)
    };
    // Sub-block j in lane j.
    let xt: [Lanes; 32] = std::array::from_fn(|i| lanes(|j| x[32 * j + i]));
    let mut sum_x2 = [0.0f32; 8];
    for xi in &xt {
        for j in 0..8 {
            sum_x2[j] += xi[j] * xi[j];
        }
    }
    let av_x = lanes(|j| (sum_x2[j] / 32.0).sqrt());
    let w: [Lanes; 32] = std::array::from_fn(|i| lanes(|j| av_x[j] + xt[i][j].abs()));
    let mut lt = [[0u8; 8]; 32];
    let (scales, mins) = make_qkx2_quants_x8(nmax, &xt, &w, &mut lt, search);
    let mut l: [u8; 256] = std::array::from_fn(|e| lt[e % 32][e / 32]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut y[4..16];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(y, 0, max_scale / 63.0);
    put_f16(y, 2, max_min / 63.0);
    let (d, dmin) = (f16_at(y, 0), f16_at(y, 2));
    for j in 0..8 {
        let (s, m) = scale_min_k4(j, &y[4..16]);
        let dl = d * s as f32;
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / dl).clamp(0, nmax as i32) as u8;
        }
    }
    // Sub-blocks 2c and 2c+1 share 32 bytes of qs (low and high nibbles); Q5_K's fifth bits go
    // to bit j of qh[e] for element e of sub-block j.
    let qs_at = if B == 4 { 16 } else { 48 };
    for c in 0..4 {
        for e in 0..32 {
            let (lo, hi) = (l[64 * c + e], l[64 * c + 32 + e]);
            y[qs_at + 32 * c + e] = (lo & 0x0f) | ((hi & 0x0f) << 4);
            if B == 5 {
                y[16 + e] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            }
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (weights `x²`): levels `l + nmax` with `l` in
/// `-nmax..nmax` and the scale, the best of the steps `-(nmax + 0.1 · is) / max`,
/// `is = -9..=9`, by weighted least squares (`max` the element of largest magnitude).
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().fold((0.0f32, 0.0f32), |(lx, l2), &v| {
            let lf = level(iscale, v) as f32;
            let w = v * v;
            (lx + w * v * lf, l2 + w * lf * lf)
        })
    };
    let fill = |l: &mut [i8], iscale: f32| {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = (nmax + level(iscale, v)) as i8;
        }
    };
    let iscale = -(nmax as f32) / max;
    fill(l, iscale);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(l, iscale);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K (`quantize_row_q6_K_ref`): per 16 elements a scale from [`make_qx_quants`], stored as
/// i8 relative to the block's largest (`d` in f16), then every level recomputed against the
/// stored scales; `ql` holds the low nibbles, `qh` the top two bits.
fn q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
    for g in 0..16 {
        scales[g] = make_qx_quants(32, &x[16 * g..16 * g + 16], &mut l[16 * g..16 * g + 16]);
        if scales[g].abs() > max_abs {
            max_abs = scales[g].abs();
            max_scale = scales[g];
        }
    }
    if max_abs < 1e-15 {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    let d = f16_at(y, 208);
    for g in 0..16 {
        let s = nearest_int(iscale * scales[g]).min(127) as i8;
        y[192 + g] = s as u8;
        let dl = d * s as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * g..16 * g + 16 {
            l[i] = (nearest_int(x[i] / dl).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, qh) = y[..192].split_at_mut(128);
    for h in 0..2 {
        for e in 0..32 {
            let q: [u8; 4] = std::array::from_fn(|k| l[128 * h + 32 * k + e] as u8);
            ql[64 * h + e] = (q[0] & 0x0f) | ((q[2] & 0x0f) << 4);
            ql[64 * h + 32 + e] = (q[1] & 0x0f) | ((q[3] & 0x0f) << 4);
            qh[32 * h + e] =
                (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::dequantize;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// Normal-ish values (sum of uniforms) times a magnitude from 1e-3 to 1e2 per 256 elements
    /// (within a super-block the K-types' 6-bit sub-block scales are relative to the largest).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut scale = 1.0f32;
        (0..n)
            .map(|i| {
                if i % 256 == 0 {
                    scale = 10f32.powf(rng.random_range(-3.0..2.0));
                }
                let g: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum();
                g * scale
            })
            .collect()
    }

    /// Dequantised blocks are within the type's bound of the input. Per 32 elements: half a step
    /// (Q8_0: `amax / 127`; Q4_1/Q5_1: `(max - min) / (2^b - 1)`) or a whole step (Q4_0/Q5_0:
    /// `amax / 2^(b-1)`), plus the f16 rounding of the scale and min. The K-types minimise a
    /// weighted squared error instead: their RMS error relative to the RMS of each 32 elements
    /// stays under 8% (Q4_K), 4% (Q5_K), 2% (Q6_K) (measured 6.9%, 3.5%, 1.7% on this data;
    /// Q4_0 8.2%, Q4_1 7.6%, Q5_0 4.1%, Q5_1 3.7%, Q8_0 0.5%).
    #[test]
    fn round_trip_error_within_the_types_bound() {
        let x = data(256 * 64, 1);
        for ty in TYPES {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), x.len() / ty.block_size() * ty.type_size());
            let y = dequantize(ty, &q, x.len()).unwrap();
            let (mut se, mut sx) = (0.0f64, 0.0f64);
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let (lo, hi) = xb
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let step = match ty {
                    GgmlType::Q8_0 => amax / 127.0 / 2.0,
                    GgmlType::Q4_0 => amax / 8.0,
                    GgmlType::Q5_0 => amax / 16.0,
                    GgmlType::Q4_1 => (hi - lo) / 15.0 / 2.0,
                    GgmlType::Q5_1 => (hi - lo) / 31.0 / 2.0,
                    _ => f32::INFINITY,
                };
                // f16 scales: 2⁻¹¹ relative, or 2⁻²⁵ absolute where they are subnormal, times
                // up to 128 levels.
                let bound = step + amax / 1024.0 + 128.0 * 2f32.powi(-25);
                let rms = (xb.iter().map(|v| (v * v) as f64).sum::<f64>() / 32.0).sqrt();
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= bound, "{ty}: {a} -> {b} (bound {bound})");
                    se += (((a - b) as f64) / rms).powi(2);
                    sx += 1.0;
                }
            }
            let rel = (se / sx).sqrt();
            let limit = match ty {
                GgmlType::Q4_K => 0.08,
                GgmlType::Q5_K => 0.04,
                GgmlType::Q6_K => 0.02,
                _ => 1.0,
            };
            println!("{ty}: relative RMS error {rel:.4}");
            assert!(rel < limit, "{ty}: relative RMS error {rel}");
        }
    }

    /// Blocks of zeros come back as zeros, and constant blocks within the bound (the K-types
    /// keep a min, so a constant is exact up to f16).
    #[test]
    fn zero_and_constant_blocks() {
        for ty in TYPES {
            let z = vec![0.0f32; 256];
            assert!(
                dequantize(ty, &quantize(ty, &z).unwrap(), 256)
                    .unwrap()
                    .iter()
                    .all(|&v| v == 0.0),
                "{ty}"
            );
            let c = vec![-0.75f32; 256];
            let y = dequantize(ty, &quantize(ty, &c).unwrap(), 256).unwrap();
            assert!(
                y.iter().all(|&v| (v + 0.75).abs() < 0.75 / 512.0),
                "{ty}: {:?}",
                &y[..4]
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            quantize(GgmlType::Q4_K, &[0.0; 32]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            quantize(GgmlType::Q2_K, &[0.0; 256]),
            Err(Error::Unsupported { .. })
        ));
        let t = Tensor::from_f32(&[2, 48], vec![0.0; 96]).unwrap();
        assert!(matches!(
            quantize_tensor(&t, GgmlType::Q8_0),
            Err(Error::Shape { .. })
        ));
        assert_eq!(parse_type("Q4_k").unwrap(), GgmlType::Q4_K);
        assert_eq!(parse_type(" q8_0 ").unwrap(), GgmlType::Q8_0);
        for bad in ["q3_k", "f16", "", "q8"] {
            let e = parse_type(bad).unwrap_err().to_string();
            assert!(e.contains("q4_k") && e.contains(bad), "{e}");
        }
    }

    /// A bf16 matrix with more rows than one conversion chunk quantizes as its f32 values do.
    #[test]
    fn tensor_quantizes_like_its_values() {
        let (rows, cols) = (33000, 32);
        let x: Vec<f32> = data(rows * cols, 2)
            .into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect();
        let bf = Tensor::from_f32(&[rows, cols], x.clone())
            .unwrap()
            .to_dtype(crate::tensor::DType::BF16)
            .unwrap();
        let t = quantize_tensor(&bf, GgmlType::Q8_0).unwrap();
        assert_eq!(t.shape(), &[rows, cols]);
        match t.storage() {
            Storage::Quant { ty, data } => {
                assert_eq!(*ty, GgmlType::Q8_0);
                assert_eq!(&data[..], &quantize(GgmlType::Q8_0, &x).unwrap()[..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wants_the_linear_weights() {
        let lm = Quantize {
            ty: GgmlType::Q8_0,
            vision: false,
        };
        let all = Quantize { vision: true, ..lm };
        for n in [
            "lm.layers.0.self_attn.q_proj.weight",
            "lm.layers.11.self_attn.o_proj.weight",
            "lm.layers.3.mlp.gate_proj.weight",
            "lm.layers.3.mlp.down_proj.weight",
            "lm_head.weight",
        ] {
            assert!(lm.wants(n, false), "{n}");
        }
        for n in [
            "lm.layers.0.self_attn.q_proj.bias",
            "lm.layers.0.input_layernorm.weight",
            "lm.norm.weight",
            "lm.embed_tokens.weight",
            "vision.encoder.layers.0.mlp.fc1.weight",
            "projector.linear_1.weight",
        ] {
            assert!(!lm.wants(n, false), "{n}");
        }
        assert!(lm.wants("lm.embed_tokens.weight", true));
        for n in [
            "vision.encoder.layers.0.self_attn.out_proj.weight",
            "vision.encoder.layers.2.mlp.fc2.weight",
            "projector.linear_2.weight",
        ] {
            assert!(all.wants(n, false) && !lm.wants(n, false), "{n}");
        }
        for n in [
            "vision.embeddings.patch_embedding.weight",
            "vision.embeddings.position_embedding.weight",
            "vision.encoder.layers.0.layer_norm1.weight",
            "projector.linear_1.bias",
        ] {
            assert!(!all.wants(n, true), "{n}");
        }
    }
}
