//! The training step on a GPU (feature `cuda`): the CPU engine's forward (per-token log-probs of
//! the completion tokens of a packed [`TrainBatch`]), its backward from g_t = ∂L/∂log π(o_t),
//! the global gradient norm with clipping and AdamW, all on the device with the kernels of
//! `ops/cuda` and cuBLAS products.
//!
//! [`CudaTrainStep`] holds, per parameter, the f32 master weight, for bf16 matrices their bf16
//! compute copy, the f32 gradient and AdamW's two moments.
//! The layers run the decoder layer defined once in [`super::layer`] (the CPU engine's), over
//! [`CudaLayerOps`]: a value is an f32 device buffer (with its bf16 rounding made when a bf16
//! product reads it), each op a kernel or a cuBLAS product. The forward keeps per layer what
//! [`LayerCache`] names (or, with gradient checkpointing, the layer's input); the backward is
//! the CPU engine's, layer by layer in reverse:
//!
//! ```text
//! head:  dz = g·(1[v = target] − p) per vocabulary chunk; dh = τ⁻¹·dz·W; dW += τ⁻¹·dzᵀ·h
//! final norm, then per layer (dx the residual stream's gradient):
//!   dh_mlp = dx·W_down, dW_down += dxᵀ·h_mlp; (dg, du) = swiglu'(g, u)·dh_mlp
//!   dxn2 = dg·W_gate + du·W_up (dW_gate, dW_up += ·ᵀ·xn2); dx += rms_norm'(dxn2)
//!   datt = dx·W_o, dW_o += dxᵀ·att; (dq, dk, dv) = attention'(datt); dq, dk ← rope⁻¹
//!   dW_{q,k,v} += d{q,k,v}ᵀ·xn1, db += Σ_rows d{q,k,v}; dxn1 = Σ d{q,k,v}·W; dx += rms_norm'(dxn1)
//! embedding: dE[token] += dx (and the head's dW when tied)
//! ```
//!
//! With bf16 weights every product takes bf16 operands (the activation or gradient operand
//! rounded to bf16) with f32 accumulation, as on the CPU. Used by the trainer on a CUDA device
//! (`train::engine::CudaEngine`: `train`, `sft`, `bench trainer`) and by `bench engine
//! --device cuda`, and compared with the CPU engine by `bench/gpu/check-a.sh`. Verified here only
//! as far as compiling.
//!
//! The optimiser itself is the training engine's (`train::engine`): it keeps the step counts and
//! computes each update's scalars, which [`CudaTrainStep::adamw`] hands to the device kernel;
//! the moments and masters go in and out by parameter name ([`CudaTrainStep::restore_moments`],
//! [`CudaTrainStep::moments`], [`CudaTrainStep::restore_masters`], [`CudaTrainStep::masters`]),
//! so a checkpoint written from the GPU is the CPU trainer's and resumes on either device.

use std::sync::Arc;

use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use cudarc::driver::CudaSlice;

use super::layer::{self, Heads, LayerBackwardOps, LayerCache, LayerOps, LayerPass, Norm, Proj};
use super::ops::cuda::ops::{self as dev, At, AttentionDims, RopeTables};
use super::ops::cuda::plan;
use super::ops::cuda::Gpu;
use super::params::{DecoderLayer, Linear, Qwen2Params};
use super::qwen2::{Activations, Qwen2, TokenLogprobs, TrainBatch};

/// One parameter's AdamW moments on the host: (HF name, exp_avg, exp_avg_sq).
pub type NamedMoments = (String, Vec<f32>, Vec<f32>);

/// One parameter on the device.
pub struct DevParam {
    /// The f32 master weight (the compute weight of f32 leaves).
    pub master: CudaSlice<f32>,
    /// The bf16 compute copy of a bf16 leaf (raw bits).
    pub bf16: Option<CudaSlice<u16>>,
    pub grad: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    len: usize,
    dims: Vec<usize>,
    dtype: DType,
}

impl DevParam {
    /// The parameter's shape (as in the model).
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// `frozen`: forward only — no gradient, no moments, and for a bf16 leaf no f32 master
    /// (the forward reads the bf16 copy of a bf16 leaf, the master of an f32 one): a bf16
    /// model's copy costs its own size.
    fn upload(gpu: &Gpu, t: &Tensor, frozen: bool) -> Result<Self> {
        let len = t.elem_count();
        let state = if frozen { 1 } else { len };
        if frozen && t.dtype() == DType::BF16 {
            let bits: Vec<u16> = t
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .into_iter()
                .map(|b| b.to_bits())
                .collect();
            return Ok(DevParam {
                master: dev::zeros(gpu, 1)?,
                bf16: Some(dev::upload(gpu, &bits)?),
                grad: dev::zeros(gpu, 1)?,
                m: dev::zeros(gpu, 1)?,
                v: dev::zeros(gpu, 1)?,
                len,
                dims: t.dims().to_vec(),
                dtype: t.dtype(),
            });
        }
        let master: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let bf16 = if t.dtype() == DType::BF16 {
            let bits: Vec<u16> = t
                .flatten_all()?
                .to_vec1::<half::bf16>()?
                .into_iter()
                .map(|b| b.to_bits())
                .collect();
            Some(dev::upload(gpu, &bits)?)
        } else {
            None
        };
        Ok(DevParam {
            master: dev::upload(gpu, &master)?,
            bf16,
            grad: dev::zeros(gpu, state)?,
            m: dev::zeros(gpu, state)?,
            v: dev::zeros(gpu, state)?,
            len,
            dims: t.dims().to_vec(),
            dtype: t.dtype(),
        })
    }

