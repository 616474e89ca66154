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

/// Three requests: unpruned, one stage (variance, text_tokens_only) and two stages (top_k_sum,
/// last_5_tokens, renumbered positions).
fn three_requests() -> Vec<Request> {
    vec![
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
    ]
}

/// The kept image tokens of each pruning stage.
fn kept_sets(g: &fineprune::Generation) -> Vec<Vec<usize>> {
    g.stats.stages.iter().map(|s| s.kept.clone()).collect()
}

/// Requests joining at different steps (so later prefills share a forward with earlier
/// requests' decode steps) give each the tokens, logits and kept sets it gets alone.
#[test]
fn requests_joining_a_running_batch_get_their_tokens_alone() {
    let e = engine();
    let reqs = three_requests();
    let mut b = e.batch();
    let mut ids = Vec::new();
    let mut streamed: HashMap<u64, Vec<u32>> = HashMap::new();
    // Request 0 alone for two steps, then 1 joins, then 2 one step later.
    for (step, joins) in [(0, Some(0)), (1, None), (2, Some(1)), (3, Some(2))] {
        if let Some(i) = joins {
            ids.push(b.add(reqs[i].clone()).unwrap());
        }
        for u in b.step().unwrap() {
            streamed.entry(u.id).or_default().push(u.token);
        }
        assert!(!b.is_idle(), "step {step}");
    }
    while !b.is_idle() {
        for u in b.step().unwrap() {
            streamed.entry(u.id).or_default().push(u.token);
        }
    }
    let done: HashMap<u64, _> = b
        .take_finished()
        .into_iter()
        .map(|(id, g)| (id, g.unwrap()))
        .collect();
    for (i, r) in reqs.iter().enumerate() {
        let alone = e.generate(std::slice::from_ref(r)).unwrap().remove(0);
        let g = &done[&ids[i]];
        assert_eq!(g.tokens, alone.tokens, "request {i}: tokens");
        assert_eq!(
            streamed[&ids[i]], alone.tokens,
            "request {i}: streamed tokens"
        );
        assert_eq!(kept_sets(g), kept_sets(&alone), "request {i}: kept sets");
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
        assert!(b.step().unwrap().iter().all(|u| u.id == c));
    }
    let done = b.take_finished();
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
    assert_eq!(b.take_finished().len(), 1);
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
        order.extend(got.iter().map(|u| u.id));
        if got.iter().all(|u| u.id == ia) && !batch.is_idle() {
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
    let done: HashMap<u64, _> = batch
        .take_finished()
        .into_iter()
        .map(|(id, g)| (id, g.unwrap()))
        .collect();
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
    assert_eq!(tight.take_finished().len(), 2);
}

/// The tokens and text a request gets without stops (greedy, no EOS stop, 24 tokens).
fn unstopped(e: &Engine, q: &str) -> (Request, fineprune::Generation) {
    let mut r = request(q, 0.4, None);
    r.max_new_tokens = 24;
    r.return_logits = false;
    let g = e.generate(std::slice::from_ref(&r)).unwrap().remove(0);
    (r, g)
}

/// A stop string ends generation at the token that completes it, and the text ends before it;
/// a stop token id ends it at that token (kept in `tokens`, not in `text`).
#[test]
fn stop_strings_and_stop_tokens_end_generation_at_the_right_token() {
    let e = engine();
    let t = &e.model().tokenizer;
    let (r, full) = unstopped(&e, "Describe the picture.");
    let decode = |ids: &[u32]| t.decode(ids, true).unwrap();
    // A stop string that ends inside the 6th token's text: its last 2 characters up to then.
    let upto6 = decode(&full.tokens[..6]);
    let stop: String = {
        let chars: Vec<char> = upto6.chars().collect();
        chars[chars.len().saturating_sub(2)..].iter().collect()
    };
    assert!(!stop.trim().is_empty(), "degenerate stop string {stop:?}");
    let at = full.text.find(&stop).unwrap();
    let k = (1..=full.tokens.len())
        .find(|&k| decode(&full.tokens[..k]).contains(&stop))
        .unwrap();
    let mut s = r.clone();
    s.stop = vec!["\u{1F600}never".into(), stop.clone()];
    let g = e.generate(&[s]).unwrap().remove(0);
    assert_eq!(g.stop, fineprune::StopReason::StopString);
    assert_eq!(g.tokens, full.tokens[..k], "stops at the completing token");
    assert_eq!(g.text, full.text[..at], "text ends before {stop:?}");

    let id = full.tokens[4];
    let first = full.tokens.iter().position(|&x| x == id).unwrap();
    let mut s = r.clone();
    s.stop_token_ids = vec![id];
    let g = e.generate(&[s]).unwrap().remove(0);
    assert_eq!(g.stop, fineprune::StopReason::StopToken);
    assert_eq!(g.tokens, full.tokens[..=first]);
    assert_eq!(g.text, decode(&full.tokens[..first]));

    let mut s = r;
    s.stop = vec![String::new()];
    let err = e.generate(&[s]).unwrap_err();
    assert!(
        err.is_client_error() && err.to_string().contains("stop"),
        "{err}"
    );
}

/// The scheduler thread streams each request's tokens as they come, for requests submitted
/// from several threads at once with their own plans: the tokens, the concatenated text and
/// the kept sets equal the request run alone; the metrics are filled in.
#[test]
fn the_scheduler_streams_concurrent_requests_with_the_results_of_each_alone() {
    use fineprune::{Event, Scheduler};
    let e = engine();
    let reqs = three_requests();
    let s = Arc::new(Scheduler::start(e.clone(), fineprune::Budget::default()));
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let s = s.clone();
            std::thread::spawn(move || {
                let (mut tokens, mut text) = (Vec::new(), String::new());
                for ev in s.submit(r).unwrap() {
                    match ev {
                        Event::Token { token, text: t } => {
                            tokens.push(token);
                            text.push_str(&t);
                        }
                        Event::Done(g) => return (tokens, text, g),
                        Event::Failed(e) => panic!("{e}"),
                    }
                }
                unreachable!("a stream ends with Done or Failed")
            })
        })
        .collect();
    for (i, (h, r)) in handles.into_iter().zip(&reqs).enumerate() {
        let (tokens, text, g) = h.join().unwrap();
        let alone = e.generate(std::slice::from_ref(r)).unwrap().remove(0);
        assert_eq!(tokens, alone.tokens, "request {i}: streamed tokens");
        assert_eq!(g.tokens, alone.tokens, "request {i}: tokens");
        assert_eq!(text, alone.text, "request {i}: streamed text");
        assert_eq!(kept_sets(&g), kept_sets(&alone), "request {i}: kept sets");
        let m = &g.metrics;
        assert!(m.ttft_secs >= m.prepare_secs + m.queue_secs, "{m:?}");
        assert!(m.decode_tokens_per_sec > 0.0 && m.kv_bytes > 0, "{m:?}");
        let image_tokens = alone.stats.image_tokens_per_layer[0];
        assert!(image_tokens > 0);
        assert_eq!(m.image_tokens, image_tokens);
        let kept_now = match r.prune {
            Some(_) => g.stats.stages.last().unwrap().after,
            None => image_tokens,
        };
        assert_eq!(m.image_tokens_kept, kept_now, "request {i}");
    }
    let load = s.load();
    assert_eq!((load.running, load.waiting, load.kv_bytes), (0, 0, 0));
}

