//! The CUDA backend (feature `cuda`): device probe, the NVRTC build of `kernels/*.cu` for the
//! device's architecture (cached on disk), and the loaded kernels.
//!
//! Everything CUDA is loaded at run time (cudarc's `dynamic-loading`), so the crate builds on a
//! machine with no toolkit and no GPU; every entry point checks that the library it needs is
//! there and returns [`Error::Cuda`] instead of letting cudarc panic. NVRTC alone (PyPI's
//! `nvidia-cuda-nvrtc-cu12` or cu13 wheel) is enough to build the kernels to PTX without a GPU:
//! [`compile_ptx`]. NVRTC is loaded by [`nvrtc`] (CUDA 11, 12 or 13); point `FINEPRUNE_NVRTC` at
//! its `libnvrtc.so.N` when it is not on the library path.

use crate::error::{Error, Result};
use crate::io::{fnv1a64, write_atomic};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

mod backend;
pub mod nvrtc;
pub mod ops;

pub use backend::{Buffer, Data};

/// Helpers every kernel file starts with (half types, warp and block reductions).
pub const PRELUDE: &str = include_str!("../../kernels/prelude.cuh");

/// The kernel files, `(name, source)`; each is compiled as `PRELUDE + source`.
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("attention", include_str!("../../kernels/attention.cu")),
    ("norm", include_str!("../../kernels/norm.cu")),
    ("rope", include_str!("../../kernels/rope.cu")),
    ("act", include_str!("../../kernels/act.cu")),
    ("score", include_str!("../../kernels/score.cu")),
    ("gather", include_str!("../../kernels/gather.cu")),
];

/// Head dimension the attention kernels support (`ATT_D_MAX` in kernels/attention.cu).
pub const ATT_D_MAX: usize = 128;

/// Loads NVRTC from `path` (a libnvrtc.so of CUDA 11, 12 or 13) for the rest of the process,
/// unless one is loaded already ([`nvrtc::load`]).
pub fn load_nvrtc(path: &std::path::Path) -> Result<()> {
    nvrtc::load(path).map(|_| ())
}

/// Whether NVRTC can be loaded ([`nvrtc::get`]: `FINEPRUNE_NVRTC`, else by name).
pub fn nvrtc_present() -> bool {
    nvrtc::get().is_ok()
}

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The `sm_XY` NVRTC target of a compute capability.
pub fn arch_of(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (7, 0) => "sm_70",
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => {
            return Err(Error::Cuda(format!(
                "compute capability {major}.{minor} has no kernel target here (sm_70 .. sm_120)"
            )));
        }
    })
}

/// Builds every kernel file to PTX for `arch` (e.g. `sm_90`) with NVRTC; no GPU needed. An error
/// names the file and carries NVRTC's log.
pub fn compile_ptx(arch: &'static str) -> Result<Vec<(&'static str, String)>> {
    let nvrtc = nvrtc::get()?;
    KERNEL_FILES
        .iter()
        .map(|&(name, src)| {
            let ptx = nvrtc
                .compile_ptx(&format!("{PRELUDE}\n{src}"), &format!("{name}.cu"), arch)
                .map_err(|e| Error::Cuda(format!("kernels/{name}.cu for {arch}: {e}")))?;
            Ok((name, ptx))
        })
        .collect()
}

