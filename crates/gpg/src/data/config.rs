//! The recipe's `[data]` table: where the prompts come from (a file or the built-in synthetic
//! task), how their fields map, and the prompt-length limit.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::difficulty::SampleStrategy;
use super::synthetic::{generate_mixed_split, SyntheticConfig, SyntheticSplit};
use super::{LongPromptPolicy, PromptDatasetConfig};

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A JSONL or Parquet file, or `synthetic` for the built-in arithmetic task.
    pub train: String,
    /// Field names, system prompt, chat template.
    #[serde(default)]
    pub fields: PromptDatasetConfig,
    /// Prompts longer than this many tokens are dropped (with a count) or rejected.
    #[serde(default = "default_max_prompt_tokens")]
    pub max_prompt_tokens: usize,
    #[serde(default = "default_long_prompts")]
    pub long_prompts: LongPromptPolicy,
    /// The built-in task's difficulty and sizes (with `train = "synthetic"`).
    #[serde(default)]
    pub synthetic: SyntheticTask,
    /// Difficulty-weighted prompt sampling (the GPG authors' `--weighted_sample
    /// --sample_strategy`): `uniform`, `hard`, `soft` or `medium`; absent, every epoch is a
    /// plain shuffle. See [`super::difficulty`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_strategy: Option<SampleStrategy>,
}

/// Sizes and difficulty of the built-in synthetic task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticTask {
    pub level: Option<u8>,
    /// Preset levels mixed: each problem's level is drawn uniformly from this list (e.g.
    /// `[1, 2, 3, 4]`); when non-empty it replaces `level` and `config`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<u8>,
    pub config: Option<SyntheticConfig>,
    pub seed: u64,
    pub n_train: usize,
    pub n_heldout: usize,
}

impl Default for SyntheticTask {
    fn default() -> Self {
        Self {
            level: Some(2),
            levels: Vec::new(),
            config: None,
            seed: 1234,
            n_train: 20_000,
            n_heldout: 200,
        }
    }
}

impl SyntheticTask {
    pub fn resolve(&self) -> Result<SyntheticConfig> {
        match (&self.config, self.level) {
            (Some(c), _) => Ok(c.clone()),
            (None, Some(level)) => SyntheticConfig::level(level),
            (None, None) => Ok(SyntheticConfig::default()),
        }
    }

    /// The training and held-out problems (`levels` mixed when given, else [`Self::resolve`]).
    pub fn generate(&self) -> Result<SyntheticSplit> {
        let configs = if self.levels.is_empty() {
            vec![self.resolve()?]
        } else {
            self.levels
                .iter()
                .map(|&level| SyntheticConfig::level(level))
                .collect::<Result<_>>()?
        };
        generate_mixed_split(&configs, self.seed, self.n_train, self.n_heldout)
    }
}

fn default_max_prompt_tokens() -> usize {
    512
}
fn default_long_prompts() -> LongPromptPolicy {
    LongPromptPolicy::Drop
}
