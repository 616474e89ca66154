//! LLaVA-NeXT against HF transformers on the tiny random checkpoints of
//! `tests/reference/gen_llava_next.py` (Vicuna-style LLaMA in the 4.x llava-hf layout, Mistral in
//! the 5.x layout; landscape, portrait and square images selecting four different grids):
//! pixel values, the packed image features (unpadding, newlines, base tile first), token ids,
//! logits (max-abs 1e-4, f32), 24 greedy tokens with the KV cache, and FastV on the packed
//! sequence against a by-hand reference on HF's modules (kept sets identical, scores within
//! 1e-5, logits within 1e-4), newline tokens pinned or ranked.

mod common;

use common::*;
use fineprune::model::anyres::{self, VisualToken};
use fineprune::model::chat::{ChatMessage, ChatPart};
use fineprune::prune::{Keep, PrunePlan, Stage};
use fineprune::{Engine, ImageInput, Model, Request};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

const LOGITS_TOL: f32 = 1e-4;
const CKPTS: [&str; 2] = ["vicuna", "mistral"];
const IMAGES: [&str; 3] = ["landscape", "portrait", "square"];

fn meta() -> Value {
    let path = reference_dir().join("llava_next_ref.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn engine(ckpt: &str) -> Engine {
    let dir = reference_dir().join(format!("llava_next_{ckpt}"));
    Engine::new(Arc::new(Model::load(dir).unwrap()))
}

/// The user's question inside a rendered prompt (`USER: <image>\n{q} ASSISTANT:` or
/// `[INST] <image>\n{q} [/INST]`).
fn question(prompt: &str) -> String {
    let q = prompt.split("<image>\n").nth(1).unwrap();
    q.trim_end_matches(" ASSISTANT:")
        .trim_end_matches(" [/INST]")
        .to_string()
}

/// A one-turn chat: the image, then the question, rendered by the checkpoint's own template.
fn chat(case: &Value, image: ImageInput) -> Request {
    let q = question(case["prompt"].as_str().unwrap());
    let msg = ChatMessage {
        role: "user".into(),
        content: vec![ChatPart::Image, ChatPart::Text(q)],
    };
    Request::chat(vec![msg], vec![image])
}

fn tiles_input(r: &HashMap<String, RefTensor>, key: &str) -> ImageInput {
    let size = &r[&format!("{key}/image_sizes")].i;
    ImageInput::Tiles {
        pixels: r[&format!("{key}/pixel_values")].f.clone(),
        image_size: (size[0] as usize, size[1] as usize),
    }
}

/// `logits` rows (`[rows, vocab]`) at `rows` against HF's stored rows.
fn logits_err(logits: &[f32], rows: &[i64], want: &[f32]) -> f32 {
    let vocab = want.len() / rows.len();
    let got: Vec<f32> = rows
        .iter()
        .flat_map(|&r| logits[r as usize * vocab..(r as usize + 1) * vocab].to_vec())
        .collect();
    max_abs_diff(&got, want)
}

#[test]
fn llava_next_matches_hf_on_three_aspect_ratios() {
    let dir = reference_dir();
    let r = load_ref(&dir.join("llava_next_ref.safetensors"));
    let meta = meta();
    for ckpt in CKPTS {
        let engine = engine(ckpt);
        let m = engine.model();
        let v = m.vision.as_ref().unwrap();
        for img in IMAGES {
            let key = format!("{ckpt}/{img}");
            let case = &meta["cases"][&key];
            let (h, w) = (
                case["image_size_hw"][0].as_u64().unwrap() as usize,
                case["image_size_hw"][1].as_u64().unwrap() as usize,
            );
            // Pixel values: our tiles against LlavaNextImageProcessor's, bit for bit.
            let rgb =
                fineprune::model::image::load_image(dir.join(case["image"].as_str().unwrap()))
                    .unwrap();
            let pins = v.config.image_grid_pinpoints.as_ref().unwrap();
            let px = anyres::preprocess(m.image_processor.as_ref().unwrap(), &rgb, pins).unwrap();
            let want_px = &r[&format!("{key}/pixel_values")];
            assert_eq!(px.shape(), &want_px.shape[..], "{key}: tiles");
            assert_eq!(px.f32s().unwrap(), &want_px.f[..], "{key}: pixel values");
            // The packed features: the tower and projector per tile, unpadded, newlines.
            let feats = v
                .forward_images(&m.params, &[(&want_px.f, Some((h, w)))])
                .unwrap();
            let err = max_abs_diff(
                &feats.to_vec_f32().unwrap(),
                &r[&format!("{key}/image_features")].f,
            );
            assert!(err < 1e-5, "{key}: image features differ by {err}");
            // Which tile each image token shows.
            let want_tiles: Vec<VisualToken> = (case["tile_of"].as_array().unwrap().iter())
                .map(|t| match t.as_i64().unwrap() {
                    -1 => VisualToken::Newline { image: 0 },
                    t => VisualToken::Patch {
                        image: 0,
                        tile: t as usize,
                    },
                })
                .collect();
            assert_eq!(
                v.visual_tokens(0, Some((h, w))).unwrap(),
                want_tiles,
                "{key}"
            );

            // From the image file and from HF's tiles: the same ids and logits.
            let file = ImageInput::Path(dir.join(case["image"].as_str().unwrap()));
            for (how, input) in [("file", file), ("tiles", tiles_input(&r, &key))] {
                let req = chat(case, input);
                let out = engine.prompt_logits(&req).unwrap();
                assert_eq!(
                    out.prompt.ids,
                    ids_u32(&r[&format!("{key}/input_ids")]),
                    "{key} ({how}): ids"
                );
                assert_eq!(out.prompt.visual, want_tiles, "{key} ({how})");
                let rows = &r[&format!("{key}/logits_rows")].i;
                let err = logits_err(&out.logits, rows, &r[&format!("{key}/logits")].f);
                println!(
                    "{key} ({how}): logits max-abs diff {err:.2e} over {} rows",
                    rows.len()
                );
                assert!(err < LOGITS_TOL, "{key} ({how}): logits differ by {err}");
                // Unpruned: every tile and newline kept, as many as the prompt has.
                let tiles = &out.stats.tiles;
                assert_eq!(tiles[0].part, VisualToken::Patch { image: 0, tile: 0 });
                assert_eq!(
                    tiles.iter().map(|t| t.total).sum::<usize>(),
                    case["n_image_tokens"].as_u64().unwrap() as usize
                );
                assert!(tiles.iter().all(|t| t.kept == t.total));
            }
            let mut req = chat(case, tiles_input(&r, &key));
            req.max_new_tokens = 24;
            req.stop_on_eos = false;
            let g = engine.generate(&[req]).unwrap().remove(0);
            assert_eq!(
                g.tokens,
                ids_u32(&r[&format!("{key}/greedy")]),
                "{key}: greedy"
            );
        }
    }
}

#[test]
fn fastv_on_llava_next_matches_the_hf_reference() {
    let dir = reference_dir();
    let r = load_ref(&dir.join("llava_next_ref.safetensors"));
    let meta = meta();
    let mut checked = 0;
    for ckpt in CKPTS {
        let engine = engine(ckpt);
        for (name, fc) in meta["fastv"].as_object().unwrap() {
            if fc["ckpt"] != ckpt {
                continue;
            }
            let img = name.strip_prefix(&format!("{ckpt}_")).unwrap();
            let key = format!("{ckpt}/{img}");
            let mut plan = PrunePlan::new(vec![Stage {
                layer: fc["K"].as_u64().unwrap() as usize,
                keep: Keep::Fraction(fc["keep"].as_f64().unwrap()),
            }]);
            plan.keep_newlines = fc["keep_newlines"].as_bool().unwrap();
            let mut req = chat(&meta["cases"][&key], tiles_input(&r, &key));
            req.prune = Some(plan);
            let out = engine.prompt_logits(&req).unwrap();
            let stage = &out.stats.stages[0];
            let f = format!("fastv/{name}");
            let kept: Vec<usize> = r[&format!("{f}/kept")]
                .i
                .iter()
                .map(|&k| k as usize)
                .collect();
            assert_eq!(stage.kept, kept, "{name}: kept");
            let err = max_abs_diff(&stage.ranking.importance, &r[&format!("{f}/scores")].f);
            assert!(err < 1e-5, "{name}: scores differ by {err}");
            let rows = &r[&format!("{f}/logits_rows")].i;
            let err = logits_err(&out.logits, rows, &r[&format!("{f}/logits")].f);
            println!(
                "{name}: {} rows, logits max-abs diff {err:.2e}",
                out.positions.len()
            );
            assert!(err < LOGITS_TOL, "{name}: logits differ by {err}");
            // The per-tile report: the budget counts every visual token, pinned newlines first.
            let tiles = &out.stats.tiles;
            assert_eq!(
                tiles.iter().map(|t| t.kept).sum::<usize>(),
                fc["k"].as_u64().unwrap() as usize
            );
            let newlines = tiles
                .iter()
                .find(|t| matches!(t.part, VisualToken::Newline { .. }))
                .unwrap();
            assert_eq!(
                newlines.kept,
                fc["n_kept_newlines"].as_u64().unwrap() as usize
            );

            req.max_new_tokens = 24;
            req.stop_on_eos = false;
            let g = engine.generate(&[req]).unwrap().remove(0);
            assert_eq!(
                g.tokens,
                ids_u32(&r[&format!("{f}/greedy")]),
                "{name}: greedy"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 5);
}

/// A copy of fixture `llava_next_{ckpt}` with `edit` applied to its `config.json`.
fn edited(ckpt: &str, edit: impl Fn(&mut Value)) -> tempfile::TempDir {
    let src = reference_dir().join(format!("llava_next_{ckpt}"));
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
    tmp
}

/// A question on a LLaVA-NeXT model is one user turn of its own chat template (Mistral's
/// `[INST]`), the same prompt as the chat.
#[test]
fn a_question_uses_the_models_chat_template() {
    let r = load_ref(&reference_dir().join("llava_next_ref.safetensors"));
    let meta = meta();
    for ckpt in CKPTS {
        let engine = engine(ckpt);
        let key = format!("{ckpt}/portrait");
        let q = question(meta["cases"][&key]["prompt"].as_str().unwrap());
        let req = Request::new(q, Some(tiles_input(&r, &key)));
        let p = engine.prepare(&req).unwrap().prompt;
        assert_eq!(p.ids, ids_u32(&r[&format!("{key}/input_ids")]), "{key}");
    }
}

/// `vision_feature_select_strategy: full`, which HF's `LlavaNextModel` cannot run with a CLIP
/// tower (`pack_image_features` fails to view 26 tokens per tile as a 5x5 grid; recorded in
/// `checks.full_strategy`): the prompt takes the processor's count (the base tile with its CLS,
/// then the grid of patches), and the model fills it, the grid tiles' CLS tokens left out.
#[test]
fn full_strategy_fills_the_processors_count() {
    let meta = meta();
    let full = &meta["checks"]["full_strategy"];
    assert!(full["raises"].as_bool().unwrap());
    let dir = edited("vicuna", |c| {
        c["vision_feature_select_strategy"] = "full".into();
    });
    let engine = Engine::new(Arc::new(Model::load(dir.path()).unwrap()));
    let v = engine.model().vision.as_ref().unwrap();
    let case = &meta["cases"]["vicuna/landscape"];
    let size = (
        case["image_size_hw"][0].as_u64().unwrap() as usize,
        case["image_size_hw"][1].as_u64().unwrap() as usize,
    );
    let want = full["processor_count_full"].as_u64().unwrap() as usize;
    assert_eq!(v.image_token_count(Some(size)).unwrap(), want);
    let img = ImageInput::Path(reference_dir().join(case["image"].as_str().unwrap()));
    let out = engine.prompt_logits(&chat(case, img)).unwrap();
    assert_eq!(out.prompt.visual.len(), want);
    // The base tile: its CLS and 25 patches.
    assert_eq!(out.stats.tiles[0].total, 26);
    assert!(out.logits.iter().all(|x| x.is_finite()));
}

#[test]
fn bad_llava_next_input_is_a_clear_error() {
    let r = load_ref(&reference_dir().join("llava_next_ref.safetensors"));
    let meta = meta();
    let case = &meta["cases"]["vicuna/landscape"];
    let engine = engine("vicuna");
    let err = |req: Request| engine.prompt_logits(&req).unwrap_err().to_string();
    // Tiles that are not the grid the image's size selects (2x2 + base = 5).
    let ImageInput::Tiles { pixels, image_size } = tiles_input(&r, "vicuna/landscape") else {
        unreachable!()
    };
    let four = ImageInput::Tiles {
        pixels: pixels[..4 * 3 * 30 * 30].to_vec(),
        image_size,
    };
    let e = err(chat(case, four));
    assert!(
        e.contains("pixel_values") && e.contains("[5, 3, 30, 30]"),
        "{e}"
    );
    // The other model's inputs.
    let e = err(chat(case, ImageInput::Pixels(pixels[..2700].to_vec())));
    assert!(e.contains("LLaVA-NeXT tiles each image by its size"), "{e}");
    let llava15 = Engine::new(Arc::new(
        Model::load(reference_dir().join("llava_gqa")).unwrap(),
    ));
    let tiles = tiles_input(&r, "vicuna/landscape");
    let e = llava15
        .prompt_logits(&Request::new("what?", Some(tiles)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("tiles are LLaVA-NeXT's input"), "{e}");
    // An image token count that does not match the prompt's.
    let v = engine.model().vision.as_ref().unwrap();
    let p = engine
        .prepare(&chat(case, tiles_input(&r, "vicuna/landscape")))
        .unwrap();
    let feats = v
        .forward_images(
            &engine.model().params,
            &[(&pixels, Some((image_size.0, image_size.1 + 40)))],
        )
        .unwrap();
    let e = v
        .merge(&p.prompt.ids, &p.embeds, &feats)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the prompt has 113 image tokens"), "{e}");
    let e = p
        .prompt
        .clone()
        .expand_images(v.config.image_token_id, &[3, 4], 512)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("113 image tokens (id 510) for 2 image(s)"),
        "{e}"
    );
    // Configs: a pinpoint that is not whole tiles, an unknown strategy, a sliding window.
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "vicuna",
            |c| c["image_grid_pinpoints"] = serde_json::json!([[30, 45]]),
            "[30, 45] is not a grid of whole 30x30 tiles",
        ),
        (
            "vicuna",
            |c| c["vision_feature_select_strategy"] = "cls".into(),
            "vision_feature_select_strategy (default, full): cls",
        ),
        (
            "mistral",
            |c| c["text_config"]["sliding_window"] = 16.into(),
            "`text_config.sliding_window` is 16",
        ),
    ];
    for (ckpt, edit, want) in cases {
        let dir = edited(ckpt, edit);
        let e = Model::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
    }
}

/// The trainer, `distill` and the teacher cache take one tile per image: a LLaVA-NeXT
/// checkpoint is refused by name rather than trained wrongly.
#[test]
fn the_trainer_refuses_llava_next() {
    use fineprune::train::model::TrainModel;
    let dir = reference_dir().join("llava_next_vicuna");
    let e = TrainModel::from_dir(&dir).err().unwrap().to_string();
    assert!(
        e.contains("LLaVA-NeXT") && e.contains("llava_next_vicuna"),
        "{e}"
    );
    let e = fineprune::train::teacher_cache::EncoderParts::from_dir(&dir)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("LLaVA-NeXT"), "{e}");
}

