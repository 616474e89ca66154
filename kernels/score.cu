// The scoring reductions of PRUNING.md on the GPU. CPU twins: src/prune/score.rs (selected
// attention, a_h, importance) and src/prune/head.rs (the per-head statistics).

// Attention of the selected query rows to the image columns, from the ranking layer's queries
// q_sel [r, heads, d] (RoPE applied), its keys k [n_k, kv_heads, d] and each selected row's
// log-sum-exp lse [heads, r] (written by flash_attn for those rows):
// probs[h, i, c] = exp(scale q_i . k_{cols[c]} - lse[h, i]) when cols[c] <= rows[i], else 0.
// One thread per (h, i, c).
template <typename T>
__device__ void selected_probs_impl(const T* q_sel, const T* k, const float* lse, const u32* rows,
                                    const u32* cols, float* probs, int r, int nv, int heads,
                                    int kv_heads, int d, float scale) {
    long n = (long)heads * r * nv;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        int c = (int)(t % nv), i = (int)((t / nv) % r), h = (int)(t / ((long)nv * r));
        int kvh = h / (heads / kv_heads);
        float p = 0.0f;
        if (cols[c] <= rows[i]) {
            const T* qr = q_sel + ((long)i * heads + h) * d;
            const T* kr = k + ((long)cols[c] * kv_heads + kvh) * d;
            float dot = 0.0f;
            for (int e = 0; e < d; e++) dot += to_f32(qr[e]) * to_f32(kr[e]);
            p = expf(dot * scale - lse[(long)h * r + i]);
        }
        probs[t] = p;
    }
}

#define SELECTED(T, S)                                                                             \
    extern "C" __global__ void selected_probs_##S(const T* q_sel, const T* k, const float* lse,    \
                                                  const u32* rows, const u32* cols, float* probs,  \
                                                  int r, int nv, int heads, int kv_heads, int d,   \
                                                  float scale) {                                   \
        selected_probs_impl<T>(q_sel, k, lse, rows, cols, probs, r, nv, heads, kv_heads, d,        \
                               scale);                                                             \
    }
FOR_EACH_DTYPE(SELECTED)

// lse[h, i] = log sum_{j <= rows[i]} exp(scale q_i . k_j): the log-sum-exp of a selected row over
// the keys it sees causally, for selected_probs when no attention wrote it (PyramidDrop ranks by
// the next layer's own projections, before that layer runs). One block per (h, i).
template <typename T>
__device__ void selected_lse_impl(const T* q_sel, const T* k, const u32* rows, float* lse, int r,
                                  int heads, int kv_heads, int d, float scale) {
    __shared__ float scratch[32];
    int i = blockIdx.x % r, h = blockIdx.x / r;
    int kvh = h / (heads / kv_heads);
    const T* qr = q_sel + ((long)i * heads + h) * d;
    int n = (int)rows[i] + 1;
    float mx = -F32_INF;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const T* kr = k + ((long)j * kv_heads + kvh) * d;
        float dot = 0.0f;
        for (int e = 0; e < d; e++) dot += to_f32(qr[e]) * to_f32(kr[e]);
        mx = fmaxf(mx, dot * scale);
    }
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const T* kr = k + ((long)j * kv_heads + kvh) * d;
        float dot = 0.0f;
        for (int e = 0; e < d; e++) dot += to_f32(qr[e]) * to_f32(kr[e]);
        sum += expf(dot * scale - mx);
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) lse[(long)h * r + i] = mx + logf(sum);
}

#define SELECTED_LSE(T, S)                                                                         \
    extern "C" __global__ void selected_lse_##S(const T* q_sel, const T* k, const u32* rows,       \
                                                float* lse, int r, int heads, int kv_heads, int d, \
                                                float scale) {                                     \
        selected_lse_impl<T>(q_sel, k, rows, lse, r, heads, kv_heads, d, scale);                   \
    }
FOR_EACH_DTYPE(SELECTED_LSE)

// a[h, v] = sum_i w[i] probs[h, i, v]: the query strategy's vote, one thread per (h, v).
extern "C" __global__ void query_vote(const float* probs, const float* w, float* a, int heads,
                                      int r, int nv) {
    long n = (long)heads * nv;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        int v = (int)(t % nv), h = (int)(t / nv);
        float s = 0.0f;
        for (int i = 0; i < r; i++) s += w[i] * probs[((long)h * r + i) * nv + v];
        a[t] = s;
    }
}

// s[v] = sum_h beta[h] a[h, v]: the importance the top-k keep ranks by, one thread per v.
extern "C" __global__ void importance(const float* a, const float* beta, float* s, int heads,
                                      int nv) {
    for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < nv; v += gridDim.x * blockDim.x) {
        float x = 0.0f;
        for (int h = 0; h < heads; h++) x += beta[h] * a[(long)h * nv + v];
        s[v] = x;
    }
}

// Per-head statistics of a_h (one block per head) from which every head strategy's score follows:
// stats[h] = {sum, population variance, sum p ln p (= -H(p)), max, min, ||p||_2,
//             sum of the top_k largest, Gini}, with p = a_h / sum(a_h), uniform when the sum is not
// positive (as src/prune/head.rs). Ranks for top-k break ties by the lower index; Gini is the
// pairwise definition sum_i sum_j |a_i - a_j| / (2 N sum a), 0 when the sum is not positive.
#define HEAD_STATS 8
extern "C" __global__ void head_stats(const float* a, float* stats, int nv, int top_k) {
    __shared__ float scratch[32];
    const float* x = a + (long)blockIdx.x * nv;
    float sum = 0.0f, mx = -F32_INF, mn = F32_INF;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        sum += x[i];
        mx = fmaxf(mx, x[i]);
        mn = fminf(mn, x[i]);
    }
    sum = block_sum(sum, scratch);
    mx = block_max(mx, scratch);
    mn = block_min(mn, scratch);
    float mean = sum / nv;
    bool uniform = !(sum > 0.0f);
    float var = 0.0f, plogp = 0.0f, p2 = 0.0f, top = 0.0f, gini = 0.0f;
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        float c = x[i] - mean;
        var += c * c;
        float p = uniform ? 1.0f / nv : x[i] / sum;
        if (p > 0.0f) plogp += p * logf(p);
        p2 += p * p;
        int rank = 0;
        float g = 0.0f;
        for (int j = 0; j < nv; j++) {
            rank += (x[j] > x[i] || (x[j] == x[i] && j < i)) ? 1 : 0;
            g += fabsf(x[i] - x[j]);
        }
        if (rank < top_k) top += x[i];
        gini += g;
    }
    var = block_sum(var, scratch) / nv;
    plogp = block_sum(plogp, scratch);
    p2 = block_sum(p2, scratch);
    top = block_sum(top, scratch);
    gini = block_sum(gini, scratch);
    if (threadIdx.x == 0) {
        float* o = stats + (long)blockIdx.x * HEAD_STATS;
        o[0] = sum;
        o[1] = var;
        o[2] = plogp;
        o[3] = mx;
        o[4] = mn;
        o[5] = sqrtf(p2);
        o[6] = top;
        o[7] = uniform ? 0.0f : gini / (2.0f * nv * sum);
    }
}
