//! Prompts ready for sampling: a dataset's records tokenized ([`PreparedPrompt`]), loaded and
//! filtered as the recipe's `[data]` table says ([`load_prompts`]).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use crate::tokenizer::Tokenizer;

use super::{synthetic, DataConfig, PromptDataset, PromptRecord};

/// A prompt ready for sampling.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub record: PromptRecord,
    pub ids: Vec<u32>,
    /// The prompt's images, in order (image questions for a vision-language policy).
    pub images: Vec<PathBuf>,
}

/// Prompts and their token ids, loaded and filtered as the recipe's `[data]` says. Returns the
/// training set and, for the synthetic task, its held-out split.
pub fn load_prompts(
    data: &DataConfig,
    tokenizer: &Tokenizer,
) -> Result<(Vec<PreparedPrompt>, Option<Vec<PreparedPrompt>>)> {
    let (mut train, heldout) = if data.train == "synthetic" {
        let split = data.synthetic.generate()?;
        (
            synthetic::to_dataset(&split.train, &data.fields)?,
            Some(synthetic::to_dataset(&split.heldout, &data.fields)?),
        )
    } else {
        (PromptDataset::load(&data.train, &data.fields)?, None)
    };
    let dropped =
        train.limit_prompt_length_with(data.max_prompt_tokens, data.long_prompts, &|p| {
            Ok(tokenizer.encode_prompt(p)?.len())
        })?;
    if dropped > 0 {
        eprintln!(
            "dropped {dropped} prompts longer than {} tokens from {}",
            data.max_prompt_tokens, train.source
        );
    }
    ensure!(
        !train.is_empty(),
        "{}: no prompt left after dropping those longer than {} tokens",
        train.source,
        data.max_prompt_tokens
    );
    let prepare = |ds| prepare_prompts(tokenizer, ds);
    Ok((prepare(train)?, heldout.map(prepare).transpose()?))
}

/// Tokenizes a dataset's prompts.
pub fn prepare_prompts(tokenizer: &Tokenizer, ds: PromptDataset) -> Result<Vec<PreparedPrompt>> {
    ds.records
        .into_iter()
        .map(|record| {
            let ids = tokenizer
                .encode_prompt(&record.prompt)
                .with_context(|| format!("{}: tokenizing the prompt", record.location))?;
            ensure!(!ids.is_empty(), "{}: the prompt is empty", record.location);
            Ok(PreparedPrompt {
                record,
                ids,
                images: Vec::new(),
            })
        })
        .collect()
}

/// SHA-256 of the prompts' token ids (the ranks of a data-parallel run must train on the same
/// data).
pub fn prompts_digest(prompts: &[PreparedPrompt]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in prompts {
        h.update((p.ids.len() as u64).to_le_bytes());
        for id in &p.ids {
            h.update(id.to_le_bytes());
        }
    }
    h.finalize().to_vec()
}
