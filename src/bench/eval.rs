//! Scoring for VQA-style benchmarks, and readers for the evaluation files LLaVA ships.
//!
//! # Scoring rules (what the numbers mean)
//! - [`normalize_answer`] is the answer processor LLaVA's TextVQA evaluation uses
//!   (`llava/eval/m4c_evaluator.py`, `EvalAIAnswerProcessor`, itself copied from MMF and derived from
//!   the official VQA script `vqaEval.py`), reproduced rule by rule, quirks included.
//! - [`vqa_accuracy`] is the VQA soft accuracy: the mean over the `n` leave-one-out subsets of
//!   `min(#matches / 3, 1)`, as both `vqaEval.py` and `TextVQAAccuracyEvaluator` compute it.
//! - [`pope_yes_no`] is POPE's reading of a free-form answer as yes or no (`eval_pope.py` in POPE
//!   and in LLaVA), and [`PopeMetrics`] its accuracy / precision / recall / F1 / yes-ratio with "yes"
//!   as the positive class.
//!
//! The scorers see the prediction as given (after the whitespace trim LLaVA's `model_vqa_loader`
//! applies to every output). LLaVA's published numbers were computed that way, so nothing else is
//! cut from a model's output unless the caller asks: [`extract_answer`] (first non-empty line) is
//! an opt-in helper for a model that rambles despite the "Answer the question using a single word
//! or phrase." instruction. A trailing period needs no help: the normalisation removes any period
//! not followed by a digit.
//!
//! # Aggregation
//! [`Scorecard`] collects per-sample scores with a family (category) string and summarises them
//! ([`ScoreSummary`]: overall and per-family accuracy, POPE metrics over the yes/no samples), all
//! serialisable with serde; [`bootstrap_ci`] gives a seeded percentile confidence interval.
//!
//! # Readers
//! LLaVA's evaluation files run unchanged: [`load_textvqa`] (LLaVA's TextVQA question jsonl plus
//! `TextVQA_0.5.1_val.json`), [`load_llava_pope`] (LLaVA's `llava_pope_test.jsonl` plus POPE's
//! `coco_pope_{random,popular,adversarial}.json`), [`load_pope`] (one POPE label file on its own)
//! and [`load_with_answers`] (any question jsonl plus a generic answers jsonl). Every malformed line
//! is an [`Error::Config`] naming the file, the line and the field; a missing image folder or image
//! is reported before anything runs.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Answer normalisation
// ---------------------------------------------------------------------------------------------

/// `EvalAIAnswerProcessor.PUNCTUATIONS`, in the order the processor applies them.
const PUNCTUATIONS: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `PERIOD_STRIP.sub("", text, re.UNICODE)` passes `re.UNICODE` (32) as the `count` argument, so
/// Python removes at most 32 periods per answer; we do the same.
const PERIOD_STRIP_COUNT: usize = 32;

/// Python's `str.isspace` (what `split()` and `strip()` use): Unicode white space plus the
/// information separators U+001C..U+001F, which Rust's `char::is_whitespace` leaves out.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A digit as the scripts' regexes (`\d`) see it. Python's `\d` also matches non-ASCII decimal
/// digits (Arabic-Indic, Devanagari, ...); we treat only ASCII 0-9 as digits, which only matters
/// for answers written with such digits.
fn is_digit(c: char) -> bool {
    c.is_ascii_digit()
}

/// `NUMBER_MAP` / `manualMap`: number words up to ten, and "none".
fn number_word(word: &str) -> Option<&'static str> {
    Some(match word {
        "none" => "0",
        "zero" => "0",
        "one" => "1",
        "two" => "2",
        "three" => "3",
        "four" => "4",
        "five" => "5",
        "six" => "6",
        "seven" => "7",
        "eight" => "8",
        "nine" => "9",
        "ten" => "10",
        _ => return None,
    })
}

/// `ARTICLES`.
fn is_article(word: &str) -> bool {
    matches!(word, "a" | "an" | "the")
}

/// `CONTRACTIONS`: the processor's table of apostrophe-less spellings and their contraction. The
/// table's capitalised keys ("Id've", "I'dve", "Im", "Ive") can never match (the words are
/// lowercased first), so they are left out; "somebody'd" -> "somebodyd" is the table's own
/// (backwards) entry, kept.
fn contraction(word: &str) -> Option<&'static str> {
    Some(match word {
        "aint" => "ain't",
        "arent" => "aren't",
        "cant" => "can't",
        "couldve" => "could've",
        "couldnt" => "couldn't",
        "couldn'tve" | "couldnt've" => "couldn't've",
        "didnt" => "didn't",
        "doesnt" => "doesn't",
        "dont" => "don't",
        "hadnt" => "hadn't",
        "hadnt've" | "hadn'tve" => "hadn't've",
        "hasnt" => "hasn't",
        "havent" => "haven't",
        "hed" => "he'd",
        "hed've" | "he'dve" => "he'd've",
        "hes" => "he's",
        "howd" => "how'd",
        "howll" => "how'll",
        "hows" => "how's",
        "isnt" => "isn't",
        "itd" => "it'd",
        "itd've" | "it'dve" => "it'd've",
        "itll" => "it'll",
        "let's" => "let's",
        "maam" => "ma'am",
        "mightnt" => "mightn't",
        "mightnt've" | "mightn'tve" => "mightn't've",
        "mightve" => "might've",
        "mustnt" => "mustn't",
        "mustve" => "must've",
        "neednt" => "needn't",
        "notve" => "not've",
        "oclock" => "o'clock",
        "oughtnt" => "oughtn't",
        "ow's'at" | "'ows'at" | "'ow'sat" => "'ow's'at",
        "shant" => "shan't",
        "shed've" | "she'dve" => "she'd've",
        "she's" => "she's",
        "shouldve" => "should've",
        "shouldnt" => "shouldn't",
        "shouldnt've" | "shouldn'tve" => "shouldn't've",
        "somebody'd" => "somebodyd",
        "somebodyd've" | "somebody'dve" => "somebody'd've",
        "somebodyll" => "somebody'll",
        "somebodys" => "somebody's",
        "someoned" => "someone'd",
        "someoned've" | "someone'dve" => "someone'd've",
        "someonell" => "someone'll",
        "someones" => "someone's",
        "somethingd" => "something'd",
        "somethingd've" | "something'dve" => "something'd've",
        "somethingll" => "something'll",
        "thats" => "that's",
        "thered" => "there'd",
        "thered've" | "there'dve" => "there'd've",
        "therere" => "there're",
        "theres" => "there's",
        "theyd" => "they'd",
        "theyd've" | "they'dve" => "they'd've",
        "theyll" => "they'll",
        "theyre" => "they're",
        "theyve" => "they've",
        "twas" => "'twas",
        "wasnt" => "wasn't",
        "wed've" | "we'dve" => "we'd've",
        "weve" => "we've",
        "werent" => "weren't",
        "whatll" => "what'll",
        "whatre" => "what're",
        "whats" => "what's",
        "whatve" => "what've",
        "whens" => "when's",
        "whered" => "where'd",
        "wheres" => "where's",
        "whereve" => "where've",
        "whod" => "who'd",
        "whod've" | "who'dve" => "who'd've",
        "wholl" => "who'll",
        "whos" => "who's",
        "whove" => "who've",
        "whyll" => "why'll",
        "whyre" => "why're",
        "whys" => "why's",
        "wont" => "won't",
        "wouldve" => "would've",
        "wouldnt" => "wouldn't",
        "wouldnt've" | "wouldn'tve" => "wouldn't've",
        "yall" => "y'all",
        "yall'll" | "y'allll" => "y'all'll",
        "yall'd've" | "y'alld've" | "y'all'dve" => "y'all'd've",
        "youd" => "you'd",
        "youd've" | "you'dve" => "you'd've",
        "youll" => "you'll",
        "youre" => "you're",
        "youve" => "you've",
        _ => return None,
    })
}

