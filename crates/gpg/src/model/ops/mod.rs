//! Fused ops with a CPU kernel each (CUDA kernels later).
