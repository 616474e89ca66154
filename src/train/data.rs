//! Training data: LLaVA conversation json -> token ids with answer-only labels (+ pixel values),
//! and a seeded, resumable loader over them.
//!
//! The text follows LLaVA-1.5's `conv_vicuna_v1` (`llava_v1`) template, `SeparatorStyle.TWO` with
//! `sep = " "`, `sep2 = "</s>"`, roles `USER`/`ASSISTANT`, as `Conversation.get_prompt` builds it:
//!
//! ```text
//! {system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>
//! ```
//!
//! with BOS from the tokenizer's post-processor, and `<image>` moved to the front of the first
//! human turn (`preprocess_multimodal`: `<image>` removed, the rest stripped, `<image>\n` prepended)
//! and expanded to the vision tower's token count as [`crate::model::template::build_prompt`] does,
//! so the prompt part of a sample tokenizes exactly like an inference prompt.
//!
//! Masking (`preprocess_v1`): BOS and every instruction part (system, `USER: ...`, `ASSISTANT:`) are
//! [`IGNORE`]; each answer from its leading space (`▁` in the tokenizer) through its `</s>` is
//! trained. LLaVA finds the spans by counting tokens of each round; we find them by the byte
//! offsets of one tokenization of the whole text, which gives the same spans and cannot drift.
//! Labels are aligned with `input_ids` (HF convention: the model shifts them by one).

use crate::error::{Error, Result};
use crate::model::image::ImageProcessorConfig;
use crate::model::template::{IMAGE_PLACEHOLDER, ImageSlot, LLAVA_SYSTEM, Segment, segments_of};
use crate::model::tokenizer::Tokenizer;
use crate::train::model::{GroundedRow, Grounding, HeadShare};
use std::path::{Path, PathBuf};

/// Label value of positions that are not trained (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// The end-of-turn separator after every answer (`sep2`).
pub const EOS: &str = "</s>";

/// One question/answer round.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub question: String,
    pub answer: String,
    /// The image patches (row-major indices among the image tokens) the answer is about: the
    /// gpt message's optional `patches` list (a ShapesVQA extension; LLaVA ignores the field),
    /// the target of an attention-grounding loss. Empty when the message has none.
    pub patches: Vec<usize>,
    /// For an answer comparing objects ("left"), the patches of each, in the question's order:
    /// the gpt message's optional `parts` list of patch lists (the same extension). Part `i` of
    /// `k` grounds share `i` of `k` of the answer row's heads ([`HeadShare`]). A message has
    /// `patches` or `parts`, not both.
    pub parts: Vec<Vec<usize>>,
    /// Phrases of the question naming objects, each with their patches: the human message's
    /// optional `refs` list (`[{"phrase", "patches"}]`, the same extension). Each grounds the row
    /// of the phrase's last token.
    pub refs: Vec<PhraseRef>,
}

/// A phrase of a question and the image patches of what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhraseRef {
    pub phrase: String,
    /// Row-major patch indices, increasing, without repeats.
    pub patches: Vec<usize>,
}

/// A json list of patch indices, sorted and without repeats; `None` if `v` is not one.
fn patch_list(v: &serde_json::Value) -> Option<Vec<usize>> {
    let mut list = v
        .as_array()?
        .iter()
        .map(|x| x.as_u64().map(|x| x as usize))
        .collect::<Option<Vec<usize>>>()?;
    list.sort_unstable();
    list.dedup();
    Some(list)
}

/// One conversation of a LLaVA training file.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: String,
    /// Image file relative to the image folder; `None` for text-only samples.
    pub image: Option<String>,
    /// Rounds in order; the first question holds the image placeholder (moved to its front).
    pub turns: Vec<Turn>,
}

