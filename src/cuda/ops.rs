//! Launch wrappers of the kernels in kernels/*.cu, one per kernel, named as the CPU ops they
//! mirror. Activations and weights are stored as `T` ([`Storage`]: f32, f16 or bf16); every
//! kernel computes in f32. Shapes are checked before a launch; a bad one is an error.

use super::{ATT_D_MAX, Device};
use crate::error::{Error, Result};
use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

/// A storage type of the kernels: its kernels carry this suffix; cuBLAS multiplies it with f32
/// accumulation.
pub trait Storage: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static {
    const SUFFIX: &'static str;
    const ONE: Self;
    const ZERO: Self;
}
impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}
impl Storage for half::f16 {
    const SUFFIX: &'static str = "f16";
    const ONE: Self = half::f16::ONE;
    const ZERO: Self = half::f16::ZERO;
}
impl Storage for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const ONE: Self = half::bf16::ONE;
    const ZERO: Self = half::bf16::ZERO;
}

/// Threads per block of the elementwise and per-row kernels.
const THREADS: u32 = 256;
/// Threads per block of the attention kernels (ATT_WARPS warps).
const ATT_THREADS: u32 = 128;
/// Query rows per flash-attention block (ATT_ROWS).
const ATT_ROWS: usize = 16;

fn check(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Cuda(format!(
            "{what}: {got} values, expected {want}"
        )))
    }
}

fn launch_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("launch {name}: {e}"))
}

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Largest grid x dimension a launch may have (2^31 − 1).
const GRID_X_MAX: usize = i32::MAX as usize;
/// Largest grid y dimension a launch may have.
const GRID_Y_MAX: usize = 65_535;

