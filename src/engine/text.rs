//! An answer's text as it streams: incremental detokenisation, then stop strings.

use crate::error::Result;
use crate::model::tokenizer::{StreamDecoder, Tokenizer};

/// One answer's text: tokens go in, text comes out as soon as it is whole (never a split UTF-8
/// character, [`StreamDecoder`]) and cannot be the start of a stop string. The first stop string
/// that appears ends the answer just before it (the stop string itself is not part of the text,
/// as in OpenAI's API). Text that could still turn into a stop string is held back: with stop
/// `"###"`, an answer ending in `"#"` holds the `"#"` until the next token shows otherwise, so
/// emitted text never has to be taken back.
#[derive(Debug, Clone)]
pub(crate) struct TextStream {
    decoder: StreamDecoder,
    stops: Vec<String>,
    /// Decoded text not emitted yet.
    held: String,
    /// All text emitted so far.
    text: String,
}

impl TextStream {
    /// A stream ending at any of `stops` (none empty).
    pub(crate) fn new(stops: Vec<String>) -> Self {
        TextStream {
            decoder: StreamDecoder::new(true),
            stops,
            held: String::new(),
            text: String::new(),
        }
    }

    /// Adds token `id`: returns the text it releases and whether a stop string ended the answer.
    pub(crate) fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<(String, bool)> {
        let delta = self.decoder.push(tok, id)?;
        self.held.push_str(&delta);
        Ok(self.release(false))
    }

    /// Ends the answer: releases what was held back (an unfinished character as the tokenizer
    /// decodes it, a partial stop string), unless a stop string completes in it.
    pub(crate) fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let rest = self.decoder.finish(tok)?;
        self.held.push_str(&rest);
        Ok(self.release(true).0)
    }

    /// The text emitted so far.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    fn release(&mut self, end: bool) -> (String, bool) {
        let held = &self.held;
        let stop = self
            .stops
            .iter()
            .filter_map(|s| held.find(s.as_str()))
            .min();
        let (cut, stopped) = match stop {
            Some(at) => (at, true),
            None if end => (held.len(), false),
            None => (held.len() - partial_stop(held, &self.stops), false),
        };
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        if stopped {
            self.held.clear();
        }
        self.text.push_str(&out);
        (out, stopped)
    }
}

/// Bytes at the end of `text` that are a proper prefix of some stop string (0 if none).
fn partial_stop(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|s| {
            (1..s.len())
                .rev()
                .find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` through `release` as if each were a decoded token.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            s.held.push_str(p);
            let (t, stopped) = s.release(false);
            out.push(t);
            if stopped {
                return (out, true);
            }
        }
        out.push(s.release(true).0);
        (out, false)
    }

    #[test]
    fn stop_strings_end_the_text_before_them_and_partial_ones_are_held() {
        // "##" waits (it may be the start of "###"), "#x" releases it, "###" stops.
        assert_eq!(
            run(&["###"], &["a", "b#", "#", "x", "c##", "#d"]),
            (
                vec!["a", "b", "", "##x", "c", ""]
                    .into_iter()
                    .map(String::from)
                    .collect(),
                true
            )
        );
        // A stop string inside one piece: the text before it is released.
        assert_eq!(run(&["\n\n"], &["one\n\ntwo"]).0, vec!["one"]);
        // The earliest of several stop strings wins.
        assert_eq!(run(&["cd", "b"], &["abcd"]).0, vec!["a"]);
        // Without a stop, the held part comes out at the end.
        assert_eq!(run(&["xyz"], &["ax", "y"]).0, vec!["a", "", "xy"]);
        // No stop strings: everything as it comes.
        assert_eq!(run(&[], &["a", "b"]).0, vec!["a", "b", ""]);
        // Multi-byte stop strings are only split at character boundaries.
        assert_eq!(partial_stop("ab\u{e9}", &["\u{e9}t\u{e9}".into()]), 2);
        assert_eq!(partial_stop("ab", &["\u{e9}t\u{e9}".into()]), 0);
    }
}
