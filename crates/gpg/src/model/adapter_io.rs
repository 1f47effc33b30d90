//! LoRA adapters in PEFT's file format, in and out.
//!
//! A PEFT adapter directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha,
//! target_modules, …) and `adapter_model.safetensors` with, for every adapted module,
//!
//! ```text
//! base_model.model.<module>.lora_A.weight    [r, in]
//! base_model.model.<module>.lora_B.weight    [out, r]
//! ```
//!
//! e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. gpg-rl writes the
//! same files (f32), so `PeftModel.from_pretrained(base, dir)` loads them, and reads PEFT's
//! (rank_pattern / alpha_pattern honoured). Options that change the computation in ways gpg-rl
//! does not implement (DoRA, trained biases, fan_in_fan_out, modules_to_save, layer
//! selection, …) are refused with an error naming the field, never ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::lora::{Adapter, LoraConfig, LoraPair, TargetModules};
use super::qwen2::Qwen2;
use super::weights::{check_finite, save_safetensors, write_atomic};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The file key of a module's A or B (`which` is "lora_A" or "lora_B").
pub fn peft_key(module: &str, which: &str) -> String {
    format!("base_model.model.{module}.{which}.weight")
}

/// adapter_config.json as PEFT writes it for `adapter`.
pub fn peft_config_json(adapter: &Adapter) -> Value {
    let c = &adapter.config;
    let target_modules = match &c.target_modules {
        TargetModules::Names(names) => json!(names),
        TargetModules::Regex(r) => json!(r),
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": target_modules,
        "use_rslora": c.use_rslora,
        "rank_pattern": c.rank_pattern,
        "alpha_pattern": c.alpha_pattern,
        "bias": "none",
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "lora_bias": false,
        "revision": null,
    })
}

impl Adapter {
    /// Writes adapter_config.json and adapter_model.safetensors (f32) into `dir`, each
    /// atomically.
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        write_atomic(
            &dir.join(ADAPTER_CONFIG),
            serde_json::to_string_pretty(&peft_config_json(self))?.as_bytes(),
        )?;
        let mut tensors = Vec::new();
        for (module, pair) in self.modules() {
            tensors.push((peft_key(&module, "lora_A"), pair.a.clone()));
            tensors.push((peft_key(&module, "lora_B"), pair.b.clone()));
        }
        save_safetensors(&tensors, DType::F32, &dir.join(ADAPTER_WEIGHTS))
    }

    /// Reads a PEFT LoRA adapter directory for `model` (its tensors onto the model's device).
    pub fn load_peft(dir: &Path, model: &Qwen2) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "{}: cannot read (is {} a PEFT adapter directory?)",
                config_path.display(),
                dir.display()
            )
        })?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed JSON", config_path.display()))?;
        let (config, base) = config_from_peft(&raw)
            .with_context(|| format!("{}: unsupported adapter", config_path.display()))?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.is_file() {
            if dir.join("adapter_model.bin").is_file() {
                bail!(
                    "{}: the adapter is stored as adapter_model.bin (pickle); gpg-rl reads only adapter_model.safetensors (save it with safe_serialization=True)",
                    dir.display()
                );
            }
            bail!("{}: file not found", weights_path.display());
        }
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&weights_path, &Device::Cpu)
                .with_context(|| format!("{}: cannot read safetensors", weights_path.display()))?
                .into_iter()
                .collect();
        let file = weights_path.display().to_string();
        let device = model.device().clone();
        let pairs = Adapter::shape(&config, model, |module, out, inp, rank, scale| {
            let mut take = |which: &str, shape: [usize; 2]| -> Result<Tensor> {
                let key = peft_key(module, which);
                let t = tensors.remove(&key).with_context(|| {
                    format!("{file}: tensor `{key}` is missing (adapter_config.json targets {module})")
                })?;
                ensure!(
                    t.dims() == shape,
                    "{file}: tensor `{key}` has shape {:?}, expected {shape:?} (rank {rank} for {module})",
                    t.dims()
                );
                let t = t.to_dtype(DType::F32)?;
                check_finite(&t).map_err(|e| anyhow::anyhow!("{file}: tensor `{key}`: {e}"))?;
                Ok(t.to_device(&device)?)
            };
            Ok(LoraPair {
                a: take("lora_A", [rank, inp])?,
                b: take("lora_B", [out, rank])?,
                scale,
            })
        })
        .with_context(|| format!("{}: adapter does not fit the model", config_path.display()))?;
        if !tensors.is_empty() {
            let mut names: Vec<_> = tensors.keys().cloned().collect();
            names.sort();
            bail!(
                "{file}: tensors this LoRA adapter should not hold (unsupported module or option): {names:?}"
            );
        }
        Ok(Adapter {
            config,
            base_model_name_or_path: base,
            pairs,
            dropout_seed: 0,
        })
    }
}

