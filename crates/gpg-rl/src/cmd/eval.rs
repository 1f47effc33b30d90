//! `gpg-rl eval`: pass@1 (mean over k samples) and pass@k of a model on a benchmark.
//!
//! Per-item results (prompt, gold, every completion with its extracted answer and verdict) go
//! to a JSONL file, by default `<model>/eval-<benchmark>.jsonl` (`--output FILE` elsewhere,
//! `--no-output` for none). Lines are written as chunks of items finish, to `FILE.partial`,
//! which is renamed to `FILE` when the evaluation completes. The summary goes to stdout (as
//! text, or one JSON object with `--json`); progress to stderr.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use gpg::data::benchmarks::load_benchmark;
use gpg::eval::vl::{evaluate_vl_with_progress, load_vl_items};
use gpg::eval::{
    benchmark_items, evaluate_on, write_item_line, EvalConfig, EvalProgress, EvalReport,
    ItemResult, PromptStyle, DEFAULT_SYSTEM_PROMPT,
};
use gpg::image::ImageProcessor;
use gpg::model::{Qwen2VL, Qwen2VLConfig};
use gpg::tokenizer::Tokenizer;

use super::model_dir::{AdapterFlag, EngineFlags, GenerationDefaults, ModelDir};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A benchmark name (math500, gsm8k, aime24, amc23, minerva, olympiadbench; see
    /// data/benchmarks/README.md) or a JSONL file with `problem`/`question` and `answer`.
    #[arg(long)]
    pub benchmark: String,
    /// Samples per problem, k: pass@1 is the mean correctness over them, pass@k whether any
    /// is correct.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub samples: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.6)]
    pub temperature: f32,
    /// Nucleus sampling threshold (1 disables it).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 disables it).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate the first N problems only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Problems sampled together (the batch holds batch-prompts × samples sequences).
    #[arg(long, default_value_t = 16)]
    pub batch_prompts: usize,
    /// Per-item results (JSONL). Default: <model>/eval-<benchmark>.jsonl (<adapter>/… with
    /// --adapter).
    #[arg(long, conflicts_with = "no_output")]
    pub output: Option<PathBuf>,
    /// Write no per-item results.
    #[arg(long)]
    pub no_output: bool,
    #[command(flatten)]
    pub engine: EngineFlags,
    #[command(flatten)]
    pub adapter: AdapterFlag,
    /// Give the problem as raw text even when the tokenizer has a chat template.
    #[arg(long)]
    pub no_chat: bool,
    /// Instruction before the problem (a system message with the chat template). Default:
    /// "Please reason step by step, and put your final answer within \boxed{}."
    #[arg(long, conflicts_with = "no_system")]
    pub system: Option<String>,
    /// No instruction: the bare problem.
    #[arg(long)]
    pub no_system: bool,
    /// Stop a completion once it contains this text; repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl EvalArgs {
    fn config(&self, stop_token_ids: Vec<u32>) -> EvalConfig {
        EvalConfig {
            samples: self.samples,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            stop_token_ids,
            stop_strings: self.stop.clone(),
            batch_prompts: self.batch_prompts,
        }
    }

    fn style(&self) -> PromptStyle {
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
    fn output_path(&self, benchmark_name: &str) -> Option<PathBuf> {
        if self.no_output {
            return None;
        }
        Some(self.output.clone().unwrap_or_else(|| {
            // Results belong to what was evaluated: the adapter when one is given.
            let dir = self.adapter.adapter.as_ref().unwrap_or(&self.model);
            dir.join(format!("eval-{benchmark_name}.jsonl"))
        }))
    }
}

/// `FILE.partial`: where results are streamed until the evaluation completes.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if Qwen2VLConfig::is_vl_dir(&args.model) {
        return run_vl(args);
    }
    let benchmark = load_benchmark(&args.benchmark)
        .with_context(|| format!("--benchmark {}", args.benchmark))?;
    anyhow::ensure!(
        !benchmark.items.is_empty(),
        "{}: the benchmark has no problems",
        benchmark.path.display()
    );
    let dir = ModelDir::load_for_sampling(&args.model, &args.engine)
        .with_context(|| format!("--model {}", args.model.display()))?
        .with_adapter(&args.adapter)?;
    let engine = gpg::model::decoding::engine_for(&dir.model, &args.engine.device)?;
    let stop_ids = dir
        .generation
        .eos_token_id
        .as_ref()
        .map(|e| e.to_vec())
        .unwrap_or_default();
    let config = args.config(stop_ids);
    config.validate()?;
    let style = args.style();
    let mut items = benchmark_items(&benchmark, &style, &dir.tokenizer);
    if let Some(limit) = args.limit {
        anyhow::ensure!(limit >= 1, "--limit must be ≥ 1");
        items.truncate(limit);
    }

    if !args.quiet {
        eprintln!(
            "eval: {} ({} problems × {} samples, {}, temperature {}, top-p {}, max {} new tokens)",
            benchmark.name,
            items.len(),
            config.samples,
            if style.uses_chat(&dir.tokenizer) {
                "chat template"
            } else {
                "raw text"
            },
            config.temperature,
            config.top_p,
            config.max_new_tokens
        );
    }
    run_evaluation(args, &benchmark.name, |on_chunk| {
        evaluate_on(
            &dir.model,
            &*engine,
            &dir.tokenizer,
            &items,
            &config,
            on_chunk,
        )
    })
}

