//! The model flags of the subcommands (`--device`, `--precision`, `--adapter`); loading the
//! model directory itself is `gpg::commands::model_dir`.

use std::path::PathBuf;

use clap::Args;
use gpg::model::{DeviceName, Precision};

pub use gpg::commands::model_dir::ModelDir;

/// Where and in which precision a command runs its model (`--device`, `--precision`).
#[derive(Args, Clone, Debug)]
pub struct EngineFlags {
    /// Device: cpu, or cuda / cuda:N (a build with `--features cuda`: sampling in `generate`,
    /// `eval` and `bench engine --sampling-only` runs on the GPU; training and scoring stay on
    /// the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceName,
    /// Number format: f32, or bf16 (bf16 weight matrices and matrix products with f32
    /// accumulation; softmax and log-probs in f32).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

/// `--adapter DIR`: a PEFT LoRA adapter run on top of `--model`.
#[derive(Args, Clone, Debug, Default)]
pub struct AdapterFlag {
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as
    /// `gpg-rl train` with [lora] or PEFT's save_pretrained writes it) applied to --model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// Template variables of `--chat-template-kwargs`.
pub type TemplateKwargs = serde_json::Map<String, serde_json::Value>;

/// Parses `--chat-template-kwargs JSON` (clap reports an error as "invalid value … for
/// '--chat-template-kwargs <JSON>': …" and exits with status 2).
pub fn parse_chat_template_kwargs(text: &str) -> Result<TemplateKwargs, String> {
    gpg::tokenizer::parse_chat_template_kwargs(text).map_err(|e| format!("{e:#}"))
}
