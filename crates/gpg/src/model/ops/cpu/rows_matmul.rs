//! y = x·Wᵀ (+ b) for a few rows of x — the matrix products of a decoding step.
//!
//! Decoding multiplies a handful of rows (one per sequence being sampled) by every weight
//! matrix, so each weight is used only `rows` times per step and the product is bound by
//! streaming W, not by arithmetic. A general GEMM packs W into its own layout on every call,
//! which costs as much again as the product; this kernel reads W where it lies, as transformers
//! stores it ([out, in] row-major): each output y[m, n] is the dot product of row m of x and
//! row n of W. On AVX-512 CPUs, tiles of 4 rows of x × 6 rows of W keep 24 zmm accumulators
//! in registers (10 loads per 24 FMAs of 16 lanes), and the next 6 rows of W are prefetched into
//! L2 while the current ones meet every row of x (see the `avx512` module for the two details
//! that make this fast); on AVX2 CPUs, tiles of 4 × 3 keep 12 ymm accumulators (7 loads per
//! 12 FMAs). The output columns are split across the rayon pool.
//!
//! [`matmul_wt_bf16`] is the same product with a bf16 weight (half the bytes to stream): x is
//! rounded to bf16 once per call; on AVX512-BF16 CPUs where `vdpbf16ps` is fast (AMD Zen 4),
//! tiles of 4 rows of x × 6 rows of W with `vdpbf16ps` (32 k values per instruction); where it
//! is slow (Intel), the f32 AVX-512 tiles with W widened to f32 in registers
//! ([`Bf16Decode`]).
//!
//! At 32 rows (the sampling batch of `bench trainer`) the 0.5B model's products move
//! 16 FLOP per weight byte, so on a 2-core VM with ≈ 14 GB/s of memory bandwidth they are
//! bound by memory and arithmetic at once: the AVX-512 tiles reach 184–214 GFLOP/s (CPU time)
//! against 124–151 for the AVX2 ones (`bench_decode_32_rows`, docs/BENCHMARKS.md).

use rayon::prelude::*;

use std::cell::Cell;

use half::bf16;

use super::bf16::{as_bits, round_bits, widen_bits};
use super::gemm_bf16::{kernel_for, Kernel};
use super::isa::{isa, Isa};
use super::simd::dot;

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
    let level = isa();
    matmul_wt_with(level, x, w, bias, rows, k, n_out, y, accumulate)
}

/// [`matmul_wt`] on an explicit instruction-set level (which the CPU must support);
/// `Isa::Avx512Bf16` runs the AVX-512F tiles (4 rows of x × 6 rows of W in 24 zmm), `Isa::Avx2`
/// the AVX2 ones, `Isa::Portable` plain dot products.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_wt_with(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n_out: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    assert!(isa.supported(), "matmul_wt: CPU lacks {isa:?}");
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
        unsafe { columns(isa, x, w, bias, rows, k, n_out, n0, n1, out, accumulate) };
    });
}

/// Output columns `n0..n1`: the AVX-512 or AVX2 tiles as `isa` says, dot products otherwise.
///
/// # Safety
/// `out` must point to a live rows × ld_y buffer whose columns n0..n1 no one else accesses;
/// the CPU must support `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    isa: Isa,
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
    match isa {
        Isa::Avx512Bf16 => {
            // SAFETY: the CPU has AVX-512F (caller's contract).
            unsafe { avx512::columns::<f32>(x, w, rows, k, n0, n1, &store) };
            return;
        }
        Isa::Avx2 => {
            // SAFETY: the CPU has AVX2 and FMA (caller's contract).
            unsafe { avx2::columns(x, w, rows, k, n0, n1, &store) };
            return;
        }
        Isa::Portable => {}
    }
    for m in 0..rows {
        let xm = &x[m * k..(m + 1) * k];
        for n in n0..n1 {
            store(m, n, dot(xm, &w[n * k..(n + 1) * k]));
        }
    }
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

