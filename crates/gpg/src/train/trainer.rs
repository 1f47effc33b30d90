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
//! [`rollout`](self::rollout), the step's batch and micro-batch planning in
//! [`super::batch`], prompt loading in [`crate::data::load_prompts`], checkpoint pruning in
//! [`crate::checkpoint::prune`].

mod rollout;
mod setup;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::algo::{
    AgeScale, GroupStats, Normaliser, ObjectiveMetrics, PolicyLoss, PolicyTokens, ResampledBatch,
    RewardGroups, TokenLayout,
};
use crate::checkpoint;
use crate::data::{EpochSampler, PreparedPrompt};
use crate::model::Activations;
use crate::optim::LrSchedule;
use crate::reward::WeightedSum;
use crate::tokenizer::Tokenizer;

use self::rollout::RolloutOutcome;
use super::batch::{micro_batches, GroupPayload, Sequence, StepBatch};
use super::collective::Collective;
use super::comm::Comm;
use super::config::TrainConfig;
use super::metrics::{MetricsLog, StepMetrics};
use super::policy::{Policy, PolicyBatch};
use super::update::StepOutcome;
use super::updater::Updater;

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
    /// Runs until `config.steps` optimiser steps are done (or `until` when given).
    pub fn train(&mut self, until: Option<u64>) -> Result<()> {
        let end = until.unwrap_or(self.config.steps).min(self.config.steps);
        let progress = (self.config.logging.progress && self.comm.collective.is_root())
            .then(|| super::progress::Progress::new(self.step, self.config.steps));
        let check_every = self.config.distributed.weight_check_every;
        while self.step < end {
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
        self.updater.sync_host(self.model.text_mut())?;
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
        // 4. Micro-batches of forward / g_t / backward, ⊕ all-reduce, clipping and AdamW.
        let t_update = Instant::now();
        let update = self.update(&rollout.batch, &batch, &advantages, lr)?;
        let time_update = t_update.elapsed().as_secs_f64();
        self.step += 1;
        // 5. The periodic held-out evaluation and the metrics (rank 0 writes them).
        let eval_pass_at_1 = if self.eval_due() {
            self.evaluate()?
        } else {
            None
        };
        let outcome = StepOutcomes {
            lr,
            rollout: &rollout,
            batch: &batch,
            stats: &stats,
            update: &update,
            eval_pass_at_1,
            time_update,
        };
        let metrics = self.step_metrics(outcome, &clock);
        self.log_step(&metrics, &rollout.samples_log)?;
        Ok(metrics)
    }

    /// [`Self::step`] under its former name.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        self.step()
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

    /// The policy update of the step, or why there is none (the batch's loss weight α is 0, or
    /// every completion is empty); a skipped update is reported (rank 0).
    fn update(
        &mut self,
        pool: &ResampledBatch<GroupPayload>,
        batch: &StepBatch,
        advantages: &[f32],
        lr: f32,
    ) -> Result<UpdateOutcome> {
        let outcome = match self.config.algorithm.loss.loss_scale(pool.scale) {
            None => UpdateOutcome::skipped(
                "no group has differing rewards: the batch carries no gradient",
            ),
            Some(_) if batch.n_tokens == 0 => UpdateOutcome::skipped("every completion is empty"),
            Some(alpha) => {
                let normaliser = Normaliser::new(batch.n_sequences, batch.n_tokens);
                self.optimise(&batch.seqs, advantages, alpha, normaliser, lr)?
            }
        };
        if let Some(reason) = &outcome.skipped {
            if self.comm.collective.is_root() {
                eprintln!("step {}: update skipped: {reason}", self.step + 1);
            }
        }
        Ok(outcome)
    }

    /// Forward/backward of this rank's sequences over micro-batches with the global normaliser,
    /// ⊕ the loss and metric sums and the gradient buffer, then clipping and the AdamW step
    /// (identical on every rank, since the summed gradient is); `algorithm.num_iterations`
    /// times over the same batch.
    fn optimise(
        &mut self,
        seqs: &[Sequence],
        advantages: &[f32],
        alpha: f32,
        normaliser: Normaliser,
        lr: f32,
    ) -> Result<UpdateOutcome> {
        let objective = self.objective(alpha, normaliser);
        let micro = self.micro_batches(seqs);
        let old_logp = self.old_logprobs(seqs, &micro, &objective)?;
        let ref_logp = self.reference_logprobs(seqs, &micro, &objective)?;
        let mut outcome = UpdateOutcome::default();
        for iteration in 0..self.config.algorithm.num_iterations {
            let mut sums = LossSums::default();
            let mut token_offset = 0;
            for (m, r) in micro.iter().enumerate() {
                let dropout_seed = derive_seed(
                    self.config.seed ^ 0xD50F,
                    self.step,
                    (iteration * micro.len() + m) as u64,
                );
                let logp = FixedLogprobs {
                    old: old_logp.as_deref(),
                    reference: ref_logp.as_deref(),
                    offset: token_offset,
                };
                let part = (&seqs[r.clone()], &advantages[r.clone()]);
                token_offset +=
                    self.forward_backward(part, logp, &objective, dropout_seed, &mut sums)?;
            }
            self.all_reduce(&mut sums)?;
            sums.write_to(&mut outcome, &objective);
            if let Some(reason) = self.optimizer_step(&mut outcome, lr)? {
                outcome.skipped = Some(reason);
                return Ok(outcome);
            }
        }
        Ok(outcome)
    }

    /// The objective and the engine settings of this step's micro-batches.
    fn objective(&self, alpha: f32, normaliser: Normaliser) -> Objective {
        let t = self.config.rollout.temperature;
        Objective {
            loss: self.config.algorithm.loss,
            alpha,
            normaliser,
            inv_temperature: if t > 0.0 { 1.0 / t } else { 1.0 },
            keep: self.config.activations(),
        }
    }

    /// Micro-batches by token budget (prompt + completion); none when this rank has no
    /// completion token to train on (it still takes part in the reductions).
    fn micro_batches(&self, seqs: &[Sequence]) -> Vec<std::ops::Range<usize>> {
        if seqs.iter().all(|s| s.completion.is_empty()) {
            return Vec::new();
        }
        let lengths: Vec<usize> = seqs
            .iter()
            .map(|s| self.prompts[s.prompt].ids.len() + s.completion.len())
            .collect();
        micro_batches(&lengths, self.config.algorithm.micro_batch_tokens)
    }

    /// Old-policy log-probs for several updates per batch (GRPO's num_iterations > 1).
    fn old_logprobs(
        &self,
        seqs: &[Sequence],
        micro: &[std::ops::Range<usize>],
        objective: &Objective,
    ) -> Result<Option<Vec<f32>>> {
        if !(objective.loss.uses_importance_ratio() && self.config.algorithm.num_iterations > 1) {
            return Ok(None);
        }
        let mut all = Vec::new();
        for r in micro {
            let batch = self.train_batch(&seqs[r.clone()])?;
            let lp = self
                .model
                .logprobs(&self.updater, &batch, objective.inv_temperature)?;
            all.extend(lp.logprobs);
        }
        Ok(Some(all))
    }

    /// Reference-model log-probs for the KL penalty (β > 0), from the frozen initial model.
    fn reference_logprobs(
        &self,
        seqs: &[Sequence],
        micro: &[std::ops::Range<usize>],
        objective: &Objective,
    ) -> Result<Option<Vec<f32>>> {
        let Some(reference) = self.reference.as_ref() else {
            return Ok(None);
        };
        if !objective.loss.needs_reference_logp() {
            return Ok(None);
        }
        let mut all = Vec::new();
        for r in micro {
            let batch = self.train_batch(&seqs[r.clone()])?;
            let lp = reference.logprobs_on_host(&batch, objective.inv_temperature)?;
            all.extend(lp.logprobs);
        }
        Ok(Some(all))
    }

    /// One micro-batch: the engine's forward (logp_t), the objective's token weights g_t and the
    /// engine's backward, gradients accumulated into the updater's buffers; adds the loss and
    /// metric sums to `sums` and returns the micro-batch's completion tokens. Where g_t does not
    /// depend on logp_t (GPG), it is known before the forward, and the forward and backward run
    /// as one pass (the head's logits formed once).
    fn forward_backward(
        &mut self,
        (part, advantages): (&[Sequence], &[f32]),
        logp: FixedLogprobs<'_>,
        objective: &Objective,
        dropout_seed: u64,
        sums: &mut LossSums,
    ) -> Result<usize> {
        let Objective {
            loss,
            alpha,
            normaliser,
            inv_temperature: inv_t,
            keep,
        } = *objective;
        let batch = self.train_batch(part)?;
        if let Some(adapter) = self.model.adapter_mut() {
            // Adapter dropout masks: a pure function of (seed, step, iteration, micro-batch).
            adapter.dropout_seed = dropout_seed;
        }
        let lengths: Vec<usize> = part.iter().map(|s| s.completion.len()).collect();
        let layout = TokenLayout::from_lengths(&lengths);
        let n = batch.num_completion_tokens();
        let span = logp.offset..logp.offset + n;
        let old = logp.old.map(|o| &o[span.clone()]);
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &[],
            old_logp: old,
            ref_logp: logp.reference.map(|o| &o[span]),
            advantages,
        };
        let fused = loss.weights_independent_of_logp(old.is_some())
            && self.model.fuses_forward_backward(&self.updater);
        let (lp, cache, g_before) = if fused {
            let zeros = vec![0.0; n];
            let g = loss
                .compute(
                    &PolicyTokens {
                        logp: &zeros,
                        ..tokens
                    },
                    alpha,
                    normaliser,
                )?
                .token_weights;
            let lp =
                self.model
                    .forward_backward_into(&mut self.updater, &batch, inv_t, keep, &g)?;
            (lp, None, Some(g))
        } else {
            let (lp, cache) = self
                .model
                .forward_train_with(&self.updater, &batch, inv_t, keep)?;
            (lp, Some(cache), None)
        };
        let out = loss.compute(
            &PolicyTokens {
                logp: &lp.logprobs,
                ..tokens
            },
            alpha,
            normaliser,
        )?;
        sums.add(out.loss, &lp.entropy, &out.metrics, n);
        match (cache, g_before) {
            (Some(cache), _) => {
                self.model
                    .backward_into(&mut self.updater, &batch, cache, &out.token_weights)?
            }
            (None, Some(g)) => ensure!(
                g == out.token_weights,
                "internal: the token weights computed before the forward differ from the objective's"
            ),
            (None, None) => bail!("internal: a micro-batch with neither cache nor gradient"),
        }
        Ok(n)
    }

    /// ⊕ The loss and metric sums; ⊕ the gradient buffer (one chunked all-reduce).
    fn all_reduce(&mut self, sums: &mut LossSums) -> Result<()> {
        self.comm.all_reduce_f64(&mut sums.0)?;
        self.comm
            .all_reduce_grads(self.updater.gradient_buffers_mut())
    }

    /// Clipping and the AdamW step, unless the loss or the gradient norm is not finite (then
    /// the gradients are dropped and the reason returned).
    fn optimizer_step(&mut self, outcome: &mut UpdateOutcome, lr: f32) -> Result<Option<String>> {
        if !outcome.loss.is_finite() {
            self.updater.zero_grad()?;
            return Ok(Some(format!("non-finite loss ({})", outcome.loss)));
        }
        let max_grad_norm = self.config.optim.max_grad_norm;
        match self
            .updater
            .step(self.model.text_mut(), lr, max_grad_norm)?
        {
            StepOutcome::Applied(clip) => {
                outcome.grad_norm = clip.norm;
                Ok(None)
            }
            StepOutcome::Skipped(clip) => {
                outcome.grad_norm = clip.norm;
                Ok(Some(format!("non-finite gradient norm ({})", clip.norm)))
            }
        }
    }

    /// Packs sequences (with their prompts' images for a vision-language policy).
    fn train_batch(&self, part: &[Sequence]) -> Result<PolicyBatch> {
        let pairs: Vec<(&PreparedPrompt, &[u32])> = part
            .iter()
            .map(|s| (&self.prompts[s.prompt], s.completion.as_slice()))
            .collect();
        self.model.batch(&pairs)
    }

    /// The step's metrics (as logged to metrics.jsonl and TensorBoard).
    fn step_metrics(&self, o: StepOutcomes<'_>, clock: &StepClock) -> StepMetrics {
        let (rollout, batch, stats, update) = (o.rollout, o.batch, o.stats, o.update);
        let inverse_alpha = match rollout.batch.scale {
            AgeScale::Scale { inverse_alpha, .. } => inverse_alpha as f64,
            AgeScale::SkipUpdate => 0.0,
        };
        StepMetrics {
            step: self.step,
            lr: o.lr as f64,
            loss: update.loss,
            grad_norm: update.grad_norm,
            reward: stats.reward_mean,
            reward_std: stats.reward_std_mean,
            rewards: rollout
                .per_function
                .iter()
                .map(|(k, &(s, n))| (k.clone(), s / n.max(1) as f64))
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
            skipped: update.skipped.clone(),
            eval_pass_at_1: o.eval_pass_at_1,
            time_rollout_s: rollout.time_rollout,
            time_reward_s: rollout.time_reward,
            time_update_s: o.time_update,
            time_comm_s: self.comm.seconds() - clock.comm,
            time_comm_grad_s: self.comm.grad_seconds() - clock.comm_grad,
            time_step_s: clock.start.elapsed().as_secs_f64(),
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
        checkpoint::prune(&out, self.config.logging.keep_checkpoints)?;
        Ok(dir)
    }
}

