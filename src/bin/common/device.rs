//! The `--device` and `--dtype` flags of every command that runs a model.

use clap::Args;
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
}

impl DeviceFlags {
    /// [`Model::load_on`] with these flags.
    pub fn load(&self, path: &Path) -> fineprune::Result<Model> {
        Model::load_on(path, &self.device, self.dtype)
    }
}
