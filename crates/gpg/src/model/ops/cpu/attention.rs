//! Causal grouped-query attention kernels over a packed variable-length batch.
//!
//! Layout: q, out, dq are `[T, nh, hd]`, k, v, dk, dv are `[T, nkv, hd]`, lse is `[T, nh]`, all
//! row-major; sequence s is token rows `offsets[s]..offsets[s+1]`. Query head h reads kv head
//! h / (nh / nkv).
//!
//! Tiling: queries are processed in blocks of [`Q_BLOCK`] rows; a block at rows qs..qe of a
//! sequence only needs keys 0..qe (causality), so the score block is (qe−qs) × qe and the full
//! L × L matrix never exists. Each block's softmax is exact (the block holds whole rows).
//! Products are `gemm` calls on strided views straight into q/k/v/out (no gathering copies).

use super::matmul::{gemm, MatMut, MatRef, Threads};
use super::simd::{axpy, dot, exp, exp_shift_sum, max, scale as scale_in_place, vectorize};
use rayon::prelude::*;

/// Query rows per block.
pub(crate) const Q_BLOCK: usize = 64;

/// Head counts and width of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// A raw pointer that may cross threads; every use writes a region no other task touches.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: the tasks that share it write pairwise-disjoint elements (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// The view's elements must be inside the buffer and written by no other task.
    unsafe fn view<'a>(self, offset: usize, rows: usize, cols: usize, stride: usize) -> MatMut<'a> {
        MatMut::from_raw(self.0.add(offset), rows, cols, stride)
    }

    /// # Safety
    /// Element `index` must be inside the buffer and written by no other task.
    unsafe fn write(self, index: usize, value: f32) {
        *self.0.add(index) = value;
    }
}

/// The query blocks of a packed batch: (sequence start row, block start, block end) with
/// block bounds relative to the sequence.
fn query_blocks(offsets: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut blocks = Vec::new();
    for w in offsets.windows(2) {
        let len = w[1] - w[0];
        let mut qs = 0;
        while qs < len {
            let qe = (qs + Q_BLOCK).min(len);
            blocks.push((w[0], qs, qe));
            qs = qe;
        }
    }
    blocks
}

/// Softmax of one causal score row in place: `row` holds scale·q·k_j for j < row.len(),
/// entries j ≥ `valid` are masked. Writes p_j (0 for masked) and returns lse = log Σ_j e^(s_j).
#[inline(always)]
fn softmax_row(row: &mut [f32], valid: usize) -> f32 {
    let (live, masked) = row.split_at_mut(valid);
    let m = max(live);
    let l = exp_shift_sum(live, m);
    scale_in_place(live, 1.0 / l);
    masked.fill(0.0);
    m + l.ln()
}

/// out = softmax(scale·QKᵀ + causal mask)·V per (sequence, head); lse[t, h] = log Σ_j e^(s_tj).
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    offsets: &[usize],
    dims: Heads,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let Heads {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    } = dims;
    let (group, scale) = (dims.group(), dims.scale());
    let tasks: Vec<(usize, usize, usize, usize)> = query_blocks(offsets)
        .into_iter()
        .flat_map(|(o, qs, qe)| (0..nh).map(move |h| (o, qs, qe, h)))
        .collect();
    let out_ptr = SharedMut(out.as_mut_ptr());
    let lse_ptr = SharedMut(lse.as_mut_ptr());
    let (out_len, lse_len) = (out.len(), lse.len());
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, &(o, qs, qe, h)| {
            let g = h / group;
            let m = qe - qs;
            scores.resize(m * qe, 0.0);
            let q_blk = MatRef::strided(&q[((o + qs) * nh + h) * hd..], m, hd, nh * hd);
            let k_seq = MatRef::strided(&k[(o * nkv + g) * hd..], qe, hd, nkv * hd);
            let v_seq = MatRef::strided(&v[(o * nkv + g) * hd..], qe, hd, nkv * hd);
            gemm(
                MatMut::row_major(scores, m, qe),
                q_blk,
                k_seq.t(),
                false,
                scale,
                Threads::One,
            );
            vectorize(|| {
                for (i, row) in scores.chunks_exact_mut(qe).enumerate() {
                    let idx = (o + qs + i) * nh + h;
                    assert!(idx < lse_len);
                    // SAFETY: (token o+qs+i, head h) belongs to this task only.
                    unsafe { lse_ptr.write(idx, softmax_row(row, qs + i + 1)) };
                }
            });
            let start = ((o + qs) * nh + h) * hd;
            assert!(start + (m - 1) * nh * hd + hd <= out_len);
            // SAFETY: rows (o+qs..o+qe, head h) of out are in bounds (checked) and written by this
            // task only.
            let out_blk = unsafe { out_ptr.view(start, m, hd, nh * hd) };
            gemm(
                out_blk,
                MatRef::row_major(scores, m, qe),
                v_seq,
                false,
                1.0,
                Threads::One,
            );
        });
}

