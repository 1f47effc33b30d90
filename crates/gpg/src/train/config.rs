//! The training recipe: every option of `gpg-rl train`, read from a TOML file, overridable from
//! the command line, and saved resolved beside the run (`<output_dir>/config.toml`).
//!
//! Unknown keys are errors (`deny_unknown_fields`), so a typo in a recipe never passes silently.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::algo::{AdvantageEstimator, PolicyLoss, ResampleConfig};
/// The `[data]` table lives with the datasets it describes; re-exported here.
pub use crate::data::{DataConfig, SyntheticTask};
use crate::model::lora::LoraConfig;
use crate::model::{DeviceName, Precision};
use crate::optim::adamw::AdamWConfig;
use crate::optim::schedule::{LrScheduleConfig, LrScheduleKind};
use crate::reward::RewardConfig;

/// The whole recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face model directory to start from.
    pub model: PathBuf,
    /// Run folder: config.toml, metrics.jsonl, TensorBoard events, checkpoints, final model.
    pub output_dir: PathBuf,
    /// Optimiser steps.
    pub steps: u64,
    pub seed: u64,
    /// Where the engine runs: `cpu`, or `cuda` / `cuda:N` with a build that has the `cuda`
    /// feature (full fine-tuning on one GPU: see train/device.rs for what it refuses).
    #[serde(default)]
    pub device: DeviceName,
    /// `f32` or `bf16` (mixed precision: bf16 weight matrices and matrix products with f32
    /// accumulation; f32 master weights, moments, softmax and loss).
    #[serde(default)]
    pub precision: Precision,
    /// Keep only each layer's input during the forward and recompute the layer in the backward
    /// (less memory, the same gradients, about one more forward of time).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// With gradient checkpointing, recompute only the first N decoder layers (Megatron's
    /// `recompute_num_layers`): the later ones keep their activations, trading memory for
    /// N fewer layer recomputations. Absent: every layer is recomputed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing_layers: Option<usize>,
    pub data: DataConfig,
    pub rollout: RolloutConfig,
    #[serde(default)]
    pub algorithm: AlgorithmConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub reward: RewardConfig,
    #[serde(default)]
    pub eval: Option<TrainEvalConfig>,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub distributed: DistributedConfig,
    /// Train a LoRA adapter instead of the whole model (`[lora]`: rank, alpha, dropout,
    /// target_modules, use_rslora); absent: full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Vision-language models: keep the vision tower fixed (no backward through it, no
    /// optimiser state for it). Default: the tower is trained, as in the GPG reference.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_vision: bool,
    /// Multi-turn rollouts with tools (`[tools]`: the tools, turn and token limits); absent:
    /// single-turn completions. See crate::tools and docs/training.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<crate::tools::ToolsConfig>,
}

/// Data-parallel runs (`mpirun -np N gpg-rl train …`; ignored by a single process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Compare a digest of every rank's weights every this many steps (and at the end);
    /// ranks that differ stop the run with an error. 0: only at start.
    pub weight_check_every: u64,
    /// A collective operation that waits longer than this for the other ranks ends the job
    /// (a rank is stuck or gone). Must exceed the longest imbalance between ranks (e.g. one
    /// rank's slowest rollout).
    pub timeout_s: f64,
    /// What sums the gradients: `auto` (NCCL on a GPU, the host collective on the CPU),
    /// `nccl` (GPU runs only) or `host` (MPI; a GPU run stages its gradients through host
    /// memory). Loss sums, broadcasts and checks always go over the host collective.
    pub backend: crate::train::collective::GradBackend,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self {
            weight_check_every: 10,
            timeout_s: 1800.0,
            backend: Default::default(),
        }
    }
}

/// How completions are sampled during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts per optimiser step (B).
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub num_generations: usize,
    pub max_new_tokens: usize,
    #[serde(default = "one")]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub top_k: usize,
    /// Stop strings (the completion ends once its text contains one).
    #[serde(default)]
    pub stop: Vec<String>,
}

fn one() -> f32 {
    1.0
}

