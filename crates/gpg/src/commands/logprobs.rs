//! `gpg-rl logprobs`: the log-prob of every completion token of {"prompt", "completion"}
//! records. Prompt and completion are tokenized separately, with no special tokens, and
//! concatenated. With a Qwen2-VL-family model a record may instead hold `"messages"` (chat
//! messages, image parts included, paths relative to a base directory) rendered by the chat
//! template with the generation prompt. With a CUDA device (a build with the `cuda` feature) a
//! text model's forward runs on the GPU: the weights are uploaded once and every packed batch
//! goes through the GPU train step's forward (no backward).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::data::vl_chat::{encode_chat, parse_messages};
use crate::image::{ImageProcessor, ProcessedImage};
use crate::model::{
    Batch, DeviceName, ModelKind, Precision, Qwen2, Qwen2VL, TokenLogprobs, TrainBatch, VlSequence,
};
use crate::tokenizer::Tokenizer;

use super::model_dir::ModelDir;

/// A JSON object and where it came from (`file:line`, for messages).
pub type Record = (String, serde_json::Map<String, serde_json::Value>);

/// Which model scores, where, and how many tokens per forward pass.
#[derive(Debug, Clone)]
pub struct LogprobsOptions {
    /// Hugging Face model directory.
    pub model: PathBuf,
    /// Tokens per forward pass (records are grouped up to this many).
    pub batch_tokens: usize,
    pub device: DeviceName,
    pub precision: Precision,
    /// A PEFT LoRA adapter directory applied to `model`.
    pub adapter: Option<PathBuf>,
}

impl LogprobsOptions {
    /// The command line's defaults for `model`.
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            batch_tokens: 8192,
            device: DeviceName::default(),
            precision: Precision::F32,
            adapter: None,
        }
    }
}

/// The non-empty lines of a JSONL file as JSON objects, each with its `file:line`.
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let where_ = format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{where_}: cannot read"))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).with_context(|| format!("{where_}: not a JSON object"))?;
        records.push((where_, record));
    }
    Ok(records)
}

/// Each record with `completion_ids` and `logprobs` (one per completion token) added, in
/// order. Image paths in `messages` are relative to `base`.
pub fn logprobs(
    options: &LogprobsOptions,
    records: Vec<Record>,
    base: &Path,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    if ModelKind::of_dir(&options.model).has_tower() {
        anyhow::ensure!(
            options.adapter.is_none(),
            "adapter: LoRA adapters are not supported for Qwen2-VL models yet"
        );
        return logprobs_vl(options, records, base);
    }
    let dir = ModelDir::load_host(&options.model, options.precision)?
        .with_adapter(options.adapter.as_deref())?;
    let scorer = Scorer::open(&dir.model, &options.device)?;
    let mut lines = Vec::new();
    for (where_, record) in records {
        let field = |name: &str| -> Result<String> {
            match record.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => bail!("{where_}: field `{name}` must be a string"),
                None => bail!("{where_}: field `{name}` is missing"),
            }
        };
        let prompt = field("prompt")?;
        let completion = field("completion")?;
        let prompt_ids = dir.tokenizer.encode(&prompt, false)?;
        let completion_ids = dir.tokenizer.encode(&completion, false)?;
        if prompt_ids.is_empty() {
            bail!("{where_}: field `prompt` is empty; a completion needs a prompt token before it");
        }
        let len = prompt_ids.len() + completion_ids.len();
        if len > dir.model.config.max_position_embeddings {
            bail!(
                "{where_}: prompt + completion is {len} tokens, longer than the model's {} positions",
                dir.model.config.max_position_embeddings
            );
        }
        lines.push(Line {
            record,
            prompt_ids,
            completion_ids,
        });
    }
    let mut out = Vec::with_capacity(lines.len());
    let mut start = 0;
    while start < lines.len() {
        let end = batch_end(start, lines.len(), options.batch_tokens, |i| {
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
            out.push(with_logprobs(line, &result.logprobs[span]));
        }
        start = end;
    }
    Ok(out)
}

struct Line {
    record: serde_json::Map<String, serde_json::Value>,
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
}

fn with_logprobs(line: &Line, logprobs: &[f32]) -> serde_json::Map<String, serde_json::Value> {
    let mut record = line.record.clone();
    record.insert(
        "completion_ids".into(),
        serde_json::json!(line.completion_ids),
    );
    record.insert("logprobs".into(), serde_json::json!(logprobs));
    record
}

/// Where a text model's packed batches are scored: the host model, or the GPU train step's
/// forward over weights uploaded once (feature `cuda`).
enum Scorer {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::model::cuda_train::CudaTrainStep>),
}

impl Scorer {
    fn open(model: &Qwen2, device: &DeviceName) -> Result<Self> {
        if device.is_cpu() {
            return Ok(Scorer::Host);
        }
        #[cfg(feature = "cuda")]
        {
            anyhow::ensure!(
                model.adapter().is_none(),
                "adapter with device {}: LoRA adapters are scored on the CPU only so far; use \
                 --device cpu, or merge the adapter first (`gpg-rl merge`)",
                device
            );
            let gpu = device.open_gpu()?;
            let step = crate::model::cuda_train::CudaTrainStep::new(gpu, model)?;
            Ok(Scorer::Cuda(Box::new(step)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = model;
            device.open()?;
            bail!("device `{}` is not available in this build", device)
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
                    .forward_with(batch, 1.0, crate::model::Activations::LayerInputs)?
                    .0)
            }
        }
    }
}

/// One record for a vision-language model.
struct VlLine {
    line: Line,
    images: Vec<ProcessedImage>,
}

/// The Qwen2-VL-family path: `messages` (with images) or `prompt` records, packed up to
/// `batch_tokens` tokens per forward.
fn logprobs_vl(
    options: &LogprobsOptions,
    records: Vec<Record>,
    base: &Path,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let device = options.device.open()?;
    let model = Qwen2VL::load(&options.model, &device, options.precision)?;
    let tokenizer = Tokenizer::from_dir(&options.model)?;
    let processor = ImageProcessor::from_dir(&options.model)?;
    let mut lines = Vec::new();
    for (where_, record) in records {
        let completion = match record.get("completion") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => bail!("{where_}: field `completion` must be a string"),
            None => bail!("{where_}: field `completion` is missing"),
        };
        let (prompt_ids, images) = match (record.get("messages"), record.get("prompt")) {
            (Some(m), _) => {
                let chat = parse_messages(m, base, &where_)?;
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
            line: Line {
                record,
                prompt_ids,
                completion_ids,
            },
            images,
        });
    }
    let mut out = Vec::with_capacity(lines.len());
    let mut start = 0;
    while start < lines.len() {
        let end = batch_end(start, lines.len(), options.batch_tokens, |i| {
            lines[i].line.prompt_ids.len() + lines[i].line.completion_ids.len()
        });
        let seqs: Vec<VlSequence<'_>> = lines[start..end]
            .iter()
            .map(|l| VlSequence {
                prompt: &l.line.prompt_ids,
                completion: &l.line.completion_ids,
                images: &l.images,
            })
            .collect();
        let batch = Batch::new(&model.config, &seqs)?;
        let result = model.logprobs(&batch, 1.0)?;
        for (j, l) in lines[start..end].iter().enumerate() {
            let span = batch.text.completion_offsets[j]..batch.text.completion_offsets[j + 1];
            out.push(with_logprobs(&l.line, &result.logprobs[span]));
        }
        start = end;
    }
    Ok(out)
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
