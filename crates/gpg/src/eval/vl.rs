//! Evaluation of a Qwen2-VL-family model on image questions: the same pass@1 / pass@k as
//! [`super::evaluate`], with prompts that carry images and answers checked by the GPG
//! reference's visual accuracy (mathematical equivalence, else the exact `<answer>` text,
//! else the same choice letter; [`crate::reward::visual`]).
//!
//! Items come from a JSONL file, one per line: either `{"messages": [...]}` (chat messages
//! with image parts, [`crate::data::vl_chat`]) or a question field (`problem`, `question` or
//! `prompt`) with `image` (a path) or `images` (a list of paths), the images put before the
//! question in one user message; the gold answer in `answer` or `solution`; an optional `id`.
//! Image paths are relative to the file.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::Value;

use super::{EvalConfig, EvalProgress, EvalReport, ItemResult, SampleResult};
use crate::data::vl_chat::{encode_chat, parse_messages, VlChat};
use crate::data::ChatMessage;
use crate::image::ImageProcessor;
use crate::model::qwen2_vl::{VlModel, IMAGE_PLACEHOLDER};
use crate::reward::visual::{answer_text, visual_accuracy};
use crate::rollout::{self, PromptImages};
use crate::tokenizer::Tokenizer;

/// One image question.
#[derive(Debug, Clone, PartialEq)]
pub struct VlEvalItem {
    pub id: String,
    pub chat: VlChat,
    pub gold: String,
}

fn string_field<'a>(obj: &'a serde_json::Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().find_map(|k| obj.get(*k))
}

/// Reads the items of a JSONL file (see the module doc); `system_prompt` is put first when a
/// line's chat has no system message.
pub fn load_vl_items(path: &Path, system_prompt: Option<&str>) -> Result<Vec<VlEvalItem>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("{}:{}", path.display(), i + 1);
        let obj: serde_json::Map<String, Value> =
            serde_json::from_str(line).with_context(|| format!("{what}: not a JSON object"))?;
        let mut chat = if let Some(m) = obj.get("messages") {
            parse_messages(m, base, &what)?
        } else {
            let question = match string_field(&obj, &["problem", "question", "prompt"]) {
                Some(Value::String(s)) => s.clone(),
                Some(_) => bail!("{what}: the question field must be a string"),
                None => bail!("{what}: needs `messages`, or `problem`/`question`/`prompt` with `image`/`images`"),
            };
            let images: Vec<String> = match (obj.get("image"), obj.get("images")) {
                (Some(Value::String(p)), _) => vec![p.clone()],
                (_, Some(Value::Array(a))) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .with_context(|| format!("{what}: `images` must be a list of paths"))?,
                (None, None) => Vec::new(),
                _ => bail!("{what}: `image` must be a path or `images` a list of paths"),
            };
            VlChat {
                messages: vec![ChatMessage::new(
                    "user",
                    IMAGE_PLACEHOLDER.repeat(images.len()) + &question,
                )],
                images: images.iter().map(|p| base.join(p)).collect(),
            }
        };
        if let Some(system) = system_prompt {
            if chat.messages.first().is_none_or(|m| m.role != "system") {
                chat.messages.insert(0, ChatMessage::new("system", system));
            }
        }
        let gold = match string_field(&obj, &["answer", "solution"]) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => bail!("{what}: the answer must be a string or a number"),
            None => bail!("{what}: no gold answer (`answer` or `solution`)"),
        };
        let id = match obj.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => (i + 1).to_string(),
        };
        items.push(VlEvalItem { id, chat, gold });
    }
    ensure!(!items.is_empty(), "{}: no items", path.display());
    Ok(items)
}

/// Samples `config.samples` completions per item with its images and checks them by visual
/// accuracy; `on_chunk` is called after each chunk as in [`super::evaluate_with_progress`].
pub fn evaluate_vl_with_progress(
    model: VlModel<'_>,
    tokenizer: &Tokenizer,
    processor: &ImageProcessor,
    items: &[VlEvalItem],
    config: &EvalConfig,
    on_chunk: &mut dyn FnMut(&[ItemResult], &EvalProgress) -> Result<()>,
) -> Result<EvalReport> {
    config.validate()?;
    ensure!(!items.is_empty(), "eval: no items to evaluate");
    let start = Instant::now();
    let max_positions = model.config.text.max_position_embeddings;
    // Encode every prompt (and process every image) first: a bad item fails before sampling.
    let mut prompts = Vec::with_capacity(items.len());
    let mut prompt_images = Vec::with_capacity(items.len());
    for item in items {
        let (ids, images) = encode_chat(model.config, tokenizer, processor, &item.chat, true)
            .with_context(|| format!("eval item {}: encoding its prompt", item.id))?;
        ensure!(
            ids.len() + config.max_new_tokens <= max_positions,
            "eval item {}: the prompt has {} tokens; with max_new_tokens {} that exceeds the model's {} positions",
            item.id,
            ids.len(),
            config.max_new_tokens,
            max_positions
        );
        prompts.push(ids);
        prompt_images.push(images);
    }
    let mut per_item = Vec::with_capacity(items.len());
    let mut generated_tokens = 0usize;
    for first in (0..items.len()).step_by(config.batch_prompts) {
        let end = (first + config.batch_prompts).min(items.len());
        let chunk = &items[first..end];
        let images = PromptImages {
            model,
            images: &prompt_images[first..end],
        };
        let completions = rollout::generate_on(
            model.text,
            model.text,
            tokenizer,
            &prompts[first..end],
            Some(images),
            &config.sampling_params(first),
            0,
        )
        .with_context(|| format!("eval: sampling items {}..={end}", first + 1))?;
        ensure!(
            completions.len() == chunk.len() * config.samples,
            "eval: the sampler returned {} completions for {} prompts × {} samples",
            completions.len(),
            chunk.len(),
            config.samples
        );
        generated_tokens += completions.iter().map(|c| c.token_ids.len()).sum::<usize>();
        let samples: Vec<SampleResult> = completions
            .into_par_iter()
            .map(|c| SampleResult {
                correct: visual_accuracy(&chunk[c.prompt_index].gold, &c.text) > 0.0,
                extracted: Some(answer_text(&c.text).to_string()),
                completion_tokens: c.token_ids.len(),
                finish_reason: c.finish_reason,
                text: c.text,
            })
            .collect();
        let mut samples = samples.into_iter();
        for item in chunk {
            let item_samples: Vec<SampleResult> = samples.by_ref().take(config.samples).collect();
            per_item.push(ItemResult::new(
                item.id.clone(),
                tokenizer.apply_chat_template(&item.chat.messages, true)?,
                item.gold.clone(),
                Some(answer_text(&item.gold).to_string()),
                item_samples,
            ));
        }
        let done = per_item.len();
        let progress = EvalProgress {
            items_done: done,
            items_total: items.len(),
            pass_at_1_so_far: per_item
                .iter()
                .map(|r: &ItemResult| r.pass_at_1)
                .sum::<f64>()
                / done as f64,
            generated_tokens,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_chunk(&per_item[first..], &progress)?;
    }
    EvalReport::from_items(per_item, config.samples, start.elapsed().as_secs_f64())
}
