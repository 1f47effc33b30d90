//! `gpg-rl generate`: sample completions for one or more prompts.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use gpg::commands::generate::{generate, GenerateOptions};
use gpg::rollout;

use super::model_dir::{parse_chat_template_kwargs, AdapterFlag, EngineFlags, TemplateKwargs};

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
    /// Extra chat-template variables as a JSON object (with --chat), as transformers'
    /// `apply_chat_template(..., **kwargs)` / TRL's `chat_template_kwargs`, e.g.
    /// '{"enable_thinking": false}' for Qwen3.
    #[arg(long, value_name = "JSON", requires = "chat", value_parser = parse_chat_template_kwargs)]
    pub chat_template_kwargs: Option<TemplateKwargs>,
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
    let options = GenerateOptions {
        model: args.model.clone(),
        prompts: args.prompt.clone(),
        chat: args.chat,
        system: args.system.clone(),
        chat_template_kwargs: args.chat_template_kwargs.clone(),
        images: args.image.clone(),
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        n: args.n,
        ignore_eos: args.ignore_eos,
        stop: args.stop.clone(),
        device: args.engine.device.clone(),
        precision: args.engine.precision,
        adapter: args.adapter.adapter.clone(),
    };
    let generated = generate(&options)?;
    print_completions(args, &generated.prompt_ids, &generated.completions)
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
