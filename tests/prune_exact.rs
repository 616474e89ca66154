//! Pruning is exact: cached decoding after a pruned prefill equals a full recompute of the pruned
//! sequence at every step; keep = 1.0 changes nothing; a batch of differently pruned prompts equals
//! the same prompts run one by one; bad plans are refused.

mod common;

use common::*;
use fineprune::model::llama::{KvCache, SeqRows};
use fineprune::prune::{
    Keep, PrunePlan, Segment, Stage, StrategyParams, head_strategy, query_strategy,
};
use fineprune::{Engine, Generation, Model, Request, Tensor};
use std::sync::Arc;

/// f32 accumulation-order noise only: both sides run the same kernels on different row batches.
const TOL: f32 = 1e-5;

fn engine(name: &str) -> Engine {
    Engine::new(Arc::new(Model::load(reference_dir().join(name)).unwrap()))
}

/// Logits of the last row, recomputed from scratch without reusing any cache: layers before a
/// stage see every surviving token, the stage drops the image tokens the prefill dropped, the
/// generated tokens are always kept.
fn recompute(e: &Engine, req: &Request, g: &Generation, steps: usize, renumber: bool) -> Vec<f32> {
    let (lm, p) = (&e.model().lm, &e.model().params);
    let prep = e.prepare(req).unwrap();
    let n = prep.prompt.ids.len();
    let mut x =
        Tensor::cat_rows(&[&prep.embeds, &lm.embed(p, &g.tokens[..steps]).unwrap()]).unwrap();
    let image_index: Vec<Option<usize>> = {
        let mut k = 0;
        prep.prompt
            .segments
            .iter()
            .map(|&s| {
                (s == Segment::Image).then(|| {
                    k += 1;
                    k - 1
                })
            })
            .chain((0..steps).map(|_| None))
            .collect()
    };
    let mut rows: Vec<usize> = (0..n + steps).collect(); // sequence positions present
    let mut positions = rows.clone();
    let mut cache = KvCache::new(lm.num_layers());
    for l in 0..lm.num_layers() {
        if let Some(st) = g.stats.stages.iter().find(|s| s.layer == l) {
            let keep: Vec<usize> = (0..rows.len())
                .filter(|&i| image_index[rows[i]].is_none_or(|k| st.kept.contains(&k)))
                .collect();
            x = x.gather_rows(&keep).unwrap();
            rows = keep.iter().map(|&i| rows[i]).collect();
            positions = if renumber {
                (0..rows.len()).collect()
            } else {
                rows.clone()
            };
        }
        let seqs = [SeqRows {
            positions: positions.clone(),
        }];
        lm.layer_forward(p, l, &mut x, &seqs, &mut [&mut cache], false)
            .unwrap();
    }
    let last = x.narrow_rows(rows.len() - 1, 1).unwrap();
    lm.logits(p, &last).unwrap().to_vec_f32().unwrap()
}

#[test]
fn cached_decode_equals_full_recompute_of_the_pruned_sequence() {
    let cases = pruned_decode_cases();
    for (name, p) in cases {
        let e = engine(name);
        let renumber = p.renumber;
        let mut req = Request::new("Is there a red circle left of the square?", pixels(0.37));
        req.prune = Some(p);
        req.max_new_tokens = 8;
        req.stop_on_eos = false;
        req.return_logits = true;
        let g = e.generate(std::slice::from_ref(&req)).unwrap().remove(0);
        assert_eq!(g.step_logits.len(), 8);
        for k in 0..8 {
            let want = recompute(&e, &req, &g, k, renumber);
            let err = max_abs_diff(&g.step_logits[k], &want);
            assert!(err < TOL, "{name} step {k}: {err}");
        }
        // The KV cache of layers after a stage holds only the kept tokens: fewer image tokens there.
        let s = &g.stats;
        let last = s.stages.last().unwrap();
        assert_eq!(s.image_tokens_per_layer[last.layer], last.after);
        assert!(s.avg_image_tokens() < s.image_tokens_per_layer[0] as f64);
    }
}

#[test]
fn keep_all_is_identical_to_no_pruning() {
    for name in ["llava_gqa", "llava_tied"] {
        let e = engine(name);
        let base = Request::new("What color is the big square?", pixels(0.11));
        let full = e.prompt_logits(&base).unwrap();
        for (head, query) in [
            ("sum", "last_token"),
            ("variance", "text_tokens_only"),
            ("gini_coefficient", "max_attention_token"),
        ] {
            let mut req = base.clone();
            req.prune = Some(plan(
                vec![stage(1, Keep::Fraction(1.0)), stage(2, Keep::Fraction(1.0))],
                head,
                query,
                false,
            ));
            let pruned = e.prompt_logits(&req).unwrap();
            assert_eq!(pruned.logits, full.logits, "{name} {head}/{query}");
            assert_eq!(pruned.positions, full.positions);
        }
    }
}

