//! The generation loop: prompt building, vision encoding, batched prefill, KV-cached decoding and
//! sampling (greedy, or seeded temperature + top-p); the step-level [`Batch`] (continuous
//! batching) and the [`Scheduler`] thread that streams each request's tokens.

mod scheduler;
mod text;

pub use scheduler::{Event, Load, Scheduler, Stream};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::anyres::VisualToken;
use crate::model::anyres::{self, ImageSize};
use crate::model::chat::{self, ChatMessage, ChatPart};
use crate::model::flops::lm_layer_flops;
use crate::model::image::{ImageProcessorConfig, load_image, load_image_from_memory};
use crate::model::llama::{KvCache, SeqRows};
use crate::model::llava::ImagePixels;
use crate::model::template::{self, ImageSlot, Prompt, PromptOptions};
use crate::ops::check_finite;
use crate::prune::metrics::{self, RunStats, StageReport, TileKept};
use crate::prune::score::{Ranking, SelectedAttention};
use crate::prune::sparsevlm;
use crate::prune::{PrunePlan, RankLayer, Scorer, Segment};
use crate::tensor::Tensor;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use text::TextStream;

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
    /// An encoded PNG/JPEG (an upload, a data URL's bytes), preprocessed like a file.
    Bytes(Vec<u8>),
    /// Already preprocessed `pixel_values`, `[channels, size, size]` (LLaVA-1.5).
    Pixels(Vec<f32>),
    /// Already preprocessed LLaVA-NeXT tiles, `[tiles, channels, size, size]` (the base image
    /// first, as `LlavaNextImageProcessor` writes `pixel_values`), with the image's
    /// `(height, width)` (its `image_sizes`).
    Tiles {
        pixels: Vec<f32>,
        image_size: (usize, usize),
    },
}

/// One prompt to run: a question (LLaVA-1.5's `USER: <image>\n{question} ASSISTANT:`, one
/// image at most; for LLaVA-NeXT, one user turn of the model's chat template), or a chat
/// rendered with the model's own template ([`Request::chat`]).
#[derive(Debug, Clone)]
pub struct Request {
    /// The question (empty when `messages` are given).
    pub prompt: String,
    /// A chat: messages with roles, text and image parts, rendered with the model's chat
    /// template ([`Model::chat_template`]) exactly as transformers' `apply_chat_template`
    /// renders it. Empty for a question.
    pub messages: Vec<ChatMessage>,
    /// The images in order: of the question (at most one), or of the chat's image parts.
    pub images: Vec<ImageInput>,
    pub options: PromptOptions,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop at the model's end-of-sequence token (on by default).
    pub stop_on_eos: bool,
    /// More token ids that end generation when sampled (kept in `tokens`, not in `text`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation as soon as the text contains one; the text ends before it.
    /// Checked after every token, so compute stops there.
    pub stop: Vec<String>,
    /// Visual token pruning for this request (`None`: the full sequence everywhere).
    pub prune: Option<PrunePlan>,
    /// Keep the logits each new token was chosen from ([`Generation::step_logits`]).
    pub return_logits: bool,
}

impl Request {
    /// A greedy request for `prompt` with an optional image, up to 64 new tokens.
    pub fn new(prompt: impl Into<String>, image: Option<ImageInput>) -> Self {
        Request {
            prompt: prompt.into(),
            messages: Vec::new(),
            images: image.into_iter().collect(),
            options: PromptOptions::default(),
            max_new_tokens: 64,
            sampling: Sampling::default(),
            stop_on_eos: true,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            prune: None,
            return_logits: false,
        }
    }
}

impl Request {
    /// A greedy request for a chat (its [`ChatPart::Image`] parts take `images` in order), up
    /// to 64 new tokens.
    pub fn chat(messages: Vec<ChatMessage>, images: Vec<ImageInput>) -> Self {
        Request {
            messages,
            images,
            ..Request::new("", None)
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    /// One of [`Request::stop_token_ids`].
    StopToken,
    /// One of [`Request::stop`] appeared in the text.
    StopString,
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
    /// New tokens decoded, special tokens skipped, ending before a stop string; the
    /// concatenation of the streamed texts.
    pub text: String,
    pub stop: StopReason,
    /// Token counts per layer, pruning stages, FLOPs.
    pub stats: RunStats,
    /// With [`Request::return_logits`]: the `[vocab]` logits each new token was chosen from.
    pub step_logits: Vec<Vec<f32>>,
    /// Wall time of the (batched) prefill and of the decode steps, seconds.
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub metrics: RequestMetrics,
}

/// What one request cost and waited, measured by the [`Batch`] that ran it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestMetrics {
    /// Checking and preparing it: tokenizing, decoding the images, the vision tower.
    pub prepare_secs: f64,
    /// From prepared to admitted into a step.
    pub queue_secs: f64,
    /// From arrival ([`Engine::ready`]) to its first token: preparation (vision encoding
    /// included), queue and the prefill step.
    pub ttft_secs: f64,
    /// Tokens after the first per second of the steps that decoded them (0 with one token).
    pub decode_tokens_per_sec: f64,
    /// Image tokens of the prompt, and those left in the last layer after pruning.
    pub image_tokens: usize,
    pub image_tokens_kept: usize,
    /// Bytes its KV cache held at the end (a pruned cache is the smaller size it is).
    pub kv_bytes: usize,
}

/// A prompt ready for the language model: ids, segments and input embeddings.
pub struct Prepared {
    pub prompt: Prompt,
    /// `[positions, hidden]` on the model's device, image features merged in.
    pub embeds: Tensor,
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

