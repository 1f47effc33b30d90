//! The multi-turn loop with a scripted decoder (the tokens a policy that uses the tool would
//! write, so the loop's bookkeeping is checked exactly), and the loss mask through the real
//! engine: g_t and the parameter gradient against finite differences of a loss summed by hand
//! over the model's own tokens.

use std::path::Path;

use candle_core::Device;

use super::*;
use crate::algo::objective::gpg_loss;
use crate::algo::{Normaliser, PolicyTokens, TokenLayout};
use crate::model::decoding::{DecodeBatch, DecodeEngine};
use crate::model::{Qwen2Config, TrainBatch};
use crate::sampling::TokenSampler;
use crate::tools::{ToolSpec, Toolbox, ToolsConfig};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/qwen2/tied_f32"
    )))
    .unwrap()
}

fn model(tokenizer: &Tokenizer, max_pos: usize) -> Qwen2 {
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": tokenizer.vocab_size(), "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": max_pos, "tie_word_embeddings": false
    }))
    .unwrap();
    Qwen2::random(config, 0.1, 3, &Device::Cpu).unwrap()
}

/// What the scripted policy writes, given its context so far.
type Script = dyn Fn(&str) -> String + Sync;

/// A decoder that writes, for each row, the tokens of `script(context)` then EOS.
struct Scripted<'a> {
    tokenizer: &'a Tokenizer,
    script: &'a Script,
    eos: u32,
}

struct ScriptedBatch<'a> {
    /// (tokens to write, next position) per row.
    rows: Vec<(Vec<u32>, usize)>,
    engine: &'a Scripted<'a>,
}

impl DecodeEngine for Scripted<'_> {
    fn device_name(&self) -> String {
        "script".into()
    }
    fn new_batch(&self, _: usize, _: usize) -> Result<Box<dyn DecodeBatch + '_>> {
        Ok(Box::new(ScriptedBatch {
            rows: Vec::new(),
            engine: self,
        }))
    }
}

impl DecodeBatch for ScriptedBatch<'_> {
    fn rows(&self) -> usize {
        self.rows.len()
    }
    fn push_row(&mut self, _: &[(&[f32], &[f32])], _: usize, _: &[f32]) -> Result<()> {
        unreachable!()
    }
    fn push_prompts(&mut self, prompts: &[Vec<u32>], n: usize, _: usize) -> Result<()> {
        for p in prompts {
            let context = self.engine.tokenizer.decode(p, false)?;
            let mut ids = self
                .engine
                .tokenizer
                .encode(&(self.engine.script)(&context), false)?;
            ids.push(self.engine.eos);
            for _ in 0..n {
                self.rows.push((ids.clone(), 0));
            }
        }
        Ok(())
    }
    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        let mut k = keep.iter();
        self.rows.retain(|_| *k.next().unwrap());
        Ok(())
    }
    fn step(&mut self, _: &[u32], _: &[u32]) -> Result<()> {
        for r in &mut self.rows {
            r.1 += 1;
        }
        Ok(())
    }
    fn sample(&mut self, _: &mut [&mut TokenSampler], _: usize) -> Result<Vec<(u32, f32)>> {
        Ok(self
            .rows
            .iter()
            .map(|(ids, k)| (ids[(*k).min(ids.len() - 1)], -0.5))
            .collect())
    }
    fn logits(&mut self) -> Result<Vec<f32>> {
        Ok(Vec::new())
    }
}

fn toolbox(tokenizer: &Tokenizer, max_turns: usize, budget: Option<usize>) -> Toolbox {
    let config = ToolsConfig {
        functions: vec![ToolSpec {
            name: "calculator".into(),
            options: None,
        }],
        max_turns,
        max_total_tokens: budget,
        timeout_secs: 1.0,
        max_output_bytes: 1000,
        max_response_chars: 100,
    };
    Toolbox::new(&config, tokenizer).unwrap()
}

fn params(n: usize) -> SamplingParams {
    SamplingParams {
        n,
        max_new_tokens: 200,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: 5,
        stop_token_ids: Vec::new(),
        stop_strings: Vec::new(),
        ignore_eos: false,
    }
}

const CALL: &str =
    "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"6*7\"}}\n</tool_call>";

/// Calls the calculator once, then answers with what it said.
fn call_then_answer(context: &str) -> String {
    match context.rsplit_once("<tool_response>\n") {
        None => CALL.to_string(),
        Some((_, rest)) => {
            let answer = rest.split('\n').next().unwrap_or("");
            format!("\\boxed{{{answer}}}")
        }
    }
}

