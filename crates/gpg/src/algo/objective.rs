//! Policy objectives: per-token log-probs → loss value and per-token weights g_t = ∂L/∂logp_t.
//!
//! The engine turns g_t into parameter gradients (∇θ L = Σ_t g_t ∇θ logp_t), so every objective
//! here is a pure function of scalars. Notation, for completion i with tokens t:
//!
//! * logp_t: log π_θ(o_t | ·) of the policy being trained (the forward pass being differentiated);
//! * old_t: log-prob under the sampling policy (`None` = on-policy, old := logp detached, ρ = 1);
//! * ref_t: log-prob under the frozen reference model (only used when β ≠ 0);
//! * Â_i: the completion's advantage; α: GPG's gradient scale (1 for plain GRPO);
//! * N_seq, N_tok: the [`Normaliser`] counts.
//!
//! # Loss mask (multi-turn completions with tool responses)
//!
//! When the [`TokenLayout`] carries a loss mask m_t (false at a tool's response tokens, which
//! are context, not actions), every sum below runs over the scored tokens only: g_t = 0 where
//! m_t is false, N_tok counts scored tokens ([`Normaliser::micro_batch`]), |o_i| in the
//! per-sequence mean is the completion's scored tokens, and the metrics are means over scored
//! tokens. The log-probs at masked positions are ignored.
//!
//! # GPG (`gpg`): surrogate-free, token-level
//!
//! ```text
//! L   = −α · Σ_i Σ_t Â_i · logp_t / N_tok
//! g_t = −α · Â_i / N_tok
//! ```
//!
//! # GRPO (`grpo`): clipped surrogate + k3 KL
//!
//! ```text
//! ρ_t = exp(logp_t − old_t)
//! ℓ_t = −min(ρ_t Â_i, clip(ρ_t, 1 − ε_low, 1 + ε_high) Â_i)
//!       + β · (exp(ref_t − logp_t) − (ref_t − logp_t) − 1)
//! ∂ℓ_t/∂logp_t = −ρ_t Â_i · [not clipped] + β · (1 − exp(ref_t − logp_t))
//! ```
//!
//! where "clipped" (the gradient of the surrogate is cut) means
//! (Â_i > 0 and ρ_t > 1 + ε_high) or (Â_i < 0 and ρ_t < 1 − ε_low). The per-token losses are
//! aggregated by [`LossAggregation`] and scaled by α: L = α Σ_t w_t ℓ_t, g_t = α w_t ∂ℓ_t/∂logp_t,
//! with
//!
//! * `sequence-mean` (TRL `grpo`): w_t = 1 / (max(1, |o_i|) · N_seq) — mean over each
//!   completion's tokens, then mean over completions;
//! * `token-mean` (TRL `bnpo`, `dapo`): w_t = 1 / N_tok;
//! * `constant-length` (TRL `dr_grpo`): w_t = 1 / (N_seq · max_completion_length).
//!
//! # Dr.GRPO (`dr-grpo`)
//!
//! GRPO's per-token loss with `constant-length` aggregation (and Dr.GRPO advantages r − mean).
//!
//! # Micro-batches and gradient accumulation
//!
//! TRL and the GPG reference compute each micro-batch's loss with that micro-batch's own counts
//! (`grpo`: its completions; `bnpo`, GPG: its completion tokens; `dr_grpo`: its completions ×
//! max length), and the HF Trainer then divides each micro-batch loss by the number of
//! accumulation steps k. To reproduce that, pass `Normaliser::micro_batch(layout).accumulated(k)`.
//! TRL's `dapo` instead divides by the token count of the whole accumulated batch
//! (`num_items_in_batch`): pass `Normaliser::new(total_sequences, total_tokens)`.
//! Metrics (ratio, clip fractions, KL) are always token means over the micro-batch.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};

use super::layout::TokenLayout;

/// The per-token inputs of one (micro-)batch, laid out by a [`TokenLayout`].
#[derive(Debug, Clone, Copy)]
pub struct PolicyTokens<'a> {
    /// Where each completion's tokens are.
    pub layout: &'a TokenLayout,
    /// Current log-probs logp_t (one per completion token).
    pub logp: &'a [f32],
    /// Sampling-policy log-probs; `None` means on-policy (old := logp detached, ρ = 1).
    pub old_logp: Option<&'a [f32]>,
    /// Reference-model log-probs (needed when β ≠ 0).
    pub ref_logp: Option<&'a [f32]>,
    /// One advantage per completion.
    pub advantages: &'a [f32],
}

