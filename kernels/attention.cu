// Attention: a FlashAttention-style tiled prefill (online softmax, f32 accumulation, grouped-query
// heads, causal or bidirectional) that also writes each row's log-sum-exp, and a split-key decode
// kernel over the KV cache. CPU twin: src/ops/attention.rs.
//
// Layouts: q [n_q, heads, d], k and v [n_k, kv_heads, d], out [n_q, heads, d] in the storage type;
// lse [heads, n_q] in f32. Query head h reads kv head h / (heads / kv_heads). d <= ATT_D_MAX.

#define ATT_D_MAX 128
#define ATT_WARPS 4
#define ATT_ROWS_PER_WARP 4
#define ATT_ROWS (ATT_WARPS * ATT_ROWS_PER_WARP)
#define ATT_TILE 32
#define ATT_DPL (ATT_D_MAX / WARP)

// Grid (ceil(n_q / ATT_ROWS), heads), block ATT_WARPS * 32 threads. Query row i sits at key
// position q_start + i: causal, it sees keys 0..=q_start+i; otherwise every key (the vision tower).
// lse[h, i] = log sum_j exp(scale q_i . k_j) over the keys row i sees, so that the attention
// probability of any (row, key) is exp(scale q_i . k_j - lse): the pruning scores of the selected
// rows come from it without a second softmax pass.
template <typename T>
__device__ void flash_attn_impl(const T* q, const T* k, const T* v, T* out, float* lse, int n_q,
                                int n_k, int heads, int kv_heads, int d, int q_start, int causal,
                                float scale) {
    __shared__ float qs[ATT_ROWS][ATT_D_MAX];
    __shared__ float ks[ATT_TILE][ATT_D_MAX + 1];
    __shared__ float vs[ATT_TILE][ATT_D_MAX];
    int h = blockIdx.y, kvh = h / (heads / kv_heads);
    int row0 = blockIdx.x * ATT_ROWS;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int t = threadIdx.x; t < ATT_ROWS * d; t += blockDim.x) {
        int r = t / d, c = t % d, row = row0 + r;
        qs[r][c] = row < n_q ? to_f32(q[((long)row * heads + h) * d + c]) : 0.0f;
    }
    float m[ATT_ROWS_PER_WARP], l[ATT_ROWS_PER_WARP], acc[ATT_ROWS_PER_WARP][ATT_DPL];
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        m[rr] = -F32_INF;
        l[rr] = 0.0f;
        for (int c = 0; c < ATT_DPL; c++) acc[rr][c] = 0.0f;
    }
    int last_row = min(n_q, row0 + ATT_ROWS) - 1;
    int key_end = causal ? min(n_k, q_start + last_row + 1) : n_k;
    for (int t0 = 0; t0 < key_end; t0 += ATT_TILE) {
        __syncthreads();
        for (int t = threadIdx.x; t < ATT_TILE * d; t += blockDim.x) {
            int j = t / d, c = t % d, key = t0 + j;
            long at = ((long)key * kv_heads + kvh) * d + c;
            ks[j][c] = key < n_k ? to_f32(k[at]) : 0.0f;
            vs[j][c] = key < n_k ? to_f32(v[at]) : 0.0f;
        }
        __syncthreads();
        for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
            int r = warp * ATT_ROWS_PER_WARP + rr, row = row0 + r;
            if (row >= n_q) break;  // uniform across the warp
            int key = t0 + lane;
            bool seen = key < n_k && (!causal || key <= q_start + row);
            float s = -F32_INF;
            if (seen) {
                float dot = 0.0f;
                for (int c = 0; c < d; c++) dot += qs[r][c] * ks[lane][c];
                s = dot * scale;
            }
            float m_new = fmaxf(m[rr], warp_max(s));
            if (m_new == -F32_INF) continue;  // nothing seen yet
            float p = seen ? expf(s - m_new) : 0.0f;
            float alpha = expf(m[rr] - m_new);
            l[rr] = l[rr] * alpha + warp_sum(p);
            for (int c = 0; c < ATT_DPL; c++) acc[rr][c] *= alpha;
            for (int j = 0; j < ATT_TILE; j++) {
                float pj = __shfl_sync(FULL_MASK, p, j);
                for (int c = 0; c < ATT_DPL; c++) {
                    int dim = lane + c * WARP;
                    if (dim < d) acc[rr][c] += pj * vs[j][dim];
                }
            }
            m[rr] = m_new;
        }
    }
    for (int rr = 0; rr < ATT_ROWS_PER_WARP; rr++) {
        int row = row0 + warp * ATT_ROWS_PER_WARP + rr;
        if (row >= n_q) break;
        float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
        for (int c = 0; c < ATT_DPL; c++) {
            int dim = lane + c * WARP;
            if (dim < d) out[((long)row * heads + h) * d + dim] = from_f32<T>(acc[rr][c] * inv);
        }
        if (lane == 0) lse[(long)h * n_q + row] = m[rr] + logf(l[rr]);
    }
}

