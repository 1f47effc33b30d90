//! Evaluation: pass@1 (the mean correctness over k samples per problem) and pass@k on
//! benchmarks or held-out prompts.
//!
//! ```text
//! pass@1 = (1/N) Σ_i c_i / k          pass@k = (1/N) Σ_i [c_i > 0]
//! ```
//!
//! with N problems, k samples each, c_i of them correct by `mathverify` against the gold
//! answer. [`EvalReport::pass_at`] gives the unbiased pass@k' for any k' ≤ k.
//!
//! * [`EvalItem`]s come from a benchmark ([`benchmark_items`], asked in a [`PromptStyle`]) or
//!   from dataset records ([`EvalItem::from_record`], asked as the dataset formats them).
//! * [`evaluate`] samples `k` completions per item in chunks of `batch_prompts` prompts (memory
//!   stays bounded by `batch_prompts × k` rows of KV cache), checks each completion, and
//!   returns an [`EvalReport`] with the per-item results.
//! * One path for every model ([`evaluate_on`]): a model with a vision tower ([`Vision`])
//!   evaluates image questions ([`vl::load_vl_items`]: chats with images), its answers checked
//!   by visual accuracy; a text model, problems checked by mathematical equivalence.

mod items;
mod pass_at_k;
mod report;
pub mod vl;

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::vl_chat::{encode_chat, VlChat};
use crate::data::Prompt;
use crate::image::{ImageProcessor, ProcessedImage};
use crate::model::decoding::DecodeEngine;
use crate::model::{Qwen2, VlModel};
use crate::reward::visual::{answer_text, visual_accuracy};
use crate::rollout::{self, PromptImages, SamplingParams};
use crate::tokenizer::Tokenizer;

pub use items::{benchmark_items, EvalItem, PromptStyle, DEFAULT_SYSTEM_PROMPT};
pub use pass_at_k::pass_at_k;
pub use report::{write_item_line, EvalReport, EvalSummary, ItemResult, SampleResult};

/// How completions are sampled for evaluation. Defaults follow the paper's evaluation:
/// temperature 0.6, top-p 0.95, one sample, 1024 new tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Samples per item, k.
    pub samples: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Seed of the sampling streams. Results are reproducible for a given (seed,
    /// batch_prompts); greedy results do not depend on either.
    pub seed: u64,
    /// Extra end-of-sequence ids, besides the model's and the tokenizer's EOS (e.g.
    /// generation_config.json's `eos_token_id`).
    pub stop_token_ids: Vec<u32>,
    /// A completion ends once its text contains one of these.
    pub stop_strings: Vec<String>,
    /// Prompts sampled together; the batch holds `batch_prompts × samples` rows.
    pub batch_prompts: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            samples: 1,
            temperature: 0.6,
            top_p: 0.95,
            top_k: 0,
            max_new_tokens: 1024,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            batch_prompts: 16,
        }
    }
}

impl EvalConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.samples >= 1, "eval: samples must be ≥ 1");
        ensure!(self.batch_prompts >= 1, "eval: batch_prompts must be ≥ 1");
        ensure!(self.max_new_tokens >= 1, "eval: max_new_tokens must be ≥ 1");
        self.sampling_params(0).validate()
    }

    /// The sampling parameters of the chunk whose first item is `first_item`.
    ///
    /// The sampler's random stream depends on (seed, index of the prompt in its call, sample),
    /// so each chunk gets its own seed, `seed` for the first chunk: then a single-chunk
    /// evaluation draws exactly what [`rollout::generate`] with `seed` draws.
    pub fn sampling_params(&self, first_item: usize) -> SamplingParams {
        SamplingParams {
            n: self.samples,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: chunk_seed(self.seed, first_item),
            stop_token_ids: self.stop_token_ids.clone(),
            stop_strings: self.stop_strings.clone(),
            ignore_eos: false,
        }
    }
}

