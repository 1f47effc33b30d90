//! The optimiser side of a training step for a vision-language policy ([`Qwen2VL`]): the same
//! gradient accumulator, global-norm clipping, AdamW on f32 master weights and in-place
//! write-back as [`super::update::ModelUpdater`], over the decoder's parameters and, unless
//! the tower is frozen, the vision tower's.
//!
//! Invariants:
//! * one global norm ‖g‖ over every trained parameter (decoder and tower together), as
//!   `torch.nn.utils.clip_grad_norm_` over the model's parameters computes it;
//! * with `freeze_vision` the tower has no gradient buffer, no AdamW moments and no master
//!   copy, and its weights are never written;
//! * parameters are keyed by their checkpoint names (`model.layers.0.…`, `visual.blocks.0.…`
//!   in the layout the model was loaded in), so a checkpoint's optimiser state names what it
//!   belongs to.
//!
//! The updater holds handles to the model's tensors: a candle tensor is reference-counted
//! storage, so the in-place write-back reaches the model (and only parameters of that model).

use std::collections::{BTreeMap, HashMap};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::checkpoint::Buffers;
use crate::model::{Qwen2VL, VlGrads};
use crate::optim::{clip_grad_norm, AdamW};

use super::update::{apply_adamw, optimizer_checkpoint, write_rounded, OptimizerMeta, StepOutcome};

/// Prefix of the checkpoint buffers holding f32 master weights (bf16 models), as for text.
const MASTER: &str = "master";

/// One trained parameter: its checkpoint name, the model's tensor (shared storage) and, for a
/// leaf the model holds in bf16, its f32 master copy.
struct Param {
    name: String,
    tensor: Tensor,
    master: Option<Vec<f32>>,
}

/// Gradients, master weights and the optimiser of a vision-language model.
pub struct VlUpdater {
    grads: VlGrads,
    /// In [`Qwen2VL::named_grads`] order (decoder, then the tower when trained).
    params: Vec<Param>,
    optimizer: AdamW,
}

impl VlUpdater {
    /// The tower is trained unless `freeze_vision`.
    pub fn new(model: &Qwen2VL, optimizer: AdamW, freeze_vision: bool) -> Result<Self> {
        let grads = model.zero_grads(freeze_vision)?;
        let mut by_name: HashMap<String, Tensor> = model.parameters()?.into_iter().collect();
        let mut params = Vec::new();
        for (name, g) in model.named_grads(&grads) {
            let tensor = by_name
                .remove(&name)
                .with_context(|| format!("internal: no parameter for the gradient {name}"))?;
            ensure!(
                tensor.elem_count() == g.len(),
                "internal: {name} has {} values, its gradient {}",
                tensor.elem_count(),
                g.len()
            );
            let master = if tensor.dtype() == DType::F32 {
                None
            } else {
                Some(
                    tensor
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?,
                )
            };
            params.push(Param {
                name,
                tensor,
                master,
            });
        }
        Ok(Self {
            grads,
            params,
            optimizer,
        })
    }

    /// The gradient accumulator, for [`Qwen2VL::backward_into`].
    pub fn grads_mut(&mut self) -> &mut VlGrads {
        &mut self.grads
    }

    /// Every gradient buffer, in the parameters' order.
    pub fn gradient_buffers_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out: Vec<&mut [f32]> = Vec::new();
        self.grads.text.visit_mut(|_, g| out.push(g.as_mut_slice()));
        if let Some(v) = self.grads.visual.as_mut() {
            out.extend(v.leaves_mut().into_iter().map(|g| g.as_mut_slice()));
        }
        out
    }

    /// Clips the accumulated gradients to `max_norm` (one norm over decoder and tower), applies
    /// AdamW at `lr`, writes the new weights into the model's tensors in place and clears the
    /// gradients. A non-finite norm skips the update.
    pub fn step(&mut self, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        let clip = clip_grad_norm(&mut self.gradient_buffers_mut(), max_norm);
        if !clip.finite {
            self.zero_grad();
            return Ok(StepOutcome::Skipped(clip));
        }
        let mut grads: Vec<&[f32]> = Vec::with_capacity(self.params.len());
        grads.extend(
            self.grads
                .text
                .named()
                .into_iter()
                .map(|(_, g)| g.as_slice()),
        );
        if let Some(v) = &self.grads.visual {
            grads.extend(v.named().into_iter().map(|(_, g)| g.as_slice()));
        }
        ensure!(
            grads.len() == self.params.len(),
            "internal: {} gradients for {} parameters",
            grads.len(),
            self.params.len()
        );
        let optimizer = &mut self.optimizer;
        for (p, grad) in self.params.iter_mut().zip(grads) {
            apply_adamw(optimizer, lr, &p.name, &p.tensor, p.master.as_mut(), grad)?;
        }
        self.zero_grad();
        Ok(StepOutcome::Applied(clip))
    }

    pub fn zero_grad(&mut self) {
        for g in self.gradient_buffers_mut() {
            g.par_iter_mut().for_each(|x| *x = 0.0);
        }
    }

    /// The optimiser's state for a checkpoint: metadata, moments and, for a model with bf16
    /// leaves, the f32 value of every trained leaf (`master.<name>`).
    pub fn checkpoint_state(&self) -> Result<(OptimizerMeta, Buffers)> {
        let (meta, mut buffers) = optimizer_checkpoint(&self.optimizer);
        if self.params.iter().any(|p| p.master.is_some()) {
            for p in &self.params {
                let values = match &p.master {
                    Some(m) => m.clone(),
                    None => p
                        .tensor
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?,
                };
                buffers.push((format!("{MASTER}.{}", p.name), vec![values.len()], values));
            }
        }
        Ok((meta, buffers))
    }

    /// Restores a bf16 model's f32 master weights from a checkpoint's buffers (a no-op for f32
    /// models, whose checkpoint files are exact).
    pub fn restore_master(&mut self, buffers: &mut HashMap<String, Vec<f32>>) -> Result<()> {
        for p in &mut self.params {
            let Some(values) = buffers.remove(&format!("{MASTER}.{}", p.name)) else {
                continue;
            };
            ensure!(
                values.len() == p.tensor.elem_count(),
                "checkpoint buffer {MASTER}.{} has {} values; the parameter has {}",
                p.name,
                values.len(),
                p.tensor.elem_count()
            );
            match &mut p.master {
                Some(m) => {
                    *m = values;
                    write_rounded(&p.tensor, m)?;
                }
                None => write_rounded(&p.tensor, &values)?,
            }
        }
        Ok(())
    }

    /// Per-parameter AdamW step counts (tests: a frozen tower has none).
    pub fn optimizer_steps(&self) -> BTreeMap<String, u64> {
        optimizer_checkpoint(&self.optimizer).0.steps
    }
}
