//! Chat input rendered with the model's own chat template, as HF transformers'
//! `processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` does it:
//! the Jinja template (minijinja, configured like transformers' sandboxed environment) renders the
//! messages to text, every image placeholder expands to the vision tower's token count, the text is
//! tokenized the way the processor tokenizes it, and every position gets its [`Segment`].
//!
//! The reference is `tests/reference/gen_chat.py` (transformers 5.23) on the fixture models;
//! `tests/chat_template.rs` checks rendered text and ids against it.

use super::template::{ImageSlot, Prompt, Segment, segments_of};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One part of a message's content. Serializes as transformers' content blocks:
/// `{"type": "text", "text": ...}` or `{"type": "image"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "PartRepr", from = "PartRepr")]
pub enum ChatPart {
    /// Text, passed to the template verbatim.
    Text(String),
    /// An image. Its pixels stay with the caller, in order of appearance in the chat; the template
    /// only decides where its placeholder goes.
    Image,
}

/// The wire form of [`ChatPart`] (what the template sees).
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum PartRepr {
    Text { text: String },
    Image {},
}

impl From<PartRepr> for ChatPart {
    fn from(p: PartRepr) -> Self {
        match p {
            PartRepr::Text { text } => ChatPart::Text(text),
            PartRepr::Image {} => ChatPart::Image,
        }
    }
}

impl From<ChatPart> for PartRepr {
    fn from(p: ChatPart) -> Self {
        match p {
            ChatPart::Text(text) => PartRepr::Text { text },
            ChatPart::Image => PartRepr::Image {},
        }
    }
}

/// One chat message: a role (`system`, `user`, `assistant`, or whatever the template knows) and
/// its content parts in order. Serializes as `{"role": ..., "content": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Vec<ChatPart>,
}

impl ChatMessage {
    /// A message of `role` with one text part.
    pub fn new(role: impl Into<String>, text: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: vec![ChatPart::Text(text.into())],
        }
    }

    /// A `system` message.
    pub fn system(text: impl Into<String>) -> Self {
        Self::new("system", text)
    }

    /// A `user` message.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new("user", text)
    }

    /// A `user` message with an image before its text (LLaVA's order).
    pub fn user_with_image(text: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: vec![ChatPart::Image, ChatPart::Text(text.into())],
        }
    }

    /// An `assistant` message.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new("assistant", text)
    }
}

/// The special tokens transformers passes to every template (`tokenizer.special_tokens_map`).
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A model's chat template, compiled, with the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file, or `<chat template>`), for error messages.
    source: PathBuf,
    special_tokens: BTreeMap<String, String>,
    /// Pass text-only content as one string ([`ChatTemplate::with_text_content`]).
    text_content: bool,
}

