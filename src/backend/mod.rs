//! The backend seam: where tensors live and what runs on them.
//!
//! A [`Device`] names a backend; every [`Tensor`] belongs to one (its storage says which), and the
//! model code and the engine are written once against the [`Backend`] interface, in the spirit of
//! candle's backend storage and ggml's backends. Two implement it:
//! - [`Cpu`]: host memory, activations in f32, weights in their stored dtype; the ops of
//!   [`crate::ops`] (`gemm`, rayon), with their numerics.
//! - `cuda::Device` (feature `cuda`): GPU memory in the model's compute dtype, cuBLAS GEMMs and our
//!   NVRTC kernels (`src/cuda/`, `kernels/`).
//!
//! An op has one name and one signature here; both backends implement each one, shapes are
//! checked before any work, and a bad shape, a dtype mismatch or tensors on different devices
//! is an [`Error`], never a panic. Training (the backward passes) runs on the CPU backend.
//!
//! A tensor `[rows, cols]` below is any tensor viewed as rows of its last dimension.

mod cpu;

pub use cpu::Cpu;

use crate::error::{Error, Result};
use crate::ops::attention::AttnShape;
use crate::tensor::{DType, Tensor};

/// Where tensors live and ops run: the CPU, or one CUDA GPU (feature `cuda`).
#[derive(Clone)]
pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<crate::cuda::Device>),
}

impl Device {
    /// Parses `cpu`, `cuda` (GPU 0) or `cuda:N` and opens the device (a GPU once per process).
    /// Without the `cuda` feature, or without a usable GPU, `cuda` is an error saying why.
    pub fn parse(s: &str) -> Result<Device> {
        let bad = |why: String| Error::arg("--device", format!("`{s}`: {why}"));
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            spec if spec == "cuda" || spec.starts_with("cuda:") => {
                let ordinal = match spec.strip_prefix("cuda:") {
                    None => 0,
                    Some(n) => n
                        .parse::<usize>()
                        .map_err(|_| bad("the GPU index after `cuda:` is not a number".into()))?,
                };
                Self::cuda(ordinal)
            }
            _ => Err(bad("expected `cpu`, `cuda` or `cuda:N`".into())),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(crate::cuda::Device::shared(ordinal)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(_ordinal: usize) -> Result<Device> {
        Err(Error::Unsupported {
            what: "device (this build has no CUDA backend; rebuild with `--features cuda`)",
            value: "cuda".into(),
        })
    }

    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// The backend that computes on this device.
    pub fn backend(&self) -> &dyn Backend {
        match self {
            Device::Cpu => &Cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => &**d,
        }
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            #[cfg(feature = "cuda")]
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal == b.ordinal,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => write!(f, "cuda:{} ({})", d.ordinal, d.name),
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The ops the model and the engine run, one implementation per device. Inputs must live on the
/// backend's device; activations and weights share the backend's compute dtype on a GPU (f32
/// activations with any weight dtype on the CPU).
pub trait Backend: Send + Sync {
    /// A host tensor copied onto this device in its dtype.
    fn upload(&self, t: &Tensor) -> Result<Tensor>;

    /// HF `nn.Linear`: `y = x·Wᵀ + b` for `x: [rows, in]`, `W: [out, in...]` (the first
    /// dimension is `out`, the rest flatten to `in`), `b: [out]`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor>;

    /// LLaMA RMSNorm per row: `y = w ⊙ x / sqrt(mean(x²) + eps)`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor>;

    /// LayerNorm per row: `y = (x − mean) / sqrt(var + eps) ⊙ w + b` (biased variance).
    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor>;

    /// LLaMA's MLP core in place: `gate ← silu(gate) ⊙ up`, `silu(x) = x·σ(x)`.
    fn silu_mul(&self, gate: &mut Tensor, up: &Tensor) -> Result<()>;

    /// Exact GELU in place: `x/2 · (1 + erf(x/√2))`.
    fn gelu(&self, x: &mut Tensor) -> Result<()>;

    /// CLIP's quick GELU in place: `x · σ(1.702 x)`.
    fn quick_gelu(&self, x: &mut Tensor) -> Result<()>;

    /// `x += y` elementwise (residual connections).
    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<()>;

    /// Rotate-half RoPE in place on `x: [rows, heads · d]`, row `r` at `positions[r]`, with the
    /// inverse frequencies `inv_freq` (`d/2` of them, [`crate::ops::rope::inv_freq`]).
    fn rope(
        &self,
        x: &mut Tensor,
        heads: usize,
        positions: &[usize],
        inv_freq: &[f32],
    ) -> Result<()>;

    /// `softmax(q·kᵀ/√d + mask)·v` per head for `q: [t, heads·d]`, `k, v: [s, kv_heads·d]`, query
    /// head `h` reading key/value head `h / (heads / kv_heads)`; under the causal mask query row
    /// `i` sees keys `0..=s−t+i`. With `lse`, also each row's log-sum-exp of its scaled scores,
    /// `[heads, t]`, where the backend's kernel produces it (the GPU's flash attention; the CPU
    /// returns `None` and ranks from the keys directly, see [`Backend::selected_probs`]).
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sh: AttnShape,
        lse: bool,
    ) -> Result<(Tensor, Option<Vec<f32>>)>;

    /// The causal attention probabilities `[heads, rows, cols]` of a few query rows to the image
    /// keys, what pruning ranks by: `q: [rows.len(), heads·d]` the queries (RoPE applied) of the rows at positions
    /// `rows`, `k: [s, kv_heads·d]` the layer's keys, `cols` the image positions; row `i` sees
    /// keys `0..=rows[i]`. `lse` is those rows' log-sum-exp `[heads, rows.len()]` from
    /// [`Backend::attention`] where it returned one: the GPU rebuilds the probabilities as
    /// `exp(q·k/√d − lse)` for the image keys only (computing `lse` over the rows' keys itself
    /// when `None`, as when PyramidDrop ranks by keys no attention has run on); the CPU
    /// normalises over the full rows.
    #[allow(clippy::too_many_arguments)]
    fn selected_probs(
        &self,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
        cols: &[usize],
        heads: usize,
        kv_heads: usize,
        lse: Option<&[f32]>,
    ) -> Result<Vec<f32>>;

    /// Rows `ids` of the embedding table `[vocab, d]`; an id outside the vocabulary is an error.
    fn embed(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor>;

    /// Rows `rows` of `x: [n, cols]` in that order (repeats allowed): pruned rows and KV entries
    /// are dropped by gathering the kept ones.
    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor>;

    /// The rows of `parts` (each `[n_i, cols]`, one width) one after another.
    fn cat_rows(&self, parts: &[&Tensor]) -> Result<Tensor>;

    /// Row `r` of the result is row `r` of every part side by side (`[n, Σ cols_i]`).
    fn cat_cols(&self, parts: &[&Tensor]) -> Result<Tensor>;

    /// Appends the rows of `src` to `dst` (a KV cache layer), growing it in place.
    fn append_rows(&self, dst: &mut Tensor, src: &Tensor) -> Result<()>;

    /// The flat index and value of the first NaN or infinity of `x`, if any.
    fn first_nonfinite(&self, x: &Tensor) -> Result<Option<(usize, f32)>>;
}

fn first<'a>(parts: &[&'a Tensor], op: &str) -> Result<&'a Tensor> {
    parts
        .first()
        .copied()
        .ok_or_else(|| Error::arg(op, "no tensors to concatenate".to_string()))
}

/// `(out, in)` of a Linear weight `[out, in...]`: the first dimension is `out`, the rest flatten
/// to `in` (a patch convolution's `[d, c, p, p]` kernel is `[d, c·p·p]`).
pub(crate) fn linear_dims(w: &Tensor) -> (usize, usize) {
    let out = w.shape().first().copied().unwrap_or(1).max(1);
    (out, w.len() / out)
}

/// Fails unless `got == want`, naming `what`.
pub(crate) fn check_shape(what: &str, want: &[usize], got: &[usize]) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::Shape {
            name: what.into(),
            expected: want.to_vec(),
            got: got.to_vec(),
        })
    }
}