    /// The weight as a product operand.
    fn at(&self, gpu: &Gpu, offset: usize) -> At {
        match &self.bf16 {
            Some(b) => At {
                addr: dev::address(gpu, b, offset),
                bf16: true,
            },
            None => At {
                addr: dev::address(gpu, &self.master, offset),
                bf16: false,
            },
        }
    }
}

/// An f32 activation and, for bf16 models, its bf16 rounding (the products' operand).
struct Act {
    f32: CudaSlice<f32>,
    bf16: Option<CudaSlice<u16>>,
}

impl Act {
    fn new(gpu: &Gpu, x: CudaSlice<f32>, n: usize, bf16: bool) -> Result<Self> {
        let b = if bf16 {
            let mut b = dev::zeros::<u16>(gpu, n)?;
            dev::cast_to_bf16(gpu, &x, &mut b, n)?;
            Some(b)
        } else {
            None
        };
        Ok(Act { f32: x, bf16: b })
    }

    fn at(&self, gpu: &Gpu) -> At {
        match &self.bf16 {
            Some(b) => At {
                addr: dev::address(gpu, b, 0),
                bf16: true,
            },
            None => At {
                addr: dev::address(gpu, &self.f32, 0),
                bf16: false,
            },
        }
    }
}

/// What the forward keeps of one layer: everything, or with gradient checkpointing only its
/// input (the backward reruns the layer from it).
enum SavedLayer {
    All(Box<LayerCache<Value>>),
    Input(Value),
}

/// What the forward keeps for the backward.
pub struct CudaForwardCache {
    layers: Vec<SavedLayer>,
    x_final: CudaSlice<f32>,
    rstd_final: CudaSlice<f32>,
    h_scored: Act,
    lse: CudaSlice<f32>,
    inv_temperature: f32,
    seq_start: CudaSlice<u32>,
    seq_end: CudaSlice<u32>,
    positions: CudaSlice<u32>,
}

/// A model's parameters, gradients and AdamW moments on a GPU.
pub struct CudaTrainStep {
    gpu: Arc<Gpu>,
    params: Qwen2Params<DevParam>,
    hidden: usize,
    vocab: usize,
    eps: f32,
    dims: AttentionDims,
    rope: RopeTables,
    bf16: bool,
    /// Logits alive at once in the head (rows × chunk columns).
    head_budget: usize,
    /// A forward-only copy ([`CudaTrainStep::frozen`]): backward, step and the state
    /// accessors refuse.
    frozen: bool,
}

/// A device copy of `x`.
fn dup(gpu: &Gpu, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
    gpu.stream
        .clone_dtod(x)
        .map_err(|e| anyhow::anyhow!("cuda: copying an activation: {e:?}"))
}

/// Copies `values` into the first `values.len()` elements of `dst`.
fn upload_into(gpu: &Gpu, values: &[f32], dst: &mut CudaSlice<f32>, what: &str) -> Result<()> {
    ensure!(
        values.len() <= dst.len(),
        "cuda: {what} of {} values for a buffer of {}",
        values.len(),
        dst.len()
    );
    let mut view = dst.slice_mut(0..values.len());
    gpu.stream
        .memcpy_htod(values, &mut view)
        .map_err(|e| anyhow::anyhow!("cuda: uploading the {what}: {e:?}"))
}

/// y[rows, out] = x·Wᵀ (+ b) for a weight [out, inp].
fn linear_fwd(gpu: &Gpu, w: &Linear<DevParam>, x: At, rows: usize) -> Result<CudaSlice<f32>> {
    let (out, inp) = (w.weight.dims[0], w.weight.dims[1]);
    let mut y = dev::zeros::<f32>(gpu, rows * out)?;
    let c = dev::address(gpu, &y, 0);
    // Column-major yᵀ[out, rows] = W(col-major [inp, out])ᵀ · xᵀ(col-major [inp, rows]).
    dev::gemm_at(
        gpu,
        (true, false),
        (out, rows, inp),
        (w.weight.at(gpu, 0), inp),
        (x, inp),
        (c, out),
        1.0,
        0.0,
    )?;
    if let Some(b) = &w.bias {
        dev::add_bias(gpu, &mut y, &b.master, rows, out)?;
    }
    Ok(y)
}

/// dx[rows, inp] = dy·W, and dW += dyᵀ·x, db += Σ_rows dy (`x`, `dy`: the product operands;
/// `dy_f32`: dy in f32, for the bias).
fn linear_bwd(
    gpu: &Gpu,
    w: &mut Linear<DevParam>,
    x: At,
    dy: At,
    dy_f32: &CudaSlice<f32>,
    rows: usize,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let (out, inp) = (w.weight.dims[0], w.weight.dims[1]);
    let dxa = dev::address(gpu, dx, 0);
    // dxᵀ(col-major [inp, rows]) = W(col-major [inp, out]) · dyᵀ(col-major [out, rows]).
    dev::gemm_at(
        gpu,
        (false, false),
        (inp, rows, out),
        (w.weight.at(gpu, 0), inp),
        (dy, out),
        (dxa, inp),
        1.0,
        0.0,
    )?;
    // dW(col-major [inp, out]) += xᵀ(col-major [inp, rows]) · dy(col-major [out, rows])ᵀ.
    let dwa = dev::address(gpu, &w.weight.grad, 0);
    dev::gemm_at(
        gpu,
        (false, true),
        (inp, out, rows),
        (x, inp),
        (dy, out),
        (dwa, inp),
        1.0,
        1.0,
    )?;
    if let Some(b) = &mut w.bias {
        dev::add_col_sums(gpu, dy_f32, rows, out, &mut b.grad)?;
    }
    Ok(())
}

