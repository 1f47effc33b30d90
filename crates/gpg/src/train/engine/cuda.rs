//! The training engine on a GPU (feature `cuda`): the passes of
//! `model::cuda_train::CudaTrainStep` (f32 masters, bf16 compute copies, gradients and AdamW
//! moments on the device, the one layer definition over `CudaLayerOps`) and the AdamW walk of
//! the CPU engine: the same per-parameter step counts (kept here, on the host), the same
//! scalars (`optim::StepScalars`, handed to the device's AdamW kernel with the clipping
//! factor of `optim::clip_scale`), the same checkpoint layout (`optimizer_checkpoint` over
//! [`state_from_moments`], `master_buffers`). So a checkpoint written on the GPU resumes
//! exactly on the GPU (masters and moments go back up unchanged) and on the CPU too.
//!
//! One weight store: the trained weights live on the GPU only. The host model's tensors are
//! brought up to date from the device ([`TrainEngine::sync_host`]) before a checkpoint or the
//! final model is written; rollouts and evaluations sample with the CUDA decoder reading the
//! device parameters in place ([`CudaEngine::decoder`]), so nothing is uploaded per
//! `generate` call. Trains every parameter of a text model (LoRA and vision-language models
//! are refused earlier, by `TrainDevice::open_for`, and again here).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

use crate::checkpoint::Buffers;
use crate::model::cuda_decode::CudaDecoder;
use crate::model::cuda_train::{CudaForwardCache, CudaTrainStep};
use crate::model::decoding::DecodeEngine;
use crate::model::ops::cuda::ops::AdamWScalars;
use crate::model::ops::cuda::Gpu;
use crate::model::{Activations, Qwen2, TokenLogprobs};
use crate::optim::{clip_scale, AdamW, AdamWConfig, GradClip, StepScalars};

use super::super::collective::nccl::DeviceGradReduce;
use super::super::collective::{Collective, GradReduce};
use super::super::policy::{Policy, PolicyBatch};
use super::{
    master_buffers, optimizer_checkpoint, state_from_moments, OptimizerMeta, StepCache,
    StepOutcome, TrainEngine, MASTER,
};

/// Gradients, master weights and AdamW of one text model, on a GPU.
pub struct CudaEngine {
    step: CudaTrainStep,
    config: AdamWConfig,
    /// Per-parameter AdamW step counts (the moments are on the device).
    steps: BTreeMap<String, u64>,
    /// The gradient sum of a data-parallel run (None: one rank).
    reduce: Option<DeviceGradReduce>,
}

impl CudaEngine {
    /// Uploads `model`'s parameters and `optimizer`'s moments (when resuming).
    pub fn new(gpu: Arc<Gpu>, model: &Policy, optimizer: AdamW) -> Result<Self> {
        ensure!(
            model.vision().is_none(),
            "vision-language models do not train on {} yet (no CUDA kernels for the tower)",
            gpu.description()
        );
        let m = model.text();
        ensure!(
            m.adapter().is_none(),
            "LoRA adapters do not train on {} yet",
            gpu.description()
        );
        let state = optimizer.state();
        let mut step = CudaTrainStep::new(gpu, m)?;
        let moments: BTreeMap<String, (&[f32], &[f32])> = state
            .params
            .iter()
            .map(|(n, p)| (n.clone(), (p.exp_avg.as_slice(), p.exp_avg_sq.as_slice())))
            .collect();
        step.restore_moments(&moments)?;
        Ok(CudaEngine {
            step,
            config: state.config,
            steps: state
                .params
                .iter()
                .map(|(n, p)| (n.clone(), p.step))
                .collect(),
            reduce: None,
        })
    }

    pub fn train_step(&self) -> &CudaTrainStep {
        &self.step
    }

    /// A CUDA decoder over the device parameters (borrowed, nothing uploaded).
    pub fn decoder<'a>(&'a self, model: &Qwen2) -> Result<CudaDecoder<'a>> {
        CudaDecoder::from_train_step(&self.step, model)
    }
}

