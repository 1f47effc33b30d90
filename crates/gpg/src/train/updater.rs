//! The optimiser side of a training step, for either kind of run: full fine-tuning
//! ([`ModelUpdater`]: every parameter) or LoRA ([`AdapterUpdater`]: A and B only, the base
//! frozen). The kind follows the model: one with an adapter trains the adapter. A
//! vision-language policy has its own ([`VlUpdater`], built by `Policy::updater`). With the
//! `cuda` feature and a GPU run, full fine-tuning on the device
//! (`super::cuda_update::CudaUpdater`); the forward, log-probs and the decode engine of a
//! text step also go through the updater ([`Updater::forward`], [`Updater::logprobs`],
//! [`Updater::decode_engine`]) so that the trainer does not depend on the device. On the CPU
//! these are exactly the model's own calls.

use std::collections::HashMap;

use anyhow::Result;

use crate::checkpoint::Buffers;
use crate::model::decoding::DecodeEngine;
use crate::model::{Activations, ForwardCache, Qwen2, TokenLogprobs, TrainBatch};
use crate::optim::AdamW;

use super::device::TrainDevice;

use super::lora_update::AdapterUpdater;
use super::update::{ModelUpdater, OptimizerMeta, StepOutcome};
use super::vl_update::VlUpdater;

pub enum Updater {
    Full(ModelUpdater),
    Adapter(AdapterUpdater),
    /// A vision-language model: decoder and (unless frozen) tower.
    Vision(VlUpdater),
    #[cfg(feature = "cuda")]
    Cuda(Box<super::cuda_update::CudaUpdater>),
}

/// What a forward keeps for the backward, on the updater's device.
pub enum StepCache {
    Cpu(ForwardCache),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::model::cuda_train::CudaForwardCache>),
}

impl From<ForwardCache> for StepCache {
    fn from(c: ForwardCache) -> Self {
        StepCache::Cpu(c)
    }
}

impl Updater {
    /// [`AdapterUpdater`] when `model` has an adapter, else [`ModelUpdater`].
    pub fn new(model: &Qwen2, optimizer: AdamW) -> Result<Self> {
        Ok(if model.adapter().is_some() {
            Updater::Adapter(AdapterUpdater::new(model, optimizer)?)
        } else {
            Updater::Full(ModelUpdater::new(model, optimizer)?)
        })
    }

    /// [`Self::new`] on the CPU; on a GPU, full fine-tuning with the parameters and
    /// `optimizer`'s state uploaded (LoRA on a GPU is refused earlier, by
    /// `TrainDevice::check_run`).
    pub fn on_device(device: &TrainDevice, model: &Qwen2, optimizer: AdamW) -> Result<Self> {
        match device {
            TrainDevice::Cpu => Self::new(model, optimizer),
            #[cfg(feature = "cuda")]
            TrainDevice::Cuda(gpu) => {
                anyhow::ensure!(
                    model.adapter().is_none(),
                    "LoRA adapters do not train on {} yet",
                    gpu.description()
                );
                Ok(Updater::Cuda(Box::new(
                    super::cuda_update::CudaUpdater::new(gpu.clone(), model, optimizer)?,
                )))
            }
        }
    }

    /// The training forward of one micro-batch on the updater's device (on the CPU:
    /// `model.forward_train_with`).
    pub fn forward(
        &self,
        model: &Qwen2,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
    ) -> Result<(TokenLogprobs, StepCache)> {
        match self {
            Updater::Full(_) | Updater::Adapter(_) | Updater::Vision(_) => {
                let (lp, cache) = model.forward_train_with(batch, inv_temperature, keep)?;
                Ok((lp, StepCache::Cpu(cache)))
            }
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => {
                let (lp, cache) = u.forward(batch, inv_temperature, keep)?;
                Ok((lp, StepCache::Cuda(Box::new(cache))))
            }
        }
    }

    /// Whether [`Self::forward_backward_into`] is available: on the CPU updaters of a text
    /// model (the GPU and vision-language updaters take the forward, then the backward).
    pub fn fuses_forward_backward(&self) -> bool {
        matches!(self, Updater::Full(_) | Updater::Adapter(_))
    }

    /// Forward and backward of one micro-batch in one call, for token weights g_t known
    /// before the forward (the head's logits are formed once: `Qwen2::forward_backward_into`);
    /// the gradients are accumulated as by [`Self::backward_into`]. Returns the log-probs.
    pub fn forward_backward_into(
        &mut self,
        model: &Qwen2,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
    ) -> Result<TokenLogprobs> {
        match self {
            Updater::Full(u) => {
                model.forward_backward_into(batch, inv_temperature, keep, g, u.grads_mut())
            }
            Updater::Adapter(u) => u.forward_backward_into(model, batch, inv_temperature, keep, g),
            _ => anyhow::bail!(
                "internal: this updater takes the forward and the backward separately"
            ),
        }
    }

