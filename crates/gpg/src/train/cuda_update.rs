//! The optimiser side of a training step on a GPU (feature `cuda`): [`CudaUpdater`] wraps
//! `model::cuda_train::CudaTrainStep` (f32 masters, bf16 compute copies, gradients and AdamW
//! moments on the device) behind the same operations as the CPU `ModelUpdater`: forward,
//! backward from g_t, global-norm clipping + AdamW, and the checkpoint state.
//!
//! The checkpoint state is the CPU updater's, byte for byte in layout: `exp_avg.<name>`,
//! `exp_avg_sq.<name>` for every parameter once a step was applied, per-parameter step counts,
//! and for a model with bf16 matrices the f32 value of every leaf (`master.<name>`). So a
//! checkpoint written on the GPU resumes exactly on the GPU (the masters and moments go back
//! up unchanged) and resumes on the CPU too. The host-side parts are plain functions
//! ([`moment_buffers`], [`common_adamw_step`]), compiled and tested in every build.
//!
//! One weight store: the trained weights live on the GPU only. The host model's tensors are
//! brought up to date from the device ([`CudaUpdater::sync_host`]) before a checkpoint or the
//! final model is written; rollouts and evaluations sample with the CUDA decoder reading the
//! device parameters in place ([`CudaUpdater::decoder`]), so nothing is uploaded per
//! `generate` call.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};

use crate::checkpoint::Buffers;
use crate::optim::{AdamWConfig, ParamState};

use super::update::{OptimizerMeta, MASTER};

/// One parameter's AdamW moments on the host: (HF name, exp_avg, exp_avg_sq).
pub type NamedMoments = (String, Vec<f32>, Vec<f32>);

/// The optimiser's checkpoint metadata and buffers from one shared step count and the moments
/// of every parameter (`(name, exp_avg, exp_avg_sq)`), laid out as the CPU updater's
/// (`update::optimizer_checkpoint`: buffers sorted by name, exp_avg before exp_avg_sq), plus
/// `master.<name>` for every entry of `masters` (in the given order, as the CPU writes them: the
/// parameter tree's). With `step == 0` no moment is written (the CPU optimiser creates them at
/// the first update).
pub fn moment_buffers(
    config: AdamWConfig,
    step: u64,
    moments: Vec<NamedMoments>,
    masters: Option<Vec<(String, Vec<f32>)>>,
) -> (OptimizerMeta, Buffers) {
    let mut sorted: BTreeMap<String, (Vec<f32>, Vec<f32>)> = BTreeMap::new();
    if step > 0 {
        for (name, m, v) in moments {
            sorted.insert(name, (m, v));
        }
    }
    let meta = OptimizerMeta {
        config,
        steps: sorted.keys().map(|k| (k.clone(), step)).collect(),
    };
    let mut buffers: Buffers = Vec::with_capacity(2 * sorted.len());
    for (name, (m, v)) in sorted {
        buffers.push((format!("exp_avg.{name}"), vec![m.len()], m));
        buffers.push((format!("exp_avg_sq.{name}"), vec![v.len()], v));
    }
    for (name, values) in masters.into_iter().flatten() {
        buffers.push((format!("{MASTER}.{name}"), vec![values.len()], values));
    }
    (meta, buffers)
}

/// The one AdamW step count of a restored optimiser state (0 when empty): the GPU optimiser
/// keeps one count for every parameter, so parameters at different counts (possible only in a
/// checkpoint made by hand) are refused, naming one.
pub fn common_adamw_step(params: &BTreeMap<String, ParamState>) -> Result<u64> {
    let Some((first_name, first)) = params.iter().next() else {
        return Ok(0);
    };
    for (name, p) in params {
        ensure!(
            p.step == first.step,
            "optimiser state: parameter {name} is at AdamW step {}, {first_name} at {}; the GPU \
             optimiser keeps one step count for all parameters",
            p.step,
            first.step
        );
    }
    Ok(first.step)
}

