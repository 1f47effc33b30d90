//! `gpg-rl bench trainer`: whole GPG training steps — sampling, rewards, forward, backward,
//! AdamW — timed through the trainer a user runs, optionally beside TRL's GRPOTrainer in GPG
//! mode (beta 0, num_iterations 1, scale_rewards "none", loss_type "dapo") on the same model
//! files, prompts and reward (bench/compare/trl_grpo_step.py).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use gpg::train::{TrainConfig, Trainer};
use rand::{Rng, SeedableRng};

use super::bench::{median, peak_rss_mib, run_peer, write_bench_model, PeerDtype};

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
    #[command(flatten)]
    pub engine: super::model_dir::EngineFlags,
    /// Precision of the TRL peer: bf16 passes --bf16 to trl_grpo_step.py (model loaded in
    /// bf16, GRPOConfig bf16=True); gpg-rl's own side is unchanged.
    #[arg(long, value_enum, default_value_t = PeerDtype::F32)]
    pub peer_dtype: PeerDtype,
}

/// Figures of one side, medians over the timed steps.
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

    // The peer runs first: gpg-rl's freed memory is not always returned to the system (the
    // allocator keeps it for reuse), and TRL at the 0.5B shape needs ~16 GB of its own.
    let peer = match &args.peer_python {
        None => None,
        Some(python) => {
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
            println!("TRL peer dtype: {}", args.peer_dtype.as_str());
            let trl = run_peer(python, "trl_grpo_step.py", &model_dir, &extra)?;
            let get = |key: &str| trl[key].as_f64().unwrap_or(f64::NAN);
            let peer = Side {
                step_s: get("step_s"),
                generate_s: get("generate_s"),
                tokens_per_step: get("completion_tokens_per_step"),
                peak_rss_mib: get("peak_rss_mb"),
            };
            println!(
                "TRL GRPOTrainer: step {:.3} s, of which generation {:.3} s; {:.0} completion \
                 tokens per step; peak RSS {:.0} MiB",
                peer.step_s, peer.generate_s, peer.tokens_per_step, peer.peak_rss_mib
            );
            Some(peer)
        }
    };

    let ours = gpg_rl_side(args, &model_dir, &prompts, &tmp.path().join("run"))?;
    println!(
        "gpg-rl: step {:.3} s (median of {}), of which sampling {:.3} s; {:.0} completion \
         tokens per step; peak RSS {:.0} MiB",
        ours.step_s, args.steps, ours.generate_s, ours.tokens_per_step, ours.peak_rss_mib
    );
    if let Some(peer) = peer {
        println!(
            "TRL/gpg-rl: step time {:.2}x, generation time {:.2}x, peak RSS {:.2}x",
            peer.step_s / ours.step_s,
            peer.generate_s / ours.generate_s,
            peer.peak_rss_mib / ours.peak_rss_mib
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
) -> String {
    format!(
        r#"
model = {model:?}
output_dir = {out:?}
steps = {steps}
seed = 0
device = "{device}"
precision = "{precision}"
gradient_checkpointing = {ckpt}

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
    )
}

fn gpg_rl_side(
    args: &TrainerArgs,
    model: &std::path::Path,
    prompts: &std::path::Path,
    out: &std::path::Path,
) -> Result<Side> {
    let config = TrainConfig::from_toml_str(&recipe(args, model, prompts, out))
        .context("the benchmark recipe")?;
    let mut trainer = Trainer::new(config, false)?;
    let (mut step_s, mut generate_s, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.warmup + args.steps {
        let m = trainer.train_step()?;
        eprintln!(
            "gpg-rl step {}: {:.3} s (sampling {:.3} s, update {:.3} s), reward {:.1}, \
             within-group std {:.1}, grad norm {:.2}, {} tokens",
            i + 1,
            m.time_step_s,
            m.time_rollout_s,
            m.time_update_s,
            m.reward,
            m.reward_std,
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
    Ok(Side {
        step_s: median(step_s),
        generate_s: median(generate_s),
        tokens_per_step: median(tokens),
        peak_rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
    })
}
