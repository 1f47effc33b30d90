//! A training run as `gpg-rl train` runs it: the recipe (or the built-in demo) with overrides,
//! the held-out evaluation before training, the steps, the final model and curves.png.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::train::collective::Collective;
use crate::train::{TrainConfig, Trainer};

use super::demo;

/// Where a run's recipe comes from.
#[derive(Debug, Clone)]
pub enum Recipe {
    /// The built-in demo (recipes/demo.toml, compiled in).
    Demo,
    /// A TOML recipe file.
    File(PathBuf),
    /// A recipe already parsed (e.g. from a Python dict).
    Config(Box<TrainConfig>),
}

impl Recipe {
    pub fn is_demo(&self) -> bool {
        matches!(self, Recipe::Demo)
    }
}

/// The run's configuration: the recipe with `overrides` (`key=value`, as `--set`) applied and
/// its model resolved: the demo's model (found or written from the compiled-in copy) when the
/// recipe is the demo and `model_overridden` is false, else `model` looked up from the
/// repository root when it does not exist relative to the working directory.
pub fn prepare_config(
    recipe: &Recipe,
    overrides: &[String],
    model_overridden: bool,
) -> Result<TrainConfig> {
    let base = match recipe {
        Recipe::File(path) => TrainConfig::from_toml_file(path)?,
        Recipe::Demo => {
            eprintln!("no recipe given: running the built-in demo (recipes/demo.toml)");
            TrainConfig::from_toml_str(demo::DEMO_RECIPE).context("the built-in demo recipe")?
        }
        Recipe::Config(config) => {
            config.validate().context("the recipe")?;
            (**config).clone()
        }
    };
    let mut config = base.with_overrides(overrides)?;
    config.model = if recipe.is_demo() && !model_overridden {
        demo::demo_model(&config.model, &config.output_dir)?
    } else {
        demo::resolve(&config.model)
    };
    Ok(config)
}

/// The context of an error raised during training step N (1-based): nothing of that step was
/// written, and the checkpoints written before it are intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuringStep(pub u64);

impl std::fmt::Display for DuringStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "training step {} (the checkpoints written before it are intact; resuming continues \
             from the newest)",
            self.0
        )
    }
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub output_dir: PathBuf,
    /// `<output_dir>/final`: the trained model (or adapter).
    pub final_dir: PathBuf,
    /// The step the run started from (0, or the checkpoint's step when resuming).
    pub start_step: u64,
    /// Optimiser steps done at the end.
    pub step: u64,
    /// Seconds spent in this run's steps.
    pub step_seconds: f64,
    /// Held-out pass@1 before training (of the run's first evaluation when resuming).
    pub pass_at_1_before: Option<f64>,
    /// The last held-out pass@1 of the run.
    pub pass_at_1_after: Option<f64>,
    /// This rank writes the run folder (rank 0); the others report only the steps.
    pub root: bool,
}

/// Runs training as this rank takes part in it; rank 0 alone prints and writes the run folder.
/// A demo run (`replace_demo_run`) starts over unless resuming; a recipe's run folder is never
/// replaced. An error during training names the step it happened in. `stop`, when given,
/// stops the run between steps (or rollout rounds) once it is set, with a
/// [`Stopped`](crate::train::trainer::Stopped) error ([`Trainer::stop_when`]; the Python
/// package's Ctrl-C).
pub fn run(
    config: TrainConfig,
    replace_demo_run: bool,
    resume: bool,
    collective: Arc<dyn Collective>,
    stop: Option<Arc<AtomicBool>>,
) -> Result<TrainSummary> {
    let root = collective.rank() == 0;
    if collective.world() > 1 && root {
        eprintln!(
            "data-parallel run: {} ranks over {}",
            collective.world(),
            collective.backend()
        );
    }
    if root && replace_demo_run && !resume && config.output_dir.join("metrics.jsonl").exists() {
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
    let mut trainer = Trainer::with_collective(config, resume, collective)?;
    if let Some(flag) = stop {
        trainer.stop_when(flag);
    }
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
    let trained = trainer.train(None);
    trained.context(DuringStep(trainer.step + 1))?;
    let output_dir = trainer.config.output_dir.clone();
    let final_dir = output_dir.join("final");
    trainer.save_final(&final_dir)?;
    let mut summary = TrainSummary {
        output_dir: output_dir.clone(),
        final_dir,
        start_step: start,
        step: trainer.step,
        step_seconds: 0.0,
        pass_at_1_before: before.or_else(|| trainer.first_eval()),
        pass_at_1_after: None,
        root,
    };
    if !root {
        return Ok(summary);
    }
    let metrics = crate::train::metrics::read_metrics(&output_dir.join("metrics.jsonl"))?;
    summary.pass_at_1_after = metrics.iter().rev().find_map(|m| m.eval_pass_at_1);
    let mut eval_points: Vec<(u64, f64)> = summary
        .pass_at_1_before
        .map(|p| (0, p))
        .into_iter()
        .collect();
    eval_points.extend(
        metrics
            .iter()
            .filter_map(|m| m.eval_pass_at_1.map(|p| (m.step, p))),
    );
    crate::train::plot::write_curves(&metrics, &eval_points, &output_dir.join("curves.png"))?;
    summary.step_seconds = metrics
        .iter()
        .filter(|m| m.step > start)
        .map(|m| m.time_step_s)
        .sum();
    Ok(summary)
}

/// The summary lines `gpg-rl train` prints at the end.
pub fn summary_lines(summary: &TrainSummary) -> Vec<String> {
    let mut lines = vec![format!(
        "trained {} steps in {:.0} s; model written to {}",
        summary.step - summary.start_step,
        summary.step_seconds,
        summary.final_dir.display()
    )];
    if let Some(p) = summary.pass_at_1_before {
        lines.push(format!("held-out pass@1 before: {:.1}%", 100.0 * p));
    }
    if let Some(p) = summary.pass_at_1_after {
        lines.push(format!("held-out pass@1 after:  {:.1}%", 100.0 * p));
    }
    lines
}

/// `output_dir=DIR` as an override (quoted as a TOML string).
pub fn output_dir_override(dir: &Path) -> String {
    format!("output_dir={:?}", dir.display().to_string())
}

/// `model=DIR` as an override (quoted as a TOML string).
pub fn model_override(dir: &Path) -> String {
    format!("model={:?}", dir.display().to_string())
}
