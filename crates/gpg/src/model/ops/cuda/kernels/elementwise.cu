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

// out[j] += Σ_r x[r, j] over `rows` rows of n values, rows in order (a bias gradient).
extern "C" __global__ void add_col_sums(const float* x, int rows, int n, float* out) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float acc = 0.0f;
    for (int r = 0; r < rows; ++r) acc += x[(u64)r * n + j];
    out[j] += acc;
}
