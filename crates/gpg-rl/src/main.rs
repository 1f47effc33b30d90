//! `gpg-rl`: the command line of gpg-rl. Each subcommand lives in `cmd/<name>.rs`; this file
//! only parses arguments and reports errors.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gpg-rl",
    version,
    about = "Teach language models to reason with GPG (Group Policy Gradient)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train with GPG (or GRPO / Dr.GRPO) from a TOML recipe; with no recipe, the built-in demo.
    Train(cmd::train::TrainArgs),
    /// Supervised fine-tuning (warm start) from a TOML recipe.
    Sft(cmd::sft::SftArgs),
    /// pass@1 (mean over k samples) and pass@k on a math benchmark, with per-item results.
    Eval(cmd::eval::EvalArgs),
    /// Sample completions from a Hugging Face model (Qwen2/2.5, Qwen3, Llama 3, Qwen2-VL).
    Generate(cmd::generate::GenerateArgs),
    /// Log-prob of every completion token of {"prompt", "completion"} JSONL lines.
    Logprobs(cmd::logprobs::LogprobsArgs),
    /// Write a randomly initialised Qwen2 / Qwen3 / Llama model with a small tokenizer (for tests
    /// and benchmarks).
    Init(cmd::init::InitArgs),
    /// Merge a LoRA adapter into its base model and write a plain Hugging Face model.
    Merge(cmd::merge::MergeArgs),
    /// Check whether predicted answers are mathematically equal to gold answers.
    MathVerify(cmd::math_verify::MathVerifyArgs),
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

/// Keeps freed large buffers in the heap instead of returning them to the OS: the engine
/// allocates activations of the same sizes every step, and glibc's default (unmap, then fault
/// the pages in again) measured 2-3x slower on elementwise kernels.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Sft(args) => cmd::sft::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Logprobs(args) => cmd::logprobs::run(args),
        Command::Init(args) => cmd::init::run(args),
        Command::MathVerify(args) => cmd::math_verify::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
