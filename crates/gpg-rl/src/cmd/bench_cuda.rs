//! `bench engine --device cuda`: the train step (forward + backward + AdamW) on the GPU with
//! `gpg::model::cuda_train::CudaTrainStep`, its time, MFU and device memory.
//!
//! MFU counts the model FLOPs of one step: 6·P_body·T for the layers' products (P_body the
//! parameters outside the embedding and head, T the batch's tokens), 6·V·H·N for the head (only
//! the N scored rows go through it) and 6·L·nh·hd·Σ len² for causal attention (fwd 2·len²·hd
//! per head, the backward twice that), against 790 TFLOP/s (the H200's measured dense bf16
//! rate, KINDS.md).

use anyhow::Result;
use gpg::model::{DeviceName, Qwen2, TrainBatch};

/// The measured dense bf16 rate of the H200 (TFLOP/s) MFU is reported against.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub const PEAK_TFLOPS: f64 = 790.0;

/// Model FLOPs of one training step on `batch` (see the module docs).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn step_flops(model: &Qwen2, batch: &TrainBatch) -> f64 {
    let c = &model.config;
    let (v, h) = (c.vocab_size as f64, c.hidden_size as f64);
    let embed_and_head = if c.tie_word_embeddings {
        v * h
    } else {
        2.0 * v * h
    };
    let body = model.parameter_count() as f64 - embed_and_head;
    let t = batch.tokens.len() as f64;
    let n = batch.targets.len() as f64;
    let sq: f64 = (0..batch.seqs.n_seqs())
        .map(|s| (batch.seqs.len_of(s) as f64).powi(2))
        .sum();
    let attn =
        6.0 * c.num_hidden_layers as f64 * (c.num_attention_heads * c.head_dim()) as f64 * sq;
    6.0 * body * t + 6.0 * v * h * n + attn
}

/// Bytes of activations the GPU train step keeps for the backward when it keeps every layer's
/// (`Activations::All`), estimated from `LayerCache`: per token and layer, in f32, the layer
/// input, q, attention output and post-attention residual (4·H), k and v (2·kv_dim), gate and
/// up (2·I), plus a third for the bf16 roundings of the products' operands and the per-row
/// statistics. 1.5B shape at 16 × 1024 tokens: ≈ 4·1536 + 512 + 17,920 = 24.6 k floats ·
/// 4 B · 4/3 ≈ 131 KB per token-layer, · 28 layers · 16,384 tokens ≈ 60 GB (the issue's
/// ≈ 80 GB with the head's chunk and the allocator's slack); 0.5B: ≈ 75 KB · 24 · 16,384 ≈
/// 29 GB.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn kept_activation_bytes(c: &gpg::model::Qwen2Config, tokens: usize) -> f64 {
    let kv = (c.num_kv_heads() * c.head_dim()) as f64;
    let per = 4.0 * c.hidden_size as f64 + 2.0 * kv + 2.0 * c.intermediate_size as f64;
    per * 4.0 * 4.0 / 3.0 * c.num_hidden_layers as f64 * tokens as f64
}

