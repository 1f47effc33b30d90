//! Which leaves a run trains, their gradient buffers, and the one AdamW walk over them.
//!
//! The choice of trainable leaves ([`Trainable`]) replaces kinds of updaters: a full
//! fine-tune trains every decoder parameter; a LoRA run the adapter's A and B only (the base
//! frozen: no gradient buffer, no moments, no master copy, so the optimiser's memory is
//! 4 × the adapter's size); a vision-language run the decoder and, unless `freeze_vision`, the
//! tower. [`Gradients`] holds a buffer tree for each trained group, shaped as the parameters
//! it belongs to (`Qwen2Params<Vec<f32>>`, the adapter's `Qwen2Params<Option<LoraGrad>>`, the
//! tower's `VisionParams<Vec<f32>>`), which is what each backward adds into.
//!
//! The walk ([`Gradients::leaves`]) yields every trained leaf in a fixed order — decoder, then
//! adapter (A, then B, per module), then tower, each in its tree's order — with its checkpoint
//! name (HF names; a vision-language model's in the layout it was loaded in; PEFT keys for A
//! and B), the model's tensor (shared storage) and its gradient. The optimiser step, the
//! checkpoint's master buffers and their restoration all go through it:
//!
//! ```text
//! ‖g‖ = global norm over every buffer (one clip over decoder, adapter and tower)
//! for each leaf (name, W, g):  AdamW(name) on W's f32 master (bf16 leaves; then W ← bf16(master))
//!                              or on W in place (f32 leaves)
//! ```
//!
//! A bf16 leaf's f32 master is kept as its lower 16 bits beside W ([`SplitMaster`]: exactly
//! the f32 master, 2 bytes per parameter instead of 4).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::checkpoint::Buffers;
use crate::model::adapter_io::peft_key;
use crate::model::lora::{module_of, AdapterGrads};
use crate::model::ops::{update_in_place, WeightSliceMut};
use crate::model::vision::VisionGrads;
use crate::model::Grads;
use crate::optim::{clip_grad_norm, AdamW, ParamGrad, SplitMaster};

use super::super::policy::Policy;
use super::{StepOutcome, MASTER};

/// Which groups of leaves train (each `true` group has gradient buffers and optimiser state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trainable {
    /// Every decoder parameter (the base model).
    pub decoder: bool,
    /// The LoRA adapter's A and B.
    pub adapter: bool,
    /// The vision tower's parameters.
    pub tower: bool,
}

impl Trainable {
    /// What `model` trains: a text model with an adapter its adapter, one without every
    /// parameter; a vision-language model its decoder and, when `train_vision`, its tower.
    pub fn of(model: &Policy) -> Self {
        let adapter = model.text().adapter().is_some();
        Trainable {
            decoder: !adapter,
            adapter,
            tower: model.vision().is_some_and(|t| t.train),
        }
    }
}

/// The gradient buffers of the trained leaves, one tree per trained group.
pub struct Gradients {
    pub decoder: Option<Grads>,
    pub adapter: Option<AdapterGrads>,
    pub tower: Option<VisionGrads>,
}

/// One trained leaf as the walk yields it.
pub(super) struct Leaf<'g> {
    /// The checkpoint name (optimiser state and master buffers are keyed by it).
    pub name: String,
    /// The model's tensor (shared storage: writing it writes the model).
    pub tensor: Tensor,
    pub grad: &'g [f32],
}

impl Gradients {
    /// Zero buffers for the leaves `which` of `model`.
    pub fn zeros(model: &Policy, which: Trainable) -> Result<Self> {
        let text = model.text();
        let adapter = if which.adapter {
            let adapter = text
                .adapter()
                .context("internal: LoRA training needs a model with an adapter")?;
            Some(adapter.zero_grads()?)
        } else {
            None
        };
        let tower = if which.tower {
            let t = model
                .vision()
                .context("internal: a text model has no tower to train")?;
            Some(crate::model::vision::zero_grads(
                &t.visual,
                &t.config.vision,
            )?)
        } else {
            None
        };
        Ok(Gradients {
            decoder: which.decoder.then(|| text.zero_grads()).transpose()?,
            adapter,
            tower,
        })
    }

