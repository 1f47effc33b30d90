//! The SFT recipe (`gpg-rl sft --config …`), for text and vision-language models alike
//! ([`super::sft`]).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::data::SyntheticTask;
use crate::model::{DeviceName, Precision};
use crate::optim::{AdamWConfig, LrScheduleConfig, LrScheduleKind};

/// An SFT recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Model directory to start from.
    pub model: PathBuf,
    /// Where the fine-tuned model (and sft_metrics.jsonl) is written.
    pub output_dir: PathBuf,
    /// `cpu`, or `cuda` / `cuda:N` (feature `cuda`; full fine-tuning only, see train/device.rs).
    #[serde(default)]
    pub device: DeviceName,
    /// `f32` or `bf16` mixed precision (see `Precision`).
    #[serde(default)]
    pub precision: Precision,
    /// Recompute each layer in the backward instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    pub steps: u64,
    /// Sequences per step.
    pub batch_size: usize,
    pub seed: u64,
    pub lr: f32,
    #[serde(default = "super::config::default_adamw")]
    pub adamw: AdamWConfig,
    #[serde(default = "super::config::default_max_grad_norm")]
    pub max_grad_norm: f32,
    #[serde(default = "default_schedule")]
    pub schedule: LrScheduleConfig,
    /// `synthetic`: the built-in task's question → worked solution pairs (text models); for a
    /// vision-language model, a JSONL file of image chats ending with the assistant's answer
    /// (see [`super::sft`]).
    pub data: String,
    /// Vision-language models: image questions for the held-out accuracy (the `eval` format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<String>,
    /// Vision-language models: keep the vision tower fixed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_vision: bool,
    #[serde(default)]
    pub synthetic: SyntheticTask,
    /// Share of training problems whose target is the bare answer (`\boxed{N}`) instead of the
    /// worked solution. A warm start that has seen both habits answers directly part of the
    /// time, which rarely works on multi-step problems: RL then has something to discover —
    /// that working the steps pays — which is the demo's point.
    #[serde(default)]
    pub direct_answer_share: f64,
    /// Share of training problems whose target calls the calculator tool in Qwen's format
    /// (`<tool_call>` with the question's expression, the tool's answer — masked out of the
    /// loss — then `\boxed{N}`): the warm start of the tool demo (recipes/demo-tools*.toml).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tool_share: f64,
    /// Measure held-out pass@1 (sampled, temperature 1) every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "default_eval_samples")]
    pub eval_samples: usize,
    #[serde(default = "default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
    /// Train a LoRA adapter (written to output_dir in PEFT format) instead of the whole model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraConfig>,
}

fn default_schedule() -> LrScheduleConfig {
    LrScheduleConfig {
        kind: LrScheduleKind::CosineWithMinLr,
        warmup_steps: None,
        warmup_ratio: Some(0.05),
        min_lr_rate: 0.1,
    }
}
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}
fn default_eval_samples() -> usize {
    1
}
fn default_eval_max_new_tokens() -> usize {
    96
}

impl SftConfig {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let c: SftConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(
            c.steps > 0 && c.batch_size > 0,
            "steps and batch_size must be positive"
        );
        ensure!(
            c.data == "synthetic" || c.data.ends_with(".jsonl"),
            "data = {:?}: \"synthetic\" (the built-in task, text models) or a .jsonl file of image \
             chats (vision-language models)",
            c.data
        );
        Ok(c)
    }
}
