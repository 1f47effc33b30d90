//! Batched sampling with a KV cache.
//!
//! Prompts of different lengths are prefilled together as one packed batch (no padding); each
//! prompt's keys and values are then copied into the cache of its `n` sample rows. Every decode
//! step feeds one token per *unfinished* row: a finished row leaves the batch and its cache is
//! dropped, so it stops costing work. Each row draws from its own seeded random stream
//! (`seed`, prompt index, sample index), so results do not depend on batch composition.

use anyhow::{ensure, Result};

use crate::image::ProcessedImage;
use crate::model::decoding::{push_prefilled, DecodeBatch, DecodeEngine};
use crate::model::qwen2::Qwen2;
use crate::model::qwen2_vl::{Qwen2VL, VlModel};
/// The sampling types live below the engine ([`crate::sampling`]); re-exported here, where
/// callers set up a rollout.
pub use crate::sampling::{self, SamplingParams, TokenSampler};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

pub mod multi_turn;

/// Token ids that end a completion: the explicit ones (`params.stop_token_ids`), the model
/// config's `eos_token_id` (one or several) and the tokenizer's EOS token.
pub fn stop_token_ids(params: &SamplingParams, model: &Qwen2, tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids = params.stop_token_ids.clone();
    if let Some(eos) = &model.config.eos_token_id {
        ids.extend(eos.to_vec());
    }
    ids.extend(tokenizer.eos_token_id());
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was sampled (it is the last of `token_ids`).
    Eos,
    /// The decoded text now contains one of the stop strings.
    Stop,
    /// `max_new_tokens` were generated (with tools: the trajectory's token budget or the
    /// model's positions ran out).
    Length,
    /// A multi-turn trajectory called a tool once more than `[tools] max_turns` allows.
    ToolLimit,
}

/// One sampled completion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Completion {
    pub prompt_index: usize,
    pub sample_index: usize,
    /// The new tokens (the EOS token included when it ended the completion).
    pub token_ids: Vec<u32>,
    /// log π(token) under the sampling distribution softmax(logits / T) before top-k/top-p
    /// truncation (T = 1 for greedy).
    pub logprobs: Vec<f32>,
    /// The new tokens decoded, special tokens skipped. For a multi-turn trajectory, the
    /// model's own turns only (tool responses left out): what the rewards score, so that no
    /// answer printed by a tool alone earns a reward.
    pub text: String,
    /// Multi-turn trajectories: the whole trajectory as text, tool turns included (special
    /// tokens kept), for logs. Empty otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub transcript: String,
    pub finish_reason: FinishReason,
    /// Multi-turn trajectories: `loss_mask[t]` is false at the tokens of tool responses
    /// (context, not the model's actions: no gradient, out of the token counts). Empty: every
    /// token is the model's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loss_mask: Vec<bool>,
    /// The tool calls of a multi-turn trajectory, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::tools::ToolCallRecord>,
}

impl Completion {
    /// Number of the model's own tokens (the tokens trained on): all of them, less the tool
    /// responses' of a multi-turn trajectory.
    pub fn scored_len(&self) -> usize {
        if self.loss_mask.is_empty() {
            self.token_ids.len()
        } else {
            self.loss_mask.iter().filter(|&&m| m).count()
        }
    }

    /// The loss mask (one flag per token), or `None` when every token is the model's.
    pub fn mask(&self) -> Option<&[bool]> {
        (!self.loss_mask.is_empty() && self.loss_mask.iter().any(|&m| !m))
            .then_some(self.loss_mask.as_slice())
    }
}

/// State of one unfinished row.
struct Row {
    prompt_index: usize,
    sample_index: usize,
    prompt_len: usize,
    /// This row's `max_new_tokens`.
    max_new_tokens: usize,
    /// Added to each new token's 1-D position (M-RoPE's δ for a prompt with images; 0 else).
    position_offset: i64,
    sampler: TokenSampler,
    token_ids: Vec<u32>,
    logprobs: Vec<f32>,
    /// The text so far, decoded one token at a time (only fed when there are stop strings).
    text: IncrementalDecoder,
}

