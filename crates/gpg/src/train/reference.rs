//! The frozen KL reference model (objectives with a KL penalty, β > 0): always the run's
//! starting model, also when resuming. Its per-token log-probs are computed where the run
//! trains: on the CPU by the host model (with LoRA: the base with the adapter disabled, sharing
//! the base weights), or on the GPU by a forward-only copy of the weights
//! (`CudaTrainStep::frozen`: the model's dtype, no gradients, moments or f32 masters of bf16
//! matrices), so that a GPU run does not wait for a host forward every step.

use anyhow::{Context, Result};

use super::config::TrainConfig;
use super::device::TrainDevice;
use super::policy::{Policy, PolicyBatch};
use crate::model::TokenLogprobs;

/// Where the reference's log-probs are computed.
pub enum Reference {
    /// The host model (CPU runs, LoRA, vision-language models).
    Host(Box<Policy>),
    /// A forward-only copy on the run's GPU.
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::model::cuda_train::CudaTrainStep>),
}

impl Reference {
    /// The reference of `config`'s run when its objective needs one (None otherwise).
    pub fn load(
        config: &TrainConfig,
        model: &Policy,
        device: &TrainDevice,
    ) -> Result<Option<Reference>> {
        if !config.algorithm.loss.needs_reference_logp() {
            return Ok(None);
        }
        if config.lora.is_some() {
            return Ok(Some(Reference::Host(Box::new(Policy::from_text(
                model.text().without_adapter(),
            )))));
        }
        let host = Policy::load(
            &config.model,
            model.kind(),
            &candle_core::Device::Cpu,
            config.precision,
            false,
        )
        .with_context(|| {
            format!(
                "loading the reference model from {}",
                config.model.display()
            )
        })?;
        match device {
            #[cfg(feature = "cuda")]
            TrainDevice::Cuda(gpu) if host.vision().is_none() => {
                // Uploaded once; the host copy is dropped here.
                let step =
                    crate::model::cuda_train::CudaTrainStep::frozen(gpu.clone(), host.text())
                        .context("uploading the KL reference model to the GPU")?;
                Ok(Some(Reference::Gpu(Box::new(step))))
            }
            _ => Ok(Some(Reference::Host(Box::new(host)))),
        }
    }

    /// Per-token log-probs of `batch`'s completion tokens under the reference.
    pub fn logprobs(&self, batch: &PolicyBatch, inv_temperature: f32) -> Result<TokenLogprobs> {
        match self {
            Reference::Host(policy) => policy.logprobs_on_host(batch, inv_temperature),
            #[cfg(feature = "cuda")]
            Reference::Gpu(step) => {
                anyhow::ensure!(
                    batch.images.is_none(),
                    "internal: a vision-language batch for a text reference"
                );
                // Each layer's input is kept and dropped at once: a forward-only pass.
                Ok(step
                    .forward_with(
                        &batch.text,
                        inv_temperature,
                        crate::model::Activations::LayerInputs,
                    )?
                    .0)
            }
        }
    }
}
