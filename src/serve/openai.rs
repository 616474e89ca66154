//! The OpenAI chat-completions wire format (the subset a chat client uses), and its translation
//! into an engine [`Request`]: messages with text and images, sampling, stops, and fineprune's
//! `prune` extension.

use super::ServeConfig;
use crate::engine::{ImageInput, Request, Sampling, StopReason};
use crate::error::{Error, Result};
use crate::model::chat::{ChatMessage, ChatPart};
use crate::prune::{Keep, PrunePlan, Stage, StrategyParams, head_strategy, query_strategy};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Component, Path};

/// `POST /v1/chat/completions`'s body. Fields a client may send that change nothing here
/// (`user`, `frequency_penalty` at 0, ...) are ignored; fields whose meaning we cannot honour
/// (`n > 1`, `logprobs`, `tools`) are refused.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<WireMessage>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u64>,
    #[serde(default)]
    pub logprobs: bool,
    pub tools: Option<Value>,
    /// fineprune: keep generating past the end-of-sequence token (as vLLM's `ignore_eos`).
    #[serde(default)]
    pub ignore_eos: bool,
    /// fineprune: this request's visual token pruning (`"none"` turns the server's default off).
    pub prune: Option<PruneField>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `prune`: a plan, or `"none"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PruneField {
    Plan(WirePlan),
    Word(String),
}

/// The `prune` extension: `{"layer": 2, "keep": 0.25, "head": "variance", "query":
/// "text_tokens_only"}`. `layer` and `keep` may be lists (a multi-stage plan); `keep` is a
/// fraction of the image tokens (0.25) or a count (144). Absent fields take the server's
/// default plan's values, or FastV's (layer 2, keep 0.5, `sum`, `last_token`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WirePlan {
    pub layer: Option<OneOrMany<usize>>,
    pub keep: Option<OneOrMany<Value>>,
    pub head: Option<String>,
    pub query: Option<String>,
    pub renumber: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    // First: untagged tries variants in order, and a `Value` would take a list whole.
    Many(Vec<T>),
    One(T),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Option<WireContent>,
}

/// A message's content: a string, or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum WireContent {
    Text(String),
    Parts(Vec<WirePart>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WirePart {
    Text {
        text: String,
    },
    ImageUrl {
        image_url: ImageUrl,
    },
    #[serde(other)]
    Other,
}

/// `image_url`: `{"url": ...}` or the URL itself.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Url(String),
}

