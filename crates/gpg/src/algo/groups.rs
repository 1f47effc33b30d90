//! Rewards laid out group by group, group statistics, and GPG's gradient scale α.
//!
//! A batch holds B prompts with G completions each. Rewards are one flat slice laid out group
//! by group: `rewards[g * G + i]` is the reward of completion `i` of prompt `g`.
//!
//! # Identical-reward groups
//!
//! A group is *identical* (invalid, zero-advantage) when
//! `max(rewards) − min(rewards) ≤ IDENTICAL_REWARD_TOLERANCE` (= 1e-6). It is *valid* otherwise.
//! The reference implementation tests `std == 0` in float arithmetic; the tolerance makes the
//! test robust to rewards such as 0.1 + 0.2 that should compare equal, and is far below any
//! reward difference a verifier produces. Every function in [`crate::algo`] uses this one
//! definition, and the advantage estimators set the advantage of an identical group to exactly
//! zero so that "invalid" and "carries no gradient" always coincide.
//!
//! # α (Accurate Gradient Estimation)
//!
//! With M identical groups among B, GPG scales the loss by α = B / (B − M). The reference
//! computes `inverse_alpha = min(1, n_valid / n_groups)` and divides the loss by it. When no
//! group is valid there is no gradient at all and the update must be skipped: see
//! [`AgeScale::SkipUpdate`].

use anyhow::{bail, ensure, Result};

/// Two rewards closer than this (max − min over a group) count as identical.
pub const IDENTICAL_REWARD_TOLERANCE: f32 = 1e-6;

/// A flat reward slice viewed as B groups of G rewards each (group by group).
///
/// Invariants (checked by [`RewardGroups::new`]): G ≥ 1, `rewards.len()` is a multiple of G,
/// every reward is finite.
#[derive(Debug, Clone, Copy)]
pub struct RewardGroups<'a> {
    rewards: &'a [f32],
    group_size: usize,
}

impl<'a> RewardGroups<'a> {
    /// Views `rewards` as groups of `group_size`; errors on a ragged layout or a non-finite reward.
    pub fn new(rewards: &'a [f32], group_size: usize) -> Result<Self> {
        ensure!(
            group_size >= 1,
            "group size (completions per prompt) must be at least 1"
        );
        ensure!(
            rewards.len().checked_rem(group_size) == Some(0),
            "{} rewards do not form whole groups of {} completions",
            rewards.len(),
            group_size
        );
        if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
            bail!(
                "reward {} (group {}, completion {}) is not finite: {}",
                i,
                i / group_size,
                i % group_size,
                rewards[i]
            );
        }
        Ok(Self {
            rewards,
            group_size,
        })
    }

    /// G, the number of completions per prompt.
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// B, the number of groups (prompts).
    pub fn n_groups(&self) -> usize {
        self.rewards.len() / self.group_size
    }

    /// All rewards, group by group.
    pub fn rewards(&self) -> &'a [f32] {
        self.rewards
    }

    /// The rewards of group `g`.
    pub fn group(&self, g: usize) -> &'a [f32] {
        &self.rewards[g * self.group_size..(g + 1) * self.group_size]
    }

    /// The groups in order.
    pub fn iter(&self) -> std::slice::ChunksExact<'a, f32> {
        self.rewards.chunks_exact(self.group_size)
    }
}

