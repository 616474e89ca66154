//! Whole-model checks of the CUDA backend against the CPU and HF transformers: what
//! tests/cuda.rs does per kernel, done for the engine end to end on the reference fixtures
//! (`llava_gqa`, `llava_tied`) and, when its GGUF is present, the real SmolLM2-135M.
//!
//! - f32 on the GPU: prompt logits against HF's within 1e-4 (tests/llava_parity.rs's tolerance;
//!   the GPU computes in f32 throughout, so only accumulation order differs from the CPU, which
//!   meets the same bound) and against the CPU's; 24 greedy tokens equal HF's.
//! - bf16 on the GPU against the CPU on the same bf16 weights: see [`BF16_REL_TOL`].
//! - Pruning: the kept image tokens of every head strategy x every query strategy, and of a
//!   two-stage FastV plan, equal the CPU's (see [`same_kept`] for near ties); a batch of mixed
//!   plans equals its requests run one by one; pruned cached decoding gives the CPU's tokens.
//!
//! Every check prints what it measured (the output doubles as a report: run with
//! `--nocapture --test-threads=1`). Without a GPU each test prints "skipped: no GPU" and passes
//! (CI has none); with `FINEPRUNE_REQUIRE_GPU=1` (scripts/gpu-check.sh) a missing GPU fails.
//! Fixtures are read from `$FINEPRUNE_REPO/tests/reference` (default: this crate's folder at
//! build time), so a test executable copied to another machine finds them in its checkout.
#![cfg(feature = "cuda")]

mod common;

use common::{
    RefTensor, ids_u32, load_ref, max_abs_diff, mixed_batch, pixels, plan, pruned_decode_cases,
    stage,
};
use fineprune::model::template::{LLAVA_SYSTEM, PromptOptions};
use fineprune::prune::metrics::StageReport;
use fineprune::prune::sparsevlm::SparseVlm;
use fineprune::prune::{HEAD_STRATEGIES, Keep, PrunePlan, QUERY_STRATEGIES};
use fineprune::{DType, Device, Engine, Generation, ImageInput, Model, Request};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// tests/llava_parity.rs's bound on f32 logits against HF.
const LOGITS_TOL: f32 = 1e-4;
/// tests/smollm2.rs's bound for the 30-layer SmolLM2 (logits ~20, vocabulary 49152).
const SMOLLM2_TOL: f32 = 1e-3;

/// bf16 on the GPU against the CPU on the same bf16 weights: `max |Δlogit| <= BF16_REL_TOL ·
/// max |logit|`. The CPU keeps activations in f32; the GPU rounds every activation it stores
/// (each GEMM output, norm, residual add, attention output, KV cache entry) to bf16, whose 8-bit
/// significand gives a relative rounding error of up to u = 2^-9 ≈ 0.002 each time. A logit sits
/// at the end of a chain of about 10 such roundings per layer: ~60 for the 3 + 3 layers of the
/// fixtures, ~300 for SmolLM2's 30. Independent roundings add up like a random walk, sqrt(60)·u
/// ≈ 0.015 and sqrt(300)·u ≈ 0.034 of the logits' scale, and the residual stream carries errors
/// forward rather than amplifying them (RMSNorm rescales them away with the signal). 0.05 is
/// above both estimates with room for the softmax's sensitivity, and far below what a wrong
/// kernel gives (a wrong op changes logits by their own order, a relative error near 1). The
/// absolute scale is the largest |logit| of the CPU run, so the bound follows each model's size.
const BF16_REL_TOL: f32 = 0.05;

/// Near ties of the ranking: two image tokens whose CPU importances differ by at most this
/// fraction of the largest importance may trade places at the keep boundary. The GPU rebuilds the
/// probabilities from the flash kernel's log-sum-exp (`exp(q·k/√d − lse)`) where the CPU
/// normalises over full rows: both are f32 and agree to about 1e-6 relative (tests/cuda.rs), so
/// only importances closer than that can order differently; 1e-5 leaves a margin of 10.
const TIE_REL: f32 = 1e-5;

