//! The peer pruning methods against references written from their official code's logic on HF
//! transformers' modules (`tests/reference/gen_methods.py`), on the tiny fixtures at two budgets
//! or more each: the kept image tokens identical (DART), the logits within 1e-4, and 24 greedy
//! tokens with the KV cache the same.
//! - DART (`fineprune::prune::dart`) on both LLaVA-1.5 fixtures and the LLaVA-NeXT Mistral one;
//!   CPython's `set` order, which decides the pivots' turn, reproduced on random integer lists.
//! - Reductions before the LM (`fineprune::prune::before`): uniform pooling (`default` and `full`
//!   strategies), FasterVLM's CLS-attention ranking and VisionZip's dominant + contextual tokens,
//!   on LLaVA-1.5 and LLaVA-NeXT (pooling on the Mistral fixture; FasterVLM and VisionZip, which
//!   read one feature layer's attention, on the Vicuna one).
//! - PyramidDrop as published (`PrunePlan::pdrop`): its stages' kept sets identical, LLaVA-NeXT
//!   included.
//! - SparseVLM (`fineprune::prune::sparsevlm`): its raters, each stage's kept set and the members
//!   of every merged token identical, on both LLaVA-1.5 fixtures and the LLaVA-NeXT Mistral one
//!   (one and two stages; two to five merged tokens per stage there).

mod common;

use common::*;
use fineprune::model::chat::{ChatMessage, ChatPart};
use fineprune::model::template::{LLAVA_SYSTEM, PromptOptions};
use fineprune::prune::dart::{Dart, python_set_order};
use fineprune::prune::sparsevlm::SparseVlm;
use fineprune::prune::{Keep, PrunePlan, Scorer, Stage};
use fineprune::{Engine, ImageInput, Model, Request};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

fn meta() -> Value {
    let path = reference_dir().join("methods_ref.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The reference cases of one method, by name.
fn cases<'a>(meta: &'a Value, method: &str) -> Vec<(&'a String, &'a Value)> {
    (meta["cases"].as_object().unwrap().iter())
        .filter(|(_, c)| c["method"] == method)
        .collect()
}

/// A JSON list of non-negative integers.
fn usizes(v: &Value) -> Vec<usize> {
    (v.as_array().unwrap().iter())
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// A reference tensor of indices.
fn indices(r: &HashMap<String, RefTensor>, key: &str) -> Vec<usize> {
    r[key].i.iter().map(|&k| k as usize).collect()
}

/// The fixtures' engines, each loaded once.
#[derive(Default)]
struct Engines(HashMap<String, Engine>);

impl Engines {
    fn get(&mut self, fixture: &str) -> &Engine {
        (self.0.entry(fixture.to_string())).or_insert_with(|| {
            Engine::new(Arc::new(
                Model::load(reference_dir().join(fixture)).unwrap(),
            ))
        })
    }
}

/// The request of a reference case: a fixture prompt as gen_llava.py / gen_llava_next.py built it.
fn request(case: &Value) -> Request {
    let dir = reference_dir();
    let fixture = case["fixture"].as_str().unwrap();
    let key = case["prompt"].as_str().unwrap();
    if fixture.starts_with("llava_next") {
        let r = load_ref(&dir.join("llava_next_ref.safetensors"));
        let next: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("llava_next_ref.json")).unwrap(),
        )
        .unwrap();
        let prompt = next["cases"][key]["prompt"].as_str().unwrap();
        let q = prompt
            .split("<image>\n")
            .nth(1)
            .unwrap()
            .trim_end_matches(" [/INST]")
            .trim_end_matches(" ASSISTANT:");
        let size = &r[&format!("{key}/image_sizes")].i;
        let image = ImageInput::Tiles {
            pixels: r[&format!("{key}/pixel_values")].f.clone(),
            image_size: (size[0] as usize, size[1] as usize),
        };
        let msg = ChatMessage {
            role: "user".into(),
            content: vec![ChatPart::Image, ChatPart::Text(q.into())],
        };
        return Request::chat(vec![msg], vec![image]);
    }
    let r: HashMap<String, RefTensor> = load_ref(&dir.join(format!("{fixture}_ref.safetensors")));
    let (question, system) = match key {
        "input_ids" => ("What color is the big square?", None),
        _ => (
            "How many circles are there?",
            Some(LLAVA_SYSTEM.to_string()),
        ),
    };
    let mut req = Request::new(
        question,
        Some(ImageInput::Pixels(r["pixel_values"].f.clone())),
    );
    req.options = PromptOptions {
        system,
        ..Default::default()
    };
    req
}

