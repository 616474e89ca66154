//! The LLaVA-1.5 prompt: `[system ]USER: <image>\n{question} ASSISTANT:`, with `<image>` expanded to
//! the vision tower's token count, and the segment (System/Image/Text/Template) of every position.

use super::anyres::VisualToken;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use std::ops::Range;
use std::path::Path;

/// The placeholder users write for the image.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// LLaVA-1.5's system prompt (`conv_vicuna_v1` / `llava_v1`).
pub const LLAVA_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// LLaVA-1.5's conversation format (`conv_vicuna_v1`: `{system} USER: <image>\n{q1} ASSISTANT:
/// {a1}</s>USER: {q2} ASSISTANT:`) as a transformers chat template (Jinja, the processor's
/// `chat_template`). `distill` writes it into the models it creates, so transformers'
/// `apply_chat_template` builds the prompts they were trained on, and [`system_of_model`] tells our
/// engine to put [`LLAVA_SYSTEM`] before `USER:`.
pub const LLAVA_V1_CHAT_TEMPLATE: &str = concat!(
    "{{ \"A chat between a curious human and an artificial intelligence assistant. The assistant ",
    "gives helpful, detailed, and polite answers to the human's questions. \" }}",
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}",
    "{{ '<image>\\n' }}{% endfor %}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}",
    "{{ content['text'] }}{% endfor %}{{ ' ' }}",
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}",
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}",
    "{{ content['text'] }}{% endfor %}{{ '</s>' }}{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
);

/// The system prompt a model directory's chat template puts before `USER:`: [`LLAVA_SYSTEM`] when
/// its `chat_template.json` (transformers' processor file, `{"chat_template": "..."}`) contains
/// that text, as the template of `distill`'s models does; None without the file or with
/// llava-hf's own template, which has no system prompt.
pub fn system_of_model(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("chat_template.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let template = v["chat_template"].as_str().ok_or_else(|| Error::Config {
        path: path.clone(),
        msg: "no `chat_template` string".into(),
    })?;
    Ok(template
        .contains(LLAVA_SYSTEM)
        .then(|| LLAVA_SYSTEM.to_string()))
}

/// Which part of the prompt a position belongs to (PRUNING.md, "Positions and segments").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Everything before the image: BOS, system prompt, `USER:`.
    System,
    /// The visual tokens.
    Image,
    /// The user's question after the image.
    Text,
    /// Template text after the image that is not the question (`\n`, ` ASSISTANT:`).
    Template,
}

/// A tokenized prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub segments: Vec<Segment>,
    /// What each image token shows, one per [`Segment::Image`] position in order (its image,
    /// tile, or LLaVA-NeXT row newline), filled in by [`crate::Engine::prepare`]. Empty for a
    /// prompt built without the images: its image tokens then count as tile 0 of image 0.
    pub visual: Vec<VisualToken>,
    /// For images reduced before the LM ([`crate::prune::before`]): the grid patch each image
    /// token is as it is (`None`: merged or CLS), one per image token; empty otherwise.
    pub patches: Vec<Option<usize>>,
}

impl Prompt {
    /// A prompt of `ids` and their `segments`, refused when longer than the model's context
    /// `max_len`.
    pub(crate) fn within(ids: Vec<u32>, segments: Vec<Segment>, max_len: usize) -> Result<Prompt> {
        if ids.len() > max_len {
            return Err(Error::Prompt(format!(
                "the prompt is {} tokens, longer than the model's context of {max_len}",
                ids.len()
            )));
        }
        Ok(Prompt {
            ids,
            segments,
            visual: vec![],
            patches: vec![],
        })
    }

    /// The prompt with image `k`'s one `image_id` token (in order) repeated `counts[k]` times,
    /// each an image token: LLaVA-NeXT's expansion once the image sizes are known, which
    /// gives the tokens what expanding the text before tokenizing would (the image token is a
    /// special token, which the tokenizer never merges with its neighbours). A prompt with
    /// another number of image tokens is an [`Error::Prompt`]; the result must fit `max_len`.
    pub fn expand_images(self, image_id: u32, counts: &[usize], max_len: usize) -> Result<Prompt> {
        let found = self.ids.iter().filter(|&&i| i == image_id).count();
        if found != counts.len() {
            return Err(Error::Prompt(format!(
                "the prompt has {found} image tokens (id {image_id}) for {} image(s)",
                counts.len()
            )));
        }
        let total = self.ids.len() - found + counts.iter().sum::<usize>();
        let (mut ids, mut segments) = (Vec::with_capacity(total), Vec::with_capacity(total));
        let mut next = counts.iter();
        for (&id, &seg) in self.ids.iter().zip(&self.segments) {
            let n = match id == image_id {
                true => next.next().copied().unwrap_or(0),
                false => 1,
            };
            let seg = if id == image_id { Segment::Image } else { seg };
            ids.extend(std::iter::repeat_n(id, n));
            segments.extend(std::iter::repeat_n(seg, n));
        }
        let mut p = Prompt::within(ids, segments, max_len)?;
        (p.visual, p.patches) = (self.visual, self.patches);
        Ok(p)
    }

    /// Positions of the image tokens.
    pub fn image_positions(&self) -> Vec<usize> {
        (0..self.segments.len())
            .filter(|&i| self.segments[i] == Segment::Image)
            .collect()
    }
}

