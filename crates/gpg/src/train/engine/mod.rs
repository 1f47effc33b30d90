//! The training engine: the one seam between the trainer (RL and SFT) and the device that
//! computes. A [`TrainEngine`] owns the gradient buffers and the optimiser state of the
//! parameters a run trains and serves, for a micro-batch of the policy, the training forward
//! (log-probs + what the backward needs), the backward from g_t = ∂L/∂log π(o_t) into the
//! gradients, optionally both in one pass, log-probs alone, the decode engine of the current
//! weights, and the clipped AdamW step; and the optimiser's checkpoint state.
//!
//! One implementation per device: [`CpuEngine`] (`cpu.rs`) and, with the `cuda` feature,
//! `CudaEngine` (`cuda.rs`). Which parameters train is not an implementation but a choice of
//! trainable leaves ([`Trainable`]): every parameter, a LoRA adapter's A and B (the base
//! frozen), or a vision-language model's decoder with or without its tower. Whatever the
//! device and the choice, the optimiser is one AdamW walk over the trained leaves by name
//! (`leaves.rs`: the arithmetic is `optim::adamw`'s, the CUDA engine runs the same scalars in
//! its kernel), and its checkpoint state has one layout: `exp_avg.<name>`,
//! `exp_avg_sq.<name>`, per-parameter step counts, and `master.<name>` (f32 values) for a model
//! with bf16 leaves ([`optimizer_checkpoint`], [`master_buffers`]).

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Buffers;
use crate::model::decoding::DecodeEngine;
use crate::model::{Activations, Qwen2, TokenLogprobs};
use crate::optim::{AdamW, AdamWConfig, AdamWState, GradClip, ParamState};

use super::collective::{Collective, GradReduce};
use super::device::TrainDevice;
use super::policy::{Policy, PolicyBatch};

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod leaves;

pub use cpu::CpuEngine;
#[cfg(feature = "cuda")]
pub use cuda::CudaEngine;
pub use leaves::{master_buffers, Gradients, Trainable};

/// What a training forward keeps for the backward, on the engine's device. Opaque to the
/// trainer: only the engine that made it reads it (another engine's cache is an internal
/// error).
pub struct StepCache(Box<dyn Any>);

impl StepCache {
    pub(crate) fn new<T: 'static>(cache: T) -> Self {
        StepCache(Box::new(cache))
    }

    pub(crate) fn take<T: 'static>(self) -> Result<T> {
        self.0
            .downcast::<T>()
            .map(|b| *b)
            .map_err(|_| anyhow::anyhow!("internal: a forward cache of another engine"))
    }
}

/// Outcome of an optimiser step.
pub enum StepOutcome {
    Applied(GradClip),
    /// The gradient norm was not finite: parameters are unchanged.
    Skipped(GradClip),
}

/// What a checkpoint keeps of the optimiser besides the moment buffers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OptimizerMeta {
    pub config: AdamWConfig,
    /// Per-parameter AdamW step counts.
    pub steps: BTreeMap<String, u64>,
}

/// Prefix of the checkpoint buffers holding f32 master weights (bf16 models).
pub const MASTER: &str = "master";

/// The training engine of one run on one device (see the module documentation).
pub trait TrainEngine {
    /// The training forward of one micro-batch: per-token log-probs of the completion tokens
    /// and what the backward needs (`keep`: every activation, or layer inputs only).
    fn forward(
        &self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
        keep: Activations,
    ) -> Result<(TokenLogprobs, StepCache)>;

    /// Whether [`Self::forward_backward_into`] serves `model` (the CPU engine on a text model).
    fn fuses_forward_backward(&self, model: &Policy) -> bool;

    /// Forward and backward in one pass for token weights g_t known before the forward (the
    /// head's logits formed once); gradients accumulated as by [`Self::backward_into`].
    fn forward_backward_into(
        &mut self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
    ) -> Result<TokenLogprobs>;

    /// Backward of one micro-batch from g_t, accumulated into the gradient buffers.
    fn backward_into(
        &mut self,
        model: &Policy,
        batch: &PolicyBatch,
        cache: StepCache,
        g: &[f32],
    ) -> Result<()>;

    /// Per-token log-probs of the current weights, no backward.
    fn logprobs(
        &self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
    ) -> Result<TokenLogprobs>;

