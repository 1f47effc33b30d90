//! Loading a Hugging Face model directory (weights, tokenizer, generation defaults) for the
//! commands that sample or score with a model.

use std::path::Path;

use anyhow::{Context, Result};

use crate::model::{DeviceName, Precision, Qwen2};
use crate::tokenizer::Tokenizer;

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
    pub eos_token_id: Option<crate::model::config::TokenIds>,
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

    /// The end-of-sequence token ids (none when the file names none).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default()
    }
}

impl ModelDir {
    /// Attaches the PEFT LoRA adapter in `adapter`, when given.
    pub fn with_adapter(mut self, adapter: Option<&Path>) -> Result<Self> {
        if let Some(dir) = adapter {
            self.model
                .load_adapter(dir)
                .with_context(|| format!("adapter {}", dir.display()))?;
        }
        Ok(self)
    }

    /// Sets the chat template's extra variables (`--chat-template-kwargs`), when given.
    pub fn with_chat_template_kwargs(
        mut self,
        kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Self {
        self.tokenizer = self.tokenizer.with_chat_template_kwargs(kwargs);
        self
    }

    /// Loads the model for a command that runs its whole engine on `device` (only the CPU so
    /// far: a CUDA device is refused with the reason).
    pub fn load(dir: &Path, device: &DeviceName, precision: Precision) -> Result<Self> {
        let opened = device.open()?;
        Self::load_on(dir, &opened, precision)
    }

    /// Loads the model for a command that only samples: with a CUDA device the weights are read
    /// on the CPU (prefill) and uploaded by the CUDA decoder
    /// (`crate::model::decoding::engine_for`).
    pub fn load_for_sampling(
        dir: &Path,
        device: &DeviceName,
        precision: Precision,
    ) -> Result<Self> {
        crate::model::decoding::check_sampling_device(device)?;
        Self::load_on(dir, &candle_core::Device::Cpu, precision)
    }

    /// Loads the model on the host for a command that moves what it needs to the device itself
    /// (`logprobs` uploads the weights to the GPU once); the device is checked there.
    pub fn load_host(dir: &Path, precision: Precision) -> Result<Self> {
        Self::load_on(dir, &candle_core::Device::Cpu, precision)
    }

    fn load_on(dir: &Path, device: &candle_core::Device, precision: Precision) -> Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!(
                "{}: not a directory (expected a Hugging Face model directory)",
                dir.display()
            );
        }
        let model = Qwen2::load(dir, device, precision)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let generation = GenerationDefaults::from_dir(dir)?;
        Ok(Self {
            model,
            tokenizer,
            generation,
        })
    }
}
