//! Helpers shared by the integration tests: reading reference dumps and comparing tensors.
#![allow(dead_code)]

use fineprune::prune::{Keep, PrunePlan, Stage, StrategyParams, head_strategy, query_strategy};
use fineprune::train::distill::{DistillConfig, DistillLosses, Distiller};
use fineprune::train::model::{TrainModel, TrainSeq};
use fineprune::train::optim::zero_grads;
use fineprune::{ImageInput, Request};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A reference tensor: shape and values (floats as f32, integers as i64).
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub f: Vec<f32>,
    pub i: Vec<i64>,
}

pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

/// Every tensor of a reference safetensors file.
pub fn load_ref(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let (f, i) = match v.dtype() {
                Dtype::F32 => (
                    d.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                    vec![],
                ),
                Dtype::I64 => (
                    vec![],
                    d.chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect(),
                ),
                Dtype::U8 => (vec![], d.iter().map(|&b| b as i64).collect()),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (
                name,
                RefTensor {
                    shape: v.shape().to_vec(),
                    f,
                    i,
                },
            )
        })
        .collect()
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn ids_u32(t: &RefTensor) -> Vec<u32> {
    t.i.iter().map(|&x| x as u32).collect()
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (`FINEPRUNE_SMOLLM2_GGUF`, default
/// `target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, where `.ci/run` puts it). `None` (the test
/// prints that it skipped) when absent, unless `CI` is set: then its absence is a failure.
pub fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("FINEPRUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but the SmolLM2 GGUF is missing at {}",
            p.display()
        );
    }
    println!(
        "skipped: {} is absent (set FINEPRUNE_SMOLLM2_GGUF)",
        p.display()
    );
    None
}

/// The gradient of the whole objective (`w_ce·CE` plus each distillation loss times its weight) of
/// `cfg` at student `m`: analytic (forward + backward) against central finite differences of the
/// objective with step `h`, at the largest-gradient entry of every tensor. Returns the names of
/// the tensors checked.
pub fn check_objective_gradient(
    mut m: TrainModel,
    cfg: &DistillConfig,
    seed: u64,
    seqs: &[TrainSeq],
    h: f32,
) -> Vec<String> {
    let mut d = Distiller::new(cfg, &mut m, seed).unwrap();
    let w = |x: Option<f64>| x.unwrap_or(0.0);
    let (wkd, wh, wa) = (
        w(cfg.logits.as_ref().map(|l| l.weight)),
        w(cfg.hidden.as_ref().map(|h| h.weight)),
        w(cfg.attention.as_ref().map(|a| a.weight)),
    );
    let (waf, wr, wv) = (
        w(cfg.affinity.as_ref().map(|a| a.weight)),
        w(cfg.relational.as_ref().map(|r| r.weight)),
        w(cfg.vision.as_ref().map(|v| v.weight)),
    );
    let objective = |l: DistillLosses| {
        let v = |x: Option<f32>| x.unwrap_or(0.0) as f64;
        cfg.ce_weight * l.ce as f64
            + wkd * v(l.kd)
            + wh * v(l.hidden)
            + wa * v(l.attention)
            + waf * v(l.affinity)
            + wr * v(l.relational)
            + wv * v(l.vision)
    };
    zero_grads(&mut m.params);
    let l0 = d.forward(&mut m, seqs).unwrap();
    let kept = m.pruned_kept().to_vec();
    m.backward().unwrap();
    println!("losses {l0:?}");
    let grads: Vec<Vec<f32>> = m.params.iter().map(|p| p.grad.clone()).collect();
    // The projectors' gradients are small (their loss is one term of several).
    let floor = |name: &str| {
        if name.starts_with("align.") {
            2e-3
        } else {
            0.02
        }
    };
    check_finite_differences(&mut m, &grads, h, floor, |m| {
        let o = objective(d.forward(m, seqs).unwrap());
        // A pruned student's kept set is piecewise constant: the step must not cross an edge.
        assert_eq!(m.pruned_kept(), &kept[..], "the kept tokens changed");
        o
    })
}

