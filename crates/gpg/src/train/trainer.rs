//! The RL training loop. One step, top to bottom ([`Trainer::step`]):
//!
//! ```text
//! prompts ─► rollout (G completions each) ─► rewards ─► groups (β_th: sample more rounds)
//!   ─► advantages, α ─► per micro-batch: engine forward (logp_t) ─► objective (g_t)
//!   ─► engine backward (gradients, accumulated) ─► all-reduce ─► clip ─► AdamW ─► metrics
//! ```
//!
//! Every random draw is a pure function of (seed, step, round), and the data position is part
//! of the checkpoint, so a resumed run continues exactly as an uninterrupted one.
//!
//! Data parallel (docs/training.md, "Several machines"): with a [`Collective`] of N ranks,
//! each rank samples and trains on its contiguous share of the step's groups; the global
//! quantities are reduced at the points that [`Trainer::step`] names, so a run at N ranks
//! computes the same step as one process, up to the order of floating-point sums.
//!
//! Where the rest lives: run set-up and resume in [`setup`], the rollout rounds in
//! [`rollout`](self::rollout), the update's parts in [`optimise`], the step's batch and
//! micro-batch planning in [`super::batch`], prompt loading in [`crate::data::load_prompts`], checkpoint pruning in
//! [`crate::checkpoint::prune`].

mod optimise;
mod rollout;
mod setup;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::algo::{AgeScale, GroupStats, ResampledBatch, RewardGroups};
use crate::checkpoint;
use crate::data::{EpochSampler, PreparedPrompt};
use crate::optim::LrSchedule;
use crate::reward::WeightedSum;
use crate::tokenizer::Tokenizer;

use self::optimise::{LossSums, MicroBatch, Objective, UpdateOutcome};
use self::rollout::RolloutOutcome;
use super::batch::{GroupPayload, StepBatch};
use super::collective::Collective;
use super::comm::Comm;
use super::config::TrainConfig;
use super::engine::TrainEngine;
use super::metrics::{MetricsLog, RewardStats, StepMetrics};
use super::policy::Policy;

pub use setup::TrainerState;

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
    engine: Box<dyn TrainEngine>,
    schedule: LrSchedule,
    pub step: u64,
    tokens_seen: u64,
    /// Prompt + completion tokens of every completion sampled so far (TRL's `num_tokens`).
    num_tokens: u64,
    /// The metrics files; rank 0 only (it alone writes the run folder).
    log: Option<MetricsLog>,
    /// The ranks of a data-parallel run (a single process by default) and the time spent
    /// communicating.
    comm: Comm,
    /// Prompts of the periodic evaluation (eval.data), when configured.
    eval_prompts: Option<Vec<PreparedPrompt>>,
    /// The frozen initial model, kept when the objective has a KL penalty (β > 0). With LoRA
    /// it is the base with the adapter disabled, sharing the base weights (no second copy).
    reference: Option<super::reference::Reference>,
    /// Set by another thread (or a signal handler) to stop the run: see [`Trainer::stop_when`].
    stop: Option<Arc<AtomicBool>>,
    /// The tools of multi-turn rollouts (`[tools]`), built at start.
    tools: Option<crate::tools::Toolbox>,
}

/// The error of a run stopped by its stop flag ([`Trainer::stop_when`]) before `step` (1-based)
/// was done: nothing of that step was written, the checkpoints before it are intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub step: u64,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped on request before step {} was done", self.step)
    }
}

impl std::error::Error for Stopped {}

