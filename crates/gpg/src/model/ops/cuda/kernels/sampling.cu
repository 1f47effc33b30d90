// Drawing the next token of every row on the GPU; only (token, log-prob, status) go back.
//
// Row r's logits z [V] (overwritten as scratch); with T the temperature (0 = greedy):
//   e_i = exp(z_i/T − max),  Z = Σ e_i,  log π(i) = ln e_i − ln Z   (T = 1 when greedy),
// the log-prob of the full tempered distribution, before truncation (as rollout::sampling).
// Greedy: the first index of the maximum. Otherwise the kept set K is
//   top-k: {i : e_i ≥ τ_k}, τ_k the largest threshold with |{e_i ≥ τ_k}| ≥ k,
//   top-p: then {i ∈ K : e_i ≥ τ_p}, τ_p the largest threshold with Σ_{e_i ≥ τ_p} e_i ≥ p·Σ_K e_i,
// both found by bisection on the bit patterns of the non-negative e_i (their order is the
// integer order of the bits), and the token is the first i (in vocabulary order) at which the
// running sum of the kept e_i exceeds u·Σ_K e_i, u ∈ [0, 1) the row's uniform drawn on the host
// from the row's own seeded stream. Ties at a threshold are all kept (the CPU keeps exactly k,
// breaking ties by index): with continuous logits the kept sets agree. One block per row; every
// sum in a fixed order (per-thread contiguous chunks, then the block tree).
//
// status[r]: 0 ok, 1 non-finite logits (the host turns it into an error naming the row).

#define SAMPLE_THREADS 1024

__device__ float masked_sum(const float* e, int v, float thr, float* scratch) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) acc += e[i] >= thr ? e[i] : 0.0f;
    return block_sum(acc, scratch);
}

__device__ float masked_count(const float* e, int v, float thr, float* scratch) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) acc += e[i] >= thr ? 1.0f : 0.0f;
    return block_sum(acc, scratch);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(float* z, int v, float temperature, int top_k, float top_p,
                const double* uniforms, u32* tokens, float* logprobs, u32* status) {
    __shared__ float scratch[32];
    __shared__ float chunk_sums[SAMPLE_THREADS];
    u64 r = blockIdx.x;
    float* e = z + r * v;
    bool greedy = temperature == 0.0f;
    float inv_t = greedy ? 1.0f : 1.0f / temperature;
    float mx = NEG_INF;
    float bad = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float x = e[i];
        if (!isfinite(x)) bad = 1.0f;
        x *= inv_t;
        e[i] = x;
        mx = fmaxf(mx, x);
    }
    bad = block_max(bad, scratch);
    if (bad > 0.0f) {
        if (threadIdx.x == 0) {
            status[r] = 1;
            tokens[r] = 0;
            logprobs[r] = 0.0f;
        }
        return;
    }
    mx = block_max(mx, scratch);
    if (greedy) {
        // First index of the maximum: the smallest i with e_i == max.
        float first = (float)v;
        for (int i = threadIdx.x; i < v; i += blockDim.x)
            if (e[i] == mx) first = fminf(first, (float)i);
        first = -block_max(-first, scratch);
        float zsum = 0.0f;
        for (int i = threadIdx.x; i < v; i += blockDim.x) zsum += expf(e[i] - mx);
        zsum = block_sum(zsum, scratch);
        if (threadIdx.x == 0) {
            status[r] = 0;
            tokens[r] = (u32)first;
            logprobs[r] = -logf(zsum);
        }
        return;
    }
    float zsum = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        float x = expf(e[i] - mx);
        e[i] = x;
        zsum += x;
    }
    zsum = block_sum(zsum, scratch);
    // Thresholds by bisection on the bits of e ∈ [0, 1] (the maximum is exp(0) = 1).
    float thr = 0.0f;
    if (top_k > 0 && top_k < v) {
        u32 lo = 0, hi = 0x3f800000u;  // count(e ≥ lo) ≥ k always; find the largest such lo
        while (lo < hi) {
            u32 mid = lo + (hi - lo + 1) / 2;
            if (masked_count(e, v, __uint_as_float(mid), scratch) >= (float)top_k) lo = mid;
            else hi = mid - 1;
        }
        thr = __uint_as_float(lo);
    }
    float kept = masked_sum(e, v, thr, scratch);
    if (top_p < 1.0f) {
        float target = top_p * kept;
        u32 lo = __float_as_uint(thr), hi = 0x3f800000u;
        while (lo < hi) {
            u32 mid = lo + (hi - lo + 1) / 2;
            if (masked_sum(e, v, __uint_as_float(mid), scratch) >= target) lo = mid;
            else hi = mid - 1;
        }
        thr = __uint_as_float(lo);
        kept = masked_sum(e, v, thr, scratch);
    }
    // Inverse CDF over the kept set in vocabulary order: thread t owns a contiguous chunk.
    int per = (v + blockDim.x - 1) / blockDim.x;
    int a = min(v, (int)threadIdx.x * per), b = min(v, a + per);
    float mine = 0.0f;
    for (int i = a; i < b; ++i) mine += e[i] >= thr ? e[i] : 0.0f;
    chunk_sums[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float u = (float)(uniforms[r] * (double)kept);
        int t = 0;
        for (; t < (int)blockDim.x; ++t) {
            if (u < chunk_sums[t]) break;
            u -= chunk_sums[t];
        }
        int token = -1, last = -1;
        if (t < (int)blockDim.x) {
            int ta = min(v, t * per), tb = min(v, ta + per);
            for (int i = ta; i < tb; ++i) {
                float w = e[i] >= thr ? e[i] : 0.0f;
                if (w > 0.0f) {
                    if (u < w) { token = i; break; }
                    last = i;
                }
                u -= w;
            }
            if (token < 0) token = last;
        }
        if (token < 0) {
            // Rounding left u beyond the total: the last kept token.
            for (int i = v - 1; i >= 0; --i)
                if (e[i] >= thr && e[i] > 0.0f) { token = i; break; }
        }
        status[r] = 0;
        tokens[r] = (u32)token;
        logprobs[r] = logf(e[token]) - logf(zsum);
    }
}
