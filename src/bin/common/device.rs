//! The `--device`, `--dtype`, `--quantize` and `--bf16-compute` flags of every command that runs a model.

use clap::Args;
use fineprune::model::LoadOptions;
use fineprune::model::quantize::{self, Quantize};
use fineprune::tensor::GgmlType;
use fineprune::{DType, Device, Model};
use std::path::Path;

/// Where a model runs.
#[derive(Args, Clone, Debug)]
pub struct DeviceFlags {
    /// Where to run: `cpu`, `cuda` (GPU 0) or `cuda:N`. A GPU needs a build with
    /// `--features cuda` and an NVIDIA driver; the kernels are compiled by NVRTC on first use.
    #[arg(long, default_value = "cpu", value_parser = Device::parse)]
    pub device: Device,
    /// Weight dtype (`f32`, `f16`, `bf16`). Default: as stored on the CPU (which computes in
    /// f32); on a GPU, which computes in one dtype throughout, the embeddings' stored dtype.
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Quantize the language model's linear weights as they load, to GGUF blocks of this type:
    /// `q8_0`, `q4_k`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `q5_k`, `q6_k` (llama.cpp's reference
    /// quantizers; CPU only). Attention and MLP projections and the LM head (the embedding
    /// table when tied) are quantized; norms and untied embeddings keep `--dtype`, and so does
    /// a matrix whose rows are not whole blocks (32 elements, 256 for the K-types; a line on
    /// stderr names them). The vision tower and projector stay as loaded.
    #[arg(long, value_parser = quantize::parse_type)]
    pub quantize: Option<GgmlType>,
    /// With `--quantize`: quantize the vision tower's and projector's linear weights too.
    #[arg(long, requires = "quantize")]
    pub quantize_vision: bool,
    /// CPU: multiply bf16 weights by activations rounded to bf16 (as HF transformers does in
    /// bf16) through AVX512-BF16's `vdpbf16ps`, about twice the f32 rate, where the CPU has it
    /// (elsewhere this is a no-op). Off by default: the f32 activations of the default path are
    /// what the parity tests hold to HF's f32 numerics. Applies to the whole process.
    #[arg(long)]
    pub bf16_compute: bool,
}

impl DeviceFlags {
    /// [`Model::load_with`] with these flags; with `--quantize`, prints what was quantized.
    pub fn load(&self, path: &Path) -> fineprune::Result<Model> {
        fineprune::ops::bf16::set_native(self.bf16_compute);
        one_malloc_arena();
        let opts = LoadOptions {
            device: self.device.clone(),
            dtype: self.dtype,
            quantize: self.quantize.map(|ty| Quantize {
                ty,
                vision: self.quantize_vision,
            }),
        };
        let model = Model::load_with(path, &opts).map_err(|e| {
            e.renamed(|n| match n {
                "quantize" => "--quantize".into(),
                n => n.into(),
            })
        })?;
        if let Some(q) = opts.quantize {
            eprintln!("{}", q.summary(&model.params, model.lm.tied()));
        }
        Ok(model)
    }
}

/// Makes glibc's malloc serve every thread from one arena (`mallopt(M_ARENA_MAX, 1)`), before the
/// model's threads first allocate. With an arena per thread, each of rayon's workers keeps the
/// high-water mark of its own scratch buffers resident: SmolLM2's 512-token prefill peaked at
/// 198 MiB instead of 170 (decode 170 instead of 168), and prefill and decode speed measured the
/// same either way (the hot loops do not allocate). Other C libraries are left as they are.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: glibc's documented tuning call; it only changes how future arenas are chosen.
        unsafe {
            mallopt(M_ARENA_MAX, 1);
        }
    }
}
