//! `gpg-rl eval`: pass@1 (mean over k samples) and pass@k of a model on a benchmark.
//!
//! Per-item results (prompt, gold, every completion with its extracted answer and verdict) go
//! to a JSONL file, by default `<model>/eval-<benchmark>.jsonl` (`--output FILE` elsewhere,
//! `--no-output` for none). Lines are written as chunks of items finish, to `FILE.partial`,
//! which is renamed to `FILE` when the evaluation completes. The summary goes to stdout (as
//! text, or one JSON object with `--json`); progress to stderr.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use gpg::commands::eval::{
    evaluate, summary_json, tokens_per_second, EvalOptions, EvalOutcome, ResultsFile,
};
use gpg::eval::EvalConfig;

use super::model_dir::{parse_chat_template_kwargs, AdapterFlag, EngineFlags, TemplateKwargs};

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
    /// Extra chat-template variables as a JSON object, as transformers'
    /// `apply_chat_template(..., **kwargs)` / TRL's `chat_template_kwargs`, e.g.
    /// '{"enable_thinking": false}' for Qwen3.
    #[arg(long, value_name = "JSON", conflicts_with = "no_chat", value_parser = parse_chat_template_kwargs)]
    pub chat_template_kwargs: Option<TemplateKwargs>,
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
    /// The library's options for these flags.
    fn options(&self) -> EvalOptions {
        EvalOptions {
            model: self.model.clone(),
            benchmark: self.benchmark.clone(),
            sampling: EvalConfig {
                samples: self.samples,
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                max_new_tokens: self.max_new_tokens,
                seed: self.seed,
                stop_token_ids: Vec::new(),
                stop_strings: self.stop.clone(),
                batch_prompts: self.batch_prompts,
            },
            limit: self.limit,
            results: match (&self.output, self.no_output) {
                (_, true) => ResultsFile::None,
                (Some(path), false) => ResultsFile::Path(path.clone()),
                (None, false) => ResultsFile::Default,
            },
            no_chat: self.no_chat,
            system: self.system.clone(),
            no_system: self.no_system,
            chat_template_kwargs: self.chat_template_kwargs.clone(),
            device: self.engine.device.clone(),
            precision: self.engine.precision,
            adapter: self.adapter.adapter.clone(),
            quiet: self.quiet,
        }
    }
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let options = args.options();
    let outcome = evaluate(&options)?;
    print_summary(args, &options, &outcome)
}

fn print_summary(args: &EvalArgs, options: &EvalOptions, outcome: &EvalOutcome) -> Result<()> {
    let s = &outcome.report.summary;
    let benchmark = &outcome.benchmark;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let tokens_per_second = tokens_per_second(outcome);
    if args.json {
        let line = summary_json(options, outcome);
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
    if let Some(path) = &outcome.output {
        writeln!(out, "results      {}", path.display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use gpg::commands::eval::partial_path;
    use gpg::eval::PromptStyle;
    use std::path::Path;

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
        let args = parse(&[]).unwrap().options();
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
        .unwrap()
        .options();
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
        let args = parse(&["--no-system", "--no-output"]).unwrap().options();
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