#[test]
fn dart_matches_the_official_logic_on_hf_modules() {
    let dir = reference_dir();
    let r = load_ref(&dir.join("methods_ref.safetensors"));
    let meta = meta();
    let pivots = &meta["pivots"];
    let dart = Dart {
        image_pivots: pivots[0].as_u64().unwrap() as usize,
        text_pivots: pivots[1].as_u64().unwrap() as usize,
    };
    assert_eq!(dart, Dart::default());
    let mut engines = Engines::default();
    let mut checked = 0;
    for (name, case) in cases(&meta, "dart") {
        let engine = engines.get(case["fixture"].as_str().unwrap());
        let mut plan = PrunePlan::new(vec![Stage {
            layer: meta["K"].as_u64().unwrap() as usize,
            keep: Keep::Count(case["budget"].as_u64().unwrap() as usize),
        }]);
        plan.scorer = Scorer::Dart(dart);
        let mut req = request(case);
        req.prune = Some(plan);
        let out = engine.prompt_logits(&req).unwrap();
        let kept = indices(&r, &format!("{name}/kept"));
        assert_eq!(out.stats.stages[0].kept, kept, "{name}: kept");
        assert_eq!(out.stats.kept_after_last(), kept.len(), "{name}");
        matches_hf(engine, &r, name, &out.logits, req);
        checked += 1;
    }
    assert_eq!(checked, 7);
}

