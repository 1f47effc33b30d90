//! y = x·Wᵀ (+ b) for a few rows of x — the matrix products of a decoding step.
//!
//! Decoding multiplies a handful of rows (one per sequence being sampled) by every weight
//! matrix, so each weight is used only `rows` times per step and the product is bound by
//! streaming W, not by arithmetic. A general GEMM packs W into its own layout on every call,
//! which costs as much again as the product; this kernel reads W where it lies, as transformers
//! stores it ([out, in] row-major): each output y[m, n] is the dot product of row m of x and
//! row n of W. Tiles of 4 rows of x × 3 rows of W keep 12 AVX2 accumulators in registers
//! (7 loads per 12 FMAs) while the 3 W rows stream through once for every 4 rows of x; the
//! output columns are split across the rayon pool.

use rayon::prelude::*;

use super::simd::{dot, vectorize};

/// Rows of x per register tile.
const MR: usize = 4;
/// Rows of W (output columns) per register tile.
const NR: usize = 3;
/// Most output columns per parallel task (a multiple of NR): about 256 KiB of W at K = 1024.
const MAX_COLS_PER_TASK: usize = 66;

/// Where to write: `y[m·ldy + n]`. Shared between tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint sets of elements (their own column range).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// y[m, n] (+)= Σ_k x[m, k]·w[n, k] + bias[n], for m < rows, n < n_out.
///
/// `x` is [rows, k], `w` is [n_out, k] and `y` is [rows, n_out], all row-major and dense.
/// With `accumulate` the product is added to y (a residual connection); otherwise y is
/// overwritten. Panics if a slice is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_wt(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n_out: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    assert!(
        x.len() >= rows * k,
        "matmul_wt: x holds fewer than {rows}×{k}"
    );
    assert!(
        w.len() >= n_out * k,
        "matmul_wt: w holds fewer than {n_out}×{k}"
    );
    assert!(
        y.len() >= rows * n_out,
        "matmul_wt: y holds fewer than {rows}×{n_out}"
    );
    if let Some(b) = bias {
        assert!(b.len() >= n_out, "matmul_wt: bias shorter than {n_out}");
    }
    if rows == 0 || n_out == 0 {
        return;
    }
    let out = OutPtr(y.as_mut_ptr());
    // One task per thread when the product is small (a fork costs a few microseconds),
    // more when the weight is large, for balance.
    let per_thread = n_out.div_ceil(rayon::current_num_threads()).div_ceil(NR) * NR;
    let cols = per_thread.clamp(NR, MAX_COLS_PER_TASK);
    let tasks = n_out.div_ceil(cols);
    (0..tasks).into_par_iter().for_each(|task| {
        let n0 = task * cols;
        let n1 = (n0 + cols).min(n_out);
        // SAFETY: this task writes only columns n0..n1 of the rows × n_out output, which the
        // assertions above show lie inside `y`; no other task writes these columns.
        unsafe { columns(x, w, bias, rows, k, n_out, n0, n1, out, accumulate) };
    });
}

