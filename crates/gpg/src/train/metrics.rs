//! What each step logs: `metrics.jsonl` (one JSON object per step), the same scalars in a
//! TensorBoard event file, and a few sampled completions in `completions.jsonl`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::tensorboard::EventWriter;

/// The metrics of one optimiser step, named as TRL's `GRPOTrainer` names them where it has the
/// same quantity (`learning_rate`, `reward`, `reward_std`, `frac_reward_zero_std`,
/// `rewards/<f>/mean`, `completions/mean_length`, `clip_ratio/region_mean`, `kl`, `entropy`,
/// `num_tokens`, `epoch`), so dashboards made for TRL read gpg-rl runs; GPG's own quantities
/// (groups, α, resampling) and timings beside them. docs/training.md has the table. Logs
/// written before these names (`lr`, `completion_length`, `rewards: {f: mean}`, …) still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Epochs of the prompt set drawn so far, fractional (TRL's `epoch`).
    #[serde(default)]
    pub epoch: f64,
    #[serde(rename = "learning_rate", alias = "lr")]
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Mean total reward over the batch's completions.
    pub reward: f64,
    /// Unbiased std of the total reward over the batch's completions (TRL's `reward_std`).
    /// Logs written before the TRL names held the within-group mean here.
    #[serde(default)]
    pub reward_std: f64,
    /// Mean over groups of the within-group unbiased reward std (the GPG reference's
    /// `reward_std`).
    #[serde(default)]
    pub reward_std_within_group: f64,
    /// Share of the batch's groups whose rewards are all equal, M / B (TRL's
    /// `frac_reward_zero_std`).
    #[serde(default)]
    pub frac_reward_zero_std: f64,
    /// Each reward function's mean and std (before weighting) over every sampled completion:
    /// `rewards/<name>/mean`, `rewards/<name>/std`.
    #[serde(flatten)]
    pub rewards: RewardStats,
    /// Completion lengths in tokens over every completion sampled in the step (all rounds):
    /// mean, min, max, and the share cut at `max_new_tokens` (TRL's `completions/*`).
    #[serde(rename = "completions/mean_length", alias = "completion_length")]
    pub completion_length: f64,
    #[serde(rename = "completions/min_length", default)]
    pub completion_length_min: usize,
    #[serde(rename = "completions/max_length", alias = "completion_length_max")]
    pub completion_length_max: usize,
    #[serde(rename = "completions/clipped_ratio", default)]
    pub clipped_ratio: f64,
    /// Mean length of the completions that ended (stop token or string) rather than hit the
    /// limit; 0 when none did.
    #[serde(rename = "completions/mean_terminated_length", default)]
    pub terminated_length: f64,
    pub groups: usize,
    pub valid_groups: usize,
    /// Groups whose rewards are all equal (M).
    pub identical_groups: usize,
    /// Identical groups that are all correct / all wrong.
    pub easy_groups: usize,
    pub hard_groups: usize,
    /// min(1, valid / groups) = 1/α.
    pub inverse_alpha: f64,
    /// Sampling rounds used to fill the batch (β_th resampling; 1 when off).
    pub resample_rounds: usize,
    /// Mean entropy of the policy over completion tokens.
    pub entropy: f64,
    /// Share of completion tokens whose ratio is clipped (ratio objectives; TRL's
    /// `clip_ratio/region_mean`).
    #[serde(rename = "clip_ratio/region_mean", alias = "clip_fraction")]
    pub clip_fraction: Option<f64>,
    pub kl: Option<f64>,
    /// Completion tokens in this step's update.
    pub tokens: u64,
    /// Completion tokens of every update so far.
    pub tokens_seen: u64,
    /// Prompt + completion tokens of every completion sampled so far (TRL's `num_tokens`).
    #[serde(default)]
    pub num_tokens: u64,
    /// Why the optimiser step was skipped, if it was.
    pub skipped: Option<String>,
    /// Held-out pass@1 measured after this step, when evaluated.
    pub eval_pass_at_1: Option<f64>,
    pub time_rollout_s: f64,
    pub time_reward_s: f64,
    pub time_update_s: f64,
    /// Time in collective operations (data-parallel runs; 0 for a single process).
    #[serde(default)]
    pub time_comm_s: f64,
    /// Of which the gradient all-reduce (after a reduction that already waited for every
    /// rank's backward, so this is the transfer itself).
    #[serde(default)]
    pub time_comm_grad_s: f64,
    pub time_step_s: f64,
    /// Multi-turn rollouts with tools (`[tools]`): the step's tool counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolMetrics>,
}

/// Tool use in one step's rollout (all sampling rounds, every rank).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolMetrics {
    /// Tool calls made.
    pub calls: u64,
    /// Calls that ended in an error result (malformed call, unknown tool, the tool's error,
    /// timeout, crash, flood, garbage output).
    pub errors: u64,
    /// Mean tool calls per trajectory.
    pub calls_per_trajectory: f64,
    /// Mean model turns per trajectory (1 + its answered calls).
    pub turns_per_trajectory: f64,
    /// Tokens of tool responses (in the context, masked out of the loss and the counts).
    pub tool_tokens: u64,
}

