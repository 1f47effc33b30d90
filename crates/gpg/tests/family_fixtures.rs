//! Qwen3 (QK-norm, explicit head_dim, no q/k/v bias) and Llama 3 (llama3 RoPE scaling, untied
//! bf16 checkpoint) against PyTorch / transformers / PEFT (tests/fixtures/qwen3 and
//! tests/fixtures/llama3, made by tests/fixtures/qwen3/make_fixtures.py): RoPE frequencies,
//! per-token log-probs within 1e-4, greedy tokens identical, gradients within 1e-3 relative,
//! a PEFT LoRA adapter's log-probs and A/B gradients, and the chat templates' renderings
//! (Qwen3's with `enable_thinking` unset / true / false).

use std::path::PathBuf;

use gpg::candle_core::Device;
use gpg::model::adapter_io::peft_key;
use gpg::model::config::ModelFamily;
use gpg::model::{Activations, Precision, Qwen2, TrainBatch};
use gpg::rollout::{self, SamplingParams};
use gpg::tokenizer::{parse_chat_template_kwargs, ChatMessage, Tokenizer};
use serde_json::Value;

mod fixture_json;
use fixture_json::{floats, ids};

const FAMILIES: [(&str, ModelFamily); 2] = [
    ("qwen3", ModelFamily::Qwen3),
    ("llama3", ModelFamily::Llama),
];

fn dir(family: &str, sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(family)
        .join(sub)
}

