//! The registry of policy objectives: a config selects one by name (`gpg`, `grpo`,
//! `dr-grpo`) and its parameters; [`PolicyLoss::compute`] dispatches to the pure functions of
//! [`super::objective`], where the equations are written out.
//!
//! In a config (JSON shown; TOML alike), `name` selects the objective and the other fields are
//! its parameters, each with a default except Dr.GRPO's `max_completion_length`:
//!
//! ```text
//! {"name": "gpg"}                                   GPG with α = B / (B − M)
//! {"name": "gpg", "scale_by_alpha": false}          GPG with α = 1 (REINFORCE, group-mean baseline)
//! {"name": "grpo", "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.2,
//!  "aggregation": "sequence-mean"}                  GRPO (TRL loss_type "grpo")
//! {"name": "dr-grpo", "max_completion_length": 1024}  Dr.GRPO
//! ```
//!
//! Unknown fields are errors.

use anyhow::{bail, Result};

use super::advantages::AdvantageEstimator;
use super::groups::AgeScale;
use super::objective::{
    clipped_surrogate_loss, default_epsilon, gpg_loss, ClippedSurrogate, LossAggregation,
    Normaliser, ObjectiveOutput, PolicyTokens,
};

fn default_true() -> bool {
    true
}

/// GPG's objective: fully determined by Â, α and N_tok; the one switch is whether α is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpgLoss {
    /// Scale the loss by α = B / (B − M) (Accurate Gradient Estimation; the reference's
    /// `--adjust_gd`). Default true; false gives α = 1 (REINFORCE with a group-mean baseline).
    #[serde(default = "default_true")]
    pub scale_by_alpha: bool,
}

impl Default for GpgLoss {
    fn default() -> Self {
        Self {
            scale_by_alpha: true,
        }
    }
}

/// Dr.GRPO: GRPO's per-token loss divided by the constant N_seq · max_completion_length.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrGrpoLoss {
    /// ε_low (default 0.2).
    #[serde(default = "default_epsilon")]
    pub epsilon_low: f32,
    /// ε_high (default 0.2).
    #[serde(default = "default_epsilon")]
    pub epsilon_high: f32,
    /// β, the k3-KL coefficient (default 0: Dr.GRPO drops the KL term).
    #[serde(default)]
    pub beta: f32,
    /// The constant length in the normaliser (the run's max completion length).
    pub max_completion_length: usize,
}

impl DrGrpoLoss {
    /// Dr.GRPO with ε = 0.2, β = 0 and the given max completion length.
    pub fn new(max_completion_length: usize) -> Self {
        Self {
            epsilon_low: default_epsilon(),
            epsilon_high: default_epsilon(),
            beta: 0.0,
            max_completion_length,
        }
    }

    /// The equivalent clipped surrogate with `constant-length` aggregation.
    pub fn as_clipped_surrogate(&self) -> ClippedSurrogate {
        ClippedSurrogate {
            epsilon_low: self.epsilon_low,
            epsilon_high: self.epsilon_high,
            beta: self.beta,
            aggregation: LossAggregation::ConstantLength,
            max_completion_length: Some(self.max_completion_length),
        }
    }
}

/// A registered policy objective, selected in a config by `name` (`gpg`, `grpo`, `dr-grpo`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum PolicyLoss {
    /// GPG: L = −α Σ Â logp / N_tok.
    Gpg(GpgLoss),
    /// GRPO: clipped surrogate + β k3 KL, aggregated as configured.
    Grpo(ClippedSurrogate),
    /// Dr.GRPO: clipped surrogate / (N_seq · max_completion_length).
    DrGrpo(DrGrpoLoss),
}

impl Default for PolicyLoss {
    /// GPG with α (the method this project implements).
    fn default() -> Self {
        Self::Gpg(GpgLoss::default())
    }
}

impl PolicyLoss {
    /// The registered names.
    pub const NAMES: [&'static str; 3] = ["gpg", "grpo", "dr-grpo"];

    /// The objective `name` with its defaults (`max_completion_length` is used by `dr-grpo`).
    pub fn from_name(name: &str, max_completion_length: usize) -> Result<Self> {
        let wanted = name.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match wanted.as_str() {
            "gpg" => Self::Gpg(GpgLoss::default()),
            "grpo" => Self::Grpo(ClippedSurrogate::default()),
            "dr-grpo" => Self::DrGrpo(DrGrpoLoss::new(max_completion_length)),
            _ => bail!(
                "unknown policy loss {name:?}; expected one of: {}",
                Self::NAMES.join(", ")
            ),
        })
    }