/// `--benchmark FILE.jsonl` of image questions with a Qwen2-VL-family model (answers checked
/// by visual accuracy; see `gpg::eval::vl`).
fn run_vl(args: &EvalArgs) -> Result<()> {
    anyhow::ensure!(
        args.adapter.adapter.is_none(),
        "--adapter: LoRA adapters are not supported for Qwen2-VL models yet"
    );
    let path = PathBuf::from(&args.benchmark);
    anyhow::ensure!(
        path.is_file(),
        "--benchmark {}: a vision-language model is evaluated on a JSONL file of image questions",
        args.benchmark
    );
    let device = args.engine.device.open()?;
    let model = Qwen2VL::load(&args.model, &device, args.engine.precision)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let processor = ImageProcessor::from_dir(&args.model)?;
    let stop_ids = GenerationDefaults::from_dir(&args.model)?
        .eos_token_id
        .map(|e| e.to_vec())
        .unwrap_or_default();
    let config = args.config(stop_ids);
    config.validate()?;
    // Image questions carry their own instructions; --system adds one.
    let mut items = load_vl_items(&path, args.system.as_deref())?;
    if let Some(limit) = args.limit {
        anyhow::ensure!(limit >= 1, "--limit must be ≥ 1");
        items.truncate(limit);
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "images".into());
    if !args.quiet {
        eprintln!(
            "eval: {name} ({} image questions × {} samples, temperature {}, max {} new tokens)",
            items.len(),
            config.samples,
            config.temperature,
            config.max_new_tokens
        );
    }
    run_evaluation(args, &name, |on_chunk| {
        evaluate_vl_with_progress(&model, &tokenizer, &processor, &items, &config, on_chunk)
    })
}

type OnChunk<'a> = dyn FnMut(&[ItemResult], &EvalProgress) -> Result<()> + 'a;

/// Runs `evaluate` with the per-item results streamed to the output file and prints the
/// summary.
fn run_evaluation(
    args: &EvalArgs,
    benchmark_name: &str,
    evaluate: impl FnOnce(&mut OnChunk<'_>) -> Result<EvalReport>,
) -> Result<()> {
    // Open the output before sampling, so that an unwritable path fails at once.
    let output = args.output_path(benchmark_name);
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
    let quiet = args.quiet;
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
    print_summary(args, benchmark_name, &report, output.as_deref())
}

/// `x` as the f64 with the same shortest decimal form (0.6f32 prints 0.6, not 0.6000000238).
fn json_f32(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn print_summary(
    args: &EvalArgs,
    benchmark: &str,
    report: &EvalReport,
    output: Option<&Path>,
) -> Result<()> {
    let s = &report.summary;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let tokens_per_second = if s.seconds > 0.0 {
        s.generated_tokens as f64 / s.seconds
    } else {
        0.0
    };
    if args.json {
        let line = serde_json::json!({
            "benchmark": benchmark,
            "model": args.model,
            "n_items": s.n_items,
            "samples": s.samples,
            "pass_at_1": s.pass_at_1,
            "pass_at_1_stderr": s.pass_at_1_stderr,
            "pass_at_k": s.pass_at_k,
            "mean_completion_tokens": s.mean_completion_tokens,
            "truncated_fraction": s.truncated_fraction,
            "generated_tokens": s.generated_tokens,
            "seconds": s.seconds,
            "tokens_per_second": tokens_per_second,
            "temperature": json_f32(args.temperature),
            "top_p": json_f32(args.top_p),
            "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "output": output,
        });
        writeln!(out, "{line}")?;
        return Ok(());
    }
    writeln!(
        out,
        "benchmark    {benchmark} ({} problems, {} samples each)",
        s.n_items, s.samples
    )?;
    writeln!(
        out,
        "pass@1       {:.4} ± {:.4}",
        s.pass_at_1, s.pass_at_1_stderr
    )?;
    writeln!(out, "pass@{:<7} {:.4}", s.samples, s.pass_at_k)?;
    writeln!(
        out,
        "mean tokens  {:.1} per completion ({:.1}% cut at --max-new-tokens)",
        s.mean_completion_tokens,
        100.0 * s.truncated_fraction
    )?;
    writeln!(
        out,
        "time         {:.1} s ({:.0} tokens/s)",
        s.seconds, tokens_per_second
    )?;
    if let Some(path) = output {
        writeln!(out, "results      {}", path.display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EvalArgs,
    }

    fn parse(extra: &[&str]) -> Result<EvalArgs, clap::Error> {
        let mut argv = vec!["eval", "--model", "m", "--benchmark", "math500"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        let args = parse(&[]).unwrap();
        let config = args.config(vec![]);
        assert_eq!(config, EvalConfig::default());
        assert_eq!(args.style(), PromptStyle::default());
        assert_eq!(
            args.output_path("math500"),
            Some(PathBuf::from("m/eval-math500.jsonl"))
        );
    }

    #[test]
    fn prompt_and_output_flags() {
        let args = parse(&[
            "--no-chat",
            "--system",
            "Think.",
            "--output",
            "r.jsonl",
            "-k",
            "4",
        ])
        .unwrap();
        assert_eq!(
            args.style(),
            PromptStyle {
                system_prompt: Some("Think.".into()),
                chat_template: false
            }
        );
        assert_eq!(args.output_path("x"), Some(PathBuf::from("r.jsonl")));
        assert_eq!(args.config(vec![7]).samples, 4);
        assert_eq!(args.config(vec![7]).stop_token_ids, vec![7]);
        let args = parse(&["--no-system", "--no-output"]).unwrap();
        assert_eq!(args.style().system_prompt, None);
        assert_eq!(args.output_path("x"), None);
        assert!(parse(&["--no-output", "--output", "r.jsonl"]).is_err());
        assert!(parse(&["--no-system", "--system", "s"]).is_err());
        assert_eq!(
            partial_path(Path::new("a/r.jsonl")),
            PathBuf::from("a/r.jsonl.partial")
        );
    }
}