/// Fails unless every tensor is on `device`, naming the op.
pub(crate) fn check_device(op: &str, device: &Device, tensors: &[&Tensor]) -> Result<()> {
    match tensors.iter().find(|t| t.device() != *device) {
        None => Ok(()),
        Some(t) => Err(Error::arg(
            "device",
            format!(
                "{op}: a tensor on {} given to the {device} backend",
                t.device()
            ),
        )),
    }
}

/// The op interface as methods of the tensor they run on (its device's backend), so a model file
/// reads `x.rms_norm(&w, eps)?`. Each is the [`Backend`] op of the same name.
impl Tensor {
    /// [`Backend::linear`].
    pub fn linear(&self, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.backend().linear(self, w, b)
    }

    /// [`Backend::rms_norm`].
    pub fn rms_norm(&self, w: &Tensor, eps: f64) -> Result<Tensor> {
        self.backend().rms_norm(self, w, eps)
    }

    /// [`Backend::layer_norm`].
    pub fn layer_norm(&self, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        self.backend().layer_norm(self, w, b, eps)
    }

    /// [`Backend::silu_mul`].
    pub fn silu_mul(&mut self, up: &Tensor) -> Result<()> {
        self.device().backend().silu_mul(self, up)
    }

    /// [`Backend::gelu`].
    pub fn gelu(&mut self) -> Result<()> {
        self.device().backend().gelu(self)
    }

