//! Matrix products through the `gemm` crate.

use crate::error::{Error, Result};
use crate::model::gguf;
use crate::ops::{bf16, quant};
use crate::tensor::{Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// `out[m, n] = a[m, k] · b[n, k]ᵀ`, both row-major; `b` rows are read with stride `b_rs`
/// (`k` for a packed matrix) and `a` rows with stride `a_rs`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    out: &mut [f32],
    parallel: bool,
) {
    // b viewed as [k, n]: element (kk, j) at j * b_rs + kk.
    gemm_strided(m, n, k, a, (a_rs, 1), b, (1, b_rs), out, false, parallel);
}

/// `out[m, n] = a[m, k] · b[k, n]`, `b` rows read with stride `b_rs`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    out: &mut [f32],
    parallel: bool,
) {
    gemm_strided(m, n, k, a, (a_rs, 1), b, (b_rs, 1), out, false, parallel);
}

/// `out (+)= a · b` through `gemm` for `a: [m, k]` with element (i, kk) at
/// `i * a_strides.0 + kk * a_strides.1`, `b: [k, n]` with element (kk, j) at
/// `kk * b_strides.0 + j * b_strides.1`, `out: [m, n]` row-major; `accumulate` adds to `out`.
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    out: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    assert!(out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.len() > (m - 1) * a_strides.0 + (k - 1) * a_strides.1);
    assert!(b.len() > (k - 1) * b_strides.0 + (n - 1) * b_strides.1);
    let par = if parallel && m * n * k >= 1 << 15 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound the largest index each stride pattern can reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_strides.1 as isize,
            a_strides.0 as isize,
            b.as_ptr(),
            b_strides.1 as isize,
            b_strides.0 as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// `y = x · Wᵀ + b` for `x: [rows, in]`, `W: [out, in...]` (any stored dtype, on the host; the
/// first dimension is `out`, the rest flatten to `in`), `b: [out]`.
pub fn linear(x: &[f32], weight: &Tensor, bias: Option<&Tensor>) -> Result<Vec<f32>> {
    let n = weight.shape().first().copied().unwrap_or(1).max(1);
    let k = weight.len() / n;
    if k == 0 || !x.len().is_multiple_of(k) {
        return Err(Error::Shape {
            name: "linear input".into(),
            expected: vec![x.len() / k.max(1), k],
            got: vec![x.len()],
        });
    }
    let m = x.len() / k;
    let mut out = match weight.storage() {
        // Decoding: quantized blocks are read as they are, against activations quantized to 8
        // bits (llama.cpp's numerics). A prefill is faster dequantised panel by panel (below).
        Storage::Quant { ty, data } if quant::supports(*ty) && m <= NARROW_ROWS => {
            quant::quant_linear(*ty, data, n, k, x, m)?
        }
        w => {
            let mut out = vec![0.0f32; m * n];
            match w {
                Storage::F32(w) => matmul_nt(m, n, k, x, k, w, k, &mut out, true),
                Storage::BF16(w) if m <= NARROW_ROWS => {
                    narrow_rows(x, w, &mut out, (m, n, k), bf16_to_f32)
                }
                Storage::F16(w) if m <= NARROW_ROWS => {
                    narrow_rows(x, w, &mut out, (m, n, k), |v| v.to_f32())
                }
                Storage::BF16(w) if bf16::enabled() => bf16::linear(x, w, (m, n, k), &mut out)?,
                Storage::BF16(w) => panelled(x, &mut out, (m, n, k), 1, |j, c, seg| {
                    widen(&w[j * k + c.start..j * k + c.end], seg, bf16_to_f32);
                    Ok(())
                })?,
                Storage::F16(w) => panelled(x, &mut out, (m, n, k), 1, |j, c, seg| {
                    widen(&w[j * k + c.start..j * k + c.end], seg, |v| v.to_f32());
                    Ok(())
                })?,
                Storage::Quant { ty, data } => {
                    // Tensor::new checked that rows are whole blocks.
                    let (rb, bs, ts) = (data.len() / n, ty.block_size(), ty.type_size());
                    panelled(x, &mut out, (m, n, k), bs, |j, c, seg| {
                        let row = &data[j * rb..(j + 1) * rb];
                        gguf::dequantize_into(
                            *ty,
                            &row[c.start / bs * ts..c.end.div_ceil(bs) * ts],
                            seg,
                        )
                    })?
                }
                #[allow(unreachable_patterns)]
                _ => matmul_nt(m, n, k, x, k, &weight.f32_cow()?, k, &mut out, true),
            }
            out
        }
    };
    if let Some(b) = bias {
        let b = b.f32_cow()?;
        for row in out.chunks_mut(n) {
            for (o, b) in row.iter_mut().zip(b.iter()) {
                *o += b;
            }
        }
    }
    Ok(out)
}

