//! What each step logs: `metrics.jsonl` (one JSON object per step), the same scalars in a
//! TensorBoard event file, and a few sampled completions in `completions.jsonl`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::tensorboard::EventWriter;

/// The metrics of one optimiser step (what the GPG reference logs, plus timings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Mean total reward over the batch's completions.
    pub reward: f64,
    /// Mean over groups of the within-group reward std.
    pub reward_std: f64,
    /// Mean of each reward function (before weighting), over every sampled completion.
    pub rewards: BTreeMap<String, f64>,
    pub completion_length: f64,
    pub completion_length_max: usize,
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
    pub clip_fraction: Option<f64>,
    pub kl: Option<f64>,
    /// Completion tokens in this step's update.
    pub tokens: u64,
    pub tokens_seen: u64,
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

impl StepMetrics {
    /// The scalars, named as TensorBoard tags.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut v = vec![
            ("train/loss".to_string(), self.loss),
            ("train/reward".into(), self.reward),
            ("train/reward_std".into(), self.reward_std),
            ("train/completion_length".into(), self.completion_length),
            ("train/grad_norm".into(), self.grad_norm),
            ("train/learning_rate".into(), self.lr),
            (
                "train/identical_groups".into(),
                self.identical_groups as f64,
            ),
            ("train/easy_groups".into(), self.easy_groups as f64),
            ("train/hard_groups".into(), self.hard_groups as f64),
            ("train/inverse_alpha".into(), self.inverse_alpha),
            ("train/resample_rounds".into(), self.resample_rounds as f64),
            ("train/entropy".into(), self.entropy),
            ("train/tokens_seen".into(), self.tokens_seen as f64),
            ("time/rollout_s".into(), self.time_rollout_s),
            ("time/reward_s".into(), self.time_reward_s),
            ("time/update_s".into(), self.time_update_s),
            ("time/comm_s".into(), self.time_comm_s),
            ("time/step_s".into(), self.time_step_s),
        ];
        for (name, value) in &self.rewards {
            v.push((format!("rewards/{name}"), *value));
        }
        if let Some(c) = self.clip_fraction {
            v.push(("train/clip_fraction".into(), c));
        }
        if let Some(k) = self.kl {
            v.push(("train/kl".into(), k));
        }
        if let Some(p) = self.eval_pass_at_1 {
            v.push(("eval/pass_at_1".into(), p));
        }
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
