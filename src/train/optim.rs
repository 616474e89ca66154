//! AdamW, its learning-rate schedule, gradient clipping, gradient accumulation and resumable state.
//!
//! Mirrors `torch.optim.AdamW` (single-tensor path, `amsgrad=False`, `maximize=False`),
//! `torch.nn.utils.clip_grad_norm_` and transformers' `get_cosine_schedule_with_warmup`
//! (`optimization.py`). The f32 arithmetic is done in the same order as torch's CPU kernels and
//! the scalars (bias corrections, step size) in f64 as Python computes them, fused multiply-adds
//! where torch's kernel fuses: given the same gradient norm, ten steps agree with torch bit for
//! bit (`tests/reference/adamw_ref.safetensors`). The norm itself is summed in f64 here and in f32
//! in torch's own order there, so it can differ by an ulp (relative error 7e-7 after ten steps).
//!
//! A training step reads:
//! ```text
//! zero_grads(params)
//! for micro in 0..accum { forward/backward, adding into p.grad }
//! scale_grads(params, 1/accum)              // mean over micro-batches
//! let norm = opt.clip_grad_norm(params, max_norm)?;
//! opt.step(params)?;                        // lr = schedule(opt.steps_taken()) per group
//! ```

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::model::nn::Param;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Group name for the usual "no weight decay on norms and biases" rule: `"{prefix}.no_decay"`
/// for names ending in `.bias` or whose last two components contain `norm` (`input_layernorm`,
/// `post_layernorm`, `norm.weight`, `layer_norm1`), `"{prefix}.decay"` otherwise. Callers with a
/// different rule set [`Param::group`] themselves.
pub fn decay_group(prefix: &str, name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    let tail: Vec<&str> = lower.rsplit('.').take(2).collect();
    let no_decay =
        lower.ends_with(".bias") || lower == "bias" || tail.iter().any(|c| c.contains("norm"));
    if no_decay {
        format!("{prefix}.no_decay")
    } else {
        format!("{prefix}.decay")
    }
}

/// Settings of one parameter group (torch's `param_groups[i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// Group name, matched against [`Param::group`].
    pub name: String,
    /// Peak learning rate of this group; `None` uses [`AdamW::lr`]. The applied rate is
    /// `lr_g(t) = peak_g * lr_scale * schedule.factor(t)` (f64).
    pub lr: Option<f64>,
    /// Multiplier on the group's peak learning rate (1.0 for none).
    pub lr_scale: f64,
    /// Decoupled weight decay `wd`: `p <- p * (1 - lr_g * wd)` before the Adam update.
    pub weight_decay: f64,
    /// Frozen: no update, no state created, gradients ignored (also by clipping).
    pub frozen: bool,
}

impl GroupConfig {
    /// A trainable group at the optimizer's base learning rate with weight decay `wd`.
    pub fn new(name: impl Into<String>, weight_decay: f64) -> Self {
        GroupConfig {
            name: name.into(),
            lr: None,
            lr_scale: 1.0,
            weight_decay,
            frozen: false,
        }
    }

    /// A frozen group.
    pub fn frozen(name: impl Into<String>) -> Self {
        GroupConfig {
            frozen: true,
            ..GroupConfig::new(name, 0.0)
        }
    }
}

/// Linear warm-up then cosine decay to a floor; a pure function of the step.
///
/// With `t` the number of optimizer steps already taken (0 for the first update), `W = warmup`,
/// `T = total`, `r = min_ratio`:
/// ```text
/// factor(t) = t / max(1, W)                                  if t < W
///           = max(0, r + (1 - r) * 0.5 * (1 + cos(pi * p)))  otherwise,
///             p = (t - W) / max(1, T - W)
/// ```
/// With `r = 0` this is exactly transformers' `get_cosine_schedule_with_warmup` (`num_cycles =
/// 0.5`) driven through `LambdaLR`, whose `k`-th `optimizer.step()` uses `lambda(k)`; with `r > 0`
/// it is `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate = r)`. Past `T` the cosine
/// rises again, as HF's does; callers stop at `T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Warm-up steps `W`.
    pub warmup: u64,
    /// Total training steps `T`.
    pub total: u64,
    /// Floor as a fraction of the peak learning rate, `r` in `[0, 1]`.
    pub min_ratio: f64,
}