/// The objective and its batch-level machinery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlgorithmConfig {
    /// `gpg` (default), `grpo` or `dr-grpo`, with their parameters.
    #[serde(default)]
    pub loss: PolicyLoss,
    /// Defaults to the objective's own estimator (gpg → gpg, grpo → grpo, dr-grpo → dr-grpo).
    #[serde(default)]
    pub advantage: Option<AdvantageEstimator>,
    /// β_th resampling (GPG). `min_valid_share = 0` turns it off.
    #[serde(default = "ResampleConfig::off")]
    pub resample: ResampleConfig,
    /// Policy updates per sampled batch (GRPO's num_iterations / ppo_epochs).
    #[serde(default = "one_usize")]
    pub num_iterations: usize,
    /// Tokens per micro-batch of the update: gradients are accumulated over micro-batches so
    /// memory stays bounded. Results do not depend on it (the normaliser is the whole batch's).
    #[serde(default = "default_micro_batch_tokens")]
    pub micro_batch_tokens: usize,
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        Self {
            loss: PolicyLoss::default(),
            advantage: None,
            resample: ResampleConfig::off(),
            num_iterations: 1,
            micro_batch_tokens: default_micro_batch_tokens(),
        }
    }
}

fn one_usize() -> usize {
    1
}
fn default_micro_batch_tokens() -> usize {
    8192
}

/// Optimiser, gradient clipping, learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f32,
    #[serde(default = "default_adamw")]
    pub adamw: AdamWConfig,
    /// Global-norm clipping threshold; 0 only measures the norm.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f32,
    #[serde(default = "default_schedule")]
    pub schedule: LrScheduleConfig,
}

/// AdamW as the reference recipes use it (HF Trainer's weight decay 0).
pub(crate) fn default_adamw() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    }
}
pub(crate) fn default_max_grad_norm() -> f32 {
    1.0
}
fn default_schedule() -> LrScheduleConfig {
    LrScheduleConfig {
        kind: LrScheduleKind::ConstantWithWarmup,
        warmup_steps: None,
        warmup_ratio: Some(0.1),
        min_lr_rate: 0.0,
    }
}

