//! How a training run (RL or SFT) sets up its LoRA adapter: a fresh one (A Kaiming-uniform,
//! B zero, from the run's seed) at the start, or the checkpoint's when resuming, checked
//! against the recipe's `[lora]` table.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::model::lora::{Adapter, LoraConfig};
use crate::model::Qwen2;

/// Attaches the run's adapter to `model` (the base, loaded from `base_dir`).
pub fn attach_adapter(
    model: &mut Qwen2,
    lora: &LoraConfig,
    seed: u64,
    base_dir: &Path,
    resume_from: Option<&Path>,
) -> Result<()> {
    let adapter = match resume_from {
        None => Adapter::init(lora, model, seed, &base_dir.display().to_string())
            .context("[lora]: cannot build the adapter")?,
        Some(dir) => {
            let adapter = Adapter::load_peft(dir, model)?;
            let saved = &adapter.config;
            if (
                saved.rank,
                saved.alpha,
                saved.use_rslora,
                &saved.target_modules,
            ) != (lora.rank, lora.alpha, lora.use_rslora, &lora.target_modules)
                || saved.dropout != lora.dropout
            {
                bail!(
                    "{}: the checkpoint's adapter (r {}, alpha {}, dropout {}, use_rslora {}, target_modules {:?}) differs from the recipe's [lora] (r {}, alpha {}, dropout {}, use_rslora {}, target_modules {:?})",
                    dir.display(),
                    saved.rank,
                    saved.alpha,
                    saved.dropout,
                    saved.use_rslora,
                    saved.target_modules,
                    lora.rank,
                    lora.alpha,
                    lora.dropout,
                    lora.use_rslora,
                    lora.target_modules
                );
            }
            adapter
        }
    };
    model.set_adapter(adapter)
}
