//! gpg: reinforcement learning from verifiable rewards for language models.
//!
//! Layers, each using only those below it (docs/architecture.md):
//!
//! * `commands` — library entries (load a model dir, then train / generate / score / eval) that
//!   the CLI and the Python package call;
//! * `train` — the RL and SFT loops;
//! * `eval`, `checkpoint` — benchmarks and pass@k; run folders;
//! * `data`, `rollout`, `reward`, `algo`, `optim` — datasets and prepared prompts; batched
//!   sampling; rewards; advantages and g_t; AdamW and schedules;
//! * `model` — the engine (forward, backward, decoders);
//! * `sampling`, `tokenizer` (with the prompt types), `image` — the next-token sampler, text and
//!   chat templates, image preprocessing;
//! * `simd` — the vectorisable scalar helpers (exp, dot, reductions) of the CPU kernels and the
//!   sampler.
//!
//! Still reaching up (being removed): `model::cuda_train` uses `optim`'s AdamW settings.

pub mod algo;
pub mod checkpoint;
pub mod commands;
pub mod data;
pub mod eval;
pub mod image;
pub mod model;
pub mod optim;
pub mod reward;
pub mod rollout;
pub mod sampling;
pub(crate) mod simd;
pub mod tokenizer;
pub mod tools;
pub mod train;

pub use candle_core;
