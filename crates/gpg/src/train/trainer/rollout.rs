//! The step's rollout: sampling and scoring rounds until the β_th pool is ready. Every rank
//! draws the same prompts (the shared sampler) and samples its contiguous share of them, with
//! random streams keyed by (seed, step, round, position in the round, sample), so the
//! completions do not depend on the number of ranks; the rewards and lengths of every round are
//! gathered (⊕) so that every rank takes the same β_th decision.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use crate::algo::{AgeScale, GroupPool, PoolStatus, ResampledBatch, ScoredGroup};
use crate::data::PreparedPrompt;
use crate::reward::RewardInput;
use crate::rollout::multi_turn::{generate_with_tools, ToolStats};
use crate::rollout::{Completion, FinishReason, SamplingParams};

use super::super::batch::GroupPayload;
use super::super::metrics::{CompletionLengths, Moments};
use super::{derive_seed, Trainer};

/// What the rollout rounds of a step produced.
#[derive(Debug)]
pub(super) struct RolloutOutcome {
    pub batch: ResampledBatch<GroupPayload>,
    /// Each reward function's scores over every sampled completion.
    pub per_function: BTreeMap<String, Moments>,
    /// The lengths of every sampled completion (all rounds).
    pub lengths: CompletionLengths,
    /// Prompt + completion tokens of every sampled completion.
    pub sampled_tokens: u64,
    pub samples_log: Vec<(String, String, f32)>,
    pub time_rollout: f64,
    pub time_reward: f64,
    /// Tool use over every round's completions, all ranks (multi-turn rollouts only).
    pub tool_stats: Option<ToolStats>,
}

impl RolloutOutcome {
    /// The step's tool metrics (multi-turn rollouts only).
    pub fn tool_metrics(&self) -> Option<crate::train::metrics::ToolMetrics> {
        self.tool_stats.map(|s| {
            let n = s.trajectories.max(1) as f64;
            crate::train::metrics::ToolMetrics {
                calls: s.calls as u64,
                errors: s.errors as u64,
                calls_per_trajectory: s.calls as f64 / n,
                turns_per_trajectory: s.turns as f64 / n,
                tool_tokens: s.tool_tokens as u64,
            }
        })
    }
}

impl Default for RolloutOutcome {
    fn default() -> Self {
        Self {
            batch: ResampledBatch {
                groups: Vec::new(),
                rounds_used: 0,
                n_valid_seen: 0,
                n_valid_in_batch: 0,
                threshold_met: false,
                scale: AgeScale::SkipUpdate,
            },
            per_function: BTreeMap::new(),
            lengths: CompletionLengths::default(),
            sampled_tokens: 0,
            samples_log: Vec::new(),
            time_rollout: 0.0,
            time_reward: 0.0,
            tool_stats: None,
        }
    }
}

impl Trainer {
    /// Sampling and scoring rounds until the β_th pool is ready (one round when resampling is
    /// off).
    pub(super) fn rollout(&mut self, step: u64) -> Result<RolloutOutcome> {
        let g = self.config.rollout.num_generations;
        let b = self.config.rollout.prompts_per_step;
        let mut pool = GroupPool::new(self.config.algorithm.resample, b, g)?;
        let mut out = RolloutOutcome::default();
        let mut round = 0u64;
        loop {
            if round > 0 {
                // A stop request between rounds ends the step here (nothing of it is written).
                self.check_stop()?;
            }
            let groups = self.rollout_round(step, round, &mut out)?;
            round += 1;
            if let PoolStatus::Ready { .. } = pool.add_round(groups)? {
                break;
            }
        }
        out.batch = pool.finish();
        Ok(out)
    }

    fn sampling_params(&self, seed: u64) -> SamplingParams {
        let r = &self.config.rollout;
        SamplingParams {
            n: r.num_generations,
            max_new_tokens: r.max_new_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            seed,
            stop_token_ids: self
                .tokenizer
                .token_to_id("<|im_end|>")
                .into_iter()
                .collect(),
            stop_strings: r.stop.clone(),
            ignore_eos: false,
        }
    }

