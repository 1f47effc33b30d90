//! The RL training step of a vision-language policy (train::policy + train::engine) on the
//! tiny Qwen2-VL fixture (tests/fixtures/qwen2_vl, made by make_model_fixtures.py):
//!
//! * through the policy seam (image processing from paths, packing, forward, backward into
//!   the engine's buffers) the gradients of L = Σ g_t·log p_t equal PyTorch's for every
//!   parameter, the vision tower's included;
//! * the GPG objective's gradient (g_t from the loss) equals central finite differences of the
//!   objective along the gradient of the tower's and the decoder's tensors;
//! * one AdamW step moves the tower unless `freeze_vision`, which leaves it bit-identical and
//!   gives it no optimiser state.

use std::path::PathBuf;

use gpg::algo::{GpgLoss, Normaliser, PolicyLoss, PolicyTokens, TokenLayout};
use gpg::candle_core::{safetensors, Device, Tensor};
use gpg::data::PreparedPrompt;
use gpg::data::{Location, Prompt, PromptRecord};
use gpg::model::ops::{update_in_place, WeightSliceMut};
use gpg::model::{Activations, Precision};
use gpg::optim::{AdamW, AdamWConfig};
use gpg::train::engine::{CpuEngine, TrainEngine};
use gpg::train::policy::{Policy, PolicyBatch};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_vl")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The fixture's three cases (one image, two images, none) as prepared prompts with their
/// completions and the fixture's g_t.
fn cases() -> Vec<(PreparedPrompt, Vec<u32>, Vec<f32>)> {
    let dir = fixtures().join("tiny_qwen2_vl");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let images = c["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| fixtures().join("images").join(f.as_str().unwrap()))
                .collect();
            let g = c["g"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let prompt = PreparedPrompt {
                record: PromptRecord {
                    id: i.to_string(),
                    prompt: Prompt::Chat(Vec::new()),
                    answer: None,
                    location: Location::new("cases.json", "case", i + 1),
                    columns: Default::default(),
                },
                ids: ids(&c["prompt_ids"]),
                images,
            };
            (prompt, ids(&c["completion_ids"]), g)
        })
        .collect()
}

fn load(train_vision: bool) -> Policy {
    Policy::load(
        &fixtures().join("tiny_qwen2_vl"),
        gpg::model::ModelKind::VisionLanguage,
        &Device::Cpu,
        Precision::F32,
        train_vision,
    )
    .unwrap()
}

fn packed(policy: &Policy, cases: &[(PreparedPrompt, Vec<u32>, Vec<f32>)]) -> PolicyBatch {
    let seqs: Vec<(&PreparedPrompt, &[u32])> =
        cases.iter().map(|(p, c, _)| (p, c.as_slice())).collect();
    policy.batch(&seqs).unwrap()
}

/// (checkpoint name, gradient) of every parameter the engine trains.
fn named_grads(policy: &Policy, engine: &mut CpuEngine) -> Vec<(String, Vec<f32>)> {
    assert!(policy.vision().is_some(), "not a vision-language policy");
    engine.named_gradients(policy).unwrap()
}

fn engine(policy: &Policy) -> CpuEngine {
    CpuEngine::new(policy, AdamW::new(AdamWConfig::default()).unwrap()).unwrap()
}

