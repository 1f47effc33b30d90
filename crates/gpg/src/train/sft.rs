//! Supervised fine-tuning with the same engine: the mean negative log-likelihood of the
//! completion tokens, L = −(1/N) Σ_t log π(o_t | context), so g_t = −1/N for every token.
//! One loop for every model: the examples are (prompt, target) pairs packed by the policy
//! (with the prompts' images for a vision-language model, through the tower unless
//! `freeze_vision`), the training engine of the run's device does the rest.
//!
//! Data, by the model's kind:
//! * a text model trains on the built-in synthetic task (`data = "synthetic"`; the warm start
//!   of the demo model, `gpg-rl sft`): worked solutions or bare answers, ending with EOS;
//!   held-out accuracy on the task's held-out split;
//! * a vision-language model (Qwen2-VL family) on a JSONL file, one chat per line as Hugging
//!   Face / TRL write it, `{"messages": [{"role": "user", "content": [{"type": "image",
//!   "image": "a.png"}, {"type": "text", "text": "..."}]}, {"role": "assistant", "content":
//!   "..."}]}`: the last message is the assistant's target, the ones before it the prompt
//!   (rendered by the chat template with the generation prompt); the target's tokens are its
//!   text followed by `<|im_end|>`, as the template closes an assistant turn. Image paths are
//!   relative to the file. Held-out accuracy (`eval_data`) is measured on image questions in the
//!   `eval` format.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::data::vl_chat::{encode_chat, parse_messages, VlChat};
use crate::data::{
    prepare_prompts, synthetic, EpochSampler, Location, PreparedPrompt, Prompt,
    PromptDatasetConfig, PromptRecord,
};
use crate::model::qwen2_vl::IMAGE_PLACEHOLDER;
use crate::model::{Activations, ModelKind};
use crate::optim::AdamW;
use crate::tokenizer::Tokenizer;

use super::collective::SingleProcess;
use super::engine::{engine_for, StepOutcome, TrainEngine};
use super::heldout;
use super::policy::{check_vision_options, Policy, Tower};
pub use super::sft_config::SftConfig;

/// What SFT trains on and how it is evaluated, read for the model's kind.
struct SftData {
    examples: Vec<Example>,
    /// Held-out prompts (none: no evaluation).
    heldout: Option<Vec<PreparedPrompt>>,
    /// generation_config.json of the written model.
    generation: Value,
}

