//! Training data: LLaVA conversations -> ids + answer-only labels, the seeded loader, the
//! tokenizer trainer.

use fineprune::bench::shapes::{
    Family, ShapesConfig, Split, TrainTurns, export_llava_train, generate,
};
use fineprune::error::Error;
use fineprune::model::image::ImageProcessorConfig;
use fineprune::model::template::{ImageSlot, LLAVA_SYSTEM, PromptOptions, build_prompt};
use fineprune::model::tokenizer::Tokenizer;
use fineprune::train::data::{
    Conversation, Dataset, Encoder, IGNORE, Loader, LoaderState, Turn, epoch_order, pad_batch,
    parse_conversations, read_conversations,
};
use fineprune::train::model::{GroundedRow, HeadShare};
use fineprune::train::tokenizer_train::{
    TokenizerTrainConfig, conversation_texts, train_tokenizer,
};
use std::path::{Path, PathBuf};

const N_IMG: usize = 25; // (30 / 6)^2 for the llava_gqa fixture

fn fixture_tok() -> Tokenizer {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llava_gqa/tokenizer.json");
    Tokenizer::from_file(&p).unwrap()
}

fn slot() -> ImageSlot {
    ImageSlot {
        token: "<image>".into(),
        count: N_IMG,
    }
}

fn conv(turns: &[(&str, &str)]) -> Conversation {
    Conversation {
        id: "c1".into(),
        image: Some("x.png".into()),
        turns: turns
            .iter()
            .map(|(q, a)| Turn {
                question: q.to_string(),
                answer: a.to_string(),
                patches: Vec::new(),
                parts: Vec::new(),
                refs: Vec::new(),
            })
            .collect(),
    }
}

/// The maximal runs of trained positions.
fn trained_runs(labels: &[i64]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < labels.len() {
        if labels[i] != IGNORE {
            let s = i;
            while i < labels.len() && labels[i] != IGNORE {
                i += 1;
            }
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    runs
}

fn check_masking(tok: &Tokenizer, turns: &[(&str, &str)]) {
    let enc = Encoder::new(tok, slot(), 4096);
    let c = conv(turns);
    let (ids, labels, _) = enc.encode_text(&c).unwrap();
    assert_eq!(ids.len(), labels.len());
    assert_eq!(ids[0], 1, "BOS first");
    assert_eq!(labels[0], IGNORE);
    // Labels are the ids themselves where trained (HF alignment: the model shifts).
    for (i, &l) in labels.iter().enumerate() {
        if l != IGNORE {
            assert_eq!(l, ids[i] as i64);
        }
    }
    let runs = trained_runs(&labels);
    assert_eq!(runs.len(), turns.len(), "one trained run per answer");
    let eos = tok.token_to_id("</s>").unwrap();
    for (k, &(s, e)) in runs.iter().enumerate() {
        assert_eq!(ids[e - 1], eos, "each run ends with </s>");
        let text = tok.decode(&ids[s..e - 1], false).unwrap();
        assert_eq!(text.trim_start(), turns[k].1, "decoded answer {k}");
        // The tokens before the run are the template's `ASSISTANT:`.
        let before = tok.decode(&ids[..s], false).unwrap();
        assert!(before.ends_with("ASSISTANT:"), "{before:?}");
    }
    // Exactly the answers + </s> are trained: the untrained parts decode to the template.
    let image = tok.token_to_id("<image>").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == image).count(), N_IMG);
    assert!(
        ids.iter()
            .zip(&labels)
            .all(|(&i, &l)| i != image || l == IGNORE)
    );
    // The prompt of the first turn tokenizes exactly as the inference prompt does.
    let opts = PromptOptions {
        system: Some(LLAVA_SYSTEM.into()),
        ..Default::default()
    };
    let p = build_prompt(tok, turns[0].0, Some(&slot()), &opts, 4096).unwrap();
    assert_eq!(&ids[..p.ids.len()], &p.ids[..]);
    assert_eq!(
        runs[0].0,
        p.ids.len(),
        "the answer starts right after the prompt"
    );
}