    /// Builds the prompt (the question in LLaVA-1.5's format, or the chat through the model's
    /// template), tokenizes it, encodes the images and merges their features into the
    /// embeddings.
    pub fn prepare(&self, req: &Request) -> Result<Prepared> {
        let m = &*self.model;
        let ctx = m.lm.config.max_position_embeddings;
        if !req.images.is_empty() && m.vision.is_none() {
            return Err(Error::Prompt(
                "an image was given but the model has no vision tower".into(),
            ));
        }
        // A reduction before the LM.
        let reduce = req.prune.as_ref().and_then(|p| p.before_lm);
        // The model's image slot: `<image>` and how many tokens it expands to (LLaVA-NeXT, or a
        // reduction before the LM: one, expanded below once each image's count is known).
        let slot = match &m.vision {
            Some(v) => {
                let id = v.config.image_token_id;
                let token = m.tokenizer.id_to_token(id).ok_or_else(|| {
                    Error::Prompt(format!("the tokenizer has no image token id {id}"))
                })?;
                let count = if v.config.is_anyres() || reduce.is_some() {
                    1
                } else {
                    v.image_tokens()
                };
                Some(ImageSlot { token, count })
            }
            None => None,
        };
        let mut prompt = if req.messages.is_empty() {
            if req.images.len() > 1 {
                return Err(Error::Prompt(format!(
                    "a question takes one image, {} were given (a chat takes several)",
                    req.images.len()
                )));
            }
            let slot = slot.filter(|_| !req.images.is_empty());
            // A plain language model has no LLaVA chat template: its text goes in verbatim.
            let opts = match m.vision.is_some() {
                true => req.options.clone(),
                false => PromptOptions {
                    raw: true,
                    ..req.options.clone()
                },
            };
            // LLaVA-NeXT checkpoints prompt in their LM's own format (Vicuna's `USER:`, Mistral's
            // `[INST]`): a question is one user turn (the image, then the text) of the model's
            // chat template, after the system prompt when one is given.
            let next = m.vision.as_ref().is_some_and(|v| v.config.is_anyres());
            match (&m.chat_template, next && !opts.raw) {
                (Some(template), true) => {
                    let mut content: Vec<ChatPart> = slot.iter().map(|_| ChatPart::Image).collect();
                    content.push(ChatPart::Text(req.prompt.clone()));
                    let system = opts.system.iter().map(|s| ChatMessage::new("system", s));
                    let user = ChatMessage {
                        role: "user".into(),
                        content,
                    };
                    let msgs: Vec<ChatMessage> = system.chain([user]).collect();
                    chat::chat_prompt(template, &m.tokenizer, &msgs, slot.as_ref(), ctx)?
                }
                _ => template::build_prompt(&m.tokenizer, &req.prompt, slot.as_ref(), &opts, ctx)?,
            }
        } else {
            if !req.prompt.is_empty() {
                return Err(Error::arg(
                    "prompt",
                    "give a question or chat messages, not both",
                ));
            }
            let template = m.chat_template.as_ref().ok_or_else(|| {
                Error::Prompt(
                    "the model has no chat template (chat_template.json, chat_template.jinja, \
                     tokenizer_config.json or GGUF metadata); send a question instead"
                        .into(),
                )
            })?;
            let parts = (req.messages.iter().flat_map(|msg| &msg.content))
                .filter(|p| matches!(p, ChatPart::Image))
                .count();
            if parts != req.images.len() {
                return Err(Error::Prompt(format!(
                    "the chat has {parts} image part(s) but {} image(s) were given",
                    req.images.len()
                )));
            }
            chat::chat_prompt(template, &m.tokenizer, &req.messages, slot.as_ref(), ctx)?
        };
        // The images' features, the prompt expanded to their counts first where they vary.
        let mut image_features = None;
        if let (Some(v), false) = (&m.vision, req.images.is_empty()) {
            let images = (req.images.iter().enumerate())
                .map(|(i, img)| self.pixels(i, img, req.options.pad_to_square))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<ImagePixels> = images
                .iter()
                .map(|(px, size)| (px.as_slice(), *size))
                .collect();
            let mut counts = Vec::with_capacity(images.len());
            let features = match reduce {
                // Fewer rows per image: the reduction's, each of a tile and maybe a patch.
                Some(r) => {
                    let (features, shows) = v.forward_reduced(&m.params, &refs, &r)?;
                    for (i, rows) in shows.into_iter().enumerate() {
                        counts.push(rows.len());
                        for (tile, patch) in rows {
                            prompt.visual.push(VisualToken::Patch { image: i, tile });
                            prompt.patches.push(patch);
                        }
                    }
                    features
                }
                None => {
                    for (i, (_, size)) in images.iter().enumerate() {
                        let tokens = v.visual_tokens(i, *size)?;
                        counts.push(tokens.len());
                        prompt.visual.extend(tokens);
                    }
                    v.forward_images(&m.params, &refs)?
                }
            };
            if v.config.is_anyres() || reduce.is_some() {
                prompt = prompt.expand_images(v.config.image_token_id, &counts, ctx)?;
            }
            image_features = Some((v, features));
        }
        let mut embeds = m.lm.embed(&m.params, &prompt.ids)?;
        if let Some((v, features)) = image_features {
            embeds = v.merge(&prompt.ids, &embeds, &features)?;
        }
        Ok(Prepared { prompt, embeds })
    }

    /// `pixel_values` of image `i` (all its tiles: one for LLaVA-1.5, the base image and the
    /// grid's for LLaVA-NeXT) and, for LLaVA-NeXT, the image's `(height, width)`: preprocessed
    /// from a file or bytes, or checked when given directly.
    fn pixels(
        &self,
        i: usize,
        img: &ImageInput,
        pad_to_square: bool,
    ) -> Result<(Vec<f32>, Option<ImageSize>)> {
        let m = &*self.model;
        let (Some(v), Some(proc)) = (&m.vision, &m.image_processor) else {
            return Err(Error::Prompt("the model has no vision tower".into()));
        };
        let pins = v.config.image_grid_pinpoints.as_deref();
        let proc = ImageProcessorConfig {
            pad_to_square,
            ..proc.clone()
        };
        if pins.is_some() && pad_to_square {
            return Err(Error::arg(
                "pad_to_square",
                "is LLaVA-1.5's; LLaVA-NeXT tiles the image at its own aspect ratio",
            ));
        }
        // A decoded image through the model's processor; errors name it `name`.
        let preprocess = |rgb: image::RgbImage, name: PathBuf| {
            let size = (rgb.height() as usize, rgb.width() as usize);
            let t = match pins {
                Some(pins) => anyres::preprocess(&proc, &rgb, pins),
                None => proc.preprocess(&rgb),
            };
            let t = t.map_err(|e| match e {
                Error::Image { msg, .. } => Error::Image { path: name, msg },
                e => e,
            })?;
            Ok::<_, Error>((t.into_f32_vec()?, pins.map(|_| size)))
        };
        let c = &v.config.vision;
        let s = c.image_size.max(1);
        // Names a row of the given pixel values: `(tile, )channel, row`.
        let check = |p: &[f32], tiled: bool| {
            let ch = c.num_channels.max(1);
            check_finite(p, s, |r| match tiled {
                true => format!(
                    "the given pixel_values (tile {}, channel {}, row {})",
                    r / s / ch,
                    r / s % ch,
                    r % s
                ),
                false => format!("the given pixel_values (channel {}, row {})", r / s, r % s),
            })
        };
        let (px, size) = match img {
            ImageInput::Pixels(p) => {
                if pins.is_some() {
                    return Err(Error::arg(
                        "image",
                        "LLaVA-NeXT tiles each image by its size: give the image (a file or \
                         bytes), or its tiles with the size (ImageInput::Tiles)",
                    ));
                }
                check(p, false)?;
                (p.clone(), None)
            }
            ImageInput::Tiles { pixels, image_size } => {
                if pins.is_none() {
                    return Err(Error::arg(
                        "image",
                        "tiles are LLaVA-NeXT's input; this model takes one image's \
                         pixel_values (ImageInput::Pixels)",
                    ));
                }
                check(pixels, true)?;
                (pixels.clone(), Some(*image_size))
            }
            ImageInput::Path(path) => {
                // A file the request names that is not there is the request's fault.
                let rgb = load_image(path).map_err(|e| match e {
                    Error::Io { path, source } => Error::Image {
                        path,
                        msg: source.to_string(),
                    },
                    e => e,
                })?;
                preprocess(rgb, path.clone())?
            }
            ImageInput::Bytes(bytes) => {
                let name = PathBuf::from(format!("<image {i}>"));
                let rgb = load_image_from_memory(bytes).map_err(|e| match e {
                    Error::Image { msg, .. } => Error::Image {
                        path: name.clone(),
                        msg,
                    },
                    e => e,
                })?;
                preprocess(rgb, name)?
            }
        };
        let want = [v.tiles(size)?, c.num_channels, c.image_size, c.image_size];
        if px.len() != want.iter().product::<usize>() {
            return Err(Error::arg(
                "pixel_values",
                format!("image {i} has {} values, expected {want:?}", px.len()),
            ));
        }
        Ok((px, size))
    }

