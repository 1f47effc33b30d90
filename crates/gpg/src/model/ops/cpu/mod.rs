//! CPU kernels of the fused ops. They work on contiguous `&[f32]` slices, use rayon for the
//! parallel loops (the global pool) and the `gemm` crate for matrix products; elementwise inner
//! loops are written to auto-vectorise and run under [`simd::vectorize`] (AVX2+FMA when the CPU
//! has it).

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
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod rows_matmul;
pub(crate) mod simd;
pub(crate) mod swiglu;
