//! The building blocks every model file shares: [`Linear`] and [`LayerNorm`] (RMSNorm is a single
//! weight, see [`Tensor::rms_norm`]). Each runs on its tensors' backend.

use super::weights::Weights;
use crate::error::Result;
use crate::tensor::Tensor;

/// A linear layer as HF's `nn.Linear`: `y = x · Wᵀ + b` with `W: [out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.cols()
    }

    /// `x: [rows, in]` -> `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// LayerNorm with weight and bias (HF `nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LayerNorm {
    /// Loads `name.weight` and `name.bias`, both `[d]`.
    pub fn load(w: &mut Weights, name: &str, d: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.take(&format!("{name}.weight"), &[d])?,
            bias: w.take(&format!("{name}.bias"), &[d])?,
        })
    }

    /// `x: [rows, d]` normalised per row.
    pub fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        x.layer_norm(&self.weight, &self.bias, eps)
    }
}
