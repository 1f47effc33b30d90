//! β_th resampling: keep sampling prompts until enough groups carry gradient.
//!
//! [`GroupPool`] is a pure state machine that the trainer drives: it samples a round of B
//! prompts × G completions, scores them, hands the round to [`GroupPool::add_round`], and
//! samples another round while the answer is [`PoolStatus::SampleMore`]. Then
//! [`GroupPool::finish`] assembles the batch to train on.
//!
//! # Semantics (matched to the GPG reference, `GPGTrainer._generate_and_score_completions`)
//!
//! * `n_valid_seen` counts the valid groups (rewards not all identical, see
//!   [`super::groups::is_identical`]) over all rounds so far; the reference's `n_valid_samples`.
//! * After each round: if `n_valid_seen ≥ β_th · B` the batch is ready (reference: keep
//!   generating while `n_valid_samples < min_inverse_alpha * num_samples`). β_th = 0 is
//!   therefore "never resample". The number of rounds is bounded by `max_rounds` (the
//!   reference's `max_gen = 20`); evaluation uses one round ([`ResampleConfig::off`]).
//! * The assembled batch is: the valid groups in arrival order (oldest round first), truncated
//!   to B, then the *latest* round's identical groups to fill up to B (reference:
//!   `merge(identical, new)[:len(prompts)]`, whose `merge(a, b)` puts `b` first). If each round
//!   has B groups the batch always has exactly B groups: the latest round's valid plus
//!   identical groups alone make B.
//! * inverse_alpha = min(1, n_valid_in_batch / n_groups_in_batch), α = 1/inverse_alpha; with a
//!   full batch this equals the reference's `min(1, n_valid_samples / num_samples)`, because
//!   the batch holds min(n_valid_seen, B) valid groups. No valid group at all gives
//!   [`AgeScale::SkipUpdate`].
//!
//! * The reference logs the identical/easy/hard counts of the *last* round; the trainer can
//!   compute [`super::GroupStats`] of any round, or of the assembled batch via
//!   [`ResampledBatch::rewards`].
//!
//! Deliberate differences: when `max_rounds` is reached below the threshold the reference
//! aborts (`assert n_gen < max_gen`, which also fires when the threshold is first met in the
//! last allowed round); here the batch is assembled from what was gathered and reported with
//! `threshold_met = false`, and the trainer decides. Invalid groups of earlier rounds are
//! dropped (as in the reference); only the latest round's are kept, to fill the batch.

use anyhow::{ensure, Result};

use super::groups::{age_scale, is_identical, AgeScale};

/// β_th resampling parameters (a config section).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResampleConfig {
    /// β_th: the share of valid groups a batch needs, in [0, 1] (reference flag
    /// `min_inverse_alpha`, default 0.5 there; 0.6 in the paper's best row; 0 = off).
    pub min_valid_share: f64,
    /// The most sampling rounds per batch, the first included (reference: 20).
    pub max_rounds: usize,
}

impl Default for ResampleConfig {
    fn default() -> Self {
        Self {
            min_valid_share: 0.5,
            max_rounds: 20,
        }
    }
}

impl ResampleConfig {
    /// No resampling: one round, whatever its share of valid groups (evaluation, plain GRPO).
    pub fn off() -> Self {
        Self {
            min_valid_share: 0.0,
            max_rounds: 1,
        }
    }

    /// Checks 0 ≤ β_th ≤ 1 and max_rounds ≥ 1.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.min_valid_share),
            "min_valid_share (β_th) must be in [0, 1], got {}",
            self.min_valid_share
        );
        ensure!(self.max_rounds >= 1, "max_rounds must be at least 1");
        Ok(())
    }
}

/// One prompt's group: its G rewards and whatever the trainer needs to train on it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredGroup<T> {
    /// The G rewards.
    pub rewards: Vec<f32>,
    /// The trainer's data for this group (completions, token ids, old log-probs, ...).
    pub payload: T,
}

