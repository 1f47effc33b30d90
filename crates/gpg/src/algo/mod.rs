//! Advantage estimators and policy losses, as pure functions over f32.
//!
//! Everything the paper's equations say lives here, in small functions checked by hand:
//!
//! * [`groups`]: rewards laid out group by group (B prompts × G completions), the identical-
//!   reward test, per-batch group statistics and GPG's gradient scale α = B / (B − M)
//!   ([`AgeScale`], with an explicit "skip the update" when no group is valid);
//! * [`advantages`]: the registered advantage estimators ([`AdvantageEstimator`]: `gpg`,
//!   `gpg-std`, `grpo`, `dr-grpo`);
//! * [`resample`]: β_th resampling as a state machine the trainer drives ([`GroupPool`]);
//! * [`layout`]: where each completion's tokens sit in a flat per-token vector;
//! * [`objective`]: the policy objectives' equations, each turning per-token log-probs into a
//!   loss value and the per-token weights g_t = ∂L/∂logp_t from which the engine computes
//!   parameter gradients;
//! * [`policy_loss`]: the registry of objectives ([`PolicyLoss`]: `gpg`, `grpo`, `dr-grpo`)
//!   that a config selects by name.
//!
//! One step, as the trainer uses this module:
//!
//! ```text
//! rewards ─► GroupPool (β_th rounds) ─► AdvantageEstimator::compute ─► Â_i
//! engine forward (logp_t) + Â_i + α + Normaliser ─► PolicyLoss::compute ─► loss, g_t ─► engine backward
//! ```
//!
//! Names are registered as enum variants with `FromStr`/`Display` and serde names, so a config
//! selects an estimator or an objective by name and an unknown name is an error listing the
//! known ones.

pub mod advantages;
pub mod groups;
pub mod layout;
pub mod objective;
pub mod policy_loss;
pub mod resample;

pub use advantages::AdvantageEstimator;
pub use groups::{age_scale, AgeScale, GroupStats, RewardGroups};
pub use layout::TokenLayout;
pub use objective::{
    ClipSide, ClippedSurrogate, LossAggregation, Normaliser, ObjectiveMetrics, ObjectiveOutput,
    PolicyTokens,
};
pub use policy_loss::{DrGrpoLoss, GpgLoss, PolicyLoss};
pub use resample::{GroupPool, PoolStatus, ResampleConfig, ResampledBatch, ScoredGroup};
