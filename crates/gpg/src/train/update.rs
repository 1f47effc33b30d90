//! The optimiser side of a training step, shared by RL and SFT: the gradient accumulator,
//! global-norm clipping, AdamW on f32 master weights, and the in-place write-back into the
//! model's tensors. Also how its state goes into a checkpoint.
//!
//! Memory, per parameter: the model's own tensor (f32 or bf16), one f32 gradient, AdamW's two
//! f32 moments, and, only for leaves the model keeps in bf16, an f32 master copy. An f32
//! model's tensors are their own master: AdamW updates them in place.

use std::collections::{BTreeMap, HashMap};

use anyhow::{ensure, Context, Result};
use candle_core::DType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Buffers;
use crate::model::ops::{update_in_place, WeightSliceMut};
use crate::model::params::Qwen2Params;
use crate::model::{Grads, Qwen2};
use crate::optim::{
    clip_grad_norm, AdamW, AdamWConfig, AdamWState, GradClip, ParamGrad, ParamState,
};

/// Gradients, master weights and the optimiser of one model.
pub struct ModelUpdater {
    grads: Grads,
    /// The f32 master copy of every leaf the model holds in bf16 (`None`: the model's f32
    /// tensor is updated in place).
    master: Qwen2Params<Option<Vec<f32>>>,
    optimizer: AdamW,
}

/// What a checkpoint keeps of the optimiser besides the moment buffers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OptimizerMeta {
    pub config: AdamWConfig,
    /// Per-parameter AdamW step counts.
    pub steps: BTreeMap<String, u64>,
}

/// Outcome of [`ModelUpdater::step`].
pub enum StepOutcome {
    Applied(GradClip),
    /// The gradient norm was not finite: parameters are unchanged.
    Skipped(GradClip),
}

/// Prefix of the checkpoint buffers holding f32 master weights (bf16 models).
pub const MASTER: &str = "master";

