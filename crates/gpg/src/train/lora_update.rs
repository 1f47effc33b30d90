//! The optimiser side of a LoRA training step: gradient buffers for A and B only, global-norm
//! clipping over them, and AdamW on them in place. The base model is frozen: it has no
//! gradient buffer, no moments and no master copy, so the optimiser's memory is
//! 4 × (adapter size) floats instead of 4 × (model size).

use anyhow::{Context, Result};

use crate::checkpoint::Buffers;
use crate::model::adapter_io::peft_key;
use crate::model::lora::{module_of, AdapterGrads};
use crate::model::ops::{update_in_place, WeightSliceMut};
use crate::model::{Activations, ForwardCache, Qwen2, TokenLogprobs, TrainBatch};
use crate::optim::{clip_grad_norm, AdamW, ParamGrad};

use super::update::{optimizer_checkpoint, OptimizerMeta, StepOutcome};

/// Gradients and optimiser of a model's LoRA adapter.
pub struct AdapterUpdater {
    grads: AdapterGrads,
    optimizer: AdamW,
}

impl AdapterUpdater {
    /// Errors when `model` has no adapter.
    pub fn new(model: &Qwen2, optimizer: AdamW) -> Result<Self> {
        let adapter = model
            .adapter()
            .context("internal: LoRA training needs a model with an adapter")?;
        Ok(Self {
            grads: adapter.zero_grads()?,
            optimizer,
        })
    }

    /// Backward of one micro-batch into the adapter's gradient buffers.
    pub fn backward_into(
        &mut self,
        model: &Qwen2,
        batch: &TrainBatch,
        cache: ForwardCache,
        g: &[f32],
    ) -> Result<()> {
        model.backward_adapter_into(batch, cache, g, &mut self.grads)
    }

    /// Forward and backward in one call for token weights known before the forward
    /// ([`Qwen2::forward_backward_adapter_into`]).
    pub fn forward_backward_into(
        &mut self,
        model: &Qwen2,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
    ) -> Result<TokenLogprobs> {
        model.forward_backward_adapter_into(batch, inv_temperature, keep, g, &mut self.grads)
    }

    /// Every gradient buffer (A then B of each module, in tree order), e.g. for an all-reduce.
    pub fn gradient_buffers_mut(&mut self) -> Vec<&mut [f32]> {
        let mut refs: Vec<&mut [f32]> = Vec::new();
        self.grads.visit_mut(|_, g| {
            if let Some(g) = g {
                refs.push(g.a.as_mut_slice());
                refs.push(g.b.as_mut_slice());
            }
        });
        refs
    }

    /// Clips the accumulated gradients to `max_norm`, applies AdamW at `lr` to every A and B
    /// (in place in the model's adapter) and clears the gradients. A non-finite norm skips the
    /// update.
    pub fn step(&mut self, model: &mut Qwen2, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        let clip = clip_grad_norm(&mut self.gradient_buffers_mut(), max_norm);
        if !clip.finite {
            self.zero_grad();
            return Ok(StepOutcome::Skipped(clip));
        }
        let adapter = model
            .adapter()
            .context("internal: the model lost its adapter")?;
        let grads = self.grads.named();
        let pairs = adapter.pairs.named();
        let optimizer = &mut self.optimizer;
        for ((leaf, pair), (_, grad)) in pairs.into_iter().zip(grads) {
            let (Some(pair), Some(grad)) = (pair, grad) else {
                continue;
            };
            let module = module_of(&leaf);
            for (which, tensor, grad) in
                [("lora_A", &pair.a, &grad.a), ("lora_B", &pair.b, &grad.b)]
            {
                let name = peft_key(module, which);
                update_in_place(tensor, |slot| match slot {
                    WeightSliceMut::F32(param) => optimizer.update(
                        lr,
                        ParamGrad {
                            name: &name,
                            param,
                            grad,
                            weight_decay: true,
                        },
                    ),
                    WeightSliceMut::Bf16(_) => anyhow::bail!("internal: {name} is not f32"),
                })
                .with_context(|| format!("updating {name}"))?;
            }
        }
        self.zero_grad();
        Ok(StepOutcome::Applied(clip))
    }

    pub fn zero_grad(&mut self) {
        for g in self.gradient_buffers_mut() {
            g.fill(0.0);
        }
    }

    /// The optimiser's state for a checkpoint (the adapter itself is saved in PEFT format).
    pub fn checkpoint_state(&self) -> (OptimizerMeta, Buffers) {
        optimizer_checkpoint(&self.optimizer)
    }
}
