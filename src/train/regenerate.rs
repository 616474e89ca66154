//! `distill regenerate`: the teacher re-answers a training set's questions (LLaVADI's data-driven
//! distillation: the student trains on the teacher's own answers, which it can match more easily
//! than the dataset's; regenerated answers took their student's TextVQA from 47.5 to 49.2).
//!
//! Every gpt turn of every conversation is replaced by the model's greedy answer given the
//! conversation so far: the human turns and the model's own earlier (regenerated) answers, in the
//! text [`Encoder::render`] builds for training (`{system} USER: <image>\n{q1} ASSISTANT:
//! {a1}</s>USER: {q2} ASSISTANT:`, LLaVA-1.5's system prompt), so the model is asked exactly as
//! `distill train` will show it the answer. Generation is batched: `batch_size` conversations per
//! [`Engine::generate`] call, turn by turn. The output json keeps everything else of the input
//! (every field, its order); a gpt turn's grounding (`patches`, `parts`) is kept only when its new
//! answer is the same as the old one ([`same_answer`]), since it describes the old answer.

use crate::engine::{Engine, ImageInput, Request};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::model::image::load_image;
use crate::model::template::{IMAGE_PLACEHOLDER, ImageSlot};
use crate::train::data::{Conversation, Encoder, parse_conversations};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How [`regenerate`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegenerateOptions {
    /// Conversations per [`Engine::generate`] call (each call answers one turn of each).
    pub batch_size: usize,
    /// New tokens per answer; generation also stops at the model's EOS.
    pub max_new_tokens: usize,
    /// Regenerate (and write) only the first this many conversations.
    pub limit: Option<usize>,
    /// Show a progress bar (answers) on stderr.
    pub progress: bool,
}

impl Default for RegenerateOptions {
    fn default() -> Self {
        RegenerateOptions {
            batch_size: 16,
            max_new_tokens: 32,
            limit: None,
            progress: false,
        }
    }
}

/// What [`regenerate`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct RegenerateSummary {
    /// Conversations written.
    pub conversations: usize,
    /// Answers regenerated (gpt turns).
    pub answers: usize,
    /// Answers that are not [`same_answer`] as the original.
    pub changed: usize,
    /// Fraction of answers that are [`same_answer`] as the original (`1 - changed / answers`; 1
    /// without answers).
    pub agreement: f64,
    /// Answers whose `patches` or `parts` were dropped because the answer changed.
    pub grounding_dropped: usize,
    /// Answers cut at `max_new_tokens` (or the model's context) before the model's EOS.
    pub truncated: usize,
    /// Wall time of the whole call, seconds.
    pub seconds: f64,
}