impl Schedule {
    /// Checks `0 <= min_ratio <= 1`.
    pub fn new(warmup: u64, total: u64, min_ratio: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&min_ratio) {
            return Err(Error::arg(
                "min_ratio",
                format!("{min_ratio} is outside [0, 1]"),
            ));
        }
        Ok(Schedule {
            warmup,
            total,
            min_ratio,
        })
    }

    /// A constant factor of 1 (no warm-up, no decay).
    pub fn constant() -> Self {
        Schedule {
            warmup: 0,
            total: 0,
            min_ratio: 1.0,
        }
    }

    /// The multiplier on the peak learning rate for the update after `t` completed steps.
    pub fn factor(&self, t: u64) -> f64 {
        if t < self.warmup {
            return t as f64 / self.warmup.max(1) as f64;
        }
        let progress =
            (t - self.warmup) as f64 / self.total.saturating_sub(self.warmup).max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos());
        (cosine * (1.0 - self.min_ratio) + self.min_ratio).max(0.0)
    }

    /// `peak * factor(t)`.
    pub fn lr(&self, peak: f64, t: u64) -> f64 {
        peak * self.factor(t)
    }
}

/// Adam moments of one parameter (torch's `state[p]`).
#[derive(Debug, Clone, PartialEq)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    /// Updates applied to this parameter (torch keeps the step per parameter; it differs from
    /// the global count for a group unfrozen mid-run).
    step: u64,
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global step index used for the schedule (0 for the first update).
    pub step: u64,
    /// Schedule factor applied to every group's peak rate.
    pub factor: f64,
    /// Parameters updated (not frozen).
    pub updated: usize,
}

/// AdamW with decoupled weight decay, as `torch.optim.AdamW`. Per element, with `t` this
/// parameter's update count after incrementing, `lr` the group's scheduled rate:
/// ```text
/// p <- p * (1 - lr * wd)
/// m <- fma(1 - b1, g - m, m)                     (torch's lerp, fused multiply-add)
/// v <- v * b2 + (1 - b2) * g * g
/// p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// ```
/// Scalars are f64 then rounded to f32, element arithmetic is f32, in torch's order.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Default peak learning rate (groups may override it).
    pub lr: f64,
    /// `beta1`, `beta2` (torch default 0.9, 0.999).
    pub betas: (f64, f64),
    /// Added to `sqrt(v_hat)` (torch default 1e-8).
    pub eps: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    groups: Vec<GroupConfig>,
    state: HashMap<String, Moments>,
    steps: u64,
}

