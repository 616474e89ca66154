//! Named weights from HF safetensors (single file or sharded through `model.safetensors.index.json`)
//! or from an in-memory map (GGUF import), looked up under canonical names.
//!
//! Canonical names strip the checkpoint's key layout: `lm.*` (LLaMA body), `lm_head.*`, `vision.*`
//! (CLIP vision model), `projector.*`. Accepted layouts (DESIGN.md): `language_model.model.*` /
//! `language_model.lm_head.*` (transformers 4.x llava), `model.language_model.*` / `lm_head.*` (5.x),
//! `vision_tower.vision_model.*` or `vision_tower.*` with or without `model.`,
//! `multi_modal_projector.*` with or without `model.`, LLaVA-NeXT's `image_newline` with or without
//! `model.`, and plain `model.*` (LlamaForCausalLM).

use super::nn::ParamSource;
use super::quantize::Quantize;
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, HostBuf, Storage, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Raw prefix -> canonical prefix, first match wins.
const PREFIXES: &[(&str, &str)] = &[
    ("language_model.model.", "lm."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "lm."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.image_newline", "image_newline"),
    ("image_newline", "image_newline"),
    ("lm_head.", "lm_head."),
    ("model.", "lm."),
];

enum Entry {
    File {
        file: usize,
        raw: String,
        dtype: Dtype,
        shape: Vec<usize>,
        start: usize,
        end: usize,
    },
    Memory(Tensor),
}

/// A checkpoint's tensors under canonical names.
pub struct Weights {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    /// Raw prefixes seen, in the order of [`PREFIXES`] (the detected key layout).
    layout: BTreeSet<(usize, &'static str)>,
    desc: String,
    /// Where [`Weights::take`] puts each tensor, and in which dtype (`None`: as stored).
    device: Device,
    dtype: Option<DType>,
    /// Quantize on load, and whether the LM head is the embedding table ([`Weights::quantize`]).
    quantize: Option<(Quantize, bool)>,
}

fn canonical(raw: &str) -> Option<(usize, &'static str, String)> {
    PREFIXES.iter().enumerate().find_map(|(i, (p, c))| {
        raw.strip_prefix(p)
            .map(|rest| (i, *p, format!("{c}{rest}")))
    })
}

impl Weights {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`, in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
                path: index.clone(),
                msg: format!("not valid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Weights {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut names = BTreeSet::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| Error::Weights {
                    path: index.clone(),
                    msg: format!("weight_map entry `{k}` is not a file name"),
                })?;
                // A shard is a file of this folder (or below it): an absolute path or `..` could
                // make a model folder read any file on the machine. (Symbolic links inside the
                // folder are followed: the Hugging Face cache links shards to its blobs.)
                let confined = std::path::Path::new(f)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if f.is_empty() || !confined {
                    return Err(Error::Weights {
                        path: index.clone(),
                        msg: format!(
                            "weight_map entry `{k}` names `{f}`, which is not a file inside the model folder"
                        ),
                    });
                }
                names.insert(f.to_string());
            }
            names.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::MissingFile {
                what: "weights (model.safetensors or model.safetensors.index.json)",
                path: single,
            });
        };
        let mut w = Weights {
            files: vec![],
            entries: HashMap::new(),
            layout: BTreeSet::new(),
            desc: dir.display().to_string(),
            device: Device::Cpu,
            dtype: None,
            quantize: None,
        };
        for path in files {
            w.add_file(path)?;
        }
        Ok(w)
    }

    /// Weights already in memory, under raw HF names (e.g. from a GGUF import).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, desc: &str) -> Self {
        let mut w = Weights {
            files: vec![],
            entries: HashMap::new(),
            layout: BTreeSet::new(),
            desc: desc.to_string(),
            device: Device::Cpu,
            dtype: None,
            quantize: None,
        };
        for (raw, t) in tensors {
            if let Some((i, p, name)) = canonical(&raw) {
                w.layout.insert((i, p));
                w.entries.insert(name, Entry::Memory(t));
            }
        }
        w
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "weight shard",
                path,
            });
        }
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is opened read-only; we only read the mapping.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Weights {
            path: path.clone(),
            msg: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        })?;
        let idx = self.files.len();
        for (raw, info) in meta.tensors() {
            let Some((i, p, name)) = canonical(&raw) else {
                continue;
            };
            self.layout.insert((i, p));
            self.entries.insert(
                name,
                Entry::File {
                    file: idx,
                    raw,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: 8 + n + info.data_offsets.0,
                    end: 8 + n + info.data_offsets.1,
                },
            );
        }
        self.files.push((path, Arc::new(mmap)));
        Ok(())
    }

    /// The raw key prefixes present, e.g. `["language_model.model.", "vision_tower.vision_model."]`.
    pub fn layout(&self) -> Vec<&'static str> {
        self.layout.iter().map(|(_, p)| *p).collect()
    }

    /// Whether a canonical name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Shape and dtype name of every tensor, sorted by canonical name (for `inspect`).
    pub fn summary(&self) -> Vec<(String, Vec<usize>, String)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(k, e)| match e {
                Entry::File { dtype, shape, .. } => {
                    (k.clone(), shape.clone(), format!("{dtype:?}"))
                }
                Entry::Memory(t) => (k.clone(), t.shape().to_vec(), t.dtype().to_string()),
            })
            .collect();
        v.sort();
        v
    }

    /// Removes and returns the tensor `name` (canonical), checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.take_opt(name, shape)?
            .ok_or_else(|| self.missing(name))
    }

    /// The error for a missing tensor `name`, listing the keys tried.
    pub fn missing(&self, name: &str) -> Error {
        let want = name.split_once('.').map(|(c, _)| c).unwrap_or(name);
        let tried: Vec<String> = PREFIXES
            .iter()
            .filter(|(_, c)| c.trim_end_matches('.') == want)
            .map(|(p, c)| format!("`{p}{}`", &name[c.len()..]))
            .collect();
        Error::MissingTensor {
            name: name.to_string(),
            tried: tried.join(", "),
            source_desc: self.desc.clone(),
        }
    }

    /// Like [`Weights::take`] but `Ok(None)` when absent (optional biases, tied heads).
    pub fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(entry) = self.entries.remove(name) else {
            return Ok(None);
        };
        let stored_as = match &entry {
            Entry::File { raw, file, .. } => {
                format!("`{raw}` in {}", self.files[*file].0.display())
            }
            Entry::Memory(_) => self.desc.clone(),
        };
        let t = match entry {
            Entry::Memory(t) => t,
            Entry::File {
                file,
                raw,
                dtype,
                shape: s,
                start,
                end,
            } => {
                let (path, map) = &self.files[file];
                let n: usize = s.iter().product();
                let holds = |size: usize| {
                    end.checked_sub(start)
                        .is_some_and(|b| Some(b) == n.checked_mul(size))
                };
                let outside = || Error::Weights {
                    path: path.clone(),
                    msg: format!(
                        "tensor `{raw}`: bytes {start}..{end} do not hold {n} values of {dtype:?}"
                    ),
                };
                // In place from the mapping where aligned (else one tensor copied).
                let storage = match dtype {
                    Dtype::F32 if holds(4) => {
                        Storage::F32(HostBuf::from_map(map, start, n).ok_or_else(outside)?)
                    }
                    Dtype::F16 if holds(2) => {
                        Storage::F16(HostBuf::from_map(map, start, n).ok_or_else(outside)?)
                    }
                    Dtype::BF16 if holds(2) => {
                        Storage::BF16(HostBuf::from_map(map, start, n).ok_or_else(outside)?)
                    }
                    Dtype::F32 | Dtype::F16 | Dtype::BF16 => return Err(outside()),
                    other => {
                        return Err(Error::Unsupported {
                            what: "weight dtype (f32, f16, bf16)",
                            value: format!("{other:?} for tensor `{raw}` in {}", path.display()),
                        });
                    }
                };
                Tensor::new(&s, storage)?
            }
        };
        if t.shape() != shape {
            return Err(Error::Shape {
                name: format!("{name} (stored as {stored_as})"),
                expected: shape.to_vec(),
                got: t.shape().to_vec(),
            });
        }
        // Read in place from the file: once converted (quantized, another dtype, uploaded), the
        // source pages leave the process's resident memory, so a load never holds both.
        let source = t.mapped_region();
        let (t, quantized) = match &self.quantize {
            Some((q, tied)) => q.apply(name, *tied, t)?,
            None => (t, false),
        };
        // A quantized tensor stays on the host, in its blocks.
        let t = if quantized {
            t
        } else {
            let t = match self.dtype {
                Some(dt) if dt != t.dtype() => t.to_dtype(dt)?,
                _ => t,
            };
            t.to_device(&self.device)?
        };
        if let Some(source) = source.filter(|_| !t.is_mapped()) {
            source.release();
        }
        Ok(Some(t))
    }

    /// Makes [`Weights::take`] return tensors on `device`, converted to `dtype` when given (one
    /// tensor at a time, so a checkpoint is never held twice).
    pub fn place(&mut self, device: Device, dtype: Option<DType>) {
        self.device = device;
        self.dtype = dtype;
    }

    /// Makes [`Weights::take`] quantize the weights `q` wants ([`Quantize::apply`]; `tied`: the
    /// LM head is the embedding table) as each is read, on the host; the others go on as
    /// [`Weights::place`] says.
    pub fn quantize(&mut self, q: Option<Quantize>, tied: bool) {
        self.quantize = q.map(|q| (q, tied));
    }

    /// The stored dtype of tensor `name` (canonical), if present.
    pub fn dtype_of(&self, name: &str) -> Option<DType> {
        match self.entries.get(name)? {
            Entry::Memory(t) => Some(t.dtype()),
            Entry::File { dtype, .. } => match dtype {
                Dtype::F32 => Some(DType::F32),
                Dtype::F16 => Some(DType::F16),
                Dtype::BF16 => Some(DType::BF16),
                _ => None,
            },
        }
    }
}

impl ParamSource for Weights {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        self.take_opt(name, shape)
    }

    fn missing(&self, name: &str) -> Error {
        Weights::missing(self, name)
    }
}
