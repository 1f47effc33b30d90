//! Supervised fine-tuning with the same engine: the mean negative log-likelihood of the
//! completion tokens, L = −(1/N) Σ_t log π(o_t | context), so g_t = −1/N for every token.
//! Used for the warm start of the demo model (`gpg-rl sft`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{synthetic, EpochSampler};
use crate::model::{Activations, DeviceName, Precision, Qwen2, TrainBatch};
use crate::optim::{AdamW, AdamWConfig, LrScheduleConfig, LrScheduleKind};
use crate::tokenizer::Tokenizer;

use super::config::SyntheticTask;
use super::heldout;
use super::update::StepOutcome;
use super::updater::Updater;

/// An SFT recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Model directory to start from.
    pub model: PathBuf,
    /// Where the fine-tuned model (and sft_metrics.jsonl) is written.
    pub output_dir: PathBuf,
    /// `cpu`, or `cuda` / `cuda:N` (feature `cuda`; full fine-tuning only, see train/device.rs).
    #[serde(default)]
    pub device: DeviceName,
    /// `f32` or `bf16` mixed precision (see `Precision`).
    #[serde(default)]
    pub precision: Precision,
    /// Recompute each layer in the backward instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    pub steps: u64,
    /// Sequences per step.
    pub batch_size: usize,
    pub seed: u64,
    pub lr: f32,
    #[serde(default = "super::config::default_adamw")]
    pub adamw: AdamWConfig,
    #[serde(default = "super::config::default_max_grad_norm")]
    pub max_grad_norm: f32,
    #[serde(default = "default_schedule")]
    pub schedule: LrScheduleConfig,
    /// `synthetic`: the built-in task's question → worked solution pairs (text models); for a
    /// vision-language model, a JSONL file of image chats ending with the assistant's answer
    /// (see [`super::vl_sft`]).
    pub data: String,
    /// Vision-language models: image questions for the held-out accuracy (the `eval` format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_data: Option<String>,
    /// Vision-language models: keep the vision tower fixed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_vision: bool,
    #[serde(default)]
    pub synthetic: SyntheticTask,
    /// Share of training problems whose target is the bare answer (`\boxed{N}`) instead of the
    /// worked solution. A warm start that has seen both habits answers directly part of the
    /// time, which rarely works on multi-step problems: RL then has something to discover —
    /// that working the steps pays — which is the demo's point.
    #[serde(default)]
    pub direct_answer_share: f64,
    /// Measure held-out pass@1 (sampled, temperature 1) every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "default_eval_samples")]
    pub eval_samples: usize,
    #[serde(default = "default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
    /// Train a LoRA adapter (written to output_dir in PEFT format) instead of the whole model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraConfig>,
}

fn default_schedule() -> LrScheduleConfig {
    LrScheduleConfig {
        kind: LrScheduleKind::CosineWithMinLr,
        warmup_steps: None,
        warmup_ratio: Some(0.05),
        min_lr_rate: 0.1,
    }
}
fn default_eval_samples() -> usize {
    1
}
fn default_eval_max_new_tokens() -> usize {
    96
}

impl SftConfig {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let c: SftConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(
            c.steps > 0 && c.batch_size > 0,
            "steps and batch_size must be positive"
        );
        ensure!(
            c.data == "synthetic" || c.data.ends_with(".jsonl"),
            "data = {:?}: \"synthetic\" (the built-in task, text models) or a .jsonl file of image \
             chats (vision-language models)",
            c.data
        );
        Ok(c)
    }
}

