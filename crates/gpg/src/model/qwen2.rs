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
use super::cpu_layer::{add_into, Attend, CpuLayerOps, LayerGrads, LayerView};
use super::layer::{self, LayerCache, LayerPass};
use super::lora::{Adapter, AdapterGrads};
use super::ops::{self, Rope, VarLen};
pub use super::params::{Attention, DecoderLayer, LeafKind, Linear, Mlp, Qwen2Params};
use super::precision::Precision;
use super::weights::WeightMap;

/// The model's parameters: weight matrices in the compute dtype, vectors in f32.
pub type Weights = Qwen2Params<Tensor>;
/// Gradients (or any f32 buffer per parameter), in the same tree.
pub type Grads = Qwen2Params<Vec<f32>>;

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
    /// A LoRA adapter on the linear layers (see [`super::lora`]); `None`: the plain model.
    adapter: Option<Adapter>,
}

/// Which activations a training forward keeps for its backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Every layer's intermediate values (fastest backward).
    All,
    /// Gradient checkpointing: only each layer's input; the backward recomputes the layer.
    LayerInputs,
    /// Gradient checkpointing on the first `n` layers only (Megatron's block recomputation of
    /// `recompute_num_layers`): the later layers keep every activation, so n recomputations
    /// instead of all, for the later layers' activations of memory.
    LayerInputsOfFirst(usize),
}

impl Activations {
    /// Whether layer `index` keeps every activation (else only its input, or
    /// nothing in a pass without backward).
    pub fn keeps_all(self, index: usize) -> bool {
        match self {
            Activations::All => true,
            Activations::LayerInputs => false,
            Activations::LayerInputsOfFirst(n) => index >= n,
        }
    }
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

/// Where a backward puts its gradients: every parameter, or the adapter only.
enum GradSink<'g> {
    Full(&'g mut Grads),
    Adapter(&'g mut AdapterGrads),
}

/// What one layer kept for its backward: everything, or (checkpointing) its input only.
enum LayerSaved {
    Full(Box<LayerCache<Tensor>>),
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
    /// The adapter dropout seed of this forward (its backward regenerates the same masks).
    dropout_seed: u64,
}

/// The stack's part of a training forward: everything of a [`ForwardCache`] but the head's.
struct StackOutput {
    layers: Vec<LayerSaved>,
    token_rope: Option<Rope>,
    x_final: Tensor,
    rstd_final: Tensor,
    h_scored: Tensor,
    dropout_seed: u64,
}

impl StackOutput {
    fn into_cache(self, lse: Vec<f32>, inv_temperature: f32) -> ForwardCache {
        ForwardCache {
            layers: self.layers,
            token_rope: self.token_rope,
            x_final: self.x_final,
            rstd_final: self.rstd_final,
            h_scored: self.h_scored,
            lse,
            inv_temperature,
            dropout_seed: self.dropout_seed,
        }
    }
}

/// Where a backward starts: at the log-probs, or past the head.
enum HeadGrad<'a> {
    /// g_t = ∂L/∂logp_t: the head's backward (logits recomputed from the cache's lse).
    Weights(&'a [f32]),
    /// ∂L/∂h at the scored rows, the head's gradient already taken
    /// ([`ops::lm_head_forward_backward`]).
    Scored(Tensor),
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
        if super::ModelKind::of_dir(dir).has_tower() {
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
                "{}: the checkpoint holds tensors this {} model does not use: {:?}",
                dir.display(),
                config.family()?.architecture(),
                unexpected
            );
        }
        Self::assemble(config, weights, precision, device)
    }

    /// The model from its weights (the rotary tables are derived from the config: its base and
    /// its scaling, see [`Qwen2Config::rope_inv_freq`]).
    pub fn assemble(
        config: Qwen2Config,
        weights: Weights,
        precision: Precision,
        device: &Device,
    ) -> Result<Self> {
        let rope = Rope::from_inv_freq(
            config.head_dim(),
            &config.rope_inv_freq()?,
            config.max_position_embeddings,
        );
        Ok(Self {
            config,
            weights,
            precision,
            rope,
            device: device.clone(),
            adapter: None,
        })
    }

