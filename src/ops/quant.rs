//! Matrix products that read GGUF-quantised weights in their blocks, as llama.cpp's CPU backend
//! does: [`quant_linear`] computes `out[m, n] = x[m, k] · Wᵀ` for a weight `W: [n, k]` stored row
//! by row in ggml blocks, without ever widening `W` to f32.
//!
//! # Scheme
//! Each activation row is quantised once per call to the weight type's 8-bit *dot partner*
//! (llama.cpp's `vec_dot_type`); every block of a weight row is then dotted with the matching
//! partner block in integers and the integer sum scaled in f32:
//!
//! | weight | partner | per-block contribution to `out[i, j]` |
//! |--------|---------|----------------------------------------|
//! | Q4_0, Q5_0, Q8_0 | Q8_0 | `(d_w · d_x) · Σ q_w q_x` (`q_w` signed: `q - 8`, `q - 16`, `q`) |
//! | Q4_1, Q5_1 | Q8_1 | `(d_w · d_x) · Σ q_w q_x + m_w · s_x` |
//! | Q4_K, Q5_K | Q8_K | `d_w d_x Σ_j sc_j Σ q_w q_x − dmin_w d_x Σ_j m_j (bsum_2j + bsum_2j+1)` |
//! | Q6_K | Q8_K | `d_w d_x Σ_g sc_g (Σ q_w q_x − 32 · bsum_g)` (`q_w` in 0..64) |
//!
//! The partners (block layouts as in ggml-common.h, held here unpacked):
//! - **Q8_0** (32 elements): `d = amax / 127` stored as f16, `q = round(x / d)` (`roundf`: half
//!   away from zero) in `-127..=127`.
//! - **Q8_1** (32 elements): Q8_0 plus `s = d · Σ q` (with the f32 `d`, then rounded to f16), so
//!   the weight's min `m` contributes `m · Σ x̂` without touching the quants.
//! - **Q8_K** (256 elements): `iscale = −127 / max` (`max` the signed element of largest
//!   magnitude), `q = min(127, nearest_int(iscale · x))`, `d = 1 / iscale` kept in f32, and
//!   `bsums[g] = Σ q` over each 16 elements, which carry the K-quants' mins and Q6_K's offset.
//!
//! Integer sums are exact, so the only error against the f32 product of the dequantised weight is
//! the activation rounding: `|x − x̂| ≤ d/2 + amax · 2⁻¹¹` per element (half a step, plus the f16
//! rounding of `d` for Q8_0/Q8_1), i.e. about 1/254 of its block's largest magnitude.
//!
//! # Kernels
//! Runtime detection picks one of three tiers ([`Isa`]): AVX-512 (F/BW/VL/VNNI) for the
//! 32-element types, on 512-bit registers that each hold a *group* of four blocks (two for Q8_0):
//! two 64-byte loads and a `vpermt2w` gather the group's quants and scales, `vpdpbusd` sums
//! `u8 × i8` products into i32 lanes (weights made unsigned by an offset whose `offset · Σ q_x`
//! the activation side carries, exact), and the scales multiply whole lanes, against activations
//! re-laid once per call to match (`Lanes`); the K-quants run the AVX2 kernels there.
//! AVX2+FMA+F16C (`vpmaddubsw` + `vpmaddwd`, as llama.cpp's
//! AVX2 path; signed weights use the `sign`/`abs` trick so the unsigned operand is `|q_w|`), and a
//! portable scalar path written in fixed-size per-block loops that the compiler vectorises (the
//! only path off x86-64). The SIMD kernels take up to four activation rows at once, so each weight
//! block is unpacked once per four rows; rayon splits the output rows of `W` into chunks, each
//! chunk against every activation row, so decode (`m = 1`) and prefill both use every core.

use crate::error::{Error, Result};
use crate::model::gguf::{GgmlType, f16_at, scale_min_k4};
use half::f16;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Whether [`quant_linear`] handles weights of type `ty`.
pub fn supports(ty: GgmlType) -> bool {
    partner(ty).is_some()
}

/// The instruction-set tier a product runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (auto-vectorised); runs everywhere.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 + FMA + F16C + AVX-512 F/BW/VL/VNNI: 512-bit kernels for the 32-element types,
    /// the AVX2 tier's K-quant kernels.
    Avx512Vnni,
}

impl Isa {
    /// Whether this machine can run the tier.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best tier this machine runs (detected once).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512Vnni, Isa::Avx2]
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Portable)
        })
    }
}

/// `out[m, n] = x[m, k] · Wᵀ` for `W: [n, k]` stored row by row in ggml blocks of `ty` (each row
/// `k / block_size` blocks, `w.len() == n · bytes_for(k)`), `x: [m, k]` row-major f32. Supported:
/// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (see the module docs for the scheme); other
/// types are [`Error::Unsupported`], a `k` that is not a whole number of blocks or mismatched
/// buffer lengths are [`Error::Shape`]. Runs on the best [`Isa`] this machine has.
pub fn quant_linear(
    ty: GgmlType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>> {
    quant_linear_on(Isa::detect(), ty, w, n, k, x, m)
}

/// [`quant_linear`] on a chosen [`Isa`] tier (benches and tests compare them); a tier this
/// machine lacks is [`Error::Unsupported`]. Every tier gives the same numbers up to the order of
/// f32 additions.
pub fn quant_linear_on(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>> {
    let p = partner(ty).ok_or_else(|| Error::Unsupported {
        what: "ggml type for quantised matmul (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
        value: ty.to_string(),
    })?;
    if !isa.available() {
        return Err(Error::Unsupported {
            what: "instruction set on this CPU",
            value: format!("{isa:?}"),
        });
    }
    let bs = ty.block_size();
    if !k.is_multiple_of(bs) {
        return Err(Error::Shape {
            name: format!("quant_linear {ty} weight row length k (a multiple of {bs})"),
            expected: vec![n, k.next_multiple_of(bs)],
            got: vec![n, k],
        });
    }
    let row_bytes = (k / bs) * ty.type_size();
    let want = n.checked_mul(row_bytes);
    if want != Some(w.len()) {
        return Err(Error::Shape {
            name: format!("quant_linear {ty} weight bytes for [{n}, {k}]"),
            expected: want.map(|v| vec![v]).unwrap_or_default(),
            got: vec![w.len()],
        });
    }
    if m.checked_mul(k) != Some(x.len()) {
        return Err(Error::Shape {
            name: "quant_linear input".into(),
            expected: vec![m, k],
            got: vec![x.len()],
        });
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let (kern, lanes) = kernel(ty, isa);
    let mut acts = QActs::quantize(p, x, m, k);
    if let Some(l) = lanes {
        acts.pack(l);
    }
    Ok(run(kern, w, row_bytes, n, &acts))
}

// ---------------------------------------------------------------------------------------------
// Activation quantisation
// ---------------------------------------------------------------------------------------------

/// The 8-bit type an activation row is quantised to for a weight type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Partner {
    Q8_0,
    Q8_1,
    Q8K,
}

fn partner(ty: GgmlType) -> Option<Partner> {
    Some(match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Partner::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 => Partner::Q8_1,
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => Partner::Q8K,
        _ => return None,
    })
}

/// `m` activation rows quantised to their partner type, unpacked into flat arrays.
#[derive(Debug)]
struct QActs {
    m: usize,
    k: usize,
    /// Block length (32 or 256).
    qb: usize,
    /// `[m, k]` quants.
    qs: Vec<i8>,
    /// `[m, k / qb]` block scales (Q8_0/Q8_1: the f16 value, widened).
    d: Vec<f32>,
    /// Q8_1: `[m, k / 32]` `d · Σ q` (f16-rounded); empty otherwise.
    s: Vec<f32>,
    /// Q8_K: `[m, k / 16]` sums of 16 quants; empty otherwise.
    bsums: Vec<i16>,
    /// The rows re-laid for the 512-bit kernels by [`QActs::pack`]; empty otherwise.
    lanes: LaneActs,
}

/// How the 512-bit kernels read a 32-element weight type: `blocks` consecutive blocks make a
/// *group*, whose products land in the sixteen i32 lanes of one register, `16 / blocks` lanes
/// per block (each lane sums 4 of the block's products, or 8 with `halves`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lanes {
    /// Blocks per group: 4 for the 4/5-bit types, 2 for Q8_0 (`32 · blocks` quant bytes).
    blocks: usize,
    /// The weight's 64-byte quant vectors hold one half of every block of the group: vector 0
    /// elements 0..16 of each block (low nibbles), vector 1 elements 16..32 (high nibbles).
    /// Without it, one vector holds the group's blocks in order.
    halves: bool,
    /// The kernels multiply the unsigned `u = q_w + offset` (`vpdpbusd` takes u8 × i8), so the
    /// product is `Σ u q_x − offset · Σ q_x`; the second term is exact in integers and folded into
    /// the first lane of each block before the sum.
    offset: i32,
}

