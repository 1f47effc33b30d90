//! LayerNorm kernels over row-major `[T, H]` slices (see `ops::layer_norm` for the equations).

use rayon::prelude::*;

pub(crate) fn forward(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let h = w.len();
    if h == 0 {
        return;
    }
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter_mut())
        .for_each(|((yr, xr), r)| {
            let mu = xr.iter().sum::<f32>() / h as f32;
            let var = xr.iter().map(|&v| (v - mu) * (v - mu)).sum::<f32>() / h as f32;
            let rs = 1.0 / (var + eps).sqrt();
            *r = rs;
            for j in 0..h {
                yr[j] = (xr[j] - mu) * rs * w[j] + b[j];
            }
        });
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let h = w.len();
    if h == 0 {
        return;
    }
    dx.par_chunks_mut(h)
        .zip(dy.par_chunks(h).zip(x.par_chunks(h)))
        .zip(rstd.par_iter())
        .for_each(|((dxr, (dyr, xr)), &rs)| {
            let mu = xr.iter().sum::<f32>() / h as f32;
            let (mut mg, mut mgx) = (0.0f32, 0.0f32);
            for j in 0..h {
                let g = dyr[j] * w[j];
                mg += g;
                mgx += g * (xr[j] - mu) * rs;
            }
            mg /= h as f32;
            mgx /= h as f32;
            for j in 0..h {
                let xh = (xr[j] - mu) * rs;
                dxr[j] = rs * (dyr[j] * w[j] - mg - xh * mgx);
            }
        });
    for ((dyr, xr), &rs) in dy.chunks(h).zip(x.chunks(h)).zip(rstd) {
        let mu = xr.iter().sum::<f32>() / h as f32;
        for j in 0..h {
            dw[j] += dyr[j] * (xr[j] - mu) * rs;
            db[j] += dyr[j];
        }
    }
}
