//! `distill regenerate` on the bundled ShapesVQA model: every answer is the model's own greedy
//! answer to the conversation so far (checked against prompts built by hand), the rest of the json
//! is kept, grounding follows the answer, batching changes nothing, bad input is refused.

use fineprune::bench::shapes::{
    Family, ShapesConfig, Split, TrainTurns, export_llava_train, generate,
};
use fineprune::model::template::LLAVA_SYSTEM;
use fineprune::train::data::read_conversations;
use fineprune::train::regenerate::{RegenerateOptions, RegenerateSummary, regenerate, same_answer};
use fineprune::{Engine, ImageInput, Model, Request};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-llava")
}

/// Exports `n` multi-turn ShapesVQA training conversations (every family, grounded phrases and
/// answers) with the bundled model's shapes settings into `dir`.
fn export(dir: &Path, n: usize) {
    let cfg = ShapesConfig::from_file(&model_dir().join("shapes_config.json")).unwrap();
    let samples = generate(Split::Train, n, 5, &cfg).unwrap();
    let turns = TrainTurns {
        all_families: true,
        ground_phrases: true,
        ground_answers: Family::ALL.to_vec(),
        ..TrainTurns::default()
    };
    export_llava_train(&samples, dir, &cfg, &turns).unwrap();
}

fn opts(batch_size: usize) -> RegenerateOptions {
    RegenerateOptions {
        batch_size,
        ..RegenerateOptions::default()
    }
}

fn run(dir: &Path, data: &str, out: &str, o: &RegenerateOptions) -> RegenerateSummary {
    regenerate(
        &model_dir(),
        &dir.join(data),
        &dir.join("images"),
        &dir.join(out),
        o,
    )
    .unwrap()
}

fn json(path: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v.as_array().unwrap().clone()
}

fn is_gpt(m: &Value) -> bool {
    m["from"] == "gpt"
}

#[test]
fn answers_are_the_models_own_and_the_rest_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    export(d, 12);
    let s = run(d, "train.json", "new.json", &opts(16));
    println!("{s:?}");
    println!(
        "agreement with ShapesVQA's answers: {:.3} ({} of {} answers changed), {:.1} answers/s",
        s.agreement,
        s.changed,
        s.answers,
        s.answers as f64 / s.seconds
    );
    let old = read_conversations(&d.join("train.json")).unwrap();
    let new = read_conversations(&d.join("new.json")).unwrap();
    assert_eq!(s.conversations, 12);
    assert_eq!(new.len(), old.len());
    let turns: usize = old.iter().map(|c| c.turns.len()).sum();
    assert!(
        turns > 12,
        "multi-turn conversations expected, got {turns} turns"
    );
    assert_eq!(s.answers, turns);
    let mut changed = 0;
    for (o, n) in old.iter().zip(&new) {
        assert_eq!((&o.id, &o.image), (&n.id, &n.image));
        assert_eq!(o.turns.len(), n.turns.len());
        for (a, b) in o.turns.iter().zip(&n.turns) {
            assert_eq!((&a.question, &a.refs), (&b.question, &b.refs));
            changed += usize::from(!same_answer(&a.answer, &b.answer));
        }
    }
    assert_eq!(s.changed, changed);
    assert!((s.agreement - (1.0 - changed as f64 / turns as f64)).abs() < 1e-12);
    assert!(s.agreement > 0.7, "agreement {}", s.agreement);
    assert_eq!(s.truncated, 0, "short ShapesVQA answers end at EOS");

    // Everything but the answers (and the grounding of changed ones) is as it was, in file order.
    let (ov, nv) = (json(&d.join("train.json")), json(&d.join("new.json")));
    let mut dropped = 0;
    for (o, n) in ov.iter().zip(&nv) {
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(o), keys(n));
        for k in keys(o).iter().filter(|k| *k != "conversations") {
            assert_eq!(o[k], n[k]);
        }
        let (om, nm) = (
            o["conversations"].as_array().unwrap(),
            n["conversations"].as_array().unwrap(),
        );
        assert_eq!(om.len(), nm.len());
        for (a, b) in om.iter().zip(nm) {
            if !is_gpt(a) {
                assert_eq!(a, b);
                continue;
            }
            let mut a = a.clone();
            let same = same_answer(a["value"].as_str().unwrap(), b["value"].as_str().unwrap());
            a["value"] = b["value"].clone();
            if !same {
                let obj = a.as_object_mut().unwrap();
                let had = obj.remove("patches").is_some() | obj.remove("parts").is_some();
                dropped += usize::from(had);
            }
            assert_eq!(&a, b);
        }
    }
    assert_eq!(s.grounding_dropped, dropped);
    let text = std::fs::read_to_string(d.join("new.json")).unwrap();
    let at = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
    assert!(at("id") < at("image") && at("image") < at("conversations"));
    assert!(at("from") < at("value"));

    // Recompute answers independently: the prompt built by hand as `distill train` renders the
    // conversation, the model's earlier answers as context, one request at a time.
    let engine = Engine::new(Arc::new(Model::load(model_dir()).unwrap()));
    let mut checked = 0;
    for (o, n) in ov.iter().zip(&nv).take(3) {
        let image = d.join("images").join(n["image"].as_str().unwrap());
        let msgs = n["conversations"].as_array().unwrap();
        let mut prompt = format!("{LLAVA_SYSTEM} ");
        for (k, pair) in msgs.chunks(2).enumerate() {
            let question = pair[0]["value"].as_str().unwrap();
            let answer = pair[1]["value"].as_str().unwrap();
            prompt.push_str(&format!("USER: {question} ASSISTANT:"));
            let mut req = Request::new(prompt.clone(), Some(ImageInput::Path(image.clone())));
            req.options.raw = true;
            req.max_new_tokens = 32;
            let g = engine.generate(&[req]).unwrap().remove(0);
            assert_eq!(g.text.trim(), answer, "{} turn {k}: {prompt}", o["id"]);
            if k == 0 {
                // The first turn is asked exactly as `distill eval` asks (the chat template).
                let q = question.strip_prefix("<image>\n").unwrap();
                let mut req = Request::new(q, Some(ImageInput::Path(image.clone())));
                req.options.system = Some(LLAVA_SYSTEM.into());
                req.max_new_tokens = 32;
                let g = engine.generate(&[req]).unwrap().remove(0);
                assert_eq!(g.text.trim(), answer);
            }
            prompt.push_str(&format!(" {answer}</s>"));
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked} answers recomputed");
}