/// `COMMA_STRIP.search(text)`: a digit, one or more commas, a digit.
fn has_digit_commas_digit(text: &str) -> bool {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_digit(chars[i]) {
            let mut j = i + 1;
            while j < chars.len() && chars[j] == ',' {
                j += 1;
            }
            if j > i + 1 && j < chars.len() && is_digit(chars[j]) {
                return true;
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    false
}

/// `process_punctuation`: every punctuation mark is deleted when it touches a space anywhere in
/// the text (or the text holds a digit-comma-digit run), otherwise replaced by a space; then
/// periods not followed by a digit are deleted (at most 32, see [`PERIOD_STRIP_COUNT`]).
fn process_punctuation(in_text: &str) -> String {
    let comma_number = has_digit_commas_digit(in_text);
    let mut out = in_text.to_string();
    for p in PUNCTUATIONS {
        let touches_space =
            in_text.contains(&format!("{p} ")) || in_text.contains(&format!(" {p}"));
        out = if touches_space || comma_number {
            out.replace(p, "")
        } else {
            out.replace(p, " ")
        };
    }
    strip_periods(&out)
}

/// `PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")`: the first group is a typo for a
/// lookbehind; as written it is a lookahead for the two characters "<=" followed by a digit, which
/// can never match where the next character is the period itself. So the rule is: delete every
/// period that is not followed by a digit ("3.5" keeps its point, "dog." and "a.m" lose theirs).
fn strip_periods(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        let next_is_digit = chars.get(i + 1).is_some_and(|&n| is_digit(n));
        if c == '.' && !next_is_digit && removed < PERIOD_STRIP_COUNT {
            removed += 1;
            continue;
        }
        out.push(c);
    }
    out
}

/// `process_digit_article`: lowercase, split on white space, number words to digits, drop
/// articles, expand apostrophe-less contractions, join with single spaces.
fn process_digit_article(in_text: &str) -> String {
    let lower = in_text.to_lowercase();
    let words: Vec<&str> = lower
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .map(|w| number_word(w).unwrap_or(w))
        .filter(|w| !is_article(w))
        .map(|w| contraction(w).unwrap_or(w))
        .collect();
    words.join(" ")
}

/// Normalises an answer (prediction or ground truth) as LLaVA's TextVQA evaluation does
/// (`EvalAIAnswerProcessor.__call__` in `llava/eval/m4c_evaluator.py`), step by step:
///
/// 1. lowercase; delete every `,` and `?`; `'s` -> ` 's` (so "it's" becomes "it 's");
///    trim; newlines and tabs -> spaces; trim;
/// 2. punctuation ``; / [ ] " { } ( ) = + \ _ - > < @ ` , ? !``: each mark is deleted if it
///    appears next to a space anywhere in the answer (or the answer holds digit,comma,digit),
///    otherwise replaced by a space ("t-shirt" -> "t shirt", "left - right" -> "left right");
/// 3. periods not followed by a digit are deleted ("dog." -> "dog", "3.5" stays; at most 32, a
///    quirk of the script);
/// 4. lowercase, split on white space, `none zero one .. ten` -> `0 0 1 .. 10` (whole words
///    only), drop `a an the`, map apostrophe-less contractions ("dont" -> "don't", "itll" ->
///    "it'll"), join with single spaces.
///
/// Commas are gone after step 1, so "1,000" -> "1000" (the digit-comma-digit rule of step 2
/// never fires here). Differences from the original VQA script `vqaEval.py`: that script has no
/// step 1, its punctuation list also holds `:` and `'` (so there "it's" -> "it s") but not
/// `{ } - !`, its contraction table writes curly apostrophes, and it normalises only the
/// prediction fully (ground truths get step 2 only, and only when the annotators disagree).
/// Python's `\d` also matches non-ASCII digits; here only ASCII digits count.
pub fn normalize_answer(answer: &str) -> String {
    let lowered = answer
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let spaced = lowered.trim_matches(is_py_space).replace(['\n', '\t'], " ");
    let punct = process_punctuation(spaced.trim_matches(is_py_space));
    process_digit_article(&punct)
}

/// Whether the normalised prediction equals any normalised ground-truth answer
/// (STVQA-style accuracy in `m4c_evaluator.py`). False for an empty answer list.
pub fn exact_match(pred: &str, answers: &[String]) -> bool {
    let p = normalize_answer(pred);
    answers.iter().any(|a| normalize_answer(a) == p)
}

/// VQA soft accuracy of a prediction against `n` annotator answers (both normalised with
/// [`normalize_answer`]):
///
/// `acc = (1/n) * sum_{i=1..n} min(1, |{j != i : answer_j == pred}| / 3)`
///
/// i.e. `min(#matches/3, 1)` averaged over the `n` subsets that leave one answer out, as
/// `vqaEval.py` and LLaVA's `TextVQAAccuracyEvaluator` compute it. With `m` of 10 answers matching
/// this is 0, 0.3, 0.6, 0.9 for `m` = 0..3 and 1.0 for `m >= 4`.
///
/// - `n == 1` (single-answer data sets, e.g. GQA-style or yes/no labels): the formula would
///   always give 0 (the only subset is empty), so the score is exact match instead (1.0 or 0.0).
/// - `n == 0`: 0.0.
/// - `2 <= n < 10`: the formula as written; note that it cannot reach 1.0 unless at least 4
///   answers match, so a list of *alternative spellings* (rather than annotator votes) should be
///   scored with [`exact_match`].
pub fn vqa_accuracy(pred: &str, answers: &[String]) -> f64 {
    match answers.len() {
        0 => 0.0,
        1 => f64::from(u8::from(exact_match(pred, answers))),
        n => {
            let p = normalize_answer(pred);
            let matched: Vec<bool> = answers.iter().map(|a| normalize_answer(a) == p).collect();
            let total = matched.iter().filter(|&&m| m).count();
            // Summed in the script's order, so the float result is the same as Python's.
            let sum: f64 = matched
                .iter()
                .map(|&m| {
                    let others = total - usize::from(m);
                    (others as f64 / 3.0).min(1.0)
                })
                .sum();
            sum / n as f64
        }
    }
}

/// The answer part of a model's raw output, for models that ramble: the first non-empty line,
/// trimmed. Not applied by the scorers themselves (LLaVA's published numbers were computed on the
/// whole trimmed output, with newlines turned into spaces by the normalisation); call it before
/// scoring when a model writes explanations after its answer. Sentences are not split (a period
/// may be a decimal point or an abbreviation), and a trailing period is left to the normalisation.
pub fn extract_answer(output: &str) -> &str {
    output
        .lines()
        .map(|l| l.trim_matches(is_py_space))
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// POPE
// ---------------------------------------------------------------------------------------------

/// Reads a free-form answer as yes (`true`) or no (`false`) by POPE's rule (`evaluate.py` in
/// POPE, copied as `llava/eval/eval_pope.py`):
///
/// 1. trim white space (LLaVA's `model_vqa_loader` strips every output);
/// 2. keep the text before the first `.` (the "first sentence");
/// 3. delete commas, split on single spaces;
/// 4. **no** if one of the words is exactly `No`, `no` or `not`; **yes** otherwise.
///
/// So "Yes, there is a dog." is yes, "No." and "There is not a cat." are no, but "I don't see
/// any cat." is **yes** (no word equals "no"/"not"), as are "NO", "Not really", "no!" and any
/// answer whose negation comes after the first period. These are the script's rules, kept so
/// that the numbers compare with published POPE results.
pub fn pope_yes_no(answer: &str) -> bool {
    let text = answer.trim_matches(is_py_space);
    let first = match text.find('.') {
        Some(i) => &text[..i],
        None => text,
    };
    let first = first.replace(',', "");
    !first.split(' ').any(|w| matches!(w, "No" | "not" | "no"))
}

/// Parses a POPE label (`"yes"` / `"no"`, any case, surrounding white space ignored).
pub fn parse_yes_no_label(label: &str) -> Option<bool> {
    let l = label.trim();
    if l.eq_ignore_ascii_case("yes") {
        Some(true)
    } else if l.eq_ignore_ascii_case("no") {
        Some(false)
    } else {
        None
    }
}

/// POPE's binary metrics with "yes" as the positive class (as `eval_pope.py` prints them):
///
/// - `accuracy = (TP + TN) / n`
/// - `precision = TP / (TP + FP)`, `recall = TP / (TP + FN)`
/// - `f1 = 2 * precision * recall / (precision + recall)`
/// - `yes_ratio = (TP + FP) / n` (share of answers read as yes)
///
/// Where a denominator is zero (no samples, no yes-predictions, no yes-labels, or precision and
/// recall both 0) the metric is 0.0 rather than the script's ZeroDivisionError; `n` and the
/// confusion counts tell those cases apart.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PopeMetrics {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub yes_ratio: f64,
    pub n: usize,
    pub true_pos: usize,
    pub false_pos: usize,
    pub true_neg: usize,
    pub false_neg: usize,
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl PopeMetrics {
    /// Metrics over `(predicted_yes, label_yes)` pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
        for (pred, label) in pairs {
            match (pred, label) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, false) => tn += 1,
                (false, true) => fn_ += 1,
            }
        }
        let n = tp + fp + tn + fn_;
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        PopeMetrics {
            accuracy: ratio(tp + tn, n),
            precision,
            recall,
            f1,
            yes_ratio: ratio(tp + fp, n),
            n,
            true_pos: tp,
            false_pos: fp,
            true_neg: tn,
            false_neg: fn_,
        }
    }
}

