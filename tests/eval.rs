//! Scoring rules against hand-worked cases from the official scripts' behaviour, and the readers
//! for LLaVA's evaluation files on small files written here.

use fineprune::Error;
use fineprune::bench::eval::*;
use std::path::{Path, PathBuf};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

// ---------------------------------------------------------------------------------------------
// Normalisation (expected values are what EvalAIAnswerProcessor in m4c_evaluator.py returns)
// ---------------------------------------------------------------------------------------------

#[test]
fn number_words_become_digits() {
    assert_eq!(normalize_answer("Two"), "2");
    assert_eq!(normalize_answer("none"), "0");
    assert_eq!(normalize_answer("Zero"), "0");
    assert_eq!(normalize_answer("ten"), "10");
    // Whole words only, and nothing above ten.
    assert_eq!(normalize_answer("eleven"), "eleven");
    assert_eq!(normalize_answer("someone"), "someone");
    assert!(exact_match("Two", &s(&["2"])));
    assert!(exact_match("None", &s(&["0"])));
}

#[test]
fn articles_and_trailing_period_go() {
    assert_eq!(normalize_answer("a dog."), "dog");
    assert_eq!(normalize_answer("The Dog"), "dog");
    assert_eq!(normalize_answer("an apple"), "apple");
    assert!(exact_match("A dog.", &s(&["dog"])));
    // Only whole-word articles: "theater" keeps its "the".
    assert_eq!(normalize_answer("theater"), "theater");
}

#[test]
fn commas_in_numbers_and_decimal_points() {
    // Commas are deleted outright, so thousands separators vanish.
    assert_eq!(normalize_answer("1,000"), "1000");
    assert!(exact_match("1,000", &s(&["1000"])));
    // A period followed by a digit is a decimal point and stays; any other period goes.
    assert_eq!(normalize_answer("3.5"), "3.5");
    assert_eq!(normalize_answer("The answer is 3.5."), "answer is 3.5");
    assert_eq!(normalize_answer("a.m."), "am");
    assert_eq!(normalize_answer("$1.99"), "$1.99");
    assert!(!exact_match("3.5", &s(&["35"])));
}

#[test]
fn contractions() {
    // "'s" is split off first, so "it's" is two words and never equals "its".
    assert_eq!(normalize_answer("it's"), "it 's");
    assert_eq!(normalize_answer("its"), "its");
    assert!(!exact_match("it's", &s(&["its"])));
    assert_eq!(normalize_answer("John's"), "john 's");
    // Apostrophe-less spellings map to the contraction, so both spellings match.
    assert_eq!(normalize_answer("dont"), "don't");
    assert_eq!(normalize_answer("don't"), "don't");
    assert!(exact_match("Dont", &s(&["don't"])));
    assert_eq!(normalize_answer("itll"), "it'll");
    assert_eq!(normalize_answer("oclock"), "o'clock");
}

#[test]
fn punctuation_spacing() {
    // A mark not touching a space becomes a space; one touching a space is deleted.
    assert_eq!(normalize_answer("t-shirt"), "t shirt");
    assert_eq!(normalize_answer("left - right"), "left right");
    assert_eq!(normalize_answer("yes/no"), "yes no");
    assert_eq!(normalize_answer("(red)"), "red");
    assert_eq!(normalize_answer("Stop!"), "stop");
    assert_eq!(normalize_answer("what?"), "what");
    // ':' and '\'' are not in the list.
    assert_eq!(normalize_answer("10:30"), "10:30");
    // White space of any kind collapses.
    assert_eq!(normalize_answer("  big\n\tred  dog "), "big red dog");
    assert_eq!(normalize_answer(""), "");
}

#[test]
fn exact_match_needs_some_answer() {
    assert!(!exact_match("dog", &[]));
    assert!(exact_match("cat", &s(&["dog", "Cat."])));
    assert!(!exact_match("black cat", &s(&["cat"])));
}

// ---------------------------------------------------------------------------------------------
// VQA soft accuracy
// ---------------------------------------------------------------------------------------------

/// Ten answers of which the first `m` are spellings of "2" and the rest "3".
fn ten_with(m: usize) -> Vec<String> {
    let spellings = ["2", "two", "Two.", "2", "2"];
    (0..10)
        .map(|i| {
            if i < m {
                spellings[i % spellings.len()].to_string()
            } else {
                "3".to_string()
            }
        })
        .collect()
}

