//! The Qwen2 decoder: weights named as in transformers, a training forward that returns the
//! log-prob of every completion token, and the explicit backward from per-token weights g_t.
//!
//! One layer, as the forward computes it (x is the residual stream, [T, H]):
//!
//! ```text
//! xn  = rms_norm(x, input_layernorm)
//! q,k,v = xn·Wqᵀ+bq, xn·Wkᵀ+bk, xn·Wvᵀ+bv        q:[T,nh,hd]  k,v:[T,nkv,hd]
//! qr,kr = rope(q), rope(k)
//! att = causal_attention(qr, kr, v)               per sequence of the packed batch
//! xm  = x + att·Woᵀ
//! xn2 = rms_norm(xm, post_attention_layernorm)
//! h   = silu(xn2·Wgᵀ) ⊙ (xn2·Wuᵀ)
//! x'  = xm + h·Wdᵀ
//! ```
//!
//! The backward walks the same lines bottom to top. The model is only its weights: activations
//! kept for backward live in [`ForwardCache`], owned by the caller.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::Qwen2Config;
use super::ops::{self, Rope, VarLen};
use super::weights::WeightMap;

/// y = x·Wᵀ (+ b). `weight` is [out, in], as stored by transformers.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Given dy = ∂L/∂y and the input x: returns ∂L/∂x = dy·W and the parameter gradients
    /// ∂L/∂W = dyᵀ·x, ∂L/∂b = Σ_rows dy.
    fn backward(&self, dy: &Tensor, x: &Tensor) -> Result<(Tensor, LinearGrad)> {
        let dx = dy.matmul(&self.weight)?;
        let grad = self.param_grad(dy, x)?;
        Ok((dx, grad))
    }

    fn param_grad(&self, dy: &Tensor, x: &Tensor) -> Result<LinearGrad> {
        let weight = dy.t()?.matmul(x)?;
        let bias = match &self.bias {
            Some(_) => Some(dy.sum(0)?),
            None => None,
        };
        Ok(LinearGrad { weight, bias })
    }
}

struct LinearGrad {
    weight: Tensor,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// `Qwen2ForCausalLM`: `model.*` plus the output head (`lm_head.weight`, or the embedding
/// matrix when the head is tied).
#[derive(Debug, Clone)]
pub struct Qwen2 {
    pub config: Qwen2Config,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// `None` when `tie_word_embeddings`: the head is `embed_tokens`.
    pub lm_head: Option<Tensor>,
    rope: Rope,
    device: Device,
}

/// A packed batch of (prompt, completion) sequences for the training forward.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// All sequences' tokens laid end to end.
    pub tokens: Vec<u32>,
    pub seqs: VarLen,
    /// Position of every token inside its sequence (0-based).
    pub positions: Vec<u32>,
    /// Packed row of the hidden state that predicts each completion token (the row before it).
    pub score_rows: Vec<u32>,
    /// The completion tokens, in order; `score_rows[i]` predicts `targets[i]`.
    pub targets: Vec<u32>,
    /// Offsets of each sequence's completion tokens into `targets` (n_seqs + 1 entries).
    pub completion_offsets: Vec<usize>,
}

impl TrainBatch {
    /// Packs `(prompt, completion)` pairs. Every prompt must have at least one token.
    pub fn new(pairs: &[(&[u32], &[u32])]) -> Result<Self> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut lens = Vec::with_capacity(pairs.len());
        let mut score_rows = Vec::new();
        let mut targets = Vec::new();
        let mut completion_offsets = vec![0];
        for (i, (prompt, completion)) in pairs.iter().enumerate() {
            ensure!(!prompt.is_empty(), "sequence {i}: the prompt is empty; a completion needs at least one prompt token to be predicted from");
            let start = tokens.len();
            tokens.extend_from_slice(prompt);
            tokens.extend_from_slice(completion);
            let len = prompt.len() + completion.len();
            positions.extend(0..len as u32);
            for t in 0..completion.len() {
                score_rows.push((start + prompt.len() - 1 + t) as u32);
            }
            targets.extend_from_slice(completion);
            completion_offsets.push(targets.len());
            lens.push(len);
        }
        Ok(Self {
            tokens,
            seqs: VarLen::from_lens(&lens),
            positions,
            score_rows,
            targets,
            completion_offsets,
        })
    }

    pub fn num_completion_tokens(&self) -> usize {
        self.targets.len()
    }
}