/// Whether two answers are the same after trimming white space and ignoring case.
pub fn same_answer(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// Regenerates every answer of the LLaVA training json `data` (images under `image_folder`) with
/// the model in `model` and writes the result to `out` (atomically; `out` must not be `data`).
/// See the [module documentation](self).
pub fn regenerate(
    model: &Path,
    data: &Path,
    image_folder: &Path,
    out: &Path,
    opts: &RegenerateOptions,
) -> Result<RegenerateSummary> {
    let t0 = Instant::now();
    if opts.batch_size == 0 {
        return Err(Error::arg("batch_size", "must be at least 1"));
    }
    if opts.max_new_tokens == 0 {
        return Err(Error::arg("max_new_tokens", "must be at least 1"));
    }
    if same_path(out, data) {
        return Err(Error::arg(
            "out",
            format!(
                "{} is the input data file; refusing to overwrite it (write the regenerated \
                 answers to another file)",
                out.display()
            ),
        ));
    }
    let text = std::fs::read_to_string(data).map_err(|e| Error::io(data, e))?;
    let mut convs = parse_conversations(&text, data)?;
    let mut records = match serde_json::from_str::<Json>(&text) {
        Ok(Json::Array(a)) => a,
        // parse_conversations accepted it, so this cannot happen; still no panic.
        _ => {
            return Err(Error::Config {
                path: data.to_path_buf(),
                msg: "the top level must be a list of samples".into(),
            });
        }
    };
    if let Some(n) = opts.limit {
        convs.truncate(n);
        records.truncate(n);
    }
    for (i, c) in convs.iter().enumerate() {
        if let Some(img) = &c.image {
            let p = image_folder.join(img);
            if !p.is_file() {
                return Err(Error::Image {
                    path: p,
                    msg: format!(
                        "missing image of conversation {} (sample {i}, field `image`) in {}",
                        c.id,
                        data.display()
                    ),
                });
            }
        }
    }
    // Where each conversation's gpt turns are among its messages (a leading gpt turn, which
    // parse_conversations drops, is left as it is).
    let mut answer_at: Vec<Vec<usize>> = Vec::with_capacity(convs.len());
    for (i, (c, rec)) in convs.iter().zip(&records).enumerate() {
        let msgs = rec.get("conversations").and_then(Json::as_array);
        let leading_gpt = msgs
            .and_then(|m| m.first())
            .and_then(|m| m.get("from"))
            .and_then(Json::as_str)
            .is_some_and(|f| f == "gpt" || f == "assistant");
        let off = usize::from(leading_gpt);
        let at: Vec<usize> = (0..c.turns.len()).map(|k| off + 2 * k + 1).collect();
        if msgs.is_none_or(|m| at.last().is_some_and(|&j| j >= m.len())) {
            return Err(Error::Config {
                path: data.to_path_buf(),
                msg: format!(
                    "sample {i} (id {}): field `conversations` does not match its turns",
                    c.id
                ),
            });
        }
        answer_at.push(at);
    }

    let model_path = model;
    let model = Model::load(model_path)?;
    if model.vision.is_none()
        && let Some(c) = convs.iter().find(|c| c.image.is_some())
    {
        return Err(Error::arg(
            "model",
            format!(
                "{} has no vision tower but conversation {} has an image",
                model_path.display(),
                c.id
            ),
        ));
    }
    let engine = Engine::new(Arc::new(model));
    let m = engine.model();
    // Renders conversations as `distill train` does, with `<image>` left as the placeholder the
    // engine expands (a raw prompt).
    let enc = Encoder {
        image_processor: None,
        ..Encoder::new(
            &m.tokenizer,
            ImageSlot {
                token: IMAGE_PLACEHOLDER.into(),
                count: 1,
            },
            usize::MAX,
        )
    };

    let total: usize = convs.iter().map(|c| c.turns.len()).sum();
    let bar = super::progress_bar(total as u64, opts.progress, "answers");
    let mut new_answers: Vec<Vec<String>> = vec![Vec::new(); convs.len()];
    let (mut changed, mut truncated, mut done) = (0usize, 0usize, 0usize);
    for start in (0..convs.len()).step_by(opts.batch_size) {
        let end = (start + opts.batch_size).min(convs.len());
        let images = (start..end)
            .map(|i| conversation_pixels(m, &convs[i], image_folder))
            .collect::<Result<Vec<_>>>()?;
        let turns = convs[start..end]
            .iter()
            .map(|c| c.turns.len())
            .max()
            .unwrap_or(0);
        for t in 0..turns {
            let who: Vec<usize> = (start..end).filter(|&i| convs[i].turns.len() > t).collect();
            let reqs: Vec<Request> = who
                .iter()
                .map(|&i| {
                    let prompt = turn_prompt(&enc, &convs[i], &new_answers[i], t);
                    let image = images[i - start].clone().map(ImageInput::Pixels);
                    let mut r = Request::new(prompt, image);
                    r.options.raw = true;
                    r.max_new_tokens = opts.max_new_tokens;
                    r
                })
                .collect();
            let gens = match engine.generate(&reqs) {
                Ok(g) => g,
                Err(e) => return Err(blame(&engine, &reqs, &who, &convs, t, e)),
            };
            for (&i, g) in who.iter().zip(gens) {
                let answer = g.text.replace(IMAGE_PLACEHOLDER, "").trim().to_string();
                if !same_answer(&answer, &convs[i].turns[t].answer) {
                    changed += 1;
                }
                if g.stop != crate::engine::StopReason::Eos {
                    truncated += 1;
                }
                new_answers[i].push(answer);
            }
            done += who.len();
            bar.set_position(done as u64);
            bar.set_message(format!(
                "agreement {:.3}",
                1.0 - changed as f64 / done.max(1) as f64
            ));
        }
    }
    bar.finish_and_clear();

    let mut grounding_dropped = 0;
    for ((rec, c), (answers, at)) in records
        .iter_mut()
        .zip(&convs)
        .zip(new_answers.iter().zip(&answer_at))
    {
        let Some(msgs) = rec.get_mut("conversations").and_then(Json::as_array_mut) else {
            continue;
        };
        for ((turn, answer), &j) in c.turns.iter().zip(answers).zip(at) {
            let Json::Object(msg) = &mut msgs[j] else {
                continue;
            };
            if !same_answer(answer, &turn.answer) {
                let before = msg.len();
                msg.retain(|(k, _)| k != "patches" && k != "parts");
                if msg.len() != before {
                    grounding_dropped += 1;
                }
            }
            for (k, v) in msg.iter_mut() {
                if k == "value" {
                    *v = Json::String(answer.clone());
                }
            }
        }
    }
    let json = serde_json::to_vec_pretty(&Json::Array(records))
        .map_err(|e| Error::arg("out", format!("cannot serialize: {e}")))?;
    crate::io::write_atomic(out, &json)?;
    Ok(RegenerateSummary {
        conversations: convs.len(),
        answers: total,
        changed,
        agreement: if total == 0 {
            1.0
        } else {
            1.0 - changed as f64 / total as f64
        },
        grounding_dropped,
        truncated,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The prompt of turn `t` of `conv`: the rendered conversation up to that turn's `ASSISTANT:`,
/// earlier turns answered with `answers` (the regenerated ones).
fn turn_prompt(enc: &Encoder<'_>, conv: &Conversation, answers: &[String], t: usize) -> String {
    let mut turns = conv.turns[..=t].to_vec();
    for (turn, a) in turns.iter_mut().zip(answers) {
        turn.answer = a.clone();
    }
    let upto = Conversation {
        turns,
        ..conv.clone()
    };
    let (mut text, spans) = enc.render(&upto);
    text.truncate(spans[t].0);
    text
}

/// The preprocessed image of a conversation, loaded once for all its turns.
fn conversation_pixels(m: &Model, c: &Conversation, folder: &Path) -> Result<Option<Vec<f32>>> {
    let (Some(file), Some(proc)) = (&c.image, &m.image_processor) else {
        return Ok(None);
    };
    let path = folder.join(file);
    let wrap = |e: Error| match e {
        Error::Image { msg, .. } => Error::Image {
            path: path.clone(),
            msg: format!("conversation {} (field `image`): {msg}", c.id),
        },
        e => e,
    };
    let img = load_image(&path).map_err(wrap)?;
    Ok(Some(proc.preprocess(&img).map_err(wrap)?.into_f32_vec()?))
}

/// The error of a failed batch, naming the conversation and turn at fault: the requests are rerun
/// one by one to find it.
fn blame(
    engine: &Engine,
    reqs: &[Request],
    who: &[usize],
    convs: &[Conversation],
    t: usize,
    batch_err: Error,
) -> Error {
    let at = |i: usize| format!("conversation {} (turn {})", convs[i].id, t + 1);
    let named = |i: usize, e: Error| match e {
        Error::Prompt(msg) => Error::Prompt(format!("{}: {msg}", at(i))),
        Error::Image { path, msg } => Error::Image {
            path,
            msg: format!("{}: {msg}", at(i)),
        },
        e => e,
    };
    if reqs.len() == 1 {
        return named(who[0], batch_err);
    }
    for (r, &i) in reqs.iter().zip(who) {
        if let Err(e) = engine.generate(std::slice::from_ref(r)) {
            return named(i, e);
        }
    }
    batch_err
}

/// Whether `a` and `b` name the same file (symbolic links and `..` resolved; `a` need not exist).
fn same_path(a: &Path, b: &Path) -> bool {
    fn canon(p: &Path) -> Option<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(dir.canonicalize().ok()?.join(p.file_name()?))
    }
    match (canon(a), canon(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// A json value whose objects keep their keys in file order (serde_json's `Value` sorts them), so
/// the output differs from the input only where answers changed.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(o) => o.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        match self {
            Json::Object(o) => o.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<&Vec<Json>> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    fn as_array_mut(&mut self) -> Option<&mut Vec<Json>> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(v) => s.serialize_str(v),
            Json::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Json::Object(o) => {
                let mut map = s.serialize_map(Some(o.len()))?;
                for (k, v) in o {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a json value")
            }
            fn visit_unit<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> std::result::Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_u64<E>(self, n: u64) -> std::result::Result<Json, E> {
                Ok(Json::Number(n.into()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> std::result::Result<Json, E> {
                serde_json::Number::from_f64(n)
                    .map(Json::Number)
                    .ok_or_else(|| E::custom("a number that is not finite"))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Json, E> {
                Ok(Json::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Json, E> {
                Ok(Json::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Json, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = a.next_element()? {
                    out.push(v);
                }
                Ok(Json::Array(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> std::result::Result<Json, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Json>()? {
                    out.push((k, v));
                }
                Ok(Json::Object(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_key_order_and_values() {
        let text = r#"[{"id":"b","image":"x.png","n":-3,"f":0.25,"big":18446744073709551615,"t":true,"z":null,"conversations":[{"from":"human","value":"q"}]}]"#;
        let v: Json = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), text);
    }

    #[test]
    fn answers_compare_without_case_or_outer_space() {
        assert!(same_answer(" Red\n", "red"));
        assert!(!same_answer("red", "blue"));
        assert!(!same_answer("dark red", "darkred"));
    }

    #[test]
    fn paths_compare_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("train.json");
        std::fs::write(&a, "[]").unwrap();
        assert!(same_path(&a, &dir.path().join(".").join("train.json")));
        assert!(!same_path(&a, &dir.path().join("new.json")));
    }
}
