//! LoRA adapters against PyTorch + PEFT reference outputs (tests/fixtures/lora, produced by
//! make_fixtures.py there): PEFT-made adapters (all seven projections, with and without
//! rsLoRA, and one with rank_pattern / alpha_pattern) load, give PEFT's completion log-probs
//! and PEFT's A/B gradients; merging and the decoder's adapter path agree with the forward.

use std::path::PathBuf;

use gpg::candle_core::{Device, Tensor};
use gpg::model::adapter_io::peft_key;
use gpg::model::lora::Adapter;
use gpg::model::{Qwen2, TrainBatch};
use gpg::rollout::{self, SamplingParams};
use gpg::tokenizer::Tokenizer;
use serde_json::Value;

mod fixture_json;
use fixture_json::{floats, ids};

const ADAPTERS: [&str; 3] = ["all7", "all7_rslora", "pattern"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn base() -> Qwen2 {
    Qwen2::from_dir(&root().join("qwen2/tied_f32"), &Device::Cpu).unwrap()
}

fn adapted(name: &str) -> Qwen2 {
    let mut model = base();
    model.load_adapter(&root().join("lora").join(name)).unwrap();
    model
}

/// (prompt ids, completion ids, weights w_t, expected log-probs) of one sequence.
type Sequence = (Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>);

struct Case {
    seqs: Vec<Sequence>,
    loss: f64,
}

fn case(name: &str) -> Case {
    let path = root().join("lora").join(name).join("expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Case {
        seqs: v["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    ids(&s["prompt_ids"]),
                    ids(&s["completion_ids"]),
                    floats(&s["weights"]),
                    floats(&s["logprobs"]),
                )
            })
            .collect(),
        loss: v["loss"].as_f64().unwrap(),
    }
}

fn batch(c: &Case) -> TrainBatch {
    let pairs: Vec<(&[u32], &[u32])> = c
        .seqs
        .iter()
        .map(|(p, q, _, _)| (p.as_slice(), q.as_slice()))
        .collect();
    TrainBatch::new(&pairs).unwrap()
}

#[test]
fn peft_adapters_give_peft_logprobs_within_1e_4() {
    for name in ADAPTERS {
        let model = adapted(name);
        let c = case(name);
        let got = model.logprobs(&batch(&c), 1.0).unwrap().logprobs;
        let want: Vec<f32> = c.seqs.iter().flat_map(|s| s.3.clone()).collect();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{name}: worst |Δ logp| = {worst}");
        // The adapter really changes the model (B ≠ 0 in the fixture).
        let plain = base().logprobs(&batch(&c), 1.0).unwrap().logprobs;
        let moved = plain
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 1e-2, "{name}: the adapter barely changes log-probs");
    }
}