/// One tokenized training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSample {
    pub id: String,
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; [`IGNORE`] outside the answers (and their `</s>`).
    pub labels: Vec<i64>,
    /// `[3, H, W]` preprocessed image, row-major; empty for text-only samples.
    pub pixel_values: Vec<f32>,
    /// The grounded rows within `max_len`: each [`Turn::refs`] phrase's last token and the row
    /// before each [`Turn::patches`] (or [`Turn::parts`]) answer, with their patches (see
    /// [`Encoder::encode_text`]).
    pub grounding: Vec<Grounding>,
    /// Segments of the first turn's prompt, one per position before its answer (see
    /// [`crate::model::template::Segment`]): how a pruned training forward ranks image tokens as
    /// the engine would for that question.
    pub prompt: Vec<Segment>,
}

impl TrainSample {
    /// Number of trained (non-[`IGNORE`]) positions.
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

fn cfg_err(path: &Path, msg: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg,
    }
}

/// Parses LLaVA's training json (a list of `{"id", "image"?, "conversations": [{"from", "value"}]}`;
/// a gpt message may carry `"patches": [index, ...]` or `"parts"`, a human one `"refs"`, see
/// [`Turn::patches`], [`Turn::parts`] and [`Turn::refs`]).
/// Turns must alternate `human`/`gpt` starting with `human` (a leading `gpt` turn is dropped as
/// LLaVA does); `<image>` may only appear, once, in the first human turn, and must when `image` is
/// set. Errors name the file, the sample index and id, and the field.
pub fn parse_conversations(text: &str, path: &Path) -> Result<Vec<Conversation>> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| cfg_err(path, format!("not valid json: {e}")))?;
    let list = v
        .as_array()
        .ok_or_else(|| cfg_err(path, "the top level must be a list of samples".into()))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, rec) in list.iter().enumerate() {
        let obj = rec
            .as_object()
            .ok_or_else(|| cfg_err(path, format!("sample {i}: not an object")))?;
        let id = match obj.get("id") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            None => format!("#{i}"),
            Some(_) => {
                return Err(cfg_err(
                    path,
                    format!("sample {i}: field `id` must be a string"),
                ));
            }
        };
        let at = |field: &str, msg: &str| {
            cfg_err(path, format!("sample {i} (id {id}): field `{field}` {msg}"))
        };
        let image = match obj.get("image") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => return Err(at("image", "must be a non-empty string")),
        };
        let convs = obj
            .get("conversations")
            .ok_or_else(|| at("conversations", "is missing"))?
            .as_array()
            .ok_or_else(|| at("conversations", "must be a list"))?;
        let mut msgs = Vec::with_capacity(convs.len());
        for (j, m) in convs.iter().enumerate() {
            let field = format!("conversations[{j}]");
            let from = m
                .get("from")
                .and_then(|f| f.as_str())
                .ok_or_else(|| at(&field, "needs a string `from`"))?;
            let value = m
                .get("value")
                .and_then(|f| f.as_str())
                .ok_or_else(|| at(&field, "needs a string `value`"))?;
            let human = match from {
                "human" | "user" => true,
                "gpt" | "assistant" => false,
                other => {
                    return Err(at(
                        &field,
                        &format!("has `from` = {other:?}; expected \"human\" or \"gpt\""),
                    ));
                }
            };
            let patches = match m.get("patches") {
                None => Vec::new(),
                Some(_) if human => {
                    return Err(at(&field, "has `patches`; only gpt messages may"));
                }
                Some(v) => patch_list(v).ok_or_else(|| {
                    at(&field, "has `patches` that is not a list of patch indices")
                })?,
            };
            let parts = match m.get("parts") {
                None => Vec::new(),
                Some(_) if human => return Err(at(&field, "has `parts`; only gpt messages may")),
                Some(_) if !patches.is_empty() => {
                    return Err(at(&field, "has both `patches` and `parts`; give one"));
                }
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(patch_list).collect::<Option<Vec<_>>>())
                    .filter(|p| !p.is_empty() && p.iter().all(|p| !p.is_empty()))
                    .ok_or_else(|| {
                        at(
                            &field,
                            "has `parts` that is not a non-empty list of non-empty patch lists",
                        )
                    })?,
            };
            let refs = match m.get("refs") {
                None => Vec::new(),
                Some(_) if !human => {
                    return Err(at(&field, "has `refs`; only human messages may"));
                }
                Some(v) => v
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|r| {
                                let phrase = r.get("phrase")?.as_str()?;
                                Some(PhraseRef {
                                    phrase: phrase.to_string(),
                                    patches: patch_list(r.get("patches")?)?,
                                })
                            })
                            .collect::<Option<Vec<_>>>()
                    })
                    .filter(|r| {
                        r.iter()
                            .all(|r| !r.phrase.is_empty() && !r.patches.is_empty())
                    })
                    .ok_or_else(|| {
                        at(
                            &field,
                            "has `refs` that is not a list of {\"phrase\", \"patches\"} with \
                             a non-empty phrase and patch indices",
                        )
                    })?,
            };
            msgs.push((j, human, value, patches, parts, refs));
        }
        if msgs.first().is_some_and(|m| !m.1) {
            msgs.remove(0);
        }
        if msgs.is_empty() || msgs.len() % 2 != 0 {
            return Err(at(
                "conversations",
                &format!(
                    "must hold human/gpt pairs; it has {} turn(s) after dropping a leading gpt turn",
                    msgs.len()
                ),
            ));
        }
        let mut turns = Vec::with_capacity(msgs.len() / 2);
        for pair in msgs.chunks(2) {
            let (jq, hq, q, _, _, ref refs) = pair[0];
            let (ja, ha, a, ref patches, ref parts, _) = pair[1];
            if !hq {
                return Err(at(&format!("conversations[{jq}]"), "must be a human turn"));
            }
            if ha {
                return Err(at(&format!("conversations[{ja}]"), "must be a gpt turn"));
            }
            if a.contains(IMAGE_PLACEHOLDER) {
                return Err(at(
                    &format!("conversations[{ja}]"),
                    "contains `<image>`; only the first human turn may",
                ));
            }
            let n = q.matches(IMAGE_PLACEHOLDER).count();
            let first = turns.is_empty();
            if n > 1 || (n == 1 && !first) {
                return Err(at(
                    &format!("conversations[{jq}]"),
                    "has `<image>` misplaced; it may appear once, in the first human turn",
                ));
            }
            if first && (n == 1) != image.is_some() {
                return Err(at(
                    &format!("conversations[{jq}]"),
                    if image.is_some() {
                        "lacks `<image>` although the sample has an image"
                    } else {
                        "has `<image>` but the sample has no `image` field"
                    },
                ));
            }
            // preprocess_multimodal: `<image>` to the front, the rest stripped.
            let question = if n == 1 {
                let rest = q.replace(IMAGE_PLACEHOLDER, "");
                format!("{IMAGE_PLACEHOLDER}\n{}", rest.trim())
            } else {
                q.to_string()
            };
            turns.push(Turn {
                question,
                answer: a.to_string(),
                patches: patches.clone(),
                parts: parts.clone(),
                refs: refs.clone(),
            });
            if let Some(r) = refs.iter().find(|r| !q.contains(&r.phrase)) {
                return Err(at(
                    &format!("conversations[{jq}]"),
                    &format!(
                        "has a ref whose phrase {:?} is not in the question",
                        r.phrase
                    ),
                ));
            }
        }
        out.push(Conversation { id, image, turns });
    }
    Ok(out)
}