/// Gradients of the attention, recomputing P from lse (flash-attention style). Per row i of a
/// (sequence, head): P_ij = e^(s_ij − lse_i) (0 for j > i), D_i = dO_i·O_i,
/// dP_ij = dO_i·V_j, dS_ij = P_ij·(dP_ij − D_i); then dQ_i = scale·Σ_j dS_ij·K_j,
/// dK_j += scale·Σ_i dS_ij·Q_i, dV_j += Σ_i P_ij·dO_i (summed over the heads of a kv group).
/// `dq`, `dk`, `dv` must be zero on entry.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    offsets: &[usize],
    dims: Heads,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let Heads {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    } = dims;
    let (group, scale) = (dims.group(), dims.scale());
    // One task per (sequence, kv head): it owns dK and dV of that pair and dQ of the pair's
    // query heads, so no two tasks write the same element.
    let tasks: Vec<(usize, usize, usize)> = offsets
        .windows(2)
        .filter(|w| w[1] > w[0])
        .flat_map(|w| (0..nkv).map(move |g| (w[0], w[1] - w[0], g)))
        .collect();
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    let (dq_len, dkv_len) = (dq.len(), dk.len().min(dv.len()));
    tasks.par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(p_buf, dp_buf, d_buf): &mut (Vec<f32>, Vec<f32>, Vec<f32>), &(o, len, g)| {
            let kv_start = (o * nkv + g) * hd;
            assert!(kv_start + (len - 1) * nkv * hd + hd <= dkv_len);
            let mut qs = 0;
            while qs < len {
                let qe = (qs + Q_BLOCK).min(len);
                let m = qe - qs;
                p_buf.resize(m * qe, 0.0);
                dp_buf.resize(m * qe, 0.0);
                d_buf.resize(m, 0.0);
                let k_blk = MatRef::strided(&k[kv_start..], qe, hd, nkv * hd);
                let v_blk = MatRef::strided(&v[kv_start..], qe, hd, nkv * hd);
                for h in g * group..(g + 1) * group {
                    let q_start = ((o + qs) * nh + h) * hd;
                    let q_blk = MatRef::strided(&q[q_start..], m, hd, nh * hd);
                    let do_blk = MatRef::strided(&dout[q_start..], m, hd, nh * hd);
                    // S = scale·Q Kᵀ (into p_buf) and dP = dO Vᵀ.
                    gemm(
                        MatMut::row_major(p_buf, m, qe),
                        q_blk,
                        k_blk.t(),
                        false,
                        scale,
                        Threads::One,
                    );
                    gemm(
                        MatMut::row_major(dp_buf, m, qe),
                        do_blk,
                        v_blk.t(),
                        false,
                        1.0,
                        Threads::One,
                    );
                    // P = e^(S − lse) in place (masked → 0), and D_i = dO_i·O_i.
                    vectorize(|| {
                        for (i, (p_row, d_i)) in
                            p_buf.chunks_exact_mut(qe).zip(d_buf.iter_mut()).enumerate()
                        {
                            let t = o + qs + i;
                            let row_lse = lse[t * nh + h];
                            let at = (t * nh + h) * hd;
                            *d_i = dot(&dout[at..at + hd], &out[at..at + hd]);
                            let (live, masked) = p_row.split_at_mut(qs + i + 1);
                            masked.fill(0.0);
                            for p in live.iter_mut() {
                                *p = exp(*p - row_lse);
                            }
                        }
                    });
                    // dV[0..qe] += Pᵀ dO.
                    // SAFETY: rows (o..o+qe, kv head g) of dv are in bounds (checked above) and
                    // written only by this task.
                    gemm(
                        unsafe { dv_ptr.view(kv_start, qe, hd, nkv * hd) },
                        MatRef::row_major(p_buf, m, qe).t(),
                        do_blk,
                        true,
                        1.0,
                        Threads::One,
                    );
                    // dS = P ⊙ (dP − D), stored over P (masked entries stay 0).
                    vectorize(|| {
                        for (i, ((p_row, dp_row), &d_i)) in p_buf
                            .chunks_exact_mut(qe)
                            .zip(dp_buf.chunks_exact(qe))
                            .zip(d_buf.iter())
                            .enumerate()
                        {
                            let valid = qs + i + 1;
                            for (p, dp) in p_row[..valid].iter_mut().zip(&dp_row[..valid]) {
                                *p *= dp - d_i;
                            }
                        }
                    });
                    // dQ = scale·dS K.
                    assert!(q_start + (m - 1) * nh * hd + hd <= dq_len);
                    // SAFETY: rows (o+qs..o+qe, head h) of dq are in bounds and belong to this
                    // task (h is in kv group g).
                    gemm(
                        unsafe { dq_ptr.view(q_start, m, hd, nh * hd) },
                        MatRef::row_major(p_buf, m, qe),
                        k_blk,
                        false,
                        scale,
                        Threads::One,
                    );
                    // dK[0..qe] += scale·dSᵀ Q.
                    // SAFETY: as for dv.
                    gemm(
                        unsafe { dk_ptr.view(kv_start, qe, hd, nkv * hd) },
                        MatRef::row_major(p_buf, m, qe).t(),
                        q_blk,
                        true,
                        scale,
                        Threads::One,
                    );
                }
                qs = qe;
            }
        },
    );
}

