//! Engine invariants on tiny random models: every parameter gets a gradient, gradients match
//! finite differences of the loss L = Σ_t g_t·logp_t, packing does not change results, and the
//! sampler's KV-cache path agrees with the training forward.

use gpg::candle_core::{Device, Tensor};
use gpg::model::{Qwen2, Qwen2Config, TrainBatch};
use rand::{Rng, SeedableRng};

fn tiny_config(tied: bool) -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 50,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
    }))
    .unwrap()
}

/// A random model whose norms and biases are random too, so that their gradients are generic.
fn tiny_model(tied: bool, seed: u64) -> Qwen2 {
    let mut model = Qwen2::random(tiny_config(tied), 0.4, seed, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1);
    let names = model.parameter_names();
    for (name, p) in names.iter().zip(model.parameters_mut()) {
        if name.ends_with("norm.weight") || name.ends_with(".bias") {
            let n = p.elem_count();
            let base = if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            };
            let data: Vec<f32> = (0..n).map(|_| base + rng.gen_range(-0.3f32..0.3)).collect();
            *p = Tensor::from_vec(data, p.dims(), &Device::Cpu).unwrap();
        }
    }
    model
}

fn sequences(seed: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    [(3, 5), (1, 1), (6, 9), (2, 4)]
        .iter()
        .map(|&(p, c)| {
            let prompt = (0..p).map(|_| rng.gen_range(0..50)).collect();
            let completion = (0..c).map(|_| rng.gen_range(0..50)).collect();
            (prompt, completion)
        })
        .collect()
}

fn batch_of(seqs: &[(Vec<u32>, Vec<u32>)]) -> TrainBatch {
    let pairs: Vec<(&[u32], &[u32])> = seqs
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    TrainBatch::new(&pairs).unwrap()
}

fn loss(model: &Qwen2, batch: &TrainBatch, g: &[f32]) -> f64 {
    let lp = model.logprobs(batch, 1.0).unwrap();
    lp.logprobs
        .iter()
        .zip(g)
        .map(|(&l, &w)| l as f64 * w as f64)
        .sum()
}

#[test]
fn every_parameter_receives_a_gradient() {
    for tied in [true, false] {
        let model = tiny_model(tied, 1);
        let batch = batch_of(&sequences(2));
        let g: Vec<f32> = (0..batch.num_completion_tokens())
            .map(|i| if i % 2 == 0 { 0.3 } else { -0.2 })
            .collect();
        let (_, cache) = model.forward_train(&batch, 1.0).unwrap();
        let grads = model.backward(&batch, cache, &g).unwrap();
        assert_eq!(grads.names, model.parameter_names());
        for (name, (grad, (_, param))) in grads
            .names
            .iter()
            .zip(grads.tensors.iter().zip(model.parameters()))
        {
            assert_eq!(grad.dims(), param.dims(), "{name}");
            let norm: f32 = grad.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                norm > 1e-12 && norm.is_finite(),
                "{name} got no gradient (norm² {norm})"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for tied in [true, false] {
        let mut model = tiny_model(tied, 3);
        let batch = batch_of(&sequences(4));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let g: Vec<f32> = (0..batch.num_completion_tokens())
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let (_, cache) = model.forward_train(&batch, 1.0).unwrap();
        let grads = model.backward(&batch, cache, &g).unwrap();
        let names = model.parameter_names();
        for (pi, name) in names.iter().enumerate() {
            let analytic: Vec<f32> = grads.tensors[pi].flatten_all().unwrap().to_vec1().unwrap();
            let original: Vec<f32> = model.parameters()[pi]
                .1
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let dims = model.parameters()[pi].1.dims().to_vec();
            // Check the three largest-gradient entries and two random ones of each tensor.
            let mut idx: Vec<usize> = (0..analytic.len()).collect();
            idx.sort_by(|&a, &b| analytic[b].abs().total_cmp(&analytic[a].abs()));
            let mut picks: Vec<usize> = idx[..3.min(idx.len())].to_vec();
            picks.push(rng.gen_range(0..analytic.len()));
            picks.push(rng.gen_range(0..analytic.len()));
            for &i in &picks {
                let h = 1e-2f32;
                let mut eval = |delta: f32| {
                    let mut data = original.clone();
                    data[i] += delta;
                    *model.parameters_mut()[pi] =
                        Tensor::from_vec(data, dims.as_slice(), &Device::Cpu).unwrap();
                    loss(&model, &batch, &g)
                };
                let numeric = (eval(h) - eval(-h)) / (2.0 * h as f64);
                *model.parameters_mut()[pi] =
                    Tensor::from_vec(original.clone(), dims.as_slice(), &Device::Cpu).unwrap();
                let a = analytic[i] as f64;
                let tol = 2e-3 + 2e-2 * a.abs().max(numeric.abs());
                assert!(
                    (a - numeric).abs() <= tol,
                    "{name}[{i}] (tied={tied}): analytic {a:.6} vs finite difference {numeric:.6}"
                );
            }
        }
    }
}

#[test]
fn packing_does_not_change_logprobs() {
    let model = tiny_model(false, 7);
    let seqs = sequences(8);
    let packed = model.logprobs(&batch_of(&seqs), 1.0).unwrap();
    let mut alone = Vec::new();
    for s in &seqs {
        alone.extend(
            model
                .logprobs(&batch_of(std::slice::from_ref(s)), 1.0)
                .unwrap()
                .logprobs,
        );
    }
    for (a, b) in packed.logprobs.iter().zip(&alone) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let (train, _) = model.forward_train(&batch_of(&seqs), 1.0).unwrap();
    assert_eq!(train.logprobs, packed.logprobs);
    // Entropy is a proper entropy: 0 ≤ H ≤ ln V.
    assert!(train
        .entropy
        .iter()
        .all(|&h| h >= -1e-5 && h <= (50f32).ln() + 1e-4));
}
