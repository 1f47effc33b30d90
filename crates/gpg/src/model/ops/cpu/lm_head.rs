//! Output head fused with log-softmax, gather and entropy, chunked over the vocabulary.
//!
//! h is `[n, hid]`, w is `[vocab, hid]`, both row-major. The vocabulary is processed
//! `chunk_cols` entries at a time: one `[n, chunk_cols]` logits buffer is the only vocab-sized
//! allocation, and each chunk of W is read (and packed by the matrix product) once per pass,
//! however many rows there are. The softmax statistics are accumulated online across chunks:
//! per row, with running maximum m, l = Σ e^(z−m) and s = Σ e^(z−m)·(z−m), a chunk with
//! maximum c and the new maximum m' = max(m, c) updates
//!
//! ```text
//! l' = l·e^(m−m') + Σ_chunk e^(z−m')
//! s' = (s + l·(m−m'))·e^(m−m') + Σ_chunk e^(z−m')·(z−m')
//! ```
//!
//! (because e^(z−m') = e^(z−m)·e^(m−m') and z−m' = (z−m) + (m−m')); at the end lse = m + ln l
//! and the entropy is ln l − s/l.

use rayon::prelude::*;

use super::mixed;
use super::simd::{exp, vectorize};
use crate::model::ops::tensor_io::WeightSlice;

/// Shapes and chunking of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadDims {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// Vocabulary entries per chunk.
    pub chunk_cols: usize,
}

/// Rows v0..v1 of the head matrix.
fn head_rows<'a>(w: WeightSlice<'a>, hidden: usize, v0: usize, v1: usize) -> WeightSlice<'a> {
    match w {
        WeightSlice::F32(w) => WeightSlice::F32(&w[v0 * hidden..v1 * hidden]),
        WeightSlice::Bf16(w) => WeightSlice::Bf16(&w[v0 * hidden..v1 * hidden]),
    }
}

/// z = inv_t · h · w[v0..v1]ᵀ into `logits` ([rows, v1−v0]).
fn chunk_logits(
    h: &[f32],
    w: WeightSlice<'_>,
    d: HeadDims,
    v0: usize,
    v1: usize,
    inv_t: f32,
    logits: &mut [f32],
) {
    let cols = v1 - v0;
    mixed::x_wt(
        &mut logits[..d.rows * cols],
        h,
        head_rows(w, d.hidden, v0, v1),
        d.rows,
        d.hidden,
        cols,
        inv_t,
        false,
    );
}

/// Running softmax statistics of one row (see the module docs).
#[derive(Clone, Copy)]
struct RowStats {
    m: f32,
    l: f32,
    s: f32,
    target: f32,
}

/// Folds one chunk `z` of a row into its statistics.
#[inline(always)]
fn fold_chunk(st: &mut RowStats, z: &[f32]) {
    const L: usize = 16;
    let c = super::simd::max(z);
    let m_new = st.m.max(c);
    let (mut acc_l, mut acc_s) = ([0.0f32; L], [0.0f32; L]);
    let mut chunks = z.chunks_exact(L);
    for ch in &mut chunks {
        for i in 0..L {
            let d = ch[i] - m_new;
            let e = exp(d);
            acc_l[i] += e;
            acc_s[i] += e * d;
        }
    }
    let (mut l, mut s) = (0.0f32, 0.0f32);
    for &zv in chunks.remainder() {
        let d = zv - m_new;
        let e = exp(d);
        l += e;
        s += e * d;
    }
    l += acc_l.iter().sum::<f32>();
    s += acc_s.iter().sum::<f32>();
    if st.l > 0.0 {
        let shift = st.m - m_new;
        let scale = shift.exp();
        st.s = (st.s + st.l * shift) * scale + s;
        st.l = st.l * scale + l;
    } else {
        st.s = s;
        st.l = l;
    }
    st.m = m_new;
}

