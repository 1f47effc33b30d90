//! Group-relative advantage estimators: rewards (group by group) → one advantage per completion.
//!
//! | name      | Â_i                                   | used by                      |
//! |-----------|---------------------------------------|------------------------------|
//! | `gpg`     | r_i − mean(group)                     | GPG (F_norm = 1, default)    |
//! | `gpg-std` | (r_i − mean(group)) / (std + 1e-4)    | GPG, F_norm = std variant    |
//! | `grpo`    | (r_i − mean(group)) / (std + 1e-4)    | GRPO (TRL `scale_rewards`)   |
//! | `dr-grpo` | r_i − mean(group)                     | Dr.GRPO                      |
//!
//! std is the unbiased group standard deviation (divide by G − 1), as torch's `Tensor.std()`
//! used by TRL and by the GPG reference; ε = 1e-4 is TRL's and the reference's constant.
//! `gpg`/`dr-grpo` and `gpg-std`/`grpo` compute the same numbers; they are separate names so
//! that a run's config says which method it reproduces.
//!
//! Groups whose rewards are identical (see [`super::groups::is_identical`]) get advantage
//! exactly 0 for every member (the float expression r − mean may otherwise leave ~1e-8
//! residues, which the std variants would amplify).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};

use super::groups::{group_mean, group_std_unbiased, is_identical, RewardGroups};

/// ε added to the group std by the std-normalised estimators (TRL and the GPG reference).
pub const STD_EPSILON: f64 = 1e-4;

/// A registered advantage estimator, selected by name in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdvantageEstimator {
    /// Â = r − mean(group) (GPG, F_norm = 1).
    Gpg,
    /// Â = (r − mean(group)) / (std(group) + 1e-4) (GPG, F_norm = std).
    GpgStd,
    /// Â = (r − mean(group)) / (std(group) + 1e-4) (GRPO).
    Grpo,
    /// Â = r − mean(group) (Dr.GRPO).
    DrGrpo,
}

impl AdvantageEstimator {
    /// Every estimator, in the order listed in errors and help.
    pub const ALL: [AdvantageEstimator; 4] = [Self::Gpg, Self::GpgStd, Self::Grpo, Self::DrGrpo];

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gpg => "gpg",
            Self::GpgStd => "gpg-std",
            Self::Grpo => "grpo",
            Self::DrGrpo => "dr-grpo",
        }
    }

    /// Whether the estimator divides by the group std.
    pub fn scales_by_std(self) -> bool {
        matches!(self, Self::GpgStd | Self::Grpo)
    }

    /// One advantage per completion, in the rewards' group-by-group order.
    /// The std variants need G ≥ 2 (a single completion has no std).
    pub fn compute(self, groups: &RewardGroups<'_>) -> Result<Vec<f32>> {
        if self.scales_by_std() {
            group_standardised(groups, STD_EPSILON)
        } else {
            Ok(group_centered(groups))
        }
    }
}

impl fmt::Display for AdvantageEstimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AdvantageEstimator {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        match Self::ALL.into_iter().find(|e| e.name() == wanted) {
            Some(e) => Ok(e),
            None => {
                let names: Vec<&str> = Self::ALL.iter().map(|e| e.name()).collect();
                bail!(
                    "unknown advantage estimator {s:?}; expected one of: {}",
                    names.join(", ")
                )
            }
        }
    }
}

/// Â_i = r_i − mean(group) (mean in f64). 0 for every member of an identical group.
pub fn group_centered(groups: &RewardGroups<'_>) -> Vec<f32> {
    let mut out = Vec::with_capacity(groups.rewards().len());
    for group in groups.iter() {
        if is_identical(group) {
            out.extend(std::iter::repeat_n(0.0, group.len()));
            continue;
        }
        let mean = group_mean(group);
        out.extend(group.iter().map(|&r| (r as f64 - mean) as f32));
    }
    out
}

