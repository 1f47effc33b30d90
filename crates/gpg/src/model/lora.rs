//! LoRA adapters (Hu et al. 2021, as PEFT implements them): a frozen linear layer plus a
//! trainable low-rank update,
//!
//! ```text
//! y = x·Wᵀ (+ b) + s · (d(x)·Aᵀ)·Bᵀ        A [r, in], B [out, r]
//! s = α / r            (use_rslora: s = α / √r)
//! d(x) = x ⊙ m / (1 − p)  with m_i ~ Bernoulli(1 − p)   (dropout, training forward only)
//! ```
//!
//! Backward, given dy = ∂L/∂y [T, out], with u = d(x)·Aᵀ [T, r]:
//!
//! ```text
//! ∂L/∂B = s · dyᵀ·u                  [out, r]
//! du    = s · dy·B                   [T, r]
//! ∂L/∂A = duᵀ·d(x)                   [r, in]
//! ∂L/∂x = dy·W + (du·A) ⊙ m / (1 − p)
//! ```
//!
//! The base weight W gets no gradient (it is frozen; dyᵀ·x, the costliest product of the
//! backward, is never formed). A is initialised Kaiming-uniform with a = √5, i.e.
//! U(−1/√in, 1/√in), and B is zero, as PEFT does, so a fresh adapter leaves the model
//! unchanged. The adapter lives in the model's own parameter tree ([`Qwen2Params`]): the leaf of
//! a linear layer's weight holds `Some(LoraPair)` when that layer is adapted.
//!
//! Dropout masks are a pure function of (seed, module, element): the backward regenerates the
//! forward's mask instead of storing it, and a run is reproducible from its seed.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::ops::{self, update_in_place, WeightSliceMut};
use super::params::{LeafKind, Qwen2Params};
use super::qwen2::Qwen2;

/// The seven linear layers of a Qwen2 decoder layer, PEFT's usual "all projections".
pub const ALL_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which modules get an adapter, as PEFT's `target_modules`: a list of names (a module matches
/// when its name equals an entry or ends with "." + the entry), or one regular expression that
/// must match the whole module name (`"all-linear"`: every projection, not the head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Names(ALL_PROJECTIONS.iter().map(|s| s.to_string()).collect())
    }
}

/// The recipe's `[lora]` table (and the fields of a PEFT adapter_config.json that gpg-rl
/// honours).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// r: the rank of every adapter (PEFT's default 8).
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// α: the scaling numerator (PEFT's default 8).
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    /// Dropout probability on the adapter's input (training forward only).
    #[serde(default)]
    pub dropout: f32,
    #[serde(default)]
    pub target_modules: TargetModules,
    /// s = α/√r instead of α/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Per-module ranks (PEFT's rank_pattern: a key matches a module whose name ends with it,
    /// as a regular expression after an optional "<prefix>.").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module α (PEFT's alpha_pattern, matched like rank_pattern).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, f32>,
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f32 {
    8.0
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }
}

/// The first pattern key matching `module` the way PEFT's `get_pattern_key` does:
/// `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern_key<'a>(
    keys: impl Iterator<Item = &'a String>,
    module: &str,
    field: &str,
) -> Result<Option<&'a String>> {
    for key in keys {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .with_context(|| format!("lora.{field}: key {key:?} is not a valid pattern"))?;
        if re.is_match(module) {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

impl LoraConfig {
    /// Checks ranges (rank ≥ 1, α > 0, dropout in [0, 1), valid patterns).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.rank >= 1, "lora.rank must be at least 1");
        ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "lora.alpha must be a positive number, got {}",
            self.alpha
        );
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora.dropout must be in [0, 1), got {}",
            self.dropout
        );
        for (k, &r) in &self.rank_pattern {
            ensure!(r >= 1, "lora.rank_pattern.{k}: the rank must be at least 1");
        }
        for (k, &a) in &self.alpha_pattern {
            ensure!(
                a.is_finite() && a > 0.0,
                "lora.alpha_pattern.{k}: α must be a positive number"
            );
        }
        if let TargetModules::Names(names) = &self.target_modules {
            ensure!(!names.is_empty(), "lora.target_modules is empty");
        }
        Ok(())
    }

    /// Whether the module called `module` (e.g. `model.layers.3.self_attn.q_proj`) is adapted.
    pub fn targets(&self, module: &str) -> Result<bool> {
        Ok(match &self.target_modules {
            TargetModules::Names(names) => names
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetModules::Regex(r) if r == "all-linear" => {
                ALL_PROJECTIONS.iter().any(|p| module.ends_with(p))
            }
            TargetModules::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .with_context(|| format!("lora.target_modules: {r:?} is not a valid pattern"))?
                .is_match(module),
        })
    }

    /// (rank, α) of `module`, after rank_pattern / alpha_pattern.
    pub fn rank_alpha(&self, module: &str) -> Result<(usize, f32)> {
        let rank = match pattern_key(self.rank_pattern.keys(), module, "rank_pattern")? {
            Some(k) => self.rank_pattern[k],
            None => self.rank,
        };
        let alpha = match pattern_key(self.alpha_pattern.keys(), module, "alpha_pattern")? {
            Some(k) => self.alpha_pattern[k],
            None => self.alpha,
        };
        Ok((rank, alpha))
    }

    /// s = α/r, or α/√r with rsLoRA.
    pub fn scale(&self, rank: usize, alpha: f32) -> f32 {
        if self.use_rslora {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        }
    }
}