/// How the user's text becomes the prompt.
#[derive(Debug, Clone, Default)]
pub struct PromptOptions {
    /// Use the text verbatim (no `USER:`/`ASSISTANT:`); it must then contain `<image>` itself when
    /// an image is given.
    pub raw: bool,
    /// A system prompt before `USER:` (e.g. [`LLAVA_SYSTEM`]); ignored when `raw`.
    pub system: Option<String>,
    /// Pad the image to a square with the mean colour before preprocessing (LLaVA's `pad`).
    pub pad_to_square: bool,
}

/// The image side of a prompt: the token string `<image>` expands to and how many copies.
#[derive(Debug, Clone)]
pub struct ImageSlot {
    pub token: String,
    pub count: usize,
}

/// Builds and tokenizes the prompt for `question`. With an `image`, the text must hold at most one
/// `<image>` (exactly one when `raw`); without a leading placeholder the chat template puts
/// `<image>\n` before the question as LLaVA does. `max_len` is the model's context.
pub fn build_prompt(
    tok: &Tokenizer,
    question: &str,
    image: Option<&ImageSlot>,
    opts: &PromptOptions,
    max_len: usize,
) -> Result<Prompt> {
    let n = question.matches(IMAGE_PLACEHOLDER).count();
    if n > 1 {
        return Err(Error::Prompt(format!(
            "the prompt contains {n} `{IMAGE_PLACEHOLDER}` placeholders; one image per prompt is supported"
        )));
    }
    if image.is_none() && n == 1 {
        return Err(Error::Prompt(format!(
            "the prompt contains `{IMAGE_PLACEHOLDER}` but no image was given"
        )));
    }
    if image.is_some() && n == 0 && opts.raw {
        return Err(Error::Prompt(format!(
            "a raw prompt must contain `{IMAGE_PLACEHOLDER}` where the image goes (it has none)"
        )));
    }
    let (prefix, suffix) = if opts.raw {
        (String::new(), "")
    } else {
        let sys = opts
            .system
            .as_deref()
            .map(|s| format!("{s} "))
            .unwrap_or_default();
        (format!("{sys}USER: "), " ASSISTANT:")
    };
    // text = prefix + before + image tokens + between + question-after-image + suffix; the byte
    // where the image starts and the span of the question after it decide the segments.
    let (before, between, q_after) = match (image.is_some(), question.find(IMAGE_PLACEHOLDER)) {
        (true, Some(p)) => (&question[..p], "", &question[p + IMAGE_PLACEHOLDER.len()..]),
        (true, None) => ("", "\n", question),
        (false, _) => ("", "", question),
    };
    let expanded = image.map(|s| s.token.repeat(s.count)).unwrap_or_default();
    let image_start = prefix.len() + before.len();
    let q_start = image_start + expanded.len() + between.len();
    let q_end = q_start + q_after.len();
    let text = format!("{prefix}{before}{expanded}{between}{q_after}{suffix}");
    let image_id = match image {
        Some(s) => Some(tok.token_to_id(&s.token).ok_or_else(|| {
            Error::Prompt(format!("the tokenizer has no image token `{}`", s.token))
        })?),
        None => None,
    };
    let enc = tok.encode(&text, true)?;
    let question = q_start..q_end;
    let segments = segments_of(&enc.ids, &enc.offsets, image_id, image_start, &[question]);
    if let Some(slot) = image {
        let got = segments.iter().filter(|&&s| s == Segment::Image).count();
        if got != slot.count {
            return Err(Error::Prompt(format!(
                "`{IMAGE_PLACEHOLDER}` expanded to {got} image tokens, expected {} (the tokenizer splits `{}`?)",
                slot.count, slot.token
            )));
        }
    }
    Prompt::within(enc.ids, segments, max_len)
}

/// The segment of every token from its id and the byte span `s..e` it came from (PRUNING.md,
/// "Positions and segments"): an `image_id` token is [`Segment::Image`]; one that ends by
/// `image_start` (the first image byte, or where the user's text starts when there is no image;
/// added special tokens such as BOS have the empty span at 0) is [`Segment::System`]; one that
/// overlaps a `text` range (the user's words; a word's token often starts at the template's
/// space before it) is [`Segment::Text`]; the rest is [`Segment::Template`].
pub(crate) fn segments_of(
    ids: &[u32],
    offsets: &[(usize, usize)],
    image_id: Option<u32>,
    image_start: usize,
    text: &[Range<usize>],
) -> Vec<Segment> {
    ids.iter()
        .zip(offsets)
        .map(|(&id, &(s, e))| {
            if Some(id) == image_id {
                Segment::Image
            } else if e <= image_start {
                Segment::System
            } else if text.iter().any(|r| s < r.end && e > r.start) {
                Segment::Text
            } else {
                Segment::Template
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_template(json: &str) -> Result<Option<String>> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("chat_template.json"), json).unwrap();
        system_of_model(dir.path())
    }

    #[test]
    fn system_prompt_comes_from_the_chat_template() {
        let ours = serde_json::json!({ "chat_template": LLAVA_V1_CHAT_TEMPLATE }).to_string();
        assert_eq!(with_template(&ours).unwrap().as_deref(), Some(LLAVA_SYSTEM));
        // llava-hf's llava-1.5 template (abridged): roles only, no system prompt.
        let hf = r#"{"chat_template": "{% for message in messages %}{{ message['role'].upper() + ': '}}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"}"#;
        assert_eq!(with_template(hf).unwrap(), None);
        // no file: no system prompt
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(system_of_model(dir.path()).unwrap(), None);
        // damaged files name the file
        for bad in ["{", r#"{"chat_template": 3}"#] {
            let e = with_template(bad).unwrap_err().to_string();
            assert!(e.contains("chat_template.json"), "{e}");
        }
    }
}