/// Activation rows in the order of [`Lanes`]: per row and group, the quants as the weight's
/// vectors hold theirs, then per lane its block's `d`, its `s` (first lane of a block, Q8_1;
/// zero elsewhere) and `−offset · Σ q` (first lane of a block; zero elsewhere). A last, partial
/// group is padded with zeros.
#[derive(Debug, Default)]
struct LaneActs {
    /// `[m, groups · 32 · blocks]` quants.
    qs: Vec<i8>,
    /// `[m, groups · 16]` per-lane `d`.
    d: Vec<f32>,
    /// `[m, groups · 16]` per-lane `s` (Q8_1), empty otherwise.
    s: Vec<f32>,
    /// `[m, groups · 16]` per-lane offset correction, empty when the offset is 0.
    corr: Vec<i32>,
}

/// One quantised activation row (with its [`LaneActs`] row, empty unless packed).
#[derive(Debug, Clone, Copy)]
struct ARow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    bsums: &'a [i16],
    lq: &'a [i8],
    ld: &'a [f32],
    ls: &'a [f32],
    lc: &'a [i32],
}

impl QActs {
    fn quantize(p: Partner, x: &[f32], m: usize, k: usize) -> QActs {
        let qb = if p == Partner::Q8K { 256 } else { 32 };
        let nb = k / qb;
        let mut a = QActs {
            m,
            k,
            qb,
            qs: vec![0; m * k],
            d: vec![0.0; m * nb],
            s: vec![0.0; if p == Partner::Q8_1 { m * nb } else { 0 }],
            bsums: vec![0; if p == Partner::Q8K { m * k / 16 } else { 0 }],
            lanes: LaneActs::default(),
        };
        let (sw, bw) = (a.s.len() / m, a.bsums.len() / m);
        let rows: Vec<RowMut> =
            a.qs.chunks_mut(k)
                .zip(a.d.chunks_mut(nb))
                .zip(x.chunks(k))
                .zip(chunks_or_empty(&mut a.s, sw, m))
                .zip(chunks_or_empty(&mut a.bsums, bw, m))
                .map(|((((qs, d), x), s), bsums)| RowMut { x, qs, d, s, bsums })
                .collect();
        let one = |r: RowMut| match p {
            Partner::Q8_0 => quantize_q8_01(r.x, r.qs, r.d, None),
            Partner::Q8_1 => quantize_q8_01(r.x, r.qs, r.d, Some(r.s)),
            Partner::Q8K => quantize_q8_k(r.x, r.qs, r.d, r.bsums),
        };
        if m * k >= 1 << 16 {
            rows.into_par_iter().for_each(one);
        } else {
            rows.into_iter().for_each(one);
        }
        a
    }

    /// Fills [`QActs::lanes`] for a 32-element weight type read as `l` says.
    fn pack(&mut self, l: Lanes) {
        debug_assert!(self.qb == 32 && 16 % l.blocks == 0);
        let (m, k) = (self.m, self.k);
        let nb = k / 32;
        let groups = nb.div_ceil(l.blocks);
        let (gq, per) = (32 * l.blocks, 16 / l.blocks);
        let mut p = LaneActs {
            qs: vec![0; m * groups * gq],
            d: vec![0.0; m * groups * 16],
            s: vec![
                0.0;
                if self.s.is_empty() {
                    0
                } else {
                    m * groups * 16
                }
            ],
            corr: vec![0; if l.offset == 0 { 0 } else { m * groups * 16 }],
        };
        for i in 0..m {
            let (lq, ll) = (i * groups * gq, i * groups * 16);
            for b in 0..nb {
                let src = &self.qs[i * k + 32 * b..][..32];
                let (g, j) = (b / l.blocks, b % l.blocks);
                let q0 = lq + g * gq;
                if l.halves {
                    p.qs[q0 + 16 * j..][..16].copy_from_slice(&src[..16]);
                    p.qs[q0 + gq / 2 + 16 * j..][..16].copy_from_slice(&src[16..]);
                } else {
                    p.qs[q0 + 32 * j..][..32].copy_from_slice(src);
                }
                let lane = ll + 16 * g + per * j;
                p.d[lane..lane + per].fill(self.d[i * nb + b]);
                if !p.s.is_empty() {
                    p.s[lane] = self.s[i * nb + b];
                }
                if !p.corr.is_empty() {
                    p.corr[lane] = -l.offset * src.iter().map(|&q| q as i32).sum::<i32>();
                }
            }
        }
        self.lanes = p;
    }

    fn row(&self, i: usize) -> ARow<'_> {
        let nb = self.k / self.qb;
        let (sw, bw) = (self.s.len() / self.m, self.bsums.len() / self.m);
        let l = &self.lanes;
        let (lqw, ldw) = (l.qs.len() / self.m, l.d.len() / self.m);
        let (lsw, lcw) = (l.s.len() / self.m, l.corr.len() / self.m);
        ARow {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            s: &self.s[i * sw..(i + 1) * sw],
            bsums: &self.bsums[i * bw..(i + 1) * bw],
            lq: &l.qs[i * lqw..(i + 1) * lqw],
            ld: &l.d[i * ldw..(i + 1) * ldw],
            ls: &l.s[i * lsw..(i + 1) * lsw],
            lc: &l.corr[i * lcw..(i + 1) * lcw],
        }
    }
}

/// One activation row and where its quantised form goes.
struct RowMut<'a> {
    x: &'a [f32],
    qs: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    bsums: &'a mut [i16],
}

/// `m` chunks of `w` elements (empty slices when `v` is empty).
fn chunks_or_empty<T>(v: &mut [T], w: usize, m: usize) -> Vec<&mut [T]> {
    if w == 0 {
        (0..m).map(|_| <&mut [T]>::default()).collect()
    } else {
        v.chunks_mut(w).collect()
    }
}

/// ggml's `quantize_row_q8_0_ref` / `quantize_row_q8_1_ref` for one row (`s` for Q8_1); with
/// AVX2 + F16C the same code compiled for them (the same operations, so the same bits).
fn quantize_q8_01(x: &[f32], qs: &mut [i8], d: &mut [f32], s: Option<&mut [f32]>) {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2.available() {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2(x: &[f32], qs: &mut [i8], d: &mut [f32], s: Option<&mut [f32]>) {
            q8_01_row(x, qs, d, s)
        }
        // SAFETY: the features were detected.
        return unsafe { avx2(x, qs, d, s) };
    }
    q8_01_row(x, qs, d, s)
}

#[inline(always)]
fn q8_01_row(x: &[f32], qs: &mut [i8], d: &mut [f32], mut s: Option<&mut [f32]>) {
    for (b, (xb, qb)) in x.chunks_exact(32).zip(qs.chunks_exact_mut(32)).enumerate() {
        // The largest |x| in eight lanes (the same value as a sequential fold: `max` ignores NaN
        // and is otherwise exact, in any order), so that it vectorises.
        let mut lanes = [0.0f32; 8];
        for c in xb.chunks_exact(8) {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = m.max(v.abs());
            }
        }
        let amax = lanes.iter().fold(0.0f32, |a, &v| a.max(v));
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = round_away(v * id).clamp(-128, 127) as i8;
            sum += *q as i32;
        }
        d[b] = f16::from_f32(dd).to_f32();
        if let Some(s) = s.as_deref_mut() {
            s[b] = f16::from_f32(sum as f32 * dd).to_f32();
        }
    }
}

/// `roundf` (half away from zero) for `|v| < 2²³`, in operations that vectorise on any x86-64
/// (`f32::round` is a libm call without SSE4.1): `v − trunc(v)` is exact there. NaN gives 0.
#[inline]
fn round_away(v: f32) -> i32 {
    let t = v as i32;
    let f = v - t as f32;
    t + (f >= 0.5) as i32 - (f <= -0.5) as i32
}

