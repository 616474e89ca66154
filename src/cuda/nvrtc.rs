//! NVRTC, loaded by us rather than through cudarc: cudarc's loader (built for CUDA 12) looks
//! the library up only by the names of [`cudarc::get_lib_name_candidates`] (`libnvrtc.so`,
//! `libnvrtc.so.12`, `.11`, ...), so CUDA 13's `libnvrtc.so.13` (the `nvidia-cuda-nvrtc` cu13
//! wheel on the GPU machines) was never found, and a library preloaded from a path is found
//! only when its soname is one of those names. Here the library comes from `FINEPRUNE_NVRTC`
//! (a path, any version), else the first of [`CANDIDATES`] the dynamic loader finds. The seven
//! entry points used have had the same C signatures from CUDA 11 to 13.

use crate::error::{Error, Result};
use std::ffi::{CString, c_char, c_int};
use std::path::Path;
use std::sync::Mutex;

/// Library names tried, in order, when `FINEPRUNE_NVRTC` is not set: the unversioned development
/// link, then CUDA 13, 12 and 11.
pub const CANDIDATES: [&str; 4] = [
    "libnvrtc.so",
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11.2",
];

type Program = *mut std::ffi::c_void;
type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type TextFn = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> c_int;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

/// A loaded NVRTC: where it came from and its entry points.
pub struct Nvrtc {
    /// The path or library name it was loaded from.
    pub source: String,
    /// `(major, minor)` from `nvrtcVersion`.
    pub version: (i32, i32),
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: TextFn,
    ptx_size: SizeFn,
    ptx: TextFn,
    destroy: DestroyFn,
}

/// The NVRTC of this process once one loaded (it stays loaded: the library is leaked).
static LOADED: Mutex<Option<&'static Nvrtc>> = Mutex::new(None);

