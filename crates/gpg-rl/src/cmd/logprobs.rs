//! `gpg-rl logprobs`: the log-prob of every completion token of JSONL {"prompt", "completion"}
//! lines. Prompt and completion are tokenized separately, with no special tokens, and
//! concatenated. With a Qwen2-VL-family model a line may instead hold `"messages"` (chat
//! messages, image parts included, paths relative to the JSONL file) rendered by the chat
//! template with the generation prompt. With `--device cuda` (a build with `--features cuda`)
//! a text model's forward runs on the GPU: the weights are uploaded once and every packed
//! batch goes through the GPU train step's forward (no backward).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use gpg::commands::logprobs::{logprobs, read_jsonl, LogprobsOptions};
use gpg::model::ModelKind;

use super::model_dir::{parse_chat_template_kwargs, AdapterFlag, EngineFlags, TemplateKwargs};

#[derive(Args)]
pub struct LogprobsArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL file, one {"prompt": str, "completion": str} per line (Qwen2-VL-family models:
    /// {"messages": [...], "completion": str} too, image parts relative to the file).
    #[arg(long)]
    pub input: PathBuf,
    /// Tokens per forward pass (lines are grouped up to this many).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Extra chat-template variables as a JSON object for `messages` lines (Qwen2-VL-family
    /// models; a text model's lines are raw text), e.g. '{"add_vision_id": true}'.
    #[arg(long, value_name = "JSON", value_parser = parse_chat_template_kwargs)]
    pub chat_template_kwargs: Option<TemplateKwargs>,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub adapter: AdapterFlag,
}

pub fn run(args: &LogprobsArgs) -> Result<()> {
    if args.chat_template_kwargs.is_some() && !ModelKind::of_dir(&args.model).has_tower() {
        anyhow::bail!(
            "--chat-template-kwargs: {} is a text model, whose lines are scored as raw prompt \
             text (no chat template is rendered); the flag applies to `messages` lines of \
             Qwen2-VL-family models",
            args.model.display()
        );
    }
    let options = LogprobsOptions {
        model: args.model.clone(),
        batch_tokens: args.batch_tokens,
        device: args.engine.device.clone(),
        precision: args.engine.precision,
        adapter: args.adapter.adapter.clone(),
        chat_template_kwargs: args.chat_template_kwargs.clone(),
    };
    let records = read_jsonl(&args.input)?;
    let base = args
        .input
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let scored = logprobs(&options, records, &base)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for record in scored {
        writeln!(out, "{}", serde_json::Value::Object(record))?;
    }
    Ok(())
}