fn run(
    script: &Script,
    tools: &Toolbox,
    max_pos: usize,
    prompts: &[Vec<u32>],
) -> (Vec<Completion>, ToolStats) {
    let tok = tokenizer();
    let model = model(&tok, max_pos);
    let engine = Scripted {
        tokenizer: &tok,
        script,
        eos: tok.eos_token_id().unwrap(),
    };
    generate_with_tools(&model, &engine, &tok, prompts, &params(2), 0, tools).unwrap()
}

#[test]
fn a_tool_turn_is_in_the_context_and_masked() {
    let tok = tokenizer();
    let tools = toolbox(&tok, 3, Some(400));
    let prompt = tok.encode("Compute 6*7.", false).unwrap();
    let (out, stats) = run(
        &call_then_answer,
        &tools,
        512,
        std::slice::from_ref(&prompt),
    );
    assert_eq!(out.len(), 2);
    let call_ids = tok.encode(CALL, false).unwrap();
    let turn_ids = tok.encode(&tools.format().render("42"), false).unwrap();
    let answer_ids = tok.encode("\\boxed{42}", false).unwrap();
    let eos = tok.eos_token_id().unwrap();
    for c in &out {
        let mut want = call_ids.clone();
        want.extend(&turn_ids);
        want.extend(&answer_ids);
        want.push(eos);
        assert_eq!(c.token_ids, want);
        let mut mask = vec![true; call_ids.len()];
        mask.extend(vec![false; turn_ids.len()]);
        mask.extend(vec![true; answer_ids.len() + 1]);
        assert_eq!(c.loss_mask, mask);
        assert_eq!(c.scored_len(), call_ids.len() + answer_ids.len() + 1);
        // Sampling log-probs for the model's tokens, 0 for the tool's.
        assert!(c.logprobs[call_ids.len()..call_ids.len() + turn_ids.len()]
            .iter()
            .all(|&l| l == 0.0));
        assert_eq!(c.finish_reason, FinishReason::Eos);
        // Rewards see the model's own text; the log sees the whole trajectory.
        assert!(c.text.contains("\\boxed{42}") && !c.text.contains("tool_response"));
        assert!(c
            .transcript
            .contains("<tool_response>\n42\n</tool_response>"));
        assert_eq!(c.tool_calls.len(), 1);
        assert_eq!(c.tool_calls[0].response, "42");
        assert!(!c.tool_calls[0].error);
    }
    assert_eq!(
        stats,
        ToolStats {
            trajectories: 2,
            calls: 2,
            errors: 0,
            turns: 4,
            tool_tokens: 2 * turn_ids.len(),
            turn_limited: 0,
        }
    );
    // Same seed, same trajectories.
    let (again, _) = run(&call_then_answer, &tools, 512, &[prompt]);
    assert_eq!(
        again.iter().map(|c| &c.token_ids).collect::<Vec<_>>(),
        out.iter().map(|c| &c.token_ids).collect::<Vec<_>>()
    );
}

#[test]
fn limits_and_errors_end_trajectories_in_bounded_ways() {
    let tok = tokenizer();
    let prompt = tok.encode("Compute 6*7.", false).unwrap();
    let always_call = |_: &str| CALL.to_string();
    // Turn limit: two answered calls, the third ends the trajectory.
    let (out, stats) = run(
        &always_call,
        &toolbox(&tok, 2, Some(1000)),
        2048,
        std::slice::from_ref(&prompt),
    );
    assert!(out
        .iter()
        .all(|c| c.finish_reason == FinishReason::ToolLimit));
    assert!(out.iter().all(|c| c.tool_calls.len() == 2));
    assert_eq!((stats.calls, stats.turn_limited), (4, 2));
    // Token budget: the call fits, the response does not.
    let call_len = tok.encode(CALL, false).unwrap().len();
    let (out, _) = run(
        &always_call,
        &toolbox(&tok, 5, Some(call_len + 5)),
        2048,
        std::slice::from_ref(&prompt),
    );
    for c in &out {
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.token_ids.len(), call_len);
        assert!(c.loss_mask.iter().all(|&m| m));
    }
    // A malformed call and an unknown tool: the error is the tool's response, the
    // trajectory goes on and is counted.
    let broken = |context: &str| {
        if context.contains("<tool_response>") {
            "\\boxed{1}".to_string()
        } else {
            "<tool_call>\n{\"name\": \"calculator\", \"arguments\": \n</tool_call>".to_string()
        }
    };
    let (out, stats) = run(&broken, &toolbox(&tok, 2, Some(1000)), 2048, &[prompt]);
    assert_eq!(stats.errors, 2);
    for c in &out {
        assert!(c.tool_calls[0].error);
        assert!(
            c.transcript.contains("error: malformed tool call"),
            "{}",
            c.transcript
        );
        assert_eq!(c.finish_reason, FinishReason::Eos);
    }
}