    /// The decode engine of the current weights of the text model `model`: the CPU model
    /// itself, or the CUDA decoder reading the device parameters in place (no upload).
    fn decode_engine<'a>(&'a self, model: &'a Qwen2) -> Result<Box<dyn DecodeEngine + 'a>>;

    /// Brings the host model's tensors up to date with the trained weights (a no-op on the
    /// CPU, where the step writes them in place): before a checkpoint or the final model.
    fn sync_host(&self, model: &mut Policy) -> Result<()>;

    /// Every host gradient buffer the step applies, in a fixed order: what a data-parallel run
    /// all-reduces (a GPU run has none: its gradients are on the device).
    fn gradient_buffers_mut(&mut self) -> Vec<&mut [f32]>;

    /// Sets up the gradient sum of a data-parallel run (`reduce`, from
    /// [`GradReduce::select`]) over `collective`'s ranks and says what it is, for the log.
    /// Default (host gradient buffers): nothing to set up; NCCL is refused.
    fn prepare_all_reduce(
        &mut self,
        reduce: GradReduce,
        collective: &Arc<dyn Collective>,
    ) -> Result<String> {
        match reduce {
            GradReduce::Nccl => {
                anyhow::bail!("internal: NCCL sums device gradients; this engine's are on the host")
            }
            GradReduce::Host => Ok(format!(
                "host: gradient buffers summed over {}",
                collective.backend()
            )),
            GradReduce::Single => Ok("single process".into()),
        }
    }

    /// ⊕ Sums the gradients over the ranks, in place (every rank at the same point). Default:
    /// [`Self::gradient_buffers_mut`] as one flat buffer over the host collective.
    fn all_reduce_gradients(&mut self, collective: &dyn Collective) -> Result<()> {
        collective.all_reduce_sum_slices(&mut self.gradient_buffers_mut())
    }

    fn zero_grad(&mut self) -> Result<()>;

    /// Global-norm clipping to `max_norm`, AdamW at `lr` on every trained leaf (the new values
    /// written into the model's tensors on the CPU), gradients cleared. A non-finite norm
    /// skips the update.
    fn step(&mut self, model: &Policy, lr: f32, max_norm: f32) -> Result<StepOutcome>;

    /// Optimiser metadata and buffers for a checkpoint (one layout for every engine).
    fn checkpoint_state(&self, model: &Policy) -> Result<(OptimizerMeta, Buffers)>;

    /// Restores a checkpoint's `master.<name>` buffers (bf16 models) into the trained leaves
    /// and the model; a no-op when there are none.
    fn restore_master(
        &mut self,
        model: &mut Policy,
        buffers: &mut HashMap<String, Vec<f32>>,
    ) -> Result<()>;
}

/// The engine of a run on `device` training `model`'s leaves chosen by [`Trainable::of`]
/// (`train_vision`: a vision-language model's tower trains too), with `optimizer`'s state.
pub fn engine_for(
    device: &TrainDevice,
    model: &Policy,
    optimizer: AdamW,
) -> Result<Box<dyn TrainEngine>> {
    match device {
        TrainDevice::Cpu => Ok(Box::new(CpuEngine::new(model, optimizer)?)),
        #[cfg(feature = "cuda")]
        TrainDevice::Cuda(gpu) => Ok(Box::new(CudaEngine::new(gpu.clone(), model, optimizer)?)),
    }
}

/// The optimiser's metadata and moment buffers (`exp_avg.<name>`, `exp_avg_sq.<name>`, sorted
/// by name) for a checkpoint: the one layout, whichever device holds the moments.
pub fn optimizer_checkpoint(state: &AdamWState) -> (OptimizerMeta, Buffers) {
    let meta = OptimizerMeta {
        config: state.config,
        steps: state
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.step))
            .collect(),
    };
    let mut buffers = Vec::new();
    for (name, p) in &state.params {
        buffers.push((
            format!("exp_avg.{name}"),
            vec![p.exp_avg.len()],
            p.exp_avg.clone(),
        ));
        buffers.push((
            format!("exp_avg_sq.{name}"),
            vec![p.exp_avg_sq.len()],
            p.exp_avg_sq.clone(),
        ));
    }
    (meta, buffers)
}

