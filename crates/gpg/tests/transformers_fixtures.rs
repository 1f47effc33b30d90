//! The engine against PyTorch/transformers reference outputs (tests/fixtures/qwen2, produced
//! by make_fixtures.py there): per-token log-probs, greedy decoding and gradients, on a tied
//! f32 checkpoint and an untied, sharded bf16 checkpoint with 6/2 heads.

use std::path::PathBuf;

use gpg::candle_core::{Device, Tensor};
use gpg::model::{Qwen2, TrainBatch};
use gpg::rollout::{self, SamplingParams};
use gpg::tokenizer::Tokenizer;
use serde_json::Value;

mod fixture_json;
use fixture_json::{floats, ids};

const MODELS: [&str; 2] = ["tied_f32", "untied_bf16"];

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/qwen2")
        .join(name)
}

fn jsonl(path: PathBuf) -> Vec<Value> {
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn logprobs_match_transformers_within_1e_4() {
    for name in MODELS {
        let dir = fixture_dir(name);
        let model = Qwen2::from_dir(&dir, &Device::Cpu).unwrap();
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let cases = jsonl(dir.join("expected_logprobs.jsonl"));
        assert!(cases.len() >= 5);
        let mut worst = 0.0f32;
        for case in &cases {
            // Tokenizing separately, without special tokens, reproduces the reference ids.
            let prompt_ids = tokenizer
                .encode(case["prompt"].as_str().unwrap(), false)
                .unwrap();
            let completion_ids = tokenizer
                .encode(case["completion"].as_str().unwrap(), false)
                .unwrap();
            assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "{name}: prompt ids");
            assert_eq!(
                completion_ids,
                ids(&case["completion_ids"]),
                "{name}: completion ids"
            );
            let batch = TrainBatch::new(&[(&prompt_ids, &completion_ids)]).unwrap();
            let got = model.logprobs(&batch, 1.0).unwrap().logprobs;
            let want = floats(&case["logprobs"]);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                worst = worst.max((g - w).abs());
            }
        }
        assert!(worst < 1e-4, "{name}: worst log-prob difference {worst}");
        // All cases packed in one batch give the same values.
        let all: Vec<(Vec<u32>, Vec<u32>)> = cases
            .iter()
            .map(|c| (ids(&c["prompt_ids"]), ids(&c["completion_ids"])))
            .collect();
        let pairs: Vec<(&[u32], &[u32])> = all
            .iter()
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect();
        let packed = model
            .logprobs(&TrainBatch::new(&pairs).unwrap(), 1.0)
            .unwrap()
            .logprobs;
        let want: Vec<f32> = cases.iter().flat_map(|c| floats(&c["logprobs"])).collect();
        for (g, w) in packed.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{name}: packed {g} vs {w}");
        }
    }
}

