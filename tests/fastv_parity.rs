//! FastV (and its variants: K=1, an absolute keep count, renumbered positions, keep = 1.0)
//! against a reference written on HF transformers' eager attention
//! (`tests/reference/gen_fastv.py`): same kept indices, importance scores within 1e-5,
//! logits of the pruned sequence within 1e-4, and 24 greedy tokens with the KV cache.

mod common;

use common::*;
use fineprune::model::template::{LLAVA_SYSTEM, PromptOptions};
use fineprune::prune::{Keep, PrunePlan, Stage};
use fineprune::{Engine, ImageInput, Model, Request};
use std::sync::Arc;

#[test]
fn fastv_matches_the_hf_eager_reference() {
    let dir = reference_dir();
    let r = load_ref(&dir.join("fastv_ref.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fastv_ref.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for fixture in ["llava_gqa", "llava_tied"] {
        let engine = Engine::new(Arc::new(Model::load(dir.join(fixture)).unwrap()));
        let fr = load_ref(&dir.join(format!("{fixture}_ref.safetensors")));
        let pixels = fr["pixel_values"].f.clone();
        for (key, case) in meta["cases"].as_object().unwrap() {
            if case["fixture"] != fixture {
                continue;
            }
            let plan_json = &case["plan"];
            let stages = plan_json["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Stage {
                    layer: s["layer"].as_u64().unwrap() as usize,
                    keep: if s["keep_is_count"].as_bool().unwrap() {
                        Keep::Count(s["keep"].as_u64().unwrap() as usize)
                    } else {
                        Keep::Fraction(s["keep"].as_f64().unwrap())
                    },
                })
                .collect();
            let mut plan = PrunePlan::new(stages);
            plan.renumber = plan_json["renumber"].as_bool().unwrap();
            let (question, system) = match case["prompt"].as_u64().unwrap() {
                1 => ("What color is the big square?", None),
                _ => (
                    "How many circles are there?",
                    Some(LLAVA_SYSTEM.to_string()),
                ),
            };
            let mut req = Request::new(question, Some(ImageInput::Pixels(pixels.clone())));
            req.options = PromptOptions {
                system,
                ..Default::default()
            };
            req.prune = Some(plan);
            let out = engine.prompt_logits(&req).unwrap();
            let stage = &out.stats.stages[0];
            let kept: Vec<usize> = r[&format!("{key}_kept")]
                .i
                .iter()
                .map(|&k| k as usize)
                .collect();
            assert_eq!(stage.kept, kept, "{key}: kept");
            let err = max_abs_diff(&stage.ranking.importance, &r[&format!("{key}_scores")].f);
            assert!(err < 1e-5, "{key}: scores differ by {err}");
            let err = max_abs_diff(&out.logits, &r[&format!("{key}_logits")].f);
            println!(
                "{key}: {} rows, logits max-abs diff {err:.2e}",
                out.positions.len()
            );
            assert!(err < 1e-4, "{key}: logits differ by {err}");

            req.max_new_tokens = 24;
            req.stop_on_eos = false;
            let g = engine.generate(&[req]).unwrap().remove(0);
            assert_eq!(
                g.tokens,
                ids_u32(&r[&format!("{key}_greedy")]),
                "{key}: greedy"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}
