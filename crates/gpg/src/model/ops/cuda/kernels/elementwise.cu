// Small element-wise kernels around the cuBLAS products.

// y[r, j] += b[j] for rows × n values (the bias of a linear layer).
extern "C" __global__ void add_bias_f32(float* y, const float* b, u64 rows, int n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * n) return;
    y[i] += b[i % n];
}

// y = bf16(x): activations rounded to bf16 before a bf16 × bf16 → f32 product (the CPU's
// mixed-precision products round them the same way).
extern "C" __global__ void cast_f32_bf16(const float* x, bf16_t* y, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = f32_to_bf16(x[i]);
}

// y = f32(x).
extern "C" __global__ void cast_bf16_f32(const bf16_t* x, float* y, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = bf16_to_f32(x[i]);
}

// y[i] += x[i] (summing gradient contributions, e.g. the residual stream's two paths).
extern "C" __global__ void add_f32(float* y, const float* x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] += x[i];
}

// A bias gradient out[j] += Σ_r x[r, j] over `rows` rows of n values, as a two-pass reduction
// (no atomics, a fixed order): `col_sum_parts` sums each part of `rows_per_part` consecutive
// rows per column (grid: column blocks × parts; rows in order within a part), then
// `add_sum_parts` adds the parts in part order to out.
extern "C" __global__ void col_sum_parts(const float* x, int rows, int n, int rows_per_part,
                                         float* partial) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int part = blockIdx.y;
    int r0 = part * rows_per_part, r1 = min(rows, r0 + rows_per_part);
    float acc = 0.0f;
    for (int r = r0; r < r1; ++r) acc += x[(u64)r * n + j];
    partial[(u64)part * n + j] = acc;
}

// out[j] += Σ_p partial[p][j], p in increasing order.
extern "C" __global__ void add_sum_parts(const float* partial, int parts, int n, float* out) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float acc = 0.0f;
    for (int p = 0; p < parts; ++p) acc += partial[(u64)p * n + j];
    out[j] += acc;
}
