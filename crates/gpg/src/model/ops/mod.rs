//! Fused ops with a CPU kernel each, and CUDA kernels in `cuda/` (feature `cuda`).
//!
//! Every op of the Qwen2-family engine that is hot or needs a hand-written backward lives here:
//! RMSNorm, rotary embedding, SwiGLU, causal grouped-query attention over a packed variable-length
//! batch (training and decoding), and the output head fused with log-softmax and gather.
//!
//! Layout of the module: each op has one file (`rms_norm.rs`, `rope.rs`, …) holding its public
//! function(s): the equation, the backward's derivation, shape checks and the dispatch on the
//! tensors' device. The kernels themselves work on plain `&[f32]` slices and live in `cpu/`
//! (`cuda/` holds the GPU kernels as CUDA C compiled by NVRTC, launched on device buffers by
//! the CUDA decoder and checked against these CPU kernels on a GPU).
//!
//! Conventions: every tensor argument must be a contiguous `f32` tensor; results are fresh
//! contiguous `f32` tensors on the same device. Errors name the op and the offending argument.

mod attention;
pub(crate) mod cpu;
pub mod cuda;
mod full_attention;
mod gelu;
mod layer_norm;
mod linear;
mod lm_head;
mod rms_norm;
mod rope;
mod swiglu;
pub(crate) mod tensor_io;
mod varlen;

#[cfg(test)]
mod bench;
#[cfg(test)]
pub(crate) mod test_util;

pub use attention::{attention, attention_backward, attention_decode, DecodeCache};
pub use cpu::isa::isa_name;
pub use cpu::mixed::bf16_gemm_name;
pub use cpu::product_bench::{layer_products, time_product, Clock, ProductCase, ProductKind};
pub use full_attention::{full_attention, full_attention_backward};
pub use gelu::{gelu, gelu_backward, Gelu};
pub use layer_norm::{layer_norm, layer_norm_backward};
pub use linear::{
    linear, linear_accumulate, linear_backward_input, linear_backward_input_accumulate,
    linear_backward_params,
};
pub use lm_head::{
    lm_head_backward, lm_head_backward_chunked, lm_head_backward_input, lm_head_backward_into,
    lm_head_forward_backward, lm_head_logprobs, lm_head_logprobs_chunked, LmHeadOutput,
    LM_HEAD_CHUNK_LOGITS, LM_HEAD_FUSED_LOGITS,
};
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rope::Rope;
pub use swiglu::{swiglu, swiglu_backward};
pub use tensor_io::{update_in_place, WeightSliceMut};
pub use varlen::VarLen;
