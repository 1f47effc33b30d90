//! Loading a model directory (weights, tokenizer, generation defaults) for the subcommands.

use std::path::Path;

use anyhow::{Context, Result};
use gpg::candle_core::Device;
use gpg::model::Qwen2;
use gpg::tokenizer::Tokenizer;

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

impl ModelDir {
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!(
                "{}: not a directory (expected a Hugging Face model directory)",
                dir.display()
            );
        }
        let device = Device::Cpu;
        let model = Qwen2::from_dir(dir, &device)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let path = dir.join("generation_config.json");
        let generation = if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))?
        } else {
            GenerationDefaults::default()
        };
        Ok(Self {
            model,
            tokenizer,
            generation,
        })
    }
}
