//! `gpg-rl sft`: supervised warm start from a TOML recipe (see recipes/demo-sft.toml).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use gpg::train::sft::{run_sft, SftConfig};

#[derive(Args)]
pub struct SftArgs {
    /// TOML recipe.
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides the recipe's `device` (cpu, cuda, cuda:N).
    #[arg(long)]
    pub device: Option<gpg::model::DeviceName>,
    /// Overrides the recipe's `precision` (f32 or bf16).
    #[arg(long)]
    pub precision: Option<gpg::model::Precision>,
}

pub fn run(args: &SftArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("{}: cannot read the recipe", args.config.display()))?;
    let mut config = SftConfig::from_toml_str(&text)
        .with_context(|| format!("{}: invalid recipe", args.config.display()))?;
    if let Some(device) = &args.device {
        config.device = device.clone();
    }
    if let Some(precision) = args.precision {
        config.precision = precision;
    }
    let pass = run_sft(&config)?;
    println!(
        "SFT done: model written to {}; held-out pass@1 (sampled, temperature 1) {:.1}%",
        config.output_dir.display(),
        100.0 * pass
    );
    Ok(())
}
