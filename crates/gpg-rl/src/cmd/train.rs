//! `gpg-rl train`: RL training from a TOML recipe; with no recipe, the built-in demo.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use gpg::commands::train::{self, Recipe};

#[derive(Args)]
pub struct TrainArgs {
    /// TOML recipe (see recipes/). Without it, the built-in demo runs.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a recipe key, e.g. `--set optim.lr=2e-6 --set rollout.num_generations=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in output_dir from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Shorthand for --set output_dir=DIR.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Shorthand for --set steps=N.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Shorthand for --set model=DIR.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let recipe = match &args.config {
        Some(path) => Recipe::File(path.clone()),
        None => Recipe::Demo,
    };
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.output_dir {
        overrides.push(train::output_dir_override(dir));
    }
    if let Some(steps) = args.steps {
        overrides.push(format!("steps={steps}"));
    }
    if let Some(model) = &args.model {
        overrides.push(train::model_override(model));
    }
    let mut config = train::prepare_config(&recipe, &overrides, args.model.is_some())?;
    if args.quiet {
        config.logging.progress = false;
    }
    // One rank of `mpirun -np N` / `srun`, or a single process.
    let collective = gpg::train::collective::from_environment(std::time::Duration::from_secs_f64(
        config.distributed.timeout_s,
    ))?;
    let result = train::run(
        config,
        recipe.is_demo(),
        args.resume,
        collective.clone(),
        None,
    );
    match result {
        Ok(summary) => {
            if summary.root {
                for line in train::summary_lines(&summary) {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Err(e) => {
            if collective.world() > 1 {
                // End the other ranks now rather than letting them wait for this one (MPI:
                // prints the error with the rank, then MPI_Abort ends every process).
                collective.abort(&format!("{e:#}"));
            }
            Err(e)
        }
    }
}