/// Cached positions whose scores are accumulated together in [`decode`] (a multiple of 8).
pub(crate) const DECODE_BLOCK: usize = 32;

/// One decoding step: a single query token `q` [nh·hd] attends to `len` cached positions;
/// writes `out` [nh·hd]. With no cached position the output is 0.
///
/// The keys are stored transposed in blocks of B = [`DECODE_BLOCK`] positions, `kt`
/// [nkv, cap/B, hd, B] (position t of kv head g, dimension d at
/// ((g·cap/B + t/B)·hd + d)·B + t mod B, `cap` a multiple of B ≥ len), so the scores of
/// DECODE_BLOCK consecutive positions are accumulated side by side in vector registers over d,
/// s_t = scale·Σ_d q_d·kt[d][t], without a horizontal sum per position. Values keep the row
/// layout `v` [len, nkv, hd]: o = Σ_t p_t·v_t. `scores` is scratch (grown as needed).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode(
    q: &[f32],
    kt: &[f32],
    cap: usize,
    v: &[f32],
    len: usize,
    dims: Heads,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let Heads {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
    } = dims;
    let (group, scale) = (dims.group(), dims.scale());
    let blocks = len.div_ceil(DECODE_BLOCK);
    let cap_blocks = cap / DECODE_BLOCK;
    if scores.len() < blocks * DECODE_BLOCK {
        scores.resize(blocks * DECODE_BLOCK, 0.0);
    }
    vectorize(|| {
        for h in 0..nh {
            let g = h / group;
            let qh = &q[h * hd..(h + 1) * hd];
            let oh = &mut out[h * hd..(h + 1) * hd];
            oh.fill(0.0);
            if len == 0 {
                continue;
            }
            for (b, sb) in scores[..blocks * DECODE_BLOCK]
                .chunks_exact_mut(DECODE_BLOCK)
                .enumerate()
            {
                let mut acc = [0.0f32; DECODE_BLOCK];
                for (d, &qd) in qh.iter().enumerate() {
                    let at = ((g * cap_blocks + b) * hd + d) * DECODE_BLOCK;
                    let row = &kt[at..at + DECODE_BLOCK];
                    for i in 0..DECODE_BLOCK {
                        acc[i] += qd * row[i];
                    }
                }
                for i in 0..DECODE_BLOCK {
                    sb[i] = acc[i] * scale;
                }
            }
            let s = &mut scores[..len];
            let m = max(s);
            let l = exp_shift_sum(s, m);
            let inv_l = 1.0 / l;
            if hd.is_multiple_of(DECODE_BLOCK) {
                // o[c..c+B] = Σ_t p_t·v_t[c..c+B], accumulated in registers over t.
                for (c, oc) in oh.chunks_exact_mut(DECODE_BLOCK).enumerate() {
                    let mut acc = [0.0f32; DECODE_BLOCK];
                    for (t, &p) in s.iter().enumerate() {
                        let at = (t * nkv + g) * hd + c * DECODE_BLOCK;
                        let vr = &v[at..at + DECODE_BLOCK];
                        for i in 0..DECODE_BLOCK {
                            acc[i] += p * vr[i];
                        }
                    }
                    for i in 0..DECODE_BLOCK {
                        oc[i] = acc[i] * inv_l;
                    }
                }
            } else {
                for (t, &p) in s.iter().enumerate() {
                    let at = (t * nkv + g) * hd;
                    axpy(oh, p * inv_l, &v[at..at + hd]);
                }
            }
        }
    });
}