fn text<'a, 'b>(
    model: &'a Policy,
    batch: &'b PolicyBatch,
) -> Result<(&'a Qwen2, &'b crate::model::TrainBatch)> {
    ensure!(
        model.vision().is_none() && batch.images.is_none(),
        "internal: the GPU engine trains text models only"
    );
    Ok((model.text(), &batch.text))
}

impl TrainEngine for CudaEngine {
    fn forward(
        &self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
        keep: Activations,
    ) -> Result<(TokenLogprobs, StepCache)> {
        let (_, b) = text(model, batch)?;
        let (lp, cache) = self.step.forward_with(b, inv_temperature, keep)?;
        Ok((lp, StepCache::new(cache)))
    }

    fn fuses_forward_backward(&self, _model: &Policy) -> bool {
        false
    }

    fn forward_backward_into(
        &mut self,
        _model: &Policy,
        _batch: &PolicyBatch,
        _inv_temperature: f32,
        _keep: Activations,
        _g: &[f32],
    ) -> Result<TokenLogprobs> {
        bail!("internal: the GPU engine takes the forward and the backward separately")
    }

    fn backward_into(
        &mut self,
        model: &Policy,
        batch: &PolicyBatch,
        cache: StepCache,
        g: &[f32],
    ) -> Result<()> {
        let (_, b) = text(model, batch)?;
        self.step.backward(b, cache.take::<CudaForwardCache>()?, g)
    }

    fn logprobs(
        &self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
    ) -> Result<TokenLogprobs> {
        let (_, b) = text(model, batch)?;
        Ok(self.step.forward(b, inv_temperature)?.0)
    }

    fn decode_engine<'a>(&'a self, model: &'a Qwen2) -> Result<Box<dyn DecodeEngine + 'a>> {
        Ok(Box::new(self.decoder(model)?))
    }

    fn sync_host(&self, model: &mut Policy) -> Result<()> {
        self.step
            .write_back(model.text_mut())
            .context("bringing the host model up to date from the GPU")
    }

    fn gradient_buffers_mut(&mut self) -> Vec<&mut [f32]> {
        Vec::new()
    }

    fn prepare_all_reduce(
        &mut self,
        reduce: GradReduce,
        collective: &Arc<dyn Collective>,
    ) -> Result<String> {
        let (r, what) = DeviceGradReduce::new(reduce, collective, &mut self.step)?;
        self.reduce = r;
        Ok(what)
    }

    fn all_reduce_gradients(&mut self, collective: &dyn Collective) -> Result<()> {
        match &self.reduce {
            Some(r) => r.all_reduce(&mut self.step, collective),
            None => {
                bail!("internal: a data-parallel GPU run without its gradient all-reduce set up")
            }
        }
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.step.zero_grad()
    }

    fn step(&mut self, _model: &Policy, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        let norm = self.step.grad_norm()?;
        if !norm.is_finite() {
            self.step.zero_grad()?;
            return Ok(StepOutcome::Skipped(GradClip {
                norm,
                scale: 1.0,
                finite: false,
            }));
        }
        let scale = clip_scale(norm, max_norm);
        let (config, steps) = (self.config, &mut self.steps);
        self.step.adamw(|name| {
            let t = steps.entry(name.to_string()).or_insert(0);
            *t += 1;
            let s = StepScalars::new(&config, lr as f64, *t, true)
                .with_context(|| format!("AdamW step {t} of {name}"))?;
            Ok(AdamWScalars {
                grad_scale: scale,
                decay: s.decay,
                one_minus_beta1: s.one_minus_beta1,
                beta2: s.beta2,
                one_minus_beta2: s.one_minus_beta2,
                step_size: s.step_size,
                bias_correction2_sqrt: s.bias_correction2_sqrt,
                eps: s.eps,
            })
        })?;
        self.step.zero_grad()?;
        Ok(StepOutcome::Applied(GradClip {
            norm,
            scale,
            finite: true,
        }))
    }