/// Reductions before the LM: pooling (`adaptive_avg_pool2d` of the projected grid), FasterVLM
/// (the patches the CLS attends to most) and VisionZip (dominant tokens, then contextual ones
/// merged by key similarity, before the projector): the prompt's ids, logits within 1e-4 and the
/// greedy tokens of HF's forward on the reduced features. On LLaVA-NeXT every tile is reduced
/// and the image laid out as the official code does: each row's tile and kept patch as the
/// reference's (its patch numbered among the image's patch tokens, `None` in the padding).
#[test]
fn reductions_before_the_lm_match_hf() {
    use fineprune::model::anyres::{self, VisualToken};
    use fineprune::prune::before::{BeforeLm, Reduce};
    let dir = reference_dir();
    let r = load_ref(&dir.join("methods_ref.safetensors"));
    let meta = meta();
    let (mut engines, mut checked) = (Engines::default(), 0);
    for (name, case) in meta["cases"].as_object().unwrap() {
        let method = match case["method"].as_str().unwrap() {
            "pool" => BeforeLm::Pool,
            "fastervlm" => BeforeLm::FasterVlm,
            "visionzip" => BeforeLm::VisionZip,
            _ => continue,
        };
        let engine = engines.get(case["fixture"].as_str().unwrap());
        let mut plan = PrunePlan::new(vec![]);
        plan.before_lm = Some(Reduce {
            method,
            keep: Keep::Count(case["budget"].as_u64().unwrap() as usize),
        });
        let mut req = request(case);
        req.prune = Some(plan);
        let out = engine.prompt_logits(&req).unwrap();
        assert_eq!(
            out.prompt.ids,
            ids_u32(&r[&format!("{name}/input_ids")]),
            "{name}"
        );
        let ints = |v: &Value| -> Vec<i64> {
            (v.as_array().unwrap().iter())
                .map(|x| x.as_i64().unwrap())
                .collect()
        };
        let (tiles, patches): (Vec<VisualToken>, Vec<Option<usize>>) = match &case["shows"] {
            // LLaVA-NeXT: [tile, patch of the tile's grid or -1] per row; a patch numbered among
            // the image's patch tokens as `pack_rows` packs them (none in the padding).
            Value::Array(shows) => {
                let v = engine.model().vision.as_ref().unwrap();
                let ImageInput::Tiles { image_size, .. } = req.images[0] else {
                    unreachable!()
                };
                let (vc, pins) = (&v.config.vision, v.config.image_grid_pinpoints.as_ref());
                let (rows, _) =
                    anyres::pack_rows(image_size, pins.unwrap(), (vc.image_size, vc.patch_size))
                        .unwrap();
                let token_of: HashMap<usize, usize> = (rows.iter().flatten().enumerate())
                    .map(|(k, &i)| (i, k))
                    .collect();
                let per_tile = vc.grid() * vc.grid();
                (shows.iter().map(&ints))
                    .map(|s| {
                        let t = s[0] as usize;
                        let p = usize::try_from(s[1]).ok();
                        let patch = p.and_then(|p| token_of.get(&(t * per_tile + p)).copied());
                        (VisualToken::Patch { image: 0, tile: t }, patch)
                    })
                    .unzip()
            }
            // LLaVA-1.5: FasterVLM's picks; VisionZip's dominant patches (its kept tower
            // tokens less the CLS) then none for its contextual tokens; none for pooling.
            _ => {
                let n = case["n_after"].as_u64().unwrap() as usize;
                let mut patches: Vec<Option<usize>> = match method {
                    BeforeLm::VisionZip => std::iter::once(None)
                        .chain(
                            ints(&case["kept"])
                                .iter()
                                .skip(1)
                                .map(|&k| Some(k as usize - 1)),
                        )
                        .collect(),
                    BeforeLm::FasterVlm => (ints(&case["kept"]).iter())
                        .map(|&k| Some(k as usize))
                        .collect(),
                    BeforeLm::Pool => vec![],
                };
                patches.resize(n, None);
                let tile = VisualToken::Patch { image: 0, tile: 0 };
                (vec![tile; n], patches)
            }
        };
        assert_eq!(out.prompt.visual, tiles, "{name}: tiles");
        assert_eq!(out.prompt.patches, patches, "{name}: kept patches");
        let after = case["n_after"].as_u64().unwrap() as usize;
        assert_eq!(out.stats.kept_after_last(), after, "{name}");
        assert_eq!(out.stats.avg_image_tokens(), after as f64, "{name}");
        matches_hf(engine, &r, name, &out.logits, req);
        checked += 1;
    }
    assert_eq!(checked, 14);
}

