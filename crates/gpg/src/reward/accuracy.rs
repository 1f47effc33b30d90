//! Math accuracy: r = 1 if the completion's final answer equals the gold answer, else 0.

use super::{score_against_gold, Reward, RewardInput};

/// `r_i = 1.0` if `mathverify::is_correct(gold_i, completion_i)`, else `0.0`.
///
/// Every item must carry a gold answer. Items are checked in parallel (mathverify bounds
/// its own work per call).
#[derive(Debug, Clone, Copy, Default)]
pub struct AccuracyReward;

impl Reward for AccuracyReward {
    fn name(&self) -> &str {
        "accuracy"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        score_against_gold(self.name(), batch, correctness)
    }
}

/// 1.0 when `completion` states an answer equal to `gold`, else 0.0.
pub(super) fn correctness(gold: &str, completion: &str) -> f32 {
    if mathverify::is_correct(gold, completion) {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(completion: &str, answer: Option<&str>) -> RewardInput {
        RewardInput {
            prompt: "Compute 2 + 2.".into(),
            completion: completion.into(),
            answer: answer.map(str::to_string),
            completion_tokens: 3,
            columns: Default::default(),
        }
    }

    #[test]
    fn scores_match_mathverify() {
        let batch = [input("4", Some("4")), input("5", Some("4"))];
        let expected: Vec<f32> = batch
            .iter()
            .map(|b| {
                if mathverify::is_correct(b.answer.as_deref().unwrap(), &b.completion) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(AccuracyReward.score(&batch).unwrap(), expected);
        // Identical text is correct under any sound verifier; a different integer is not.
        assert_eq!(expected, vec![1.0, 0.0]);
    }

    #[test]
    fn missing_gold_answer_is_an_error_naming_the_item() {
        let batch = [input("4", Some("4")), input("4", None)];
        let err = AccuracyReward.score(&batch).unwrap_err().to_string();
        assert!(
            err.contains("accuracy") && err.contains("batch item 1"),
            "{err}"
        );
    }

    #[test]
    fn empty_batch_gives_no_scores() {
        assert!(AccuracyReward.score(&[]).unwrap().is_empty());
    }
}
