// Rotary position embedding, rotate-half form, in place on x: [rows, heads, d]. Row r sits at
// position pos[r]; inv_freq (d/2 values) comes from the host, computed in f32 exactly as the CPU
// does (src/ops/rope.rs), so only cos/sin differ in the last ulps.
// (x1, x2) <- (x1 cos a - x2 sin a, x2 cos a + x1 sin a), a = pos * inv_freq[i].
template <typename T>
__device__ void rope_impl(T* x, const u32* pos, const float* inv_freq, int rows, int heads, int d) {
    int half = d / 2;
    long n = (long)rows * heads * half;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        int i = (int)(t % half);
        long rh = t / half;
        int r = (int)(rh / heads);
        float a = (float)pos[r] * inv_freq[i];
        float c, s;
        sincosf(a, &s, &c);
        T* p = x + rh * d;
        float x1 = to_f32(p[i]), x2 = to_f32(p[i + half]);
        p[i] = from_f32<T>(x1 * c - x2 * s);
        p[i + half] = from_f32<T>(x2 * c + x1 * s);
    }
}

#define ROPE(T, S)                                                                                 \
    extern "C" __global__ void rope_##S(T* x, const u32* pos, const float* inv_freq, int rows,     \
                                        int heads, int d) {                                        \
        rope_impl<T>(x, pos, inv_freq, rows, heads, d);                                            \
    }
FOR_EACH_DTYPE(ROPE)