#[test]
fn one_turn_masks_everything_but_the_answer() {
    let tok = fixture_tok();
    check_masking(&tok, &[("<image>\nWhat color is the circle?", "Red")]);
}

#[test]
fn two_turns_mask_both_instructions() {
    let tok = fixture_tok();
    check_masking(
        &tok,
        &[
            ("<image>\nHow many squares are there?", "3"),
            ("And the triangle, where is it?", "top left of the image"),
        ],
    );
}

#[test]
fn render_matches_llava_v1_prompt() {
    let tok = fixture_tok();
    let mut enc = Encoder::new(
        &tok,
        ImageSlot {
            token: "<image>".into(),
            count: 1,
        },
        4096,
    );
    enc.system = "SYS".into();
    let (text, spans) = enc.render(&conv(&[("<image>\nQ1", "A1"), ("Q2", "A2")]));
    assert_eq!(
        text,
        "SYS USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    );
    assert_eq!(&text[spans[0].0..spans[0].1], " A1</s>");
    assert_eq!(&text[spans[1].0..spans[1].1], " A2</s>");
}

#[test]
fn image_placeholder_moves_to_the_front() {
    let json = r#"[{"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "A cat"}]}]"#;
    let c = parse_conversations(json, Path::new("t.json")).unwrap();
    assert_eq!(c[0].turns[0].question, "<image>\nWhat is this?");
    assert_eq!(c[0].turns[0].answer, "A cat");
}

#[test]
fn truncation_keeps_the_first_tokens() {
    let tok = fixture_tok();
    let c = conv(&[("<image>\nQ?", "a long answer with many words in it")]);
    let full = Encoder::new(&tok, slot(), 4096).encode_text(&c).unwrap();
    let prompt_len = trained_runs(&full.1)[0].0;
    let cut = prompt_len + 2;
    let (ids, labels, _) = Encoder::new(&tok, slot(), cut).encode_text(&c).unwrap();
    assert_eq!(ids.len(), cut);
    assert_eq!(&ids[..], &full.0[..cut]);
    assert_eq!(&labels[..], &full.1[..cut]);
    assert_eq!(labels.iter().filter(|&&l| l != IGNORE).count(), 2);
    // Nothing left to train: an error naming the sample.
    let e = Encoder::new(&tok, slot(), prompt_len)
        .encode_text(&c)
        .unwrap_err();
    assert!(
        matches!(e, Error::Prompt(ref m) if m.contains("c1") && m.contains("no answer")),
        "{e}"
    );
    // Cutting into the image tokens: an error.
    let e = Encoder::new(&tok, slot(), 10).encode_text(&c).unwrap_err();
    assert!(e.to_string().contains("image tokens"), "{e}");
}

#[test]
fn loader_is_deterministic_and_resumable() {
    let n = 23;
    let mut a = Loader::new(n, 5, 42).unwrap();
    let mut b = Loader::new(n, 5, 42).unwrap();
    let mut seen = Vec::new();
    for _ in 0..15 {
        let x = a.next_batch();
        assert_eq!(x, b.next_batch());
        seen.push(x);
    }
    // Each epoch covers every sample once, in 5 batches (the last of 3).
    assert_eq!(a.batches_per_epoch(), 5);
    for e in 0..3u64 {
        let mut all: Vec<usize> = seen
            .iter()
            .filter(|(ep, _)| *ep == e)
            .flat_map(|(_, v)| v.clone())
            .collect();
        assert_eq!(all.len(), n);
        assert_eq!(seen[e as usize * 5 + 4].1.len(), 3);
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }
    assert_ne!(
        epoch_order(n, 42, 0),
        epoch_order(n, 42, 1),
        "reshuffled per epoch"
    );
    assert_ne!(epoch_order(n, 42, 0), epoch_order(n, 43, 0), "seed matters");
    // Resume mid-epoch from a saved state.
    let mut c = Loader::new(n, 5, 42).unwrap();
    for _ in 0..7 {
        c.next_batch();
    }
    let st = c.state();
    assert_eq!(
        st,
        LoaderState {
            epoch: 1,
            position: 10
        }
    );
    let mut r = Loader::resume(n, 5, 42, st).unwrap();
    for want in &seen[7..15] {
        assert_eq!(&r.next_batch(), want);
    }
    // State at an epoch end resumes into the next epoch.
    let mut d = Loader::resume(
        n,
        5,
        42,
        LoaderState {
            epoch: 0,
            position: n,
        },
    )
    .unwrap();
    assert_eq!(d.next_batch(), seen[5]);
    assert!(Loader::new(0, 5, 1).is_err());
    assert!(Loader::new(3, 0, 1).is_err());
    assert!(
        Loader::resume(
            3,
            1,
            1,
            LoaderState {
                epoch: 0,
                position: 4
            }
        )
        .is_err()
    );
}

fn shapes_export(dir: &Path, n: usize) -> Vec<fineprune::bench::shapes::Sample> {
    let cfg = ShapesConfig {
        image_size: 30,
        ..ShapesConfig::default()
    };
    let samples = generate(Split::Train, n, 3, &cfg).unwrap();
    export_llava_train(&samples, dir, &cfg, &TrainTurns::default()).unwrap();
    samples
}

fn fixture_processor() -> ImageProcessorConfig {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/llava_gqa/preprocessor_config.json");
    ImageProcessorConfig::from_preprocessor_config(p).unwrap()
}

#[test]
fn shapes_export_read_batch_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let samples = shapes_export(dir.path(), 6);
    let ds = Dataset::open(&dir.path().join("train.json"), &dir.path().join("images")).unwrap();
    assert_eq!(ds.len(), 6);
    let tok = fixture_tok();
    let mut enc = Encoder::new(&tok, slot(), 4096);
    enc.image_processor = Some(fixture_processor());
    let mut loader = Loader::new(ds.len(), 4, 9).unwrap();
    let mut got = 0;
    for _ in 0..2 {
        let (_, idx) = loader.next_batch();
        let batch = ds.batch(&enc, &idx).unwrap();
        for (s, &i) in batch.iter().zip(&idx) {
            got += 1;
            assert_eq!(s.id, samples[i].id);
            assert_eq!(s.pixel_values.len(), 3 * 30 * 30);
            let runs = trained_runs(&s.labels);
            assert_eq!(runs.len(), 1);
            let ans = tok
                .decode(&s.input_ids[runs[0].0..runs[0].1 - 1], false)
                .unwrap();
            assert_eq!(ans.trim_start(), samples[i].answers[0]);
        }
        let pb = pad_batch(&batch, 511);
        assert_eq!(pb.input_ids.len(), pb.batch * pb.len);
        assert_eq!(pb.labels.len(), pb.batch * pb.len);
        for (r, &l) in pb.lengths.iter().enumerate() {
            assert!(
                pb.labels[r * pb.len + l..(r + 1) * pb.len]
                    .iter()
                    .all(|&x| x == IGNORE)
            );
            assert!(
                pb.input_ids[r * pb.len + l..(r + 1) * pb.len]
                    .iter()
                    .all(|&x| x == 511)
            );
        }
    }
    assert_eq!(got, 6);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn bad_files_name_the_sample_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("not json", "not valid json"),
        (r#"{"a": 1}"#, "list of samples"),
        (
            r#"[{"id": "s0"}]"#,
            "sample 0 (id s0): field `conversations` is missing",
        ),
        (
            r#"[{"id": "s0", "conversations": [{"from": "human", "value": "q"}]}]"#,
            "human/gpt pairs",
        ),
        (
            r#"[{"id": "s0", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}]"#,
            "field `conversations[0]` needs a string `value`",
        ),
        (
            r#"[{"id": "s0", "conversations": [{"from": "bot", "value": "q"}, {"from": "gpt", "value": "a"}]}]"#,
            "\"bot\"",
        ),
        (
            r#"[{"id": "s0", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]}]"#,
            "conversations[1]` must be a gpt turn",
        ),
        (
            r#"[{"id": "s0", "image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]"#,
            "lacks `<image>`",
        ),
        (
            r#"[{"id": "s0", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}]"#,
            "no `image` field",
        ),
        (
            r#"[{"id": "s0", "image": "x.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"},
               {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}]"#,
            "conversations[2]` has `<image>` misplaced",
        ),
        (
            r#"[{"id": "s0", "image": 3, "conversations": []}]"#,
            "field `image`",
        ),
    ];
    for (text, want) in cases {
        let p = write(dir.path(), "t.json", text);
        let e = read_conversations(&p).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, Error::Config { .. }), "{m}");
        assert!(
            m.contains("t.json") && m.contains(want),
            "{m} lacks {want:?}"
        );
    }
    // Missing file.
    assert!(matches!(
        read_conversations(&dir.path().join("nope.json")),
        Err(Error::Io { .. })
    ));
    // Missing image: named with the sample.
    let p = write(
        dir.path(),
        "m.json",
        r#"[{"id": "s7", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}]"#,
    );
    let e = Dataset::open(&p, dir.path()).err().unwrap();
    let m = e.to_string();
    assert!(
        matches!(e, Error::Image { .. }) && m.contains("gone.png") && m.contains("s7"),
        "{m}"
    );
    // Corrupt image: Error::Image naming the file and the sample.
    write(dir.path(), "gone.png", "not a png");
    let ds = Dataset::open(&p, dir.path()).unwrap();
    let tok = fixture_tok();
    let e = ds.sample(&Encoder::new(&tok, slot(), 4096), 0).unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(e, Error::Image { .. }) && m.contains("gone.png") && m.contains("s7"),
        "{m}"
    );
    // A tokenizer without the image token.
    let bad = Encoder::new(
        &tok,
        ImageSlot {
            token: "<img>".into(),
            count: 2,
        },
        4096,
    );
    assert!(bad.encode_text(&ds.conversations[0]).is_err());
}