/// Output columns `n0..n1`: the AVX2 tiles when the CPU has them, dot products otherwise.
///
/// # Safety
/// `out` must point to a live rows × ld_y buffer whose columns n0..n1 no one else accesses.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    ld_y: usize,
    n0: usize,
    n1: usize,
    out: OutPtr,
    accumulate: bool,
) {
    let store = |m: usize, n: usize, v: f32| {
        let v = v + bias.map_or(0.0, |b| b[n]);
        // SAFETY: m < rows, n0 ≤ n < n1 (caller's contract).
        let p = unsafe { out.0.add(m * ld_y + n) };
        unsafe { *p = if accumulate { *p + v } else { v } };
    };
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { avx2::columns(x, w, rows, k, n0, n1, &store) };
        return;
    }
    vectorize(|| {
        for m in 0..rows {
            let xm = &x[m * k..(m + 1) * k];
            for n in n0..n1 {
                store(m, n, dot(xm, &w[n * k..(n + 1) * k]));
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Every (m, n) with m < rows, n0 ≤ n < n1, handed to `store` exactly once.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns(
        x: &[f32],
        w: &[f32],
        rows: usize,
        k: usize,
        n0: usize,
        n1: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut n = n0;
        while n < n1 {
            match n1 - n {
                1 => rows_tiles::<1>(x, w, rows, k, n, store),
                2 => rows_tiles::<2>(x, w, rows, k, n, store),
                _ => rows_tiles::<NR>(x, w, rows, k, n, store),
            }
            n += NR.min(n1 - n);
        }
    }

    /// Columns n..n+C for every row of x, MR rows at a time.
    #[inline(always)]
    unsafe fn rows_tiles<const C: usize>(
        x: &[f32],
        w: &[f32],
        rows: usize,
        k: usize,
        n: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let wn = &w[n * k..(n + C) * k];
        // While the first rows of x meet these C rows of W, the next C rows of W are fetched
        // into the cache (the weights stream from L3 or memory; the hardware prefetcher alone
        // follows too few streams). Only an address is formed past the end, never read.
        let next = w.as_ptr().wrapping_add((n + C) * k);
        let mut m = 0;
        while m < rows {
            let xm = &x[m * k..];
            let pf = if m == 0 { next } else { std::ptr::null() };
            match rows - m {
                1 => emit(tile::<1, C>(xm, wn, k, pf), m, n, store),
                2 => emit(tile::<2, C>(xm, wn, k, pf), m, n, store),
                3 => emit(tile::<3, C>(xm, wn, k, pf), m, n, store),
                _ => emit(tile::<MR, C>(xm, wn, k, pf), m, n, store),
            }
            m += MR.min(rows - m);
        }
    }

    #[inline(always)]
    fn emit<const R: usize, const C: usize>(
        t: [[f32; C]; R],
        m: usize,
        n: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        for (i, row) in t.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                store(m + i, n + j, v);
            }
        }
    }

    /// dot(x row i, w row j) for i < R, j < C: x rows have stride k, w rows too.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        prefetch: *const f32,
    ) -> [[f32; C]; R] {
        debug_assert!(x.len() >= (R - 1) * k + k && w.len() >= C * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let k8 = k - k % 8;
        let mut p = 0;
        while p < k8 {
            if !prefetch.is_null() && p % 16 == 0 {
                for j in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(j * k + p) as *const i8);
                }
            }
            let mut wv = [_mm256_setzero_ps(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(j * k + p));
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(i * k + p));
                for (a, &wj) in acc_i.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, wj, *a);
                }
            }
            p += 8;
        }
        let mut out = [[0.0f32; C]; R];
        for i in 0..R {
            for j in 0..C {
                let mut s = hsum(acc[i][j]);
                for q in k8..k {
                    s += *xp.add(i * k + q) * *wp.add(j * k + q);
                }
                out[i][j] = s;
            }
        }
        out
    }

    /// Sum of the 8 lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; rows * n];
        for m in 0..rows {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for q in 0..k {
                    s += x[m * k + q] as f64 * w[j * k + q] as f64;
                }
                y[m * n + j] = s;
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_f64_reference_on_ragged_shapes() {
        // Rows and columns that are not multiples of the tile, K not a multiple of 8, and
        // more columns than one task holds.
        for &(rows, k, n) in &[
            (1, 8, 1),
            (5, 13, 7),
            (16, 256, 200),
            (7, 64, 131),
            (3, 1, 2),
        ] {
            let x = values(rows * k, 1);
            let w = values(n * k, 2);
            let b = values(n, 3);
            for bias in [None, Some(b.as_slice())] {
                let want = naive(&x, &w, bias, rows, k, n);
                let mut y = vec![f32::NAN; rows * n];
                matmul_wt(&x, &w, bias, rows, k, n, &mut y, false);
                for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{rows}x{k}x{n} [{i}]: {got} vs {want}"
                    );
                }
                // Accumulating adds the same product to what is there.
                let mut y2 = vec![1.0f32; rows * n];
                matmul_wt(&x, &w, bias, rows, k, n, &mut y2, true);
                for (a, b) in y2.iter().zip(&y) {
                    assert!((a - (b + 1.0)).abs() <= 1e-5 * (1.0 + b.abs()));
                }
            }
        }
    }
}