impl PolicyTokens<'_> {
    fn validate(&self) -> Result<()> {
        let n_tok = self.layout.n_tokens();
        let n_seq = self.layout.n_sequences();
        ensure!(
            self.logp.len() == n_tok,
            "{} log-probs for a layout of {n_tok} completion tokens",
            self.logp.len()
        );
        ensure!(
            self.advantages.len() == n_seq,
            "{} advantages for {n_seq} completions",
            self.advantages.len()
        );
        for (what, values) in [
            ("log-prob", Some(self.logp)),
            ("old log-prob", self.old_logp),
            ("reference log-prob", self.ref_logp),
        ] {
            let Some(values) = values else { continue };
            ensure!(
                values.len() == n_tok,
                "{} {what}s for a layout of {n_tok} completion tokens",
                values.len()
            );
            if let Some(t) = values.iter().position(|v| !v.is_finite()) {
                let s = self.sequence_of(t);
                bail!(
                    "{what} of token {t} (completion {s}, position {}) is not finite: {}",
                    t - self.layout.range(s).start,
                    values[t]
                );
            }
        }
        if let Some(s) = self.advantages.iter().position(|a| !a.is_finite()) {
            bail!(
                "advantage of completion {s} is not finite: {}",
                self.advantages[s]
            );
        }
        Ok(())
    }

    fn sequence_of(&self, token: usize) -> usize {
        // The last offset ≤ token; offsets are sorted.
        let offsets = self.layout.offsets();
        offsets
            .partition_point(|&o| o <= token)
            .saturating_sub(1)
            .min(self.layout.n_sequences().saturating_sub(1))
    }
}

/// The denominators of the loss: a number of completions and a number of completion tokens.
/// Each count is clamped to at least 1 (TRL's `clamp(min=1)`), so a loss is never 0/0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normaliser {
    /// N_seq.
    pub n_sequences: f64,
    /// N_tok.
    pub n_tokens: f64,
}

impl Normaliser {
    /// Explicit counts (e.g. of the whole accumulated batch).
    pub fn new(n_sequences: usize, n_tokens: usize) -> Self {
        Self {
            n_sequences: n_sequences.max(1) as f64,
            n_tokens: n_tokens.max(1) as f64,
        }
    }

    /// The micro-batch's own counts (the reference's per-micro-batch division): its
    /// completions and its scored (unmasked) completion tokens.
    pub fn micro_batch(layout: &TokenLayout) -> Self {
        Self::new(layout.n_sequences(), layout.n_scored())
    }

    /// Both counts multiplied by `micro_batches`: the HF Trainer's extra division of each
    /// micro-batch loss by the number of gradient-accumulation steps.
    pub fn accumulated(self, micro_batches: usize) -> Self {
        let k = micro_batches.max(1) as f64;
        Self {
            n_sequences: self.n_sequences * k,
            n_tokens: self.n_tokens * k,
        }
    }
}

/// How per-token losses are summed into one number (TRL's `loss_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum LossAggregation {
    /// Mean over each completion's tokens, then over completions (TRL `grpo`).
    #[default]
    #[serde(alias = "grpo")]
    SequenceMean,
    /// Sum over all tokens / N_tok (TRL `bnpo`; `dapo` with a global N_tok).
    #[serde(alias = "bnpo", alias = "dapo")]
    TokenMean,
    /// Sum over all tokens / (N_seq · max_completion_length) (TRL `dr_grpo`).
    #[serde(alias = "dr_grpo", alias = "dr-grpo")]
    ConstantLength,
}

impl LossAggregation {
    /// Every aggregation, in the order listed in errors.
    pub const ALL: [LossAggregation; 3] =
        [Self::SequenceMean, Self::TokenMean, Self::ConstantLength];

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::SequenceMean => "sequence-mean",
            Self::TokenMean => "token-mean",
            Self::ConstantLength => "constant-length",
        }
    }
}

impl fmt::Display for LossAggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossAggregation {
    type Err = anyhow::Error;

    /// Accepts the names and TRL's loss types (`grpo`, `bnpo`, `dapo`, `dr_grpo`).
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match wanted.as_str() {
            "sequence-mean" | "grpo" => Self::SequenceMean,
            "token-mean" | "bnpo" | "dapo" => Self::TokenMean,
            "constant-length" | "dr-grpo" => Self::ConstantLength,
            _ => bail!(
                "unknown loss aggregation {s:?}; expected one of: sequence-mean (grpo), \
                 token-mean (bnpo, dapo), constant-length (dr_grpo)"
            ),
        })
    }
}