/// The objective of the step's micro-batches and the engine settings they run with.
#[derive(Debug, Clone, Copy)]
struct Objective {
    loss: PolicyLoss,
    /// The batch's loss weight α.
    alpha: f32,
    /// Global counts of sequences and completion tokens (the same on every rank).
    normaliser: Normaliser,
    /// 1 / sampling temperature (1 when greedy).
    inv_temperature: f32,
    keep: Activations,
}

/// Log-probs fixed before the update, over this rank's completion tokens in batch order: the
/// old policy's and the reference model's; `offset` is the micro-batch's first token.
#[derive(Debug, Clone, Copy)]
struct FixedLogprobs<'a> {
    old: Option<&'a [f32]>,
    reference: Option<&'a [f32]>,
    offset: usize,
}

/// [loss, Σ entropy, Σ clipped·n, Σ kl·n] of this rank's micro-batches (then ⊕ of all ranks').
#[derive(Debug, Default)]
struct LossSums([f64; 4]);

impl LossSums {
    fn add(&mut self, loss: f64, entropy: &[f32], metrics: &ObjectiveMetrics, n: usize) {
        let s = &mut self.0;
        s[0] += loss;
        s[1] += entropy.iter().map(|&e| e as f64).sum::<f64>();
        s[2] += metrics.clip_fraction.unwrap_or(0.0) * n as f64;
        s[3] += metrics.mean_kl.unwrap_or(0.0) * n as f64;
    }

    /// The loss and the per-token means over the global completion tokens.
    fn write_to(&self, outcome: &mut UpdateOutcome, objective: &Objective) {
        let [loss, entropy_sum, clip_sum, kl_sum] = self.0;
        let total_tokens = objective.normaliser.n_tokens;
        outcome.loss = loss;
        outcome.entropy = entropy_sum / total_tokens;
        outcome.clip_fraction = objective
            .loss
            .uses_importance_ratio()
            .then_some(clip_sum / total_tokens);
        outcome.kl = objective
            .loss
            .needs_reference_logp()
            .then_some(kl_sum / total_tokens);
    }
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

impl UpdateOutcome {
    fn skipped(reason: &str) -> Self {
        Self {
            skipped: Some(reason.to_string()),
            ..Self::default()
        }
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

/// What a step's parts produced, for its metrics.
struct StepOutcomes<'a> {
    lr: f32,
    rollout: &'a RolloutOutcome,
    batch: &'a StepBatch,
    stats: &'a GroupStats,
    update: &'a UpdateOutcome,
    eval_pass_at_1: Option<f64>,
    time_update: f64,
}