/// The engine request of a chat-completions body, or a client error saying what is wrong.
pub fn to_request(body: ChatRequest, cfg: &ServeConfig) -> Result<(Request, bool)> {
    if let Some(m) = body.model.as_deref()
        && m != cfg.model_name
    {
        return Err(Error::arg(
            "model",
            format!(
                "`{m}` is not served here; this server serves `{}`",
                cfg.model_name
            ),
        ));
    }
    if body.n.is_some_and(|n| n != 1) {
        return Err(Error::arg("n", "only n = 1 is supported"));
    }
    if body.logprobs {
        return Err(Error::arg(
            "logprobs",
            "log-probabilities are not supported",
        ));
    }
    if body.tools.is_some() {
        return Err(Error::arg("tools", "tool calls are not supported"));
    }
    if body.messages.is_empty() {
        return Err(Error::arg("messages", "is empty"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    let mut images = Vec::new();
    for (i, m) in body.messages.into_iter().enumerate() {
        let content = match m.content {
            None => vec![],
            Some(WireContent::Text(t)) => vec![ChatPart::Text(t)],
            Some(WireContent::Parts(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, p) in parts.into_iter().enumerate() {
                    let at = format!("messages[{i}].content[{j}]");
                    match p {
                        WirePart::Text { text } => out.push(ChatPart::Text(text)),
                        WirePart::ImageUrl { image_url } => {
                            let url = match image_url {
                                ImageUrl::Object { url } | ImageUrl::Url(url) => url,
                            };
                            images.push(image_input(&url, cfg).map_err(|e| in_part(e, &at))?);
                            out.push(ChatPart::Image);
                        }
                        WirePart::Other => {
                            return Err(Error::arg(
                                at,
                                "unsupported content part type (use `text` or `image_url`)",
                            ));
                        }
                    }
                }
                out
            }
        };
        messages.push(ChatMessage {
            role: m.role,
            content,
        });
    }
    if images.len() > cfg.max_images {
        return Err(Error::arg(
            "messages",
            format!(
                "{} images given; this server takes at most {} per request (--max-images)",
                images.len(),
                cfg.max_images
            ),
        ));
    }
    let max_new_tokens = match body.max_completion_tokens.or(body.max_tokens) {
        Some(0) => return Err(Error::arg("max_tokens", "must be at least 1")),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => cfg.max_tokens,
    };
    let temperature = body.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(Error::arg(
            "temperature",
            format!("must be in [0, 2], got {temperature}"),
        ));
    }
    let stop = match body.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > 16 {
        return Err(Error::arg("stop", "at most 16 stop strings"));
    }
    let prune = match body.prune {
        // The server's plan prunes image tokens: a text-only chat has none to prune.
        None => cfg.default_plan.clone().filter(|_| !images.is_empty()),
        Some(PruneField::Word(w)) if w == "none" => None,
        Some(PruneField::Word(w)) => {
            return Err(Error::arg(
                "prune",
                format!("`{w}` is neither a plan object nor \"none\""),
            ));
        }
        Some(PruneField::Plan(p)) => Some(plan(p, cfg.default_plan.as_ref())?),
    };
    let mut req = Request::chat(messages, images);
    req.max_new_tokens = max_new_tokens;
    req.sampling = Sampling {
        temperature,
        top_p: body.top_p.unwrap_or(1.0),
        // No seed: a fresh draw per request, as OpenAI's API does.
        seed: body.seed.map_or_else(rand::random, |s| s as u64),
    };
    req.stop = stop;
    req.stop_on_eos = !body.ignore_eos;
    req.prune = prune;
    Ok((req, body.stream))
}

/// Prefixes an argument error with the content part it came from.
fn in_part(e: Error, at: &str) -> Error {
    match e {
        Error::Arg { name, msg } => Error::arg(format!("{at}.{name}"), msg),
        e => e,
    }
}

/// An image URL: a `data:` URL (base64), or, when the server has `--image-dir`, a path or
/// `file://` URL inside that directory. Network URLs are refused (the server fetches nothing).
fn image_input(url: &str, cfg: &ServeConfig) -> Result<ImageInput> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| Error::arg("image_url", "a data URL needs a `,` before its data"))?;
        if !meta.ends_with(";base64") {
            return Err(Error::arg(
                "image_url",
                "a data URL must be base64 (`data:image/png;base64,...`)",
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| Error::arg("image_url", format!("bad base64 in the data URL: {e}")))?;
        return Ok(ImageInput::Bytes(bytes));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(Error::arg(
            "image_url",
            "this server does not fetch URLs; send the image as a data URL",
        ));
    }
    let Some(dir) = &cfg.image_dir else {
        return Err(Error::arg(
            "image_url",
            "file paths are off on this server (start it with --image-dir); send a data URL",
        ));
    };
    let rel = Path::new(url.strip_prefix("file://").unwrap_or(url));
    let rel = rel.strip_prefix(dir).unwrap_or(rel);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Error::arg(
            "image_url",
            format!("`{url}` leaves the image directory; give a path relative to it without `..`"),
        ));
    }
    Ok(ImageInput::Path(dir.join(rel)))
}

/// A plan from the `prune` extension; absent fields from `default` (or FastV's).
fn plan(p: WirePlan, default: Option<&PrunePlan>) -> Result<PrunePlan> {
    let fastv = PrunePlan::fastv();
    let base = default.unwrap_or(&fastv);
    let layers = match p.layer {
        Some(l) => l.into_vec(),
        None => base.stages.iter().map(|s| s.layer).collect(),
    };
    let keeps: Vec<Keep> = match p.keep {
        Some(k) => k.into_vec().iter().map(keep).collect::<Result<_>>()?,
        None => base.stages.iter().map(|s| s.keep).collect(),
    };
    if layers.is_empty() {
        return Err(Error::arg("prune.layer", "no layers"));
    }
    let named = |e: Error, field: &str| match e {
        Error::Arg { msg, .. } => Error::arg(format!("prune.{field}"), msg),
        e => e,
    };
    let mut plan = PrunePlan::new(Stage::per_layer(&layers, &keeps).map_err(|e| named(e, "keep"))?);
    let params = StrategyParams::default();
    plan.head = match &p.head {
        Some(h) => head_strategy(h, &params).map_err(|e| named(e, "head"))?,
        None => base.head.clone(),
    };
    plan.query = match &p.query {
        Some(q) => query_strategy(q, &params).map_err(|e| named(e, "query"))?,
        None => base.query.clone(),
    };
    plan.head_keep = base.head_keep;
    plan.renumber = p.renumber.unwrap_or(base.renumber);
    Ok(plan)
}

