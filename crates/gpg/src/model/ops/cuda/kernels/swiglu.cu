// SwiGLU: h = silu(g) ⊙ u, silu(g) = g·σ(g), element-wise over n values.
//
// Backward: dg = dh·u·σ(g)·(1 + g·(1 − σ(g))),  du = dh·silu(g).

template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* h, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gv = load(g, i);
    float s = 1.0f / (1.0f + expf(-gv));
    store(h, i, gv * s * load(u, i));
}

template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dh, T* dg, T* du, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gv = load(g, i), uv = load(u, i), d = load(dh, i);
    float s = 1.0f / (1.0f + expf(-gv));
    store(dg, i, d * uv * s * (1.0f + gv * (1.0f - s)));
    store(du, i, d * gv * s);
}

extern "C" __global__ void swiglu_fwd_f32(const float* g, const float* u, float* h, u64 n) {
    swiglu_fwd(g, u, h, n);
}
extern "C" __global__ void swiglu_fwd_bf16(const bf16_t* g, const bf16_t* u, bf16_t* h, u64 n) {
    swiglu_fwd(g, u, h, n);
}
extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* u, const float* dh,
                                          float* dg, float* du, u64 n) {
    swiglu_bwd(g, u, dh, dg, du, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const bf16_t* g, const bf16_t* u, const bf16_t* dh,
                                           bf16_t* dg, bf16_t* du, u64 n) {
    swiglu_bwd(g, u, dh, dg, du, n);
}
