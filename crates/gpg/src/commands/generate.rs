//! `gpg-rl generate`: sample completions for one or more prompts, with a Qwen2 model (an
//! optional LoRA adapter) or a Qwen2-VL-family model (optional images).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::model::qwen2_vl::IMAGE_PLACEHOLDER;
use crate::model::{DeviceName, Precision};
use crate::rollout::{self, Completion, PromptImages, SamplingParams};
use crate::tokenizer::ChatMessage;

use super::model_dir::{GenerationDefaults, ModelDir};

/// What to sample, from which model, how.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Hugging Face model directory.
    pub model: PathBuf,
    /// The prompts (a batch).
    pub prompts: Vec<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    pub chat: bool,
    /// System message (with `chat`).
    pub system: Option<String>,
    /// Extra chat-template variables (with `chat`), e.g. `{"enable_thinking": false}` for
    /// Qwen3; None: the template's defaults.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// PNG images placed before the prompt text in the user message (Qwen2-VL-family models,
    /// with `chat`); every prompt gets the same images.
    pub images: Vec<PathBuf>,
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy. None: generation_config.json, else 1.0.
    pub temperature: Option<f32>,
    /// None: generation_config.json, else 1.0 (off).
    pub top_p: Option<f32>,
    /// None: generation_config.json, else 0 (off).
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Completions per prompt.
    pub n: usize,
    /// Keep generating through end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Stop once the completion contains one of these texts.
    pub stop: Vec<String>,
    pub device: DeviceName,
    pub precision: Precision,
    /// A PEFT LoRA adapter directory applied to `model`.
    pub adapter: Option<PathBuf>,
}

impl GenerateOptions {
    /// The command line's defaults for `prompts` sampled from `model`.
    pub fn new(model: PathBuf, prompts: Vec<String>) -> Self {
        Self {
            model,
            prompts,
            chat: false,
            system: None,
            chat_template_kwargs: None,
            images: Vec::new(),
            max_new_tokens: 256,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: 0,
            n: 1,
            ignore_eos: false,
            stop: Vec::new(),
            device: DeviceName::default(),
            precision: Precision::F32,
            adapter: None,
        }
    }
}

/// The sampled completions (prompt-major, `n` per prompt) and each prompt's token ids.
#[derive(Debug, Clone)]
pub struct Generated {
    pub prompt_ids: Vec<Vec<u32>>,
    pub completions: Vec<Completion>,
}

/// Samples `n` completions for every prompt of `options` (with a vision-language model, its
/// images go before the text of each chat prompt, as the chat template renders image parts,
/// processed by the model's preprocessor_config.json).
pub fn generate(options: &GenerateOptions) -> Result<Generated> {
    if !options.images.is_empty() && !options.chat {
        bail!(
            "images need the chat template (--chat; chat=True in Python): they go into the \
             user message of the chat template"
        );
    }
    let dir = ModelDir::load_any_for_sampling(&options.model, &options.device, options.precision)?
        .with_adapter(options.adapter.as_deref())?
        .with_chat_template_kwargs(options.chat_template_kwargs.clone());
    if !options.images.is_empty() && dir.tower.is_none() {
        bail!(
            "images: {} is not a Qwen2-VL / Qwen2.5-VL model (config.json model_type)",
            options.model.display()
        );
    }
    let params = sampling_params(options, &dir.generation);
    let mut prompt_ids = Vec::with_capacity(options.prompts.len());
    let mut prompt_images = Vec::with_capacity(options.prompts.len());
    for prompt in &options.prompts {
        let (ids, images) = if options.chat {
            let user = IMAGE_PLACEHOLDER.repeat(options.images.len()) + prompt;
            dir.encode_chat(messages(options, user), &options.images)?
        } else {
            // Plain text gets no special tokens added.
            (dir.tokenizer.encode(prompt, false)?, Vec::new())
        };
        prompt_ids.push(ids);
        prompt_images.push(images);
    }
    let engine = crate::model::decoding::engine_for(&dir.model, &options.device)?;
    let images = dir.vl().map(|model| PromptImages {
        model,
        images: &prompt_images,
    });
    let completions = rollout::generate_on(
        &dir.model,
        &*engine,
        &dir.tokenizer,
        &prompt_ids,
        images,
        &params,
        0,
    )?;
    Ok(Generated {
        prompt_ids,
        completions,
    })
}

/// The chat of one prompt: the optional system message, then the user's.
fn messages(options: &GenerateOptions, user: String) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    if let Some(system) = &options.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    messages.push(ChatMessage {
        role: "user".into(),
        content: user,
    });
    messages
}

/// The sampling parameters: the options, else generation_config.json's, else the defaults
/// (temperature 1, or 0 when generation_config.json says `do_sample: false`).
fn sampling_params(options: &GenerateOptions, generation: &GenerationDefaults) -> SamplingParams {
    let greedy_default = generation.do_sample == Some(false);
    let temperature = options.temperature.unwrap_or(if greedy_default {
        0.0
    } else {
        generation.temperature.unwrap_or(1.0)
    });
    SamplingParams {
        n: options.n,
        max_new_tokens: options.max_new_tokens,
        temperature,
        top_p: options.top_p.or(generation.top_p).unwrap_or(1.0),
        top_k: options.top_k.or(generation.top_k).unwrap_or(0),
        seed: options.seed,
        stop_token_ids: generation.stop_token_ids(),
        stop_strings: options.stop.clone(),
        ignore_eos: options.ignore_eos,
    }
}