/// True when the group's rewards are all equal: `max − min ≤ IDENTICAL_REWARD_TOLERANCE`.
/// An empty group counts as identical (it carries no gradient).
pub fn is_identical(group: &[f32]) -> bool {
    let Some(&first) = group.first() else {
        return true;
    };
    let (lo, hi) = group
        .iter()
        .fold((first, first), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    hi - lo <= IDENTICAL_REWARD_TOLERANCE
}

/// Mean of the group, accumulated in f64. Zero for an empty group.
pub fn group_mean(group: &[f32]) -> f64 {
    if group.is_empty() {
        return 0.0;
    }
    group.iter().map(|&r| r as f64).sum::<f64>() / group.len() as f64
}

/// Unbiased standard deviation sqrt(Σ (r − mean)² / (n − 1)), as torch's `Tensor.std()`.
/// `None` for fewer than two rewards (torch returns NaN there).
pub fn group_std_unbiased(group: &[f32]) -> Option<f64> {
    if group.len() < 2 {
        return None;
    }
    let mean = group_mean(group);
    let sum_sq: f64 = group.iter().map(|&r| (r as f64 - mean).powi(2)).sum();
    Some((sum_sq / (group.len() - 1) as f64).sqrt())
}

/// Reward of a correct completion for the easy/hard counts (the reference tests `mean == 1`).
pub const ALL_CORRECT_REWARD: f32 = 1.0;
/// Reward of a wrong completion for the easy/hard counts (the reference tests `mean == 0`).
pub const ALL_WRONG_REWARD: f32 = 0.0;

/// Per-batch group statistics, the numbers the reference logs each step.
///
/// `n_valid + n_identical == n_groups`. Easy groups (every reward equal to 1, "all correct")
/// and hard groups (every reward equal to 0, "all wrong") are subsets of the identical groups,
/// with equality up to [`IDENTICAL_REWARD_TOLERANCE`]. The reference tests `mean == 1` and
/// `mean == 0`, which is the same thing for rewards in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupStats {
    /// B, groups in the batch.
    pub n_groups: usize,
    /// Groups whose rewards are not all equal (they carry gradient).
    pub n_valid: usize,
    /// Groups whose rewards are all equal (M in α = B / (B − M)).
    pub n_identical: usize,
    /// Identical groups with every reward 1 (all correct).
    pub n_easy: usize,
    /// Identical groups with every reward 0 (all wrong).
    pub n_hard: usize,
    /// Mean reward over all completions.
    pub reward_mean: f64,
    /// Unbiased std of the rewards over all completions (TRL's `reward_std`); 0 for fewer than
    /// two.
    pub reward_std: f64,
    /// Mean over groups of the group's unbiased reward std (the reference's `reward_std`);
    /// 0 when G < 2.
    pub reward_std_mean: f64,
}

impl GroupStats {
    /// Statistics of a batch of groups.
    pub fn of(groups: &RewardGroups<'_>) -> Self {
        let mut stats = GroupStats {
            n_groups: groups.n_groups(),
            n_valid: 0,
            n_identical: 0,
            n_easy: 0,
            n_hard: 0,
            reward_mean: group_mean(groups.rewards()),
            reward_std: group_std_unbiased(groups.rewards()).unwrap_or(0.0),
            reward_std_mean: 0.0,
        };
        let mut std_sum = 0.0;
        for group in groups.iter() {
            if is_identical(group) {
                stats.n_identical += 1;
                let all_at = |v: f32| {
                    group
                        .iter()
                        .all(|&r| (r - v).abs() <= IDENTICAL_REWARD_TOLERANCE)
                };
                if all_at(ALL_CORRECT_REWARD) {
                    stats.n_easy += 1;
                } else if all_at(ALL_WRONG_REWARD) {
                    stats.n_hard += 1;
                }
            } else {
                stats.n_valid += 1;
            }
            std_sum += group_std_unbiased(group).unwrap_or(0.0);
        }
        if stats.n_groups > 0 {
            stats.reward_std_mean = std_sum / stats.n_groups as f64;
        }
        stats
    }

    /// Share of valid groups, n_valid / n_groups (0 for an empty batch).
    pub fn valid_share(&self) -> f64 {
        if self.n_groups == 0 {
            0.0
        } else {
            self.n_valid as f64 / self.n_groups as f64
        }
    }

    /// GPG's gradient scale for this batch: see [`age_scale`].
    pub fn age_scale(&self) -> AgeScale {
        age_scale(self.n_valid, self.n_groups)
    }
}

/// The outcome of Accurate Gradient Estimation for one batch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AgeScale {
    /// Update with the loss multiplied by `alpha` = 1 / `inverse_alpha`.
    Scale {
        /// min(1, n_valid / n_groups) ∈ (0, 1].
        inverse_alpha: f32,
        /// α = 1 / inverse_alpha = B / (B − M) ≥ 1.
        alpha: f32,
    },
    /// No valid group: the batch carries no gradient, skip the optimiser step.
    SkipUpdate,
}

impl AgeScale {
    /// α, or `None` when the update must be skipped.
    pub fn alpha(&self) -> Option<f32> {
        match *self {
            AgeScale::Scale { alpha, .. } => Some(alpha),
            AgeScale::SkipUpdate => None,
        }
    }

    /// 1/α, or `None` when the update must be skipped.
    pub fn inverse_alpha(&self) -> Option<f32> {
        match *self {
            AgeScale::Scale { inverse_alpha, .. } => Some(inverse_alpha),
            AgeScale::SkipUpdate => None,
        }
    }
}

