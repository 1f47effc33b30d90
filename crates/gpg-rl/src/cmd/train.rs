//! `gpg-rl train`: RL training from a TOML recipe; with no recipe, the built-in demo.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use gpg::train::{TrainConfig, Trainer};

/// The demo recipe, compiled in so that `gpg-rl train` needs no argument.
const DEMO_RECIPE: &str = include_str!("../../../../recipes/demo.toml");

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

/// The repository root (where the demo's model and recipes live).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A relative path that does not exist from the working directory is looked up from the
/// repository root (so the demo runs from anywhere).
fn resolve(path: &Path) -> PathBuf {
    if path.is_relative() && !path.exists() {
        let candidate = repo_root().join(path);
        if candidate.exists() {
            return candidate;
        }
    }
    path.to_path_buf()
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let base = match &args.config {
        Some(path) => TrainConfig::from_toml_file(path)?,
        None => {
            eprintln!("no --config given: running the built-in demo (recipes/demo.toml)");
            TrainConfig::from_toml_str(DEMO_RECIPE).context("the built-in demo recipe")?
        }
    };
    let mut overrides = args.overrides.clone();
    if let Some(dir) = &args.output_dir {
        overrides.push(format!("output_dir={:?}", dir.display().to_string()));
    }
    if let Some(steps) = args.steps {
        overrides.push(format!("steps={steps}"));
    }
    if let Some(model) = &args.model {
        overrides.push(format!("model={:?}", model.display().to_string()));
    }
    let mut config = base.with_overrides(&overrides)?;
    config.model = resolve(&config.model);
    // The demo starts over on every plain run; a recipe's run folder is never replaced.
    if args.config.is_none() && !args.resume && config.output_dir.join("metrics.jsonl").exists() {
        eprintln!(
            "replacing the previous demo run in {}",
            config.output_dir.display()
        );
        std::fs::remove_dir_all(&config.output_dir).with_context(|| {
            format!(
                "{}: cannot remove the previous demo run",
                config.output_dir.display()
            )
        })?;
    }
    if args.quiet {
        config.logging.progress = false;
    }
    let mut trainer = Trainer::new(config, args.resume)?;
    let start = trainer.step;
    let before = if start == 0 {
        trainer.evaluate()?
    } else {
        None
    };
    if let Some(p) = before {
        eprintln!("held-out pass@1 before training: {:.1}%", 100.0 * p);
        trainer.record_eval(0, p)?;
    }
    trainer.train(None)?;
    let final_dir = trainer.config.output_dir.join("final");
    trainer.save_final(&final_dir)?;
    let metrics =
        gpg::train::metrics::read_metrics(&trainer.config.output_dir.join("metrics.jsonl"))?;
    let after = metrics.iter().rev().find_map(|m| m.eval_pass_at_1);
    let mut eval_points: Vec<(u64, f64)> = before
        .or_else(|| trainer.first_eval())
        .map(|p| (0, p))
        .into_iter()
        .collect();
    eval_points.extend(
        metrics
            .iter()
            .filter_map(|m| m.eval_pass_at_1.map(|p| (m.step, p))),
    );
    let curves = trainer.config.output_dir.join("curves.png");
    gpg::train::plot::write_curves(&metrics, &eval_points, &curves)?;
    let secs: f64 = metrics.iter().map(|m| m.time_step_s).sum();
    println!(
        "trained {} steps in {:.0} s; model written to {}",
        trainer.step - start,
        secs,
        final_dir.display()
    );
    if let Some(p) = before.or_else(|| trainer.first_eval()) {
        println!("held-out pass@1 before: {:.1}%", 100.0 * p);
    }
    if let Some(p) = after {
        println!("held-out pass@1 after:  {:.1}%", 100.0 * p);
    }
    Ok(())
}