impl ModelUpdater {
    pub fn new(model: &Qwen2, optimizer: AdamW) -> Result<Self> {
        let grads = model.zero_grads()?;
        let master = model.weights.try_map(|_, t| {
            Ok(if t.dtype() == DType::F32 {
                None
            } else {
                Some(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            })
        })?;
        Ok(Self {
            grads,
            master,
            optimizer,
        })
    }

    /// The gradient accumulator, for [`Qwen2::backward_into`].
    pub fn grads_mut(&mut self) -> &mut Grads {
        &mut self.grads
    }

    /// Adds one micro-batch's gradients (matched by parameter name) to the accumulated ones.
    pub fn accumulate(&mut self, grads: &Grads) -> Result<()> {
        self.grads.zip_mut(grads, |_, acc, g| {
            ensure!(acc.len() == g.len(), "gradient sizes differ");
            acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
            Ok(())
        })
    }

    /// Clips the accumulated gradients to `max_norm`, applies AdamW at `lr`, writes the new
    /// weights into `model`'s tensors in place and clears the gradients. A non-finite norm
    /// skips the update.
    pub fn step(&mut self, model: &mut Qwen2, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        let clip = {
            let mut refs: Vec<&mut [f32]> = Vec::new();
            self.grads.visit_mut(|_, g| refs.push(g.as_mut_slice()));
            clip_grad_norm(&mut refs, max_norm)
        };
        if !clip.finite {
            self.zero_grad();
            return Ok(StepOutcome::Skipped(clip));
        }
        let weights = model.weights.named();
        let grads = self.grads.named();
        let masters = self.master.named_mut();
        ensure!(
            weights.len() == grads.len() && grads.len() == masters.len(),
            "internal: the model, gradient and master trees differ"
        );
        let optimizer = &mut self.optimizer;
        for (((name, tensor), (_, grad)), (_, master)) in
            weights.into_iter().zip(grads).zip(masters)
        {
            apply_adamw(optimizer, lr, &name, tensor, master.as_mut(), grad)?;
        }
        self.zero_grad();
        Ok(StepOutcome::Applied(clip))
    }

    pub fn zero_grad(&mut self) {
        self.grads
            .visit_mut(|_, g| g.par_iter_mut().for_each(|x| *x = 0.0));
    }

    /// Restores what a checkpoint of a bf16 model keeps beside its bf16 files: the f32 master
    /// weights (and the f32 values of the leaves the model holds in f32, which the bf16 file
    /// rounded). Writes them into `model` and this updater. A no-op for checkpoints without
    /// master buffers (f32 models).
    pub fn restore_master(
        &mut self,
        model: &mut Qwen2,
        buffers: &mut HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        let weights = model.weights.named();
        let masters = self.master.named_mut();
        for ((name, tensor), (_, master)) in weights.into_iter().zip(masters) {
            let Some(values) = buffers.remove(&format!("{MASTER}.{name}")) else {
                continue;
            };
            ensure!(
                values.len() == tensor.elem_count(),
                "checkpoint buffer {MASTER}.{name} has {} values; the parameter has {}",
                values.len(),
                tensor.elem_count()
            );
            match master {
                Some(m) => {
                    *m = values;
                    write_rounded(tensor, m)?;
                }
                None => write_rounded(tensor, &values)?,
            }
        }
        Ok(())
    }

    /// The optimiser's state for a checkpoint: metadata, the moment buffers and, for a model
    /// with bf16 leaves, the f32 value of every leaf (`master.<name>`), so that resuming from
    /// the checkpoint's bf16 files continues exactly.
    pub fn checkpoint_state(&self, model: &Qwen2) -> Result<(OptimizerMeta, Buffers)> {
        let (meta, mut buffers) = optimizer_checkpoint(&self.optimizer);
        let any_master = {
            let mut any = false;
            self.master.visit(|_, m| any |= m.is_some());
            any
        };
        if any_master {
            let weights = model.weights.named();
            for ((name, tensor), (_, master)) in weights.into_iter().zip(self.master.named()) {
                let values = match master {
                    Some(m) => m.clone(),
                    None => tensor
                        .flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?,
                };
                buffers.push((format!("{MASTER}.{name}"), vec![values.len()], values));
            }
        }
        Ok((meta, buffers))
    }

    /// Rebuilds the optimiser from a checkpoint's metadata and buffers.
    pub fn restore_optimizer(
        meta: OptimizerMeta,
        buffers: &mut std::collections::HashMap<String, Vec<f32>>,
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
}

/// One AdamW update of the model tensor `name` from its gradient: through its f32 master copy,
/// then rounded into the tensor (bf16 leaves), or in place (f32 leaves).
pub(super) fn apply_adamw(
    optimizer: &mut AdamW,
    lr: f32,
    name: &str,
    tensor: &candle_core::Tensor,
    master: Option<&mut Vec<f32>>,
    grad: &[f32],
) -> Result<()> {
    match master {
        Some(master) => {
            optimizer.update(
                lr,
                ParamGrad {
                    name,
                    param: master,
                    grad,
                    weight_decay: true,
                },
            )?;
            write_rounded(tensor, master)
        }
        None => update_in_place(tensor, |slot| match slot {
            WeightSliceMut::F32(param) => optimizer.update(
                lr,
                ParamGrad {
                    name,
                    param,
                    grad,
                    weight_decay: true,
                },
            ),
            WeightSliceMut::Bf16(_) => {
                anyhow::bail!("internal: bf16 parameter {name} has no master copy")
            }
        })
        .with_context(|| format!("updating {name}")),
    }
}

/// The optimiser's metadata and moment buffers (`exp_avg.<name>`, `exp_avg_sq.<name>`) for a
/// checkpoint.
pub fn optimizer_checkpoint(optimizer: &AdamW) -> (OptimizerMeta, Buffers) {
    let state = optimizer.state();
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

/// Writes `values` (f32) into `tensor`'s storage in place, rounding to bf16 when the tensor is
/// bf16 (round to nearest even).
pub(super) fn write_rounded(tensor: &candle_core::Tensor, values: &[f32]) -> Result<()> {
    update_in_place(tensor, |slot| {
        match slot {
            WeightSliceMut::F32(dst) => {
                ensure!(
                    dst.len() == values.len(),
                    "internal: write-back size differs"
                );
                dst.copy_from_slice(values)
            }
            WeightSliceMut::Bf16(dst) => {
                ensure!(
                    dst.len() == values.len(),
                    "internal: write-back size differs"
                );
                dst.par_chunks_mut(1 << 16)
                    .zip(values.par_chunks(1 << 16))
                    .for_each(|(d, v)| crate::model::ops::cpu::bf16::f32_to_bf16(v, d));
            }
        }
        Ok(())
    })
}
