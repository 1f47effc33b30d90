//! Held-out accuracy during training: pass@1 as the mean over `samples` sampled completions
//! per prompt of the accuracy reward (mathematical equivalence with the gold answer).

use anyhow::{ensure, Context, Result};

use crate::data::PromptDataset;
use crate::eval::{evaluate, EvalConfig, EvalItem};
use crate::model::Qwen2;
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

/// Held-out pass@1: the mean over prompts and `samples` completions of 1[answer ≡ gold],
/// measured by [`crate::eval::evaluate`].
pub fn pass_at_1(
    model: &Qwen2,
    tokenizer: &Tokenizer,
    prompts: &[PreparedPrompt],
    samples: usize,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> Result<f64> {
    let items = prompts
        .iter()
        .map(|p| EvalItem::from_record(&p.record))
        .collect::<Result<Vec<_>>>()?;
    let config = EvalConfig {
        samples,
        temperature,
        top_p: 1.0,
        max_new_tokens,
        seed,
        stop_token_ids: tokenizer.token_to_id("<|im_end|>").into_iter().collect(),
        batch_prompts: 64,
        ..Default::default()
    };
    Ok(evaluate(model, tokenizer, &items, &config)?
        .summary
        .pass_at_1)
}
