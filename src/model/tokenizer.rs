//! Tokenizer: HF `tokenizer.json` through the `tokenizers` crate (no network features).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A loaded tokenizer and where it came from (for error messages).
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
}

/// Incremental detokenisation for streaming: ids go in one at a time, text comes out as soon as it
/// is whole, never a split UTF-8 character (byte-level and byte-fallback vocabularies spread
/// one character over several tokens; their prefix decodes to U+FFFD until it is complete).
/// The concatenated deltas equal [`Tokenizer::decode`] of all the ids. Only a window of recent
/// ids is decoded per step (TGI's prefix/read offsets), so a long answer costs O(tokens), not
/// O(tokens²).
///
/// It holds no reference to the tokenizer (each call takes it), so it can live next to the model
/// that owns the tokenizer, in a request's state.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// `ids[prefix..read]` is text already emitted, kept as context so the next decode sees the
    /// word boundary it continues; `ids[read..]` is not emitted yet.
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    /// A decoder for one answer.
    pub fn new(skip_special_tokens: bool) -> Self {
        StreamDecoder {
            skip_special_tokens,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds token `id`; returns the text it completes (empty while a character is unfinished).
    pub fn push(&mut self, t: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = t.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let now = t.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        match now.get(before.len()..) {
            Some(delta) if !delta.is_empty() && !now.ends_with('\u{FFFD}') => {
                let delta = delta.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(delta)
            }
            _ => Ok(String::new()),
        }
    }

    /// The text still held back at the end (an unfinished character, as the tokenizer decodes
    /// it); the decoder is empty afterwards.
    pub fn finish(&mut self, t: &Tokenizer) -> Result<String> {
        let before = t.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let now = t.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        self.ids.clear();
        (self.prefix, self.read) = (0, 0);
        Ok(now.get(before.len()..).unwrap_or_default().to_string())
    }
}

/// Token ids with the byte span of the input text each one came from.
pub struct Encoding {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

impl Tokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile {
                what: "tokenizer (tokenizer.json)",
                path: path.to_path_buf(),
            });
        }
        let err = |msg: String| Error::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // tokenizers 0.23 panics (`expect("Helper")` in its decoder's deserializer) on malformed
        // json inside the `decoder` object, e.g. a truncated file or a number out of f64's
        // range: parse it as json first (numbers included, so not `IgnoredAny`).
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| err(format!("not valid JSON: {e}")))?;
        let inner: tokenizers::Tokenizer = catch_panic(|| text.parse())
            .map_err(|msg| err(format!("cannot parse: {msg}")))?
            .map_err(|e| err(format!("cannot parse: {e}")))?;
        Ok(Tokenizer {
            inner,
            source: path.to_path_buf(),
        })
    }

    /// Wraps an already built tokenizer (e.g. from GGUF metadata); `source` names it in errors.
    pub fn from_inner(inner: tokenizers::Tokenizer, source: &Path) -> Self {
        Tokenizer {
            inner,
            source: source.to_path_buf(),
        }
    }

    /// Encodes `text`, adding the special tokens the tokenizer's post-processor adds (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoding> {
        let enc = self.guarded(&format!("cannot encode {text:?}"), || {
            self.inner.encode(text, add_special_tokens)
        })?;
        Ok(Encoding {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Decodes ids to text, optionally dropping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.guarded(&format!("cannot decode {ids:?}"), || {
            self.inner.decode(ids, skip_special_tokens)
        })
    }

    /// The string of token `id`, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of token string `token`, if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// A call into the tokenizers crate, its errors and panics (see [`catch_panic`]) as
    /// [`Error::Tokenizer`] naming the file.
    fn guarded<T>(&self, what: &str, f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
        catch_panic(f)
            .map_err(|msg| self.err(format!("{what}: {msg}")))?
            .map_err(|e| self.err(format!("{what}: {e}")))
    }

    fn err(&self, msg: String) -> Error {
        Error::Tokenizer {
            path: self.source.clone(),
            msg,
        }
    }
}

