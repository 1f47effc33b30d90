//! One GPG update moves the policy the right way: completions with positive advantage become
//! more likely, those with negative advantage less likely, and the objective decreases.

use gpg::algo::{GpgLoss, Normaliser, PolicyLoss, PolicyTokens, TokenLayout};
use gpg::candle_core::Device;
use gpg::model::{Qwen2, Qwen2Config, TrainBatch};
use gpg::optim::{AdamW, AdamWConfig};
use gpg::train::engine::{CpuEngine, TrainEngine};
use gpg::train::policy::Policy;

#[test]
fn a_gpg_step_raises_good_and_lowers_bad_completions() {
    let config: Qwen2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": true
    }))
    .unwrap();
    let model = Qwen2::random(config, 0.2, 9, &Device::Cpu).unwrap();
    let prompt = [1u32, 2, 3];
    let good = [5u32, 6, 7, 8];
    let bad = [9u32, 10, 11, 12];
    let batch = TrainBatch::new(&[(&prompt, &good), (&prompt, &bad)]).unwrap();
    let layout = TokenLayout::from_lengths(&[4, 4]);
    let advantages = [0.5f32, -0.5];
    let loss_fn = PolicyLoss::Gpg(GpgLoss::default());
    let seq_logp = |lp: &[f32]| (lp[..4].iter().sum::<f32>(), lp[4..].iter().sum::<f32>());

    let (lp, cache) = model.forward_train(&batch, 1.0).unwrap();
    let before = seq_logp(&lp.logprobs);
    let out = loss_fn
        .compute(
            &PolicyTokens {
                layout: &layout,
                logp: &lp.logprobs,
                old_logp: None,
                ref_logp: None,
                advantages: &advantages,
            },
            1.0,
            Normaliser::micro_batch(&layout),
        )
        .unwrap();
    let grads = model.backward(&batch, cache, &out.token_weights).unwrap();
    let adamw = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let policy = Policy::from_text(model.clone());
    let mut engine = CpuEngine::new(&policy, AdamW::new(adamw).unwrap()).unwrap();
    let acc = engine.gradients_mut().decoder.as_mut().unwrap();
    acc.zip_mut(&grads, |_, a, g| {
        a.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        Ok(())
    })
    .unwrap();
    engine.step(&policy, 1e-3, 0.0).unwrap();

    let after_lp = model.logprobs(&batch, 1.0).unwrap().logprobs;
    let after = seq_logp(&after_lp);
    assert!(
        after.0 > before.0,
        "good completion: {} -> {}",
        before.0,
        after.0
    );
    assert!(
        after.1 < before.1,
        "bad completion: {} -> {}",
        before.1,
        after.1
    );
    let after_loss = loss_fn
        .compute(
            &PolicyTokens {
                layout: &layout,
                logp: &after_lp,
                old_logp: None,
                ref_logp: None,
                advantages: &advantages,
            },
            1.0,
            Normaliser::micro_batch(&layout),
        )
        .unwrap()
        .loss;
    assert!(after_loss < out.loss, "loss {} -> {after_loss}", out.loss);
}