impl Nvrtc {
    /// Opens `name` (a path or a name the dynamic loader searches for) and resolves the entry
    /// points; an error names the library and the missing symbol.
    fn open(name: &std::ffi::OsStr) -> Result<Nvrtc> {
        let shown = name.to_string_lossy().into_owned();
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(name) }
            .map_err(|e| Error::Cuda(format!("NVRTC `{shown}`: {e}")))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol has this C signature in every NVRTC since CUDA 11.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| Error::Cuda(format!("NVRTC `{shown}` has no `{}`: {e}", $name)))?
            };
        }
        let version: VersionFn = sym!("nvrtcVersion");
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { version(&mut major, &mut minor) };
        let n = Nvrtc {
            source: shown.clone(),
            version: (major, minor),
            create: sym!("nvrtcCreateProgram"),
            compile: sym!("nvrtcCompileProgram"),
            log_size: sym!("nvrtcGetProgramLogSize"),
            log: sym!("nvrtcGetProgramLog"),
            ptx_size: sym!("nvrtcGetPTXSize"),
            ptx: sym!("nvrtcGetPTX"),
            destroy: sym!("nvrtcDestroyProgram"),
        };
        // The entry points stay valid for the process: the library is never unloaded.
        std::mem::forget(lib);
        Ok(n)
    }

    /// Compiles `src` (program name `name`) to PTX for `arch` (e.g. `sm_90`). An error carries
    /// NVRTC's result code and log.
    pub fn compile_ptx(&self, src: &str, name: &str, arch: &str) -> Result<String> {
        let cstr = |what: &str, s: &str| {
            CString::new(s).map_err(|_| Error::Cuda(format!("NVRTC: the {what} holds a NUL byte")))
        };
        let (src, cname) = (cstr("source", src)?, cstr("program name", name)?);
        let opt = cstr("option", &format!("--gpu-architecture={arch}"))?;
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: valid C strings; no headers.
        let rc = unsafe {
            (self.create)(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::Cuda(format!(
                "NVRTC create program {name}: error {rc}"
            )));
        }
        let opts = [opt.as_ptr()];
        // SAFETY: `prog` was created above; one valid option string.
        let rc = unsafe { (self.compile)(prog, 1, opts.as_ptr()) };
        let out = if rc != 0 {
            let log = self.text(prog, self.log_size, self.log).unwrap_or_default();
            Err(Error::Cuda(format!(
                "NVRTC {} ({}.{}) compiling {name} for {arch}: error {rc}\n{log}",
                self.source, self.version.0, self.version.1
            )))
        } else {
            self.text(prog, self.ptx_size, self.ptx)
        };
        // SAFETY: `prog` is a live program, destroyed once.
        unsafe { (self.destroy)(&mut prog) };
        out
    }

    /// A NUL-terminated text of `prog` (its log or PTX) through its size and copy functions.
    fn text(&self, prog: Program, size: SizeFn, copy: TextFn) -> Result<String> {
        let mut n = 0usize;
        // SAFETY: `prog` is live; a valid out-pointer.
        let rc = unsafe { size(prog, &mut n) };
        if rc != 0 {
            return Err(Error::Cuda(format!("NVRTC size query: error {rc}")));
        }
        let mut buf = vec![0u8; n.max(1)];
        // SAFETY: the buffer holds the `n` bytes NVRTC reported.
        let rc = unsafe { copy(prog, buf.as_mut_ptr().cast()) };
        if rc != 0 {
            return Err(Error::Cuda(format!("NVRTC copy: error {rc}")));
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

/// Loads NVRTC from `path` (symlinks resolved) for the rest of the process, unless one is loaded
/// already (then that one stays and this is a no-op). An error names the path.
pub fn load(path: &Path) -> Result<&'static Nvrtc> {
    let mut slot = LOADED
        .lock()
        .map_err(|_| Error::Cuda("the NVRTC slot was poisoned by a panic".into()))?;
    if let Some(n) = *slot {
        return Ok(n);
    }
    // Through symlinks to the file itself: NVRTC finds its builtins library beside it ($ORIGIN).
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut n = Nvrtc::open(real.as_os_str())?;
    n.source = path.display().to_string();
    let n: &'static Nvrtc = Box::leak(Box::new(n));
    *slot = Some(n);
    Ok(n)
}

/// The process's NVRTC: the one loaded already, else `FINEPRUNE_NVRTC`, else the first of
/// [`CANDIDATES`] found. An error lists what was tried.
pub fn get() -> Result<&'static Nvrtc> {
    if let Some(p) = std::env::var_os("FINEPRUNE_NVRTC") {
        return load(Path::new(&p)).map_err(|e| Error::Cuda(format!("FINEPRUNE_NVRTC: {e}")));
    }
    let mut slot = LOADED
        .lock()
        .map_err(|_| Error::Cuda("the NVRTC slot was poisoned by a panic".into()))?;
    if let Some(n) = *slot {
        return Ok(n);
    }
    let mut tried = Vec::new();
    for name in CANDIDATES {
        match Nvrtc::open(name.as_ref()) {
            Ok(n) => {
                let n: &'static Nvrtc = Box::leak(Box::new(n));
                *slot = Some(n);
                return Ok(n);
            }
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(Error::Cuda(format!(
        "NVRTC not found (tried {}): put its folder on LD_LIBRARY_PATH or set FINEPRUNE_NVRTC \
         to the library (PyPI's nvidia-cuda-nvrtc wheels have one); {}",
        CANDIDATES.join(", "),
        tried.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_cover_cuda_12_and_13() {
        assert!(CANDIDATES.contains(&"libnvrtc.so.13"));
        assert!(CANDIDATES.contains(&"libnvrtc.so.12"));
    }

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let e = Nvrtc::open("/nonexistent/libnvrtc.so.13".as_ref())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/libnvrtc.so.13"), "{e}");
    }

    #[test]
    fn a_library_without_nvrtc_symbols_is_an_error_naming_the_symbol() {
        // libc loads everywhere and has no NVRTC entry points.
        let e = Nvrtc::open("libc.so.6".as_ref())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("libc.so.6") && e.contains("nvrtcVersion"), "{e}");
    }
}