    /// One round: B prompts × G completions, this rank's share sampled and scored here, the
    /// rewards and lengths of all B groups gathered (⊕) so that every rank holds them.
    fn rollout_round(
        &mut self,
        step: u64,
        round: u64,
        out: &mut RolloutOutcome,
    ) -> Result<Vec<ScoredGroup<GroupPayload>>> {
        let g = self.config.rollout.num_generations;
        let collective = self.comm.collective.clone();
        let indices = self
            .sampler
            .next_batch(self.config.rollout.prompts_per_step);
        let b = indices.len();
        let mine = collective.share(indices.len());
        let prompts: Vec<&PreparedPrompt> = indices[mine.clone()]
            .iter()
            .map(|&i| &self.prompts[i])
            .collect();
        let t0 = Instant::now();
        let params = self.sampling_params(derive_seed(self.config.seed, step, round));
        // The CPU model itself, or the CUDA decoder over the trained device weights.
        let completions = match &self.tools {
            None => self.model.generate(
                &*self.engine,
                &self.tokenizer,
                &prompts,
                &params,
                mine.start as u64,
            )?,
            Some(tools) => {
                // Multi-turn trajectories (text models: checked at start).
                let model = self.model.text();
                let engine = self.engine.decode_engine(model)?;
                let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
                let (completions, _) = generate_with_tools(
                    model,
                    &*engine,
                    &self.tokenizer,
                    &ids,
                    &params,
                    mine.start as u64,
                    tools,
                )?;
                completions
            }
        };
        out.time_rollout += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        // One copy of each prompt's dataset columns, shared by its G completions.
        let columns: Vec<Arc<serde_json::Map<String, serde_json::Value>>> = prompts
            .iter()
            .map(|p| Arc::new(p.record.columns.clone()))
            .collect();
        let inputs: Vec<RewardInput> = completions
            .iter()
            .map(|c| {
                let p = prompts[c.prompt_index];
                RewardInput {
                    prompt: p.record.prompt.plain_text(),
                    completion: c.text.clone(),
                    answer: p.record.answer.clone(),
                    completion_tokens: c.scored_len(),
                    columns: columns[c.prompt_index].clone(),
                }
            })
            .collect();
        let names = self.reward.names();
        let scores = if inputs.is_empty() {
            None
        } else {
            Some(self.reward.score_all(&inputs)?)
        };
        out.time_reward += t0.elapsed().as_secs_f64();

        // ⊕ The round's rewards, completion lengths (the model's own tokens), per-function
        // scores and whether each hit max_new_tokens (or the trajectory budget), of all B·G
        // completions, and with tools their calls, errors, turns and tool tokens: each rank
        // fills its share's slots, the sum gathers them (x + 0 = x, so the values arrive
        // exactly).
        let n = b * g;
        let truncated_at = (2 + names.len()) * n;
        let tool_rows = if self.tools.is_some() { 4 } else { 0 };
        let mut gathered = vec![0.0f64; n * (3 + names.len() + tool_rows)];
        let base = mine.start * g;
        if let Some(scores) = &scores {
            for (j, c) in completions.iter().enumerate() {
                gathered[base + j] = scores.total[j] as f64;
                gathered[n + base + j] = c.scored_len() as f64;
                if c.finish_reason == FinishReason::Length {
                    gathered[truncated_at + base + j] = 1.0;
                }
                if tool_rows > 0 {
                    let t = (3 + names.len()) * n + base + j;
                    let errors = c.tool_calls.iter().filter(|r| r.error).count();
                    let turns = 1 + c.tool_calls.len();
                    gathered[t] = c.tool_calls.len() as f64;
                    gathered[t + n] = errors as f64;
                    gathered[t + 2 * n] = turns as f64;
                    gathered[t + 3 * n] = (c.token_ids.len() - c.scored_len()) as f64;
                }
            }
            for (f, (_, values)) in scores.per_function.iter().enumerate() {
                for (j, &v) in values.iter().enumerate() {
                    gathered[(2 + f) * n + base + j] = v as f64;
                }
            }
        }
        self.comm.all_reduce_f64(&mut gathered)?;
        if tool_rows > 0 {
            let rows = &gathered[(3 + names.len()) * n..];
            let sum = |r: usize| rows[r * n..(r + 1) * n].iter().sum::<f64>() as usize;
            out.tool_stats
                .get_or_insert_with(ToolStats::default)
                .add(&ToolStats {
                    trajectories: n,
                    calls: sum(0),
                    errors: sum(1),
                    turns: sum(2),
                    tool_tokens: sum(3),
                    turn_limited: 0,
                });
        }
        for (f, name) in names.iter().enumerate() {
            let e = out.per_function.entry(name.to_string()).or_default();
            for &v in &gathered[(2 + f) * n..(3 + f) * n] {
                e.add(v as f32 as f64);
            }
        }
        for j in 0..n {
            let length = gathered[n + j] as usize;
            out.lengths.add(length, gathered[truncated_at + j] != 0.0);
            out.sampled_tokens += (self.prompts[indices[j / g]].ids.len() + length) as u64;
        }
        if round == 0 {
            self.gather_logged_completions(
                &indices,
                mine.start * g,
                &completions,
                &gathered[..n],
                out,
            )?;
        }

        // The groups' mean rewards weight their prompts in later epochs (data.sample_strategy;
        // every rank records the same gathered values).
        for (k, &prompt) in indices.iter().enumerate() {
            let mean = gathered[k * g..(k + 1) * g].iter().sum::<f64>() / g as f64;
            self.sampler.record_group(prompt, mean);
        }

        let mut by_prompt: Vec<Vec<Completion>> = vec![Vec::new(); mine.len()];
        for c in completions {
            by_prompt[c.prompt_index].push(c);
        }
        let mut by_prompt = by_prompt.into_iter();
        let mut groups = Vec::with_capacity(b);
        for (k, &prompt) in indices.iter().enumerate() {
            let slots = k * g..(k + 1) * g;
            groups.push(ScoredGroup {
                rewards: gathered[slots.clone()].iter().map(|&r| r as f32).collect(),
                payload: GroupPayload {
                    prompt,
                    lengths: gathered[n + slots.start..n + slots.end]
                        .iter()
                        .map(|&l| l as usize)
                        .collect(),
                    completions: if mine.contains(&k) {
                        by_prompt.next()
                    } else {
                        None
                    },
                },
            });
        }
        Ok(groups)
    }

