//! The parts of the policy update ([`Trainer::optimise`]): the step's objective, micro-batch
//! planning, the log-probs fixed before the update (old policy, KL reference), one micro-batch's
//! forward / g_t / backward, the all-reduce and the optimiser step.

use std::ops::Range;

use anyhow::{bail, ensure, Result};

use crate::algo::{
    Normaliser, ObjectiveMetrics, PolicyLoss, PolicyTokens, ResampledBatch, TokenLayout,
};
use crate::data::PreparedPrompt;
use crate::model::Activations;

use super::super::batch::{micro_batches, GroupPayload, Sequence, StepBatch};
use super::super::engine::StepOutcome;
use super::super::policy::PolicyBatch;
use super::{derive_seed, Trainer};

/// The objective of the step's micro-batches and the engine settings they run with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Objective {
    loss: PolicyLoss,
    /// The batch's loss weight α.
    alpha: f32,
    /// Global counts of sequences and completion tokens (the same on every rank).
    normaliser: Normaliser,
    /// 1 / sampling temperature (1 when greedy).
    inv_temperature: f32,
    keep: Activations,
}

/// Log-probs fixed before the update, over this rank's completion tokens in batch order.
pub(super) struct FixedLogprobs {
    /// The old policy's (several updates per batch: GRPO's num_iterations > 1).
    old: Option<Vec<f32>>,
    /// The frozen reference model's (KL penalty, β > 0).
    reference: Option<Vec<f32>>,
}

/// One micro-batch of this rank's sequences.
pub(super) struct MicroBatch<'a> {
    pub seqs: &'a [Sequence],
    pub advantages: &'a [f32],
    /// Position of its first completion token among this rank's.
    pub first_token: usize,
    /// Seed of the LoRA dropout masks.
    pub dropout_seed: u64,
}

/// [loss, Σ entropy, Σ clipped·n, Σ kl·n] of this rank's micro-batches (then ⊕ of all ranks').
#[derive(Debug, Default)]
pub(super) struct LossSums([f64; 4]);

impl LossSums {
    /// `n`: the micro-batch's scored tokens; the entropy is summed over them (the layout's
    /// loss mask leaves tool responses out).
    fn add(
        &mut self,
        loss: f64,
        entropy: &[f32],
        layout: &TokenLayout,
        metrics: &ObjectiveMetrics,
        n: usize,
    ) {
        let s = &mut self.0;
        s[0] += loss;
        s[1] += entropy
            .iter()
            .enumerate()
            .filter(|&(t, _)| layout.is_scored(t))
            .map(|(_, &e)| e as f64)
            .sum::<f64>();
        s[2] += metrics.clip_fraction.unwrap_or(0.0) * n as f64;
        s[3] += metrics.mean_kl.unwrap_or(0.0) * n as f64;
    }