/// Reads a LLaVA training json file (see [`parse_conversations`]).
pub fn read_conversations(path: &Path) -> Result<Vec<Conversation>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_conversations(&text, path)
}

/// Token ids, labels, grounded rows and the first prompt's segments of one conversation.
type Encoded = (Vec<u32>, Vec<i64>, Vec<Grounding>, Vec<Segment>);

/// Turns conversations into [`TrainSample`]s.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    /// What `<image>` expands to (token string and the vision tower's token count).
    pub image_slot: ImageSlot,
    /// Image preprocessing; `None` leaves `pixel_values` empty (text side only).
    pub image_processor: Option<ImageProcessorConfig>,
    /// System prompt; LLaVA-1.5 trains with [`LLAVA_SYSTEM`].
    pub system: String,
    /// Longest sample in tokens; longer ones are truncated (see [`Encoder::encode_text`]).
    pub max_len: usize,
}

impl<'a> Encoder<'a> {
    /// An encoder with LLaVA's system prompt and the default CLIP preprocessing.
    pub fn new(tokenizer: &'a Tokenizer, image_slot: ImageSlot, max_len: usize) -> Self {
        Encoder {
            tokenizer,
            image_slot,
            image_processor: Some(ImageProcessorConfig::default()),
            system: LLAVA_SYSTEM.to_string(),
            max_len,
        }
    }

