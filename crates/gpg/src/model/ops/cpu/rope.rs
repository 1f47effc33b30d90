//! Rotary-embedding kernel over row-major `[T, n_heads, head_dim]` slices.

use super::simd::vectorize;
use rayon::prelude::*;

/// Rotates every head of every token by its position's angles (rotate_half convention):
/// with c = cos, s = sin of the token's angles (`half` each) and x = [x1 | x2]:
///   forward (INVERSE = false): y1 = x1·c − x2·s, y2 = x2·c + x1·s;
///   inverse (INVERSE = true):  y1 = x1·c + x2·s, y2 = x2·c − x1·s   (the transpose).
/// `cos`/`sin` are tables `[max_positions, half]`; every position must be in range.
pub(crate) fn rotate<const INVERSE: bool>(
    x: &[f32],
    y: &mut [f32],
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    row_len: usize,
    half: usize,
) {
    if row_len == 0 || half == 0 {
        return;
    }
    let tokens_per_task = (16 * 1024 / row_len).max(1);
    y.par_chunks_mut(tokens_per_task * row_len)
        .zip(x.par_chunks(tokens_per_task * row_len))
        .zip(positions.par_chunks(tokens_per_task))
        .for_each(|((yb, xb), pb)| {
            vectorize(|| {
                for ((yr, xr), &pos) in yb
                    .chunks_exact_mut(row_len)
                    .zip(xb.chunks_exact(row_len))
                    .zip(pb)
                {
                    let p = pos as usize * half;
                    let (c, s) = (&cos[p..p + half], &sin[p..p + half]);
                    for (yh, xh) in yr.chunks_exact_mut(2 * half).zip(xr.chunks_exact(2 * half)) {
                        rotate_head::<INVERSE>(yh, xh, c, s);
                    }
                }
            })
        });
}

/// One head: see [`rotate`].
#[inline(always)]
pub(crate) fn rotate_head<const INVERSE: bool>(y: &mut [f32], x: &[f32], c: &[f32], s: &[f32]) {
    let half = c.len();
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        if INVERSE {
            y1[i] = a * c[i] + b * s[i];
            y2[i] = b * c[i] - a * s[i];
        } else {
            y1[i] = a * c[i] - b * s[i];
            y2[i] = b * c[i] + a * s[i];
        }
    }
}

/// One head rotated forward in place: see [`rotate`].
#[inline(always)]
pub(crate) fn rotate_head_in_place(x: &mut [f32], c: &[f32], s: &[f32]) {
    let half = c.len();
    let (x1, x2) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * c[i] - b * s[i];
        x2[i] = b * c[i] + a * s[i];
    }
}
