//! Output head fused with log-softmax, gather and entropy, chunked over rows.
//!
//! h is `[n, hid]`, w is `[vocab, hid]`, both row-major. Rows are processed `chunk_rows` at a
//! time: one `[chunk_rows, vocab]` logits buffer is the only vocab-sized allocation.

use super::mixed;
use super::simd::{exp, vectorize};
use crate::model::ops::tensor_io::WeightSlice;
use rayon::prelude::*;

/// Shapes and chunking of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadDims {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub chunk_rows: usize,
}

/// z = inv_t · h[r0..r1] wᵀ into `logits` ([r1−r0, vocab]).
fn chunk_logits(
    h: &[f32],
    w: WeightSlice<'_>,
    d: HeadDims,
    r0: usize,
    r1: usize,
    inv_t: f32,
    logits: &mut [f32],
) {
    let rows = r1 - r0;
    mixed::x_wt(
        &mut logits[..rows * d.vocab],
        &h[r0 * d.hidden..r1 * d.hidden],
        w,
        rows,
        d.hidden,
        d.vocab,
        inv_t,
        false,
    );
}

/// (lse, entropy) of one row of logits: with m = max z, e_v = e^(z_v − m), l = Σ e_v:
/// lse = m + ln l, entropy = −Σ p_v log p_v = ln l − Σ_v e_v·(z_v − m) / l.
#[inline(always)]
fn lse_and_entropy(z: &[f32]) -> (f32, f32) {
    const L: usize = 16;
    let m = super::simd::max(z);
    let mut acc_l = [0.0f32; L];
    let mut acc_s = [0.0f32; L];
    let mut chunks = z.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            let d = c[i] - m;
            let e = exp(d);
            acc_l[i] += e;
            acc_s[i] += e * d;
        }
    }
    let (mut l, mut s) = (0.0f32, 0.0f32);
    for &zv in chunks.remainder() {
        let d = zv - m;
        let e = exp(d);
        l += e;
        s += e * d;
    }
    l += acc_l.iter().sum::<f32>();
    s += acc_s.iter().sum::<f32>();
    (m + l.ln(), l.ln() - s / l)
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
    let chunk = d.chunk_rows.max(1);
    let mut logits = vec![0.0f32; chunk.min(d.rows) * d.vocab];
    let mut r0 = 0;
    while r0 < d.rows {
        let r1 = (r0 + chunk).min(d.rows);
        chunk_logits(h, w, d, r0, r1, inv_t, &mut logits);
        logits[..(r1 - r0) * d.vocab]
            .par_chunks(d.vocab)
            .zip(targets[r0..r1].par_iter())
            .zip(logprobs[r0..r1].par_iter_mut())
            .zip(
                entropy[r0..r1]
                    .par_iter_mut()
                    .zip(lse[r0..r1].par_iter_mut()),
            )
            .for_each(|(((z, &target), lp), (ent, ls))| {
                let (row_lse, row_ent) = vectorize(|| lse_and_entropy(z));
                *lp = z[target as usize] - row_lse;
                *ent = row_ent;
                *ls = row_lse;
            });
        r0 = r1;
    }
}

/// dz_nv = g_n·(1[v = target_n] − e^(z_nv − lse_n)); dh = inv_t·dZ w; dW += inv_t·dZᵀ h
/// (added to `dw`; with bf16 weights the products take bf16 operands).
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
    dw: &mut [f32],
) {
    let chunk = d.chunk_rows.max(1);
    let mut logits = vec![0.0f32; chunk.min(d.rows) * d.vocab];
    let bf16 = matches!(w, WeightSlice::Bf16(_));
    let mut r0 = 0;
    while r0 < d.rows {
        let r1 = (r0 + chunk).min(d.rows);
        let rows = r1 - r0;
        chunk_logits(h, w, d, r0, r1, inv_t, &mut logits);
        logits[..rows * d.vocab]
            .par_chunks_mut(d.vocab)
            .zip(targets[r0..r1].par_iter())
            .zip(lse[r0..r1].par_iter().zip(g[r0..r1].par_iter()))
            .for_each(|((z, &target), (&row_lse, &gn))| {
                if gn == 0.0 {
                    z.fill(0.0);
                    return;
                }
                vectorize(|| {
                    for zv in z.iter_mut() {
                        *zv = -gn * exp(*zv - row_lse);
                    }
                });
                z[target as usize] += gn;
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
        mixed::dyt_x(
            dw,
            dz,
            &h[r0 * d.hidden..r1 * d.hidden],
            rows,
            d.vocab,
            d.hidden,
            inv_t,
            true,
            bf16,
        );
        r0 = r1;
    }
}