pub(super) fn default_epsilon() -> f32 {
    0.2
}

pub(super) fn default_grpo_beta() -> f32 {
    0.04
}

/// GRPO's clipped-surrogate objective with k3 KL to a reference model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClippedSurrogate {
    /// ε_low: the ratio is clipped below at 1 − ε_low (default 0.2).
    #[serde(default = "default_epsilon")]
    pub epsilon_low: f32,
    /// ε_high: the ratio is clipped above at 1 + ε_high (default 0.2; DAPO uses 0.28).
    #[serde(default = "default_epsilon")]
    pub epsilon_high: f32,
    /// β, the k3-KL coefficient (default 0.04; 0 disables the reference model).
    #[serde(default = "default_grpo_beta")]
    pub beta: f32,
    /// How per-token losses are summed (default `sequence-mean`).
    #[serde(default)]
    pub aggregation: LossAggregation,
    /// The constant length of `constant-length` aggregation (required there, unused otherwise).
    #[serde(default)]
    pub max_completion_length: Option<usize>,
}

impl Default for ClippedSurrogate {
    fn default() -> Self {
        Self {
            epsilon_low: default_epsilon(),
            epsilon_high: default_epsilon(),
            beta: default_grpo_beta(),
            aggregation: LossAggregation::SequenceMean,
            max_completion_length: None,
        }
    }
}

impl ClippedSurrogate {
    /// Checks the ranges: 0 ≤ ε_low < 1, ε_high ≥ 0, β ≥ 0, and a length for `constant-length`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..1.0).contains(&self.epsilon_low),
            "epsilon_low must be in [0, 1), got {}",
            self.epsilon_low
        );
        ensure!(
            self.epsilon_high >= 0.0 && self.epsilon_high.is_finite(),
            "epsilon_high must be ≥ 0, got {}",
            self.epsilon_high
        );
        ensure!(
            self.beta >= 0.0 && self.beta.is_finite(),
            "beta must be ≥ 0, got {}",
            self.beta
        );
        if self.aggregation == LossAggregation::ConstantLength {
            ensure!(
                matches!(self.max_completion_length, Some(n) if n >= 1),
                "constant-length aggregation needs max_completion_length ≥ 1"
            );
        }
        Ok(())
    }
}

/// Token means over the micro-batch, where meaningful for the objective.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct ObjectiveMetrics {
    /// Completion tokens in the micro-batch.
    pub n_tokens: usize,
    /// Mean of ρ_t (clipped-surrogate objectives).
    pub mean_ratio: Option<f64>,
    /// Share of tokens with Â < 0 and ρ < 1 − ε_low.
    pub clip_fraction_low: Option<f64>,
    /// Share of tokens with Â > 0 and ρ > 1 + ε_high.
    pub clip_fraction_high: Option<f64>,
    /// Share of tokens whose surrogate gradient is cut (low or high).
    pub clip_fraction: Option<f64>,
    /// Mean k3 KL to the reference model (when β ≠ 0 and reference log-probs are given).
    pub mean_kl: Option<f64>,
}

/// What an objective returns for one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveOutput {
    /// The loss value L (for logging; the gradient flows through `token_weights`).
    pub loss: f64,
    /// g_t = ∂L/∂logp_t, one per completion token, in the layout's order.
    pub token_weights: Vec<f32>,
    /// Diagnostics.
    pub metrics: ObjectiveMetrics,
}

fn check_alpha(alpha: f32) -> Result<()> {
    ensure!(
        alpha.is_finite() && alpha > 0.0,
        "loss scale alpha must be finite and > 0, got {alpha}"
    );
    Ok(())
}

/// GPG: L = −α Σ_i Σ_t m_t Â_i logp_t / N_tok, g_t = −α m_t Â_i / N_tok (m_t: the layout's
/// loss mask, 1 without one). Old and reference log-probs are ignored (no ratio, no clip, no
/// KL).
pub fn gpg_loss(
    tokens: &PolicyTokens<'_>,
    alpha: f32,
    normaliser: Normaliser,
) -> Result<ObjectiveOutput> {
    PolicyTokens {
        old_logp: None,
        ref_logp: None,
        ..*tokens
    }
    .validate()?;
    check_alpha(alpha)?;
    let scale = alpha as f64 / normaliser.n_tokens;
    let mut loss = 0.0f64;
    let mut weights = vec![0.0f32; tokens.logp.len()];
    for (s, range) in tokens.layout.ranges().enumerate() {
        let adv = tokens.advantages[s] as f64;
        let g = -scale * adv;
        let mut sum_logp = 0.0f64;
        for t in range {
            if tokens.layout.is_scored(t) {
                sum_logp += tokens.logp[t] as f64;
                weights[t] = g as f32;
            }
        }
        loss += g * sum_logp;
    }
    Ok(ObjectiveOutput {
        loss,
        token_weights: weights,
        metrics: ObjectiveMetrics {
            n_tokens: tokens.layout.n_scored(),
            ..Default::default()
        },
    })
}