/// A fixture model, its tokenizer, its greedy reference cases and their prompt ids.
fn greedy_cases(name: &str) -> (Qwen2, Tokenizer, Vec<Value>, Vec<Vec<u32>>) {
    let dir = fixture_dir(name);
    let model = Qwen2::from_dir(&dir, &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let cases = jsonl(dir.join("expected_greedy.jsonl"));
    let prompts = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    (model, tokenizer, cases, prompts)
}

/// Largest |sampling log-prob − training-forward log-prob at `inv_temperature`| over every
/// token of `out` (each completion scored after its own prompt).
fn worst_logprob_gap(
    model: &Qwen2,
    prompts: &[Vec<u32>],
    out: &[rollout::Completion],
    inv_temperature: f32,
) -> f32 {
    let mut worst = 0.0f32;
    for c in out {
        let p = &prompts[c.prompt_index];
        let batch = TrainBatch::new(&[(p, &c.token_ids)]).unwrap();
        let lp = model.logprobs(&batch, inv_temperature).unwrap().logprobs;
        assert_eq!(lp.len(), c.logprobs.len());
        for (a, b) in lp.iter().zip(&c.logprobs) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

#[test]
fn greedy_generation_matches_transformers_exactly() {
    for name in MODELS {
        let (model, tokenizer, cases, prompts) = greedy_cases(name);
        let params = SamplingParams {
            max_new_tokens: 16,
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        };
        // Batched, prompts of different lengths.
        let out = rollout::generate(&model, &tokenizer, &prompts, &params).unwrap();
        assert_eq!(out.len(), cases.len());
        for (c, case) in out.iter().zip(&cases) {
            assert_eq!(
                c.token_ids,
                ids(&case["new_token_ids"]),
                "{name}: prompt {}",
                case["prompt"]
            );
        }
        // The sampler's log-probs (KV-cache path) equal the training forward's.
        let worst = worst_logprob_gap(&model, &prompts, &out, 1.0);
        assert!(
            worst < 1e-4,
            "{name}: worst |cache path − forward| = {worst}"
        );
    }
}

/// Sampled rows that finish at different steps leave the batch; every row's sampling
/// log-probs (decoder path, softmax(logits / T)) still equal the training forward's at 1/T.
#[test]
fn sampled_logprobs_match_the_training_forward() {
    for name in MODELS {
        let (model, tokenizer, _, prompts) = greedy_cases(name);
        let params = SamplingParams {
            n: 3,
            max_new_tokens: 20,
            temperature: 0.7,
            seed: 3,
            ..Default::default()
        };
        let out = rollout::generate(&model, &tokenizer, &prompts, &params).unwrap();
        assert_eq!(out.len(), 3 * prompts.len());
        let worst = worst_logprob_gap(&model, &prompts, &out, 1.0 / 0.7);
        assert!(worst < 1e-4, "{name}: worst |decoder − forward| = {worst}");
    }
}

#[test]
fn gradients_match_pytorch_within_1e_3_relative() {
    for name in MODELS {
        let dir = fixture_dir(name);
        let model = Qwen2::from_dir(&dir, &Device::Cpu).unwrap();
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("grad_case.json")).unwrap())
                .unwrap();
        let seqs: Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> = case["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    ids(&s["prompt_ids"]),
                    ids(&s["completion_ids"]),
                    floats(&s["weights"]),
                )
            })
            .collect();
        let pairs: Vec<(&[u32], &[u32])> = seqs
            .iter()
            .map(|(p, c, _)| (p.as_slice(), c.as_slice()))
            .collect();
        let batch = TrainBatch::new(&pairs).unwrap();
        let g: Vec<f32> = seqs.iter().flat_map(|(_, _, w)| w.clone()).collect();
        let (lp, cache) = model.forward_train(&batch, 1.0).unwrap();
        let loss: f64 = lp
            .logprobs
            .iter()
            .zip(&g)
            .map(|(&l, &w)| l as f64 * w as f64)
            .sum();
        let want_loss = case["loss"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
            "{name}: loss {loss} vs {want_loss}"
        );
        let grads = model.backward(&batch, cache, &g).unwrap();
        let expected = gpg::candle_core::safetensors::load(
            dir.join("expected_grads.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let named = grads.named();
        assert_eq!(
            expected.len(),
            named.len(),
            "{name}: number of gradient tensors"
        );
        for (pname, got) in named {
            let want: &Tensor = expected
                .get(&pname)
                .unwrap_or_else(|| panic!("{name}: no reference for {pname}"));
            let got = Tensor::from_slice(got, want.dims(), &Device::Cpu).unwrap();
            let diff: f32 = (&got - want)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let norm: f32 = want.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            let rel = (diff / norm.max(1e-30)).sqrt();
            assert!(rel < 1e-3, "{name}: {pname} relative error {rel:e}");
        }
    }
}

/// gpg-rl's bf16 mode against the f32 reference is at least as close as transformers' own
/// bf16 run (expected_logprobs_bf16.jsonl, made by make_bf16_logprobs.py): worst and mean
/// |logp gap| over every completion token of the fixture cases.
#[test]
fn bf16_logprobs_are_as_close_as_transformers_bf16() {
    for name in ["tied_f32", "untied_bf16"] {
        let dir = fixture_dir(name);
        let model = Qwen2::load(&dir, &Device::Cpu, gpg::model::Precision::Bf16).unwrap();
        let cases = jsonl(dir.join("expected_logprobs_bf16.jsonl"));
        let (mut ours_worst, mut theirs_worst, mut ours_sum, mut theirs_sum, mut n) =
            (0.0f32, 0.0f32, 0.0f64, 0.0f64, 0usize);
        for case in &cases {
            let (p, c) = (ids(&case["prompt_ids"]), ids(&case["completion_ids"]));
            let batch = TrainBatch::new(&[(&p, &c)]).unwrap();
            let got = model.logprobs(&batch, 1.0).unwrap().logprobs;
            let f32_ref = floats(&case["logprobs_f32"]);
            let hf_bf16 = floats(&case["logprobs_bf16"]);
            for ((g, r), h) in got.iter().zip(&f32_ref).zip(&hf_bf16) {
                ours_worst = ours_worst.max((g - r).abs());
                theirs_worst = theirs_worst.max((h - r).abs());
                ours_sum += (g - r).abs() as f64;
                theirs_sum += (h - r).abs() as f64;
                n += 1;
            }
        }
        eprintln!(
            "{name}: bf16 |logp - f32 reference|: gpg-rl worst {ours_worst:.4} mean {:.4}; \
             transformers bf16 worst {theirs_worst:.4} mean {:.4} ({n} tokens)",
            ours_sum / n as f64,
            theirs_sum / n as f64
        );
        assert!(
            ours_worst <= theirs_worst && ours_sum <= theirs_sum,
            "{name}: gpg-rl bf16 gap (worst {ours_worst}, sum {ours_sum}) exceeds transformers' \
             (worst {theirs_worst}, sum {theirs_sum})"
        );
    }
}