    /// Every buffer, in the walk's order: what clipping and a data-parallel all-reduce see.
    pub fn buffers_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out: Vec<&mut [f32]> = Vec::new();
        if let Some(g) = self.decoder.as_mut() {
            g.visit_mut(|_, g| out.push(g.as_mut_slice()));
        }
        if let Some(g) = self.adapter.as_mut() {
            g.visit_mut(|_, g| {
                if let Some(g) = g {
                    out.push(g.a.as_mut_slice());
                    out.push(g.b.as_mut_slice());
                }
            });
        }
        if let Some(g) = self.tower.as_mut() {
            out.extend(g.leaves_mut().into_iter().map(|g| g.as_mut_slice()));
        }
        out
    }

    pub fn zero(&mut self) {
        for g in self.buffers_mut() {
            g.par_iter_mut().for_each(|x| *x = 0.0);
        }
    }

    /// The trained leaves of `model` with their gradients, in the walk's order.
    pub(super) fn leaves(&self, model: &Policy) -> Result<Vec<Leaf<'_>>> {
        let mut out = Vec::new();
        if let Some(grads) = &self.decoder {
            let weights = model.text().weights.named();
            let grads = grads.named();
            ensure!(
                weights.len() == grads.len(),
                "internal: the model and gradient trees differ"
            );
            for ((name, tensor), (_, grad)) in weights.into_iter().zip(grads) {
                out.push(Leaf {
                    name: model.text_name(name),
                    tensor: tensor.clone(),
                    grad,
                });
            }
        }
        if let Some(grads) = &self.adapter {
            let adapter = model
                .text()
                .adapter()
                .context("internal: the model lost its adapter")?;
            for ((leaf, pair), (_, grad)) in adapter.pairs.named().into_iter().zip(grads.named()) {
                let (Some(pair), Some(grad)) = (pair, grad) else {
                    continue;
                };
                let module = module_of(&leaf);
                for (which, tensor, grad) in
                    [("lora_A", &pair.a, &grad.a), ("lora_B", &pair.b, &grad.b)]
                {
                    out.push(Leaf {
                        name: peft_key(module, which),
                        tensor: tensor.clone(),
                        grad,
                    });
                }
            }
        }
        if let Some(grads) = &self.tower {
            let v = model
                .vision()
                .context("internal: tower gradients for a text model")?;
            let weights = v.visual.named();
            let grads = grads.named();
            ensure!(
                weights.len() == grads.len(),
                "internal: the tower and its gradient trees differ"
            );
            for ((name, tensor), (_, grad)) in weights.into_iter().zip(grads) {
                out.push(Leaf {
                    name: v.config.vision_name(&name),
                    tensor: tensor.clone(),
                    grad,
                });
            }
        }
        Ok(out)
    }
}