/// ggml's `nearest_int`: round half to even by adding `1.5 · 2²³` and reading the mantissa
/// (exact for `|v| ≤ 2²²`, the range ggml uses it on: activations here, weights in
/// [`crate::model::quantize`]; `round_ties_even` is a libm call without SSE4.1).
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    let f = v + 12_582_912.0;
    (f.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `quantize_row_q8_K_ref` for one row.
fn quantize_q8_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for (b, (xb, qb)) in x
        .chunks_exact(256)
        .zip(qs.chunks_exact_mut(256))
        .enumerate()
    {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let bsum = &mut bsums[16 * b..16 * b + 16];
        if amax == 0.0 {
            d[b] = 0.0;
            qb.fill(0);
            bsum.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, g) in bsum.iter_mut().zip(qb.chunks_exact(16)) {
            *s = g.iter().map(|&q| q as i16).sum();
        }
        d[b] = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

/// A kernel: `out[j · stride + r] = W_j · a[r]` for every weight row `W_j` of `w` (whole rows
/// of `row_bytes`) and `r < a.len() ≤ TILE`.
type Kernel = fn(w: &[u8], row_bytes: usize, a: &[ARow], out: &mut [f32], stride: usize);

/// Activation rows a SIMD kernel takes at once (each weight block unpacked once per tile).
const TILE: usize = 4;
/// Activation rows a task runs through before moving to its next weight rows (keeps a chunk of
/// weight rows in L2 across them).
const M_BLOCK: usize = 64;

fn run(kern: Kernel, w: &[u8], row_bytes: usize, n: usize, acts: &QActs) -> Vec<f32> {
    let m = acts.m;
    let threads = rayon::current_num_threads().max(1);
    let rows = (n / (threads * 4)).clamp(4, 64);
    let arows: Vec<ARow> = (0..m).map(|i| acts.row(i)).collect();
    let mut out = vec![0.0f32; m * n];
    let dst = OutPtr(out.as_mut_ptr());
    w.par_chunks(rows * row_bytes).enumerate().for_each_init(
        || vec![0.0f32; rows * m],
        |t, (c, wc)| {
            // t: [nr, m], this task's weight rows j0..j0 + nr against every activation row.
            let (j0, nr) = (c * rows, wc.len() / row_bytes);
            for i0 in (0..m).step_by(M_BLOCK) {
                let i1 = (i0 + M_BLOCK).min(m);
                for (ti, a) in arows[i0..i1].chunks(TILE).enumerate() {
                    kern(wc, row_bytes, a, &mut t[i0 + ti * TILE..], m);
                }
            }
            for i in 0..m {
                // SAFETY: `out` has m·n elements and outlives the loop; tasks own disjoint column
                // ranges j0..j0 + nr (nr ≤ n − j0), so no two write the same element.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.at(i * n + j0), nr) };
                for (j, o) in row.iter_mut().enumerate() {
                    *o = t[j * m + i];
                }
            }
        },
    );
    out
}

/// The output buffer shared by tasks that each write their own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only for writes to disjoint elements (see `run`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// The kernel for `ty` on `isa`, and the [`Lanes`] order it wants the activations in.
fn kernel(ty: GgmlType, isa: Isa) -> (Kernel, Option<Lanes>) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        return x86::kernel(ty, isa == Isa::Avx512Vnni);
    }
    let _ = isa;
    let k: Kernel = match ty {
        GgmlType::Q4_0 => portable::<{ PQ4_0 }>,
        GgmlType::Q4_1 => portable::<{ PQ4_1 }>,
        GgmlType::Q5_0 => portable::<{ PQ5_0 }>,
        GgmlType::Q5_1 => portable::<{ PQ5_1 }>,
        GgmlType::Q8_0 => portable::<{ PQ8_0 }>,
        GgmlType::Q4_K => portable::<{ PQ4_K }>,
        GgmlType::Q5_K => portable::<{ PQ5_K }>,
        _ => portable::<{ PQ6_K }>,
    };
    (k, None)
}

// ---------------------------------------------------------------------------------------------
// Portable kernels (also the scalar statement of each dot product)
// ---------------------------------------------------------------------------------------------

const PQ4_0: u8 = 0;
const PQ4_1: u8 = 1;
const PQ5_0: u8 = 2;
const PQ5_1: u8 = 3;
const PQ8_0: u8 = 4;
const PQ4_K: u8 = 5;
const PQ5_K: u8 = 6;
const PQ6_K: u8 = 7;

fn portable<const T: u8>(w: &[u8], rb: usize, a: &[ARow], out: &mut [f32], stride: usize) {
    for (j, w) in w.chunks_exact(rb).enumerate() {
        for (a, o) in a.iter().zip(&mut out[j * stride..]) {
            *o = match T {
                PQ4_0 => dot_q4_0(w, a),
                PQ4_1 => dot_q4_1(w, a),
                PQ5_0 => dot_q5_0(w, a),
                PQ5_1 => dot_q5_1(w, a),
                PQ8_0 => dot_q8_0(w, a),
                PQ4_K => dot_q4_k(w, a),
                PQ5_K => dot_q5_k(w, a),
                _ => dot_q6_k(w, a),
            };
        }
    }
}

/// Σ q_e y_e over a block of 32 whose weight quants `q` are already unpacked.
#[inline]
fn isum32(q: &[i8; 32], y: &[i8]) -> i32 {
    let y: &[i8; 32] = y.try_into().expect("32-element activation block");
    let mut s = 0i32;
    for e in 0..32 {
        s += q[e] as i32 * y[e] as i32;
    }
    s
}

/// The 4-bit quants of a 16-byte nibble array, low nibbles first (elements 0..16, then 16..32),
/// plus `bias` each.
#[inline]
fn nibbles(qs: &[u8], qh: u32, fifth: bool, bias: i8) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        let (mut lo, mut hi) = (qs[j] & 0x0f, qs[j] >> 4);
        if fifth {
            lo |= (((qh >> j) & 1) as u8) << 4;
            hi |= (((qh >> (j + 16)) & 1) as u8) << 4;
        }
        q[j] = lo as i8 + bias;
        q[j + 16] = hi as i8 + bias;
    }
    q
}

/// Q4_0 (18 bytes: `d` f16, 16 bytes of nibbles; `w = d · (q − 8)`) · Q8_0:
/// `Σ_b (d_w d_x) Σ (q − 8) q_x`.
fn dot_q4_0(w: &[u8], a: &ARow) -> f32 {
    let mut acc = 0.0f32;
    for (b, (blk, y)) in w.chunks_exact(18).zip(a.qs.chunks_exact(32)).enumerate() {
        let q = nibbles(&blk[2..18], 0, false, -8);
        acc += (f16_at(blk, 0) * a.d[b]) * isum32(&q, y) as f32;
    }
    acc
}

/// Q4_1 (20 bytes: `d`, `m` f16, 16 bytes of nibbles; `w = d · q + m`) · Q8_1:
/// `Σ_b (d_w d_x) Σ q q_x + m_w s_x`.
fn dot_q4_1(w: &[u8], a: &ARow) -> f32 {
    let mut acc = 0.0f32;
    for (b, (blk, y)) in w.chunks_exact(20).zip(a.qs.chunks_exact(32)).enumerate() {
        let q = nibbles(&blk[4..20], 0, false, 0);
        acc += (f16_at(blk, 0) * a.d[b]) * isum32(&q, y) as f32 + f16_at(blk, 2) * a.s[b];
    }
    acc
}

/// Q5_0 (22 bytes: `d` f16, `qh` u32 of fifth bits, 16 bytes of nibbles; `w = d · (q − 16)`) ·
/// Q8_0: `Σ_b (d_w d_x) Σ (q − 16) q_x`.
fn dot_q5_0(w: &[u8], a: &ARow) -> f32 {
    let mut acc = 0.0f32;
    for (b, (blk, y)) in w.chunks_exact(22).zip(a.qs.chunks_exact(32)).enumerate() {
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let q = nibbles(&blk[6..22], qh, true, -16);
        acc += (f16_at(blk, 0) * a.d[b]) * isum32(&q, y) as f32;
    }
    acc
}

/// Q5_1 (24 bytes: `d`, `m` f16, `qh` u32, 16 bytes of nibbles; `w = d · q + m`) · Q8_1:
/// `Σ_b (d_w d_x) Σ q q_x + m_w s_x`.
fn dot_q5_1(w: &[u8], a: &ARow) -> f32 {
    let mut acc = 0.0f32;
    for (b, (blk, y)) in w.chunks_exact(24).zip(a.qs.chunks_exact(32)).enumerate() {
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let q = nibbles(&blk[8..24], qh, true, 0);
        acc += (f16_at(blk, 0) * a.d[b]) * isum32(&q, y) as f32 + f16_at(blk, 2) * a.s[b];
    }
    acc
}

/// Q8_0 (34 bytes: `d` f16, 32 × i8; `w = d · q`) · Q8_0: `Σ_b (d_w d_x) Σ q q_x`.
fn dot_q8_0(w: &[u8], a: &ARow) -> f32 {
    let mut acc = 0.0f32;
    for (b, (blk, y)) in w.chunks_exact(34).zip(a.qs.chunks_exact(32)).enumerate() {
        let mut q = [0i8; 32];
        for (q, &v) in q.iter_mut().zip(&blk[2..34]) {
            *q = v as i8;
        }
        acc += (f16_at(blk, 0) * a.d[b]) * isum32(&q, y) as f32;
    }
    acc
}