#[test]
fn soft_accuracy_by_hand() {
    // acc = mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3).
    // m = 0: every subset has 0 matches -> 0.
    assert!(close(vqa_accuracy("two", &ten_with(0)), 0.0));
    // m = 1: leaving out the match -> 0; leaving out any of the 9 others -> 1/3.
    // (0 + 9 * 1/3) / 10 = 3/10 = 0.3
    assert!(close(vqa_accuracy("two", &ten_with(1)), 0.3));
    // m = 2: leaving out a match -> 1/3 (x2); leaving out a non-match -> 2/3 (x8).
    // (2/3 + 16/3) / 10 = 6/10 = 0.6
    assert!(close(vqa_accuracy("two", &ten_with(2)), 0.6));
    // m = 3: leaving out a match -> 2/3 (x3); a non-match -> min(1, 3/3) = 1 (x7).
    // (2 + 7) / 10 = 0.9: three matches are NOT full credit under the leave-one-out average.
    assert!(close(vqa_accuracy("two", &ten_with(3)), 0.9));
    // m = 4: every subset keeps at least 3 matches -> 1.0; and so for any m >= 4.
    assert!(close(vqa_accuracy("two", &ten_with(4)), 1.0));
    assert!(close(vqa_accuracy("2", &ten_with(7)), 1.0));
    assert!(close(vqa_accuracy("2.", &ten_with(10)), 1.0));
    // The normalisation applies to both sides: "Two." in the answers matches "2".
    assert!(close(vqa_accuracy("3", &ten_with(7)), 0.9));
}

#[test]
fn soft_accuracy_small_lists() {
    // One answer: exact match.
    assert_eq!(vqa_accuracy("A dog", &s(&["dog"])), 1.0);
    assert_eq!(vqa_accuracy("cat", &s(&["dog"])), 0.0);
    assert_eq!(vqa_accuracy("cat", &[]), 0.0);
    // Two answers, both matching: each subset holds 1 match -> 1/3.
    assert!(close(vqa_accuracy("dog", &s(&["dog", "dog"])), 1.0 / 3.0));
}

#[test]
fn extract_answer_takes_first_line() {
    assert_eq!(extract_answer("  Dog.\nThe image shows a dog."), "Dog.");
    assert_eq!(extract_answer("\n\n  2  \nbecause"), "2");
    assert_eq!(extract_answer("   "), "");
}

// ---------------------------------------------------------------------------------------------
// POPE
// ---------------------------------------------------------------------------------------------

#[test]
fn pope_reading_of_real_outputs() {
    assert!(pope_yes_no("Yes"));
    assert!(pope_yes_no("Yes, there is a dog."));
    assert!(!pope_yes_no("No"));
    assert!(!pope_yes_no("No."));
    assert!(!pope_yes_no("No, there is no cat in the image."));
    assert!(!pope_yes_no("There is not a cat."));
    // "don't" is not the word "no" or "not": the script reads this as yes.
    assert!(pope_yes_no("I don't see any cat."));
    // Only the first sentence counts.
    assert!(pope_yes_no("Yes. There is no cat."));
    assert!(!pope_yes_no("No. But there is a dog."));
    // Exact words, split on spaces, commas deleted first.
    assert!(!pope_yes_no("No,"));
    assert!(!pope_yes_no("There is no cat"));
    assert!(pope_yes_no("NO"));
    assert!(pope_yes_no("Not really"));
    assert!(pope_yes_no("no!"));
    // Surrounding white space is trimmed as LLaVA's loader does.
    assert!(!pope_yes_no("\n No \n"));
    assert_eq!(parse_yes_no_label(" Yes "), Some(true));
    assert_eq!(parse_yes_no_label("no"), Some(false));
    assert_eq!(parse_yes_no_label("maybe"), None);
}

#[test]
fn pope_metrics_small_confusion_matrix() {
    // TP = 3, FP = 1, TN = 4, FN = 2 (pred, label).
    let mut pairs = vec![(true, true); 3];
    pairs.push((true, false));
    pairs.extend(vec![(false, false); 4]);
    pairs.extend(vec![(false, true); 2]);
    let m = PopeMetrics::from_pairs(pairs);
    assert_eq!(
        (m.n, m.true_pos, m.false_pos, m.true_neg, m.false_neg),
        (10, 3, 1, 4, 2)
    );
    assert!(close(m.accuracy, 0.7)); // (3 + 4) / 10
    assert!(close(m.precision, 0.75)); // 3 / (3 + 1)
    assert!(close(m.recall, 0.6)); // 3 / (3 + 2)
    assert!(close(m.f1, 2.0 / 3.0)); // 2 * 0.75 * 0.6 / 1.35 = 0.9 / 1.35
    assert!(close(m.yes_ratio, 0.4)); // (3 + 1) / 10

    // From raw answers.
    let answers = ["Yes", "No.", "There is not a dog.", "Yes, a cat."];
    let m = pope_metrics(&answers, &[true, false, true, false]).unwrap();
    assert_eq!(
        (m.true_pos, m.false_pos, m.true_neg, m.false_neg),
        (1, 1, 1, 1)
    );
    assert!(close(m.f1, 0.5));
    assert!(matches!(
        pope_metrics(&answers, &[true]),
        Err(Error::Arg { .. })
    ));
}