#[test]
fn grounding_is_kept_on_unchanged_answers_and_dropped_on_changed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    export(d, 6);
    // Spoil the first grounded answer so the model's answer must differ from it.
    let mut recs = json(&d.join("train.json"));
    let spoiled = recs
        .iter_mut()
        .flat_map(|r| r["conversations"].as_array_mut().unwrap().iter_mut())
        .find(|m| is_gpt(m) && (m.get("patches").is_some() || m.get("parts").is_some()))
        .expect("a grounded answer");
    spoiled["value"] = "zebra zebra zebra".into();
    let spoiled = spoiled.clone();
    std::fs::write(
        d.join("spoiled.json"),
        serde_json::to_vec_pretty(&recs).unwrap(),
    )
    .unwrap();
    let s = run(d, "spoiled.json", "new.json", &opts(4));
    let new = json(&d.join("new.json"));
    let (mut kept, mut dropped) = (0, 0);
    for (o, n) in recs.iter().zip(&new) {
        let pairs = o["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .zip(n["conversations"].as_array().unwrap());
        for (a, b) in pairs.filter(|(a, _)| is_gpt(a)) {
            let grounded = |m: &Value| m.get("patches").is_some() || m.get("parts").is_some();
            if !grounded(a) {
                assert!(!grounded(b));
                continue;
            }
            if same_answer(a["value"].as_str().unwrap(), b["value"].as_str().unwrap()) {
                assert_eq!(a.get("patches"), b.get("patches"));
                assert_eq!(a.get("parts"), b.get("parts"));
                kept += 1;
            } else {
                assert!(!grounded(b), "{b}");
                dropped += 1;
            }
            if a == &spoiled {
                assert_ne!(b["value"], "zebra zebra zebra");
                assert!(!grounded(b));
            }
        }
    }
    println!("grounding kept on {kept} answers, dropped on {dropped}");
    assert!(kept > 0 && dropped > 0);
    assert_eq!(s.grounding_dropped, dropped);
    assert!(s.changed >= dropped);
}