/// Per reward function: mean and unbiased std over every sampled completion, written as TRL
/// writes them (`"rewards/<name>/mean"`, `"rewards/<name>/std"` at the top level of the
/// record). Reads that form and the older `"rewards": {"<name>": mean}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RewardStats {
    pub mean: BTreeMap<String, f64>,
    pub std: BTreeMap<String, f64>,
}

impl RewardStats {
    /// The mean of reward function `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.mean.get(name).copied()
    }
}

impl Serialize for RewardStats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.mean.len() + self.std.len()))?;
        for (name, mean) in &self.mean {
            map.serialize_entry(&format!("rewards/{name}/mean"), mean)?;
            if let Some(std) = self.std.get(name) {
                map.serialize_entry(&format!("rewards/{name}/std"), std)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for RewardStats {
    /// Takes the record's other keys (it is flattened): `rewards/<name>/{mean,std}` and the
    /// older `rewards` object; anything else is left alone. A null (NaN written) reads as NaN.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let rest = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let number = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        let mut out = RewardStats::default();
        for (key, value) in &rest {
            if key == "rewards" {
                for (name, v) in value.as_object().into_iter().flatten() {
                    out.mean.insert(name.clone(), number(v));
                }
            } else if let Some(inner) = key.strip_prefix("rewards/") {
                if let Some(name) = inner.strip_suffix("/mean") {
                    out.mean.insert(name.to_string(), number(value));
                } else if let Some(name) = inner.strip_suffix("/std") {
                    out.std.insert(name.to_string(), number(value));
                }
            }
        }
        Ok(out)
    }
}

/// Running sums for a mean and an unbiased std (n − 1, as torch's `std`), in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: usize,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// Σx / n (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    /// √((Σx² − n·mean²) / (n − 1)) (0 when n < 2; clamped at 0 against rounding).
    pub fn std(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let mean = self.mean();
        ((self.sum_sq - self.n as f64 * mean * mean) / (self.n - 1) as f64)
            .max(0.0)
            .sqrt()
    }
}

/// The lengths of a step's sampled completions: all of them, and those that ended before
/// `max_new_tokens` (terminated); the rest were cut (truncated).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompletionLengths {
    pub all: Moments,
    pub min: usize,
    pub max: usize,
    pub truncated: usize,
    pub terminated: Moments,
}

impl CompletionLengths {
    pub fn add(&mut self, length: usize, truncated: bool) {
        self.min = if self.all.n == 0 {
            length
        } else {
            self.min.min(length)
        };
        self.max = self.max.max(length);
        self.all.add(length as f64);
        if truncated {
            self.truncated += 1;
        } else {
            self.terminated.add(length as f64);
        }
    }

    /// Share of the completions cut at `max_new_tokens` (0 when there are none).
    pub fn clipped_ratio(&self) -> f64 {
        if self.all.n == 0 {
            0.0
        } else {
            self.truncated as f64 / self.all.n as f64
        }
    }
}

impl StepMetrics {
    /// The scalars as TensorBoard tags: `train/<key>` for each number of the metrics.jsonl
    /// record (as TRL's TensorBoard callback tags its logs), `eval/pass_at_1` for the held-out
    /// pass@1.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let Ok(serde_json::Value::Object(record)) = serde_json::to_value(self) else {
            return Vec::new();
        };
        let mut v: Vec<(String, f64)> = record
            .iter()
            .filter(|(key, _)| key.as_str() != "step")
            .filter_map(|(key, value)| {
                let v = value.as_f64()?;
                Some(match key.as_str() {
                    "eval_pass_at_1" => ("eval/pass_at_1".to_string(), v),
                    _ => (format!("train/{key}"), v),
                })
            })
            .collect();
        // The tool counts are a nested object in metrics.jsonl (`"tools": {...}`).
        if let Some(t) = &self.tools {
            v.push(("tools/calls".into(), t.calls as f64));
            v.push(("tools/errors".into(), t.errors as f64));
            v.push(("tools/calls_per_trajectory".into(), t.calls_per_trajectory));
            v.push(("tools/turns_per_trajectory".into(), t.turns_per_trajectory));
            v.push(("tools/tool_tokens".into(), t.tool_tokens as f64));
        }
        v
    }
}

/// The run's logs.
pub struct MetricsLog {
    metrics: BufWriter<File>,
    completions: BufWriter<File>,
    events: EventWriter,
}

