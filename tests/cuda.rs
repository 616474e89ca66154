//! The CUDA backend (feature `cuda`). Without a GPU: every kernel file builds to PTX through
//! NVRTC (`target/nvrtc/`, fetched by .ci/run from PyPI's nvidia-cuda-nvrtc-cu12 wheel, or
//! `FINEPRUNE_NVRTC`), and opening a device is a clear error. With one: every kernel against its
//! CPU twin on random inputs of awkward sizes, tolerances per storage type.
#![cfg(feature = "cuda")]

use fineprune::cuda::{self, Device};
use fineprune::ops::attention::{AttnShape, attention};
use fineprune::ops::{act, norm, rope};
use fineprune::tensor::Tensor;
use std::path::Path;

/// NVRTC from `FINEPRUNE_NVRTC`, else the copy .ci/run unpacks; false (skip) when neither exists,
/// a failure under `CI=true`.
fn nvrtc() -> bool {
    let local = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
    if std::env::var_os("FINEPRUNE_NVRTC").is_none() && local.is_file() {
        cuda::load_nvrtc(&local).unwrap();
    }
    let ok = cuda::nvrtc_present();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "NVRTC missing under CI: .ci/run fetches it into target/nvrtc"
        );
        eprintln!("skipped: NVRTC not found (set FINEPRUNE_NVRTC or run .ci/run)");
    }
    ok
}

#[test]
fn every_kernel_compiles_to_ptx() {
    if !nvrtc() {
        return;
    }
    let mut entries = vec![
        "query_vote".to_string(),
        "importance".into(),
        "head_stats".into(),
    ];
    for s in ["f32", "f16", "bf16"] {
        for k in [
            "flash_attn",
            "decode_attn",
            "rmsnorm",
            "layernorm",
            "silu_mul",
            "copy_cols",
            "add",
            "add_bias",
            "gelu",
            "quick_gelu",
            "rope",
            "gather_rows",
            "selected_probs",
            "selected_lse",
        ] {
            entries.push(format!("{k}_{s}"));
        }
    }
    for arch in ["sm_80", "sm_90"] {
        let ptx = cuda::compile_ptx(arch).unwrap();
        assert_eq!(ptx.len(), cuda::KERNEL_FILES.len());
        let all: String = ptx.iter().map(|(_, p)| p.as_str()).collect();
        assert!(all.contains(&format!(".target {arch}")), "{arch}");
        for e in &entries {
            assert!(
                all.contains(&format!(".entry {e}(")),
                "{arch}: no kernel {e}"
            );
        }
    }
}

/// Built PTX is cached per architecture and source hash: a second call reads the files back.
#[test]
fn built_ptx_is_cached_on_disk() {
    if !nvrtc() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let first = cuda::cached_ptx("sm_80", Some(tmp.path())).unwrap();
    let files: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
    assert_eq!(files.len(), cuda::KERNEL_FILES.len());
    // Mark one cached file: the next call returns the marked text, so it read the cache.
    let norm = files
        .iter()
        .find(|f| f.file_name().to_string_lossy().starts_with("norm-sm_80-"))
        .unwrap()
        .path();
    let marked = format!("// cached\n{}", std::fs::read_to_string(&norm).unwrap());
    std::fs::write(&norm, &marked).unwrap();
    let second = cuda::cached_ptx("sm_80", Some(tmp.path())).unwrap();
    for ((name, a), (_, b)) in first.iter().zip(&second) {
        if *name == "norm" {
            assert_eq!(b, &marked);
        } else {
            assert_eq!(a, b, "{name}");
        }
    }
    // Another architecture is built afresh beside it.
    cuda::cached_ptx("sm_90", Some(tmp.path())).unwrap();
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2 * cuda::KERNEL_FILES.len()
    );
}

#[test]
fn without_a_gpu_opening_a_device_is_an_error_not_a_panic() {
    if cuda::driver_present() {
        eprintln!("skipped: libcuda is present");
        return;
    }
    let e = Device::open(0).err().unwrap().to_string();
    assert!(e.contains("libcuda"), "{e}");
}