/// `seed` for the chunk starting at item 0; for others `seed` XOR a multiple of the 64-bit
/// golden ratio, so chunks draw from unrelated streams.
fn chunk_seed(seed: u64, first_item: usize) -> u64 {
    seed ^ (first_item as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Where an evaluation stands, reported after each chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalProgress {
    pub items_done: usize,
    pub items_total: usize,
    /// Mean c_i / k over the items done so far.
    pub pass_at_1_so_far: f64,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// Samples `config.samples` completions for every item and checks them; see the module docs.
pub fn evaluate(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    items: &[EvalItem],
    config: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_with_progress(model, tokenizer, items, config, &mut |_, _| Ok(()))
}

/// [`evaluate`], calling `on_chunk(new results, progress)` after each chunk of items (to
/// stream results to a file or show progress); an error from it stops the evaluation.
pub fn evaluate_with_progress(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    items: &[EvalItem],
    config: &EvalConfig,
    on_chunk: &mut dyn FnMut(&[ItemResult], &EvalProgress) -> Result<()>,
) -> Result<EvalReport> {
    evaluate_on(model, model, None, tokenizer, items, config, on_chunk)
}

/// What a model with a vision tower evaluates with: the tower (with its decoder) and the
/// image processor of its checkpoint. Its items' prompts are chats with their images, and
/// answers are checked by the GPG reference's visual accuracy (mathematical equivalence, else
/// the exact `<answer>` text, else the same choice letter; [`crate::reward::visual`]).
#[derive(Clone, Copy)]
pub struct Vision<'a> {
    pub model: VlModel<'a>,
    pub processor: &'a ImageProcessor,
}

/// [`evaluate_with_progress`] with the sampling on `engine` (the CPU model itself, or its GPU
/// decoder: `model::decoding::engine_for`); with `vision` (a model with a tower), the items'
/// images are processed and spliced in, and answers checked by visual accuracy.
pub fn evaluate_on(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    vision: Option<Vision<'_>>,
    tokenizer: &Tokenizer,
    items: &[EvalItem],
    config: &EvalConfig,
    on_chunk: &mut dyn FnMut(&[ItemResult], &EvalProgress) -> Result<()>,
) -> Result<EvalReport> {
    config.validate()?;
    ensure!(!items.is_empty(), "eval: no items to evaluate");
    let start = Instant::now();

    // Encode every prompt (and process every image) first, so that a bad item fails before
    // any sampling.
    let max_positions = model.config.max_position_embeddings;
    let mut prompt_ids = Vec::with_capacity(items.len());
    let mut prompt_images = Vec::with_capacity(items.len());
    for item in items {
        let (ids, images) = encode_item(item, vision, tokenizer)
            .with_context(|| format!("eval item {}: encoding its prompt", item.id))?;
        ensure!(
            !ids.is_empty(),
            "eval item {}: the prompt is empty",
            item.id
        );
        ensure!(
            ids.len() + config.max_new_tokens <= max_positions,
            "eval item {}: the prompt has {} tokens; with max_new_tokens {} that exceeds the model's {} positions",
            item.id,
            ids.len(),
            config.max_new_tokens,
            max_positions
        );
        prompt_ids.push(ids);
        prompt_images.push(images);
    }

    let mut per_item: Vec<ItemResult> = Vec::with_capacity(items.len());
    let mut generated_tokens = 0usize;
    for first in (0..items.len()).step_by(config.batch_prompts) {
        let end = (first + config.batch_prompts).min(items.len());
        let chunk = &items[first..end];
        let params = config.sampling_params(first);
        let images = vision.map(|v| PromptImages {
            model: v.model,
            images: &prompt_images[first..end],
        });
        let completions = rollout::generate_on(
            model,
            engine,
            tokenizer,
            &prompt_ids[first..end],
            images,
            &params,
            0,
        )
        .with_context(|| {
            format!(
                "eval: sampling items {}..={} (ids {} to {})",
                first + 1,
                end,
                chunk[0].id,
                chunk[chunk.len() - 1].id
            )
        })?;
        ensure!(
            completions.len() == chunk.len() * config.samples,
            "eval: the sampler returned {} completions for {} prompts × {} samples",
            completions.len(),
            chunk.len(),
            config.samples
        );
        generated_tokens += completions.iter().map(|c| c.token_ids.len()).sum::<usize>();
        let new_results = if vision.is_some() {
            check_visual(chunk, completions, config.samples, tokenizer)?
        } else {
            check_math(chunk, completions, config.samples, tokenizer)?
        };
        per_item.extend(new_results);
        let done = per_item.len();
        let progress = EvalProgress {
            items_done: done,
            items_total: items.len(),
            pass_at_1_so_far: per_item.iter().map(|r| r.pass_at_1).sum::<f64>() / done as f64,
            generated_tokens,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_chunk(&per_item[first..], &progress)?;
    }
    EvalReport::from_items(per_item, config.samples, start.elapsed().as_secs_f64())
}

/// An item's prompt ids and processed images: a text model's prompt as the tokenizer encodes
/// it (no images allowed), a chat with its images through the tower's chat encoding.
fn encode_item(
    item: &EvalItem,
    vision: Option<Vision<'_>>,
    tokenizer: &Tokenizer,
) -> Result<(Vec<u32>, Vec<ProcessedImage>)> {
    let Some(v) = vision else {
        ensure!(
            item.images.is_empty(),
            "the item has images: they need a vision-language model (Qwen2-VL family)"
        );
        return Ok((tokenizer.encode_prompt(&item.prompt)?, Vec::new()));
    };
    let Prompt::Chat(messages) = &item.prompt else {
        bail!("a vision-language model's item must be a chat");
    };
    let chat = VlChat {
        messages: messages.clone(),
        images: item.images.clone(),
    };
    encode_chat(v.model.config, tokenizer, v.processor, &chat, true)
}

/// The results of a chunk's completions (sorted by (prompt, sample): k consecutive ones per
/// item), each checked by `mathverify` against the item's gold answer (in parallel;
/// mathverify bounds its work per call).
fn check_math(
    chunk: &[EvalItem],
    completions: Vec<rollout::Completion>,
    k: usize,
    tokenizer: &Tokenizer,
) -> Result<Vec<ItemResult>> {
    let opts = mathverify::Options::default();
    let golds: Vec<Vec<mathverify::Answer>> = chunk
        .par_iter()
        .map(|item| mathverify::parse_gold(&item.gold, &opts))
        .collect();
    let samples: Vec<SampleResult> = completions
        .into_par_iter()
        .map(|c| {
            let gold = &golds[c.prompt_index];
            let pred = mathverify::extract_answers(&c.text, &opts);
            SampleResult {
                correct: !gold.is_empty() && mathverify::verify(gold, &pred, &opts),
                extracted: pred.first().map(mathverify::Answer::display),
                completion_tokens: c.token_ids.len(),
                finish_reason: c.finish_reason,
                text: c.text,
            }
        })
        .collect();
    let mut samples = samples.into_iter();
    let mut results = Vec::with_capacity(chunk.len());
    for (item, gold) in chunk.iter().zip(&golds) {
        let item_samples: Vec<SampleResult> = samples.by_ref().take(k).collect();
        results.push(ItemResult::new(
            item.id.clone(),
            render_prompt(tokenizer, &item.prompt)?,
            item.gold.clone(),
            gold.first().map(mathverify::Answer::display),
            item_samples,
        ));
    }
    Ok(results)
}

/// [`check_math`] for image questions: each completion checked by visual accuracy.
fn check_visual(
    chunk: &[EvalItem],
    completions: Vec<rollout::Completion>,
    k: usize,
    tokenizer: &Tokenizer,
) -> Result<Vec<ItemResult>> {
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
    let mut results = Vec::with_capacity(chunk.len());
    for item in chunk {
        let item_samples: Vec<SampleResult> = samples.by_ref().take(k).collect();
        results.push(ItemResult::new(
            item.id.clone(),
            render_prompt(tokenizer, &item.prompt)?,
            item.gold.clone(),
            Some(answer_text(&item.gold).to_string()),
            item_samples,
        ));
    }
    Ok(results)
}

/// The prompt text the model is given: raw text as is, chat messages rendered by the template
/// with the generation prompt.
fn render_prompt(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<String> {
    match prompt {
        Prompt::Text(text) => Ok(text.clone()),
        Prompt::Chat(messages) => tokenizer.apply_chat_template(messages, true),
    }
}

#[cfg(test)]
mod tests;
