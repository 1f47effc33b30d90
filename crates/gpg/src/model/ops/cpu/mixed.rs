//! The three matrix products of a linear layer, for weights stored in f32 or bf16.
//!
//! With W [out, in] row-major (as transformers stores it), x [rows, in], dy [rows, out]:
//!
//! ```text
//! forward          y  = α·x·Wᵀ        (x_wt)
//! input gradient   dx = α·dy·W        (dy_w)
//! weight gradient  dW = α·dyᵀ·x       (dyt_x, accumulated into an f32 buffer)
//! ```
//!
//! f32 weights use the `gemm` crate's f32 kernels. bf16 weights use bf16 operands with f32
//! accumulation (activations are rounded to bf16 as the product packs them), as PyTorch's
//! bf16 autocast does, through `amx::gemm_amx` (Intel AMX tiles) where the CPU has AMX-BF16,
//! else `gemm_bf16::gemm_mixed` (AVX512-BF16 `vdpbf16ps`, AVX2 or portable) or the f32 GEMM on
//! widened weights, chosen at run time; the result is always f32.

use super::amx::gemm_amx;
use super::gemm_bf16::{gemm_mixed, kernel_for, Kernel, Operand};
use super::isa::{amx, isa};
use super::matmul::{gemm, MatMut, MatRef, MatRefBf16, Threads};
use crate::model::ops::tensor_io::WeightSlice;

/// How a product with a bf16 weight runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bf16Gemm {
    /// `gemm_amx`: bf16 operands on AMX tiles (`tdpbf16ps`), f32 sums.
    Amx,
    /// `gemm_mixed`: bf16 operands (activations rounded while packing), f32 sums.
    Mixed,
    /// The weight widened to f32 (exactly) in a per-call buffer, then the f32 GEMM: where the
    /// CPU has no fast bf16 dot product, AVX-512 f32 FMAs on f32 panels are the fastest path.
    Widen,
}

/// The bf16 strategy for this CPU: `Amx` where the CPU has AMX-BF16 (and `GPG_RL_ISA` allows
/// it), else `Mixed` where `vdpbf16ps` is fast (AMD Zen 4), `Widen` elsewhere;
/// `GPG_RL_BF16_GEMM=amx|mixed|widen` overrides (`amx` only where the CPU has it).
fn bf16_gemm() -> Bf16Gemm {
    static CHOICE: std::sync::OnceLock<Bf16Gemm> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let auto = || {
            if amx() {
                Bf16Gemm::Amx
            } else if kernel_for(isa()) == Kernel::Dot {
                Bf16Gemm::Mixed
            } else {
                Bf16Gemm::Widen
            }
        };
        match std::env::var("GPG_RL_BF16_GEMM").as_deref() {
            Ok("amx") if super::amx::available() => Bf16Gemm::Amx,
            Ok("amx") => {
                let a = auto();
                eprintln!(
                    "warning: GPG_RL_BF16_GEMM=amx but the CPU (or OS) has no AMX-BF16; using {}",
                    name(a)
                );
                a
            }
            Ok("mixed") => Bf16Gemm::Mixed,
            Ok("widen") => Bf16Gemm::Widen,
            _ => auto(),
        }
    })
}

/// The name of the bf16 matrix-product strategy in use (for benchmark output).
pub fn bf16_gemm_name() -> &'static str {
    name(bf16_gemm())
}

fn name(g: Bf16Gemm) -> &'static str {
    match g {
        Bf16Gemm::Amx => "bf16 operands on AMX tiles (gemm_amx)",
        Bf16Gemm::Mixed => "bf16 operands (gemm_mixed)",
        Bf16Gemm::Widen => "bf16 weights widened to f32 per product (f32 gemm)",
    }
}

/// The f32 copy a product would make of `w` on this CPU (a bf16 weight under the `Widen`
/// strategy), for a caller that multiplies by the same weight many times: widened once, then
/// passed as an f32 weight. `None`: use `w` as it is.
pub(crate) fn widened_once(w: WeightSlice<'_>) -> Option<Vec<f32>> {
    match w {
        WeightSlice::Bf16(w) if bf16_gemm() == Bf16Gemm::Widen => Some(widen(w)),
        _ => None,
    }
}

/// f32 copy of a bf16 matrix (exact).
fn widen(w: &[half::bf16]) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    super::bf16::bf16_to_f32(w, &mut out);
    out
}

/// dst (+)= α·a·b with bf16 operands and f32 sums, on AMX tiles or `gemm_mixed`.
fn bf16_product(dst: MatMut<'_>, a: Operand<'_>, b: Operand<'_>, accumulate: bool, alpha: f32) {
    if bf16_gemm() == Bf16Gemm::Amx {
        gemm_amx(dst, a, b, accumulate, alpha, Threads::All)
    } else {
        gemm_mixed(dst, a, b, accumulate, alpha, Threads::All)
    }
}