/// AVX-512F tiles of the f32 product: 4 rows of x × 6 rows of W in 24 zmm accumulators
/// (10 loads per 24 FMAs of 16 lanes); k tails by masked loads.
///
/// Two details decide its speed. The functions enable AVX512VL as well as AVX512F: without
/// VL the compiler may use only ymm/zmm0–15 for the 256-bit steps of the final horizontal sums,
/// and then keeps 9 of the 24 accumulators on the stack through the whole k loop (this was
/// why these tiles once measured slower than the AVX2 ones). And the next block of W is
/// prefetched into L2 spread evenly over all the tiles that use the current block, a cache
/// line per k step at 32 rows: the weights stream from memory, a burst of prefetches at the
/// first tile overflows the line-fill buffers, and prefetching into L1 would evict the block
/// in use (2·6·k + 4·k floats exceed L1 at k = 896).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows of x per register tile.
    const MR: usize = 4;
    /// Rows of W per register tile.
    const NR: usize = 6;

    /// How a weight element type enters the f32 FMAs: 16 consecutive values of a row,
    /// the lanes outside `mask` zero, as 16 f32 lanes.
    pub(super) trait WeightLanes: Copy {
        /// Bytes per element.
        const BYTES: usize;
        /// # Safety
        /// The CPU must support AVX-512F/BW; the masked lanes at `p` must be readable.
        unsafe fn load(p: *const Self, mask: __mmask16) -> __m512;
    }

    impl WeightLanes for f32 {
        const BYTES: usize = 4;
        #[inline(always)]
        unsafe fn load(p: *const f32, mask: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }

    /// bf16 bits, widened exactly to f32 in registers (a 16-bit shift).
    impl WeightLanes for u16 {
        const BYTES: usize = 2;
        #[inline(always)]
        unsafe fn load(p: *const u16, mask: __mmask16) -> __m512 {
            let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    /// Every (m, n) with m < rows, n0 ≤ n < n1, handed to `store` exactly once: f32 x times
    /// W rows of f32 or of bf16 bits (widened in registers; x then holds bf16-rounded values).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn columns<T: WeightLanes>(
        x: &[f32],
        w: &[T],
        rows: usize,
        k: usize,
        n0: usize,
        n1: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut n = n0;
        while n < n1 {
            match n1 - n {
                1 => rows_tiles::<T, 1>(x, w, rows, k, n, store),
                2 => rows_tiles::<T, 2>(x, w, rows, k, n, store),
                3 => rows_tiles::<T, 3>(x, w, rows, k, n, store),
                4 => rows_tiles::<T, 4>(x, w, rows, k, n, store),
                5 => rows_tiles::<T, 5>(x, w, rows, k, n, store),
                _ => rows_tiles::<T, NR>(x, w, rows, k, n, store),
            }
            n += NR.min(n1 - n);
        }
    }

    /// Columns n..n+C for every row of x, MR rows at a time, prefetching the next C rows of
    /// W (one contiguous block) into L2 across the tiles. Only addresses are formed past the
    /// end of W, never read.
    #[inline(always)]
    unsafe fn rows_tiles<T: WeightLanes, const C: usize>(
        x: &[f32],
        w: &[T],
        rows: usize,
        k: usize,
        n: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let wn = &w[n * k..(n + C) * k];
        let next = w.as_ptr().wrapping_add((n + C) * k) as *const u8;
        let next_end = next.wrapping_add(C * k * T::BYTES);
        let tiles = rows.div_ceil(MR);
        let steps = k.div_ceil(16);
        // Cache lines per k step so that the tiles together cover the next block.
        let per_step = (C * k * T::BYTES).div_ceil(64).div_ceil(tiles * steps);
        let mut m = 0;
        while m < rows {
            let xm = &x[m * k..];
            let pf = Prefetch {
                from: next.wrapping_add((m / MR) * per_step * steps * 64),
                end: next_end,
                per_step,
            };
            match rows - m {
                1 => super::emit(tile::<T, 1, C>(xm, wn, k, pf), m, n, store),
                2 => super::emit(tile::<T, 2, C>(xm, wn, k, pf), m, n, store),
                3 => super::emit(tile::<T, 3, C>(xm, wn, k, pf), m, n, store),
                _ => super::emit(tile::<T, MR, C>(xm, wn, k, pf), m, n, store),
            }
            m += MR.min(rows - m);
        }
    }

    /// The part of the next W block one tile prefetches: `per_step` cache lines per k step
    /// from `from`, while below `end`.
    #[derive(Clone, Copy)]
    struct Prefetch {
        from: *const u8,
        end: *const u8,
        per_step: usize,
    }

    /// dot(x row i, w row j) for i < R, j < C: x rows have stride k, w rows too.
    #[inline(always)]
    unsafe fn tile<T: WeightLanes, const R: usize, const C: usize>(
        x: &[f32],
        w: &[T],
        k: usize,
        pf: Prefetch,
    ) -> [[f32; C]; R] {
        debug_assert!(x.len() >= (R - 1) * k + k && w.len() >= C * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut next = pf.from;
        let mut p = 0;
        while p < k {
            if next < pf.end {
                for q in 0..pf.per_step {
                    _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(q * 64) as *const i8);
                }
                next = next.wrapping_add(pf.per_step * 64);
            }
            let left = k - p;
            let mask: __mmask16 = if left >= 16 { !0 } else { (1u16 << left) - 1 };
            let mut wv = [_mm512_setzero_ps(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = T::load(wp.add(j * k + p), mask);
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(i * k + p));
                for (a, &wj) in acc_i.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, wj, *a);
                }
            }
            p += 16;
        }
        let mut out = [[0.0f32; C]; R];
        for i in 0..R {
            for j in 0..C {
                out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
            }
        }
        out
    }
}