/// The GPU, or None after saying why the test skipped (a failure when `FINEPRUNE_REQUIRE_GPU=1`,
/// as scripts/gpu-check.sh sets on the GPU machine).
fn gpu() -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("FINEPRUNE_REQUIRE_GPU").as_deref() != Ok("1"),
                "FINEPRUNE_REQUIRE_GPU=1 but the GPU did not open: {e}"
            );
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Deterministic values in [-1, 1).
fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn bf16(v: &[f32]) -> Vec<half::bf16> {
    v.iter().map(|&x| half::bf16::from_f32(x)).collect()
}

fn from_bf16(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

#[test]
fn norms_activations_rope_and_gather_match_the_cpu() {
    let Some(g) = gpu() else { return };
    // Odd widths: not a multiple of the block or the warp.
    for (rows, d) in [(3, 37), (5, 192), (2, 1000)] {
        let x = rand(rows * d, 1);
        let (w, b) = (rand(d, 2), rand(d, 3));
        let wt = Tensor::from_f32(&[d], w.clone()).unwrap();
        let bt = Tensor::from_f32(&[d], b.clone()).unwrap();
        let (xd, wd, bd) = (
            g.upload(&x).unwrap(),
            g.upload(&w).unwrap(),
            g.upload(&b).unwrap(),
        );
        let y = g
            .download(&g.rms_norm(&xd, &wd, rows, d, 1e-5).unwrap())
            .unwrap();
        assert!(
            max_diff(&y, &norm::rms_norm(&x, &wt, 1e-5).unwrap()) < 1e-5,
            "rms {d}"
        );
        let y = g
            .download(&g.layer_norm(&xd, &wd, &bd, rows, d, 1e-5).unwrap())
            .unwrap();
        assert!(
            max_diff(&y, &norm::layer_norm(&x, &wt, &bt, 1e-5).unwrap()) < 1e-5,
            "ln {d}"
        );
        // bf16 storage: the f32 result rounded once (half an ulp of bf16, 2^-8 relative).
        let xb = g.upload(&bf16(&x)).unwrap();
        let wb = g.upload(&bf16(&w)).unwrap();
        let yb = from_bf16(
            &g.download(&g.rms_norm(&xb, &wb, rows, d, 1e-5).unwrap())
                .unwrap(),
        );
        let want = norm::rms_norm(
            &from_bf16(&bf16(&x)),
            &Tensor::from_f32(&[d], from_bf16(&bf16(&w))).unwrap(),
            1e-5,
        )
        .unwrap();
        for (a, b) in yb.iter().zip(&want) {
            assert!((a - b).abs() <= b.abs() / 128.0 + 1e-6, "bf16 rms {a} {b}");
        }
    }
    let n = 1001;
    let (gate, up) = (rand(n, 4), rand(n, 5));
    let y = g
        .download(
            &g.silu_mul(&g.upload(&gate).unwrap(), &g.upload(&up).unwrap())
                .unwrap(),
        )
        .unwrap();
    let mut want = gate.clone();
    act::silu_mul(&mut want, &up);
    assert!(max_diff(&y, &want) < 1e-6);
    let (ad, bd) = (g.upload(&gate).unwrap(), g.upload(&up).unwrap());
    let sum = g.download(&g.add(&ad, &bd).unwrap()).unwrap();
    let want: Vec<f32> = gate.iter().zip(&up).map(|(a, b)| a + b).collect();
    assert_eq!(sum, want);
    // 1001 values are 7 rows of 143.
    let bias = rand(143, 8);
    let mut xd = g.upload(&gate).unwrap();
    g.add_bias(&mut xd, &g.upload(&bias).unwrap()).unwrap();
    let want: Vec<f32> = gate
        .iter()
        .enumerate()
        .map(|(i, x)| x + bias[i % 143])
        .collect();
    assert_eq!(g.download(&xd).unwrap(), want);
    assert!(
        g.add_bias(&mut xd, &g.upload(&rand(10, 9)).unwrap())
            .is_err()
    );
    let gd = g.upload(&gate).unwrap();
    for (kind, f, y) in [
        ("gelu", act::gelu as fn(&mut [f32]), g.gelu(&gd)),
        ("quick_gelu", act::quick_gelu, g.quick_gelu(&gd)),
    ] {
        let y = g.download(&y.unwrap()).unwrap();
        let mut want = gate.clone();
        f(&mut want);
        assert!(max_diff(&y, &want) < 1e-6, "{kind}");
    }
    // RoPE: 7 rows at scattered positions, 3 heads of 10.
    let (rows, heads, d) = (7, 3, 10);
    let pos: Vec<usize> = vec![0, 1, 5, 17, 100, 575, 2047];
    let freq = rope::inv_freq(d, 10000.0);
    let x = rand(rows * heads * d, 6);
    let mut xd = g.upload(&x).unwrap();
    let pos32: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
    g.rope(
        &mut xd,
        &g.upload(&pos32).unwrap(),
        &g.upload(&freq).unwrap(),
        heads,
        d,
    )
    .unwrap();
    let mut want = x.clone();
    rope::rope(&mut want, heads, d, &pos, &freq);
    // sin/cos of angles up to 2047 rad: the GPU's and libm's last bits differ.
    assert!(max_diff(&g.download(&xd).unwrap(), &want) < 2e-5);
    // Gather rows 4, 0, 2 of a [5, 6] tensor; an index past the end is an error.
    let src = rand(30, 7);
    let y = g
        .download(
            &g.gather_rows(&g.upload(&src).unwrap(), &[4, 0, 2], 6)
                .unwrap(),
        )
        .unwrap();
    let want: Vec<f32> = [4, 0, 2]
        .iter()
        .flat_map(|&r| src[r * 6..r * 6 + 6].to_vec())
        .collect();
    assert_eq!(y, want);
    assert!(g.gather_rows(&g.upload(&src).unwrap(), &[5], 6).is_err());
}

/// log Σ_j exp(scale q·k_j) over the keys row i sees, per head: [heads, t].
fn cpu_lse(q: &[f32], k: &[f32], sh: AttnShape) -> Vec<f32> {
    let (d, group) = (sh.head_dim, sh.heads / sh.kv_heads);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; sh.heads * sh.t];
    for h in 0..sh.heads {
        for i in 0..sh.t {
            let seen = if sh.causal { sh.s - sh.t + i + 1 } else { sh.s };
            let logits: Vec<f64> = (0..seen)
                .map(|j| {
                    (0..d)
                        .map(|e| {
                            q[(i * sh.heads + h) * d + e] as f64
                                * k[(j * sh.kv_heads + h / group) * d + e] as f64
                        })
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            out[h * sh.t + i] = (m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln()) as f32;
        }
    }
    out
}

#[test]
fn attention_kernels_match_the_cpu() {
    let Some(g) = gpu() else { return };
    // Lengths that are not multiples of the 16-row or 32-key tiles, GQA ratios 1, 3 and 4,
    // head dims 64 and 128 and an odd one; causal with a prefix (chunked prefill) and bidirectional.
    for (t, s, heads, kv_heads, d, causal) in [
        (1, 1, 2, 2, 64, true),
        (37, 37, 6, 2, 64, true),
        (19, 50, 8, 2, 128, true),
        (33, 33, 3, 1, 40, false),
        (577, 577, 4, 4, 64, false),
    ] {
        let sh = AttnShape {
            t,
            s,
            heads,
            kv_heads,
            head_dim: d,
            causal,
        };
        let (q, k, v) = (
            rand(t * heads * d, 11),
            rand(s * kv_heads * d, 12),
            rand(s * kv_heads * d, 13),
        );
        let want = attention(&q, &k, &v, sh).unwrap();
        let (qd, kd, vd) = (
            g.upload(&q).unwrap(),
            g.upload(&k).unwrap(),
            g.upload(&v).unwrap(),
        );
        let (out, lse) = g
            .attention(&qd, &kd, &vd, (t, s), (heads, kv_heads, d), s - t, causal)
            .unwrap();
        let diff = max_diff(&g.download(&out).unwrap(), &want);
        assert!(diff < 1e-5, "f32 {t}x{s} h{heads}/{kv_heads} d{d}: {diff}");
        let ld = max_diff(&g.download(&lse).unwrap(), &cpu_lse(&q, &k, sh));
        assert!(ld < 1e-4, "lse {ld}");
        // bf16 storage against the CPU on the same rounded inputs: output rounding only.
        let r = |x: &[f32]| from_bf16(&bf16(x));
        let want = attention(&r(&q), &r(&k), &r(&v), sh).unwrap();
        let (qb, kb, vb) = (
            g.upload(&bf16(&q)).unwrap(),
            g.upload(&bf16(&k)).unwrap(),
            g.upload(&bf16(&v)).unwrap(),
        );
        let (out, _) = g
            .attention(&qb, &kb, &vb, (t, s), (heads, kv_heads, d), s - t, causal)
            .unwrap();
        let diff = max_diff(&from_bf16(&g.download(&out).unwrap()), &want);
        assert!(diff < 8e-3, "bf16 {t}x{s}: {diff}");
        // Decode: the last row alone over the whole cache.
        if causal {
            let last = &q[(t - 1) * heads * d..];
            let dec = g
                .attention_decode(&g.upload(last).unwrap(), &kd, &vd, s, (heads, kv_heads, d))
                .unwrap();
            let diff = max_diff(&g.download(&dec).unwrap(), &want_last(&q, &k, &v, sh));
            assert!(diff < 1e-5, "decode {s}: {diff}");
        }
    }
}

/// The CPU attention output of the last query row.
fn want_last(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> Vec<f32> {
    let row = sh.heads * sh.head_dim;
    attention(&q[(sh.t - 1) * row..], k, v, AttnShape { t: 1, ..sh }).unwrap()
}

#[test]
fn scoring_kernels_match_the_cpu() {
    let Some(g) = gpu() else { return };
    // 30 positions, image tokens at 3..27, three selected rows; 6 heads over 2 kv heads, d 16.
    let (s, heads, kv_heads, d) = (30, 6, 2, 16);
    let (q, k, v) = (
        rand(s * heads * d, 21),
        rand(s * kv_heads * d, 22),
        rand(s * kv_heads * d, 23),
    );
    let (qd, kd, vd) = (
        g.upload(&q).unwrap(),
        g.upload(&k).unwrap(),
        g.upload(&v).unwrap(),
    );
    let (_, lse) = g
        .attention(&qd, &kd, &vd, (s, s), (heads, kv_heads, d), 0, true)
        .unwrap();
    let lse = g.download(&lse).unwrap();
    let rows: Vec<usize> = vec![27, 28, 29];
    let cols: Vec<usize> = (3..27).collect();
    let sel_q: Vec<f32> = rows
        .iter()
        .flat_map(|&r| q[r * heads * d..(r + 1) * heads * d].to_vec())
        .collect();
    let sel_lse: Vec<f32> = (0..heads)
        .flat_map(|h| rows.iter().map(|&r| lse[h * s + r]).collect::<Vec<_>>())
        .collect();
    let u32s = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
    let probs = g
        .selected_probs(
            &g.upload(&sel_q).unwrap(),
            &kd,
            &g.upload(&sel_lse).unwrap(),
            &u32s(&rows),
            &u32s(&cols),
            (heads, kv_heads, d),
        )
        .unwrap();
    let want =
        fineprune::ops::attention::selected_probs(&sel_q, &k, &rows, &cols, heads, kv_heads, d)
            .unwrap();
    let got = g.download(&probs).unwrap();
    assert!(max_diff(&got, &want) < 1e-6);
    // The log-sum-exps rebuilt from the rows' queries and the keys, as flash_attn wrote them.
    let own = g
        .selected_lse(
            &g.upload(&sel_q).unwrap(),
            &kd,
            &u32s(&rows),
            (heads, kv_heads, d),
        )
        .unwrap();
    assert!(max_diff(&g.download(&own).unwrap(), &sel_lse) < 1e-5);
    // The vote, the head statistics and the importance.
    let w = vec![0.5f32, 0.3, 0.2];
    let a = g
        .query_vote(&probs, &g.upload(&w).unwrap(), heads, cols.len())
        .unwrap();
    let a_host = g.download(&a).unwrap();
    let nv = cols.len();
    for h in 0..heads {
        for c in 0..nv {
            let want: f32 = (0..3).map(|r| w[r] * want[(h * 3 + r) * nv + c]).sum();
            assert!((a_host[h * nv + c] - want).abs() < 1e-6);
        }
    }
    let stats = g
        .download(&g.head_stats(&a, heads, nv, 3).unwrap())
        .unwrap();
    for h in 0..heads {
        let x = &a_host[h * nv..(h + 1) * nv];
        let sum: f64 = x.iter().map(|&v| v as f64).sum();
        let mean = sum / nv as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / nv as f64;
        let mut sorted: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let top: f64 = sorted[..3].iter().sum();
        let gini: f64 = x
            .iter()
            .flat_map(|&a| x.iter().map(move |&b| (a - b).abs() as f64))
            .sum::<f64>()
            / (2.0 * nv as f64 * sum);
        let plogp: f64 = x
            .iter()
            .map(|&v| v as f64 / sum)
            .filter(|&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum();
        let l2 = x
            .iter()
            .map(|&v| (v as f64 / sum).powi(2))
            .sum::<f64>()
            .sqrt();
        let want = [sum, var, plogp, sorted[0], sorted[nv - 1], l2, top, gini];
        for (i, (&got, want)) in stats[h * 8..h * 8 + 8].iter().zip(want).enumerate() {
            assert!(
                (got as f64 - want).abs() <= 1e-5 * want.abs().max(1e-3),
                "head {h} stat {i}: {got} vs {want}"
            );
        }
    }
    let beta = vec![0.0f32, 0.5, 0.0, 0.25, 0.25, 0.0];
    let imp = g
        .download(&g.importance(&a, &g.upload(&beta).unwrap(), nv).unwrap())
        .unwrap();
    for c in 0..nv {
        let want: f32 = (0..heads).map(|h| beta[h] * a_host[h * nv + c]).sum();
        assert!((imp[c] - want).abs() < 1e-6);
    }
}

#[test]
fn linear_through_cublas_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    // Sizes off every tile: 7 x 33 by 65 x 33, and a LLaVA-shaped 616 x 4096 by 128 x 4096.
    for (m, k, n) in [(7, 33, 65), (616, 4096, 128)] {
        let (x, w) = (rand(m * k, 31), rand(n * k, 32));
        let mut want = vec![0.0f32; m * n];
        fineprune::ops::matmul::matmul_nt(m, n, k, &x, k, &w, k, &mut want, false);
        let y = g
            .download(
                &g.linear(&g.upload(&x).unwrap(), &g.upload(&w).unwrap(), (m, k, n))
                    .unwrap(),
            )
            .unwrap();
        // f32 through cuBLAS (TF32 stays off by default): k-length sums in another order.
        let tol = 1e-6 * k as f32;
        assert!(max_diff(&y, &want) < tol, "f32 {m}x{k}x{n}");
        let r = |v: &[f32]| from_bf16(&bf16(v));
        let mut want = vec![0.0f32; m * n];
        fineprune::ops::matmul::matmul_nt(m, n, k, &r(&x), k, &r(&w), k, &mut want, false);
        let yb = from_bf16(
            &g.download(
                &g.linear(
                    &g.upload(&bf16(&x)).unwrap(),
                    &g.upload(&bf16(&w)).unwrap(),
                    (m, k, n),
                )
                .unwrap(),
            )
            .unwrap(),
        );
        for (a, b) in yb.iter().zip(&want) {
            assert!((a - b).abs() <= b.abs() / 128.0 + tol, "bf16 {a} {b}");
        }
    }
}

/// The engine shares one device between threads.
#[test]
fn a_device_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Device>();
}