/// Derives the random seed of (step, round) from the run's seed (SplitMix64 mixing).
fn derive_seed(seed: u64, step: u64, round: u64) -> u64 {
    let mut z =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Trainer {
    /// Stops the run when `flag` becomes true (set by another thread or a signal handler, e.g.
    /// the Python package's Ctrl-C handler). The flag is polled before every step and between
    /// a step's rollout rounds, never while a checkpoint or the metrics are written, so
    /// [`Trainer::train`] then returns a [`Stopped`] error with the run folder as the last
    /// completed step left it. Single-process runs only: the ranks of a data-parallel run
    /// would not stop at the same point.
    pub fn stop_when(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// A [`Stopped`] error when the stop flag is set.
    fn check_stop(&self) -> Result<()> {
        match &self.stop {
            Some(flag) if flag.load(Ordering::SeqCst) => Err(Stopped {
                step: self.step + 1,
            }
            .into()),
            _ => Ok(()),
        }
    }

    /// Runs until `config.steps` optimiser steps are done (or `until` when given), or until
    /// the stop flag is set ([`Trainer::stop_when`]).
    pub fn train(&mut self, until: Option<u64>) -> Result<()> {
        let end = until.unwrap_or(self.config.steps).min(self.config.steps);
        let progress = (self.config.logging.progress && self.comm.collective.is_root())
            .then(|| super::progress::Progress::new(self.step, self.config.steps));
        let check_every = self.config.distributed.weight_check_every;
        while self.step < end {
            self.check_stop()?;
            let metrics = self.step()?;
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
        self.engine.sync_host(&mut self.model)?;
        Ok(())
    }

    /// One optimiser step; returns its metrics, also logged (rank 0). The points where a
    /// data-parallel run reduces over ranks are marked ⊕.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let clock = StepClock::start(&self.comm);
        let lr = self.schedule.lr_at(self.step);
        // 1. Sampling and scoring rounds until β_th is met (⊕ the rounds' rewards and lengths).
        let rollout = self.rollout(self.step)?;
        // 2. This rank's sequences, and the global counts of groups, valid groups (α) and
        //    completion tokens / sequences (the loss normaliser).
        let batch = StepBatch::of(&rollout.batch);
        // 3. Advantages, from the global rewards (identical on every rank).
        let (stats, advantages) = self.advantages(&rollout.batch, &batch)?;
        self.tokens_seen += batch.n_tokens as u64;
        self.num_tokens += rollout.sampled_tokens;
        // 4. The update: micro-batches of forward / g_t / backward, ⊕ all-reduce, AdamW.
        let update = self.update(&rollout.batch, &batch, &advantages, lr)?;
        self.step += 1;
        // 5. The periodic held-out evaluation and the metrics (rank 0 writes them).
        let eval = self.periodic_eval()?;
        let metrics = self.step_metrics(&rollout, &batch, &stats, &update, eval, &clock);
        self.log_step(&metrics, &rollout.samples_log)?;
        Ok(metrics)
    }

    /// The batch's reward statistics and this rank's advantages (sequence by sequence), from
    /// the estimator over every group's rewards.
    fn advantages(
        &self,
        pool: &ResampledBatch<GroupPayload>,
        batch: &StepBatch,
    ) -> Result<(GroupStats, Vec<f32>)> {
        let g = self.config.rollout.num_generations;
        let rewards = pool.rewards();
        let reward_groups = RewardGroups::new(&rewards, g)?;
        let stats = GroupStats::of(&reward_groups);
        let advantages = self.config.advantage_estimator().compute(&reward_groups)?;
        Ok((stats, batch.local_advantages(&advantages, g)))
    }

    /// The policy update of the step ([`Self::optimise`]) at learning rate `lr`, or why there
    /// is none (the batch's loss weight α is 0, or every completion is empty); a skipped
    /// update is reported (rank 0).
    fn update(
        &mut self,
        pool: &ResampledBatch<GroupPayload>,
        batch: &StepBatch,
        advantages: &[f32],
        lr: f32,
    ) -> Result<UpdateOutcome> {
        let t0 = Instant::now();
        let mut outcome = match self.objective(pool, batch) {
            Ok(objective) => self.optimise(batch, advantages, &objective, lr)?,
            Err(reason) => UpdateOutcome::skipped(reason),
        };
        if let Some(reason) = &outcome.skipped {
            if self.comm.collective.is_root() {
                eprintln!("step {}: update skipped: {reason}", self.step + 1);
            }
        }
        outcome.lr = lr;
        outcome.seconds = t0.elapsed().as_secs_f64();
        Ok(outcome)
    }

    /// Micro-batches of forward / g_t / backward over this rank's sequences with the global
    /// normaliser, ⊕ the loss sums and the gradient buffer, then clipping and the same AdamW
    /// step on every rank (the summed gradient is the same); `algorithm.num_iterations` times
    /// over the batch.
    fn optimise(
        &mut self,
        batch: &StepBatch,
        advantages: &[f32],
        objective: &Objective,
        lr: f32,
    ) -> Result<UpdateOutcome> {
        let micro = self.micro_batches(&batch.seqs);
        let fixed = self.fixed_logprobs(&batch.seqs, &micro, objective)?;
        let mut outcome = UpdateOutcome::default();
        for iteration in 0..self.config.algorithm.num_iterations {
            let mut sums = LossSums::default();
            let mut first_token = 0;
            for (m, r) in micro.iter().enumerate() {
                let part = MicroBatch {
                    seqs: &batch.seqs[r.clone()],
                    advantages: &advantages[r.clone()],
                    first_token,
                    dropout_seed: self.dropout_seed(iteration * micro.len() + m),
                };
                first_token += self.forward_backward(part, &fixed, objective, &mut sums)?;
            }
            self.all_reduce(&mut sums)?;
            sums.write_to(&mut outcome, objective);
            if let Some(reason) = self.optimizer_step(&mut outcome, lr)? {
                outcome.skipped = Some(reason);
                break;
            }
        }
        Ok(outcome)
    }

    /// The step's metrics (as logged to metrics.jsonl and TensorBoard).
    fn step_metrics(
        &self,
        rollout: &RolloutOutcome,
        batch: &StepBatch,
        stats: &GroupStats,
        update: &UpdateOutcome,
        eval_pass_at_1: Option<f64>,
        clock: &StepClock,
    ) -> StepMetrics {
        let inverse_alpha = match rollout.batch.scale {
            AgeScale::Scale { inverse_alpha, .. } => inverse_alpha as f64,
            AgeScale::SkipUpdate => 0.0,
        };
        let sampler = self.sampler.state();
        StepMetrics {
            step: self.step,
            epoch: sampler.epoch as f64 + sampler.cursor as f64 / sampler.dataset_len as f64,
            lr: update.lr as f64,
            loss: update.loss,
            grad_norm: update.grad_norm,
            reward: stats.reward_mean,
            reward_std: stats.reward_std,
            reward_std_within_group: stats.reward_std_mean,
            frac_reward_zero_std: stats.n_identical as f64 / stats.n_groups.max(1) as f64,
            rewards: RewardStats {
                mean: (rollout.per_function.iter())
                    .map(|(k, m)| (k.clone(), m.mean()))
                    .collect(),
                std: (rollout.per_function.iter())
                    .map(|(k, m)| (k.clone(), m.std()))
                    .collect(),
            },
            completion_length: rollout.lengths.all.mean(),
            completion_length_min: rollout.lengths.min,
            completion_length_max: rollout.lengths.max,
            clipped_ratio: rollout.lengths.clipped_ratio(),
            terminated_length: rollout.lengths.terminated.mean(),
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
            num_tokens: self.num_tokens,
            skipped: update.skipped.clone(),
            eval_pass_at_1,
            time_rollout_s: rollout.time_rollout,
            time_reward_s: rollout.time_reward,
            time_update_s: update.seconds,
            time_comm_s: self.comm.seconds() - clock.comm,
            time_comm_grad_s: self.comm.grad_seconds() - clock.comm_grad,
            time_step_s: clock.start.elapsed().as_secs_f64(),
            tools: rollout.tool_metrics(),
        }
    }

    /// Writes the step's metrics and sampled completions (rank 0 only).
    fn log_step(&mut self, metrics: &StepMetrics, samples: &[(String, String, f32)]) -> Result<()> {
        if let Some(log) = &mut self.log {
            log.write(metrics, samples)?;
        }
        Ok(())
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
        if let Some(tools) = &self.tools {
            // Multi-turn: the held-out questions answered with the run's tools.
            let model = self.model.text();
            let engine = self.engine.decode_engine(model)?;
            return super::heldout::pass_at_1_with_tools(
                model,
                &*engine,
                &self.tokenizer,
                prompts,
                tools,
                &super::heldout::SamplingSetup {
                    samples: e.samples,
                    temperature: e.temperature,
                    max_new_tokens: max_new,
                    seed,
                },
                &*collective,
            )
            .map(Some);
        }
        self.model
            .heldout_pass_at_1(
                &*self.engine,
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

    /// [`Self::evaluate`] when it is due: every `eval.every` steps and after the last.
    fn periodic_eval(&self) -> Result<Option<f64>> {
        let due =
            self.config.eval.as_ref().is_some_and(|e| {
                self.step.is_multiple_of(e.every) || self.step == self.config.steps
            });
        if due {
            self.evaluate()
        } else {
            Ok(None)
        }
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
        self.engine.sync_host(&mut self.model)?;
        let (optimizer, buffers) = self.engine.checkpoint_state(&self.model)?;
        let state = TrainerState {
            step: self.step,
            sampler: self.sampler.state(),
            tokens_seen: self.tokens_seen,
            num_tokens: self.num_tokens,
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
        checkpoint::prune(&out, self.config.logging.keep_checkpoints)?;
        Ok(dir)
    }
}

/// When the step started, and the communication time before it.
struct StepClock {
    start: Instant,
    comm: f64,
    comm_grad: f64,
}

impl StepClock {
    fn start(comm: &Comm) -> Self {
        Self {
            start: Instant::now(),
            comm: comm.seconds(),
            comm_grad: comm.grad_seconds(),
        }
    }
}