/// Hands a tile of results to `store`.
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

thread_local! {
    /// x rounded to bf16 (the AVX512-BF16 path) or rounded and widened back to f32 (the
    /// others), reused between calls; taken out while in use.
    static X_BF16: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
    static X_ROUNDED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// y[m, n] (+)= Σ_k bf16(x[m, k])·w[n, k] + bias[n], for m < rows, n < n_out, with a bf16
/// weight and f32 sums: the decoding product of a bf16 model.
///
/// The same contract as [`matmul_wt`] (x [rows, k] f32, w [n_out, k] row-major, y [rows, n_out],
/// all dense; `accumulate` adds to y), except that w is bf16 and x is rounded to bf16 (nearest
/// even) once per call, on every path, so that all paths compute the same products. On
/// AVX512-BF16 the tiles are 4 rows of x × 6 rows of W, 32 k values per `vdpbf16ps` (k tails
/// by masked loads); on AVX2, 4 × 3 FMA tiles on W widened by a 16-bit shift; else dot products.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_wt_bf16(
    x: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n_out: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    matmul_wt_bf16_with(isa(), x, w, bias, rows, k, n_out, y, accumulate)
}

/// How the bf16 decode product runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bf16Decode {
    /// `vdpbf16ps` on bf16 x and W (AVX512-BF16): where that instruction is fast (AMD Zen 4).
    Dot,
    /// W widened to f32 in registers, AVX-512 f32 FMAs with bf16-rounded x: where `vdpbf16ps`
    /// is slow (Intel Sapphire/Emerald Rapids: [`kernel_for`] decides, as for the GEMM).
    WideFma,
    /// AVX2: W widened 8 at a time, f32 FMAs.
    Avx2,
    /// Plain loops.
    Portable,
}

impl Bf16Decode {
    /// The path for an instruction-set level on this CPU.
    pub(crate) fn for_isa(isa: Isa) -> Self {
        match isa {
            Isa::Avx512Bf16 if kernel_for(isa) == Kernel::Dot => Bf16Decode::Dot,
            Isa::Avx512Bf16 => Bf16Decode::WideFma,
            Isa::Avx2 => Bf16Decode::Avx2,
            Isa::Portable => Bf16Decode::Portable,
        }
    }

    /// The instruction-set level the path needs.
    fn isa(self) -> Isa {
        match self {
            Bf16Decode::Dot | Bf16Decode::WideFma => Isa::Avx512Bf16,
            Bf16Decode::Avx2 => Isa::Avx2,
            Bf16Decode::Portable => Isa::Portable,
        }
    }
}

/// [`matmul_wt_bf16`] on an explicit instruction-set level (which the CPU must support).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_wt_bf16_with(
    isa: Isa,
    x: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n_out: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    matmul_wt_bf16_path(
        Bf16Decode::for_isa(isa),
        x,
        w,
        bias,
        rows,
        k,
        n_out,
        y,
        accumulate,
    )
}

