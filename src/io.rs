//! Atomic file writes and safetensors output.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory (named as
/// [`is_atomic_temp`] recognises), then a rename, so readers never see a half-written file and a
/// failure leaves any old file intact. The file and then its directory are fsynced, so the new
/// file survives a power loss once this returns, not only a killed process.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::arg(
            "output path",
            format!("{} has no file name", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Whether `name` is a temporary file of [`write_atomic`] (`.{file}.tmp{pid}`), as a process
/// killed mid-write leaves behind.
pub fn is_atomic_temp(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.rsplit_once(".tmp"))
        .is_some_and(|(file, pid)| {
            !file.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Removes the [`write_atomic`] temporary files ([`is_atomic_temp`]) left in `dir` and its
/// subfolders down to `depth` levels (symbolic links are not followed); returns how many. Only
/// for a folder no other process writes to (a training run's, under its lock).
pub fn remove_atomic_temps(dir: &Path, depth: usize) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = 0;
    for e in entries {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let path = e.path();
        let kind = e.file_type().map_err(|err| Error::io(&path, err))?;
        if kind.is_dir() && depth > 0 {
            removed += remove_atomic_temps(&path, depth - 1)?;
        } else if kind.is_file() && is_atomic_temp(&e.file_name().to_string_lossy()) {
            std::fs::remove_file(&path).map_err(|err| Error::io(&path, err))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A tensor to write: name, shape and little-endian bytes with their dtype.
pub enum OutTensor<'a> {
    F32(&'a str, Vec<usize>, &'a [f32]),
    I64(&'a str, Vec<usize>, &'a [i64]),
}

/// Writes tensors to a safetensors file atomically.
pub fn write_safetensors(path: &Path, tensors: &[OutTensor]) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| match t {
            OutTensor::F32(n, s, v) => (
                n.to_string(),
                Dtype::F32,
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            OutTensor::I64(n, s, v) => (
                n.to_string(),
                Dtype::I64,
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        })
        .collect();
    let views = data
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::arg("output tensor", format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::arg("output", format!("cannot serialize: {e}")))?;
    write_atomic(path, &bytes)
}

/// Reads the f32 tensor `name` from a safetensors file.
pub fn read_f32_tensor(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    if !path.exists() {
        return Err(Error::MissingFile {
            what: "tensor file",
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        msg: format!("not a valid safetensors file: {e}"),
    })?;
    let t = st.tensor(name).map_err(|_| Error::MissingTensor {
        name: name.to_string(),
        tried: format!("`{name}`"),
        source_desc: path.display().to_string(),
    })?;
    if t.dtype() != safetensors::Dtype::F32 {
        return Err(Error::Unsupported {
            what: "dtype (expected F32)",
            value: format!("{:?} for `{name}` in {}", t.dtype(), path.display()),
        });
    }
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((t.shape().to_vec(), v))
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
