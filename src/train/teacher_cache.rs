//! A cache of the teacher's top-k next-token distribution: the teacher of logit distillation
//! runs once over the training data ([`write_cache`], `distill cache-teacher`) and every epoch
//! reads its distributions back ([`TeacherCache`]) instead of running it again.
//!
//! For every sample of the data (in the json's order) and every row the logit loss reads
//! ([`reads_row`] with the cache's `tokens`, in row order), the cache keeps the `k` most probable
//! entries of the teacher's log-probabilities at the loss's temperature after the optional
//! standardisation ([`LogitKd::teacher_log_probs`](crate::ops::kd::LogitKd::teacher_log_probs)),
//! sorted by decreasing probability (ties: smaller token id first). The samples are encoded
//! exactly as `distill train` encodes them ([`EncoderParts`]: the teacher's tokenizer, image
//! token and image processor, which a student made by `distill init-student` shares). The
//! divergence is not part of the cache: one cache serves `forward_kl`, `reverse_kl` and `jsd`
//! alike; `mse` reads raw logits and cannot use it.
//!
//! A loss gets a full row back from [`SparseRow::dense`]: the stored entries, and the mass they
//! leave, `1 − Σ exp(logp_topk)`, shared uniformly by the other `V − k` tokens (see there).
//!
//! # File format (version 1), all integers and floats little-endian
//!
//! ```text
//! 8 bytes   magic "FPTCACHE"
//! u32       H, the JSON header's length in bytes
//! H bytes   JSON header (UTF-8), a [`CacheHeader`]:
//!           {"format": "fineprune-teacher-topk", "version": 1, "teacher": "...", "data": "...",
//!            "image_folder": "...", "data_bytes": 1234, "data_fnv1a64": "0123456789abcdef",
//!            "samples": N, "k": K, "vocab": V, "temperature": 1.0, "standardize": false,
//!            "tokens": "answer", "max_len": 2048, "image_token": 32000}
//! u64 × (N+1)  row offsets: sample i's rows are rows offsets[i] .. offsets[i+1] (offsets[0] = 0,
//!              offsets[N] = R, the total)
//! u32 × N      sequence lengths (tokens of each encoded sample: a reader can check that its
//!              encoding is the one the cache was made from)
//! R rows       each: K × u32 token ids, then K × f32 log-probabilities (decreasing)
//! ```
//!
//! The file's length is exactly that sum; [`TeacherCache::open`] refuses anything else. A row
//! takes `8·K` bytes (f32 log-probs and u32 ids, no f16 rounding; 16-bit ids or f16 values would
//! halve it at the price of a second code path), against `4·V` for the full f32 row.
//! `data_fnv1a64` is FNV-1a (64-bit) over the training json's bytes; the images are not hashed.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::data::{Dataset, Encoder};
use super::logits::{DivergenceName, LogitsConfig, Tokens, reads_row};
use super::model::{HEAD_CHUNK, TraceRequest, TrainModel, TrainSeq};
use super::progress_bar;
use crate::error::{Error, Result};
use crate::io::fnv1a64;
use crate::model::image::ImageProcessorConfig;
use crate::model::template::ImageSlot;
use crate::model::tokenizer::Tokenizer;
use crate::ops::kd::LogitKd;

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"FPTCACHE";
/// The header's `format` field.
pub const FORMAT: &str = "fineprune-teacher-topk";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Samples the teacher runs together.
pub const BATCH: usize = 8;
/// The least mass [`SparseRow::dense`] gives the tokens outside the top k together.
pub const TAIL_FLOOR: f64 = 1e-30;

/// The JSON header of a cache file (see the module doc).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheHeader {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The teacher checkpoint folder, as given to [`write_cache`].
    pub teacher: String,
    /// The training json, as given.
    pub data: String,
    /// The folder of its images, as given.
    pub image_folder: String,
    /// The json's length in bytes.
    pub data_bytes: u64,
    /// FNV-1a 64 of the json's bytes, 16 hex digits.
    pub data_fnv1a64: String,
    /// Samples (conversations) of the json.
    pub samples: usize,
    /// Entries kept per row.
    pub k: usize,
    /// The teacher's vocabulary.
    pub vocab: usize,
    /// Softmax temperature of the stored log-probabilities.
    pub temperature: f32,
    /// Whether the logits were z-scored first.
    pub standardize: bool,
    /// Which rows are stored ([`reads_row`] for a logit loss).
    pub tokens: Tokens,
    /// The encoder's longest sample.
    pub max_len: usize,
    /// The image placeholder's id (rows are selected with it).
    pub image_token: u32,
}