impl CudaTrainStep {
    /// Uploads `model`'s parameters (f32 masters, bf16 copies of bf16 leaves) with zero
    /// gradients and moments.
    pub fn new(gpu: Arc<Gpu>, model: &Qwen2) -> Result<Self> {
        Self::upload(gpu, model, false)
    }

    /// A forward-only copy of `model` on the device (the frozen KL reference, scoring): the
    /// weights in the model's dtype, no gradients, moments or f32 masters of bf16 leaves. Its
    /// [`CudaTrainStep::forward_with`] is the train step's forward, kernel for kernel.
    pub fn frozen(gpu: Arc<Gpu>, model: &Qwen2) -> Result<Self> {
        Self::upload(gpu, model, true)
    }

    fn upload(gpu: Arc<Gpu>, model: &Qwen2, frozen: bool) -> Result<Self> {
        let c = &model.config;
        plan::check_head_dim(c.head_dim())?;
        let params = model
            .weights
            .try_map(|_, t| DevParam::upload(&gpu, t, frozen))?;
        let bf16 = params.embed_tokens.bf16.is_some();
        let rope = RopeTables::new(&gpu, model.rope())?;
        gpu.sync("uploading the parameters")?;
        Ok(CudaTrainStep {
            hidden: c.hidden_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
            dims: AttentionDims {
                tokens: 0,
                heads: c.num_attention_heads,
                kv_heads: c.num_kv_heads(),
                head_dim: c.head_dim(),
            },
            rope,
            bf16,
            head_budget: crate::model::ops::LM_HEAD_CHUNK_LOGITS,
            params,
            gpu,
            frozen,
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The parameters on the device (the CUDA decoder reads them in place:
    /// `CudaDecoder::from_train_step`).
    pub fn params(&self) -> &Qwen2Params<DevParam> {
        &self.params
    }

    /// The RoPE tables on the device.
    pub fn rope_tables(&self) -> &RopeTables {
        &self.rope
    }

    /// Whether the weight matrices are bf16 (with f32 masters).
    pub fn is_bf16(&self) -> bool {
        self.bf16
    }

    /// Uploads AdamW's moments of the parameters named in `moments` (exp_avg, exp_avg_sq; e.g.
    /// a checkpoint's); the others keep theirs. A name the model does not have is an error.
    pub fn restore_moments(
        &mut self,
        moments: &std::collections::BTreeMap<String, (&[f32], &[f32])>,
    ) -> Result<()> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no optimiser state"
        );
        let mut known = 0;
        let g = self.gpu.clone();
        for (name, p) in self.params.named_mut() {
            let Some((m, v)) = moments.get(&name) else {
                continue;
            };
            for (what, values) in [("exp_avg", m), ("exp_avg_sq", v)] {
                ensure!(
                    values.len() == p.len,
                    "optimiser state: {what}.{name} has {} values; the parameter has {}",
                    values.len(),
                    p.len
                );
            }
            upload_into(&g, m, &mut p.m, "exp_avg")?;
            upload_into(&g, v, &mut p.v, "exp_avg_sq")?;
            known += 1;
        }
        if known < moments.len() {
            let names: std::collections::BTreeSet<String> =
                self.params.named().into_iter().map(|(n, _)| n).collect();
            if let Some(extra) = moments.keys().find(|k| !names.contains(*k)) {
                anyhow::bail!(
                    "optimiser state: moments for {extra}, which the model does not have"
                );
            }
        }
        g.sync("uploading the optimiser state")
    }

    /// AdamW's moments downloaded, (name, exp_avg, exp_avg_sq) in the parameter tree's order.
    pub fn moments(&self) -> Result<Vec<NamedMoments>> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no moments"
        );
        let g = &*self.gpu;
        self.params
            .named()
            .into_iter()
            .map(|(name, p)| {
                let mut m = dev::download(g, &p.m)?;
                let mut v = dev::download(g, &p.v)?;
                m.truncate(p.len);
                v.truncate(p.len);
                Ok((name, m, v))
            })
            .collect()
    }