/// Runs SFT and writes the model to `output_dir` (a vision-language model in the layout it came
/// in, with its tokenizer and preprocessor_config.json). Returns the final held-out pass@1
/// (sampled at temperature 1; NaN without held-out data).
pub fn run_sft(config: &SftConfig) -> Result<f64> {
    let kind = ModelKind::of_dir(&config.model);
    let train_device = super::device::TrainDevice::open_for(
        &config.device,
        super::device::RunNeeds {
            model: &config.model,
            kind,
            lora: config.lora.is_some(),
            world: 1,
        },
    )?;
    if kind.has_tower() {
        check_vision_options(&config.model, config.device.is_cpu(), config.lora.is_some())?;
    } else {
        ensure!(
            config.data == "synthetic" && config.eval_data.is_none() && !config.freeze_vision,
            "{} is a text model: its SFT trains on the built-in task (data = \"synthetic\", no \
             eval_data, no freeze_vision)",
            config.model.display()
        );
    }
    let device = candle_core::Device::Cpu;
    let loaded = Policy::load(
        &config.model,
        kind,
        &device,
        config.precision,
        !config.freeze_vision,
    );
    let mut policy = if kind.has_tower() {
        loaded.with_context(|| format!("loading the model from {}", config.model.display()))?
    } else {
        loaded?
    };
    if let Some(lora) = &config.lora {
        super::lora_run::attach_adapter(policy.text_mut(), lora, config.seed, &config.model, None)?;
    }
    let keep = if config.gradient_checkpointing {
        Activations::LayerInputs
    } else {
        Activations::All
    };
    let tokenizer = Tokenizer::from_dir(&config.model)?;
    let data = match policy.vision() {
        None => synthetic_data(config, &tokenizer)?,
        Some(vision) => image_data(config, &policy, vision, &tokenizer)?,
    };
    let examples = &data.examples;

    let schedule = config.schedule.build(config.lr, config.steps)?;
    let mut engine = engine_for(&train_device, &policy, AdamW::new(config.adamw)?)?;
    let mut sampler = EpochSampler::new(examples.len(), config.seed)?;
    std::fs::create_dir_all(&config.output_dir)
        .with_context(|| format!("{}: cannot create", config.output_dir.display()))?;
    let log_path = config.output_dir.join("sft_metrics.jsonl");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("{}: cannot create", log_path.display()))?;
    let eval =
        |policy: &Policy, engine: &dyn TrainEngine, temperature: f32| -> Result<Option<f64>> {
            let Some(prompts) = &data.heldout else {
                return Ok(None);
            };
            match policy.vision() {
                // The whole split at once (as the demo's warm start always measured it).
                None => heldout::pass_at_1(
                    policy.text(),
                    &*engine.decode_engine(policy.text())?,
                    &tokenizer,
                    prompts,
                    config.eval_samples,
                    temperature,
                    config.eval_max_new_tokens,
                    config.seed,
                ),
                Some(_) => policy.heldout_pass_at_1(
                    engine,
                    &tokenizer,
                    prompts,
                    config.eval_samples,
                    temperature,
                    config.eval_max_new_tokens,
                    config.seed,
                    &SingleProcess,
                ),
            }
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
        // Trained tokens: all but the tool responses of calculator targets (masked).
        let scored: Vec<bool> = idx
            .iter()
            .flat_map(|&i| {
                let e = &examples[i];
                if e.mask.is_empty() {
                    vec![true; e.target.len()]
                } else {
                    e.mask.clone()
                }
            })
            .collect();
        let n = scored.iter().filter(|&&s| s).count().max(1);
        // L = −Σ_scored logp / N: g_t = −1/N (0 at masked tokens) is known before the
        // forward, so where the engine fuses them (the CPU, a text model) the head's logits
        // are formed once.
        let g: Vec<f32> = scored
            .iter()
            .map(|&s| if s { -1.0 / n as f32 } else { 0.0 })
            .collect();
        let lp = if engine.fuses_forward_backward(&policy) {
            engine.forward_backward_into(&policy, &batch, 1.0, keep, &g)?
        } else {
            let (lp, cache) = engine.forward(&policy, &batch, 1.0, keep)?;
            engine.backward_into(&policy, &batch, cache, &g)?;
            lp
        };
        let loss = -lp
            .logprobs
            .iter()
            .zip(&scored)
            .filter(|(_, &s)| s)
            .map(|(&l, _)| l as f64)
            .sum::<f64>()
            / n as f64;
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
                (eval(&policy, &*engine, 1.0)?, eval(&policy, &*engine, 0.0)?)
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
    engine.sync_host(&mut policy)?;
    policy.save_trained(&config.output_dir)?;
    tokenizer.save_pretrained(&config.output_dir)?;
    crate::model::weights::write_atomic(
        &config.output_dir.join("generation_config.json"),
        serde_json::to_string_pretty(&data.generation)?.as_bytes(),
    )?;
    Ok(pass)
}

