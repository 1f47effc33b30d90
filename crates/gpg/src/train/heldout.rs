//! Held-out accuracy during training: pass@1 as the mean over `samples` sampled completions
//! per prompt of the accuracy reward (mathematical equivalence with the gold answer).

use anyhow::{ensure, Result};

use crate::data::PreparedPrompt;
use crate::eval::{evaluate_on, EvalConfig, EvalItem};
use crate::model::decoding::DecodeEngine;
use crate::model::Qwen2;
use crate::tokenizer::Tokenizer;

use super::collective::Collective;

/// Prompts per sampling call of the held-out evaluation (and per shard unit).
const EVAL_CHUNK: usize = 64;

pub(super) fn eval_config(
    tokenizer: &Tokenizer,
    samples: usize,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> EvalConfig {
    EvalConfig {
        samples,
        temperature,
        top_p: 1.0,
        max_new_tokens,
        seed,
        stop_token_ids: tokenizer.token_to_id("<|im_end|>").into_iter().collect(),
        batch_prompts: EVAL_CHUNK,
        ..Default::default()
    }
}

/// Held-out pass@1: the mean over prompts and `samples` completions of 1[answer ≡ gold],
/// measured by [`crate::eval::evaluate`], sampled on `engine` (the CPU model itself, or a GPU
/// decoder).
#[allow(clippy::too_many_arguments)]
pub fn pass_at_1(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    prompts: &[PreparedPrompt],
    samples: usize,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> Result<f64> {
    let items = prompts
        .iter()
        .map(|p| EvalItem::from_record(&p.record))
        .collect::<Result<Vec<_>>>()?;
    let config = eval_config(tokenizer, samples, temperature, max_new_tokens, seed);
    Ok(evaluate_on(
        model,
        engine,
        None,
        tokenizer,
        &items,
        &config,
        &mut |_, _| Ok(()),
    )?
    .summary
    .pass_at_1)
}

/// [`pass_at_1`] sharded over ranks: the prompts' sampling chunks (64 prompts each, seeded by
/// their first item as [`crate::eval::EvalConfig::sampling_params`] does) are split
/// contiguously between ranks and the correct-sample counts summed (⊕), so every rank gets the
/// same figure for any number of ranks: Σ_i c_i / (n · k).
#[allow(clippy::too_many_arguments)]
pub fn pass_at_1_sharded(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    prompts: &[PreparedPrompt],
    samples: usize,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
    collective: &dyn Collective,
) -> Result<f64> {
    ensure!(!prompts.is_empty(), "eval: no items to evaluate");
    let items = prompts
        .iter()
        .map(|p| EvalItem::from_record(&p.record))
        .collect::<Result<Vec<_>>>()?;
    let config = eval_config(tokenizer, samples, temperature, max_new_tokens, seed);
    let n_chunks = items.len().div_ceil(EVAL_CHUNK);
    let mut counts = [0u64; 2]; // [Σ c_i, items]
    for chunk in collective.share(n_chunks) {
        let first = chunk * EVAL_CHUNK;
        let part = &items[first..(first + EVAL_CHUNK).min(items.len())];
        let chunk_config = EvalConfig {
            seed: config.sampling_params(first).seed,
            ..config.clone()
        };
        let report = evaluate_on(
            model,
            engine,
            None,
            tokenizer,
            part,
            &chunk_config,
            &mut |_, _| Ok(()),
        )?;
        counts[0] += report
            .per_item
            .iter()
            .map(|r| r.n_correct as u64)
            .sum::<u64>();
        counts[1] += report.per_item.len() as u64;
    }
    collective.all_reduce_sum_u64(&mut counts)?;
    Ok(counts[0] as f64 / (counts[1] as f64 * samples as f64))
}

/// How the held-out completions are sampled.
#[derive(Debug, Clone, Copy)]
pub struct SamplingSetup {
    pub samples: usize,
    pub temperature: f32,
    /// Per model turn (the trajectory's budget is `[tools] max_total_tokens`).
    pub max_new_tokens: usize,
    pub seed: u64,
}

/// Held-out pass@1 of multi-turn trajectories with `tools`: the mean over prompts and
/// samples of 1[the model's own text ≡ gold] (mathverify, as the accuracy reward; an answer
/// printed only by a tool does not count). Sharded over ranks by chunks of 64 prompts like
/// [`pass_at_1_sharded`], each chunk seeded by its first item, so the figure does not depend
/// on the number of ranks.
pub fn pass_at_1_with_tools(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    prompts: &[PreparedPrompt],
    tools: &crate::tools::Toolbox,
    setup: &SamplingSetup,
    collective: &dyn Collective,
) -> Result<f64> {
    ensure!(!prompts.is_empty(), "eval: no items to evaluate");
    let config = eval_config(
        tokenizer,
        setup.samples,
        setup.temperature,
        setup.max_new_tokens,
        setup.seed,
    );
    let n_chunks = prompts.len().div_ceil(EVAL_CHUNK);
    let mut counts = [0u64; 2]; // [correct samples, items]
    for chunk in collective.share(n_chunks) {
        let first = chunk * EVAL_CHUNK;
        let part = &prompts[first..(first + EVAL_CHUNK).min(prompts.len())];
        let ids: Vec<Vec<u32>> = part.iter().map(|p| p.ids.clone()).collect();
        let params = config.sampling_params(first);
        let (completions, _) = crate::rollout::multi_turn::generate_with_tools(
            model, engine, tokenizer, &ids, &params, 0, tools,
        )?;
        for c in &completions {
            let gold = part[c.prompt_index]
                .record
                .answer
                .as_deref()
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: the held-out item has no gold answer",
                        part[c.prompt_index].record.location
                    )
                })?;
            counts[0] += mathverify::is_correct(gold, &c.text) as u64;
        }
        counts[1] += part.len() as u64;
    }
    collective.all_reduce_sum_u64(&mut counts)?;
    Ok(counts[0] as f64 / (counts[1] as f64 * setup.samples as f64))
}