/// Median seconds of `steps` timed GPU train steps (after one warm-up), printing MFU and the
/// device memory in use.
#[cfg(feature = "cuda")]
pub fn train_step_seconds(
    device: &DeviceName,
    model: &Qwen2,
    batch: &TrainBatch,
    g: &[f32],
    steps: usize,
) -> Result<f64> {
    use gpg::optim::AdamW;
    use gpg::train::engine::{CudaEngine, TrainEngine};
    use gpg::train::policy::{Policy, PolicyBatch};
    use std::time::Instant;
    let gpu = device.open_gpu()?;
    let (free0, total) = gpu
        .ctx
        .mem_get_info()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let host = Policy::from_text(model.clone());
    let mut engine = CudaEngine::new(gpu.clone(), &host, AdamW::new(Default::default())?)?;
    let train_batch = PolicyBatch::text_only(batch.clone());
    // Keep every activation when they fit in 60% of the memory left after the weights, the
    // gradients and AdamW's state (18 B per parameter: f32 master, gradient, m, v and the bf16
    // copy); else gradient checkpointing (each layer's input only, the layer recomputed in the
    // backward: the same gradients bit for bit). 1.5B at 16 × 1024 tokens on an H100 (80 GB):
    // 28 GB of state, ≈ 60 GB of activations → checkpointing, peak ≈ 28 GB + 28 layers'
    // inputs (2.8 GB) + one layer's activations (2.1 GB) + the head's chunk ≈ 34 GB.
    let (free_now, _) = gpu
        .ctx
        .mem_get_info()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let kept = kept_activation_bytes(&model.config, batch.tokens.len());
    let activations = if kept < 0.6 * free_now as f64 {
        gpg::model::Activations::All
    } else {
        gpg::model::Activations::LayerInputs
    };
    println!(
        "GPU train step: activations kept {:.1} GB (estimated) vs {:.1} GB free: {}",
        kept / 1e9,
        free_now as f64 / 1e9,
        if matches!(activations, gpg::model::Activations::All) {
            "keeping every layer's"
        } else {
            "gradient checkpointing (each layer's input)"
        }
    );
    let mut times = Vec::new();
    for i in 0..=steps {
        let t0 = Instant::now();
        let (_, cache) = engine.forward(&host, &train_batch, 1.0, activations)?;
        engine.backward_into(&host, &train_batch, cache, g)?;
        engine.step(&host, 1e-5, 1.0)?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let (free1, _) = gpu
        .ctx
        .mem_get_info()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let tflops = step_flops(model, batch) / secs / 1e12;
    println!(
        "GPU train step on {}: {secs:.4} s, {tflops:.1} TFLOP/s model FLOPs = {:.1}% MFU of \
         {PEAK_TFLOPS} TFLOP/s; device memory in use after the steps {:.0} MiB (of {:.0}; {:.0} \
         before loading)",
        gpu.description(),
        100.0 * tflops / PEAK_TFLOPS,
        (total - free1) as f64 / 1048576.0,
        total as f64 / 1048576.0,
        (total - free0) as f64 / 1048576.0,
    );
    Ok(secs)
}

#[cfg(not(feature = "cuda"))]
pub fn train_step_seconds(
    device: &DeviceName,
    _model: &Qwen2,
    _batch: &TrainBatch,
    _g: &[f32],
    _steps: usize,
) -> Result<f64> {
    anyhow::bail!("{}", device.no_cuda_build())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FLOPs of a tiny model by hand: body 6·P·T, head 6·V·H·N, attention 6·L·q_dim·Σlen².
    #[test]
    fn step_flops_by_hand() {
        let config: gpg::model::Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true
        }))
        .unwrap();
        let model = Qwen2::random(config, 0.1, 1, &gpg::candle_core::Device::Cpu).unwrap();
        let batch = TrainBatch::new(&[
            (&[1u32, 2][..], &[3u32, 4, 5][..]),
            (&[6u32][..], &[7u32][..]),
        ])
        .unwrap();
        let p_body = model.parameter_count() as f64 - 50.0 * 16.0;
        let want = 6.0 * p_body * 7.0 + 6.0 * 50.0 * 16.0 * 4.0 + 6.0 * 2.0 * 16.0 * (25.0 + 4.0);
        assert!((step_flops(&model, &batch) - want).abs() < 1e-6 * want);
    }

    /// The activation estimate at the 1.5B shape and 16 × 1024 tokens is tens of GB (so the
    /// GPU bench checkpoints there), at the 0.5B shape under 40 GB.
    #[test]
    fn kept_activations_at_the_bench_shapes() {
        let shape = |h: usize, i: usize, l: usize, nh: usize| {
            serde_json::from_value::<gpg::model::Qwen2Config>(serde_json::json!({
                "vocab_size": 151936, "hidden_size": h, "intermediate_size": i,
                "num_hidden_layers": l, "num_attention_heads": nh, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": true
            }))
            .unwrap()
        };
        let big = kept_activation_bytes(&shape(1536, 8960, 28, 12), 16 * 1024);
        assert!(big > 50e9 && big < 70e9, "{big}");
        let small = kept_activation_bytes(&shape(896, 4864, 24, 14), 16 * 1024);
        assert!(small > 20e9 && small < 40e9, "{small}");
    }
}