    /// The conversation as text (with `<image>` expanded) and the byte spans that are trained:
    /// each ` {answer}</s>`, from the space after `ASSISTANT:` through `</s>`.
    pub fn render(&self, conv: &Conversation) -> (String, Vec<(usize, usize)>) {
        let (text, spans, _) = self.render_with_questions(conv);
        (text, spans)
    }

    /// [`Encoder::render`] and the byte offset where each turn's (expanded) question starts.
    fn render_with_questions(
        &self,
        conv: &Conversation,
    ) -> (String, Vec<(usize, usize)>, Vec<usize>) {
        let expanded = self.image_slot.token.repeat(self.image_slot.count);
        let mut text = String::new();
        if !self.system.is_empty() {
            text.push_str(&self.system);
            text.push(' ');
        }
        let mut spans = Vec::with_capacity(conv.turns.len());
        let mut questions = Vec::with_capacity(conv.turns.len());
        for t in &conv.turns {
            text.push_str("USER: ");
            questions.push(text.len());
            text.push_str(&t.question.replace(IMAGE_PLACEHOLDER, &expanded));
            text.push_str(" ASSISTANT:");
            let start = text.len();
            text.push(' ');
            text.push_str(&t.answer);
            text.push_str(EOS);
            spans.push((start, text.len()));
        }
        (text, spans, questions)
    }

    /// Token ids, labels and grounded rows of `conv`. A token is trained iff its first byte lies
    /// in an answer span of [`Encoder::render`]; its label is its own id. A turn with
    /// [`Turn::patches`] grounds the row before its answer's first token (with [`Turn::parts`],
    /// that row once per part, each on its share of the heads), each of its [`Turn::refs`] the
    /// row of its phrase's last token. Longer than `max_len`:
    /// the first `max_len` tokens are kept (as HF's `truncation=True` and LLaVA's
    /// `[:model_max_length]`), with the grounded rows whose answer starts within them; it is an
    /// error when that would cut into the image tokens or leaves nothing to train.
    pub fn encode_text(&self, conv: &Conversation) -> Result<(Vec<u32>, Vec<i64>, Vec<Grounding>)> {
        self.encode_all(conv)
            .map(|(ids, labels, grounding, _)| (ids, labels, grounding))
    }