/// [`PopeMetrics`] of raw answers against labels: each answer is read with [`pope_yes_no`].
pub fn pope_metrics<S: AsRef<str>>(answers: &[S], labels_yes: &[bool]) -> Result<PopeMetrics> {
    if answers.len() != labels_yes.len() {
        return Err(Error::arg(
            "labels",
            format!(
                "{} answers but {} labels; POPE pairs them one to one",
                answers.len(),
                labels_yes.len()
            ),
        ));
    }
    Ok(PopeMetrics::from_pairs(
        answers
            .iter()
            .map(|a| pope_yes_no(a.as_ref()))
            .zip(labels_yes.iter().copied()),
    ))
}

// ---------------------------------------------------------------------------------------------
// Bootstrap
// ---------------------------------------------------------------------------------------------

/// A bootstrap confidence interval around a mean score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceInterval {
    /// The mean of the scores themselves (the point estimate).
    pub estimate: f64,
    pub lower: f64,
    pub upper: f64,
    /// Coverage, e.g. 0.95.
    pub level: f64,
    /// Number of bootstrap resamples `B`.
    pub resamples: usize,
    pub seed: u64,
}

/// SplitMix64 (Steele, Lea, Flood 2014): a small, fixed generator so that a seed gives the same
/// interval whatever version of `rand` is in the lock file.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform index in `0..n` (multiply-shift; the bias is below 2^-40 for any n < 2^24).
    fn index(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// Quantile `q` of sorted values with linear interpolation between order statistics (position
/// `q * (len - 1)`, numpy's default method).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Percentile bootstrap confidence interval of the mean of per-sample `scores` (accuracies in
/// [0, 1], or any finite values).
///
/// Draws `resamples` (B) samples of `scores.len()` indices with replacement from a SplitMix64
/// stream seeded with `seed`, takes each resample's mean, and returns the `(1 - level) / 2` and
/// `(1 + level) / 2` quantiles of those B means (linear interpolation, as numpy's default):
/// `level = 0.95` gives the 2.5th and 97.5th percentiles. Deterministic for a given seed.
/// Errors on no scores, `resamples == 0`, `level` outside (0, 1) or a non-finite score.
pub fn bootstrap_ci(
    scores: &[f64],
    resamples: usize,
    seed: u64,
    level: f64,
) -> Result<ConfidenceInterval> {
    if scores.is_empty() {
        return Err(Error::arg("scores", "no samples to bootstrap"));
    }
    if resamples == 0 {
        return Err(Error::arg("resamples", "must be at least 1"));
    }
    if !(level > 0.0 && level < 1.0) {
        return Err(Error::arg(
            "level",
            format!("{level} is not a coverage in (0, 1)"),
        ));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::arg(
            "scores",
            format!("score {i} is {}, not a finite number", scores[i]),
        ));
    }
    let n = scores.len();
    let mut rng = SplitMix64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| scores[rng.index(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let alpha = (1.0 - level) / 2.0;
    Ok(ConfidenceInterval {
        estimate: scores.iter().sum::<f64>() / n as f64,
        lower: quantile_sorted(&means, alpha),
        upper: quantile_sorted(&means, 1.0 - alpha),
        level,
        resamples,
        seed,
    })
}

// ---------------------------------------------------------------------------------------------
// Scorecard
// ---------------------------------------------------------------------------------------------

/// How a sample is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// [`vqa_accuracy`]: soft accuracy over annotator answers (TextVQA, VQAv2, VizWiz); exact
    /// match for a single answer.
    VqaSoft,
    /// [`exact_match`] against any of the answers.
    Exact,
    /// POPE yes/no ([`pope_yes_no`]) against a single `yes` / `no` answer; the sample also counts
    /// towards the POPE metrics.
    YesNo,
}

/// The yes/no reading of a POPE-style sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct YesNo {
    pub predicted_yes: bool,
    pub label_yes: bool,
}