/// One block per row; an error for no rows or more than a grid holds.
fn per_row(rows: usize) -> Result<LaunchConfig> {
    if rows == 0 || rows > GRID_X_MAX {
        return Err(Error::Cuda(format!(
            "a one-block-per-row launch over {rows} rows (1..={GRID_X_MAX})"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The flash-attention grid: blocks of `ATT_ROWS` query rows along x, one head per y.
fn flash_grid(n_q: usize, heads: usize) -> Result<LaunchConfig> {
    let tiles = n_q.div_ceil(ATT_ROWS);
    if tiles == 0 || tiles > GRID_X_MAX || heads == 0 || heads > GRID_Y_MAX {
        return Err(Error::Cuda(format!(
            "attention over {n_q} query rows and {heads} heads does not fit a launch grid \
             (1..={GRID_X_MAX} tiles of {ATT_ROWS} rows, 1..={GRID_Y_MAX} heads)"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (tiles as u32, heads as u32, 1),
        block_dim: (ATT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Device {
    /// Allocates `n` zeros.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| Error::Cuda(format!("allocate {n} values: {e}")))
    }

    /// Copies host values to the device.
    pub fn upload<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(|e| Error::Cuda(format!("upload {} values: {e}", v.len())))
    }

    /// Copies device values back to the host.
    pub fn download<T: DeviceRepr>(&self, v: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(v)
            .map_err(|e| Error::Cuda(format!("download {} values: {e}", v.len())))
    }

    /// `y = x · wᵀ` for `x: [m, k]` and an HF Linear weight `w: [n, k]` (both row-major), `y:
    /// [m, n]`, through cuBLAS with f32 accumulation (ops::matmul::matmul_nt).
    pub fn linear<T: Storage>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<CudaSlice<T>>
    where
        cudarc::cublas::CudaBlas: Gemm<T>,
    {
        check("linear x", x.len(), m * k)?;
        check("linear weight", w.len(), n * k)?;
        let mut y = self.zeros::<T>(m * n)?;
        // cuBLAS is column-major: y seen column-major is yᵀ [n, m] = op(A) op(B) with A = w read as a
        // [k, n] matrix and transposed, B = x read as [k, m].
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: T::ONE,
            lda: k as i32,
            ldb: k as i32,
            beta: T::ZERO,
            ldc: n as i32,
        };
        // SAFETY: w holds n * k values, x m * k, y m * n, as the leading dimensions say.
        unsafe { self.blas()?.gemm(cfg, w, x, &mut y) }
            .map_err(|e| Error::Cuda(format!("cuBLAS gemm {m}x{k} by {n}x{k}: {e}")))?;
        Ok(y)
    }

    /// RMSNorm of each row of `x: [rows, d]` with weight `w: [d]` (ops::norm::rms_norm).
    pub fn rms_norm<T: Storage>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        check("rms_norm x", x.len(), rows * d)?;
        check("rms_norm weight", w.len(), d)?;
        let name = format!("rmsnorm_{}", T::SUFFIX);
        let f = self.function("norm", &name)?;
        let mut y = self.zeros::<T>(rows * d)?;
        let (r, dd) = (rows as i32, d as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(w).arg(&mut y).arg(&r).arg(&dd).arg(&eps);
        // SAFETY: the arguments match rmsnorm's signature and the slices hold rows * d values.
        unsafe { b.launch(per_row(rows)?) }.map_err(|e| launch_err(&name, e))?;
        Ok(y)
    }

    /// LayerNorm of each row of `x: [rows, d]` (ops::norm::layer_norm).
    pub fn layer_norm<T: Storage>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        bias: &CudaSlice<T>,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<CudaSlice<T>> {
        check("layer_norm x", x.len(), rows * d)?;
        check("layer_norm weight", w.len(), d)?;
        check("layer_norm bias", bias.len(), d)?;
        let name = format!("layernorm_{}", T::SUFFIX);
        let f = self.function("norm", &name)?;
        let mut y = self.zeros::<T>(rows * d)?;
        let (r, dd) = (rows as i32, d as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x)
            .arg(w)
            .arg(bias)
            .arg(&mut y)
            .arg(&r)
            .arg(&dd)
            .arg(&eps);
        // SAFETY: as rms_norm, plus the bias of d values.
        unsafe { b.launch(per_row(rows)?) }.map_err(|e| launch_err(&name, e))?;
        Ok(y)
    }

    /// `silu(gate) * up` elementwise (the LLaMA MLP; ops::act::silu_mul).
    pub fn silu_mul<T: Storage>(
        &self,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>> {
        check("silu_mul up", up.len(), gate.len())?;
        let name = format!("silu_mul_{}", T::SUFFIX);
        let f = self.function("act", &name)?;
        let mut y = self.zeros::<T>(gate.len())?;
        let n = gate.len() as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(gate).arg(up).arg(&mut y).arg(&n);
        // SAFETY: three slices of n values and n.
        unsafe { b.launch(elementwise(gate.len())) }.map_err(|e| launch_err(&name, e))?;
        Ok(y)
    }

    /// `a + b` elementwise (the residual stream).
    pub fn add<T: Storage>(&self, a: &CudaSlice<T>, b: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        check("add b", b.len(), a.len())?;
        let name = format!("add_{}", T::SUFFIX);
        let f = self.function("act", &name)?;
        let mut y = self.zeros::<T>(a.len())?;
        let n = a.len() as i64;
        let mut bld = self.stream.launch_builder(&f);
        bld.arg(a).arg(b).arg(&mut y).arg(&n);
        // SAFETY: three slices of n values and n.
        unsafe { bld.launch(elementwise(a.len())) }.map_err(|e| launch_err(&name, e))?;
        Ok(y)
    }

    /// Adds `bias: [width]` to every row of `x: [rows, width]` in place (a Linear's bias).
    pub fn add_bias<T: Storage>(&self, x: &mut CudaSlice<T>, bias: &CudaSlice<T>) -> Result<()> {
        let width = bias.len();
        if width == 0 || !x.len().is_multiple_of(width) {
            return Err(Error::Cuda(format!(
                "add_bias: {} values are not rows of a {width}-value bias",
                x.len()
            )));
        }
        let name = format!("add_bias_{}", T::SUFFIX);
        let f = self.function("act", &name)?;
        let (rows, w) = ((x.len() / width) as i64, width as i32);
        let n = x.len();
        let mut bld = self.stream.launch_builder(&f);
        bld.arg(x).arg(bias).arg(&rows).arg(&w);
        // SAFETY: x holds rows * width values, bias width.
        unsafe { bld.launch(elementwise(n)) }.map_err(|e| launch_err(&name, e))?;
        Ok(())
    }

    /// Exact GELU elementwise (ops::act::gelu).
    pub fn gelu<T: Storage>(&self, x: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        self.activation("gelu", x)
    }

    /// CLIP's quick GELU elementwise (ops::act::quick_gelu).
    pub fn quick_gelu<T: Storage>(&self, x: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        self.activation("quick_gelu", x)
    }

    /// The elementwise activation kernel `kind` (`gelu` or `quick_gelu`).
    fn activation<T: Storage>(&self, kind: &str, x: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        let name = format!("{kind}_{}", T::SUFFIX);
        let f = self.function("act", &name)?;
        let mut y = self.zeros::<T>(x.len())?;
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&mut y).arg(&n);
        // SAFETY: two slices of n values and n.
        unsafe { b.launch(elementwise(x.len())) }.map_err(|e| launch_err(&name, e))?;
        Ok(y)
    }

    /// Rotary embedding in place on `x: [rows, heads, d]`, row r at position `pos[r]`, with the
    /// host's `inv_freq` (ops::rope::inv_freq) of d/2 values.
    pub fn rope<T: Storage>(
        &self,
        x: &mut CudaSlice<T>,
        pos: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        heads: usize,
        d: usize,
    ) -> Result<()> {
        let rows = pos.len();
        check("rope x", x.len(), rows * heads * d)?;
        check("rope inv_freq", inv_freq.len(), d / 2)?;
        let name = format!("rope_{}", T::SUFFIX);
        let f = self.function("rope", &name)?;
        let (r, h, dd) = (rows as i32, heads as i32, d as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(pos).arg(inv_freq).arg(&r).arg(&h).arg(&dd);
        // SAFETY: x holds rows * heads * d values, pos rows, inv_freq d / 2.
        unsafe { b.launch(elementwise(rows * heads * d / 2)) }.map_err(|e| launch_err(&name, e))?;
        Ok(())
    }

    /// `dst[i] = src[idx[i]]` for rows of `width` values: drops pruned tokens from hidden states
    /// or a KV cache layer.
    pub fn gather_rows<T: Storage>(
        &self,
        src: &CudaSlice<T>,
        idx: &[u32],
        width: usize,
    ) -> Result<CudaSlice<T>> {
        let n_src = src.len() / width.max(1);
        if let Some(bad) = idx.iter().find(|&&i| i as usize >= n_src) {
            return Err(Error::Cuda(format!(
                "gather_rows: row {bad} of a {n_src}-row tensor"
            )));
        }
        let name = format!("gather_rows_{}", T::SUFFIX);
        let f = self.function("gather", &name)?;
        let idx_d = self.upload(idx)?;
        let mut y = self.zeros::<T>(idx.len() * width)?;
        let (n, w) = (idx.len() as i32, width as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(src).arg(&idx_d).arg(&mut y).arg(&n).arg(&w);
        // SAFETY: every index is below src's row count; y holds n * width values.
        unsafe { b.launch(elementwise(idx.len() * width)) }.map_err(|e| launch_err(&name, e))?;
        Ok(y)
    }

    /// Writes `src: [rows, cols]` into columns `offset..offset + cols` of `dst: [rows, dst_cols]`
    /// (one part of a column concatenation).
    pub fn copy_cols<T: Storage>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        (rows, cols): (usize, usize),
        dst_cols: usize,
        offset: usize,
    ) -> Result<()> {
        check("copy_cols src", src.len(), rows * cols)?;
        check("copy_cols dst", dst.len(), rows * dst_cols)?;
        if offset + cols > dst_cols {
            return Err(Error::Cuda(format!(
                "copy_cols: columns {offset}..{} of a {dst_cols}-column tensor",
                offset + cols
            )));
        }
        let name = format!("copy_cols_{}", T::SUFFIX);
        let f = self.function("gather", &name)?;
        let ints = [rows, cols, dst_cols, offset].map(|x| x as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(src).arg(dst);
        for x in &ints {
            b.arg(x);
        }
        // SAFETY: src holds rows * cols values, dst rows * dst_cols, offset + cols <= dst_cols.
        unsafe { b.launch(elementwise(rows * cols)) }.map_err(|e| launch_err(&name, e))?;
        Ok(())
    }

    /// Tiled (flash) attention of `q: [n_q, heads, d]` over `k, v: [n_k, kv_heads, d]`; query row i sits
    /// at key position `q_start + i` (causal) or sees every key (`causal = false`, the vision
    /// tower). Returns the output `[n_q, heads, d]` and each row's log-sum-exp `[heads, n_q]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<T: Storage>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        (n_q, n_k): (usize, usize),
        (heads, kv_heads, d): (usize, usize, usize),
        q_start: usize,
        causal: bool,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
        check_heads(heads, kv_heads, d)?;
        check("attention q", q.len(), n_q * heads * d)?;
        check("attention k", k.len(), n_k * kv_heads * d)?;
        check("attention v", v.len(), n_k * kv_heads * d)?;
        if causal && q_start + n_q > n_k {
            return Err(Error::Cuda(format!(
                "attention: rows at {q_start}..{} need that many keys, got {n_k}",
                q_start + n_q
            )));
        }
        let name = format!("flash_attn_{}", T::SUFFIX);
        let f = self.function("attention", &name)?;
        let mut out = self.zeros::<T>(n_q * heads * d)?;
        let mut lse = self.zeros::<f32>(heads * n_q)?;
        let ints = [n_q, n_k, heads, kv_heads, d, q_start].map(|x| x as i32);
        let c = i32::from(causal);
        let scale = 1.0 / (d as f32).sqrt();
        let mut b = self.stream.launch_builder(&f);
        b.arg(q).arg(k).arg(v).arg(&mut out).arg(&mut lse);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&c).arg(&scale);
        let cfg = flash_grid(n_q, heads)?;
        // SAFETY: shapes checked above; d <= ATT_D_MAX fits the kernel's shared tiles.
        unsafe { b.launch(cfg) }.map_err(|e| launch_err(&name, e))?;
        Ok((out, lse))
    }

    /// One decode step: `q: [heads, d]` over the whole cache `k, v: [n_k, kv_heads, d]` (the
    /// single-row case of [`Device::attention`], without the log-sum-exp).
    pub fn attention_decode<T: Storage>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        n_k: usize,
        (heads, kv_heads, d): (usize, usize, usize),
    ) -> Result<CudaSlice<T>> {
        check_heads(heads, kv_heads, d)?;
        check("decode q", q.len(), heads * d)?;
        check("decode k", k.len(), n_k * kv_heads * d)?;
        check("decode v", v.len(), n_k * kv_heads * d)?;
        let name = format!("decode_attn_{}", T::SUFFIX);
        let f = self.function("attention", &name)?;
        let mut out = self.zeros::<T>(heads * d)?;
        let ints = [n_k, heads, kv_heads, d].map(|x| x as i32);
        let scale = 1.0 / (d as f32).sqrt();
        let mut b = self.stream.launch_builder(&f);
        b.arg(q).arg(k).arg(v).arg(&mut out);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&scale);
        let cfg = LaunchConfig {
            block_dim: (ATT_THREADS, 1, 1),
            ..per_row(heads)?
        };
        // SAFETY: shapes checked above.
        unsafe { b.launch(cfg) }.map_err(|e| launch_err(&name, e))?;
        Ok(out)
    }

    /// Attention probabilities `[heads, rows, cols]` (f32) of the selected query rows
    /// `q_sel: [rows, heads, d]` (at positions `rows`) to the key positions `cols`, from each
    /// row's log-sum-exp `lse: [heads, rows]` (ops::attention::selected_probs).
    #[allow(clippy::too_many_arguments)]
    pub fn selected_probs<T: Storage>(
        &self,
        q_sel: &CudaSlice<T>,
        k: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        rows: &[u32],
        cols: &[u32],
        (heads, kv_heads, d): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>> {
        check_heads(heads, kv_heads, d)?;
        let (r, nv) = (rows.len(), cols.len());
        check("selected q", q_sel.len(), r * heads * d)?;
        check("selected lse", lse.len(), heads * r)?;
        let n_k = k.len() / (kv_heads * d);
        if let Some(bad) = cols.iter().chain(rows).find(|&&c| c as usize >= n_k) {
            return Err(Error::Cuda(format!(
                "selected_probs: position {bad} of a {n_k}-key cache"
            )));
        }
        let name = format!("selected_probs_{}", T::SUFFIX);
        let f = self.function("score", &name)?;
        let (rows_d, cols_d) = (self.upload(rows)?, self.upload(cols)?);
        let mut out = self.zeros::<f32>(heads * r * nv)?;
        let ints = [r, nv, heads, kv_heads, d].map(|x| x as i32);
        let scale = 1.0 / (d as f32).sqrt();
        let mut b = self.stream.launch_builder(&f);
        b.arg(q_sel)
            .arg(k)
            .arg(lse)
            .arg(&rows_d)
            .arg(&cols_d)
            .arg(&mut out);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&scale);
        // SAFETY: shapes and positions checked above.
        unsafe { b.launch(elementwise(heads * r * nv)) }.map_err(|e| launch_err(&name, e))?;
        Ok(out)
    }

    /// Each selected row's log-sum-exp `[heads, rows]` over the keys `k` it sees causally (keys
    /// `0..=rows[i]`), for [`Device::selected_probs`] when no attention wrote it.
    pub fn selected_lse<T: Storage>(
        &self,
        q_sel: &CudaSlice<T>,
        k: &CudaSlice<T>,
        rows: &[u32],
        (heads, kv_heads, d): (usize, usize, usize),
    ) -> Result<CudaSlice<f32>> {
        check_heads(heads, kv_heads, d)?;
        let r = rows.len();
        check("selected q", q_sel.len(), r * heads * d)?;
        let n_k = k.len() / (kv_heads * d);
        if let Some(bad) = rows.iter().find(|&&p| p as usize >= n_k) {
            return Err(Error::Cuda(format!(
                "selected_lse: position {bad} of a {n_k}-key cache"
            )));
        }
        let name = format!("selected_lse_{}", T::SUFFIX);
        let f = self.function("score", &name)?;
        let rows_d = self.upload(rows)?;
        let mut out = self.zeros::<f32>(heads * r)?;
        let ints = [r, heads, kv_heads, d].map(|x| x as i32);
        let scale = 1.0 / (d as f32).sqrt();
        let mut b = self.stream.launch_builder(&f);
        b.arg(q_sel).arg(k).arg(&rows_d).arg(&mut out);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&scale);
        // SAFETY: shapes and positions checked above; one block per (head, row).
        unsafe { b.launch(per_row(heads * r)?) }.map_err(|e| launch_err(&name, e))?;
        Ok(out)
    }

    /// `a[h, v] = Σ_i w[i] probs[h, i, v]`: the query strategy's vote.
    pub fn query_vote(
        &self,
        probs: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        heads: usize,
        nv: usize,
    ) -> Result<CudaSlice<f32>> {
        let r = w.len();
        check("query_vote probs", probs.len(), heads * r * nv)?;
        let f = self.function("score", "query_vote")?;
        let mut a = self.zeros::<f32>(heads * nv)?;
        let ints = [heads, r, nv].map(|x| x as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(probs).arg(w).arg(&mut a);
        for x in &ints {
            b.arg(x);
        }
        // SAFETY: shapes checked above.
        unsafe { b.launch(elementwise(heads * nv)) }.map_err(|e| launch_err("query_vote", e))?;
        Ok(a)
    }

    /// `s[v] = Σ_h beta[h] a[h, v]`: the importance the keep ranks by.
    pub fn importance(
        &self,
        a: &CudaSlice<f32>,
        beta: &CudaSlice<f32>,
        nv: usize,
    ) -> Result<CudaSlice<f32>> {
        let heads = beta.len();
        check("importance a", a.len(), heads * nv)?;
        let f = self.function("score", "importance")?;
        let mut s = self.zeros::<f32>(nv)?;
        let ints = [heads, nv].map(|x| x as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(a).arg(beta).arg(&mut s);
        for x in &ints {
            b.arg(x);
        }
        // SAFETY: shapes checked above.
        unsafe { b.launch(elementwise(nv)) }.map_err(|e| launch_err("importance", e))?;
        Ok(s)
    }

    /// Per-head statistics of `a: [heads, nv]`, 8 per head: sum, population variance, Σ p ln p,
    /// max, min, ||p||₂, sum of the `top_k` largest, Gini (see kernels/score.cu).
    pub fn head_stats(
        &self,
        a: &CudaSlice<f32>,
        heads: usize,
        nv: usize,
        top_k: usize,
    ) -> Result<CudaSlice<f32>> {
        check("head_stats a", a.len(), heads * nv)?;
        let f = self.function("score", "head_stats")?;
        let mut out = self.zeros::<f32>(heads * 8)?;
        let (n, k) = (nv as i32, top_k as i32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(a).arg(&mut out).arg(&n).arg(&k);
        // SAFETY: a holds heads * nv values, out heads * 8.
        unsafe { b.launch(per_row(heads)?) }.map_err(|e| launch_err("head_stats", e))?;
        Ok(out)
    }
}

fn check_heads(heads: usize, kv_heads: usize, d: usize) -> Result<()> {
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::Cuda(format!(
            "attention: {heads} query heads do not group over {kv_heads} kv heads"
        )));
    }
    if d == 0 || d > ATT_D_MAX {
        return Err(Error::Cuda(format!(
            "attention: head dimension {d} is outside 1..={ATT_D_MAX}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_covers_n_with_at_least_one_block_and_at_most_the_cap() {
        for (n, blocks) in [
            (0, 1),
            (1, 1),
            (256, 1),
            (257, 2),
            (1000, 4),
            (65_535 * 256, 65_535),
            (usize::MAX / 2, 65_535),
        ] {
            let c = elementwise(n);
            assert_eq!(c.grid_dim, (blocks, 1, 1), "n = {n}");
            assert_eq!(c.block_dim, (THREADS, 1, 1));
            // Grid-stride kernels cover every element when the grid is not capped.
            if blocks < 65_535 {
                assert!(blocks as usize * THREADS as usize >= n, "n = {n}");
            }
        }
    }

    #[test]
    fn per_row_is_one_block_a_row_and_refuses_impossible_grids() {
        let c = per_row(7).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((7, 1, 1), (THREADS, 1, 1)));
        assert_eq!(per_row(GRID_X_MAX).unwrap().grid_dim.0, i32::MAX as u32);
        for bad in [0, GRID_X_MAX + 1, usize::MAX] {
            let e = per_row(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad} rows")), "{e}");
        }
    }

    #[test]
    fn flash_grid_tiles_rows_by_16_and_puts_heads_on_y() {
        for (n_q, heads, tiles) in [(1, 32, 1), (16, 4, 1), (17, 4, 2), (616, 32, 39)] {
            let c = flash_grid(n_q, heads).unwrap();
            assert_eq!(c.grid_dim, (tiles, heads as u32, 1), "{n_q} rows");
            assert_eq!(c.block_dim, (ATT_THREADS, 1, 1));
            assert!(tiles as usize * ATT_ROWS >= n_q);
        }
        for (n_q, heads) in [(0, 4), (10, 0), (10, GRID_Y_MAX + 1)] {
            let e = flash_grid(n_q, heads).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{n_q} query rows and {heads} heads")),
                "{e}"
            );
        }
    }

    #[test]
    fn check_heads_accepts_grouped_heads_up_to_the_kernel_width() {
        for (h, kv, d) in [(32, 32, 128), (32, 8, 128), (9, 3, 64), (4, 1, 1)] {
            assert!(check_heads(h, kv, d).is_ok(), "{h}/{kv} d{d}");
        }
        for (h, kv, d, want) in [
            (4, 0, 64, "over 0 kv heads"),
            (9, 2, 64, "9 query heads do not group over 2"),
            (4, 4, 0, "head dimension 0"),
            (4, 4, ATT_D_MAX + 1, "head dimension 129"),
        ] {
            let e = check_heads(h, kv, d).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn check_names_the_operand_and_both_counts() {
        assert!(check("x", 12, 12).is_ok());
        let e = check("rope x", 10, 12).unwrap_err().to_string();
        assert!(e.contains("rope x: 10 values, expected 12"), "{e}");
    }
}
