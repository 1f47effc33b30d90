//! The RL training loop. One step, top to bottom:
//!
//! ```text
//! prompts ─► rollout (G completions each) ─► rewards ─► groups (β_th: sample more rounds)
//!   ─► advantages, α ─► per micro-batch: engine forward (logp_t) ─► objective (g_t)
//!   ─► engine backward (gradients, accumulated) ─► clip ─► AdamW ─► metrics / checkpoint
//! ```
//!
//! Every random draw is a pure function of (seed, step, round), and the data position is part
//! of the checkpoint, so a resumed run continues exactly as an uninterrupted one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::algo::{
    GroupPool, GroupStats, Normaliser, PolicyTokens, PoolStatus, RewardGroups, ScoredGroup,
    TokenLayout,
};
use crate::checkpoint;
use crate::data::{synthetic, EpochSampler, PromptDataset, PromptRecord, SamplerState};
use crate::model::{Activations, Qwen2, TrainBatch};
use crate::optim::{AdamW, LrSchedule};
use crate::reward::{RewardInput, WeightedSum};
use crate::rollout::{self, Completion, SamplingParams};
use crate::tokenizer::Tokenizer;

use super::config::TrainConfig;
use super::metrics::{MetricsLog, StepMetrics};
use super::update::{ModelUpdater, OptimizerMeta, StepOutcome};
use super::updater::Updater;

/// A prompt ready for sampling.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub record: PromptRecord,
    pub ids: Vec<u32>,
}

/// Prompts and their token ids, loaded and filtered as the recipe says. Returns the training
/// set and, for the synthetic task, its held-out split.
pub fn load_prompts(
    config: &TrainConfig,
    tokenizer: &Tokenizer,
) -> Result<(Vec<PreparedPrompt>, Option<Vec<PreparedPrompt>>)> {
    let data = &config.data;
    let (mut train, heldout) = if data.train == "synthetic" {
        let split = data.synthetic.generate()?;
        (
            synthetic::to_dataset(&split.train, &data.fields)?,
            Some(synthetic::to_dataset(&split.heldout, &data.fields)?),
        )
    } else {
        (PromptDataset::load(&data.train, &data.fields)?, None)
    };
    let dropped =
        train.limit_prompt_length_with(data.max_prompt_tokens, data.long_prompts, &|p| {
            Ok(tokenizer.encode_prompt(p)?.len())
        })?;
    if dropped > 0 {
        eprintln!(
            "dropped {dropped} prompts longer than {} tokens from {}",
            data.max_prompt_tokens, train.source
        );
    }
    ensure!(
        !train.is_empty(),
        "{}: no prompt left after dropping those longer than {} tokens",
        train.source,
        data.max_prompt_tokens
    );
    let prepare = |ds| super::heldout::prepare(tokenizer, ds);
    Ok((prepare(train)?, heldout.map(prepare).transpose()?))
}

/// What a checkpoint stores besides the model and the optimiser moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed.
    pub step: u64,
    pub sampler: SamplerState,
    pub tokens_seen: u64,
    /// AdamW configuration and step counts (moments are in the buffers file).
    pub optimizer: OptimizerMeta,
}

/// One training run.
pub struct Trainer {
    pub config: TrainConfig,
    pub model: Qwen2,
    pub tokenizer: Tokenizer,
    prompts: Vec<PreparedPrompt>,
    pub heldout: Option<Vec<PreparedPrompt>>,
    sampler: EpochSampler,
    reward: WeightedSum,
    updater: Updater,
    schedule: LrSchedule,
    pub step: u64,
    tokens_seen: u64,
    log: MetricsLog,
    /// Prompts of the periodic evaluation (eval.data), when configured.
    eval_prompts: Option<Vec<PreparedPrompt>>,
    /// The frozen initial model, kept when the objective has a KL penalty (β > 0). With LoRA
    /// it is the base with the adapter disabled, sharing the base weights (no second copy).
    reference: Option<Qwen2>,
}