    /// [`Encoder::encode_text`] and the segments of the first turn's prompt (every position
    /// before its answer), labelled as the engine's `build_prompt` labels an inference prompt:
    /// what a pruned training forward ranks with.
    fn encode_all(&self, conv: &Conversation) -> Result<Encoded> {
        let (text, spans, questions) = self.render_with_questions(conv);
        let enc = self.tokenizer.encode(&text, true)?;
        let mut labels: Vec<i64> = enc
            .ids
            .iter()
            .zip(&enc.offsets)
            .map(|(&id, &(s, e))| {
                let special = s == 0 && e == 0; // BOS added by the post-processor
                if !special && spans.iter().any(|&(a, b)| s >= a && s < b) {
                    id as i64
                } else {
                    IGNORE
                }
            })
            .collect();
        let mut ids = enc.ids;
        let sample = |msg: String| Error::Prompt(format!("sample {}: {msg}", conv.id));
        let mut grounding = Vec::new();
        let mut ground =
            |row: Option<usize>, patches: &[usize], kind: GroundedRow, heads: HeadShare| {
                if let Some(position) = row.filter(|&r| r < self.max_len) {
                    grounding.push(Grounding {
                        position,
                        patches: patches.to_vec(),
                        row: kind,
                        heads,
                    });
                }
            };
        for ((turn, &(a, _)), &q) in conv.turns.iter().zip(&spans).zip(&questions) {
            if turn.patches.is_empty() && turn.parts.is_empty() && turn.refs.is_empty() {
                continue;
            }
            if conv.image.is_none() {
                return Err(sample(
                    "a turn has `patches`, `parts` or `refs` but the sample has no image".into(),
                ));
            }
            // The rendered question: a phrase's offset counts the expanded image tokens before it.
            let question = if turn.refs.is_empty() {
                String::new()
            } else {
                let expanded = self.image_slot.token.repeat(self.image_slot.count);
                turn.question.replace(IMAGE_PLACEHOLDER, &expanded)
            };
            for r in &turn.refs {
                let at = question.find(&r.phrase).ok_or_else(|| {
                    sample(format!("phrase {:?} is not in its question", r.phrase))
                })?;
                let end = q + at + r.phrase.len();
                let last = enc.offsets.iter().rposition(|&(s, e)| e > 0 && s < end);
                ground(last, &r.patches, GroundedRow::Phrase, HeadShare::ALL);
            }
            let first = enc.offsets.iter().position(|&(s, e)| e > 0 && s >= a);
            let row = first.filter(|&i| i > 0).map(|i| i - 1);
            if !turn.patches.is_empty() {
                ground(row, &turn.patches, GroundedRow::Answer, HeadShare::ALL);
            }
            let count = turn.parts.len();
            for (index, part) in turn.parts.iter().enumerate() {
                ground(row, part, GroundedRow::Answer, HeadShare { index, count });
            }
        }
        if conv.image.is_some() {
            let image_id = self
                .tokenizer
                .token_to_id(&self.image_slot.token)
                .ok_or_else(|| {
                    sample(format!(
                        "the tokenizer has no image token `{}`",
                        self.image_slot.token
                    ))
                })?;
            let pos: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == image_id).collect();
            if pos.len() != self.image_slot.count {
                return Err(sample(format!(
                    "`<image>` expanded to {} image tokens, expected {}",
                    pos.len(),
                    self.image_slot.count
                )));
            }
            if let Some(&last) = pos.last()
                && last >= self.max_len
            {
                return Err(sample(format!(
                    "max_len {} cuts into the image tokens (the last is at position {last})",
                    self.max_len
                )));
            }
        }
        let prompt = self.first_prompt(conv, &ids, &enc.offsets, &spans, &questions);
        ids.truncate(self.max_len);
        labels.truncate(self.max_len);
        if labels.iter().all(|&l| l == IGNORE) {
            return Err(sample(format!(
                "no answer token left within max_len {} (the sample is {} tokens)",
                self.max_len,
                enc.offsets.len()
            )));
        }
        Ok((ids, labels, grounding, prompt))
    }

    /// Segments of the first turn's prompt: BOS, system prompt, `USER:` and any question text
    /// before the image are [`Segment::System`], image tokens [`Segment::Image`], the question
    /// after the image [`Segment::Text`], the rest (` ASSISTANT:`) [`Segment::Template`].
    fn first_prompt(
        &self,
        conv: &Conversation,
        ids: &[u32],
        offsets: &[(usize, usize)],
        spans: &[(usize, usize)],
        questions: &[usize],
    ) -> Vec<Segment> {
        let (Some(turn), Some(&(answer, _)), Some(&q)) =
            (conv.turns.first(), spans.first(), questions.first())
        else {
            return Vec::new();
        };
        let image_id =
            (conv.image.as_ref()).and(self.tokenizer.token_to_id(&self.image_slot.token));
        let expanded = self.image_slot.token.len() * self.image_slot.count;
        let (image_start, q_start) = match turn.question.find(IMAGE_PLACEHOLDER) {
            Some(p) if conv.image.is_some() => (q + p, q + p + expanded),
            _ => (q, q),
        };
        let rendered = turn.question.replace(
            IMAGE_PLACEHOLDER,
            &self.image_slot.token.repeat(self.image_slot.count),
        );
        let question = q_start..q + rendered.len();
        let n = (offsets.iter())
            .take_while(|&&(s, e)| (s == 0 && e == 0) || s < answer)
            .count();
        segments_of(&ids[..n], &offsets[..n], image_id, image_start, &[question])
    }

    /// Tokenizes `conv` and, when it has an image and a processor is set, loads
    /// `image_folder/{image}` and preprocesses it.
    pub fn encode(&self, conv: &Conversation, image_folder: &Path) -> Result<TrainSample> {
        let (input_ids, labels, grounding, prompt) = self.encode_all(conv)?;
        let pixel_values = match (&conv.image, &self.image_processor) {
            (Some(file), Some(proc)) => {
                let path = image_folder.join(file);
                proc.preprocess_file(&path)
                    .map_err(|e| Error::Image {
                        path: path.clone(),
                        msg: format!("sample {} (field `image`): {e}", conv.id),
                    })?
                    .into_f32_vec()?
            }
            _ => Vec::new(),
        };
        Ok(TrainSample {
            id: conv.id.clone(),
            input_ids,
            labels,
            pixel_values,
            grounding,
            prompt,
        })
    }
}