/// What [`write_cache`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSummary {
    pub samples: usize,
    /// Rows stored (over all samples).
    pub rows: usize,
    /// The file's size.
    pub bytes: u64,
    /// Bytes of one stored row, `8·k`.
    pub bytes_per_row: usize,
    pub k: usize,
    pub vocab: usize,
    pub seconds: f64,
}

impl CacheSummary {
    /// The file's bytes per stored row (header and tables included).
    pub fn file_bytes_per_row(&self) -> f64 {
        self.bytes as f64 / self.rows.max(1) as f64
    }

    /// Bytes per row of the full-vocabulary alternative (every f32 log-prob): `4·V`.
    pub fn full_bytes_per_row(&self) -> usize {
        4 * self.vocab
    }

    /// A few lines for a terminal.
    pub fn report(&self, out: &Path) -> String {
        format!(
            "cached the teacher's top-{} of {} tokens for {} rows of {} samples in {:.1}s\n\
             file: {} ({} bytes, {:.1} bytes per token over the whole file)\n\
             bytes per token (row): {} (top-k) vs {} for the full vocabulary (4·V): {:.1}x smaller\n\
             use it with `cache = \"{}\"` in [distill.logits]\n",
            self.k,
            self.vocab,
            self.rows,
            self.samples,
            self.seconds,
            out.display(),
            self.bytes,
            self.file_bytes_per_row(),
            self.bytes_per_row,
            self.full_bytes_per_row(),
            self.full_bytes_per_row() as f64 / self.bytes_per_row as f64,
            out.display()
        )
    }
}

/// One cached row: the `k` most probable tokens and their log-probabilities, decreasing.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseRow {
    pub ids: Vec<u32>,
    pub logp: Vec<f32>,
}

impl SparseRow {
    /// The full row of `vocab` log-probabilities that [`LogitKd::row`] takes as `teacher_logp`:
    /// the stored entries, and for each of the other `V − k` tokens
    /// `ln(max(1 − Σ exp(logp_topk), 1e-30) / (V − k))` (the left-over mass shared uniformly;
    /// [`TAIL_FLOOR`] keeps it finite when the top k hold, up to rounding, all of it). With
    /// `k = V` it is the stored row exactly.
    ///
    /// # Panics
    /// If an id is `>= vocab` (rows from [`TeacherCache::rows`] hold ids below the cache's
    /// vocabulary, which [`TeacherCache::check`] compares with the model's).
    pub fn dense(&self, vocab: usize) -> Vec<f32> {
        let k = self.ids.len();
        assert!(
            self.ids.iter().all(|&i| (i as usize) < vocab),
            "SparseRow::dense: a token id is out of the vocabulary of {vocab}"
        );
        let tail = if vocab > k {
            let mass: f64 = self.logp.iter().map(|&l| (l as f64).exp()).sum();
            ((1.0 - mass).max(TAIL_FLOOR) / (vocab - k) as f64).ln() as f32
        } else {
            0.0
        };
        let mut out = vec![tail; vocab];
        for (&i, &l) in self.ids.iter().zip(&self.logp) {
            out[i as usize] = l;
        }
        out
    }
}

/// `"answer"` or `"all"` (a command-line value).
pub fn parse_tokens(s: &str) -> Result<Tokens> {
    match s {
        "answer" => Ok(Tokens::Answer),
        "all" => Ok(Tokens::All),
        _ => Err(Error::arg(
            "tokens",
            format!("`{s}` is not \"answer\" or \"all\""),
        )),
    }
}

fn tokens_name(t: Tokens) -> &'static str {
    match t {
        Tokens::Answer => "answer",
        Tokens::All => "all",
    }
}

/// What the trainer's [`Encoder`] is made of for a model folder, read as `distill train` reads
/// them (its `tokenizer.json`, the image token of its `config.json` with the vision tower's
/// token count, `preprocessor_config.json` or CLIP's defaults). `run.rs` builds the same inline.
pub struct EncoderParts {
    pub tokenizer: Tokenizer,
    pub image_slot: ImageSlot,
    pub processor: ImageProcessorConfig,
    pub image_token: u32,
    pub vocab: usize,
}