/// A bf16 value widened to f32: bf16 is the top half of an f32, so a shift, which vectorises
/// (unlike `to_f32`).
fn bf16_to_f32(v: &half::bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// `out[i] = f(w[i])`.
fn widen<T>(w: &[T], out: &mut [f32], f: impl Fn(&T) -> f32) {
    for (o, v) in out.iter_mut().zip(w) {
        *o = f(v);
    }
}

/// Elements of f32 weights one panel of [`panelled`] holds at most: 512 KiB, inside a core's L2
/// next to gemm's packed activations.
const PANEL_ELEMS: usize = 128 * 1024;

/// `out[m, n] = x[m, k] · Wᵀ` for a `W: [n, k]` that is not stored as f32, without writing and
/// re-reading an f32 copy of `W`: `fill(j, cols, seg)` writes `W[j, cols]` as f32 into `seg`, one
/// panel (up to 128 rows by a column range that keeps it within [`PANEL_ELEMS`]; ranges start and
/// end on multiples of `step`, the storage's block size, or at `k`) at a time into a per-thread
/// buffer, and gemm multiplies `x[:, cols]` by each panel while it is in cache, accumulating over
/// column ranges; panels run in parallel on rayon. Each output element is gemm's f32 dot product
/// of `x`'s row and the widened weight row, as on the whole widened matrix (summed in up to
/// `k / cols` partial gemms where a panel splits `k`).
fn panelled(
    x: &[f32],
    out: &mut [f32],
    (m, n, k): (usize, usize, usize),
    step: usize,
    fill: impl Fn(usize, std::ops::Range<usize>, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    assert!(x.len() == m * k && out.len() == m * n && step > 0);
    // Enough panels that every thread gets several (an uneven last round costs little), each a
    // multiple of 16 rows (gemm's register tile) up to 128.
    let per = n.div_ceil(4 * rayon::current_num_threads());
    let rows = per.next_multiple_of(16).clamp(16, 128).min(n);
    let cols = if rows * k <= PANEL_ELEMS {
        k
    } else {
        (PANEL_ELEMS / rows / step).max(1) * step
    };
    let dst = SharedMut(out.as_mut_ptr());
    // Column ranges outermost, so `x[:, cols]` stays in cache while every panel passes.
    for k0 in (0..k).step_by(cols) {
        let (k1, w) = ((k0 + cols).min(k), (k0 + cols).min(k) - k0);
        (0..n.div_ceil(rows)).into_par_iter().try_for_each_init(
            || vec![0.0f32; rows * w],
            |buf, p| {
                let (j0, j1) = (p * rows, ((p + 1) * rows).min(n));
                for (j, seg) in (j0..j1).zip(buf.chunks_exact_mut(w)) {
                    fill(j, k0..k1, seg)?;
                }
                // SAFETY: `x` holds [m, k] (asserted), so rows of `x[:, k0..k1]` at stride k
                // stay inside it; `buf` holds [j1 - j0, w]; the destination is columns j0..j1
                // of `out: [m, n]` (row stride n), which no other panel writes while `out` is
                // borrowed by this function.
                unsafe {
                    gemm::gemm(
                        m,
                        j1 - j0,
                        w,
                        dst.get().add(j0),
                        1,
                        n as isize,
                        k0 > 0,
                        x.as_ptr().add(k0),
                        1,
                        k as isize,
                        buf.as_ptr(),
                        w as isize,
                        1,
                        if k0 > 0 { 1.0 } else { 0.0 },
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                Ok::<(), Error>(())
            },
        )?;
    }
    Ok(())
}

/// A pointer to an output that parallel tasks write in disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: only used by [`panelled`] and [`super::bf16::linear`], whose tasks write disjoint
// columns.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Up to this many input rows, f16/bf16 weights are read row by row and quantized ones block by
/// block, instead of converted whole.
const NARROW_ROWS: usize = 8;

/// `out[m, n] = x[m, k] · Wᵀ` for a few rows of `x` and a f16/bf16 `W: [n, k]` widened by `widen`:
/// each weight row is widened once into a small buffer and dotted with every input row, so
/// decoding never materialises an f32 copy of the matrix.
fn narrow_rows<T: Sync>(
    x: &[f32],
    w: &[T],
    out: &mut [f32],
    (m, n, k): (usize, usize, usize),
    widen: impl Fn(&T) -> f32 + Sync,
) {
    let mut t = vec![0.0f32; n * m];
    t.par_chunks_mut(m).enumerate().for_each_init(
        || vec![0.0f32; k],
        |row, (j, o)| {
            for (r, v) in row.iter_mut().zip(&w[j * k..(j + 1) * k]) {
                *r = widen(v);
            }
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot(&x[i * k..(i + 1) * k], row);
            }
        },
    );
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = t[j * m + i];
        }
    }
}

/// Dot product with eight independent partial sums, so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out[m, n] += a[k, m]ᵀ · b[k, n]`: `a` rows (length ≥ `m`) read with stride `a_rs`, `b` rows
/// with stride `b_rs`. The weight-gradient product of the backward passes (`dW += dyᵀ · x`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn_acc(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    out: &mut [f32],
    parallel: bool,
) {
    // a viewed as [m, k]: element (i, kk) at kk * a_rs + i.
    gemm_strided(m, n, k, a, (1, a_rs), b, (b_rs, 1), out, true, parallel);
}

