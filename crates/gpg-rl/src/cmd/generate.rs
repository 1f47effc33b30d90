//! `gpg-rl generate`: sample completions for one or more prompts.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use gpg::data::vl_chat::{encode_chat, VlChat};
use gpg::image::ImageProcessor;
use gpg::model::qwen2_vl::IMAGE_PLACEHOLDER;
use gpg::model::{Qwen2VL, Qwen2VLConfig};
use gpg::rollout::{self, SamplingParams};
use gpg::tokenizer::{ChatMessage, Tokenizer};

use super::model_dir::{AdapterFlag, EngineFlags, GenerationDefaults, ModelDir};

#[derive(Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text; repeat for a batch.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// A PNG image placed before the prompt text in the user message (Qwen2-VL / Qwen2.5-VL
    /// models, with --chat); repeat for several images. Every prompt gets the same images.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy. Default: generation_config.json, else 1.0.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling threshold. Default: generation_config.json, else 1.0 (off).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens. Default: generation_config.json, else 0 (off).
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Completions per prompt.
    #[arg(short = 'n', long = "num-samples", default_value_t = 1)]
    pub n: usize,
    /// Keep generating through end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Stop once the completion contains this text; repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub adapter: AdapterFlag,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let vl = Qwen2VLConfig::is_vl_dir(&args.model);
    if !args.image.is_empty() {
        if !args.chat {
            bail!(
                "--image needs --chat (the images go into the user message of the chat template)"
            );
        }
        if !vl {
            bail!(
                "--image: {} is not a Qwen2-VL / Qwen2.5-VL model (config.json model_type)",
                args.model.display()
            );
        }
    }
    if vl {
        anyhow::ensure!(
            args.adapter.adapter.is_none(),
            "--adapter: LoRA adapters are not supported for Qwen2-VL models yet"
        );
        return run_vl(args);
    }
    let dir =
        ModelDir::load_for_sampling(&args.model, &args.engine)?.with_adapter(&args.adapter)?;
    let params = sampling_params(args, &dir.generation);
    let mut prompt_ids = Vec::with_capacity(args.prompt.len());
    for prompt in &args.prompt {
        let text = if args.chat {
            dir.tokenizer
                .apply_chat_template(&messages(args, prompt.clone()), true)?
        } else {
            prompt.clone()
        };
        // A chat template already holds its special tokens; plain text gets none added.
        prompt_ids.push(dir.tokenizer.encode(&text, false)?);
    }
    let engine = gpg::model::decoding::engine_for(&dir.model, &args.engine.device)?;
    let completions =
        rollout::generate_with(&dir.model, &*engine, &dir.tokenizer, &prompt_ids, &params)?;
    print_completions(args, &prompt_ids, &completions)
}

/// The chat of one prompt: the optional system message, then the user's.
fn messages(args: &GenerateArgs, user: String) -> Vec<ChatMessage> {
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
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

/// Generation with a Qwen2-VL-family model: the images (before the text, as the chat
/// template renders image parts) processed by the model's preprocessor_config.json.
fn run_vl(args: &GenerateArgs) -> Result<()> {
    let device = args.engine.device.open()?;
    let model = Qwen2VL::load(&args.model, &device, args.engine.precision)?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let processor = ImageProcessor::from_dir(&args.model)?;
    let generation = GenerationDefaults::from_dir(&args.model)?;
    let params = sampling_params(args, &generation);
    let mut prompts = Vec::with_capacity(args.prompt.len());
    for prompt in &args.prompt {
        let prompt = if args.chat {
            let chat = VlChat {
                messages: messages(args, IMAGE_PLACEHOLDER.repeat(args.image.len()) + prompt),
                images: args.image.clone(),
            };
            encode_chat(&model.config, &tokenizer, &processor, &chat, true)?
        } else {
            (tokenizer.encode(prompt, false)?, Vec::new())
        };
        prompts.push(prompt);
    }
    let completions = rollout::generate_vl(&model, &tokenizer, &prompts, &params)?;
    let prompt_ids: Vec<Vec<u32>> = prompts.into_iter().map(|(ids, _)| ids).collect();
    print_completions(args, &prompt_ids, &completions)
}

fn sampling_params(args: &GenerateArgs, generation: &GenerationDefaults) -> SamplingParams {
    let greedy_default = generation.do_sample == Some(false);
    let temperature = args.temperature.unwrap_or(if greedy_default {
        0.0
    } else {
        generation.temperature.unwrap_or(1.0)
    });
    SamplingParams {
        n: args.n,
        max_new_tokens: args.max_new_tokens,
        temperature,
        top_p: args.top_p.or(generation.top_p).unwrap_or(1.0),
        top_k: args.top_k.or(generation.top_k).unwrap_or(0),
        seed: args.seed,
        stop_token_ids: generation
            .eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default(),
        stop_strings: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    }
}

fn print_completions(
    args: &GenerateArgs,
    prompt_ids: &[Vec<u32>],
    completions: &[rollout::Completion],
) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for c in completions {
        match args.format {
            OutputFormat::Json => {
                let line = serde_json::json!({
                    "prompt_index": c.prompt_index,
                    "sample_index": c.sample_index,
                    "prompt": args.prompt[c.prompt_index],
                    "prompt_ids": prompt_ids[c.prompt_index],
                    "token_ids": c.token_ids,
                    "text": c.text,
                    "logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                });
                writeln!(out, "{line}")?;
            }
            OutputFormat::Text => {
                if completions.len() > 1 {
                    writeln!(
                        out,
                        "--- prompt {} sample {} ---",
                        c.prompt_index, c.sample_index
                    )?;
                }
                writeln!(out, "{}", c.text)?;
            }
        }
    }
    Ok(())
}
