//! Datasets: JSONL and Parquet prompts, field mapping, benchmarks, synthetic tasks.
//!
//! * [`PromptDataset`] loads prompts from a `.jsonl` or `.parquet` file, mapping its fields
//!   with a [`PromptDatasetConfig`] into [`PromptRecord`]s (chat messages or raw text, plus
//!   the gold answer), and applies a maximum prompt length.
//! * [`EpochSampler`] hands out seeded, epoch-shuffled batches of indices; its
//!   [`SamplerState`] resumes the exact same stream; with a [`SampleStrategy`] later epochs
//!   are drawn by difficulty ([`difficulty`]: the GPG authors' weighted sampling).
//! * [`synthetic`] generates the multi-step arithmetic task used by the demo.
//! * [`DataConfig`] is the recipe's `[data]` table; [`load_prompts`] turns it into
//!   [`PreparedPrompt`]s (records with their token ids).

pub mod benchmarks;
mod config;
mod dataset;
pub mod difficulty;
mod fields;
mod parquet_rows;
mod prompts;
mod record;
mod sampler;
pub mod synthetic;
pub mod vl_chat;

pub use config::{DataConfig, SyntheticTask};
pub use dataset::{LongPromptPolicy, PromptDataset};
pub use difficulty::SampleStrategy;
pub use fields::{
    record_from_fields, PromptDatasetConfig, DEFAULT_ANSWER_FIELDS, DEFAULT_ID_FIELD,
    DEFAULT_PROMPT_FIELDS,
};
pub use prompts::{load_prompts, prepare_prompts, prompts_digest, PreparedPrompt};
pub use record::{ChatMessage, Location, Prompt, PromptRecord};
pub use sampler::{epoch_order, EpochSampler, SamplerState};
