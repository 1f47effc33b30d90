//! `gpg-rl bench engine`: train-step time and sampling throughput of the engine, optionally
//! beside PyTorch/transformers on the same model files in the same run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use gpg::model::TrainBatch;
use gpg::optim::{AdamW, AdamWConfig};
use gpg::rollout::{self, SamplingParams};
use gpg::train::engine::{CpuEngine, TrainEngine};
use gpg::train::policy::{Policy, PolicyBatch};
use rand::{Rng, SeedableRng};

use super::init::{write_model, InitArgs, StorageDtype};
use super::model_dir::{EngineFlags, ModelDir};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Train step (forward + backward) and batched sampling of a Qwen2 model.
    Engine(EngineArgs),
    /// Whole GPG training steps (sampling, rewards, update) on "Compute a+b=" prompts,
    /// optionally beside TRL's GRPOTrainer in GPG mode on the same model and prompts.
    Trainer(TrainerArgs),
    /// The matrix products of a Qwen2 layer (forward, input and weight gradients) with bf16
    /// weights, optionally beside PyTorch bf16 on the same shapes.
    Products(super::bench_products::ProductsArgs),
}

#[derive(Args)]
pub struct EngineArgs {
    /// Model directory; default: a fresh random model (hidden 256, 4 layers, 4/2 heads,
    /// intermediate 1024, vocab 4096) written to a temporary directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Of which prompt tokens (the rest are scored completion tokens).
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Timed train steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub sample_prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed sampling runs (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 3,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub runs: usize,
    /// Python interpreter with torch + transformers: also run the PyTorch peer
    /// (bench/compare/*.py) on the same model and print the ratios.
    #[arg(long)]
    pub peer_python: Option<PathBuf>,
    /// Keep only each layer's input in the train step and recompute the layer in the backward.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Measure sampling only (no train step, no PyTorch train-step peer).
    #[arg(long)]
    pub sampling_only: bool,
    #[command(flatten)]
    pub engine: EngineFlags,
    /// Precision of the Python peers: torch_train_step.py --dtype, hf_generate.py --dtype and
    /// the GGUF that --llama-cpp writes (gpg-rl's own side is unchanged).
    #[arg(long, value_enum, default_value_t = PeerDtype::F32)]
    pub peer_dtype: PeerDtype,
    /// With --peer-dtype bf16: torch_train_step.py's mode, f32 weights under autocast or
    /// a pure bf16 model (bf16 AdamW).
    #[arg(long, value_enum, default_value_t = PeerBf16Mode::Autocast)]
    pub peer_bf16_mode: PeerBf16Mode,
    /// Also sample with llama.cpp (bench/compare/llama_cpp_generate.py, llama-cpp-python) from
    /// this GGUF file of the same model (bench/compare/to_gguf.py), same batch / prompt /
    /// new-token shape as HF generate.
    #[arg(long, requires = "peer_python", conflicts_with = "llama_cpp")]
    pub gguf: Option<PathBuf>,
    /// Like --gguf, but first converts the model with bench/compare/to_gguf.py into a
    /// temporary directory, in the --peer-dtype precision.
    #[arg(long, requires = "peer_python")]
    pub llama_cpp: bool,
}

/// Precision the Python peers run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerDtype {
    F32,
    Bf16,
}

impl PeerDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerDtype::F32 => "f32",
            PeerDtype::Bf16 => "bf16",
        }
    }
}

/// torch_train_step.py's bf16 variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerBf16Mode {
    /// f32 weights and AdamW, forward and backward under torch.autocast("cpu", bfloat16).
    Autocast,
    /// The model in bf16, AdamW on the bf16 parameters.
    Pure,
}

impl PeerBf16Mode {
    fn as_str(self) -> &'static str {
        match self {
            PeerBf16Mode::Autocast => "autocast",
            PeerBf16Mode::Pure => "pure",
        }
    }
}

pub fn run(cmd: &BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Engine(args) => engine(args),
        BenchCommand::Trainer(args) => super::bench_trainer::run(args),
        BenchCommand::Products(args) => super::bench_products::run(args),
    }
}