#[test]
fn a_batch_pruned_differently_equals_one_by_one() {
    let e = engine("llava_gqa");
    let reqs = mixed_batch();
    let batch = e.generate(&reqs).unwrap();
    for (r, b) in reqs.iter().zip(&batch) {
        let one = e.generate(std::slice::from_ref(r)).unwrap().remove(0);
        assert_eq!(one.tokens, b.tokens, "{:?}", r.prompt);
        for (x, y) in one.step_logits.iter().zip(&b.step_logits) {
            assert!(max_abs_diff(x, y) < TOL);
        }
        let kept = |g: &Generation| {
            g.stats
                .stages
                .iter()
                .map(|s| s.kept.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(&one), kept(b));
    }
    assert_eq!(batch[2].stats.stages.len(), 0);
    assert_eq!(batch[3].stats.stages.len(), 2);
}

/// The random-keep baseline keeps the planned count, ranked by the seeded draws alone: the same
/// seed keeps the same tokens whatever the image, another seed other tokens, and a later stage
/// draws afresh among the survivors.
#[test]
fn random_baseline_keeps_the_tokens_its_seed_draws() {
    let e = engine("llava_gqa");
    let kept = |seed: u64, img: f32, stages: Vec<Stage>| {
        let mut p = plan(stages, "variance", "text_tokens_only", false);
        p.scorer = fineprune::prune::Scorer::Random(seed);
        let mut r = Request::new("What color is the big square?", pixels(img));
        r.max_new_tokens = 2;
        r.prune = Some(p);
        let g = e.generate(&[r]).unwrap().remove(0);
        g.stats
            .stages
            .iter()
            .map(|s| (s.kept.clone(), s.ranking.importance.clone()))
            .collect::<Vec<_>>()
    };
    let one = vec![stage(2, Keep::Count(8))];
    let a = kept(7, 0.2, one.clone());
    // 25 image tokens: the 8 largest of StdRng(7 ^ 25)'s first 25 draws.
    let draws = fineprune::prune::score::random_importance(7, 25);
    assert_eq!(a[0].1, draws);
    assert_eq!(a[0].0, fineprune::prune::score::top_k(&draws, 8));
    assert_eq!(a[0].0.len(), 8);
    assert_eq!(
        kept(7, 1.3, one.clone())[0].0,
        a[0].0,
        "another image, same seed"
    );
    assert_ne!(kept(8, 0.2, one.clone())[0].0, a[0].0, "another seed");
    let attention = e
        .generate(&[{
            let mut r = Request::new("What color is the big square?", pixels(0.2));
            r.max_new_tokens = 2;
            r.prune = Some(plan(one, "variance", "text_tokens_only", false));
            r
        }])
        .unwrap()
        .remove(0);
    assert_ne!(attention.stats.stages[0].kept, a[0].0);
    // Two stages: 12 of 25 at random, then 4 of those 12 from StdRng(7 ^ 12).
    let two = kept(
        7,
        0.2,
        vec![stage(1, Keep::Count(12)), stage(2, Keep::Count(4))],
    );
    let first =
        fineprune::prune::score::top_k(&fineprune::prune::score::random_importance(7, 25), 12);
    assert_eq!(two[0].0, first);
    let second =
        fineprune::prune::score::top_k(&fineprune::prune::score::random_importance(7, 12), 4);
    let want: Vec<usize> = second.iter().map(|&i| first[i]).collect();
    assert_eq!(two[1].0, want);
}

#[test]
fn bad_plans_are_refused_with_clear_errors() {
    let e = engine("llava_gqa");
    let run = |p: PrunePlan, image: bool| {
        let mut r = Request::new("What?", if image { pixels(0.1) } else { None });
        r.prune = Some(p);
        e.generate(&[r]).unwrap_err().to_string()
    };
    let s = |layer, keep| plan(vec![stage(layer, keep)], "sum", "last_token", false);
    assert!(run(s(3, Keep::Fraction(0.5)), true).contains("outside the model"));
    assert!(run(s(0, Keep::Fraction(0.5)), true).contains("outside the model"));
    assert!(run(s(2, Keep::Fraction(1.2)), true).contains("outside (0, 1]"));
    assert!(run(s(2, Keep::Count(26)), true).contains("more than the prompt's 25 image tokens"));
    assert!(run(s(2, Keep::Fraction(0.5)), false).contains("no image tokens"));
    let mut p = s(2, Keep::Fraction(0.5));
    p.head_keep = 0.0;
    assert!(run(p, true).contains("head"));
    let err = head_strategy("varience", &StrategyParams::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("varience") && err.contains("variance") && err.contains("gini_coefficient"),
        "{err}"
    );
    let err = query_strategy("last", &StrategyParams::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text_tokens_only") && err.contains("adaptive_by_length"),
        "{err}"
    );
}

#[test]
fn reports_count_tokens_and_flops_per_layer() {
    let e = engine("llava_gqa");
    let mut req = Request::new("What color is the big square?", pixels(0.4));
    let full = e.prompt_logits(&req).unwrap().stats;
    req.prune = Some(plan(
        vec![stage(1, Keep::Count(10)), stage(2, Keep::Count(4))],
        "sum",
        "last_token",
        false,
    ));
    let p = e.prompt_logits(&req).unwrap().stats;
    assert_eq!(full.image_tokens_per_layer, vec![25, 25, 25]);
    assert_eq!(p.image_tokens_per_layer, vec![25, 10, 4]);
    assert_eq!(p.tokens_per_layer, vec![40, 25, 19]);
    assert!((p.avg_image_tokens() - 13.0).abs() < 1e-12);
    assert_eq!(
        (
            p.stages[0].before,
            p.stages[0].after,
            p.stages[1].before,
            p.stages[1].after
        ),
        (25, 10, 10, 4)
    );
    assert!(
        p.stages[1]
            .kept
            .iter()
            .all(|k| p.stages[0].kept.contains(k))
    );
    assert_eq!(p.stages[1].ranked, p.stages[0].kept);
    assert_eq!(p.stages[0].query_positions, vec![39]);
    assert!(p.prefill_flops < full.prefill_flops && p.decode_flops < full.decode_flops);
    assert!(p.stages.iter().all(|s| s.rank_bytes > 0));
}