#[test]
fn batch_sizes_give_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    export(d, 12);
    let a = run(d, "train.json", "b16.json", &opts(16));
    let b = run(d, "train.json", "b1.json", &opts(1));
    let c = run(d, "train.json", "b5.json", &opts(5));
    let bytes = |f: &str| std::fs::read(d.join(f)).unwrap();
    assert!(bytes("b16.json") == bytes("b1.json"));
    assert!(bytes("b16.json") == bytes("b5.json"));
    assert_eq!((a.changed, a.answers), (b.changed, b.answers));
    assert_eq!(
        (a.changed, a.grounding_dropped),
        (c.changed, c.grounding_dropped)
    );
    println!(
        "batch 16: {:.1} answers/s, batch 1: {:.1} answers/s",
        a.answers as f64 / a.seconds,
        b.answers as f64 / b.seconds
    );
    // --limit writes the first conversations only, answered as in the full run.
    let l = run(
        d,
        "train.json",
        "limit.json",
        &RegenerateOptions {
            limit: Some(2),
            ..opts(16)
        },
    );
    assert_eq!(l.conversations, 2);
    assert_eq!(
        json(&d.join("limit.json"))[..],
        json(&d.join("b16.json"))[..2]
    );
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    export(d, 2);
    let images = d.join("images");
    let err = |data: &Path, out: &Path, o: &RegenerateOptions| {
        regenerate(&model_dir(), data, &images, out, o)
            .unwrap_err()
            .to_string()
    };
    let data = d.join("train.json");
    let before = std::fs::read(&data).unwrap();

    // Overwriting the input, also through another spelling of its path.
    for out in [data.clone(), d.join(".").join("train.json")] {
        let e = err(&data, &out, &opts(16));
        assert!(
            e.contains("refusing to overwrite") && e.contains("train.json"),
            "{e}"
        );
    }
    assert_eq!(std::fs::read(&data).unwrap(), before);

    let out = d.join("new.json");
    for o in [
        RegenerateOptions {
            batch_size: 0,
            ..opts(16)
        },
        RegenerateOptions {
            max_new_tokens: 0,
            ..opts(16)
        },
    ] {
        let e = err(&data, &out, &o);
        assert!(e.contains("must be at least 1"), "{e}");
    }

    // A conversation that does not alternate human/gpt names the file and the field.
    let mut recs = json(&data);
    recs[1]["conversations"][1]["from"] = "human".into();
    let bad = d.join("bad.json");
    std::fs::write(&bad, serde_json::to_vec(&recs).unwrap()).unwrap();
    let e = err(&bad, &out, &opts(16));
    let id = recs[1]["id"].as_str().unwrap();
    assert!(
        e.contains("bad.json") && e.contains(id) && e.contains("conversations[1]"),
        "{e}"
    );
    std::fs::write(&bad, "{\"not\": \"a list\"}").unwrap();
    let e = err(&bad, &out, &opts(16));
    assert!(e.contains("bad.json") && e.contains("list"), "{e}");

    // A missing image names the conversation and the path.
    let recs = json(&data);
    let file = recs[1]["image"].as_str().unwrap();
    std::fs::remove_file(images.join(file)).unwrap();
    let e = err(&data, &out, &opts(16));
    let id = recs[1]["id"].as_str().unwrap();
    assert!(
        e.contains(id) && e.contains(&images.join(file).display().to_string()),
        "{e}"
    );

    // A missing data file names it.
    let e = err(&d.join("nope.json"), &out, &opts(16));
    assert!(e.contains("nope.json"), "{e}");
    assert!(!out.exists(), "nothing is written on errors");
}

#[test]
fn cli_regenerates_and_explains_itself() {
    let exe = env!("CARGO_BIN_EXE_distill");
    let help = Command::new(exe)
        .args(["regenerate", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("LLaVADI") && help.contains("47.5 -> 49.2"),
        "{help}"
    );
    for flag in [
        "--batch-size",
        "--max-new-tokens",
        "--limit",
        "--image-folder",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    export(d, 3);
    let out = Command::new(exe)
        .arg("regenerate")
        .arg("--model")
        .arg(model_dir())
        .arg("--data")
        .arg(d.join("train.json"))
        .arg("--image-folder")
        .arg(d.join("images"))
        .arg("--out")
        .arg(d.join("new.json"))
        .args(["--limit", "2", "--batch-size", "2", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("agreement with the original answers") && stdout.contains("answers/s"));
    assert_eq!(read_conversations(&d.join("new.json")).unwrap().len(), 2);

    let out = Command::new(exe)
        .arg("regenerate")
        .arg("--model")
        .arg(model_dir())
        .arg("--data")
        .arg(d.join("train.json"))
        .arg("--image-folder")
        .arg(d.join("images"))
        .arg("--out")
        .arg(d.join("train.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
}