    /// The first `logging.log_completions` completions of the step's first round, from
    /// whichever ranks sampled them (⊕ gathered only when some lie beyond rank 0's share).
    fn gather_logged_completions(
        &self,
        indices: &[usize],
        first_slot: usize,
        completions: &[Completion],
        rewards: &[f64],
        out: &mut RolloutOutcome,
    ) -> Result<()> {
        let wanted = self.config.logging.log_completions;
        let g = self.config.rollout.num_generations;
        let collective = &self.comm.collective;
        let rank0_slots =
            crate::train::collective::share(indices.len(), 0, collective.world()).len() * g;
        let mine: Vec<(String, String, f32)> = completions
            .iter()
            .enumerate()
            .filter(|(j, _)| first_slot + j < wanted)
            .map(|(j, c)| {
                (
                    self.prompts[indices[first_slot / g + c.prompt_index]]
                        .record
                        .prompt
                        .plain_text(),
                    // A multi-turn trajectory is logged whole, with its tool calls.
                    if c.transcript.is_empty() {
                        c.text.clone()
                    } else {
                        c.transcript.clone()
                    },
                    rewards[first_slot + j] as f32,
                )
            })
            .collect();
        if collective.world() == 1 || wanted <= rank0_slots {
            if collective.is_root() {
                out.samples_log = mine;
            }
            return Ok(());
        }
        let t0 = Instant::now();
        let all = collective.gather_bytes(serde_json::to_vec(&mine)?)?;
        self.comm.add_seconds(t0.elapsed().as_secs_f64());
        for bytes in all {
            let part: Vec<(String, String, f32)> = serde_json::from_slice(&bytes)?;
            out.samples_log.extend(part);
        }
        Ok(())
    }
}