impl EncoderParts {
    /// Reads them from a LLaVA checkpoint folder (no weights).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = super::llava_config(dir, "teacher")?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)?;
        let processor = ImageProcessorConfig::from_model_dir(dir, config.vision.image_size)?;
        let id = config.image_token_id;
        let token = tokenizer.id_to_token(id).ok_or_else(|| Error::Tokenizer {
            path: tok_path.clone(),
            msg: format!("has no image token id {id}"),
        })?;
        Ok(EncoderParts {
            tokenizer,
            image_slot: ImageSlot {
                token,
                count: config.image_tokens(),
            },
            processor,
            image_token: id,
            vocab: config.text.vocab_size,
        })
    }

    /// The encoder `distill train` uses with `max_len`.
    pub fn encoder(&self, max_len: usize) -> Encoder<'_> {
        let mut enc = Encoder::new(&self.tokenizer, self.image_slot.clone(), max_len);
        enc.image_processor = Some(self.processor.clone());
        enc
    }
}

/// Sample `indices` of `ds` as the trainer feeds them to a model.
pub fn train_seqs(ds: &Dataset, enc: &Encoder<'_>, indices: &[usize]) -> Result<Vec<TrainSeq>> {
    Ok(ds
        .batch(enc, indices)?
        .into_iter()
        .map(|s| TrainSeq {
            input_ids: s.input_ids,
            labels: s.labels,
            pixel_values: s.pixel_values,
            grounding: s.grounding,
            prompt: s.prompt,
        })
        .collect())
}

/// The `k` entries of `logp` with the largest values, decreasing (ties: smaller id first).
fn top_k(logp: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let cmp = |a: &u32, b: &u32| {
        logp[*b as usize]
            .total_cmp(&logp[*a as usize])
            .then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..logp.len() as u32).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    let vals = idx.iter().map(|&i| logp[i as usize]).collect();
    (idx, vals)
}

fn settings_ok(logits: &LogitsConfig) -> Result<LogitKd> {
    if logits.divergence == DivergenceName::Mse {
        return Err(Error::arg(
            "distill.logits.divergence",
            "mse compares the teacher's raw logits, which a cache of top-k log-probabilities \
             does not keep: use forward_kl, reverse_kl or jsd with a cache",
        ));
    }
    let kd = logits.kd();
    kd.validate()?;
    Ok(kd)
}