    /// Replaces the f32 master of every parameter named in `masters` (taken out of the map),
    /// and its bf16 compute copy (rounded to nearest even on the device, as AdamW's write-back).
    pub fn restore_masters(
        &mut self,
        masters: &mut std::collections::HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no master weights"
        );
        let g = self.gpu.clone();
        for (name, p) in self.params.named_mut() {
            let Some(values) = masters.remove(&name) else {
                continue;
            };
            ensure!(
                values.len() == p.len,
                "master weight {name} has {} values; the parameter has {}",
                values.len(),
                p.len
            );
            upload_into(&g, &values, &mut p.master, "master weight")?;
            if let Some(b) = &mut p.bf16 {
                dev::cast_to_bf16(&g, &p.master, b, p.len)?;
            }
        }
        g.sync("uploading the master weights")
    }

    /// The f32 master weights downloaded, (name, values) in the parameter tree's order.
    pub fn masters(&self) -> Result<Vec<(String, Vec<f32>)>> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no master weights"
        );
        let g = &*self.gpu;
        self.params
            .named()
            .into_iter()
            .map(|(name, p)| {
                let mut v = dev::download(g, &p.master)?;
                v.truncate(p.len);
                Ok((name, v))
            })
            .collect()
    }

    /// Sets every gradient to zero (e.g. after a non-finite loss, as the CPU `zero_grad`).
    pub fn zero_grad(&mut self) -> Result<()> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no gradients"
        );
        let g = self.gpu.clone();
        for (_, p) in self.params.named_mut() {
            g.stream
                .memset_zeros(&mut p.grad)
                .map_err(|e| anyhow::anyhow!("cuda: zeroing a gradient: {e:?}"))?;
        }
        Ok(())
    }

    fn act(&self, x: CudaSlice<f32>, n: usize) -> Result<Act> {
        Act::new(&self.gpu, x, n, self.bf16)
    }

    fn head(&self) -> &DevParam {
        self.params
            .lm_head
            .as_ref()
            .unwrap_or(&self.params.embed_tokens)
    }

    /// The cache of a batch without completion tokens (its backward adds nothing).
    fn empty_cache(&self, inv_temperature: f32) -> Result<CudaForwardCache> {
        let g = &*self.gpu;
        Ok(CudaForwardCache {
            layers: Vec::new(),
            x_final: dev::zeros(g, 1)?,
            rstd_final: dev::zeros(g, 1)?,
            h_scored: Act {
                f32: dev::zeros(g, 1)?,
                bf16: None,
            },
            lse: dev::zeros(g, 1)?,
            inv_temperature,
            seq_start: dev::zeros(g, 1)?,
            seq_end: dev::zeros(g, 1)?,
            positions: dev::zeros(g, 1)?,
        })
    }

    /// The forward over `batch`: per-token log-probs (and entropy) of the completion tokens
    /// under softmax(inv_temperature·logits), with every activation kept for the backward.
    pub fn forward(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
    ) -> Result<(TokenLogprobs, CudaForwardCache)> {
        self.forward_with(batch, inv_temperature, Activations::All)
    }

    /// [`Self::forward`] keeping `keep`: every activation, or (gradient checkpointing) only
    /// each layer's input, the backward recomputing the layer (the same gradients bit for bit,
    /// one layer's activations alive at a time, about one more forward of time).
    pub fn forward_with(
        &self,
        batch: &TrainBatch,
        inv_temperature: f32,
        keep: Activations,
    ) -> Result<(TokenLogprobs, CudaForwardCache)> {
        let g = &*self.gpu;
        let t = batch.tokens.len();
        ensure!(t > 0, "cuda train step: an empty batch");
        if let Some(bad) = batch.tokens.iter().find(|&&x| x as usize >= self.vocab) {
            anyhow::bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab
            );
        }
        ensure!(
            batch
                .positions
                .iter()
                .all(|&p| (p as usize) < self.rope.max_positions),
            "cuda train step: a position is beyond the model's {} positions",
            self.rope.max_positions
        );
        if batch.score_rows.is_empty() {
            // No completion token to score (every completion empty): nothing to compute, and
            // the backward of L = Σ over no token is zero.
            return Ok((
                TokenLogprobs {
                    logprobs: Vec::new(),
                    entropy: Vec::new(),
                },
                self.empty_cache(inv_temperature)?,
            ));
        }
        let h = self.hidden;
        let (start, end) = plan::sequence_bounds(&batch.seqs.offsets);
        let seq_start = dev::upload_u32(g, &start)?;
        let seq_end = dev::upload_u32(g, &end)?;
        let positions = dev::upload_u32(g, &batch.positions)?;
        let ids = dev::upload_u32(g, &batch.tokens)?;
        let mut x = dev::zeros::<f32>(g, t * h)?;
        let e = &self.params.embed_tokens;
        match &e.bf16 {
            Some(b) => dev::embedding(g, b, &ids, t, h, &mut x)?,
            None => dev::embedding(g, &e.master, &ids, t, h, &mut x)?,
        }
        let mut ops = CudaLayerOps {
            gpu: g,
            layers: &self.params.layers[..],
            rope: &self.rope,
            positions: &positions,
            seq_start: &seq_start,
            seq_end: &seq_end,
            dims: AttentionDims {
                tokens: t,
                ..self.dims
            },
            eps: self.eps,
            hidden: h,
            bf16: self.bf16,
        };
        let mut layers = Vec::with_capacity(self.params.layers.len());
        let mut x = Value::new(x);
        for index in 0..self.params.layers.len() {
            let keep_all = keep.keeps_all(index);
            // Only the layer's input when checkpointed; the backward reruns the layer from it.
            let input = (!keep_all).then(|| x.clone());
            let pass = if keep_all {
                LayerPass::OutputAndCache
            } else {
                LayerPass::Output
            };
            let (next, cache) = layer::layer_forward(&mut ops, index, x, pass)?;
            x = next.context("internal: the layer forward returned no output")?;
            layers.push(match (cache, input) {
                (Some(cache), _) => SavedLayer::All(Box::new(cache)),
                (None, Some(input)) => SavedLayer::Input(input),
                (None, None) => anyhow::bail!("internal: layer {index} kept nothing"),
            });
        }
        let x = Value::into_owned(x, g)?;
        // Final norm, the scored rows, the fused head.
        let mut xf = dev::zeros::<f32>(g, t * h)?;
        let mut rstd_final = dev::zeros::<f32>(g, t)?;
        dev::rms_norm::<f32>(
            g,
            &x,
            &self.params.norm.master,
            self.eps,
            t,
            h,
            &mut xf,
            &mut rstd_final,
        )?;
        let n = batch.score_rows.len();
        let rows = dev::upload_u32(g, &batch.score_rows)?;
        let mut hs = dev::zeros::<f32>(g, n * h)?;
        dev::embedding::<f32>(g, &xf, &rows, n, h, &mut hs)?;
        let h_scored = self.act(hs, n * h)?;
        let targets = dev::upload_u32(g, &batch.targets)?;
        let head = self.head();
        let out = match (&h_scored.bf16, &head.bf16) {
            (Some(hb), Some(wb)) => dev::lm_head::<u16>(
                g,
                hb,
                wb,
                &targets,
                n,
                h,
                self.vocab,
                inv_temperature,
                self.head_budget,
            )?,
            _ => dev::lm_head::<f32>(
                g,
                &h_scored.f32,
                &head.master,
                &targets,
                n,
                h,
                self.vocab,
                inv_temperature,
                self.head_budget,
            )?,
        };
        let logprobs = TokenLogprobs {
            logprobs: dev::download(g, &out.logprobs)?[..n].to_vec(),
            entropy: dev::download(g, &out.entropy)?[..n].to_vec(),
        };
        Ok((
            logprobs,
            CudaForwardCache {
                layers,
                x_final: x,
                rstd_final,
                h_scored,
                lse: out.lse,
                inv_temperature,
                seq_start,
                seq_end,
                positions,
            },
        ))
    }

    /// Accumulates the gradients of L = Σ_t g_t·log π(o_t) into the parameters' gradient
    /// buffers.
    pub fn backward(
        &mut self,
        batch: &TrainBatch,
        cache: CudaForwardCache,
        g_t: &[f32],
    ) -> Result<()> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no backward"
        );
        let gpu = self.gpu.clone();
        let g = &*gpu;
        let n = batch.targets.len();
        ensure!(
            g_t.len() == n,
            "cuda backward: {} weights for {n} completion tokens",
            g_t.len()
        );
        if n == 0 {
            return Ok(());
        }
        let t = batch.tokens.len();
        let (h, vocab) = (self.hidden, self.vocab);
        let dims = AttentionDims {
            tokens: t,
            ..self.dims
        };
        let inv_t = cache.inv_temperature;
        let bf16 = self.bf16;

        // Head, chunk by chunk over the vocabulary.
        let gd = dev::upload(g, g_t)?;
        let targets = dev::upload_u32(g, &batch.targets)?;
        let dh = dev::zeros::<f32>(g, n * h)?;
        let cols = plan::head_chunk_columns(self.head_budget, n, vocab);
        let mut z = dev::zeros::<f32>(g, n * cols)?;
        let mut z_bf = if bf16 {
            Some(dev::zeros::<u16>(g, n * cols)?)
        } else {
            None
        };
        {
            let head = self.head();
            let mut c0 = 0;
            while c0 < vocab {
                let c = cols.min(vocab - c0);
                let za = dev::address(g, &z, 0);
                // z[n, c] = τ⁻¹·h·W_cᵀ.
                dev::gemm_at(
                    g,
                    (true, false),
                    (c, n, h),
                    (head.at(g, c0 * h), h),
                    (cache.h_scored.at(g), h),
                    (za, c),
                    inv_t,
                    0.0,
                )?;
                dev::head_dlogits(g, &mut z, n, c, c0, &targets, &cache.lse, &gd)?;
                let dz = match &mut z_bf {
                    Some(b) => {
                        dev::cast_to_bf16(g, &z, b, n * c)?;
                        At {
                            addr: dev::address(g, b, 0),
                            bf16: true,
                        }
                    }
                    None => At {
                        addr: za,
                        bf16: false,
                    },
                };
                // dh(col-major [h, n]) += τ⁻¹·W_c(col-major [h, c])·dz(col-major [c, n]).
                dev::gemm_at(
                    g,
                    (false, false),
                    (h, n, c),
                    (head.at(g, c0 * h), h),
                    (dz, c),
                    (dev::address(g, &dh, 0), h),
                    inv_t,
                    1.0,
                )?;
                // dW_c(col-major [h, c]) += τ⁻¹·h(col-major [h, n])·dz(col-major [c, n])ᵀ.
                dev::gemm_at(
                    g,
                    (false, true),
                    (h, c, n),
                    (cache.h_scored.at(g), h),
                    (dz, c),
                    (dev::address(g, &head.grad, c0 * h), h),
                    inv_t,
                    1.0,
                )?;
                c0 += c;
            }
        }
        // Back to the rows of the final norm's output, then through it.
        let groups = plan::group_by_id(&batch.score_rows, t)?;
        let mut dxf = dev::zeros::<f32>(g, t * h)?;
        dev::embedding_backward(g, &dh, &groups, h, &mut dxf)?;
        let (dx, dw) = dev::rms_norm_backward::<f32>(
            g,
            &cache.x_final,
            &self.params.norm.master,
            &cache.rstd_final,
            &dxf,
            t,
            h,
        )?;
        dev::add_into(g, &mut self.params.norm.grad, &dw, h)?;

        let mut ops = CudaLayerOps {
            gpu: g,
            layers: &mut self.params.layers[..],
            rope: &self.rope,
            positions: &cache.positions,
            seq_start: &cache.seq_start,
            seq_end: &cache.seq_end,
            dims,
            eps: self.eps,
            hidden: h,
            bf16,
        };
        let mut dx = Value::new(dx);
        for (i, saved) in cache.layers.into_iter().enumerate().rev() {
            let lc = match saved {
                SavedLayer::All(lc) => *lc,
                SavedLayer::Input(x) => layer::layer_forward(&mut ops, i, x, LayerPass::Recompute)?
                    .1
                    .context("internal: recomputed layer kept no activations")?,
            };
            dx = layer::layer_backward(&mut ops, i, &dx, &lc)?;
        }
        let dx = Value::into_owned(dx, g)?;
        let groups = plan::group_by_id(&batch.tokens, vocab)?;
        dev::embedding_backward(g, &dx, &groups, h, &mut self.params.embed_tokens.grad)?;
        Ok(())
    }

    /// The global L2 norm of every gradient (f64 partial sums, added in order).
    pub fn grad_norm(&self) -> Result<f64> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no gradients"
        );
        let mut grads: Vec<(&CudaSlice<f32>, usize)> = Vec::new();
        self.params.visit(|_, p| grads.push((&p.grad, p.len)));
        dev::global_grad_norm(&self.gpu, &grads)
    }

    /// One AdamW update of every parameter, in the tree's order, with the scalars `scalars`
    /// gives for its name (the caller's optimiser keeps the step counts and computes them;
    /// `grad_scale` is the clipping factor), bf16 compute copies rounded from the new masters.
    pub fn adamw(
        &mut self,
        mut scalars: impl FnMut(&str) -> Result<dev::AdamWScalars>,
    ) -> Result<()> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no optimiser step"
        );
        let gpu = self.gpu.clone();
        let mut result = Ok(());
        self.params.visit_mut(|name, p| {
            if result.is_ok() {
                result = scalars(name).and_then(|s| {
                    dev::adamw(
                        &gpu,
                        &mut p.master,
                        &p.grad,
                        &mut p.m,
                        &mut p.v,
                        p.len,
                        s,
                        p.bf16.as_mut(),
                    )
                });
            }
        });
        result?;
        gpu.sync("optimiser step")
    }

    /// Every gradient buffer, in the tree's order (what a data-parallel run sums in place:
    /// `train::collective::nccl`).
    pub fn gradient_buffers_mut(&mut self) -> Result<Vec<&mut CudaSlice<f32>>> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no gradients"
        );
        let mut out = Vec::new();
        self.params.visit_mut(|_, p| out.push(&mut p.grad));
        Ok(out)
    }

    /// The gradients, downloaded by HF name (checks).
    pub fn gradients(&self) -> Result<Vec<(String, Vec<f32>)>> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no gradients"
        );
        let mut out = Vec::new();
        let mut result = Ok(());
        self.params.visit(|name, p| {
            if result.is_ok() {
                match dev::download(&self.gpu, &p.grad) {
                    Ok(mut v) => {
                        v.truncate(p.len);
                        out.push((name.to_string(), v));
                    }
                    Err(e) => result = Err(e),
                }
            }
        });
        result.map(|_| out)
    }

    /// Writes the device weights back into `model` (its own dtype), e.g. before a checkpoint
    /// or a CPU prefill.
    pub fn write_back(&self, model: &mut Qwen2) -> Result<()> {
        ensure!(
            !self.frozen,
            "internal: a forward-only copy on the GPU has no master weights"
        );
        let mut updated: Vec<(String, Tensor)> = Vec::new();
        let mut result = Ok(());
        self.params.visit(|name, p| {
            if result.is_err() {
                return;
            }
            let t = dev::download(&self.gpu, &p.master).and_then(|mut v| {
                v.truncate(p.len);
                Ok(Tensor::from_vec(v, p.dims.as_slice(), &Device::Cpu)?.to_dtype(p.dtype)?)
            });
            match t {
                Ok(t) => updated.push((name.to_string(), t)),
                Err(e) => result = Err(e),
            }
        });
        result?;
        let mut by_name: std::collections::HashMap<String, Tensor> = updated.into_iter().collect();
        let mut missing = None;
        model
            .weights
            .visit_mut(|name, t| match by_name.remove(name) {
                Some(new) => *t = new,
                None => missing = Some(name.to_string()),
            });
        if let Some(name) = missing {
            anyhow::bail!("cuda write-back: no device copy of {name}");
        }
        Ok(())
    }
}

