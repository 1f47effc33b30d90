// RMSNorm over the last axis, rows of H values (x in T: f32 or bf16; weight, rstd f32).
//
// Forward:  rstd_r = 1 / sqrt(mean_j x_rj² + eps),  y_rj = x_rj · rstd_r · w_j.
// Backward: with x̂ = x·rstd and c_r = (1/H) Σ_j dy_rj·w_j·x̂_rj,
//   dx_rj = rstd_r · (dy_rj·w_j − x̂_rj · c_r),
//   dw_j  = Σ_r dy_rj · x̂_rj   (per-row-block partials, then summed in block order: no atomics).
// One block per row; blockDim.x threads stride over the row.

template <typename T>
__device__ void rms_norm_fwd(const T* x, const float* w, float eps, int h, T* y, float* rstd) {
    __shared__ float scratch[32];
    u64 r = blockIdx.x;
    const T* xr = x + r * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float v = load(xr, j);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float rs = rsqrtf(ss / (float)h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        store(y + r * h, j, load(xr, j) * rs * w[j]);
    }
    if (threadIdx.x == 0) rstd[r] = rs;
}

extern "C" __global__ void rms_norm_fwd_f32(const float* x, const float* w, float eps, int h,
                                            float* y, float* rstd) {
    rms_norm_fwd(x, w, eps, h, y, rstd);
}
extern "C" __global__ void rms_norm_fwd_bf16(const bf16_t* x, const float* w, float eps, int h,
                                             bf16_t* y, float* rstd) {
    rms_norm_fwd(x, w, eps, h, y, rstd);
}

// dx for one row per block; dw_partial[blockIdx.y][j] = Σ over the rows r ≡ this block's
// rows_per_part consecutive rows of dy_rj·x̂_rj. Grid: one block per part, rows in order.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const float* w, const float* rstd, const T* dy, int h,
                             int rows, int rows_per_part, T* dx, float* dw_partial) {
    __shared__ float scratch[32];
    int part = blockIdx.x;
    int r0 = part * rows_per_part;
    int r1 = min(rows, r0 + rows_per_part);
    for (int r = r0; r < r1; ++r) {
        const T* xr = x + (u64)r * h;
        const T* dyr = dy + (u64)r * h;
        float rs = rstd[r];
        float c = 0.0f;
        for (int j = threadIdx.x; j < h; j += blockDim.x) {
            c += load(dyr, j) * w[j] * load(xr, j) * rs;
        }
        c = block_sum(c, scratch) / (float)h;
        for (int j = threadIdx.x; j < h; j += blockDim.x) {
            float xh = load(xr, j) * rs;
            store(dx + (u64)r * h, j, rs * (load(dyr, j) * w[j] - xh * c));
        }
    }
    // The part's dw contribution, each column summed over the part's rows in row order.
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float acc = 0.0f;
        for (int r = r0; r < r1; ++r) {
            acc += load(dy + (u64)r * h, j) * load(x + (u64)r * h, j) * rstd[r];
        }
        dw_partial[(u64)part * h + j] = acc;
    }
}

extern "C" __global__ void rms_norm_bwd_f32(const float* x, const float* w, const float* rstd,
                                            const float* dy, int h, int rows, int rows_per_part,
                                            float* dx, float* dw_partial) {
    rms_norm_bwd(x, w, rstd, dy, h, rows, rows_per_part, dx, dw_partial);
}
extern "C" __global__ void rms_norm_bwd_bf16(const bf16_t* x, const float* w, const float* rstd,
                                             const bf16_t* dy, int h, int rows,
                                             int rows_per_part, bf16_t* dx, float* dw_partial) {
    rms_norm_bwd(x, w, rstd, dy, h, rows, rows_per_part, dx, dw_partial);
}

// out[j] = Σ_p partial[p][j], p in increasing order (the deterministic second pass of dw and
// of every other column reduction).
extern "C" __global__ void sum_parts(const float* partial, int parts, int h, float* out) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h) return;
    float acc = 0.0f;
    for (int p = 0; p < parts; ++p) acc += partial[(u64)p * h + j];
    out[j] = acc;
}