/// One scored sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleScore {
    pub question_id: String,
    /// Family or category ("random", "counting", ...); the per-family breakdown groups by it.
    pub family: String,
    /// The prediction as scored.
    pub prediction: String,
    /// In [0, 1].
    pub score: f64,
    /// Present for yes/no samples (the ones [`PopeMetrics`] are computed over).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yes_no: Option<YesNo>,
}

/// Accuracy of one family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyScore {
    pub n: usize,
    /// Mean score of the family's samples.
    pub accuracy: f64,
    /// POPE metrics over the family's yes/no samples, if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pope: Option<PopeMetrics>,
}

/// What a [`Scorecard`] reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreSummary {
    pub n: usize,
    /// Mean score over all samples (0.0 when there are none).
    pub accuracy: f64,
    /// Per family, sorted by name.
    pub families: BTreeMap<String, FamilyScore>,
    /// POPE metrics pooled over every yes/no sample, if there are any. LLaVA reports POPE per
    /// category (random / popular / adversarial): those are in `families`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pope: Option<PopeMetrics>,
    /// 95% percentile bootstrap interval of `accuracy` ([`SUMMARY_RESAMPLES`] resamples of the
    /// samples, seed 0); `None` without samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_ci: Option<ConfidenceInterval>,
}

/// Bootstrap resamples behind [`ScoreSummary::accuracy_ci`].
pub const SUMMARY_RESAMPLES: usize = 1000;

/// Per-sample results of a benchmark run, with a family string each.
///
/// Accuracy is the mean of the per-sample scores (soft accuracy, exact match or POPE agreement,
/// by how each sample was added); per-family accuracy the same within a family. POPE metrics are
/// computed over the samples added as yes/no ([`Scorecard::add_yes_no`] or [`Metric::YesNo`]) —
/// the flag — optionally restricted by a predicate on the family
/// ([`Scorecard::pope_metrics_where`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Scorecard {
    pub samples: Vec<SampleScore>,
}

impl Scorecard {
    /// An empty scorecard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample was added.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    fn push(
        &mut self,
        question_id: String,
        family: String,
        prediction: &str,
        score: f64,
        yes_no: Option<YesNo>,
    ) -> f64 {
        self.samples.push(SampleScore {
            question_id,
            family,
            prediction: prediction.to_string(),
            score,
            yes_no,
        });
        score
    }

    /// Adds a sample scored with [`vqa_accuracy`]; returns its score.
    pub fn add_vqa(
        &mut self,
        question_id: impl Into<String>,
        family: impl Into<String>,
        prediction: &str,
        answers: &[String],
    ) -> f64 {
        let s = vqa_accuracy(prediction, answers);
        self.push(question_id.into(), family.into(), prediction, s, None)
    }

    /// Adds a sample scored with [`exact_match`] (1.0 or 0.0); returns its score.
    pub fn add_exact(
        &mut self,
        question_id: impl Into<String>,
        family: impl Into<String>,
        prediction: &str,
        answers: &[String],
    ) -> f64 {
        let s = f64::from(u8::from(exact_match(prediction, answers)));
        self.push(question_id.into(), family.into(), prediction, s, None)
    }

    /// Adds a yes/no sample: the prediction is read with [`pope_yes_no`], the score is 1.0 when
    /// it agrees with the label, and the sample counts towards the POPE metrics.
    pub fn add_yes_no(
        &mut self,
        question_id: impl Into<String>,
        family: impl Into<String>,
        prediction: &str,
        label_yes: bool,
    ) -> f64 {
        let predicted_yes = pope_yes_no(prediction);
        let s = f64::from(u8::from(predicted_yes == label_yes));
        let yn = YesNo {
            predicted_yes,
            label_yes,
        };
        self.push(question_id.into(), family.into(), prediction, s, Some(yn))
    }

    /// Adds a sample scored elsewhere (a custom scorer); `score` must lie in [0, 1].
    pub fn add_score(
        &mut self,
        question_id: impl Into<String>,
        family: impl Into<String>,
        prediction: &str,
        score: f64,
    ) -> Result<f64> {
        let question_id = question_id.into();
        if !(0.0..=1.0).contains(&score) {
            return Err(Error::arg(
                "score",
                format!("question {question_id}: {score} is outside [0, 1]"),
            ));
        }
        Ok(self.push(question_id, family.into(), prediction, score, None))
    }

    /// Scores `prediction` for a loaded item with `metric`; the family is the item's category,
    /// or `"default"` without one (LLaVA's own default category). [`Metric::YesNo`] needs the
    /// item's answers to be a single `yes` or `no`.
    pub fn add_item(&mut self, item: &EvalItem, prediction: &str, metric: Metric) -> Result<f64> {
        let family = item.category.clone().unwrap_or_else(|| "default".into());
        let id = item.question_id.clone();
        Ok(match metric {
            Metric::VqaSoft => self.add_vqa(id, family, prediction, &item.answers),
            Metric::Exact => self.add_exact(id, family, prediction, &item.answers),
            Metric::YesNo => {
                let label = match item.answers.as_slice() {
                    [a] => parse_yes_no_label(a),
                    _ => None,
                };
                let label = label.ok_or_else(|| {
                    Error::arg(
                        "metric",
                        format!(
                            "question {id}: yes/no scoring needs a single `yes` or `no` answer, \
                             got {:?}",
                            item.answers
                        ),
                    )
                })?;
                self.add_yes_no(id, family, prediction, label)
            }
        })
    }

    /// Appends another scorecard's samples (e.g. from another shard).
    pub fn merge(&mut self, other: Scorecard) {
        self.samples.extend(other.samples);
    }

    /// Mean score over all samples; 0.0 when empty.
    pub fn accuracy(&self) -> f64 {
        mean(self.samples.iter().map(|s| s.score))
    }

    /// The per-sample scores, in insertion order.
    pub fn scores(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.score).collect()
    }

    /// POPE metrics over the yes/no samples whose family satisfies `family`; samples added
    /// without the yes/no flag never count (their label is unknown).
    pub fn pope_metrics_where(&self, family: impl Fn(&str) -> bool) -> PopeMetrics {
        PopeMetrics::from_pairs(self.samples.iter().filter_map(|s| {
            s.yes_no
                .filter(|_| family(&s.family))
                .map(|yn| (yn.predicted_yes, yn.label_yes))
        }))
    }

    /// POPE metrics over every yes/no sample; `None` when there are none.
    pub fn pope_metrics(&self) -> Option<PopeMetrics> {
        let m = self.pope_metrics_where(|_| true);
        (m.n > 0).then_some(m)
    }

    /// Overall and per-family accuracy and counts, and POPE metrics.
    pub fn summary(&self) -> ScoreSummary {
        let mut groups: BTreeMap<&str, Vec<&SampleScore>> = BTreeMap::new();
        for s in &self.samples {
            groups.entry(s.family.as_str()).or_default().push(s);
        }
        let families = groups
            .into_iter()
            .map(|(name, samples)| {
                let pope = PopeMetrics::from_pairs(
                    samples
                        .iter()
                        .filter_map(|s| s.yes_no.map(|y| (y.predicted_yes, y.label_yes))),
                );
                let fs = FamilyScore {
                    n: samples.len(),
                    accuracy: mean(samples.iter().map(|s| s.score)),
                    pope: (pope.n > 0).then_some(pope),
                };
                (name.to_string(), fs)
            })
            .collect();
        ScoreSummary {
            n: self.samples.len(),
            accuracy: self.accuracy(),
            families,
            pope: self.pope_metrics(),
            accuracy_ci: self.bootstrap_ci(SUMMARY_RESAMPLES, 0).ok(),
        }
    }

    /// 95% percentile bootstrap interval of the overall accuracy ([`bootstrap_ci`]).
    pub fn bootstrap_ci(&self, resamples: usize, seed: u64) -> Result<ConfidenceInterval> {
        bootstrap_ci(&self.scores(), resamples, seed, 0.95)
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

// ---------------------------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------------------------

/// One question ready to run: image resolved against the image folder, question text exactly as
/// in the file (including LLaVA's "\nAnswer the question using a single word or phrase."),
/// ground-truth answers (10 for TextVQA, the label for POPE).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalItem {
    /// As in the file; an integer id is written in decimal.
    pub question_id: String,
    pub image: PathBuf,
    pub question: String,
    pub answers: Vec<String>,
    /// LLaVA's `category` (POPE: random / popular / adversarial), if any.
    pub category: Option<String>,
}