/// Runs SFT and writes the model to `output_dir`. Returns the final held-out pass@1.
pub fn run_sft(config: &SftConfig) -> Result<f64> {
    let train_device = super::device::TrainDevice::open_for(
        &config.device,
        super::device::RunNeeds {
            model: &config.model,
            lora: config.lora.is_some(),
            world: 1,
        },
    )?;
    if crate::model::Qwen2VLConfig::is_vl_dir(&config.model) {
        return super::vl_sft::run_vl_sft(config);
    }
    ensure!(
        config.data == "synthetic" && config.eval_data.is_none() && !config.freeze_vision,
        "{} is a text model: its SFT trains on the built-in task (data = \"synthetic\", no \
         eval_data, no freeze_vision)",
        config.model.display()
    );
    let device = candle_core::Device::Cpu;
    let mut model = Qwen2::load(&config.model, &device, config.precision)?;
    if let Some(lora) = &config.lora {
        super::lora_run::attach_adapter(&mut model, lora, config.seed, &config.model, None)?;
    }
    let keep = if config.gradient_checkpointing {
        Activations::LayerInputs
    } else {
        Activations::All
    };
    let tokenizer = Tokenizer::from_dir(&config.model)?;
    let eos = tokenizer
        .eos_token_id()
        .context("the tokenizer has no EOS token; SFT completions must end with one")?;
    let split = config.synthetic.generate()?;
    let fields = crate::data::PromptDatasetConfig {
        apply_chat_template: false,
        ..Default::default()
    };
    ensure!(
        (0.0..=1.0).contains(&config.direct_answer_share),
        "direct_answer_share must be in [0, 1]"
    );
    let mut style_rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut pairs = Vec::with_capacity(split.train.len());
    for p in &split.train {
        let record = p.prompt_record(0, &fields);
        let prompt = tokenizer.encode_prompt(&record.prompt)?;
        let target = if style_rng.gen::<f64>() < config.direct_answer_share {
            format!("\\boxed{{{}}}", p.answer)
        } else {
            p.solution.clone()
        };
        let mut completion = tokenizer.encode(&target, false)?;
        completion.push(eos);
        pairs.push((prompt, completion));
    }
    let heldout = heldout::prepare(&tokenizer, synthetic::to_dataset(&split.heldout, &fields)?)?;

    let schedule = config.schedule.build(config.lr, config.steps)?;
    let mut updater = Updater::on_device(&train_device, &model, AdamW::new(config.adamw)?)?;
    let mut sampler = EpochSampler::new(pairs.len(), config.seed)?;
    std::fs::create_dir_all(&config.output_dir)
        .with_context(|| format!("{}: cannot create", config.output_dir.display()))?;
    let log_path = config.output_dir.join("sft_metrics.jsonl");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("{}: cannot create", log_path.display()))?;
    let eval = |model: &Qwen2, updater: &Updater, seed: u64, temperature: f32| {
        let engine = updater.decode_engine(model)?;
        heldout::pass_at_1(
            model,
            &*engine,
            &tokenizer,
            &heldout,
            config.eval_samples,
            temperature,
            config.eval_max_new_tokens,
            seed,
        )
    };
    let t0 = Instant::now();
    let mut pass = f64::NAN;
    for step in 0..config.steps {
        let lr = schedule.lr_at(step);
        let idx = sampler.next_batch(config.batch_size);
        let batch_pairs: Vec<(&[u32], &[u32])> = idx
            .iter()
            .map(|&i| (pairs[i].0.as_slice(), pairs[i].1.as_slice()))
            .collect();
        let batch = TrainBatch::new(&batch_pairs)?;
        let n = batch.num_completion_tokens();
        // L = −Σ logp / N: g_t = −1/N is known before the forward, so on the CPU the head's
        // logits are formed once (forward and backward in one pass).
        let g = vec![-1.0 / n as f32; n];
        let lp = if updater.fuses_forward_backward() {
            updater.forward_backward_into(&model, &batch, 1.0, keep, &g)?
        } else {
            let (lp, cache) = updater.forward(&model, &batch, 1.0, keep)?;
            updater.backward_into(&model, &batch, cache, &g)?;
            lp
        };
        let loss = -lp.logprobs.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
        let grad_norm = match updater.step(&mut model, lr, config.max_grad_norm)? {
            StepOutcome::Applied(c) => c.norm,
            StepOutcome::Skipped(c) => {
                eprintln!(
                    "sft step {}: non-finite gradient norm, update skipped",
                    step + 1
                );
                c.norm
            }
        };
        let last = step + 1 == config.steps;
        let mut line = serde_json::json!({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "elapsed_s": t0.elapsed().as_secs_f64()});
        if last || (config.eval_every > 0 && (step + 1) % config.eval_every == 0) {
            pass = eval(&model, &updater, config.seed, 1.0)?;
            let greedy = eval(&model, &updater, config.seed, 0.0)?;
            line["heldout_pass_at_1"] = pass.into();
            line["heldout_greedy_accuracy"] = greedy.into();
            eprintln!(
                "sft step {}: loss {loss:.4}, held-out pass@1 {pass:.3} (greedy {greedy:.3}) ({:.0} s)",
                step + 1,
                t0.elapsed().as_secs_f64()
            );
        }
        writeln!(log, "{line}")?;
    }
    updater.sync_host(&mut model)?;
    model.save_trained(&config.output_dir)?;
    tokenizer.save_pretrained(&config.output_dir)?;
    let generation = serde_json::json!({"bos_token_id": eos, "eos_token_id": [eos]});
    crate::model::weights::write_atomic(
        &config.output_dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?.as_bytes(),
    )?;
    Ok(pass)
}
