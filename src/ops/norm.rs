//! Normalisations, computed in f32 per row.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// Fails unless `x` is whole rows of the norm's width `d` and every parameter has `d` values.
fn check(what: &str, x: &[f32], params: &[&Tensor]) -> Result<usize> {
    let d = params[0].len();
    if d == 0 || !x.len().is_multiple_of(d) || params.iter().any(|p| p.len() != d) {
        return Err(Error::Shape {
            name: format!("{what} input"),
            expected: vec![x.len() / d.max(1), d],
            got: vec![x.len(), params.iter().map(|p| p.len()).max().unwrap_or(0)],
        });
    }
    Ok(d)
}

/// LLaMA RMSNorm (HF `LlamaRMSNorm`): `y = w ⊙ x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], weight: &Tensor, eps: f64) -> Result<Vec<f32>> {
    let d = check("rms_norm", x, &[weight])?;
    let w = weight.f32_cow()?;
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps as f32).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w.iter()) {
                *o = w * (x * r);
            }
        });
    Ok(out)
}

/// LayerNorm (HF `nn.LayerNorm`): `y = (x - mean) / sqrt(var + eps) ⊙ w + b`, biased variance.
pub fn layer_norm(x: &[f32], weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Vec<f32>> {
    let d = check("layer_norm", x, &[weight, bias])?;
    let (w, b) = (weight.f32_cow()?, bias.f32_cow()?);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, x)| {
            let mean = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + eps as f32).sqrt();
            for i in 0..d {
                o[i] = (x[i] - mean) * r * w[i] + b[i];
            }
        });
    Ok(out)
}

/// Backward of [`rms_norm`] for `x, dy: [rows, d]`, `w: [d]` (f32): with `r = 1/sqrt(mean(x²)+eps)`,
/// `x̂ = x·r` and `g = dy ⊙ w`, returns `dx = r·(g − x̂·mean(g ⊙ x̂))` and accumulates
/// `dw += Σ_rows dy ⊙ x̂`.
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    eps: f64,
    dy: &[f32],
    dw: &mut [f32],
) -> Result<Vec<f32>> {
    let d = w.len();
    check_backward("rms_norm_backward", x, d, &[dy.len()], &[dw.len()])?;
    let mut dx = vec![0.0f32; x.len()];
    for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps as f32).sqrt();
        let mut gx = 0.0f32;
        for i in 0..d {
            gx += dy[i] * w[i] * x[i] * r;
            dw[i] += dy[i] * x[i] * r;
        }
        let gx = gx / d as f32;
        for i in 0..d {
            dx[i] = r * (dy[i] * w[i] - x[i] * r * gx);
        }
    }
    Ok(dx)
}

/// Fails unless `x` is whole rows of width `d`, each of `same` has `x`'s length and each of
/// `params` has `d` values.
fn check_backward(op: &str, x: &[f32], d: usize, same: &[usize], params: &[usize]) -> Result<()> {
    let ok = d > 0
        && x.len().is_multiple_of(d)
        && same.iter().all(|&n| n == x.len())
        && params.iter().all(|&n| n == d);
    match ok {
        true => Ok(()),
        false => Err(Error::Shape {
            name: format!("{op} operands (x, then dy, then parameter gradients)"),
            expected: [
                vec![x.len()],
                vec![x.len(); same.len()],
                vec![d; params.len()],
            ]
            .concat(),
            got: [vec![x.len()], same.to_vec(), params.to_vec()].concat(),
        }),
    }
}