    /// Runs the prompts of `prepared` through the LM together (rows batched), pruning each one by
    /// its plan, filling `caches`. Returns the final hidden states of every row that reached the
    /// last layer (`[rows, hidden]`, before the final norm) and each sequence's state.
    fn prefill(
        &self,
        prepared: &[Prepared],
        plans: &[Option<&PrunePlan>],
        caches: &mut [KvCache],
    ) -> Result<(Tensor, Vec<SeqState>)> {
        let lm = &self.model.lm;
        let mut states = prepared
            .iter()
            .zip(plans)
            .enumerate()
            .map(|(i, (p, plan))| SeqState::new(i as u64, &p.prompt, *plan, lm.num_layers()))
            .collect::<Result<Vec<_>>>()?;
        let x = match prepared {
            [one] => one.embeds.clone(),
            _ => Tensor::cat_rows(&prepared.iter().map(|p| &p.embeds).collect::<Vec<_>>())?,
        };
        let x = self.forward(
            x,
            &mut states.iter_mut().collect::<Vec<_>>(),
            &mut caches.iter_mut().collect::<Vec<_>>(),
        )?;
        if let Some(e) = states.iter_mut().find_map(|s| s.error.take()) {
            return Err(e);
        }
        Ok((x, states))
    }

    /// One forward of a ragged batch through every decoder layer: each sequence either prefills
    /// (all its prompt rows, image tokens pruned by its plan) or decodes (its one new token), its
    /// rows in `x` in order, appending to its cache. Returns the rows that reached the last layer
    /// (before the final norm); the prefilling sequences' statistics are filled in.
    ///
    /// It runs on a thread of rayon's pool: the CPU ops' parallel loops then split work among
    /// the pool's threads directly, instead of each waking the pool from outside and blocking
    /// on it (hundreds of times per decoded token).
    fn forward(
        &self,
        x: Tensor,
        states: &mut [&mut SeqState],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        rayon::scope(|_| self.forward_layers(x, states, caches))
    }

    fn forward_layers(
        &self,
        mut x: Tensor,
        states: &mut [&mut SeqState],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let lm = &self.model.lm;
        let c = &lm.config;
        let h = c.hidden_size;
        choose_raters(&x, states)?;
        for l in 0..lm.num_layers() {
            for st in states.iter_mut().filter(|st| st.decoding.is_none()) {
                st.record_layer();
            }
            let prunes = states.iter().any(|st| st.stage_at(l + 1).is_some());
            let x_in = prunes.then(|| x.clone());
            let seqs: Vec<SeqRows> = states
                .iter()
                .map(|st| SeqRows {
                    positions: st.layer_positions(l),
                })
                .collect();
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().map(|c| &mut **c).collect();
            let lses = lm.layer_forward(&self.model.params, l, &mut x, &seqs, &mut refs, prunes)?;
            fail_nonfinite(&x, states, |origin| {
                format!("the output of decoder layer {l} ({origin})")
            })?;
            let Some(x_in) = x_in else { continue };
            // Rank and drop image tokens of the sequences with a stage at layer l + 1; the kept
            // rows of the whole batch are gathered on the device at the end.
            let mut next: Vec<usize> = Vec::with_capacity(x.rows());
            let mut extra: Vec<f32> = vec![];
            let mut r0 = 0;
            for ((st, cache), lse) in states.iter_mut().zip(caches.iter()).zip(&lses) {
                let n = st.rows();
                let rows = r0..r0 + n;
                r0 += n;
                let Some((budget, plan)) = st.stage_at(l + 1).filter(|_| st.error.is_none()) else {
                    next.extend(rows);
                    continue;
                };
                let plan = &plan;
                let t_rank = Instant::now();
                let (image_cols, ranking, kept_rows, bytes) = match plan.scorer {
                    // No attention: layer l's output through the final norm and its keys.
                    Scorer::Dart(dart) => {
                        let image_cols = plan.targets(&st.segments).1;
                        let last = image_cols.last().map_or(n, |&r| r + 1);
                        let text_rows: Vec<usize> = (last..n).collect();
                        let normed = lm
                            .final_norm(&self.model.params, &x.narrow_rows(rows.start, n)?)?
                            .to_vec_f32()?;
                        let keys = cache.layers[l].k.to_vec_f32()?;
                        let (kept, importance) = dart.select(
                            (&keys, &normed),
                            (lm.kv_width(), h),
                            &image_cols,
                            &text_rows,
                            budget,
                        );
                        let ranking = Ranking {
                            query_weights: vec![],
                            query_rows: vec![],
                            head_scores: vec![],
                            head_weights: vec![],
                            importance,
                            kept,
                            recycle: vec![],
                        };
                        let kept_rows = plan.survivors(&image_cols, &ranking.kept, n);
                        let bytes = 4 * (keys.len() + normed.len());
                        (image_cols, ranking, kept_rows, bytes)
                    }
                    Scorer::Attention | Scorer::Random(_) | Scorer::SparseVlm(_) => {
                        let (mut q_rows, image_cols) = plan.targets(&st.segments);
                        if let Scorer::SparseVlm(_) = plan.scorer {
                            q_rows = st.rater_rows();
                        }
                        // FastV: layer l's attention (its input, its cached keys); PyramidDrop:
                        // layer l + 1's projections of its input, layer l's output.
                        let (src, at) = match plan.rank_layer {
                            RankLayer::Previous => (&x_in, l),
                            RankLayer::Next => (&x, l + 1),
                        };
                        let x_sel = src.gather_rows(
                            &q_rows.iter().map(|&r| rows.start + r).collect::<Vec<_>>(),
                        )?;
                        let pos: Vec<usize> = q_rows.iter().map(|&r| st.positions[r]).collect();
                        let q = lm.query_rows(&self.model.params, at, &x_sel, &pos)?;
                        let own_keys = match plan.rank_layer {
                            RankLayer::Previous => None,
                            RankLayer::Next => Some(lm.key_rows(
                                &self.model.params,
                                at,
                                &x.narrow_rows(rows.start, n)?,
                                &st.positions,
                            )?),
                        };
                        let keys = own_keys.as_ref().unwrap_or(&cache.layers[l].k);
                        let heads = c.num_attention_heads;
                        // The backend's log-sum-exps are layer l's own (FastV only).
                        let lse_sel = lse
                            .as_deref()
                            .filter(|_| plan.rank_layer == RankLayer::Previous)
                            .map(|lse| lse_rows(lse, heads, n, &q_rows))
                            .transpose()?;
                        let att = SelectedAttention {
                            heads,
                            probs: q.backend().selected_probs(
                                &q,
                                keys,
                                &q_rows,
                                &image_cols,
                                heads,
                                c.num_key_value_heads,
                                lse_sel.as_deref(),
                            )?,
                            rows: q_rows,
                            image_cols,
                            positions: n,
                        };
                        let newlines = st.newlines(&att.image_cols);
                        // Ranked to the stage's budget (SparseVLM's merged tokens come on top).
                        let (ranking, kept_rows) =
                            plan.select(&st.segments, &att, budget, n, &newlines);
                        let bytes = att.nbytes() + x_sel.nbytes() + q.nbytes();
                        (att.image_cols, ranking, kept_rows, bytes)
                    }
                };
                let cost = (t_rank.elapsed().as_secs_f64(), bytes);
                let kept_image_rows: Vec<usize> = ranking
                    .kept
                    .iter()
                    .map(|&k| rows.start + image_cols[k])
                    .collect();
                let kept_states = x.gather_rows(&kept_image_rows)?.to_vec_f32()?;
                let kept_states: Vec<&[f32]> = kept_states.chunks(h.max(1)).collect();
                let diversity = metrics::mean_cosine_distance(&kept_states);
                // SparseVLM's merged rows go after the batch's own, gathered in place below.
                let first = x.rows() + extra.len() / h.max(1);
                let Recycled {
                    meta,
                    gather,
                    members,
                    rows: merged,
                } = match plan.scorer {
                    Scorer::SparseVlm(sv) if !ranking.recycle.is_empty() => {
                        let ranked = (image_cols.as_slice(), &ranking);
                        recycle(&x, rows.start, st, ranked, &kept_rows, sv, first)?
                    }
                    _ => Recycled::none(&kept_rows, rows.start),
                };
                extra.extend(merged);
                next.extend(gather);
                st.apply_stage(
                    l + 1,
                    plan,
                    &image_cols,
                    ranking,
                    (meta, members),
                    (cost.0, cost.1, diversity),
                );
            }
            x = match extra.is_empty() {
                true => x.gather_rows(&next)?,
                false => {
                    let merged = Tensor::from_f32(&[extra.len() / h, h], extra)?
                        .to_dtype(x.dtype())?
                        .to_device(&x.device())?;
                    Tensor::cat_rows(&[&x, &merged])?.gather_rows(&next)?
                }
            };
        }
        let v = self.model.vision.as_ref();
        for st in states.iter_mut().filter(|st| st.decoding.is_none()) {
            st.stats.tiles = st.tile_report();
            // The tower runs once per tile (one per image for LLaVA-1.5).
            let tiles = (st.stats.tiles.iter())
                .filter(|t| matches!(t.part, VisualToken::Patch { .. }))
                .count();
            let vision = v.map_or(0.0, |v| tiles as f64 * v.flops());
            let head = 2.0 * (h * c.vocab_size) as f64;
            let ns = &st.stats.tokens_per_layer;
            st.stats.prefill_flops = vision
                + head
                + ns.iter()
                    .map(|&n| lm_layer_flops(c, n, n * (n + 1) / 2))
                    .sum::<f64>();
            st.stats.decode_flops =
                head + ns.iter().map(|&n| lm_layer_flops(c, 1, n + 1)).sum::<f64>();
        }
        Ok(x)
    }

