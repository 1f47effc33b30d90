// The output head fused with log-softmax, gather and entropy, chunked over the vocabulary:
// cuBLAS writes one chunk of tempered logits z [rows, C] (columns c0..c0+C of the vocabulary,
// the τ⁻¹ folded into its alpha), then these kernels fold the chunk into per-row running
// statistics, so the rows × V logits never exist at once.
//
// Running state per row n (online softmax, chunk by chunk in vocabulary order):
//   m_n = max z,  l_n = Σ e^(z − m_n),  s_n = Σ e^(z − m_n)·z,  tgt_n = z[target_n]
// Final: lse_n = m_n + ln l_n,  logp_n = tgt_n − lse_n,  entropy_n = lse_n − s_n / l_n
//   (= −Σ p log p with p = e^(z − lse)).
// Backward, per chunk with g_n = ∂L/∂logp_n:  dz_nv = g_n·(1[v = target_n] − e^(z_nv − lse_n)),
// then cuBLAS: dh += τ⁻¹·dz·W_chunk, dW_chunk = τ⁻¹·dzᵀ·h.
// One block per row; reductions in a fixed order (deterministic).

extern "C" __global__ void head_chunk_fold(const float* z, int cols, int c0, const u32* targets,
                                           float* m, float* l, float* s, float* tgt) {
    __shared__ float scratch[32];
    u64 n = blockIdx.x;
    const float* zr = z + n * cols;
    float cm = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) cm = fmaxf(cm, zr[c]);
    cm = block_max(cm, scratch);
    float cl = 0.0f, cs = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float e = expf(zr[c] - cm);
        cl += e;
        cs += e * zr[c];
    }
    cl = block_sum(cl, scratch);
    cs = block_sum(cs, scratch);
    if (threadIdx.x == 0) {
        float m0 = m[n];
        float mn = fmaxf(m0, cm);
        float a = m0 == NEG_INF ? 0.0f : expf(m0 - mn);
        float b = expf(cm - mn);
        l[n] = l[n] * a + cl * b;
        s[n] = s[n] * a + cs * b;
        m[n] = mn;
        int t = (int)targets[n] - c0;
        if (t >= 0 && t < cols) tgt[n] = zr[t];
    }
}

// logp, entropy and lse from the running state (one thread per row).
extern "C" __global__ void head_finish(const float* m, const float* l, const float* s,
                                       const float* tgt, int rows, float* logp, float* entropy,
                                       float* lse) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= rows) return;
    float e = m[n] + logf(l[n]);
    lse[n] = e;
    logp[n] = tgt[n] - e;
    entropy[n] = e - s[n] / l[n];
}

// dz over one chunk, in place on z: z_nv ← g_n·(1[v = target_n] − e^(z_nv − lse_n)).
extern "C" __global__ void head_chunk_dlogits(float* z, int rows, int cols, int c0,
                                              const u32* targets, const float* lse,
                                              const float* g) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)rows * cols) return;
    int n = idx / cols, c = idx % cols;
    float p = expf(z[idx] - lse[n]);
    float onehot = ((int)targets[n] == c0 + c) ? 1.0f : 0.0f;
    z[idx] = g[n] * (onehot - p);
}
