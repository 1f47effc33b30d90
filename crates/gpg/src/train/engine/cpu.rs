//! The training engine on the CPU: the model's own passes (`Qwen2`'s forward, fused
//! forward-backward and backward; a vision-language model's with its tower), gradients in
//! host buffers shaped as the trained parameters, and the AdamW walk of `leaves.rs` writing
//! the new values into the model's tensors in place.

use std::collections::HashMap;

use anyhow::Result;

use crate::checkpoint::Buffers;
use crate::model::decoding::DecodeEngine;
use crate::model::qwen2_vl::VlForwardCache;
use crate::model::{Activations, Qwen2, TokenLogprobs};
use crate::optim::{AdamW, SplitMaster};

use super::super::policy::{Policy, PolicyBatch};
use super::leaves::{adamw_step, checkpoint_masters, masters_of, restore_masters};
use super::{
    optimizer_checkpoint, Gradients, OptimizerMeta, StepCache, StepOutcome, TrainEngine, Trainable,
};

/// Gradients, master weights and the optimiser of the trained leaves, on the CPU.
pub struct CpuEngine {
    grads: Gradients,
    /// The f32 master of each trained bf16 leaf (its lower halves), in the walk's order.
    masters: Vec<Option<SplitMaster>>,
    optimizer: AdamW,
}

impl CpuEngine {
    /// The engine training `model`'s leaves chosen by [`Trainable::of`].
    pub fn new(model: &Policy, optimizer: AdamW) -> Result<Self> {
        Self::with_trainable(model, Trainable::of(model), optimizer)
    }

    /// The engine training the leaves `which` of `model` (a base model and its adapter do not
    /// train together: the adapter's backward forms no base gradient).
    pub fn with_trainable(model: &Policy, which: Trainable, optimizer: AdamW) -> Result<Self> {
        anyhow::ensure!(
            !(which.decoder && which.adapter),
            "internal: the decoder's parameters and its LoRA adapter cannot train together"
        );
        let grads = Gradients::zeros(model, which)?;
        let masters = masters_of(&grads.leaves(model)?)?;
        Ok(CpuEngine {
            grads,
            masters,
            optimizer,
        })
    }

    /// The gradient buffers (tests, benchmarks: a backward called directly).
    pub fn gradients_mut(&mut self) -> &mut Gradients {
        &mut self.grads
    }

    /// Every trained leaf's checkpoint name with its accumulated gradient, in the walk's order.
    pub fn named_gradients(&self, model: &Policy) -> Result<Vec<(String, Vec<f32>)>> {
        Ok(self
            .grads
            .leaves(model)?
            .into_iter()
            .map(|l| (l.name, l.grad.to_vec()))
            .collect())
    }

    /// Per-parameter AdamW step counts (tests: a frozen tower has none).
    pub fn optimizer_steps(&self) -> std::collections::BTreeMap<String, u64> {
        optimizer_checkpoint(self.optimizer.state()).0.steps
    }
}

impl TrainEngine for CpuEngine {
    fn forward(
        &self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
        keep: Activations,
    ) -> Result<(TokenLogprobs, StepCache)> {
        let train_tower = self.grads.tower.is_some();
        let (lp, cache) = model.forward_on_host(batch, inv_temperature, keep, train_tower)?;
        Ok((lp, StepCache::new(cache)))
    }

    fn fuses_forward_backward(&self, model: &Policy) -> bool {
        model.fuses_forward_backward()
    }

    fn forward_backward_into(
        &mut self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
    ) -> Result<TokenLogprobs> {
        let grads = &mut self.grads;
        model.forward_backward_on_host(
            batch,
            inv_temperature,
            keep,
            g,
            grads.decoder.as_mut(),
            grads.adapter.as_mut(),
        )
    }

    fn backward_into(
        &mut self,
        model: &Policy,
        batch: &PolicyBatch,
        cache: StepCache,
        g: &[f32],
    ) -> Result<()> {
        let grads = &mut self.grads;
        model.backward_on_host(
            batch,
            cache.take::<VlForwardCache>()?,
            g,
            grads.decoder.as_mut(),
            grads.adapter.as_mut(),
            grads.tower.as_mut(),
        )
    }

    fn logprobs(
        &self,
        model: &Policy,
        batch: &PolicyBatch,
        inv_temperature: f32,
    ) -> Result<TokenLogprobs> {
        model.logprobs_on_host(batch, inv_temperature)
    }

    fn decode_engine<'a>(&'a self, model: &'a Qwen2) -> Result<Box<dyn DecodeEngine + 'a>> {
        Ok(Box::new(model))
    }

    fn sync_host(&self, _model: &mut Policy) -> Result<()> {
        Ok(())
    }

    fn gradient_buffers_mut(&mut self) -> Vec<&mut [f32]> {
        self.grads.buffers_mut()
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grads.zero();
        Ok(())
    }

    fn step(&mut self, model: &Policy, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        adamw_step(
            model,
            &mut self.grads,
            &mut self.masters,
            &mut self.optimizer,
            lr,
            max_norm,
        )
    }

    fn checkpoint_state(&self, model: &Policy) -> Result<(OptimizerMeta, Buffers)> {
        let (meta, mut buffers) = optimizer_checkpoint(self.optimizer.state());
        buffers.extend(checkpoint_masters(
            &self.grads.leaves(model)?,
            &self.masters,
        )?);
        Ok((meta, buffers))
    }

    fn restore_master(
        &mut self,
        model: &mut Policy,
        buffers: &mut HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        restore_masters(&self.grads.leaves(model)?, &mut self.masters, buffers)
    }
}