    /// Runs the prefill of already prepared inputs (your own ids, segments and embeddings), each
    /// with its plan, and returns each request's statistics; the KV caches are dropped.
    pub fn prefill_prepared(
        &self,
        prepared: &[Prepared],
        plans: &[Option<&PrunePlan>],
    ) -> Result<Vec<RunStats>> {
        if prepared.len() != plans.len() {
            return Err(Error::arg(
                "plans",
                format!("{} plans for {} inputs", plans.len(), prepared.len()),
            ));
        }
        let mut caches: Vec<KvCache> = prepared
            .iter()
            .map(|_| KvCache::new(self.model.lm.num_layers()))
            .collect();
        let (_, states) = self.prefill(prepared, plans, &mut caches)?;
        Ok(states.into_iter().map(|s| s.stats).collect())
    }

    /// Prefill logits of one request: every row that reached the last layer (all prompt positions
    /// unless pruned), with the prompt positions they belong to.
    pub fn prompt_logits(&self, req: &Request) -> Result<PromptLogits> {
        let p = self.prepare(req)?;
        let mut caches = vec![KvCache::new(self.model.lm.num_layers())];
        let (x, mut states) =
            self.prefill(std::slice::from_ref(&p), &[req.prune.as_ref()], &mut caches)?;
        let st = states.remove(0);
        let logits = self.model.lm.logits(&self.model.params, &x)?.to_vec_f32()?;
        check_finite(&logits, self.model.lm.config.vocab_size, |r| {
            format!("the prompt logits at prompt position {}", st.orig[r])
        })?;
        Ok(PromptLogits {
            logits,
            prompt: p.prompt,
            positions: st.orig,
            stats: st.stats,
        })
    }

    /// Generates for a batch of requests: [`Engine::batch`] with every request added before the
    /// first step, stepped until all are done, so the prefill and each decode step run the
    /// requests together, each pruned by its own plan. Every request is checked and prepared
    /// before any runs; a request that fails while running is the error (the first in order).
    pub fn generate(&self, reqs: &[Request]) -> Result<Vec<Generation>> {
        for (i, r) in reqs.iter().enumerate() {
            check_request(r).map_err(|e| match e {
                Error::Arg { name, msg } => Error::arg(name, format!("request {i}: {msg}")),
                e => e,
            })?;
        }
        let mut batch = self.batch();
        for r in reqs {
            batch.add(r.clone())?;
        }
        while !batch.is_idle() {
            batch.step()?;
        }
        let mut done = batch.take_finished();
        done.sort_by_key(|(id, _)| *id);
        done.into_iter().map(|(_, g)| g).collect()
    }

    /// Checks and prepares a request so that it can join a [`Batch`]: its sampling, stop
    /// strings, prompt (length included), images (decoded and through the vision tower) and
    /// prune plan. An error here is the request's own ([`Error::is_client_error`] tells) and
    /// nothing of it has run; its clock ([`RequestMetrics`]) starts here. This is the costly part
    /// of joining, so a server calls it on the request's own thread, not the stepping one.
    pub fn ready(&self, req: Request) -> Result<Ready> {
        let arrived = Instant::now();
        check_request(&req)?;
        let layers = self.model.lm.num_layers();
        let prepared = self.prepare(&req)?;
        let state = SeqState::new(0, &prepared.prompt, req.prune.as_ref(), layers)?;
        Ok(Ready(Slot {
            id: 0,
            rng: StdRng::seed_from_u64(req.sampling.seed),
            text: TextStream::new(req.stop.clone()),
            req,
            prompt: prepared.prompt,
            embeds: Some(prepared.embeds),
            state,
            cache: KvCache::new(layers),
            tokens: Vec::new(),
            step_logits: Vec::new(),
            stop: None,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            clock: Clock {
                arrived,
                ready: Instant::now(),
                admitted: None,
                first_token: None,
            },
        }))
    }