/// Samples `params.n` completions for each prompt (token ids, no padding), on the CPU.
pub fn generate(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    generate_on(model, model, tokenizer, prompts, None, params, 0)
}

/// [`generate`] for prompts that are a slice of a larger batch starting at position
/// `first_prompt_key`: prompt `i`'s rows draw from the streams of prompt `first_prompt_key + i`,
/// so a rank sampling its share of a batch draws what one process sampling the whole batch
/// would. (`Completion::prompt_index` stays relative to `prompts`.)
pub fn generate_keyed(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    first_prompt_key: u64,
) -> Result<Vec<Completion>> {
    generate_on(
        model,
        model,
        tokenizer,
        prompts,
        None,
        params,
        first_prompt_key,
    )
}

/// [`generate`] with the prefill and the decode steps on `engine` (the CPU model itself, or a
/// GPU decoder made from `model`: `model::decoding::engine_for`); `model` supplies the config
/// (positions, EOS ids).
pub fn generate_with(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    generate_on(model, engine, tokenizer, prompts, None, params, 0)
}

/// The images of a batch of prompts and the tower that embeds them (a model with a vision
/// tower). Invariant: one entry of `images` per prompt, in order (empty for a text prompt),
/// and `model.text` is the decoder being sampled.
#[derive(Clone, Copy)]
pub struct PromptImages<'a> {
    pub model: VlModel<'a>,
    pub images: &'a [Vec<ProcessedImage>],
}

/// The sampler behind [`generate`], [`generate_keyed`] and [`generate_with`]: prompts
/// decoded on `engine`, prompt `i`'s rows drawing from the streams of prompt
/// `first_prompt_key + i`. With `images` (a model with a tower) the prompts are prefilled with
/// their images spliced in at M-RoPE positions and their new tokens sit at 1-D positions
/// shifted by each prompt's δ; without, `engine` prefills them itself.
pub fn generate_on(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    images: Option<PromptImages<'_>>,
    params: &SamplingParams,
    first_prompt_key: u64,
) -> Result<Vec<Completion>> {
    params.validate()?;
    let max_pos = model.config.max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), "prompt {i} is empty");
        ensure!(
            p.len() + params.max_new_tokens <= max_pos,
            "prompt {i} has {} tokens; with max_new_tokens {} it exceeds the model's {} positions",
            p.len(),
            params.max_new_tokens,
            max_pos
        );
    }
    if let Some(im) = &images {
        ensure!(
            im.images.len() == prompts.len(),
            "internal: images for {} prompts, {} prompts",
            im.images.len(),
            prompts.len()
        );
    }
    if prompts.is_empty() || params.n == 0 {
        return Ok(Vec::new());
    }
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let longest = lens.iter().max().copied().unwrap_or(0) + params.max_new_tokens;
    let (batch, offsets) = match images {
        // Prefill every prompt once and add its n rows (prompt-major), on the engine's device.
        None => {
            let mut batch = engine.new_batch(prompts.len() * params.n, longest)?;
            batch.push_prompts(prompts, params.n, params.max_new_tokens)?;
            (batch, vec![0; lens.len()])
        }
        // Prefill with the images spliced in (M-RoPE positions), then n rows per prompt, each
        // with its own copy of the prompt's cache; new tokens shifted by each prompt's δ.
        Some(im) => {
            let refs: Vec<(&[u32], &[ProcessedImage])> = prompts
                .iter()
                .zip(im.images)
                .map(|(p, im)| (p.as_slice(), im.as_slice()))
                .collect();
            let (h_last, kv, seqs, deltas) = im.model.prefill(&refs)?;
            let prompt_logits = model.logits(&h_last)?.to_vec2::<f32>()?;
            let mut batch = engine.new_batch(prompts.len() * params.n, longest)?;
            push_prefilled(
                &mut *batch,
                model,
                &kv,
                &seqs,
                &prompt_logits,
                params.n,
                params.max_new_tokens,
            )?;
            (batch, deltas)
        }
    };
    let rows = prompt_rows(&lens, &offsets, params, first_prompt_key);
    decode_pushed(model, tokenizer, batch, rows, params)
}