/// PyramidDrop as published: two stages (after layers 1 and 2 of the 3-layer fixtures, both
/// LLaVA-1.5 ones and LLaVA-NeXT Mistral's, ratios 0.5 and 0.25 floored per prompt), each
/// ranked by the next layer's own projections of its input, positions renumbered: the kept sets
/// of both stages identical, logits within 1e-4, greedy the same.
#[test]
fn pyramiddrop_matches_the_official_logic_on_hf_modules() {
    let dir = reference_dir();
    let r = load_ref(&dir.join("methods_ref.safetensors"));
    let meta = meta();
    let (mut engines, mut checked) = (Engines::default(), 0);
    for (name, case) in cases(&meta, "pdrop") {
        let engine = engines.get(case["fixture"].as_str().unwrap());
        let ratios: Vec<f64> = (case["ratios"].as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap())
            .collect();
        let plan = PrunePlan::pdrop(&usizes(&case["layers"]), &ratios).unwrap();
        let mut req = request(case);
        req.prune = Some(plan);
        let out = engine.prompt_logits(&req).unwrap();
        for (i, st) in out.stats.stages.iter().enumerate() {
            let want = indices(&r, &format!("{name}/kept{i}"));
            assert_eq!(st.kept, want, "{name}: stage {i}");
        }
        matches_hf(engine, &r, name, &out.logits, req);
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// SparseVLM v1.0: raters from the input embeddings, stages after the given layers ranked by
/// the raters' attention, the pruned tokens partly recycled into merged ones, positions
/// renumbered: raters, kept sets and merged tokens' members identical, logits within 1e-4,
/// greedy the same.
#[test]
fn sparsevlm_matches_the_official_logic_on_hf_modules() {
    let dir = reference_dir();
    let r = load_ref(&dir.join("methods_ref.safetensors"));
    let meta = meta();
    let (mut engines, mut checked, mut batch) = (Engines::default(), 0, vec![]);
    for (name, case) in cases(&meta, "sparsevlm") {
        let fixture = case["fixture"].as_str().unwrap();
        let engine = engines.get(fixture);
        let plan = PrunePlan::sparsevlm(
            &usizes(&case["layers"]),
            &usizes(&case["budgets"]),
            SparseVlm::default(),
        )
        .unwrap();
        // The official code ranks LLaVA-NeXT's newlines like any image token.
        assert!(!plan.keep_newlines);
        let mut req = request(case);
        req.prune = Some(plan);
        let out = engine.prompt_logits(&req).unwrap();
        let want_stages = case["stages"].as_array().unwrap();
        assert_eq!(out.stats.stages.len(), want_stages.len(), "{name}");
        for (i, (st, want)) in out.stats.stages.iter().zip(want_stages).enumerate() {
            let mut kept = st.kept.clone();
            kept.sort_unstable();
            assert_eq!(kept, usizes(&want["kept"]), "{name}: stage {i} kept");
            let merged: Vec<Vec<usize>> = (want["merged"].as_array().unwrap().iter())
                .map(usizes)
                .collect();
            assert_eq!(st.merged, merged, "{name}: stage {i} merged");
            assert_eq!(st.after, kept.len() + merged.len(), "{name}: stage {i}");
            assert_eq!(
                st.query_positions,
                usizes(&case["raters"]),
                "{name}: stage {i} raters"
            );
        }
        if fixture == "llava_gqa" {
            batch.push((req.clone(), ids_u32(&r[&format!("{name}/greedy")])));
        }
        matches_hf(engine, &r, name, &out.logits, req);
        checked += 1;
    }
    assert_eq!(checked, 5);
    // Both prompts in one batch: merged rows of two sequences in one layer, each its own.
    let engine = engines.get("llava_gqa");
    let reqs: Vec<Request> = (batch.iter())
        .map(|(req, _)| Request {
            max_new_tokens: 24,
            stop_on_eos: false,
            ..req.clone()
        })
        .collect();
    let out = engine.generate(&reqs).unwrap();
    assert_eq!(out.len(), 2);
    for (g, (_, want)) in out.iter().zip(&batch) {
        assert_eq!(&g.tokens, want, "batched greedy");
    }
}

/// The prefill logits `logits` of case `name` within 1e-4 of the reference's, and 24 greedy
/// tokens of `req` (with the KV cache) equal to its greedy ones.
fn matches_hf(
    engine: &Engine,
    r: &HashMap<String, RefTensor>,
    name: &str,
    logits: &[f32],
    mut req: Request,
) {
    let err = max_abs_diff(logits, &r[&format!("{name}/logits")].f);
    println!("{name}: logits max-abs diff {err:.2e}");
    assert!(err < 1e-4, "{name}: logits differ by {err}");
    req.max_new_tokens = 24;
    req.stop_on_eos = false;
    let g = engine.generate(&[req]).unwrap().remove(0);
    let want = ids_u32(&r[&format!("{name}/greedy")]);
    assert_eq!(g.tokens, want, "{name}: greedy");
}

/// The pivots take turns in CPython's `set` iteration order (the official code iterates
/// `list(indices_set)`): [`python_set_order`] against Python's own on random integer lists.
#[test]
fn python_set_order_matches_cpython() {
    let meta = meta();
    let cases = meta["set_orders"].as_array().unwrap();
    for c in cases {
        assert_eq!(
            python_set_order(&usizes(&c["values"])),
            usizes(&c["set_order"]),
            "{c}"
        );
    }
    assert!(cases.len() >= 40);
}