/// dst (+)= α·a·op(W), W [out, inp] row-major, op(W) = Wᵀ when `transposed`, else W: the one
/// place that decides how a weight of either dtype enters a product.
fn times_weight(
    dst: MatMut<'_>,
    a: MatRef<'_>,
    w: WeightSlice<'_>,
    (out, inp): (usize, usize),
    transposed: bool,
    alpha: f32,
    accumulate: bool,
) {
    fn f32_view(w: &[f32], out: usize, inp: usize, transposed: bool) -> MatRef<'_> {
        let m = MatRef::row_major(w, out, inp);
        if transposed {
            m.t()
        } else {
            m
        }
    }
    match w {
        WeightSlice::F32(w) => gemm(
            dst,
            a,
            f32_view(w, out, inp, transposed),
            accumulate,
            alpha,
            Threads::All,
        ),
        WeightSlice::Bf16(w) if bf16_gemm() == Bf16Gemm::Widen => {
            let w = widen(w);
            gemm(
                dst,
                a,
                f32_view(&w, out, inp, transposed),
                accumulate,
                alpha,
                Threads::All,
            )
        }
        WeightSlice::Bf16(w) => {
            let m = MatRefBf16::row_major(w, out, inp);
            let m = if transposed { m.t() } else { m };
            bf16_product(dst, a.into(), m.into(), accumulate, alpha)
        }
    }
}

/// y[rows, out] (+)= α·x[rows, inp]·Wᵀ.
#[allow(clippy::too_many_arguments)]
pub(crate) fn x_wt(
    y: &mut [f32],
    x: &[f32],
    w: WeightSlice<'_>,
    rows: usize,
    inp: usize,
    out: usize,
    alpha: f32,
    accumulate: bool,
) {
    times_weight(
        MatMut::row_major(&mut y[..rows * out], rows, out),
        MatRef::row_major(&x[..rows * inp], rows, inp),
        w,
        (out, inp),
        true,
        alpha,
        accumulate,
    )
}

/// dx[rows, inp] (+)= α·dy[rows, out]·W.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dy_w(
    dx: &mut [f32],
    dy: &[f32],
    w: WeightSlice<'_>,
    rows: usize,
    out: usize,
    inp: usize,
    alpha: f32,
    accumulate: bool,
) {
    times_weight(
        MatMut::row_major(&mut dx[..rows * inp], rows, inp),
        MatRef::row_major(&dy[..rows * out], rows, out),
        w,
        (out, inp),
        false,
        alpha,
        accumulate,
    )
}

/// dW[out, inp] (+)= α·dy[rows, out]ᵀ·x[rows, inp]; with `bf16` the operands are rounded to
/// bf16 (the weight's precision) and accumulated in f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dyt_x(
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    rows: usize,
    out: usize,
    inp: usize,
    alpha: f32,
    accumulate: bool,
    bf16: bool,
) {
    let dst = MatMut::row_major(&mut dw[..out * inp], out, inp);
    let dyt = MatRef::row_major(&dy[..rows * out], rows, out).t();
    let x = MatRef::row_major(&x[..rows * inp], rows, inp);
    if bf16 && bf16_gemm() != Bf16Gemm::Widen {
        bf16_product(dst, dyt.into(), x.into(), accumulate, alpha);
    } else {
        gemm(dst, dyt, x, accumulate, alpha, Threads::All);
    }
}

/// From this many rows a bf16 decode product runs on AMX tiles (`amx::rows_wt`, W read as
/// stored) where the strategy is `Amx`. On the Sapphire Rapids VM, 2 threads, the 0.5B
/// shapes' gate/up and down products took 0.26–0.29 ms on AMX against 0.37–0.40 ms for the
/// AVX-512 rows kernel at 8 rows, 0.26–0.29 ms against 1.36–1.44 ms at 32 rows, and the head
/// (151,936 × 896) 19.7 ms against 44.7 ms at 32 rows (`bench_amx_rows_wt`); below 8 rows the
/// rows kernel is faster.
const AMX_ROWS_FROM: usize = 8;

/// y[rows, out] (+)= x·Wᵀ + b for a few rows (decoding), streaming W as stored.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_x_wt(
    x: &[f32],
    w: WeightSlice<'_>,
    bias: Option<&[f32]>,
    rows: usize,
    inp: usize,
    out: usize,
    y: &mut [f32],
    accumulate: bool,
) {
    match w {
        WeightSlice::F32(w) => {
            super::rows_matmul::matmul_wt(x, w, bias, rows, inp, out, y, accumulate)
        }
        WeightSlice::Bf16(w) => {
            let amx = rows >= AMX_ROWS_FROM && bf16_gemm() == Bf16Gemm::Amx;
            // rows_wt declines (false) where inp is not a multiple of 32.
            if !(amx && super::amx::rows_wt(x, w, bias, rows, inp, out, y, accumulate)) {
                super::rows_matmul::matmul_wt_bf16(x, w, bias, rows, inp, out, y, accumulate)
            }
        }
    }
}
