//! Loading a Hugging Face model directory (weights, tokenizer, generation defaults) for the
//! commands that sample or score with a model.

use std::path::Path;

use anyhow::{Context, Result};

use crate::data::vl_chat::{encode_chat, VlChat};
use crate::data::ChatMessage;
use crate::image::ProcessedImage;
use crate::model::{
    Batch, DeviceName, ModelKind, Precision, Qwen2, TokenLogprobs, TrainBatch, VlModel, VlSequence,
};
use crate::tokenizer::Tokenizer;
use crate::train::policy::{Policy, Tower};

/// A Hugging Face model directory, loaded: the text stack and, for a vision-language model
/// loaded by [`ModelDir::load_any_for_sampling`], its vision tower (`None` otherwise).
pub struct ModelDir {
    pub model: Qwen2,
    pub tower: Option<Box<Tower>>,
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
            anyhow::ensure!(
                self.tower.is_none(),
                "adapter: LoRA adapters are not supported for Qwen2-VL models yet"
            );
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

    /// Loads any model directory for a command that samples, its kind read here once
    /// (config.json's `model_type`): a text model as [`Self::load_for_sampling`]; a
    /// vision-language model with its tower on the host (the tower runs on the CPU only:
    /// [`DeviceName::open`] refuses a GPU, saying why).
    pub fn load_any_for_sampling(
        dir: &Path,
        device: &DeviceName,
        precision: Precision,
    ) -> Result<Self> {
        match Self::load_tower_model(dir, device, precision)? {
            Some(loaded) => Ok(loaded),
            None => Self::load_for_sampling(dir, device, precision),
        }
    }

    /// Loads any model directory on the host for a command that moves what it needs to the
    /// device itself, its kind read here once: a text model as [`Self::load_host`], a
    /// vision-language model as in [`Self::load_any_for_sampling`].
    pub fn load_any_host(dir: &Path, device: &DeviceName, precision: Precision) -> Result<Self> {
        match Self::load_tower_model(dir, device, precision)? {
            Some(loaded) => Ok(loaded),
            None => Self::load_host(dir, precision),
        }
    }

    /// A vision-language model with its tower, on the host (`device.open()` refuses a GPU,
    /// saying why); `None` for a text model.
    fn load_tower_model(
        dir: &Path,
        device: &DeviceName,
        precision: Precision,
    ) -> Result<Option<Self>> {
        let kind = ModelKind::of_dir(dir);
        if !kind.has_tower() {
            return Ok(None);
        }
        let opened = device.open()?;
        let Policy { text, tower } = Policy::load(dir, kind, &opened, precision, false)?;
        Ok(Some(Self {
            model: text,
            tower,
            tokenizer: Tokenizer::from_dir(dir)?,
            generation: GenerationDefaults::from_dir(dir)?,
        }))
    }

    /// Packs (prompt, completion, images) sequences for this model (image inputs and M-RoPE
    /// tables when it has a tower; a text model takes no images).
    pub fn batch(&self, seqs: &[VlSequence<'_>]) -> Result<Batch> {
        if let Some(t) = self.tower.as_deref() {
            return Batch::new(&t.config, seqs);
        }
        anyhow::ensure!(
            seqs.iter().all(|s| s.images.is_empty()),
            "internal: images for a text model"
        );
        let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (s.prompt, s.completion)).collect();
        Ok(Batch::text_only(TrainBatch::new(&pairs)?))
    }

    /// The completion tokens' log-probs of `batch` on the host (temperature 1).
    pub fn logprobs_on_host(&self, batch: &Batch) -> Result<TokenLogprobs> {
        match self.vl() {
            None => self.model.logprobs(&batch.text, 1.0),
            Some(vl) => vl.logprobs(batch, 1.0),
        }
    }

    /// The decoder and the tower as one vision-language model (`None`: no tower).
    pub fn vl(&self) -> Option<VlModel<'_>> {
        self.tower.as_deref().map(|t| VlModel {
            config: &t.config,
            text: &self.model,
            visual: &t.visual,
        })
    }

    /// A chat's prompt ids, rendered by the chat template with the generation prompt, and its
    /// images processed (their `<|image_pad|>` runs expanded; images need a tower).
    pub fn encode_chat(
        &self,
        messages: Vec<ChatMessage>,
        images: &[std::path::PathBuf],
    ) -> Result<(Vec<u32>, Vec<ProcessedImage>)> {
        match self.tower.as_deref() {
            Some(t) => {
                let chat = VlChat {
                    messages,
                    images: images.to_vec(),
                };
                encode_chat(&t.config, &self.tokenizer, &t.processor, &chat, true)
            }
            None => {
                anyhow::ensure!(images.is_empty(), "internal: images for a text model");
                let text = self.tokenizer.apply_chat_template(&messages, true)?;
                // A chat template already holds its special tokens; none are added.
                Ok((self.tokenizer.encode(&text, false)?, Vec::new()))
            }
        }
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
            tower: None,
            tokenizer,
            generation,
        })
    }
}