/// A layer value on the device (f32) and, once a bf16 product has read it, its bf16 rounding
/// (the product's operand). Shared, not copied, by the cache and the next op.
#[derive(Clone)]
struct Value(Arc<DevValue>);

struct DevValue {
    f32: CudaSlice<f32>,
    bf16: OnceLock<CudaSlice<u16>>,
}

impl Value {
    fn new(x: CudaSlice<f32>) -> Self {
        Value(Arc::new(DevValue {
            f32: x,
            bf16: OnceLock::new(),
        }))
    }

    fn f32(&self) -> &CudaSlice<f32> {
        &self.0.f32
    }

    /// The value as a product operand: itself, or for a bf16 model its bf16 rounding (made on
    /// first use, then kept with the value).
    fn at(&self, gpu: &Gpu, bf16: bool) -> Result<At> {
        if !bf16 {
            return Ok(At {
                addr: dev::address(gpu, &self.0.f32, 0),
                bf16: false,
            });
        }
        if self.0.bf16.get().is_none() {
            let n = self.0.f32.len();
            let mut b = dev::zeros::<u16>(gpu, n)?;
            dev::cast_to_bf16(gpu, &self.0.f32, &mut b, n)?;
            // Values are used by one thread; were two to race, the first copy is kept.
            let _ = self.0.bf16.set(b);
        }
        let b = self
            .0
            .bf16
            .get()
            .context("internal: the bf16 copy of a value was not made")?;
        Ok(At {
            addr: dev::address(gpu, b, 0),
            bf16: true,
        })
    }