    /// The LoRA adapter, when one is attached.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    pub fn adapter_mut(&mut self) -> Option<&mut Adapter> {
        self.adapter.as_mut()
    }

    /// Attaches `adapter` (replacing any other): every pass then runs y = Wx + s·B(Ax) on the
    /// adapted layers. Errors when its shapes do not fit this model.
    pub fn set_adapter(&mut self, adapter: Adapter) -> Result<()> {
        adapter.check_fits(self)?;
        self.adapter = Some(adapter);
        Ok(())
    }

    /// The base model with the adapter disabled. Shares the base weights' storage (tensors are
    /// reference-counted): no second copy of the model.
    pub fn without_adapter(&self) -> Qwen2 {
        Qwen2 {
            config: self.config.clone(),
            weights: self.weights.clone(),
            precision: self.precision,
            rope: self.rope.clone(),
            device: self.device.clone(),
            adapter: None,
        }
    }

    /// Layer `index` as a pass sees it (with its adapter pairs; `dropout_seed` given in a
    /// training forward).
    pub(crate) fn layer_view(&self, index: usize, dropout_seed: Option<u64>) -> LayerView<'_> {
        let lora = self.adapter.as_ref();
        LayerView {
            base: &self.weights.layers[index],
            lora: lora.map(|a| &a.pairs.layers[index]),
            index,
            dropout: match (lora, dropout_seed) {
                (Some(a), Some(seed)) if a.config.dropout > 0.0 => Some((a.config.dropout, seed)),
                _ => None,
            },
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
        Self::assemble(config, weights, Precision::F32, device)
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
        let mut model = Self::assemble(self.config.clone(), weights, precision, &self.device)?;
        // The adapter's A and B stay f32 in every precision.
        model.adapter = self.adapter.clone();
        Ok(model)
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

    /// The residual stream entering the final norm, for a packed batch, keeping what the
    /// backward needs (per `keep`, or nothing).
    fn forward_layers(
        &self,
        mut x: Tensor,
        seqs: &VarLen,
        rope: &Rope,
        positions: &[u32],
        keep: Option<Activations>,
        dropout_seed: u64,
    ) -> Result<(Tensor, Vec<LayerSaved>)> {
        let mut ops = CpuLayerOps::new(
            self,
            seqs,
            rope,
            positions,
            keep.map(|_| dropout_seed),
            Attend::PackedCausal,
        );
        let mut saved = Vec::new();
        for index in 0..self.weights.layers.len() {
            let keep_all = keep.map(|k| k.keeps_all(index));
            let input = (keep_all == Some(false)).then(|| x.clone());
            let pass = match keep_all {
                Some(true) => LayerPass::OutputAndCache,
                _ => LayerPass::Output,
            };
            let (next, cache) = layer::layer_forward(&mut ops, index, x, pass)?;
            x = next.context("internal: the layer forward returned no output")?;
            match (cache, input) {
                (Some(cache), _) => saved.push(LayerSaved::Full(Box::new(cache))),
                (None, Some(input)) => saved.push(LayerSaved::Input(input)),
                (None, None) => {}
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
        let stack = self.stack_forward(batch, x, token_rope, keep)?;
        let out = ops::lm_head_logprobs(
            &stack.h_scored,
            self.head_weight(),
            &batch.targets,
            inv_temperature,
        )?;
        let logprobs = TokenLogprobs {
            logprobs: out.logprobs,
            entropy: out.entropy,
        };
        let cache = keep.map(|_| stack.into_cache(out.lse, inv_temperature));
        Ok((logprobs, cache))
    }

    /// The layers and the final norm from stack inputs `x`, up to the hidden states of the
    /// scored rows (see [`Self::forward_embedded`]).
    fn stack_forward(
        &self,
        batch: &TrainBatch,
        x: Tensor,
        token_rope: Option<Rope>,
        keep: Option<Activations>,
    ) -> Result<StackOutput> {
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
        let dropout_seed = self.adapter.as_ref().map_or(0, |a| a.dropout_seed);
        let (x_final, layers) =
            self.forward_layers(x, &batch.seqs, rope, positions, keep, dropout_seed)?;
        let (xf, rstd_final) =
            ops::rms_norm(&x_final, &self.weights.norm, self.config.rms_norm_eps)?;
        let rows = Tensor::from_slice(&batch.score_rows, batch.score_rows.len(), &self.device)?;
        let h_scored = xf.index_select(&rows, 0)?;
        Ok(StackOutput {
            layers,
            token_rope,
            x_final,
            rstd_final,
            h_scored,
            dropout_seed,
        })
    }

    /// Forward and backward of a micro-batch in one call, for token weights g_t = ∂L/∂logp_t
    /// known before the forward (an objective whose g_t does not depend on logp_t, such as
    /// GPG's): the head's logits are formed once for its statistics and its gradient (see
    /// [`ops::lm_head_forward_backward`]) instead of again in the backward. Adds every
    /// parameter's gradient to `grads`, as [`Self::backward_into`] does after
    /// [`Self::forward_train_with`], and returns the forward's log-probs.
    pub fn forward_backward_into(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
        grads: &mut Grads,
    ) -> Result<TokenLogprobs> {
        self.check_full_grads(grads)?;
        let (logprobs, dx) =
            self.forward_backward(batch, inv_temperature, keep, g, GradSink::Full(&mut *grads))?;
        self.add_embedding_grad(&dx, &batch.tokens, |_| true, grads)?;
        Ok(logprobs)
    }

    /// [`Self::forward_backward_into`] into the adapter's A and B only (the base is frozen).
    pub fn forward_backward_adapter_into(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
        grads: &mut AdapterGrads,
    ) -> Result<TokenLogprobs> {
        self.check_adapter_grads(grads)?;
        let (logprobs, _) =
            self.forward_backward(batch, inv_temperature, keep, g, GradSink::Adapter(grads))?;
        Ok(logprobs)
    }

    fn forward_backward(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
        g: &[f32],
        mut sink: GradSink<'_>,
    ) -> Result<(TokenLogprobs, Tensor)> {
        ensure!(
            g.len() == batch.targets.len(),
            "backward: {} token weights for {} completion tokens",
            g.len(),
            batch.targets.len()
        );
        self.check_tokens(&batch.tokens)?;
        let x = self.embed(&batch.tokens)?;
        let stack = self.stack_forward(batch, x, None, Some(keep))?;
        // The head's gradient goes to lm_head, or to the embedding when tied; a frozen head
        // gets none.
        let head_grad = match &mut sink {
            GradSink::Full(grads) => Some(match grads.lm_head.as_mut() {
                Some(g) => g.as_mut_slice(),
                None => grads.embed_tokens.as_mut_slice(),
            }),
            GradSink::Adapter(_) => None,
        };
        let (out, dh_scored) = ops::lm_head_forward_backward(
            &stack.h_scored,
            self.head_weight(),
            &batch.targets,
            g,
            inv_temperature,
            ops::LM_HEAD_FUSED_LOGITS,
            head_grad,
        )?;
        let logprobs = TokenLogprobs {
            logprobs: out.logprobs,
            entropy: out.entropy,
        };
        let cache = stack.into_cache(out.lse, inv_temperature);
        let dx = self.backward_to(batch, cache, HeadGrad::Scored(dh_scored), sink)?;
        Ok((logprobs, dx))
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
    /// model's tree): micro-batches accumulate with no gradient-sized temporary. A model with
    /// an adapter trains the adapter only: use [`Self::backward_adapter_into`].
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
        self.check_full_grads(grads)?;
        self.backward_to(batch, cache, HeadGrad::Weights(g), GradSink::Full(grads))
    }

    /// A full-fine-tuning backward needs a model without adapter and a buffer of its tree.
    fn check_full_grads(&self, grads: &Grads) -> Result<()> {
        ensure!(
            self.adapter.is_none(),
            "backward: the model has a LoRA adapter, whose base is frozen; its gradients go to the adapter (backward_adapter_into)"
        );
        ensure!(
            grads.layers.len() == self.weights.layers.len()
                && grads.lm_head.is_some() == self.weights.lm_head.is_some(),
            "backward: the gradient buffer does not have this model's parameter tree"
        );
        Ok(())
    }

    /// An adapter backward needs a model with an adapter and a buffer of its tree.
    fn check_adapter_grads(&self, grads: &AdapterGrads) -> Result<()> {
        ensure!(
            self.adapter.is_some(),
            "backward: the model has no adapter to train"
        );
        ensure!(
            grads.layers.len() == self.weights.layers.len(),
            "backward: the gradient buffer does not have this adapter's tree"
        );
        Ok(())
    }

    /// Backward from g_t into the adapter's A and B only (adding to `grads`, from
    /// [`Adapter::zero_grads`]). The base weights are frozen: no base gradient is formed, not
    /// even the head's or the embedding's.
    pub fn backward_adapter_into(
        &self,
        batch: &TrainBatch,
        cache: ForwardCache,
        g: &[f32],
        grads: &mut AdapterGrads,
    ) -> Result<()> {
        self.check_adapter_grads(grads)?;
        self.backward_to(batch, cache, HeadGrad::Weights(g), GradSink::Adapter(grads))
            .map(|_stack_input_grad| ())
    }

    fn backward_to(
        &self,
        batch: &TrainBatch,
        cache: ForwardCache,
        head: HeadGrad<'_>,
        sink: GradSink<'_>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = batch.tokens.len();
        let h = c.hidden_size;
        let rows: Vec<u32>;
        let (rope, positions) = match &cache.token_rope {
            Some(r) => {
                rows = (0..t as u32).collect();
                (r, rows.as_slice())
            }
            None => (&self.rope, batch.positions.as_slice()),
        };

        let (mut full, layer_grads): (Option<_>, Vec<LayerGrads<'_>>) = match sink {
            GradSink::Full(grads) => {
                let Qwen2Params {
                    embed_tokens,
                    layers,
                    norm,
                    lm_head,
                } = grads;
                (
                    Some((embed_tokens, norm, lm_head)),
                    layers.iter_mut().map(LayerGrads::Full).collect(),
                )
            }
            GradSink::Adapter(grads) => (
                None,
                grads.layers.iter_mut().map(LayerGrads::Adapter).collect(),
            ),
        };

        // Output head (its gradient goes to lm_head, or to the embedding when tied; a frozen
        // head gets none).
        let dh_scored = match head {
            HeadGrad::Scored(dh) => dh,
            HeadGrad::Weights(g) => {
                ensure!(
                    g.len() == batch.targets.len(),
                    "backward: {} token weights for {} completion tokens",
                    g.len(),
                    batch.targets.len()
                );
                match full.as_mut() {
                    Some((embed, _, lm_head)) => {
                        let head_grad = match lm_head.as_mut() {
                            Some(g) => g,
                            None => &mut **embed,
                        };
                        ops::lm_head_backward_into(
                            &cache.h_scored,
                            self.head_weight(),
                            &batch.targets,
                            &cache.lse,
                            g,
                            cache.inv_temperature,
                            ops::LM_HEAD_CHUNK_LOGITS,
                            head_grad,
                        )?
                    }
                    None => ops::lm_head_backward_input(
                        &cache.h_scored,
                        self.head_weight(),
                        &batch.targets,
                        &cache.lse,
                        g,
                        cache.inv_temperature,
                        ops::LM_HEAD_CHUNK_LOGITS,
                    )?,
                }
            }
        };
        // Final norm.
        let rows = Tensor::from_slice(&batch.score_rows, batch.score_rows.len(), &self.device)?;
        let dxf =
            Tensor::zeros((t, h), DType::F32, &self.device)?.index_add(&rows, &dh_scored, 0)?;
        let (mut dx, d_norm) =
            ops::rms_norm_backward(&dxf, &cache.x_final, &self.weights.norm, &cache.rstd_final)?;
        if let Some((_, norm, _)) = full.as_mut() {
            add_into(norm, &d_norm)?;
        }

        let mut ops = CpuLayerOps::new(
            self,
            &batch.seqs,
            rope,
            positions,
            Some(cache.dropout_seed),
            Attend::PackedCausal,
        )
        .with_grads(layer_grads);
        for (index, saved) in cache.layers.into_iter().enumerate().rev() {
            let lc = match saved {
                LayerSaved::Full(lc) => *lc,
                LayerSaved::Input(x) => {
                    layer::layer_forward(&mut ops, index, x, LayerPass::Recompute)?
                        .1
                        .context("internal: recomputed layer kept no activations")?
                }
            };
            dx = layer::layer_backward(&mut ops, index, &dx, &lc)?;
        }
        Ok(dx)
    }

    /// Logits of the next token after each row of `h` (final-normed hidden states [B, H]).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        ops::linear(h, self.head_weight(), None)
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
        let mut ops = CpuLayerOps::new(
            self,
            seqs,
            rope,
            positions,
            None,
            Attend::PackedCausalKeepingKv,
        );
        for index in 0..self.weights.layers.len() {
            x = layer::layer_forward(&mut ops, index, x, LayerPass::Output)?
                .0
                .context("internal: the layer forward returned no output")?;
        }
        let kv = ops.kv;
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
