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
}

pub fn run(args: &SftArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("{}: cannot read the recipe", args.config.display()))?;
    let config = SftConfig::from_toml_str(&text)
        .with_context(|| format!("{}: invalid recipe", args.config.display()))?;
    let pass = run_sft(&config)?;
    println!(
        "SFT done: model written to {}; held-out pass@1 (sampled, temperature 1) {:.1}%",
        config.output_dir.display(),
        100.0 * pass
    );
    Ok(())
}
