//! Bidirectional attention kernels within segments (see `ops::full_attention`). One task per
//! (segment, head): the L×L score matrix of the segment is formed with `gemm` on strided views
//! of q, k, v ([T, nh, hd] row-major) and each task returns its rows, copied into place after.

use super::matmul::{gemm, MatMut, MatRef, Threads};
use rayon::prelude::*;

fn tasks(offsets: &[usize], nh: usize) -> Vec<(usize, usize, usize)> {
    offsets
        .windows(2)
        .filter(|w| w[1] > w[0])
        .flat_map(|w| (0..nh).map(move |h| (w[0], w[1] - w[0], h)))
        .collect()
}

/// P = softmax rows of scale·Q·Kᵀ for one (segment, head); returns (P [L, L], lse [L]).
fn probabilities(
    q: &[f32],
    k: &[f32],
    o: usize,
    len: usize,
    h: usize,
    nh: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>) {
    let scale = 1.0 / (hd as f32).sqrt();
    let mut p = vec![0.0f32; len * len];
    let qm = MatRef::strided(&q[(o * nh + h) * hd..], len, hd, nh * hd);
    let km = MatRef::strided(&k[(o * nh + h) * hd..], len, hd, nh * hd);
    gemm(
        MatMut::row_major(&mut p, len, len),
        qm,
        km.t(),
        false,
        scale,
        Threads::One,
    );
    let mut lse = vec![0.0f32; len];
    for (row, l) in p.chunks_exact_mut(len).zip(lse.iter_mut()) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0.0f32;
        for x in row.iter_mut() {
            *x = (*x - m).exp();
            z += *x;
        }
        row.iter_mut().for_each(|x| *x /= z);
        *l = m + z.ln();
    }
    (p, lse)
}

/// Writes rows `o..o+len`, head `h`, of a [T, nh, hd] buffer from a [len, hd] block.
fn put(dst: &mut [f32], block: &[f32], o: usize, h: usize, nh: usize, hd: usize) {
    for (i, row) in block.chunks_exact(hd).enumerate() {
        let at = ((o + i) * nh + h) * hd;
        dst[at..at + hd].copy_from_slice(row);
    }
}

pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    offsets: &[usize],
    nh: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>) {
    let t = offsets.last().copied().unwrap_or(0);
    let results: Vec<_> = tasks(offsets, nh)
        .into_par_iter()
        .map(|(o, len, h)| {
            let (p, lse) = probabilities(q, k, o, len, h, nh, hd);
            let mut ob = vec![0.0f32; len * hd];
            let vm = MatRef::strided(&v[(o * nh + h) * hd..], len, hd, nh * hd);
            gemm(
                MatMut::row_major(&mut ob, len, hd),
                MatRef::row_major(&p, len, len),
                vm,
                false,
                1.0,
                Threads::One,
            );
            (o, h, ob, lse)
        })
        .collect();
    let mut out = vec![0.0f32; t * nh * hd];
    let mut lse_all = vec![0.0f32; t * nh];
    for (o, h, ob, lse) in results {
        put(&mut out, &ob, o, h, nh, hd);
        for (i, l) in lse.into_iter().enumerate() {
            lse_all[(o + i) * nh + h] = l;
        }
    }
    (out, lse_all)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    _lse: &[f32],
    offsets: &[usize],
    nh: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = offsets.last().copied().unwrap_or(0);
    let scale = 1.0 / (hd as f32).sqrt();
    let results: Vec<_> = tasks(offsets, nh)
        .into_par_iter()
        .map(|(o, len, h)| {
            let (p, _) = probabilities(q, k, o, len, h, nh, hd);
            let at = (o * nh + h) * hd;
            let (qm, km, vm, dom) = (
                MatRef::strided(&q[at..], len, hd, nh * hd),
                MatRef::strided(&k[at..], len, hd, nh * hd),
                MatRef::strided(&v[at..], len, hd, nh * hd),
                MatRef::strided(&dout[at..], len, hd, nh * hd),
            );
            // dV = Pᵀ·dO
            let mut dvb = vec![0.0f32; len * hd];
            gemm(
                MatMut::row_major(&mut dvb, len, hd),
                MatRef::row_major(&p, len, len).t(),
                dom,
                false,
                1.0,
                Threads::One,
            );
            // dP = dO·Vᵀ, then dS = P ⊙ (dP − D)
            let mut ds = vec![0.0f32; len * len];
            gemm(
                MatMut::row_major(&mut ds, len, len),
                dom,
                vm.t(),
                false,
                1.0,
                Threads::One,
            );
            for i in 0..len {
                let at = ((o + i) * nh + h) * hd;
                let d: f32 = (0..hd).map(|c| dout[at + c] * out[at + c]).sum();
                for j in 0..len {
                    ds[i * len + j] = p[i * len + j] * (ds[i * len + j] - d);
                }
            }
            let dsm = MatRef::row_major(&ds, len, len);
            let mut dqb = vec![0.0f32; len * hd];
            gemm(
                MatMut::row_major(&mut dqb, len, hd),
                dsm,
                km,
                false,
                scale,
                Threads::One,
            );
            let mut dkb = vec![0.0f32; len * hd];
            gemm(
                MatMut::row_major(&mut dkb, len, hd),
                dsm.t(),
                qm,
                false,
                scale,
                Threads::One,
            );
            (o, h, dqb, dkb, dvb)
        })
        .collect();
    let n = t * nh * hd;
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    for (o, h, dqb, dkb, dvb) in results {
        put(&mut dq, &dqb, o, h, nh, hd);
        put(&mut dk, &dkb, o, h, nh, hd);
        put(&mut dv, &dvb, o, h, nh, hd);
    }
    (dq, dk, dv)
}