#[test]
fn the_policy_step_gives_pytorchs_gradients_including_the_vision_tower() {
    let policy = load(true);
    let cases = cases();
    let batch = packed(&policy, &cases);
    let g: Vec<f32> = cases.iter().flat_map(|c| c.2.clone()).collect();
    let mut updater = engine(&policy);
    let (_, cache) = updater
        .forward(&policy, &batch, 1.0, Activations::All)
        .unwrap();
    updater.backward_into(&policy, &batch, cache, &g).unwrap();
    let expected = safetensors::load(
        fixtures().join("tiny_qwen2_vl/expected_grads.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let named = named_grads(&policy, &mut updater);
    assert_eq!(named.len(), expected.len());
    let mut vision = 0;
    for (name, got) in &named {
        let want = expected[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diff: f64 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = (diff / norm.max(1e-30)).sqrt();
        assert!(rel < 1e-3, "{name}: relative error {rel:e}");
        vision += name.starts_with("visual.") as usize;
    }
    assert!(vision > 10, "{vision} tower gradients checked");
}

/// Adds `scale · dir` to `tensor` in place.
fn nudge(tensor: &Tensor, dir: &[f32], scale: f32) {
    update_in_place(tensor, |slot| {
        let WeightSliceMut::F32(w) = slot else {
            panic!("f32 model")
        };
        w.iter_mut().zip(dir).for_each(|(w, d)| *w += scale * d);
        Ok(())
    })
    .unwrap();
}

#[test]
fn the_gpg_objectives_gradient_matches_finite_differences_through_the_tower() {
    let policy = load(true);
    let cases = cases();
    let batch = packed(&policy, &cases);
    let lengths: Vec<usize> = cases.iter().map(|c| c.1.len()).collect();
    let layout = TokenLayout::from_lengths(&lengths);
    let n: usize = lengths.iter().sum();
    let advantages = [1.0f32, -0.5, 0.25];
    let loss_fn = PolicyLoss::Gpg(GpgLoss::default());
    let normaliser = Normaliser::new(cases.len(), n);
    let objective = |logp: &[f32]| {
        loss_fn
            .compute(
                &PolicyTokens {
                    layout: &layout,
                    logp,
                    old_logp: None,
                    ref_logp: None,
                    advantages: &advantages,
                },
                1.0,
                normaliser,
            )
            .unwrap()
    };
    let mut updater = engine(&policy);
    let (lp, cache) = updater
        .forward(&policy, &batch, 1.0, Activations::All)
        .unwrap();
    let out = objective(&lp.logprobs);
    updater
        .backward_into(&policy, &batch, cache, &out.token_weights)
        .unwrap();
    let grads = named_grads(&policy, &mut updater);
    let v = policy.vl().unwrap();
    let params: std::collections::HashMap<String, Tensor> =
        v.parameters().unwrap().into_iter().collect();
    for name in [
        "visual.patch_embed.proj.weight",
        "visual.blocks.0.attn.qkv.weight",
        "visual.blocks.1.mlp.fc1.weight",
        "visual.merger.mlp.2.weight",
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ] {
        let grad = &grads.iter().find(|(n, _)| n == name).unwrap().1;
        let norm = grad.iter().map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        let dir: Vec<f32> = grad.iter().map(|g| (*g as f64 / norm) as f32).collect();
        let eps = 1e-3f32;
        let t = &params[name];
        nudge(t, &dir, eps);
        let up = objective(&policy.logprobs_on_host(&batch, 1.0).unwrap().logprobs).loss;
        nudge(t, &dir, -2.0 * eps);
        let down = objective(&policy.logprobs_on_host(&batch, 1.0).unwrap().logprobs).loss;
        nudge(t, &dir, eps);
        let fd = (up - down) / (2.0 * eps as f64);
        let rel = (fd - norm).abs() / norm;
        assert!(
            rel < 1e-2,
            "{name}: finite difference {fd:e}, backward {norm:e} (relative gap {rel:e})"
        );
    }
}

/// Every parameter's values by checkpoint name.
fn values(policy: &Policy) -> Vec<(String, Vec<f32>)> {
    let v = policy.vl().unwrap();
    v.parameters()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn freeze_vision_keeps_the_tower_fixed_and_out_of_the_optimiser() {
    for train_vision in [true, false] {
        let policy = load(train_vision);
        let cases = cases();
        let batch = packed(&policy, &cases);
        let g: Vec<f32> = cases.iter().flat_map(|c| c.2.clone()).collect();
        let before = values(&policy);
        let mut updater = engine(&policy);
        let (_, cache) = updater
            .forward(&policy, &batch, 1.0, Activations::All)
            .unwrap();
        updater.backward_into(&policy, &batch, cache, &g).unwrap();
        updater.step(&policy, 1e-3, 1.0).unwrap();
        let after = values(&policy);
        for ((name, a), (_, b)) in before.iter().zip(&after) {
            let moved = a != b;
            if name.starts_with("visual.") {
                assert_eq!(moved, train_vision, "{name} (train_vision {train_vision})");
            } else {
                assert!(moved, "{name} did not move");
            }
        }
        let steps = updater.optimizer_steps();
        let tower_state = steps.keys().filter(|k| k.starts_with("visual.")).count();
        assert_eq!(tower_state > 0, train_vision, "AdamW state of the tower");
        assert!(steps.keys().any(|k| k.starts_with("model.")));
    }
}