/// A rendered chat: the text the template produced and what [`build_chat_prompt`] needs to
/// tokenize it as transformers does and to assign segments.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedChat {
    /// The template's output, image placeholders not yet expanded.
    pub text: String,
    /// Byte ranges of the user messages' text parts in `text`, in order (see
    /// [`ChatTemplate::render_chat`] for how they are found).
    pub user_texts: Vec<Range<usize>>,
    /// How many images the messages hold.
    pub images: usize,
    /// Whether to tokenize with the tokenizer's special tokens (its BOS): false when `text`
    /// already starts with the BOS token, as transformers' processor decides.
    pub add_special_tokens: bool,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template given as text, with no special tokens (add them with
    /// [`ChatTemplate::with_special_tokens`]).
    pub fn new(source: &str) -> Result<Self> {
        Self::compile(source, PathBuf::from("<chat template>"))
    }

    /// The same template rendered with these special tokens (`bos_token`, `eos_token`, ...),
    /// replacing those of the same name.
    pub fn with_special_tokens(
        mut self,
        tokens: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        self.special_tokens.extend(tokens);
        self
    }

    /// The special tokens the template is rendered with (name → token text).
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    /// The BOS token text, when the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_tokens.get("bos_token").map(String::as_str)
    }

    /// Where the template came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The chat template of a model directory, found as transformers 5.23 finds it; `Ok(None)`
    /// when the model has none. In order: the processor's (`processor_config.json`'s
    /// `chat_template` string, else `chat_template.json`'s `{"chat_template": "..."}`, which
    /// transformers' processor prefers over `chat_template.jinja`), else `chat_template.jinja`,
    /// else `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// of which `default` is used). Special tokens: the seven standard ones (`bos_token`,
    /// `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`) and the
    /// named `extra_special_tokens` of `tokenizer_config.json`, overridden by every entry of
    /// `special_tokens_map.json`; each a string or a `{"content": ...}` object.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        let processor_config = read_json(&dir.join("processor_config.json"))?;
        let legacy = read_json(&dir.join("chat_template.json"))?;
        let jinja = dir.join("chat_template.jinja");
        let found = if let Some((path, v)) = processor_config
            .as_ref()
            .filter(|(_, v)| !v["chat_template"].is_null())
        {
            Some((string_at(path, v, "chat_template")?, path.clone()))
        } else if let Some((path, v)) = &legacy {
            Some((string_at(path, v, "chat_template")?, path.clone()))
        } else if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            Some((text, jinja))
        } else if let Some((path, v)) = &tokenizer_config {
            tokenizer_config_template(path, v)?.map(|t| (t, path.clone()))
        } else {
            None
        };
        let Some((text, path)) = found else {
            return Ok(None);
        };
        let mut special = BTreeMap::new();
        if let Some((_, v)) = &tokenizer_config {
            for key in SPECIAL_TOKEN_KEYS {
                if let Some(t) = token_text(&v[key]) {
                    special.insert(key.to_string(), t);
                }
            }
            if let Some(extra) = v["extra_special_tokens"].as_object() {
                special.extend(
                    extra
                        .iter()
                        .filter_map(|(k, t)| Some((k.clone(), token_text(t)?))),
                );
            }
        }
        if let Some((_, v)) = read_json(&dir.join("special_tokens_map.json"))?
            && let Some(map) = v.as_object()
        {
            special.extend(
                map.iter()
                    .filter_map(|(k, t)| Some((k.clone(), token_text(t)?))),
            );
        }
        Ok(Some(
            Self::compile(&text, path)?.with_special_tokens(special),
        ))
    }

    /// Compiles `text` in an environment set up like transformers' `_compile_jinja_template`:
    /// `trim_blocks` and `lstrip_blocks`, no auto-escaping, loop controls, Python string/dict/list methods,
    /// `raise_exception`, `strftime_now`, transformers' `tojson`, and the `{% generation %}` tag
    /// (rendered as its body, as transformers does when it is not tracking assistant tokens).
    fn compile(text: &str, source: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| config_err(&source, e))?;
        env.set_syntax(syntax);
        // Jinja's default (transformers sets none); minijinja would escape by file extension
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // registered under its file's name, which minijinja's errors then name
        env.add_template_owned(source.display().to_string(), rewrite_generation_tags(text))
            .map_err(|e| config_err(&source, e))?;
        Ok(ChatTemplate {
            env,
            source,
            special_tokens: BTreeMap::new(),
            text_content: false,
        })
    }

    /// Passes each message whose parts are all text with `content` as one string (the parts
    /// joined) instead of a list of parts: what transformers' tokenizer (rather than a
    /// multimodal processor) hands a text-only model's template, e.g. SmolLM2's, which writes
    /// `message['content']` directly. Messages with an image keep the list.
    pub fn with_text_content(mut self, on: bool) -> Self {
        self.text_content = on;
        self
    }

    /// Renders `messages` as transformers' processor does: the context holds `messages` (each
    /// `{"role", "content": [{"type": "text", "text"} | {"type": "image"}]}`),
    /// `add_generation_prompt`, `tools` and `documents` (none), and the special tokens. There must
    /// be at least one message and every role must be non-empty. A template that calls
    /// `raise_exception(msg)`, or fails otherwise, is an [`Error::Prompt`] with its message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Prompt("the chat has no messages".into()));
        }
        if let Some(i) = messages.iter().position(|m| m.role.trim().is_empty()) {
            return Err(Error::Prompt(format!("chat message {i} has an empty role")));
        }
        let tokens = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from(v.as_str())));
        let messages_value = match self.text_content {
            false => Value::from(Serde(messages)),
            true => Value::from_iter(messages.iter().map(|m| {
                let text: Option<String> = (m.content.iter())
                    .map(|p| match p {
                        ChatPart::Text(t) => Some(t.as_str()),
                        ChatPart::Image => None,
                    })
                    .collect();
                match text {
                    Some(text) => Value::from(Serde(serde_json::json!({
                        "role": m.role, "content": text
                    }))),
                    None => Value::from(Serde(m)),
                }
            })),
        };
        let fixed = [
            ("messages", messages_value),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        let ctx = Value::from_pairs(tokens.chain(fixed));
        let template = self
            .env
            .get_template(&self.source.display().to_string())
            .map_err(|e| config_err(&self.source, e))?;
        template.render(ctx).map_err(|e| {
            let at = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
            // The file's name only: this message goes back to clients.
            let name = self.source.file_name().unwrap_or(self.source.as_os_str());
            Error::Prompt(format!(
                "the chat template {}{at}: {}",
                name.to_string_lossy(),
                e.detail()
                    .map_or_else(|| e.kind().to_string(), str::to_string)
            ))
        })
    }

    /// [`ChatTemplate::render`], and where the user messages' text parts landed in the output.
    /// They are found by rendering once more with each text replaced by a unique marker: when
    /// putting the texts back in place of the markers gives exactly the real output, the markers'
    /// places are the texts' places. Otherwise (the template transforms or repeats the text, e.g.
    /// `| trim`) each text, or else its trimmed form, is searched for in order after the previous
    /// one; a text not found has no range.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedChat> {
        let text = self.render(messages, add_generation_prompt)?;
        let texts: Vec<&str> = messages
            .iter()
            .filter(|m| m.role == "user")
            .flat_map(|m| &m.content)
            .filter_map(|p| match p {
                ChatPart::Text(t) => Some(t.as_str()),
                ChatPart::Image => None,
            })
            .collect();
        let mut k = 0;
        let marked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: (m.content.iter())
                    .map(|p| match p {
                        ChatPart::Text(_) if m.role == "user" => {
                            k += 1;
                            ChatPart::Text(marker(k - 1))
                        }
                        p => p.clone(),
                    })
                    .collect(),
            })
            .collect();
        let user_texts = self
            .render(&marked, add_generation_prompt)
            .ok()
            .and_then(|m| spans_from_markers(&m, &texts, &text))
            .unwrap_or_else(|| spans_by_search(&text, &texts));
        let images = (messages.iter().flat_map(|m| &m.content))
            .filter(|p| matches!(p, ChatPart::Image))
            .count();
        // A processor adds them unless the text starts with BOS; a text model's tokenizer
        // (`tokenizer.apply_chat_template`) never adds them: its template writes them.
        let add_special_tokens =
            !self.text_content && !self.bos_token().is_some_and(|b| text.starts_with(b));
        Ok(RenderedChat {
            text,
            user_texts,
            images,
            add_special_tokens,
        })
    }
}