#[test]
fn trained_tokenizer_round_trips_and_serves_the_data_path() {
    let dir = tempfile::tempdir().unwrap();
    shapes_export(dir.path(), 40);
    let convs = read_conversations(&dir.path().join("train.json")).unwrap();
    let texts = conversation_texts(&convs);
    let path = dir.path().join("tokenizer.json");
    train_tokenizer(
        &texts,
        &TokenizerTrainConfig {
            vocab_size: 600,
            min_frequency: 2,
        },
        &path,
    )
    .unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert!(tok.vocab_size() <= 600);
    assert_eq!(tok.token_to_id("<unk>"), Some(0));
    assert_eq!(tok.token_to_id("<s>"), Some(1));
    assert_eq!(tok.token_to_id("</s>"), Some(2));
    assert_eq!(tok.token_to_id("<0x00>"), Some(3));
    let image = tok.token_to_id("<image>").unwrap();
    let pad = tok.token_to_id("<pad>").unwrap();
    assert_eq!(pad, image + 1);
    for t in &texts {
        let e = tok.encode(t, true).unwrap();
        assert_eq!(e.ids[0], 1, "BOS from the post-processor");
        assert!(!e.ids.contains(&0), "no <unk> in {t:?}");
        assert_eq!(&tok.decode(&e.ids, true).unwrap(), t);
    }
    // Unseen characters fall back to bytes and still round-trip.
    let odd = "Größe 東京 ✓";
    let e = tok.encode(odd, true).unwrap();
    assert!(!e.ids.contains(&0));
    assert_eq!(tok.decode(&e.ids, true).unwrap(), odd);
    // A shape named at the end of a question is the same token as that shape as an answer.
    let circle = tok.token_to_id("▁circle").unwrap();
    let q = tok
        .encode("Is there a red circle?\nAnswer the question.", false)
        .unwrap();
    let pieces: Vec<String> = q.ids.iter().filter_map(|&i| tok.id_to_token(i)).collect();
    assert!(q.ids.contains(&circle), "{pieces:?}");
    assert!(
        pieces.iter().all(|t| !t.contains('?') || t == "?"),
        "{pieces:?}"
    );
    // `<image>` is one token.
    let e = tok.encode("a <image> b", false).unwrap();
    assert_eq!(e.ids.iter().filter(|&&i| i == image).count(), 1);
    // The data path works with it.
    let ds = Dataset::open(&dir.path().join("train.json"), &dir.path().join("images")).unwrap();
    let mut enc = Encoder::new(&tok, slot(), 4096);
    enc.image_processor = Some(fixture_processor());
    for i in 0..ds.len() {
        let s = ds.sample(&enc, i).unwrap();
        let runs = trained_runs(&s.labels);
        assert_eq!(runs.len(), 1);
        assert_eq!(s.input_ids[runs[0].1 - 1], 2);
        let ans = tok
            .decode(&s.input_ids[runs[0].0..runs[0].1 - 1], false)
            .unwrap();
        assert_eq!(ans.trim_start(), ds.conversations[i].turns[0].answer);
    }
    // Too small a vocabulary is refused.
    let e = train_tokenizer(
        &texts,
        &TokenizerTrainConfig {
            vocab_size: 100,
            min_frequency: 2,
        },
        &dir.path().join("t2.json"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("vocab_size"), "{e}");
}

#[test]
fn text_only_samples_and_leading_gpt_turns() {
    let json = r#"[{"id": 5, "conversations": [{"from": "gpt", "value": "hello"},
        {"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}]"#;
    let c = parse_conversations(json, Path::new("t.json")).unwrap();
    assert_eq!(c[0].id, "5");
    assert_eq!(c[0].image, None);
    assert_eq!(
        c[0].turns.len(),
        1,
        "a leading gpt turn is dropped as LLaVA does"
    );
    let tok = fixture_tok();
    let s = Encoder::new(&tok, slot(), 4096)
        .encode(&c[0], Path::new("."))
        .unwrap();
    assert!(s.pixel_values.is_empty());
    let image = tok.token_to_id("<image>").unwrap();
    assert!(!s.input_ids.contains(&image));
    let runs = trained_runs(&s.labels);
    assert_eq!(runs.len(), 1);
    let ans = tok
        .decode(&s.input_ids[runs[0].0..runs[0].1 - 1], false)
        .unwrap();
    assert_eq!(ans.trim_start(), "hi");
}

#[test]
fn grounded_phrases_and_answers_name_their_rows_and_patches() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShapesConfig {
        image_size: 30,
        patch_size: 6,
        ..ShapesConfig::default()
    };
    let samples = generate(Split::Train, 8, 5, &cfg).unwrap();
    let turns = TrainTurns {
        all_families: true,
        ground_phrases: true,
        ground_answers: Family::ALL.to_vec(),
        ..TrainTurns::default()
    };
    export_llava_train(&samples, dir.path(), &cfg, &turns).unwrap();
    let ds = Dataset::open(&dir.path().join("train.json"), &dir.path().join("images")).unwrap();
    let tok = fixture_tok();
    let enc = Encoder::new(&tok, slot(), 4096);
    let mut rows = 0;
    for (i, s) in samples.iter().enumerate() {
        let conv = &ds.conversations[i];
        // The sample's own answer carries exactly its relevance mask (none for an existence
        // "no"); a relative-position answer carries each object's mask apart, A's then B's.
        let mask = |objects: &[usize]| {
            let m = s.scene.relevance_mask(objects, 30, 6);
            (0..m.len()).filter(|&j| m[j]).collect::<Vec<usize>>()
        };
        let own = &conv.turns[0];
        if s.family == Family::RelativePosition {
            let want: Vec<Vec<usize>> = s.refs.iter().map(|r| mask(&r.objects)).collect();
            assert_eq!(own.parts, want, "{}", s.id);
            assert_eq!(own.parts.len(), 2, "{}", s.id);
            assert!(own.patches.is_empty(), "{}", s.id);
        } else {
            assert_eq!(own.patches, mask(&s.referenced), "{}", s.id);
            assert_eq!(own.patches.is_empty(), s.referenced.is_empty(), "{}", s.id);
            assert!(own.parts.is_empty(), "{}", s.id);
        }
        // The sample's question names its objects phrase by phrase.
        let phrases: Vec<&str> = conv.turns[0]
            .refs
            .iter()
            .map(|r| r.phrase.as_str())
            .collect();
        let want: Vec<&str> = s.refs.iter().map(|r| r.phrase.as_str()).collect();
        assert_eq!(phrases, want, "{}", s.id);
        let (ids, labels, grounding) = enc.encode_text(conv).unwrap();
        // Each turn grounds its phrases' last tokens, then the row before its answer.
        let mut all_rows = grounding.iter();
        let mut answer_rows = Vec::new();
        for t in &conv.turns {
            for r in &t.refs {
                let g = all_rows.next().unwrap();
                let text = tok.decode(&ids[..=g.position], false).unwrap();
                assert!(text.ends_with(&r.phrase), "{}: {text:?}", s.id);
                assert_eq!(g.patches, r.patches);
                assert_eq!(g.row, GroundedRow::Phrase);
                assert_eq!(g.heads, HeadShare::ALL);
                let answered = t.patches.iter().chain(t.parts.iter().flatten());
                let answered: Vec<usize> = answered.copied().collect();
                assert!(r.patches.iter().all(|j| answered.contains(j)), "{}", s.id);
                rows += 1;
            }
            if !t.patches.is_empty() {
                answer_rows.push((all_rows.next().unwrap(), t, &t.patches, HeadShare::ALL));
            }
            for (index, part) in t.parts.iter().enumerate() {
                let share = HeadShare {
                    index,
                    count: t.parts.len(),
                };
                answer_rows.push((all_rows.next().unwrap(), t, part, share));
            }
        }
        assert!(all_rows.next().is_none());
        for (g, t, patches, share) in answer_rows {
            // The row is the prompt's last token (`ASSISTANT:`'s colon), the next one is trained.
            assert_eq!(labels[g.position], IGNORE);
            assert_ne!(labels[g.position + 1], IGNORE);
            let text = tok.decode(&ids[..=g.position], false).unwrap();
            assert!(text.ends_with("ASSISTANT:"), "{}: {text:?}", s.id);
            let answer = tok.decode(&ids[g.position + 1..], false).unwrap();
            assert!(answer.trim_start().starts_with(&t.answer), "{answer:?}");
            assert_eq!(&g.patches, patches);
            assert_eq!(g.heads, share);
            assert_eq!(g.row, GroundedRow::Answer);
            assert!(g.patches.iter().all(|&j| j < N_IMG));
            rows += 1;
        }
    }
    assert!(rows > 8, "extra turns are grounded too ({rows} rows)");
    let compared = ds.conversations.iter().flat_map(|c| &c.turns);
    assert!(compared.filter(|t| !t.parts.is_empty()).count() > 0);
    // Answers of the listed families only.
    let colour = tempfile::tempdir().unwrap();
    let only_colour = TrainTurns {
        all_families: true,
        ground_answers: vec![Family::Color],
        ..TrainTurns::default()
    };
    export_llava_train(&samples, colour.path(), &cfg, &only_colour).unwrap();
    let ds = Dataset::open(
        &colour.path().join("train.json"),
        &colour.path().join("images"),
    )
    .unwrap();
    let turns: Vec<&Turn> = ds.conversations.iter().flat_map(|c| &c.turns).collect();
    let asks_colour = |t: &Turn| t.question.contains("What color is");
    assert!(turns.iter().all(|t| t.refs.is_empty()));
    assert!(turns.iter().all(|t| t.patches.is_empty() != asks_colour(t)));
    assert!(turns.iter().any(|t| asks_colour(t)));
    // Without the flag nothing is written.
    let plain = tempfile::tempdir().unwrap();
    export_llava_train(&samples, plain.path(), &cfg, &TrainTurns::default()).unwrap();
    let text = std::fs::read_to_string(plain.path().join("train.json")).unwrap();
    assert!(!text.contains("patches"));
}

#[test]
fn bad_patches_name_the_sample_and_field() {
    let p = Path::new("t.json");
    // One sample: question `q`, then `human` and `gpt` appended to the two messages' objects.
    let json = |q: &str, human: &str, gpt: &str| {
        format!(
            r#"[{{"id": "a", "image": "x.png", "conversations": [
            {{"from": "human", "value": "<image>\n{q}"{human}}},
            {{"from": "gpt", "value": "A"{gpt}}}]}}]"#
        )
    };
    let refs = |phrase: &str, patches: &str| {
        format!(r#", "refs": [{{"phrase": "{phrase}", "patches": [{patches}]}}]"#)
    };
    let cases = [
        (
            "Q?",
            r#", "patches": [1]"#.to_string(),
            String::new(),
            "conversations[0]",
            "only gpt",
        ),
        (
            "Q?",
            String::new(),
            r#", "patches": [1.5]"#.to_string(),
            "conversations[1]",
            "patch indices",
        ),
        (
            "Q?",
            String::new(),
            refs("Q", "1"),
            "conversations[1]",
            "only human",
        ),
        (
            "Is the red star left?",
            refs("the blue star", "1"),
            String::new(),
            "conversations[0]",
            "the blue star",
        ),
        (
            "Q?",
            refs("Q", ""),
            String::new(),
            "conversations[0]",
            "`refs`",
        ),
        (
            "Q?",
            r#", "parts": [[1], [2]]"#.to_string(),
            String::new(),
            "conversations[0]",
            "`parts`; only gpt",
        ),
        (
            "Q?",
            String::new(),
            r#", "patches": [1], "parts": [[1], [2]]"#.to_string(),
            "conversations[1]",
            "both `patches` and `parts`",
        ),
        (
            "Q?",
            String::new(),
            r#", "parts": [[1], []]"#.to_string(),
            "conversations[1]",
            "`parts`",
        ),
        (
            "Q?",
            String::new(),
            r#", "parts": []"#.to_string(),
            "conversations[1]",
            "`parts`",
        ),
    ];
    for (q, human, gpt, field, word) in cases {
        let e = parse_conversations(&json(q, &human, &gpt), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field) && e.contains(word), "{e}");
    }
    // Repeats and order do not matter.
    let ok = json("Q?", "", r#", "patches": [7, 2, 7]"#);
    let c = parse_conversations(&ok, p).unwrap();
    assert_eq!(c[0].turns[0].patches, vec![2, 7]);
    let ok = json("Q?", "", r#", "parts": [[4, 3], [9]]"#);
    let c = parse_conversations(&ok, p).unwrap();
    assert_eq!(c[0].turns[0].parts, vec![vec![3, 4], vec![9]]);
}

/// An empty or blank answer is refused when the training set is opened, naming the file, the
/// sample (index and id) and the turn; a text-only sample beside it is fine.
#[test]
fn empty_answers_are_refused_naming_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    for blank in ["", "  \n"] {
        let text = format!(
            r#"[{{"id": "ok", "conversations": [{{"from": "human", "value": "q"}},
                {{"from": "gpt", "value": "a"}}]}},
               {{"id": "blank-7", "conversations": [{{"from": "human", "value": "q1"}},
                {{"from": "gpt", "value": "a1"}}, {{"from": "human", "value": "q2"}},
                {{"from": "gpt", "value": {blank:?}}}]}}]"#
        );
        let p = write(dir.path(), "empty.json", &text);
        let e = Dataset::open(&p, dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("empty.json")
                && e.contains("sample 1 (id blank-7)")
                && e.contains("turn 2 is empty"),
            "{e}"
        );
    }
    let p = write(
        dir.path(),
        "fine.json",
        r#"[{"id": "t", "conversations": [{"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"}]}]"#,
    );
    assert_eq!(Dataset::open(&p, dir.path()).unwrap().len(), 1);
}