/// A keep value: a JSON number (0.25 is a fraction, 144 a count) or such a string.
fn keep(v: &Value) -> Result<Keep> {
    let bad = || {
        Error::arg(
            "prune.keep",
            format!("`{v}` is neither a fraction in (0, 1] nor a token count"),
        )
    };
    let k = match v {
        Value::Number(n) if n.is_u64() => n.as_u64().map(|c| match c {
            0 | 1 => Keep::Fraction(c as f64),
            c => Keep::Count(c as usize),
        }),
        Value::Number(n) => n.as_f64().map(Keep::Fraction),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(bad)?;
    match k {
        Keep::Fraction(f) if !(f > 0.0 && f <= 1.0) => Err(bad()),
        k => Ok(k),
    }
}

/// OpenAI's `finish_reason` of a stop.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopToken | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::Context => "length",
    }
}

/// `usage`.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ServeConfig {
        ServeConfig {
            model_name: "m".into(),
            ..ServeConfig::default()
        }
    }

    fn parse(v: serde_json::Value) -> Result<Request> {
        let body: ChatRequest = serde_json::from_value(v).unwrap();
        to_request(body, &cfg()).map(|r| r.0)
    }

    #[test]
    fn plans_from_the_prune_extension() {
        let r = parse(serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}],
            "prune": {"layer": [2, 4], "keep": [0.5, 9], "head": "variance", "query": "text_tokens_only"}
        }))
        .unwrap();
        let p = r.prune.unwrap();
        assert_eq!(
            p.stages,
            vec![
                Stage {
                    layer: 2,
                    keep: Keep::Fraction(0.5)
                },
                Stage {
                    layer: 4,
                    keep: Keep::Count(9)
                }
            ]
        );
        for (bad, field) in [
            (serde_json::json!({"head": "nope"}), "prune.head"),
            (serde_json::json!({"query": "nope"}), "prune.query"),
            (serde_json::json!({"keep": 1.5}), "prune.keep"),
            (
                serde_json::json!({"keep": [0.5, 0.2], "layer": 2}),
                "prune.keep",
            ),
        ] {
            let e = parse(serde_json::json!({
                "messages": [{"role": "user", "content": "hi"}], "prune": bad
            }))
            .unwrap_err();
            assert!(e.is_client_error() && e.to_string().contains(field), "{e}");
        }
        // The server-wide plan applies to requests with images only.
        let with_default = ServeConfig {
            model_name: "m".into(),
            default_plan: Some(PrunePlan::fastv()),
            ..ServeConfig::default()
        };
        let text = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        let body: ChatRequest = serde_json::from_value(text).unwrap();
        assert!(to_request(body, &with_default).unwrap().0.prune.is_none());
        let none = parse(serde_json::json!({
            "messages": [{"role": "user", "content": "hi"}], "prune": "none"
        }))
        .unwrap();
        assert!(none.prune.is_none());
    }

    #[test]
    fn images_and_refusals() {
        let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG....");
        let r = parse(
            serde_json::json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
                {"type": "text", "text": "what?"}
            ]}]}),
        )
        .unwrap();
        assert_eq!(r.images.len(), 1);
        for (body, want) in [
            (
                serde_json::json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}),
                "bad base64",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
                "does not fetch",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}),
                "--image-dir",
            ),
            (serde_json::json!({"messages": [], "n": 1}), "empty"),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n = 1",
            ),
            (
                serde_json::json!({"messages": [{"role": "user", "content": "x"}], "model": "other"}),
                "not served",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.is_client_error() && e.to_string().contains(want), "{e}");
        }
        let dir = ServeConfig {
            model_name: "m".into(),
            image_dir: Some("/srv/images".into()),
            ..ServeConfig::default()
        };
        assert!(matches!(
            image_input("cats/a.png", &dir).unwrap(),
            ImageInput::Path(p) if p == Path::new("/srv/images/cats/a.png")
        ));
        assert!(image_input("../secret.png", &dir).is_err());
        assert!(image_input("/etc/passwd", &dir).is_err());
    }
}