/// A LLaVA training set on disk: the json and the image folder its `image` fields are relative to.
pub struct Dataset {
    pub json: PathBuf,
    pub image_folder: PathBuf,
    pub conversations: Vec<Conversation>,
}

impl Dataset {
    /// Reads `json`; images are read lazily from `image_folder` by [`Dataset::sample`]. Every
    /// referenced image must exist and every answer must have text (checked here, naming the
    /// sample). Samples without `image` are text-only: they train the language model alone.
    ///
    /// An empty (or blank) answer is an error rather than a skipped sample: LLaVA would train it
    /// as an immediate `</s>`, teaching the model to answer nothing, and it is almost always a
    /// broken export (a failed regeneration, a field lost on the way); skipping it silently would
    /// also change the epoch every other sample's order depends on.
    pub fn open(json: &Path, image_folder: &Path) -> Result<Self> {
        let conversations = read_conversations(json)?;
        for (i, c) in conversations.iter().enumerate() {
            if let Some(k) = c.turns.iter().position(|t| t.answer.trim().is_empty()) {
                return Err(Error::Config {
                    path: json.to_path_buf(),
                    msg: format!(
                        "sample {i} (id {}): the answer of turn {} is empty; give it text or \
                         remove the turn",
                        c.id,
                        k + 1
                    ),
                });
            }
            if let Some(img) = &c.image {
                let p = image_folder.join(img);
                if !p.is_file() {
                    return Err(Error::Image {
                        path: p,
                        msg: format!(
                            "missing image of sample {i} (id {}, field `image`) in {}",
                            c.id,
                            json.display()
                        ),
                    });
                }
            }
        }
        Ok(Dataset {
            json: json.to_path_buf(),
            image_folder: image_folder.to_path_buf(),
            conversations,
        })
    }

    pub fn len(&self) -> usize {
        self.conversations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conversations.is_empty()
    }

    /// Sample `index`, tokenized and with its image preprocessed.
    pub fn sample(&self, enc: &Encoder<'_>, index: usize) -> Result<TrainSample> {
        let c = self.conversations.get(index).ok_or_else(|| {
            Error::arg(
                "index",
                format!("{index} is out of range for {} samples", self.len()),
            )
        })?;
        enc.encode(c, &self.image_folder)
    }