    /// The f32 values, owned: moved out when this is the only reference, else copied.
    fn into_owned(self, gpu: &Gpu) -> Result<CudaSlice<f32>> {
        match Arc::try_unwrap(self.0) {
            Ok(v) => Ok(v.f32),
            Err(shared) => dup(gpu, &shared.f32),
        }
    }
}

/// The GPU backend of the decoder layer ([`layer::layer_forward`], [`layer::layer_backward`])
/// for one packed batch: a value is a device buffer, each op a kernel or cuBLAS product. The
/// backward adds the parameter gradients to the layers' `grad` buffers (`layers` borrowed
/// mutably there).
struct CudaLayerOps<'a, L> {
    gpu: &'a Gpu,
    layers: L,
    rope: &'a RopeTables,
    positions: &'a CudaSlice<u32>,
    seq_start: &'a CudaSlice<u32>,
    seq_end: &'a CudaSlice<u32>,
    /// With `tokens` = the batch's packed tokens.
    dims: AttentionDims,
    eps: f32,
    hidden: usize,
    bf16: bool,
}

impl<L: Deref<Target = [DecoderLayer<DevParam>]>> CudaLayerOps<'_, L> {
    fn tokens(&self) -> usize {
        self.dims.tokens
    }

    fn norm_weight(&self, layer: usize, norm: Norm) -> &DevParam {
        let l = &self.layers[layer];
        match norm {
            Norm::Input => &l.input_layernorm,
            Norm::PostAttention => &l.post_attention_layernorm,
        }
    }

    fn heads(&self, heads: Heads) -> usize {
        match heads {
            Heads::Query => self.dims.heads,
            Heads::Key => self.dims.kv_heads,
        }
    }

    fn head_norm_weight(&self, layer: usize, heads: Heads) -> Result<&DevParam> {
        let a = &self.layers[layer].self_attn;
        match heads {
            Heads::Query => a.q_norm.as_ref(),
            Heads::Key => a.k_norm.as_ref(),
        }
        .with_context(|| format!("internal: layer {layer} has no QK-norm weight"))
    }
}