/// The repository root holding tests/reference.
fn repo() -> PathBuf {
    std::env::var_os("FINEPRUNE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn fixtures() -> PathBuf {
    repo().join("tests/reference")
}

/// GPU 0 as a [`Device`], or None after printing why the test skipped (a failure instead when
/// `FINEPRUNE_REQUIRE_GPU=1`).
fn gpu() -> Option<Device> {
    let why = if !fineprune::cuda::driver_present() {
        "libcuda not found".to_string()
    } else {
        match Device::parse("cuda") {
            Ok(d) => return Some(d),
            Err(e) => e.to_string(),
        }
    };
    assert!(
        std::env::var("FINEPRUNE_REQUIRE_GPU").as_deref() != Ok("1"),
        "FINEPRUNE_REQUIRE_GPU=1 but there is no usable GPU: {why}"
    );
    println!("skipped: no GPU ({why})");
    None
}

fn load(name: &str, dev: &Device, dtype: Option<DType>) -> Engine {
    let path = fixtures().join(name);
    let m = Model::load_on(&path, dev, dtype)
        .unwrap_or_else(|e| panic!("load {} on {dev}: {e}", path.display()));
    Engine::new(Arc::new(m))
}

fn reference(name: &str) -> HashMap<String, RefTensor> {
    load_ref(&fixtures().join(format!("{name}_ref.safetensors")))
}

/// The two prompts of tests/llava_parity.rs: `(suffix of the reference keys, question, system)`.
fn parity_prompts() -> [(&'static str, &'static str, Option<String>); 2] {
    [
        ("", "What color is the big square?", None),
        (
            "_2",
            "How many circles are there?",
            Some(LLAVA_SYSTEM.to_string()),
        ),
    ]
}

fn amax(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// The fraction of rows (of width `vocab`) whose argmax agrees.
fn top1_agreement(a: &[f32], b: &[f32], vocab: usize) -> f64 {
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m })
            .0
    };
    let rows = a.len() / vocab.max(1);
    let same = (0..rows)
        .filter(|&r| {
            let s = r * vocab..(r + 1) * vocab;
            argmax(&a[s.clone()]) == argmax(&b[s])
        })
        .count();
    same as f64 / rows.max(1) as f64
}

#[test]
fn f32_logits_and_greedy_tokens_match_hf_and_the_cpu() {
    let Some(dev) = gpu() else { return };
    for name in ["llava_gqa", "llava_tied"] {
        let r = reference(name);
        let (cpu, gpu) = (
            load(name, &Device::Cpu, None),
            load(name, &dev, Some(DType::F32)),
        );
        let pixels = r["pixel_values"].f.clone();
        for (suffix, question, system) in parity_prompts() {
            let mut req = Request::new(question, Some(ImageInput::Pixels(pixels.clone())));
            req.options = PromptOptions {
                system,
                ..Default::default()
            };
            let g = gpu.prompt_logits(&req).unwrap();
            let c = cpu.prompt_logits(&req).unwrap();
            assert_eq!(g.prompt.ids, ids_u32(&r[&format!("input_ids{suffix}")]));
            let want = &r[&format!("logits{suffix}")];
            let (d_hf, d_cpu) = (
                max_abs_diff(&g.logits, &want.f),
                max_abs_diff(&g.logits, &c.logits),
            );
            println!(
                "{name}{suffix} f32: logits {:?}, max-abs diff GPU-HF {d_hf:.2e}, GPU-CPU {d_cpu:.2e} (tol {LOGITS_TOL:.0e})",
                want.shape
            );
            assert!(d_hf < LOGITS_TOL, "{name}{suffix}: GPU vs HF {d_hf}");
            assert!(d_cpu < LOGITS_TOL, "{name}{suffix}: GPU vs CPU {d_cpu}");

            req.max_new_tokens = 24;
            req.stop_on_eos = false;
            let tokens = gpu.generate(&[req]).unwrap().remove(0).tokens;
            let want = ids_u32(&r[&format!("greedy_ids{suffix}")]);
            println!(
                "{name}{suffix} f32: 24 greedy tokens {}",
                if tokens == want {
                    "= HF"
                } else {
                    "DIFFER from HF"
                }
            );
            assert_eq!(tokens, want, "{name}{suffix}: greedy tokens");
        }
    }
}