/// Every head and query strategy prunes a LLaVA-NeXT prompt: the budget counts all visual
/// tokens, the newlines are kept first (or ranked with `keep_newlines` off), and the per-tile
/// report adds up to what the last layer holds.
#[test]
fn every_strategy_prunes_llava_next_tiles() {
    use fineprune::prune::{HEAD_STRATEGIES, QUERY_STRATEGIES, StrategyParams};
    let r = load_ref(&reference_dir().join("llava_next_ref.safetensors"));
    let meta = meta();
    let engine = engine("mistral");
    let key = "mistral/landscape";
    let case = &meta["cases"][key];
    let n = case["n_image_tokens"].as_u64().unwrap() as usize;
    let newlines = case["newline_positions"].as_array().unwrap().len();
    let k = (0.25 * n as f64).ceil() as usize;
    let params = StrategyParams::default();
    for head in HEAD_STRATEGIES {
        for query in QUERY_STRATEGIES {
            for keep_newlines in [true, false] {
                let mut plan = PrunePlan::new(vec![Stage {
                    layer: 1,
                    keep: Keep::Fraction(0.25),
                }]);
                plan.head = fineprune::prune::head_strategy(head, &params).unwrap();
                plan.query = fineprune::prune::query_strategy(query, &params).unwrap();
                plan.keep_newlines = keep_newlines;
                let mut req = chat(case, tiles_input(&r, key));
                req.prune = Some(plan);
                let s = engine.prompt_logits(&req).unwrap().stats;
                let what = format!("{head}/{query}/newlines {keep_newlines}");
                assert_eq!(s.stages[0].kept.len(), k, "{what}");
                assert_eq!(s.kept_after_last(), k, "{what}");
                assert_eq!(s.tiles.iter().map(|t| t.kept).sum::<usize>(), k, "{what}");
                let nl = s.tiles.last().unwrap();
                assert!(matches!(nl.part, VisualToken::Newline { .. }), "{what}");
                if keep_newlines {
                    assert_eq!(nl.kept, newlines, "{what}");
                }
            }
        }
    }
}

