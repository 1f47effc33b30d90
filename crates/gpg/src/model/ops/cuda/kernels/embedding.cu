// Embedding gather and its backward, the scatter-add, for a table E [V, H] (f32 or bf16).
//
// Forward:  x[t, :] = E[ids[t], :]                          (x in f32)
// Backward: dE[v, :] = Σ_{t : ids[t] = v} dx[t, :]
// The scatter-add runs without atomics: the host groups the token indices by id (a counting
// sort, stable: tokens in increasing order within each id), giving `unique` ids, CSR offsets
// [n_unique + 1] and the sorted token list; block u sums the rows of its id in that order and
// adds them to dE[unique[u], :] (the gradient buffer may already hold other contributions).

template <typename T>
__device__ void embedding_fwd(const T* table, const u32* ids, int h, float* x) {
    u64 t = blockIdx.x;
    u64 row = ids[t];
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        x[t * h + j] = load(table, row * h + j);
    }
}

extern "C" __global__ void embedding_fwd_f32(const float* table, const u32* ids, int h, float* x) {
    embedding_fwd(table, ids, h, x);
}
extern "C" __global__ void embedding_fwd_bf16(const bf16_t* table, const u32* ids, int h,
                                              float* x) {
    embedding_fwd(table, ids, h, x);
}

extern "C" __global__ void embedding_bwd(const float* dx, const u32* unique, const u32* offsets,
                                         const u32* sorted_tokens, int h, float* d_table) {
    u32 u = blockIdx.x;
    u64 row = unique[u];
    u32 a = offsets[u], b = offsets[u + 1];
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float acc = 0.0f;
        for (u32 k = a; k < b; ++k) acc += dx[(u64)sorted_tokens[k] * h + j];
        d_table[row * h + j] += acc;
    }
}
