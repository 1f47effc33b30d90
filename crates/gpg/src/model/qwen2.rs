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
pub use super::params::{Attention, DecoderLayer, LeafKind, Linear, Mlp, Qwen2Params};
use super::precision::Precision;
use super::weights::WeightMap;

/// The model's parameters: weight matrices in the compute dtype, vectors in f32.
pub type Weights = Qwen2Params<Tensor>;
/// Gradients (or any f32 buffer per parameter), in the same tree.
pub type Grads = Qwen2Params<Vec<f32>>;

impl Linear<Tensor> {
    /// y = x·Wᵀ (+ b).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }

    /// Given dy = ∂L/∂y and the input x: adds ∂L/∂W = dyᵀ·x and ∂L/∂b = Σ_rows dy to `grad`
    /// and returns ∂L/∂x = dy·W.
    pub(crate) fn backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        grad: &mut Linear<Vec<f32>>,
    ) -> Result<Tensor> {
        let dx = ops::linear_backward_input(dy, &self.weight)?;
        ops::linear_backward_params(
            dy,
            x,
            &mut grad.weight,
            grad.bias.as_deref_mut(),
            self.weight.dtype() == DType::BF16,
        )?;
        Ok(dx)
    }
}

/// `Qwen2ForCausalLM`: `model.*` plus the output head (`lm_head.weight`, or the embedding
/// matrix when the head is tied).
#[derive(Debug, Clone)]
pub struct Qwen2 {
    pub config: Qwen2Config,
    /// Every parameter, held once.
    pub weights: Weights,
    precision: Precision,
    rope: Rope,
    device: Device,
}

/// Which activations a training forward keeps for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Every layer's intermediate values (fastest backward).
    All,
    /// Gradient checkpointing: only each layer's input; the backward recomputes the layer.
    LayerInputs,
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

/// What one layer kept for its backward: everything, or (checkpointing) its input only.
enum LayerSaved {
    Full(Box<LayerCache>),
    Input(Tensor),
}

/// Everything the backward needs from one training forward.
pub struct ForwardCache {
    layers: Vec<LayerSaved>,
    /// Per-token rotary tables (M-RoPE) when the pass was given them; `None`: the model's
    /// 1-D table at `TrainBatch::positions`.
    token_rope: Option<Rope>,
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

impl Qwen2 {
    /// Loads a Hugging Face Qwen2 checkpoint directory (config.json + safetensors) in f32.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        Self::load(dir, device, Precision::F32)
    }

    /// Loads a checkpoint directory with its weight matrices in `precision` (a bf16 file loads
    /// into a bf16 model without widening). Every tensor is checked for NaN/±inf.
    pub fn load(dir: &Path, device: &Device, precision: Precision) -> Result<Self> {
        if super::qwen2_vl::Qwen2VLConfig::is_vl_dir(dir) {
            bail!(
                "{}: a Qwen2-VL-family (vision-language) checkpoint; this command takes text-only \
                 Qwen2 models (vision-language models: `gpg-rl generate --chat --image`, see \
                 docs/multimodal.md)",
                dir.display()
            );
        }
        let config = Qwen2Config::from_dir(dir)?;
        config.validate()?;
        let mut w = WeightMap::from_dir(dir, device)?;
        let weights = Weights::build(&config, |leaf| {
            w.take(&leaf.name, &leaf.shape, leaf_dtype(leaf.kind, precision))
        })
        .with_context(|| format!("{}: checkpoint does not match config.json", dir.display()))?;
        if config.tie_word_embeddings {
            // Some tied checkpoints still store a copy of the head; it must equal the embedding.
            w.take_optional(
                "lm_head.weight",
                &[config.vocab_size, config.hidden_size],
                precision.matrix_dtype(),
            )?;
        }
        let unused = w.remaining();
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
        Ok(Self::assemble(config, weights, precision, device))
    }

    /// The model from its weights (the rotary tables are derived from the config).
    pub fn assemble(
        config: Qwen2Config,
        weights: Weights,
        precision: Precision,
        device: &Device,
    ) -> Self {
        let rope = Rope::new(
            config.head_dim(),
            config.rope_theta(),
            config.max_position_embeddings,
        );
        Self {
            config,
            weights,
            precision,
            rope,
            device: device.clone(),
        }
    }