/// Runs `f`, turning a panic into an error message: the tokenizers crate panics on some
/// tokenizer files that parse (a BPE `continuing_subword_prefix` longer than a merge's token, a
/// post-processor template naming a special token it does not map).
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!(
            "the tokenizers crate panicked ({msg}); the file's `model`, `pre_tokenizer` or \
             `post_processor` settings are inconsistent"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streamed deltas concatenate to the whole decode and never hold a replacement character,
    /// on SmolLM2's byte-level BPE (accents, CJK and an emoji span several tokens each) and on
    /// the fixtures' SentencePiece vocabulary.
    #[test]
    fn streaming_never_splits_a_character() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
        let text = "Déjà vu: 東京 🐈‍⬛ costs 3 € — naïve café.";
        for file in ["smollm2_tokenizer.json", "llava_gqa/tokenizer.json"] {
            let t = Tokenizer::from_file(&dir.join(file)).unwrap();
            let ids = t.encode(text, false).unwrap().ids;
            let whole = t.decode(&ids, true).unwrap();
            let mut s = StreamDecoder::new(true);
            let mut streamed = String::new();
            let mut held = 0;
            for &id in &ids {
                let d = s.push(&t, id).unwrap();
                assert!(
                    !d.contains('\u{FFFD}'),
                    "{file}: a split character in {d:?}"
                );
                held += usize::from(d.is_empty());
                streamed.push_str(&d);
            }
            streamed.push_str(&s.finish(&t).unwrap());
            assert_eq!(streamed, whole, "{file}");
            println!("{file}: {} tokens, {held} held back", ids.len());
        }
    }

    /// A tokenizer.json cut inside its `decoder` object (an interrupted download), or with a
    /// number there out of f64's range, made the tokenizers crate panic; it is an error naming
    /// the file.
    #[test]
    fn truncated_tokenizer_json_is_an_error() {
        let full = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llava_tied/tokenizer.json"),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let decoder = full.find("\"decoder\"").unwrap();
        let out_of_range = full.replacen("\"decoder\": {", "\"decoder\": {\"n\": 1e999, ", 1);
        let cuts = [decoder + 40, decoder + 120, full.len() - 3];
        for text in cuts
            .iter()
            .map(|&c| &full[..c])
            .chain([out_of_range.as_str()])
        {
            std::fs::write(&path, text).unwrap();
            let e = Tokenizer::from_file(&path).err().unwrap().to_string();
            assert!(
                e.contains("tokenizer.json") && e.contains("not valid JSON"),
                "{e}"
            );
        }
        std::fs::write(&path, &full).unwrap();
        assert!(Tokenizer::from_file(&path).unwrap().vocab_size() > 0);
    }

    /// Tokenizer files that parse but make the tokenizers crate panic, when it builds the BPE
    /// model or while encoding (found by tests/fuzz.rs): a BPE `continuing_subword_prefix`, a
    /// post-processor template naming a special token its `special_tokens` map lacks. Loading or
    /// encoding is an error naming the file.
    #[test]
    fn tokenizer_panics_while_encoding_are_errors() {
        let read = |p: &str| -> serde_json::Value {
            let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(p));
            serde_json::from_str(&text.unwrap()).unwrap()
        };
        let mut prefix = read("models/shapes-llava/tokenizer.json");
        prefix["model"]["continuing_subword_prefix"] = "../../../outside".into();
        let mut template = read("tests/reference/llava_tied/tokenizer.json");
        let specials = template["post_processor"]["special_tokens"].as_object_mut();
        specials.unwrap().remove("<s>").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        for bad in [prefix, template] {
            std::fs::write(&path, bad.to_string()).unwrap();
            let e = Tokenizer::from_file(&path)
                .and_then(|tok| tok.encode("USER: What is it? ASSISTANT: a red square", true));
            let e = e.err().unwrap().to_string();
            assert!(
                e.contains("tokenizer.json") && e.contains("panicked"),
                "{e}"
            );
        }
    }
}