// Decode: one new query row q [heads, d] against the n_k cached keys (it sees all of them).
// Grid (heads), block ATT_WARPS * 32: warp w takes keys w*32 + lane, w*32 + 128 + lane, ...
// with its own online softmax; the warps' partial results are merged at the end.
template <typename T>
__device__ void decode_attn_impl(const T* q, const T* k, const T* v, T* out, int n_k, int heads,
                                 int kv_heads, int d, float scale) {
    __shared__ float qs[ATT_D_MAX];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][ATT_D_MAX];
    int h = blockIdx.x, kvh = h / (heads / kv_heads);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    for (int c = threadIdx.x; c < d; c += blockDim.x) qs[c] = to_f32(q[(long)h * d + c]);
    __syncthreads();
    float m = -F32_INF, l = 0.0f, acc[ATT_DPL];
    for (int c = 0; c < ATT_DPL; c++) acc[c] = 0.0f;
    for (int t0 = warp * WARP; t0 < n_k; t0 += ATT_WARPS * WARP) {
        int key = t0 + lane;
        float s = -F32_INF;
        if (key < n_k) {
            const T* kr = k + ((long)key * kv_heads + kvh) * d;
            float dot = 0.0f;
            for (int c = 0; c < d; c++) dot += qs[c] * to_f32(kr[c]);
            s = dot * scale;
        }
        float m_new = fmaxf(m, warp_max(s));
        float p = key < n_k ? expf(s - m_new) : 0.0f;
        float alpha = expf(m - m_new);
        l = l * alpha + warp_sum(p);
        for (int c = 0; c < ATT_DPL; c++) acc[c] *= alpha;
        int n_here = min(WARP, n_k - t0);
        for (int j = 0; j < n_here; j++) {
            float pj = __shfl_sync(FULL_MASK, p, j);
            const T* vr = v + ((long)(t0 + j) * kv_heads + kvh) * d;
            for (int c = 0; c < ATT_DPL; c++) {
                int dim = lane + c * WARP;
                if (dim < d) acc[c] += pj * to_f32(vr[dim]);
            }
        }
        m = m_new;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    for (int c = 0; c < ATT_DPL; c++) {
        int dim = lane + c * WARP;
        if (dim < d) wacc[warp][dim] = acc[c];
    }
    __syncthreads();
    float mm = -F32_INF;
    for (int w = 0; w < ATT_WARPS; w++) mm = fmaxf(mm, wm[w]);
    float ll = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) ll += wm[w] == -F32_INF ? 0.0f : wl[w] * expf(wm[w] - mm);
    for (int dim = threadIdx.x; dim < d; dim += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (wm[w] != -F32_INF) o += wacc[w][dim] * expf(wm[w] - mm);
        out[(long)h * d + dim] = from_f32<T>(ll > 0.0f ? o / ll : 0.0f);
    }
}

#define ATTENTION(T, S)                                                                            \
    extern "C" __global__ void flash_attn_##S(const T* q, const T* k, const T* v, T* out,          \
                                              float* lse, int n_q, int n_k, int heads,             \
                                              int kv_heads, int d, int q_start, int causal,        \
                                              float scale) {                                       \
        flash_attn_impl<T>(q, k, v, out, lse, n_q, n_k, heads, kv_heads, d, q_start, causal,       \
                           scale);                                                                 \
    }                                                                                              \
    extern "C" __global__ void decode_attn_##S(const T* q, const T* k, const T* v, T* out,         \
                                               int n_k, int heads, int kv_heads, int d,            \
                                               float scale) {                                      \
        decode_attn_impl<T>(q, k, v, out, n_k, heads, kv_heads, d, scale);                         \
    }
FOR_EACH_DTYPE(ATTENTION)
