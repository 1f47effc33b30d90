//! Supervised fine-tuning of a vision-language model on image chats (`gpg-rl sft` with a
//! Qwen2-VL-family `model`): the same objective as text SFT, L = −(1/N) Σ_t log π(o_t | context)
//! over the N target tokens of the batch (g_t = −1/N), through the tower unless
//! `freeze_vision`.
//!
//! Data: a JSONL file, one chat per line as Hugging Face / TRL write it,
//! `{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
//! {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}`: the last
//! message is the assistant's target, the ones before it the prompt (rendered by the chat
//! template with the generation prompt); the target's tokens are its text followed by
//! `<|im_end|>`, as the template closes an assistant turn. Image paths are relative to the
//! file. Held-out accuracy (`eval_data`) is measured on image questions in the `eval` format.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::data::vl_chat::{encode_chat, parse_messages, VlChat};
use crate::data::{
    EpochSampler, Location, PreparedPrompt, Prompt, PromptDatasetConfig, PromptRecord,
};
use crate::model::qwen2_vl::IMAGE_PLACEHOLDER;
use crate::model::Activations;
use crate::optim::AdamW;
use crate::tokenizer::Tokenizer;

use super::collective::SingleProcess;
use super::engine::{CpuEngine, StepOutcome, TrainEngine};
use super::policy::{check_vision_options, Policy, VisionPolicy};
use super::sft_config::SftConfig;

/// One SFT example: the prompt (ids with expanded image pads, image paths) and the target ids.
struct Example {
    prompt: PreparedPrompt,
    target: Vec<u32>,
}

/// Reads the chats of `path` (see the module doc) into examples.
fn load_examples(
    path: &Path,
    policy: &VisionPolicy,
    tokenizer: &Tokenizer,
    end_of_turn: u32,
) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let what = format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{what}: not a JSON object"))?;
        let messages = v.get("messages").with_context(|| {
            format!("{what}: needs `messages` (the chat, ending with the assistant's answer)")
        })?;
        let mut chat = parse_messages(messages, base, &what)?;
        let Some(last) = chat.messages.pop() else {
            bail!("{what}: `messages` is empty");
        };
        ensure!(
            last.role == "assistant",
            "{what}: the last message is the target and must be the assistant's (it is {:?})",
            last.role
        );
        ensure!(
            !last.content.contains(IMAGE_PLACEHOLDER),
            "{what}: the assistant's message cannot hold images"
        );
        ensure!(
            !chat.messages.is_empty(),
            "{what}: no prompt before the assistant's message"
        );
        let (ids, _) = encode_chat(
            &policy.model.config,
            tokenizer,
            &policy.processor,
            &VlChat {
                messages: chat.messages.clone(),
                images: chat.images.clone(),
            },
            true,
        )
        .with_context(|| format!("{what}: encoding the prompt"))?;
        let mut target = tokenizer.encode(&last.content, false)?;
        target.push(end_of_turn);
        out.push(Example {
            prompt: PreparedPrompt {
                record: PromptRecord {
                    id: (i + 1).to_string(),
                    prompt: Prompt::Chat(chat.messages),
                    answer: Some(last.content),
                    location: Location::new(path.display().to_string(), "line", i + 1),
                    columns: Default::default(),
                },
                ids,
                images: chat.images,
            },
            target,
        });
    }
    ensure!(!out.is_empty(), "{}: no examples", path.display());
    Ok(out)
}

/// Runs SFT of the vision-language model `config.model` and writes it to `output_dir` (in the
/// layout it came in, with its tokenizer and preprocessor_config.json). Returns the final
/// held-out pass@1 (sampled at temperature 1; NaN without `eval_data`).
pub fn run_vl_sft(config: &SftConfig) -> Result<f64> {
    check_vision_options(&config.model, config.device.is_cpu(), config.lora.is_some())?;
    let device = config.device.open()?;
    let policy = Policy::load(
        &config.model,
        &device,
        config.precision,
        !config.freeze_vision,
    )
    .with_context(|| format!("loading the model from {}", config.model.display()))?;
    let tokenizer = Tokenizer::from_dir(&config.model)?;
    let end_of_turn = tokenizer
        .token_to_id("<|im_end|>")
        .or_else(|| tokenizer.eos_token_id())
        .context("the tokenizer has neither <|im_end|> nor an EOS token to end the target")?;
    let Some(vision) = policy.vision() else {
        bail!("internal: not a vision-language policy");
    };
    let examples = load_examples(Path::new(&config.data), vision, &tokenizer, end_of_turn)?;
    let heldout = match &config.eval_data {
        Some(path) => Some(vision.load_prompts(
            Path::new(path),
            &PromptDatasetConfig::default(),
            &tokenizer,
        )?),
        None => None,
    };
    let keep = if config.gradient_checkpointing {
        Activations::LayerInputs
    } else {
        Activations::All
    };
    let schedule = config.schedule.build(config.lr, config.steps)?;
    let mut engine = CpuEngine::new(&policy, AdamW::new(config.adamw)?)?;
    let mut sampler = EpochSampler::new(examples.len(), config.seed)?;
    std::fs::create_dir_all(&config.output_dir)
        .with_context(|| format!("{}: cannot create", config.output_dir.display()))?;
    let log_path = config.output_dir.join("sft_metrics.jsonl");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("{}: cannot create", log_path.display()))?;
    let eval = |policy: &Policy, engine: &CpuEngine, temperature: f32| -> Result<Option<f64>> {
        let Some(prompts) = &heldout else {
            return Ok(None);
        };
        policy
            .heldout_pass_at_1(
                engine,
                &tokenizer,
                prompts,
                config.eval_samples,
                temperature,
                config.eval_max_new_tokens,
                config.seed,
                &SingleProcess,
            )
            .map(Some)
    };
    let t0 = Instant::now();
    let mut pass = f64::NAN;
    for step in 0..config.steps {
        let lr = schedule.lr_at(step);
        let idx = sampler.next_batch(config.batch_size);
        let pairs: Vec<(&PreparedPrompt, &[u32])> = idx
            .iter()
            .map(|&i| (&examples[i].prompt, examples[i].target.as_slice()))
            .collect();
        let batch = policy.batch(&pairs)?;
        let n = batch.num_completion_tokens();
        let (lp, cache) = engine.forward(&policy, &batch, 1.0, keep)?;
        let loss = -lp.logprobs.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
        let g = vec![-1.0 / n as f32; n];
        engine.backward_into(&policy, &batch, cache, &g)?;
        let grad_norm = match engine.step(&policy, lr, config.max_grad_norm)? {
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
            if let (Some(p), Some(greedy)) =
                (eval(&policy, &engine, 1.0)?, eval(&policy, &engine, 0.0)?)
            {
                pass = p;
                line["heldout_pass_at_1"] = p.into();
                line["heldout_greedy_accuracy"] = greedy.into();
                eprintln!(
                    "sft step {}: loss {loss:.4}, held-out pass@1 {p:.3} (greedy {greedy:.3}) ({:.0} s)",
                    step + 1,
                    t0.elapsed().as_secs_f64()
                );
            } else {
                eprintln!(
                    "sft step {}: loss {loss:.4} ({:.0} s)",
                    step + 1,
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        writeln!(log, "{line}")?;
    }
    policy.save_trained(&config.output_dir)?;
    tokenizer.save_pretrained(&config.output_dir)?;
    let eos = &policy.text().config.eos_token_id;
    let generation = serde_json::json!({"eos_token_id": eos});
    crate::model::weights::write_atomic(
        &config.output_dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?.as_bytes(),
    )?;
    Ok(pass)
}