impl<T> ScoredGroup<T> {
    /// Whether the group carries gradient (rewards not all identical).
    pub fn is_valid(&self) -> bool {
        !is_identical(&self.rewards)
    }
}

/// What the trainer should do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolStatus {
    /// Below β_th and rounds remain: sample another round of B prompts.
    SampleMore,
    /// Call [`GroupPool::finish`]; `threshold_met` is false when `max_rounds` ran out first.
    Ready {
        /// Whether n_valid_seen ≥ β_th · B.
        threshold_met: bool,
    },
}

/// The batch to train on, with the numbers the trainer logs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResampledBatch<T> {
    /// Valid groups first (arrival order), then the latest round's identical groups.
    pub groups: Vec<ScoredGroup<T>>,
    /// Sampling rounds used, the first included.
    pub rounds_used: usize,
    /// Valid groups seen over all rounds (may exceed B).
    pub n_valid_seen: usize,
    /// Valid groups in `groups`.
    pub n_valid_in_batch: usize,
    /// Whether the β_th threshold was reached.
    pub threshold_met: bool,
    /// α for this batch, or skip the update when no group is valid.
    pub scale: AgeScale,
}

impl<T> ResampledBatch<T> {
    /// All rewards of the batch, group by group (for advantages and [`super::GroupStats`]).
    pub fn rewards(&self) -> Vec<f32> {
        self.groups
            .iter()
            .flat_map(|g| g.rewards.iter().copied())
            .collect()
    }
}

/// Accumulates scored rounds until the share of valid groups reaches β_th (see module docs).
#[derive(Debug, Clone)]
pub struct GroupPool<T> {
    config: ResampleConfig,
    batch_groups: usize,
    group_size: usize,
    valid: Vec<ScoredGroup<T>>,
    latest_identical: Vec<ScoredGroup<T>>,
    n_valid_seen: usize,
    rounds: usize,
    status: Option<PoolStatus>,
}

impl<T> GroupPool<T> {
    /// A pool for batches of `batch_groups` (B) prompts with `group_size` (G) completions each.
    pub fn new(config: ResampleConfig, batch_groups: usize, group_size: usize) -> Result<Self> {
        config.validate()?;
        ensure!(batch_groups >= 1, "a batch needs at least one group");
        ensure!(group_size >= 1, "a group needs at least one completion");
        Ok(Self {
            config,
            batch_groups,
            group_size,
            valid: Vec::new(),
            latest_identical: Vec::new(),
            n_valid_seen: 0,
            rounds: 0,
            status: None,
        })
    }

    /// Rounds added so far.
    pub fn rounds_used(&self) -> usize {
        self.rounds
    }

    /// Valid groups seen so far.
    pub fn n_valid_seen(&self) -> usize {
        self.n_valid_seen
    }

    /// Whether `n_valid` valid groups meet β_th for a batch of B: n_valid ≥ β_th · B.
    pub fn threshold_met(&self, n_valid: usize) -> bool {
        n_valid as f64 >= self.config.min_valid_share * self.batch_groups as f64
    }

    /// Adds one scored round (normally B groups). Errors if a group does not have G rewards,
    /// if a reward is not finite, or if the pool already answered `Ready`.
    pub fn add_round(&mut self, groups: Vec<ScoredGroup<T>>) -> Result<PoolStatus> {
        ensure!(
            !matches!(self.status, Some(PoolStatus::Ready { .. })),
            "the pool is ready: call finish() instead of adding round {}",
            self.rounds + 1
        );
        for (g, group) in groups.iter().enumerate() {
            ensure!(
                group.rewards.len() == self.group_size,
                "round {}, group {g}: {} rewards, expected {}",
                self.rounds + 1,
                group.rewards.len(),
                self.group_size
            );
            ensure!(
                group.rewards.iter().all(|r| r.is_finite()),
                "round {}, group {g}: non-finite reward in {:?}",
                self.rounds + 1,
                group.rewards
            );
        }
        self.rounds += 1;
        self.latest_identical.clear();
        for group in groups {
            if group.is_valid() {
                self.n_valid_seen += 1;
                self.valid.push(group);
            } else {
                self.latest_identical.push(group);
            }
        }
        let met = self.threshold_met(self.n_valid_seen);
        let status = if met || self.rounds >= self.config.max_rounds {
            PoolStatus::Ready { threshold_met: met }
        } else {
            PoolStatus::SampleMore
        };
        self.status = Some(status);
        Ok(status)
    }