/// One row's logits z (a chunk of them) into dz_v = g·(1[v = target] − e^(z_v − lse)), in
/// place; `target` is the target's index in this chunk, if it falls there.
#[inline(always)]
fn logits_to_dz(z: &mut [f32], lse: f32, g: f32, target: Option<usize>) {
    if g == 0.0 {
        z.fill(0.0);
        return;
    }
    vectorize(|| {
        for zv in z.iter_mut() {
            *zv = -g * exp(*zv - lse);
        }
    });
    if let Some(t) = target {
        z[t] += g;
    }
}

/// logp_n = z[n, target_n] − lse_n, entropy_n, lse_n for every row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    h: &[f32],
    w: WeightSlice<'_>,
    targets: &[u32],
    inv_t: f32,
    d: HeadDims,
    logprobs: &mut [f32],
    entropy: &mut [f32],
    lse: &mut [f32],
) {
    if d.rows == 0 {
        return;
    }
    let chunk = d.chunk_cols.clamp(1, d.vocab);
    let mut logits = super::zeroed(d.rows * chunk);
    let mut stats = vec![
        RowStats {
            m: f32::NEG_INFINITY,
            l: 0.0,
            s: 0.0,
            target: 0.0,
        };
        d.rows
    ];
    let mut v0 = 0;
    while v0 < d.vocab {
        let v1 = (v0 + chunk).min(d.vocab);
        let cols = v1 - v0;
        chunk_logits(h, w, d, v0, v1, inv_t, &mut logits);
        logits[..d.rows * cols]
            .par_chunks(cols)
            .zip(stats.par_iter_mut())
            .zip(targets.par_iter())
            .for_each(|((z, st), &target)| {
                let t = target as usize;
                if (v0..v1).contains(&t) {
                    st.target = z[t - v0];
                }
                vectorize(|| fold_chunk(st, z));
            });
        v0 = v1;
    }
    for (n, st) in stats.iter().enumerate() {
        let row_lse = st.m + st.l.ln();
        lse[n] = row_lse;
        entropy[n] = st.l.ln() - st.s / st.l;
        logprobs[n] = st.target - row_lse;
    }
}

/// dz_nv = g_n·(1[v = target_n] − e^(z_nv − lse_n)); dh = inv_t·dZ w; dW += inv_t·dZᵀ h
/// (added to `dw`, unless `dw` is `None`: a frozen head; with bf16 weights the products take
/// bf16 operands).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    h: &[f32],
    w: WeightSlice<'_>,
    targets: &[u32],
    lse: &[f32],
    g: &[f32],
    inv_t: f32,
    d: HeadDims,
    dh: &mut [f32],
    mut dw: Option<&mut [f32]>,
) {
    if d.rows == 0 {
        dh.fill(0.0);
        return;
    }
    let bf16 = matches!(w, WeightSlice::Bf16(_));
    let chunk = d.chunk_cols.clamp(1, d.vocab);
    let mut logits = super::zeroed(d.rows * chunk);
    let mut v0 = 0;
    while v0 < d.vocab {
        let v1 = (v0 + chunk).min(d.vocab);
        let cols = v1 - v0;
        chunk_logits(h, w, d, v0, v1, inv_t, &mut logits);
        logits[..d.rows * cols]
            .par_chunks_mut(cols)
            .zip(targets.par_iter())
            .zip(lse.par_iter().zip(g.par_iter()))
            .for_each(|((z, &target), (&row_lse, &gn))| {
                let t = target as usize;
                logits_to_dz(z, row_lse, gn, (v0..v1).contains(&t).then(|| t - v0));
            });
        let dz = &logits[..d.rows * cols];
        let wc = head_rows(w, d.hidden, v0, v1);
        mixed::dy_w(dh, dz, wc, d.rows, cols, d.hidden, inv_t, v0 > 0);
        if let Some(dw) = dw.as_deref_mut() {
            mixed::dyt_x(
                &mut dw[v0 * d.hidden..v1 * d.hidden],
                dz,
                h,
                d.rows,
                cols,
                d.hidden,
                inv_t,
                true,
                bf16,
            );
        }
        v0 = v1;
    }
}