/// Evaluation on a held-out set during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainEvalConfig {
    /// Every this many steps (and before the first and after the last).
    pub every: u64,
    /// `synthetic` (the task's held-out split) or a JSONL/Parquet file with prompts and answers.
    pub data: String,
    /// Samples per prompt; pass@1 is the mean over them.
    #[serde(default = "one_usize")]
    pub samples: usize,
    #[serde(default = "one")]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// Evaluate at most this many prompts.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// What is written and how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Keep at most this many step checkpoints (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Sampled completions written to the log each step.
    pub log_completions: usize,
    /// Console progress bar.
    pub progress: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            save_every: 50,
            keep_checkpoints: 2,
            log_completions: 2,
            progress: true,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML recipe; errors name the file and the offending key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the recipe", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("{}: invalid recipe", path.display()))
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: TrainConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Applies `key=value` overrides (dotted keys, TOML values; a bare word is a string),
    /// e.g. `optim.lr=2e-6`, `rollout.num_generations=8`, `algorithm.loss.name="grpo"`.
    /// Changing a `name` key resets the other keys of its table (they belonged to the old kind).
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self> {
        let mut value = toml::Value::try_from(self)?;
        for item in overrides {
            let Some((key, raw)) = item.split_once('=') else {
                bail!("override {item:?} is not of the form key=value");
            };
            let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
                Ok(mut t) => t
                    .remove("v")
                    .unwrap_or(toml::Value::String(raw.to_string())),
                Err(_) => toml::Value::String(raw.to_string()),
            };
            let mut node = &mut value;
            let parts: Vec<&str> = key.trim().split('.').collect();
            for (i, part) in parts.iter().enumerate() {
                let table = node.as_table_mut().with_context(|| {
                    format!(
                        "override {item:?}: `{}` is not a table",
                        parts[..i].join(".")
                    )
                })?;
                if i + 1 == parts.len() {
                    if *part == "name" && table.get("name") != Some(&parsed) {
                        // A registered choice (e.g. `algorithm.loss.name`) changes kind: the
                        // other keys belonged to the old kind, so start from the new one's
                        // defaults.
                        table.clear();
                    }
                    table.insert(part.to_string(), parsed.clone());
                    break;
                }
                node = table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
            }
        }
        let text = toml::to_string(&value)?;
        Self::from_toml_str(&text).context("after applying the command-line overrides")
    }

    /// Checks ranges that serde cannot.
    /// Which activations the training forward keeps (see `gradient_checkpointing` and
    /// `gradient_checkpointing_layers`).
    pub fn activations(&self) -> crate::model::Activations {
        use crate::model::Activations;
        match (
            self.gradient_checkpointing,
            self.gradient_checkpointing_layers,
        ) {
            (false, _) => Activations::All,
            (true, None) => Activations::LayerInputs,
            (true, Some(n)) => Activations::LayerInputsOfFirst(n),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(tools) = &self.tools {
            tools.validate()?;
        }
        if !(self.distributed.timeout_s.is_finite() && self.distributed.timeout_s > 0.0) {
            bail!(
                "distributed.timeout_s must be a positive number of seconds, got {}",
                self.distributed.timeout_s
            );
        }
        let r = &self.rollout;
        if r.prompts_per_step == 0 || r.num_generations == 0 || r.max_new_tokens == 0 {
            bail!("rollout.prompts_per_step, rollout.num_generations and rollout.max_new_tokens must be positive");
        }
        if self.steps == 0 {
            bail!("steps must be positive");
        }
        if !(self.optim.lr.is_finite() && self.optim.lr >= 0.0) {
            bail!("optim.lr must be a finite non-negative number");
        }
        if self.algorithm.num_iterations == 0 {
            bail!("algorithm.num_iterations must be at least 1");
        }
        if self.gradient_checkpointing_layers.is_some() && !self.gradient_checkpointing {
            bail!("gradient_checkpointing_layers is set but gradient_checkpointing is not: set gradient_checkpointing = true, or remove gradient_checkpointing_layers");
        }
        if self.algorithm.micro_batch_tokens == 0 {
            bail!("algorithm.micro_batch_tokens must be positive");
        }
        self.algorithm.loss.validate()?;
        self.algorithm.resample.validate()?;
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        if let Some(e) = &self.eval {
            if e.every == 0 || e.samples == 0 {
                bail!("eval.every and eval.samples must be positive");
            }
        }
        Ok(())
    }

    /// The advantage estimator in use.
    pub fn advantage_estimator(&self) -> AdvantageEstimator {
        self.algorithm
            .advantage
            .unwrap_or_else(|| self.algorithm.loss.default_advantage_estimator())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
model = "m"
output_dir = "runs/x"
steps = 10
seed = 1
[data]
train = "synthetic"
[rollout]
prompts_per_step = 4
num_generations = 8
max_new_tokens = 64
[optim]
lr = 1e-5
"#;

    #[test]
    fn minimal_recipe_gets_defaults() {
        let c = TrainConfig::from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.algorithm.loss.name(), "gpg");
        assert_eq!(c.advantage_estimator(), AdvantageEstimator::Gpg);
        assert_eq!(c.optim.adamw.weight_decay, 0.0);
        assert_eq!(c.rollout.temperature, 1.0);
        // The saved form reads back identically.
        let again = TrainConfig::from_toml_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let text = MINIMAL.replace("lr = 1e-5", "lr = 1e-5\nlearning_rate = 3");
        let err = format!("{:#}", TrainConfig::from_toml_str(&text).unwrap_err());
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn synthetic_levels_mix_and_read_back() {
        let c = TrainConfig::from_toml_str(MINIMAL).unwrap();
        // Not written when unset, so existing saved recipes are unchanged.
        assert!(!c.to_toml().unwrap().contains("levels"));
        let mut small = c.data.synthetic.clone();
        small.n_train = 50;
        small.n_heldout = 20;
        let single = small.generate().unwrap();
        let o = c
            .with_overrides(&["data.synthetic.levels=[1, 4]".into()])
            .unwrap();
        assert_eq!(o.data.synthetic.levels, vec![1, 4]);
        assert_eq!(
            TrainConfig::from_toml_str(&o.to_toml().unwrap()).unwrap(),
            o
        );
        let mixed = SyntheticTask {
            n_train: 50,
            n_heldout: 20,
            ..o.data.synthetic.clone()
        }
        .generate()
        .unwrap();
        assert_ne!(mixed, single);
        let bad = SyntheticTask {
            levels: vec![1, 7],
            ..small
        };
        assert!(bad.generate().is_err());
    }

    #[test]
    fn overrides_set_nested_keys() {
        let c = TrainConfig::from_toml_str(MINIMAL).unwrap();
        let o = c
            .with_overrides(&[
                "optim.lr=2e-6".into(),
                "rollout.num_generations=16".into(),
                "algorithm.loss.name=grpo".into(),
            ])
            .unwrap();
        assert_eq!(o.optim.lr, 2e-6);
        assert_eq!(o.rollout.num_generations, 16);
        assert_eq!(o.algorithm.loss.name(), "grpo");
        assert!(c.with_overrides(&["nonsense".into()]).is_err());
        assert!(c.with_overrides(&["optim.lrr=1".into()]).is_err());
    }
}
