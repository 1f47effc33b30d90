// Causal grouped-query attention over a packed variable-length batch, flash-style: one warp per
// query row streams the keys 32 at a time with the online softmax, so the T×T score matrix never
// exists. Layout: q [T, nh, hd], k, v [T, nkv, hd], out [T, nh, hd], lse [T, nh]; token t of a
// sequence spanning [start_t, end_t) attends to keys start_t..=t; head h reads kv head
// h / (nh / nkv). hd ≤ 256 and a multiple of 32.
//
//   s_ij = scale·q_i·k_j,  lse_i = log Σ_{j≤i} e^(s_ij),  P_ij = e^(s_ij − lse_i),
//   o_i = Σ_j P_ij·v_j.
// Backward (P recomputed from the saved lse):
//   D_i = dO_i·o_i,  dP_ij = dO_i·v_j,  dS_ij = P_ij·(dP_ij − D_i),
//   dq_i = scale·Σ_j dS_ij·k_j,  dk_j = scale·Σ_{i,h in group} dS_ij·q_i,  dv_j = Σ_{i,h} P_ij·dO_i.
// dq is computed query-major and dk, dv key-major (one warp per key row and kv head, looping
// over the queries and the heads of its group in order): no atomics, same bits every run.

#define HD_MAX 256
#define PER_LANE (HD_MAX / 32)

// Online-softmax state of one query row held by a warp: lane l owns dims l, l+32, ...
struct RowState {
    float m, l;
    float o[PER_LANE];
};

__device__ __forceinline__ float dot_row(const float* a, const float* b, int hd) {
    float s = 0.0f;
    for (int d = 0; d < hd; ++d) s += a[d] * b[d];
    return s;
}

// Folds keys [j0, j1) of one row into `st`. `q` is the query row (shared memory, scaled),
// key_at(j) / value_at(j) give the key and value rows of position j.
template <typename KeyAt, typename ValueAt>
__device__ void attend_range(RowState& st, const float* q, int hd, int j0, int j1, KeyAt key_at,
                             ValueAt value_at) {
    int lane = threadIdx.x & 31;
    int nd = hd / 32;
    for (int base = j0; base < j1; base += 32) {
        int j = base + lane;
        float s = j < j1 ? dot_row(q, key_at(j), hd) : NEG_INF;
        float cm = warp_max(s);
        float m_new = fmaxf(st.m, cm);
        float p = j < j1 ? expf(s - m_new) : 0.0f;
        float alpha = st.m == NEG_INF ? 0.0f : expf(st.m - m_new);
        st.l = st.l * alpha + warp_sum(p);
        for (int c = 0; c < nd; ++c) st.o[c] *= alpha;
        int n = min(32, j1 - base);
        for (int jj = 0; jj < n; ++jj) {
            float pj = __shfl_sync(0xffffffffu, p, jj);
            const float* vr = value_at(base + jj);
            for (int c = 0; c < nd; ++c) st.o[c] += pj * vr[lane + 32 * c];
        }
        st.m = m_new;
    }
}

// Grid (ceil(T / warps), nh), block warps·32 threads: warp w handles query t = blockIdx.x·warps + w.
extern "C" __global__ void attention_fwd(const float* q, const float* k, const float* v,
                                         const u32* seq_start, int tokens, int nh, int nkv,
                                         int hd, float scale, float* out, float* lse) {
    extern __shared__ float qs[];  // [warps, hd]
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int warps = blockDim.x >> 5;
    int t = blockIdx.x * warps + warp;
    int h = blockIdx.y;
    if (t >= tokens) return;
    int kvh = h / (nh / nkv);
    float* qrow = qs + warp * hd;
    for (int d = lane; d < hd; d += 32) qrow[d] = q[((u64)t * nh + h) * hd + d] * scale;
    __syncwarp();
    RowState st;
    st.m = NEG_INF;
    st.l = 0.0f;
    for (int c = 0; c < PER_LANE; ++c) st.o[c] = 0.0f;
    u64 kv_stride = (u64)nkv * hd;
    auto key_at = [&](int j) { return k + j * kv_stride + (u64)kvh * hd; };
    auto value_at = [&](int j) { return v + j * kv_stride + (u64)kvh * hd; };
    attend_range(st, qrow, hd, (int)seq_start[t], t + 1, key_at, value_at);
    float inv = 1.0f / st.l;
    for (int c = 0; c < hd / 32; ++c) out[((u64)t * nh + h) * hd + lane + 32 * c] = st.o[c] * inv;
    if (lane == 0) lse[(u64)t * nh + h] = st.m + logf(st.l);
}

