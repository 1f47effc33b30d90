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
//!
//! Data parallel (docs/training.md, "Several machines"): with a [`Collective`] of N ranks,
//! each rank samples and trains on its contiguous share of the step's groups; the global
//! quantities are reduced at the points that [`Trainer::train_step`] names, so a run at N
//! ranks computes the same step as one process, up to the order of floating-point sums.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::algo::{
    GroupPool, GroupStats, Normaliser, PolicyTokens, PoolStatus, RewardGroups, ScoredGroup,
    TokenLayout,
};
use crate::checkpoint;
use crate::data::{synthetic, EpochSampler, PromptDataset, PromptRecord, SamplerState};
use crate::optim::{AdamW, LrSchedule};
use crate::reward::{RewardInput, WeightedSum};
use crate::rollout::{Completion, SamplingParams};
use crate::tokenizer::Tokenizer;

use super::collective::{Collective, SingleProcess};
use super::config::TrainConfig;
use super::metrics::{MetricsLog, StepMetrics};
use super::policy::{Policy, PolicyBatch};
use super::update::{ModelUpdater, OptimizerMeta, StepOutcome};
use super::updater::Updater;

/// A prompt ready for sampling.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub record: PromptRecord,
    pub ids: Vec<u32>,
    /// The prompt's images, in order (image questions for a vision-language policy).
    pub images: Vec<PathBuf>,
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
    /// The policy: a text model or a vision-language model (see [`Policy`]).
    pub model: Policy,
    pub tokenizer: Tokenizer,
    prompts: Vec<PreparedPrompt>,
    pub heldout: Option<Vec<PreparedPrompt>>,
    sampler: EpochSampler,
    reward: WeightedSum,
    updater: Updater,
    schedule: LrSchedule,
    pub step: u64,
    tokens_seen: u64,
    /// The metrics files; rank 0 only (it alone writes the run folder).
    log: Option<MetricsLog>,
    /// The ranks of a data-parallel run (a single process by default) and the time spent
    /// communicating.
    comm: Comm,
    /// Prompts of the periodic evaluation (eval.data), when configured.
    eval_prompts: Option<Vec<PreparedPrompt>>,
    /// The frozen initial model, kept when the objective has a KL penalty (β > 0). With LoRA
    /// it is the base with the adapter disabled, sharing the base weights (no second copy).
    reference: Option<Policy>,
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
    /// Sets up a single-process run: loads model, tokenizer, data; resumes from the newest
    /// checkpoint in the run folder that verifies when `resume` is true.
    pub fn new(config: TrainConfig, resume: bool) -> Result<Self> {
        Self::with_collective(config, resume, Arc::new(SingleProcess))
    }

    /// Sets up this rank of a data-parallel run over `collective` (see [`Self::new`]). Rank 0
    /// alone reads the run folder (the checkpoint to resume from) and writes it; the other
    /// ranks need only the recipe's model and data. Rank 0's weights and trainer state are
    /// broadcast, so every rank starts from the same replica, whatever the world size of the
    /// run that wrote the checkpoint.
    pub fn with_collective(
        config: TrainConfig,
        resume: bool,
        collective: Arc<dyn Collective>,
    ) -> Result<Self> {
        config.validate()?;
        super::policy::check_recipe(&config)?;
        // The host model lives on the CPU; on a GPU run the trained weights live on the device
        // (train/device.rs), and what the GPU path does not support is refused here.
        let train_device = super::device::TrainDevice::open_for(
            &config.device,
            super::device::RunNeeds {
                model: &config.model,
                lora: config.lora.is_some(),
                world: collective.world(),
            },
        )?;
        let device = candle_core::Device::Cpu;
        let out = &config.output_dir;
        let root = collective.is_root();
        collective.ensure_same(
            config.to_toml()?.as_bytes(),
            "the recipe (after --set overrides)",
        )?;
        // Rank 0 chooses the checkpoint; every rank learns the verdict (and fails with it).
        let resume_from = agree(&*collective, || -> Result<Option<PathBuf>> {
            if !resume {
                if out.join("metrics.jsonl").exists() {
                    bail!(
                        "{}: the run folder already holds a run (metrics.jsonl); pass --resume to continue it or choose another output_dir",
                        out.display()
                    );
                }
                return Ok(None);
            }
            let Some(found) = checkpoint::latest_verified(out)? else {
                bail!(
                    "{}: --resume given but the run folder holds no checkpoint-<step> directory",
                    out.display()
                );
            };
            for (dir, why) in &found.skipped {
                eprintln!("--resume: skipping {}: {why}", dir.display());
            }
            match found.integrity {
                checkpoint::Integrity::Verified => eprintln!(
                    "--resume: continuing from {} (step {}, every file matches its manifest)",
                    found.dir.display(),
                    found.step
                ),
                checkpoint::Integrity::Unverified => eprintln!(
                    "--resume: continuing from {} (step {}; it has no {} to verify against)",
                    found.dir.display(),
                    found.step,
                    checkpoint::MANIFEST
                ),
            }
            Ok(Some(found.dir))
        })?;
        // Other ranks start from the recipe's model; rank 0's weights replace theirs below.
        let model_dir = match (&resume_from, root) {
            (Some(dir), true) => dir.clone(),
            _ => config.model.clone(),
        };
        // With LoRA the base always comes from `model` and the adapter from the checkpoint.
        let weights_dir = if config.lora.is_some() {
            &config.model
        } else {
            &model_dir
        };
        let mut model = Policy::load(
            weights_dir,
            &device,
            config.precision,
            !config.freeze_vision,
        )
        .with_context(|| format!("loading the model from {}", weights_dir.display()))?;
        if let Some(n) = config.gradient_checkpointing_layers {
            let layers = model.text().config.num_hidden_layers;
            ensure!(
                n <= layers,
                "gradient_checkpointing_layers = {n}, but {} has {layers} decoder layers",
                config.model.display()
            );
        }
        if let Some(lora) = &config.lora {
            super::lora_run::attach_adapter(
                model.text_mut(),
                lora,
                config.seed,
                &config.model,
                // Only rank 0 reads the checkpoint's adapter; the others receive it below.
                resume_from.as_deref().filter(|_| root),
            )?;
        }
        let tokenizer = Tokenizer::from_dir(&model_dir)?;
        // The KL reference is always the run's starting model, also when resuming.
        let reference = if config.lora.is_some() && config.algorithm.loss.needs_reference_logp() {
            Some(Policy::Text(model.text().without_adapter()))
        } else if config.algorithm.loss.needs_reference_logp() {
            Some(
                Policy::load(&config.model, &device, config.precision, false).with_context(
                    || {
                        format!(
                            "loading the reference model from {}",
                            config.model.display()
                        )
                    },
                )?,
            )
        } else {
            None
        };
        let comm = Comm::new(collective.clone());
        comm.timed(|| model.broadcast_weights(&*collective))?;
        comm.timed(|| super::replica::broadcast_adapter(model.text(), &*collective))?;
        let (prompts, heldout) = model.load_prompts(&config, &tokenizer)?;
        collective.ensure_same(
            &prompts_digest(&prompts),
            "the training prompts (data.train)",
        )?;
        let reward = config.reward.build()?;
        let schedule = config.optim.schedule.build(config.optim.lr, config.steps)?;
        let (step, sampler, updater, tokens_seen) = match &resume_from {
            None => (
                0,
                EpochSampler::new(prompts.len(), config.seed)?,
                model.updater(&train_device, AdamW::new(config.optim.adamw)?)?,
                0,
            ),
            Some(dir) => {
                let (state, mut buffers) = if collective.world() == 1 {
                    checkpoint::load_state(dir)?
                } else {
                    // ⊕ Rank 0's trainer state files, as bytes (the others may not see them).
                    let (mut state, mut buffers) = if root {
                        checkpoint::read_state_files(dir)?
                    } else {
                        (Vec::new(), Vec::new())
                    };
                    comm.timed(|| collective.broadcast_bytes(&mut state, 0))?;
                    comm.timed(|| collective.broadcast_bytes(&mut buffers, 0))?;
                    checkpoint::parse_state(dir, &state, &buffers)?
                };
                let state: TrainerState = serde_json::from_value(state)
                    .with_context(|| format!("{}: malformed trainer state", dir.display()))?;
                let optimizer = ModelUpdater::restore_optimizer(state.optimizer, &mut buffers)
                    .with_context(|| format!("{}: cannot restore the optimiser", dir.display()))?;
                let mut updater = model.updater(&train_device, optimizer)?;
                updater
                    .restore_master(model.text_mut(), &mut buffers)
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
        let log = if root {
            std::fs::create_dir_all(out)
                .with_context(|| format!("{}: cannot create", out.display()))?;
            std::fs::write(out.join("config.toml"), config.to_toml()?)
                .with_context(|| format!("{}: cannot write config.toml", out.display()))?;
            Some(MetricsLog::open(out, step)?)
        } else {
            None
        };
        let eval_prompts = match &config.eval {
            None => None,
            Some(e) => {
                let mut prompts = if e.data == "synthetic" {
                    heldout
                        .clone()
                        .context("eval.data = \"synthetic\" needs data.train = \"synthetic\"")?
                } else {
                    model.load_eval_prompts(&e.data, &config.data.fields, &tokenizer)?
                };
                if let Some(limit) = e.limit {
                    prompts.truncate(limit);
                }
                Some(prompts)
            }
        };
        let trainer = Self {
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
            comm,
            eval_prompts,
            reference,
        };
        trainer.check_replicas()?;
        Ok(trainer)
    }

    /// This rank's collective (rank, world, operations).
    pub fn collective(&self) -> &Arc<dyn Collective> {
        &self.comm.collective
    }

    /// ⊕ Errors on every rank unless all ranks hold bit-identical weights (a digest compared
    /// with rank 0's). A no-op at world 1.
    pub fn check_replicas(&self) -> Result<()> {
        let collective = &self.comm.collective;
        if collective.world() == 1 {
            return Ok(());
        }
        let digest = self.model.weights_digest()?;
        self.comm
            .timed(|| {
                collective.ensure_same(
                    &digest,
                    &format!("the model weights after step {}", self.step),
                )
            })
            .context(
                "the ranks' replicas diverged: every rank applies the same summed gradient, so \
                 this points at a faulty reduction, machine or build (mixed binaries?)",
            )
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
        let collective = self.comm.collective.clone();
        self.model
            .heldout_pass_at_1(
                &self.updater,
                &self.tokenizer,
                prompts,
                e.samples,
                e.temperature,
                max_new,
                seed,
                &*collective,
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
        let progress = (self.config.logging.progress && self.comm.collective.is_root())
            .then(|| super::progress::Progress::new(self.step, self.config.steps));
        let check_every = self.config.distributed.weight_check_every;
        while self.step < end {
            let metrics = self.train_step()?;
            if let Some(p) = &progress {
                p.update(&metrics);
            }
            if check_every > 0 && (self.step.is_multiple_of(check_every) || self.step == end) {
                self.check_replicas()?;
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
        // A GPU run's host model is brought up to date for `save_final` (no-op on the CPU).
        self.updater.sync_host(self.model.text_mut())?;
        Ok(())
    }

    /// One optimiser step; returns its metrics, also logged (rank 0). The named parts, and the
    /// points where a data-parallel run reduces over ranks (marked ⊕):
    ///
    /// 1. [`Self::rollout`]: sampling rounds until β_th is met; each round samples this rank's
    ///    share of the prompts, scores it, and ⊕ gathers the round's rewards and completion
    ///    lengths, so every rank sees the global groups and takes the same β_th decision;
    /// 2. [`Self::step_batch`]: the batch's sequences this rank trains on, and the global counts
    ///    of groups, valid groups (α) and completion tokens / sequences (the loss normaliser);
    /// 3. advantages, from the global rewards (identical on every rank);
    /// 4. [`Self::update`]: forward/backward of the local sequences with the global normaliser,
    ///    ⊕ the loss and metric sums, ⊕ one chunked all-reduce of the gradient buffer, then
    ///    clipping and the same AdamW step on every rank;
    /// 5. [`Self::log_step`]: metrics (rank 0 writes them).
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t_step = Instant::now();
        let step = self.step;
        let lr = self.schedule.lr_at(step);
        let comm_before = self.comm.seconds();
        let grad_before = self.comm.grad_seconds.get();

        let rollout = self.rollout(step)?;
        let batch = self.step_batch(&rollout.batch);
        let rewards = rollout.batch.rewards();
        let g = self.config.rollout.num_generations;
        let reward_groups = RewardGroups::new(&rewards, g)?;
        let stats = GroupStats::of(&reward_groups);
        let advantages = self.config.advantage_estimator().compute(&reward_groups)?;
        let local_advantages: Vec<f32> = batch
            .local_groups
            .iter()
            .flat_map(|&k| advantages[k * g..(k + 1) * g].iter().copied())
            .collect();
        let loss_scale = self.config.algorithm.loss.loss_scale(rollout.batch.scale);
        self.tokens_seen += batch.n_tokens as u64;

        let t_update = Instant::now();
        let mut update = UpdateOutcome::default();
        let skipped = match loss_scale {
            None => {
                Some("no group has differing rewards: the batch carries no gradient".to_string())
            }
            Some(_) if batch.n_tokens == 0 => Some("every completion is empty".to_string()),
            Some(alpha) => {
                let normaliser = Normaliser::new(batch.n_sequences, batch.n_tokens);
                update = self.update(&batch.seqs, &local_advantages, alpha, normaliser, lr)?;
                update.skipped.clone()
            }
        };
        if let Some(reason) = &skipped {
            if self.comm.collective.is_root() {
                eprintln!("step {}: update skipped: {reason}", step + 1);
            }
        }
        let time_update = t_update.elapsed().as_secs_f64();

        self.step += 1;
        let inverse_alpha = match rollout.batch.scale {
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
            rewards: rollout
                .per_function
                .into_iter()
                .map(|(k, (s, n))| (k, s / n.max(1) as f64))
                .collect(),
            completion_length: batch.n_tokens as f64 / batch.n_sequences.max(1) as f64,
            completion_length_max: batch.max_length,
            groups: stats.n_groups,
            valid_groups: stats.n_valid,
            identical_groups: stats.n_identical,
            easy_groups: stats.n_easy,
            hard_groups: stats.n_hard,
            inverse_alpha,
            resample_rounds: rollout.batch.rounds_used,
            entropy: update.entropy,
            clip_fraction: update.clip_fraction,
            kl: update.kl,
            tokens: batch.n_tokens as u64,
            tokens_seen: self.tokens_seen,
            skipped,
            eval_pass_at_1,
            time_rollout_s: rollout.time_rollout,
            time_reward_s: rollout.time_reward,
            time_update_s: time_update,
            time_comm_s: self.comm.seconds() - comm_before,
            time_comm_grad_s: self.comm.grad_seconds.get() - grad_before,
            time_step_s: t_step.elapsed().as_secs_f64(),
        };
        self.log_step(&metrics, &rollout.samples_log)?;
        Ok(metrics)
    }

    /// Sampling and scoring rounds until the β_th pool is ready (one round when resampling is
    /// off). Every rank draws the same prompts (the shared sampler) and samples its contiguous
    /// share of them, with random streams keyed by (seed, step, round, position in the round,
    /// sample): the completions do not depend on the number of ranks.
    fn rollout(&mut self, step: u64) -> Result<RolloutOutcome> {
        let g = self.config.rollout.num_generations;
        let b = self.config.rollout.prompts_per_step;
        let mut pool = GroupPool::new(self.config.algorithm.resample, b, g)?;
        let mut out = RolloutOutcome::default();
        let mut round = 0u64;
        loop {
            let groups = self.rollout_round(step, round, &mut out)?;
            round += 1;
            if let PoolStatus::Ready { .. } = pool.add_round(groups)? {
                break;
            }
        }
        out.batch = pool.finish();
        Ok(out)
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
        let completions = self.model.generate(
            &self.updater,
            &self.tokenizer,
            &prompts,
            &params,
            mine.start as u64,
        )?;
        out.time_rollout += t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let inputs: Vec<RewardInput> = completions
            .iter()
            .map(|c| {
                let p = &self.prompts[indices[mine.start + c.prompt_index]];
                RewardInput {
                    prompt: p.record.prompt.plain_text(),
                    completion: c.text.clone(),
                    answer: p.record.answer.clone(),
                    completion_tokens: c.token_ids.len(),
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

        // ⊕ The round's rewards, completion lengths and per-function scores of all B·G
        // completions: each rank fills its share's slots, the sum gathers them (x + 0 = x, so
        // the values arrive exactly).
        let n = b * g;
        let mut gathered = vec![0.0f64; n * (2 + names.len())];
        let base = mine.start * g;
        if let Some(scores) = &scores {
            for (j, c) in completions.iter().enumerate() {
                gathered[base + j] = scores.total[j] as f64;
                gathered[n + base + j] = c.token_ids.len() as f64;
            }
            for (f, (_, values)) in scores.per_function.iter().enumerate() {
                for (j, &v) in values.iter().enumerate() {
                    gathered[(2 + f) * n + base + j] = v as f64;
                }
            }
        }
        self.comm.all_reduce_f64(&mut gathered)?;
        for (f, name) in names.iter().enumerate() {
            let values = &gathered[(2 + f) * n..(3 + f) * n];
            let e = out.per_function.entry(name.to_string()).or_insert((0.0, 0));
            e.0 += values.iter().map(|&v| v as f32 as f64).sum::<f64>();
            e.1 += values.len();
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
                    c.text.clone(),
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

    /// The batch's sequences that this rank trains on (its own groups, in batch order) and the
    /// global counts every rank agrees on (from the gathered lengths).
    fn step_batch(&self, batch: &crate::algo::ResampledBatch<GroupPayload>) -> StepBatch {
        let mut out = StepBatch::default();
        for (k, group) in batch.groups.iter().enumerate() {
            out.n_sequences += group.payload.lengths.len();
            out.n_tokens += group.payload.lengths.iter().sum::<usize>();
            out.max_length = out
                .max_length
                .max(group.payload.lengths.iter().copied().max().unwrap_or(0));
            if let Some(completions) = &group.payload.completions {
                out.local_groups.push(k);
                for c in completions {
                    out.seqs.push((
                        group.payload.prompt,
                        c.token_ids.clone(),
                        c.logprobs.clone(),
                    ));
                }
            }
        }
        out
    }

    /// Writes the step's metrics and sampled completions (rank 0 only).
    fn log_step(&mut self, metrics: &StepMetrics, samples: &[(String, String, f32)]) -> Result<()> {
        if let Some(log) = &mut self.log {
            log.write(metrics, samples)?;
        }
        Ok(())
    }

    /// Forward/backward of this rank's sequences over micro-batches with the global normaliser,
    /// ⊕ the loss and metric sums and the gradient buffer, then clipping and the AdamW step
    /// (identical on every rank, since the summed gradient is).
    fn update(
        &mut self,
        seqs: &[(usize, Vec<u32>, Vec<f32>)],
        advantages: &[f32],
        alpha: f32,
        normaliser: Normaliser,
        lr: f32,
    ) -> Result<UpdateOutcome> {
        let cfg = self.config.clone();
        let loss_fn = cfg.algorithm.loss;
        let inv_t = if cfg.rollout.temperature > 0.0 {
            1.0 / cfg.rollout.temperature
        } else {
            1.0
        };
        let total_tokens = normaliser.n_tokens;
        let local_tokens: usize = seqs.iter().map(|s| s.1.len()).sum();
        let keep = cfg.activations();
        // Micro-batches by token budget (prompt + completion); none when this rank has no
        // completion token to train on (it still takes part in the reductions).
        let mut micro: Vec<std::ops::Range<usize>> = Vec::new();
        if local_tokens > 0 {
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
        }

        // Old-policy log-probs for several updates per batch (GRPO's num_iterations > 1).
        let old_logp: Option<Vec<f32>> =
            if loss_fn.uses_importance_ratio() && cfg.algorithm.num_iterations > 1 {
                let mut all = Vec::with_capacity(local_tokens);
                for r in &micro {
                    let batch = self.train_batch(&seqs[r.clone()])?;
                    all.extend(self.model.logprobs(&self.updater, &batch, inv_t)?.logprobs);
                }
                Some(all)
            } else {
                None
            };
        // Reference-model log-probs for the KL penalty (β > 0), from the frozen initial model.
        let ref_logp: Option<Vec<f32>> = match &self.reference {
            Some(reference) if loss_fn.needs_reference_logp() => {
                let mut all = Vec::with_capacity(local_tokens);
                for r in &micro {
                    let batch = self.train_batch(&seqs[r.clone()])?;
                    all.extend(reference.logprobs_on_host(&batch, inv_t)?.logprobs);
                }
                Some(all)
            }
            _ => None,
        };

        let mut outcome = UpdateOutcome::default();
        for iteration in 0..cfg.algorithm.num_iterations {
            // [loss, Σ entropy, Σ clipped·n, Σ kl·n] of this rank's micro-batches.
            let mut sums = [0.0f64; 4];
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
                let lengths: Vec<usize> = part.iter().map(|s| s.1.len()).collect();
                let layout = TokenLayout::from_lengths(&lengths);
                let n = batch.num_completion_tokens();
                let span = token_offset..token_offset + n;
                let old = old_logp.as_ref().map(|o| &o[span.clone()]);
                let reference = ref_logp.as_ref().map(|o| &o[span]);
                let tokens = PolicyTokens {
                    layout: &layout,
                    logp: &[],
                    old_logp: old,
                    ref_logp: reference,
                    advantages: &advantages[r.clone()],
                };
                // Where g_t does not depend on logp_t (GPG), it is known before the forward,
                // and the forward and backward run as one pass (the head's logits formed once).
                let fused = loss_fn.weights_independent_of_logp(old.is_some())
                    && self.model.fuses_forward_backward(&self.updater);
                let (lp, cache, g_before) = if fused {
                    let zeros = vec![0.0; n];
                    let g = loss_fn
                        .compute(
                            &PolicyTokens {
                                logp: &zeros,
                                ..tokens
                            },
                            alpha,
                            normaliser,
                        )?
                        .token_weights;
                    let lp = self.model.forward_backward_into(
                        &mut self.updater,
                        &batch,
                        inv_t,
                        keep,
                        &g,
                    )?;
                    (lp, None, Some(g))
                } else {
                    let (lp, cache) =
                        self.model
                            .forward_train_with(&self.updater, &batch, inv_t, keep)?;
                    (lp, Some(cache), None)
                };
                let out = loss_fn.compute(
                    &PolicyTokens {
                        logp: &lp.logprobs,
                        ..tokens
                    },
                    alpha,
                    normaliser,
                )?;
                sums[0] += out.loss;
                sums[1] += lp.entropy.iter().map(|&e| e as f64).sum::<f64>();
                sums[2] += out.metrics.clip_fraction.unwrap_or(0.0) * n as f64;
                sums[3] += out.metrics.mean_kl.unwrap_or(0.0) * n as f64;
                match (cache, g_before) {
                    (Some(cache), _) => self.model.backward_into(
                        &mut self.updater,
                        &batch,
                        cache,
                        &out.token_weights,
                    )?,
                    (None, Some(g)) => ensure!(
                        g == out.token_weights,
                        "internal: the token weights computed before the forward differ from the objective's"
                    ),
                    (None, None) => bail!("internal: a micro-batch with neither cache nor gradient"),
                }
                token_offset += n;
            }
            // ⊕ loss and metric sums; ⊕ the gradient buffer (one chunked all-reduce).
            self.comm.all_reduce_f64(&mut sums)?;
            self.comm
                .all_reduce_grads(self.updater.gradient_buffers_mut())?;
            let [loss, entropy_sum, clip_sum, kl_sum] = sums;
            outcome.loss = loss;
            outcome.entropy = entropy_sum / total_tokens;
            outcome.clip_fraction = loss_fn
                .uses_importance_ratio()
                .then_some(clip_sum / total_tokens);
            outcome.kl = loss_fn
                .needs_reference_logp()
                .then_some(kl_sum / total_tokens);
            if !loss.is_finite() {
                self.updater.zero_grad()?;
                outcome.skipped = Some(format!("non-finite loss ({loss})"));
                return Ok(outcome);
            }
            match self
                .updater
                .step(self.model.text_mut(), lr, cfg.optim.max_grad_norm)?
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

    fn train_batch(&self, part: &[(usize, Vec<u32>, Vec<f32>)]) -> Result<PolicyBatch> {
        let pairs: Vec<(&PreparedPrompt, &[u32])> = part
            .iter()
            .map(|(p, c, _)| (&self.prompts[*p], c.as_slice()))
            .collect();
        self.model.batch(&pairs)
    }

    /// Appends a held-out evaluation (e.g. the one before training) to `eval.jsonl` (rank 0;
    /// a no-op on the others).
    pub fn record_eval(&self, step: u64, pass_at_1: f64) -> Result<()> {
        if !self.comm.collective.is_root() {
            return Ok(());
        }
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
    /// LoRA, the adapter in PEFT format (adapter_config.json, adapter_model.safetensors). Rank 0
    /// only; a no-op on the others.
    pub fn save_final(&self, dir: &Path) -> Result<()> {
        if !self.comm.collective.is_root() {
            return Ok(());
        }
        let tmp = dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        self.model.save_trained(&tmp)?;
        self.tokenizer.save_pretrained(&tmp)?;
        let generation = serde_json::json!({"eos_token_id": self.model.text().config.eos_token_id});
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

    /// Writes `checkpoint-<step>` (model, tokenizer, optimiser, data position, manifest)
    /// atomically and prunes old ones. Rank 0 writes; the other ranks hold the same state and
    /// write nothing.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let out = self.config.output_dir.clone();
        let dir = out.join(format!("checkpoint-{}", self.step));
        let Some(log) = &mut self.log else {
            return Ok(dir);
        };
        log.flush()?;
        self.updater.sync_host(self.model.text_mut())?;
        let (optimizer, buffers) = self.updater.checkpoint_state(self.model.text())?;
        let state = TrainerState {
            step: self.step,
            sampler: self.sampler.state(),
            tokens_seen: self.tokens_seen,
            optimizer,
        };
        let generation = serde_json::json!({
            "eos_token_id": self.model.text().config.eos_token_id,
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

/// Rank 0's verdict on a decision only it can take (it alone sees the run folder), shared with
/// every rank: its value, or its error on every rank.
fn agree<T: Serialize + serde::de::DeserializeOwned>(
    collective: &dyn Collective,
    decide: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if collective.world() == 1 {
        return decide();
    }
    let mut message = if collective.is_root() {
        let verdict: std::result::Result<T, String> = decide().map_err(|e| format!("{e:#}"));
        serde_json::to_vec(&verdict)?
    } else {
        Vec::new()
    };
    collective.broadcast_bytes(&mut message, 0)?;
    let verdict: std::result::Result<T, String> =
        serde_json::from_slice(&message).context("internal: rank 0's verdict")?;
    verdict.map_err(|e| {
        if collective.is_root() {
            anyhow::anyhow!(e)
        } else {
            anyhow::anyhow!("rank 0: {e}")
        }
    })
}

/// SHA-256 of the prompts' token ids (the ranks must train on the same data).
fn prompts_digest(prompts: &[PreparedPrompt]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in prompts {
        h.update((p.ids.len() as u64).to_le_bytes());
        for id in &p.ids {
            h.update(id.to_le_bytes());
        }
    }
    h.finalize().to_vec()
}

/// The collective with a clock of the time spent in it.
struct Comm {
    collective: Arc<dyn Collective>,
    seconds: std::cell::Cell<f64>,
    /// Of which the gradient all-reduces.
    grad_seconds: std::cell::Cell<f64>,
}

impl Comm {
    fn new(collective: Arc<dyn Collective>) -> Self {
        Self {
            collective,
            seconds: std::cell::Cell::new(0.0),
            grad_seconds: std::cell::Cell::new(0.0),
        }
    }

    /// Seconds spent in collective operations so far.
    fn seconds(&self) -> f64 {
        self.seconds.get()
    }

    fn add_seconds(&self, s: f64) {
        self.seconds.set(self.seconds.get() + s);
    }

    fn timed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let t0 = Instant::now();
        let out = f();
        self.add_seconds(t0.elapsed().as_secs_f64());
        out
    }

    fn all_reduce_f64(&self, data: &mut [f64]) -> Result<()> {
        if self.collective.world() == 1 {
            return Ok(());
        }
        self.timed(|| self.collective.all_reduce_sum_f64(data))
    }

    /// ⊕ Sums the gradient buffers (the model's, or the adapter's A and B) over ranks as one
    /// flat buffer (packed into chunks).
    fn all_reduce_grads(&self, mut slices: Vec<&mut [f32]>) -> Result<()> {
        if self.collective.world() == 1 {
            return Ok(());
        }
        let t0 = Instant::now();
        let out = self.timed(|| self.collective.all_reduce_sum_slices(&mut slices));
        self.grad_seconds
            .set(self.grad_seconds.get() + t0.elapsed().as_secs_f64());
        out
    }
}

/// A group of the step's pool: where it came from, its completions' lengths (known on every
/// rank) and, on the rank that sampled it, the completions themselves.
#[derive(Debug, Clone)]
struct GroupPayload {
    /// Index of the prompt in the training set.
    prompt: usize,
    lengths: Vec<usize>,
    completions: Option<Vec<Completion>>,
}

/// What the rollout rounds of a step produced.
#[derive(Debug)]
struct RolloutOutcome {
    batch: crate::algo::ResampledBatch<GroupPayload>,
    /// (sum, count) of each reward function's scores over every sampled completion.
    per_function: BTreeMap<String, (f64, usize)>,
    samples_log: Vec<(String, String, f32)>,
    time_rollout: f64,
    time_reward: f64,
}

impl Default for RolloutOutcome {
    fn default() -> Self {
        Self {
            batch: crate::algo::ResampledBatch {
                groups: Vec::new(),
                rounds_used: 0,
                n_valid_seen: 0,
                n_valid_in_batch: 0,
                threshold_met: false,
                scale: crate::algo::AgeScale::SkipUpdate,
            },
            per_function: BTreeMap::new(),
            samples_log: Vec::new(),
            time_rollout: 0.0,
            time_reward: 0.0,
        }
    }
}

/// The step's batch as this rank trains on it.
#[derive(Debug, Default)]
struct StepBatch {
    /// (prompt index, completion ids, sampling log-probs) of this rank's sequences.
    seqs: Vec<(usize, Vec<u32>, Vec<f32>)>,
    /// Positions in the batch of this rank's groups.
    local_groups: Vec<usize>,
    /// Global counts: sequences, completion tokens, longest completion.
    n_sequences: usize,
    n_tokens: usize,
    max_length: usize,
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