/// bf16 prompt logits of `req` on the GPU against the CPU on the same bf16 weights, within
/// [`BF16_REL_TOL`] of the CPU logits' scale; prints the diff and the top-1 agreement.
fn check_bf16(label: &str, cpu: &Engine, gpu: &Engine, req: &Request, vocab: usize) {
    let c = cpu.prompt_logits(req).unwrap();
    let g = gpu.prompt_logits(req).unwrap();
    let (diff, scale) = (max_abs_diff(&g.logits, &c.logits), amax(&c.logits));
    let tol = BF16_REL_TOL * scale;
    println!(
        "{label} bf16: max-abs diff GPU-CPU {diff:.3e}, max|logit| {scale:.2}, tol {tol:.3e} \
         ({:.1}% of it), top-1 agreement {:.1}% of {} rows",
        100.0 * diff / tol,
        100.0 * top1_agreement(&g.logits, &c.logits, vocab),
        c.logits.len() / vocab
    );
    assert!(
        g.logits.iter().all(|x| x.is_finite()),
        "{label}: non-finite"
    );
    assert!(diff <= tol, "{label}: bf16 logits differ by {diff} > {tol}");
}

#[test]
fn bf16_logits_track_the_cpu_on_the_same_bf16_weights() {
    let Some(dev) = gpu() else { return };
    for name in ["llava_gqa", "llava_tied"] {
        let r = reference(name);
        let cpu = load(name, &Device::Cpu, Some(DType::BF16));
        let gpu = load(name, &dev, Some(DType::BF16));
        let vocab = cpu.model().lm.config.vocab_size;
        for (suffix, question, system) in parity_prompts() {
            let mut req = Request::new(
                question,
                Some(ImageInput::Pixels(r["pixel_values"].f.clone())),
            );
            req.options.system = system;
            check_bf16(&format!("{name}{suffix}"), &cpu, &gpu, &req, vocab);
        }
    }
}

/// The SmolLM2-135M GGUF (`FINEPRUNE_SMOLLM2_GGUF`, else target/smollm2/ in the checkout), or
/// None after printing that it skipped.
fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("FINEPRUNE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.is_file() {
        return Some(p);
    }
    println!(
        "skipped: SmolLM2 GGUF absent at {} (set FINEPRUNE_SMOLLM2_GGUF)",
        p.display()
    );
    None
}

