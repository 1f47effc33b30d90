//! `gpg-rl bench trainer`: whole GPG training steps — sampling, rewards, forward, backward,
//! AdamW — timed through the trainer a user runs, optionally beside TRL's GRPOTrainer in GPG
//! mode (beta 0, num_iterations 1, scale_rewards "none", loss_type "dapo") on the same model
//! files, prompts and reward (bench/compare/trl_grpo_step.py).
//!
//! With `--lora-rank R` both sides also train a LoRA adapter (rank R, α `--lora-alpha`, all
//! seven projections, dropout 0; TRL through `GRPOTrainer(peft_config=…)`), and the command
//! prints LoRA beside full fine-tuning on each side. Runs are ordered so that each peak RSS is
//! its own: the TRL runs are separate processes; gpg-rl runs LoRA before full fine-tuning in
//! this process (the full run's peak is the larger anyway).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use gpg::train::{TrainConfig, Trainer};
use rand::{Rng, SeedableRng};

use super::bench::{median_index, peak_rss_mib, run_peer, write_bench_model, PeerDtype};

#[derive(Args)]
pub struct TrainerArgs {
    /// Model directory; default: a fresh random model (hidden 256, 4 layers, 4/2 heads,
    /// intermediate 1024, tied head, byte-level BPE of 4096) written to a temporary directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 10,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 4)]
    pub prompts_per_step: usize,
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f32,
    /// Python interpreter with torch + transformers + trl: also run TRL's GRPOTrainer
    /// (bench/compare/trl_grpo_step.py) and print the ratios.
    #[arg(long)]
    pub peer_python: Option<PathBuf>,
    /// Recompute each layer in the backward instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// With --gradient-checkpointing, recompute only the first N layers (the recipe's
    /// `gradient_checkpointing_layers`).
    #[arg(long, requires = "gradient_checkpointing")]
    pub gradient_checkpointing_layers: Option<usize>,
    #[command(flatten)]
    pub engine: super::model_dir::EngineFlags,
    /// Precision of the TRL peer: bf16 passes --bf16 to trl_grpo_step.py (model loaded in
    /// bf16, GRPOConfig bf16=True); gpg-rl's own side is unchanged.
    #[arg(long, value_enum, default_value_t = PeerDtype::F32)]
    pub peer_dtype: PeerDtype,
    /// Also train a LoRA adapter of this rank on all seven projections (0: full fine-tuning
    /// only).
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// α of the LoRA adapter (scale α / r).
    #[arg(long, default_value_t = 32.0)]
    pub lora_alpha: f32,
    /// With --lora-rank: skip the full fine-tuning runs (to fit a memory budget).
    #[arg(long)]
    pub skip_full: bool,
}

/// Figures of one side: the median timed step, with its own sampling time and tokens.
struct Side {
    step_s: f64,
    generate_s: f64,
    tokens_per_step: f64,
    peak_rss_mib: f64,
}