/// Backward of [`layer_norm`] for `x, dy: [rows, d]`, `w: [d]` (f32): with `x̂ = (x − mean)·r`,
/// `r = 1/sqrt(var+eps)` and `g = dy ⊙ w`, returns `dx = r·(g − mean(g) − x̂·mean(g ⊙ x̂))` and
/// accumulates `dw += Σ_rows dy ⊙ x̂`, `db += Σ_rows dy`.
pub fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    eps: f64,
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> Result<Vec<f32>> {
    let d = w.len();
    check_backward(
        "layer_norm_backward",
        x,
        d,
        &[dy.len()],
        &[dw.len(), db.len()],
    )?;
    let mut dx = vec![0.0f32; x.len()];
    let mut xh = vec![0.0f32; d];
    for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
        let mean = x.iter().sum::<f32>() / d as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let r = 1.0 / (var + eps as f32).sqrt();
        let (mut g1, mut gx) = (0.0f32, 0.0f32);
        for i in 0..d {
            xh[i] = (x[i] - mean) * r;
            let g = dy[i] * w[i];
            g1 += g;
            gx += g * xh[i];
            dw[i] += dy[i] * xh[i];
            db[i] += dy[i];
        }
        let (g1, gx) = (g1 / d as f32, gx / d as f32);
        for i in 0..d {
            dx[i] = r * (dy[i] * w[i] - g1 - xh[i] * gx);
        }
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_cases() {
        let w = Tensor::from_f32(&[2], vec![1.0, 2.0]).unwrap();
        let y = rms_norm(&[3.0, 4.0], &w, 0.0).unwrap();
        let r = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6);
        let b = Tensor::from_f32(&[2], vec![0.5, -0.5]).unwrap();
        let y = layer_norm(&[1.0, 3.0], &w, &b, 0.0).unwrap();
        assert!(rms_norm(&[1.0, 2.0, 3.0], &w, 0.0).is_err());
        assert!((y[0] - (-1.0 + 0.5)).abs() < 1e-6 && (y[1] - (2.0 - 0.5)).abs() < 1e-6);
    }

    /// f64 transcriptions of both norms; `b = None` is RMSNorm.
    fn norm64(x: &[f64], w: &[f64], b: Option<&[f64]>, eps: f64) -> Vec<f64> {
        let d = w.len();
        let mut y = vec![0.0; x.len()];
        for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
            let mean = if b.is_some() {
                x.iter().sum::<f64>() / d as f64
            } else {
                0.0
            };
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let r = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                y[i] = (x[i] - mean) * r * w[i] + b.map_or(0.0, |b| b[i]);
            }
        }
        y
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::ops::gradcheck::*;
        let (rows, d, eps) = (5, 13, 1e-5);
        let mut rng = Rng::new(2);
        let (x, w, b, r) = (rng.vec(rows * d), rng.vec(d), rng.vec(d), rng.vec(rows * d));
        let (xd, wd, bd) = (f64s(&x), f64s(&w), f64s(&b));
        let (wt, bt) = (
            Tensor::from_f32(&[d], w.clone()).unwrap(),
            Tensor::from_f32(&[d], b.clone()).unwrap(),
        );
        let h = 1e-6;
        check(
            "rms_norm fwd",
            &rms_norm(&x, &wt, eps).unwrap(),
            &norm64(&xd, &wd, None, eps),
            1e-5,
        );
        let mut dw = vec![0.0f32; d];
        let dx = rms_norm_backward(&x, &w, eps, &r, &mut dw).unwrap();
        assert!(rms_norm_backward(&x, &w, eps, &r[1..], &mut dw).is_err());
        let f = |x: &[f64], w: &[f64]| dot(&norm64(x, w, None, eps), &r);
        check("rms_norm dx", &dx, &fd(|x| f(x, &wd), &xd, h), 1e-5);
        check("rms_norm dw", &dw, &fd(|w| f(&xd, w), &wd, h), 1e-5);

        let got = layer_norm(&x, &wt, &bt, eps).unwrap();
        check(
            "layer_norm fwd",
            &got,
            &norm64(&xd, &wd, Some(&bd), eps),
            1e-5,
        );
        let (mut dw, mut db) = (vec![0.0f32; d], vec![0.0f32; d]);
        let dx = layer_norm_backward(&x, &w, eps, &r, &mut dw, &mut db).unwrap();
        let f = |x: &[f64], w: &[f64], b: &[f64]| dot(&norm64(x, w, Some(b), eps), &r);
        check("layer_norm dx", &dx, &fd(|x| f(x, &wd, &bd), &xd, h), 1e-5);
        check("layer_norm dw", &dw, &fd(|w| f(&xd, w, &bd), &wd, h), 1e-5);
        check("layer_norm db", &db, &fd(|b| f(&xd, &wd, b), &bd, h), 1e-5);
    }
}
