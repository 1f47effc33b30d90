//! Accuracy scaled by completion length on a cosine schedule (open-r1's
//! `get_cosine_scaled_reward`, after "Demystifying Long Chain-of-Thought Reasoning in LLMs").

use serde::{Deserialize, Serialize};

use super::accuracy::correctness;
use super::{require_answer, Reward, RewardInput};

/// Parameters of [`CosineLengthReward`]; defaults are open-r1's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CosineOptions {
    /// Reward of a wrong completion of length 0 (the harshest penalty).
    pub min_value_wrong: f32,
    /// Reward of a wrong completion of length ≥ `max_len` (the mildest penalty).
    pub max_value_wrong: f32,
    /// Reward of a correct completion of length ≥ `max_len`.
    pub min_value_correct: f32,
    /// Reward of a correct completion of length 0.
    pub max_value_correct: f32,
    /// Length (in completion tokens) at which the schedule reaches its end point.
    pub max_len: usize,
}

impl Default for CosineOptions {
    fn default() -> Self {
        Self {
            min_value_wrong: -1.0,
            max_value_wrong: -0.5,
            min_value_correct: 0.5,
            max_value_correct: 1.0,
            max_len: 1000,
        }
    }
}

impl CosineOptions {
    /// Checks that `max_len > 0` and every value is finite.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.max_len > 0, "cosine reward: max_len must be > 0");
        for (field, v) in [
            ("min_value_wrong", self.min_value_wrong),
            ("max_value_wrong", self.max_value_wrong),
            ("min_value_correct", self.min_value_correct),
            ("max_value_correct", self.max_value_correct),
        ] {
            anyhow::ensure!(
                v.is_finite(),
                "cosine reward: {field} must be finite, got {v}"
            );
        }
        Ok(())
    }

    /// The reward for a completion of `len` tokens that is (or is not) correct:
    ///
    /// ```text
    /// p = min(len / max_len, 1),   c = cos(π p)
    /// correct: r = min_c + ½ (max_c − min_c)(1 + c)   (max_c at len 0, min_c at max_len)
    /// wrong:   r = max_w + ½ (min_w − max_w)(1 + c)   (min_w at len 0, max_w at max_len)
    /// ```
    ///
    /// So short correct answers earn most and short wrong answers are punished most.
    /// Unlike open-r1, p is clamped at 1 so lengths beyond `max_len` keep the end value
    /// instead of climbing back up the cosine.
    pub fn value(&self, correct: bool, len: usize) -> f32 {
        let progress = (len as f64 / self.max_len as f64).min(1.0);
        let half_one_plus_cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let (at_max_len, at_zero) = if correct {
            (self.min_value_correct, self.max_value_correct)
        } else {
            (self.max_value_wrong, self.min_value_wrong)
        };
        (at_max_len as f64 + (at_zero as f64 - at_max_len as f64) * half_one_plus_cos) as f32
    }
}

/// Length-scaled accuracy; correctness from `mathverify::is_correct`, length from
/// [`RewardInput::completion_tokens`].
#[derive(Debug, Clone, Copy)]
pub struct CosineLengthReward {
    options: CosineOptions,
}

impl CosineLengthReward {
    pub fn new(options: CosineOptions) -> anyhow::Result<Self> {
        options.validate()?;
        Ok(Self { options })
    }

    pub fn options(&self) -> &CosineOptions {
        &self.options
    }
}

impl Reward for CosineLengthReward {
    fn name(&self) -> &str {
        "cosine"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        batch
            .iter()
            .enumerate()
            .map(|(i, input)| {
                let gold = require_answer(self.name(), i, input)?;
                let correct = correctness(gold, &input.completion) > 0.5;
                Ok(self.options.value(correct, input.completion_tokens))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn hand_computed_values_with_defaults() {
        let o = CosineOptions::default();
        // len 0: cos 0 = 1 → end points at length 0.
        assert!(close(o.value(true, 0), 1.0));
        assert!(close(o.value(false, 0), -1.0));
        // len = max_len/2: cos(π/2) = 0 → midpoints.
        assert!(close(o.value(true, 500), 0.75));
        assert!(close(o.value(false, 500), -0.75));
        // len = max_len/4: ½(1 + cos(π/4)) = ½ + √2/4 ≈ 0.853553.
        let w = 0.5 + std::f32::consts::SQRT_2 / 4.0;
        assert!(close(o.value(true, 250), 0.5 + 0.5 * w));
        assert!(close(o.value(false, 250), -0.5 - 0.5 * w));
        // len = max_len and beyond: the far end points (clamped).
        assert!(close(o.value(true, 1000), 0.5));
        assert!(close(o.value(false, 1000), -0.5));
        assert!(close(o.value(true, 5000), 0.5));
        assert!(close(o.value(false, 5000), -0.5));
    }

    #[test]
    fn scores_use_correctness_and_token_length() {
        let r = CosineLengthReward::new(CosineOptions {
            max_len: 10,
            ..CosineOptions::default()
        })
        .unwrap();
        let mk = |c: &str, n| RewardInput {
            prompt: String::new(),
            completion: c.into(),
            answer: Some("7".into()),
            completion_tokens: n,
            columns: Default::default(),
        };
        let gold_is = |c: &str| mathverify::is_correct("7", c);
        let batch = [mk("7", 5), mk("8", 5), mk("7", 0)];
        let got = r.score(&batch).unwrap();
        assert!(gold_is("7") && !gold_is("8"));
        assert!(
            close(got[0], 0.75) && close(got[1], -0.75) && close(got[2], 1.0),
            "{got:?}"
        );
    }

    #[test]
    fn rejects_zero_max_len_and_missing_answer() {
        let bad = CosineOptions {
            max_len: 0,
            ..CosineOptions::default()
        };
        assert!(CosineLengthReward::new(bad).is_err());
        let r = CosineLengthReward::new(CosineOptions::default()).unwrap();
        let input = RewardInput {
            prompt: String::new(),
            completion: "1".into(),
            answer: None,
            completion_tokens: 1,
            columns: Default::default(),
        };
        let err = r.score(&[input]).unwrap_err().to_string();
        assert!(
            err.contains("cosine") && err.contains("batch item 0"),
            "{err}"
        );
    }
}