    /// A randomly initialised f32 model as transformers initialises Qwen2: linear and
    /// embedding weights ~ N(0, std²), biases 0, norm weights 1.
    pub fn random(config: Qwen2Config, std: f32, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, std).context("invalid initialisation std")?;
        let weights = Weights::build(&config, |leaf| {
            let n: usize = leaf.shape.iter().product();
            Ok(match leaf.kind {
                LeafKind::Embedding | LeafKind::LinearWeight => {
                    let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                    Tensor::from_vec(data, leaf.shape.as_slice(), device)?
                }
                LeafKind::Bias => Tensor::zeros(n, DType::F32, device)?,
                LeafKind::Norm => Tensor::ones(n, DType::F32, device)?,
            })
        })?;
        Ok(Self::assemble(config, weights, Precision::F32, device))
    }

    /// The same model with its weight matrices converted to `precision` (rounded to nearest
    /// even for bf16).
    pub fn to_precision(&self, precision: Precision) -> Result<Self> {
        let info: Qwen2Params<LeafKind> = Qwen2Params::build(&self.config, |leaf| Ok(leaf.kind))?;
        let kinds: std::collections::HashMap<String, LeafKind> =
            info.named().into_iter().map(|(n, k)| (n, *k)).collect();
        let weights = self.weights.try_map(|name, t| {
            let kind = kinds.get(name).copied().unwrap_or(LeafKind::Norm);
            Ok(t.to_dtype(leaf_dtype(kind, precision))?)
        })?;
        Ok(Self::assemble(
            self.config.clone(),
            weights,
            precision,
            &self.device,
        ))
    }

    /// The precision the weights are held in.
    pub fn precision(&self) -> Precision {
        self.precision
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
        self.weights
            .lm_head
            .as_ref()
            .unwrap_or(&self.weights.embed_tokens)
    }

    /// Every parameter with its Hugging Face name, in the tree's fixed order.
    pub fn parameters(&self) -> Vec<(String, &Tensor)> {
        self.weights.named()
    }

    pub fn parameter_names(&self) -> Vec<String> {
        self.parameters().into_iter().map(|(n, _)| n).collect()
    }

    /// A zero f32 buffer for every parameter (a gradient accumulator).
    pub fn zero_grads(&self) -> Result<Grads> {
        self.weights
            .try_map(|_, t| Ok(vec![0.0f32; t.elem_count()]))
    }

    /// The rows of the embedding matrix for `tokens`, as f32 [T, H].
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(tokens, tokens.len(), &self.device)?;
        Ok(self
            .weights
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(DType::F32)?)
    }

    /// One layer forward over a packed batch: the next residual stream and, when `keep`, the
    /// values its backward needs.
    fn layer_forward(
        &self,
        layer: &DecoderLayer<Tensor>,
        x: Tensor,
        seqs: &VarLen,
        rope: &Rope,
        positions: &[u32],
        keep: bool,
    ) -> Result<(Tensor, Option<LayerCache>)> {
        let c = &self.config;
        let t = x.dim(0)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let (xn, rstd1) = ops::rms_norm(&x, &layer.input_layernorm, c.rms_norm_eps)?;
        let a = &layer.self_attn;
        let q = a.q_proj.forward(&xn)?.reshape((t, nh, hd))?;
        let k = a.k_proj.forward(&xn)?.reshape((t, nkv, hd))?;
        let v = a.v_proj.forward(&xn)?.reshape((t, nkv, hd))?;
        let q = rope.forward(&q, positions)?;
        let k = rope.forward(&k, positions)?;
        let (att, lse) = ops::attention(&q, &k, &v, seqs)?;
        let att = att.reshape((t, nh * hd))?;
        let xm = (&x + a.o_proj.forward(&att)?)?;
        let (xn2, rstd2) = ops::rms_norm(&xm, &layer.post_attention_layernorm, c.rms_norm_eps)?;
        let gate = layer.mlp.gate_proj.forward(&xn2)?;
        let up = layer.mlp.up_proj.forward(&xn2)?;
        let h = ops::swiglu(&gate, &up)?;
        let x_next = (&xm + layer.mlp.down_proj.forward(&h)?)?;
        let cache = keep.then_some(LayerCache {
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
        Ok((x_next, cache))
    }

    /// The residual stream entering the final norm, for a packed batch, keeping what the
    /// backward needs (per `keep`, or nothing).
    fn forward_layers(
        &self,
        mut x: Tensor,
        seqs: &VarLen,
        rope: &Rope,
        positions: &[u32],
        keep: Option<Activations>,
    ) -> Result<(Tensor, Vec<LayerSaved>)> {
        let mut saved = Vec::new();
        for layer in &self.weights.layers {
            match keep {
                Some(Activations::All) => {
                    let (next, cache) =
                        self.layer_forward(layer, x, seqs, rope, positions, true)?;
                    let cache = cache.context("internal: layer kept no activations")?;
                    saved.push(LayerSaved::Full(Box::new(cache)));
                    x = next;
                }
                Some(Activations::LayerInputs) => {
                    let input = x.clone();
                    let (next, _) = self.layer_forward(layer, x, seqs, rope, positions, false)?;
                    saved.push(LayerSaved::Input(input));
                    x = next;
                }
                None => {
                    x = self
                        .layer_forward(layer, x, seqs, rope, positions, false)?
                        .0
                }
            }
        }
        Ok((x, saved))
    }

    /// Training forward: the log-prob (and entropy) of every completion token under
    /// softmax(inv_temperature · logits), never holding batch × length × vocab logits.
    /// Returns the cache the backward needs (all activations).
    pub fn forward_train(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
    ) -> Result<(TokenLogprobs, ForwardCache)> {
        self.forward_train_with(batch, inv_temperature, Activations::All)
    }

    /// [`Self::forward_train`] keeping `keep` (gradient checkpointing keeps layer inputs only).
    pub fn forward_train_with(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
    ) -> Result<(TokenLogprobs, ForwardCache)> {
        let (logprobs, cache) = self.forward_scored(batch, inv_temperature, Some(keep))?;
        let cache = cache.context("internal: the training forward kept no activations")?;
        Ok((logprobs, cache))
    }

    /// Log-probs only (evaluation, reference and old-policy log-probs): no activations kept.
    pub fn logprobs(&self, batch: &TrainBatch, inv_temperature: f32) -> Result<TokenLogprobs> {
        Ok(self.forward_scored(batch, inv_temperature, None)?.0)
    }

    /// The forward up to the scored completion tokens, keeping activations per `keep`.
    fn forward_scored(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Option<Activations>,
    ) -> Result<(TokenLogprobs, Option<ForwardCache>)> {
        self.check_tokens(&batch.tokens)?;
        let x = self.embed(&batch.tokens)?;
        self.forward_embedded(batch, x, None, inv_temperature, keep)
    }

    /// The forward from given stack inputs `x` [T, H] (the token embeddings with, say, image
    /// embeddings spliced in) instead of `batch.tokens`' embeddings. With `token_rope` (one
    /// table row per packed token, e.g. M-RoPE) row t rotates by row t of it; without, by the
    /// model's table at `batch.positions`. Keeps activations per `keep`.
    pub fn forward_embedded(
        &self,
        batch: &TrainBatch,
        x: Tensor,
        token_rope: Option<Rope>,
        inv_temperature: f32,
        keep: Option<Activations>,
    ) -> Result<(TokenLogprobs, Option<ForwardCache>)> {
        ensure!(
            x.dims() == [batch.tokens.len(), self.config.hidden_size],
            "forward: stack inputs of shape {:?} for {} tokens of width {}",
            x.dims(),
            batch.tokens.len(),
            self.config.hidden_size
        );
        let rows: Vec<u32>;
        let (rope, positions) = match &token_rope {
            Some(r) => {
                rows = (0..batch.tokens.len() as u32).collect();
                (r, rows.as_slice())
            }
            None => (&self.rope, batch.positions.as_slice()),
        };
        let (x_final, layers) = self.forward_layers(x, &batch.seqs, rope, positions, keep)?;
        let (xf, rstd_final) =
            ops::rms_norm(&x_final, &self.weights.norm, self.config.rms_norm_eps)?;
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
        let cache = keep.map(|_| ForwardCache {
            layers,
            token_rope,
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
    /// the gradient of L with respect to every parameter, in a fresh buffer.
    pub fn backward(&self, batch: &TrainBatch, cache: ForwardCache, g: &[f32]) -> Result<Grads> {
        let mut grads = self.zero_grads()?;
        self.backward_into(batch, cache, g, &mut grads)?;
        Ok(grads)
    }

    /// Backward from g_t, adding every parameter's gradient to `grads` (which must have this
    /// model's tree): micro-batches accumulate with no gradient-sized temporary.
    pub fn backward_into(
        &self,
        batch: &TrainBatch,
        cache: ForwardCache,
        g: &[f32],
        grads: &mut Grads,
    ) -> Result<()> {
        let dx = self.backward_to_inputs(batch, cache, g, grads)?;
        self.add_embedding_grad(&dx, &batch.tokens, |_| true, grads)
    }

    /// Scatter-adds the stack-input gradient `dx` [T, H] into the embedding rows of `tokens`,
    /// for the rows `row_is_token` accepts (rows holding spliced-in embeddings are skipped).
    pub fn add_embedding_grad(
        &self,
        dx: &Tensor,
        tokens: &[u32],
        row_is_token: impl Fn(usize) -> bool,
        grads: &mut Grads,
    ) -> Result<()> {
        let h = self.config.hidden_size;
        let dx = dx.flatten_all()?.to_vec1::<f32>()?;
        for (i, (row, &tok)) in dx.chunks_exact(h).zip(tokens).enumerate() {
            if !row_is_token(i) {
                continue;
            }
            let dst = &mut grads.embed_tokens[tok as usize * h..(tok as usize + 1) * h];
            dst.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// Backward from g_t through the head and every layer, adding the parameter gradients to
    /// `grads` (all but the embedding's); returns ∂L/∂x of the stack inputs [T, H].
    pub fn backward_to_inputs(
        &self,
        batch: &TrainBatch,
        cache: ForwardCache,
        g: &[f32],
        grads: &mut Grads,
    ) -> Result<Tensor> {
        ensure!(
            g.len() == batch.targets.len(),
            "backward: {} token weights for {} completion tokens",
            g.len(),
            batch.targets.len()
        );
        ensure!(
            grads.layers.len() == self.weights.layers.len()
                && grads.lm_head.is_some() == self.weights.lm_head.is_some(),
            "backward: the gradient buffer does not have this model's parameter tree"
        );
        let c = &self.config;
        let t = batch.tokens.len();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let h = c.hidden_size;
        let rows: Vec<u32>;
        let (rope, positions) = match &cache.token_rope {
            Some(r) => {
                rows = (0..t as u32).collect();
                (r, rows.as_slice())
            }
            None => (&self.rope, batch.positions.as_slice()),
        };

        // Output head (its gradient goes to lm_head, or to the embedding when tied).
        let head_grad = match grads.lm_head.as_mut() {
            Some(g) => g,
            None => &mut grads.embed_tokens,
        };
        let dh_scored = ops::lm_head_backward_into(
            &cache.h_scored,
            self.head_weight(),
            &batch.targets,
            &cache.lse,
            g,
            cache.inv_temperature,
            ops::LM_HEAD_CHUNK_LOGITS,
            head_grad,
        )?;
        // Final norm.
        let rows = Tensor::from_slice(&batch.score_rows, batch.score_rows.len(), &self.device)?;
        let dxf =
            Tensor::zeros((t, h), DType::F32, &self.device)?.index_add(&rows, &dh_scored, 0)?;
        let (mut dx, d_norm) =
            ops::rms_norm_backward(&dxf, &cache.x_final, &self.weights.norm, &cache.rstd_final)?;
        add_into(&mut grads.norm, &d_norm)?;

        for ((layer, saved), lg) in self
            .weights
            .layers
            .iter()
            .zip(cache.layers)
            .zip(grads.layers.iter_mut())
            .rev()
        {
            let lc = match saved {
                LayerSaved::Full(lc) => *lc,
                LayerSaved::Input(x) => self
                    .layer_forward(layer, x, &batch.seqs, rope, positions, true)?
                    .1
                    .context("internal: recomputed layer kept no activations")?,
            };
            // x' = xm + down(swiglu(gate(xn2), up(xn2)))
            let dhid = layer
                .mlp
                .down_proj
                .backward(&dx, &lc.h, &mut lg.mlp.down_proj)?;
            let (dgate, dup) = ops::swiglu_backward(&dhid, &lc.gate, &lc.up)?;
            let dxn2_g = layer
                .mlp
                .gate_proj
                .backward(&dgate, &lc.xn2, &mut lg.mlp.gate_proj)?;
            let dxn2_u = layer
                .mlp
                .up_proj
                .backward(&dup, &lc.xn2, &mut lg.mlp.up_proj)?;
            let dxn2 = (dxn2_g + dxn2_u)?;
            let (dxm_norm, d_ln2) =
                ops::rms_norm_backward(&dxn2, &lc.xm, &layer.post_attention_layernorm, &lc.rstd2)?;
            add_into(&mut lg.post_attention_layernorm, &d_ln2)?;
            let dxm = (&dx + dxm_norm)?;
            // xm = x + o_proj(att)
            let a = &layer.self_attn;
            let ga = &mut lg.self_attn;
            let datt = a.o_proj.backward(&dxm, &lc.att, &mut ga.o_proj)?;
            let att = lc.att.reshape((t, nh, hd))?;
            let datt = datt.reshape((t, nh, hd))?;
            let (dq, dk, dv) =
                ops::attention_backward(&datt, &lc.q, &lc.k, &lc.v, &att, &lc.lse, &batch.seqs)?;
            let dq = rope.backward(&dq, positions)?.reshape((t, nh * hd))?;
            let dk = rope.backward(&dk, positions)?.reshape((t, nkv * hd))?;
            let dv = dv.reshape((t, nkv * hd))?;
            let dxn_q = a.q_proj.backward(&dq, &lc.xn, &mut ga.q_proj)?;
            let dxn_k = a.k_proj.backward(&dk, &lc.xn, &mut ga.k_proj)?;
            let dxn_v = a.v_proj.backward(&dv, &lc.xn, &mut ga.v_proj)?;
            let dxn = ((dxn_q + dxn_k)? + dxn_v)?;
            let (dx_norm, d_ln1) =
                ops::rms_norm_backward(&dxn, &lc.x, &layer.input_layernorm, &lc.rstd1)?;
            add_into(&mut lg.input_layernorm, &d_ln1)?;
            dx = (dxm + dx_norm)?;
        }
        Ok(dx)
    }

    /// Logits of the next token after each row of `h` (final-normed hidden states [B, H]).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        ops::linear(h, self.head_weight(), None)
    }

    /// Inference half of a layer's attention block: the input norm, then q, k, v of every row,
    /// with q and k rotated to `positions` (q: [T, nh, hd], k and v: [T, nkv, hd]).
    fn rotated_qkv(
        &self,
        layer: &DecoderLayer<Tensor>,
        x: &Tensor,
        rope: &Rope,
        positions: &[u32],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let t = x.dim(0)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let (xn, _) = ops::rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
        let a = &layer.self_attn;
        let q = rope.forward(&a.q_proj.forward(&xn)?.reshape((t, nh, hd))?, positions)?;
        let k = rope.forward(&a.k_proj.forward(&xn)?.reshape((t, nkv, hd))?, positions)?;
        let v = a.v_proj.forward(&xn)?.reshape((t, nkv, hd))?;
        Ok((q, k, v))
    }

    /// Inference MLP block with its residual: x + down(silu(gate(n)) ⊙ up(n)), n = norm(x).
    fn mlp_residual(&self, layer: &DecoderLayer<Tensor>, x: &Tensor) -> Result<Tensor> {
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
        let x = self.embed(tokens)?;
        self.prefill_embedded(x, seqs, &self.rope, positions)
    }

    /// [`Self::prefill`] from given stack inputs `x` [T, H], rotating row t by `rope` at
    /// `positions[t]` (per-token tables with positions 0..T for M-RoPE).
    pub fn prefill_embedded(
        &self,
        mut x: Tensor,
        seqs: &VarLen,
        rope: &Rope,
        positions: &[u32],
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let c = &self.config;
        let t = x.dim(0)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        let mut kv = Vec::with_capacity(self.weights.layers.len());
        for layer in &self.weights.layers {
            let a = &layer.self_attn;
            let (q, k, v) = self.rotated_qkv(layer, &x, rope, positions)?;
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
        let (h_last, _) = ops::rms_norm(&x_last, &self.weights.norm, c.rms_norm_eps)?;
        Ok((h_last, kv))
    }

    /// Number of scalar parameters.
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|(_, t)| t.elem_count()).sum()
    }
}

/// The dtype a leaf of `kind` is held in at `precision`: matrices in the compute dtype,
/// norm weights and biases in f32.
pub fn leaf_dtype(kind: LeafKind, precision: Precision) -> DType {
    if kind.is_matrix() {
        precision.matrix_dtype()
    } else {
        DType::F32
    }
}

/// grad += t (elementwise; t is an f32 tensor of grad's length).
fn add_into(grad: &mut [f32], t: &Tensor) -> Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    ensure!(
        v.len() == grad.len(),
        "internal: gradient of {} elements for a buffer of {}",
        v.len(),
        grad.len()
    );
    grad.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
    Ok(())
}