pub use super::bench_trainer::TrainerArgs;

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The position of the element [`median`] returns (the upper median), so that figures of the
/// same run (its step time and its sampling time) can be reported together.
pub fn median_index(xs: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    order[xs.len() / 2]
}

/// Peak resident memory of this process so far, in MiB (VmHWM).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Writes the default bench model into `parent/bench-model`: a random Qwen2 with hidden 256,
/// 4 layers, 4/2 heads, intermediate 1024, tied head, and a byte-level BPE of `vocab` entries.
pub fn write_bench_model(parent: &std::path::Path, vocab: usize) -> Result<PathBuf> {
    let dir = parent.join("bench-model");
    write_model(&InitArgs {
        out: dir.clone(),
        family: super::init::FamilyArg::Qwen2,
        hidden: 256,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        intermediate: 1024,
        vocab,
        max_positions: 4096,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        untied: false,
        init_std: 0.02,
        seed: 0,
        dtype: StorageDtype::F32,
        corpus: None,
        pre_tokenizer: super::init::PreTokenizerArg::Qwen2,
    })?;
    Ok(dir)
}

/// Runs `python script --model DIR extra…` from bench/compare and parses the JSON object on
/// the last line of its output. OpenMP's default spin-waiting makes 2-thread PyTorch several
/// times slower on a busy machine (bench/compare/README.md), so OMP_WAIT_POLICY is PASSIVE
/// unless the user chose otherwise.
pub fn run_peer(
    python: &std::path::Path,
    script: &str,
    model_dir: &std::path::Path,
    extra: &[String],
) -> Result<serde_json::Value> {
    let mut args: Vec<std::ffi::OsString> = vec!["--model".into(), model_dir.into()];
    args.extend(extra.iter().map(Into::into));
    run_script(python, script, &args)
}

/// Runs `python bench/compare/script args…` and parses the JSON object on the last line of its
/// output (OMP_WAIT_POLICY as in [`run_peer`]).
pub fn run_script(
    python: &std::path::Path,
    script: &str,
    args: &[std::ffi::OsString],
) -> Result<serde_json::Value> {
    let script_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/compare");
    let wait_policy = std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into());
    let output = Command::new(python)
        .env("OMP_WAIT_POLICY", wait_policy)
        .env("HF_HUB_OFFLINE", "1")
        .arg(script_dir.join(script))
        .args(args)
        .output()
        .with_context(|| format!("cannot run {} {script}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{script}: unexpected output {last:?}"))
}

