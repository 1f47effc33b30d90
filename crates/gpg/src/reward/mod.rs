//! Rewards: a `Reward` trait and the built-in reward functions.
//!
//! A reward function maps a batch of (prompt, completion, gold answer, completion length)
//! to one score per completion. Scoring is batched so that a reward backed by an external
//! process pays its start-up cost once per batch, not once per completion.
//!
//! Built-ins (names as used in [`RewardConfig`]):
//! * `accuracy`: 1 if the completion's answer equals the gold answer (mathverify), else 0;
//! * `format`: 1 if the completion is `<think>…</think> <answer>…</answer>`, else 0;
//! * `boxed_format`: 1 if the completion contains a non-empty `\boxed{…}`, else 0;
//! * `cosine`: accuracy scaled by completion length with a cosine schedule;
//! * `exact_match`: 1 if the trimmed completion equals the trimmed gold answer, else 0;
//! * `length`: −|characters − target| (TRL's quick-start reward; smoke tests, benchmarks);
//! * `external`: scores computed by a child process speaking JSON lines;
//! * `in_process`: a reward registered by the program that runs the trainer (the Python
//!   package's reward functions; see [`in_process`]);
//! * `visual_accuracy`, `box_iou`: the reference's visual-task rewards (see [`visual`]).
//!
//! [`WeightedSum`] combines several of them; [`RewardConfig`] builds one from a config file.

use std::sync::Arc;

use serde_json::{Map, Value};

mod accuracy;
mod config;
mod cosine;
mod exact;
pub(crate) mod external;
mod format;
pub mod in_process;
mod length;
pub mod visual;
mod weighted;

pub use accuracy::AccuracyReward;
pub use config::{RewardConfig, RewardSpec, REWARD_NAMES};
pub use cosine::{CosineLengthReward, CosineOptions};
pub use exact::ExactMatchReward;
pub use external::{ExternalOptions, ExternalReward};
pub use format::{BoxedFormatReward, ThinkAnswerFormatReward};
pub use in_process::InProcessOptions;
pub use length::{LengthOptions, LengthReward};
pub use visual::{BoxIouReward, VisualAccuracyReward};
pub use weighted::{RewardScores, WeightedSum};

/// One completion to score, with what a reward function may need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewardInput {
    /// The prompt text as shown to the model (rendered, or the raw question).
    pub prompt: String,
    /// The model's completion (generated text only, without the prompt).
    pub completion: String,
    /// The reference answer, when the dataset has one.
    pub answer: Option<String>,
    /// Number of tokens in the completion.
    pub completion_tokens: usize,
    /// The dataset record's other columns ([`PromptRecord::columns`](crate::data::PromptRecord)),
    /// shared by the completions of one prompt. The built-in and external rewards ignore them;
    /// in-process (Python) reward functions get them as keyword lists.
    pub columns: Arc<Map<String, Value>>,
}

/// A reward function over a batch of completions.
///
/// Invariant: `score(batch)` returns exactly `batch.len()` finite scores, in batch order.
pub trait Reward: Send + Sync {
    /// Short name used in logs and configs (e.g. `accuracy`).
    fn name(&self) -> &str;
    /// One score per completion of `batch`, in order.
    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>>;
}

/// `r_i = score(gold_i, completion_i)` for a reward whose every item needs a gold answer
/// (checked first, the error naming the reward and the item); items are scored in parallel.
fn score_against_gold(
    reward: &str,
    batch: &[RewardInput],
    score: impl Fn(&str, &str) -> f32 + Sync,
) -> anyhow::Result<Vec<f32>> {
    use rayon::prelude::*;
    let golds = batch
        .iter()
        .enumerate()
        .map(|(i, input)| require_answer(reward, i, input))
        .collect::<anyhow::Result<Vec<&str>>>()?;
    Ok(batch
        .par_iter()
        .zip(golds.par_iter())
        .map(|(input, gold)| score(gold, &input.completion))
        .collect())
}

/// The gold answer of batch item `index`, or an error naming the reward and the item.
fn require_answer<'a>(
    reward: &str,
    index: usize,
    input: &'a RewardInput,
) -> anyhow::Result<&'a str> {
    input.answer.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "reward `{reward}` needs a gold answer, but batch item {index} has none \
             (does the dataset have an answer field?)"
        )
    })
}
