// AdamW (torch.optim.AdamW's arithmetic, as optim::adamw) and the global gradient norm.
//
// AdamW, element-wise with the step's scalars computed on the host in f64 then rounded to f32
// exactly as optim::adamw::StepScalars does:
//   p ← p·decay;  m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²
//   p ← p − step_size · m / (sqrt(v) / bias_correction2_sqrt + eps)
// with g scaled by `grad_scale` first (the clipping factor; 1 when not clipping). The f32 master
// weight is updated; when `weight_bf16` is not null the bf16 compute copy is rewritten from it.

extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, u64 n,
                                      float grad_scale, float decay, float one_minus_beta1,
                                      float beta2, float one_minus_beta2, float step_size,
                                      float bias_correction2_sqrt, float eps,
                                      bf16_t* weight_bf16) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * grad_scale;
    float x = p[i] * decay;
    float w = one_minus_beta1;
    float mi = m[i];
    // torch's lerp(m, g, w): two algebraically equal forms chosen by |w| < 0.5.
    mi = fabsf(w) < 0.5f ? mi + w * (gi - mi) : gi - (gi - mi) * (1.0f - w);
    float vi = v[i] * beta2 + one_minus_beta2 * gi * gi;
    float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
    x += -step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
    p[i] = x;
    if (weight_bf16) weight_bf16[i] = f32_to_bf16(x);
}

// Global gradient norm, first pass: partial[block] = Σ_{i in the block's grid-stride range} g_i²
// accumulated in f64 (a fixed order per thread, then a pairwise tree over the block's threads
// that is correct for any block size ≤ 1024, not only powers of two). Second pass: `sum_f64`
// adds the partials of every tensor in order on one block. No atomics: same bits every run.
extern "C" __global__ void __launch_bounds__(1024) sum_squares(const float* g, u64 n,
                                                               double* partial) {
    __shared__ double scratch[1024];
    double acc = 0.0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        double x = g[i];
        acc += x * x;
    }
    int t = threadIdx.x, nt = blockDim.x;
    scratch[t] = acc;
    __syncthreads();
    // Halve the smallest power of two ≥ nt: thread t < s adds t + s when that thread exists.
    int span = 1;
    while (span < nt) span <<= 1;
    for (int s = span >> 1; s > 0; s >>= 1) {
        if (t < s && t + s < nt) scratch[t] += scratch[t + s];
        __syncthreads();
    }
    if (t == 0) partial[blockIdx.x] = scratch[0];
}

// out[0] = Σ_i x[i] in index order (one thread: the partials are few).
extern "C" __global__ void sum_f64(const double* x, u64 n, double* out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double acc = 0.0;
    for (u64 i = 0; i < n; ++i) acc += x[i];
    out[0] = acc;
}