fn engine(args: &EngineArgs) -> Result<()> {
    anyhow::ensure!(
        args.prompt_len < args.seq_len && args.sample_prompt_len > 0,
        "--prompt-len ({}) must be below --seq-len ({}) and --sample-prompt-len positive",
        args.prompt_len,
        args.seq_len
    );
    let tmp = tempfile::tempdir()?;
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => write_bench_model(tmp.path(), 4096)?,
    };
    // On a CUDA device the model is read on the CPU and uploaded by the GPU train step and
    // the GPU decoder.
    let dir = if args.engine.device.is_cpu() {
        ModelDir::load(&model_dir, &args.engine.device, args.engine.precision)?
    } else {
        ModelDir::load_for_sampling(&model_dir, &args.engine.device, args.engine.precision)?
    };
    let model = &dir.model;
    let decode = gpg::model::decoding::engine_for(model, &args.engine.device)?;
    let vocab = model.config.vocab_size as u32;
    let threads = rayon::current_num_threads();
    println!(
        "model {} ({} parameters), {threads} threads, precision {}, kernels {} ({})",
        model_dir.display(),
        model.parameter_count(),
        model.precision(),
        gpg::model::ops::isa_name(),
        gpg::model::ops::bf16_gemm_name(),
    );
    let rss_load = peak_rss_mib().unwrap_or(f64::NAN);

    // Train step: forward + backward over batch × seq_len tokens.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let train_s = if args.sampling_only {
        f64::NAN
    } else {
        let seqs: Vec<Vec<u32>> = (0..args.batch)
            .map(|_| (0..args.seq_len).map(|_| rng.gen_range(0..vocab)).collect())
            .collect();
        let pairs: Vec<(&[u32], &[u32])> =
            seqs.iter().map(|s| s.split_at(args.prompt_len)).collect();
        let batch = TrainBatch::new(&pairs)?;
        let n = batch.num_completion_tokens();
        let g: Vec<f32> = (0..n)
            .map(|_| rng.gen_range(-1.0f32..1.0) / n as f32)
            .collect();
        if !args.engine.device.is_cpu() {
            super::bench_cuda::train_step_seconds(
                &args.engine.device,
                model,
                &batch,
                &g,
                args.steps,
            )?
        } else {
            // The train step updates the model's tensors in place (the sampling below then runs on
            // the updated weights, which does not change its cost).
            let train_model = Policy::from_text(dir.model.clone());
            let keep = if args.gradient_checkpointing {
                gpg::model::Activations::LayerInputs
            } else {
                gpg::model::Activations::All
            };
            let mut engine = CpuEngine::new(&train_model, AdamW::new(AdamWConfig::default())?)?;
            let batch = PolicyBatch::text_only(batch.clone());
            let mut times = Vec::new();
            for step in 0..=args.steps {
                let t0 = Instant::now();
                let (_, cache) = engine.forward(&train_model, &batch, 1.0, keep)?;
                engine.backward_into(&train_model, &batch, cache, &g)?;
                engine.step(&train_model, 1e-5, 1.0)?;
                if step > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            let train_s = median(times);
            let rss_train = peak_rss_mib().unwrap_or(f64::NAN);
            println!(
                "train step (fwd+bwd+AdamW{}), batch {} x {} tokens: {:.3} s (median of {})",
                if args.gradient_checkpointing {
                    ", gradient checkpointing"
                } else {
                    ""
                },
                args.batch,
                args.seq_len,
                train_s,
                args.steps
            );
            println!(
                "peak RSS: {rss_load:.0} MiB after loading, {rss_train:.0} MiB after the train steps \
                 (+{:.0} MiB for gradients, optimiser state and activations)",
                rss_train - rss_load
            );
            train_s
        }
    };

    // Sampling: batch of random prompts, fixed number of new tokens.
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| {
            (0..args.sample_prompt_len)
                .map(|_| rng.gen_range(0..vocab))
                .collect()
        })
        .collect();
    let params = SamplingParams {
        n: 1,
        max_new_tokens: args.new_tokens,
        temperature: 1.0,
        ignore_eos: true,
        ..Default::default()
    };
    println!("sampling on {}", decode.device_name());
    rollout::generate_with(
        model,
        &*decode,
        &dir.tokenizer,
        &prompts[..1],
        &SamplingParams {
            max_new_tokens: 4,
            ..params.clone()
        },
    )?;
    let mut run_times = Vec::new();
    let mut new_tokens = 0;
    for run in 0..args.runs {
        let t0 = Instant::now();
        let out = rollout::generate_with(
            model,
            &*decode,
            &dir.tokenizer,
            &prompts,
            &SamplingParams {
                seed: run as u64,
                ..params.clone()
            },
        )?;
        run_times.push(t0.elapsed().as_secs_f64());
        new_tokens = out.iter().map(|c| c.token_ids.len()).sum();
    }
    let secs = median(run_times);
    let tok_s = new_tokens as f64 / secs;
    println!(
        "sampling, batch {} prompt {} new {}: {:.0} tokens/s ({:.2} s, median of {})",
        args.batch, args.sample_prompt_len, args.new_tokens, tok_s, secs, args.runs
    );
    let rss = peak_rss_mib().unwrap_or(f64::NAN);
    println!("peak RSS: {rss:.0} MiB");

    if let Some(python) = &args.peer_python {
        let peer = |script: &str, extra: &[String]| run_peer(python, script, &model_dir, extra);
        let arg = |k: &str, v: usize| [format!("--{k}"), v.to_string()];
        let dtype = args.peer_dtype.as_str();
        let mut torch_args = [
            arg("threads", threads),
            arg("batch", args.batch),
            arg("seq-len", args.seq_len),
            arg("completion-len", args.seq_len - args.prompt_len),
            arg("steps", args.steps),
        ]
        .concat();
        torch_args.extend(["--dtype".into(), dtype.into()]);
        if let Some(n) = args.engine.device.cuda_ordinal() {
            torch_args.extend(["--device".into(), format!("cuda:{n}")]);
        }
        if args.peer_dtype == PeerDtype::Bf16 {
            torch_args.extend(["--bf16-mode".into(), args.peer_bf16_mode.as_str().into()]);
        }
        let sample_shape = [
            arg("threads", threads),
            arg("batch", args.batch),
            arg("prompt-len", args.sample_prompt_len),
            arg("new-tokens", args.new_tokens),
            arg("runs", args.runs),
        ]
        .concat();
        let mut hf_args = sample_shape.clone();
        hf_args.extend(["--dtype".into(), dtype.into()]);
        if let Some(n) = args.engine.device.cuda_ordinal() {
            hf_args.extend(["--device".into(), format!("cuda:{n}")]);
        }
        match args.peer_dtype {
            PeerDtype::F32 => println!("peer dtype: f32"),
            PeerDtype::Bf16 => println!(
                "peer dtype: bf16 (PyTorch train step: {}; HF generate: bf16 weights)",
                args.peer_bf16_mode.as_str()
            ),
        }
        if !args.sampling_only {
            let torch = peer("torch_train_step.py", &torch_args)?;
            let torch_s = torch["train_step_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "PyTorch train step: {torch_s:.3} s  -> peer/gpg-rl time ratio {:.2}x; peak RSS {} MiB",
                torch_s / train_s,
                torch["peak_rss_mb"]
            );
        }
        let hf = peer("hf_generate.py", &hf_args)?;
        let hf_tok_s = hf["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "HF generate: {hf_tok_s:.0} tokens/s -> gpg-rl/peer throughput ratio {:.2}x",
            tok_s / hf_tok_s
        );
        println!("HF generate peak RSS: {} MiB", hf["peak_rss_mb"]);

        let gguf = match (&args.gguf, args.llama_cpp) {
            (Some(file), _) => Some(file.clone()),
            (None, true) => {
                let file = tmp.path().join(format!("model-{dtype}.gguf"));
                let t0 = Instant::now();
                run_script(
                    python,
                    "to_gguf.py",
                    &[
                        model_dir.clone().into(),
                        file.clone().into(),
                        "--dtype".into(),
                        dtype.into(),
                    ],
                )?;
                println!(
                    "GGUF ({dtype}) written by to_gguf.py in {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                Some(file)
            }
            (None, false) => None,
        };
        if let Some(file) = gguf {
            let mut llama_args: Vec<std::ffi::OsString> = vec!["--model".into(), file.into()];
            llama_args.extend(sample_shape.iter().map(Into::into));
            let llama = run_script(python, "llama_cpp_generate.py", &llama_args)?;
            let llama_tok_s = llama["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "llama.cpp generate ({} GGUF, llama-cpp-python {}): {llama_tok_s:.0} tokens/s -> \
                 gpg-rl/peer throughput ratio {:.2}x (llama.cpp/HF generate {:.2}x)",
                llama["dtype"].as_str().unwrap_or("?"),
                llama["llama_cpp_python"].as_str().unwrap_or("?"),
                tok_s / llama_tok_s,
                llama_tok_s / hf_tok_s
            );
            println!("llama.cpp peak RSS: {} MiB", llama["peak_rss_mb"]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_index_points_at_the_median() {
        for xs in [
            vec![3.0, 1.0, 2.0],
            vec![5.0, 4.0],
            vec![7.0],
            vec![2.0, 9.0, 4.0, 1.0],
        ] {
            let i = median_index(&xs);
            assert_eq!(xs[i], median(xs.clone()), "{xs:?}");
        }
        assert_eq!(median_index(&[5.0, 4.0]), 0);
    }
}