/// The loss mask through the engine: a completion with a tool turn inside (positions 2, 3 of
/// sequence 0). g_t is 0 there, and the parameter gradient of the GPG loss equals central
/// finite differences of L(θ) = −Σ_i Â_i Σ_{t model's own} logp_t(θ) / N_own, summed here by
/// hand in f64 without the layout — the tool tokens are in the context (they change the later
/// tokens' log-probs) but contribute no term and no count.
#[test]
fn masked_tokens_contribute_nothing_to_the_gradient() {
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 23, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 32, "tie_word_embeddings": false
    }))
    .unwrap();
    let model = Qwen2::random(config, 0.4, 7, &Device::Cpu).unwrap();
    let batch = TrainBatch::new(&[
        (&[1, 4, 9][..], &[3, 7, 12, 13, 5][..]),
        (&[6][..], &[8, 1][..]),
    ])
    .unwrap();
    let mask = vec![true, true, false, false, true, true, true];
    let advantages = [1.0f32, -0.5];
    let layout = TokenLayout::from_lengths(&[5, 2])
        .with_mask(mask.clone())
        .unwrap();
    let (lp, cache) = model.forward_train(&batch, 1.0).unwrap();
    let tokens = PolicyTokens {
        layout: &layout,
        logp: &lp.logprobs,
        old_logp: None,
        ref_logp: None,
        advantages: &advantages,
    };
    let out = gpg_loss(&tokens, 1.0, Normaliser::micro_batch(&layout)).unwrap();
    assert_eq!(out.token_weights[2], 0.0);
    assert_eq!(out.token_weights[3], 0.0);
    let grads = model.backward(&batch, cache, &out.token_weights).unwrap();

    // The reference loss, by hand: 5 own tokens; Â = 1 for tokens 0, 1, 4; −0.5 for 5, 6.
    let own = [(0usize, 1.0f64), (1, 1.0), (4, 1.0), (5, -0.5), (6, -0.5)];
    let loss = |m: &Qwen2| -> f64 {
        let lp = m.logprobs(&batch, 1.0).unwrap().logprobs;
        -own.iter().map(|&(t, a)| a * lp[t] as f64).sum::<f64>() / 5.0
    };
    let eps = 1e-2f32;
    let mut checked = 0;
    let mut largest = 0.0f64;
    for ((name, w), (_, g)) in model.weights.named().into_iter().zip(grads.named()) {
        let orig: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..orig.len()).step_by(7) {
            let mut v = orig.clone();
            v[i] = orig[i] + eps;
            crate::model::lora::write_f32(w, &v).unwrap();
            let up = loss(&model);
            v[i] = orig[i] - eps;
            crate::model::lora::write_f32(w, &v).unwrap();
            let down = loss(&model);
            crate::model::lora::write_f32(w, &orig).unwrap();
            let fd = (up - down) / (2.0 * eps as f64);
            let an = g[i] as f64;
            assert!(
                (fd - an).abs() <= 2e-3 + 1e-2 * an.abs(),
                "{name}[{i}]: finite difference {fd} vs backward {an}"
            );
            largest = largest.max(an.abs());
            checked += 1;
        }
    }
    assert!(checked > 30 && largest > 1e-2, "{checked} {largest}");

    // Without the mask the gradient differs (the tool tokens would be trained on).
    let plain = TokenLayout::from_lengths(&[5, 2]);
    let unmasked = gpg_loss(
        &PolicyTokens {
            layout: &plain,
            ..tokens
        },
        1.0,
        Normaliser::micro_batch(&plain),
    )
    .unwrap();
    let (_, cache) = model.forward_train(&batch, 1.0).unwrap();
    let other = model
        .backward(&batch, cache, &unmasked.token_weights)
        .unwrap();
    assert_ne!(grads, other);
}