    /// [`Backend::quick_gelu`].
    pub fn quick_gelu(&mut self) -> Result<()> {
        self.device().backend().quick_gelu(self)
    }

    /// [`Backend::add`].
    pub fn add(&mut self, y: &Tensor) -> Result<()> {
        self.device().backend().add(self, y)
    }

    /// [`Backend::rope`].
    pub fn rope(&mut self, heads: usize, positions: &[usize], inv_freq: &[f32]) -> Result<()> {
        self.device()
            .backend()
            .rope(self, heads, positions, inv_freq)
    }

    /// [`Backend::attention`].
    pub fn attention(
        &self,
        k: &Tensor,
        v: &Tensor,
        sh: AttnShape,
        lse: bool,
    ) -> Result<(Tensor, Option<Vec<f32>>)> {
        self.backend().attention(self, k, v, sh, lse)
    }

    /// [`Backend::cat_rows`] on the first part's backend (an error for no parts).
    pub fn cat_rows(parts: &[&Tensor]) -> Result<Tensor> {
        first(parts, "cat_rows")?.backend().cat_rows(parts)
    }

    /// [`Backend::cat_cols`] on the first part's backend (an error for no parts).
    pub fn cat_cols(parts: &[&Tensor]) -> Result<Tensor> {
        first(parts, "cat_cols")?.backend().cat_cols(parts)
    }

    /// This host tensor as an activation of the device `like` lives on: f32 on the CPU, `like`'s
    /// dtype on a GPU (whose kernels take one dtype throughout). For inputs such as pixels and
    /// for weights that are added to activations (position embeddings).
    pub fn activation_like(self, like: &Tensor) -> Result<Tensor> {
        match like.device() {
            Device::Cpu if self.is_host() && self.dtype() == DType::F32 => Ok(self),
            Device::Cpu => self.to_f32(),
            #[cfg(feature = "cuda")]
            dev if self.device() == dev && self.dtype() == like.dtype() => Ok(self),
            #[cfg(feature = "cuda")]
            dev => self.to_dtype(like.dtype())?.to_device(&dev),
        }
    }

    /// [`Backend::gather_rows`].
    pub fn gather_rows(&self, rows: &[usize]) -> Result<Tensor> {
        self.backend().gather_rows(self, rows)
    }

    /// Rows `start..start + len` ([`Backend::gather_rows`] of a range).
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let rows: Vec<usize> = (start..start + len).collect();
        self.gather_rows(&rows)
    }

    /// Rows `start..start + len`, borrowing the tensor itself when that is all of it (one
    /// sequence or image of a batch of one).
    pub fn rows_cow(&self, start: usize, len: usize) -> Result<std::borrow::Cow<'_, Tensor>> {
        Ok(if start == 0 && len == self.rows() {
            std::borrow::Cow::Borrowed(self)
        } else {
            std::borrow::Cow::Owned(self.narrow_rows(start, len)?)
        })
    }

    /// [`Backend::append_rows`].
    pub fn append_rows(&mut self, src: &Tensor) -> Result<()> {
        self.device().backend().append_rows(self, src)
    }

    /// [`crate::ops::check_finite`] on the tensor's device: fails with [`Error::NonFinite`] at
    /// the first NaN or infinity, `at(row)` naming where that row is.
    pub fn check_finite(&self, at: impl FnOnce(usize) -> String) -> Result<()> {
        match self.backend().first_nonfinite(self)? {
            None => Ok(()),
            Some((i, value)) => Err(crate::ops::nonfinite(i, value, self.cols(), at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cpu_and_refuse_unknown_devices() {
        assert!(Device::parse("cpu").unwrap().is_cpu());
        assert!(Device::parse(" cpu ").unwrap().is_cpu());
        let e = Device::parse("gpu").unwrap_err().to_string();
        assert!(
            e.contains("--device") && e.contains("`gpu`") && e.contains("`cuda:N`"),
            "{e}"
        );
        let e = Device::parse("cuda:abc").unwrap_err().to_string();
        assert!(e.contains("cuda:abc") && e.contains("not a number"), "{e}");
        assert!(Device::parse("cuda:-1").is_err());
    }

    /// `cuda` without a GPU (or without the feature) is an error saying why, never a panic.
    #[test]
    fn parse_cuda_without_a_gpu_says_why() {
        #[cfg(feature = "cuda")]
        if crate::cuda::driver_present() {
            eprintln!("skipped: libcuda is present");
            return;
        }
        for spec in ["cuda", "cuda:0", "cuda:3"] {
            let e = Device::parse(spec).unwrap_err().to_string();
            let why = if cfg!(feature = "cuda") {
                "libcuda"
            } else {
                "--features cuda"
            };
            assert!(e.contains(why), "{spec}: {e}");
        }
    }
}