/// k3 estimator of KL(π_θ ‖ π_ref) at one token: exp(ref − logp) − (ref − logp) − 1 (≥ 0).
pub fn k3_kl(logp: f64, ref_logp: f64) -> f64 {
    let d = ref_logp - logp;
    d.exp() - d - 1.0
}

/// ∂k3/∂logp = 1 − exp(ref − logp).
pub fn k3_kl_grad(logp: f64, ref_logp: f64) -> f64 {
    1.0 - (ref_logp - logp).exp()
}

/// Which side of the trust region cut a token's surrogate gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipSide {
    /// Not clipped: the gradient flows.
    None,
    /// Â < 0 and ρ < 1 − ε_low.
    Low,
    /// Â > 0 and ρ > 1 + ε_high.
    High,
}

/// One token's clipped-surrogate term and its derivative w.r.t. logp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SurrogateToken {
    /// −min(ρÂ, clip(ρ, lo, hi)Â).
    pub loss: f64,
    /// ∂loss/∂logp = −ρÂ when not clipped, else 0 (∂ρ/∂logp = ρ).
    pub grad: f64,
    /// Whether and where the gradient was cut.
    pub clip: ClipSide,
}

/// The PPO clipped surrogate at one token, with ρ = exp(logp − old), bounds lo = 1 − ε_low and
/// hi = 1 + ε_high: loss = −min(ρÂ, clip(ρ, lo, hi)Â). The min picks the clipped branch exactly
/// when (Â > 0, ρ > hi) or (Â < 0, ρ < lo); there clip(ρ) is constant and the gradient is 0.
pub fn clipped_surrogate_token(ratio: f64, advantage: f64, lo: f64, hi: f64) -> SurrogateToken {
    let clip = if advantage < 0.0 && ratio < lo {
        ClipSide::Low
    } else if advantage > 0.0 && ratio > hi {
        ClipSide::High
    } else {
        ClipSide::None
    };
    match clip {
        ClipSide::None => SurrogateToken {
            loss: -ratio * advantage,
            grad: -ratio * advantage,
            clip,
        },
        _ => SurrogateToken {
            loss: -ratio.clamp(lo, hi) * advantage,
            grad: 0.0,
            clip,
        },
    }
}