#[cfg(feature = "cuda")]
pub use gpu::CudaUpdater;

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::Arc;

    use anyhow::{Context, Result};

    use crate::checkpoint::Buffers;
    use crate::model::cuda_decode::CudaDecoder;
    use crate::model::cuda_train::{CudaForwardCache, CudaTrainStep};
    use crate::model::ops::cuda::Gpu;
    use crate::model::{Activations, Qwen2, TokenLogprobs, TrainBatch};
    use crate::optim::{AdamW, GradClip};

    use super::super::update::{OptimizerMeta, StepOutcome, MASTER};
    use super::{common_adamw_step, moment_buffers};

    /// Gradients, master weights and AdamW of one model, on a GPU.
    pub struct CudaUpdater {
        step: CudaTrainStep,
    }

    impl CudaUpdater {
        /// Uploads `model`'s parameters and `optimizer`'s state (its moments when resuming).
        pub fn new(gpu: Arc<Gpu>, model: &Qwen2, optimizer: AdamW) -> Result<Self> {
            let state = optimizer.state();
            let mut step = CudaTrainStep::new(gpu, model, state.config)?;
            let count = common_adamw_step(&state.params)?;
            step.restore_optimizer(count, &state.params)?;
            Ok(CudaUpdater { step })
        }

        pub fn train_step(&self) -> &CudaTrainStep {
            &self.step
        }

        /// The forward of `batch` on the device, keeping what the backward needs (`keep`:
        /// every activation, or each layer's input for gradient checkpointing).
        pub fn forward(
            &self,
            batch: &TrainBatch,
            inv_temperature: f32,
            keep: Activations,
        ) -> Result<(TokenLogprobs, CudaForwardCache)> {
            self.step.forward_with(batch, inv_temperature, keep)
        }

        /// Per-token log-probs only (the activations are freed at once).
        pub fn logprobs(&self, batch: &TrainBatch, inv_temperature: f32) -> Result<TokenLogprobs> {
            Ok(self.step.forward(batch, inv_temperature)?.0)
        }

        /// Backward of one micro-batch, accumulated into the device gradients.
        pub fn backward(
            &mut self,
            batch: &TrainBatch,
            cache: CudaForwardCache,
            g: &[f32],
        ) -> Result<()> {
            self.step.backward(batch, cache, g)
        }

        /// Global-norm clipping, AdamW on the device, gradients cleared. The host model is not
        /// touched (see [`Self::sync_host`]).
        pub fn step(&mut self, lr: f32, max_norm: f32) -> Result<StepOutcome> {
            let out = self.step.step(lr, max_norm)?;
            let clip = GradClip {
                norm: out.grad_norm,
                scale: out.scale,
                finite: out.applied,
            };
            Ok(if out.applied {
                StepOutcome::Applied(clip)
            } else {
                StepOutcome::Skipped(clip)
            })
        }

        pub fn zero_grad(&mut self) -> Result<()> {
            self.step.zero_grad()
        }

        /// Restores a checkpoint's `master.<name>` buffers (bf16 models) onto the device and
        /// brings `model` up to date with them.
        pub fn restore_master(
            &mut self,
            model: &mut Qwen2,
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
                anyhow::bail!(
                    "checkpoint buffer {MASTER}.{unknown}: the model has no such parameter"
                );
            }
            self.sync_host(model)
        }

        /// The optimiser's state for a checkpoint, downloaded (the CPU updater's layout).
        pub fn checkpoint_state(&self) -> Result<(OptimizerMeta, Buffers)> {
            let s = &self.step;
            let masters = if s.is_bf16() {
                Some(s.masters()?)
            } else {
                None
            };
            Ok(moment_buffers(
                s.adamw_config(),
                s.adamw_steps(),
                s.moments()?,
                masters,
            ))
        }

        /// Writes the device weights into `model`'s tensors (in its dtype).
        pub fn sync_host(&self, model: &mut Qwen2) -> Result<()> {
            self.step
                .write_back(model)
                .context("bringing the host model up to date from the GPU")
        }

        /// A CUDA decoder over the device parameters (borrowed, nothing uploaded).
        pub fn decoder<'a>(&'a self, model: &Qwen2) -> Result<CudaDecoder<'a>> {
            CudaDecoder::from_train_step(&self.step, model)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Precision, Qwen2, TrainBatch};
    use crate::optim::AdamW;
    use crate::train::update::{optimizer_checkpoint, ModelUpdater};

    fn tiny(precision: Precision) -> Qwen2 {
        let config: crate::model::Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": false
        }))
        .unwrap();
        Qwen2::random(config, 0.1, 3, &candle_core::Device::Cpu)
            .unwrap()
            .to_precision(precision)
            .unwrap()
    }

    /// Two CPU steps, then the state as the GPU updater would hand it over (one step count,
    /// the moments by name in tree order, the masters): the same metadata and buffers as the
    /// CPU updater's checkpoint, in the same order, for f32 and bf16 models.
    #[test]
    fn gpu_checkpoint_layout_is_the_cpu_updaters() {
        for precision in [Precision::F32, Precision::Bf16] {
            let mut model = tiny(precision);
            let mut u = ModelUpdater::new(&model, AdamW::new(Default::default()).unwrap()).unwrap();
            let batch = TrainBatch::new(&[(&[1u32, 2, 3][..], &[4u32, 5][..])]).unwrap();
            for _ in 0..2 {
                let (_, cache) = model.forward_train(&batch, 1.0).unwrap();
                model
                    .backward_into(&batch, cache, &[0.5, -0.25], u.grads_mut())
                    .unwrap();
                u.step(&mut model, 1e-2, 1.0).unwrap();
            }
            let (want_meta, want) = u.checkpoint_state(&model).unwrap();
            // A fresh optimiser writes no moments, as moment_buffers at step 0.
            let (fresh, none) = optimizer_checkpoint(&AdamW::new(Default::default()).unwrap());
            assert!(fresh.steps.is_empty() && none.is_empty());
            // What the device hands over: moments in the parameter tree's order.
            let by_name: std::collections::HashMap<String, (Vec<f32>, Vec<f32>)> = want
                .iter()
                .filter_map(|(n, _, v)| n.strip_prefix("exp_avg.").map(|k| (k, v)))
                .map(|(k, m)| {
                    let v = want
                        .iter()
                        .find(|(n, _, _)| n == &format!("exp_avg_sq.{k}"))
                        .unwrap()
                        .2
                        .clone();
                    (k.to_string(), (m.clone(), v))
                })
                .collect();
            let names: Vec<String> = model.weights.named().into_iter().map(|(n, _)| n).collect();
            let moments = names
                .iter()
                .map(|n| {
                    let (m, v) = by_name[n].clone();
                    (n.clone(), m, v)
                })
                .collect();
            let masters = (precision == Precision::Bf16).then(|| {
                want.iter()
                    .filter_map(|(n, _, v)| {
                        n.strip_prefix("master.")
                            .map(|k| (k.to_string(), v.clone()))
                    })
                    .collect::<Vec<_>>()
            });
            if precision == Precision::Bf16 {
                assert_eq!(masters.as_ref().unwrap().len(), names.len());
            }
            let step = *want_meta.steps.values().next().unwrap();
            assert!(want_meta.steps.values().all(|&s| s == step));
            assert_eq!(step, 2);
            let (meta, got) = moment_buffers(want_meta.config, step, moments, masters);
            assert_eq!(meta.steps, want_meta.steps);
            assert_eq!(
                serde_json::to_value(meta.config).unwrap(),
                serde_json::to_value(want_meta.config).unwrap()
            );
            assert_eq!(got, want, "{precision}");
        }
    }

    #[test]
    fn no_moments_before_the_first_step_and_one_step_count() {
        let (meta, buffers) = moment_buffers(
            Default::default(),
            0,
            vec![("w".into(), vec![0.0], vec![0.0])],
            None,
        );
        assert!(meta.steps.is_empty() && buffers.is_empty());
        assert_eq!(common_adamw_step(&BTreeMap::new()).unwrap(), 0);
        let state = |step| ParamState {
            step,
            exp_avg: vec![],
            exp_avg_sq: vec![],
        };
        let mixed: BTreeMap<String, ParamState> =
            [("a".to_string(), state(3)), ("b".to_string(), state(2))].into();
        let e = common_adamw_step(&mixed).unwrap_err().to_string();
        assert!(e.contains("parameter b") && e.contains("step 2"), "{e}");
    }
}

