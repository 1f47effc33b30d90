//! CPU kernels of the fused ops. They work on contiguous `&[f32]` slices, use rayon for the
//! parallel loops (the global pool) and the `gemm` crate for matrix products; elementwise inner
//! loops are written to auto-vectorise and run under [`simd::vectorize`] (AVX2+FMA when the CPU
//! has it).

pub(crate) mod amx;
pub(crate) mod attention;
pub(crate) mod bf16;
pub(crate) mod full_attention;
pub(crate) mod gelu;
pub(crate) mod gemm_bf16;
pub(crate) mod isa;
pub(crate) mod layer_norm;
pub(crate) mod lm_head;
pub(crate) mod matmul;
pub(crate) mod mixed;
pub(crate) mod product_bench;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod rows_matmul;
pub(crate) use crate::simd;
pub(crate) mod swiglu;

/// A buffer of `n` zeros for an op's output. A large one is zeroed by the rayon pool: the
/// heap hands back reused memory, which `vec![0.0; n]` clears with one thread's memset while
/// the pool waits (serial time between the parallel products of a training step).
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    /// Below this the memset is shorter than a fork.
    const PARALLEL_FROM: usize = 1 << 18;
    if n < PARALLEL_FROM {
        return vec![0.0; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0.0f32, n));
    v
}