/// The built-in task's examples (a worked solution, or with probability
/// `direct_answer_share` the bare boxed answer, then EOS) and its held-out split.
fn synthetic_data(config: &SftConfig, tokenizer: &Tokenizer) -> Result<SftData> {
    let eos = tokenizer
        .eos_token_id()
        .context("the tokenizer has no EOS token; SFT completions must end with one")?;
    let split = config.synthetic.generate()?;
    let fields = crate::data::PromptDatasetConfig {
        apply_chat_template: false,
        ..Default::default()
    };
    ensure!(
        (0.0..=1.0).contains(&config.direct_answer_share)
            && (0.0..=1.0).contains(&config.tool_share)
            && config.direct_answer_share + config.tool_share <= 1.0,
        "direct_answer_share and tool_share must be in [0, 1] with a sum ≤ 1"
    );
    let tool_format = crate::tools::TurnFormat::of(
        tokenizer,
        &[crate::tools::Tool::schema(&crate::tools::Calculator)],
    );
    let mut style_rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut examples = Vec::with_capacity(split.train.len());
    for p in &split.train {
        let record = p.prompt_record(0, &fields);
        let ids = tokenizer.encode_prompt(&record.prompt)?;
        let draw = style_rng.gen::<f64>();
        let (mut completion, mut mask) = if draw < config.direct_answer_share {
            (
                tokenizer.encode(&format!("\\boxed{{{}}}", p.answer), false)?,
                Vec::new(),
            )
        } else if draw < config.direct_answer_share + config.tool_share {
            calculator_target(tokenizer, &tool_format, p)?
        } else {
            (tokenizer.encode(&p.solution, false)?, Vec::new())
        };
        completion.push(eos);
        if !mask.is_empty() {
            mask.push(true);
        }
        examples.push(Example {
            prompt: PreparedPrompt {
                record,
                ids,
                images: Vec::new(),
            },
            target: completion,
            mask,
        });
    }
    let heldout = prepare_prompts(tokenizer, synthetic::to_dataset(&split.heldout, &fields)?)?;
    Ok(SftData {
        examples,
        heldout: Some(heldout),
        generation: serde_json::json!({"bos_token_id": eos, "eos_token_id": [eos]}),
    })
}

/// The image chats of `data` and the image questions of `eval_data` (see the module doc).
fn image_data(
    config: &SftConfig,
    policy: &Policy,
    vision: &Tower,
    tokenizer: &Tokenizer,
) -> Result<SftData> {
    let end_of_turn = tokenizer
        .token_to_id("<|im_end|>")
        .or_else(|| tokenizer.eos_token_id())
        .context("the tokenizer has neither <|im_end|> nor an EOS token to end the target")?;
    let examples = image_chat_examples(Path::new(&config.data), vision, tokenizer, end_of_turn)?;
    let heldout = match &config.eval_data {
        Some(path) => Some(vision.load_prompts(
            Path::new(path),
            &PromptDatasetConfig::default(),
            tokenizer,
        )?),
        None => None,
    };
    Ok(SftData {
        examples,
        heldout,
        generation: serde_json::json!({"eos_token_id": &policy.text().config.eos_token_id}),
    })
}

/// One SFT example: the prompt (ids with expanded image pads, image paths) and the target ids.
struct Example {
    prompt: PreparedPrompt,
    target: Vec<u32>,
    /// Loss mask of the target (false: a tool's response, context only); empty: every token
    /// is trained on.
    mask: Vec<bool>,
}

/// Reads the image chats of `path` (see the module doc) into examples.
fn image_chat_examples(
    path: &Path,
    policy: &Tower,
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
            &policy.config,
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
            mask: Vec::new(),
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

/// The calculator-calling target of a synthetic problem and its loss mask:
/// `<tool_call>` with the question's expression (trained), the tool turn with the exact value
/// (context: masked), then `\boxed{N}` (trained). The EOS is appended by the caller.
fn calculator_target(
    tokenizer: &Tokenizer,
    format: &crate::tools::TurnFormat,
    problem: &synthetic::SyntheticProblem,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let expression = problem
        .question
        .trim_start_matches("Compute ")
        .trim_end_matches('.');
    let value = crate::tools::Calculator::evaluate(expression)
        .map_err(|e| anyhow::anyhow!("synthetic problem {:?}: {e}", problem.question))?;
    ensure!(
        value == problem.answer,
        "synthetic problem {:?}: the calculator says {value}, the answer is {}",
        problem.question,
        problem.answer
    );
    // Qwen's layout of a call: `{"name": "…", "arguments": {…}}`, one line.
    let call = format!(
        "{}\n{{\"name\": \"calculator\", \"arguments\": {{\"expression\": {}}}}}\n{}",
        crate::tools::CALL_OPEN,
        serde_json::Value::from(expression),
        crate::tools::CALL_CLOSE
    );
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for (text, trained) in [
        (call.as_str(), true),
        (format.render(&value).as_str(), false),
        (format!("\\boxed{{{}}}", problem.answer).as_str(), true),
    ] {
        let part = tokenizer.encode(text, false)?;
        mask.extend(std::iter::repeat_n(trained, part.len()));
        ids.extend(part);
    }
    Ok((ids, mask))
}