/// The fields of a PEFT LoraConfig that gpg-rl honours; refuses options it does not implement.
fn config_from_peft(raw: &Value) -> Result<(LoraConfig, String)> {
    let obj = raw
        .as_object()
        .context("adapter_config.json must hold a JSON object")?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => bail!("peft_type is {other:?}; gpg-rl loads LoRA adapters (\"LORA\") only"),
    }
    if let Some(t) = get("task_type") {
        ensure!(
            t.as_str() == Some("CAUSAL_LM"),
            "task_type is {t}; gpg-rl loads causal-LM adapters (\"CAUSAL_LM\")"
        );
    }
    // Options that would change the computation: refused unless at their neutral value.
    let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
    for k in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
        ensure!(
            !flag(k),
            "{k} = true is not supported by gpg-rl (only plain LoRA)"
        );
    }
    if let Some(b) = get("bias") {
        ensure!(
            b.as_str() == Some("none"),
            "bias = {b} is not supported: gpg-rl trains no biases (bias must be \"none\")"
        );
    }
    for k in [
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
        "layer_replication",
        "alora_invocation_tokens",
        "megatron_config",
    ] {
        if let Some(v) = get(k) {
            let empty = v.as_array().is_some_and(|a| a.is_empty())
                || v.as_object().is_some_and(|o| o.is_empty())
                || v.as_str().is_some_and(|s| s.is_empty());
            ensure!(empty, "{k} = {v} is not supported by gpg-rl");
        }
    }
    if let Some(init) = get("init_lora_weights").and_then(Value::as_str) {
        let rewrites_base = ["pissa", "olora", "corda", "eva", "loftq"];
        ensure!(
            !rewrites_base.iter().any(|p| init.starts_with(p)),
            "init_lora_weights = {init:?} is not supported: that initialisation rewrites the base weights, so the adapter does not apply to the original base model"
        );
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .context("field `r` is missing or not a positive integer")?;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .context("field `lora_alpha` is missing or not a number")?;
    let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let target_modules = match get("target_modules") {
        Some(Value::String(s)) => TargetModules::Regex(s.clone()),
        Some(Value::Array(a)) => TargetModules::Names(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .context("target_modules must hold strings")
                })
                .collect::<Result<_>>()?,
        ),
        _ => bail!("field `target_modules` is missing (a list of module names or a pattern)"),
    };
    let mut rank_pattern = BTreeMap::new();
    if let Some(p) = get("rank_pattern") {
        for (k, v) in p.as_object().context("rank_pattern must be an object")? {
            let r = v
                .as_u64()
                .with_context(|| format!("rank_pattern.{k} must be a positive integer"))?;
            rank_pattern.insert(k.clone(), r as usize);
        }
    }
    let mut alpha_pattern = BTreeMap::new();
    if let Some(p) = get("alpha_pattern") {
        for (k, v) in p.as_object().context("alpha_pattern must be an object")? {
            let a = v
                .as_f64()
                .with_context(|| format!("alpha_pattern.{k} must be a number"))?;
            alpha_pattern.insert(k.clone(), a as f32);
        }
    }
    let config = LoraConfig {
        rank: r as usize,
        alpha: alpha as f32,
        dropout: dropout as f32,
        target_modules,
        use_rslora: flag("use_rslora"),
        rank_pattern,
        alpha_pattern,
    };
    config.validate()?;
    let base = get("base_model_name_or_path")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok((config, base))
}

impl Qwen2 {
    /// Writes what training changes: the adapter in PEFT format when the model has one (the
    /// frozen base is not rewritten), else the whole model ([`Qwen2::save_pretrained`]).
    pub fn save_trained(&self, dir: &Path) -> Result<()> {
        match self.adapter() {
            Some(a) => a.save_peft(dir),
            None => self.save_pretrained(dir),
        }
    }

    /// Loads the PEFT adapter in `dir` and attaches it.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let adapter = Adapter::load_peft(dir, self)?;
        self.set_adapter(adapter)
    }
}