/// Backward of [`linear`] (`y = x · Wᵀ + b`, `x: [m, k]`, `W: [n, k]` as f32, `dy: [m, n]`):
/// returns `dx = dy · W` (`[m, k]`) and accumulates `dW += dyᵀ · x` (`[n, k]`) and, when given,
/// `db += Σ_rows dy` (`[n]`). Also the backward of the vision patch embedding, which is a linear
/// over unfolded patches (`Conv2d` with stride = kernel, no bias in CLIP): unfold the pixels into
/// `x: [patches, 3·p·p]` in the conv weight's `(c, ky, kx)` order and view its weight as `[d, 3·p·p]`.
pub fn linear_backward(
    x: &[f32],
    weight: &[f32],
    in_features: usize,
    dy: &[f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
) -> Result<Vec<f32>> {
    let k = in_features;
    let shape_err = |name: &str, expected: Vec<usize>, got: usize| Error::Shape {
        name: format!("linear_backward {name}"),
        expected,
        got: vec![got],
    };
    if k == 0 || !weight.len().is_multiple_of(k) {
        return Err(shape_err(
            "weight",
            vec![weight.len() / k.max(1), k],
            weight.len(),
        ));
    }
    let n = weight.len() / k;
    if !x.len().is_multiple_of(k) {
        return Err(shape_err("x", vec![x.len() / k, k], x.len()));
    }
    let m = x.len() / k;
    if dy.len() != m * n {
        return Err(shape_err("dy", vec![m, n], dy.len()));
    }
    if dweight.len() != n * k {
        return Err(shape_err("dweight", vec![n, k], dweight.len()));
    }
    let mut dx = vec![0.0f32; m * k];
    matmul_nn(m, k, n, dy, n, weight, k, &mut dx, true);
    matmul_tn_acc(n, k, m, dy, n, x, k, dweight, true);
    if let Some(db) = dbias {
        if db.len() != n {
            return Err(shape_err("dbias", vec![n], db.len()));
        }
        for row in dy.chunks(n) {
            for (b, g) in db.iter_mut().zip(row) {
                *b += g;
            }
        }
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_and_nn_match_naive() {
        let (m, n, k) = (3, 5, 7);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut out = vec![0.0; m * n];
        matmul_nt(m, n, k, &a, k, &b, k, &mut out, true);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
                assert!((out[i * n + j] - r).abs() < 1e-5);
            }
        }
        // b viewed as [k, n]
        let mut out2 = vec![0.0; m * n];
        matmul_nn(m, n, k, &a, k, &b[..k * n], n, &mut out2, false);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
                assert!((out2[i * n + j] - r).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn narrow_weights_give_the_same_product_either_path() {
        let (n, k) = (9, 13);
        let w: Vec<half::bf16> = (0..n * k)
            .map(|i| half::bf16::from_f32((i as f32 * 0.3).sin()))
            .collect();
        let w = Tensor::new(&[n, k], crate::tensor::Storage::BF16(w.into())).unwrap();
        for m in [1, NARROW_ROWS, NARROW_ROWS + 1] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.7).cos()).collect();
            let got = linear(&x, &w, None).unwrap();
            let mut want = vec![0.0; m * n];
            matmul_nt(m, n, k, &x, k, &w.f32_cow().unwrap(), k, &mut want, false);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }

    /// Prefill-sized products (m > NARROW_ROWS) of f16, bf16 and every GGUF type through the
    /// panels against gemm on the whole widened/dequantised matrix: within 1e-5 of `Σ|x w|`
    /// (f32 summation order only). Shapes: n odd, and a k that makes panels split the columns.
    #[test]
    fn panels_match_the_whole_widened_matrix() {
        use crate::model::gguf::GgmlType as G;
        let mut seed = 7u64;
        let mut byte = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        };
        let half = |v: f32| half::f16::from_f32(v).to_le_bytes();
        let types = [
            G::F16,
            G::BF16,
            G::Q4_0,
            G::Q4_1,
            G::Q5_0,
            G::Q5_1,
            G::Q8_0,
            G::Q4_K,
            G::Q5_K,
            G::Q6_K,
        ];
        for ty in types {
            for (m, n, k) in [(9, 37, 512), (20, 300, 2816)] {
                let w = match ty {
                    G::F16 | G::BF16 => {
                        let v: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
                        let st = if ty == G::F16 {
                            Storage::F16(v.iter().map(|&v| half::f16::from_f32(v)).collect())
                        } else {
                            Storage::BF16(v.iter().map(|&v| half::bf16::from_f32(v)).collect())
                        };
                        Tensor::new(&[n, k], st).unwrap()
                    }
                    _ => {
                        let mut data: Vec<u8> = (0..ty.bytes_for((n * k) as u64).unwrap())
                            .map(|_| byte())
                            .collect();
                        // Finite scales and mins: the f16 fields of each block.
                        let fields: &[usize] = match ty {
                            G::Q4_0 | G::Q5_0 | G::Q8_0 => &[0],
                            G::Q6_K => &[208],
                            _ => &[0, 2],
                        };
                        for (b, blk) in data.chunks_exact_mut(ty.type_size()).enumerate() {
                            for &o in fields {
                                let v = 0.01 + (b % 13) as f32 * 0.003;
                                blk[o..o + 2].copy_from_slice(&half(v));
                            }
                        }
                        Tensor::new(
                            &[n, k],
                            Storage::Quant {
                                ty,
                                data: data.into(),
                            },
                        )
                        .unwrap()
                    }
                };
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.71).cos()).collect();
                let got = linear(&x, &w, None).unwrap();
                let wf = w.f32_cow().unwrap();
                let mut want = vec![0.0; m * n];
                matmul_nt(m, n, k, &x, k, &wf, k, &mut want, false);
                for i in 0..m {
                    for j in 0..n {
                        let mag: f32 = (0..k).map(|t| (x[i * k + t] * wf[j * k + t]).abs()).sum();
                        let (g, r) = (got[i * n + j], want[i * n + j]);
                        assert!(
                            (g - r).abs() <= 1e-5 * mag,
                            "{ty} [{m},{n},{k}] ({i},{j}): {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let (m, n, k) = (7, 5, 11);
        let mut rng = Rng::new(1);
        let (x, w, b, r) = (rng.vec(m * k), rng.vec(n * k), rng.vec(n), rng.vec(m * n));
        let fwd = |x: &[f64], w: &[f64], b: &[f64]| -> Vec<f64> {
            let mut y = vec![0.0; m * n];
            for i in 0..m {
                for j in 0..n {
                    y[i * n + j] = b[j] + (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum::<f64>();
                }
            }
            y
        };
        let (xd, wd, bd) = (f64s(&x), f64s(&w), f64s(&b));
        let wt = Tensor::from_f32(&[n, k], w.clone()).unwrap();
        let bt = Tensor::from_f32(&[n], b.clone()).unwrap();
        check(
            "linear fwd",
            &linear(&x, &wt, Some(&bt)).unwrap(),
            &fwd(&xd, &wd, &bd),
            1e-5,
        );
        // Accumulation: start dW/db from a known non-zero value.
        let (mut dw, mut db) = (vec![0.5f32; n * k], vec![-0.25f32; n]);
        let dx = linear_backward(&x, &w, k, &r, &mut dw, Some(&mut db)).unwrap();
        dw.iter_mut().for_each(|v| *v -= 0.5);
        db.iter_mut().for_each(|v| *v += 0.25);
        let h = 1e-6;
        check(
            "linear dx",
            &dx,
            &fd(|x| dot(&fwd(x, &wd, &bd), &r), &xd, h),
            1e-5,
        );
        check(
            "linear dW",
            &dw,
            &fd(|w| dot(&fwd(&xd, w, &bd), &r), &wd, h),
            1e-5,
        );
        check(
            "linear db",
            &db,
            &fd(|b| dot(&fwd(&xd, &wd, b), &r), &bd, h),
            1e-5,
        );
        assert!(linear_backward(&x, &w, k, &r[1..], &mut dw, None).is_err());
    }

    #[test]
    fn tn_acc_matches_naive_on_the_parallel_path() {
        // 37·41·43 > 2^15 products, so gemm runs on rayon; `a` is read with a padded stride.
        let (m, n, k, a_rs) = (37, 41, 43, 40);
        let a: Vec<f32> = (0..k * a_rs).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let mut out = vec![1.0f32; m * n];
        matmul_tn_acc(m, n, k, &a, a_rs, &b, n, &mut out, true);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = 1.0 + (0..k).map(|t| a[t * a_rs + i] * b[t * n + j]).sum::<f32>();
                assert!((out[i * n + j] - r).abs() < 1e-4, "{i},{j}");
            }
        }
    }
}
