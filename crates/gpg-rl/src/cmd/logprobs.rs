//! `gpg-rl logprobs`: the log-prob of every completion token of JSONL {"prompt", "completion"}
//! lines. Prompt and completion are tokenized separately, with no special tokens, and
//! concatenated.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gpg::model::TrainBatch;

use super::model_dir::{AdapterFlag, EngineFlags, ModelDir};

#[derive(Args)]
pub struct LogprobsArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL file, one {"prompt": str, "completion": str} per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Tokens per forward pass (lines are grouped up to this many).
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub adapter: AdapterFlag,
}

struct Line {
    record: serde_json::Map<String, serde_json::Value>,
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
}

pub fn run(args: &LogprobsArgs) -> Result<()> {
    let dir = ModelDir::load(&args.model, &args.engine)?.with_adapter(&args.adapter)?;
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("{}: cannot open", args.input.display()))?;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let where_ = || format!("{}:{n}", args.input.display());
        let line = line.with_context(|| format!("{}: cannot read", where_()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&line)
            .with_context(|| format!("{}: not a JSON object", where_()))?;
        let field = |name: &str| -> Result<String> {
            match record.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => bail!("{}: field `{name}` must be a string", where_()),
                None => bail!("{}: field `{name}` is missing", where_()),
            }
        };
        let prompt = field("prompt")?;
        let completion = field("completion")?;
        let prompt_ids = dir.tokenizer.encode(&prompt, false)?;
        let completion_ids = dir.tokenizer.encode(&completion, false)?;
        if prompt_ids.is_empty() {
            bail!(
                "{}: field `prompt` is empty; a completion needs a prompt token before it",
                where_()
            );
        }
        let len = prompt_ids.len() + completion_ids.len();
        if len > dir.model.config.max_position_embeddings {
            bail!(
                "{}: prompt + completion is {len} tokens, longer than the model's {} positions",
                where_(),
                dir.model.config.max_position_embeddings
            );
        }
        lines.push(Line {
            record,
            prompt_ids,
            completion_ids,
        });
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut start = 0;
    while start < lines.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < lines.len()
            && (end == start
                || tokens + lines[end].prompt_ids.len() + lines[end].completion_ids.len()
                    <= args.batch_tokens)
        {
            tokens += lines[end].prompt_ids.len() + lines[end].completion_ids.len();
            end += 1;
        }
        let pairs: Vec<(&[u32], &[u32])> = lines[start..end]
            .iter()
            .map(|l| (l.prompt_ids.as_slice(), l.completion_ids.as_slice()))
            .collect();
        let batch = TrainBatch::new(&pairs)?;
        let result = dir.model.logprobs(&batch, 1.0)?;
        for (j, line) in lines[start..end].iter().enumerate() {
            let span = batch.completion_offsets[j]..batch.completion_offsets[j + 1];
            let mut record = line.record.clone();
            record.insert(
                "completion_ids".into(),
                serde_json::json!(line.completion_ids),
            );
            record.insert("logprobs".into(), serde_json::json!(result.logprobs[span]));
            writeln!(out, "{}", serde_json::Value::Object(record))?;
        }
        start = end;
    }
    Ok(())
}