/// The f32 master of every trained leaf the model holds in bf16, as its value widened (`None`:
/// the f32 tensor is its own master, updated in place), in the walk's order.
pub(super) fn masters_of(leaves: &[Leaf<'_>]) -> Result<Vec<Option<SplitMaster>>> {
    Ok(leaves
        .iter()
        .map(|l| {
            (l.tensor.dtype() != DType::F32).then(|| SplitMaster::widened(l.tensor.elem_count()))
        })
        .collect())
}

fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The f32 values of a bf16 leaf's master.
fn master_values(t: &Tensor, master: &SplitMaster) -> Result<Vec<f32>> {
    let w = t.flatten_all()?.to_vec1::<half::bf16>()?;
    master.values(&w)
}

/// Clips the gradients to `max_norm`, applies AdamW at `lr` to every trained leaf (through its
/// master, or in place) and clears the gradients; a non-finite norm skips the update.
pub(super) fn adamw_step(
    model: &Policy,
    grads: &mut Gradients,
    masters: &mut [Option<SplitMaster>],
    optimizer: &mut AdamW,
    lr: f32,
    max_norm: f32,
) -> Result<StepOutcome> {
    let clip = clip_grad_norm(&mut grads.buffers_mut(), max_norm);
    if !clip.finite {
        grads.zero();
        return Ok(StepOutcome::Skipped(clip));
    }
    let leaves = grads.leaves(model)?;
    ensure!(
        leaves.len() == masters.len(),
        "internal: {} trained leaves, {} master slots",
        leaves.len(),
        masters.len()
    );
    for (leaf, master) in leaves.iter().zip(masters.iter_mut()) {
        apply_adamw(optimizer, lr, leaf, master.as_mut())?;
    }
    grads.zero();
    Ok(StepOutcome::Applied(clip))
}

/// One AdamW update of a leaf from its gradient: through its f32 master copy, then rounded
/// into the tensor (bf16 leaves), or in place (f32 leaves).
fn apply_adamw(
    optimizer: &mut AdamW,
    lr: f32,
    leaf: &Leaf<'_>,
    master: Option<&mut SplitMaster>,
) -> Result<()> {
    let name = leaf.name.as_str();
    let grad = leaf.grad;
    match master {
        Some(master) => update_in_place(&leaf.tensor, |slot| match slot {
            WeightSliceMut::Bf16(w) => master.adamw(optimizer, lr, name, true, w, grad),
            WeightSliceMut::F32(_) => bail!("internal: f32 parameter {name} has a bf16 master"),
        })
        .with_context(|| format!("updating {name}")),
        None => update_in_place(&leaf.tensor, |slot| match slot {
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
                bail!("internal: bf16 parameter {name} has no master copy")
            }
        })
        .with_context(|| format!("updating {name}")),
    }
}

/// `master.<name>` buffers of a checkpoint, in the given order.
pub fn master_buffers(masters: impl IntoIterator<Item = (String, Vec<f32>)>) -> Buffers {
    masters
        .into_iter()
        .map(|(name, values)| (format!("{MASTER}.{name}"), vec![values.len()], values))
        .collect()
}

/// The master buffers of a checkpoint of a model with bf16 leaves: the f32 value of every
/// trained leaf (its master, or the f32 tensor itself), so that resuming from the bf16 files
/// continues exactly. None when every trained leaf is f32.
pub(super) fn checkpoint_masters(
    leaves: &[Leaf<'_>],
    masters: &[Option<SplitMaster>],
) -> Result<Buffers> {
    if masters.iter().all(Option::is_none) {
        return Ok(Vec::new());
    }
    let values = leaves
        .iter()
        .zip(masters)
        .map(|(l, m)| {
            let v = match m {
                Some(m) => master_values(&l.tensor, m)?,
                None => f32_values(&l.tensor)?,
            };
            Ok((l.name.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(master_buffers(values))
}

/// Restores the `master.<name>` buffers of the trained leaves (taken out of `buffers`) into
/// their masters and the model's tensors; leaves without a buffer are left as they are.
pub(super) fn restore_masters(
    leaves: &[Leaf<'_>],
    masters: &mut [Option<SplitMaster>],
    buffers: &mut HashMap<String, Vec<f32>>,
) -> Result<()> {
    for (leaf, master) in leaves.iter().zip(masters.iter_mut()) {
        let Some(values) = buffers.remove(&format!("{MASTER}.{}", leaf.name)) else {
            continue;
        };
        ensure!(
            values.len() == leaf.tensor.elem_count(),
            "checkpoint buffer {MASTER}.{} has {} values; the parameter has {}",
            leaf.name,
            values.len(),
            leaf.tensor.elem_count()
        );
        match master {
            Some(m) => update_in_place(&leaf.tensor, |slot| match slot {
                WeightSliceMut::Bf16(w) => m.set(&values, w),
                WeightSliceMut::F32(_) => {
                    bail!("internal: f32 parameter {} has a bf16 master", leaf.name)
                }
            })?,
            None => write_rounded(&leaf.tensor, &values)?,
        }
    }
    Ok(())
}

/// Writes `values` (f32) into `tensor`'s storage in place, rounding to bf16 when the tensor is
/// bf16 (round to nearest even).
fn write_rounded(tensor: &Tensor, values: &[f32]) -> Result<()> {
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