pub fn run(args: &TrainerArgs) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => write_bench_model(tmp.path(), 4096)?,
    };
    let prompts = tmp.path().join("prompts.jsonl");
    write_addition_prompts(&prompts, 1024, 0)?;
    let threads = rayon::current_num_threads();
    println!(
        "GPG step: {} prompts x {} completions, <= {} new tokens, T = 1, lr {}, reward length \
         (-|chars - 20|), model {}, {threads} threads, precision {}",
        args.prompts_per_step,
        args.num_generations,
        args.max_new_tokens,
        args.lr,
        model_dir.display(),
        args.engine.precision
    );

    let lora = (args.lora_rank > 0).then_some((args.lora_rank, args.lora_alpha));
    let full = lora.is_none() || !args.skip_full;
    let lora_name = format!("LoRA r={} alpha={}", args.lora_rank, args.lora_alpha);
    // The peer runs first: gpg-rl's freed memory is not always returned to the system (the
    // allocator keeps it for reuse), and TRL at the 0.5B shape needs ~16 GB of its own.
    let peer = |lora: Option<(usize, f32)>| -> Result<Option<Side>> {
        let Some(python) = &args.peer_python else {
            return Ok(None);
        };
        let mut extra: Vec<String> = [
            "--data".to_string(),
            prompts.display().to_string(),
            "--threads".into(),
            threads.to_string(),
            "--steps".into(),
            args.steps.to_string(),
            "--warmup".into(),
            args.warmup.to_string(),
            "--prompts-per-step".into(),
            args.prompts_per_step.to_string(),
            "--group-size".into(),
            args.num_generations.to_string(),
            "--max-completion-len".into(),
            args.max_new_tokens.to_string(),
            "--lr".into(),
            args.lr.to_string(),
        ]
        .into();
        if args.peer_dtype == PeerDtype::Bf16 {
            extra.push("--bf16".into());
        }
        if let Some((rank, alpha)) = lora {
            extra.extend([
                "--lora-rank".into(),
                rank.to_string(),
                "--lora-alpha".into(),
                alpha.to_string(),
            ]);
        }
        let trl = run_peer(python, "trl_grpo_step.py", &model_dir, &extra)?;
        let get = |key: &str| trl[key].as_f64().unwrap_or(f64::NAN);
        Ok(Some(Side {
            step_s: get("step_s"),
            generate_s: get("generate_s"),
            tokens_per_step: get("completion_tokens_per_step"),
            peak_rss_mib: get("peak_rss_mb"),
        }))
    };
    let print = |who: &str, side: &Side, what: &str| {
        println!(
            "{who}: step {:.3} s (median of {}), of which {what} {:.3} s; {:.0} completion \
             tokens per step; peak RSS {:.0} MiB",
            side.step_s, args.steps, side.generate_s, side.tokens_per_step, side.peak_rss_mib
        );
    };
    if args.peer_python.is_some() {
        println!("TRL peer dtype: {}", args.peer_dtype.as_str());
    }
    let peer_full = if full { peer(None)? } else { None };
    if let Some(p) = &peer_full {
        print("TRL GRPOTrainer", p, "generation");
    }
    let peer_lora = match lora {
        Some(l) => peer(Some(l))?,
        None => None,
    };
    if let Some(p) = &peer_lora {
        print(&format!("TRL GRPOTrainer, {lora_name}"), p, "generation");
    }
    let ours_lora = match lora {
        Some(l) => Some(gpg_rl_side(
            args,
            &model_dir,
            &prompts,
            &tmp.path().join("run-lora"),
            Some(l),
        )?),
        None => None,
    };
    if let Some(o) = &ours_lora {
        print(&format!("gpg-rl, {lora_name}"), o, "sampling");
    }
    let ours_full = if full {
        Some(gpg_rl_side(
            args,
            &model_dir,
            &prompts,
            &tmp.path().join("run"),
            None,
        )?)
    } else {
        None
    };
    if let Some(o) = &ours_full {
        print("gpg-rl", o, "sampling");
    }
    let ratio = |label: &str, a: &Side, b: &Side| {
        println!(
            "{label}: step time {:.2}x, generation time {:.2}x, peak RSS {:.2}x",
            a.step_s / b.step_s,
            a.generate_s / b.generate_s,
            a.peak_rss_mib / b.peak_rss_mib
        );
    };
    if let (Some(p), Some(o)) = (&peer_full, &ours_full) {
        ratio("TRL/gpg-rl", p, o);
    }
    if let (Some(p), Some(o)) = (&peer_lora, &ours_lora) {
        ratio(&format!("{lora_name}: TRL/gpg-rl"), p, o);
    }
    if let (Some(l), Some(f)) = (&ours_lora, &ours_full) {
        ratio("gpg-rl LoRA / gpg-rl full fine-tuning", l, f);
    }
    if let (Some(l), Some(f)) = (&peer_lora, &peer_full) {
        ratio("TRL LoRA / TRL full fine-tuning", l, f);
    }
    if let (Some(o), Some(p)) = (&ours_lora, &peer_full) {
        println!(
            "peak RSS of a gpg-rl LoRA step / TRL full fine-tuning: {:.2}x (target <= 0.25x)",
            o.peak_rss_mib / p.peak_rss_mib
        );
    }
    Ok(())
}