    /// An empty continuous batch over this engine ([`Batch`]).
    pub fn batch(&self) -> Batch {
        Batch {
            engine: self.clone(),
            next_id: 0,
            waiting: Vec::new(),
            running: Vec::new(),
            finished: Vec::new(),
            budget: Budget::default(),
        }
    }
}

/// The checks of a request that need no model: sampling ranges and stop strings.
fn check_request(r: &Request) -> Result<()> {
    let s = &r.sampling;
    if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
        return Err(Error::arg(
            "temperature",
            format!("must be >= 0, got {}", s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::arg(
            "top_p",
            format!("must be in (0, 1], got {}", s.top_p),
        ));
    }
    if r.stop.iter().any(|s| s.is_empty()) {
        return Err(Error::arg("stop", "a stop string is empty"));
    }
    Ok(())
}

/// A request checked and prepared by [`Engine::ready`], ready to join a [`Batch`].
pub struct Ready(Slot);

impl Ready {
    /// The tokenized prompt.
    pub fn prompt(&self) -> &Prompt {
        &self.0.prompt
    }
}

/// A continuous batch, the step-level engine: requests join ([`Batch::add`]) and leave (when
/// they stop, or [`Batch::cancel`]) between steps, and each [`Batch::step`] prefills the newly
/// added requests and decodes one token for every running one, as one ragged batch through the
/// model, each request pruned by its own plan. It owns the requests' KV caches. A request that
/// fails on its own (a non-finite value in its rows) fails alone; the others go on.
pub struct Batch {
    engine: Engine,
    next_id: u64,
    waiting: Vec<Slot>,
    running: Vec<Slot>,
    finished: Vec<Slot>,
    budget: Budget,
}

/// What one [`Batch::step`] may take on: waiting requests are admitted in arrival order while
/// the step's rows (one per running request, every prompt row of those admitted) stay within
/// `step_tokens` and the KV caches, the running ones' plus each admitted one's worst case (its
/// prompt, pruned as its plan prunes, and `max_new_tokens` more), within `kv_bytes`. A request
/// that does not fit waits; one that could never fit runs when the batch is otherwise empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub step_tokens: usize,
    pub kv_bytes: usize,
}

impl Default for Budget {
    /// No limit.
    fn default() -> Self {
        Budget {
            step_tokens: usize::MAX,
            kv_bytes: usize::MAX,
        }
    }
}

/// What one step produced for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// The request ([`Batch::add`]'s id).
    pub id: u64,
    /// The token sampled.
    pub token: u32,
    /// The text it released ([`Generation::text`] is the concatenation): empty while a
    /// character is unfinished or the text may be the start of a stop string.
    pub text: String,
    /// Set when this was its last token; its [`Generation`] is then in [`Batch::take_finished`].
    pub stop: Option<StopReason>,
}

/// One request of a [`Batch`].
struct Slot {
    id: u64,
    req: Request,
    prompt: Prompt,
    /// The prompt's input embeddings, until it is prefilled.
    embeds: Option<Tensor>,
    state: SeqState,
    cache: KvCache,
    rng: StdRng,
    tokens: Vec<u32>,
    text: TextStream,
    step_logits: Vec<Vec<f32>>,
    stop: Option<StopReason>,
    prefill_secs: f64,
    decode_secs: f64,
    clock: Clock,
}

/// When a request arrived, was ready, was admitted and got its first token.
struct Clock {
    arrived: Instant,
    ready: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
}

impl Slot {
    /// Whether it leaves the batch: stopped, or failed.
    fn done(&self) -> bool {
        self.stop.is_some() || self.state.error.is_some()
    }

    /// Its result, with its metrics; its KV cache is freed.
    fn finish(mut self) -> (u64, Result<Generation>) {
        if let Some(e) = self.state.error.take() {
            return (self.id, Err(e));
        }
        let c = &self.clock;
        let since = |t: Option<Instant>, from: Instant| {
            t.map_or(0.0, |t| t.duration_since(from).as_secs_f64())
        };
        let decoded = self.tokens.len().saturating_sub(1);
        let metrics = RequestMetrics {
            prepare_secs: c.ready.duration_since(c.arrived).as_secs_f64(),
            queue_secs: since(c.admitted, c.ready),
            ttft_secs: since(c.first_token, c.arrived),
            decode_tokens_per_sec: match self.decode_secs > 0.0 {
                true => decoded as f64 / self.decode_secs,
                false => 0.0,
            },
            image_tokens: self.state.image_tokens,
            image_tokens_kept: self
                .state
                .stats
                .image_tokens_per_layer
                .last()
                .copied()
                .unwrap_or(0),
            kv_bytes: self.cache.nbytes(),
        };
        let g = Generation {
            text: self.text.text().to_string(),
            prompt: self.prompt,
            tokens: self.tokens,
            stop: self.stop.unwrap_or(StopReason::MaxTokens),
            stats: self.state.stats,
            step_logits: self.step_logits,
            prefill_secs: self.prefill_secs,
            decode_secs: self.decode_secs,
            metrics,
        };
        (self.id, Ok(g))
    }

    /// Takes the sampled `token` (`now` is when): its text, its stop reason.
    fn accept(&mut self, token: u32, now: Instant, model: &Model) -> Result<Update> {
        let c = &model.lm.config;
        let tokenizer = &model.tokenizer;
        self.tokens.push(token);
        self.clock.first_token.get_or_insert(now);
        let mut stop = if self.req.stop_on_eos && c.eos_token_ids.contains(&token) {
            Some(StopReason::Eos)
        } else if self.req.stop_token_ids.contains(&token) {
            Some(StopReason::StopToken)
        } else {
            None
        };
        let mut text = String::new();
        if stop.is_none() {
            let (t, stopped) = self.text.push(tokenizer, token)?;
            text = t;
            stop = stopped.then_some(StopReason::StopString);
        }
        let pos = self.state.prompt_len + self.tokens.len();
        stop = stop.or(if self.tokens.len() >= self.req.max_new_tokens {
            Some(StopReason::MaxTokens)
        } else if pos >= c.max_position_embeddings {
            Some(StopReason::Context)
        } else {
            None
        });
        if stop.is_some() && stop != Some(StopReason::StopString) {
            text.push_str(&self.text.finish(tokenizer)?);
        }
        self.stop = stop;
        self.state.decoding = Some(self.tokens.len() - 1);
        Ok(Update {
            id: self.id,
            token,
            text,
            stop,
        })
    }
}

impl Batch {
    /// [`Engine::ready`] then [`Batch::add_ready`]: an error is the request's own and nothing of
    /// it runs. Returns its id.
    pub fn add(&mut self, req: Request) -> Result<u64> {
        let ready = self.engine.ready(req)?;
        Ok(self.add_ready(ready))
    }

    /// Queues a prepared request for the next step; returns its id.
    pub fn add_ready(&mut self, ready: Ready) -> u64 {
        let mut slot = ready.0;
        slot.id = self.next_id;
        slot.state.request = slot.id;
        self.next_id += 1;
        self.waiting.push(slot);
        self.next_id - 1
    }