/// Derives the random seed of (step, round) from the run's seed (SplitMix64 mixing).
fn derive_seed(seed: u64, step: u64, round: u64) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Trainer {
    /// Sets up a run: loads model, tokenizer, data; resumes from the latest checkpoint in the
    /// run folder when `resume` is true.
    pub fn new(config: TrainConfig, resume: bool) -> Result<Self> {
        config.validate()?;
        let device = config.device.open()?;
        let out = &config.output_dir;
        let latest = if resume {
            checkpoint::latest(out)?
        } else {
            None
        };
        if resume && latest.is_none() {
            bail!(
                "{}: --resume given but the run folder holds no checkpoint-<step> directory",
                out.display()
            );
        }
        if !resume && out.join("metrics.jsonl").exists() {
            bail!(
                "{}: the run folder already holds a run (metrics.jsonl); pass --resume to continue it or choose another output_dir",
                out.display()
            );
        }
        let model_dir = latest
            .as_ref()
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| config.model.clone());
        // With LoRA the base always comes from `model` and the adapter from the checkpoint.
        let weights_dir = if config.lora.is_some() {
            &config.model
        } else {
            &model_dir
        };
        let mut model = Qwen2::load(weights_dir, &device, config.precision)
            .with_context(|| format!("loading the model from {}", weights_dir.display()))?;
        if let Some(lora) = &config.lora {
            super::lora_run::attach_adapter(
                &mut model,
                lora,
                config.seed,
                &config.model,
                latest.as_ref(),
            )?;
        }
        let tokenizer = Tokenizer::from_dir(&model_dir)?;
        // The KL reference is always the run's starting model, also when resuming.
        let reference = if config.lora.is_some() && config.algorithm.loss.needs_reference_logp() {
            Some(model.without_adapter())
        } else if config.algorithm.loss.needs_reference_logp() {
            Some(
                Qwen2::load(&config.model, &device, config.precision).with_context(|| {
                    format!(
                        "loading the reference model from {}",
                        config.model.display()
                    )
                })?,
            )
        } else {
            None
        };
        let (prompts, heldout) = load_prompts(&config, &tokenizer)?;
        let reward = config.reward.build()?;
        let schedule = config.optim.schedule.build(config.optim.lr, config.steps)?;
        let (step, sampler, updater, tokens_seen) = match &latest {
            None => (
                0,
                EpochSampler::new(prompts.len(), config.seed)?,
                Updater::new(&model, AdamW::new(config.optim.adamw)?)?,
                0,
            ),
            Some((_, dir)) => {
                let (state, mut buffers) = checkpoint::load_state(dir)?;
                let state: TrainerState = serde_json::from_value(state)
                    .with_context(|| format!("{}: malformed trainer state", dir.display()))?;
                let optimizer = ModelUpdater::restore_optimizer(state.optimizer, &mut buffers)
                    .with_context(|| format!("{}: cannot restore the optimiser", dir.display()))?;
                let mut updater = Updater::new(&model, optimizer)?;
                updater
                    .restore_master(&mut model, &mut buffers)
                    .with_context(|| {
                        format!("{}: cannot restore the master weights", dir.display())
                    })?;
                (
                    state.step,
                    EpochSampler::resume(state.sampler, prompts.len())?,
                    updater,
                    state.tokens_seen,
                )
            }
        };
        std::fs::create_dir_all(out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        std::fs::write(out.join("config.toml"), config.to_toml()?)
            .with_context(|| format!("{}: cannot write config.toml", out.display()))?;
        let log = MetricsLog::open(out, step)?;
        let eval_prompts = match &config.eval {
            None => None,
            Some(e) => {
                let mut prompts = if e.data == "synthetic" {
                    heldout
                        .clone()
                        .context("eval.data = \"synthetic\" needs data.train = \"synthetic\"")?
                } else {
                    let ds = PromptDataset::load(&e.data, &config.data.fields)?;
                    super::heldout::prepare(&tokenizer, ds)?
                };
                if let Some(limit) = e.limit {
                    prompts.truncate(limit);
                }
                Some(prompts)
            }
        };
        Ok(Self {
            config,
            model,
            tokenizer,
            prompts,
            heldout,
            sampler,
            reward,
            updater,
            schedule,
            step,
            tokens_seen,
            log,
            eval_prompts,
            reference,
        })
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

    /// Held-out pass@1 of the current model (None when no evaluation is configured).
    pub fn evaluate(&self) -> Result<Option<f64>> {
        let (Some(e), Some(prompts)) = (&self.config.eval, &self.eval_prompts) else {
            return Ok(None);
        };
        let max_new = e
            .max_new_tokens
            .unwrap_or(self.config.rollout.max_new_tokens);
        let seed = derive_seed(self.config.seed, u64::MAX, 0);
        super::heldout::pass_at_1(
            &self.model,
            &self.tokenizer,
            prompts,
            e.samples,
            e.temperature,
            max_new,
            seed,
        )
        .map(Some)
    }

    fn eval_due(&self) -> bool {
        self.config
            .eval
            .as_ref()
            .is_some_and(|e| self.step.is_multiple_of(e.every) || self.step == self.config.steps)
    }

    /// Runs until `config.steps` optimiser steps are done (or `until` when given).
    pub fn train(&mut self, until: Option<u64>) -> Result<()> {
        let end = until.unwrap_or(self.config.steps).min(self.config.steps);
        let progress = self
            .config
            .logging
            .progress
            .then(|| super::progress::Progress::new(self.step, self.config.steps));
        while self.step < end {
            let metrics = self.train_step()?;
            if let Some(p) = &progress {
                p.update(&metrics);
            }
            let save_every = self.config.logging.save_every;
            if (save_every > 0 && self.step.is_multiple_of(save_every))
                || self.step == self.config.steps
            {
                self.save_checkpoint()?;
            }
        }
        if let Some(p) = progress {
            p.finish();
        }
        Ok(())
    }

    /// One optimiser step (sampling, rewards, update); returns its metrics, also logged.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t_step = Instant::now();
        let step = self.step;
        let lr = self.schedule.lr_at(step);
        let g = self.config.rollout.num_generations;
        let b = self.config.rollout.prompts_per_step;

        // Rollout and rewards, with β_th resampling rounds when configured.
        let mut pool = GroupPool::new(self.config.algorithm.resample, b, g)?;
        let mut time_rollout = 0.0;
        let mut time_reward = 0.0;
        let mut per_function: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut round = 0u64;
        let mut samples_log = Vec::new();
        loop {
            let indices = self.sampler.next_batch(b);
            let prompt_ids: Vec<Vec<u32>> = indices
                .iter()
                .map(|&i| self.prompts[i].ids.clone())
                .collect();
            let t0 = Instant::now();
            let params = self.sampling_params(derive_seed(self.config.seed, step, round));
            let completions =
                rollout::generate(&self.model, &self.tokenizer, &prompt_ids, &params)?;
            time_rollout += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let inputs: Vec<RewardInput> = completions
                .iter()
                .map(|c| {
                    let p = &self.prompts[indices[c.prompt_index]];
                    RewardInput {
                        prompt: p.record.prompt.plain_text(),
                        completion: c.text.clone(),
                        answer: p.record.answer.clone(),
                        completion_tokens: c.token_ids.len(),
                    }
                })
                .collect();
            let scores = self.reward.score_all(&inputs)?;
            time_reward += t0.elapsed().as_secs_f64();
            for (name, values) in &scores.per_function {
                let e = per_function.entry(name.clone()).or_insert((0.0, 0));
                e.0 += values.iter().map(|&v| v as f64).sum::<f64>();
                e.1 += values.len();
            }
            if round == 0 {
                for (c, r) in completions
                    .iter()
                    .zip(&scores.total)
                    .take(self.config.logging.log_completions)
                {
                    samples_log.push((
                        self.prompts[indices[c.prompt_index]]
                            .record
                            .prompt
                            .plain_text(),
                        c.text.clone(),
                        *r,
                    ));
                }
            }
            let mut groups = Vec::with_capacity(b);
            let mut by_prompt: Vec<Vec<Completion>> = vec![Vec::new(); indices.len()];
            for c in completions {
                by_prompt[c.prompt_index].push(c);
            }
            for (k, completions) in by_prompt.into_iter().enumerate() {
                let rewards = scores.total[k * g..(k + 1) * g].to_vec();
                groups.push(ScoredGroup {
                    rewards,
                    payload: (indices[k], completions),
                });
            }
            round += 1;
            if let PoolStatus::Ready { .. } = pool.add_round(groups)? {
                break;
            }
        }
        let batch = pool.finish();
        let rewards = batch.rewards();
        let reward_groups = RewardGroups::new(&rewards, g)?;
        let stats = GroupStats::of(&reward_groups);
        let advantages = self.config.advantage_estimator().compute(&reward_groups)?;
        let loss_scale = self.config.algorithm.loss.loss_scale(batch.scale);

        // Sequences of the update, in group order.
        let mut seqs: Vec<(usize, Vec<u32>, Vec<f32>)> = Vec::new(); // (prompt index, completion ids, sampling logprobs)
        for group in &batch.groups {
            for c in &group.payload.1 {
                seqs.push((group.payload.0, c.token_ids.clone(), c.logprobs.clone()));
            }
        }
        let completion_lengths: Vec<usize> = seqs.iter().map(|s| s.1.len()).collect();
        let n_tokens: usize = completion_lengths.iter().sum();
        self.tokens_seen += n_tokens as u64;

        let t_update = Instant::now();
        let mut update = UpdateOutcome::default();
        let skipped = match loss_scale {
            None => {
                Some("no group has differing rewards: the batch carries no gradient".to_string())
            }
            Some(_) if n_tokens == 0 => Some("every completion is empty".to_string()),
            Some(alpha) => {
                update = self.update(&seqs, &advantages, alpha, lr)?;
                update.skipped.clone()
            }
        };
        if let Some(reason) = &skipped {
            eprintln!("step {}: update skipped: {reason}", step + 1);
        }
        let time_update = t_update.elapsed().as_secs_f64();

        self.step += 1;
        let inverse_alpha = match batch.scale {
            crate::algo::AgeScale::Scale { inverse_alpha, .. } => inverse_alpha as f64,
            crate::algo::AgeScale::SkipUpdate => 0.0,
        };
        let eval_pass_at_1 = if self.eval_due() {
            self.evaluate()?
        } else {
            None
        };
        let metrics = StepMetrics {
            step: self.step,
            lr: lr as f64,
            loss: update.loss,
            grad_norm: update.grad_norm,
            reward: stats.reward_mean,
            reward_std: stats.reward_std_mean,
            rewards: per_function
                .into_iter()
                .map(|(k, (s, n))| (k, s / n.max(1) as f64))
                .collect(),
            completion_length: n_tokens as f64 / completion_lengths.len().max(1) as f64,
            completion_length_max: completion_lengths.iter().copied().max().unwrap_or(0),
            groups: stats.n_groups,
            valid_groups: stats.n_valid,
            identical_groups: stats.n_identical,
            easy_groups: stats.n_easy,
            hard_groups: stats.n_hard,
            inverse_alpha,
            resample_rounds: batch.rounds_used,
            entropy: update.entropy,
            clip_fraction: update.clip_fraction,
            kl: update.kl,
            tokens: n_tokens as u64,
            tokens_seen: self.tokens_seen,
            skipped,
            eval_pass_at_1,
            time_rollout_s: time_rollout,
            time_reward_s: time_reward,
            time_update_s: time_update,
            time_step_s: t_step.elapsed().as_secs_f64(),
        };
        self.log.write(&metrics, &samples_log)?;
        Ok(metrics)
    }

    /// Forward/backward over micro-batches, gradient clipping and the AdamW step.
    fn update(
        &mut self,
        seqs: &[(usize, Vec<u32>, Vec<f32>)],
        advantages: &[f32],
        alpha: f32,
        lr: f32,
    ) -> Result<UpdateOutcome> {
        let cfg = self.config.clone();
        let loss_fn = cfg.algorithm.loss;
        let inv_t = if cfg.rollout.temperature > 0.0 {
            1.0 / cfg.rollout.temperature
        } else {
            1.0
        };
        let total_tokens: usize = seqs.iter().map(|s| s.1.len()).sum();
        let normaliser = Normaliser::new(seqs.len(), total_tokens);
        let keep = if cfg.gradient_checkpointing {
            Activations::LayerInputs
        } else {
            Activations::All
        };
        // Micro-batches by token budget (prompt + completion).
        let mut micro: Vec<std::ops::Range<usize>> = Vec::new();
        let mut start = 0;
        let mut tokens = 0;
        for (i, (p, c, _)) in seqs.iter().enumerate() {
            let len = self.prompts[*p].ids.len() + c.len();
            if i > start && tokens + len > cfg.algorithm.micro_batch_tokens {
                micro.push(start..i);
                start = i;
                tokens = 0;
            }
            tokens += len;
        }
        micro.push(start..seqs.len());

        // Old-policy log-probs for several updates per batch (GRPO's num_iterations > 1).
        let old_logp: Option<Vec<f32>> =
            if loss_fn.uses_importance_ratio() && cfg.algorithm.num_iterations > 1 {
                let mut all = Vec::with_capacity(total_tokens);
                for r in &micro {
                    let batch = self.train_batch(&seqs[r.clone()])?;
                    all.extend(self.model.logprobs(&batch, inv_t)?.logprobs);
                }
                Some(all)
            } else {
                None
            };
        // Reference-model log-probs for the KL penalty (β > 0), from the frozen initial model.
        let ref_logp: Option<Vec<f32>> = match &self.reference {
            Some(reference) if loss_fn.needs_reference_logp() => {
                let mut all = Vec::with_capacity(total_tokens);
                for r in &micro {
                    let batch = self.train_batch(&seqs[r.clone()])?;
                    all.extend(reference.logprobs(&batch, inv_t)?.logprobs);
                }
                Some(all)
            }
            _ => None,
        };

        let mut outcome = UpdateOutcome::default();
        for iteration in 0..cfg.algorithm.num_iterations {
            let mut loss = 0.0;
            let mut entropy_sum = 0.0;
            let mut clip_sum = 0.0;
            let mut kl_sum = 0.0;
            let mut token_offset = 0;
            for (m, r) in micro.iter().enumerate() {
                let part = &seqs[r.clone()];
                let batch = self.train_batch(part)?;
                if let Some(adapter) = self.model.adapter_mut() {
                    // Adapter dropout masks: a pure function of (seed, step, iteration, micro-batch).
                    adapter.dropout_seed = derive_seed(
                        cfg.seed ^ 0xD50F,
                        self.step,
                        (iteration * micro.len() + m) as u64,
                    );
                }
                let (lp, cache) = self.model.forward_train_with(&batch, inv_t, keep)?;
                let lengths: Vec<usize> = part.iter().map(|s| s.1.len()).collect();
                let layout = TokenLayout::from_lengths(&lengths);
                let n = batch.num_completion_tokens();
                let span = token_offset..token_offset + n;
                let old = old_logp.as_ref().map(|o| &o[span.clone()]);
                let reference = ref_logp.as_ref().map(|o| &o[span]);
                let out = loss_fn.compute(
                    &PolicyTokens {
                        layout: &layout,
                        logp: &lp.logprobs,
                        old_logp: old,
                        ref_logp: reference,
                        advantages: &advantages[r.clone()],
                    },
                    alpha,
                    normaliser,
                )?;
                loss += out.loss;
                entropy_sum += lp.entropy.iter().map(|&e| e as f64).sum::<f64>();
                clip_sum += out.metrics.clip_fraction.unwrap_or(0.0) * n as f64;
                kl_sum += out.metrics.mean_kl.unwrap_or(0.0) * n as f64;
                self.updater
                    .backward_into(&self.model, &batch, cache, &out.token_weights)?;
                token_offset += n;
            }
            outcome.loss = loss;
            outcome.entropy = entropy_sum / total_tokens.max(1) as f64;
            outcome.clip_fraction = loss_fn
                .uses_importance_ratio()
                .then_some(clip_sum / total_tokens.max(1) as f64);
            outcome.kl = loss_fn
                .needs_reference_logp()
                .then_some(kl_sum / total_tokens.max(1) as f64);
            if !loss.is_finite() {
                self.updater.zero_grad();
                outcome.skipped = Some(format!("non-finite loss ({loss})"));
                return Ok(outcome);
            }
            match self
                .updater
                .step(&mut self.model, lr, cfg.optim.max_grad_norm)?
            {
                StepOutcome::Applied(clip) => outcome.grad_norm = clip.norm,
                StepOutcome::Skipped(clip) => {
                    outcome.grad_norm = clip.norm;
                    outcome.skipped = Some(format!("non-finite gradient norm ({})", clip.norm));
                    return Ok(outcome);
                }
            }
        }
        Ok(outcome)
    }

    fn train_batch(&self, part: &[(usize, Vec<u32>, Vec<f32>)]) -> Result<TrainBatch> {
        let pairs: Vec<(&[u32], &[u32])> = part
            .iter()
            .map(|(p, c, _)| (self.prompts[*p].ids.as_slice(), c.as_slice()))
            .collect();
        TrainBatch::new(&pairs)
    }

    /// Appends a held-out evaluation (e.g. the one before training) to `eval.jsonl`.
    pub fn record_eval(&self, step: u64, pass_at_1: f64) -> Result<()> {
        let path = self.config.output_dir.join("eval.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        use std::io::Write;
        writeln!(
            f,
            "{}",
            serde_json::json!({"step": step, "pass_at_1": pass_at_1})
        )?;
        Ok(())
    }

    /// The first recorded held-out evaluation of this run (from `eval.jsonl`).
    pub fn first_eval(&self) -> Option<f64> {
        let text = std::fs::read_to_string(self.config.output_dir.join("eval.jsonl")).ok()?;
        let first: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
        first.get("pass_at_1")?.as_f64()
    }

    /// Writes the trained model (Hugging Face format, loadable by transformers) to `dir`; with
    /// LoRA, the adapter in PEFT format (adapter_config.json, adapter_model.safetensors).
    pub fn save_final(&self, dir: &Path) -> Result<()> {
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        self.model.save_trained(&tmp)?;
        self.tokenizer.save_pretrained(&tmp)?;
        let generation = serde_json::json!({"eos_token_id": self.model.config.eos_token_id});
        std::fs::write(
            tmp.join("generation_config.json"),
            serde_json::to_vec_pretty(&generation)?,
        )?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
        Ok(())
    }

    /// Writes `checkpoint-<step>` (model, tokenizer, optimiser, data position) atomically and
    /// prunes old ones.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = self.config.output_dir.clone();
        let dir = out.join(format!("checkpoint-{}", self.step));
        let (optimizer, buffers) = self.updater.checkpoint_state(&self.model)?;
        let state = TrainerState {
            step: self.step,
            sampler: self.sampler.state(),
            tokens_seen: self.tokens_seen,
            optimizer,
        };
        let generation = serde_json::json!({
            "eos_token_id": self.model.config.eos_token_id,
        });
        checkpoint::save(
            &dir,
            &self.model,
            &self.tokenizer,
            &[
                (
                    "generation_config.json",
                    serde_json::to_vec_pretty(&generation)?,
                ),
                ("config.toml", self.config.to_toml()?.into_bytes()),
            ],
            &serde_json::to_value(&state)?,
            &buffers,
        )?;
        self.log.flush()?;
        prune_checkpoints(&out, self.config.logging.keep_checkpoints)?;
        Ok(dir)
    }
}

/// Removes all but the newest `keep` checkpoints (never the newest one).
fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(out)? {
        let entry = entry?;
        if let Some(step) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            steps.push((step, entry.path()));
        }
    }
    steps.sort();
    let keep = keep.max(1);
    if steps.len() > keep {
        for (_, path) in &steps[..steps.len() - keep] {
            std::fs::remove_dir_all(path)
                .with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    Ok(())
}

#[derive(Debug, Default, Clone)]
struct UpdateOutcome {
    loss: f64,
    grad_norm: f64,
    entropy: f64,
    clip_fraction: Option<f64>,
    kl: Option<f64>,
    skipped: Option<String>,
}