/// Activations of one layer kept for its backward.
struct LayerCache {
    x: Tensor,
    xn: Tensor,
    rstd1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    att: Tensor,
    lse: Tensor,
    xm: Tensor,
    xn2: Tensor,
    rstd2: Tensor,
    gate: Tensor,
    up: Tensor,
    h: Tensor,
}

/// Everything the backward needs from one training forward.
pub struct ForwardCache {
    layers: Vec<LayerCache>,
    x_final: Tensor,
    rstd_final: Tensor,
    h_scored: Tensor,
    lse: Vec<f32>,
    inv_temperature: f32,
}

/// Per completion token (in `TrainBatch::targets` order).
#[derive(Debug, Clone)]
pub struct TokenLogprobs {
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// Gradients of every parameter, in [`Qwen2::parameter_names`] order.
pub struct Gradients {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor>,
}

impl Gradients {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.tensors[i])
    }
}

impl Qwen2 {
    /// Loads a Hugging Face Qwen2 checkpoint directory (config.json + safetensors).
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let config = Qwen2Config::from_dir(dir)?;
        let mut weights = WeightMap::from_dir(dir, device)?;
        let model = Self::from_weights(config, &mut weights, device)
            .with_context(|| format!("{}: checkpoint does not match config.json", dir.display()))?;
        let unused = weights.remaining();
        let unexpected: Vec<_> = unused
            .iter()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !unexpected.is_empty() {
            bail!(
                "{}: the checkpoint holds tensors this Qwen2 model does not use: {:?}",
                dir.display(),
                unexpected
            );
        }
        Ok(model)
    }

    fn from_weights(config: Qwen2Config, w: &mut WeightMap, device: &Device) -> Result<Self> {
        let h = config.hidden_size;
        let (qd, kvd, inter) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
        let embed_tokens = w.take("model.embed_tokens.weight", &[config.vocab_size, h])?;
        let linear =
            |w: &mut WeightMap, name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                Ok(Linear {
                    weight: w.take(&format!("{name}.weight"), &[out, inp])?,
                    bias: if bias {
                        Some(w.take(&format!("{name}.bias"), &[out])?)
                    } else {
                        None
                    },
                })
            };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: Attention {
                    q_proj: linear(w, &format!("{p}.self_attn.q_proj"), qd, h, true)?,
                    k_proj: linear(w, &format!("{p}.self_attn.k_proj"), kvd, h, true)?,
                    v_proj: linear(w, &format!("{p}.self_attn.v_proj"), kvd, h, true)?,
                    o_proj: linear(w, &format!("{p}.self_attn.o_proj"), h, qd, false)?,
                },
                post_attention_layernorm: w
                    .take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: linear(w, &format!("{p}.mlp.gate_proj"), inter, h, false)?,
                    up_proj: linear(w, &format!("{p}.mlp.up_proj"), inter, h, false)?,
                    down_proj: linear(w, &format!("{p}.mlp.down_proj"), h, inter, false)?,
                },
            });
        }
        let norm = w.take("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings {
            // Some tied checkpoints still store a copy of the head; it must equal the embedding.
            w.take_optional("lm_head.weight", &[config.vocab_size, h])?;
            None
        } else {
            Some(w.take("lm_head.weight", &[config.vocab_size, h])?)
        };
        Ok(Self::assemble(
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            device,
        ))
    }

    /// The model from its weights (the rotary tables are derived from the config).
    fn assemble(
        config: Qwen2Config,
        embed_tokens: Tensor,
        layers: Vec<DecoderLayer>,
        norm: Tensor,
        lm_head: Option<Tensor>,
        device: &Device,
    ) -> Self {
        let rope = Rope::new(
            config.head_dim(),
            config.rope_theta(),
            config.max_position_embeddings,
        );
        Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
        }
    }

    /// A randomly initialised model as transformers initialises Qwen2: linear and embedding
    /// weights ~ N(0, std²), biases 0, norm weights 1.
    pub fn random(config: Qwen2Config, std: f32, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, std).context("invalid initialisation std")?;
        let mut randn = |shape: &[usize]| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
            Ok(Tensor::from_vec(data, shape, device)?)
        };
        let h = config.hidden_size;
        let (qd, kvd, inter) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
        let ones = |n: usize| Tensor::ones(n, DType::F32, device);
        let zeros = |n: usize| Tensor::zeros(n, DType::F32, device);
        let embed_tokens = randn(&[config.vocab_size, h])?;
        let mut layers = Vec::new();
        for _ in 0..config.num_hidden_layers {
            let lin = |randn: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
                       out: usize,
                       inp: usize,
                       bias: bool|
             -> Result<Linear> {
                Ok(Linear {
                    weight: randn(&[out, inp])?,
                    bias: if bias { Some(zeros(out)?) } else { None },
                })
            };
            layers.push(DecoderLayer {
                input_layernorm: ones(h)?,
                self_attn: Attention {
                    q_proj: lin(&mut randn, qd, h, true)?,
                    k_proj: lin(&mut randn, kvd, h, true)?,
                    v_proj: lin(&mut randn, kvd, h, true)?,
                    o_proj: lin(&mut randn, h, qd, false)?,
                },
                post_attention_layernorm: ones(h)?,
                mlp: Mlp {
                    gate_proj: lin(&mut randn, inter, h, false)?,
                    up_proj: lin(&mut randn, inter, h, false)?,
                    down_proj: lin(&mut randn, h, inter, false)?,
                },
            });
        }
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(randn(&[config.vocab_size, h])?)
        };
        let norm = ones(h)?;
        Ok(Self::assemble(
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            device,
        ))
    }

    /// The rotary tables (positions 0..max_position_embeddings).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The output head matrix [V, H].
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every parameter with its Hugging Face name, in a fixed order.
    pub fn parameters(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                &layer.input_layernorm,
            ));
            let a = &layer.self_attn;
            let m = &layer.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
            ] {
                push_linear(&mut out, &format!("{p}.{name}"), lin);
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            ));
            for (name, lin) in [
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                push_linear(&mut out, &format!("{p}.{name}"), lin);
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head));
        }
        out
    }

    pub fn parameter_names(&self) -> Vec<String> {
        self.parameters().into_iter().map(|(n, _)| n).collect()
    }

    /// Mutable access to every parameter, in [`Self::parameters`] order.
    pub fn parameters_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out: Vec<&mut Tensor> = vec![&mut self.embed_tokens];
        for layer in self.layers.iter_mut() {
            out.push(&mut layer.input_layernorm);
            let a = &mut layer.self_attn;
            for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                out.push(&mut lin.weight);
                if let Some(b) = lin.bias.as_mut() {
                    out.push(b);
                }
            }
            out.push(&mut layer.post_attention_layernorm);
            let m = &mut layer.mlp;
            for lin in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                out.push(&mut lin.weight);
                if let Some(b) = lin.bias.as_mut() {
                    out.push(b);
                }
            }
        }
        out.push(&mut self.norm);
        if let Some(head) = self.lm_head.as_mut() {
            out.push(head);
        }
        out
    }

    /// The residual stream entering the final norm, for a packed batch, keeping what the
    /// backward needs when `keep` is true.
    fn forward_layers(
        &self,
        tokens: &[u32],
        seqs: &VarLen,
        positions: &[u32],
        keep: bool,
    ) -> Result<(Tensor, Vec<LayerCache>)> {
        let c = &self.config;
        let t = tokens.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let ids = Tensor::from_slice(tokens, t, &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        let mut caches = Vec::new();
        for layer in &self.layers {
            let (xn, rstd1) = ops::rms_norm(&x, &layer.input_layernorm, c.rms_norm_eps)?;
            let a = &layer.self_attn;
            let q = a.q_proj.forward(&xn)?.reshape((t, nh, hd))?;
            let k = a.k_proj.forward(&xn)?.reshape((t, nkv, hd))?;
            let v = a.v_proj.forward(&xn)?.reshape((t, nkv, hd))?;
            let q = self.rope.forward(&q, positions)?;
            let k = self.rope.forward(&k, positions)?;
            let (att, lse) = ops::attention(&q, &k, &v, seqs)?;
            let att = att.reshape((t, nh * hd))?;
            let xm = (&x + a.o_proj.forward(&att)?)?;
            let (xn2, rstd2) = ops::rms_norm(&xm, &layer.post_attention_layernorm, c.rms_norm_eps)?;
            let gate = layer.mlp.gate_proj.forward(&xn2)?;
            let up = layer.mlp.up_proj.forward(&xn2)?;
            let h = ops::swiglu(&gate, &up)?;
            let x_next = (&xm + layer.mlp.down_proj.forward(&h)?)?;
            if keep {
                caches.push(LayerCache {
                    x,
                    xn,
                    rstd1,
                    q,
                    k,
                    v,
                    att,
                    lse,
                    xm,
                    xn2,
                    rstd2,
                    gate,
                    up,
                    h,
                });
            }
            x = x_next;
        }
        Ok((x, caches))
    }

    /// Training forward: the log-prob (and entropy) of every completion token under
    /// softmax(inv_temperature · logits), never holding batch × length × vocab logits.
    /// Returns the cache the backward needs.
    pub fn forward_train(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
    ) -> Result<(TokenLogprobs, ForwardCache)> {
        let (logprobs, cache) = self.forward_scored(batch, inv_temperature, true)?;
        let cache = cache.context("internal: the training forward kept no activations")?;
        Ok((logprobs, cache))
    }

    /// Log-probs only (evaluation, reference and old-policy log-probs): no activations kept.
    pub fn logprobs(&self, batch: &TrainBatch, inv_temperature: f32) -> Result<TokenLogprobs> {
        Ok(self.forward_scored(batch, inv_temperature, false)?.0)
    }

    /// The forward up to the scored completion tokens, keeping activations when `keep`.
    fn forward_scored(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: bool,
    ) -> Result<(TokenLogprobs, Option<ForwardCache>)> {
        self.check_tokens(&batch.tokens)?;
        let (x_final, layers) =
            self.forward_layers(&batch.tokens, &batch.seqs, &batch.positions, keep)?;
        let (xf, rstd_final) = ops::rms_norm(&x_final, &self.norm, self.config.rms_norm_eps)?;
        let rows = Tensor::from_slice(&batch.score_rows, batch.score_rows.len(), &self.device)?;
        let h_scored = xf.index_select(&rows, 0)?;
        let out = ops::lm_head_logprobs(
            &h_scored,
            self.head_weight(),
            &batch.targets,
            inv_temperature,
        )?;
        let logprobs = TokenLogprobs {
            logprobs: out.logprobs,
            entropy: out.entropy,
        };
        let cache = keep.then_some(ForwardCache {
            layers,
            x_final,
            rstd_final,
            h_scored,
            lse: out.lse,
            inv_temperature,
        });
        Ok((logprobs, cache))
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.config.vocab_size
            );
        }
        Ok(())
    }

    /// Backward from g_t = ∂L/∂logp_t (one weight per completion token, `targets` order):
    /// the gradient of L with respect to every parameter.
    pub fn backward(
        &self,
        batch: &TrainBatch,
        cache: ForwardCache,
        g: &[f32],
    ) -> Result<Gradients> {
        ensure!(
            g.len() == batch.targets.len(),
            "backward: {} token weights for {} completion tokens",
            g.len(),
            batch.targets.len()
        );
        let c = &self.config;
        let t = batch.tokens.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let h = c.hidden_size;

        // Output head and final norm.
        let (dh_scored, d_head) = ops::lm_head_backward(
            &cache.h_scored,
            self.head_weight(),
            &batch.targets,
            &cache.lse,
            g,
            cache.inv_temperature,
        )?;
        let rows = Tensor::from_slice(&batch.score_rows, batch.score_rows.len(), &self.device)?;
        let dxf =
            Tensor::zeros((t, h), DType::F32, &self.device)?.index_add(&rows, &dh_scored, 0)?;
        let (mut dx, d_norm) =
            ops::rms_norm_backward(&dxf, &cache.x_final, &self.norm, &cache.rstd_final)?;

        let mut layer_grads = Vec::with_capacity(self.layers.len());
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter()).rev() {
            // x' = xm + down(swiglu(gate(xn2), up(xn2)))
            let (dhid, g_down) = layer.mlp.down_proj.backward(&dx, &lc.h)?;
            let (dgate, dup) = ops::swiglu_backward(&dhid, &lc.gate, &lc.up)?;
            let (dxn2_g, g_gate) = layer.mlp.gate_proj.backward(&dgate, &lc.xn2)?;
            let (dxn2_u, g_up) = layer.mlp.up_proj.backward(&dup, &lc.xn2)?;
            let dxn2 = (dxn2_g + dxn2_u)?;
            let (dxm_norm, d_ln2) =
                ops::rms_norm_backward(&dxn2, &lc.xm, &layer.post_attention_layernorm, &lc.rstd2)?;
            let dxm = (&dx + dxm_norm)?;
            // xm = x + o_proj(att)
            let a = &layer.self_attn;
            let (datt, g_o) = a.o_proj.backward(&dxm, &lc.att)?;
            let att = lc.att.reshape((t, nh, hd))?;
            let datt = datt.reshape((t, nh, hd))?;
            let (dq, dk, dv) =
                ops::attention_backward(&datt, &lc.q, &lc.k, &lc.v, &att, &lc.lse, &batch.seqs)?;
            let dq = self
                .rope
                .backward(&dq, &batch.positions)?
                .reshape((t, nh * hd))?;
            let dk = self
                .rope
                .backward(&dk, &batch.positions)?
                .reshape((t, nkv * hd))?;
            let dv = dv.reshape((t, nkv * hd))?;
            let (dxn_q, g_q) = a.q_proj.backward(&dq, &lc.xn)?;
            let (dxn_k, g_k) = a.k_proj.backward(&dk, &lc.xn)?;
            let (dxn_v, g_v) = a.v_proj.backward(&dv, &lc.xn)?;
            let dxn = ((dxn_q + dxn_k)? + dxn_v)?;
            let (dx_norm, d_ln1) =
                ops::rms_norm_backward(&dxn, &lc.x, &layer.input_layernorm, &lc.rstd1)?;
            dx = (dxm + dx_norm)?;
            layer_grads.push((d_ln1, [g_q, g_k, g_v, g_o], d_ln2, [g_gate, g_up, g_down]));
        }
        layer_grads.reverse();

        // Embedding: scatter-add the residual gradient into the rows of the used tokens.
        let ids = Tensor::from_slice(&batch.tokens, t, &self.device)?;
        let mut d_embed =
            Tensor::zeros((c.vocab_size, h), DType::F32, &self.device)?.index_add(&ids, &dx, 0)?;
        if self.lm_head.is_none() {
            d_embed = (d_embed + &d_head)?;
        }

        let mut tensors = vec![d_embed];
        for (d_ln1, attn, d_ln2, mlp) in layer_grads {
            tensors.push(d_ln1);
            for lg in attn {
                tensors.push(lg.weight);
                tensors.extend(lg.bias);
            }
            tensors.push(d_ln2);
            for lg in mlp {
                tensors.push(lg.weight);
                tensors.extend(lg.bias);
            }
        }
        tensors.push(d_norm);
        if self.lm_head.is_some() {
            tensors.push(d_head);
        }
        let names = self.parameter_names();
        ensure!(
            names.len() == tensors.len(),
            "internal: gradient list does not match parameters"
        );
        Ok(Gradients { names, tensors })
    }

    /// Logits of the next token after each row of `h` (final-normed hidden states [B, H]).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(h.matmul(&self.head_weight().t()?)?)
    }

    /// Inference half of a layer's attention block: the input norm, then q, k, v of every row,
    /// with q and k rotated to `positions` (q: [T, nh, hd], k and v: [T, nkv, hd]).
    fn rotated_qkv(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        positions: &[u32],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let t = x.dim(0)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let (xn, _) = ops::rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
        let a = &layer.self_attn;
        let q = self
            .rope
            .forward(&a.q_proj.forward(&xn)?.reshape((t, nh, hd))?, positions)?;
        let k = self
            .rope
            .forward(&a.k_proj.forward(&xn)?.reshape((t, nkv, hd))?, positions)?;
        let v = a.v_proj.forward(&xn)?.reshape((t, nkv, hd))?;
        Ok((q, k, v))
    }

    /// Inference MLP block with its residual: x + down(silu(gate(n)) ⊙ up(n)), n = norm(x).
    fn mlp_residual(&self, layer: &DecoderLayer, x: &Tensor) -> Result<Tensor> {
        let (xn2, _) = ops::rms_norm(x, &layer.post_attention_layernorm, self.config.rms_norm_eps)?;
        let h = ops::swiglu(
            &layer.mlp.gate_proj.forward(&xn2)?,
            &layer.mlp.up_proj.forward(&xn2)?,
        )?;
        Ok((x + layer.mlp.down_proj.forward(&h)?)?)
    }

    /// Prefill for sampling: runs packed prompts through the model, returns the final-normed
    /// hidden state of each sequence's last token [n_seqs, H] and, per layer, the rotated keys
    /// and values of every prompt token ([T, kv_dim] each) for the KV cache.
    pub fn prefill(
        &self,
        tokens: &[u32],
        seqs: &VarLen,
        positions: &[u32],
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        self.check_tokens(tokens)?;
        let c = &self.config;
        let t = tokens.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let ids = Tensor::from_slice(tokens, t, &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        let mut kv = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let a = &layer.self_attn;
            let (q, k, v) = self.rotated_qkv(layer, &x, positions)?;
            let (att, _) = ops::attention(&q, &k, &v, seqs)?;
            x = (&x + a.o_proj.forward(&att.reshape((t, nh * hd))?)?)?;
            x = self.mlp_residual(layer, &x)?;
            kv.push((k.reshape((t, nkv * hd))?, v.reshape((t, nkv * hd))?));
        }
        let last: Vec<u32> = (0..seqs.n_seqs())
            .map(|s| (seqs.offsets[s + 1] - 1) as u32)
            .collect();
        let last = Tensor::from_slice(&last, last.len(), &self.device)?;
        let x_last = x.index_select(&last, 0)?;
        let (h_last, _) = ops::rms_norm(&x_last, &self.norm, c.rms_norm_eps)?;
        Ok((h_last, kv))
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|(_, t)| t.elem_count()).sum()
    }
}

fn push_linear<'a>(out: &mut Vec<(String, &'a Tensor)>, prefix: &str, lin: &'a Linear) {
    out.push((format!("{prefix}.weight"), &lin.weight));
    if let Some(b) = &lin.bias {
        out.push((format!("{prefix}.bias"), b));
    }
}
