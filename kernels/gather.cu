// The gather that drops pruned tokens: dst[i] = src[idx[i]] for rows of `width` values. Used on
// hidden states ([tokens, hidden]) and on each layer's KV cache ([tokens, kv_heads * d]).
template <typename T>
__device__ void gather_rows_impl(const T* src, const u32* idx, T* dst, int n, int width) {
    long total = (long)n * width;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < total; t += (long)gridDim.x * blockDim.x) {
        long r = t / width;
        int c = (int)(t % width);
        dst[t] = src[(long)idx[r] * width + c];
    }
}

#define GATHER(T, S)                                                                               \
    extern "C" __global__ void gather_rows_##S(const T* src, const u32* idx, T* dst, int n,        \
                                               int width) {                                        \
        gather_rows_impl<T>(src, idx, dst, n, width);                                              \
    }
FOR_EACH_DTYPE(GATHER)

// Column concatenation, one part at a time: dst[r, offset + c] = src[r, c] for src: [rows, cols]
// and dst: [rows, dst_cols] (the features of several vision layers side by side).
template <typename T>
__device__ void copy_cols_impl(const T* src, T* dst, int rows, int cols, int dst_cols, int offset) {
    long total = (long)rows * cols;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < total; t += (long)gridDim.x * blockDim.x) {
        long r = t / cols;
        int c = (int)(t % cols);
        dst[r * dst_cols + offset + c] = src[t];
    }
}

#define COPY_COLS(T, S)                                                                            \
    extern "C" __global__ void copy_cols_##S(const T* src, T* dst, int rows, int cols,             \
                                             int dst_cols, int offset) {                           \
        copy_cols_impl<T>(src, dst, rows, cols, dst_cols, offset);                                 \
    }
FOR_EACH_DTYPE(COPY_COLS)