/// [`matmul_wt_bf16`] on an explicit path (whose instruction set the CPU must support).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_wt_bf16_path(
    path: Bf16Decode,
    x: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n_out: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    let isa = path.isa();
    assert!(isa.supported(), "matmul_wt_bf16: CPU lacks {isa:?}");
    assert!(
        x.len() >= rows * k,
        "matmul_wt_bf16: x holds fewer than {rows}×{k}"
    );
    assert!(
        w.len() >= n_out * k,
        "matmul_wt_bf16: w holds fewer than {n_out}×{k}"
    );
    assert!(
        y.len() >= rows * n_out,
        "matmul_wt_bf16: y holds fewer than {rows}×{n_out}"
    );
    if let Some(b) = bias {
        assert!(
            b.len() >= n_out,
            "matmul_wt_bf16: bias shorter than {n_out}"
        );
    }
    if rows == 0 || n_out == 0 {
        return;
    }
    let w = as_bits(&w[..n_out * k]);
    let x = &x[..rows * k];
    let mut xb = X_BF16.with(Cell::take);
    let mut xr = X_ROUNDED.with(Cell::take);
    if path == Bf16Decode::Dot {
        xb.clear();
        xb.resize(rows * k, 0);
        super::bf16::f32_to_bf16_with(isa, x, bytemuck_bf16(&mut xb));
    } else {
        xr.clear();
        xr.extend(x.iter().map(|&v| widen_bits(round_bits(v))));
    }
    let out = OutPtr(y.as_mut_ptr());
    let per_thread = n_out.div_ceil(rayon::current_num_threads()).div_ceil(NR) * NR;
    let cols = per_thread.clamp(NR, MAX_COLS_PER_TASK);
    let tasks = n_out.div_ceil(cols);
    let (xb_ref, xr_ref) = (&xb[..], &xr[..]);
    (0..tasks).into_par_iter().for_each(|task| {
        let n0 = task * cols;
        let n1 = (n0 + cols).min(n_out);
        let out = &out;
        let store = |m: usize, n: usize, v: f32| {
            let v = v + bias.map_or(0.0, |b| b[n]);
            // SAFETY: m < rows, n0 ≤ n < n1: inside y (asserted above), and no other task
            // writes columns n0..n1.
            let p = unsafe { out.0.add(m * n_out + n) };
            unsafe { *p = if accumulate { *p + v } else { v } };
        };
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512F/BW and AVX512-BF16 (asserted); the slices hold
            // rows×k and n_out×k elements.
            Bf16Decode::Dot => unsafe {
                bf16x86::columns_avx512(xb_ref, w, rows, k, n0, n1, &store)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512F/BW/VL (asserted); the slices hold rows×k and n_out×k.
            Bf16Decode::WideFma => unsafe {
                avx512::columns::<u16>(xr_ref, w, rows, k, n0, n1, &store)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX2 and FMA (asserted); the slices hold rows×k and n_out×k.
            Bf16Decode::Avx2 => unsafe {
                bf16x86::columns_avx2(xr_ref, w, rows, k, n0, n1, &store)
            },
            _ => {
                for m in 0..rows {
                    let xm = &xr_ref[m * k..(m + 1) * k];
                    for n in n0..n1 {
                        let wn = &w[n * k..(n + 1) * k];
                        let s = xm.iter().zip(wn).fold(0.0f32, |s, (&a, &b)| {
                            s + a * f32::from_bits((b as u32) << 16)
                        });
                        store(m, n, s);
                    }
                }
            }
        }
    });
    X_BF16.with(|c| c.set(xb));
    X_ROUNDED.with(|c| c.set(xr));
}

/// A u16 buffer as bf16 (same representation).
fn bytemuck_bf16(v: &mut [u16]) -> &mut [bf16] {
    // SAFETY: bf16 is repr(transparent) over u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut bf16, v.len()) }
}

#[cfg(target_arch = "x86_64")]
mod bf16x86 {
    use std::arch::x86_64::*;

    /// AVX512-BF16 tile: rows of x per tile.
    const MR: usize = 4;
    /// AVX512-BF16 tile: rows of W per tile.
    const NR: usize = 6;
    /// AVX2 tile sizes (as the f32 kernel).
    const MR2: usize = 4;
    const NR2: usize = 3;

    /// Every (m, n) with m < rows, n0 ≤ n < n1, handed to `store` exactly once; x is bf16.
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn columns_avx512(
        x: &[u16],
        w: &[u16],
        rows: usize,
        k: usize,
        n0: usize,
        n1: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut n = n0;
        while n < n1 {
            match n1 - n {
                1 => rows_tiles_512::<1>(x, w, rows, k, n, store),
                2 => rows_tiles_512::<2>(x, w, rows, k, n, store),
                3 => rows_tiles_512::<3>(x, w, rows, k, n, store),
                4 => rows_tiles_512::<4>(x, w, rows, k, n, store),
                5 => rows_tiles_512::<5>(x, w, rows, k, n, store),
                _ => rows_tiles_512::<NR>(x, w, rows, k, n, store),
            }
            n += NR.min(n1 - n);
        }
    }