/// One adapted linear layer: A [r, in] and B [out, r] (f32) and the scale s.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f32,
}

/// The gradients of one [`LoraPair`] (f32, row-major like A and B).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraGrad {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// Per-module adapters in the model's tree: `Some` on the weight leaf of each adapted layer.
pub type AdapterPairs = Qwen2Params<Option<LoraPair>>;
/// The gradient buffers of an adapter, in the same tree.
pub type AdapterGrads = Qwen2Params<Option<LoraGrad>>;

/// A LoRA adapter of one model.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: LoraConfig,
    /// Written to adapter_config.json (where the base model came from).
    pub base_model_name_or_path: String,
    pub pairs: AdapterPairs,
    /// Seed of the dropout masks of the next training forward (set by the trainer for each
    /// micro-batch; unused when `config.dropout` is 0).
    pub dropout_seed: u64,
}

/// The module name of a weight leaf: `model.layers.0.self_attn.q_proj.weight` →
/// `model.layers.0.self_attn.q_proj`.
pub fn module_of(leaf: &str) -> &str {
    leaf.strip_suffix(".weight").unwrap_or(leaf)
}

impl Adapter {
    /// A fresh adapter for `model`: A Kaiming-uniform (a = √5), B zero, drawn in the tree's
    /// fixed order from `seed`. Errors when `config` adapts no module, or a module that is not
    /// a linear layer of a decoder layer (the embedding and head are not supported).
    pub fn init(
        config: &LoraConfig,
        model: &Qwen2,
        seed: u64,
        base_model_name_or_path: &str,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4C6F_5241);
        let device = model.device().clone();
        let pairs = Self::shape(config, model, |_, out, inp, rank, scale| {
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..rank * inp)
                .map(|_| rng.gen_range(-bound..bound))
                .collect();
            Ok(LoraPair {
                a: Tensor::from_vec(a, (rank, inp), &device)?,
                b: Tensor::zeros((out, rank), DType::F32, &device)?,
                scale,
            })
        })?;
        Ok(Self {
            config: config.clone(),
            base_model_name_or_path: base_model_name_or_path.to_string(),
            pairs,
            dropout_seed: 0,
        })
    }

    /// The adapter tree for `model` under `config`, asking `make(module, out, in, rank, scale)`
    /// for the pair of every adapted module.
    pub(crate) fn shape(
        config: &LoraConfig,
        model: &Qwen2,
        mut make: impl FnMut(&str, usize, usize, usize, f32) -> Result<LoraPair>,
    ) -> Result<AdapterPairs> {
        let mut any = false;
        let pairs = Qwen2Params::build(&model.config, |leaf| {
            let module = module_of(&leaf.name);
            let targeted = config.targets(module)?;
            if !targeted {
                return Ok(None);
            }
            match leaf.kind {
                LeafKind::LinearWeight => {}
                LeafKind::Bias => return Ok(None),
                _ => bail!(
                    "lora.target_modules matches `{module}`, which is not a linear layer of a decoder layer; gpg-rl adapts only {ALL_PROJECTIONS:?}"
                ),
            }
            let (rank, alpha) = config.rank_alpha(module)?;
            any = true;
            let (out, inp) = (leaf.shape[0], leaf.shape[1]);
            Ok(Some(make(
                module,
                out,
                inp,
                rank,
                config.scale(rank, alpha),
            )?))
        })?;
        ensure!(
            any,
            "lora.target_modules {:?} matches no module of the model (the projections are {ALL_PROJECTIONS:?})",
            config.target_modules
        );
        Ok(pairs)
    }

    /// Zero gradient buffers in the adapter's tree.
    pub fn zero_grads(&self) -> Result<AdapterGrads> {
        self.pairs.try_map(|_, p| {
            Ok(p.as_ref().map(|p| LoraGrad {
                a: vec![0.0; p.a.elem_count()],
                b: vec![0.0; p.b.elem_count()],
            }))
        })
    }

    /// Number of trainable scalars (all A and B).
    pub fn parameter_count(&self) -> usize {
        let mut n = 0;
        self.pairs.visit(|_, p| {
            if let Some(p) = p {
                n += p.a.elem_count() + p.b.elem_count();
            }
        });
        n
    }

    /// Every adapted module with its pair, in tree order (module names as in HF).
    pub fn modules(&self) -> Vec<(String, &LoraPair)> {
        let mut out = Vec::new();
        self.pairs.visit(|name, p| {
            if let Some(p) = p {
                out.push((module_of(name).to_string(), p));
            }
        });
        out
    }

    /// Checks that this adapter fits `model` (same tree, A and B shapes of its layers).
    pub fn check_fits(&self, model: &Qwen2) -> Result<()> {
        let info = Qwen2Params::build(&model.config, |leaf| Ok(leaf.shape.clone()))?;
        let mut err = None;
        self.pairs.visit(|name, p| {
            let (Some(p), None) = (p, &err) else { return };
            let Some(shape) = info.get(name) else {
                err = Some(format!("the model has no module {}", module_of(name)));
                return;
            };
            let (a, b) = (p.a.dims(), p.b.dims());
            if a.len() != 2 || b.len() != 2 || a[1] != shape[1] || b[0] != shape[0] || a[0] != b[1]
            {
                err = Some(format!(
                    "{}: lora_A {:?} and lora_B {:?} do not fit the weight {:?}",
                    module_of(name),
                    a,
                    b,
                    shape
                ));
            }
        });
        match err {
            Some(e) => bail!("adapter does not fit the model: {e}"),
            None => Ok(()),
        }
    }
}