/// Runs `teacher` over every conversation of `data` (images in `image_folder`, encoded as
/// `distill train` encodes them with `max_len`) and writes the top-`k` cache of the rows
/// `logits.tokens` reads to `out` (atomically: a temporary file beside it, then a rename), in
/// the format of the module doc. `logits` gives the temperature, standardisation and rows; its
/// divergence must not be `mse` and its weight is not read. A progress bar (samples) shows on
/// stderr with `progress`.
#[allow(clippy::too_many_arguments)]
pub fn write_cache(
    teacher: &Path,
    data: &Path,
    image_folder: &Path,
    logits: &LogitsConfig,
    k: usize,
    max_len: usize,
    out: &Path,
    progress: bool,
) -> Result<CacheSummary> {
    let t0 = Instant::now();
    let kd = settings_ok(logits)?;
    if max_len == 0 {
        return Err(Error::arg("max_len", "must be at least 1"));
    }
    let parts = EncoderParts::from_dir(teacher)?;
    let vocab = parts.vocab;
    if k == 0 || k > vocab {
        return Err(Error::arg(
            "top_k",
            format!(
                "{k} must be in 1..={vocab} (the teacher {}'s vocabulary)",
                teacher.display()
            ),
        ));
    }
    let bytes = std::fs::read(data).map_err(|e| Error::io(data, e))?;
    let ds = Dataset::open(data, image_folder)?;
    let n = ds.len();
    let enc = parts.encoder(max_len);
    let mut model = TrainModel::from_dir(teacher)?;
    model.freeze();
    let hidden = model.config.text.hidden_size;
    let image_token = parts.image_token;

    let header = CacheHeader {
        format: FORMAT.into(),
        version: VERSION,
        teacher: teacher.display().to_string(),
        data: data.display().to_string(),
        image_folder: image_folder.display().to_string(),
        data_bytes: bytes.len() as u64,
        data_fnv1a64: format!("{:016x}", fnv1a64(&bytes)),
        samples: n,
        k,
        vocab,
        temperature: logits.temperature,
        standardize: logits.standardize,
        tokens: logits.tokens,
        max_len,
        image_token,
    };
    let json = serde_json::to_vec(&header).expect("the header serializes");

    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .ok_or_else(|| Error::arg("out", format!("{} has no file name", out.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let bar = progress_bar(n as u64, progress, "samples");
    bar.set_prefix("teacher cache");
    let res = (|| -> Result<(Vec<u64>, u64)> {
        let io = |e: std::io::Error| Error::io(&tmp, e);
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::new(file);
        w.write_all(MAGIC).map_err(io)?;
        w.write_all(&(json.len() as u32).to_le_bytes())
            .map_err(io)?;
        w.write_all(&json).map_err(io)?;
        let tables_at = (MAGIC.len() + 4 + json.len()) as u64;
        // Placeholders for the tables, filled in at the end.
        w.write_all(&vec![0u8; (n + 1) * 8 + n * 4]).map_err(io)?;
        let mut offsets = vec![0u64; n + 1];
        let mut lens = vec![0u32; n];
        let mut row_buf = Vec::with_capacity(k * 8);
        for start in (0..n).step_by(BATCH) {
            let idx: Vec<usize> = (start..(start + BATCH).min(n)).collect();
            let batch = train_seqs(&ds, &enc, &idx)?;
            let trace = model.trace(&batch, &TraceRequest::default())?;
            // The rows read, end to end over the batch, in order.
            let mut rows = Vec::new();
            let mut base = 0usize;
            for (j, s) in batch.iter().enumerate() {
                let len = s.input_ids.len();
                let before = rows.len();
                rows.extend(
                    (0..len)
                        .filter(|&t| reads_row(s, t, logits.tokens, image_token, true))
                        .map(|t| base + t),
                );
                let i = idx[j];
                lens[i] = len as u32;
                offsets[i + 1] = offsets[i] + (rows.len() - before) as u64;
                base += len;
            }
            for chunk in rows.chunks(HEAD_CHUNK) {
                let x: Vec<f32> = chunk
                    .iter()
                    .flat_map(|&r| &trace.final_out[r * hidden..(r + 1) * hidden])
                    .copied()
                    .collect();
                let tl = model.head_logits(&x)?;
                let top: Vec<(Vec<u32>, Vec<f32>)> = tl
                    .par_chunks(vocab)
                    .map(|z| top_k(&kd.teacher_log_probs(z), k))
                    .collect();
                for (ids, lp) in &top {
                    if let Some(v) = lp.iter().find(|v| !v.is_finite()) {
                        return Err(Error::arg(
                            "teacher",
                            format!(
                                "{} gives a non-finite log-probability ({v}) on samples {}..{}",
                                teacher.display(),
                                idx[0],
                                idx[idx.len() - 1] + 1
                            ),
                        ));
                    }
                    row_buf.clear();
                    ids.iter()
                        .for_each(|i| row_buf.extend_from_slice(&i.to_le_bytes()));
                    lp.iter()
                        .for_each(|v| row_buf.extend_from_slice(&v.to_le_bytes()));
                    w.write_all(&row_buf).map_err(io)?;
                }
            }
            bar.inc(idx.len() as u64);
            bar.set_message(format!("{} rows", offsets[idx[idx.len() - 1] + 1]));
        }
        let mut file = w.into_inner().map_err(|e| io(e.into_error()))?;
        let mut tables = Vec::with_capacity((n + 1) * 8 + n * 4);
        offsets
            .iter()
            .for_each(|o| tables.extend_from_slice(&o.to_le_bytes()));
        lens.iter()
            .for_each(|l| tables.extend_from_slice(&l.to_le_bytes()));
        file.seek(SeekFrom::Start(tables_at)).map_err(io)?;
        file.write_all(&tables).map_err(io)?;
        file.sync_all().map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        drop(file);
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        Ok((offsets, size))
    })();
    bar.finish_and_clear();
    let (offsets, size) = res.inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(CacheSummary {
        samples: n,
        rows: offsets[n] as usize,
        bytes: size,
        bytes_per_row: 8 * k,
        k,
        vocab,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A cache file, mapped.
pub struct TeacherCache {
    path: PathBuf,
    map: memmap2::Mmap,
    header: CacheHeader,
    /// Where the row offsets, the sequence lengths and the rows start.
    offsets_at: usize,
    lens_at: usize,
    rows_at: usize,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl TeacherCache {
    fn corrupt(path: &Path, msg: impl Into<String>) -> Error {
        Error::Config {
            path: path.to_path_buf(),
            msg: format!("teacher cache: {}", msg.into()),
        }
    }

    /// Maps `path` and checks its structure: magic, header, tables and length (every row's
    /// bytes present, nothing after them). Rows' contents are checked by [`rows`](Self::rows).
    pub fn open(path: &Path) -> Result<TeacherCache> {
        let bad = |m: String| Err(Self::corrupt(path, m));
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < (MAGIC.len() + 4) as u64 {
            return bad(format!(
                "{len} bytes is too short for a cache file (made by `distill cache-teacher`)"
            ));
        }
        // SAFETY: read-only map; the cache is not modified while training reads it.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let b = &map[..];
        if &b[..MAGIC.len()] != MAGIC {
            return bad(
                "not a teacher cache (made by `distill cache-teacher`): wrong magic bytes".into(),
            );
        }
        let h = u32_at(b, MAGIC.len()) as usize;
        let json_at = MAGIC.len() + 4;
        let Some(json) = b.get(json_at..json_at + h) else {
            return bad(format!(
                "truncated: the header should take {h} bytes, the file has {} after the magic",
                b.len() - json_at
            ));
        };
        let header: CacheHeader = match serde_json::from_slice(json) {
            Ok(hd) => hd,
            Err(e) => return bad(format!("unreadable header: {e}")),
        };
        if header.format != FORMAT || header.version != VERSION {
            return bad(format!(
                "format `{}` version {}, this build reads `{FORMAT}` version {VERSION}",
                header.format, header.version
            ));
        }
        if header.vocab == 0 || header.k == 0 || header.k > header.vocab {
            return bad(format!(
                "header has k = {} and vocab = {} (need 1 <= k <= vocab)",
                header.k, header.vocab
            ));
        }
        let n = header.samples;
        let offsets_at = json_at + h;
        let tables = n
            .checked_add(1)
            .and_then(|m| m.checked_mul(8))
            .and_then(|a| n.checked_mul(4).and_then(|c| a.checked_add(c)));
        let Some(rows_at) = tables.and_then(|t| t.checked_add(offsets_at)) else {
            return bad(format!("header claims {n} samples"));
        };
        if rows_at > b.len() {
            return bad(format!(
                "truncated: the tables of {n} samples end at byte {rows_at}, the file has {}",
                b.len()
            ));
        }
        let lens_at = offsets_at + (n + 1) * 8;
        if u64_at(b, offsets_at) != 0 {
            return bad("the first row offset is not 0".into());
        }
        for i in 0..n {
            if u64_at(b, offsets_at + (i + 1) * 8) < u64_at(b, offsets_at + i * 8) {
                return bad(format!("the row offsets decrease at sample {i}"));
            }
        }
        let total = u64_at(b, offsets_at + n * 8);
        let row_bytes = (header.k as u64) * 8;
        let want = total
            .checked_mul(row_bytes)
            .and_then(|r| r.checked_add(rows_at as u64));
        if want != Some(b.len() as u64) {
            let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
            return bad(format!(
                "{} bytes, but {total} rows of top-{} need {want} (truncated or corrupt)",
                b.len(),
                header.k
            ));
        }
        Ok(TeacherCache {
            path: path.to_path_buf(),
            map,
            header,
            offsets_at,
            lens_at,
            rows_at,
        })
    }

    /// The header.
    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    /// Samples in the cache.
    pub fn len(&self) -> usize {
        self.header.samples
    }

    pub fn is_empty(&self) -> bool {
        self.header.samples == 0
    }

    fn sample_ok(&self, sample: usize) -> Result<()> {
        if sample >= self.header.samples {
            return Err(Error::arg(
                "sample",
                format!(
                    "{sample} is past the end of the teacher cache {} ({} samples)",
                    self.path.display(),
                    self.header.samples
                ),
            ));
        }
        Ok(())
    }

    /// Tokens of sample `sample` as encoded when the cache was made.
    pub fn seq_len(&self, sample: usize) -> Result<usize> {
        self.sample_ok(sample)?;
        Ok(u32_at(&self.map, self.lens_at + sample * 4) as usize)
    }

    /// Rows stored for sample `sample`.
    pub fn row_count(&self, sample: usize) -> Result<usize> {
        self.sample_ok(sample)?;
        let o = |i: usize| u64_at(&self.map, self.offsets_at + i * 8);
        Ok((o(sample + 1) - o(sample)) as usize)
    }

    /// Checks that the cache fits a run: made from the same training json (length and hash),
    /// the temperature, standardisation and rows of `logits`, a model of vocabulary `vocab`;
    /// and that `logits`' divergence can use it (not `mse`). The errors name the setting and
    /// both values. Neither the images nor `max_len` are checked here: compare each encoded
    /// sample's length with [`seq_len`](Self::seq_len) and its read rows with
    /// [`row_count`](Self::row_count).
    pub fn check(&self, data: &Path, logits: &LogitsConfig, vocab: usize) -> Result<()> {
        settings_ok(logits)?;
        let h = &self.header;
        let differ = |what: &str, cache: String, now: String| {
            Err(Error::arg(
                "distill.logits.cache",
                format!(
                    "{} was made with {what} {cache}, but the run has {what} {now}: \
                     write a new cache with `distill cache-teacher`",
                    self.path.display()
                ),
            ))
        };
        if h.vocab != vocab {
            return differ("vocabulary", h.vocab.to_string(), vocab.to_string());
        }
        if h.temperature != logits.temperature {
            return differ(
                "temperature",
                h.temperature.to_string(),
                logits.temperature.to_string(),
            );
        }
        if h.standardize != logits.standardize {
            return differ(
                "standardize",
                h.standardize.to_string(),
                logits.standardize.to_string(),
            );
        }
        if h.tokens != logits.tokens {
            return differ(
                "tokens",
                format!("\"{}\"", tokens_name(h.tokens)),
                format!("\"{}\"", tokens_name(logits.tokens)),
            );
        }
        let bytes = std::fs::read(data).map_err(|e| Error::io(data, e))?;
        let hash = format!("{:016x}", fnv1a64(&bytes));
        if bytes.len() as u64 != h.data_bytes || hash != h.data_fnv1a64 {
            return differ(
                "data",
                format!(
                    "{} ({} bytes, FNV-1a {})",
                    h.data, h.data_bytes, h.data_fnv1a64
                ),
                format!("{} ({} bytes, FNV-1a {hash})", data.display(), bytes.len()),
            );
        }
        Ok(())
    }

    /// The rows of sample `sample` (its rows the loss reads, in order). Errors for a sample past
    /// the end and for a row whose ids are out of the vocabulary or whose log-probabilities are
    /// not finite and decreasing (a corrupt file).
    pub fn rows(&self, sample: usize) -> Result<Vec<SparseRow>> {
        self.sample_ok(sample)?;
        let k = self.header.k;
        let vocab = self.header.vocab;
        let first = u64_at(&self.map, self.offsets_at + sample * 8) as usize;
        let count = self.row_count(sample)?;
        let mut out = Vec::with_capacity(count);
        for r in first..first + count {
            let at = self.rows_at + r * k * 8;
            let ids: Vec<u32> = (0..k).map(|j| u32_at(&self.map, at + 4 * j)).collect();
            let logp: Vec<f32> = (0..k)
                .map(|j| f32::from_bits(u32_at(&self.map, at + 4 * (k + j))))
                .collect();
            let ids_ok = ids.iter().all(|&i| (i as usize) < vocab);
            let lp_ok = logp.iter().all(|v| v.is_finite()) && logp.windows(2).all(|w| w[0] >= w[1]);
            if !ids_ok || !lp_ok {
                return Err(Self::corrupt(
                    &self.path,
                    format!(
                        "row {} of sample {sample} is corrupt ({})",
                        r - first,
                        if ids_ok {
                            "log-probabilities not finite and decreasing"
                        } else {
                            "a token id is out of the vocabulary"
                        }
                    ),
                ));
            }
            out.push(SparseRow { ids, logp });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_id() {
        let lp = [-3.0f32, -1.0, -2.0, -1.0, -5.0];
        assert_eq!(top_k(&lp, 3), (vec![1, 3, 2], vec![-1.0, -1.0, -2.0]));
        assert_eq!(top_k(&lp, 5).0, vec![1, 3, 2, 0, 4]);
    }

    #[test]
    fn dense_shares_the_left_over_mass() {
        let r = SparseRow {
            ids: vec![2, 0],
            logp: vec![0.5f32.ln(), 0.25f32.ln()],
        };
        let d = r.dense(4);
        assert!((d[1] - 0.125f32.ln()).abs() < 1e-6 && (d[3] - 0.125f32.ln()).abs() < 1e-6);
        let full = SparseRow {
            ids: vec![0],
            logp: vec![0.0],
        };
        assert!(full.dense(3)[1] == ((1e-30f64 / 2.0).ln() as f32));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