    /// The loss and the per-token means over the global completion tokens.
    pub fn write_to(&self, outcome: &mut UpdateOutcome, objective: &Objective) {
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

/// What the update did (the step's loss and optimiser figures), or why it was skipped.
#[derive(Debug, Default, Clone)]
pub(super) struct UpdateOutcome {
    /// The learning rate of the step.
    pub lr: f32,
    pub loss: f64,
    pub grad_norm: f64,
    pub entropy: f64,
    pub clip_fraction: Option<f64>,
    pub kl: Option<f64>,
    pub skipped: Option<String>,
    /// Seconds the update took.
    pub seconds: f64,
}

impl UpdateOutcome {
    pub fn skipped(reason: &str) -> Self {
        Self {
            skipped: Some(reason.to_string()),
            ..Self::default()
        }
    }
}

impl Trainer {
    /// The step's objective: the batch's loss weight α and the global normaliser, or why the
    /// batch carries no gradient.
    pub(super) fn objective(
        &self,
        pool: &ResampledBatch<GroupPayload>,
        batch: &StepBatch,
    ) -> std::result::Result<Objective, &'static str> {
        let loss = self.config.algorithm.loss;
        let Some(alpha) = loss.loss_scale(pool.scale) else {
            return Err("no group has differing rewards: the batch carries no gradient");
        };
        if batch.n_tokens == 0 {
            return Err("every completion is empty");
        }
        let t = self.config.rollout.temperature;
        Ok(Objective {
            loss,
            alpha,
            normaliser: Normaliser::new(batch.n_sequences, batch.n_tokens),
            inv_temperature: if t > 0.0 { 1.0 / t } else { 1.0 },
            keep: self.config.activations(),
        })
    }

    /// Micro-batches by token budget (prompt + completion); none when this rank has no
    /// completion token to train on (it still takes part in the reductions).
    pub(super) fn micro_batches(&self, seqs: &[Sequence]) -> Vec<Range<usize>> {
        if seqs.iter().all(|s| s.completion.is_empty()) {
            return Vec::new();
        }
        let lengths: Vec<usize> = seqs
            .iter()
            .map(|s| self.prompts[s.prompt].ids.len() + s.completion.len())
            .collect();
        micro_batches(&lengths, self.config.algorithm.micro_batch_tokens)
    }

    /// Adapter dropout masks' seed: a pure function of (seed, step, iteration, micro-batch),
    /// `pass` counting the micro-batches of the step's iterations.
    pub(super) fn dropout_seed(&self, pass: usize) -> u64 {
        derive_seed(self.config.seed ^ 0xD50F, self.step, pass as u64)
    }

    /// The old policy's log-probs (GRPO's num_iterations > 1) and the frozen reference model's
    /// (the KL penalty, β > 0), where the objective needs them.
    pub(super) fn fixed_logprobs(
        &self,
        seqs: &[Sequence],
        micro: &[Range<usize>],
        objective: &Objective,
    ) -> Result<FixedLogprobs> {
        let old =
            if objective.loss.uses_importance_ratio() && self.config.algorithm.num_iterations > 1 {
                let mut all = Vec::new();
                for r in micro {
                    let batch = self.train_batch(&seqs[r.clone()])?;
                    let lp =
                        self.engine
                            .logprobs(&self.model, &batch, objective.inv_temperature)?;
                    all.extend(lp.logprobs);
                }
                Some(all)
            } else {
                None
            };
        let reference = match &self.reference {
            Some(reference) if objective.loss.needs_reference_logp() => {
                let mut all = Vec::new();
                for r in micro {
                    let batch = self.train_batch(&seqs[r.clone()])?;
                    let lp = reference.logprobs(&batch, objective.inv_temperature)?;
                    all.extend(lp.logprobs);
                }
                Some(all)
            }
            _ => None,
        };
        Ok(FixedLogprobs { old, reference })
    }

    /// One micro-batch: the engine's forward (logp_t), the objective's token weights g_t and the
    /// engine's backward, gradients accumulated into the engine's buffers; adds the loss and
    /// metric sums to `sums` and returns the micro-batch's completion tokens. Where g_t does not
    /// depend on logp_t (GPG), it is known before the forward, and the forward and backward run
    /// as one pass (the head's logits formed once).
    pub(super) fn forward_backward(
        &mut self,
        part: MicroBatch<'_>,
        fixed: &FixedLogprobs,
        objective: &Objective,
        sums: &mut LossSums,
    ) -> Result<usize> {
        let Objective {
            loss,
            alpha,
            normaliser,
            inv_temperature: inv_t,
            keep,
        } = *objective;
        let batch = self.train_batch(part.seqs)?;
        if let Some(adapter) = self.model.adapter_mut() {
            adapter.dropout_seed = part.dropout_seed;
        }
        let lengths: Vec<usize> = part.seqs.iter().map(|s| s.completion.len()).collect();
        let mut layout = TokenLayout::from_lengths(&lengths);
        if part.seqs.iter().any(|s| s.mask.is_some()) {
            // Multi-turn completions: tool-response tokens are context only (g_t = 0).
            let mask: Vec<bool> = part
                .seqs
                .iter()
                .flat_map(|s| match &s.mask {
                    Some(m) => m.clone(),
                    None => vec![true; s.completion.len()],
                })
                .collect();
            layout = layout.with_mask(mask)?;
        }
        let n = batch.num_completion_tokens();
        let span = part.first_token..part.first_token + n;
        let old = fixed.old.as_ref().map(|o| &o[span.clone()]);
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &[],
            old_logp: old,
            ref_logp: fixed.reference.as_ref().map(|o| &o[span]),
            advantages: part.advantages,
        };
        let fused = loss.weights_independent_of_logp(old.is_some())
            && self.engine.fuses_forward_backward(&self.model);
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
            let lp = self
                .engine
                .forward_backward_into(&self.model, &batch, inv_t, keep, &g)?;
            (lp, None, Some(g))
        } else {
            let (lp, cache) = self.engine.forward(&self.model, &batch, inv_t, keep)?;
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
        sums.add(
            out.loss,
            &lp.entropy,
            &layout,
            &out.metrics,
            layout.n_scored(),
        );
        match (cache, g_before) {
            (Some(cache), _) => {
                self.engine
                    .backward_into(&self.model, &batch, cache, &out.token_weights)?
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
    pub(super) fn all_reduce(&mut self, sums: &mut LossSums) -> Result<()> {
        self.comm.all_reduce_f64(&mut sums.0)?;
        self.comm.all_reduce_grads(&mut *self.engine)
    }

    /// Clipping and the AdamW step, unless the loss or the gradient norm is not finite (then
    /// the gradients are dropped and the reason returned).
    pub(super) fn optimizer_step(
        &mut self,
        outcome: &mut UpdateOutcome,
        lr: f32,
    ) -> Result<Option<String>> {
        if !outcome.loss.is_finite() {
            self.engine.zero_grad()?;
            return Ok(Some(format!("non-finite loss ({})", outcome.loss)));
        }
        let max_grad_norm = self.config.optim.max_grad_norm;
        match self.engine.step(&self.model, lr, max_grad_norm)? {
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
}
