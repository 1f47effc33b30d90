//! Learning-rate schedules, as the `transformers` schedulers (a `LambdaLR` factor times the
//! base learning rate).
//!
//! `step` is the number of optimiser steps already taken (0 for the first update), as
//! `LambdaLR` counts, so with warm-up the very first update has learning rate 0. With W warm-up
//! steps, T total steps and s = step:
//!
//! | name                   | factor(s)                                                       |
//! |------------------------|-----------------------------------------------------------------|
//! | `constant`             | 1 (no warm-up allowed)                                          |
//! | `constant-with-warmup` | s / max(1, W) for s < W, then 1                                 |
//! | `linear`               | s / max(1, W) for s < W, then max(0, (T − s) / max(1, T − W))   |
//! | `cosine-with-min-lr`   | s / max(1, W) for s < W, then r + (1 − r) · ½ (1 + cos(π p))    |
//!
//! where p = min(1, (s − W) / max(1, T − W)) and r = `min_lr_rate` (the floor as a fraction of
//! the base lr), as transformers' `get_cosine_with_min_lr_schedule_with_warmup` with
//! num_cycles = 0.5. Difference: transformers lets p exceed 1 past T (the cosine rises again);
//! here p is capped at 1 so the rate stays at its floor.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};

/// The registered schedule shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrScheduleKind {
    /// Constant base lr.
    Constant,
    /// Linear warm-up from 0, then constant.
    #[serde(alias = "constant_with_warmup")]
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at the last step.
    Linear,
    /// Linear warm-up, then half a cosine down to min_lr_rate × lr.
    #[serde(alias = "cosine_with_min_lr")]
    CosineWithMinLr,
}

impl LrScheduleKind {
    /// Every schedule, in the order listed in errors.
    pub const ALL: [LrScheduleKind; 4] = [
        Self::Constant,
        Self::ConstantWithWarmup,
        Self::Linear,
        Self::CosineWithMinLr,
    ];

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant-with-warmup",
            Self::Linear => "linear",
            Self::CosineWithMinLr => "cosine-with-min-lr",
        }
    }
}

impl fmt::Display for LrScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LrScheduleKind {
    type Err = anyhow::Error;

    /// Accepts the kebab-case names and transformers' snake_case ones.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        match Self::ALL.into_iter().find(|k| k.name() == wanted) {
            Some(k) => Ok(k),
            None => {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                bail!(
                    "unknown learning-rate schedule {s:?}; expected one of: {}",
                    names.join(", ")
                )
            }
        }
    }
}

/// The schedule section of a training config; [`LrScheduleConfig::build`] fixes the base lr and
/// the run length.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrScheduleConfig {
    /// The schedule shape.
    pub kind: LrScheduleKind,
    /// Warm-up steps (give this or `warmup_ratio`, not both).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Warm-up as a fraction of the total steps: W = ceil(ratio · T), as transformers.
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// Floor of `cosine-with-min-lr` as a fraction of the base lr (default 0).
    #[serde(default)]
    pub min_lr_rate: f64,
}

impl Default for LrScheduleConfig {
    /// A constant learning rate, no warm-up.
    fn default() -> Self {
        Self {
            kind: LrScheduleKind::Constant,
            warmup_steps: None,
            warmup_ratio: None,
            min_lr_rate: 0.0,
        }
    }
}

impl LrScheduleConfig {
    /// The schedule for a run of `total_steps` optimiser steps at base learning rate `lr`.
    pub fn build(&self, lr: f32, total_steps: u64) -> Result<LrSchedule> {
        let warmup_steps = match (self.warmup_steps, self.warmup_ratio) {
            (Some(_), Some(_)) => bail!("give warmup_steps or warmup_ratio, not both"),
            (Some(w), None) => w,
            (None, Some(r)) => warmup_steps_for_ratio(r, total_steps)?,
            (None, None) => 0,
        };
        let schedule = LrSchedule {
            kind: self.kind,
            lr,
            warmup_steps,
            total_steps,
            min_lr_rate: self.min_lr_rate,
        };
        schedule.validate()?;
        Ok(schedule)
    }
}