#[test]
fn adapter_gradients_match_peft_within_1e_3_relative() {
    for name in ADAPTERS {
        let model = adapted(name);
        let c = case(name);
        let batch = batch(&c);
        let g: Vec<f32> = c.seqs.iter().flat_map(|s| s.2.clone()).collect();
        let (lp, cache) = model.forward_train(&batch, 1.0).unwrap();
        let loss: f64 = lp
            .logprobs
            .iter()
            .zip(&g)
            .map(|(&l, &w)| l as f64 * w as f64)
            .sum();
        assert!(
            (loss - c.loss).abs() <= 1e-4 * c.loss.abs().max(1.0),
            "{name}: loss {loss} vs {}",
            c.loss
        );
        let adapter = model.adapter().unwrap();
        let mut grads = adapter.zero_grads().unwrap();
        model
            .backward_adapter_into(&batch, cache, &g, &mut grads)
            .unwrap();
        let expected = gpg::candle_core::safetensors::load(
            root()
                .join("lora")
                .join(name)
                .join("expected_grads.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let mut checked = 0;
        grads.visit(|leaf, grad| {
            let Some(grad) = grad else { return };
            let module = leaf.strip_suffix(".weight").unwrap();
            for (which, got) in [("lora_A", &grad.a), ("lora_B", &grad.b)] {
                let key = peft_key(module, which);
                let want: Vec<f32> = expected[&key].flatten_all().unwrap().to_vec1().unwrap();
                let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                assert!(norm > 0.0, "{name}: {key} has a zero reference gradient");
                assert!(
                    diff <= 1e-3 * norm,
                    "{name}: {key}: |Δ| / |g| = {}",
                    diff / norm
                );
                checked += 1;
            }
        });
        assert_eq!(checked, expected.len(), "{name}: gradient tensors checked");
    }
}

#[test]
fn rank_and_alpha_patterns_set_per_module_ranks_and_scales() {
    let model = adapted("pattern");
    let modules = model.adapter().unwrap().modules();
    let find = |m: &str| {
        let (_, p) = modules.iter().find(|(n, _)| n == m).unwrap();
        (p.a.dims()[0], p.scale)
    };
    assert_eq!(modules.len(), 6);
    assert_eq!(find("model.layers.0.self_attn.q_proj"), (2, 4.0));
    assert_eq!(find("model.layers.0.self_attn.v_proj"), (4, 0.75));
    assert_eq!(find("model.layers.0.mlp.down_proj"), (4, 2.0));
    assert_eq!(find("model.layers.1.mlp.down_proj"), (6, 8.0 / 6.0));
    let rs = adapted("all7_rslora");
    assert_eq!(rs.adapter().unwrap().modules()[0].1.scale, 4.0); // 8 / √4
}

#[test]
fn merged_model_and_decoder_adapter_path_agree_with_the_adapter_forward() {
    let tokenizer = Tokenizer::from_dir(&root().join("qwen2/tied_f32")).unwrap();
    for name in ADAPTERS {
        let model = adapted(name);
        let merged = model.merged().unwrap();
        assert!(merged.adapter().is_none());
        let c = case(name);
        let a = model.logprobs(&batch(&c), 1.0).unwrap().logprobs;
        let b = merged.logprobs(&batch(&c), 1.0).unwrap().logprobs;
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{name}: merged vs adapter: {worst}");
        // Sampling runs the adapter path in the decoder: greedy tokens and their log-probs
        // equal the merged model's.
        let prompts: Vec<Vec<u32>> = c.seqs.iter().map(|s| s.0.clone()).collect();
        let params = SamplingParams {
            n: 1,
            max_new_tokens: 12,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 1,
            stop_token_ids: vec![],
            stop_strings: vec![],
            ignore_eos: true,
        };
        let x = rollout::generate(&model, &tokenizer, &prompts, &params).unwrap();
        let y = rollout::generate(&merged, &tokenizer, &prompts, &params).unwrap();
        let z = rollout::generate(&base(), &tokenizer, &prompts, &params).unwrap();
        let mut differs_from_base = false;
        for ((x, y), z) in x.iter().zip(&y).zip(&z) {
            assert_eq!(x.token_ids, y.token_ids, "{name}: greedy tokens");
            differs_from_base |= x.token_ids != z.token_ids;
            for (a, b) in x.logprobs.iter().zip(&y.logprobs) {
                assert!((a - b).abs() < 1e-4, "{name}: sampled log-probs");
            }
        }
        assert!(
            differs_from_base,
            "{name}: the adapter does not change sampling"
        );
    }
}

#[test]
fn saved_adapters_round_trip_in_peft_format() {
    let model = adapted("pattern");
    let tmp = tempfile::tempdir().unwrap();
    model.adapter().unwrap().save_peft(tmp.path()).unwrap();
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (k, v) in [
        ("peft_type", "LORA"),
        ("task_type", "CAUSAL_LM"),
        ("bias", "none"),
    ] {
        assert_eq!(config[k], v, "{k}");
    }
    assert_eq!(config["r"], 4);
    assert_eq!(config["rank_pattern"]["q_proj"], 2);
    let tensors = gpg::candle_core::safetensors::load(
        tmp.path().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(tensors.len(), 12);
    let a: &Tensor = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    assert_eq!(a.dims(), &[6, 128]);
    let back = Adapter::load_peft(tmp.path(), &base()).unwrap();
    for ((n1, p1), (n2, p2)) in back
        .modules()
        .iter()
        .zip(model.adapter().unwrap().modules())
    {
        assert_eq!(n1, &n2);
        assert_eq!(p1.scale, p2.scale);
        let d = (&p1.a - &p2.a).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}

#[test]
fn unsupported_peft_options_are_refused_naming_the_field() {
    let src = root().join("lora/all7");
    for (field, value, needle) in [
        ("use_dora", "true", "use_dora"),
        ("bias", "\"all\"", "bias"),
        ("modules_to_save", "[\"lm_head\"]", "modules_to_save"),
        ("layers_to_transform", "[0]", "layers_to_transform"),
        ("peft_type", "\"IA3\"", "peft_type"),
        ("init_lora_weights", "\"pissa\"", "init_lora_weights"),
        ("target_modules", "[\"lm_head\"]", "lm_head"),
        ("r", "8", "shape"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            tmp.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config: serde_json::Map<String, Value> = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        config.insert(field.into(), serde_json::from_str(value).unwrap());
        std::fs::write(
            tmp.path().join("adapter_config.json"),
            serde_json::to_string(&config).unwrap(),
        )
        .unwrap();
        let err = format!("{:#}", Adapter::load_peft(tmp.path(), &base()).unwrap_err());
        assert!(err.contains(needle), "{field}: {err}");
        assert!(
            err.contains("adapter_"),
            "{field}: the error names no file: {err}"
        );
    }
}