    /// Sets the admission limits of the following steps.
    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = budget;
    }

    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted and generating.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// The waiting requests the budget admits now, taken from the front of the queue.
    fn admit(&mut self) -> Vec<Slot> {
        let m = &self.engine.model;
        let (layers, kv_width) = (m.lm.num_layers(), m.lm.kv_width());
        // The KV cache holds activations: f32 on the CPU, the compute dtype on a GPU.
        let elem = match m.device().is_cpu() {
            true => 4,
            false => m.params.first().map_or(4, |p| p.value.dtype().size()),
        };
        let ctx = m.lm.config.max_position_embeddings;
        let worst = |s: &Slot| {
            // It generates at most max_new_tokens, and never past the context.
            let new = s
                .req
                .max_new_tokens
                .min(ctx.saturating_sub(s.state.prompt_len));
            let rows: usize = (0..layers).map(|l| s.state.rows_at(l) + new).sum();
            rows * 2 * kv_width * elem
        };
        let mut rows = self.running.len();
        let mut kv: usize = self.running.iter().map(worst).sum();
        let mut n = 0;
        for s in &self.waiting {
            let (r, k) = (rows + s.state.rows(), kv.saturating_add(worst(s)));
            let alone = self.running.is_empty() && n == 0;
            if !alone && (r > self.budget.step_tokens || k > self.budget.kv_bytes) {
                break;
            }
            (rows, kv, n) = (r, k, n + 1);
        }
        self.waiting.drain(..n).collect()
    }

    /// Whether no request waits or runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Cancels request `id` if it waits or runs: it leaves the batch and its KV cache is freed at
    /// once. Returns whether it was there.
    pub fn cancel(&mut self, id: u64) -> bool {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| s.id != id);
        self.running.retain(|s| s.id != id);
        before != self.waiting.len() + self.running.len()
    }

    /// Bytes of KV cache the batch holds (pruned caches count at their smaller size).
    pub fn kv_bytes(&self) -> usize {
        self.running.iter().map(|s| s.cache.nbytes()).sum()
    }

    /// One step: prefills every admitted waiting request and decodes one token for every
    /// running one, in one forward, then samples each one's next token. Returns an [`Update`]
    /// for each request that got a token; requests that stopped or failed alone move to
    /// [`Batch::take_finished`]. An error of the step itself (not of one request) fails every
    /// request in the step with [`Error::Step`] and is returned.
    pub fn step(&mut self) -> Result<Vec<Update>> {
        if self.is_idle() {
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        let mut admitted = self.admit();
        for s in &mut admitted {
            s.clock.admitted = Some(t0);
        }
        let model = self.engine.model.clone();
        let mut slots: Vec<&mut Slot> =
            self.running.iter_mut().chain(admitted.iter_mut()).collect();
        let updates = match self.engine.step_logits(&mut slots) {
            Ok(logits) => {
                let vocab = model.lm.config.vocab_size;
                let secs = t0.elapsed().as_secs_f64();
                let now = Instant::now();
                let mut updates = Vec::with_capacity(slots.len());
                for (row, s) in slots.iter_mut().enumerate() {
                    match s.state.decoding {
                        None => s.prefill_secs = secs,
                        Some(_) => s.decode_secs += secs,
                    }
                    if s.state.error.is_some() {
                        continue;
                    }
                    if s.req.max_new_tokens == 0 {
                        s.stop = Some(StopReason::MaxTokens);
                        continue;
                    }
                    let row_logits = &logits[row * vocab..(row + 1) * vocab];
                    if s.req.return_logits {
                        s.step_logits.push(row_logits.to_vec());
                    }
                    let token = sample(row_logits, &s.req.sampling, &mut s.rng);
                    match s.accept(token, now, &model) {
                        Ok(u) => updates.push(u),
                        Err(e) => s.state.error = Some(e),
                    }
                }
                Ok(updates)
            }
            Err(e) => {
                let msg = e.to_string();
                for s in slots {
                    s.state.error = Some(Error::Step(msg.clone()));
                }
                Err(e)
            }
        };
        let all = std::mem::take(&mut self.running)
            .into_iter()
            .chain(admitted);
        for s in all {
            match s.done() {
                true => self.finished.push(s),
                false => self.running.push(s),
            }
        }
        updates
    }

    /// The requests that ended since the last call: each one's [`Generation`], or the error it
    /// failed with alone. Their KV caches are freed.
    pub fn take_finished(&mut self) -> Vec<(u64, Result<Generation>)> {
        std::mem::take(&mut self.finished)
            .into_iter()
            .map(Slot::finish)
            .collect()
    }
}

impl Engine {
    /// The forward of one [`Batch::step`] over `slots` (running ones decode, new ones prefill):
    /// the logits `[slots, vocab]` of each one's last row. A non-finite value in one slot's
    /// rows or logits becomes that slot's error.
    fn step_logits(&self, slots: &mut [&mut Slot]) -> Result<Vec<f32>> {
        let (lm, p) = (&self.model.lm, &self.model.params);
        // Rows: the running requests' last tokens, then the admitted prompts.
        let last: Vec<u32> = slots
            .iter()
            .filter(|s| s.embeds.is_none())
            .map(|s| s.tokens.last().copied().unwrap_or(0))
            .collect();
        let mut parts = Vec::with_capacity(slots.len() + 1);
        if !last.is_empty() {
            parts.push(lm.embed(p, &last)?);
        }
        parts.extend(slots.iter_mut().filter_map(|s| s.embeds.take()));
        let x = match parts.len() {
            1 => parts.swap_remove(0),
            _ => Tensor::cat_rows(&parts.iter().collect::<Vec<_>>())?,
        };
        let (mut states, mut caches): (Vec<&mut SeqState>, Vec<&mut KvCache>) = slots
            .iter_mut()
            .map(|s| (&mut s.state, &mut s.cache))
            .unzip();
        let x = self.forward(x, &mut states, &mut caches)?;
        let mut end = 0;
        let ends: Vec<usize> = states
            .iter()
            .map(|st| {
                end += st.rows();
                end - 1
            })
            .collect();
        // Each sequence's last row; in a decode-only step that is every row, taken as it is.
        let last = match ends.len() == x.rows() {
            true => x,
            false => x.gather_rows(&ends)?,
        };
        let vocab = lm.config.vocab_size;
        let logits = lm.logits(p, &last)?.to_vec_f32()?;
        for (st, row) in states.iter_mut().zip(logits.chunks(vocab.max(1))) {
            if st.error.is_none()
                && let Err(e) = check_finite(row, vocab, |_| {
                    let generated = st.decoding.map_or(0, |k| k + 1);
                    format!(
                        "the logits of request {} after {generated} generated tokens",
                        st.request
                    )
                })
            {
                st.error = Some(e);
            }
        }
        Ok(logits)
    }
}

/// Prefill logits of one request ([`Engine::prompt_logits`]).
#[derive(Debug, Clone)]
pub struct PromptLogits {
    pub prompt: Prompt,
    /// `[rows, vocab]` for the rows that reached the last layer.
    pub logits: Vec<f32>,
    /// The prompt position of each row of `logits`.
    pub positions: Vec<usize>,
    pub stats: RunStats,
}

