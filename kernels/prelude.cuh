// Shared by every kernel file: NVRTC compiles `prelude.cuh + file.cu` as one source, without any
// CUDA header (cuda_fp16.h is not shipped with NVRTC before CUDA 13.3), so the half types and
// their conversions are written here by hand.

typedef unsigned int u32;
typedef unsigned short u16;

// IEEE half and bfloat16, stored as their bits.
struct f16_t { u16 bits; };
struct bf16_t { u16 bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t x) { return __int_as_float(((u32)x.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float x) {
    f16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
// Round to nearest even; NaN stays NaN (quiet).
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float x) {
    u32 u = __float_as_uint(x);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (u16)((u >> 16) | 0x40u);
    } else {
        b.bits = (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return b;
}

// Every kernel exists once per storage type, suffixed _f32, _f16, _bf16.
#define FOR_EACH_DTYPE(M) M(float, f32) M(f16_t, f16) M(bf16_t, bf16)

#define F32_INF __int_as_float(0x7f800000)
#define WARP 32
#define FULL_MASK 0xffffffffu

struct SumOp { __device__ float operator()(float a, float b) const { return a + b; } };
struct MaxOp { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct MinOp { __device__ float operator()(float a, float b) const { return fminf(a, b); } };

// `op` over the 32 lanes of a warp; every lane gets the result.
template <typename Op> __device__ __forceinline__ float warp_reduce(float v, Op op) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// `op` over a block of at most 1024 threads (a multiple of 32); every thread gets the result.
// `scratch` holds 32 floats of shared memory; `identity` is op's neutral value.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch, float identity, Op op) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : identity;
    return warp_reduce(v, op);
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp()); }
__device__ __forceinline__ float block_sum(float v, float* s) { return block_reduce(v, s, 0.0f, SumOp()); }
__device__ __forceinline__ float block_max(float v, float* s) { return block_reduce(v, s, -F32_INF, MaxOp()); }
__device__ __forceinline__ float block_min(float v, float* s) { return block_reduce(v, s, F32_INF, MinOp()); }
