//! Multi-turn rollouts with tools (TRL's `GRPOTrainer(tools=...)`, verl's agent loop).
//!
//! A trajectory alternates the model's turns and tool turns:
//!
//! ```text
//! prompt │ model: … <tool_call>{…}</tool_call> │ tool: <|im_end|>…<tool_response>…<|im_start|>assistant\n │ model: … \boxed{307}<|im_end|>
//! ```
//!
//! Turn 0 samples the G rows of every prompt as plain sampling does (one prefill per prompt),
//! with `</tool_call>` as an extra stop string. A row that stopped there has its call read and
//! run ([`Toolbox::run_all`], threads), the tool turn's tokens (the chat template's, see
//! `tools::format`) appended with loss mask 0, and is sampled again in the next turn. The next
//! turn **re-prefills** each continuing row's whole context (prompt + trajectory so far) in one
//! packed pass rather than extending its KV cache: the decode seam has no multi-token append,
//! rows wait for their tools anyway, and a prefill of a few hundred tokens costs about what
//! decoding them would (the turn-0 prefill is shared by a prompt's rows; later turns are not).
//!
//! Limits: at most `max_turns` tool calls (one more ends the trajectory, `tool_limit`), at
//! most `max_total_tokens` completion tokens in all (model and tool tokens; a tool response
//! that does not fit ends the trajectory, `length`), each model turn at most
//! `rollout.max_new_tokens` tokens, and never beyond the model's positions.
//!
//! Determinism: turn k of the row (prompt key p, sample j) draws from the stream (p, j) of the
//! seed mixed with k, so the same seed gives the same trajectories whatever the batch and
//! the number of ranks; tool calls run in parallel but their results are put back in row
//! order. (A tool that is not deterministic itself — the clock, the network — breaks it.)

use anyhow::Result;

use super::{generate_on, generate_rows, Completion, FinishReason, RowSpec, SamplingParams};
use crate::model::decoding::DecodeEngine;
use crate::model::qwen2::Qwen2;
use crate::tokenizer::Tokenizer;
use crate::tools::{call, ToolCallRecord, Toolbox};

/// Counts of a multi-turn rollout (summed over its trajectories).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ToolStats {
    pub trajectories: usize,
    /// Tool calls made (answered, with a result or an error).
    pub calls: usize,
    /// Calls that ended in an error result (malformed, unknown tool, the tool's error,
    /// timeout, crash, flood, garbage).
    pub errors: usize,
    /// Model turns (≥ 1 per trajectory).
    pub turns: usize,
    /// Tokens of tool responses (masked out of the loss).
    pub tool_tokens: usize,
    /// Trajectories ended by `max_turns`.
    pub turn_limited: usize,
}

impl ToolStats {
    pub fn add(&mut self, other: &ToolStats) {
        self.trajectories += other.trajectories;
        self.calls += other.calls;
        self.errors += other.errors;
        self.turns += other.turns;
        self.tool_tokens += other.tool_tokens;
        self.turn_limited += other.turn_limited;
    }
}