impl MetricsLog {
    /// Opens the logs of a run folder. When resuming from step `resume_step`, lines of later
    /// steps (written after the checkpoint, before an interruption) are dropped so the log
    /// continues exactly.
    pub fn open(dir: &Path, resume_step: u64) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        if path.exists() {
            let kept: Vec<String> = BufReader::new(File::open(&path)?)
                .lines()
                .collect::<std::io::Result<Vec<_>>>()?
                .into_iter()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= resume_step)
                })
                .collect();
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            std::fs::write(&path, text)
                .with_context(|| format!("{}: cannot rewrite", path.display()))?;
        }
        let open = |name: &str| -> Result<BufWriter<File>> {
            let p = dir.join(name);
            Ok(BufWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .with_context(|| format!("{}: cannot open", p.display()))?,
            ))
        };
        Ok(Self {
            metrics: open("metrics.jsonl")?,
            completions: open("completions.jsonl")?,
            events: EventWriter::create(&dir.join("tensorboard"))?,
        })
    }

    /// Appends one step's metrics and sampled (prompt, completion, reward) triples.
    pub fn write(&mut self, m: &StepMetrics, samples: &[(String, String, f32)]) -> Result<()> {
        writeln!(self.metrics, "{}", serde_json::to_string(m)?)?;
        self.metrics.flush()?;
        for (prompt, completion, reward) in samples {
            let line = serde_json::json!({"step": m.step, "prompt": prompt, "completion": completion, "reward": reward});
            writeln!(self.completions, "{line}")?;
        }
        self.completions.flush()?;
        let scalars = m.scalars();
        let refs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.events.add_scalars(m.step, &refs)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.metrics.flush()?;
        self.completions.flush()?;
        Ok(())
    }
}

/// Reads a run's metrics.jsonl.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: malformed metrics line", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_RECORD: &str = include_str!("testdata/metrics.jsonl");

    #[test]
    fn records_use_trl_names_and_read_back() {
        let mut m: StepMetrics = serde_json::from_str(OLD_RECORD.lines().next().unwrap()).unwrap();
        m.rewards.std.insert("accuracy".into(), 0.25);
        m.clip_fraction = Some(0.125);
        let v = serde_json::to_value(&m).unwrap();
        for key in [
            "learning_rate",
            "reward",
            "reward_std",
            "frac_reward_zero_std",
            "rewards/accuracy/mean",
            "rewards/accuracy/std",
            "completions/mean_length",
            "completions/min_length",
            "completions/max_length",
            "completions/clipped_ratio",
            "clip_ratio/region_mean",
            "kl",
            "entropy",
            "num_tokens",
            "epoch",
        ] {
            assert!(v.get(key).is_some(), "no {key} in {v}");
        }
        for old in ["lr", "completion_length", "rewards", "clip_fraction"] {
            assert!(v.get(old).is_none(), "{old} still written: {v}");
        }
        assert_eq!(v["rewards/accuracy/mean"], 0.21875);
        assert_eq!(v["clip_ratio/region_mean"], 0.125);
        let back: StepMetrics = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn logs_written_before_the_trl_names_still_read() {
        let m: StepMetrics = serde_json::from_str(OLD_RECORD.lines().next().unwrap()).unwrap();
        assert_eq!(m.lr, 0.0);
        assert_eq!(m.completion_length, 11.6171875);
        assert_eq!(m.completion_length_max, 26);
        assert_eq!(m.rewards.get("accuracy"), Some(0.21875));
        assert_eq!(m.num_tokens, 0);
    }

    #[test]
    fn tensorboard_tags_are_train_slash_the_record_keys() {
        let mut m: StepMetrics = serde_json::from_str(OLD_RECORD.lines().next().unwrap()).unwrap();
        m.eval_pass_at_1 = Some(0.5);
        let tags: BTreeMap<String, f64> = m.scalars().into_iter().collect();
        assert_eq!(tags["train/reward"], 0.21875);
        assert_eq!(tags["train/rewards/accuracy/mean"], 0.21875);
        assert_eq!(tags["train/completions/mean_length"], 11.6171875);
        assert_eq!(tags["train/learning_rate"], 0.0);
        assert_eq!(tags["eval/pass_at_1"], 0.5);
        assert!(!tags.contains_key("train/step") && !tags.contains_key("train/kl"));
    }

    #[test]
    fn moments_and_lengths_by_hand() {
        let mut m = Moments::default();
        assert_eq!((m.mean(), m.std()), (0.0, 0.0));
        for x in [1.0, 2.0, 4.0] {
            m.add(x);
        }
        // mean 7/3; Σ(x − mean)² = 16/9 + 1/9 + 25/9 = 42/9, / 2 = 7/3
        assert!((m.mean() - 7.0 / 3.0).abs() < 1e-12);
        assert!((m.std() - (7.0f64 / 3.0).sqrt()).abs() < 1e-12);
        let mut l = CompletionLengths::default();
        l.add(5, false);
        l.add(12, true);
        l.add(3, false);
        assert_eq!((l.min, l.max, l.truncated), (3, 12, 1));
        assert!((l.clipped_ratio() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(l.terminated.mean(), 4.0);
        assert!((l.all.mean() - 20.0 / 3.0).abs() < 1e-12);
    }
}
