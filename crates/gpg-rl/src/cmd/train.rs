//! `gpg-rl train`: RL training from a TOML recipe; with no recipe, the built-in demo.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use gpg::train::{TrainConfig, Trainer};

/// The demo recipe, compiled in so that `gpg-rl train` needs no argument.
const DEMO_RECIPE: &str = include_str!("../../../../recipes/demo.toml");

/// The demo's warm-start model (demo/model, 6.7 MB), compiled in so that a binary copied or
/// installed outside the checkout still runs the demo.
const DEMO_MODEL: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../../../demo/model/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../../../demo/model/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../../demo/model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../../demo/model/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../../demo/model/tokenizer_config.json"),
    ),
];

/// The demo model directory: `demo/model` from the working directory or the checkout this
/// binary was built from, else the compiled-in copy written next to the run folder
/// (`<output_dir>/../demo-model`, written once, atomically).
fn demo_model(model: &Path, output_dir: &Path) -> Result<PathBuf> {
    let found = resolve(model);
    if found.join("model.safetensors").is_file() {
        return Ok(found);
    }
    let parent = output_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = parent.join("demo-model");
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    eprintln!(
        "{} not found (looked in {} and {}): writing the built-in demo model to {}",
        model.display(),
        std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        repo_root().display(),
        dir.display()
    );
    let tmp = parent.join("demo-model.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    for (name, bytes) in DEMO_MODEL {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("{}: cannot write {name}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    Ok(dir)
}

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
    config.model = if args.config.is_none() && args.model.is_none() {
        demo_model(&config.model, &config.output_dir)?
    } else {
        resolve(&config.model)
    };
    if args.quiet {
        config.logging.progress = false;
    }
    // One rank of `mpirun -np N` / `srun`, or a single process.
    let collective = gpg::train::collective::from_environment(std::time::Duration::from_secs_f64(
        config.distributed.timeout_s,
    ))?;
    let result = train_ranks(args, config, collective.clone());
    if let Err(e) = &result {
        if collective.world() > 1 {
            // End the other ranks now rather than letting them wait for this one (MPI: prints
            // the error with the rank, then MPI_Abort ends every process).
            collective.abort(&format!("{e:#}"));
        }
    }
    result
}

/// Training as this rank takes part in it; rank 0 alone prints and writes the run folder.
fn train_ranks(
    args: &TrainArgs,
    config: TrainConfig,
    collective: std::sync::Arc<dyn gpg::train::collective::Collective>,
) -> Result<()> {
    let root = collective.rank() == 0;
    if collective.world() > 1 && root {
        eprintln!(
            "data-parallel run: {} ranks over {}",
            collective.world(),
            collective.backend()
        );
    }
    // The demo starts over on every plain run; a recipe's run folder is never replaced.
    if root
        && args.config.is_none()
        && !args.resume
        && config.output_dir.join("metrics.jsonl").exists()
    {
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
    let mut trainer = Trainer::with_collective(config, args.resume, collective)?;
    let start = trainer.step;
    let before = if start == 0 {
        trainer.evaluate()?
    } else {
        None
    };
    if let Some(p) = before {
        if root {
            eprintln!("held-out pass@1 before training: {:.1}%", 100.0 * p);
        }
        trainer.record_eval(0, p)?;
    }
    trainer.train(None)?;
    let final_dir = trainer.config.output_dir.join("final");
    trainer.save_final(&final_dir)?;
    if !root {
        return Ok(());
    }
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
