//! The step-level engine ([`fineprune::engine::Batch`]): requests that join a running batch,
//! with their own prune plans, get the tokens they get alone; a cancelled request frees its KV
//! cache at once; a bad request is refused at `add` and leaves the batch running.

mod common;

use common::*;
use fineprune::prune::{Keep, PrunePlan};
use fineprune::{Engine, Model, Request};
use std::collections::HashMap;
use std::sync::Arc;

fn engine() -> Engine {
    Engine::new(Arc::new(
        Model::load(reference_dir().join("llava_gqa")).unwrap(),
    ))
}

fn request(q: &str, seed: f32, plan: Option<PrunePlan>) -> Request {
    let mut r = Request::new(q, pixels(seed));
    r.max_new_tokens = 6;
    r.stop_on_eos = false;
    r.return_logits = true;
    r.prune = plan;
    r
}

/// Requests joining at different steps (so later prefills share a forward with earlier
/// requests' decode steps) give each the tokens, logits and kept sets it gets alone.
#[test]
fn requests_joining_a_running_batch_get_their_tokens_alone() {
    let e = engine();
    let reqs = [
        request("What color is the big square?", 0.2, None),
        request(
            "How many circles are there in this picture?",
            0.9,
            Some(plan(
                vec![stage(1, Keep::Fraction(0.25))],
                "variance",
                "text_tokens_only",
                false,
            )),
        ),
        request(
            "Which shape is on the left?",
            0.5,
            Some(plan(
                vec![stage(1, Keep::Count(10)), stage(2, Keep::Count(3))],
                "top_k_sum",
                "last_5_tokens",
                true,
            )),
        ),
    ];
    let mut b = e.batch();
    let mut ids = Vec::new();
    let mut streamed: HashMap<u64, Vec<u32>> = HashMap::new();
    // Request 0 alone for two steps, then 1 joins, then 2 one step later.
    for (step, joins) in [(0, Some(0)), (1, None), (2, Some(1)), (3, Some(2))] {
        if let Some(i) = joins {
            ids.push(b.add(reqs[i].clone()).unwrap());
        }
        for (id, tok) in b.step().unwrap() {
            streamed.entry(id).or_default().push(tok);
        }
        assert!(!b.is_idle(), "step {step}");
    }
    while !b.is_idle() {
        for (id, tok) in b.step().unwrap() {
            streamed.entry(id).or_default().push(tok);
        }
    }
    let done: HashMap<u64, _> = b.take_finished().unwrap().into_iter().collect();
    for (i, r) in reqs.iter().enumerate() {
        let alone = e.generate(std::slice::from_ref(r)).unwrap().remove(0);
        let g = &done[&ids[i]];
        assert_eq!(g.tokens, alone.tokens, "request {i}: tokens");
        assert_eq!(
            streamed[&ids[i]], alone.tokens,
            "request {i}: streamed tokens"
        );
        let kept = |g: &fineprune::Generation| -> Vec<Vec<usize>> {
            g.stats.stages.iter().map(|s| s.kept.clone()).collect()
        };
        assert_eq!(kept(g), kept(&alone), "request {i}: kept sets");
        for (a, b) in g.step_logits.iter().zip(&alone.step_logits) {
            let err = max_abs_diff(a, b);
            assert!(err < 1e-5, "request {i}: step logits differ by {err}");
        }
    }
}

/// Cancelling frees the request's KV cache at once, it never finishes, and the others go on.
#[test]
fn cancel_frees_the_kv_cache_and_the_rest_runs_on() {
    let e = engine();
    let mut b = e.batch();
    let a = b
        .add(request("What color is the big square?", 0.2, None))
        .unwrap();
    let c = b
        .add(request(
            "Is there a triangle?",
            1.7,
            Some(PrunePlan::fastv()),
        ))
        .unwrap();
    b.step().unwrap();
    b.step().unwrap();
    let both = b.kv_bytes();
    assert!(b.cancel(a));
    assert!(!b.cancel(a), "a second cancel finds nothing");
    let one = b.kv_bytes();
    assert!(one > 0 && one < both, "kv bytes {both} -> {one}");
    while !b.is_idle() {
        assert!(b.step().unwrap().iter().all(|&(id, _)| id == c));
    }
    let done = b.take_finished().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, c);
    assert_eq!(b.kv_bytes(), 0);
}

/// A bad request is refused by `add`, before any compute, and the batch runs on.
#[test]
fn a_bad_request_is_refused_at_add_and_the_batch_runs_on() {
    let e = engine();
    let mut b = e.batch();
    b.add(request("What color is the big square?", 0.2, None))
        .unwrap();
    let mut bad = request("Is there a triangle?", 1.7, None);
    bad.sampling.top_p = 0.0;
    let err = b.add(bad).unwrap_err().to_string();
    assert!(err.contains("top_p"), "{err}");
    let mut too_deep = request("Is there a triangle?", 1.7, None);
    too_deep.prune = Some(plan(
        vec![stage(99, Keep::Fraction(0.5))],
        "sum",
        "last_token",
        false,
    ));
    assert!(b.add(too_deep).is_err());
    while !b.is_idle() {
        b.step().unwrap();
    }
    assert_eq!(b.take_finished().unwrap().len(), 1);
}

/// Under a step-token budget one prompt wide, the second request waits (it is not failed) until
/// the first has finished, then runs and gets its tokens alone; a KV budget below one request's
/// worst case still runs that request when the batch is otherwise empty.
#[test]
fn a_request_over_the_budget_waits_and_then_runs() {
    let e = engine();
    let (a, b) = (
        request("Is there a triangle?", 1.7, Some(PrunePlan::fastv())),
        request("What color is the big square?", 0.2, None),
    );
    // b's prompt alone fills the budget, so it cannot share a step with a's decode row.
    let prompt = |r: &Request| e.prepare(r).unwrap().prompt.ids.len();
    assert!(prompt(&b) >= prompt(&a));
    let mut batch = e.batch();
    batch.set_budget(fineprune::Budget {
        step_tokens: prompt(&b),
        kv_bytes: usize::MAX,
    });
    let ia = batch.add(a.clone()).unwrap();
    let ib = batch.add(b.clone()).unwrap();
    let mut order = Vec::new();
    while !batch.is_idle() {
        let got = batch.step().unwrap();
        order.extend(got.iter().map(|&(id, _)| id));
        if got.iter().all(|&(id, _)| id == ia) && !batch.is_idle() {
            assert_eq!(batch.waiting(), 1, "b waits while a runs");
        }
    }
    let first_b = order.iter().position(|&id| id == ib).unwrap();
    assert!(order[..first_b].iter().all(|&id| id == ia));
    assert_eq!(
        order[..first_b].len(),
        a.max_new_tokens,
        "b starts once a is done"
    );
    let done: HashMap<u64, _> = batch.take_finished().unwrap().into_iter().collect();
    for (id, r) in [(ia, &a), (ib, &b)] {
        let alone = e.generate(std::slice::from_ref(r)).unwrap().remove(0);
        assert_eq!(done[&id].tokens, alone.tokens);
    }

    let mut tight = e.batch();
    tight.set_budget(fineprune::Budget {
        step_tokens: usize::MAX,
        kv_bytes: 1,
    });
    tight.add(a.clone()).unwrap();
    tight.add(b.clone()).unwrap();
    let mut at_once = 0;
    while !tight.is_idle() {
        at_once = at_once.max(tight.step().unwrap().len());
    }
    assert_eq!(at_once, 1, "one request at a time under a 1-byte KV budget");
    assert_eq!(tight.take_finished().unwrap().len(), 2);
}