/// Q4_K (144 bytes: `d`, `dmin` f16, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of
/// nibbles; sub-block `j` of 32 takes the low (`j` even) or high nibbles of `qs[32·(j/2)..]`;
/// `w = d·sc_j · q − dmin·m_j`) · Q8_K:
/// `Σ_b d_w d_x Σ_j sc_j Σ q q_x − dmin_w d_x Σ_j m_j (bsum_2j + bsum_2j+1)`.
fn dot_q4_k(w: &[u8], a: &ARow) -> f32 {
    dot_q45_k(w, a, false)
}

/// Q5_K (176 bytes: as Q4_K plus 32 bytes `qh` after the scales whose bit `j` of byte `e` is the
/// fifth bit of element `e` of sub-block `j`) · Q8_K, as Q4_K.
fn dot_q5_k(w: &[u8], a: &ARow) -> f32 {
    dot_q45_k(w, a, true)
}

fn dot_q45_k(w: &[u8], a: &ARow, five: bool) -> f32 {
    let ts = if five { 176 } else { 144 };
    let mut acc = 0.0f32;
    for (b, (blk, y)) in w.chunks_exact(ts).zip(a.qs.chunks_exact(256)).enumerate() {
        let scales = &blk[4..16];
        let (qh, qs) = if five {
            (&blk[16..48], &blk[48..176])
        } else {
            (&blk[0..0], &blk[16..144])
        };
        let bs = &a.bsums[16 * b..16 * b + 16];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, mn) = scale_min_k4(j, scales);
            let shift = 4 * (j % 2);
            let src = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let mut q = [0i8; 32];
            for e in 0..32 {
                let mut v = (src[e] >> shift) & 0x0f;
                if five {
                    v |= ((qh[e] >> j) & 1) << 4;
                }
                q[e] = v as i8;
            }
            sumi += sc as i32 * isum32(&q, &y[32 * j..32 * j + 32]);
            summ += mn as i32 * (bs[2 * j] as i32 + bs[2 * j + 1] as i32);
        }
        let dy = a.d[b];
        acc += (f16_at(blk, 0) * dy) * sumi as f32 - (f16_at(blk, 2) * dy) * summ as f32;
    }
    acc
}