fn jsonl(path: PathBuf) -> Vec<Value> {
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn model(family: &str) -> Qwen2 {
    Qwen2::from_dir(&dir(family, "tiny"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// (prompt ids, completion ids, weights w_t) of one sequence.
type Sequence = (Vec<u32>, Vec<u32>, Vec<f32>);

/// The sequences of the gradient case, and its loss.
fn grad_case(v: &Value) -> (Vec<Sequence>, f64) {
    let seqs = v["sequences"]
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
    (seqs, v["loss"].as_f64().unwrap())
}

fn batch_of(seqs: &[Sequence]) -> (TrainBatch, Vec<f32>) {
    let pairs: Vec<(&[u32], &[u32])> = seqs
        .iter()
        .map(|(p, c, _)| (p.as_slice(), c.as_slice()))
        .collect();
    let g = seqs.iter().flat_map(|s| s.2.clone()).collect();
    (TrainBatch::new(&pairs).unwrap(), g)
}

/// sqrt(Σ (a−b)²) / sqrt(Σ b²).
fn rel_l2(got: &[f32], want: &[f32]) -> f32 {
    let diff: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let norm: f32 = want.iter().map(|b| b * b).sum();
    (diff / norm.max(1e-30)).sqrt()
}

#[test]
fn family_and_rope_frequencies_are_transformers() {
    for (family, kind) in FAMILIES {
        let m = model(family);
        assert_eq!(m.config.family().unwrap(), kind);
        assert_eq!(m.config.qk_norm(), kind == ModelFamily::Qwen3);
        assert!(!m.config.qkv_bias() && !m.config.o_proj_bias() && !m.config.mlp_bias());
        let want = json(dir(family, "tiny").join("expected_inv_freq.json"));
        assert_eq!(want["attention_scaling"].as_f64(), Some(1.0));
        let got = m.config.rope_inv_freq().unwrap();
        let want = floats(&want["inv_freq"]);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs(),
                "{family}: inv_freq[{i}] {g} vs {w}"
            );
        }
        assert_eq!(got.len(), want.len());
        // Every parameter the checkpoint holds is in the tree (QK-norm leaves included), and
        // none without a bias.
        let names = m.parameter_names();
        assert_eq!(
            names.iter().any(|n| n.ends_with("self_attn.q_norm.weight")),
            kind == ModelFamily::Qwen3
        );
        assert!(!names.iter().any(|n| n.ends_with(".bias")));
        assert_eq!(m.parameter_count(), m.config.num_parameters());
    }
}

#[test]
fn logprobs_match_transformers_within_1e_4() {
    for (family, _) in FAMILIES {
        let d = dir(family, "tiny");
        let m = model(family);
        let tokenizer = Tokenizer::from_dir(&d).unwrap();
        let cases = jsonl(d.join("expected_logprobs.jsonl"));
        let mut worst = 0.0f32;
        let mut all = Vec::new();
        for case in &cases {
            let p = tokenizer
                .encode(case["prompt"].as_str().unwrap(), false)
                .unwrap();
            let c = tokenizer
                .encode(case["completion"].as_str().unwrap(), false)
                .unwrap();
            assert_eq!(p, ids(&case["prompt_ids"]), "{family}: prompt ids");
            assert_eq!(c, ids(&case["completion_ids"]), "{family}: completion ids");
            let got = m
                .logprobs(&TrainBatch::new(&[(&p, &c)]).unwrap(), 1.0)
                .unwrap();
            worst = worst.max(max_abs_diff(&got.logprobs, &floats(&case["logprobs"])));
            all.push((p, c));
        }
        assert!(worst < 1e-4, "{family}: worst log-prob difference {worst}");
        // Packed together: the same values.
        let pairs: Vec<(&[u32], &[u32])> = all
            .iter()
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect();
        let packed = m
            .logprobs(&TrainBatch::new(&pairs).unwrap(), 1.0)
            .unwrap()
            .logprobs;
        let want: Vec<f32> = cases.iter().flat_map(|c| floats(&c["logprobs"])).collect();
        assert!(max_abs_diff(&packed, &want) < 1e-4, "{family}: packed");
    }
}

#[test]
fn greedy_generation_matches_transformers_exactly() {
    for (family, _) in FAMILIES {
        let d = dir(family, "tiny");
        let m = model(family);
        let tokenizer = Tokenizer::from_dir(&d).unwrap();
        let cases = jsonl(d.join("expected_greedy.jsonl"));
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
        let params = SamplingParams {
            max_new_tokens: 16,
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        };
        let out = rollout::generate(&m, &tokenizer, &prompts, &params).unwrap();
        for (c, case) in out.iter().zip(&cases) {
            assert_eq!(
                c.token_ids,
                ids(&case["new_token_ids"]),
                "{family}: {}",
                case["prompt"]
            );
        }
        // The decoder's (KV cache) log-probs equal the training forward's, also when sampling.
        let sampled = SamplingParams {
            n: 3,
            max_new_tokens: 20,
            temperature: 0.7,
            seed: 5,
            ..Default::default()
        };
        for (params, inv_t) in [(&params, 1.0), (&sampled, 1.0 / 0.7)] {
            let out = rollout::generate(&m, &tokenizer, &prompts, params).unwrap();
            for c in &out {
                let b = TrainBatch::new(&[(&prompts[c.prompt_index], &c.token_ids)]).unwrap();
                let lp = m.logprobs(&b, inv_t).unwrap().logprobs;
                assert!(
                    max_abs_diff(&lp, &c.logprobs) < 1e-4,
                    "{family}: decoder vs forward"
                );
            }
        }
    }
}

#[test]
fn gradients_match_pytorch_within_1e_3_relative() {
    for (family, _) in FAMILIES {
        let d = dir(family, "tiny");
        let m = model(family);
        let (seqs, want_loss) = grad_case(&json(d.join("grad_case.json")));
        let (batch, g) = batch_of(&seqs);
        let (lp, cache) = m.forward_train(&batch, 1.0).unwrap();
        let loss: f64 = lp
            .logprobs
            .iter()
            .zip(&g)
            .map(|(&l, &w)| l as f64 * w as f64)
            .sum();
        assert!(
            (loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
            "{family}: loss {loss} vs {want_loss}"
        );
        let grads = m.backward(&batch, cache, &g).unwrap();
        let expected =
            gpg::candle_core::safetensors::load(d.join("expected_grads.safetensors"), &Device::Cpu)
                .unwrap();
        let named = grads.named();
        assert_eq!(
            expected.len(),
            named.len(),
            "{family}: number of gradient tensors"
        );
        for (name, got) in &named {
            let want: Vec<f32> = expected[name].flatten_all().unwrap().to_vec1().unwrap();
            let rel = rel_l2(got, &want);
            assert!(rel < 1e-3, "{family}: {name} relative error {rel:e}");
        }
        // Gradient checkpointing (the layer recomputed, QK-norm included) and the fused
        // head give the same gradients.
        let (_, cache) = m
            .forward_train_with(&batch, 1.0, Activations::LayerInputs)
            .unwrap();
        let again = m.backward(&batch, cache, &g).unwrap();
        let mut fused = m.zero_grads().unwrap();
        m.forward_backward_into(&batch, 1.0, Activations::All, &g, &mut fused)
            .unwrap();
        for (name, got) in &named {
            assert_eq!(
                again.get(name).unwrap(),
                *got,
                "{family}: checkpointed {name}"
            );
            let rel = rel_l2(fused.get(name).unwrap(), got);
            assert!(rel < 1e-5, "{family}: fused head {name} {rel:e}");
        }
    }
}

#[test]
fn peft_lora_adapter_matches_peft() {
    for (family, _) in FAMILIES {
        let mut m = model(family);
        m.load_adapter(&dir(family, "tiny_lora")).unwrap();
        let v = json(dir(family, "tiny_lora").join("expected.json"));
        let (seqs, want_loss) = grad_case(&v);
        let (batch, g) = batch_of(&seqs);
        let want: Vec<f32> = v["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| floats(&s["logprobs"]))
            .collect();
        let (lp, cache) = m.forward_train(&batch, 1.0).unwrap();
        assert!(
            max_abs_diff(&lp.logprobs, &want) < 1e-4,
            "{family}: adapter log-probs"
        );
        let plain = m.without_adapter().logprobs(&batch, 1.0).unwrap().logprobs;
        assert!(
            max_abs_diff(&plain, &want) > 1e-2,
            "{family}: the adapter changes nothing"
        );
        let loss: f64 = lp
            .logprobs
            .iter()
            .zip(&g)
            .map(|(&l, &w)| l as f64 * w as f64)
            .sum();
        assert!((loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0));
        let mut grads = m.adapter().unwrap().zero_grads().unwrap();
        m.backward_adapter_into(&batch, cache, &g, &mut grads)
            .unwrap();
        let expected = gpg::candle_core::safetensors::load(
            dir(family, "tiny_lora").join("expected_grads.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mut checked = 0;
        grads.visit(|leaf, grad| {
            let Some(grad) = grad else { return };
            let module = leaf.strip_suffix(".weight").unwrap();
            for (which, got) in [("lora_A", &grad.a), ("lora_B", &grad.b)] {
                let want: Vec<f32> = expected[&peft_key(module, which)]
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let rel = rel_l2(got, &want);
                assert!(rel < 1e-3, "{family}: {module} {which} {rel:e}");
                checked += 1;
            }
        });
        assert_eq!(checked, expected.len());
        // The decoder's adapter path: greedy tokens of the adapter model equal the merged
        // model's, with the forward's log-probs.
        let tokenizer = Tokenizer::from_dir(&dir(family, "tiny")).unwrap();
        let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
        let params = SamplingParams {
            max_new_tokens: 8,
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        };
        let a = rollout::generate(&m, &tokenizer, &prompts, &params).unwrap();
        let merged = m.merged().unwrap();
        let b = rollout::generate(&merged, &tokenizer, &prompts, &params).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                x.token_ids, y.token_ids,
                "{family}: adapter decoder vs merged"
            );
            assert!(max_abs_diff(&x.logprobs, &y.logprobs) < 1e-4);
        }
    }
}

#[test]
fn chat_templates_render_as_transformers() {
    for (family, _) in FAMILIES {
        let tokenizer = Tokenizer::from_dir(&dir(family, "tiny")).unwrap();
        let cases = jsonl(dir(family, "tiny").join("chat_cases.jsonl"));
        assert!(cases.len() >= 3);
        for case in cases {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(case["messages"].clone()).unwrap();
            let kwargs = case["kwargs"].as_object().unwrap();
            let add_gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = tokenizer
                .apply_chat_template_with(&messages, add_gen, kwargs)
                .unwrap();
            assert_eq!(
                got,
                case["rendered"].as_str().unwrap(),
                "{family}: {kwargs:?}"
            );
            // Kwargs set on the tokenizer apply to every rendering (and to encode_prompt).
            let mut t = tokenizer.clone();
            t.set_chat_template_kwargs(kwargs.clone());
            assert_eq!(t.apply_chat_template(&messages, add_gen).unwrap(), got);
        }
    }
}

/// `--chat-template-kwargs` text: a JSON object parses to the variables the fixtures were
/// rendered with; anything else is refused saying what it was.
#[test]
fn chat_template_kwargs_parse_from_json_objects_only() {
    let tokenizer = Tokenizer::from_dir(&dir("qwen3", "tiny")).unwrap();
    for case in jsonl(dir("qwen3", "tiny").join("chat_cases.jsonl")) {
        let text = case["kwargs"].to_string();
        let kwargs = parse_chat_template_kwargs(&text).unwrap();
        assert_eq!(&kwargs, case["kwargs"].as_object().unwrap());
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add_gen = case["add_generation_prompt"].as_bool().unwrap();
        let t = tokenizer.clone().with_chat_template_kwargs(Some(kwargs));
        assert_eq!(
            t.apply_chat_template(&messages, add_gen).unwrap(),
            case["rendered"].as_str().unwrap(),
            "{text}"
        );
        // None keeps what was set.
        let kept = t.clone().with_chat_template_kwargs(None);
        assert_eq!(kept.chat_template_kwargs(), t.chat_template_kwargs());
    }
    let err = format!(
        "{:#}",
        parse_chat_template_kwargs("{enable_thinking: false}").unwrap_err()
    );
    assert!(err.contains("not valid JSON"), "{err}");
    for (text, kind) in [
        ("[1]", "an array"),
        ("\"x\"", "a string"),
        ("null", "null"),
        ("3", "a number"),
        ("true", "a boolean"),
    ] {
        let err = format!("{:#}", parse_chat_template_kwargs(text).unwrap_err());
        assert!(
            err.contains(&format!("not {kind}")) && err.contains("JSON object"),
            "{err}"
        );
    }
}

#[test]
fn saved_checkpoints_keep_their_family_and_values() {
    for (family, kind) in FAMILIES {
        let m = model(family);
        let tmp = tempfile::tempdir().unwrap();
        m.save_pretrained(tmp.path()).unwrap();
        let config = json(tmp.path().join("config.json"));
        assert_eq!(config["model_type"], kind.model_type());
        assert_eq!(config["architectures"][0], kind.architecture());
        let back = Qwen2::load(tmp.path(), &Device::Cpu, m.precision()).unwrap();
        assert_eq!(
            back.config.rope_inv_freq().unwrap(),
            m.config.rope_inv_freq().unwrap()
        );
        for (name, t) in m.parameters() {
            let a: Vec<f32> = t
                .flatten_all()
                .unwrap()
                .to_dtype(gpg::candle_core::DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = back
                .weights
                .get(&name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_dtype(gpg::candle_core::DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{family}: {name}");
        }
        // bf16 compute runs (weights rounded) and stays near the f32 model.
        let bf16 = Qwen2::load(&dir(family, "tiny"), &Device::Cpu, Precision::Bf16).unwrap();
        let (seqs, _) = grad_case(&json(dir(family, "tiny").join("grad_case.json")));
        let (batch, _) = batch_of(&seqs);
        let a = m.logprobs(&batch, 1.0).unwrap().logprobs;
        let b = bf16.logprobs(&batch, 1.0).unwrap().logprobs;
        assert!(
            max_abs_diff(&a, &b) < 0.5,
            "{family}: bf16 vs f32 {}",
            max_abs_diff(&a, &b)
        );
    }
}
