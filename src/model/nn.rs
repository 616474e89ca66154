//! What every model file shares, llm.c style: a model's weights are one flat list of [`Param`]s
//! (named tensors; with gradients when training), and blocks hold indices into it. The engine
//! fills the list from a checkpoint on its device; the trainer with f32 values on the host.
//! Each block's forward (any backend) and backward (CPU, f32) sit side by side: [`Linear`],
//! [`LayerNorm`], [`RmsNorm`].

use crate::error::{Error, Result};
use crate::ops::{self, matmul, norm};
use crate::tensor::Tensor;

/// One named weight: its value (on the model's device, in its dtype; f32 on the host when
/// training) and the gradient of the loss, same length, or empty while frozen or never trained
/// (never read then, so a frozen LM costs no gradient memory).
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Unique name: the canonical name at load (`lm.layers.0.mlp.up_proj.weight`); the trainer
    /// renames to the checkpoint key (`model.language_model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Name of the optimizer's parameter group whose settings apply (empty for inference).
    pub group: String,
    pub value: Tensor,
    pub grad: Vec<f32>,
}

impl Param {
    /// A parameter with zero gradient.
    pub fn new(name: impl Into<String>, group: impl Into<String>, value: Tensor) -> Self {
        let grad = vec![0.0; value.len()];
        Param {
            name: name.into(),
            group: group.into(),
            value,
            grad,
        }
    }

    /// A host f32 parameter from values of `shape`, with zero gradient.
    pub fn from_f32(
        name: impl Into<String>,
        group: impl Into<String>,
        shape: &[usize],
        value: Vec<f32>,
    ) -> Result<Self> {
        Ok(Param::new(name, group, Tensor::from_f32(shape, value)?))
    }

    /// Whether no gradient is kept (frozen, or loaded for inference).
    pub fn frozen(&self) -> bool {
        self.grad.is_empty()
    }

    /// The value as host f32 (what the trainer computes on); an error naming the parameter
    /// otherwise.
    pub fn f32s(&self) -> Result<&[f32]> {
        self.value.f32s().map_err(|_| self.not_f32())
    }

    /// The value as mutable host f32 (the optimizer's update).
    pub fn f32s_mut(&mut self) -> Result<&mut [f32]> {
        let err = self.not_f32();
        self.value.f32s_mut().map_err(|_| err)
    }

    fn not_f32(&self) -> Error {
        Error::arg(
            "parameter",
            format!(
                "`{}` is {} on {}; training needs f32 on the host",
                self.name,
                self.value.dtype(),
                self.value.device()
            ),
        )
    }
}

/// Where [`ParamBuilder`] gets values: a checkpoint ([`super::weights::Weights`]) or an
/// initialiser. `Ok(None)` when an optional tensor is absent.
pub trait ParamSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>>;

    /// The error for a required tensor the source lacks.
    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor {
            name: name.to_string(),
            tried: format!("`{name}`"),
            source_desc: "the parameter source".into(),
        }
    }
}

/// Any `FnMut(name, shape) -> values` is a source of host f32 tensors (initialisers).
impl<F: FnMut(&str, &[usize]) -> Result<Vec<f32>>> ParamSource for F {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        Ok(Some(Tensor::from_f32(shape, self(name, shape)?)?))
    }
}

/// Builds a model's parameter list, block by block, in the order blocks ask.
pub struct ParamBuilder<'a> {
    params: Vec<Param>,
    source: &'a mut dyn ParamSource,
    /// Allocate gradients (training) or not (inference).
    grads: bool,
}

impl<'a> ParamBuilder<'a> {
    /// A builder over `source`; `grads` for a model to train.
    pub fn new(source: &'a mut dyn ParamSource, grads: bool) -> Self {
        ParamBuilder {
            params: Vec::new(),
            source,
            grads,
        }
    }

    /// Adds tensor `name` of `shape`; returns its index.
    pub fn add(&mut self, name: &str, shape: &[usize]) -> Result<usize> {
        match self.add_opt(name, shape)? {
            Some(i) => Ok(i),
            None => Err(self.source.missing(name)),
        }
    }

    /// Adds tensor `name` when the source has it.
    pub fn add_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<usize>> {
        let Some(value) = self.source.get(name, shape)? else {
            return Ok(None);
        };
        value.expect_shape(name, shape)?;
        let grad = if self.grads {
            vec![0.0; value.len()]
        } else {
            Vec::new()
        };
        self.params.push(Param {
            name: name.into(),
            group: String::new(),
            value,
            grad,
        });
        Ok(Some(self.params.len() - 1))
    }

    /// A linear layer `name.weight: [out, inp]` with `name.bias: [out]` when `bias`.
    pub fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            w: self.add(&format!("{name}.weight"), &[out, inp])?,
            b: match bias {
                true => Some(self.add(&format!("{name}.bias"), &[out])?),
                false => None,
            },
        })
    }

    /// A LayerNorm `name.{weight,bias}: [d]`.
    pub fn layer_norm(&mut self, name: &str, d: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            w: self.add(&format!("{name}.weight"), &[d])?,
            b: self.add(&format!("{name}.bias"), &[d])?,
        })
    }

    /// An RMSNorm `name.weight: [d]`.
    pub fn rms_norm(&mut self, name: &str, d: usize) -> Result<RmsNorm> {
        Ok(RmsNorm {
            w: self.add(&format!("{name}.weight"), &[d])?,
        })
    }

    /// The parameters built.
    pub fn finish(self) -> Vec<Param> {
        self.params
    }
}