/// Q6_K (210 bytes: `ql` 128 bytes of low nibbles, `qh` 64 bytes of high bit pairs, 16 × i8
/// scales, `d` f16; element `f = 128h + r` has low bits `ql[64h + r%64] >> 4·(r/64)`, high bits
/// `qh[32h + r%32] >> 2·(r/32)`, `w = d·sc_(f/16) · (q − 32)`) · Q8_K:
/// `Σ_b d_w d_x Σ_g sc_g (Σ q q_x − 32 · bsum_g)`.
fn dot_q6_k(w: &[u8], a: &ARow) -> f32 {
    let mut acc = 0.0f32;
    for (b, (blk, y)) in w.chunks_exact(210).zip(a.qs.chunks_exact(256)).enumerate() {
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let bs = &a.bsums[16 * b..16 * b + 16];
        let mut sumi = 0i32;
        for h in 0..2 {
            for c in 0..4 {
                // Elements 128h + 32c .. + 32: groups 8h + 2c and 8h + 2c + 1.
                let mut q = [0i8; 32];
                for (e, q) in q.iter_mut().enumerate() {
                    let r = 32 * c + e;
                    let lo = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
                    let hi = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
                    *q = (lo | (hi << 4)) as i8;
                }
                let f0 = 128 * h + 32 * c;
                let yc = &y[f0..f0 + 32];
                for g in 0..2 {
                    let grp = 8 * h + 2 * c + g;
                    let mut s = 0i32;
                    for e in 16 * g..16 * g + 16 {
                        s += q[e] as i32 * yc[e] as i32;
                    }
                    sumi += (sc[grp] as i8) as i32 * (s - 32 * bs[grp] as i32);
                }
            }
        }
        acc += (f16_at(blk, 208) * a.d[b]) * sumi as f32;
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// x86-64 kernels
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 (+ AVX-512 VNNI) kernels. Every function here runs only inside a
    //! `#[target_feature]` entry point chosen after [`Isa::available`](super::Isa) said yes.
    //! The entry points check that each activation row holds `k` quants for the `k` of the
    //! weight row before any unchecked load.

    use super::{ARow, Kernel, Lanes};
    use crate::model::gguf::GgmlType;
    use std::arch::x86_64::*;

    /// `Σ` of `u8 × i8` products in fours into eight `i32` lanes through `vpmaddubsw` +
    /// `vpmaddwd`. Pairs must not saturate i16: every caller keeps `2 · |u| · |s| ≤ 32 512`.
    #[inline(always)]
    unsafe fn maddubs(u: __m256i, s: __m256i) -> __m256i {
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }

    #[inline(always)]
    unsafe fn load32(p: *const u8) -> __m256i {
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    #[inline(always)]
    unsafe fn fp16(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([b[i], b[i + 1]]);
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles in bytes 0..16, high nibbles in 16..32.
    #[inline(always)]
    unsafe fn nibbles(p: &[u8]) -> __m256i {
        assert!(p.len() >= 16);
        unsafe {
            let x = _mm_loadu_si128(p.as_ptr() as *const __m128i);
            let m4 = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(x, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(x, 4), m4);
            _mm256_set_m128i(hi, lo)
        }
    }

    /// Byte `e` is `0x10` where bit `e` of `qh` is set, else 0.
    #[inline(always)]
    unsafe fn fifth_bits(qh: u32) -> __m256i {
        unsafe {
            let v = _mm256_set1_epi32(qh as i32);
            let pick = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            );
            let v = _mm256_shuffle_epi8(v, pick);
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        }
    }

    /// A 32-element block type: its bytes, whether its quants are signed, whether it has a min.
    pub(super) trait Block32 {
        const TS: usize;
        const SIGNED: bool;
        const MIN: bool;
        /// `(quants, d, m)`: the 32 quants (signed ones already offset), the scale, the min.
        ///
        /// # Safety
        /// AVX2 + F16C enabled, `b.len() == TS`.
        unsafe fn unpack(b: &[u8]) -> (__m256i, f32, f32);
    }

    pub(super) struct B4_0;
    impl Block32 for B4_0 {
        const TS: usize = 18;
        const SIGNED: bool = true;
        const MIN: bool = false;
        #[inline(always)]
        unsafe fn unpack(b: &[u8]) -> (__m256i, f32, f32) {
            unsafe {
                let q = _mm256_sub_epi8(nibbles(&b[2..18]), _mm256_set1_epi8(8));
                (q, fp16(b, 0), 0.0)
            }
        }
    }

    pub(super) struct B4_1;
    impl Block32 for B4_1 {
        const TS: usize = 20;
        const SIGNED: bool = false;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn unpack(b: &[u8]) -> (__m256i, f32, f32) {
            unsafe { (nibbles(&b[4..20]), fp16(b, 0), fp16(b, 2)) }
        }
    }

    pub(super) struct B5_0;
    impl Block32 for B5_0 {
        const TS: usize = 22;
        const SIGNED: bool = true;
        const MIN: bool = false;
        #[inline(always)]
        unsafe fn unpack(b: &[u8]) -> (__m256i, f32, f32) {
            unsafe {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let q = _mm256_or_si256(nibbles(&b[6..22]), fifth_bits(qh));
                (_mm256_sub_epi8(q, _mm256_set1_epi8(16)), fp16(b, 0), 0.0)
            }
        }
    }

    pub(super) struct B5_1;
    impl Block32 for B5_1 {
        const TS: usize = 24;
        const SIGNED: bool = false;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn unpack(b: &[u8]) -> (__m256i, f32, f32) {
            unsafe {
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let q = _mm256_or_si256(nibbles(&b[8..24]), fifth_bits(qh));
                (q, fp16(b, 0), fp16(b, 2))
            }
        }
    }

    pub(super) struct B8_0;
    impl Block32 for B8_0 {
        const TS: usize = 34;
        const SIGNED: bool = true;
        const MIN: bool = false;
        #[inline(always)]
        unsafe fn unpack(b: &[u8]) -> (__m256i, f32, f32) {
            let b = &b[..34];
            unsafe { (load32(b[2..].as_ptr()), fp16(b, 0), 0.0) }
        }
    }

    /// Checks every row holds `nb · qb` quants and `nb` scales (and, per `need`, the Q8_1 sums
    /// or Q8_K bsums), so the unchecked loads below stay in bounds.
    #[inline(always)]
    fn check(a: &[ARow], nb: usize, qb: usize, s: bool, bsums: bool) {
        for r in a {
            assert!(r.qs.len() >= nb * qb && r.d.len() >= nb);
            assert!(!s || r.s.len() >= nb);
            assert!(!bsums || r.bsums.len() >= nb * qb / 16);
        }
    }

    /// One weight row of 32-element blocks against `R` activation rows (AVX2).
    #[inline(always)]
    unsafe fn body32<B: Block32, const R: usize>(w: &[u8], a: &[ARow], out: &mut [f32]) {
        let nb = w.len() / B::TS;
        let a = &a[..R];
        check(a, nb, 32, B::MIN, false);
        unsafe {
            // Two accumulators per row (even and odd blocks) halve the FMA dependency chain.
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut summ = [[0.0f32; 2]; R];
            // A macro, not a closure: a closure would not inherit the entry point's features.
            macro_rules! step {
                ($b:expr, $slot:expr) => {{
                    let (b, slot): (usize, usize) = ($b, $slot);
                    let (q, dw, mw) = B::unpack(&w[b * B::TS..(b + 1) * B::TS]);
                    let qa = if B::SIGNED { _mm256_sign_epi8(q, q) } else { q };
                    for r in 0..R {
                        let ar = &a[r];
                        let y = load32(ar.qs.as_ptr().add(32 * b) as *const u8);
                        let y = if B::SIGNED { _mm256_sign_epi8(y, q) } else { y };
                        let p = _mm256_cvtepi32_ps(maddubs(qa, y));
                        let dd = _mm256_set1_ps(dw * *ar.d.get_unchecked(b));
                        acc[r][slot] = _mm256_fmadd_ps(dd, p, acc[r][slot]);
                        if B::MIN {
                            summ[r][slot] += mw * *ar.s.get_unchecked(b);
                        }
                    }
                }};
            }
            let mut b = 0;
            while b + 1 < nb {
                step!(b, 0);
                step!(b + 1, 1);
                b += 2;
            }
            if b < nb {
                step!(b, 0);
            }
            for r in 0..R {
                let [a0, a1] = acc[r];
                out[r] = hsum(_mm256_add_ps(a0, a1)) + (summ[r][0] + summ[r][1]);
            }
        }
    }

    /// Q4_K/Q5_K: one weight row against `R` activation rows.
    #[inline(always)]
    unsafe fn body_q45k<const FIVE: bool, const R: usize>(w: &[u8], a: &[ARow], out: &mut [f32]) {
        let ts = if FIVE { 176 } else { 144 };
        let nb = w.len() / ts;
        let a = &a[..R];
        check(a, nb, 256, false, true);
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let blk = &w[b * ts..(b + 1) * ts];
                let (d, dmin) = (fp16(blk, 0), fp16(blk, 2));
                let mut sc = [0i16; 8];
                let mut mins = [0i16; 16];
                for j in 0..8 {
                    let (s, m) = super::scale_min_k4(j, &blk[4..16]);
                    sc[j] = s as i16;
                    mins[2 * j] = m as i16;
                    mins[2 * j + 1] = m as i16;
                }
                let qs = if FIVE { &blk[48..176] } else { &blk[16..144] };
                let hbits = if FIVE {
                    load32(blk[16..48].as_ptr())
                } else {
                    _mm256_setzero_si256()
                };
                let mut isum = [_mm256_setzero_si256(); R];
                for t in 0..4 {
                    let raw = load32(qs[32 * t..].as_ptr());
                    let mut lo = _mm256_and_si256(raw, m4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    if FIVE {
                        let b0 = _mm256_set1_epi8((1u8 << (2 * t)) as i8);
                        let b1 = _mm256_set1_epi8((1u8 << (2 * t + 1)) as i8);
                        let x10 = _mm256_set1_epi8(0x10);
                        let h0 = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, b0), b0);
                        let h1 = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, b1), b1);
                        lo = _mm256_or_si256(lo, _mm256_and_si256(h0, x10));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(h1, x10));
                    }
                    let s0 = _mm256_set1_epi16(sc[2 * t]);
                    let s1 = _mm256_set1_epi16(sc[2 * t + 1]);
                    for r in 0..R {
                        let y = a[r].qs.as_ptr().add(256 * b + 64 * t) as *const u8;
                        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load32(y)), s0);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load32(y.add(32))), s1);
                        isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(p0, p1));
                    }
                }
                let mins = _mm256_loadu_si256(mins.as_ptr() as *const __m256i);
                for r in 0..R {
                    let bs = load32(a[r].bsums.as_ptr().add(16 * b) as *const u8);
                    let mm = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mins));
                    let dy = *a[r].d.get_unchecked(b);
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * dy),
                        _mm256_cvtepi32_ps(isum[r]),
                        acc[r],
                    );
                    acc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dy), mm, acc[r]);
                }
            }
            for r in 0..R {
                out[r] = hsum(acc[r]);
            }
        }
    }

    /// Q6_K: one weight row against `R` activation rows.
    #[inline(always)]
    unsafe fn body_q6k<const R: usize>(w: &[u8], a: &[ARow], out: &mut [f32]) {
        let nb = w.len() / 210;
        let a = &a[..R];
        check(a, nb, 256, false, true);
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let m30 = _mm256_set1_epi8(0x30);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let blk = &w[b * 210..(b + 1) * 210];
                let d = fp16(blk, 208);
                let sc = &blk[192..208];
                let mut isum = [_mm256_setzero_si256(); R];
                for h in 0..2 {
                    let qa = load32(blk[64 * h..].as_ptr());
                    let qb = load32(blk[64 * h + 32..].as_ptr());
                    let qh = load32(blk[128 + 32 * h..].as_ptr());
                    let q = [
                        _mm256_or_si256(
                            _mm256_and_si256(qa, m4),
                            _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(qb, m4),
                            _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(qa, 4), m4),
                            _mm256_and_si256(qh, m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                        ),
                    ];
                    for (c, &qc) in q.iter().enumerate() {
                        let g = 8 * h + 2 * c;
                        let scv = _mm256_set_m128i(
                            _mm_set1_epi16((sc[g + 1] as i8) as i16),
                            _mm_set1_epi16((sc[g] as i8) as i16),
                        );
                        for r in 0..R {
                            let y = a[r].qs.as_ptr().add(256 * b + 128 * h + 32 * c) as *const u8;
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qc, load32(y)), scv);
                            isum[r] = _mm256_add_epi32(isum[r], p);
                        }
                    }
                }
                // − 32 · Σ_g sc_g · bsum_g
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr() as *const __m128i));
                for r in 0..R {
                    let bs = load32(a[r].bsums.as_ptr().add(16 * b) as *const u8);
                    let corr = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
                    let s = _mm256_sub_epi32(isum[r], corr);
                    let dd = _mm256_set1_ps(d * *a[r].d.get_unchecked(b));
                    acc[r] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s), acc[r]);
                }
            }
            for r in 0..R {
                out[r] = hsum(acc[r]);
            }
        }
    }

    /// A 32-element block type as the 512-bit kernels read it ([`Lanes`]): a group of
    /// `LANES.blocks` blocks (`GB = blocks · TS` bytes, 64 < GB ≤ 128) arrives in two 64-byte
    /// loads, at the group's start and at its end − 64, and `vpermt2w` picks its quant bytes,
    /// scales and mins out of them by 16-bit words (every field of these blocks is 2-aligned).
    pub(super) trait Group {
        /// Block bytes.
        const TS: usize;
        /// Byte offset of the quants in a block (16 nibble bytes, or 32 × i8).
        const QS: usize;
        /// Byte offset of the fifth-bit word `qh` (5-bit types).
        const QH: Option<usize>;
        /// Whether the block has a min `m` (f16 at byte 2, `w = d · q + m`).
        const MIN: bool;
        const LANES: Lanes;
    }

    /// Word `p / 2` of a group as `vpermt2w` indexes the two loads (`p` < 64: the first).
    const fn word(p: usize, gb: usize) -> i16 {
        if p + 2 <= 64 {
            (p / 2) as i16
        } else {
            (32 + (p - (gb - 64)) / 2) as i16
        }
    }

    /// Word indices of the quants: with halves, 16 bytes per block (eight words each), else 32.
    const fn quant_words(ts: usize, qs: usize, l: Lanes) -> [i16; 32] {
        let (mut v, mut w, per) = ([0i16; 32], 0, 32 / l.blocks);
        while w < 32 {
            v[w] = word(ts * (w / per) + qs + 2 * (w % per), l.blocks * ts);
            w += 1;
        }
        v
    }

    /// Word indices of the scales: lane `l` (words 0..16) takes its block's `d`, word `16 + l`
    /// its `m` (or `d` again without mins).
    const fn scale_words(ts: usize, min: bool, l: Lanes) -> [i16; 32] {
        let (mut v, mut w, per) = ([0i16; 32], 0, 16 / l.blocks);
        while w < 32 {
            let off = if w >= 16 && min { 2 } else { 0 };
            v[w] = word(ts * ((w % 16) / per) + off, l.blocks * ts);
            w += 1;
        }
        v
    }

    /// Word indices of the fifth bits: words 0..4 the low halves of blocks 0..4's `qh`, words
    /// 4..8 the high halves, so the low and high 64 bits are the byte masks of the two halves.
    const fn qh_words(ts: usize, qh: usize, l: Lanes) -> [i16; 32] {
        let (mut v, mut w) = ([0i16; 32], 0);
        while w < 8 {
            v[w] = word(ts * (w % 4) + qh + 2 * (w / 4), l.blocks * ts);
            w += 1;
        }
        v
    }

    macro_rules! group {
        ($name:ident, $ts:expr, $qs:expr, $qh:expr, $min:expr, $blocks:expr, $halves:expr, $off:expr) => {
            pub(super) struct $name;
            impl Group for $name {
                const TS: usize = $ts;
                const QS: usize = $qs;
                const QH: Option<usize> = $qh;
                const MIN: bool = $min;
                const LANES: Lanes = Lanes {
                    blocks: $blocks,
                    halves: $halves,
                    offset: $off,
                };
            }
        };
    }
    // Q4_0: d, 16 B nibbles; u = q (0..16), offset 8. Q4_1: d, m, nibbles. Q5_0: d, qh,
    // nibbles; offset 16. Q5_1: d, m, qh, nibbles. Q8_0: d, 32 × i8; u = q ^ 0x80 = q + 128.
    group!(G4_0, 18, 2, None, false, 4, true, 8);
    group!(G4_1, 20, 4, None, true, 4, true, 0);
    group!(G5_0, 22, 6, Some(2), false, 4, true, 16);
    group!(G5_1, 24, 8, Some(4), true, 4, true, 0);
    group!(G8_0, 34, 2, None, false, 2, false, 128);

    #[inline(always)]
    unsafe fn words(v: [i16; 32]) -> __m512i {
        unsafe { _mm512_loadu_si512(v.as_ptr() as *const __m512i) }
    }

    /// One weight row of a 32-element type against `R` activation rows packed as `G::LANES`
    /// (AVX-512 F/BW/VNNI): per group, `isum = corr + Σ_v vpdpbusd(u_v, y_v)` (exact i32 lanes),
    /// `acc += (d_w · d_x) · isum (+ m_w · s_x)` in f32 lanes, summed across lanes at the end.
    #[inline(always)]
    unsafe fn body512<G: Group, const R: usize>(w: &[u8], a: &[ARow], out: &mut [f32]) {
        let l = G::LANES;
        let (nb, gb, nv) = (w.len() / G::TS, l.blocks * G::TS, l.blocks / 2);
        let (full, groups) = (nb / l.blocks, nb.div_ceil(l.blocks));
        let a = &a[..R];
        for r in a {
            assert!(r.lq.len() >= groups * 64 * nv && r.ld.len() >= groups * 16);
            assert!(!G::MIN || r.ls.len() >= groups * 16);
            assert!(l.offset == 0 || r.lc.len() >= groups * 16);
        }
        unsafe {
            let iq = words(quant_words(G::TS, G::QS, l));
            let isc = words(scale_words(G::TS, G::MIN, l));
            let ih = words(qh_words(G::TS, G::QH.unwrap_or(0), l));
            let m4 = _mm512_set1_epi8(0x0f);
            // Two accumulators per row, alternating groups, halve the FMA dependency chain.
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            // A macro, not a closure: a closure would not inherit the entry point's features.
            macro_rules! step {
                ($g:expr, $l0:expr, $l1:expr, $slot:expr) => {{
                    let (g, l0, l1, slot): (usize, __m512i, __m512i, usize) = ($g, $l0, $l1, $slot);
                    let q = _mm512_permutex2var_epi16(l0, iq, l1);
                    let u = if l.halves {
                        let mut lo = _mm512_and_si512(q, m4);
                        let mut hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
                        if G::QH.is_some() {
                            let h = _mm512_castsi512_si128(_mm512_permutex2var_epi16(l0, ih, l1));
                            let x10 = _mm512_set1_epi8(0x10);
                            lo = _mm512_mask_add_epi8(lo, _mm_cvtsi128_si64(h) as u64, lo, x10);
                            hi = _mm512_mask_add_epi8(hi, _mm_extract_epi64(h, 1) as u64, hi, x10);
                        }
                        [lo, hi]
                    } else {
                        [_mm512_xor_si512(q, _mm512_set1_epi8(-128)), q]
                    };
                    let sc = _mm512_permutex2var_epi16(l0, isc, l1);
                    let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(sc));
                    let mw = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(sc, 1));
                    for r in 0..R {
                        let ar = &a[r];
                        let y = ar.lq.as_ptr().add(g * 64 * nv) as *const __m512i;
                        let mut s = if l.offset != 0 {
                            _mm512_loadu_si512(ar.lc.as_ptr().add(16 * g) as *const __m512i)
                        } else {
                            _mm512_setzero_si512()
                        };
                        s = _mm512_dpbusd_epi32(s, u[0], _mm512_loadu_si512(y));
                        if nv == 2 {
                            s = _mm512_dpbusd_epi32(s, u[1], _mm512_loadu_si512(y.add(1)));
                        }
                        let dd = _mm512_mul_ps(dw, _mm512_loadu_ps(ar.ld.as_ptr().add(16 * g)));
                        acc[r][slot] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), acc[r][slot]);
                        if G::MIN {
                            let sx = _mm512_loadu_ps(ar.ls.as_ptr().add(16 * g));
                            acc[r][1 - slot] = _mm512_fmadd_ps(mw, sx, acc[r][1 - slot]);
                        }
                    }
                }};
            }
            // Whole groups: `w` holds `full · gb` bytes from `p` on.
            let p = w.as_ptr();
            macro_rules! whole {
                ($g:expr, $slot:expr) => {{
                    let at = p.add($g * gb);
                    let l0 = _mm512_loadu_si512(at as *const __m512i);
                    let l1 = _mm512_loadu_si512(at.add(gb - 64) as *const __m512i);
                    step!($g, l0, l1, $slot);
                }};
            }
            let mut g = 0;
            while g + 1 < full {
                whole!(g, 0);
                whole!(g + 1, 1);
                g += 2;
            }
            if g < full {
                whole!(g, 0);
            }
            if full < groups {
                // The last, partial group: masked loads of its `t < gb` bytes (zeros beyond,
                // which meet the activations' zero padding).
                let t = (nb - full * l.blocks) * G::TS;
                let at = p.add(full * gb);
                let first = |n: usize| if n >= 64 { !0u64 } else { (1u64 << n) - 1 };
                let l0 = _mm512_maskz_loadu_epi8(first(t), at as *const i8);
                let k1 = first(t.saturating_sub(gb - 64));
                let l1 = _mm512_maskz_loadu_epi8(k1, at.wrapping_add(gb - 64) as *const i8);
                step!(full, l0, l1, 0);
            }
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
            }
        }
    }

    /// Entry points: a `#[target_feature]` function per (body, tier) running the body over every
    /// weight row for the tile height of `a`, and a safe wrapper (sound because [`kernel`] hands
    /// it out only after detection). `[..]` holds the body's generic arguments before the tile
    /// height.
    macro_rules! entry {
        ($safe:ident, $tf:ident, $feat:literal, $body:ident [$($g:tt)*]) => {
            #[target_feature(enable = $feat)]
            unsafe fn $tf(w: &[u8], rb: usize, a: &[ARow], out: &mut [f32], stride: usize) {
                macro_rules! rows {
                    ($r:literal) => {
                        for (j, wr) in w.chunks_exact(rb).enumerate() {
                            unsafe { $body::<$($g)* $r>(wr, a, &mut out[j * stride..]) }
                        }
                    };
                }
                match a.len() {
                    4 => rows!(4),
                    3 => rows!(3),
                    2 => rows!(2),
                    1 => rows!(1),
                    _ => {}
                }
            }
            fn $safe(w: &[u8], rb: usize, a: &[ARow], out: &mut [f32], stride: usize) {
                // SAFETY: only reachable through `kernel`, after `Isa::available` confirmed
                // every feature `$feat` names.
                unsafe { $tf(w, rb, a, out, stride) }
            }
        };
    }

    entry!(q4_0_avx2, q4_0_avx2_tf, "avx2,fma,f16c", body32[B4_0,]);
    entry!(q4_1_avx2, q4_1_avx2_tf, "avx2,fma,f16c", body32[B4_1,]);
    entry!(q5_0_avx2, q5_0_avx2_tf, "avx2,fma,f16c", body32[B5_0,]);
    entry!(q5_1_avx2, q5_1_avx2_tf, "avx2,fma,f16c", body32[B5_1,]);
    entry!(q8_0_avx2, q8_0_avx2_tf, "avx2,fma,f16c", body32[B8_0,]);
    entry!(q4_k_avx2, q4_k_avx2_tf, "avx2,fma,f16c", body_q45k[false,]);
    entry!(q4_k_vnni, q4_k_vnni_tf, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", body_q45k[false,]);
    entry!(q5_k_avx2, q5_k_avx2_tf, "avx2,fma,f16c", body_q45k[true,]);
    entry!(q5_k_vnni, q5_k_vnni_tf, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", body_q45k[true,]);
    entry!(q6_k_avx2, q6_k_avx2_tf, "avx2,fma,f16c", body_q6k[]);
    entry!(q6_k_vnni, q6_k_vnni_tf, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", body_q6k[]);
    entry!(q4_0_z, q4_0_z_tf, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", body512[G4_0,]);
    entry!(q4_1_z, q4_1_z_tf, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", body512[G4_1,]);
    entry!(q5_0_z, q5_0_z_tf, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", body512[G5_0,]);
    entry!(q5_1_z, q5_1_z_tf, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", body512[G5_1,]);
    entry!(q8_0_z, q8_0_z_tf, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", body512[G8_0,]);

    /// The kernel of `ty` on the AVX2 tier, or the AVX-512 one when `avx512`, with the
    /// activation order it reads.
    pub(super) fn kernel(ty: GgmlType, avx512: bool) -> (Kernel, Option<Lanes>) {
        let z = |k: Kernel, l: Lanes| (k, Some(l));
        match (ty, avx512) {
            (GgmlType::Q4_0, false) => (q4_0_avx2, None),
            (GgmlType::Q4_1, false) => (q4_1_avx2, None),
            (GgmlType::Q5_0, false) => (q5_0_avx2, None),
            (GgmlType::Q5_1, false) => (q5_1_avx2, None),
            (GgmlType::Q8_0, false) => (q8_0_avx2, None),
            (GgmlType::Q4_K, false) => (q4_k_avx2, None),
            (GgmlType::Q5_K, false) => (q5_k_avx2, None),
            (GgmlType::Q4_0, true) => z(q4_0_z, G4_0::LANES),
            (GgmlType::Q4_1, true) => z(q4_1_z, G4_1::LANES),
            (GgmlType::Q5_0, true) => z(q5_0_z, G5_0::LANES),
            (GgmlType::Q5_1, true) => z(q5_1_z, G5_1::LANES),
            (GgmlType::Q8_0, true) => z(q8_0_z, G8_0::LANES),
            (GgmlType::Q4_K, true) => (q4_k_vnni, None),
            (GgmlType::Q5_K, true) => (q5_k_vnni, None),
            (_, true) => (q6_k_vnni, None),
            _ => (q6_k_avx2, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::dequantize;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use crate::model::quantize::TYPES;

    /// Byte offsets of the f16 fields of a block.
    fn f16_fields(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q6_K => &[208],
            _ => &[0, 2],
        }
    }

    /// `n` rows of `k` random elements: random quant bytes, f16 scales of either sign with
    /// magnitude in [1e-3, 5e-2).
    fn random_weights(ty: GgmlType, n: usize, k: usize, rng: &mut StdRng) -> Vec<u8> {
        let len = n * (k / ty.block_size()) * ty.type_size();
        let mut w: Vec<u8> = (0..len).map(|_| rng.random::<u8>()).collect();
        for blk in w.chunks_exact_mut(ty.type_size()) {
            for &o in f16_fields(ty) {
                let mag = rng.random_range(1e-3f32..5e-2);
                let v = if rng.random::<bool>() { mag } else { -mag };
                blk[o..o + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        w
    }

    /// Activations with a per-block spread of magnitudes; row 1 starts with a zero block.
    fn random_x(m: usize, k: usize, rng: &mut StdRng) -> Vec<f32> {
        let mut x: Vec<f32> = (0..m * k)
            .map(|i| {
                let scale = [0.1f32, 1.0, 7.0][(i / 32) % 3];
                rng.random_range(-1.0f32..1.0) * scale
            })
            .collect();
        if m > 1 {
            x[k..k + 32.min(k)].fill(0.0);
        }
        x
    }

    /// The scalar spec of a quantised product: the dequantised weight (gguf.rs, an independent
    /// decoder) times the dequantised 8-bit activation `x̂ = d · q`, in f64; for the Q8_1 types
    /// the min term takes llama.cpp's `m · s` (so the f16 rounding of `s` is part of the spec).
    /// Returns `(value, Σ |terms|)` per output `[m, n]`.
    fn spec(ty: GgmlType, w: &[u8], n: usize, k: usize, acts: &QActs) -> (Vec<f64>, Vec<f64>) {
        let wf = dequantize(ty, w, n * k).unwrap();
        let (bs, ts) = (ty.block_size(), ty.type_size());
        let mins = partner(ty) == Some(Partner::Q8_1);
        let (mut val, mut abs) = (vec![0.0; acts.m * n], vec![0.0; acts.m * n]);
        for i in 0..acts.m {
            let a = acts.row(i);
            for j in 0..n {
                let (mut v, mut s) = (0.0f64, 0.0f64);
                for e in 0..k {
                    let b = e / acts.qb;
                    let mw = if mins {
                        let blk = &w[(j * k + e) / bs * ts..];
                        f16_at(blk, 2) as f64
                    } else {
                        0.0
                    };
                    let t = (wf[j * k + e] as f64 - mw) * a.d[b] as f64 * a.qs[e] as f64;
                    v += t;
                    s += t.abs();
                    if mins && e % 32 == 0 {
                        v += mw * a.s[b] as f64;
                        s += (mw * a.s[b] as f64).abs();
                    }
                }
                val[i * n + j] = v;
                abs[i * n + j] = s;
            }
        }
        (val, abs)
    }

    fn isas() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.available())
            .collect()
    }

    /// Every tier matches the spec within 1e-6 of Σ|terms| (the integer sums are exact; what
    /// differs is the order of f32 additions and f32 products of the scales); the spec is within
    /// the a-priori 8-bit bound of the f32 product of the dequantised weight and the unquantised
    /// x: Σ_b Σ_e∈b |w_e| · (amax_b / 254 + amax_b · 2⁻¹¹) (half a quantisation step plus the f16
    /// rounding of d), plus |m s| · 2⁻¹⁰ per block for the Q8_1 types, plus 1e-5 Σ|w x|.
    #[test]
    fn matches_spec_and_f32_product() {
        let mut rng = StdRng::seed_from_u64(0x9a11);
        let tiers = isas();
        println!("tiers on this machine: {tiers:?}");
        for ty in TYPES {
            let (mut worst_spec, mut worst_f32) = (0.0f64, 0.0f64);
            for m in [1, 3, 17] {
                for blocks in 1..=3 {
                    let n = 37;
                    let k = blocks * ty.block_size();
                    let w = random_weights(ty, n, k, &mut rng);
                    let x = random_x(m, k, &mut rng);
                    let acts = QActs::quantize(partner(ty).unwrap(), &x, m, k);
                    let (sv, sa) = spec(ty, &w, n, k, &acts);
                    for &isa in &tiers {
                        let got = quant_linear_on(isa, ty, &w, n, k, &x, m).unwrap();
                        for o in 0..m * n {
                            let err = (got[o] as f64 - sv[o]).abs();
                            let tol = 1e-6 * sa[o] + 1e-30;
                            assert!(
                                err <= tol,
                                "{ty} {isa:?} m={m} k={k} out {o}: {} vs spec {} (tol {tol})",
                                got[o],
                                sv[o]
                            );
                            worst_spec = worst_spec.max(err / tol);
                        }
                    }
                    // The spec against the f32 product.
                    let wf = dequantize(ty, &w, n * k).unwrap();
                    let qb = acts.qb;
                    for i in 0..m {
                        let xr = &x[i * k..(i + 1) * k];
                        for j in 0..n {
                            let wr = &wf[j * k..(j + 1) * k];
                            let exact: f64 =
                                wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                            let mut bound: f64 = 1e-5
                                * wr.iter()
                                    .zip(xr)
                                    .map(|(&a, &b)| (a * b).abs() as f64)
                                    .sum::<f64>();
                            for (wb, xb) in wr.chunks(qb).zip(xr.chunks(qb)) {
                                let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                                let wabs: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                                bound += wabs * (amax / 254.0 + amax / 2048.0);
                            }
                            if partner(ty) == Some(Partner::Q8_1) {
                                let a = acts.row(i);
                                for b in 0..k / 32 {
                                    let blk = &w[(j * k / 32 + b) * ty.type_size()..];
                                    bound += (f16_at(blk, 2) * a.s[b]).abs() as f64 / 1024.0;
                                }
                            }
                            let err = (sv[i * n + j] - exact).abs();
                            assert!(
                                err <= bound,
                                "{ty} m={m} k={k} ({i},{j}): spec {} vs f32 {exact} (bound {bound})",
                                sv[i * n + j]
                            );
                            worst_f32 = worst_f32.max(err / bound);
                        }
                    }
                }
            }
            println!(
                "{ty}: worst |tier − spec| / tol = {worst_spec:.3}, worst |spec − f32| / 8-bit bound = {worst_f32:.3}"
            );
        }
    }

    /// The SIMD tiers and the portable path agree to 2e-6 of the output's scale, on shapes with
    /// many blocks (long f32 accumulations) and every tile remainder.
    #[test]
    fn simd_matches_portable() {
        let mut rng = StdRng::seed_from_u64(7);
        for ty in TYPES {
            let (n, k, m) = (45, 6 * 256, 7);
            let w = random_weights(ty, n, k, &mut rng);
            let x = random_x(m, k, &mut rng);
            let base = quant_linear_on(Isa::Portable, ty, &w, n, k, &x, m).unwrap();
            let scale = base.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for isa in isas() {
                let got = quant_linear_on(isa, ty, &w, n, k, &x, m).unwrap();
                let worst = got
                    .iter()
                    .zip(&base)
                    .fold(0.0f32, |a, (g, b)| a.max((g - b).abs()));
                assert!(
                    worst <= 2e-6 * scale,
                    "{ty} {isa:?}: max diff {worst} (scale {scale})"
                );
            }
            // m = 1 goes through the same kernels without a transpose.
            let one = quant_linear(ty, &w, n, k, &x[..k], 1).unwrap();
            for (a, b) in one.iter().zip(&base[..n]) {
                assert!((a - b).abs() <= 2e-6 * scale, "{ty} m=1: {a} vs {b}");
            }
        }
    }

    /// The branch-free roundings equal `f32::round` / `round_ties_even` on ties, near-ties and
    /// a sweep of the quantisers' range.
    #[test]
    fn roundings_match_std() {
        let mut vals = vec![0.0f32, -0.0, 0.49999997, -0.49999997, 127.0, -127.0, 1e-30];
        for i in -300..=300 {
            let h = i as f32 * 0.5;
            vals.extend([h, h.next_up(), h.next_down()]);
        }
        vals.extend((0..10_000).map(|i| (i as f32 * 0.7919).sin() * 127.4));
        for v in vals {
            assert_eq!(round_away(v), v.round() as i32, "round_away({v:e})");
            assert_eq!(
                nearest_int(v),
                v.round_ties_even() as i32,
                "nearest_int({v:e})"
            );
        }
    }

    /// The activation quantisers follow ggml's reference formulas.
    #[test]
    fn activation_quantisers() {
        let x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) * 0.37).collect();
        let a = QActs::quantize(Partner::Q8_1, &x, 1, 256);
        // The portable statement (inlined here, compiled without AVX2) gives the same bits.
        let (mut qs, mut d, mut s) = ([0i8; 256], [0.0f32; 8], [0.0f32; 8]);
        q8_01_row(&x, &mut qs, &mut d, Some(&mut s));
        assert_eq!((&qs[..], &d[..], &s[..]), (&a.qs[..], &a.d[..], &a.s[..]));
        let amax = x[..32].iter().fold(0.0f32, |a, v| a.max(v.abs()));
        assert_eq!(a.d[0], f16::from_f32(amax / 127.0).to_f32());
        assert_eq!(a.qs[0], -127);
        let sum: i32 = a.qs[..32].iter().map(|&q| q as i32).sum();
        assert_eq!(a.s[0], f16::from_f32(sum as f32 * (amax / 127.0)).to_f32());
        let a = QActs::quantize(Partner::Q8K, &x, 1, 256);
        // max is the last element (positive): iscale = −127 / max, so it maps to −127.
        assert_eq!(a.qs[255], -127);
        assert_eq!(a.d[0], 1.0 / (-127.0 / x[255]));
        assert_eq!(
            a.bsums[0],
            a.qs[..16].iter().map(|&q| q as i16).sum::<i16>()
        );
        let z = QActs::quantize(Partner::Q8K, &[0.0; 256], 1, 256);
        assert_eq!((z.d[0], z.bsums[3]), (0.0, 0));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let ty = GgmlType::Q4_0;
        let w = vec![0u8; 3 * 18];
        let x = vec![0.0f32; 32];
        assert!(supports(ty) && !supports(GgmlType::F32) && !supports(GgmlType::Q8_1));
        let e = quant_linear(ty, &w, 3, 33, &x, 1).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("multiple of 32"));
        let e = quant_linear(ty, &w[..50], 3, 32, &x, 1).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        let e = quant_linear(ty, &w, 3, 32, &x[..31], 1).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        let e = quant_linear(ty, &w, 3, 32, &x, 2).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        let e = quant_linear(ty, &w, usize::MAX, 32, &x, 1).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        let e = quant_linear(GgmlType::F32, &w, 3, 32, &x, 1).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        let e = quant_linear(GgmlType::Q6_K, &w, 3, 32, &x, 1).unwrap_err();
        assert!(e.to_string().contains("multiple of 256"), "{e}");
        assert_eq!(
            quant_linear(ty, &w, 3, 32, &[], 0).unwrap(),
            Vec::<f32>::new()
        );
        assert_eq!(
            quant_linear(ty, &[], 0, 32, &x, 1).unwrap(),
            Vec::<f32>::new()
        );
        assert_eq!(quant_linear(ty, &[], 3, 0, &[], 2).unwrap(), vec![0.0; 6]);
    }
}

#[cfg(test)]
mod micro {
    use super::*;
    use std::time::Instant;

    /// Single-thread GB/s of the best tier's m = 1 kernel streaming 128 MB of weights (not in
    /// cache), against a plain 32-byte-load sum over the same bytes.
    #[test]
    #[ignore]
    fn cold_stream_gbps() {
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
            let k = 576;
            let rb = k / 32 * ty.type_size();
            let rows = (128 << 20) / rb;
            let mut w: Vec<u8> = (0..rows * rb).map(|i| (i * 7919 % 251) as u8).collect();
            for blk in w.chunks_exact_mut(ty.type_size()) {
                blk[0..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            }
            let x: Vec<f32> = (0..k).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1).collect();
            let (kern, lanes) = kernel(ty, Isa::detect());
            let mut acts = QActs::quantize(partner(ty).unwrap(), &x, 1, k);
            if let Some(l) = lanes {
                acts.pack(l);
            }
            let arows = [acts.row(0)];
            let mut out = vec![0.0f32; rows];
            for _ in 0..3 {
                let t = Instant::now();
                kern(&w, rb, &arows, &mut out, 1);
                std::hint::black_box(&out);
                let kern_gbps = w.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
                let t = Instant::now();
                let sum = w.chunks_exact(32).fold(0u64, |a, c| {
                    a.wrapping_add(u64::from_le_bytes(c[..8].try_into().unwrap()))
                });
                std::hint::black_box(sum);
                let read_gbps = w.len() as f64 / t.elapsed().as_secs_f64() / 1e9;
                println!("{ty}: kernel {kern_gbps:.1} GB/s, plain read {read_gbps:.1} GB/s");
            }
        }
    }

    /// Single-thread ns per (block, activation row) of each tier's kernel on in-cache data.
    #[test]
    #[ignore]
    fn kernel_ns_per_block() {
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            // SmolLM2's row lengths (576: a last, partial 512-bit group) and a long one.
            let short = if ty.block_size() == 32 { 576 } else { 768 };
            for k in [short, 1536] {
                let rows = 64;
                let rb = k / ty.block_size() * ty.type_size();
                let mut w: Vec<u8> = (0..rows * rb).map(|i| (i * 7919 % 251) as u8).collect();
                for blk in w.chunks_exact_mut(ty.type_size()) {
                    let o = if ty == GgmlType::Q6_K { 208 } else { 0 };
                    blk[o..o + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                }
                for m in [1usize, 4] {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
                        .collect();
                    for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni] {
                        if !isa.available() {
                            continue;
                        }
                        let (kern, lanes) = kernel(ty, isa);
                        let mut acts = QActs::quantize(partner(ty).unwrap(), &x, m, k);
                        if let Some(l) = lanes {
                            acts.pack(l);
                        }
                        let arows: Vec<ARow> = (0..m).map(|i| acts.row(i)).collect();
                        let mut out = vec![0.0f32; m * rows];
                        let iters = 200;
                        let t = Instant::now();
                        for _ in 0..iters {
                            kern(&w, rb, &arows, &mut out, m);
                            std::hint::black_box(&out);
                        }
                        let ns = t.elapsed().as_secs_f64() * 1e9
                            / (iters * rows * m * (k / ty.block_size())) as f64;
                        println!("{ty} k={k} m={m} {isa:?}: {ns:.2} ns per block-row");
                    }
                }
            }
        }
    }
}
