//! Supervised fine-tuning with the same engine: the mean negative log-likelihood of the
//! completion tokens, L = −(1/N) Σ_t log π(o_t | context), so g_t = −1/N for every token.
//! Used for the warm start of the demo model (`gpg-rl sft`).

use std::io::Write;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::{prepare_prompts, synthetic, EpochSampler};
use crate::model::{Activations, Qwen2, TrainBatch};
use crate::optim::AdamW;
use crate::tokenizer::Tokenizer;

use super::heldout;
pub use super::sft_config::SftConfig;
use super::update::StepOutcome;
use super::updater::Updater;

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
        (0.0..=1.0).contains(&config.direct_answer_share)
            && (0.0..=1.0).contains(&config.tool_share)
            && config.direct_answer_share + config.tool_share <= 1.0,
        "direct_answer_share and tool_share must be in [0, 1] with a sum ≤ 1"
    );
    let tool_format = crate::tools::TurnFormat::of(
        &tokenizer,
        &[crate::tools::Tool::schema(&crate::tools::Calculator)],
    );
    let mut style_rng = ChaCha8Rng::seed_from_u64(config.seed);
    // (prompt, completion, loss mask: empty when every token is trained on)
    let mut pairs = Vec::with_capacity(split.train.len());
    for p in &split.train {
        let record = p.prompt_record(0, &fields);
        let prompt = tokenizer.encode_prompt(&record.prompt)?;
        let draw = style_rng.gen::<f64>();
        let (mut completion, mut mask) = if draw < config.direct_answer_share {
            (
                tokenizer.encode(&format!("\\boxed{{{}}}", p.answer), false)?,
                Vec::new(),
            )
        } else if draw < config.direct_answer_share + config.tool_share {
            calculator_target(&tokenizer, &tool_format, p)?
        } else {
            (tokenizer.encode(&p.solution, false)?, Vec::new())
        };
        completion.push(eos);
        if !mask.is_empty() {
            mask.push(true);
        }
        pairs.push((prompt, completion, mask));
    }
    let heldout = prepare_prompts(&tokenizer, synthetic::to_dataset(&split.heldout, &fields)?)?;

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
        // Trained tokens: all but the tool responses of calculator targets (masked).
        let scored: Vec<bool> = idx
            .iter()
            .flat_map(|&i| {
                let (_, c, m) = &pairs[i];
                if m.is_empty() {
                    vec![true; c.len()]
                } else {
                    m.clone()
                }
            })
            .collect();
        let n = scored.iter().filter(|&&s| s).count().max(1);
        // L = −Σ_scored logp / N: g_t = −1/N (0 at masked tokens) is known before the
        // forward, so on the CPU the head's logits are formed once (forward and backward in
        // one pass).
        let g: Vec<f32> = scored
            .iter()
            .map(|&s| if s { -1.0 / n as f32 } else { 0.0 })
            .collect();
        let lp = if updater.fuses_forward_backward() {
            updater.forward_backward_into(&model, &batch, 1.0, keep, &g)?
        } else {
            let (lp, cache) = updater.forward(&model, &batch, 1.0, keep)?;
            updater.backward_into(&model, &batch, cache, &g)?;
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