/// The dropout of one adapted module in one training forward.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    /// Distinguishes the modules of one forward (layer · 7 + projection).
    pub module: u64,
}

impl Dropout {
    /// d(x) = x ⊙ m / (1 − p), m_i = 1 when the hash of (seed, module, i) lands above p.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        let keep_scale = 1.0 / (1.0 - self.p);
        let base = self.seed ^ self.module.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let threshold = (self.p as f64 * (1u64 << 24) as f64) as u64;
        v.par_chunks_mut(4096).enumerate().for_each(|(c, chunk)| {
            for (j, x) in chunk.iter_mut().enumerate() {
                let i = (c * 4096 + j) as u64;
                let u = splitmix64(base.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))) >> 40;
                *x = if u < threshold { 0.0 } else { *x * keep_scale };
            }
        });
        Ok(Tensor::from_vec(v, dims, x.device())?)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl LoraPair {
    /// y + s·(d(x)·Aᵀ)·Bᵀ, where `y` is the base layer's output for `x` (a fresh tensor: it is
    /// added to in place).
    pub fn forward_add(&self, x: &Tensor, y: Tensor, dropout: Option<Dropout>) -> Result<Tensor> {
        let xd = match dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let u = ops::linear(&xd, &self.a, None)?;
        ops::linear_accumulate(&y, &u, &self.b, self.scale)?;
        Ok(y)
    }

    /// Adds ∂L/∂A and ∂L/∂B to `grad` and the adapter path's part of ∂L/∂x to `dx` (the base
    /// path's dy·W, a fresh tensor: added to in place without dropout), which it returns (see
    /// the module docs). `x` and `dropout` are the forward's.
    pub fn backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        dropout: Option<Dropout>,
        grad: &mut LoraGrad,
        dx: Tensor,
    ) -> Result<Tensor> {
        let xd = match dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let su = (ops::linear(&xd, &self.a, None)? * self.scale as f64)?;
        ops::linear_backward_params(dy, &su, &mut grad.b, None, false)?;
        let du = (ops::linear_backward_input(dy, &self.b)? * self.scale as f64)?;
        ops::linear_backward_params(&du, &xd, &mut grad.a, None, false)?;
        match dropout {
            // The mask is the same function of the indices; ∂L/∂x = (du·A) ⊙ m / (1 − p).
            Some(d) => Ok((dx + d.apply(&ops::linear_backward_input(&du, &self.a)?)?)?),
            None => {
                ops::linear_backward_input_accumulate(&dx, &du, &self.a, 1.0)?;
                Ok(dx)
            }
        }
    }

    /// W + s·B·A as f32 [out, in] (the merged weight), given W's f32 values.
    pub fn merged(&self, w: &[f32]) -> Result<Vec<f32>> {
        let (r, inp) = self.a.dims2()?;
        let (out, r2) = self.b.dims2()?;
        ensure!(
            r == r2 && w.len() == out * inp,
            "lora merge: A {:?}, B {:?} and W of {} elements do not fit",
            self.a.dims(),
            self.b.dims(),
            w.len()
        );
        let a = self.a.flatten_all()?.to_vec1::<f32>()?;
        let b = self.b.flatten_all()?.to_vec1::<f32>()?;
        let mut merged = w.to_vec();
        merged.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
            for k in 0..r {
                let c = self.scale * b[o * r + k];
                if c != 0.0 {
                    row.iter_mut()
                        .zip(&a[k * inp..(k + 1) * inp])
                        .for_each(|(w, &a)| *w += c * a);
                }
            }
        });
        Ok(merged)
    }
}