// D[t, h] = dO[t, h, :]·out[t, h, :]. One warp per (t, h).
extern "C" __global__ void attention_bwd_dot(const float* dout, const float* out, int rows,
                                             int hd, float* dvec) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.x * (blockDim.x >> 5) + warp;
    if (r >= rows) return;
    float s = 0.0f;
    for (int d = lane; d < hd; d += 32) s += dout[(u64)r * hd + d] * out[(u64)r * hd + d];
    s = warp_sum(s);
    if (lane == 0) dvec[r] = s;
}

// dq, query-major. Grid (ceil(T / warps), nh).
extern "C" __global__ void attention_bwd_dq(const float* q, const float* k, const float* v,
                                            const float* dout, const float* lse,
                                            const float* dvec, const u32* seq_start, int tokens,
                                            int nh, int nkv, int hd, float scale, float* dq) {
    extern __shared__ float sh[];  // [warps, 2·hd]: q row, dO row
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int warps = blockDim.x >> 5;
    int t = blockIdx.x * warps + warp;
    int h = blockIdx.y;
    if (t >= tokens) return;
    int kvh = h / (nh / nkv);
    float* qrow = sh + warp * 2 * hd;
    float* drow = qrow + hd;
    u64 row = (u64)t * nh + h;
    for (int d = lane; d < hd; d += 32) {
        qrow[d] = q[row * hd + d];
        drow[d] = dout[row * hd + d];
    }
    __syncwarp();
    float l = lse[row], big_d = dvec[row];
    float acc[PER_LANE];
    for (int c = 0; c < PER_LANE; ++c) acc[c] = 0.0f;
    u64 kv_stride = (u64)nkv * hd;
    int j0 = seq_start[t], j1 = t + 1;
    for (int base = j0; base < j1; base += 32) {
        int j = base + lane;
        float ds = 0.0f;
        if (j < j1) {
            const float* kr = k + j * kv_stride + (u64)kvh * hd;
            const float* vr = v + j * kv_stride + (u64)kvh * hd;
            float p = expf(scale * dot_row(qrow, kr, hd) - l);
            ds = p * (dot_row(drow, vr, hd) - big_d);
        }
        int n = min(32, j1 - base);
        for (int jj = 0; jj < n; ++jj) {
            float dsj = __shfl_sync(0xffffffffu, ds, jj);
            const float* kr = k + (u64)(base + jj) * kv_stride + (u64)kvh * hd;
            for (int c = 0; c < hd / 32; ++c) acc[c] += dsj * kr[lane + 32 * c];
        }
    }
    for (int c = 0; c < hd / 32; ++c) dq[row * hd + lane + 32 * c] = scale * acc[c];
}

// dk, dv, key-major. Grid (ceil(T / warps), nkv): warp w handles key row j and kv head kvh,
// looping over the heads of the group and the queries j..end_j of its sequence.
extern "C" __global__ void attention_bwd_dkv(const float* q, const float* k, const float* v,
                                             const float* dout, const float* lse,
                                             const float* dvec, const u32* seq_end, int tokens,
                                             int nh, int nkv, int hd, float scale, float* dk,
                                             float* dv) {
    extern __shared__ float sh[];  // [warps, 2·hd]: k row, v row
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int warps = blockDim.x >> 5;
    int j = blockIdx.x * warps + warp;
    int kvh = blockIdx.y;
    if (j >= tokens) return;
    int group = nh / nkv;
    u64 kv_row = (u64)j * nkv + kvh;
    float* krow = sh + warp * 2 * hd;
    float* vrow = krow + hd;
    for (int d = lane; d < hd; d += 32) {
        krow[d] = k[kv_row * hd + d];
        vrow[d] = v[kv_row * hd + d];
    }
    __syncwarp();
    float adk[PER_LANE], adv[PER_LANE];
    for (int c = 0; c < PER_LANE; ++c) adk[c] = adv[c] = 0.0f;
    int i1 = seq_end[j];
    for (int g = 0; g < group; ++g) {
        int h = kvh * group + g;
        for (int base = j; base < i1; base += 32) {
            int i = base + lane;
            float p = 0.0f, ds = 0.0f;
            if (i < i1) {
                u64 row = (u64)i * nh + h;
                p = expf(scale * dot_row(q + row * hd, krow, hd) - lse[row]);
                ds = p * (dot_row(dout + row * hd, vrow, hd) - dvec[row]);
            }
            int n = min(32, i1 - base);
            for (int ii = 0; ii < n; ++ii) {
                float pi = __shfl_sync(0xffffffffu, p, ii);
                float dsi = __shfl_sync(0xffffffffu, ds, ii);
                u64 row = (u64)(base + ii) * nh + h;
                for (int c = 0; c < hd / 32; ++c) {
                    adv[c] += pi * dout[row * hd + lane + 32 * c];
                    adk[c] += dsi * q[row * hd + lane + 32 * c];
                }
            }
        }
    }
    for (int c = 0; c < hd / 32; ++c) {
        dk[kv_row * hd + lane + 32 * c] = scale * adk[c];
        dv[kv_row * hd + lane + 32 * c] = adv[c];
    }
}

