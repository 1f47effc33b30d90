//! Exact match: r = 1 if the trimmed completion equals the trimmed gold answer.

use super::{score_against_gold, Reward, RewardInput};

/// `r = 1.0` if `completion.trim() == answer.trim()`, else `0.0`. Every item needs a gold
/// answer. Useful for tasks whose answers are labels or strings, not mathematics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactMatchReward;

impl Reward for ExactMatchReward {
    fn name(&self) -> &str {
        "exact_match"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        score_against_gold(self.name(), batch, |gold, completion| {
            if completion.trim() == gold.trim() {
                1.0
            } else {
                0.0
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_equality() {
        let mk = |c: &str, a: &str| RewardInput {
            prompt: String::new(),
            completion: c.into(),
            answer: Some(a.into()),
            completion_tokens: 1,
            columns: Default::default(),
        };
        let batch = [
            mk("yes", "yes"),
            mk("  yes\n", "yes "),
            mk("Yes", "yes"),
            mk("yes.", "yes"),
            mk("", ""),
        ];
        assert_eq!(
            ExactMatchReward.score(&batch).unwrap(),
            vec![1.0, 1.0, 0.0, 0.0, 1.0]
        );
    }

    #[test]
    fn missing_answer_is_an_error() {
        let input = RewardInput {
            prompt: String::new(),
            completion: "a".into(),
            answer: None,
            completion_tokens: 1,
            columns: Default::default(),
        };
        let err = ExactMatchReward.score(&[input]).unwrap_err().to_string();
        assert!(
            err.contains("exact_match") && err.contains("batch item 0"),
            "{err}"
        );
    }
}
