//! The CUDA backend: kernels as CUDA C sources (`kernels/*.cu`, each with its op's equation),
//! compiled by NVRTC at first use for the device's architecture and cached per process; matrix
//! products through cuBLAS (f32, or bf16 operands with f32 accumulation). cudarc loads
//! libcuda / libnvrtc / libcublas only when a CUDA device is opened, so a binary built with
//! `--features cuda` runs the CPU engine anywhere and the GPU path where a driver is present.
//!
//! * [`plan`]: host-side logic with no CUDA in it (launch geometry, the per-token sequence
//!   bounds of varlen attention, the id grouping of the embedding's scatter-add, the KV cache's
//!   block tables). Always compiled and unit-tested on CPU.
//! * [`sources`]: the kernel sources, one module per file, with the common header prepended.
//! * `device` (feature `cuda`): opening a device ([`Gpu`]), compiling and loading modules,
//!   launching; `ops` (feature `cuda`): each op's launch on device buffers.

pub mod plan;
pub mod sources;

#[cfg(test)]
mod emu;
#[cfg(test)]
mod emu_tests;

#[cfg(feature = "cuda")]
mod device;
#[cfg(test)]
mod nvrtc_check;
#[cfg(feature = "cuda")]
pub mod ops;
#[cfg(all(test, feature = "cuda"))]
mod tests;

#[cfg(feature = "cuda")]
pub use device::{compile_for_arch, nvrtc_available, Gpu};
