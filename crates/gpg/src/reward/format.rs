//! Format rewards: does the completion have the expected shape?

use regex::Regex;

use super::{Reward, RewardInput};

/// `r = 1.0` if the completion is `<think>…</think>` followed (after optional whitespace)
/// by `<answer>…</answer>` and nothing else but surrounding whitespace; else `0.0`.
///
/// The contents of both tags may span lines. This is the shape asked for by the
/// DeepSeek-R1 style system prompt.
#[derive(Debug, Clone)]
pub struct ThinkAnswerFormatReward {
    pattern: Regex,
}

impl ThinkAnswerFormatReward {
    pub fn new() -> Self {
        // The pattern is a constant; compiling it cannot fail.
        let pattern = Regex::new(r"(?s)\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\z")
            .unwrap_or_else(|e| panic!("constant format regex is invalid: {e}"));
        Self { pattern }
    }

    /// Whether `completion` has the think/answer shape.
    pub fn matches(&self, completion: &str) -> bool {
        self.pattern.is_match(completion)
    }
}

impl Default for ThinkAnswerFormatReward {
    fn default() -> Self {
        Self::new()
    }
}

impl Reward for ThinkAnswerFormatReward {
    fn name(&self) -> &str {
        "format"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        Ok(batch
            .iter()
            .map(|b| {
                if self.matches(&b.completion) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect())
    }
}

/// `r = 1.0` if the completion contains `\boxed{X}` with balanced braces and non-blank X;
/// else `0.0`. Says nothing about whether X is right.
#[derive(Debug, Clone, Copy, Default)]
pub struct BoxedFormatReward;

impl BoxedFormatReward {
    /// Whether some `\boxed{…}` in `text` closes and holds a non-blank answer.
    pub fn has_boxed_answer(text: &str) -> bool {
        const OPEN: &str = "\\boxed{";
        let mut rest = text;
        while let Some(start) = rest.find(OPEN) {
            let body = &rest[start + OPEN.len()..];
            if let Some(content) = balanced_prefix(body) {
                if !content.trim().is_empty() {
                    return true;
                }
            }
            rest = body;
        }
        false
    }
}

/// The text before the `}` that closes an already opened `{`, or `None` if it never closes.
fn balanced_prefix(body: &str) -> Option<&str> {
    let mut depth = 1usize;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&body[..i]);
                }
            }
            _ => {}
        }
    }
    None
}

impl Reward for BoxedFormatReward {
    fn name(&self) -> &str {
        "boxed_format"
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        Ok(batch
            .iter()
            .map(|b| {
                if Self::has_boxed_answer(&b.completion) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(completions: &[&str]) -> Vec<RewardInput> {
        completions
            .iter()
            .map(|c| RewardInput {
                prompt: String::new(),
                completion: c.to_string(),
                answer: None,
                completion_tokens: 0,
                columns: Default::default(),
            })
            .collect()
    }

    #[test]
    fn think_answer_shape() {
        let r = ThinkAnswerFormatReward::new();
        let b = batch(&[
            "<think>\n2+2=4\n</think>\n<answer>\n4\n</answer>",
            "<think>x</think><answer>4</answer>",
            "  <think>a\nb</think>  \n\n <answer>4</answer>\n",
            "<answer>4</answer>",
            "<think>x</think>",
            "<think>x</think> so <answer>4</answer>",
            "preamble <think>x</think><answer>4</answer>",
            "<think>x</think><answer>4</answer> trailing",
            "<think>x<answer>4</answer>",
        ]);
        assert_eq!(
            r.score(&b).unwrap(),
            vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(r.name(), "format");
    }

    #[test]
    fn boxed_answer_shape() {
        let b = batch(&[
            "so the answer is \\boxed{4}.",
            "\\boxed{\\frac{1}{2}}",
            "\\boxed{}",
            "\\boxed{  }",
            "\\boxed{4",
            "answer: 4",
            "\\boxed{} then \\boxed{7}",
            "\\boxed{\\frac{1}{2}",
        ]);
        assert_eq!(
            BoxedFormatReward.score(&b).unwrap(),
            vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        );
    }
}
