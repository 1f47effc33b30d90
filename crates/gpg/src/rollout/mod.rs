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
use crate::model::qwen2_vl::Qwen2VL;
/// The sampling types live below the engine ([`crate::sampling`]); re-exported here, where
/// callers set up a rollout.
pub use crate::sampling::{self, SamplingParams, TokenSampler};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

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
    /// `max_new_tokens` were generated.
    Length,
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
    /// The new tokens decoded, special tokens skipped.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// State of one unfinished row.
struct Row {
    prompt_index: usize,
    sample_index: usize,
    prompt_len: usize,
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
    generate_on(model, model, tokenizer, prompts, params, 0)
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
    generate_on(model, model, tokenizer, prompts, params, first_prompt_key)
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
    generate_on(model, engine, tokenizer, prompts, params, 0)
}

/// The sampler behind [`generate`], [`generate_keyed`] and [`generate_with`]: prompts
/// decoded on `engine`, prompt `i`'s rows drawing from the streams of prompt
/// `first_prompt_key + i`.
pub fn generate_on(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
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
    if prompts.is_empty() || params.n == 0 {
        return Ok(Vec::new());
    }
    // Prefill every prompt once and add its n rows (prompt-major), on the engine's device.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + params.max_new_tokens;
    let mut batch = engine.new_batch(prompts.len() * params.n, longest)?;
    batch.push_prompts(prompts, params.n, params.max_new_tokens)?;
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let offsets = vec![0; lens.len()];
    decode_pushed(
        model,
        tokenizer,
        batch,
        &lens,
        &offsets,
        params,
        first_prompt_key,
    )
}

/// Samples `params.n` completions for each prompt with its images (token ids with the
/// `<|image_pad|>` runs already expanded) from a Qwen2-VL-family model, on the CPU.
pub fn generate_vl(
    model: &Qwen2VL,
    tokenizer: &Tokenizer,
    prompts: &[(Vec<u32>, Vec<ProcessedImage>)],
    params: &SamplingParams,
) -> Result<Vec<Completion>> {
    generate_vl_keyed(model, tokenizer, prompts, params, 0)
}

/// [`generate_vl`] for prompts that are a slice of a larger batch starting at position
/// `first_prompt_key` (see [`generate_keyed`]).
pub fn generate_vl_keyed(
    model: &Qwen2VL,
    tokenizer: &Tokenizer,
    prompts: &[(Vec<u32>, Vec<ProcessedImage>)],
    params: &SamplingParams,
    first_prompt_key: u64,
) -> Result<Vec<Completion>> {
    params.validate()?;
    let text = &model.text;
    let max_pos = text.config.max_position_embeddings;
    for (i, (p, _)) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), "prompt {i} is empty");
        ensure!(
            p.len() + params.max_new_tokens <= max_pos,
            "prompt {i} has {} tokens; with max_new_tokens {} it exceeds the model's {} positions",
            p.len(),
            params.max_new_tokens,
            max_pos
        );
    }
    if prompts.is_empty() || params.n == 0 {
        return Ok(Vec::new());
    }
    let refs: Vec<(&[u32], &[ProcessedImage])> = prompts
        .iter()
        .map(|(p, im)| (p.as_slice(), im.as_slice()))
        .collect();
    // Prefill with the images spliced in (M-RoPE positions), then n rows per prompt, each
    // with its own copy of the prompt's cache, on the CPU decoder.
    let (h_last, kv, seqs, deltas) = model.prefill(&refs)?;
    let prompt_logits = text.logits(&h_last)?.to_vec2::<f32>()?;
    let lens: Vec<usize> = prompts.iter().map(|(p, _)| p.len()).collect();
    let longest = lens.iter().max().copied().unwrap_or(0) + params.max_new_tokens;
    let mut batch = text.new_batch(prompts.len() * params.n, longest)?;
    push_prefilled(
        &mut *batch,
        text,
        &kv,
        &seqs,
        &prompt_logits,
        params.n,
        params.max_new_tokens,
    )?;
    decode_pushed(
        text,
        tokenizer,
        batch,
        &lens,
        &deltas,
        params,
        first_prompt_key,
    )
}

/// The decode loop once every prompt's `params.n` rows are in `batch` (prompt-major): prompt
/// i's new tokens sit at 1-D positions prompt_len + k + `position_offsets[i]` and its rows draw
/// from the streams of prompt `first_prompt_key + i`.
fn decode_pushed(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    mut batch: Box<dyn DecodeBatch + '_>,
    prompt_lens: &[usize],
    position_offsets: &[i64],
    params: &SamplingParams,
    first_prompt_key: u64,
) -> Result<Vec<Completion>> {
    let mut done = Vec::with_capacity(prompt_lens.len() * params.n);
    let stop_ids = stop_token_ids(params, model, tokenizer);
    let mut rows = Vec::new();
    for (pi, &prompt_len) in prompt_lens.iter().enumerate() {
        for si in 0..params.n {
            rows.push(Row {
                prompt_index: pi,
                sample_index: si,
                prompt_len,
                position_offset: position_offsets[pi],
                sampler: TokenSampler::new(params, first_prompt_key + pi as u64, si as u64),
                token_ids: Vec::with_capacity(params.max_new_tokens),
                logprobs: Vec::with_capacity(params.max_new_tokens),
                text: IncrementalDecoder::new(true),
            });
        }
    }
    ensure!(
        batch.rows() == rows.len(),
        "internal: the decode batch holds {} rows for {} samples",
        batch.rows(),
        rows.len()
    );

    let mut step = 0usize;
    while !rows.is_empty() && params.max_new_tokens > 0 {
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
    if row.token_ids.len() >= params.max_new_tokens {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}