/// The log-sum-exps `[heads, rows.len()]` of the query rows `rows` out of a sequence's `[heads, n]`
/// (what the GPU rebuilds the ranked probabilities from).
fn lse_rows(lse: &[f32], heads: usize, n: usize, rows: &[usize]) -> Result<Vec<f32>> {
    if lse.len() != heads * n || rows.iter().any(|&r| r >= n) {
        return Err(Error::Shape {
            name: format!("attention log-sum-exp for rows {rows:?}"),
            expected: vec![heads, n],
            got: vec![lse.len()],
        });
    }
    Ok((0..heads)
        .flat_map(|h| rows.iter().map(move |&r| lse[h * n + r]))
        .collect())
}

/// A stage's surviving rows with SparseVLM's merged ones ([`recycle`]).
struct Recycled {
    /// Each surviving row's source row in the sequence (a merged row's: its cluster's centre).
    meta: Vec<usize>,
    /// Each surviving row's row in the batch's `x`, merged rows after `x`'s own.
    gather: Vec<usize>,
    /// The image tokens each merged row averages, ascending.
    members: Vec<Vec<usize>>,
    /// The merged rows, `[merged, hidden]`.
    rows: Vec<f32>,
}

impl Recycled {
    /// The kept rows alone (of a sequence starting at row `r0` of the batch).
    fn none(kept_rows: &[usize], r0: usize) -> Self {
        Recycled {
            meta: kept_rows.to_vec(),
            gather: kept_rows.iter().map(|r| r0 + r).collect(),
            members: vec![],
            rows: vec![],
        }
    }
}

/// SparseVLM's recycling at one stage of the sequence `st` (rows `r0..` of `x`, layer K-1's
/// output): its ranking's candidates clustered and merged ([`sparsevlm::cluster_and_merge`]),
/// the merged rows placed right after the last kept image row (numbered from `first` in the
/// batch's rows with them appended).
fn recycle(
    x: &Tensor,
    r0: usize,
    st: &SeqState,
    (image_cols, ranking): (&[usize], &Ranking),
    kept_rows: &[usize],
    sv: sparsevlm::SparseVlm,
    first: usize,
) -> Result<Recycled> {
    let mut r = Recycled::none(kept_rows, r0);
    let cand: Vec<usize> = ranking.recycle.iter().map(|&k| image_cols[k]).collect();
    let feats = x
        .gather_rows(&cand.iter().map(|&c| r0 + c).collect::<Vec<_>>())?
        .to_vec_f32()?;
    let clusters = sv.recycled(image_cols.len() - ranking.kept.len()).1;
    let m = sparsevlm::cluster_and_merge(&feats, x.cols(), clusters);
    let last_image = image_cols.last().copied().unwrap_or(0);
    let at = kept_rows.partition_point(|&k| k <= last_image);
    r.meta.splice(at..at, m.centres.iter().map(|&c| cand[c]));
    r.gather.splice(at..at, first..first + m.centres.len());
    r.members = (0..m.centres.len())
        .map(|k| {
            let mut members: Vec<usize> = (m.assign.iter().enumerate())
                .filter(|&(_, &a)| a == k)
                .filter_map(|(i, _)| st.image_index[cand[i]])
                .collect();
            members.sort_unstable();
            members
        })
        .collect();
    r.rows = m.rows;
    Ok(r)
}

/// Chooses the SparseVLM raters of the prefilling sequences that prune with it, from their rows
/// of `x`, the LM's input embeddings ([`sparsevlm::raters`]): among the rows after the first
/// image token that are not image tokens (every text token after the image). When none stands
/// above the mean (all equally relevant) every one of them rates.
fn choose_raters(x: &Tensor, states: &mut [&mut SeqState]) -> Result<()> {
    let mut r0 = 0;
    for st in states.iter_mut() {
        let n = st.rows();
        let sparse = st.decoding.is_none()
            && st
                .plan
                .as_ref()
                .is_some_and(|p| matches!(p.scorer, Scorer::SparseVlm(_)));
        if sparse && let Some(first) = st.segments.iter().position(|&s| s == Segment::Image) {
            let image: Vec<usize> = (first..n)
                .filter(|&r| st.segments[r] == Segment::Image)
                .collect();
            let text: Vec<usize> = (first..n)
                .filter(|&r| st.segments[r] != Segment::Image)
                .collect();
            let take = |rows: &[usize]| {
                x.gather_rows(&rows.iter().map(|&r| r0 + r).collect::<Vec<_>>())?
                    .to_vec_f32()
            };
            let chosen = sparsevlm::raters(&take(&image)?, &take(&text)?, x.cols());
            st.raters = match chosen.is_empty() {
                true => text.iter().map(|&r| st.orig[r]).collect(),
                false => chosen.iter().map(|&t| st.orig[text[t]]).collect(),
            };
        }
        r0 += n;
    }
    Ok(())
}

/// Gives every sequence whose rows of `x` hold a NaN or infinity its own [`Error::NonFinite`]
/// (the first value, `at` naming where from the row's origin), so that one bad request fails
/// alone while the others go on: rows of different sequences never mix. The usual all-finite
/// case costs one scan.
fn fail_nonfinite(
    x: &Tensor,
    states: &mut [&mut SeqState],
    at: impl Fn(String) -> String,
) -> Result<()> {
    let backend = x.backend();
    if backend.first_nonfinite(x)?.is_none() {
        return Ok(());
    }
    let mut r0 = 0;
    for st in states.iter_mut() {
        let n = st.rows();
        if st.error.is_none()
            && let Some((i, value)) = backend.first_nonfinite(&x.narrow_rows(r0, n)?)?
        {
            let e = crate::ops::nonfinite(i, value, x.cols(), |row| at(st.origin(row)));
            st.error = Some(e);
        }
        r0 += n;
    }
    Ok(())
}

/// One sequence's view of the forward: which prompt positions are still present, their RoPE ids
/// and segments, the pruning done so far, and whether it is prefilling or decoding.
struct SeqState {
    /// The request's number (its index in a `generate` call, its id in a [`Batch`]), for messages.
    request: u64,
    prompt_len: usize,
    /// Image tokens of the prompt.
    image_tokens: usize,
    /// Prompt position of each current row.
    orig: Vec<usize>,
    /// RoPE position id of each current row.
    positions: Vec<usize>,
    segments: Vec<Segment>,
    /// For each current row that is an image token, its index among the prompt's image tokens.
    image_index: Vec<Option<usize>>,
    /// What each of the prompt's image tokens shows ([`Prompt::visual`]).
    visual: Vec<VisualToken>,
    plan: Option<PrunePlan>,
    /// `Some(k)` once prefilled: the next forward decodes generated token `k` (its one row).
    decoding: Option<usize>,
    /// Budget and kept count of each stage of `plan` ([`PrunePlan::budgets`]).
    keep: Vec<(usize, usize)>,
    /// `(layer, rows removed)` of the stages done, for renumbered decode positions.
    removed: Vec<(usize, usize)>,
    renumber: bool,
    /// SparseVLM's text raters (prompt positions), chosen from the input embeddings.
    raters: Vec<usize>,
    stats: RunStats,
    /// The first error of its own (a non-finite value in its rows): it fails alone.
    error: Option<Error>,
}

