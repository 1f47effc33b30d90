// Rotary position embedding, HF "rotate_half" convention (Qwen2), in place on x [T, n, d].
//
// For i < d/2 with the angle a = positions[t]·inv_freq_i (cos/sin tables precomputed on the
// host exactly as ops::Rope does, [max_positions, d/2]):
//   forward:  y_i = x_i·cos a − x_{i+d/2}·sin a,   y_{i+d/2} = x_{i+d/2}·cos a + x_i·sin a
//   backward: the inverse rotation (sin → −sin): dx = R(pos)ᵀ·dy.
// One thread per (t, head, i) pair; `sign` is +1 forward, −1 backward.

template <typename T>
__device__ void rope_apply(T* x, const u32* positions, const float* cos_t, const float* sin_t,
                           int tokens, int heads, int head_dim, float sign) {
    int half = head_dim / 2;
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 total = (u64)tokens * heads * half;
    if (idx >= total) return;
    int i = idx % half;
    u64 th = idx / half;  // t * heads + head
    int t = th / heads;
    u64 base = th * head_dim;
    u64 tab = (u64)positions[t] * half + i;
    float c = cos_t[tab], s = sign * sin_t[tab];
    float a = load(x, base + i), b = load(x, base + i + half);
    store(x, base + i, a * c - b * s);
    store(x, base + i + half, b * c + a * s);
}

extern "C" __global__ void rope_f32(float* x, const u32* positions, const float* cos_t,
                                    const float* sin_t, int tokens, int heads, int head_dim,
                                    float sign) {
    rope_apply(x, positions, cos_t, sin_t, tokens, heads, head_dim, sign);
}
extern "C" __global__ void rope_bf16(bf16_t* x, const u32* positions, const float* cos_t,
                                     const float* sin_t, int tokens, int heads, int head_dim,
                                     float sign) {
    rope_apply(x, positions, cos_t, sin_t, tokens, heads, head_dim, sign);
}