/// The seed of turn `turn` (turn 0 keeps the rollout's seed).
fn turn_seed(seed: u64, turn: u64) -> u64 {
    if turn == 0 {
        return seed;
    }
    let mut z = seed ^ turn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Trajectory {
    prompt_index: usize,
    sample_index: usize,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    mask: Vec<bool>,
    calls: Vec<ToolCallRecord>,
    turns: usize,
    /// The last model turn's end; `None` while a tool call waits.
    finish: Option<FinishReason>,
    /// The last model turn's text (special tokens skipped).
    last_text: String,
}

impl Trajectory {
    fn push_turn(&mut self, c: Completion) {
        self.tokens.extend(&c.token_ids);
        self.logprobs.extend(&c.logprobs);
        self.mask
            .extend(std::iter::repeat_n(true, c.token_ids.len()));
        self.turns += 1;
        self.finish = Some(c.finish_reason);
        self.last_text = c.text;
    }

    /// Whether the last turn stopped at `</tool_call>`.
    fn wants_tool(&self) -> bool {
        self.finish == Some(FinishReason::Stop) && call::ends_with_call(&self.last_text)
    }
}

/// Samples `params.n` trajectories per prompt with the tools of `toolbox` (see the module
/// docs); prompt i's rows draw from the streams of prompt `first_prompt_key + i`. Returns the
/// completions in (prompt, sample) order, each with its loss mask and tool-call records, and
/// the rollout's counts.
pub fn generate_with_tools(
    model: &Qwen2,
    engine: &dyn DecodeEngine,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    first_prompt_key: u64,
    toolbox: &Toolbox,
) -> Result<(Vec<Completion>, ToolStats)> {
    let config = toolbox.config();
    let budget = config.max_total_tokens.unwrap_or(params.max_new_tokens);
    let max_pos = model.config.max_position_embeddings;
    let mut turn_params = params.clone();
    if !turn_params
        .stop_strings
        .iter()
        .any(|s| s == call::CALL_CLOSE)
    {
        turn_params.stop_strings.push(call::CALL_CLOSE.to_string());
    }
    turn_params.max_new_tokens = params.max_new_tokens.min(budget);
    let first = generate_on(
        model,
        engine,
        tokenizer,
        prompts,
        None,
        &turn_params,
        first_prompt_key,
    )?;
    let mut trajectories: Vec<Trajectory> = first
        .into_iter()
        .map(|c| {
            let mut t = Trajectory {
                prompt_index: c.prompt_index,
                sample_index: c.sample_index,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                mask: Vec::new(),
                calls: Vec::new(),
                turns: 0,
                finish: None,
                last_text: String::new(),
            };
            t.push_turn(c);
            t
        })
        .collect();
    let mut stats = ToolStats {
        trajectories: trajectories.len(),
        ..Default::default()
    };

    for turn in 1u64.. {
        // The trajectories whose last turn called a tool (and may still do so).
        let mut waiting = Vec::new();
        for (k, t) in trajectories.iter_mut().enumerate() {
            if !t.wants_tool() {
                continue;
            }
            if t.calls.len() >= config.max_turns {
                t.finish = Some(FinishReason::ToolLimit);
                stats.turn_limited += 1;
                continue;
            }
            waiting.push(k);
        }
        if waiting.is_empty() {
            break;
        }
        let texts: Vec<String> = waiting
            .iter()
            .map(|&k| trajectories[k].last_text.clone())
            .collect();
        let records = toolbox.run_all(&texts);
        let mut rows = Vec::new();
        let mut row_of = Vec::new();
        for (&k, record) in waiting.iter().zip(records) {
            let t = &mut trajectories[k];
            stats.calls += 1;
            stats.errors += record.error as usize;
            let turn_ids = tokenizer.encode(&toolbox.format().render(&record.response), false)?;
            t.calls.push(record);
            let prompt_len = prompts[t.prompt_index].len();
            let after = t.tokens.len() + turn_ids.len();
            // Room for the response and at least one more model token.
            if after + 1 > budget || prompt_len + after + 1 > max_pos {
                t.finish = Some(FinishReason::Length);
                continue;
            }
            stats.tool_tokens += turn_ids.len();
            t.tokens.extend(&turn_ids);
            t.logprobs.extend(std::iter::repeat_n(0.0, turn_ids.len()));
            t.mask.extend(std::iter::repeat_n(false, turn_ids.len()));
            let mut context = prompts[t.prompt_index].clone();
            context.extend(&t.tokens);
            let max_new = params
                .max_new_tokens
                .min(budget - t.tokens.len())
                .min(max_pos - context.len());
            rows.push(RowSpec {
                context,
                stream: (
                    first_prompt_key + t.prompt_index as u64,
                    t.sample_index as u64,
                ),
                max_new_tokens: max_new,
                prompt_index: rows.len(),
                sample_index: 0,
            });
            row_of.push(k);
        }
        if rows.is_empty() {
            break;
        }
        let seeded = SamplingParams {
            seed: turn_seed(params.seed, turn),
            ..turn_params.clone()
        };
        let continued = generate_rows(model, engine, tokenizer, &rows, &seeded)?;
        for c in continued {
            let k = row_of[c.prompt_index];
            trajectories[k].push_turn(c);
        }
    }

    let mut out = Vec::with_capacity(trajectories.len());
    for t in trajectories {
        stats.turns += t.turns;
        let own: Vec<u32> = t
            .tokens
            .iter()
            .zip(&t.mask)
            .filter(|(_, &m)| m)
            .map(|(&id, _)| id)
            .collect();
        let tool_turns = !t.calls.is_empty();
        out.push(Completion {
            prompt_index: t.prompt_index,
            sample_index: t.sample_index,
            text: tokenizer.decode(&own, true)?,
            transcript: if tool_turns {
                tokenizer.decode(&t.tokens, false)?
            } else {
                String::new()
            },
            finish_reason: t.finish.unwrap_or(FinishReason::Length),
            loss_mask: if tool_turns { t.mask } else { Vec::new() },
            token_ids: t.tokens,
            logprobs: t.logprobs,
            tool_calls: t.calls,
        });
    }
    out.sort_by_key(|c| (c.prompt_index, c.sample_index));
    Ok((out, stats))
}

#[cfg(test)]
#[path = "multi_turn_tests.rs"]
mod tests;