#[test]
fn pope_metrics_zero_denominators_are_zero() {
    let empty = PopeMetrics::from_pairs(Vec::new());
    assert_eq!(empty, PopeMetrics::default());
    // The model always says no: no positive predictions -> precision 0, recall 0, f1 0.
    let m = PopeMetrics::from_pairs(vec![(false, true), (false, false)]);
    assert_eq!(
        (m.precision, m.recall, m.f1, m.yes_ratio),
        (0.0, 0.0, 0.0, 0.0)
    );
    assert!(close(m.accuracy, 0.5));
    // No positive labels, all predictions yes.
    let m = PopeMetrics::from_pairs(vec![(true, false)]);
    assert_eq!((m.precision, m.recall, m.f1), (0.0, 0.0, 0.0));
    assert_eq!(m.yes_ratio, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Scorecard and bootstrap
// ---------------------------------------------------------------------------------------------

#[test]
fn scorecard_summary_and_json() {
    let mut sc = Scorecard::new();
    assert_eq!(sc.accuracy(), 0.0);
    assert_eq!(sc.pope_metrics(), None);
    sc.add_vqa("1", "text", "two", &ten_with(2)); // 0.6
    sc.add_exact("2", "text", "Cat", &s(&["dog", "cat"])); // 1.0
    sc.add_yes_no("3", "random", "Yes, there is.", true); // TP, 1.0
    sc.add_yes_no("4", "random", "No.", true); // FN, 0.0
    sc.add_yes_no("5", "popular", "There is not.", false); // TN, 1.0
    sc.add_score("6", "count", "3", 0.5).unwrap();
    assert!(sc.add_score("7", "count", "3", 1.5).is_err());
    assert!(sc.add_score("7", "count", "3", f64::NAN).is_err());
    assert_eq!(sc.len(), 6);

    let sum = sc.summary();
    assert_eq!(sum.n, 6);
    assert!(close(
        sum.accuracy,
        (0.6 + 1.0 + 1.0 + 0.0 + 1.0 + 0.5) / 6.0
    ));
    let names: Vec<&str> = sum.families.keys().map(String::as_str).collect();
    assert_eq!(names, ["count", "popular", "random", "text"]);
    let text = &sum.families["text"];
    assert_eq!(text.n, 2);
    assert!(close(text.accuracy, 0.8));
    assert_eq!(text.pope, None);
    let random = sum.families["random"].pope.unwrap();
    assert_eq!((random.n, random.true_pos, random.false_neg), (2, 1, 1));
    let pooled = sum.pope.unwrap();
    assert_eq!(
        (pooled.n, pooled.true_pos, pooled.true_neg, pooled.false_neg),
        (3, 1, 1, 1)
    );
    let only_popular = sc.pope_metrics_where(|f| f == "popular");
    assert_eq!((only_popular.n, only_popular.true_neg), (1, 1));
    assert_eq!(sc.pope_metrics_where(|f| f == "text").n, 0);

    // Serialises (summary and the card itself) and reads back.
    let json = serde_json::to_string(&sum).unwrap();
    let back: ScoreSummary = serde_json::from_str(&json).unwrap();
    assert_eq!(back, sum);
    let card: Scorecard = serde_json::from_str(&serde_json::to_string(&sc).unwrap()).unwrap();
    assert_eq!(card, sc);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["families"]["random"]["pope"]["n"], 2);

    let mut other = Scorecard::new();
    other.add_exact("8", "text", "x", &s(&["y"]));
    sc.merge(other);
    assert_eq!(sc.len(), 7);
}

#[test]
fn scorecard_add_item_metrics() {
    let item = |answers: &[&str], category: Option<&str>| EvalItem {
        question_id: "q".into(),
        image: PathBuf::from("x.jpg"),
        question: "Is there a dog?".into(),
        answers: s(answers),
        category: category.map(String::from),
    };
    let mut sc = Scorecard::new();
    let yes = item(&["yes"], Some("adversarial"));
    assert_eq!(sc.add_item(&yes, "Yes", Metric::YesNo).unwrap(), 1.0);
    assert_eq!(sc.samples[0].family, "adversarial");
    assert!(sc.samples[0].yes_no.is_some());
    let tv = item(&["2"; 10], None);
    assert_eq!(sc.add_item(&tv, "two", Metric::VqaSoft).unwrap(), 1.0);
    assert_eq!(sc.samples[1].family, "default");
    assert_eq!(
        sc.add_item(&item(&["a", "b"], None), "B", Metric::Exact)
            .unwrap(),
        1.0
    );
    let err = sc
        .add_item(&item(&["dog"], None), "yes", Metric::YesNo)
        .unwrap_err();
    assert!(err.to_string().contains("yes/no"), "{err}");
    assert_eq!(sc.len(), 3);
}

#[test]
fn bootstrap_is_seeded_and_covers_the_estimate() {
    // 100 samples, 70 right.
    let scores: Vec<f64> = (0..100).map(|i| f64::from(u8::from(i % 10 < 7))).collect();
    let a = bootstrap_ci(&scores, 1000, 42, 0.95).unwrap();
    let b = bootstrap_ci(&scores, 1000, 42, 0.95).unwrap();
    assert_eq!(a, b);
    assert!(close(a.estimate, 0.7));
    assert!(a.lower < a.estimate && a.estimate < a.upper, "{a:?}");
    // Binomial standard error sqrt(0.7 * 0.3 / 100) = 0.046: the 95% interval is about +-0.09.
    assert!(
        a.upper - a.lower > 0.12 && a.upper - a.lower < 0.24,
        "{a:?}"
    );
    let c = bootstrap_ci(&scores, 1000, 43, 0.95).unwrap();
    assert_ne!((a.lower, a.upper), (c.lower, c.upper));
    // A wider level gives a wider interval from the same resamples.
    let w = bootstrap_ci(&scores, 1000, 42, 0.99).unwrap();
    assert!(w.lower <= a.lower && w.upper >= a.upper);
    // Constant scores: a point interval.
    let k = bootstrap_ci(&[1.0; 20], 50, 1, 0.95).unwrap();
    assert_eq!((k.lower, k.estimate, k.upper), (1.0, 1.0, 1.0));

    let mut sc = Scorecard::new();
    for (i, &x) in scores.iter().enumerate() {
        sc.add_score(i.to_string(), "f", "", x).unwrap();
    }
    assert_eq!(sc.bootstrap_ci(1000, 42).unwrap(), a);
    // The summary carries the seed-0 interval; an empty scorecard has none.
    let ci = sc.summary().accuracy_ci.unwrap();
    assert_eq!(ci, sc.bootstrap_ci(1000, 0).unwrap());
    assert_eq!(Scorecard::new().summary().accuracy_ci, None);

    for bad in [
        bootstrap_ci(&[], 10, 0, 0.95),
        bootstrap_ci(&scores, 0, 0, 0.95),
        bootstrap_ci(&scores, 10, 0, 1.0),
        bootstrap_ci(&scores, 10, 0, f64::NAN),
        bootstrap_ci(&[0.5, f64::INFINITY], 10, 0, 0.95),
    ] {
        assert!(matches!(bad, Err(Error::Arg { .. })), "{bad:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------------------------

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        let f = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(f.images()).unwrap();
        f
    }

    fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// Creates (empty) image files: only their presence is checked.
    fn image(&self, names: &[&str]) {
        for n in names {
            std::fs::write(self.images().join(n), b"").unwrap();
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// The error is a Config error on `path` whose message contains every `needle`.
fn assert_config(err: Error, path: &Path, needles: &[&str]) {
    match &err {
        Error::Config { path: p, msg } => {
            assert_eq!(p, path, "{err}");
            for n in needles {
                assert!(msg.contains(n), "`{n}` not in: {msg}");
            }
        }
        other => panic!("expected a Config error, got {other}"),
    }
}

const SUFFIX: &str = "\nAnswer the question using a single word or phrase.";

#[test]
fn question_file_reads_llava_lines() {
    let f = Files::new();
    let q = f.write(
        "q.jsonl",
        "\u{feff}{\"question_id\": 7, \"image\": \"a.jpg\", \"text\": \"What colour?\\nAnswer the \
         question using a single word or phrase.\", \"category\": \"default\"}\n\
         \n\
         {\"question_id\": \"x-1\", \"image\": \"b.jpg\", \"text\": \"Is it?\", \"label\": \"No\", \
         \"category\": null, \"extra\": [1]}\n",
    );
    let r = read_questions(&q).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0],
        QuestionRecord {
            line: 1,
            question_id: "7".into(),
            image: "a.jpg".into(),
            text: format!("What colour?{SUFFIX}"),
            category: Some("default".into()),
            label: None,
        }
    );
    assert_eq!(r[1].line, 3);
    assert_eq!(r[1].question_id, "x-1");
    assert_eq!(r[1].category, None);
    assert_eq!(r[1].label.as_deref(), Some("no"));
}

#[test]
fn question_file_malformed_lines() {
    let f = Files::new();
    let good = r#"{"question_id": 1, "image": "a.jpg", "text": "q"}"#;
    let cases: &[(&str, &[&str])] = &[
        ("{\"question_id\": 1, ", &["line 2", "not valid JSON"]),
        ("[1, 2]", &["line 2", "expected a JSON object", "array"]),
        (
            r#"{"image": "a.jpg", "text": "q"}"#,
            &["line 2", "`question_id`", "missing"],
        ),
        (
            r#"{"question_id": 1.5, "image": "a.jpg", "text": "q"}"#,
            &["line 2", "`question_id`", "string or an integer"],
        ),
        (
            r#"{"question_id": [1], "image": "a.jpg", "text": "q"}"#,
            &["line 2", "`question_id`"],
        ),
        (
            r#"{"question_id": 2, "text": "q"}"#,
            &["line 2", "missing field `image`"],
        ),
        (
            r#"{"question_id": 2, "image": 5, "text": "q"}"#,
            &["line 2", "`image` must be a string", "number"],
        ),
        (
            r#"{"question_id": 2, "image": " ", "text": "q"}"#,
            &["line 2", "`image` is empty"],
        ),
        (
            r#"{"question_id": 2, "image": "a.jpg"}"#,
            &["line 2", "missing field `text`"],
        ),
        (
            r#"{"question_id": 2, "image": "a.jpg", "text": "q", "category": 3}"#,
            &["line 2", "`category` must be a string"],
        ),
        (
            r#"{"question_id": 2, "image": "a.jpg", "text": "q", "label": "maybe"}"#,
            &["line 2", "`label`", "\"maybe\""],
        ),
    ];
    for (bad, needles) in cases {
        let p = f.write("bad.jsonl", &format!("{good}\n{bad}\n"));
        assert_config(read_questions(&p).unwrap_err(), &p, needles);
    }
    let p = f.write("bin.jsonl", "");
    std::fs::write(&p, b"{\"a\": \"\xff\"}").unwrap();
    assert_config(read_questions(&p).unwrap_err(), &p, &["UTF-8"]);
    let missing = f.dir.path().join("nope.jsonl");
    assert!(matches!(
        read_questions(&missing),
        Err(Error::MissingFile {
            what: "question file",
            ..
        })
    ));
}

const POPE_RANDOM: &str = r#"{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}
{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?", "label": "no"}
"#;

#[test]
fn pope_label_file_alone() {
    let f = Files::new();
    f.image(&["COCO_val2014_000000310196.jpg"]);
    let p = f.write("coco_pope_random.json", POPE_RANDOM);
    let items = load_pope(&p, &f.images()).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].question_id, "1");
    assert_eq!(
        items[0].image,
        f.images().join("COCO_val2014_000000310196.jpg")
    );
    assert_eq!(items[0].question, "Is there a snowboard in the image?");
    assert_eq!(items[0].answers, s(&["yes"]));
    assert_eq!(items[1].answers, s(&["no"]));
    assert_eq!(items[1].category.as_deref(), Some("random"));

    // Scored end to end.
    let mut sc = Scorecard::new();
    for (it, pred) in items.iter().zip(["Yes, there is a snowboard.", "No."]) {
        sc.add_item(it, pred, Metric::YesNo).unwrap();
    }
    assert_eq!(sc.accuracy(), 1.0);
    assert_eq!(sc.summary().families["random"].pope.unwrap().f1, 1.0);

    // A line without a label.
    let p2 = f.write(
        "coco_pope_popular.json",
        &format!("{POPE_RANDOM}{{\"question_id\": 3, \"image\": \"x.jpg\", \"text\": \"q\"}}\n"),
    );
    assert_config(
        load_pope(&p2, &f.images()).unwrap_err(),
        &p2,
        &["line 3", "missing field `label`"],
    );
}

#[test]
fn missing_images_are_reported() {
    let f = Files::new();
    let p = f.write("coco_pope_random.json", POPE_RANDOM);
    // No image folder.
    let nowhere = f.dir.path().join("val2014");
    match load_pope(&p, &nowhere).unwrap_err() {
        Error::MissingFile { what, path } => {
            assert_eq!(what, "image folder");
            assert_eq!(path, nowhere);
        }
        other => panic!("{other}"),
    }
    // A file instead of a folder.
    assert!(matches!(load_pope(&p, &p), Err(Error::Arg { .. })));
    // Folder present, images absent: the first one with its line, and the count.
    assert_config(
        load_pope(&p, &f.images()).unwrap_err(),
        &p,
        &[
            "line 1",
            "COCO_val2014_000000310196.jpg",
            "not found",
            "2 of 2 images missing",
        ],
    );
}

fn llava_pope_line(id: usize, image: &str, object: &str, category: &str) -> String {
    format!(
        "{{\"question_id\": {id}, \"image\": \"{image}\", \"text\": \"Is there a {object} in the \
         image?\\nAnswer the question using a single word or phrase.\", \"category\": \
         \"{category}\"}}\n"
    )
}

fn pope_label_line(id: usize, image: &str, object: &str, label: &str) -> String {
    format!(
        "{{\"question_id\": {id}, \"image\": \"{image}\", \"text\": \"Is there a {object} in the \
         image?\", \"label\": \"{label}\"}}\n"
    )
}

#[test]
fn llava_pope_pairs_by_position_within_category() {
    let f = Files::new();
    f.image(&["a.jpg", "b.jpg", "c.jpg"]);
    let ann = f.dir.path().join("coco");
    std::fs::create_dir(&ann).unwrap();
    let q = f.write(
        "llava_pope_test.jsonl",
        &[
            llava_pope_line(0, "a.jpg", "dog", "adversarial"),
            llava_pope_line(1, "b.jpg", "cat", "random"),
            llava_pope_line(2, "c.jpg", "car", "adversarial"),
        ]
        .concat(),
    );
    std::fs::write(
        ann.join("coco_pope_adversarial.json"),
        [
            pope_label_line(1, "a.jpg", "dog", "yes"),
            pope_label_line(2, "c.jpg", "car", "no"),
        ]
        .concat(),
    )
    .unwrap();
    std::fs::write(
        ann.join("coco_pope_random.json"),
        pope_label_line(1, "b.jpg", "cat", "no"),
    )
    .unwrap();
    let items = load_llava_pope(&q, &ann, &f.images()).unwrap();
    let got: Vec<(&str, &str, &str)> = items
        .iter()
        .map(|i| {
            (
                i.question_id.as_str(),
                i.answers[0].as_str(),
                i.category.as_deref().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("0", "yes", "adversarial"),
            ("1", "no", "random"),
            ("2", "no", "adversarial")
        ]
    );
    assert!(items[0].question.ends_with(SUFFIX));

    // Image order disagrees.
    std::fs::write(
        ann.join("coco_pope_adversarial.json"),
        [
            pope_label_line(1, "c.jpg", "car", "no"),
            pope_label_line(2, "a.jpg", "dog", "yes"),
        ]
        .concat(),
    )
    .unwrap();
    assert_config(
        load_llava_pope(&q, &ann, &f.images()).unwrap_err(),
        &q,
        &["line 1", "`a.jpg`", "`c.jpg`", "line 1 of", "same order"],
    );
    // Counts disagree.
    let adv = ann.join("coco_pope_adversarial.json");
    std::fs::write(&adv, pope_label_line(1, "a.jpg", "dog", "yes")).unwrap();
    assert_config(
        load_llava_pope(&q, &ann, &f.images()).unwrap_err(),
        &adv,
        &["1 labelled", "2 questions of category `adversarial`"],
    );
    // No label file for a category.
    std::fs::remove_file(ann.join("coco_pope_random.json")).unwrap();
    std::fs::write(
        &adv,
        [
            pope_label_line(1, "a.jpg", "dog", "yes"),
            pope_label_line(2, "c.jpg", "car", "no"),
        ]
        .concat(),
    )
    .unwrap();
    match load_llava_pope(&q, &ann, &f.images()).unwrap_err() {
        Error::MissingFile { what, path } => {
            assert_eq!(what, "POPE label file");
            assert_eq!(path, ann.join("coco_pope_random.json"));
        }
        other => panic!("{other}"),
    }
    // No annotation folder.
    assert!(matches!(
        load_llava_pope(&q, &f.dir.path().join("none"), &f.images()),
        Err(Error::MissingFile {
            what: "POPE annotation folder",
            ..
        })
    ));
    // A question without a category.
    let q2 = f.write(
        "q2.jsonl",
        r#"{"question_id": 0, "image": "a.jpg", "text": "Is there a dog?"}"#,
    );
    assert_config(
        load_llava_pope(&q2, &ann, &f.images()).unwrap_err(),
        &q2,
        &["line 1", "missing field `category`"],
    );
}

fn textvqa_annotations() -> String {
    let ten = |a: &str, b: &str| {
        let mut v = vec![a; 7];
        v.extend([b; 3]);
        serde_json::to_string(&v).unwrap()
    };
    format!(
        "{{\"dataset_name\": \"textvqa\", \"data\": [\
         {{\"question_id\": 34602, \"image_id\": \"003a8ae2ef43b901\", \"question\": \"What is \
         the brand of this camera?\", \"answers\": {}, \"image_classes\": [\"Camera\"]}}, \
         {{\"question_id\": 34603, \"image_id\": \"003a8ae2ef43b901\", \"question\": \"What does \
         the small white text spell?\", \"answers\": {}}}, \
         {{\"question_id\": 34604, \"image_id\": \"00685bc495504d61\", \"question\": \"What year \
         is shown?\", \"answers\": {}}}]}}",
        ten("dakota", "nous les gosses"),
        ten("copenhagen", "cph"),
        ten("1999", "1990")
    )
}

#[test]
fn textvqa_joins_like_llava() {
    let f = Files::new();
    f.image(&["003a8ae2ef43b901.jpg", "00685bc495504d61.jpg"]);
    let ann = f.write("TextVQA_0.5.1_val.json", &textvqa_annotations());
    let q = f.write(
        "llava_textvqa_val_v051_ocr.jsonl",
        // LLaVA's file: question_id is the image id, the question is recovered from the prompt.
        "{\"question_id\": \"003a8ae2ef43b901\", \"image\": \"003a8ae2ef43b901.jpg\", \"text\": \
         \"what does the small white text spell?\\nReference OCR token: COPENHAGEN, Nous\\nAnswer \
         the question using a single word or phrase.\", \"category\": \"default\"}\n\
         {\"question_id\": \"003a8ae2ef43b901\", \"image\": \"003a8ae2ef43b901.jpg\", \"text\": \
         \"what is the brand of this camera?\\nReference OCR token: dakota\\nAnswer the question \
         using a single word or phrase.\"}\n\
         {\"question_id\": 34604, \"image\": \"00685bc495504d61.jpg\", \"text\": \"What year is \
         shown?\"}\n\
         {\"question_id\": 9, \"image\": \"00685bc495504d61.jpg\", \"text\": \"What year is \
         shown?\\nAnswer the question using a single word or phrase.\"}\n",
    );
    let items = load_textvqa(&q, &ann, &f.images()).unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0].answers[0], "copenhagen");
    assert_eq!(items[0].answers.len(), 10);
    assert!(items[0].question.ends_with(SUFFIX));
    assert_eq!(items[0].category.as_deref(), Some("default"));
    assert_eq!(items[1].answers[0], "dakota");
    // Joined by question_id.
    assert_eq!(items[2].answers[0], "1999");
    // Joined by image file name + question.
    assert_eq!(items[3].answers[0], "1999");
    assert_eq!(items[3].image, f.images().join("00685bc495504d61.jpg"));

    // 7 annotators said "dakota", 3 "nous les gosses".
    let mut sc = Scorecard::new();
    sc.add_item(&items[1], "Dakota", Metric::VqaSoft).unwrap();
    sc.add_item(&items[1], "Nous les gosses.", Metric::VqaSoft)
        .unwrap();
    assert!(close(sc.samples[0].score, 1.0));
    assert!(close(sc.samples[1].score, 0.9));

    // A question with no annotation.
    let q2 = f.write(
        "q2.jsonl",
        "{\"question_id\": 5, \"image\": \"00685bc495504d61.jpg\", \"text\": \"Who?\"}\n",
    );
    assert_config(
        load_textvqa(&q2, &ann, &f.images()).unwrap_err(),
        &q2,
        &["line 1", "no annotation", "`5`", "\"who?\""],
    );
}

#[test]
fn textvqa_malformed_annotations() {
    let f = Files::new();
    let cases: &[(&str, &[&str])] = &[
        ("{\"data\": [", &["not valid JSON"]),
        ("{\"dataset\": []}", &["missing top-level field `data`"]),
        ("{\"data\": {}}", &["`data` must be an array"]),
        ("{\"data\": [3]}", &["data[0]", "expected an object"]),
        (
            r#"{"data": [{"question_id": 1, "answers": ["a"]}, {"question_id": 2}]}"#,
            &["data[1]", "missing field `answers`"],
        ),
        (
            r#"{"data": [{"question_id": 1, "answers": ["a", 2]}]}"#,
            &["data[0]", "`answers`", "element 1 is a number"],
        ),
        (
            r#"{"data": [{"question_id": 1, "answers": []}]}"#,
            &["data[0]", "`answers` is an empty list"],
        ),
        (
            r#"{"data": [{"question_id": true, "answers": ["a"]}]}"#,
            &["data[0]", "`question_id`", "string or an integer"],
        ),
        (
            r#"{"data": [{"question_id": 1, "question": 4, "answers": ["a"]}]}"#,
            &["data[0]", "`question` must be a string"],
        ),
    ];
    for (bad, needles) in cases {
        let p = f.write("ann.json", bad);
        assert_config(read_textvqa_annotations(&p).unwrap_err(), &p, needles);
    }
    let ok = f.write("ann.json", &textvqa_annotations());
    let a = read_textvqa_annotations(&ok).unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a[0].question_id, "34602");
    assert_eq!(a[0].image_id.as_deref(), Some("003a8ae2ef43b901"));
    assert_eq!(a[2].index, 2);
}

