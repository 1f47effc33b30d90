//! `gpg-rl logprobs`: the log-prob of every completion token of JSONL {"prompt", "completion"}
//! lines. Prompt and completion are tokenized separately, with no special tokens, and
//! concatenated. With a Qwen2-VL-family model a line may instead hold `"messages"` (chat
//! messages, image parts included, paths relative to the JSONL file) rendered by the chat
//! template with the generation prompt. With `--device cuda` (a build with `--features cuda`)
//! a text model's forward runs on the GPU: the weights are uploaded once and every packed
//! batch goes through the GPU train step's forward (no backward).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gpg::data::vl_chat::{encode_chat, parse_messages};
use gpg::image::{ImageProcessor, ProcessedImage};
use gpg::model::{Qwen2, Qwen2VL, Qwen2VLConfig, TokenLogprobs, TrainBatch, VlBatch, VlSequence};
use gpg::tokenizer::Tokenizer;

use super::model_dir::{AdapterFlag, EngineFlags, ModelDir};

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
    if Qwen2VLConfig::is_vl_dir(&args.model) {
        anyhow::ensure!(
            args.adapter.adapter.is_none(),
            "--adapter: LoRA adapters are not supported for Qwen2-VL models yet"
        );
        return run_vl(args);
    }
    let dir = ModelDir::load_host(&args.model, &args.engine)?.with_adapter(&args.adapter)?;
    let scorer = Scorer::open(&dir.model, &args.engine)?;
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
        let end = batch_end(start, lines.len(), args.batch_tokens, |i| {
            lines[i].prompt_ids.len() + lines[i].completion_ids.len()
        });
        let pairs: Vec<(&[u32], &[u32])> = lines[start..end]
            .iter()
            .map(|l| (l.prompt_ids.as_slice(), l.completion_ids.as_slice()))
            .collect();
        let batch = TrainBatch::new(&pairs)?;
        let result = scorer.logprobs(&dir.model, &batch)?;
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

/// Where a text model's packed batches are scored: the host model, or the GPU train step's
/// forward over weights uploaded once (feature `cuda`).
enum Scorer {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(Box<gpg::model::cuda_train::CudaTrainStep>),
}

impl Scorer {
    fn open(model: &Qwen2, engine: &EngineFlags) -> Result<Self> {
        if engine.device.is_cpu() {
            return Ok(Scorer::Host);
        }
        #[cfg(feature = "cuda")]
        {
            anyhow::ensure!(
                model.adapter().is_none(),
                "--adapter with --device {}: LoRA adapters are scored on the CPU only so far; use \
                 --device cpu, or merge the adapter first (`gpg-rl merge`)",
                engine.device
            );
            let gpu = engine.device.open_gpu()?;
            let step = gpg::model::cuda_train::CudaTrainStep::new(
                gpu,
                model,
                gpg::optim::AdamWConfig::default(),
            )?;
            Ok(Scorer::Cuda(Box::new(step)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = model;
            engine.device.open()?;
            bail!("device `{}` is not available in this build", engine.device)
        }
    }

    fn logprobs(&self, model: &Qwen2, batch: &TrainBatch) -> Result<TokenLogprobs> {
        match self {
            Scorer::Host => model.logprobs(batch, 1.0),
            #[cfg(feature = "cuda")]
            Scorer::Cuda(step) => {
                let _ = model;
                // Only each layer's input is kept, and dropped at once: a forward-only pass.
                Ok(step
                    .forward_with(batch, 1.0, gpg::model::Activations::LayerInputs)?
                    .0)
            }
        }
    }
}

/// One line for a vision-language model.
struct VlLine {
    record: serde_json::Map<String, serde_json::Value>,
    prompt_ids: Vec<u32>,
    images: Vec<ProcessedImage>,
    completion_ids: Vec<u32>,
}

/// The Qwen2-VL-family path: `messages` (with images) or `prompt` lines, packed up to
/// `--batch-tokens` tokens per forward.
fn run_vl(args: &LogprobsArgs) -> Result<()> {
    let device = args.engine.device.open()?;
    let model = Qwen2VL::load(&args.model, &device, args.engine.precision)?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let processor = ImageProcessor::from_dir(&args.model)?;
    let base = args
        .input
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("{}: cannot open", args.input.display()))?;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let where_ = format!("{}:{}", args.input.display(), i + 1);
        let line = line.with_context(|| format!("{where_}: cannot read"))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).with_context(|| format!("{where_}: not a JSON object"))?;
        let completion = match record.get("completion") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => bail!("{where_}: field `completion` must be a string"),
            None => bail!("{where_}: field `completion` is missing"),
        };
        let (prompt_ids, images) = match (record.get("messages"), record.get("prompt")) {
            (Some(m), _) => {
                let chat = parse_messages(m, &base, &where_)?;
                encode_chat(&model.config, &tokenizer, &processor, &chat, true)
                    .with_context(|| where_.clone())?
            }
            (None, Some(serde_json::Value::String(p))) => (tokenizer.encode(p, false)?, Vec::new()),
            _ => bail!("{where_}: needs `messages` (chat) or `prompt` (a string)"),
        };
        if prompt_ids.is_empty() {
            bail!("{where_}: the prompt is empty; a completion needs a prompt token before it");
        }
        let completion_ids = tokenizer.encode(&completion, false)?;
        let len = prompt_ids.len() + completion_ids.len();
        let max = model.config.text.max_position_embeddings;
        if len > max {
            bail!("{where_}: prompt + completion is {len} tokens, longer than the model's {max} positions");
        }
        lines.push(VlLine {
            record,
            prompt_ids,
            images,
            completion_ids,
        });
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut start = 0;
    while start < lines.len() {
        let end = batch_end(start, lines.len(), args.batch_tokens, |i| {
            lines[i].prompt_ids.len() + lines[i].completion_ids.len()
        });
        let seqs: Vec<VlSequence<'_>> = lines[start..end]
            .iter()
            .map(|l| VlSequence {
                prompt: &l.prompt_ids,
                completion: &l.completion_ids,
                images: &l.images,
            })
            .collect();
        let batch = VlBatch::new(&model.config, &seqs)?;
        let result = model.logprobs(&batch, 1.0)?;
        for (j, line) in lines[start..end].iter().enumerate() {
            let span = batch.text.completion_offsets[j]..batch.text.completion_offsets[j + 1];
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

/// The end of the batch that starts at line `start` (of `n`): as many lines as fit in `budget`
/// tokens (`len(i)` tokens each), at least one.
fn batch_end(start: usize, n: usize, budget: usize, len: impl Fn(usize) -> usize) -> usize {
    let mut end = start;
    let mut tokens = 0;
    while end < n && (end == start || tokens + len(end) <= budget) {
        tokens += len(end);
        end += 1;
    }
    end
}
