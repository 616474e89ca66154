//! The generation loop: prompt building, vision encoding, batched prefill, KV-cached decoding and
//! sampling (greedy, or seeded temperature + top-p).

use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::image::{self, ImageProcessorConfig};
use crate::model::llama::{KvCache, SeqRows};
use crate::model::template::{self, ImageSlot, Prompt, PromptOptions};
use crate::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax, lowest id on ties); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens until their probability reaches `top_p`.
    pub top_p: f32,
    /// Seed of the request's random stream (same seed, same tokens).
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// The image of a request.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A PNG/JPEG file, preprocessed with the model's image processor.
    Path(PathBuf),
    /// Already preprocessed `pixel_values`, `[channels, size, size]`.
    Pixels(Vec<f32>),
}

/// One prompt to run.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub image: Option<ImageInput>,
    pub options: PromptOptions,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop at the model's end-of-sequence token (on by default).
    pub stop_on_eos: bool,
}

impl Request {
    /// A greedy request for `prompt` with an optional image, up to 64 new tokens.
    pub fn new(prompt: impl Into<String>, image: Option<ImageInput>) -> Self {
        Request {
            prompt: prompt.into(),
            image,
            options: PromptOptions::default(),
            max_new_tokens: 64,
            sampling: Sampling::default(),
            stop_on_eos: true,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    /// The model's context (`max_position_embeddings`) is full.
    Context,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: Prompt,
    /// New tokens, the EOS token included when it stopped there.
    pub tokens: Vec<u32>,
    /// New tokens decoded, special tokens skipped.
    pub text: String,
    pub stop: StopReason,
    /// Wall time of the (batched) prefill and of the decode steps, seconds.
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// A prompt ready for the language model: ids, segments and input embeddings.
pub struct Prepared {
    pub prompt: Prompt,
    /// `[positions, hidden]`, image features merged in.
    pub embeds: Vec<f32>,
}

/// Runs requests against a model. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    model: Arc<Model>,
}

impl Engine {
    pub fn new(model: Arc<Model>) -> Self {
        Engine { model }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Tokenizes the prompt, encodes the image and merges its features into the embeddings.
    pub fn prepare(&self, req: &Request) -> Result<Prepared> {
        let m = &*self.model;
        let slot = match (&m.vision, &req.image) {
            (Some(v), Some(_)) => {
                let id = v.config.image_token_id;
                let token = m.tokenizer.id_to_token(id).ok_or_else(|| {
                    Error::Prompt(format!("the tokenizer has no image token id {id}"))
                })?;
                Some(ImageSlot {
                    token,
                    count: v.image_tokens(),
                })
            }
            (None, Some(_)) => {
                return Err(Error::Prompt(
                    "an image was given but the model has no vision tower".into(),
                ));
            }
            _ => None,
        };
        let ctx = m.lm.config.max_position_embeddings;
        // A plain language model has no LLaVA chat template: its text goes in verbatim.
        let opts = if m.vision.is_some() {
            req.options.clone()
        } else {
            PromptOptions {
                raw: true,
                ..req.options.clone()
            }
        };
        let prompt = template::build_prompt(&m.tokenizer, &req.prompt, slot.as_ref(), &opts, ctx)?;
        let mut embeds = m.lm.embed(&prompt.ids)?;
        if let (Some(v), Some(img)) = (&m.vision, &req.image) {
            let pixels = self.pixels(img, req.options.pad_to_square)?;
            v.merge(&prompt.ids, &mut embeds, &v.forward(&pixels)?)?;
        }
        Ok(Prepared { prompt, embeds })
    }

    /// `pixel_values` of one image: preprocessed from a file, or checked when given directly.
    fn pixels(&self, img: &ImageInput, pad_to_square: bool) -> Result<Vec<f32>> {
        let m = &*self.model;
        let (Some(v), Some(proc)) = (&m.vision, &m.image_processor) else {
            return Err(Error::Prompt("the model has no vision tower".into()));
        };
        let c = &v.config.vision;
        let want = [c.num_channels, c.image_size, c.image_size];
        let t = match img {
            ImageInput::Pixels(p) => Tensor::from_f32(&[p.len()], p.clone())?,
            ImageInput::Path(path) => {
                let rgb = image::load_image(path)?;
                let proc = ImageProcessorConfig {
                    pad_to_square,
                    ..proc.clone()
                };
                proc.preprocess(&rgb).map_err(|e| match e {
                    Error::Image { msg, .. } => Error::Image {
                        path: path.clone(),
                        msg,
                    },
                    e => e,
                })?
            }
        };
        if t.len() != want.iter().product::<usize>() {
            return Err(Error::Shape {
                name: "pixel_values".into(),
                expected: want.to_vec(),
                got: t.shape().to_vec(),
            });
        }
        Ok(t.into_f32_vec())
    }

    /// Runs the whole prompt of each prepared request through the LM (rows batched), filling the
    /// caches; returns the last hidden states `[total positions, hidden]` before the final norm.
    pub fn prefill(&self, prepared: &[Prepared], caches: &mut [KvCache]) -> Result<Vec<f32>> {
        let lm = &self.model.lm;
        let mut x: Vec<f32> = prepared
            .iter()
            .flat_map(|p| p.embeds.iter().copied())
            .collect();
        let seqs: Vec<SeqRows> = prepared
            .iter()
            .map(|p| SeqRows {
                positions: (0..p.prompt.ids.len()).collect(),
            })
            .collect();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        for l in 0..lm.num_layers() {
            lm.layer_forward(l, &mut x, &seqs, &mut refs)?;
        }
        Ok(x)
    }

    /// Logits of every prompt position, `[positions, vocab]`, and the prompt.
    pub fn prompt_logits(&self, req: &Request) -> Result<(Prompt, Vec<f32>)> {
        let p = self.prepare(req)?;
        let mut caches = vec![KvCache::new(self.model.lm.num_layers())];
        let x = self.prefill(std::slice::from_ref(&p), &mut caches)?;
        Ok((p.prompt, self.model.lm.logits(&x)?))
    }

    /// Generates for a batch of requests; prefill and each decode step run the batch together.
    pub fn generate(&self, reqs: &[Request]) -> Result<Vec<Generation>> {
        for (i, r) in reqs.iter().enumerate() {
            let s = r.sampling;
            if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
                return Err(Error::arg(
                    "temperature",
                    format!("request {i}: must be >= 0, got {}", s.temperature),
                ));
            }
            if !(s.top_p > 0.0 && s.top_p <= 1.0) {
                return Err(Error::arg(
                    "top_p",
                    format!("request {i}: must be in (0, 1], got {}", s.top_p),
                ));
            }
        }
        let lm = &self.model.lm;
        let vocab = lm.config.vocab_size;
        let ctx = lm.config.max_position_embeddings;
        let eos = &lm.config.eos_token_ids;
        let prepared = reqs
            .iter()
            .map(|r| self.prepare(r))
            .collect::<Result<Vec<_>>>()?;
        let t0 = Instant::now();
        let mut caches: Vec<KvCache> = reqs.iter().map(|_| KvCache::new(lm.num_layers())).collect();
        let x = self.prefill(&prepared, &mut caches)?;
        let h = lm.config.hidden_size;
        let mut last = Vec::with_capacity(reqs.len() * h);
        let mut end = 0;
        for p in &prepared {
            end += p.prompt.ids.len();
            last.extend_from_slice(&x[(end - 1) * h..end * h]);
        }
        let mut logits = lm.logits(&last)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut rngs: Vec<StdRng> = reqs
            .iter()
            .map(|r| StdRng::seed_from_u64(r.sampling.seed))
            .collect();
        let mut out: Vec<Vec<u32>> = vec![vec![]; reqs.len()];
        let mut stop: Vec<Option<StopReason>> = vec![None; reqs.len()];
        let mut active: Vec<usize> = (0..reqs.len()).collect();
        loop {
            // Sample one token for every active sequence from its row of `logits`.
            for (row, &i) in active.iter().enumerate() {
                let r = &reqs[i];
                if r.max_new_tokens == 0 {
                    stop[i] = Some(StopReason::MaxTokens);
                    continue;
                }
                let tok = sample(
                    &logits[row * vocab..(row + 1) * vocab],
                    &r.sampling,
                    &mut rngs[i],
                );
                out[i].push(tok);
                let pos = prepared[i].prompt.ids.len() + out[i].len();
                stop[i] = if r.stop_on_eos && eos.contains(&tok) {
                    Some(StopReason::Eos)
                } else if out[i].len() >= r.max_new_tokens {
                    Some(StopReason::MaxTokens)
                } else if pos >= ctx {
                    Some(StopReason::Context)
                } else {
                    None
                };
            }
            active.retain(|&i| stop[i].is_none());
            if active.is_empty() {
                break;
            }
            let ids: Vec<u32> = active
                .iter()
                .map(|&i| *out[i].last().unwrap_or(&0))
                .collect();
            let mut x = lm.embed(&ids)?;
            let seqs: Vec<SeqRows> = active
                .iter()
                .map(|&i| SeqRows {
                    positions: vec![prepared[i].prompt.ids.len() + out[i].len() - 1],
                })
                .collect();
            let mut refs: Vec<&mut KvCache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| stop[*i].is_none())
                .map(|(_, c)| c)
                .collect();
            for l in 0..lm.num_layers() {
                lm.layer_forward(l, &mut x, &seqs, &mut refs)?;
            }
            logits = lm.logits(&x)?;
        }
        let decode_secs = t1.elapsed().as_secs_f64();
        prepared
            .into_iter()
            .zip(out)
            .zip(stop)
            .map(|((p, tokens), stop)| {
                Ok(Generation {
                    text: self.model.tokenizer.decode(&tokens, true)?,
                    prompt: p.prompt,
                    tokens,
                    stop: stop.unwrap_or(StopReason::MaxTokens),
                    prefill_secs,
                    decode_secs,
                })
            })
            .collect()
    }
}

/// Picks the next token from one row of logits: argmax when `temperature == 0`, otherwise a draw
/// from `softmax(logits / temperature)` restricted to the smallest set of most likely tokens whose
/// probability reaches `top_p` (HF's temperature then top-p warpers).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, ((v - max) / s.temperature).exp()))
        .collect();
    let z: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut cum = 0.0;
    let mut keep = probs.len();
    for (k, p) in probs.iter().enumerate() {
        cum += p.1;
        if cum >= s.top_p {
            keep = k + 1;
            break;
        }
    }
    let kept = &probs[..keep];
    let total: f32 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f32>() * total;
    for p in kept {
        if u < p.1 {
            return p.0;
        }
        u -= p.1;
    }
    kept[keep - 1].0
}
