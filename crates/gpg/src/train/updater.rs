//! The optimiser side of a training step, for either kind of run: full fine-tuning
//! ([`ModelUpdater`]: every parameter) or LoRA ([`AdapterUpdater`]: A and B only, the base
//! frozen). The kind follows the model: one with an adapter trains the adapter. A
//! vision-language policy has its own ([`VlUpdater`], built by `Policy::updater`).

use std::collections::HashMap;

use anyhow::Result;

use crate::checkpoint::Buffers;
use crate::model::{ForwardCache, Qwen2, TrainBatch};
use crate::optim::AdamW;

use super::lora_update::AdapterUpdater;
use super::update::{ModelUpdater, OptimizerMeta, StepOutcome};
use super::vl_update::VlUpdater;

pub enum Updater {
    Full(ModelUpdater),
    Adapter(AdapterUpdater),
    /// A vision-language model: decoder and (unless frozen) tower.
    Vision(VlUpdater),
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

    /// Backward of one micro-batch, accumulated into the gradient buffers.
    pub fn backward_into(
        &mut self,
        model: &Qwen2,
        batch: &TrainBatch,
        cache: ForwardCache,
        g: &[f32],
    ) -> Result<()> {
        match self {
            Updater::Full(u) => model.backward_into(batch, cache, g, u.grads_mut()),
            Updater::Adapter(u) => u.backward_into(model, batch, cache, g),
            Updater::Vision(_) => {
                anyhow::bail!("internal: a text batch given to a vision-language updater")
            }
        }
    }

    /// Clip, AdamW, write-back, clear the gradients (see the updaters; a vision-language
    /// updater writes through its own handles to the model's tensors, `model` being its decoder).
    pub fn step(&mut self, model: &mut Qwen2, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        match self {
            Updater::Full(u) => u.step(model, lr, max_norm),
            Updater::Adapter(u) => u.step(model, lr, max_norm),
            Updater::Vision(u) => u.step(lr, max_norm),
        }
    }

    /// Every gradient buffer the step will apply (the model's parameters, or the adapter's A
    /// and B), in a fixed order: what a data-parallel run all-reduces.
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
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            Updater::Full(u) => u.zero_grad(),
            Updater::Adapter(u) => u.zero_grad(),
            Updater::Vision(u) => u.zero_grad(),
        }
    }

    /// Optimiser metadata and buffers for a checkpoint.
    pub fn checkpoint_state(&self, model: &Qwen2) -> Result<(OptimizerMeta, Buffers)> {
        match self {
            Updater::Full(u) => u.checkpoint_state(model),
            Updater::Adapter(u) => Ok(u.checkpoint_state()),
            Updater::Vision(u) => u.checkpoint_state(),
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
        }
    }
}