    /// The samples of a batch of indices (from [`Loader::next_batch`]).
    pub fn batch(&self, enc: &Encoder<'_>, indices: &[usize]) -> Result<Vec<TrainSample>> {
        indices.iter().map(|&i| self.sample(enc, i)).collect()
    }
}

/// A batch padded to its longest sample: `[batch, len]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedBatch {
    pub batch: usize,
    pub len: usize,
    /// Padded with `pad_id` on the right.
    pub input_ids: Vec<u32>,
    /// Padded with [`IGNORE`].
    pub labels: Vec<i64>,
    /// Unpadded length of each row.
    pub lengths: Vec<usize>,
}

/// Right-pads `samples` to a rectangle.
pub fn pad_batch(samples: &[TrainSample], pad_id: u32) -> PaddedBatch {
    let len = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(samples.len() * len);
    let mut labels = Vec::with_capacity(samples.len() * len);
    for s in samples {
        input_ids.extend_from_slice(&s.input_ids);
        input_ids.resize(input_ids.len() + len - s.input_ids.len(), pad_id);
        labels.extend_from_slice(&s.labels);
        labels.resize(labels.len() + len - s.labels.len(), IGNORE);
    }
    PaddedBatch {
        batch: samples.len(),
        len,
        input_ids,
        labels,
        lengths: samples.iter().map(|s| s.input_ids.len()).collect(),
    }
}

/// SplitMix64: a tiny, fully specified generator so orders never change with a dependency.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sample order of `epoch`: a Fisher-Yates shuffle of `0..n` seeded by `(seed, epoch)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut st = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let _ = splitmix64(&mut st);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        // Lemire-free modulo: the bias for n << 2^64 is negligible and the rule is fixed.
        let j = (splitmix64(&mut st) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Where a [`Loader`] stands: the next batch starts at `order(epoch)[position]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderState {
    pub epoch: u64,
    pub position: usize,
}

/// Seeded batches of sample indices: each epoch visits every sample once in [`epoch_order`];
/// batches hold `batch_size` indices, the last of an epoch may be shorter (no sample dropped, no
/// batch spans two epochs). Same seed, same batches; [`Loader::resume`] continues from a state.
#[derive(Debug, Clone)]
pub struct Loader {
    n: usize,
    batch_size: usize,
    seed: u64,
    state: LoaderState,
    order: Vec<usize>,
}

impl Loader {
    pub fn new(n: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::resume(
            n,
            batch_size,
            seed,
            LoaderState {
                epoch: 0,
                position: 0,
            },
        )
    }

    /// A loader positioned at `state` (from [`Loader::state`]).
    pub fn resume(n: usize, batch_size: usize, seed: u64, state: LoaderState) -> Result<Self> {
        if n == 0 {
            return Err(Error::arg("dataset", "is empty"));
        }
        if batch_size == 0 {
            return Err(Error::arg("batch_size", "must be at least 1"));
        }
        if state.position > n {
            return Err(Error::arg(
                "position",
                format!("{} is past the {n} samples of an epoch", state.position),
            ));
        }
        Ok(Loader {
            n,
            batch_size,
            seed,
            state,
            order: epoch_order(n, seed, state.epoch),
        })
    }

    /// The position of the next batch.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Next batch of sample indices, with the epoch it belongs to.
    pub fn next_batch(&mut self) -> (u64, Vec<usize>) {
        if self.state.position >= self.n {
            self.state.epoch += 1;
            self.state.position = 0;
            self.order = epoch_order(self.n, self.seed, self.state.epoch);
        }
        let start = self.state.position;
        let end = (start + self.batch_size).min(self.n);
        self.state.position = end;
        (self.state.epoch, self.order[start..end].to_vec())
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.n.div_ceil(self.batch_size)
    }
}
