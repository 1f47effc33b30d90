//! gpg: reinforcement learning from verifiable rewards for language models.
//!
//! Data flows top to bottom through these modules and never reaches back up:
//! `data` → `tokenizer` → `model` (engine) → `rollout` → `reward` → `algo` → `optim`.
//! See docs/architecture.md.

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
pub mod tokenizer;
pub mod train;

pub use candle_core;