/// One row to decode: its context, the stream it draws from and its token limit.
#[derive(Debug, Clone)]
pub struct RowSpec {
    /// The row's tokens so far (prompt, or a trajectory's whole context).
    pub context: Vec<u32>,
    /// The random stream: (prompt key, sample index) of [`TokenSampler::new`].
    pub stream: (u64, u64),
    /// New tokens at most for this row.
    pub max_new_tokens: usize,
    /// Reported as the completion's `prompt_index` / `sample_index`.
    pub prompt_index: usize,
    pub sample_index: usize,
}

/// Samples one continuation per row, each row prefilled from its own context (packed, one
/// pass) and drawing from its own stream (`params.seed`, `row.stream`); `params.n` and
/// `params.max_new_tokens` are not used (each row has its own limit). The multi-turn rollout
/// continues trajectories after a tool response with it.
pub fn generate_rows(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    rows: &[RowSpec],
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    params.validate()?;
    let max_pos = model.config.max_position_embeddings;
    for (i, r) in rows.iter().enumerate() {
        ensure!(!r.context.is_empty(), "row {i}: the context is empty");
        ensure!(r.max_new_tokens > 0, "row {i}: no room for a new token");
        ensure!(
            r.context.len() + r.max_new_tokens <= max_pos,
            "row {i} has {} tokens; with {} new tokens it exceeds the model's {} positions",
            r.context.len(),
            r.max_new_tokens,
            max_pos
        );
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let most_new = rows.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
    let longest = rows.iter().map(|r| r.context.len()).max().unwrap_or(0) + most_new;
    let mut batch = engine.new_batch(rows.len(), longest)?;
    let contexts: Vec<Vec<u32>> = rows.iter().map(|r| r.context.clone()).collect();
    batch.push_prompts(&contexts, 1, most_new)?;
    let decoded = rows
        .iter()
        .map(|r| Row {
            prompt_index: r.prompt_index,
            sample_index: r.sample_index,
            prompt_len: r.context.len(),
            max_new_tokens: r.max_new_tokens,
            position_offset: 0,
            sampler: TokenSampler::new(params, r.stream.0, r.stream.1),
            token_ids: Vec::with_capacity(r.max_new_tokens),
            logprobs: Vec::with_capacity(r.max_new_tokens),
            text: IncrementalDecoder::new(true),
        })
        .collect();
    decode_pushed(model, tokenizer, batch, decoded, params)
}

/// The rows of `params.n` samples per prompt (prompt-major): prompt i's new tokens sit at 1-D
/// positions prompt_len + k + `position_offsets[i]` and its rows draw from the streams of
/// prompt `first_prompt_key + i`.
fn prompt_rows(
    prompt_lens: &[usize],
    position_offsets: &[i64],
    params: &SamplingParams,
    first_prompt_key: u64,
) -> Vec<Row> {
    let mut rows = Vec::with_capacity(prompt_lens.len() * params.n);
    for (pi, &prompt_len) in prompt_lens.iter().enumerate() {
        for si in 0..params.n {
            rows.push(Row {
                prompt_index: pi,
                sample_index: si,
                prompt_len,
                max_new_tokens: params.max_new_tokens,
                position_offset: position_offsets[pi],
                sampler: TokenSampler::new(params, first_prompt_key + pi as u64, si as u64),
                token_ids: Vec::with_capacity(params.max_new_tokens),
                logprobs: Vec::with_capacity(params.max_new_tokens),
                text: IncrementalDecoder::new(true),
            });
        }
    }
    rows
}

/// Samples `params.n` completions for each prompt with its images (token ids with the
/// `<|image_pad|>` runs already expanded) from a Qwen2-VL-family model, on the CPU
/// ([`generate_on`] with [`PromptImages`]).
pub fn generate_vl(
    model: &Qwen2VL,
    tokenizer: &Tokenizer,
    prompts: &[(Vec<u32>, Vec<ProcessedImage>)],
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|(p, _)| p.clone()).collect();
    let images: Vec<Vec<ProcessedImage>> = prompts.iter().map(|(_, im)| im.clone()).collect();
    let images = PromptImages {
        model: model.view(),
        images: &images,
    };
    let text = &model.text;
    generate_on(text, text, tokenizer, &ids, Some(images), params, 0)
}