/// `n` prompts "Compute a+b=" (a, b uniform in 0..=99, seeded) with their answers, as JSONL.
fn write_addition_prompts(path: &std::path::Path, n: usize, seed: u64) -> Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("{}", path.display()))?,
    );
    for _ in 0..n {
        let (a, b) = (rng.gen_range(0..100u32), rng.gen_range(0..100u32));
        let line = serde_json::json!({"prompt": format!("Compute {a}+{b}="), "answer": (a + b).to_string()});
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// The recipe of the benchmark: GPG as TRL's GPG mode computes it, no resampling, no
/// evaluation, no checkpoints, constant learning rate.
fn recipe(
    args: &TrainerArgs,
    model: &std::path::Path,
    prompts: &std::path::Path,
    out: &std::path::Path,
    lora: Option<(usize, f32)>,
) -> String {
    let lora = match lora {
        Some((rank, alpha)) => format!(
            "\n[lora]\nrank = {rank}\nalpha = {alpha}\ndropout = 0.0\ntarget_modules = {:?}\n",
            gpg::model::lora::ALL_PROJECTIONS
        ),
        None => String::new(),
    };
    let text = format!(
        r#"
model = {model:?}
output_dir = {out:?}
steps = {steps}
seed = 0
device = "{device}"
precision = "{precision}"
gradient_checkpointing = {ckpt}{ckpt_layers}

[data]
train = {prompts:?}
[data.fields]
prompt_field = "prompt"
answer_field = "answer"
apply_chat_template = false

[rollout]
prompts_per_step = {b}
num_generations = {g}
max_new_tokens = {max_new}
temperature = 1.0

[algorithm]
loss = {{ name = "gpg" }}

[optim]
lr = {lr}
max_grad_norm = 1.0
schedule = {{ kind = "constant-with-warmup", warmup_steps = 0 }}

[[reward.functions]]
name = "length"

[logging]
save_every = 0
log_completions = 0
progress = false
"#,
        model = model.display().to_string(),
        out = out.display().to_string(),
        prompts = prompts.display().to_string(),
        steps = args.warmup + args.steps,
        b = args.prompts_per_step,
        g = args.num_generations,
        max_new = args.max_new_tokens,
        lr = args.lr,
        device = args.engine.device,
        precision = args.engine.precision,
        ckpt = args.gradient_checkpointing,
        ckpt_layers = args
            .gradient_checkpointing_layers
            .map_or(String::new(), |n| format!(
                "\ngradient_checkpointing_layers = {n}"
            )),
    );
    text + &lora
}

fn gpg_rl_side(
    args: &TrainerArgs,
    model: &std::path::Path,
    prompts: &std::path::Path,
    out: &std::path::Path,
    lora: Option<(usize, f32)>,
) -> Result<Side> {
    let config = TrainConfig::from_toml_str(&recipe(args, model, prompts, out, lora))
        .context("the benchmark recipe")?;
    let mut trainer = Trainer::new(config, false)?;
    let (mut step_s, mut generate_s, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let m = trainer.step()?;
        eprintln!(
            "gpg-rl step {}: {:.3} s (sampling {:.3} s, update {:.3} s), reward {:.1}, \
             within-group std {:.1}, grad norm {:.2}, {} tokens",
            i + 1,
            m.time_step_s,
            m.time_rollout_s,
            m.time_update_s,
            m.reward,
            m.reward_std_within_group,
            m.grad_norm,
            m.tokens
        );
        anyhow::ensure!(
            m.skipped.is_none(),
            "step {}: the update was skipped ({}); the benchmark needs real updates",
            i + 1,
            m.skipped.unwrap_or_default()
        );
        if i >= args.warmup {
            step_s.push(m.time_step_s);
            generate_s.push(m.time_rollout_s);
            tokens.push(m.tokens as f64);
        }
    }
    let peak_rss = peak_rss_mib().unwrap_or(f64::NAN);
    if let Some(adapter) = trainer.model.text().adapter() {
        // The alternative to the decoder's adapter path: merging s·BA into a copy of the
        // weights once per optimiser step. Its cost, measured here for the record (after the
        // peak RSS above was taken).
        let t0 = Instant::now();
        let merged = trainer.model.text().merged()?;
        let bytes: usize = adapter
            .modules()
            .iter()
            .map(|(m, _)| {
                merged
                    .weights
                    .get(&format!("{m}.weight"))
                    .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
            })
            .sum();
        println!(
            "merge alternative: s·BA merged into a copy of the {} adapted weights in {:.3} s, \
             {:.0} MiB for the copy",
            adapter.modules().len(),
            t0.elapsed().as_secs_f64(),
            bytes as f64 / (1024.0 * 1024.0)
        );
    }
    // The median step, with that step's own sampling time and tokens.
    let i = median_index(&step_s);
    Ok(Side {
        step_s: step_s[i],
        generate_s: generate_s[i],
        tokens_per_step: tokens[i],
        peak_rss_mib: peak_rss,
    })
}