/// W = ceil(ratio · T) (transformers' `get_warmup_steps`); errors unless 0 ≤ ratio ≤ 1.
pub fn warmup_steps_for_ratio(ratio: f64, total_steps: u64) -> Result<u64> {
    ensure!(
        (0.0..=1.0).contains(&ratio),
        "warmup_ratio must be in [0, 1], got {ratio}"
    );
    Ok((ratio * total_steps as f64).ceil() as u64)
}

/// A learning-rate schedule with its base lr and run length fixed.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// The shape.
    pub kind: LrScheduleKind,
    /// The base (peak) learning rate.
    pub lr: f32,
    /// W.
    pub warmup_steps: u64,
    /// T.
    pub total_steps: u64,
    /// r, the cosine floor as a fraction of `lr`.
    pub min_lr_rate: f64,
}

impl LrSchedule {
    /// Checks lr ≥ 0, 0 ≤ r ≤ 1, W ≤ T where the shape decays, and no warm-up for `constant`.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.lr.is_finite() && self.lr >= 0.0,
            "learning rate must be finite and ≥ 0, got {}",
            self.lr
        );
        ensure!(
            (0.0..=1.0).contains(&self.min_lr_rate),
            "min_lr_rate must be in [0, 1], got {}",
            self.min_lr_rate
        );
        if self.kind == LrScheduleKind::Constant {
            ensure!(
                self.warmup_steps == 0,
                "the constant schedule has no warm-up ({} steps given); use constant-with-warmup",
                self.warmup_steps
            );
        }
        if matches!(
            self.kind,
            LrScheduleKind::Linear | LrScheduleKind::CosineWithMinLr
        ) {
            ensure!(
                self.warmup_steps <= self.total_steps,
                "{} warm-up steps exceed the {} total steps",
                self.warmup_steps,
                self.total_steps
            );
        }
        Ok(())
    }

    /// The factor multiplying the base lr before optimiser step `step` (0-based).
    pub fn factor_at(&self, step: u64) -> f64 {
        let s = step as f64;
        let w = self.warmup_steps as f64;
        let t = self.total_steps as f64;
        if self.kind != LrScheduleKind::Constant && step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            LrScheduleKind::Constant | LrScheduleKind::ConstantWithWarmup => 1.0,
            LrScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            LrScheduleKind::CosineWithMinLr => {
                let progress = ((s - w) / (t - w).max(1.0)).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                (self.min_lr_rate + (1.0 - self.min_lr_rate) * cosine).max(0.0)
            }
        }
    }

    /// The learning rate for optimiser step `step` (0-based): lr · factor(step).
    pub fn lr_at(&self, step: u64) -> f32 {
        (self.lr as f64 * self.factor_at(step)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: LrScheduleKind, warmup: u64, total: u64, min_lr_rate: f64) -> LrSchedule {
        let s = LrSchedule {
            kind,
            lr: 1e-3,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_rate,
        };
        s.validate().unwrap();
        s
    }

    fn assert_factors(s: &LrSchedule, expected: &[(u64, f64)]) {
        for &(step, f) in expected {
            assert!(
                (s.factor_at(step) - f).abs() < 1e-12,
                "{} step {step}: {} vs {f}",
                s.kind,
                s.factor_at(step)
            );
            assert!((s.lr_at(step) as f64 - 1e-3 * f).abs() < 1e-10);
        }
    }

    #[test]
    fn constant() {
        assert_factors(
            &schedule(LrScheduleKind::Constant, 0, 10, 0.0),
            &[(0, 1.0), (5, 1.0), (100, 1.0)],
        );
    }

    #[test]
    fn constant_with_warmup_by_hand() {
        // W = 4: 0/4, 1/4, 2/4, 3/4, then 1.
        assert_factors(
            &schedule(LrScheduleKind::ConstantWithWarmup, 4, 10, 0.0),
            &[
                (0, 0.0),
                (1, 0.25),
                (3, 0.75),
                (4, 1.0),
                (9, 1.0),
                (50, 1.0),
            ],
        );
    }

    #[test]
    fn linear_by_hand() {
        // W = 2, T = 10: warm-up 0, 0.5; then (10 − s) / 8: s=2 → 1, s=6 → 0.5, s=10 → 0,
        // s=12 → 0 (floored).
        assert_factors(
            &schedule(LrScheduleKind::Linear, 2, 10, 0.0),
            &[
                (0, 0.0),
                (1, 0.5),
                (2, 1.0),
                (6, 0.5),
                (9, 0.125),
                (10, 0.0),
                (12, 0.0),
            ],
        );
    }

    #[test]
    fn cosine_with_min_lr_by_hand() {
        // W = 2, T = 10, r = 0.1. p = (s − 2) / 8.
        // s=2: p=0, cos=1 → 0.1 + 0.9·1 = 1
        // s=4: p=0.25, ½(1 + cos(π/4)) = ½(1 + 0.70710678) = 0.85355339 → 0.1 + 0.9·0.85355339
        //      = 0.86819805
        // s=6: p=0.5, ½(1 + 0) = 0.5 → 0.1 + 0.45 = 0.55
        // s=10: p=1, 0 → 0.1; s=20: p capped at 1 → 0.1
        let half_sqrt2 = std::f64::consts::FRAC_1_SQRT_2;
        assert_factors(
            &schedule(LrScheduleKind::CosineWithMinLr, 2, 10, 0.1),
            &[
                (0, 0.0),
                (1, 0.5),
                (2, 1.0),
                (4, 0.1 + 0.9 * 0.5 * (1.0 + half_sqrt2)),
                (6, 0.55),
                (10, 0.1),
                (20, 0.1),
            ],
        );
        assert!(
            (schedule(LrScheduleKind::CosineWithMinLr, 2, 10, 0.1).factor_at(4) - 0.86819805).abs()
                < 1e-8
        );
    }

    #[test]
    fn config_builds_with_ratio() {
        // ratio 0.1 of 95 steps: ceil(9.5) = 10 warm-up steps.
        let cfg: LrScheduleConfig =
            serde_json::from_str(r#"{"kind":"constant_with_warmup","warmup_ratio":0.1}"#).unwrap();
        let s = cfg.build(2e-6, 95).unwrap();
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr_at(5), 1e-6);
        assert_eq!(s.lr_at(10), 2e-6);
        assert!(
            serde_json::from_str::<LrScheduleConfig>(r#"{"kind":"linear","warmup":3}"#).is_err()
        );
        let both = LrScheduleConfig {
            kind: LrScheduleKind::Linear,
            warmup_steps: Some(1),
            warmup_ratio: Some(0.1),
            min_lr_rate: 0.0,
        };
        assert!(both.build(1e-3, 10).is_err());
        let constant_with_warmup = LrScheduleConfig {
            kind: LrScheduleKind::Constant,
            warmup_steps: Some(3),
            warmup_ratio: None,
            min_lr_rate: 0.0,
        };
        assert!(constant_with_warmup.build(1e-3, 10).is_err());
    }

    #[test]
    fn names() {
        for k in LrScheduleKind::ALL {
            assert_eq!(k.to_string().parse::<LrScheduleKind>().unwrap(), k);
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
        }
        assert_eq!(
            "cosine_with_min_lr".parse::<LrScheduleKind>().unwrap(),
            LrScheduleKind::CosineWithMinLr
        );
        let err = "cosine".parse::<LrScheduleKind>().unwrap_err().to_string();
        assert!(err.contains("constant, constant-with-warmup, linear, cosine-with-min-lr"));
    }
}