/// `grads` (the analytic gradient of `objective` at `m`, one per parameter) against central
/// finite differences of `objective` with step `h` along each tensor's own gradient direction
/// `u = g / |g|` (the whole tensor moves, no entry by more than `h`): the directional derivative
/// must be `|g|` within `1e-2·|g| + 2e-4`. Checked for every tensor whose largest entry reaches
/// `floor(name)`. Moving along `u` puts the whole gradient's norm into the signal, so the few
/// ulps of f32 noise in the objective (whose sign depends on the CPU's summation order) stay far
/// below the tolerance, where one entry of a small bias gradient once sat at the tolerance's
/// edge (0.0235 against 0.0241 at h = 1e-2 on an AVX-512 machine, 0.0240 at 2e-2). A gradient
/// with a wrong entry, sign or scale changes `u·∇f` and fails. Returns the names of the tensors
/// checked.
pub fn check_finite_differences(
    m: &mut TrainModel,
    grads: &[Vec<f32>],
    h: f32,
    floor: impl Fn(&str) -> f32,
    mut objective: impl FnMut(&mut TrainModel) -> f64,
) -> Vec<String> {
    let mut checked = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        let largest = g.iter().fold(0f32, |a, v| a.max(v.abs()));
        let name = m.params[i].name.clone();
        if largest < floor(&name) {
            continue;
        }
        let norm = g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        let want = norm as f32;
        let x0 = m.params[i].f32s().unwrap().to_vec();
        let mut at = |t: f32| {
            for ((x, &a), &gi) in m.params[i].f32s_mut().unwrap().iter_mut().zip(&x0).zip(g) {
                *x = a + t * (gi as f64 / norm) as f32;
            }
            objective(m)
        };
        let fd = ((at(h) - at(-h)) / (2.0 * h as f64)) as f32;
        m.params[i].f32s_mut().unwrap().copy_from_slice(&x0);
        let err = (fd - want).abs();
        let tol = 1e-2 * want.abs() + 2e-4;
        println!("{name}: |g| {want:.5} fd {fd:.5} err/tol {:.2}", err / tol);
        assert!(
            err <= tol,
            "{name}: analytic |g| {want} vs directional finite difference {fd}"
        );
        checked.push(name);
    }
    println!("checked {} of {} tensors", checked.len(), m.params.len());
    checked
}
/// Every parameter's gradient against torch's `grad.{name}` in `r` (within `tol` of the tensor's
/// scale), and every torch parameter we do not hold has none there.
pub fn compare_grads(name: &str, m: &TrainModel, r: &HashMap<String, RefTensor>, tol: f32) {
    let mut worst = (0.0f32, String::new());
    for p in &m.params {
        let g = r
            .get(&format!("grad.{}", p.name))
            .unwrap_or_else(|| panic!("{name}: torch has no parameter {}", p.name));
        assert_eq!(g.f.len(), p.grad.len(), "{}", p.name);
        let amax = |v: &[f32]| v.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        // A key bias adds `q·b` to every score of a query row, which softmax ignores: its true
        // gradient is 0 and both sides hold rounding noise, so it is measured against the scale
        // of the same layer's key weight gradient instead.
        let scale = match p.name.strip_suffix("k_proj.bias") {
            Some(stem) => amax(&r[&format!("grad.{stem}k_proj.weight")].f),
            None => amax(&g.f),
        };
        assert!(scale > 0.0, "{name}: {} has zero torch gradient", p.name);
        let diff = max_abs_diff(&p.grad, &g.f);
        let rel = diff / scale;
        if rel > worst.0 {
            worst = (rel, p.name.clone());
        }
        assert!(
            rel <= tol,
            "{name}: {} max diff {diff:e} vs max |grad| {scale:e} (rel {rel:e})",
            p.name
        );
    }
    // Every torch parameter that we do not hold must have had no gradient in torch either.
    for (k, g) in r {
        if let Some(n) = k.strip_prefix("grad.")
            && m.param(n).is_none()
        {
            assert!(g.f.iter().all(|&v| v == 0.0), "{name}: {n} missing here");
        }
    }
    println!(
        "{name}: {} params, worst grad rel diff {:.2e} ({})",
        m.params.len(),
        worst.0,
        worst.1
    );
}

/// A synthetic 30x30 image for the pruning tests (values `sin(i · seed)`).
pub fn pixels(seed: f32) -> Option<ImageInput> {
    Some(ImageInput::Pixels(
        (0..3 * 30 * 30).map(|i| (i as f32 * seed).sin()).collect(),
    ))
}

pub fn stage(layer: usize, keep: Keep) -> Stage {
    Stage { layer, keep }
}

/// A plan of `stages` with the named head and query strategies (default parameters).
pub fn plan(stages: Vec<Stage>, head: &str, query: &str, renumber: bool) -> PrunePlan {
    let p = StrategyParams::default();
    let mut plan = PrunePlan::new(stages);
    plan.head = head_strategy(head, &p).unwrap();
    plan.query = query_strategy(query, &p).unwrap();
    plan.renumber = renumber;
    plan
}

/// The pruned cached-decode cases (fixture, plan): one and two stages, kept and renumbered
/// positions, four head and four query strategies.
pub fn pruned_decode_cases() -> Vec<(&'static str, PrunePlan)> {
    vec![
        (
            "llava_gqa",
            plan(
                vec![stage(2, Keep::Fraction(0.5))],
                "sum",
                "last_token",
                false,
            ),
        ),
        (
            "llava_gqa",
            plan(
                vec![stage(1, Keep::Fraction(0.6)), stage(2, Keep::Count(4))],
                "variance",
                "text_tokens_only",
                false,
            ),
        ),
        (
            "llava_tied",
            plan(
                vec![stage(1, Keep::Fraction(0.25))],
                "entropy",
                "attention_weighted",
                true,
            ),
        ),
        (
            "llava_tied",
            plan(
                vec![stage(1, Keep::Count(20)), stage(2, Keep::Fraction(0.3))],
                "weighted_quality",
                "weighted_recent",
                true,
            ),
        ),
    ]
}

/// Four requests pruned differently (FastV, variance/text_tokens_only, none, two stages of
/// top_k_sum/last_5_tokens renumbered), 6 greedy tokens each with their logits.
pub fn mixed_batch() -> Vec<Request> {
    let mut reqs = vec![
        Request::new("What color is the big square?", pixels(0.2)),
        Request::new("How many circles are there in this picture?", pixels(0.9)),
        Request::new("Is there a triangle?", pixels(1.7)),
        Request::new("Which shape is on the left?", pixels(0.5)),
    ];
    reqs[0].prune = Some(PrunePlan::fastv());
    reqs[1].prune = Some(plan(
        vec![stage(1, Keep::Fraction(0.25))],
        "variance",
        "text_tokens_only",
        false,
    ));
    reqs[3].prune = Some(plan(
        vec![stage(1, Keep::Count(10)), stage(2, Keep::Count(3))],
        "top_k_sum",
        "last_5_tokens",
        true,
    ));
    for r in &mut reqs {
        r.max_new_tokens = 6;
        r.stop_on_eos = false;
        r.return_logits = true;
    }
    reqs
}
