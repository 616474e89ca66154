// RMSNorm (LLaMA) and LayerNorm (CLIP), one block per row, f32 statistics.
// CPU twins: src/ops/norm.rs (rms_norm, layer_norm).

// y = x / sqrt(mean(x^2) + eps) * w over each row of d values.
template <typename T>
__device__ void rmsnorm_impl(const T* x, const T* w, T* y, int rows, int d, float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (long)r * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        y[(long)r * d + i] = from_f32<T>(to_f32(xr[i]) * inv * to_f32(w[i]));
}

// y = (x - mean) / sqrt(var + eps) * w + b over each row (biased variance, as torch).
template <typename T>
__device__ void layernorm_impl(const T* x, const T* w, const T* b, T* y, int rows, int d, float eps) {
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + (long)r * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += to_f32(xr[i]);
    float mean = block_sum(s, scratch) / d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float c = to_f32(xr[i]) - mean;
        v += c * c;
    }
    float inv = rsqrtf(block_sum(v, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        y[(long)r * d + i] = from_f32<T>((to_f32(xr[i]) - mean) * inv * to_f32(w[i]) + to_f32(b[i]));
}

#define NORM(T, S)                                                                                 \
    extern "C" __global__ void rmsnorm_##S(const T* x, const T* w, T* y, int rows, int d,          \
                                           float eps) {                                            \
        rmsnorm_impl<T>(x, w, y, rows, d, eps);                                                    \
    }                                                                                              \
    extern "C" __global__ void layernorm_##S(const T* x, const T* w, const T* b, T* y, int rows,   \
                                             int d, float eps) {                                   \
        layernorm_impl<T>(x, w, b, y, rows, d, eps);                                               \
    }
FOR_EACH_DTYPE(NORM)
