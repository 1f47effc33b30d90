//! `gpg-rl eval`: pass@1 (mean over k samples) and pass@k of a model on a benchmark.
//!
//! Per-item results (prompt, gold, every completion with its extracted answer and verdict) go
//! to a JSONL file, by default `<model>/eval-<benchmark>.jsonl` (`<adapter>/…` with an
//! adapter). Lines are written as chunks of items finish, to `FILE.partial`, which is renamed
//! to `FILE` when the evaluation completes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::data::benchmarks::load_benchmark;
use crate::eval::vl::load_vl_items;
use crate::eval::{
    benchmark_items, evaluate_on, write_item_line, EvalConfig, EvalItem, EvalProgress, EvalReport,
    ItemResult, PromptStyle, Vision, DEFAULT_SYSTEM_PROMPT,
};
use crate::model::{DeviceName, Precision};

use super::model_dir::ModelDir;

/// Where the per-item results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultsFile {
    /// `<model>/eval-<benchmark>.jsonl` (`<adapter>/…` with an adapter).
    Default,
    Path(PathBuf),
    /// Nowhere.
    None,
}

/// What to evaluate, on what, how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Hugging Face model directory.
    pub model: PathBuf,
    /// A benchmark name (math500, gsm8k, …; data/benchmarks/README.md) or a JSONL file.
    pub benchmark: String,
    /// Sampling: samples per problem, temperature, top-p, top-k, max new tokens, seed, stop
    /// strings, batch size (the stop token ids come from the model's generation_config.json).
    pub sampling: EvalConfig,
    /// Evaluate the first N problems only.
    pub limit: Option<usize>,
    pub results: ResultsFile,
    /// Give the problem as raw text even when the tokenizer has a chat template.
    pub no_chat: bool,
    /// Instruction before the problem. None: [`DEFAULT_SYSTEM_PROMPT`] (unless `no_system`).
    pub system: Option<String>,
    /// No instruction: the bare problem.
    pub no_system: bool,
    /// Extra chat-template variables, e.g. `{"enable_thinking": false}` for Qwen3; None: the
    /// template's defaults.
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    pub device: DeviceName,
    pub precision: Precision,
    /// A PEFT LoRA adapter directory applied to `model`.
    pub adapter: Option<PathBuf>,
    /// No progress on stderr.
    pub quiet: bool,
}

impl EvalOptions {
    /// The command line's defaults for `model` on `benchmark`.
    pub fn new(model: PathBuf, benchmark: String) -> Self {
        Self {
            model,
            benchmark,
            sampling: EvalConfig::default(),
            limit: None,
            results: ResultsFile::Default,
            no_chat: false,
            system: None,
            no_system: false,
            chat_template_kwargs: None,
            device: DeviceName::default(),
            precision: Precision::F32,
            adapter: None,
            quiet: false,
        }
    }

    /// The sampling configuration with the model's stop token ids.
    pub fn config(&self, stop_token_ids: Vec<u32>) -> EvalConfig {
        EvalConfig {
            stop_token_ids,
            ..self.sampling.clone()
        }
    }

    /// How problems are shown to a text model.
    pub fn style(&self) -> PromptStyle {
        let system_prompt = if self.no_system {
            None
        } else {
            Some(
                self.system
                    .clone()
                    .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string()),
            )
        };
        PromptStyle {
            system_prompt,
            chat_template: !self.no_chat,
        }
    }

    /// Where per-item results go (None: nowhere).
    pub fn output_path(&self, benchmark_name: &str) -> Option<PathBuf> {
        match &self.results {
            ResultsFile::None => None,
            ResultsFile::Path(path) => Some(path.clone()),
            ResultsFile::Default => {
                // Results belong to what was evaluated: the adapter when one is given.
                let dir = self.adapter.as_ref().unwrap_or(&self.model);
                Some(dir.join(format!("eval-{benchmark_name}.jsonl")))
            }
        }
    }
}

/// An evaluation's results.
#[derive(Debug)]
pub struct EvalOutcome {
    /// The benchmark's name (a file's stem for a JSONL file).
    pub benchmark: String,
    pub report: EvalReport,
    /// The per-item results file, when written.
    pub output: Option<PathBuf>,
}

/// `FILE.partial`: where results are streamed until the evaluation completes.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Evaluates the model of `options` on its benchmark (image questions for a Qwen2-VL-family
/// model), streaming per-item results to the results file and progress to stderr.
pub fn evaluate(options: &EvalOptions) -> Result<EvalOutcome> {
    let dir = ModelDir::load_any_for_sampling(&options.model, &options.device, options.precision)
        .with_context(|| format!("model {}", options.model.display()))?
        .with_adapter(options.adapter.as_deref())?
        .with_chat_template_kwargs(options.chat_template_kwargs.clone());
    let engine = crate::model::decoding::engine_for(&dir.model, &options.device)?;
    let config = options.config(dir.generation.stop_token_ids());
    config.validate()?;
    let Questions {
        name,
        mut items,
        format,
    } = questions(options, &dir)?;
    if let Some(limit) = options.limit {
        anyhow::ensure!(limit >= 1, "limit must be ≥ 1");
        items.truncate(limit);
    }
    if !options.quiet {
        match format {
            Some(format) => eprintln!(
                "eval: {name} ({} problems × {} samples, {format}, temperature {}, top-p {}, max {} new tokens)",
                items.len(),
                config.samples,
                config.temperature,
                config.top_p,
                config.max_new_tokens
            ),
            None => eprintln!(
                "eval: {name} ({} image questions × {} samples, temperature {}, max {} new tokens)",
                items.len(),
                config.samples,
                config.temperature,
                config.max_new_tokens
            ),
        }
    }
    let vision = dir.vl().zip(dir.tower.as_deref()).map(|(model, t)| Vision {
        model,
        processor: &t.processor,
    });
    run_evaluation(options, &name, |on_chunk| {
        evaluate_on(
            &dir.model,
            &*engine,
            vision,
            &dir.tokenizer,
            &items,
            &config,
            on_chunk,
        )
    })
}

