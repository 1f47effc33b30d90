//! SwiGLU kernels over equal-length slices.

use super::simd::{sigmoid, vectorize};
use rayon::prelude::*;

/// Elements per parallel task.
const TASK: usize = 32 * 1024;

/// h = silu(g)·u with silu(g) = g·σ(g).
pub(crate) fn forward(gate: &[f32], up: &[f32], h: &mut [f32]) {
    h.par_chunks_mut(TASK)
        .zip(gate.par_chunks(TASK).zip(up.par_chunks(TASK)))
        .for_each(|(hb, (gb, ub))| {
            vectorize(|| {
                for ((hi, &g), &u) in hb.iter_mut().zip(gb).zip(ub) {
                    *hi = g * sigmoid(g) * u;
                }
            })
        });
}

/// dgate = dh·u·σ(g)·(1 + g·(1 − σ(g))),  dup = dh·silu(g).
pub(crate) fn backward(dh: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    dgate
        .par_chunks_mut(TASK)
        .zip(dup.par_chunks_mut(TASK))
        .zip(
            dh.par_chunks(TASK)
                .zip(gate.par_chunks(TASK).zip(up.par_chunks(TASK))),
        )
        .for_each(|((dgb, dub), (dhb, (gb, ub)))| {
            vectorize(|| {
                for ((dgi, dui), ((&d, &g), &u)) in dgb
                    .iter_mut()
                    .zip(dub.iter_mut())
                    .zip(dhb.iter().zip(gb).zip(ub))
                {
                    let sg = sigmoid(g);
                    *dui = d * g * sg;
                    *dgi = d * u * sg * (1.0 + g * (1.0 - sg));
                }
            })
        });
}
