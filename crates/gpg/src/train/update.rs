//! The optimiser side of a training step, shared by RL and SFT: an f32 master copy of every
//! parameter, gradient accumulation over micro-batches, global-norm clipping, AdamW, and the
//! write-back into the model's tensors. Also how its state goes into a checkpoint.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Buffers;
use crate::model::{Gradients, Qwen2};
use crate::optim::{
    clip_grad_norm, AdamW, AdamWConfig, AdamWState, GradClip, ParamGrad, ParamState,
};

/// Parameters, their accumulated gradients and the optimiser.
pub struct ModelUpdater {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
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

impl ModelUpdater {
    pub fn new(model: &Qwen2, optimizer: AdamW) -> Result<Self> {
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut params = Vec::new();
        for (name, t) in model.parameters() {
            names.push(name);
            shapes.push(t.dims().to_vec());
            params.push(t.flatten_all()?.to_vec1::<f32>()?);
        }
        let grads = params.iter().map(|p| vec![0.0; p.len()]).collect();
        Ok(Self {
            names,
            shapes,
            params,
            grads,
            optimizer,
        })
    }

    /// Adds one micro-batch's gradients to the accumulated ones.
    pub fn accumulate(&mut self, grads: &Gradients) -> Result<()> {
        for (acc, t) in self.grads.iter_mut().zip(&grads.tensors) {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            acc.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// Clips the accumulated gradients to `max_norm`, applies AdamW at `lr`, writes the new
    /// weights into `model` and clears the gradients. A non-finite norm skips the update.
    pub fn step(&mut self, model: &mut Qwen2, lr: f32, max_norm: f32) -> Result<StepOutcome> {
        let mut refs: Vec<&mut [f32]> = self.grads.iter_mut().map(|g| g.as_mut_slice()).collect();
        let clip = clip_grad_norm(&mut refs, max_norm);
        if !clip.finite {
            self.zero_grad();
            return Ok(StepOutcome::Skipped(clip));
        }
        for ((name, param), grad) in self
            .names
            .iter()
            .zip(self.params.iter_mut())
            .zip(&self.grads)
        {
            self.optimizer.update(
                lr,
                ParamGrad {
                    name,
                    param,
                    grad,
                    weight_decay: true,
                },
            )?;
        }
        let device = model.device().clone();
        for ((slot, data), shape) in model
            .parameters_mut()
            .into_iter()
            .zip(&self.params)
            .zip(&self.shapes)
        {
            *slot = Tensor::from_slice(data, shape.as_slice(), &device)?;
        }
        self.zero_grad();
        Ok(StepOutcome::Applied(clip))
    }

    pub fn zero_grad(&mut self) {
        self.grads
            .iter_mut()
            .for_each(|g| g.iter_mut().for_each(|x| *x = 0.0));
    }

    /// The optimiser's state for a checkpoint: metadata and the moment buffers.
    pub fn checkpoint_state(&self) -> (OptimizerMeta, Buffers) {
        let state = self.optimizer.state();
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
