//! `gpg-rl merge`: a base model with a LoRA adapter merged in (W ← W + s·B·A on every adapted
//! layer), written as a plain Hugging Face model directory that transformers loads without
//! PEFT (what PEFT's `merge_and_unload` + `save_pretrained` give).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::model_dir::{EngineFlags, ModelDir};

#[derive(Args)]
pub struct MergeArgs {
    /// The base model directory the adapter was trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// The PEFT LoRA adapter directory.
    #[arg(long, required = true)]
    pub adapter: PathBuf,
    /// Where the merged model is written (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub engine: EngineFlags,
}

pub fn run(args: &MergeArgs) -> Result<()> {
    if args.out.exists() {
        bail!(
            "{}: already exists; choose a new directory for the merged model",
            args.out.display()
        );
    }
    let dir = ModelDir::load(&args.model, &args.engine.device, args.engine.precision)
        .with_context(|| format!("--model {}", args.model.display()))?
        .with_adapter(Some(&args.adapter))?;
    let merged = dir.model.merged()?;
    let mut tmp_name = args.out.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = args.out.with_file_name(tmp_name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    merged.save_pretrained(&tmp)?;
    dir.tokenizer.save_pretrained(&tmp)?;
    let generation = args.model.join("generation_config.json");
    if generation.is_file() {
        std::fs::copy(&generation, tmp.join("generation_config.json"))
            .with_context(|| format!("{}: cannot copy", generation.display()))?;
    }
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), args.out.display()))?;
    let n = dir.model.adapter().map_or(0, |a| a.modules().len());
    println!(
        "merged {n} adapted layers of {} into {}",
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}
