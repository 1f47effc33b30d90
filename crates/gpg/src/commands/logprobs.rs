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
use crate::image::ProcessedImage;
use crate::model::{Batch, DeviceName, Precision, TokenLogprobs, VlSequence};

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
    /// Extra chat-template variables for `messages` records (Qwen2-VL-family models, e.g.
    /// `{"add_vision_id": true}`); None: the template's defaults.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
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
            chat_template_kwargs: None,
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
    let dir = ModelDir::load_any_host(&options.model, &options.device, options.precision)?
        .with_adapter(options.adapter.as_deref())?;
    anyhow::ensure!(
        options.chat_template_kwargs.is_none() || dir.tower.is_some(),
        "chat_template_kwargs: {} is a text model, whose records are scored as raw prompt text \
         (no chat template is rendered); they apply to `messages` records of Qwen2-VL-family models",
        options.model.display()
    );
    let dir = dir.with_chat_template_kwargs(options.chat_template_kwargs.clone());
    let scorer = Scorer::open(&dir, &options.device)?;
    let mut lines = Vec::new();
    for (where_, record) in records {
        let (prompt_ids, images, completion) = prompt_of(&dir, &record, base, &where_)?;
        let completion_ids = dir.tokenizer.encode(&completion, false)?;
        let len = prompt_ids.len() + completion_ids.len();
        let max = dir.model.config.max_position_embeddings;
        if len > max {
            bail!(
                "{where_}: prompt + completion is {len} tokens, longer than the model's {max} positions"
            );
        }
        lines.push(Line {
            record,
            prompt_ids,
            completion_ids,
            images,
        });
    }
    let mut out = Vec::with_capacity(lines.len());
    let mut start = 0;
    while start < lines.len() {
        let end = batch_end(start, lines.len(), options.batch_tokens, |i| {
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
        let batch = dir.batch(&seqs)?;
        let result = scorer.logprobs(&dir, &batch)?;
        for (j, line) in lines[start..end].iter().enumerate() {
            let span = batch.text.completion_offsets[j]..batch.text.completion_offsets[j + 1];
            out.push(with_logprobs(line, &result.logprobs[span]));
        }
        start = end;
    }
    Ok(out)
}

/// A record's prompt ids, its prompt's processed images and its completion text: `prompt`
/// (a string, tokenized with no special tokens), or with a vision-language model `messages`
/// (a chat with image parts, rendered by the chat template with the generation prompt).
fn prompt_of(
    dir: &ModelDir,
    record: &serde_json::Map<String, serde_json::Value>,
    base: &Path,
    where_: &str,
) -> Result<(Vec<u32>, Vec<ProcessedImage>, String)> {
    let field = |name: &str| -> Result<String> {
        match record.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => bail!("{where_}: field `{name}` must be a string"),
            None => bail!("{where_}: field `{name}` is missing"),
        }
    };
    let Some(tower) = dir.tower.as_deref() else {
        let prompt = field("prompt")?;
        let completion = field("completion")?;
        let prompt_ids = dir.tokenizer.encode(&prompt, false)?;
        if prompt_ids.is_empty() {
            bail!("{where_}: field `prompt` is empty; a completion needs a prompt token before it");
        }
        return Ok((prompt_ids, Vec::new(), completion));
    };
    let completion = field("completion")?;
    let (prompt_ids, images) = match (record.get("messages"), record.get("prompt")) {
        (Some(m), _) => {
            let chat = parse_messages(m, base, where_)?;
            encode_chat(&tower.config, &dir.tokenizer, &tower.processor, &chat, true)
                .with_context(|| where_.to_string())?
        }
        (None, Some(serde_json::Value::String(p))) => (dir.tokenizer.encode(p, false)?, Vec::new()),
        _ => bail!("{where_}: needs `messages` (chat) or `prompt` (a string)"),
    };
    if prompt_ids.is_empty() {
        bail!("{where_}: the prompt is empty; a completion needs a prompt token before it");
    }
    Ok((prompt_ids, images, completion))
}

struct Line {
    record: serde_json::Map<String, serde_json::Value>,
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
    /// The prompt's processed images (a vision-language model's `messages`; else none).
    images: Vec<ProcessedImage>,
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

/// Where packed batches are scored: the host model (a vision-language model's always), or
/// the GPU train step's forward over a text model's weights uploaded once (feature `cuda`).
enum Scorer {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::model::cuda_train::CudaTrainStep>),
}

impl Scorer {
    fn open(dir: &ModelDir, device: &DeviceName) -> Result<Self> {
        // A model with a tower was loaded on `device` (the host: others are refused there).
        if device.is_cpu() || dir.tower.is_some() {
            return Ok(Scorer::Host);
        }
        let model = &dir.model;
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

    fn logprobs(&self, dir: &ModelDir, batch: &Batch) -> Result<TokenLogprobs> {
        match self {
            Scorer::Host => dir.logprobs_on_host(batch),
            #[cfg(feature = "cuda")]
            Scorer::Cuda(step) => {
                anyhow::ensure!(
                    batch.images.is_none(),
                    "internal: an image batch for the GPU scorer"
                );
                // Only each layer's input is kept, and dropped at once: a forward-only pass.
                Ok(step
                    .forward_with(&batch.text, 1.0, crate::model::Activations::LayerInputs)?
                    .0)
            }
        }
    }
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