/// A request whose receiver goes away is cancelled at its next token: a dropped stream after
/// one token, a sink that stops listening after three.
#[test]
fn a_request_nobody_listens_to_stops_computing() {
    use fineprune::Scheduler;
    let e = engine();
    let mut long = request("Tell me everything about the picture.", 0.3, None);
    long.max_new_tokens = 150;
    let s = Scheduler::start(e.clone(), fineprune::Budget::default());
    let idle = |s: &Scheduler| {
        for _ in 0..2000 {
            let l = s.load();
            if l.running == 0 && l.waiting == 0 && l.steps > 0 {
                return l;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the scheduler never went idle: {:?}", s.load());
    };
    drop(s.submit(long.clone()).unwrap());
    let l = idle(&s);
    assert_eq!((l.cancelled, l.tokens), (1, 1), "{l:?}");
    let mut seen = 0;
    let ready = e.ready(long).unwrap();
    s.submit_ready(
        ready,
        Box::new(move |_| {
            seen += 1;
            seen < 3
        }),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let l = idle(&s);
    assert_eq!((l.cancelled, l.tokens, l.kv_bytes), (2, 4, 0), "{l:?}");
}

/// A request that produces a non-finite value fails alone, with an error naming it and the
/// layer; the request sharing its steps gets the tokens it gets alone.
#[test]
fn a_request_that_fails_in_a_step_fails_alone() {
    let clean = engine();
    let good = request("What color is the big square?", 0.2, None);
    let bad = request("Is there a triangle?", 1.7, Some(PrunePlan::fastv()));
    let alone = clean
        .generate(std::slice::from_ref(&good))
        .unwrap()
        .remove(0);
    // Poison the embedding row of a token only the bad request's prompt holds.
    let ids = |r: &Request| clean.prepare(r).unwrap().prompt.ids;
    let (gi, bi) = (ids(&good), ids(&bad));
    let poison = *bi
        .iter()
        .find(|t| !gi.contains(t) && !alone.tokens.contains(t))
        .unwrap();
    let mut m = Model::load(reference_dir().join("llava_gqa")).unwrap();
    let p = m.lm.embed_tokens();
    let shape = m.params[p].value.shape().to_vec();
    let mut w = m.params[p].value.to_vec_f32().unwrap();
    w[poison as usize * shape[1]] = f32::NAN;
    m.params[p].value = fineprune::Tensor::from_f32(&shape, w).unwrap();
    let e = Engine::new(Arc::new(m));
    let mut b = e.batch();
    let ig = b.add(good).unwrap();
    let ib = b.add(bad).unwrap();
    while !b.is_idle() {
        b.step().unwrap();
    }
    let done: HashMap<u64, _> = b.take_finished().into_iter().collect();
    assert_eq!(done[&ig].as_ref().unwrap().tokens, alone.tokens);
    let err = done[&ib].as_ref().unwrap_err().to_string();
    assert!(
        err.contains("non-finite")
            && err.contains("decoder layer 0")
            && err.contains(&format!("request {ib}")),
        "{err}"
    );
}