/// The marker standing for user text `i` (private-use characters no template or text writes).
fn marker(i: usize) -> String {
    format!("\u{F8F0}{i}\u{F8F1}")
}

/// The ranges of `texts` in `real`, when replacing marker `i` of `marked` by `texts[i]` (each
/// marker once, in order) gives exactly `real`.
fn spans_from_markers(marked: &str, texts: &[&str], real: &str) -> Option<Vec<Range<usize>>> {
    let mut rebuilt = String::with_capacity(real.len());
    let mut spans = Vec::with_capacity(texts.len());
    let mut rest = marked;
    for (i, t) in texts.iter().enumerate() {
        let (before, after) = rest.split_once(&marker(i))?;
        rebuilt.push_str(before);
        spans.push(rebuilt.len()..rebuilt.len() + t.len());
        rebuilt.push_str(t);
        rest = after;
    }
    rebuilt.push_str(rest);
    (rebuilt == real).then_some(spans)
}

/// The ranges of `texts` (or else of their trimmed forms) in `real`, searched in order.
fn spans_by_search(real: &str, texts: &[&str]) -> Vec<Range<usize>> {
    let mut from = 0;
    let mut spans = Vec::new();
    for t in texts {
        let found = [*t, t.trim()]
            .into_iter()
            .filter(|c| !c.is_empty())
            .find_map(|c| real[from..].find(c).map(|p| from + p..from + p + c.len()));
        if let Some(r) = found {
            from = r.end;
            spans.push(r);
        }
    }
    spans
}

