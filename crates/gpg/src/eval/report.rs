//! Results of an evaluation: per sample, per item, and the aggregate figures.

use std::io::Write;

use anyhow::{ensure, Context, Result};
use serde::Serialize;

use super::pass_at_k::pass_at_k;
use crate::rollout::FinishReason;

/// One sampled completion and its verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleResult {
    /// The completion, decoded (special tokens skipped).
    pub text: String,
    /// Whether its answer equals the gold answer (`mathverify`).
    pub correct: bool,
    /// The answer `mathverify` extracted from the text (printed in its parsed form), if any.
    pub extracted: Option<String>,
    /// Number of generated tokens (an ending EOS token included).
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
}

/// One problem with its `k` samples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemResult {
    pub id: String,
    /// The prompt as the model saw it (chat template applied).
    pub prompt: String,
    /// The gold answer as given.
    pub gold: String,
    /// The gold answer as `mathverify` parsed it; `None` when it could not be parsed (then no
    /// sample can be correct).
    pub gold_parsed: Option<String>,
    /// Number of correct samples, c.
    pub n_correct: usize,
    /// c / k.
    pub pass_at_1: f64,
    /// 1 if any sample is correct, else 0 (pass@k with n = k).
    pub pass_at_k: f64,
    pub samples: Vec<SampleResult>,
}

impl ItemResult {
    /// Builds the result of an item, counting its correct samples.
    pub fn new(
        id: String,
        prompt: String,
        gold: String,
        gold_parsed: Option<String>,
        samples: Vec<SampleResult>,
    ) -> Self {
        let n = samples.len();
        let n_correct = samples.iter().filter(|s| s.correct).count();
        Self {
            id,
            prompt,
            gold,
            gold_parsed,
            n_correct,
            pass_at_1: pass_at_k(n, n_correct, 1),
            pass_at_k: pass_at_k(n, n_correct, n),
            samples,
        }
    }
}

/// The aggregate figures of an evaluation (an [`EvalReport`] without its items).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalSummary {
    pub n_items: usize,
    /// Samples per item, k.
    pub samples: usize,
    /// Mean over items of c_i / k.
    pub pass_at_1: f64,
    /// Standard error of `pass_at_1` over items: sd(c_i / k) / √n_items (0 for one item).
    pub pass_at_1_stderr: f64,
    /// Mean over items of 1 − C(k − c_i, k) / C(k, k): the share of items with a correct
    /// sample.
    pub pass_at_k: f64,
    /// Mean number of generated tokens per completion.
    pub mean_completion_tokens: f64,
    /// Share of completions cut at `max_new_tokens`.
    pub truncated_fraction: f64,
    /// Generated tokens in all.
    pub generated_tokens: usize,
    /// Wall-clock seconds of the evaluation (generation and verification).
    pub seconds: f64,
}

/// Everything an evaluation measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub summary: EvalSummary,
    /// One result per item, in input order.
    pub per_item: Vec<ItemResult>,
}

impl EvalReport {
    /// Aggregates item results that each hold `samples` samples. With no items every figure
    /// is 0 (never NaN).
    pub fn from_items(per_item: Vec<ItemResult>, samples: usize, seconds: f64) -> Result<Self> {
        for item in &per_item {
            ensure!(
                item.samples.len() == samples,
                "item {} has {} samples, expected {samples}",
                item.id,
                item.samples.len()
            );
        }
        let n_items = per_item.len();
        let mean = |f: &dyn Fn(&ItemResult) -> f64| -> f64 {
            if n_items == 0 {
                0.0
            } else {
                per_item.iter().map(f).sum::<f64>() / n_items as f64
            }
        };
        let pass_at_1 = mean(&|i| i.pass_at_1);
        let pass_at_1_stderr = if n_items > 1 {
            let var = per_item
                .iter()
                .map(|i| (i.pass_at_1 - pass_at_1).powi(2))
                .sum::<f64>()
                / (n_items - 1) as f64;
            (var / n_items as f64).sqrt()
        } else {
            0.0
        };
        let completions = n_items * samples;
        let all = || per_item.iter().flat_map(|i| i.samples.iter());
        let generated_tokens: usize = all().map(|s| s.completion_tokens).sum();
        let truncated = all()
            .filter(|s| s.finish_reason == FinishReason::Length)
            .count();
        let per_completion = |x: usize| {
            if completions == 0 {
                0.0
            } else {
                x as f64 / completions as f64
            }
        };
        let summary = EvalSummary {
            n_items,
            samples,
            pass_at_1,
            pass_at_1_stderr,
            pass_at_k: mean(&|i| i.pass_at_k),
            mean_completion_tokens: per_completion(generated_tokens),
            truncated_fraction: per_completion(truncated),
            generated_tokens,
            seconds,
        };
        Ok(Self { summary, per_item })
    }

    /// pass@k for any `1 ≤ k ≤ samples`: the mean over items of 1 − C(n − c_i, k) / C(n, k)
    /// with n = samples (unbiased for k < n).
    pub fn pass_at(&self, k: usize) -> Result<f64> {
        let n = self.summary.samples;
        ensure!(
            (1..=n).contains(&k),
            "pass@{k} needs 1 ≤ k ≤ samples per item ({n})"
        );
        if self.per_item.is_empty() {
            return Ok(0.0);
        }
        let sum: f64 = self
            .per_item
            .iter()
            .map(|i| pass_at_k(n, i.n_correct, k))
            .sum();
        Ok(sum / self.per_item.len() as f64)
    }