/// The decode loop once every row is in `batch`, in the order of `rows`.
fn decode_pushed(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    mut batch: Box<dyn DecodeBatch + '_>,
    mut rows: Vec<Row>,
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    let mut done = Vec::with_capacity(rows.len());
    let stop_ids = stop_token_ids(params, model, tokenizer);
    ensure!(
        batch.rows() == rows.len(),
        "internal: the decode batch holds {} rows for {} samples",
        batch.rows(),
        rows.len()
    );

    let mut step = 0usize;
    if rows.iter().any(|r| r.max_new_tokens == 0) {
        // max_new_tokens = 0: nothing to sample (`generate_rows` refuses such rows).
        return Ok(done);
    }
    while !rows.is_empty() {
        step += 1;
        // Sample one token per row (rows are independent: parallel).
        let mut samplers: Vec<&mut TokenSampler> =
            rows.iter_mut().map(|r| &mut r.sampler).collect();
        let drawn = batch.sample(&mut samplers, step)?;
        for (row, (token, logprob)) in rows.iter_mut().zip(drawn) {
            row.token_ids.push(token);
            row.logprobs.push(logprob);
        }
        // Decide which rows are finished; they leave the batch and their cache is dropped.
        let mut reasons = Vec::with_capacity(rows.len());
        for row in rows.iter_mut() {
            reasons.push(finish_reason(row, params, &stop_ids, tokenizer)?);
        }
        if reasons.iter().any(Option::is_some) {
            let keep: Vec<bool> = reasons.iter().map(Option::is_none).collect();
            let mut unfinished = Vec::with_capacity(rows.len());
            for (row, reason) in rows.drain(..).zip(reasons) {
                match reason {
                    None => unfinished.push(row),
                    Some(finish_reason) => done.push(Completion {
                        prompt_index: row.prompt_index,
                        sample_index: row.sample_index,
                        text: tokenizer.decode(&row.token_ids, true)?,
                        token_ids: row.token_ids,
                        logprobs: row.logprobs,
                        finish_reason,
                        transcript: String::new(),
                        loss_mask: Vec::new(),
                        tool_calls: Vec::new(),
                    }),
                }
            }
            rows = unfinished;
            batch.retain(&keep)?;
        }
        if rows.is_empty() {
            break;
        }
        let tokens: Vec<u32> = rows
            .iter()
            .map(|r| r.token_ids[r.token_ids.len() - 1])
            .collect();
        let positions: Vec<u32> = rows
            .iter()
            .map(|r| {
                let p = (r.prompt_len + r.token_ids.len() - 1) as i64 + r.position_offset;
                u32::try_from(p)
                    .map_err(|_| anyhow::anyhow!("internal: negative decode position {p}"))
            })
            .collect::<Result<_>>()?;
        batch.step(&tokens, &positions)?;
    }
    done.sort_by_key(|c| (c.prompt_index, c.sample_index));
    Ok(done)
}

/// Whether `row` is finished after its latest token, and why.
fn finish_reason(
    row: &mut Row,
    params: &SamplingParams,
    stop_ids: &[u32],
    tokenizer: &Tokenizer,
) -> Result<Option<FinishReason>> {
    let last = row.token_ids[row.token_ids.len() - 1];
    if !params.ignore_eos && stop_ids.contains(&last) {
        return Ok(Some(FinishReason::Eos));
    }
    if !params.stop_strings.is_empty() {
        row.text.push(tokenizer, last)?;
        let text = row.text.text();
        if params
            .stop_strings
            .iter()
            .any(|s| text.contains(s.as_str()))
        {
            return Ok(Some(FinishReason::Stop));
        }
    }
    if row.token_ids.len() >= row.max_new_tokens {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}