/// Tokenizes a rendered chat as transformers' LLaVA processor does after `apply_chat_template`,
/// and assigns every position its [`Segment`].
///
/// - Images: every occurrence of `image.token` (LLaVA's `<image>`) in the text is one image's
///   placeholder and becomes `image.count` copies of it (the processor's
///   `text.replace(image_token, image_token * num_image_tokens)`). The number of placeholders
///   must equal `chat.images`; images without an `image` slot (a model with no vision tower)
///   are an error.
/// - Special tokens: added (the BOS) unless the text starts with the BOS token
///   ([`RenderedChat::add_special_tokens`]).
/// - Segments (PRUNING.md): image tokens are `Image`; with images, every token before the first
///   image token is `System`; without, every token before the first user text (BOS, system
///   prompt, `USER:`), as [`super::template::build_prompt`] does; after that boundary, tokens
///   inside a user text part are `Text`, the rest `Template`.
/// - The prompt must fit `max_len` tokens (the model's context).
pub fn build_chat_prompt(
    tok: &Tokenizer,
    chat: &RenderedChat,
    image: Option<&ImageSlot>,
    max_len: usize,
) -> Result<Prompt> {
    let (slot, image_id) = match image {
        Some(slot) if chat.images > 0 => {
            if slot.token.is_empty() || slot.count == 0 {
                return Err(Error::Prompt(format!(
                    "the image slot ({:?} x {}) has no tokens",
                    slot.token, slot.count
                )));
            }
            let id = tok.token_to_id(&slot.token).ok_or_else(|| {
                Error::Prompt(format!("the tokenizer has no image token `{}`", slot.token))
            })?;
            (Some(slot), Some(id))
        }
        Some(slot) => (Some(slot), None),
        None if chat.images > 0 => {
            return Err(Error::Prompt(format!(
                "the chat has {} image(s) but the model has no vision tower",
                chat.images
            )));
        }
        None => (None, None),
    };
    // Placeholders and the expanded text; `shift(p)` maps a byte of `chat.text` into it.
    let places: Vec<usize> = slot.map_or_else(Vec::new, |s| {
        chat.text.match_indices(&s.token).map(|(p, _)| p).collect()
    });
    if places.len() != chat.images {
        return Err(Error::Prompt(format!(
            "the chat has {} image(s) but the template rendered {} `{}` placeholder(s)",
            chat.images,
            places.len(),
            slot.map_or("<image>", |s| s.token.as_str())
        )));
    }
    let (text, grow) = match slot {
        Some(s) if !places.is_empty() => (
            chat.text.replace(&s.token, &s.token.repeat(s.count)),
            s.token.len() * (s.count - 1),
        ),
        _ => (chat.text.clone(), 0),
    };
    let shift = |p: usize| p + grow * places.iter().take_while(|&&q| q < p).count();
    let user_texts: Vec<Range<usize>> = (chat.user_texts.iter())
        .map(|r| shift(r.start)..shift(r.end))
        .collect();
    let boundary = match (places.first(), user_texts.first()) {
        (Some(&p), _) => p,
        (None, Some(r)) => r.start,
        (None, None) => text.len(),
    };
    let enc = tok.encode(&text, chat.add_special_tokens)?;
    let segments = segments_of(&enc.ids, &enc.offsets, image_id, boundary, &user_texts);
    if let Some(s) = slot {
        let got = segments.iter().filter(|&&g| g == Segment::Image).count();
        if got != chat.images * s.count {
            return Err(Error::Prompt(format!(
                "{} `{}` placeholder(s) expanded to {got} image tokens, expected {} (the tokenizer splits `{}`?)",
                chat.images,
                s.token,
                chat.images * s.count,
                s.token
            )));
        }
    }
    Prompt::within(enc.ids, segments, max_len)
}

/// The prompt of a chat for generation: [`ChatTemplate::render_chat`] with
/// `add_generation_prompt` (the template's opening of the assistant's turn, e.g. `ASSISTANT:`),
/// then [`build_chat_prompt`]. `image` is the model's image slot (None for a model without a
/// vision tower); `max_len` its context.
pub fn chat_prompt(
    template: &ChatTemplate,
    tok: &Tokenizer,
    messages: &[ChatMessage],
    image: Option<&ImageSlot>,
    max_len: usize,
) -> Result<Prompt> {
    build_chat_prompt(tok, &template.render_chat(messages, true)?, image, max_len)
}