impl Qwen2 {
    /// The same model with every adapter merged into its base weight (W ← W + s·B·A) and no
    /// adapter left: what PEFT's `merge_and_unload` gives. A bf16 weight is merged in f32 and
    /// rounded once.
    pub fn merged(&self) -> Result<Qwen2> {
        let Some(adapter) = self.adapter() else {
            return Ok(self.without_adapter());
        };
        let mut base = self.without_adapter();
        base.weights.zip_mut(&adapter.pairs, |_, w, pair| {
            if let Some(pair) = pair {
                let values = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let merged = pair.merged(&values)?;
                *w = Tensor::from_vec(merged, w.dims(), w.device())?.to_dtype(w.dtype())?;
            }
            Ok(())
        })?;
        Ok(base)
    }
}

/// Writes `values` into the f32 tensor `t` in place (A or B after an optimiser step, or a
/// restored checkpoint).
pub fn write_f32(t: &Tensor, values: &[f32]) -> Result<()> {
    update_in_place(t, |slot| match slot {
        WeightSliceMut::F32(dst) => {
            ensure!(dst.len() == values.len(), "internal: adapter size differs");
            dst.copy_from_slice(values);
            Ok(())
        }
        WeightSliceMut::Bf16(_) => bail!("internal: adapter tensors are f32"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activations, Qwen2Config, TrainBatch};
    use candle_core::Device;

    fn tiny() -> Qwen2 {
        let config: Qwen2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 23, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 32, "tie_word_embeddings": false
        }))
        .unwrap();
        Qwen2::random(config, 0.4, 7, &Device::Cpu).unwrap()
    }

    fn batch() -> TrainBatch {
        TrainBatch::new(&[(&[1, 4, 9][..], &[3, 7, 2, 5][..]), (&[6][..], &[8, 1][..])]).unwrap()
    }

    const WEIGHTS: [f32; 6] = [0.7, -1.3, 0.4, 1.1, -0.6, 0.9];

    /// Σ_t w_t·logp_t in f64, from a training forward (dropout active).
    fn loss(model: &Qwen2) -> f64 {
        let (lp, _) = model.forward_train(&batch(), 1.0).unwrap();
        lp.logprobs
            .iter()
            .zip(WEIGHTS)
            .map(|(&l, w)| l as f64 * w as f64)
            .sum()
    }

    /// A tiny model with an adapter on q, v and down (rank 3, dropout 0.25) whose B is random.
    fn adapted() -> Qwen2 {
        let mut model = tiny();
        let config = LoraConfig {
            rank: 3,
            alpha: 6.0,
            dropout: 0.25,
            target_modules: TargetModules::Names(vec![
                "q_proj".into(),
                "v_proj".into(),
                "down_proj".into(),
            ]),
            ..LoraConfig::default()
        };
        let mut adapter = Adapter::init(&config, &model, 11, "tiny").unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        adapter.pairs.visit(|_, p| {
            if let Some(p) = p {
                let b: Vec<f32> = (0..p.b.elem_count())
                    .map(|_| rng.gen_range(-0.5..0.5))
                    .collect();
                write_f32(&p.b, &b).unwrap();
            }
        });
        adapter.dropout_seed = 99;
        model.set_adapter(adapter).unwrap();
        model
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn adapter_gradients_match_finite_differences_with_dropout() {
        let model = adapted();
        let g = WEIGHTS.to_vec();
        let mut grads = model.adapter().unwrap().zero_grads().unwrap();
        let (_, cache) = model.forward_train(&batch(), 1.0).unwrap();
        model
            .backward_adapter_into(&batch(), cache, &g, &mut grads)
            .unwrap();
        // Checkpointing recomputes each layer, with the same dropout masks: same gradients.
        let mut again = model.adapter().unwrap().zero_grads().unwrap();
        let (_, cache) = model
            .forward_train_with(&batch(), 1.0, Activations::LayerInputs)
            .unwrap();
        model
            .backward_adapter_into(&batch(), cache, &g, &mut again)
            .unwrap();
        assert_eq!(grads, again);
        let eps = 1e-2f32;
        let mut checked = 0;
        for ((name, pair), (_, grad)) in model
            .adapter()
            .unwrap()
            .pairs
            .named()
            .into_iter()
            .zip(grads.named())
        {
            let (Some(pair), Some(grad)) = (pair, grad) else {
                continue;
            };
            for (t, analytic) in [(&pair.a, &grad.a), (&pair.b, &grad.b)] {
                let orig = values(t);
                for i in (0..orig.len()).step_by(5) {
                    let mut v = orig.clone();
                    v[i] = orig[i] + eps;
                    write_f32(t, &v).unwrap();
                    let up = loss(&model);
                    v[i] = orig[i] - eps;
                    write_f32(t, &v).unwrap();
                    let down = loss(&model);
                    write_f32(t, &orig).unwrap();
                    let fd = (up - down) / (2.0 * eps as f64);
                    let an = analytic[i] as f64;
                    assert!(
                        (fd - an).abs() <= 2e-3 + 1e-2 * an.abs(),
                        "{name}[{i}]: finite difference {fd} vs backward {an}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 40, "{checked}");
    }

    /// A bf16 base with an f32 adapter: the adapter gradients agree with the f32 model's to
    /// bf16 accuracy, and the base stays bf16.
    #[test]
    fn bf16_base_trains_an_f32_adapter() {
        let model = adapted();
        let bf16 = model.to_precision(crate::model::Precision::Bf16).unwrap();
        assert_eq!(
            bf16.weights.layers[0].self_attn.q_proj.weight.dtype(),
            DType::BF16
        );
        let pair = &bf16.adapter().unwrap().modules()[0].1;
        assert_eq!(pair.a.dtype(), DType::F32);
        let grads = |m: &Qwen2| {
            let mut g = m.adapter().unwrap().zero_grads().unwrap();
            let (_, cache) = m.forward_train(&batch(), 1.0).unwrap();
            m.backward_adapter_into(&batch(), cache, &WEIGHTS, &mut g)
                .unwrap();
            let mut flat = Vec::new();
            g.visit(|_, p| {
                if let Some(p) = p {
                    flat.extend_from_slice(&p.a);
                    flat.extend_from_slice(&p.b);
                }
            });
            flat
        };
        let (a, b) = (grads(&model), grads(&bf16));
        let norm = a.iter().map(|v| v * v).sum::<f32>().sqrt();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        assert!(
            diff < 5e-2 * norm,
            "bf16 vs f32 adapter gradients: {}",
            diff / norm
        );
    }

    #[test]
    fn fresh_adapter_is_kaiming_uniform_a_zero_b_and_leaves_the_model_unchanged() {
        let mut model = tiny();
        let before = model.logprobs(&batch(), 1.0).unwrap().logprobs;
        let adapter = Adapter::init(&LoraConfig::default(), &model, 3, "tiny").unwrap();
        assert_eq!(adapter.modules().len(), 2 * 7);
        for (module, p) in adapter.modules() {
            let (r, inp) = p.a.dims2().unwrap();
            assert_eq!(r, 8);
            let bound = 1.0 / (inp as f32).sqrt();
            let a = values(&p.a);
            assert!(a.iter().all(|v| v.abs() <= bound), "{module}");
            let var = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
            // U(−b, b) has variance b²/3.
            assert!(
                (var / (bound * bound / 3.0) - 1.0).abs() < 0.3,
                "{module}: {var}"
            );
            assert!(values(&p.b).iter().all(|&v| v == 0.0));
            assert_eq!(p.scale, 1.0);
        }
        // Deterministic from the seed.
        let again = Adapter::init(&LoraConfig::default(), &model, 3, "tiny").unwrap();
        assert_eq!(
            values(&adapter.modules()[5].1.a),
            values(&again.modules()[5].1.a)
        );
        model.set_adapter(adapter).unwrap();
        assert_eq!(model.logprobs(&batch(), 1.0).unwrap().logprobs, before);
        // The full-model backward refuses a model whose base is frozen.
        let (_, cache) = model.forward_train(&batch(), 1.0).unwrap();
        let mut grads = model.zero_grads().unwrap();
        assert!(model
            .backward_into(&batch(), cache, &[0.0; 6], &mut grads)
            .is_err());
    }

    #[test]
    fn target_modules_and_patterns_match_as_peft_does() {
        let names = |v: &[&str]| TargetModules::Names(v.iter().map(|s| s.to_string()).collect());
        let c = LoraConfig {
            target_modules: names(&["q_proj", "self_attn.v_proj"]),
            rank_pattern: [("layers.1.mlp.down_proj".to_string(), 6)].into(),
            alpha_pattern: [("v_proj".to_string(), 3.0)].into(),
            ..LoraConfig::default()
        };
        assert!(c.targets("model.layers.0.self_attn.q_proj").unwrap());
        assert!(c.targets("model.layers.3.self_attn.v_proj").unwrap());
        assert!(!c.targets("model.layers.0.self_attn.k_proj").unwrap());
        assert!(!c.targets("model.layers.0.self_attn.xq_proj").unwrap());
        assert_eq!(
            c.rank_alpha("model.layers.1.mlp.down_proj").unwrap(),
            (6, 8.0)
        );
        assert_eq!(
            c.rank_alpha("model.layers.11.mlp.down_proj").unwrap(),
            (8, 8.0)
        );
        assert_eq!(
            c.rank_alpha("model.layers.2.self_attn.v_proj").unwrap(),
            (8, 3.0)
        );
        let re = LoraConfig {
            target_modules: TargetModules::Regex(r".*\.layers\.0\..*_proj".into()),
            ..LoraConfig::default()
        };
        assert!(re.targets("model.layers.0.mlp.up_proj").unwrap());
        assert!(!re.targets("model.layers.1.mlp.up_proj").unwrap());
        let all = LoraConfig {
            target_modules: TargetModules::Regex("all-linear".into()),
            use_rslora: true,
            ..LoraConfig::default()
        };
        assert!(all.targets("model.layers.5.mlp.gate_proj").unwrap());
        assert_eq!(all.scale(16, 32.0), 8.0);
        assert_eq!(LoraConfig::default().scale(16, 32.0), 2.0);
        // Errors name the field.
        let bad = LoraConfig {
            target_modules: names(&["embed_tokens"]),
            ..LoraConfig::default()
        };
        let err = Adapter::init(&bad, &tiny(), 0, "").unwrap_err().to_string();
        assert!(err.contains("embed_tokens"), "{err}");
        let none = LoraConfig {
            target_modules: names(&["nothing"]),
            ..LoraConfig::default()
        };
        let err = Adapter::init(&none, &tiny(), 0, "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("matches no module"), "{err}");
        for (bad, field) in [
            (
                LoraConfig {
                    rank: 0,
                    ..LoraConfig::default()
                },
                "lora.rank",
            ),
            (
                LoraConfig {
                    alpha: -1.0,
                    ..LoraConfig::default()
                },
                "lora.alpha",
            ),
            (
                LoraConfig {
                    dropout: 1.0,
                    ..LoraConfig::default()
                },
                "lora.dropout",
            ),
        ] {
            assert!(bad.validate().unwrap_err().to_string().contains(field));
        }
    }
}