impl AdamW {
    /// An optimizer with torch's defaults for betas and eps, a constant schedule and the given
    /// groups. Fails on duplicate group names or a negative or non-finite rate, scale or decay.
    pub fn new(lr: f64, groups: Vec<GroupConfig>) -> Result<Self> {
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(Error::arg("lr", format!("{lr} must be finite and >= 0")));
        }
        let mut seen = std::collections::HashSet::new();
        for g in &groups {
            let ok = |x: f64| x.is_finite() && x >= 0.0;
            if !(g.lr.is_none_or(ok) && ok(g.lr_scale) && ok(g.weight_decay)) {
                return Err(Error::arg(
                    "groups",
                    format!(
                        "group `{}`: lr {:?}, lr_scale {}, weight_decay {} must be finite and >= 0",
                        g.name, g.lr, g.lr_scale, g.weight_decay
                    ),
                ));
            }
            if !seen.insert(g.name.as_str()) {
                return Err(Error::arg(
                    "groups",
                    format!("group `{}` is listed twice", g.name),
                ));
            }
        }
        Ok(AdamW {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            schedule: Schedule::constant(),
            groups,
            state: HashMap::new(),
            steps: 0,
        })
    }

    /// Sets the schedule (builder style).
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Sets betas and eps (builder style).
    pub fn with_hyper(mut self, betas: (f64, f64), eps: f64) -> Self {
        self.betas = betas;
        self.eps = eps;
        self
    }

    /// The group settings.
    pub fn groups(&self) -> &[GroupConfig] {
        &self.groups
    }

    /// Mutable group settings, e.g. to unfreeze the LM for LLaVA's stage 2.
    pub fn group_mut(&mut self, name: &str) -> Result<&mut GroupConfig> {
        self.groups
            .iter_mut()
            .find(|g| g.name == name)
            .ok_or_else(|| Error::arg("group", format!("no parameter group named `{name}`")))
    }

    /// Freezes or unfreezes a group. State already built for it is kept.
    pub fn set_frozen(&mut self, name: &str, frozen: bool) -> Result<()> {
        self.group_mut(name)?.frozen = frozen;
        Ok(())
    }

    /// Optimizer steps taken so far (the schedule's `t` for the next update).
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Learning rate the next update applies to group `name`: `peak_g * lr_scale * factor(t)`.
    pub fn group_lr(&self, name: &str) -> Result<f64> {
        let g = self
            .groups
            .iter()
            .find(|g| g.name == name)
            .ok_or_else(|| Error::arg("group", format!("no parameter group named `{name}`")))?;
        Ok(self.lr_of(g, self.schedule.factor(self.steps)))
    }

    fn lr_of(&self, g: &GroupConfig, factor: f64) -> f64 {
        g.lr.unwrap_or(self.lr) * g.lr_scale * factor
    }

    fn group_of(&self, p: &Param) -> Result<&GroupConfig> {
        self.groups
            .iter()
            .find(|g| g.name == p.group)
            .ok_or_else(|| {
                Error::arg(
                    "param group",
                    format!("parameter `{}` names unknown group `{}`", p.name, p.group),
                )
            })
    }

    fn check(&self, params: &[Param]) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for p in params {
            let frozen = self.group_of(p)?.frozen;
            if !frozen && p.grad.len() != p.value.len() {
                return Err(Error::Shape {
                    name: format!("{}.grad", p.name),
                    expected: vec![p.value.len()],
                    got: vec![p.grad.len()],
                });
            }
            if !seen.insert(p.name.as_str()) {
                return Err(Error::arg(
                    "params",
                    format!("parameter `{}` appears twice", p.name),
                ));
            }
        }
        Ok(())
    }

    /// Clips gradients of all non-frozen parameters by their global L2 norm, as
    /// `torch.nn.utils.clip_grad_norm_(max_norm, norm_type=2)`:
    /// ```text
    /// norm  = sqrt(sum_p sum_i g_pi^2)          (accumulated in f64, rounded to f32)
    /// coef  = (1 / (norm + 1e-6)) * max_norm    (f32, torch's order for a scalar / tensor)
    /// g    <- g * coef                          only if coef < 1
    /// ```
    /// Returns the norm before clipping (may be inf/NaN, which, as in torch, poisons the grads).
    pub fn clip_grad_norm(&self, params: &mut [Param], max_norm: f32) -> Result<f32> {
        self.check(params)?;
        if max_norm.is_nan() || max_norm <= 0.0 {
            return Err(Error::arg("max_norm", format!("{max_norm} must be > 0")));
        }
        let mut sq = 0.0f64;
        for p in params.iter() {
            if self.group_of(p)?.frozen {
                continue;
            }
            sq += p.grad.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>();
        }
        let norm = sq.sqrt() as f32;
        self.clip_grads_with_norm(params, max_norm, norm)?;
        Ok(norm)
    }

    /// The scaling half of [`AdamW::clip_grad_norm`] with the norm given, as torch's
    /// `clip_grads_with_norm_`: `g <- g * (max_norm / (norm + 1e-6))` over non-frozen params
    /// when that coefficient is below 1 (or NaN).
    pub fn clip_grads_with_norm(
        &self,
        params: &mut [Param],
        max_norm: f32,
        norm: f32,
    ) -> Result<()> {
        if max_norm.is_nan() || max_norm <= 0.0 {
            return Err(Error::arg("max_norm", format!("{max_norm} must be > 0")));
        }
        // torch evaluates `max_norm / tensor` as `reciprocal(tensor) * max_norm` (f32).
        let coef = (1.0 / (norm + 1e-6)) * max_norm;
        if coef < 1.0 || coef.is_nan() {
            for p in params.iter_mut() {
                if self.group_of(p)?.frozen {
                    continue;
                }
                p.grad.iter_mut().for_each(|g| *g *= coef);
            }
        }
        Ok(())
    }

    /// One AdamW update of every non-frozen parameter at the scheduled rate, then advances the
    /// step count. Frozen parameters are skipped (no state is created and their grads are not
    /// read). Gradients are left as they are; zero them with [`zero_grads`].
    pub fn step(&mut self, params: &mut [Param]) -> Result<StepInfo> {
        self.check(params)?;
        let t = self.steps;
        let factor = self.schedule.factor(t);
        let (b1, b2) = self.betas;
        let eps = self.eps as f32;
        let mut updated = 0;
        for p in params.iter_mut() {
            let g = self.group_of(p)?;
            if g.frozen {
                continue;
            }
            let lr = self.lr_of(g, factor);
            let wd = g.weight_decay;
            let st = self.state.entry(p.name.clone()).or_insert_with(|| Moments {
                m: vec![0.0; p.value.len()],
                v: vec![0.0; p.value.len()],
                step: 0,
            });
            if st.m.len() != p.value.len() {
                return Err(Error::Shape {
                    name: format!("optimizer state of `{}`", p.name),
                    expected: vec![p.value.len()],
                    got: vec![st.m.len()],
                });
            }
            st.step += 1;
            let step = st.step as f64;
            // Scalars exactly as torch's Python computes them (f64), rounded once to f32 where
            // the f32 kernel receives them.
            let decay = (1.0 - lr * wd) as f32;
            let w1 = (1.0 - b1) as f32;
            let b2f = b2 as f32;
            let w2 = (1.0 - b2) as f32;
            let bc1 = 1.0 - b1.powf(step);
            let bc2 = 1.0 - b2.powf(step);
            let step_size = lr / bc1;
            let bc2_sqrt = bc2.powf(0.5) as f32;
            let neg_step = (-step_size) as f32;
            let name = &p.name;
            let values = p
                .value
                .f32s_mut()
                .map_err(|_| Error::arg("parameter", format!("`{name}` is not f32 on the host")))?;
            for (((x, &gr), m), v) in values
                .iter_mut()
                .zip(&p.grad)
                .zip(st.m.iter_mut())
                .zip(st.v.iter_mut())
            {
                if wd != 0.0 {
                    *x *= decay;
                }
                // at::lerp, fused as torch's CPU kernel fuses it (std::fma / Vectorized fmadd):
                // weight < 0.5 ? fma(w, b - a, a) : fma(-(b - a), 1 - w, b)
                *m = if w1.abs() < 0.5 {
                    w1.mul_add(gr - *m, *m)
                } else {
                    (-(gr - *m)).mul_add(1.0 - w1, gr)
                };
                *v = *v * b2f + w2 * gr * gr;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *x += neg_step * *m / denom;
            }
            updated += 1;
        }
        self.steps += 1;
        Ok(StepInfo {
            step: t,
            factor,
            updated,
        })
    }

    /// Saves the optimizer state to a safetensors file (written atomically): `m.{param}` and
    /// `v.{param}` as F32 `[len]`, `t.{param}` (that parameter's update count) and `step` (the
    /// global count) as I64 `[1]`. With the parameter values saved alongside, [`AdamW::load`]
    /// resumes bit-identically. Hyper-parameters and groups are code, not state, and are not saved.
    pub fn save(&self, path: &Path) -> Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        let mut bufs: BTreeMap<String, (Dtype, usize, Vec<u8>)> = BTreeMap::new();
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        bufs.insert(
            "step".into(),
            (Dtype::I64, 1, (self.steps as i64).to_le_bytes().to_vec()),
        );
        for (name, st) in &self.state {
            bufs.insert(format!("m.{name}"), (Dtype::F32, st.m.len(), f32s(&st.m)));
            bufs.insert(format!("v.{name}"), (Dtype::F32, st.v.len(), f32s(&st.v)));
            bufs.insert(
                format!("t.{name}"),
                (Dtype::I64, 1, (st.step as i64).to_le_bytes().to_vec()),
            );
        }
        let views = bufs
            .iter()
            .map(|(n, (d, len, b))| {
                TensorView::new(*d, vec![*len], b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::arg("optimizer state", format!("{n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, None).map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            msg: format!("cannot serialize optimizer state: {e}"),
        })?;
        write_atomic(path, &bytes)
    }

    /// Loads state written by [`AdamW::save`], replacing the current state. Every `m.*` must
    /// name one of `params` with matching length and come with its `v.*` and `t.*`; errors name
    /// the file and the tensor.
    pub fn load(&mut self, path: &Path, params: &[Param]) -> Result<()> {
        use safetensors::Dtype;
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "optimizer state",
                path: path.to_path_buf(),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
            path: path.to_path_buf(),
            msg: format!("not a valid safetensors file: {e}"),
        })?;
        let bad = |msg: String| Error::Weights {
            path: path.to_path_buf(),
            msg,
        };
        let get = |name: &str, dtype: Dtype, len: usize| -> Result<Vec<u8>> {
            let t = st.tensor(name).map_err(|_| Error::MissingTensor {
                name: name.to_string(),
                tried: format!("`{name}`"),
                source_desc: path.display().to_string(),
            })?;
            if t.dtype() != dtype {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {:?}, expected {dtype:?}",
                    t.dtype()
                )));
            }
            if t.shape() != [len] {
                return Err(Error::Shape {
                    name: format!("{name} in {}", path.display()),
                    expected: vec![len],
                    got: t.shape().to_vec(),
                });
            }
            Ok(t.data().to_vec())
        };
        let i64_of = |b: Vec<u8>| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            i64::from_le_bytes(a)
        };
        let f32_of = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let steps = i64_of(get("step", Dtype::I64, 1)?);
        if steps < 0 {
            return Err(bad(format!("tensor `step` is negative ({steps})")));
        }
        let lens: HashMap<&str, usize> = params
            .iter()
            .map(|p| (p.name.as_str(), p.value.len()))
            .collect();
        let mut state = HashMap::new();
        for name in st.names() {
            let Some(pname) = name.strip_prefix("m.") else {
                continue;
            };
            let len = *lens.get(pname).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` is state of `{pname}`, which is not among the parameters"
                ))
            })?;
            let m = f32_of(get(name, Dtype::F32, len)?);
            let v = f32_of(get(&format!("v.{pname}"), Dtype::F32, len)?);
            let t = i64_of(get(&format!("t.{pname}"), Dtype::I64, 1)?);
            if t < 0 {
                return Err(bad(format!("tensor `t.{pname}` is negative ({t})")));
            }
            state.insert(
                pname.to_string(),
                Moments {
                    m,
                    v,
                    step: t as u64,
                },
            );
        }
        self.state = state;
        self.steps = steps as u64;
        Ok(())
    }
}

/// Sets every gradient to zero (start of an accumulation window).
pub fn zero_grads(params: &mut [Param]) {
    for p in params {
        p.grad.iter_mut().for_each(|g| *g = 0.0);
    }
}

/// Multiplies every gradient by `factor`; `1 / accum` turns gradients summed over `accum`
/// micro-batches into their mean (end of an accumulation window, before clipping).
pub fn scale_grads(params: &mut [Param], factor: f32) {
    for p in params {
        p.grad.iter_mut().for_each(|g| *g *= factor);
    }
}

/// Counts micro-batches of a gradient-accumulation window of `accum` micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradAccum {
    accum: usize,
    seen: usize,
}

impl GradAccum {
    /// A window of `accum >= 1` micro-batches.
    pub fn new(accum: usize) -> Result<Self> {
        if accum == 0 {
            return Err(Error::arg(
                "accum",
                "gradient accumulation needs at least 1 micro-batch",
            ));
        }
        Ok(GradAccum { accum, seen: 0 })
    }

    /// Micro-batches per optimizer step.
    pub fn accum(&self) -> usize {
        self.accum
    }

    /// Records one micro-batch whose gradients were added into the params. When the window is
    /// full, scales the grads by `1 / accum` and returns true: clip and step, then
    /// [`zero_grads`]. Zero the grads before the first micro-batch of a window.
    pub fn micro_step(&mut self, params: &mut [Param]) -> bool {
        self.seen += 1;
        if self.seen < self.accum {
            return false;
        }
        self.seen = 0;
        if self.accum > 1 {
            scale_grads(params, 1.0 / self.accum as f32);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_rule() {
        assert_eq!(
            decay_group("lm", "model.layers.0.mlp.up_proj.weight"),
            "lm.decay"
        );
        assert_eq!(
            decay_group("lm", "model.layers.0.input_layernorm.weight"),
            "lm.no_decay"
        );
        assert_eq!(decay_group("lm", "model.norm.weight"), "lm.no_decay");
        assert_eq!(
            decay_group("p", "multi_modal_projector.linear_1.bias"),
            "p.no_decay"
        );
    }

    #[test]
    fn accumulation_means() {
        let mut ps = vec![Param::from_f32("a", "g", &[2], vec![0.0; 2]).unwrap()];
        let mut acc = GradAccum::new(4).unwrap();
        zero_grads(&mut ps);
        let mut fired = 0;
        for k in 0..4 {
            ps[0].grad[0] += k as f32;
            ps[0].grad[1] += 2.0;
            if acc.micro_step(&mut ps) {
                fired += 1;
            }
        }
        assert_eq!(fired, 1);
        assert_eq!(ps[0].grad, vec![1.5, 2.0]);
        assert!(GradAccum::new(0).is_err());
    }
}