    /// Assembles the batch: valid groups (arrival order, at most B), then the latest round's
    /// identical groups up to B; α over that batch.
    pub fn finish(self) -> ResampledBatch<T> {
        let threshold_met = self.threshold_met(self.n_valid_seen);
        let mut groups = self.valid;
        groups.truncate(self.batch_groups);
        let n_valid_in_batch = groups.len();
        let room = self.batch_groups - n_valid_in_batch;
        groups.extend(self.latest_identical.into_iter().take(room));
        let scale = age_scale(n_valid_in_batch, groups.len());
        ResampledBatch {
            groups,
            rounds_used: self.rounds,
            n_valid_seen: self.n_valid_seen,
            n_valid_in_batch,
            threshold_met,
            scale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group named `id`: valid (rewards [1, 0]) or identical ([0, 0]).
    fn group(id: &str, valid: bool) -> ScoredGroup<String> {
        ScoredGroup {
            rewards: if valid {
                vec![1.0, 0.0]
            } else {
                vec![0.0, 0.0]
            },
            payload: id.to_string(),
        }
    }

    fn ids(batch: &ResampledBatch<String>) -> Vec<&str> {
        batch.groups.iter().map(|g| g.payload.as_str()).collect()
    }

    #[test]
    fn threshold_met_in_first_round_reorders_valid_first() {
        // B = 4, β = 0.5: 2 valid ≥ 0.5·4 = 2 → ready after one round.
        let cfg = ResampleConfig {
            min_valid_share: 0.5,
            max_rounds: 20,
        };
        let mut pool = GroupPool::new(cfg, 4, 2).unwrap();
        let status = pool
            .add_round(vec![
                group("a", false),
                group("b", true),
                group("c", false),
                group("d", true),
            ])
            .unwrap();
        assert_eq!(
            status,
            PoolStatus::Ready {
                threshold_met: true
            }
        );
        let batch = pool.finish();
        assert_eq!(ids(&batch), ["b", "d", "a", "c"]);
        assert_eq!(batch.rounds_used, 1);
        assert_eq!(batch.n_valid_in_batch, 2);
        // inverse_alpha = 2/4 = 0.5, α = 2
        assert_eq!(
            batch.scale,
            AgeScale::Scale {
                inverse_alpha: 0.5,
                alpha: 2.0
            }
        );
    }

    #[test]
    fn resamples_until_threshold_and_replaces_invalid_groups() {
        // B = 4, β = 0.75 → need 3 valid. Round 1: 1 valid (a1) → 1 < 3, more.
        // Round 2: 1 valid (b2) → 2 < 3, more. Round 3: 2 valid (c1, c3) → 4 ≥ 3, ready.
        // Batch: valid in arrival order a1, b2, c1, c3 (4 = B, truncation leaves no room);
        // inverse_alpha = min(1, 4/4) = 1 (reference: min(1, n_valid_seen 4 / 4) = 1).
        let cfg = ResampleConfig {
            min_valid_share: 0.75,
            max_rounds: 20,
        };
        let mut pool = GroupPool::new(cfg, 4, 2).unwrap();
        let r1 = vec![
            group("a0", false),
            group("a1", true),
            group("a2", false),
            group("a3", false),
        ];
        let r2 = vec![
            group("b0", false),
            group("b1", false),
            group("b2", true),
            group("b3", false),
        ];
        let r3 = vec![
            group("c0", false),
            group("c1", true),
            group("c2", false),
            group("c3", true),
        ];
        assert_eq!(pool.add_round(r1).unwrap(), PoolStatus::SampleMore);
        assert_eq!(pool.add_round(r2).unwrap(), PoolStatus::SampleMore);
        assert_eq!(
            pool.add_round(r3).unwrap(),
            PoolStatus::Ready {
                threshold_met: true
            }
        );
        let batch = pool.finish();
        assert_eq!(ids(&batch), ["a1", "b2", "c1", "c3"]);
        assert_eq!(batch.rounds_used, 3);
        assert_eq!(batch.n_valid_seen, 4);
        assert_eq!(batch.scale.alpha(), Some(1.0));
    }

    #[test]
    fn partial_fill_uses_latest_identical_groups() {
        // B = 4, β = 0.5 → need 2. Round 1: 1 valid (x1). Round 2: 1 valid (y0) → 2, ready.
        // Batch: x1, y0, then the latest round's identical y1, y2. inverse_alpha = 2/4 = 0.5.
        let cfg = ResampleConfig {
            min_valid_share: 0.5,
            max_rounds: 20,
        };
        let mut pool = GroupPool::new(cfg, 4, 2).unwrap();
        let r1 = vec![
            group("x0", false),
            group("x1", true),
            group("x2", false),
            group("x3", false),
        ];
        let r2 = vec![
            group("y0", true),
            group("y1", false),
            group("y2", false),
            group("y3", false),
        ];
        assert_eq!(pool.add_round(r1).unwrap(), PoolStatus::SampleMore);
        assert!(matches!(
            pool.add_round(r2).unwrap(),
            PoolStatus::Ready { .. }
        ));
        let batch = pool.finish();
        assert_eq!(ids(&batch), ["x1", "y0", "y1", "y2"]);
        assert_eq!(batch.rewards(), [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(batch.scale.inverse_alpha(), Some(0.5));
    }

    #[test]
    fn max_rounds_and_skip() {
        // β = 1, 3 rounds allowed, never a valid group: ready after 3 rounds, threshold not
        // met, nothing to train on → skip.
        let cfg = ResampleConfig {
            min_valid_share: 1.0,
            max_rounds: 3,
        };
        let mut pool = GroupPool::new(cfg, 2, 2).unwrap();
        for round in 1..=3 {
            let status = pool
                .add_round(vec![group("p", false), group("q", false)])
                .unwrap();
            if round < 3 {
                assert_eq!(status, PoolStatus::SampleMore);
            } else {
                assert_eq!(
                    status,
                    PoolStatus::Ready {
                        threshold_met: false
                    }
                );
            }
        }
        assert!(pool.add_round(vec![group("r", true)]).is_err());
        let batch = pool.finish();
        assert_eq!(batch.groups.len(), 2);
        assert!(!batch.threshold_met);
        assert_eq!(batch.scale, AgeScale::SkipUpdate);
    }

    #[test]
    fn off_never_resamples() {
        let mut pool = GroupPool::new(ResampleConfig::off(), 2, 2).unwrap();
        let status = pool
            .add_round(vec![group("a", false), group("b", false)])
            .unwrap();
        assert_eq!(
            status,
            PoolStatus::Ready {
                threshold_met: true
            }
        );
        assert_eq!(pool.finish().scale, AgeScale::SkipUpdate);
    }

    #[test]
    fn bad_input() {
        assert!(GroupPool::<()>::new(
            ResampleConfig {
                min_valid_share: 1.5,
                max_rounds: 2
            },
            2,
            2
        )
        .is_err());
        assert!(GroupPool::<()>::new(ResampleConfig::default(), 0, 2).is_err());
        let mut pool = GroupPool::new(ResampleConfig::default(), 2, 3).unwrap();
        assert!(pool.add_round(vec![group("a", true)]).is_err());
        let cfg: ResampleConfig = serde_json::from_str(r#"{"min_valid_share":0.6}"#).unwrap();
        assert_eq!(cfg.max_rounds, 20);
        assert!(serde_json::from_str::<ResampleConfig>(r#"{"beta_th":0.6}"#).is_err());
    }
}