/// GRPO-family objective: clipped surrogate + β k3 KL, aggregated per `config.aggregation`,
/// scaled by α (pass 1 for plain GRPO). See the module docs for the equations.
pub fn clipped_surrogate_loss(
    tokens: &PolicyTokens<'_>,
    config: &ClippedSurrogate,
    alpha: f32,
    normaliser: Normaliser,
) -> Result<ObjectiveOutput> {
    config.validate()?;
    check_alpha(alpha)?;
    let beta = config.beta as f64;
    let ref_logp = if beta != 0.0 {
        match tokens.ref_logp {
            Some(r) => Some(r),
            None => bail!("beta = {beta} needs reference-model log-probs, none were given"),
        }
    } else {
        None
    };
    PolicyTokens {
        ref_logp,
        ..*tokens
    }
    .validate()?;

    let lo = 1.0 - config.epsilon_low as f64;
    let hi = 1.0 + config.epsilon_high as f64;
    let alpha = alpha as f64;
    let n_tok = tokens.layout.n_tokens();
    let n_scored = tokens.layout.n_scored();
    let mut weights = vec![0.0f32; n_tok];
    let mut loss = 0.0f64;
    let (mut ratio_sum, mut kl_sum) = (0.0f64, 0.0f64);
    let (mut n_low, mut n_high) = (0usize, 0usize);

    for (s, range) in tokens.layout.ranges().enumerate() {
        let w = alpha
            * match config.aggregation {
                LossAggregation::SequenceMean => {
                    1.0 / ((tokens.layout.scored_len(s).max(1) as f64) * normaliser.n_sequences)
                }
                LossAggregation::TokenMean => 1.0 / normaliser.n_tokens,
                LossAggregation::ConstantLength => {
                    let len = config.max_completion_length.unwrap_or(1).max(1) as f64;
                    1.0 / (normaliser.n_sequences * len)
                }
            };
        let adv = tokens.advantages[s] as f64;
        for t in range {
            if !tokens.layout.is_scored(t) {
                continue; // a tool's response: context only, g_t = 0
            }
            let logp = tokens.logp[t] as f64;
            let ratio = match tokens.old_logp {
                Some(old) => (logp - old[t] as f64).exp(),
                None => 1.0,
            };
            let term = clipped_surrogate_token(ratio, adv, lo, hi);
            n_low += (term.clip == ClipSide::Low) as usize;
            n_high += (term.clip == ClipSide::High) as usize;
            ratio_sum += ratio;
            let (mut token_loss, mut grad) = (term.loss, term.grad);
            if let Some(r) = ref_logp {
                let r = r[t] as f64;
                let kl = k3_kl(logp, r);
                kl_sum += kl;
                token_loss += beta * kl;
                grad += beta * k3_kl_grad(logp, r);
            }
            loss += w * token_loss;
            weights[t] = (w * grad) as f32;
        }
    }

    let denom = n_scored.max(1) as f64;
    Ok(ObjectiveOutput {
        loss,
        token_weights: weights,
        metrics: ObjectiveMetrics {
            n_tokens: n_scored,
            mean_ratio: Some(ratio_sum / denom),
            clip_fraction_low: Some(n_low as f64 / denom),
            clip_fraction_high: Some(n_high as f64 / denom),
            clip_fraction: Some((n_low + n_high) as f64 / denom),
            mean_kl: ref_logp.map(|_| kl_sum / denom),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
        assert!((a - b).abs() <= tol, "{what}: {a} vs {b} (tol {tol})");
    }

    #[test]
    fn surrogate_token_by_hand() {
        // lo = 0.8, hi = 1.2.
        // Â = 2, ρ = 1.5: min(3, 2.4) = 2.4 → loss −2.4, clipped high, grad 0.
        // Â = 2, ρ = 0.5: min(1, 1.6) = 1 → loss −1, grad −ρÂ = −1.
        // Â = −2, ρ = 0.5: min(−1, −1.6) = −1.6 → loss 1.6, clipped low, grad 0.
        // Â = −2, ρ = 1.5: min(−3, −2.4) = −3 → loss 3, grad −ρÂ = 3.
        // Â = 1, ρ = 1.1: inside → loss −1.1, grad −1.1.
        let cases = [
            (1.5, 2.0, -2.4, 0.0, ClipSide::High),
            (0.5, 2.0, -1.0, -1.0, ClipSide::None),
            (0.5, -2.0, 1.6, 0.0, ClipSide::Low),
            (1.5, -2.0, 3.0, 3.0, ClipSide::None),
            (1.1, 1.0, -1.1, -1.1, ClipSide::None),
        ];
        for (ratio, adv, loss, grad, clip) in cases {
            let t = clipped_surrogate_token(ratio, adv, 0.8, 1.2);
            assert_close(t.loss, loss, 1e-12, "loss");
            assert_close(t.grad, grad, 1e-12, "grad");
            assert_eq!(t.clip, clip);
        }
        // k3 at ref − logp = ln 2: 2 − ln 2 − 1 = 0.306853; ∂/∂logp = 1 − 2 = −1.
        assert_close(k3_kl(0.0, 2f64.ln()), 1.0 - 2f64.ln(), 1e-12, "k3");
        assert_close(k3_kl_grad(0.0, 2f64.ln()), -1.0, 1e-12, "k3 grad");
        assert_eq!(k3_kl(-0.7, -0.7), 0.0);
    }

    #[test]
    fn gpg_by_hand() {
        // Two completions: lengths 2 and 1; Â = [0.5, −0.5]; logp = [−1, −2 | −0.5]; α = 2.
        // N_tok = 3. L = −2 · (0.5·(−1 − 2) + (−0.5)·(−0.5)) / 3 = −2 · (−1.5 + 0.25) / 3
        //   = 2.5 / 3 = 0.833333.
        // g = −α Â / N = [−2·0.5/3, −2·0.5/3, +2·0.5/3] = [−1/3, −1/3, 1/3].
        let layout = TokenLayout::from_lengths(&[2, 1]);
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &[-1.0, -2.0, -0.5],
            old_logp: None,
            ref_logp: None,
            advantages: &[0.5, -0.5],
        };
        let out = gpg_loss(&tokens, 2.0, Normaliser::micro_batch(&layout)).unwrap();
        assert_close(out.loss, 2.5 / 3.0, 1e-7, "loss");
        let third = 1.0 / 3.0;
        for (g, e) in out.token_weights.iter().zip([-third, -third, third]) {
            assert_close(*g as f64, e, 1e-7, "g");
        }
        // With accumulation over 2 micro-batches the normaliser doubles: every value halves.
        let acc = gpg_loss(
            &tokens,
            2.0,
            Normaliser::micro_batch(&layout).accumulated(2),
        )
        .unwrap();
        assert_close(acc.loss, 2.5 / 6.0, 1e-7, "accumulated loss");
        assert_close(
            acc.token_weights[0] as f64,
            -third / 2.0,
            1e-7,
            "accumulated g",
        );
    }

    #[test]
    fn grpo_by_hand_sequence_mean() {
        // ε = 0.2, β = 0.1, sequence-mean, α = 1.
        // Completion 0 (Â = 1): tokens logp − old = [0, ln 1.5], ref − logp = [0, ln 2]
        //   t0: ρ = 1 (inside), ℓ = −1 + 0.1·(1 − 0 − 1) = −1; ∂ = −1 + 0.1·(1 − 1) = −1
        //   t1: ρ = 1.5 > 1.2 with Â > 0: clipped, ℓ = −1.2 + 0.1·(2 − ln 2 − 1) = −1.2 + 0.030685
        //       = −1.169315; ∂ = 0 + 0.1·(1 − 2) = −0.1
        // Completion 1 (Â = −2): one token, logp − old = ln 0.5, ref − logp = 0
        //   ρ = 0.5 < 0.8 with Â < 0: clipped, ℓ = −(0.8·(−2)) = 1.6; ∂ = 0
        // w = 1 / (|o_i| · N_seq): completion 0 → 1/4, completion 1 → 1/2.
        // L = (−1 − 1.169315)/4 + 1.6/2 = −0.542329 + 0.8 = 0.257671
        // g = [−1/4, −0.1/4, 0] = [−0.25, −0.025, 0]
        let layout = TokenLayout::from_lengths(&[2, 1]);
        let logp = [-1.0f32, -1.0, -1.0];
        let old = [-1.0f32, -1.0 - 1.5f32.ln(), -1.0 - 0.5f32.ln()];
        let reference = [-1.0f32, -1.0 + 2f32.ln(), -1.0];
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &logp,
            old_logp: Some(&old),
            ref_logp: Some(&reference),
            advantages: &[1.0, -2.0],
        };
        let cfg = ClippedSurrogate {
            beta: 0.1,
            ..Default::default()
        };
        let out =
            clipped_surrogate_loss(&tokens, &cfg, 1.0, Normaliser::micro_batch(&layout)).unwrap();
        let l1 = -1.2 + 0.1 * (2.0 - 2f64.ln() - 1.0);
        assert_close(out.loss, (-1.0 + l1) / 4.0 + 0.8, 1e-6, "loss");
        assert_close(out.loss, 0.257671, 1e-6, "loss numeric");
        for (g, e) in out.token_weights.iter().zip([-0.25, -0.025, 0.0]) {
            assert_close(*g as f64, e, 1e-6, "g");
        }
        let m = out.metrics;
        assert_eq!(m.n_tokens, 3);
        assert_close(m.clip_fraction_high.unwrap(), 1.0 / 3.0, 1e-12, "high");
        assert_close(m.clip_fraction_low.unwrap(), 1.0 / 3.0, 1e-12, "low");
        assert_close(m.clip_fraction.unwrap(), 2.0 / 3.0, 1e-12, "clip");
        // ratios 1, 1.5, 0.5 → mean 1; KL 0, 2 − ln2 − 1 = 0.306853, 0 → mean 0.102284
        assert_close(m.mean_ratio.unwrap(), 1.0, 1e-6, "ratio");
        assert_close(m.mean_kl.unwrap(), (1.0 - 2f64.ln()) / 3.0, 1e-6, "kl");
    }

    #[test]
    fn aggregations_by_hand() {
        // On-policy (ρ = 1), β = 0: ℓ_t = −Â_i, ∂ = −Â_i. Lengths [3, 1], Â = [1, 3].
        // token-mean: L = (−1·3 − 3) / 4 = −1.5; g = [−1/4 ×3, −3/4].
        // constant-length (L_max = 10): L = (−3 − 3) / (2·10) = −0.3; g = [−1/20 ×3, −3/20].
        // sequence-mean: L = (−3/3 + −3/1) / 2 = −2; g = [−1/6 ×3, −3/2].
        let layout = TokenLayout::from_lengths(&[3, 1]);
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &[-0.1, -0.2, -0.3, -0.4],
            old_logp: None,
            ref_logp: None,
            advantages: &[1.0, 3.0],
        };
        let norm = Normaliser::micro_batch(&layout);
        let cases = [
            (
                LossAggregation::TokenMean,
                -1.5,
                [-0.25, -0.25, -0.25, -0.75],
            ),
            (
                LossAggregation::ConstantLength,
                -0.3,
                [-0.05, -0.05, -0.05, -0.15],
            ),
            (
                LossAggregation::SequenceMean,
                -2.0,
                [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0, -1.5],
            ),
        ];
        for (aggregation, loss, g) in cases {
            let cfg = ClippedSurrogate {
                beta: 0.0,
                aggregation,
                max_completion_length: Some(10),
                ..Default::default()
            };
            let out = clipped_surrogate_loss(&tokens, &cfg, 1.0, norm).unwrap();
            assert_close(out.loss, loss, 1e-7, aggregation.name());
            for (a, b) in out.token_weights.iter().zip(g) {
                assert_close(*a as f64, b, 1e-7, aggregation.name());
            }
            assert_eq!(out.metrics.mean_kl, None);
            assert_eq!(out.metrics.clip_fraction, Some(0.0));
        }
    }

    #[test]
    fn gpg_equals_token_mean_on_policy_gradient() {
        // On-policy with β = 0 the GRPO token-mean gradient equals GPG's: −Â/N per token.
        let layout = TokenLayout::from_lengths(&[2, 3]);
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &[-0.3, -1.2, -0.7, -2.0, -0.1],
            old_logp: None,
            ref_logp: None,
            advantages: &[0.7, -0.4],
        };
        let norm = Normaliser::micro_batch(&layout);
        let gpg = gpg_loss(&tokens, 1.5, norm).unwrap();
        let cfg = ClippedSurrogate {
            beta: 0.0,
            aggregation: LossAggregation::TokenMean,
            ..Default::default()
        };
        let grpo = clipped_surrogate_loss(&tokens, &cfg, 1.5, norm).unwrap();
        assert_eq!(gpg.token_weights, grpo.token_weights);
    }

    /// A batch with a tool response inside completion 0 (positions 2, 3 masked), worked out by
    /// hand: the masked tokens get g_t = 0 and are out of every count.
    #[test]
    fn masked_tool_tokens_by_hand() {
        // Completion 0: 5 tokens, mask [1, 1, 0, 0, 1] (3 scored); completion 1: 2 tokens.
        // Â = [1, −0.5], α = 1, logp = [−1, −2, −9, −9, −0.5 | −1, −3].
        let layout = TokenLayout::from_lengths(&[5, 2])
            .with_mask(vec![true, true, false, false, true, true, true])
            .unwrap();
        let logp = [-1.0f32, -2.0, -9.0, -9.0, -0.5, -1.0, -3.0];
        // The old policy is far off at the masked tokens (ρ = e⁵ there): were they counted,
        // they would be clipped.
        let old = [-1.0f32, -2.0, -14.0, -14.0, -0.5, -1.0, -3.0];
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &logp,
            old_logp: Some(&old),
            ref_logp: None,
            advantages: &[1.0, -0.5],
        };
        let norm = Normaliser::micro_batch(&layout);
        assert_eq!(
            norm.n_tokens, 5.0,
            "N_tok counts the 5 scored tokens, not 7"
        );
        // GPG: g = −Â/N_tok = −1/5 (completion 0), +0.5/5 = 0.1 (completion 1), 0 masked.
        // L = −0.2·(−1 − 2 − 0.5) + 0.1·(−1 − 3) = 0.7 − 0.4 = 0.3.
        let out = gpg_loss(&tokens, 1.0, norm).unwrap();
        assert_close(out.loss, 0.3, 1e-7, "gpg loss");
        let expect = [-0.2, -0.2, 0.0, 0.0, -0.2, 0.1, 0.1];
        for (g, e) in out.token_weights.iter().zip(expect) {
            assert_close(*g as f64, e, 1e-7, "gpg g");
        }
        assert_eq!(out.metrics.n_tokens, 5);
        // GRPO on the same tokens (ρ = 1 at every scored token, β = 0): ℓ_t = −Â_i.
        // sequence-mean: w = 1/(|o_i|·N_seq) with |o_0| = 3 scored → 1/6, |o_1| = 2 → 1/4;
        //   g = [−1/6 ×3, +0.125 ×2]; L = 3·(−1)/6 + 2·0.5/4 = −0.25.
        // token-mean: w = 1/5; g = [−0.2, +0.1]; L = (−3 + 1)/5 = −0.4.
        // constant-length (10): w = 1/20; g = [−0.05, +0.025]; L = −2/20 = −0.1.
        let sixth = 1.0 / 6.0;
        let cases = [
            (LossAggregation::SequenceMean, -0.25, [-sixth, 0.125]),
            (LossAggregation::TokenMean, -0.4, [-0.2, 0.1]),
            (LossAggregation::ConstantLength, -0.1, [-0.05, 0.025]),
        ];
        for (aggregation, loss, [g0, g1]) in cases {
            let cfg = ClippedSurrogate {
                beta: 0.0,
                aggregation,
                max_completion_length: Some(10),
                ..Default::default()
            };
            let out = clipped_surrogate_loss(&tokens, &cfg, 1.0, norm).unwrap();
            assert_close(out.loss, loss, 1e-7, aggregation.name());
            let expect = [g0, g0, 0.0, 0.0, g0, g1, g1];
            for (g, e) in out.token_weights.iter().zip(expect) {
                assert_close(*g as f64, e, 1e-7, aggregation.name());
            }
            let m = out.metrics;
            assert_eq!(m.n_tokens, 5);
            assert_eq!(m.clip_fraction, Some(0.0), "masked tokens are not clipped");
            assert_close(
                m.mean_ratio.unwrap(),
                1.0,
                1e-12,
                "ratio over scored tokens",
            );
        }
        // The same batch without the mask differs (N_tok = 7 and the tool tokens weigh in).
        let plain = TokenLayout::from_lengths(&[5, 2]);
        let unmasked = gpg_loss(
            &PolicyTokens {
                layout: &plain,
                ..tokens
            },
            1.0,
            Normaliser::micro_batch(&plain),
        )
        .unwrap();
        assert_close(
            unmasked.token_weights[2] as f64,
            -1.0 / 7.0,
            1e-7,
            "unmasked g",
        );
    }

    #[test]
    fn input_errors() {
        let layout = TokenLayout::from_lengths(&[2]);
        let norm = Normaliser::micro_batch(&layout);
        let ok = PolicyTokens {
            layout: &layout,
            logp: &[-1.0, -1.0],
            old_logp: None,
            ref_logp: None,
            advantages: &[1.0],
        };
        assert!(gpg_loss(
            &PolicyTokens {
                logp: &[-1.0],
                ..ok
            },
            1.0,
            norm
        )
        .is_err());
        assert!(gpg_loss(
            &PolicyTokens {
                advantages: &[],
                ..ok
            },
            1.0,
            norm
        )
        .is_err());
        let err = gpg_loss(
            &PolicyTokens {
                logp: &[-1.0, f32::NEG_INFINITY],
                ..ok
            },
            1.0,
            norm,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("token 1 (completion 0, position 1)"), "{err}");
        assert!(gpg_loss(&ok, 0.0, norm).is_err());
        // β > 0 without reference log-probs
        let cfg = ClippedSurrogate::default();
        assert!(clipped_surrogate_loss(&ok, &cfg, 1.0, norm).is_err());
        // constant-length without a length
        let cfg = ClippedSurrogate {
            beta: 0.0,
            aggregation: LossAggregation::ConstantLength,
            max_completion_length: None,
            ..Default::default()
        };
        assert!(clipped_surrogate_loss(&ok, &cfg, 1.0, norm).is_err());
    }

    #[test]
    fn empty_batch_has_zero_loss() {
        let layout = TokenLayout::from_lengths(&[0, 0]);
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &[],
            old_logp: Some(&[]),
            ref_logp: Some(&[]),
            advantages: &[1.0, -1.0],
        };
        let norm = Normaliser::micro_batch(&layout);
        assert_eq!(gpg_loss(&tokens, 1.0, norm).unwrap().loss, 0.0);
        let out = clipped_surrogate_loss(&tokens, &ClippedSurrogate::default(), 1.0, norm).unwrap();
        assert_eq!(out.loss, 0.0);
        assert!(out.token_weights.is_empty());
    }

    #[test]
    fn aggregation_names() {
        for a in LossAggregation::ALL {
            assert_eq!(a.to_string().parse::<LossAggregation>().unwrap(), a);
        }
        assert_eq!(
            "dapo".parse::<LossAggregation>().unwrap(),
            LossAggregation::TokenMean
        );
        assert!("mean".parse::<LossAggregation>().is_err());
    }
}
