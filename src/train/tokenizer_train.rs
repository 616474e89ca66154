//! Trains a LLaMA-style tokenizer for a new model: BPE with byte fallback, Metaspace (`▁`, prepend
//! on the first word, no split), the layout of `tests/reference/llava_gqa/tokenizer.json`:
//! `<unk>` `<s>` `</s>` at ids 0..3, the 256 byte tokens `<0x00>`..`<0xFF>` next, the learned
//! pieces and merges, then `<image>` and `<pad>` as added special tokens at the end; a
//! post-processor that prepends `<s>`; the decoder `▁`->space, byte fallback, fuse, strip one
//! leading space.
//!
//! Training runs the `tokenizers` crate's `BpeTrainer` (it works with the crate's `onig` feature
//! alone) with a word-splitting Metaspace so merges never cross a word boundary, as
//! SentencePiece's `split_by_whitespace` does, and with every punctuation mark and newline a piece
//! of its own: on template-heavy text like LLaVA's (`What shape is the circle?\nAnswer the
//! question ...`) BPE otherwise learns `▁circle?\nAnswer` as one token, so a shape named at the
//! end of a question shares no token with the same shape as an answer.

use crate::error::{Error, Result};
use crate::io::write_atomic;
use serde_json::{Value, json};
use std::path::Path;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::{
    DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, SplitDelimiterBehavior, TokenizerImpl,
};

/// Special tokens in the model vocabulary, in id order.
pub const BASE_SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// Special tokens added after the learned vocabulary, in id order.
pub const ADDED_SPECIALS: [&str; 2] = ["<image>", "<pad>"];

/// Options of [`train_tokenizer`].
#[derive(Debug, Clone)]
pub struct TokenizerTrainConfig {
    /// Total vocabulary including specials, byte tokens and added tokens.
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    pub min_frequency: u64,
}

impl Default for TokenizerTrainConfig {
    fn default() -> Self {
        TokenizerTrainConfig {
            vocab_size: 1024,
            min_frequency: 2,
        }
    }
}

fn terr(msg: String) -> Error {
    Error::Tokenizer {
        path: "<training>".into(),
        msg,
    }
}

/// Trains on `texts` and returns the tokenizer as a `tokenizer.json` value.
pub fn train_tokenizer_json(texts: &[String], cfg: &TokenizerTrainConfig) -> Result<Value> {
    let fixed = BASE_SPECIALS.len() + 256 + ADDED_SPECIALS.len();
    if cfg.vocab_size <= fixed {
        return Err(Error::arg(
            "vocab_size",
            format!(
                "{} leaves no room for learned tokens (specials and byte tokens take {fixed})",
                cfg.vocab_size
            ),
        ));
    }
    if texts.is_empty() {
        return Err(Error::arg("texts", "no training text given"));
    }
    // The trainer learns pieces (its alphabet + merges) within the budget left by the fixed tokens.
    let budget = cfg.vocab_size - fixed;
    let mut trainer = BpeTrainer::builder()
        .vocab_size(budget)
        .min_frequency(cfg.min_frequency)
        .show_progress(false)
        .build();
    let mut tk: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    let newline = Split::new("\n", SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| terr(format!("newline splitter: {e}")))?;
    tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        Metaspace::new('▁', PrependScheme::First, true).into(),
        Punctuation::new(SplitDelimiterBehavior::Isolated).into(),
        newline.into(),
    ]))));
    tk.train(&mut trainer, texts.iter())
        .map_err(|e| terr(format!("BPE training failed: {e}")))?;
    let model = serde_json::to_value(tk.get_model())
        .map_err(|e| terr(format!("cannot serialize the trained model: {e}")))?;
    let learned = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| terr("trained model has no vocab".into()))?;
    let merges = model
        .get("merges")
        .cloned()
        .ok_or_else(|| terr("trained model has no merges".into()))?;

    let mut pieces: Vec<(&String, u64)> = learned
        .iter()
        .map(|(k, v)| (k, v.as_u64().unwrap_or(u64::MAX)))
        .collect();
    pieces.sort_by_key(|&(_, id)| id);
    let mut vocab = serde_json::Map::new();
    let mut next = 0u64;
    let mut push = |vocab: &mut serde_json::Map<String, Value>, tok: String| {
        if !vocab.contains_key(&tok) {
            vocab.insert(tok, json!(next));
            next += 1;
        }
    };
    for s in BASE_SPECIALS {
        push(&mut vocab, s.to_string());
    }
    for b in 0..=255u8 {
        push(&mut vocab, format!("<0x{b:02X}>"));
    }
    for (p, _) in pieces {
        push(&mut vocab, p.clone());
    }
    let mut added = Vec::new();
    for (i, s) in BASE_SPECIALS.iter().enumerate() {
        added.push(added_token(i as u64, s));
    }
    for s in ADDED_SPECIALS {
        added.push(added_token(next, s));
        next += 1;
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": Value::Object(vocab), "merges": merges
        }
    }))
}

fn added_token(id: u64, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// Trains on `texts` and writes `tokenizer.json` to `path` atomically. The result is checked by
/// parsing it back with the `tokenizers` crate before it is written.
pub fn train_tokenizer(texts: &[String], cfg: &TokenizerTrainConfig, path: &Path) -> Result<()> {
    let v = train_tokenizer_json(texts, cfg)?;
    let s = serde_json::to_string_pretty(&v)
        .map_err(|e| terr(format!("cannot serialize tokenizer.json: {e}")))?;
    s.parse::<tokenizers::Tokenizer>()
        .map_err(|e| terr(format!("the trained tokenizer does not load back: {e}")))?;
    write_atomic(path, s.as_bytes())
}

/// The training text of a LLaVA conversation file: the template's own text (system prompt,
/// `USER:`, `ASSISTANT:`), then every question (without `<image>`) and answer.
pub fn conversation_texts(convs: &[super::data::Conversation]) -> Vec<String> {
    let mut out = vec![
        crate::model::template::LLAVA_SYSTEM.to_string(),
        "USER: ASSISTANT:".to_string(),
    ];
    for c in convs {
        for t in &c.turns {
            let q = t
                .question
                .replace(crate::model::template::IMAGE_PLACEHOLDER, "");
            out.push(q.trim().to_string());
            out.push(t.answer.clone());
        }
    }
    out
}