/// Â_i = (r_i − mean(group)) / (std_unbiased(group) + eps). 0 for every member of an identical
/// group. Errors when G < 2 (no std).
pub fn group_standardised(groups: &RewardGroups<'_>, eps: f64) -> Result<Vec<f32>> {
    ensure!(
        groups.group_size() >= 2,
        "std-normalised advantages need at least 2 completions per prompt, got {}",
        groups.group_size()
    );
    let mut out = Vec::with_capacity(groups.rewards().len());
    for group in groups.iter() {
        if is_identical(group) {
            out.extend(std::iter::repeat_n(0.0, group.len()));
            continue;
        }
        let mean = group_mean(group);
        let std = group_std_unbiased(group).unwrap_or(0.0);
        out.extend(
            group
                .iter()
                .map(|&r| ((r as f64 - mean) / (std + eps)) as f32),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!((x as f64 - y).abs() <= tol, "index {i}: {x} vs {y}");
        }
    }

    #[test]
    fn names_round_trip_and_errors_list_names() {
        for e in AdvantageEstimator::ALL {
            assert_eq!(e.to_string().parse::<AdvantageEstimator>().unwrap(), e);
        }
        assert_eq!(
            "dr_grpo".parse::<AdvantageEstimator>().unwrap(),
            AdvantageEstimator::DrGrpo
        );
        let err = "ppo".parse::<AdvantageEstimator>().unwrap_err().to_string();
        assert!(err.contains("gpg, gpg-std, grpo, dr-grpo"), "{err}");
        let json = serde_json::to_string(&AdvantageEstimator::GpgStd).unwrap();
        assert_eq!(json, "\"gpg-std\"");
    }

    #[test]
    fn gpg_centered_by_hand() {
        // group 1 = [1, 0, 0, 1]: mean 0.5 → [0.5, −0.5, −0.5, 0.5]
        // group 2 = [1, 0, 0, 0]: mean 0.25 → [0.75, −0.25, −0.25, −0.25]
        // group 3 = [1, 1, 1, 1]: identical → 0
        let r = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let g = RewardGroups::new(&r, 4).unwrap();
        let expected = [
            0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0,
        ];
        for est in [AdvantageEstimator::Gpg, AdvantageEstimator::DrGrpo] {
            close(&est.compute(&g).unwrap(), &expected, 1e-7);
        }
    }

    #[test]
    fn grpo_standardised_by_hand() {
        // group 1 = [1, 0, 0, 1]: mean 0.5, std_unbiased = sqrt(1/3) = 0.577350;
        //   Â = ±0.5 / (0.577350 + 1e-4) = ±0.865875
        // group 2 = [1, 0, 0, 0]: mean 0.25, dev² = 0.5625 + 3 × 0.0625 = 0.75, /3 = 0.25,
        //   std = 0.5; Â = 0.75 / 0.5001 = 1.499700, −0.25 / 0.5001 = −0.499900
        // group 3 = [0.3, 0.3, 0.3, 0.3]: identical → 0 (no 0/1e-4 blow-up)
        let r = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3];
        let g = RewardGroups::new(&r, 4).unwrap();
        let a = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
        let expected = [
            a,
            -a,
            -a,
            a,
            0.75 / 0.5001,
            -0.25 / 0.5001,
            -0.25 / 0.5001,
            -0.25 / 0.5001,
            0.0,
            0.0,
            0.0,
            0.0,
        ];
        assert!((a - 0.865875).abs() < 1e-6);
        for est in [AdvantageEstimator::Grpo, AdvantageEstimator::GpgStd] {
            close(&est.compute(&g).unwrap(), &expected, 1e-6);
        }
    }

    #[test]
    fn std_variants_need_two_completions() {
        let g = RewardGroups::new(&[1.0, 0.0], 1).unwrap();
        assert!(AdvantageEstimator::Grpo.compute(&g).is_err());
        // G = 1: every group is identical, advantages 0.
        assert_eq!(AdvantageEstimator::Gpg.compute(&g).unwrap(), vec![0.0, 0.0]);
    }
}