impl<L: Deref<Target = [DecoderLayer<DevParam>]>> LayerOps for CudaLayerOps<'_, L> {
    type Act = Value;

    fn rms_norm(&mut self, layer: usize, norm: Norm, x: &Value) -> Result<(Value, Value)> {
        let (g, t, h) = (self.gpu, self.tokens(), self.hidden);
        let mut xn = dev::zeros::<f32>(g, t * h)?;
        let mut rstd = dev::zeros::<f32>(g, t)?;
        let w = &self.norm_weight(layer, norm).master;
        dev::rms_norm::<f32>(g, x.f32(), w, self.eps, t, h, &mut xn, &mut rstd)?;
        Ok((Value::new(xn), Value::new(rstd)))
    }

    fn linear(&mut self, layer: usize, p: Proj, x: &Value) -> Result<Value> {
        let w = self.layers[layer].linear(p);
        let x = x.at(self.gpu, self.bf16)?;
        Ok(Value::new(linear_fwd(self.gpu, w, x, self.tokens())?))
    }

    fn residual_linear(
        &mut self,
        layer: usize,
        p: Proj,
        x: &Value,
        residual: Value,
    ) -> Result<Value> {
        let y = self.linear(layer, p, x)?;
        let n = self.tokens() * self.hidden;
        let mut out = residual.into_owned(self.gpu)?;
        dev::add_into(self.gpu, &mut out, y.f32(), n)?;
        Ok(Value::new(out))
    }

    fn qk_norm(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| l.self_attn.q_norm.is_some())
    }

    fn head_norm(&mut self, layer: usize, heads: Heads, x: Value) -> Result<(Value, Value)> {
        let (g, rows, hd) = (
            self.gpu,
            self.tokens() * self.heads(heads),
            self.dims.head_dim,
        );
        let mut y = dev::zeros::<f32>(g, rows * hd)?;
        let mut rstd = dev::zeros::<f32>(g, rows)?;
        let w = &self.head_norm_weight(layer, heads)?.master;
        dev::rms_norm::<f32>(g, x.f32(), w, self.eps, rows, hd, &mut y, &mut rstd)?;
        Ok((Value::new(y), Value::new(rstd)))
    }

    fn rope(&mut self, x: Value, heads: Heads) -> Result<Value> {
        let mut x = x.into_owned(self.gpu)?;
        let (t, n) = (self.tokens(), self.heads(heads));
        dev::rope::<f32>(self.gpu, self.rope, &mut x, self.positions, t, n, false)?;
        Ok(Value::new(x))
    }

    fn attend(
        &mut self,
        _layer: usize,
        q: &Value,
        k: &Value,
        v: &Value,
    ) -> Result<(Value, Option<Value>)> {
        let (att, lse) = dev::attention(
            self.gpu,
            q.f32(),
            k.f32(),
            v.f32(),
            self.seq_start,
            self.dims,
        )?;
        Ok((Value::new(att), Some(Value::new(lse))))
    }

    fn swiglu(&mut self, gate: &Value, up: &Value) -> Result<Value> {
        let n = gate.f32().len();
        let mut h = dev::zeros::<f32>(self.gpu, n)?;
        dev::swiglu::<f32>(self.gpu, gate.f32(), up.f32(), &mut h, n)?;
        Ok(Value::new(h))
    }
}