/// The items a model is evaluated on, with the benchmark's name.
struct Questions {
    name: String,
    items: Vec<EvalItem>,
    /// How a text model is given the problems (chat template or raw text); `None` for image
    /// questions (they carry their own chat).
    format: Option<&'static str>,
}

/// The benchmark's items: a model with a tower reads a JSONL file of image questions (see
/// `crate::eval::vl`; `system` adds an instruction), a text model a benchmark or JSONL file of
/// problems asked in the options' style.
fn questions(options: &EvalOptions, dir: &ModelDir) -> Result<Questions> {
    if dir.tower.is_some() {
        let path = PathBuf::from(&options.benchmark);
        anyhow::ensure!(
            path.is_file(),
            "benchmark {}: a vision-language model is evaluated on a JSONL file of image questions",
            options.benchmark
        );
        let items = load_vl_items(&path, options.system.as_deref())?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "images".into());
        return Ok(Questions {
            name,
            items,
            format: None,
        });
    }
    let benchmark = load_benchmark(&options.benchmark)
        .with_context(|| format!("benchmark {}", options.benchmark))?;
    anyhow::ensure!(
        !benchmark.items.is_empty(),
        "{}: the benchmark has no problems",
        benchmark.path.display()
    );
    let style = options.style();
    let items = benchmark_items(&benchmark, &style, &dir.tokenizer);
    let format = if style.uses_chat(&dir.tokenizer) {
        "chat template"
    } else {
        "raw text"
    };
    Ok(Questions {
        name: benchmark.name,
        items,
        format: Some(format),
    })
}

type OnChunk<'a> = dyn FnMut(&[ItemResult], &EvalProgress) -> Result<()> + 'a;

/// Runs `evaluate` with the per-item results streamed to the results file.
fn run_evaluation(
    options: &EvalOptions,
    benchmark_name: &str,
    evaluate: impl FnOnce(&mut OnChunk<'_>) -> Result<EvalReport>,
) -> Result<EvalOutcome> {
    // Open the output before sampling, so that an unwritable path fails at once.
    let output = options.output_path(benchmark_name);
    let mut writer = match &output {
        Some(path) => {
            let partial = partial_path(path);
            let file = File::create(&partial).with_context(|| {
                format!("{}: cannot create the results file (choose another with --output, or --no-output)", partial.display())
            })?;
            Some((partial, BufWriter::new(file)))
        }
        None => None,
    };
    let quiet = options.quiet;
    let mut written = 0usize;
    let result = evaluate(&mut |new: &[ItemResult], progress: &EvalProgress| {
        if let Some((partial, w)) = writer.as_mut() {
            for item in new {
                write_item_line(item, w).with_context(|| partial.display().to_string())?;
                written += 1;
            }
            w.flush()
                .with_context(|| format!("{}: cannot write", partial.display()))?;
        }
        if !quiet {
            eprintln!(
                "eval: {}/{} problems, pass@1 so far {:.4}, {} tokens, {:.1} s",
                progress.items_done,
                progress.items_total,
                progress.pass_at_1_so_far,
                progress.generated_tokens,
                progress.seconds
            );
        }
        Ok(())
    });
    let report = match result {
        Ok(report) => report,
        Err(err) => {
            return Err(match writer {
                // Nothing was written: leave no file behind.
                Some((partial, _)) if written == 0 => {
                    let _ = std::fs::remove_file(&partial);
                    err
                }
                Some((partial, _)) => err.context(format!(
                    "the results of the {written} problems done are in {}",
                    partial.display()
                )),
                None => err,
            });
        }
    };
    if let (Some((partial, w)), Some(path)) = (writer, &output) {
        drop(
            w.into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("{}: cannot write", partial.display()))?,
        );
        std::fs::rename(&partial, path).with_context(|| {
            format!("cannot rename {} to {}", partial.display(), path.display())
        })?;
    }
    Ok(EvalOutcome {
        benchmark: benchmark_name.to_string(),
        report,
        output,
    })
}

/// `x` as the f64 with the same shortest decimal form (0.6f32 prints 0.6, not 0.6000000238).
fn json_f32(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// The summary as one JSON object (what `gpg-rl eval --json` prints).
pub fn summary_json(options: &EvalOptions, outcome: &EvalOutcome) -> serde_json::Value {
    let s = &outcome.report.summary;
    let c = &options.sampling;
    serde_json::json!({
        "benchmark": outcome.benchmark,
        "model": options.model,
        "n_items": s.n_items,
        "samples": s.samples,
        "pass_at_1": s.pass_at_1,
        "pass_at_1_stderr": s.pass_at_1_stderr,
        "pass_at_k": s.pass_at_k,
        "mean_completion_tokens": s.mean_completion_tokens,
        "truncated_fraction": s.truncated_fraction,
        "generated_tokens": s.generated_tokens,
        "seconds": s.seconds,
        "tokens_per_second": tokens_per_second(outcome),
        "temperature": json_f32(c.temperature),
        "top_p": json_f32(c.top_p),
        "top_k": c.top_k,
        "max_new_tokens": c.max_new_tokens,
        "seed": c.seed,
        "output": outcome.output,
    })
}

/// Generated tokens per second of sampling (0 when no time was measured).
pub fn tokens_per_second(outcome: &EvalOutcome) -> f64 {
    let s = &outcome.report.summary;
    if s.seconds > 0.0 {
        s.generated_tokens as f64 / s.seconds
    } else {
        0.0
    }
}
