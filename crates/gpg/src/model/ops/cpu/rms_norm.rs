//! RMSNorm kernels over row-major `[rows, h]` slices.

use super::simd::{dot3, sum_squares, vectorize};
use rayon::prelude::*;

/// Rows per parallel task: about 32K elements, at least one row.
fn rows_per_task(h: usize) -> usize {
    (32 * 1024 / h.max(1)).max(1)
}

/// y = w ⊙ (x · rstd), rstd = 1/sqrt(mean(x²) + eps), per row of `h` elements.
pub(crate) fn forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let h = w.len();
    if h == 0 {
        return;
    }
    let block = rows_per_task(h);
    y.par_chunks_mut(block * h)
        .zip(x.par_chunks(block * h))
        .zip(rstd.par_chunks_mut(block))
        .for_each(|((yb, xb), rb)| {
            vectorize(|| {
                for ((yr, xr), r) in yb.chunks_exact_mut(h).zip(xb.chunks_exact(h)).zip(rb) {
                    let inv = 1.0 / (sum_squares(xr) / h as f32 + eps).sqrt();
                    *r = inv;
                    for ((yi, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                        *yi = wi * (xi * inv);
                    }
                }
            })
        });
}

/// With r = rstd of the row and c = Σ_j dy_j·w_j·x_j:
/// dx_k = r·w_k·dy_k − (r³/h)·c·x_k, and dw_j = Σ_rows dy_j·x_j·r.
pub(crate) fn backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let h = w.len();
    if h == 0 {
        return;
    }
    let block = rows_per_task(h);
    // One dw partial per block of rows, summed in block order afterwards: the result does not
    // depend on how rayon schedules the blocks (a `fold`/`reduce` would group them by work
    // stealing, so the float sum — and every run after it — would vary from run to run).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(block * h)
        .zip(x.par_chunks(block * h))
        .zip(dy.par_chunks(block * h))
        .zip(rstd.par_chunks(block))
        .map(|(((dxb, xb), dyb), rb)| {
            let mut dw_acc = vec![0.0f32; h];
            vectorize(|| {
                let rows = dxb.chunks_exact_mut(h).zip(xb.chunks_exact(h));
                for ((dxr, xr), (dyr, &r)) in rows.zip(dyb.chunks_exact(h).zip(rb)) {
                    let c = dot3(dyr, w, xr);
                    let k = r * r * r * c / h as f32;
                    for (((dxi, xi), dyi), (wi, dwi)) in dxr
                        .iter_mut()
                        .zip(xr)
                        .zip(dyr)
                        .zip(w.iter().zip(dw_acc.iter_mut()))
                    {
                        *dxi = r * wi * dyi - k * xi;
                        *dwi += dyi * xi * r;
                    }
                }
            });
            dw_acc
        })
        .collect();
    dw.fill(0.0);
    for partial in &partials {
        for (d, p) in dw.iter_mut().zip(partial) {
            *d += p;
        }
    }
}