    /// The config name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gpg(_) => "gpg",
            Self::Grpo(_) => "grpo",
            Self::DrGrpo(_) => "dr-grpo",
        }
    }

    /// The advantage estimator the method is defined with.
    pub fn default_advantage_estimator(&self) -> AdvantageEstimator {
        match self {
            Self::Gpg(_) => AdvantageEstimator::Gpg,
            Self::Grpo(_) => AdvantageEstimator::Grpo,
            Self::DrGrpo(_) => AdvantageEstimator::DrGrpo,
        }
    }

    /// The loss scale to pass to [`PolicyLoss::compute`] for a batch with this [`AgeScale`], or
    /// `None` to skip the optimiser step.
    ///
    /// * GPG: α (or 1 with `scale_by_alpha = false`); `None` when no group is valid, since the
    ///   batch then carries no gradient (the reference would divide by inverse_alpha = 0).
    /// * GRPO, Dr.GRPO: always 1, never skipped, as in TRL (with β ≠ 0 the KL term still has a
    ///   gradient when every advantage is zero).
    pub fn loss_scale(&self, age: AgeScale) -> Option<f32> {
        match self {
            Self::Gpg(g) => match age {
                AgeScale::SkipUpdate => None,
                AgeScale::Scale { alpha, .. } => Some(if g.scale_by_alpha { alpha } else { 1.0 }),
            },
            Self::Grpo(_) | Self::DrGrpo(_) => Some(1.0),
        }
    }

    /// Whether the objective reads reference-model log-probs (β ≠ 0).
    pub fn needs_reference_logp(&self) -> bool {
        match self {
            Self::Gpg(_) => false,
            Self::Grpo(c) => c.beta != 0.0,
            Self::DrGrpo(d) => d.beta != 0.0,
        }
    }

    /// Whether the objective reads sampling-policy log-probs (an importance ratio).
    pub fn uses_importance_ratio(&self) -> bool {
        !matches!(self, Self::Gpg(_))
    }

    /// Whether g_t = ∂L/∂logp_t is the same whatever logp is, so that it can be computed
    /// before the forward (the engine then forms the head's logits once): GPG always
    /// (g_t = −α·Â_i/N_tok); GRPO and Dr.GRPO on-policy (no sampling-policy log-probs, so
    /// ρ_t ≡ 1 and nothing is clipped) with β = 0.
    pub fn weights_independent_of_logp(&self, has_old_logp: bool) -> bool {
        match self {
            Self::Gpg(_) => true,
            Self::Grpo(c) => !has_old_logp && c.beta == 0.0,
            Self::DrGrpo(d) => !has_old_logp && d.beta == 0.0,
        }
    }

    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Gpg(_) => Ok(()),
            Self::Grpo(c) => c.validate(),
            Self::DrGrpo(d) => d.as_clipped_surrogate().validate(),
        }
    }

    /// Loss, per-token weights and metrics of this objective (see the module docs).
    pub fn compute(
        &self,
        tokens: &PolicyTokens<'_>,
        alpha: f32,
        normaliser: Normaliser,
    ) -> Result<ObjectiveOutput> {
        match self {
            Self::Gpg(_) => gpg_loss(tokens, alpha, normaliser),
            Self::Grpo(c) => clipped_surrogate_loss(tokens, c, alpha, normaliser),
            Self::DrGrpo(d) => {
                clipped_surrogate_loss(tokens, &d.as_clipped_surrogate(), alpha, normaliser)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algo::layout::TokenLayout;

    fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
        assert!((a - b).abs() <= tol, "{what}: {a} vs {b} (tol {tol})");
    }

    #[test]
    fn dr_grpo_is_constant_length() {
        // On-policy (ρ = 1), β = 0: ℓ_t = −Â_i. Lengths [3, 1], Â = [1, 3], L_max = 10, α = 2:
        // L = 2 · (−1·3 − 3) / (2 · 10) = −0.6; g for the last token = 2 · (−3) / 20 = −0.3.
        let layout = TokenLayout::from_lengths(&[3, 1]);
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &[-0.1, -0.2, -0.3, -0.4],
            old_logp: None,
            ref_logp: None,
            advantages: &[1.0, 3.0],
        };
        let dr = PolicyLoss::from_name("dr_grpo", 10).unwrap();
        let out = dr
            .compute(&tokens, 2.0, Normaliser::micro_batch(&layout))
            .unwrap();
        assert_close(out.loss, -0.6, 1e-7, "dr-grpo");
        assert_close(out.token_weights[3] as f64, -0.3, 1e-7, "dr-grpo g");
        assert_eq!(dr.default_advantage_estimator(), AdvantageEstimator::DrGrpo);
    }

    #[test]
    fn weights_known_before_the_forward_do_not_depend_on_logp() {
        let layout = TokenLayout::from_lengths(&[2, 3]);
        let normaliser = Normaliser::micro_batch(&layout);
        let weights = |loss: &PolicyLoss, logp: &[f32], old: Option<&[f32]>| {
            let tokens = PolicyTokens {
                layout: &layout,
                logp,
                old_logp: old,
                ref_logp: Some(&[-1.0, -2.0, -0.5, -0.1, -3.0]),
                advantages: &[0.7, -1.2],
            };
            loss.compute(&tokens, 1.5, normaliser)
                .unwrap()
                .token_weights
        };
        let zeros = [0.0f32; 5];
        let logp = [-0.3f32, -2.5, -0.01, -4.0, -1.1];
        let old = [-0.2f32, -3.5, -0.5, -1.0, -1.1];
        let grpo = PolicyLoss::Grpo(ClippedSurrogate {
            beta: 0.0,
            ..Default::default()
        });
        for loss in [
            PolicyLoss::from_name("gpg", 8).unwrap(),
            PolicyLoss::from_name("dr-grpo", 8).unwrap(),
            grpo,
        ] {
            assert!(loss.weights_independent_of_logp(false), "{loss:?}");
            assert_eq!(
                weights(&loss, &zeros, None),
                weights(&loss, &logp, None),
                "{loss:?}"
            );
        }
        // An importance ratio or a KL term makes g_t depend on logp_t.
        assert!(!grpo.weights_independent_of_logp(true));
        assert_ne!(
            weights(&grpo, &zeros, Some(&old)),
            weights(&grpo, &logp, Some(&old))
        );
        assert!(PolicyLoss::Gpg(GpgLoss::default()).weights_independent_of_logp(true));
        let kl = PolicyLoss::Grpo(ClippedSurrogate {
            beta: 0.04,
            ..Default::default()
        });
        assert!(!kl.weights_independent_of_logp(false));
        assert_ne!(weights(&kl, &zeros, None), weights(&kl, &logp, None));
    }

    #[test]
    fn loss_scale_per_objective() {
        let age = AgeScale::Scale {
            inverse_alpha: 0.25,
            alpha: 4.0,
        };
        let gpg = PolicyLoss::Gpg(GpgLoss::default());
        assert_eq!(gpg.loss_scale(age), Some(4.0));
        assert_eq!(gpg.loss_scale(AgeScale::SkipUpdate), None);
        let plain = PolicyLoss::Gpg(GpgLoss {
            scale_by_alpha: false,
        });
        assert_eq!(plain.loss_scale(age), Some(1.0));
        assert_eq!(plain.loss_scale(AgeScale::SkipUpdate), None);
        let grpo = PolicyLoss::Grpo(ClippedSurrogate::default());
        assert_eq!(grpo.loss_scale(age), Some(1.0));
        assert_eq!(grpo.loss_scale(AgeScale::SkipUpdate), Some(1.0));
    }

    #[test]
    fn config_names_and_serde() {
        for name in PolicyLoss::NAMES {
            assert_eq!(PolicyLoss::from_name(name, 8).unwrap().name(), name);
        }
        let err = PolicyLoss::from_name("ppo", 8).unwrap_err().to_string();
        assert!(err.contains("gpg, grpo, dr-grpo"), "{err}");
        let grpo: PolicyLoss =
            serde_json::from_str(r#"{"name":"grpo","beta":0.0,"aggregation":"bnpo"}"#).unwrap();
        assert_eq!(
            grpo,
            PolicyLoss::Grpo(ClippedSurrogate {
                beta: 0.0,
                aggregation: LossAggregation::TokenMean,
                ..Default::default()
            })
        );
        let gpg: PolicyLoss = serde_json::from_str(r#"{"name":"gpg"}"#).unwrap();
        assert_eq!(gpg, PolicyLoss::Gpg(GpgLoss::default()));
        let plain: PolicyLoss =
            serde_json::from_str(r#"{"name":"gpg","scale_by_alpha":false}"#).unwrap();
        assert_eq!(
            plain,
            PolicyLoss::Gpg(GpgLoss {
                scale_by_alpha: false
            })
        );
        assert!(serde_json::from_str::<PolicyLoss>(r#"{"name":"gpg","beta":1}"#).is_err());
        assert!(serde_json::from_str::<PolicyLoss>(r#"{"name":"grpo","epsilon":0.1}"#).is_err());
        assert!(serde_json::from_str::<PolicyLoss>(r#"{"name":"dr-grpo"}"#).is_err());
        let dr: PolicyLoss =
            serde_json::from_str(r#"{"name":"dr-grpo","max_completion_length":1024}"#).unwrap();
        assert_eq!(dr, PolicyLoss::DrGrpo(DrGrpoLoss::new(1024)));
        let json = serde_json::to_string(&dr).unwrap();
        assert_eq!(serde_json::from_str::<PolicyLoss>(&json).unwrap(), dr);
    }

    /// Central finite differences of L w.r.t. each logp_t against g_t. The perturbed inputs
    /// are f32, so the step actually taken is (fl(x + h) − fl(x − h)); dividing by it leaves only
    /// the O(h²) truncation error. Test points keep |ρ − (1 ± ε)| ≫ h so no token crosses a kink.
    fn check_finite_differences(loss: &PolicyLoss, tokens: &PolicyTokens<'_>, alpha: f32) {
        let norm = Normaliser::micro_batch(tokens.layout).accumulated(3);
        let out = loss.compute(tokens, alpha, norm).unwrap();
        let h = 1e-3f32;
        for t in 0..tokens.logp.len() {
            let mut plus = tokens.logp.to_vec();
            let mut minus = tokens.logp.to_vec();
            plus[t] += h;
            minus[t] -= h;
            let step = plus[t] as f64 - minus[t] as f64;
            let lp = loss
                .compute(
                    &PolicyTokens {
                        logp: &plus,
                        ..*tokens
                    },
                    alpha,
                    norm,
                )
                .unwrap()
                .loss;
            let lm = loss
                .compute(
                    &PolicyTokens {
                        logp: &minus,
                        ..*tokens
                    },
                    alpha,
                    norm,
                )
                .unwrap()
                .loss;
            let fd = (lp - lm) / step;
            let g = out.token_weights[t] as f64;
            assert!(
                (fd - g).abs() <= 1e-5 * (1.0 + g.abs()),
                "{} token {t}: finite difference {fd} vs g_t {g}",
                loss.name()
            );
        }
    }

    #[test]
    fn finite_differences_match_token_weights() {
        // Lengths 3, 1, 4, 2 (10 tokens); advantages of both signs and one zero.
        let layout = TokenLayout::from_lengths(&[3, 1, 4, 2]);
        let logp = [
            -0.5f32, -1.3, -2.0, -0.05, -0.9, -3.1, -0.2, -1.7, -0.6, -1.1,
        ];
        // logp − old per token: ratios e^d. With ε = 0.2 / 0.28:
        //  seq 0 (Â = 0.8):  d = [0, 0.4 (ρ 1.49, high-clipped), −0.5 (ρ 0.61, not clipped)]
        //  seq 1 (Â = −1.2): d = [−0.6 (ρ 0.55, low-clipped)]
        //  seq 2 (Â = −0.3): d = [0.35 (ρ 1.42, not clipped), 0.1, −0.1, −0.4 (ρ 0.67, clipped)]
        //  seq 3 (Â = 0):    d = [0.5, −0.5]
        let d = [0.0f32, 0.4, -0.5, -0.6, 0.35, 0.1, -0.1, -0.4, 0.5, -0.5];
        let old: Vec<f32> = logp.iter().zip(d).map(|(l, d)| l - d).collect();
        let reference: Vec<f32> = logp
            .iter()
            .enumerate()
            .map(|(i, l)| l + 0.3 * ((i as f32) - 4.5) / 4.5)
            .collect();
        let tokens = PolicyTokens {
            layout: &layout,
            logp: &logp,
            old_logp: Some(&old),
            ref_logp: Some(&reference),
            advantages: &[0.8, -1.2, -0.3, 0.0],
        };
        let mut losses = vec![PolicyLoss::Gpg(GpgLoss::default())];
        for aggregation in LossAggregation::ALL {
            losses.push(PolicyLoss::Grpo(ClippedSurrogate {
                epsilon_low: 0.2,
                epsilon_high: 0.28,
                beta: 0.04,
                aggregation,
                max_completion_length: Some(6),
            }));
        }
        losses.push(PolicyLoss::DrGrpo(DrGrpoLoss {
            beta: 0.1,
            ..DrGrpoLoss::new(6)
        }));
        for loss in &losses {
            check_finite_differences(loss, &tokens, 1.7);
        }
        // The chosen points exercise both the clipped and the unclipped branches.
        let out = losses[1]
            .compute(&tokens, 1.0, Normaliser::micro_batch(&layout))
            .unwrap();
        assert_close(out.metrics.clip_fraction_high.unwrap(), 0.1, 1e-12, "high");
        assert_close(out.metrics.clip_fraction_low.unwrap(), 0.2, 1e-12, "low");
    }
}