/// The patch tokens of an image's prompt tokens (the ground truth's order in prune-bench): the
/// newlines left out, and the `full` strategy's CLS in front of the base tile.
#[test]
fn patch_tokens_leave_out_newlines_and_the_full_strategys_cls() {
    // 60x40 (w x h): 25 base tokens, then 6 rows of 10 grid tokens and a newline.
    let image = Some((40, 60));
    let model = Model::load(reference_dir().join("llava_next_vicuna")).unwrap();
    let v = model.vision.as_ref().unwrap();
    let units = v.patch_tokens(image).unwrap();
    let default_units = units.clone();
    let visual = v.visual_tokens(0, image).unwrap();
    assert_eq!(units.len(), 91);
    assert_eq!(units.len(), visual.len());
    for (k, (u, t)) in units.iter().zip(&visual).enumerate() {
        assert_eq!(
            u.is_none(),
            matches!(t, VisualToken::Newline { .. }),
            "token {k}"
        );
    }
    let want: Vec<usize> = (0..85).collect();
    assert_eq!(units.iter().flatten().copied().collect::<Vec<_>>(), want);
    assert_eq!(
        units[24..37].to_vec(),
        [
            Some(24),
            Some(25),
            Some(26),
            Some(27),
            Some(28),
            Some(29),
            Some(30),
            Some(31),
            Some(32),
            Some(33),
            Some(34),
            None,
            Some(35),
        ]
    );
    let full = edited("vicuna", |c| {
        c["vision_feature_select_strategy"] = "full".into()
    });
    let model = Model::load(full.path()).unwrap();
    let v = model.vision.as_ref().unwrap();
    let units = v.patch_tokens(image).unwrap();
    assert_eq!(units.len(), 92);
    assert_eq!(units[0], None);
    assert_eq!(units[1..], default_units[..]);
    assert_eq!(units.iter().flatten().copied().collect::<Vec<_>>(), want);
    assert_eq!(units[1..].iter().filter(|u| u.is_none()).count(), 6);
}
