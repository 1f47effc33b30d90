//! `gpg-rl generate`: sample completions for one or more prompts.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use gpg::rollout::{self, SamplingParams};
use gpg::tokenizer::ChatMessage;

use super::model_dir::{AdapterFlag, EngineFlags, ModelDir};

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
    let dir = ModelDir::load(&args.model, &args.engine)?.with_adapter(&args.adapter)?;
    let generation = &dir.generation;
    let greedy_default = generation.do_sample == Some(false);
    let temperature = args.temperature.unwrap_or(if greedy_default {
        0.0
    } else {
        generation.temperature.unwrap_or(1.0)
    });
    let params = SamplingParams {
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
    };
    let mut prompt_ids = Vec::with_capacity(args.prompt.len());
    for prompt in &args.prompt {
        let text = if args.chat {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: system.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: prompt.clone(),
            });
            dir.tokenizer.apply_chat_template(&messages, true)?
        } else {
            prompt.clone()
        };
        // A chat template already holds its special tokens; plain text gets none added.
        prompt_ids.push(dir.tokenizer.encode(&text, false)?);
    }
    let completions = rollout::generate(&dir.model, &dir.tokenizer, &prompt_ids, &params)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for c in &completions {
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