/// The real SmolLM2 (text only): f32 on the GPU against HF (tests/smollm2.rs's 1e-3) and the CPU,
/// greedy ids equal HF's; bf16 on the GPU against the CPU on bf16 weights.
#[test]
fn smollm2_on_the_gpu_matches_hf_and_the_cpu() {
    let Some(dev) = gpu() else { return };
    let Some(path) = smollm2() else { return };
    let dir = fixtures();
    let r = load_ref(&dir.join("smollm2_ref.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("smollm2_ref.json")).unwrap())
            .unwrap();
    let open = |d: &Device, t| Engine::new(Arc::new(Model::load_on(&path, d, t).unwrap()));
    let (cpu, gpu) = (open(&Device::Cpu, None), open(&dev, Some(DType::F32)));
    let (cpu16, gpu16) = (
        open(&Device::Cpu, Some(DType::BF16)),
        open(&dev, Some(DType::BF16)),
    );
    let vocab = cpu.model().lm.config.vocab_size;
    for p in meta["prompts"].as_array().unwrap() {
        let k = p["key"].as_u64().unwrap();
        let mut req = Request::new(p["text"].as_str().unwrap(), None);
        let g = gpu.prompt_logits(&req).unwrap();
        let c = cpu.prompt_logits(&req).unwrap();
        assert_eq!(g.prompt.ids, ids_u32(&r[&format!("input_ids_{k}")]));
        let n = g.prompt.ids.len();
        let d_hf = max_abs_diff(
            &g.logits[(n - 1) * vocab..],
            &r[&format!("logits_last_{k}")].f,
        );
        let d_cpu = max_abs_diff(&g.logits, &c.logits);
        println!(
            "smollm2 prompt {k} f32: last-row max-abs diff GPU-HF {d_hf:.2e}, all rows GPU-CPU {d_cpu:.2e} (tol {SMOLLM2_TOL:.0e})"
        );
        assert!(d_hf < SMOLLM2_TOL && d_cpu < SMOLLM2_TOL, "prompt {k}");
        check_bf16(&format!("smollm2 prompt {k}"), &cpu16, &gpu16, &req, vocab);
        req.max_new_tokens = p["n_greedy"].as_u64().unwrap() as usize;
        let tokens = gpu.generate(&[req]).unwrap().remove(0).tokens;
        assert_eq!(
            tokens,
            ids_u32(&r[&format!("greedy_ids_{k}")]),
            "prompt {k}: greedy"
        );
        println!(
            "smollm2 prompt {k} f32: {} greedy tokens = HF",
            tokens.len()
        );
    }
}

/// Whether the GPU's stage kept the CPU's tokens: `Ok(None)` when identical, `Ok(Some(note))`
/// when they differ only by near ties at the keep boundary (every token in one set and not
/// the other has a CPU importance within [`TIE_REL`] of the smallest kept importance), else
/// `Err` describing the difference.
fn same_kept(cpu: &StageReport, gpu: &StageReport) -> Result<Option<String>, String> {
    if cpu.kept == gpu.kept {
        return Ok(None);
    }
    let describe = format!("CPU kept {:?}, GPU kept {:?}", cpu.kept, gpu.kept);
    if cpu.ranked != gpu.ranked || cpu.kept.len() != gpu.kept.len() {
        return Err(describe);
    }
    let imp = &cpu.ranking.importance;
    // Importance of an image-token index (positions in `ranked`).
    let of = |tok: usize| {
        cpu.ranked
            .iter()
            .position(|&t| t == tok)
            .map(|i| imp[i])
            .unwrap_or(f32::NAN)
    };
    let boundary = cpu.kept.iter().map(|&t| of(t)).fold(f32::MAX, f32::min);
    let tie = TIE_REL * amax(imp);
    let differing: Vec<usize> = cpu
        .kept
        .iter()
        .filter(|t| !gpu.kept.contains(t))
        .chain(gpu.kept.iter().filter(|t| !cpu.kept.contains(t)))
        .copied()
        .collect();
    if differing.iter().all(|&t| (of(t) - boundary).abs() <= tie) {
        Ok(Some(format!(
            "near tie at the boundary: tokens {differing:?}"
        )))
    } else {
        Err(describe)
    }
}

/// Compares every stage of a CPU and a GPU run; returns the table cell and whether it passed.
fn compare_stages(c: &[StageReport], g: &[StageReport]) -> (String, bool) {
    if c.len() != g.len() {
        return (format!("{} vs {} stages", c.len(), g.len()), false);
    }
    let mut cells = Vec::new();
    let mut ok = true;
    for (sc, sg) in c.iter().zip(g) {
        let d = if sc.ranking.importance.len() == sg.ranking.importance.len() {
            max_abs_diff(&sc.ranking.importance, &sg.ranking.importance)
        } else {
            f32::NAN
        };
        let verdict = match same_kept(sc, sg) {
            Ok(None) => "same".to_string(),
            Ok(Some(note)) => note,
            Err(e) => {
                ok = false;
                format!("DIFFERENT: {e}")
            }
        };
        cells.push(format!(
            "L{} kept {:>2} {verdict} (importance max-abs diff {d:.1e})",
            sc.layer,
            sc.kept.len()
        ));
    }
    (cells.join("; "), ok)
}

#[test]
fn kept_sets_match_the_cpu_for_every_head_and_query_strategy() {
    let Some(dev) = gpu() else { return };
    let mut failed = Vec::new();
    // The stages tests/prune_exact.rs uses per fixture.
    for (name, layer, keep) in [
        ("llava_gqa", 2, Keep::Fraction(0.5)),
        ("llava_tied", 1, Keep::Fraction(0.25)),
    ] {
        let (cpu, gpu) = (
            load(name, &Device::Cpu, None),
            load(name, &dev, Some(DType::F32)),
        );
        let mut base = Request::new("Is there a red circle left of the square?", pixels(0.37));
        base.options.system = Some(LLAVA_SYSTEM.to_string());
        let mut run = |label: String, p: PrunePlan| {
            let mut req = base.clone();
            req.prune = Some(p);
            let c = cpu.prompt_logits(&req).unwrap();
            let g = gpu.prompt_logits(&req).unwrap();
            let (cell, ok) = compare_stages(&c.stats.stages, &g.stats.stages);
            println!("| {name} | {label} | {cell} |");
            if !ok {
                failed.push(format!("{name} {label}"));
            }
        };
        println!("| fixture | head / query | kept (CPU vs GPU f32) |");
        for head in HEAD_STRATEGIES {
            for query in QUERY_STRATEGIES {
                run(
                    format!("{head} / {query}"),
                    plan(vec![stage(layer, keep)], head, query, false),
                );
            }
        }
        // FastV's strategies over two stages.
        run(
            "FastV sum / last_token, 2 stages".into(),
            plan(
                vec![stage(1, Keep::Fraction(0.6)), stage(2, Keep::Count(4))],
                "sum",
                "last_token",
                false,
            ),
        );
        // PyramidDrop ranks by the next layer's keys (the GPU computes their log-sum-exps
        // itself); SparseVLM by its raters, recycling the pruned tokens.
        run(
            "PyramidDrop, 2 stages".into(),
            PrunePlan::pdrop(&[1, 2], &[0.5, 0.25]).unwrap(),
        );
        run(
            "SparseVLM, 2 stages".into(),
            PrunePlan::sparsevlm(&[0, 1], &[12, 6], SparseVlm::default()).unwrap(),
        );
    }
    assert!(failed.is_empty(), "kept sets differ: {failed:?}");
}

fn kept(g: &Generation) -> Vec<Vec<usize>> {
    g.stats.stages.iter().map(|s| s.kept.clone()).collect()
}

/// tests/prune_exact.rs's mixed batch, on the GPU: each request's tokens and kept sets equal
/// the same request run alone on the GPU.
#[test]
fn a_gpu_batch_with_mixed_plans_equals_one_by_one() {
    let Some(dev) = gpu() else { return };
    let e = load("llava_gqa", &dev, Some(DType::F32));
    let reqs = mixed_batch();
    let batch = e.generate(&reqs).unwrap();
    for (i, (r, b)) in reqs.iter().zip(&batch).enumerate() {
        let one = e.generate(std::slice::from_ref(r)).unwrap().remove(0);
        let diff = one
            .step_logits
            .iter()
            .zip(&b.step_logits)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        println!(
            "batch request {i}: tokens {}, kept {}, step logits max-abs diff {diff:.2e}",
            if one.tokens == b.tokens {
                "same"
            } else {
                "DIFFER"
            },
            if kept(&one) == kept(b) {
                "same"
            } else {
                "DIFFER"
            },
        );
        assert_eq!(one.tokens, b.tokens, "request {i}: tokens");
        assert_eq!(kept(&one), kept(b), "request {i}: kept");
    }
    assert_eq!(batch[2].stats.stages.len(), 0);
    assert_eq!(batch[3].stats.stages.len(), 2);
}

/// tests/prune_exact.rs's pruned cached-decode cases: 8 tokens decoded from a pruned KV cache on
/// the GPU equal the CPU's, with the same kept sets; step logits within [`LOGITS_TOL`].
#[test]
fn pruned_cached_decode_on_the_gpu_gives_the_cpus_tokens() {
    let Some(dev) = gpu() else { return };
    let cases = pruned_decode_cases();
    for (i, (name, p)) in cases.into_iter().enumerate() {
        let (cpu, gpu) = (
            load(name, &Device::Cpu, None),
            load(name, &dev, Some(DType::F32)),
        );
        let mut req = Request::new("Is there a red circle left of the square?", pixels(0.37));
        req.prune = Some(p);
        req.max_new_tokens = 8;
        req.stop_on_eos = false;
        req.return_logits = true;
        let c = cpu.generate(std::slice::from_ref(&req)).unwrap().remove(0);
        let g = gpu.generate(std::slice::from_ref(&req)).unwrap().remove(0);
        let diff = c
            .step_logits
            .iter()
            .zip(&g.step_logits)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        println!(
            "pruned decode case {i} ({name}): tokens {}, kept {}, step logits max-abs diff GPU-CPU {diff:.2e} (tol {LOGITS_TOL:.0e})",
            if c.tokens == g.tokens {
                "same"
            } else {
                "DIFFER"
            },
            if kept(&c) == kept(&g) {
                "same"
            } else {
                "DIFFER"
            },
        );
        assert_eq!(kept(&c), kept(&g), "case {i}: kept");
        assert_eq!(c.tokens, g.tokens, "case {i}: tokens");
        assert!(diff < LOGITS_TOL, "case {i}: step logits {diff}");
    }
}