    fn checkpoint_state(&self, _model: &Policy) -> Result<(OptimizerMeta, Buffers)> {
        let state = state_from_moments(self.config, &self.steps, self.step.moments()?);
        let (meta, mut buffers) = optimizer_checkpoint(&state);
        if self.step.is_bf16() {
            buffers.extend(master_buffers(self.step.masters()?));
        }
        Ok((meta, buffers))
    }

    fn restore_master(
        &mut self,
        model: &mut Policy,
        buffers: &mut HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        let prefix = format!("{MASTER}.");
        let names: Vec<String> = buffers
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let mut masters: HashMap<String, Vec<f32>> = names
            .into_iter()
            .filter_map(|k| {
                let v = buffers.remove(&k)?;
                Some((k[prefix.len()..].to_string(), v))
            })
            .collect();
        self.step.restore_masters(&mut masters)?;
        if let Some(unknown) = masters.keys().next() {
            bail!("checkpoint buffer {MASTER}.{unknown}: the model has no such parameter");
        }
        self.sync_host(model)
    }
}

/// On a GPU only (`bench/gpu/check-a.sh` runs them with GPG_RL_REQUIRE_GPU=1; elsewhere they
/// skip, saying why): the engine's checkpoint state resumes exactly on the GPU and within
/// tolerance on the CPU; the decoder over the train step's parameters equals the decoder
/// uploaded from the written-back host model, bit for bit.
#[cfg(test)]
mod gpu_tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::model::decoding::DecodeEngine;
    use crate::model::ops::cuda::Gpu;
    use crate::model::{Activations, Precision, Qwen2, TrainBatch};
    use crate::optim::AdamW;
    use crate::train::engine::{restore_optimizer, CpuEngine, StepOutcome, TrainEngine};
    use crate::train::policy::{Policy, PolicyBatch};

    use super::CudaEngine;

    fn gpu() -> Option<Arc<Gpu>> {
        match Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) if std::env::var_os("GPG_RL_REQUIRE_GPU").is_some() => {
                panic!("GPG_RL_REQUIRE_GPU is set but no GPU opened: {e:#}")
            }
            Err(e) => {
                eprintln!("skipped (no GPU): {e:#}");
                None
            }
        }
    }

    fn model(precision: Precision, tied: bool) -> Qwen2 {
        let config: crate::model::Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": tied
        }))
        .unwrap();
        Qwen2::random(config, 0.2, 5, &candle_core::Device::Cpu)
            .unwrap()
            .to_precision(precision)
            .unwrap()
    }

    fn batch() -> TrainBatch {
        TrainBatch::new(&[
            (&[1u32, 2, 3, 4][..], &[5u32, 6, 7][..]),
            (&[9u32, 8][..], &[7u32, 6, 5, 4][..]),
        ])
        .unwrap()
    }

    const G: [f32; 7] = [0.3, -0.2, 0.1, -0.05, 0.2, -0.3, 0.15];

    fn gpu_step(u: &mut CudaEngine, host: &Policy, b: &TrainBatch) {
        let b = PolicyBatch::text_only(b.clone());
        let (_, cache) = u.forward(host, &b, 1.0, Activations::All).unwrap();
        u.backward_into(host, &b, cache, &G).unwrap();
        assert!(matches!(
            u.step(host, 1e-2, 1.0).unwrap(),
            StepOutcome::Applied(_)
        ));
    }

    fn engine(g: &Arc<Gpu>, host: &Policy, opt: AdamW) -> CudaEngine {
        CudaEngine::new(g.clone(), host, opt).unwrap()
    }

    fn as_map(buffers: crate::checkpoint::Buffers) -> HashMap<String, Vec<f32>> {
        buffers.into_iter().map(|(n, _, v)| (n, v)).collect()
    }

    #[test]
    fn gpu_checkpoint_state_resumes_exactly_on_the_gpu_and_closely_on_the_cpu() {
        let Some(g) = gpu() else { return };
        let b = batch();
        for (precision, tied) in [(Precision::F32, true), (Precision::Bf16, false)] {
            let mut host = Policy::from_text(model(precision, tied));
            let mut u = engine(&g, &host, AdamW::new(Default::default()).unwrap());
            gpu_step(&mut u, &host, &b);
            gpu_step(&mut u, &host, &b);
            u.sync_host(&mut host).unwrap();
            let (meta, buffers) = u.checkpoint_state(&host).unwrap();
            let restore = || {
                let mut map = as_map(buffers.clone());
                let opt = restore_optimizer(meta.clone(), &mut map).unwrap();
                (opt, map)
            };
            // GPU → GPU: the same third step, bit for bit.
            let (opt, mut map) = restore();
            let mut resumed_host = Policy::from_text(host.text().clone());
            let mut r = engine(&g, &resumed_host, opt);
            r.restore_master(&mut resumed_host, &mut map).unwrap();
            assert!(
                map.is_empty(),
                "{precision}: unread buffers {:?}",
                map.keys()
            );
            gpu_step(&mut u, &host, &b);
            gpu_step(&mut r, &resumed_host, &b);
            let (a, c) = (
                u.train_step().masters().unwrap(),
                r.train_step().masters().unwrap(),
            );
            assert_eq!(a, c, "{precision}: resumed GPU run differs");
            assert_eq!(
                u.train_step().moments().unwrap(),
                r.train_step().moments().unwrap()
            );
            // GPU checkpoint → CPU: the third step within the engines' tolerance.
            let (opt, mut map) = restore();
            let mut cpu_model = Policy::from_text(host.text().clone());
            let mut cpu = CpuEngine::new(&cpu_model, opt).unwrap();
            cpu.restore_master(&mut cpu_model, &mut map).unwrap();
            let pb = PolicyBatch::text_only(b.clone());
            let (_, cache) = cpu.forward(&cpu_model, &pb, 1.0, Activations::All).unwrap();
            cpu.backward_into(&cpu_model, &pb, cache, &G).unwrap();
            cpu.step(&cpu_model, 1e-2, 1.0).unwrap();
            let (cpu_meta, cpu_buffers) = cpu.checkpoint_state(&cpu_model).unwrap();
            assert_eq!(cpu_meta.steps.values().next(), Some(&3));
            let cpu_map = as_map(cpu_buffers);
            let tol = if precision == Precision::F32 {
                1e-4
            } else {
                2e-2
            };
            for (name, w) in &a {
                let want: Vec<f32> = match cpu_map.get(&format!("master.{name}")) {
                    Some(m) => m.clone(),
                    None => cpu_model
                        .text()
                        .weights
                        .get(name)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                };
                let diff: f64 = w
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let norm: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
                assert!(
                    diff <= tol * norm.max(1e-12),
                    "{precision} {name}: |gpu − cpu| = {diff:.3e}, |cpu| = {norm:.3e}"
                );
            }
        }
    }

    /// A micro-batch whose completions are all empty (possible in a rollout) scores nothing
    /// and adds no gradient: the next step equals one taken without it.
    #[test]
    fn gpu_micro_batch_without_completion_tokens_adds_nothing() {
        let Some(g) = gpu() else { return };
        let host = Policy::from_text(model(Precision::F32, true));
        let new = || engine(&g, &host, AdamW::new(Default::default()).unwrap());
        let (mut a, mut c) = (new(), new());
        let empty = PolicyBatch::text_only(
            TrainBatch::new(&[(&[1u32, 2][..], &[][..]), (&[3u32][..], &[][..])]).unwrap(),
        );
        let (lp, cache) = a.forward(&host, &empty, 1.0, Activations::All).unwrap();
        assert!(lp.logprobs.is_empty() && lp.entropy.is_empty());
        a.backward_into(&host, &empty, cache, &[]).unwrap();
        gpu_step(&mut a, &host, &batch());
        gpu_step(&mut c, &host, &batch());
        assert_eq!(
            a.train_step().masters().unwrap(),
            c.train_step().masters().unwrap()
        );
    }

    /// Gradient checkpointing on the GPU (each layer rerun from its saved input in the
    /// backward) gives the same gradients bit for bit, f32 and bf16, tied and untied.
    #[test]
    fn gpu_gradient_checkpointing_gives_the_same_gradients() {
        let Some(g) = gpu() else { return };
        let b = batch();
        for (precision, tied) in [(Precision::F32, true), (Precision::Bf16, false)] {
            let host = Policy::from_text(model(precision, tied));
            let pb = PolicyBatch::text_only(b.clone());
            let grads = |keep: Activations| {
                let mut u = engine(&g, &host, AdamW::new(Default::default()).unwrap());
                let (lp, cache) = u.forward(&host, &pb, 1.0, keep).unwrap();
                u.backward_into(&host, &pb, cache, &G).unwrap();
                (lp.logprobs, u.train_step().gradients().unwrap())
            };
            let (lp_all, all) = grads(Activations::All);
            let (lp_ckpt, ckpt) = grads(Activations::LayerInputs);
            assert_eq!(lp_all, lp_ckpt, "{precision}");
            assert_eq!(all.len(), ckpt.len());
            for ((name, a), (_, c)) in all.iter().zip(&ckpt) {
                assert!(
                    a.iter().any(|&x| x != 0.0),
                    "{precision} {name}: zero gradient"
                );
                assert_eq!(a, c, "{precision} {name}");
            }
        }
    }

    #[test]
    fn gpu_decoder_over_the_train_step_equals_the_uploaded_one() {
        let Some(g) = gpu() else { return };
        for precision in [Precision::F32, Precision::Bf16] {
            let mut host = Policy::from_text(model(precision, true));
            let mut u = engine(&g, &host, AdamW::new(Default::default()).unwrap());
            gpu_step(&mut u, &host, &batch());
            u.sync_host(&mut host).unwrap();
            let borrowed = u.decoder(host.text()).unwrap();
            let uploaded =
                crate::model::cuda_decode::CudaDecoder::new(g.clone(), host.text()).unwrap();
            let prompts = [vec![3u32, 1, 4, 1, 5], vec![9u32, 2, 6]];
            let mut a = borrowed.new_batch(4, 16).unwrap();
            let mut c = uploaded.new_batch(4, 16).unwrap();
            for batch in [&mut a, &mut c] {
                batch.push_prompts(&prompts, 2, 8).unwrap();
            }
            assert_eq!(a.logits().unwrap(), c.logits().unwrap(), "{precision}");
            for step in 0..3u32 {
                let tokens = [step + 1, step + 7, step + 11, step + 13];
                let pos = [5 + step, 5 + step, 3 + step, 3 + step];
                a.step(&tokens, &pos).unwrap();
                c.step(&tokens, &pos).unwrap();
                assert_eq!(
                    a.logits().unwrap(),
                    c.logits().unwrap(),
                    "{precision} {step}"
                );
            }
        }
    }

    /// max |got − want| ≤ rtol · max |want| + atol.
    #[track_caller]
    fn close(got: &[f32], want: &[f32], rtol: f32, atol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let (mut worst, mut at) = (0.0f32, 0);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let e = (g - w).abs();
            if e > worst || e.is_nan() {
                worst = e;
                at = i;
            }
        }
        assert!(
            worst <= rtol * scale + atol,
            "{what}: max error {worst} at {at} (got {}, want {}), scale {scale}",
            got[at],
            want[at]
        );
    }

    /// The GPU training step against the CPU engine on a small model: log-probs, every
    /// parameter's gradient (relative L2), and the weights after one clipped AdamW step.
    /// (Moved from `model/ops/cuda/tests.rs`: the model's kernel tests do not reach up into
    /// the training engine.)
    #[test]
    fn gpu_train_step_matches_the_cpu_engine() {
        use crate::model::ops::test_util::{rand_vec, rng, values};
        use crate::optim::AdamWConfig;
        use candle_core::DType;
        let Some(g) = gpu() else { return };
        for (tied, precision) in [
            (true, Precision::F32),
            (false, Precision::F32),
            (true, Precision::Bf16),
        ] {
            let config: crate::model::Qwen2Config = serde_json::from_value(serde_json::json!({
                "vocab_size": 300, "hidden_size": 128, "intermediate_size": 256,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": tied
            }))
            .unwrap();
            let mut model = Qwen2::random(config, 0.3, 13, &candle_core::Device::Cpu).unwrap();
            if precision == Precision::Bf16 {
                model = model.to_precision(precision).unwrap();
            }
            let what = format!("tied {tied}, {precision}");
            let (p0, c0) = ([1u32, 2, 3], [4u32, 5, 6, 7, 200]);
            let (p1, c1) = ([9u32], [10u32, 11, 299]);
            let batch = TrainBatch::new(&[(&p0[..], &c0[..]), (&p1[..], &c1[..])]).unwrap();
            let mut r = rng(7);
            let gt = rand_vec(&mut r, batch.targets.len(), 1.0);
            let (lp, cache) = model
                .forward_train_with(&batch, 0.9, Activations::All)
                .unwrap();
            let host = Policy::from_text(model.clone());
            let mut updater =
                CpuEngine::new(&host, AdamW::new(AdamWConfig::default()).unwrap()).unwrap();
            model
                .backward_into(
                    &batch,
                    cache,
                    &gt,
                    updater.gradients_mut().decoder.as_mut().unwrap(),
                )
                .unwrap();

            let mut step = CudaEngine::new(
                g.clone(),
                &host,
                AdamW::new(AdamWConfig::default()).unwrap(),
            )
            .unwrap();
            let pb = PolicyBatch::text_only(batch.clone());
            let (lpg, cg) = step.forward(&host, &pb, 0.9, Activations::All).unwrap();
            let (tol_lp, tol_g) = if precision == Precision::F32 {
                (1e-5, 1e-4)
            } else {
                (2e-2, 3e-2)
            };
            close(
                &lpg.logprobs,
                &lp.logprobs,
                tol_lp,
                tol_lp,
                &format!("{what}: logprobs"),
            );
            close(
                &lpg.entropy,
                &lp.entropy,
                tol_lp,
                tol_lp,
                &format!("{what}: entropy"),
            );
            step.backward_into(&host, &pb, cg, &gt).unwrap();
            let cpu_grads = updater.named_gradients(&host).unwrap();
            let gpu_grads = step.train_step().gradients().unwrap();
            assert_eq!(cpu_grads.len(), gpu_grads.len(), "{what}");
            for ((name, want), (gname, got)) in cpu_grads.iter().zip(&gpu_grads) {
                assert_eq!(name, gname);
                let num: f64 = want
                    .iter()
                    .zip(got)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let den: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum();
                let rel = (num / den.max(1e-30)).sqrt();
                assert!(
                    rel <= tol_g,
                    "{what}: gradient of {name}: relative L2 error {rel}"
                );
            }
            // One clipped AdamW step each, then the weights.
            let cpu_model = model.clone();
            updater.step(&host, 1e-3, 0.5).unwrap();
            let outcome = step.step(&host, 1e-3, 0.5).unwrap();
            let StepOutcome::Applied(clip) = outcome else {
                panic!("{what}: the GPU step was skipped");
            };
            assert!(clip.finite && clip.norm.is_finite());
            let mut gpu_model = Policy::from_text(model.clone());
            step.sync_host(&mut gpu_model).unwrap();
            let gpu_model = gpu_model.text().clone();
            for ((name, a), (_, b)) in cpu_model
                .parameters()
                .iter()
                .zip(gpu_model.parameters().iter())
            {
                let a = values(&a.to_dtype(DType::F32).unwrap());
                let b = values(&b.to_dtype(DType::F32).unwrap());
                let tol = if precision == Precision::F32 {
                    1e-5
                } else {
                    1e-2
                };
                close(&b, &a, tol, 1e-6, &format!("{what}: {name} after one step"));
            }
        }
    }
}