/// Rewrites transformers' `{% generation %}`/`{% endgeneration %}` tags (an extension tag that
/// renders its body) as `{% if true %}`/`{% endif %}`, keeping whitespace control markers.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(p) = rest.find("{%") {
        let (head, tag) = rest.split_at(p + 2);
        out.push_str(head);
        rest = tag;
        let body = tag.trim_start_matches(['-', '+']).trim_start();
        let word_len = body
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let replacement = match &body[..word_len] {
            "generation" => "if true",
            "endgeneration" => "endif",
            _ => continue,
        };
        let after = &body[word_len..];
        if after
            .trim_start()
            .trim_start_matches(['-', '+'])
            .starts_with("%}")
        {
            out.push_str(&tag[..tag.len() - body.len()]);
            out.push_str(replacement);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `raise_exception(msg)`: the template refuses the chat.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(format)`: Python's `datetime.now().strftime(format)` (local time).
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        )
    })?;
    Ok(out)
}

/// transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)` with those keyword arguments (no HTML escaping, `", "` and
/// `": "` separators, keys in insertion order).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let bad = |msg: String| minijinja::Error::new(ErrorKind::InvalidOperation, msg);
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent.filter(|v| !v.is_none()) {
        None => None,
        Some(v) => Some(match (v.as_i64(), v.as_str()) {
            (Some(n), _) => " ".repeat(n.max(0) as usize),
            (None, Some(s)) => s.to_string(),
            _ => {
                return Err(bad(format!(
                    "tojson: indent must be an int or a string, not {v}"
                )));
            }
        }),
    };
    let (item_sep, key_sep) = match separators.filter(|v| !v.is_none()) {
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.to_string(), b.to_string())
                }
                _ => {
                    return Err(bad(format!(
                        "tojson: separators must be two strings, not {v}"
                    )));
                }
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    json.write(value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python's `json.dumps` settings.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(
        &self,
        v: &Value,
        depth: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&v.to_string()),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                let items = keys
                    .into_iter()
                    .map(|k| Ok((Some(k.to_string()), v.get_item(&k)?)))
                    .collect::<std::result::Result<Vec<_>, minijinja::Error>>()?;
                self.container(('{', '}'), &items, depth, out)?;
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<_> = v.try_iter()?.map(|x| (None, x)).collect();
                self.container(('[', ']'), &items, depth, out)?;
            }
            kind => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of type {kind} is not JSON serializable"),
                ));
            }
        }
        Ok(())
    }

    fn container(
        &self,
        (open, close): (char, char),
        items: &[(Option<String>, Value)],
        depth: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        for (i, (key, item)) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(ind) = &self.indent {
                out.push('\n');
                out.push_str(&ind.repeat(depth + 1));
            }
            if let Some(k) = key {
                self.string(k, out);
                out.push_str(&self.key_sep);
            }
            self.write(item, depth + 1, out)?;
        }
        if let (Some(ind), false) = (&self.indent, items.is_empty()) {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
        out.push(close);
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c < ' ' || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

fn config_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// A JSON file with its path, or None when it does not exist.
fn read_json(path: &Path) -> Result<Option<(PathBuf, serde_json::Value)>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v = serde_json::from_str(&text).map_err(|e| config_err(path, e))?;
    Ok(Some((path.to_path_buf(), v)))
}

/// The string at `key` of a JSON object.
fn string_at(path: &Path, v: &serde_json::Value, key: &str) -> Result<String> {
    v[key]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| config_err(path, format!("`{key}` is not a string")))
}

/// `tokenizer_config.json`'s `chat_template`: a string, or `[{name, template}]` whose `default`
/// is used; None when absent.
fn tokenizer_config_template(path: &Path, v: &serde_json::Value) -> Result<Option<String>> {
    match &v["chat_template"] {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .map(|t| string_at(path, t, "template"))
            .transpose()?
            .ok_or_else(|| config_err(path, "named chat templates but none is called `default`"))
            .map(Some),
        _ => Err(config_err(
            path,
            "`chat_template` is neither a string nor a list",
        )),
    }
}

