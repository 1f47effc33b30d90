//! Loading a model directory (weights, tokenizer, generation defaults) for the subcommands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use gpg::model::{DeviceName, Precision, Qwen2};
use gpg::tokenizer::Tokenizer;

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

/// A Hugging Face model directory, loaded.
pub struct ModelDir {
    pub model: Qwen2,
    pub tokenizer: Tokenizer,
    pub generation: GenerationDefaults,
}

/// What `generation_config.json` says, when present.
#[derive(Debug, Default, serde::Deserialize)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub eos_token_id: Option<gpg::model::config::TokenIds>,
}

impl GenerationDefaults {
    /// `dir/generation_config.json`, or the defaults when absent.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))
    }
}

impl ModelDir {
    /// Attaches the adapter of `flag`, when given.
    pub fn with_adapter(mut self, flag: &AdapterFlag) -> Result<Self> {
        if let Some(dir) = &flag.adapter {
            self.model
                .load_adapter(dir)
                .with_context(|| format!("--adapter {}", dir.display()))?;
        }
        Ok(self)
    }

    /// Loads the model for a command that runs its whole engine on `engine.device` (only the
    /// CPU so far: a CUDA device is refused with the reason).
    pub fn load(dir: &Path, engine: &EngineFlags) -> Result<Self> {
        let device = engine.device.open()?;
        Self::load_on(dir, &device, engine)
    }

    /// Loads the model for a command that only samples: with a CUDA device the weights are read
    /// on the CPU (prefill) and uploaded by the CUDA decoder
    /// (`gpg::model::decoding::engine_for`).
    pub fn load_for_sampling(dir: &Path, engine: &EngineFlags) -> Result<Self> {
        gpg::model::decoding::check_sampling_device(&engine.device)?;
        Self::load_on(dir, &gpg::candle_core::Device::Cpu, engine)
    }

    /// Loads the model on the host for a command that moves what it needs to `engine.device`
    /// itself (`logprobs` uploads the weights to the GPU once); the device is checked there.
    pub fn load_host(dir: &Path, engine: &EngineFlags) -> Result<Self> {
        Self::load_on(dir, &gpg::candle_core::Device::Cpu, engine)
    }

    fn load_on(
        dir: &Path,
        device: &gpg::candle_core::Device,
        engine: &EngineFlags,
    ) -> Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!(
                "{}: not a directory (expected a Hugging Face model directory)",
                dir.display()
            );
        }
        let model = Qwen2::load(dir, device, engine.precision)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let generation = GenerationDefaults::from_dir(dir)?;
        Ok(Self {
            model,
            tokenizer,
            generation,
        })
    }
}