    /// Per-token log-probs of the current weights, no backward (on the CPU: `model.logprobs`).
    pub fn logprobs(
        &self,
        model: &Qwen2,
        batch: &TrainBatch,
        inv_temperature: f32,
    ) -> Result<TokenLogprobs> {
        match self {
            Updater::Full(_) | Updater::Adapter(_) | Updater::Vision(_) => {
                model.logprobs(batch, inv_temperature)
            }
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => u.logprobs(batch, inv_temperature),
        }
    }

    /// The decode engine of the current weights: the CPU model itself, or the CUDA decoder
    /// reading the device parameters in place (no upload).
    pub fn decode_engine<'a>(&'a self, model: &'a Qwen2) -> Result<Box<dyn DecodeEngine + 'a>> {
        match self {
            Updater::Full(_) | Updater::Adapter(_) | Updater::Vision(_) => Ok(Box::new(model)),
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => Ok(Box::new(u.decoder(model)?)),
        }
    }

    /// Brings the host model's tensors up to date with the trained weights (a no-op on the
    /// CPU, where the step writes them in place): before a checkpoint or the final model.
    pub fn sync_host(&self, model: &mut Qwen2) -> Result<()> {
        match self {
            Updater::Full(_) | Updater::Adapter(_) | Updater::Vision(_) => {
                let _ = model;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => u.sync_host(model),
        }
    }

    /// Backward of one micro-batch, accumulated into the gradient buffers.
    pub fn backward_into(
        &mut self,
        model: &Qwen2,
        batch: &TrainBatch,
        cache: impl Into<StepCache>,
        g: &[f32],
    ) -> Result<()> {
        match (self, cache.into()) {
            (Updater::Full(u), StepCache::Cpu(cache)) => {
                model.backward_into(batch, cache, g, u.grads_mut())
            }
            (Updater::Adapter(u), StepCache::Cpu(cache)) => u.backward_into(model, batch, cache, g),
            (Updater::Vision(_), _) => {
                anyhow::bail!("internal: a text batch given to a vision-language updater")
            }
            #[cfg(feature = "cuda")]
            (Updater::Cuda(u), StepCache::Cuda(cache)) => u.backward(batch, *cache, g),
            #[cfg(feature = "cuda")]
            _ => anyhow::bail!("internal: a forward cache of another device than the updater's"),
        }
    }

    /// Clip, AdamW, write-back, clear the gradients (see the updaters; a vision-language
    /// updater writes through its own handles to the model's tensors, `model` being its decoder).
    pub fn step(&mut self, model: &mut Qwen2, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        match self {
            Updater::Full(u) => u.step(model, lr, max_norm),
            Updater::Adapter(u) => u.step(model, lr, max_norm),
            Updater::Vision(u) => u.step(lr, max_norm),
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => u.step(lr, max_norm),
        }
    }

    /// Every gradient buffer the step will apply (the model's parameters, or the adapter's A
    /// and B), in a fixed order: what a data-parallel run all-reduces. A GPU run's gradients
    /// live on the device and it runs on one rank (`TrainDevice::check_run` refuses more): it
    /// has no host buffer to reduce.
    pub fn gradient_buffers_mut(&mut self) -> Vec<&mut [f32]> {
        match self {
            Updater::Full(u) => {
                let mut slices: Vec<&mut [f32]> = Vec::new();
                u.grads_mut()
                    .visit_mut(|_, g| slices.push(g.as_mut_slice()));
                slices
            }
            Updater::Adapter(u) => u.gradient_buffers_mut(),
            Updater::Vision(u) => u.gradient_buffers_mut(),
            #[cfg(feature = "cuda")]
            Updater::Cuda(_) => Vec::new(),
        }
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        match self {
            Updater::Full(u) => u.zero_grad(),
            Updater::Adapter(u) => u.zero_grad(),
            Updater::Vision(u) => u.zero_grad(),
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => return u.zero_grad(),
        }
        Ok(())
    }

    /// Optimiser metadata and buffers for a checkpoint.
    pub fn checkpoint_state(&self, model: &Qwen2) -> Result<(OptimizerMeta, Buffers)> {
        match self {
            Updater::Full(u) => u.checkpoint_state(model),
            Updater::Adapter(u) => Ok(u.checkpoint_state()),
            Updater::Vision(u) => u.checkpoint_state(),
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => u.checkpoint_state(),
        }
    }

    /// Restores a full fine-tuning checkpoint's f32 master weights (a LoRA checkpoint has none:
    /// its adapter file is f32 already).
    pub fn restore_master(
        &mut self,
        model: &mut Qwen2,
        buffers: &mut HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        match self {
            Updater::Full(u) => u.restore_master(model, buffers),
            Updater::Adapter(_) => Ok(()),
            Updater::Vision(u) => u.restore_master(buffers),
            #[cfg(feature = "cuda")]
            Updater::Cuda(u) => u.restore_master(model, buffers),
        }
    }
}