/// Rebuilds the optimiser from a checkpoint's metadata and buffers (taken out of `buffers`).
pub fn restore_optimizer(
    meta: OptimizerMeta,
    buffers: &mut HashMap<String, Vec<f32>>,
) -> Result<AdamW> {
    let mut state = AdamWState {
        config: meta.config,
        params: BTreeMap::new(),
    };
    for (name, step) in meta.steps {
        let mut take = |kind: &str| {
            buffers.remove(&format!("{kind}.{name}")).with_context(|| {
                format!("optimiser buffer {kind}.{name} is missing from the checkpoint")
            })
        };
        let exp_avg = take("exp_avg")?;
        let exp_avg_sq = take("exp_avg_sq")?;
        state.params.insert(
            name,
            ParamState {
                step,
                exp_avg,
                exp_avg_sq,
            },
        );
    }
    AdamW::from_state(state)
}

/// The optimiser state of an engine whose moments live on a device: its per-parameter step
/// counts and the downloaded moments `(name, exp_avg, exp_avg_sq)`. A parameter never updated
/// (no step count) has no state, as in the CPU optimiser, which creates it at the first update.
pub fn state_from_moments(
    config: AdamWConfig,
    steps: &BTreeMap<String, u64>,
    moments: Vec<(String, Vec<f32>, Vec<f32>)>,
) -> AdamWState {
    let params = moments
        .into_iter()
        .filter_map(|(name, exp_avg, exp_avg_sq)| {
            let step = *steps.get(&name)?;
            Some((
                name,
                ParamState {
                    step,
                    exp_avg,
                    exp_avg_sq,
                },
            ))
        })
        .collect();
    AdamWState { config, params }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Precision, Qwen2, TrainBatch};

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

    /// Two CPU steps, then the state as the GPU engine hands it over (step counts by name, the
    /// moments by name in tree order, the masters): the same metadata and buffers as the CPU
    /// engine's checkpoint, in the same order, for f32 and bf16 models.
    #[test]
    fn gpu_checkpoint_layout_is_the_cpu_updaters() {
        for precision in [Precision::F32, Precision::Bf16] {
            let model = Policy::from_text(tiny(precision));
            let mut u = CpuEngine::new(&model, AdamW::new(Default::default()).unwrap()).unwrap();
            let batch = PolicyBatch::text_only(
                TrainBatch::new(&[(&[1u32, 2, 3][..], &[4u32, 5][..])]).unwrap(),
            );
            for _ in 0..2 {
                let (_, cache) = u.forward(&model, &batch, 1.0, Activations::All).unwrap();
                u.backward_into(&model, &batch, cache, &[0.5, -0.25])
                    .unwrap();
                u.step(&model, 1e-2, 1.0).unwrap();
            }
            let (want_meta, want) = u.checkpoint_state(&model).unwrap();
            // A fresh optimiser writes no moments, as a device state without step counts.
            let (fresh, none) =
                optimizer_checkpoint(AdamW::new(Default::default()).unwrap().state());
            assert!(fresh.steps.is_empty() && none.is_empty());
            let (empty, none) = optimizer_checkpoint(&state_from_moments(
                Default::default(),
                &BTreeMap::new(),
                vec![("w".into(), vec![0.0], vec![0.0])],
            ));
            assert!(empty.steps.is_empty() && none.is_empty());
            // What the device hands over: moments in the parameter tree's order.
            let find = |n: &str| want.iter().find(|(k, _, _)| k == n).unwrap().2.clone();
            let names: Vec<String> = model
                .text()
                .weights
                .named()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            let moments = names
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        find(&format!("exp_avg.{n}")),
                        find(&format!("exp_avg_sq.{n}")),
                    )
                })
                .collect();
            let masters: Vec<(String, Vec<f32>)> = want
                .iter()
                .filter_map(|(n, _, v)| {
                    n.strip_prefix("master.")
                        .map(|k| (k.to_string(), v.clone()))
                })
                .collect();
            if precision == Precision::Bf16 {
                assert_eq!(masters.len(), names.len());
            } else {
                assert!(masters.is_empty());
            }
            assert!(want_meta.steps.values().all(|&s| s == 2));
            let (meta, mut got) = optimizer_checkpoint(&state_from_moments(
                want_meta.config,
                &want_meta.steps,
                moments,
            ));
            got.extend(master_buffers(masters));
            assert_eq!(meta.steps, want_meta.steps);
            assert_eq!(
                serde_json::to_value(meta.config).unwrap(),
                serde_json::to_value(want_meta.config).unwrap()
            );
            assert_eq!(got, want, "{precision}");
        }
    }
}