/// One line of a LLaVA question file (`{"question_id", "image", "text", "category"?}`) or of a
/// POPE label file (the same plus `"label": "yes"|"no"`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionRecord {
    /// 1-based line number in the file.
    pub line: usize,
    pub question_id: String,
    /// As written (a file name relative to the image folder).
    pub image: String,
    pub text: String,
    pub category: Option<String>,
    /// `"yes"` or `"no"` (lowercased) when the line has a label.
    pub label: Option<String>,
}

/// One entry of a TextVQA annotation file (`{"data": [...]}`).
#[derive(Debug, Clone, PartialEq)]
pub struct TextVqaAnnotation {
    /// 0-based index in `data`.
    pub index: usize,
    pub question_id: String,
    pub image_id: Option<String>,
    pub question: Option<String>,
    pub answers: Vec<String>,
}

/// One line of a generic answers file (`{"question_id", "answers": [...]}` or
/// `{"question_id", "answer": "..."}`).
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerRecord {
    /// 1-based line number in the file.
    pub line: usize,
    pub question_id: String,
    pub answers: Vec<String>,
}

fn config(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn read_text(path: &Path, what: &'static str) -> Result<String> {
    if !path.exists() {
        return Err(Error::MissingFile {
            what,
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        config(
            path,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// The non-blank lines of a jsonl file, each parsed as a JSON object, with 1-based line numbers.
fn jsonl_objects(path: &Path, text: &str) -> Result<Vec<(usize, Map<String, Value>)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| config(path, format!("line {n}: not valid JSON ({e})")))?;
        match v {
            Value::Object(m) => out.push((n, m)),
            other => {
                return Err(config(
                    path,
                    format!("line {n}: expected a JSON object, got {}", kind(&other)),
                ));
            }
        }
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where a field sits, for messages: "line 3" or "data[3]".
type At<'a> = &'a dyn Fn() -> String;

fn field_id(path: &Path, at: At, obj: &Map<String, Value>, field: &str) -> Result<String> {
    match obj.get(field) {
        None => Err(config(path, format!("{}: missing field `{field}`", at()))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(other) => Err(config(
            path,
            format!(
                "{}: field `{field}` must be a string or an integer, got {other}",
                at()
            ),
        )),
    }
}

fn field_str(path: &Path, at: At, obj: &Map<String, Value>, field: &str) -> Result<String> {
    match obj.get(field) {
        None => Err(config(path, format!("{}: missing field `{field}`", at()))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(config(
            path,
            format!(
                "{}: field `{field}` must be a string, got {}",
                at(),
                kind(other)
            ),
        )),
    }
}

fn field_opt_str(
    path: &Path,
    at: At,
    obj: &Map<String, Value>,
    field: &str,
) -> Result<Option<String>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => field_str(path, at, obj, field).map(Some),
    }
}

/// An array of strings; with `object_key`, elements may also be objects holding that key (the
/// VQA annotation style `[{"answer": "..."}, ...]`).
fn field_str_list(
    path: &Path,
    at: At,
    obj: &Map<String, Value>,
    field: &str,
    object_key: Option<&str>,
) -> Result<Vec<String>> {
    let bad = |detail: String| {
        config(
            path,
            format!(
                "{}: field `{field}` must be an array of strings{}, {detail}",
                at(),
                object_key
                    .map(|k| format!(" or of objects with `{k}`"))
                    .unwrap_or_default()
            ),
        )
    };
    let items = match obj.get(field) {
        None => return Err(config(path, format!("{}: missing field `{field}`", at()))),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(bad(format!("got {}", kind(other)))),
    };
    if items.is_empty() {
        return Err(config(
            path,
            format!("{}: field `{field}` is an empty list", at()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(j, v)| match (v, object_key) {
            (Value::String(s), _) => Ok(s.clone()),
            (Value::Object(o), Some(k)) => match o.get(k) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(bad(format!("element {j} has no string `{k}`"))),
            },
            (other, _) => Err(bad(format!("element {j} is {}", kind(other)))),
        })
        .collect()
}

/// Reads a LLaVA question file (jsonl, one `{"question_id", "image", "text", "category"?}` per
/// line; a POPE label file has the same fields plus `"label"`).
///
/// `question_id` may be a string or an integer (kept as its decimal text); `image` must be a
/// non-empty string; `text` is kept exactly, instruction suffix included; `category` may be
/// absent or null; `label`, when present, must be "yes" or "no" (any case). Blank lines are
/// skipped; unknown fields are ignored. Errors name the line and the field.
pub fn read_questions(path: &Path) -> Result<Vec<QuestionRecord>> {
    let text = read_text(path, "question file")?;
    jsonl_objects(path, &text)?
        .into_iter()
        .map(|(n, obj)| {
            let at = || format!("line {n}");
            let image = field_str(path, &at, &obj, "image")?;
            if image.trim().is_empty() {
                return Err(config(path, format!("line {n}: field `image` is empty")));
            }
            let label = match field_opt_str(path, &at, &obj, "label")? {
                None => None,
                Some(l) => match parse_yes_no_label(&l) {
                    Some(true) => Some("yes".to_string()),
                    Some(false) => Some("no".to_string()),
                    None => {
                        return Err(config(
                            path,
                            format!("line {n}: field `label` must be \"yes\" or \"no\", got {l:?}"),
                        ));
                    }
                },
            };
            Ok(QuestionRecord {
                line: n,
                question_id: field_id(path, &at, &obj, "question_id")?,
                image,
                text: field_str(path, &at, &obj, "text")?,
                category: field_opt_str(path, &at, &obj, "category")?,
                label,
            })
        })
        .collect()
}

/// Reads a TextVQA annotation file (`TextVQA_0.5.1_val.json`: `{"data": [{"question_id",
/// "image_id", "question", "answers": [10 strings], ...}, ...]}`). `question_id` and `answers`
/// (non-empty, strings) are required; `image_id` and `question` are optional (they are what
/// LLaVA joins on). Errors name the entry as `data[i]` (the file is usually a single line).
pub fn read_textvqa_annotations(path: &Path) -> Result<Vec<TextVqaAnnotation>> {
    let text = read_text(path, "TextVQA annotation file")?;
    let root: Value =
        serde_json::from_str(&text).map_err(|e| config(path, format!("not valid JSON ({e})")))?;
    let data = match root.get("data") {
        Some(Value::Array(d)) => d,
        Some(other) => {
            return Err(config(
                path,
                format!("field `data` must be an array, got {}", kind(other)),
            ));
        }
        None => {
            return Err(config(
                path,
                "missing top-level field `data` (a TextVQA annotation file is {\"data\": [...]})",
            ));
        }
    };
    data.iter()
        .enumerate()
        .map(|(i, entry)| {
            let at = || format!("data[{i}]");
            let obj = entry.as_object().ok_or_else(|| {
                config(
                    path,
                    format!("data[{i}]: expected an object, got {}", kind(entry)),
                )
            })?;
            let image_id = match obj.get("image_id") {
                None | Some(Value::Null) => None,
                Some(_) => Some(field_id(path, &at, obj, "image_id")?),
            };
            Ok(TextVqaAnnotation {
                index: i,
                question_id: field_id(path, &at, obj, "question_id")?,
                image_id,
                question: field_opt_str(path, &at, obj, "question")?,
                answers: field_str_list(path, &at, obj, "answers", None)?,
            })
        })
        .collect()
}

/// Reads a generic answers file: jsonl lines `{"question_id", "answers": [...]}` (strings, or
/// VQA-style objects `{"answer": "..."}`) or `{"question_id", "answer": "..."}`; `answers` wins
/// when a line has both. Errors name the line and the field.
pub fn read_answers(path: &Path) -> Result<Vec<AnswerRecord>> {
    let text = read_text(path, "answers file")?;
    jsonl_objects(path, &text)?
        .into_iter()
        .map(|(n, obj)| {
            let at = || format!("line {n}");
            let question_id = field_id(path, &at, &obj, "question_id")?;
            let answers = if obj.contains_key("answers") {
                field_str_list(path, &at, &obj, "answers", Some("answer"))?
            } else if obj.contains_key("answer") {
                vec![field_str(path, &at, &obj, "answer")?]
            } else {
                return Err(config(
                    path,
                    format!("line {n}: missing field `answers` (or `answer`)"),
                ));
            };
            Ok(AnswerRecord {
                line: n,
                question_id,
                answers,
            })
        })
        .collect()
}

/// Checks the image folder and resolves every record's image against it; missing images are
/// reported together (the first one named with its line, plus the count).
fn resolve_images(
    source: &Path,
    image_dir: &Path,
    records: &[&QuestionRecord],
) -> Result<Vec<PathBuf>> {
    if !image_dir.exists() {
        return Err(Error::MissingFile {
            what: "image folder",
            path: image_dir.to_path_buf(),
        });
    }
    if !image_dir.is_dir() {
        return Err(Error::arg(
            "image folder",
            format!("{} is not a directory", image_dir.display()),
        ));
    }
    let paths: Vec<PathBuf> = records.iter().map(|r| image_dir.join(&r.image)).collect();
    let missing: Vec<usize> = (0..paths.len()).filter(|&i| !paths[i].is_file()).collect();
    if let Some(&first) = missing.first() {
        let r = records[first];
        return Err(config(
            source,
            format!(
                "line {}: image `{}` not found at {} ({} of {} images missing from {})",
                r.line,
                r.image,
                paths[first].display(),
                missing.len(),
                paths.len(),
                image_dir.display()
            ),
        ));
    }
    Ok(paths)
}

/// The category of a POPE label file from its name: `coco_pope_random.json` -> "random", any
/// other name -> its stem.
fn pope_category_from_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name
        .strip_prefix("coco_pope_")
        .and_then(|s| s.strip_suffix(".json"))
    {
        Some(c) => c.to_string(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or(name),
    }
}

/// Loads one POPE label file on its own (`coco_pope_{random,popular,adversarial}.json`: jsonl
/// lines `{"question_id", "image", "text", "label": "yes"|"no"}`). Each item's answers are
/// `[label]`; its category is the line's `category` if present, else taken from the file name
/// ("coco_pope_random.json" -> "random"). Score with [`Metric::YesNo`].
pub fn load_pope(label_file: &Path, image_dir: &Path) -> Result<Vec<EvalItem>> {
    let records = read_questions(label_file)?;
    let file_category = pope_category_from_name(label_file);
    let mut labels = Vec::with_capacity(records.len());
    for r in &records {
        let label = r.label.clone().ok_or_else(|| {
            config(
                label_file,
                format!(
                    "line {}: missing field `label` (a POPE label file has \"label\": \
                     \"yes\"|\"no\" on every line)",
                    r.line
                ),
            )
        })?;
        labels.push(label);
    }
    let refs: Vec<&QuestionRecord> = records.iter().collect();
    let images = resolve_images(label_file, image_dir, &refs)?;
    Ok(records
        .into_iter()
        .zip(images)
        .zip(labels)
        .map(|((r, image), label)| EvalItem {
            question_id: r.question_id,
            image,
            question: r.text,
            answers: vec![label],
            category: Some(r.category.unwrap_or_else(|| file_category.clone())),
        })
        .collect())
}

/// Loads LLaVA's POPE set as `llava/eval/eval_pope.py` pairs it: the question file
/// (`llava_pope_test.jsonl`, every line with a `category`) and a folder holding
/// `coco_pope_{category}.json` for each category. LLaVA matches questions and labels *by
/// position* within a category, so the same is done here, with two checks the script lacks: the
/// counts must agree, and each pair must name the same image. Score with [`Metric::YesNo`];
/// LLaVA reports the metrics per category.
pub fn load_llava_pope(
    question_file: &Path,
    annotation_dir: &Path,
    image_dir: &Path,
) -> Result<Vec<EvalItem>> {
    let questions = read_questions(question_file)?;
    if !annotation_dir.is_dir() {
        return Err(Error::MissingFile {
            what: "POPE annotation folder",
            path: annotation_dir.to_path_buf(),
        });
    }
    // Categories in order of first appearance, each with its questions' indices.
    let mut order: Vec<String> = Vec::new();
    let mut by_cat: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, q) in questions.iter().enumerate() {
        let c = q.category.clone().ok_or_else(|| {
            config(
                question_file,
                format!(
                    "line {}: missing field `category` (LLaVA's POPE question file names the \
                     POPE split of every question)",
                    q.line
                ),
            )
        })?;
        by_cat
            .entry(c.clone())
            .or_insert_with(|| {
                order.push(c);
                Vec::new()
            })
            .push(i);
    }
    let mut labels: Vec<Option<String>> = vec![None; questions.len()];
    for c in &order {
        let label_file = annotation_dir.join(format!("coco_pope_{c}.json"));
        if !label_file.is_file() {
            return Err(Error::MissingFile {
                what: "POPE label file",
                path: label_file,
            });
        }
        let label_lines = read_questions(&label_file)?;
        let idx = &by_cat[c];
        if label_lines.len() != idx.len() {
            return Err(config(
                &label_file,
                format!(
                    "has {} labelled questions but {} has {} questions of category `{c}`; \
                     LLaVA pairs them by position",
                    label_lines.len(),
                    question_file.display(),
                    idx.len()
                ),
            ));
        }
        for (&qi, l) in idx.iter().zip(&label_lines) {
            let q = &questions[qi];
            if q.image != l.image {
                return Err(config(
                    question_file,
                    format!(
                        "line {}: image `{}` differs from `{}` on line {} of {}; LLaVA pairs \
                         questions and labels by position, so both files must list category \
                         `{c}` in the same order",
                        q.line,
                        q.image,
                        l.image,
                        l.line,
                        label_file.display()
                    ),
                ));
            }
            let label = l.label.clone().ok_or_else(|| {
                config(
                    &label_file,
                    format!("line {}: missing field `label`", l.line),
                )
            })?;
            labels[qi] = Some(label);
        }
    }
    let refs: Vec<&QuestionRecord> = questions.iter().collect();
    let images = resolve_images(question_file, image_dir, &refs)?;
    Ok(questions
        .into_iter()
        .zip(images)
        .zip(labels)
        .map(|((q, image), label)| EvalItem {
            question_id: q.question_id,
            image,
            question: q.text,
            // Every category was given a label file whose lines all carry a label above.
            answers: label.into_iter().collect(),
            category: q.category,
        })
        .collect())
}

/// The question LLaVA's `eval_textvqa.py` (`prompt_processor`) recovers from a TextVQA prompt,
/// lowercased: the text between "Question: " and " Short answer:" for BLIP-style prompts
/// starting "OCR tokens: "; for three-line prompts with "Reference OCR token: ", the line that is
/// not the OCR line (the first, or the second when the prompt starts with it); for two-line
/// prompts, the first line. Where the script would fail an assertion, the first line is used.
pub fn textvqa_prompt_question(prompt: &str) -> String {
    let lines: Vec<&str> = prompt.split('\n').collect();
    let q = if prompt.starts_with("OCR tokens: ") {
        prompt
            .find("Question: ")
            .map(|s| s + "Question: ".len())
            .and_then(|s| {
                prompt[s..]
                    .find(" Short answer:")
                    .map(|e| &prompt[s..s + e])
            })
            .unwrap_or(lines[0])
    } else if prompt.contains("Reference OCR token: ") && lines.len() == 3 {
        if prompt.starts_with("Reference OCR token:") {
            lines[1]
        } else {
            lines[0]
        }
    } else {
        lines[0]
    };
    q.to_lowercase()
}

/// Loads TextVQA as LLaVA runs it: LLaVA's question file (`llava_textvqa_val_v051_ocr.jsonl`)
/// joined with the official annotations (`TextVQA_0.5.1_val.json`), images resolved against
/// `image_dir` (TextVQA's `train_images`). Score with [`Metric::VqaSoft`].
///
/// Join, first match wins: (1) LLaVA's own key, annotation `(image_id, question.lower())` ==
/// `(question_id, textvqa_prompt_question(text))` — LLaVA's question file uses the image id as
/// `question_id`; (2) the annotation with the same `question_id`; (3) `(image file stem,
/// prompt question)`. A question with no annotation is an error naming its line.
pub fn load_textvqa(
    question_file: &Path,
    annotation_file: &Path,
    image_dir: &Path,
) -> Result<Vec<EvalItem>> {
    let questions = read_questions(question_file)?;
    let annotations = read_textvqa_annotations(annotation_file)?;
    let mut by_image_question: HashMap<(String, String), usize> = HashMap::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (i, a) in annotations.iter().enumerate() {
        if let (Some(img), Some(q)) = (&a.image_id, &a.question) {
            // Later entries win, as in the script's dict comprehension.
            by_image_question.insert((img.clone(), q.to_lowercase()), i);
        }
        by_id.insert(a.question_id.clone(), i);
    }
    let refs: Vec<&QuestionRecord> = questions.iter().collect();
    let images = resolve_images(question_file, image_dir, &refs)?;
    questions
        .into_iter()
        .zip(images)
        .map(|(q, image)| {
            let asked = textvqa_prompt_question(&q.text);
            let stem = Path::new(&q.image)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let found = by_image_question
                .get(&(q.question_id.clone(), asked.clone()))
                .or_else(|| by_id.get(&q.question_id))
                .or_else(|| by_image_question.get(&(stem, asked.clone())))
                .ok_or_else(|| {
                    config(
                        question_file,
                        format!(
                            "line {}: no annotation in {} for question_id `{}` (looked up by \
                             image_id + question {:?}, by question_id, and by image file name)",
                            q.line,
                            annotation_file.display(),
                            q.question_id,
                            asked
                        ),
                    )
                })?;
            Ok(EvalItem {
                question_id: q.question_id,
                image,
                question: q.text,
                answers: annotations[*found].answers.clone(),
                category: q.category,
            })
        })
        .collect()
}

/// Loads any LLaVA-style question file with a generic answers file ([`read_answers`]), joined by
/// `question_id`. Every question needs an answer line; an answers file may hold extra ids, but
/// not the same id twice. Score with [`Metric::VqaSoft`] (10 annotator answers) or
/// [`Metric::Exact`] (a list of accepted answers).
pub fn load_with_answers(
    question_file: &Path,
    answers_file: &Path,
    image_dir: &Path,
) -> Result<Vec<EvalItem>> {
    let questions = read_questions(question_file)?;
    let answers = read_answers(answers_file)?;
    let mut by_id: HashMap<&str, &AnswerRecord> = HashMap::new();
    for a in &answers {
        if let Some(prev) = by_id.insert(a.question_id.as_str(), a) {
            return Err(config(
                answers_file,
                format!(
                    "line {}: question_id `{}` already answered on line {}",
                    a.line, a.question_id, prev.line
                ),
            ));
        }
    }
    let mut joined = Vec::with_capacity(questions.len());
    for q in &questions {
        let a = by_id.get(q.question_id.as_str()).ok_or_else(|| {
            config(
                question_file,
                format!(
                    "line {}: question_id `{}` has no answers in {}",
                    q.line,
                    q.question_id,
                    answers_file.display()
                ),
            )
        })?;
        joined.push(a.answers.clone());
    }
    let refs: Vec<&QuestionRecord> = questions.iter().collect();
    let images = resolve_images(question_file, image_dir, &refs)?;
    Ok(questions
        .into_iter()
        .zip(images)
        .zip(joined)
        .map(|((q, image), answers)| EvalItem {
            question_id: q.question_id,
            image,
            question: q.text,
            answers,
            category: q.category,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn punctuation_next_to_space_is_deleted_else_spaced() {
        // "-" touches no space: replaced by a space; "/" likewise.
        assert_eq!(process_punctuation("t-shirt"), "t shirt");
        assert_eq!(process_punctuation("yes/no"), "yes no");
        // " - " touches a space: deleted (the double space collapses later).
        assert_eq!(process_punctuation("left - right"), "left  right");
        // A mark that touches a space anywhere is deleted everywhere in the answer.
        assert_eq!(process_punctuation("a-b c -d"), "ab c d");
        // digit,comma,digit anywhere: every mark is deleted.
        assert_eq!(process_punctuation("1,000 t-shirts"), "1000 tshirts");
    }

    #[test]
    fn periods_kept_only_before_digits() {
        assert_eq!(strip_periods("3.5"), "3.5");
        assert_eq!(strip_periods("dog."), "dog");
        assert_eq!(strip_periods("a.m."), "am");
        assert_eq!(strip_periods("..5"), ".5");
        assert_eq!(strip_periods("v1.2.x"), "v1.2x");
        // At most 32 periods go (re.UNICODE passed as `count`).
        let many = ".".repeat(40);
        assert_eq!(strip_periods(&many), ".".repeat(8));
    }

    #[test]
    fn digit_comma_digit_detector() {
        assert!(has_digit_commas_digit("1,000"));
        assert!(has_digit_commas_digit("x 1,,2"));
        assert!(!has_digit_commas_digit("1, 2"));
        assert!(!has_digit_commas_digit("a,b"));
        assert!(!has_digit_commas_digit("1,"));
    }

    #[test]
    fn digit_article_step() {
        assert_eq!(process_digit_article("The  TWO dogs"), "2 dogs");
        assert_eq!(process_digit_article("an apple"), "apple");
        assert_eq!(process_digit_article("twenty"), "twenty");
        assert_eq!(process_digit_article("dont"), "don't");
        assert_eq!(process_digit_article("somebody'd"), "somebodyd");
    }

    #[test]
    fn single_answer_reduces_to_exact_match() {
        assert_eq!(vqa_accuracy("Two", &s(&["2"])), 1.0);
        assert_eq!(vqa_accuracy("3", &s(&["2"])), 0.0);
        assert_eq!(vqa_accuracy("2", &[]), 0.0);
    }

    #[test]
    fn splitmix_is_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn quantile_interpolates() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&v, 0.5), 2.0);
        assert_eq!(quantile_sorted(&v, 0.125), 0.5);
        assert_eq!(quantile_sorted(&v, 1.0), 4.0);
        assert_eq!(quantile_sorted(&[7.0], 0.025), 7.0);
    }

    #[test]
    fn prompt_question_rules() {
        let llava = "what is the brand?\nReference OCR token: dakota, camera\nAnswer the question \
                     using a single word or phrase.";
        assert_eq!(textvqa_prompt_question(llava), "what is the brand?");
        let ocr_first = "Reference OCR token: x\nWhat Brand?\nAnswer briefly.";
        assert_eq!(textvqa_prompt_question(ocr_first), "what brand?");
        let two = "What Year?\nAnswer the question using a single word or phrase.";
        assert_eq!(textvqa_prompt_question(two), "what year?");
        let blip = "OCR tokens: a, b. Question: What is IT? Short answer: ";
        assert_eq!(textvqa_prompt_question(blip), "what is it?");
        assert_eq!(textvqa_prompt_question("Just one line"), "just one line");
    }

    #[test]
    fn pope_category_names() {
        assert_eq!(
            pope_category_from_name(Path::new("/x/coco_pope_adversarial.json")),
            "adversarial"
        );
        assert_eq!(pope_category_from_name(Path::new("mine.jsonl")), "mine");
    }
}