// ---- Decoding: one new query per row against its KV cache held in fixed-size blocks. ----
//
// Pools k_pool, v_pool [n_blocks, block, kv_dim] (one pair per layer); row r's position p lives
// in block block_table[r·max_blocks + p / block] at slot p % block. lens[r] = positions cached
// (the new one included). Grid (rows, nh), block warps·32 threads: warp w folds the keys of its
// contiguous slice of 0..len, then warp 0 merges the warps' (m, l, o) in warp order.

extern "C" __global__ void kv_append(const float* k_new, const float* v_new, const u32* block_table,
                                     const u32* lens_before, int rows, int max_blocks, int block,
                                     int kv_dim, float* k_pool, float* v_pool) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)rows * kv_dim) return;
    int r = idx / kv_dim, e = idx % kv_dim;
    u32 p = lens_before[r];
    u64 slot = (u64)block_table[(u64)r * max_blocks + p / block] * block + p % block;
    k_pool[slot * kv_dim + e] = k_new[idx];
    v_pool[slot * kv_dim + e] = v_new[idx];
}

// k_pool[slots[i]] = k_src[src_rows[i]] (and v) for i < n: a prefilled prompt's keys and values
// copied into the blocks of each of its rows.
extern "C" __global__ void kv_write_rows(const float* k_src, const float* v_src, const u32* src_rows,
                                         const u32* slots, int n, int kv_dim, float* k_pool,
                                         float* v_pool) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)n * kv_dim) return;
    u64 i = idx / kv_dim, e = idx % kv_dim;
    u64 src = (u64)src_rows[i] * kv_dim + e, dst = (u64)slots[i] * kv_dim + e;
    k_pool[dst] = k_src[src];
    v_pool[dst] = v_src[src];
}

extern "C" __global__ void attention_decode_paged(const float* q, const float* k_pool,
                                                  const float* v_pool, const u32* block_table,
                                                  const u32* lens, int max_blocks, int block,
                                                  int nh, int nkv, int hd, float scale,
                                                  float* out) {
    extern __shared__ float sh[];  // q row [hd], then per warp: m, l, o[hd]
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int warps = blockDim.x >> 5;
    int r = blockIdx.x, h = blockIdx.y;
    int kvh = h / (nh / nkv);
    int kv_dim = nkv * hd;
    float* qrow = sh;
    float* merge = sh + hd;  // [warps, 2 + hd]
    for (int d = threadIdx.x; d < hd; d += blockDim.x)
        qrow[d] = q[((u64)r * nh + h) * hd + d] * scale;
    __syncthreads();
    int len = lens[r];
    int per = (len + warps - 1) / warps;
    int j0 = min(len, warp * per), j1 = min(len, j0 + per);
    const u32* table = block_table + (u64)r * max_blocks;
    auto slot = [&](int p) { return ((u64)table[p / block] * block + p % block) * kv_dim + (u64)kvh * hd; };
    auto key_at = [&](int p) { return k_pool + slot(p); };
    auto value_at = [&](int p) { return v_pool + slot(p); };
    RowState st;
    st.m = NEG_INF;
    st.l = 0.0f;
    for (int c = 0; c < PER_LANE; ++c) st.o[c] = 0.0f;
    attend_range(st, qrow, hd, j0, j1, key_at, value_at);
    float* mine = merge + warp * (2 + hd);
    if (lane == 0) {
        mine[0] = st.m;
        mine[1] = st.l;
    }
    for (int c = 0; c < hd / 32; ++c) mine[2 + lane + 32 * c] = st.o[c];
    __syncthreads();
    if (warp != 0) return;
    float m = NEG_INF;
    for (int w = 0; w < warps; ++w) m = fmaxf(m, merge[w * (2 + hd)]);
    float l = 0.0f;
    float o[PER_LANE];
    for (int c = 0; c < PER_LANE; ++c) o[c] = 0.0f;
    for (int w = 0; w < warps; ++w) {
        float mw = merge[w * (2 + hd)];
        float a = mw == NEG_INF ? 0.0f : expf(mw - m);
        l += merge[w * (2 + hd) + 1] * a;
        for (int c = 0; c < hd / 32; ++c) o[c] += merge[w * (2 + hd) + 2 + lane + 32 * c] * a;
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int c = 0; c < hd / 32; ++c) out[((u64)r * nh + h) * hd + lane + 32 * c] = o[c] * inv;
}