impl<L: DerefMut<Target = [DecoderLayer<DevParam>]>> LayerBackwardOps for CudaLayerOps<'_, L> {
    fn linear_backward(&mut self, layer: usize, p: Proj, dy: &Value, x: &Value) -> Result<Value> {
        let (g, t, bf16) = (self.gpu, self.tokens(), self.bf16);
        let w = self.layers[layer].linear_mut(p);
        let mut dx = dev::zeros::<f32>(g, t * w.weight.dims[1])?;
        let (xa, dya) = (x.at(g, bf16)?, dy.at(g, bf16)?);
        linear_bwd(g, w, xa, dya, dy.f32(), t, &mut dx)?;
        Ok(Value::new(dx))
    }

    fn rms_norm_backward(
        &mut self,
        layer: usize,
        norm: Norm,
        dy: &Value,
        x: &Value,
        rstd: &Value,
    ) -> Result<Value> {
        let (g, t, h) = (self.gpu, self.tokens(), self.hidden);
        let l = &mut self.layers[layer];
        let w = match norm {
            Norm::Input => &mut l.input_layernorm,
            Norm::PostAttention => &mut l.post_attention_layernorm,
        };
        let (dx, dw) =
            dev::rms_norm_backward::<f32>(g, x.f32(), &w.master, rstd.f32(), dy.f32(), t, h)?;
        dev::add_into(g, &mut w.grad, &dw, h)?;
        Ok(Value::new(dx))
    }

    fn head_norm_backward(
        &mut self,
        layer: usize,
        heads: Heads,
        dy: &Value,
        x: &Value,
        rstd: &Value,
    ) -> Result<Value> {
        let (g, rows, hd) = (
            self.gpu,
            self.tokens() * self.heads(heads),
            self.dims.head_dim,
        );
        let a = &mut self.layers[layer].self_attn;
        let w = match heads {
            Heads::Query => a.q_norm.as_mut(),
            Heads::Key => a.k_norm.as_mut(),
        }
        .with_context(|| format!("internal: layer {layer} has no QK-norm weight"))?;
        let (dx, dw) =
            dev::rms_norm_backward::<f32>(g, x.f32(), &w.master, rstd.f32(), dy.f32(), rows, hd)?;
        dev::add_into(g, &mut w.grad, &dw, hd)?;
        Ok(Value::new(dx))
    }

    fn swiglu_backward(&mut self, dh: &Value, gate: &Value, up: &Value) -> Result<(Value, Value)> {
        let n = gate.f32().len();
        let (dgate, dup) =
            dev::swiglu_backward::<f32>(self.gpu, gate.f32(), up.f32(), dh.f32(), n)?;
        Ok((Value::new(dgate), Value::new(dup)))
    }

    fn attention_backward(
        &mut self,
        datt: &Value,
        lc: &LayerCache<Value>,
    ) -> Result<(Value, Value, Value)> {
        let (dq, dk, dv) = dev::attention_backward(
            self.gpu,
            lc.q.f32(),
            lc.k.f32(),
            lc.v.f32(),
            lc.att.f32(),
            lc.lse.f32(),
            datt.f32(),
            self.seq_start,
            self.seq_end,
            self.dims,
        )?;
        Ok((Value::new(dq), Value::new(dk), Value::new(dv)))
    }

    fn rope_backward(&mut self, dx: Value, heads: Heads) -> Result<Value> {
        let mut dx = dx.into_owned(self.gpu)?;
        let (t, n) = (self.tokens(), self.heads(heads));
        dev::rope::<f32>(self.gpu, self.rope, &mut dx, self.positions, t, n, true)?;
        Ok(Value::new(dx))
    }

    fn add(&mut self, a: &Value, b: &Value) -> Result<Value> {
        let n = a.f32().len();
        let mut out = dup(self.gpu, a.f32())?;
        dev::add_into(self.gpu, &mut out, b.f32(), n)?;
        Ok(Value::new(out))
    }
}