/// The host f32 data of a training activation.
pub(crate) fn host(t: &Tensor) -> Result<&[f32]> {
    t.f32s()
}

/// HF's `nn.Linear`: `y = x · Wᵀ + b` with `W: [out, in...]` (the first dimension is `out`, the
/// rest flatten to `in`, so a stride-p patch convolution's `[d, c, p, p]` kernel is a Linear over
/// unfolded patches), `b: [out]`.
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub w: usize,
    pub b: Option<usize>,
}

impl Linear {
    /// `x: [rows, in]` -> `[rows, out]` on `x`'s backend.
    pub fn forward(&self, p: &[Param], x: &Tensor) -> Result<Tensor> {
        x.linear(&p[self.w].value, self.b.map(|b| &p[b].value))
    }

    /// Backward for the forward's input `x` and output gradient `dy` (host f32): returns `dx`,
    /// accumulates `dW += dyᵀ·x` and `db += Σ_rows dy` into the gradients that are not frozen.
    pub fn backward(&self, p: &mut [Param], x: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let w = &p[self.w];
        let inp = w.value.len() / w.value.shape().first().copied().unwrap_or(1).max(1);
        let skip = w.frozen();
        let mut dw = if skip {
            vec![0.0f32; w.value.len()]
        } else {
            std::mem::take(&mut p[self.w].grad)
        };
        let bias = self.b.filter(|&b| !p[b].frozen());
        let mut db = bias.map(|b| std::mem::take(&mut p[b].grad));
        let dx = matmul::linear_backward(x, p[self.w].f32s()?, inp, dy, &mut dw, db.as_deref_mut());
        if let (Some(b), Some(db)) = (bias, db) {
            p[b].grad = db;
        }
        if !skip {
            p[self.w].grad = dw;
        }
        dx
    }
}

/// LayerNorm with weight and bias (HF `nn.LayerNorm`).
#[derive(Debug, Clone, Copy)]
pub struct LayerNorm {
    pub w: usize,
    pub b: usize,
}

impl LayerNorm {
    /// `x: [rows, d]` normalised per row: `(x − mean) / sqrt(var + eps) ⊙ w + b`.
    pub fn forward(&self, p: &[Param], x: &Tensor, eps: f64) -> Result<Tensor> {
        x.layer_norm(&p[self.w].value, &p[self.b].value, eps)
    }

    /// Backward ([`norm::layer_norm_backward`]): returns `dx`, accumulates the gradients that
    /// are not frozen.
    pub fn backward(&self, p: &mut [Param], x: &[f32], eps: f64, dy: &[f32]) -> Result<Vec<f32>> {
        let d = p[self.w].value.len();
        let mut dw = std::mem::take(&mut p[self.w].grad);
        let mut db = std::mem::take(&mut p[self.b].grad);
        let (mut tw, mut tb) = (vec![0.0; d], vec![0.0; d]);
        let dx = norm::layer_norm_backward(
            x,
            p[self.w].f32s()?,
            eps,
            dy,
            if dw.is_empty() { &mut tw } else { &mut dw },
            if db.is_empty() { &mut tb } else { &mut db },
        );
        p[self.w].grad = dw;
        p[self.b].grad = db;
        dx
    }

    /// Indices of its parameters.
    pub fn params(&self) -> [usize; 2] {
        [self.w, self.b]
    }
}

/// LLaMA's RMSNorm (HF `LlamaRMSNorm`).
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm {
    pub w: usize,
}

impl RmsNorm {
    /// `x: [rows, d]` normalised per row: `w ⊙ x / sqrt(mean(x²) + eps)`.
    pub fn forward(&self, p: &[Param], x: &Tensor, eps: f64) -> Result<Tensor> {
        x.rms_norm(&p[self.w].value, eps)
    }

    /// Backward ([`norm::rms_norm_backward`]): returns `dx`, accumulates `dw` unless frozen.
    pub fn backward(&self, p: &mut [Param], x: &[f32], eps: f64, dy: &[f32]) -> Result<Vec<f32>> {
        let mut dw = std::mem::take(&mut p[self.w].grad);
        let mut tmp = vec![0.0; p[self.w].value.len()];
        let dx = norm::rms_norm_backward(
            x,
            p[self.w].f32s()?,
            eps,
            dy,
            if dw.is_empty() { &mut tmp } else { &mut dw },
        );
        p[self.w].grad = dw;
        dx
    }
}

/// `g += d` into a parameter's gradient unless frozen (embeddings added to activations).
pub(crate) fn accumulate(p: &mut Param, d: &[f32]) {
    if !p.frozen() {
        ops::add(&mut p.grad, d);
    }
}
