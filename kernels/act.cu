// Elementwise activations, f32 math. CPU twins: src/ops/act.rs.

// LLaMA MLP: y = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
template <typename T>
__device__ void silu_mul_impl(const T* gate, const T* up, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = to_f32(gate[i]);
        y[i] = from_f32<T>(g / (1.0f + expf(-g)) * to_f32(up[i]));
    }
}

// Exact GELU (the projector's): x/2 (1 + erf(x / sqrt 2)).
template <typename T>
__device__ void gelu_impl(const T* x, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = to_f32(x[i]);
        y[i] = from_f32<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

// CLIP's quick_gelu: x * sigmoid(1.702 x).
template <typename T>
__device__ void quick_gelu_impl(const T* x, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = to_f32(x[i]);
        y[i] = from_f32<T>(v / (1.0f + expf(-1.702f * v)));
    }
}

#define ACT(T, S)                                                                                  \
    extern "C" __global__ void silu_mul_##S(const T* gate, const T* up, T* y, long n) {           \
        silu_mul_impl<T>(gate, up, y, n);                                                         \
    }                                                                                              \
    extern "C" __global__ void gelu_##S(const T* x, T* y, long n) { gelu_impl<T>(x, y, n); }       \
    extern "C" __global__ void quick_gelu_##S(const T* x, T* y, long n) {                          \
        quick_gelu_impl<T>(x, y, n);                                                               \
    }
FOR_EACH_DTYPE(ACT)

// Residual add y = a + b, and the bias of a Linear added in place to each row of x: [rows, width].
template <typename T>
__device__ void add_impl(const T* a, const T* b, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename T>
__device__ void add_bias_impl(T* x, const T* bias, long rows, int width) {
    long n = rows * width;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % width]));
}

#define ADD(T, S)                                                                                  \
    extern "C" __global__ void add_##S(const T* a, const T* b, T* y, long n) {                     \
        add_impl<T>(a, b, y, n);                                                                   \
    }                                                                                              \
    extern "C" __global__ void add_bias_##S(T* x, const T* bias, long rows, int width) {           \
        add_bias_impl<T>(x, bias, rows, width);                                                    \
    }
FOR_EACH_DTYPE(ADD)
