//! Normalisations, computed in f32 per row.

use crate::tensor::Tensor;
use rayon::prelude::*;

/// LLaMA RMSNorm (HF `LlamaRMSNorm`): `y = w ⊙ x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], weight: &Tensor, eps: f64) -> Vec<f32> {
    let w = weight.f32_cow();
    let d = w.len();
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
    out
}

/// LayerNorm (HF `nn.LayerNorm`): `y = (x - mean) / sqrt(var + eps) ⊙ w + b`, biased variance.
pub fn layer_norm(x: &[f32], weight: &Tensor, bias: &Tensor, eps: f64) -> Vec<f32> {
    let (w, b) = (weight.f32_cow(), bias.f32_cow());
    let d = w.len();
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_cases() {
        let w = Tensor::from_f32(&[2], vec![1.0, 2.0]).unwrap();
        let y = rms_norm(&[3.0, 4.0], &w, 0.0);
        let r = (12.5f32).sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 8.0 / r).abs() < 1e-6);
        let b = Tensor::from_f32(&[2], vec![0.5, -0.5]).unwrap();
        let y = layer_norm(&[1.0, 3.0], &w, &b, 0.0);
        assert!((y[0] - (-1.0 + 0.5)).abs() < 1e-6 && (y[1] - (2.0 - 0.5)).abs() < 1e-6);
    }
}
