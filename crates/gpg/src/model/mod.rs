//! The Qwen2-family decoder engine: config, weights, training forward/backward, decoding.
//!
//! The engine knows nothing about RL: it computes per-token log-probs in a forward pass and,
//! given one scalar g_t = ∂L/∂log π(o_t) per completion token, the parameter gradients in a
//! backward pass. SFT (g_t = −1/N), evaluation and every RL objective use it alike.

pub mod adapter_io;
pub mod config;
pub(crate) mod cpu_layer;
#[cfg(feature = "cuda")]
pub mod cuda_decode;
#[cfg(feature = "cuda")]
pub mod cuda_train;
pub mod decode;
pub mod decoding;
pub mod kind;
pub mod layer;
pub mod lora;
pub mod ops;
pub mod params;
pub mod precision;
pub mod qwen2;
pub mod qwen2_vl;
pub mod vision;
pub mod weights;

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::DType;

pub use config::Qwen2Config;
pub use kind::ModelKind;
pub use precision::{DeviceName, Precision};
pub use qwen2::{Activations, ForwardCache, Grads, Qwen2, TokenLogprobs, TrainBatch, Weights};
pub use qwen2_vl::{
    Batch, ImageInputs, Qwen2VL, Qwen2VLConfig, VlForwardCache, VlGrads, VlModel, VlSequence,
};

impl Qwen2 {
    /// Writes the model in Hugging Face format (config.json, model.safetensors in the model's
    /// own dtype: f32, or bf16 for a bf16 model), loadable by transformers'
    /// `{Qwen2,Qwen3,Llama}ForCausalLM.from_pretrained` (the model's family). Each file is written atomically.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.save_pretrained_as(dir, self.precision().matrix_dtype())
    }

    /// [`Self::save_pretrained`] with every tensor converted to `dtype`.
    pub fn save_pretrained_as(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        let family = self.config.family()?;
        let mut config = serde_json::to_value(&self.config)?;
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "architectures".into(),
                serde_json::json!([family.architecture()]),
            );
            obj.insert("model_type".into(), family.model_type().into());
            let name = match dtype {
                DType::BF16 => "bfloat16",
                DType::F16 => "float16",
                _ => "float32",
            };
            obj.insert("torch_dtype".into(), name.into());
            obj.retain(|_, v| !v.is_null());
        }
        weights::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        let tensors: Vec<(String, candle_core::Tensor)> = self
            .parameters()
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect();
        weights::save_safetensors(&tensors, dtype, &dir.join("model.safetensors"))
    }
}