/// On a GPU only (`bench/gpu/check-a.sh` runs them with GPG_RL_REQUIRE_GPU=1; elsewhere they
/// skip, saying why): the updater's checkpoint state resumes exactly on the GPU and within
/// tolerance on the CPU; the decoder over the train step's parameters equals the decoder
/// uploaded from the written-back host model, bit for bit.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::model::decoding::DecodeEngine;
    use crate::model::ops::cuda::Gpu;
    use crate::model::{Activations, Precision, Qwen2, TrainBatch};
    use crate::optim::AdamW;
    use crate::train::update::{ModelUpdater, StepOutcome};

    use super::CudaUpdater;

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

    fn gpu_step(u: &mut CudaUpdater, b: &TrainBatch) {
        let (_, cache) = u.forward(b, 1.0, Activations::All).unwrap();
        u.backward(b, cache, &G).unwrap();
        assert!(matches!(
            u.step(1e-2, 1.0).unwrap(),
            StepOutcome::Applied(_)
        ));
    }

    fn as_map(buffers: crate::checkpoint::Buffers) -> HashMap<String, Vec<f32>> {
        buffers.into_iter().map(|(n, _, v)| (n, v)).collect()
    }

    #[test]
    fn gpu_checkpoint_state_resumes_exactly_on_the_gpu_and_closely_on_the_cpu() {
        let Some(g) = gpu() else { return };
        let b = batch();
        for (precision, tied) in [(Precision::F32, true), (Precision::Bf16, false)] {
            let mut host = model(precision, tied);
            let mut u = CudaUpdater::new(g.clone(), &host, AdamW::new(Default::default()).unwrap())
                .unwrap();
            gpu_step(&mut u, &b);
            gpu_step(&mut u, &b);
            u.sync_host(&mut host).unwrap();
            let (meta, buffers) = u.checkpoint_state().unwrap();
            let restore = || {
                let mut map = as_map(buffers.clone());
                let opt = ModelUpdater::restore_optimizer(meta.clone(), &mut map).unwrap();
                (opt, map)
            };
            // GPU → GPU: the same third step, bit for bit.
            let (opt, mut map) = restore();
            let mut resumed_host = host.clone();
            let mut r = CudaUpdater::new(g.clone(), &resumed_host, opt).unwrap();
            r.restore_master(&mut resumed_host, &mut map).unwrap();
            assert!(
                map.is_empty(),
                "{precision}: unread buffers {:?}",
                map.keys()
            );
            gpu_step(&mut u, &b);
            gpu_step(&mut r, &b);
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
            let mut cpu_model = host.clone();
            let mut cpu = ModelUpdater::new(&cpu_model, opt).unwrap();
            cpu.restore_master(&mut cpu_model, &mut map).unwrap();
            let (_, cache) = cpu_model.forward_train(&b, 1.0).unwrap();
            cpu_model
                .backward_into(&b, cache, &G, cpu.grads_mut())
                .unwrap();
            cpu.step(&mut cpu_model, 1e-2, 1.0).unwrap();
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
        let host = model(Precision::F32, true);
        let new =
            || CudaUpdater::new(g.clone(), &host, AdamW::new(Default::default()).unwrap()).unwrap();
        let (mut a, mut c) = (new(), new());
        let empty = TrainBatch::new(&[(&[1u32, 2][..], &[][..]), (&[3u32][..], &[][..])]).unwrap();
        let (lp, cache) = a.forward(&empty, 1.0, Activations::All).unwrap();
        assert!(lp.logprobs.is_empty() && lp.entropy.is_empty());
        a.backward(&empty, cache, &[]).unwrap();
        gpu_step(&mut a, &batch());
        gpu_step(&mut c, &batch());
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
            let host = model(precision, tied);
            let grads = |keep: Activations| {
                let mut u =
                    CudaUpdater::new(g.clone(), &host, AdamW::new(Default::default()).unwrap())
                        .unwrap();
                let (lp, cache) = u.forward(&b, 1.0, keep).unwrap();
                u.backward(&b, cache, &G).unwrap();
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
            let mut host = model(precision, true);
            let mut u = CudaUpdater::new(g.clone(), &host, AdamW::new(Default::default()).unwrap())
                .unwrap();
            gpu_step(&mut u, &batch());
            u.sync_host(&mut host).unwrap();
            let borrowed = u.decoder(&host).unwrap();
            let uploaded = crate::model::cuda_decode::CudaDecoder::new(g.clone(), &host).unwrap();
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
}
