//! `config.json` of a checkpoint of one of the decoder families this engine runs (the fields it
//! reads): Qwen2 / Qwen2.5, Qwen3 (per-head RMSNorm of q and k, no q/k/v bias) and Llama 3
//! (`rope_type = "llama3"` frequency scaling). `model_type` is read once, into [`ModelFamily`].

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// The architecture hyper-parameters, named as in transformers' `Qwen2Config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: query head `h` reads key/value head `h / (heads / kv_heads)`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// transformers 4 writes `rope_theta` at the top level; transformers 5 writes it inside
    /// `rope_parameters`. Read through [`Qwen2Config::rope_theta`].
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` may be one id or a list in HF configs.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Everything else in config.json, kept so that a saved checkpoint round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One token id or several (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The decoder families this engine runs, from config.json's `model_type`. They share one layer
/// definition (`model/layer.rs`); what differs is in the config (biases, QK-norm, RoPE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// `qwen2` (also Qwen2.5; the text decoder of Qwen2-VL): q/k/v biases, no QK-norm.
    Qwen2,
    /// `qwen3`: RMSNorm over each head of q and k before the rotation (`q_norm`, `k_norm`,
    /// weight [head_dim]); biases per `attention_bias` (default false).
    Qwen3,
    /// `llama` (Llama 3.x): biases per `attention_bias` / `mlp_bias` (default false), RoPE
    /// optionally scaled (`rope_type = "llama3"`).
    Llama,
}

impl ModelFamily {
    /// The family of a `model_type` (absent: Qwen2, as older gpg-rl checkpoints wrote none).
    pub fn from_model_type(model_type: Option<&str>) -> Result<Self> {
        Ok(match model_type {
            None | Some("qwen2") => ModelFamily::Qwen2,
            // The text part of a Qwen2-VL-family config (its decoder is Qwen2's).
            Some(t) if t.starts_with("qwen2_vl") || t.starts_with("qwen2_5_vl") => {
                ModelFamily::Qwen2
            }
            Some("qwen3") => ModelFamily::Qwen3,
            Some("llama") => ModelFamily::Llama,
            Some(other) => bail!(
                "field `model_type` is {other:?}; supported decoder families are \"qwen2\", \
                 \"qwen3\" and \"llama\""
            ),
        })
    }

    /// The `model_type` transformers writes for the family.
    pub fn model_type(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "qwen2",
            ModelFamily::Qwen3 => "qwen3",
            ModelFamily::Llama => "llama",
        }
    }

    /// The transformers class of a causal LM of the family (config.json `architectures`).
    pub fn architecture(self) -> &'static str {
        match self {
            ModelFamily::Qwen2 => "Qwen2ForCausalLM",
            ModelFamily::Qwen3 => "Qwen3ForCausalLM",
            ModelFamily::Llama => "LlamaForCausalLM",
        }
    }
}

/// RoPE's inverse frequencies, as transformers' rope initialisation functions compute them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// inv_freq_i = 1 / θ^(2i/d).
    Default,
    /// Llama 3's frequency-dependent scaling of the default inv_freq (`rope_type = "llama3"`):
    /// with λ_i = 2π / inv_freq_i, L = original_max_position_embeddings,
    /// λ_lo = L / low_freq_factor, λ_hi = L / high_freq_factor:
    /// λ_i < λ_hi: inv_freq_i unchanged (high frequencies);
    /// λ_i > λ_lo: inv_freq_i / factor (low frequencies);
    /// otherwise (1 − s)·inv_freq_i/factor + s·inv_freq_i with s = (L/λ_i − low) / (high − low).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

fn default_max_position_embeddings() -> usize {
    32768
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

impl Qwen2Config {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read the model config (is {} a Hugging Face model directory?)",
                path.display(),
                dir.display()
            )
        })?;
        let config: Qwen2Config = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid config.json", path.display()))?;
        config
            .validate()
            .with_context(|| format!("{}: unsupported configuration", path.display()))?;
        Ok(config)
    }

    /// The RoPE base: top-level `rope_theta`, else `rope_parameters.rope_theta`, else 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|t| t.as_f64())
            })
            .unwrap_or(10000.0)
    }

    /// The decoder family, from `model_type` (see [`ModelFamily::from_model_type`]).
    pub fn family(&self) -> Result<ModelFamily> {
        let model_type = match self.extra.get("model_type") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) => Some(t.as_str()),
            Some(other) => bail!("field `model_type` must be a string, not {other}"),
        };
        ModelFamily::from_model_type(model_type)
    }

    /// The family; Qwen2 for a config that [`Self::validate`] would refuse.
    fn family_or_qwen2(&self) -> ModelFamily {
        self.family().unwrap_or(ModelFamily::Qwen2)
    }

    /// A boolean field kept in `extra` (`attention_bias`, `mlp_bias`), `None` when absent.
    fn extra_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.extra.get(field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => bail!("field `{field}` must be true or false, not {other}"),
        }
    }

    /// Whether q_proj, k_proj and v_proj have biases: always in Qwen2, per `attention_bias`
    /// (default false) in Qwen3 and Llama.
    pub fn qkv_bias(&self) -> bool {
        match self.family_or_qwen2() {
            ModelFamily::Qwen2 => true,
            ModelFamily::Qwen3 | ModelFamily::Llama => self.o_proj_bias(),
        }
    }

    /// Whether o_proj has a bias: never in Qwen2, per `attention_bias` in Qwen3 and Llama.
    pub fn o_proj_bias(&self) -> bool {
        match self.family_or_qwen2() {
            ModelFamily::Qwen2 => false,
            ModelFamily::Qwen3 | ModelFamily::Llama => self
                .extra_bool("attention_bias")
                .ok()
                .flatten()
                .unwrap_or(false),
        }
    }

    /// Whether gate_proj, up_proj and down_proj have biases (Llama's `mlp_bias`).
    pub fn mlp_bias(&self) -> bool {
        match self.family_or_qwen2() {
            ModelFamily::Llama => self.extra_bool("mlp_bias").ok().flatten().unwrap_or(false),
            ModelFamily::Qwen2 | ModelFamily::Qwen3 => false,
        }
    }

    /// Whether each head of q and k is RMS-normalised before the rotation (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.family_or_qwen2() == ModelFamily::Qwen3
    }

    /// The RoPE parameters object: `rope_parameters` (transformers 5), else `rope_scaling`
    /// (transformers 4), with the name of the field it came from.
    fn rope_section(&self) -> Option<(&'static str, &serde_json::Value)> {
        let scaled = |v: &serde_json::Value| {
            v.get("rope_type")
                .or_else(|| v.get("type"))
                .is_some_and(|t| t != "default")
        };
        let params = self.rope_parameters.as_ref().filter(|v| !v.is_null());
        let scaling = self.rope_scaling.as_ref().filter(|v| !v.is_null());
        match (params, scaling) {
            (Some(p), _) if scaled(p) => Some(("rope_parameters", p)),
            (_, Some(s)) => Some(("rope_scaling", s)),
            (Some(p), None) => Some(("rope_parameters", p)),
            (None, None) => None,
        }
    }

    /// The RoPE scaling `rope_parameters` / `rope_scaling` ask for; an unknown `rope_type`,
    /// or a llama3 section with a missing or invalid number, is an error naming the field.
    pub fn rope_scaling_kind(&self) -> Result<RopeScaling> {
        let Some((field, value)) = self.rope_section() else {
            return Ok(RopeScaling::Default);
        };
        let rope_type = value
            .get("rope_type")
            .or_else(|| value.get("type"))
            .and_then(|t| t.as_str());
        match rope_type {
            None | Some("default") => Ok(RopeScaling::Default),
            Some("llama3") => {
                let number = |key: &str| -> Result<f64> {
                    let x = value.get(key).and_then(|x| x.as_f64()).with_context(|| {
                        format!("field `{field}.{key}` is missing or not a number (rope_type \"llama3\")")
                    })?;
                    ensure!(
                        x.is_finite() && x > 0.0,
                        "field `{field}.{key}` must be positive, not {x}"
                    );
                    Ok(x)
                };
                let scaling = RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                };
                if let RopeScaling::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } = scaling
                {
                    ensure!(
                        high_freq_factor > low_freq_factor,
                        "field `{field}`: high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})"
                    );
                }
                Ok(scaling)
            }
            Some(other) => bail!(
                "field `{field}.rope_type` is {other:?}; supported: \"default\" and \"llama3\" \
                 (linear, dynamic, yarn, longrope … are not)"
            ),
        }
    }

    /// RoPE's inverse frequencies [head_dim/2], computed in f32 as transformers does
    /// (`_compute_default_rope_parameters`, `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Result<Vec<f32>> {
        let d = self.head_dim();
        let theta = self.rope_theta() as f32;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / d as f32))
            .collect();
        Ok(match self.rope_scaling_kind()? {
            RopeScaling::Default => base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
        })
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of the query projection output (`heads · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }

    /// Width of each of the key and value projection outputs (`kv_heads · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads() * self.head_dim()
    }

    /// Checks the invariants the engine relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                bail!("field `{field}` must be positive");
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim()
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.hidden_act != "silu" {
            bail!(
                "field `hidden_act` is {:?}; only \"silu\" is supported",
                self.hidden_act
            );
        }
        let family = self.family()?;
        for field in ["attention_bias", "mlp_bias"] {
            self.extra_bool(field)?;
        }
        if family == ModelFamily::Qwen2 && self.extra_bool("attention_bias")? == Some(false) {
            bail!(
                "field `attention_bias` is false, but Qwen2's q/k/v projections always have biases"
            );
        }
        if family != ModelFamily::Llama && self.extra_bool("mlp_bias")? == Some(true) {
            bail!("field `mlp_bias` is true; only Llama's MLP has biases");
        }
        self.rope_scaling_kind()?;
        // Qwen3 configs carry `sliding_window` / `layer_types` too; attention is full unless
        // `use_sliding_window` is set.
        if let Some(types) = self.extra.get("layer_types").and_then(|t| t.as_array()) {
            if self.use_sliding_window && types.iter().any(|t| t.as_str() != Some("full_attention"))
            {
                bail!(
                    "field `layer_types` asks for sliding-window attention, which is not supported"
                );
            }
        }
        if self.use_sliding_window {
            bail!("field `use_sliding_window` is true; sliding-window attention is not supported");
        }
        if self.rope_theta() <= 0.0 || self.rms_norm_eps <= 0.0 {
            bail!("fields `rope_theta` and `rms_norm_eps` must be positive");
        }
        Ok(())
    }

    /// Number of parameters (tied head counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let (qkv_b, o_b, mlp_b) = (
            self.qkv_bias() as usize,
            self.o_proj_bias() as usize,
            self.mlp_bias() as usize,
        );
        let per_layer = 2 * h
            + h * self.q_dim()
            + qkv_b * self.q_dim()
            + 2 * (h * self.kv_dim() + qkv_b * self.kv_dim())
            + self.q_dim() * h
            + o_b * h
            + 3 * h * self.intermediate_size
            + mlp_b * (2 * self.intermediate_size + h)
            + 2 * self.qk_norm() as usize * self.head_dim();
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> Result<Qwen2Config> {
        let mut v = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let c: Qwen2Config = serde_json::from_value(v)?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn model_type_picks_the_family_and_its_biases() {
        let q2 = config(serde_json::json!({})).unwrap();
        assert_eq!(q2.family().unwrap(), ModelFamily::Qwen2);
        assert!(q2.qkv_bias() && !q2.o_proj_bias() && !q2.qk_norm());
        let q3 = config(serde_json::json!({"model_type": "qwen3", "head_dim": 6})).unwrap();
        assert_eq!(q3.family().unwrap(), ModelFamily::Qwen3);
        assert!(!q3.qkv_bias() && q3.qk_norm() && q3.head_dim() == 6 && q3.q_dim() == 12);
        let q3b =
            config(serde_json::json!({"model_type": "qwen3", "attention_bias": true})).unwrap();
        assert!(q3b.qkv_bias() && q3b.o_proj_bias() && !q3b.mlp_bias());
        let ll = config(serde_json::json!({"model_type": "llama", "mlp_bias": true})).unwrap();
        assert!(!ll.qkv_bias() && ll.mlp_bias() && !ll.qk_norm());
        let err = config(serde_json::json!({"model_type": "mistral"})).unwrap_err();
        assert!(format!("{err:#}").contains("`model_type`"), "{err:#}");
        let err = config(serde_json::json!({"model_type": "llama", "attention_bias": "yes"}))
            .unwrap_err();
        assert!(format!("{err:#}").contains("`attention_bias`"), "{err:#}");
        let err = config(serde_json::json!({"mlp_bias": true})).unwrap_err();
        assert!(format!("{err:#}").contains("`mlp_bias`"), "{err:#}");
    }

    #[test]
    fn llama3_rope_scaling_follows_transformers_bands_and_unknown_types_are_refused() {
        let scaling = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0
        });
        let c = config(serde_json::json!({"model_type": "llama", "head_dim": 16,
            "rope_parameters": scaling}))
        .unwrap();
        let plain = config(serde_json::json!({"model_type": "llama", "head_dim": 16})).unwrap();
        let (got, base) = (c.rope_inv_freq().unwrap(), plain.rope_inv_freq().unwrap());
        // Wavelengths 2π/f: < 16 unchanged, > 64 divided by 8, between: interpolated.
        for (g, b) in got.iter().zip(&base) {
            let wavelen = 2.0 * std::f32::consts::PI / b;
            if wavelen < 16.0 {
                assert_eq!(g, b);
            } else if wavelen > 64.0 {
                assert!((g - b / 8.0).abs() <= 1e-7 * b);
            } else {
                assert!(*g < *b && *g > b / 8.0, "{g} {b}");
            }
        }
        assert!(got.iter().zip(&base).any(|(g, b)| g != b));
        // transformers 4's `rope_scaling` spelling works the same.
        let mut v4 = scaling.clone();
        v4.as_object_mut().unwrap().remove("rope_theta");
        let c4 = config(serde_json::json!({"model_type": "llama", "head_dim": 16,
            "rope_theta": 10000.0, "rope_scaling": v4}))
        .unwrap();
        assert_eq!(c4.rope_inv_freq().unwrap(), got);
        for (bad, field) in [
            (
                serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                "rope_scaling.rope_type",
            ),
            (
                serde_json::json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}),
                "rope_parameters.low_freq_factor",
            ),
            (
                serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
                "rope_scaling.rope_type",
            ),
        ] {
            let err = config(bad).unwrap_err();
            assert!(format!("{err:#}").contains(field), "{err:#}");
        }
    }
}
