//! Length: r = −|chars(completion) − target|, TRL's quick-start reward.

use serde::{Deserialize, Serialize};

use super::{Reward, RewardInput};

/// Options of the `length` reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthOptions {
    /// The completion length, in Unicode characters, that scores 0 (default 20).
    #[serde(default = "default_target")]
    pub target_chars: usize,
}

fn default_target() -> usize {
    20
}

impl Default for LengthOptions {
    fn default() -> Self {
        Self {
            target_chars: default_target(),
        }
    }
}

/// `r = −|n − target|` with n the number of Unicode characters of the completion text
/// (Python's `len(str)`), the reward of TRL's GRPO quick start. It needs no gold answer and
/// varies within a group whenever completions differ in length, which makes it the reward of
/// smoke tests and of the side-by-side benchmark against TRL (`gpg-rl bench trainer`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LengthReward {
    pub options: LengthOptions,
}

impl Reward for LengthReward {
    fn name(&self) -> &str {
        "length"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        let target = self.options.target_chars as f64;
        Ok(batch
            .iter()
            .map(|input| -(input.completion.chars().count() as f64 - target).abs() as f32)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_from_target_in_characters() {
        let mk = |c: &str| RewardInput {
            prompt: String::new(),
            completion: c.into(),
            answer: None,
            completion_tokens: 1,
            columns: Default::default(),
        };
        let reward = LengthReward {
            options: LengthOptions { target_chars: 3 },
        };
        // "ééé" is 3 characters (6 bytes): it scores 0, as Python's len would.
        let batch = [mk("abc"), mk(""), mk("abcdefg"), mk("ééé")];
        assert_eq!(reward.score(&batch).unwrap(), vec![0.0, -3.0, -4.0, 0.0]);
        assert_eq!(
            LengthReward::default().score(&[mk("")]).unwrap(),
            vec![-20.0]
        );
    }
}