/// inverse_alpha = min(1, n_valid / n_groups), α = 1 / inverse_alpha;
/// [`AgeScale::SkipUpdate`] when `n_valid == 0` or `n_groups == 0` (never a division by zero).
///
/// `n_valid` may exceed `n_groups` when it counts valid groups accumulated over resampling
/// rounds (as the reference does); the cap keeps α ≥ 1.
pub fn age_scale(n_valid: usize, n_groups: usize) -> AgeScale {
    if n_valid == 0 || n_groups == 0 {
        return AgeScale::SkipUpdate;
    }
    let inverse_alpha = (n_valid as f64 / n_groups as f64).min(1.0);
    AgeScale::Scale {
        inverse_alpha: inverse_alpha as f32,
        alpha: (1.0 / inverse_alpha) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_checked() {
        assert!(RewardGroups::new(&[1.0, 0.0, 1.0], 2).is_err());
        assert!(RewardGroups::new(&[1.0, 0.0], 0).is_err());
        assert!(RewardGroups::new(&[1.0, f32::NAN], 2).is_err());
        let g = RewardGroups::new(&[1.0, 0.0, 0.5, 0.5], 2).unwrap();
        assert_eq!(g.n_groups(), 2);
        assert_eq!(g.group(1), &[0.5, 0.5]);
    }

    #[test]
    fn identical_uses_the_tolerance() {
        assert!(is_identical(&[1.0, 1.0, 1.0]));
        // 0.1 + 0.2 in f32 is 0.3 + 1 ulp-ish: equal within 1e-6.
        assert!(is_identical(&[0.1 + 0.2, 0.3]));
        assert!(is_identical(&[0.5, 0.5 + 1e-7]));
        assert!(!is_identical(&[0.5, 0.5 + 1e-5]));
        assert!(!is_identical(&[0.0, 1.0]));
        assert!(is_identical(&[]));
    }

    #[test]
    fn mean_and_unbiased_std_by_hand() {
        // [1, 0, 0, 1]: mean 0.5; squared deviations 4 × 0.25 = 1; / (4 − 1) → 1/3; sqrt = 0.57735.
        let g = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(group_mean(&g), 0.5);
        assert!((group_std_unbiased(&g).unwrap() - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(group_std_unbiased(&[1.0]), None);
    }

    #[test]
    fn stats_by_hand() {
        // Groups (G = 3): [1,1,1] easy, [0,0,0] hard, [1,0,0] valid, [0.5,0.5,0.5] identical.
        let rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5];
        let s = GroupStats::of(&RewardGroups::new(&rewards, 3).unwrap());
        assert_eq!(s.n_groups, 4);
        assert_eq!(s.n_valid, 1);
        assert_eq!(s.n_identical, 3);
        assert_eq!(s.n_easy, 1);
        assert_eq!(s.n_hard, 1);
        // mean = (3 + 0 + 1 + 1.5) / 12 = 5.5 / 12
        assert!((s.reward_mean - 5.5 / 12.0).abs() < 1e-12);
        // batch std: Σr² = 4 + 3·0.25 = 4.75, Σ(r − mean)² = 4.75 − 12·(5.5/12)² = 4.75 − 30.25/12,
        // over n − 1 = 11
        let batch_std = ((4.75f64 - 30.25 / 12.0) / 11.0).sqrt();
        assert!((s.reward_std - batch_std).abs() < 1e-7, "{}", s.reward_std);
        // only [1,0,0] has std: mean 1/3, dev² = 4/9 + 1/9 + 1/9 = 6/9, /2 = 1/3, sqrt = 0.57735;
        // mean over 4 groups = 0.57735 / 4
        assert!((s.reward_std_mean - (1.0f64 / 3.0).sqrt() / 4.0).abs() < 1e-7);
        assert_eq!(s.valid_share(), 0.25);
        // α = B / (B − M) = 4 / (4 − 3) = 4
        assert_eq!(
            s.age_scale(),
            AgeScale::Scale {
                inverse_alpha: 0.25,
                alpha: 4.0
            }
        );
    }

    #[test]
    fn age_scale_by_hand() {
        // 6 valid of 8: inverse_alpha = 0.75, α = 8 / 6 = 1.3333
        let s = age_scale(6, 8);
        assert_eq!(s.inverse_alpha(), Some(0.75));
        assert!((s.alpha().unwrap() - 4.0 / 3.0).abs() < 1e-6);
        // accumulated over rounds beyond B: capped at 1
        assert_eq!(age_scale(11, 8).alpha(), Some(1.0));
        assert_eq!(age_scale(0, 8), AgeScale::SkipUpdate);
        assert_eq!(age_scale(0, 0), AgeScale::SkipUpdate);
        assert_eq!(age_scale(3, 0), AgeScale::SkipUpdate);
    }
}