/// A special token's text: a string or an `AddedToken` object's `content`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .or_else(|| v["content"].as_str())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, text: &str) -> Result<String> {
        ChatTemplate::new(src)?.render(&[ChatMessage::user(text)], false)
    }

    #[test]
    fn templates_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn generation_tags_render_their_body_with_whitespace_control() {
        let src = "{% generation %}a{% endgeneration %}|{%- generation -%} b {%- endgeneration +%} |{%+ generation\n%}\nc{% endgeneration %}|{{ 'generation' }}";
        assert_eq!(
            rewrite_generation_tags(src),
            "{% if true %}a{% endif %}|{%- if true -%} b {%- endif +%} |{%+ if true\n%}\nc{% endif %}|{{ 'generation' }}"
        );
        // trim_blocks eats the newline after a block tag, as it does after transformers' tag
        assert_eq!(render(src, "").unwrap(), "a|b |c|generation");
        // not the tag: left alone (and then unknown to the parser)
        assert_eq!(
            rewrite_generation_tags("{% generations %}"),
            "{% generations %}"
        );
    }

    /// Outputs of Python's `json.dumps` for the same value (transformers' `tojson`).
    #[test]
    fn tojson_is_pythons_json_dumps() {
        let value = "{'b': [1, 2.5, {}], 'a': messages[0]['content'][0]['text'], 'c': none, 'd': true, 'e': []}";
        let text = "é\"\n\u{1}<>&";
        let cases = [
            (
                "",
                r#"{"b": [1, 2.5, {}], "a": "é\"\n\u0001<>&", "c": null, "d": true, "e": []}"#,
            ),
            (
                "(indent=2, sort_keys=true)",
                "{\n  \"a\": \"é\\\"\\n\\u0001<>&\",\n  \"b\": [\n    1,\n    2.5,\n    {}\n  ],\n  \"c\": null,\n  \"d\": true,\n  \"e\": []\n}",
            ),
            (
                "(ensure_ascii=true, separators=(',', ':'))",
                r#"{"b":[1,2.5,{}],"a":"\u00e9\"\n\u0001<>&","c":null,"d":true,"e":[]}"#,
            ),
        ];
        for (args, want) in cases {
            let src = format!("{{{{ {value} | tojson{args} }}}}");
            assert_eq!(render(&src, text).unwrap(), want, "{args}");
        }
        let e = render("{{ 1 | tojson(indent=[1]) }}", "").unwrap_err();
        assert!(e.to_string().contains("indent"), "{e}");
        let e = render("{{ 1 | tojson(bogus=1) }}", "").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn python_methods_and_strftime_now() {
        let src = "{{ messages[0]['content'][0]['text'].strip().upper() }}|{{ messages[0].get('x', 'none') }}|{{ strftime_now('%Y-%m') | length }}";
        assert_eq!(render(src, "  hi  ").unwrap(), "HI|none|7");
        let e = render("{{ strftime_now('%Q') }}", "").unwrap_err();
        assert!(
            matches!(e, Error::Prompt(_)) && e.to_string().contains("%Q"),
            "{e}"
        );
    }

    #[test]
    fn user_texts_are_found_where_the_template_put_them() {
        let msgs = [
            ChatMessage::system("user"),
            ChatMessage::user(" user "),
            ChatMessage::assistant("ok"),
            ChatMessage::user("again"),
        ];
        // verbatim: the markers place the text even where the same words appear earlier
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {{ m.content[0].text }}\n{% endfor %}",
        )
        .unwrap();
        let chat = t.render_chat(&msgs, false).unwrap();
        let spans: Vec<&str> = chat
            .user_texts
            .iter()
            .map(|r| &chat.text[r.clone()])
            .collect();
        assert_eq!(spans, [" user ", "again"]);
        assert_eq!(chat.user_texts[0].start, "system: user\nuser: ".len());
        // transformed (trimmed): found by searching for the trimmed text, in order
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.content[0].text | trim }}>{% endfor %}",
        )
        .unwrap();
        let chat = t.render_chat(&msgs[1..], false).unwrap();
        assert_eq!(chat.text, "<user><ok><again>");
        assert_eq!(chat.user_texts, [1..5, 11..16]);
    }
}
