//! Held-out accuracy during training: pass@1 as the mean over `samples` sampled completions
//! per prompt of the accuracy reward (mathematical equivalence with the gold answer).

use anyhow::{ensure, Context, Result};

use crate::data::PromptDataset;
use crate::model::Qwen2;
use crate::rollout::{self, SamplingParams};
use crate::tokenizer::Tokenizer;

use super::trainer::PreparedPrompt;

/// Tokenizes a dataset's prompts.
pub fn prepare(tokenizer: &Tokenizer, ds: PromptDataset) -> Result<Vec<PreparedPrompt>> {
    ds.records
        .into_iter()
        .map(|record| {
            let ids = tokenizer
                .encode_prompt(&record.prompt)
                .with_context(|| format!("{}: tokenizing the prompt", record.location))?;
            ensure!(!ids.is_empty(), "{}: the prompt is empty", record.location);
            Ok(PreparedPrompt { record, ids })
        })
        .collect()
}

/// Mean over prompts and samples of 1[completion's answer ≡ gold].
pub fn pass_at_1(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    prompts: &[PreparedPrompt],
    samples: usize,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> Result<f64> {
    let mut correct = 0usize;
    let mut total = 0usize;
    for chunk in prompts.chunks(64) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let params = SamplingParams {
            n: samples,
            max_new_tokens,
            temperature,
            seed,
            stop_token_ids: tokenizer.token_to_id("<|im_end|>").into_iter().collect(),
            ..Default::default()
        };
        for c in rollout::generate(model, tokenizer, &ids, &params)? {
            let gold = chunk[c.prompt_index]
                .record
                .answer
                .as_deref()
                .unwrap_or_default();
            correct += mathverify::is_correct(gold, &c.text) as usize;
            total += 1;
        }
    }
    Ok(correct as f64 / total.max(1) as f64)
}