/// Where built PTX is cached: `FINEPRUNE_CACHE`, else `$XDG_CACHE_HOME/fineprune`, else
/// `~/.cache/fineprune`; `None` when none is known (no cache).
fn cache_dir() -> Option<PathBuf> {
    let env = |k| std::env::var_os(k).map(PathBuf::from);
    env("FINEPRUNE_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("fineprune")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("fineprune")))
}

/// PTX of every kernel file for `arch`, read from the cache folder `dir` when the sources are
/// unchanged (the file name carries a hash of prelude + source), else built with [`compile_ptx`]
/// and written there atomically. [`Device::open`] caches under `FINEPRUNE_CACHE`, else
/// `$XDG_CACHE_HOME/fineprune`, else `~/.cache/fineprune`.
pub fn cached_ptx(
    arch: &'static str,
    dir: Option<&std::path::Path>,
) -> Result<Vec<(&'static str, String)>> {
    let path = |name: &str, src: &str| {
        let hash = fnv1a64(format!("{PRELUDE}\n{src}").as_bytes());
        dir.map(|d| d.join(format!("{name}-{arch}-{hash:016x}.ptx")))
    };
    let cached: Option<Vec<(&'static str, String)>> = KERNEL_FILES
        .iter()
        .map(|&(name, src)| {
            let text = std::fs::read_to_string(path(name, src)?).ok()?;
            Some((name, text))
        })
        .collect();
    if let Some(c) = cached {
        return Ok(c);
    }
    let built = compile_ptx(arch)?;
    if dir
        .as_ref()
        .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
    {
        for ((name, ptx), (_, src)) in built.iter().zip(KERNEL_FILES) {
            if let Some(p) = path(name, src) {
                // A cache that cannot be written only costs a rebuild next time.
                let _ = write_atomic(&p, ptx.as_bytes());
            }
        }
    }
    Ok(built)
}

/// One GPU with every kernel loaded.
pub struct Device {
    pub ordinal: usize,
    pub name: String,
    /// NVRTC target, e.g. `sm_90`.
    pub arch: &'static str,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// cuBLAS on `stream`, created on first use ([`Device::blas`]).
    blas: OnceLock<std::result::Result<cudarc::cublas::CudaBlas, String>>,
}

impl Device {
    /// Opens GPU `ordinal` and loads the kernels built for it (NVRTC, cached). Errors, never
    /// panics, without libcuda, without a GPU, or when a kernel does not build.
    pub fn open(ordinal: usize) -> Result<Device> {
        if !driver_present() {
            return Err(Error::Cuda(
                "the CUDA driver library (libcuda.so) is not installed: no GPU here".into(),
            ));
        }
        let err = |what: &str, e: cudarc::driver::DriverError| {
            Error::Cuda(format!("device {ordinal}: {what}: {e}"))
        };
        let count = CudaContext::device_count().map_err(|e| err("count devices", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!(
                "device {ordinal} does not exist ({count} CUDA devices)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err("create context", e))?;
        let name = ctx.name().map_err(|e| err("name", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| err("compute capability", e))?;
        let arch = arch_of(major, minor)?;
        let mut modules = HashMap::new();
        for (file, ptx) in cached_ptx(arch, cache_dir().as_deref())? {
            let m = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(|e| err(&format!("load kernels/{file}.cu"), e))?;
            modules.insert(file, m);
        }
        let stream = ctx.default_stream();
        Ok(Device {
            ordinal,
            name,
            arch,
            ctx,
            stream,
            modules,
            blas: OnceLock::new(),
        })
    }

    /// GPU `ordinal` opened once per process and shared ([`Device::open`] the first time): the
    /// handle every tensor on it keeps.
    pub fn shared(ordinal: usize) -> Result<Arc<Device>> {
        static OPEN: OnceLock<std::sync::Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
        let mut open = OPEN
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| Error::Cuda("the device table was poisoned by a panic".into()))?;
        if let Some(d) = open.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Arc::new(Device::open(ordinal)?);
        open.insert(ordinal, d.clone());
        Ok(d)
    }

    /// cuBLAS bound to this device's stream; an error when libcublas cannot be loaded.
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only tries to open the library.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err("libcublas is not installed".into());
                }
                cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::Cuda(format!("cuBLAS: {e}")))
    }

    /// Kernel `name` (e.g. `rmsnorm_bf16`) of kernels/`file`.cu.
    pub fn function(&self, file: &str, name: &str) -> Result<CudaFunction> {
        let m = self
            .modules
            .get(file)
            .ok_or_else(|| Error::Cuda(format!("no kernel file kernels/{file}.cu")))?;
        m.load_function(name)
            .map_err(|e| Error::Cuda(format!("kernels/{file}.cu has no kernel `{name}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_of_maps_known_compute_capabilities() {
        for ((major, minor), arch) in [
            ((7, 0), "sm_70"),
            ((8, 0), "sm_80"),
            ((8, 6), "sm_86"),
            ((8, 9), "sm_89"),
            ((9, 0), "sm_90"),
            ((10, 0), "sm_100"),
            ((12, 0), "sm_120"),
        ] {
            assert_eq!(arch_of(major, minor).unwrap(), arch);
        }
        for (major, minor) in [(6, 1), (9, 1), (13, 0)] {
            let e = arch_of(major, minor).unwrap_err().to_string();
            assert!(e.contains(&format!("{major}.{minor}")), "{e}");
        }
    }

    /// A cache holding every file under its hashed name is read back without NVRTC; a file
    /// whose source changed (another hash) is not.
    #[test]
    fn cached_ptx_reads_files_named_by_source_hash() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, src) in KERNEL_FILES {
            let hash = fnv1a64(format!("{PRELUDE}\n{src}").as_bytes());
            let p = tmp.path().join(format!("{name}-sm_90-{hash:016x}.ptx"));
            std::fs::write(p, format!("// {name}")).unwrap();
        }
        let got = cached_ptx("sm_90", Some(tmp.path())).unwrap();
        assert_eq!(got.len(), KERNEL_FILES.len());
        for ((name, ptx), (want, _)) in got.iter().zip(KERNEL_FILES) {
            assert_eq!((name, ptx.as_str()), (want, format!("// {want}").as_str()));
        }
        // Another architecture's files are not there: it builds (needs NVRTC) or says why.
        match cached_ptx("sm_80", Some(tmp.path())) {
            Ok(built) => assert!(built[0].1.contains(".target sm_80")),
            Err(e) => assert!(e.to_string().contains("NVRTC"), "{e}"),
        }
    }
}