#[test]
fn generic_answers_file() {
    let f = Files::new();
    f.image(&["a.jpg", "b.jpg", "c.jpg"]);
    let q = f.write(
        "q.jsonl",
        "{\"question_id\": 1, \"image\": \"a.jpg\", \"text\": \"How many?\", \"category\": \
         \"count\"}\n\
         {\"question_id\": \"two\", \"image\": \"b.jpg\", \"text\": \"Colour?\"}\n\
         {\"question_id\": 3, \"image\": \"c.jpg\", \"text\": \"Shape?\"}\n",
    );
    let a = f.write(
        "answers.jsonl",
        "{\"question_id\": \"two\", \"answer\": \"red\"}\n\
         {\"question_id\": 1, \"answers\": [\"2\", \"two\"]}\n\
         {\"question_id\": 3, \"answers\": [{\"answer\": \"circle\", \"answer_id\": 1}]}\n\
         {\"question_id\": 99, \"answer\": \"unused\"}\n",
    );
    let items = load_with_answers(&q, &a, &f.images()).unwrap();
    assert_eq!(items[0].answers, s(&["2", "two"]));
    assert_eq!(items[0].category.as_deref(), Some("count"));
    assert_eq!(items[1].answers, s(&["red"]));
    assert_eq!(items[2].answers, s(&["circle"]));

    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"question_id": 1}"#,
            &["line 1", "missing field `answers` (or `answer`)"],
        ),
        (
            r#"{"answer": "x"}"#,
            &["line 1", "missing field `question_id`"],
        ),
        (
            r#"{"question_id": 1, "answers": []}"#,
            &["line 1", "`answers` is an empty list"],
        ),
        (
            r#"{"question_id": 1, "answers": "x"}"#,
            &["line 1", "`answers` must be an array"],
        ),
        (
            r#"{"question_id": 1, "answers": [{"id": 1}]}"#,
            &["line 1", "element 0 has no string `answer`"],
        ),
        (
            r#"{"question_id": 1, "answer": 2}"#,
            &["line 1", "`answer` must be a string"],
        ),
    ];
    for (bad, needles) in cases {
        let p = f.write("bad.jsonl", bad);
        assert_config(read_answers(&p).unwrap_err(), &p, needles);
    }
    // The same id twice.
    let dup = f.write(
        "dup.jsonl",
        "{\"question_id\": 1, \"answer\": \"a\"}\n{\"question_id\": \"1\", \"answer\": \"b\"}\n",
    );
    assert_config(
        load_with_answers(&q, &dup, &f.images()).unwrap_err(),
        &dup,
        &["line 2", "`1`", "line 1"],
    );
    // A question without answers.
    let few = f.write("few.jsonl", "{\"question_id\": 1, \"answer\": \"a\"}\n");
    assert_config(
        load_with_answers(&q, &few, &f.images()).unwrap_err(),
        &q,
        &["line 2", "`two`", "has no answers"],
    );
}