/// Forward and backward in one pass when g is known before the forward (see
/// `lm_head_forward_backward`): per block of `block_rows` rows, the logits of the whole
/// vocabulary (one `[block_rows, vocab]` buffer), each row's statistics (logp, entropy, lse),
/// dz_nv = g_n·(1[v = target_n] − e^(z_nv − lse_n)) in place, dh = inv_t·dZ w and
/// dW += inv_t·dZᵀ h (unless `dw` is `None`). Three products instead of the four of
/// `forward` + `backward`, which recompute the logits. A bf16 head on a CPU without a fast
/// bf16 dot product is widened to f32 once per call (V × H × 4 bytes alive meanwhile).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_backward(
    h: &[f32],
    w: WeightSlice<'_>,
    targets: &[u32],
    g: &[f32],
    inv_t: f32,
    d: HeadDims,
    block_rows: usize,
    out: HeadRowsOut<'_>,
    mut dw: Option<&mut [f32]>,
) {
    let HeadRowsOut {
        logprobs,
        entropy,
        lse,
        dh,
    } = out;
    if d.rows == 0 {
        return;
    }
    // Every block multiplies by the whole head matrix three times: a bf16 head that the
    // products would widen each time is widened once here.
    let widened = mixed::widened_once(w);
    let w = widened.as_deref().map_or(w, WeightSlice::F32);
    let bf16 = matches!(w, WeightSlice::Bf16(_));
    let block = block_rows.clamp(1, d.rows);
    let mut logits = super::zeroed(block * d.vocab);
    let mut r0 = 0;
    while r0 < d.rows {
        let r1 = (r0 + block).min(d.rows);
        let rows = r1 - r0;
        let hb = &h[r0 * d.hidden..r1 * d.hidden];
        let db = HeadDims { rows, ..d };
        chunk_logits(hb, w, db, 0, d.vocab, inv_t, &mut logits);
        logits[..rows * d.vocab]
            .par_chunks_mut(d.vocab)
            .zip(targets[r0..r1].par_iter().zip(g[r0..r1].par_iter()))
            .zip(
                logprobs[r0..r1]
                    .par_iter_mut()
                    .zip(entropy[r0..r1].par_iter_mut())
                    .zip(lse[r0..r1].par_iter_mut()),
            )
            .for_each(|((z, (&target, &gn)), ((lp, ent), row_lse))| {
                let t = target as usize;
                let mut st = RowStats {
                    m: f32::NEG_INFINITY,
                    l: 0.0,
                    s: 0.0,
                    target: z[t],
                };
                vectorize(|| fold_chunk(&mut st, z));
                let l = st.m + st.l.ln();
                *row_lse = l;
                *ent = st.l.ln() - st.s / st.l;
                *lp = st.target - l;
                logits_to_dz(z, l, gn, Some(t));
            });
        let dz = &logits[..rows * d.vocab];
        mixed::dy_w(
            &mut dh[r0 * d.hidden..r1 * d.hidden],
            dz,
            w,
            rows,
            d.vocab,
            d.hidden,
            inv_t,
            false,
        );
        if let Some(dw) = dw.as_deref_mut() {
            mixed::dyt_x(dw, dz, hb, rows, d.vocab, d.hidden, inv_t, true, bf16);
        }
        r0 = r1;
    }
}

/// The per-row outputs of [`forward_backward`]: logp, entropy and lse (N each) and dh [N, H].
pub(crate) struct HeadRowsOut<'a> {
    pub logprobs: &'a mut [f32],
    pub entropy: &'a mut [f32],
    pub lse: &'a mut [f32],
    pub dh: &'a mut [f32],
}