impl SeqState {
    fn new(
        request: u64,
        prompt: &Prompt,
        plan: Option<&PrunePlan>,
        num_layers: usize,
    ) -> Result<Self> {
        let n = prompt.ids.len();
        let mut next_image = 0;
        let image_index = prompt
            .segments
            .iter()
            .map(|&s| {
                (s == Segment::Image).then(|| {
                    next_image += 1;
                    next_image - 1
                })
            })
            .collect();
        let keep = match plan {
            Some(p) => p.budgets(num_layers, next_image)?,
            None => vec![],
        };
        Ok(SeqState {
            request,
            prompt_len: n,
            image_tokens: next_image,
            orig: (0..n).collect(),
            positions: (0..n).collect(),
            segments: prompt.segments.clone(),
            image_index,
            visual: prompt.visual.clone(),
            plan: plan.cloned(),
            decoding: None,
            keep,
            removed: vec![],
            renumber: plan.is_some_and(|p| p.renumber),
            raters: vec![],
            stats: RunStats::default(),
            error: None,
        })
    }

    /// What image token `k` of the prompt shows (tile 0 of image 0 when the prompt does not say).
    fn visual_of(&self, k: usize) -> VisualToken {
        (self.visual.get(k).copied()).unwrap_or(VisualToken::Patch { image: 0, tile: 0 })
    }

    /// Whether each of `rows` (image rows) is a LLaVA-NeXT row newline.
    fn newlines(&self, rows: &[usize]) -> Vec<bool> {
        rows.iter()
            .map(|&r| {
                self.image_index[r]
                    .is_some_and(|k| matches!(self.visual_of(k), VisualToken::Newline { .. }))
            })
            .collect()
    }

    /// The prompt's image tokens per tile and those its rows still have ([`RunStats::tiles`]).
    fn tile_report(&self) -> Vec<TileKept> {
        TileKept::count(
            (0..self.image_tokens).map(|k| self.visual_of(k)),
            self.image_index
                .iter()
                .flatten()
                .map(|&k| self.visual_of(k)),
        )
    }

    /// The budget and plan of a stage whose first pruned layer is `layer` (while prefilling).
    fn stage_at(&self, layer: usize) -> Option<(usize, PrunePlan)> {
        let plan = self.plan.as_ref().filter(|_| self.decoding.is_none())?;
        let i = plan.stages.iter().position(|s| s.layer == layer)?;
        Some((self.keep[i].0, plan.clone()))
    }

    /// "request i, prompt position p" (or "generated token k") of its row `row`.
    fn origin(&self, row: usize) -> String {
        let i = self.request;
        match self.decoding {
            Some(k) => format!("request {i}, generated token {k}"),
            None => format!("request {i}, prompt position {}", self.orig[row]),
        }
    }

    /// Rows the sequence has in the next forward: its prompt rows, or its one decoded token.
    fn rows(&self) -> usize {
        match self.decoding {
            Some(_) => 1,
            None => self.positions.len(),
        }
    }

    /// Prompt rows layer `l` runs on (and caches) once its plan's stages up to `l` have pruned.
    fn rows_at(&self, l: usize) -> usize {
        let images = self.image_tokens;
        let kept = match &self.plan {
            Some(p) => p
                .stages
                .iter()
                .zip(&self.keep)
                .filter(|(st, _)| st.layer <= l)
                .map(|(_, &(_, k))| k)
                .next_back()
                .unwrap_or(images),
            None => images,
        };
        self.prompt_len - images + kept
    }

    /// RoPE positions of its rows in layer `l`.
    fn layer_positions(&self, l: usize) -> Vec<usize> {
        match self.decoding {
            Some(k) => vec![self.decode_position(l, k)],
            None => self.positions.clone(),
        }
    }

    /// Notes the token counts the next layer runs on.
    fn record_layer(&mut self) {
        let img = self.image_index.iter().filter(|i| i.is_some()).count();
        self.stats.image_tokens_per_layer.push(img);
        self.stats.tokens_per_layer.push(self.positions.len());
    }

    /// Records a stage that kept `rows` (the non-image rows and the ranked-kept image rows, and
    /// for each merged row the row at its cluster's centre, whose prompt position, segment,
    /// image index and RoPE position it takes), with the image tokens each merged row averages.
    /// `cost`: seconds and bytes the ranking took, and the diversity of the kept tokens.
    fn apply_stage(
        &mut self,
        layer: usize,
        plan: &PrunePlan,
        image_cols: &[usize],
        ranking: Ranking,
        (rows, merged): (Vec<usize>, Vec<Vec<usize>>),
        cost: (f64, usize, f64),
    ) {
        let n = self.positions.len();
        let ranked: Vec<usize> = image_cols
            .iter()
            .filter_map(|&r| self.image_index[r])
            .collect();
        self.stats.stages.push(StageReport {
            layer,
            before: image_cols.len(),
            after: ranking.kept.len() + merged.len(),
            merged,
            kept: ranking.kept.iter().map(|&k| ranked[k]).collect(),
            ranked,
            query_positions: ranking.query_rows.iter().map(|&r| self.orig[r]).collect(),
            ranking,
            rank_secs: cost.0,
            rank_bytes: cost.1,
            diversity: cost.2,
        });
        self.removed.push((layer, n - rows.len()));
        self.orig = rows.iter().map(|&r| self.orig[r]).collect();
        self.segments = rows.iter().map(|&r| self.segments[r]).collect();
        self.image_index = rows.iter().map(|&r| self.image_index[r]).collect();
        self.positions = plan.positions_after(&self.positions, &rows);
    }

    /// Its current rows that are SparseVLM raters, ascending.
    fn rater_rows(&self) -> Vec<usize> {
        (0..self.orig.len())
            .filter(|&r| {
                self.segments[r] != Segment::Image
                    && self.raters.binary_search(&self.orig[r]).is_ok()
            })
            .collect()
    }

    /// RoPE position id of generated token `k` (0-based) in layer `l`.
    fn decode_position(&self, l: usize, k: usize) -> usize {
        let removed: usize = if self.renumber {
            self.removed
                .iter()
                .filter(|(layer, _)| *layer <= l)
                .map(|(_, r)| r)
                .sum()
        } else {
            0
        };
        self.prompt_len - removed + k
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lse_rows_picks_the_ranked_rows_of_every_head() {
        // 2 heads x 4 rows, value = 10 h + r.
        let lse: Vec<f32> = (0..2)
            .flat_map(|h| (0..4).map(move |r| (10 * h + r) as f32))
            .collect();
        assert_eq!(
            lse_rows(&lse, 2, 4, &[3, 1]).unwrap(),
            vec![3.0, 1.0, 13.0, 11.0]
        );
        assert!(lse_rows(&lse, 2, 4, &[4]).is_err());
        assert!(lse_rows(&lse[..7], 2, 4, &[0]).is_err());
    }
}