    /// Writes one JSON object per item (an [`ItemResult`]) per line.
    pub fn write_jsonl(&self, out: &mut dyn Write) -> Result<()> {
        for item in &self.per_item {
            write_item_line(item, out)?;
        }
        Ok(())
    }
}

/// Writes `item` as one JSON line.
pub fn write_item_line(item: &ItemResult, out: &mut dyn Write) -> Result<()> {
    serde_json::to_writer(&mut *out, item)
        .with_context(|| format!("writing the result of item {}", item.id))?;
    out.write_all(b"\n")
        .with_context(|| format!("writing the result of item {}", item.id))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(correct: bool, tokens: usize, finish_reason: FinishReason) -> SampleResult {
        SampleResult {
            text: String::new(),
            correct,
            extracted: None,
            completion_tokens: tokens,
            finish_reason,
        }
    }

    fn item(id: &str, flags: &[bool]) -> ItemResult {
        let samples = flags
            .iter()
            .map(|&c| sample(c, 10, FinishReason::Eos))
            .collect();
        ItemResult::new(id.into(), "p".into(), "1".into(), Some("1".into()), samples)
    }

    #[test]
    fn aggregates_hand_computed() {
        // Item a: 2 of 4 correct; item b: none; item c: 1 of 4.
        let items = vec![
            item("a", &[true, false, false, true]),
            item("b", &[false; 4]),
            item("c", &[false, false, true, false]),
        ];
        assert_eq!(items[0].n_correct, 2);
        assert_eq!(items[0].pass_at_1, 0.5);
        assert_eq!(items[0].pass_at_k, 1.0);
        assert_eq!(items[1].pass_at_k, 0.0);
        let report = EvalReport::from_items(items, 4, 1.5).unwrap();
        let s = &report.summary;
        assert_eq!(s.n_items, 3);
        assert!((s.pass_at_1 - (0.5 + 0.0 + 0.25) / 3.0).abs() < 1e-12);
        assert!((s.pass_at_k - 2.0 / 3.0).abs() < 1e-12);
        // pass@2: a: 1 − C(2,2)/C(4,2) = 5/6; b: 0; c: 1 − C(3,2)/C(4,2) = 1/2.
        let p2 = report.pass_at(2).unwrap();
        assert!((p2 - (5.0 / 6.0 + 0.5) / 3.0).abs() < 1e-12, "{p2}");
        assert_eq!(report.pass_at(1).unwrap(), s.pass_at_1);
        assert!((report.pass_at(4).unwrap() - s.pass_at_k).abs() < 1e-12);
        assert!(report.pass_at(0).is_err() && report.pass_at(5).is_err());
        // Per-item pass@1 = 0.5, 0, 0.25: mean 0.25, sample variance
        // (0.0625 + 0.0625 + 0) / 2 = 0.0625, stderr √(0.0625 / 3).
        assert!((s.pass_at_1_stderr - (0.0625f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.generated_tokens, 120);
        assert_eq!(s.mean_completion_tokens, 10.0);
        assert_eq!(s.truncated_fraction, 0.0);
        assert_eq!(s.seconds, 1.5);
    }

    #[test]
    fn token_and_truncation_figures() {
        let samples = vec![
            sample(false, 4, FinishReason::Length),
            sample(true, 2, FinishReason::Eos),
        ];
        let one = ItemResult::new("x".into(), "p".into(), "g".into(), None, samples);
        let report = EvalReport::from_items(vec![one], 2, 0.0).unwrap();
        assert_eq!(report.summary.mean_completion_tokens, 3.0);
        assert_eq!(report.summary.truncated_fraction, 0.5);
        assert_eq!(report.summary.pass_at_1_stderr, 0.0);
    }

    #[test]
    fn empty_report_has_no_nan() {
        let report = EvalReport::from_items(vec![], 3, 0.0).unwrap();
        let s = &report.summary;
        for v in [
            s.pass_at_1,
            s.pass_at_k,
            s.mean_completion_tokens,
            s.truncated_fraction,
        ] {
            assert_eq!(v, 0.0);
        }
        assert_eq!(report.pass_at(2).unwrap(), 0.0);
    }

    #[test]
    fn wrong_sample_count_is_an_error() {
        let err = EvalReport::from_items(vec![item("a", &[true])], 2, 0.0).unwrap_err();
        assert!(
            err.to_string().contains("item a has 1 samples, expected 2"),
            "{err}"
        );
    }

    #[test]
    fn jsonl_has_one_object_per_item() {
        let report =
            EvalReport::from_items(vec![item("a", &[true]), item("b", &[false])], 1, 0.0).unwrap();
        let mut buf = Vec::new();
        report.write_jsonl(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], "a");
        assert_eq!(lines[0]["n_correct"], 1);
        assert_eq!(lines[0]["samples"][0]["correct"], true);
        assert_eq!(lines[0]["samples"][0]["finish_reason"], "eos");
        assert_eq!(lines[1]["pass_at_k"], 0.0);
    }
}