    #[inline(always)]
    unsafe fn rows_tiles_512<const C: usize>(
        x: &[u16],
        w: &[u16],
        rows: usize,
        k: usize,
        n: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let wn = &w[n * k..(n + C) * k];
        // Prefetch of the next C rows of W, as in the f32 kernels (address only past the end).
        let next = w.as_ptr().wrapping_add((n + C) * k);
        let mut m = 0;
        while m < rows {
            let xm = &x[m * k..];
            let pf = if m == 0 { next } else { std::ptr::null() };
            match rows - m {
                1 => super::emit(tile_512::<1, C>(xm, wn, k, pf), m, n, store),
                2 => super::emit(tile_512::<2, C>(xm, wn, k, pf), m, n, store),
                3 => super::emit(tile_512::<3, C>(xm, wn, k, pf), m, n, store),
                _ => super::emit(tile_512::<MR, C>(xm, wn, k, pf), m, n, store),
            }
            m += MR.min(rows - m);
        }
    }

    /// Σ_k x[i, k]·w[j, k] for i < R, j < C, 32 k values (16 pairs) per `vdpbf16ps`.
    #[inline(always)]
    unsafe fn tile_512<const R: usize, const C: usize>(
        x: &[u16],
        w: &[u16],
        k: usize,
        prefetch: *const u16,
    ) -> [[f32; C]; R] {
        debug_assert!(x.len() >= (R - 1) * k + k && w.len() >= C * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut p = 0;
        while p < k {
            let left = k - p;
            let mask: __mmask32 = if left >= 32 { !0 } else { (1u32 << left) - 1 };
            if !prefetch.is_null() {
                for j in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(j * k + p) as *const i8);
                }
            }
            // Masked-off lanes read as zero, so an odd tail pairs its last value with 0.
            let mut wv = [_mm512_setzero_si512(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_epi16(mask, wp.add(j * k + p) as *const i16);
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                    mask,
                    xp.add(i * k + p) as *const i16,
                ));
                for (a, &wj) in acc_i.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, std::mem::transmute::<__m512i, __m512bh>(wj));
                }
            }
            p += 32;
        }
        let mut out = [[0.0f32; C]; R];
        for i in 0..R {
            for j in 0..C {
                out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
            }
        }
        out
    }

    /// AVX2 path: x already rounded and widened to f32; W widened 8 at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns_avx2(
        x: &[f32],
        w: &[u16],
        rows: usize,
        k: usize,
        n0: usize,
        n1: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut n = n0;
        while n < n1 {
            match n1 - n {
                1 => rows_tiles_2::<1>(x, w, rows, k, n, store),
                2 => rows_tiles_2::<2>(x, w, rows, k, n, store),
                _ => rows_tiles_2::<NR2>(x, w, rows, k, n, store),
            }
            n += NR2.min(n1 - n);
        }
    }

    #[inline(always)]
    unsafe fn rows_tiles_2<const C: usize>(
        x: &[f32],
        w: &[u16],
        rows: usize,
        k: usize,
        n: usize,
        store: &impl Fn(usize, usize, f32),
    ) {
        let wn = &w[n * k..(n + C) * k];
        let mut m = 0;
        while m < rows {
            let xm = &x[m * k..];
            match rows - m {
                1 => super::emit(tile_2::<1, C>(xm, wn, k), m, n, store),
                2 => super::emit(tile_2::<2, C>(xm, wn, k), m, n, store),
                3 => super::emit(tile_2::<3, C>(xm, wn, k), m, n, store),
                _ => super::emit(tile_2::<MR2, C>(xm, wn, k), m, n, store),
            }
            m += MR2.min(rows - m);
        }
    }

    #[inline(always)]
    unsafe fn tile_2<const R: usize, const C: usize>(
        x: &[f32],
        w: &[u16],
        k: usize,
    ) -> [[f32; C]; R] {
        debug_assert!(x.len() >= (R - 1) * k + k && w.len() >= C * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let k8 = k - k % 8;
        let mut p = 0;
        while p < k8 {
            let mut wv = [_mm256_setzero_ps(); C];
            for (j, v) in wv.iter_mut().enumerate() {
                let h = _mm_loadu_si128(wp.add(j * k + p) as *const __m128i);
                *v = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
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
                let v = acc[i][j];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                let mut s = _mm_cvtss_f32(s);
                for q in k8..k {
                    s += *xp.add(i * k + q) * f32::from_bits((*wp.add(j * k + q) as u32) << 16);
                }
                out[i][j] = s;
            }
        }
        out
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

    /// Every path of both kernels: rows 1..=37, k odd and even (1 included, tails of 8, 16,
    /// 32), columns not multiples of a tile, bias on/off, accumulate on/off. The bf16 kernel
    /// is checked against the f64 product of bf16(x) and the bf16 weight, so the only error is
    /// the f32 sum: 1e-5 of Σ|x||w| (+ |bias| + |y₀|) is a wide margin (k·2⁻²⁴ ≤ 1.6e-5 at
    /// k = 259 in the worst case, √k·2⁻²⁴ ≈ 1e-6 typically).
    #[test]
    fn every_path_matches_f64_reference() {
        for isa in Isa::all_supported() {
            let mut case = 0u32;
            for rows in [1usize, 2, 3, 4, 5, 8, 13, 16, 32, 37] {
                for k in [1usize, 2, 15, 16, 17, 33, 64, 259] {
                    case += 1;
                    let n = [1usize, 5, 6, 7, 13, 70, 131][case as usize % 7];
                    let x = values(rows * k, case);
                    let w = values(n * k, case + 100);
                    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
                    let b = values(n, case + 200);
                    let bias = case.is_multiple_of(2).then_some(b.as_slice());
                    let acc = case.is_multiple_of(3);
                    let y0 = values(rows * n, case + 300);
                    // f32 (None), then every bf16 path of this level (both AVX-512 ones,
                    // whichever this CPU prefers).
                    let bf16_paths = match isa {
                        Isa::Avx512Bf16 => vec![Bf16Decode::Dot, Bf16Decode::WideFma],
                        _ => vec![Bf16Decode::for_isa(isa)],
                    };
                    for path in std::iter::once(None).chain(bf16_paths.into_iter().map(Some)) {
                        let half = path.is_some();
                        let mut y = if acc {
                            y0.clone()
                        } else {
                            vec![f32::NAN; rows * n]
                        };
                        match path {
                            Some(path) => {
                                matmul_wt_bf16_path(path, &x, &wb, bias, rows, k, n, &mut y, acc)
                            }
                            None => matmul_wt_with(isa, &x, &w, bias, rows, k, n, &mut y, acc),
                        }
                        for m in 0..rows {
                            for j in 0..n {
                                let (mut s, mut sa) = (0.0f64, 0.0f64);
                                for q in 0..k {
                                    let (xv, wv) = if half {
                                        (
                                            bf16::from_f32(x[m * k + q]).to_f64(),
                                            wb[j * k + q].to_f64(),
                                        )
                                    } else {
                                        (x[m * k + q] as f64, w[j * k + q] as f64)
                                    };
                                    s += xv * wv;
                                    sa += (xv * wv).abs();
                                }
                                let extra = bias.map_or(0.0, |b| b[j] as f64)
                                    + if acc { y0[m * n + j] as f64 } else { 0.0 };
                                let want = s + extra;
                                let got = y[m * n + j] as f64;
                                let tol = 1e-5 * (sa + extra.abs()) + 1e-30;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{isa:?} {path:?} {rows}x{k}x{n} ({m},{j}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_decode_is_deterministic() {
        let (rows, k, n) = (9, 301, 257);
        let x = values(rows * k, 1);
        let w: Vec<bf16> = values(n * k, 2)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        for isa in Isa::all_supported() {
            let mut y1 = vec![0.0f32; rows * n];
            let mut y2 = vec![1.0f32; rows * n];
            matmul_wt_bf16_with(isa, &x, &w, None, rows, k, n, &mut y1, false);
            matmul_wt_bf16_with(isa, &x, &w, None, rows, k, n, &mut y2, false);
            let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y1), bits(&y2), "{isa:?}");
            if isa == super::isa() {
                let mut y3 = vec![2.0f32; rows * n];
                matmul_wt_bf16(&x, &w, None, rows, k, n, &mut y3, false);
                assert_eq!(bits(&y1), bits(&y3), "matmul_wt_bf16 differs from {isa:?}");
            }
        }
    }
}
