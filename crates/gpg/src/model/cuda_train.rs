//! The training step on a GPU (feature `cuda`): the CPU engine's forward (per-token log-probs of
//! the completion tokens of a packed [`TrainBatch`]), its backward from g_t = ∂L/∂log π(o_t),
//! the global gradient norm with clipping and AdamW, all on the device with the kernels of
//! `ops/cuda` and cuBLAS products.
//!
//! [`CudaTrainStep`] holds, per parameter, the f32 master weight, for bf16 matrices their bf16
//! compute copy, the f32 gradient and AdamW's two moments (the CPU `ModelUpdater`'s layout).
//! The forward keeps every layer's activations (f32); the backward is the CPU engine's
//! (model/qwen2.rs), layer by layer in reverse:
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
//! (`train::cuda_update::CudaUpdater`: `train`, `sft`, `bench trainer`) and by `bench engine
//! --device cuda`, and compared with the CPU engine by `bench/gpu/check.sh`. Verified here only
//! as far as compiling.
//!
//! The optimiser's state goes in and out by parameter name in the CPU layout (AdamW moments,
//! f32 masters: [`CudaTrainStep::restore_optimizer`], [`CudaTrainStep::moments`],
//! [`CudaTrainStep::restore_masters`], [`CudaTrainStep::masters`]), so a checkpoint written from
//! the GPU is the CPU trainer's checkpoint and resumes on either device.

use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use cudarc::driver::CudaSlice;

use super::ops::cuda::ops::{self as dev, At, AttentionDims, RopeTables};
use super::ops::cuda::plan;
use super::ops::cuda::Gpu;
use super::params::{DecoderLayer, Linear, Qwen2Params};
use super::qwen2::{Activations, Qwen2, TokenLogprobs, TrainBatch};
use crate::optim::AdamWConfig;

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

    fn new(gpu: &Gpu, t: &Tensor) -> Result<Self> {
        let len = t.elem_count();
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
            grad: dev::zeros(gpu, len)?,
            m: dev::zeros(gpu, len)?,
            v: dev::zeros(gpu, len)?,
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

/// What the forward keeps of one layer for the backward.
struct LayerCache {
    x_in: CudaSlice<f32>,
    xn1: Act,
    rstd1: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: Act,
    lse: CudaSlice<f32>,
    x_mid: CudaSlice<f32>,
    xn2: Act,
    rstd2: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    h: Act,
}

/// What the forward keeps of one layer: everything, or with gradient checkpointing only its
/// input (the backward reruns [`CudaTrainStep::layer_forward`] from it).
enum SavedLayer {
    All(Box<LayerCache>),
    Input(CudaSlice<f32>),
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

/// Outcome of [`CudaTrainStep::step`].
#[derive(Debug, Clone, Copy)]
pub struct CudaStepOutcome {
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub scale: f32,
    /// Whether the update was applied (the norm was finite).
    pub applied: bool,
}

/// A model's parameters, gradients and AdamW state on a GPU.
pub struct CudaTrainStep {
    gpu: Arc<Gpu>,
    params: Qwen2Params<DevParam>,
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    eps: f32,
    dims: AttentionDims,
    rope: RopeTables,
    bf16: bool,
    adamw: AdamWConfig,
    step: u64,
    /// Logits alive at once in the head (rows × chunk columns).
    head_budget: usize,
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
fn linear_fwd(gpu: &Gpu, w: &Linear<DevParam>, x: &Act, rows: usize) -> Result<CudaSlice<f32>> {
    let (out, inp) = (w.weight.dims[0], w.weight.dims[1]);
    let mut y = dev::zeros::<f32>(gpu, rows * out)?;
    let c = dev::address(gpu, &y, 0);
    // Column-major yᵀ[out, rows] = W(col-major [inp, out])ᵀ · xᵀ(col-major [inp, rows]).
    dev::gemm_at(
        gpu,
        (true, false),
        (out, rows, inp),
        (w.weight.at(gpu, 0), inp),
        (x.at(gpu), inp),
        (c, out),
        1.0,
        0.0,
    )?;
    if let Some(b) = &w.bias {
        dev::add_bias(gpu, &mut y, &b.master, rows, out)?;
    }
    Ok(y)
}

/// dx[rows, inp] (+)= dy·W, and dW += dyᵀ·x, db += Σ_rows dy.
fn linear_bwd(
    gpu: &Gpu,
    w: &mut Linear<DevParam>,
    x: &Act,
    dy: &Act,
    rows: usize,
    dx: &mut CudaSlice<f32>,
    accumulate: bool,
) -> Result<()> {
    let (out, inp) = (w.weight.dims[0], w.weight.dims[1]);
    let dxa = dev::address(gpu, dx, 0);
    // dxᵀ(col-major [inp, rows]) = W(col-major [inp, out]) · dyᵀ(col-major [out, rows]).
    dev::gemm_at(
        gpu,
        (false, false),
        (inp, rows, out),
        (w.weight.at(gpu, 0), inp),
        (dy.at(gpu), out),
        (dxa, inp),
        1.0,
        if accumulate { 1.0 } else { 0.0 },
    )?;
    // dW(col-major [inp, out]) += xᵀ(col-major [inp, rows]) · dy(col-major [out, rows])ᵀ.
    let dwa = dev::address(gpu, &w.weight.grad, 0);
    dev::gemm_at(
        gpu,
        (false, true),
        (inp, out, rows),
        (x.at(gpu), inp),
        (dy.at(gpu), out),
        (dwa, inp),
        1.0,
        1.0,
    )?;
    if let Some(b) = &mut w.bias {
        dev::add_col_sums(gpu, &dy.f32, rows, out, &mut b.grad)?;
    }
    Ok(())
}

impl CudaTrainStep {
    /// Uploads `model`'s parameters (f32 masters, bf16 copies of bf16 leaves) with zero
    /// gradients and moments.
    pub fn new(gpu: Arc<Gpu>, model: &Qwen2, adamw: AdamWConfig) -> Result<Self> {
        adamw.validate()?;
        let c = &model.config;
        plan::check_head_dim(c.head_dim())?;
        let params = model.weights.try_map(|_, t| DevParam::new(&gpu, t))?;
        let bf16 = params.embed_tokens.bf16.is_some();
        let rope = RopeTables::new(&gpu, model.rope())?;
        gpu.sync("uploading the parameters")?;
        Ok(CudaTrainStep {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
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
            adamw,
            step: 0,
            head_budget: crate::model::ops::LM_HEAD_CHUNK_LOGITS,
            params,
            gpu,
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

    /// AdamW steps applied so far (every parameter shares the count: a skipped step skips all).
    pub fn adamw_steps(&self) -> u64 {
        self.step
    }

    pub fn adamw_config(&self) -> AdamWConfig {
        self.adamw
    }

    /// Sets AdamW's step count and uploads its moments, by parameter name (the CPU optimiser's
    /// state, e.g. from a checkpoint). Every parameter must have its moments when `step > 0`;
    /// with `step == 0` the state must be empty (moments are created by the first update).
    pub fn restore_optimizer(
        &mut self,
        step: u64,
        state: &std::collections::BTreeMap<String, crate::optim::ParamState>,
    ) -> Result<()> {
        if step == 0 {
            ensure!(
                state.is_empty(),
                "optimiser state: {} parameters have moments but the step count is 0",
                state.len()
            );
            self.step = 0;
            return Ok(());
        }
        let mut known = std::collections::BTreeSet::new();
        let g = self.gpu.clone();
        for (name, p) in self.params.named_mut() {
            let s = state.get(&name).ok_or_else(|| {
                anyhow::anyhow!("optimiser state: no moments for parameter {name}")
            })?;
            ensure!(
                s.step == step,
                "optimiser state: parameter {name} is at AdamW step {}, the others at {step};                  the GPU optimiser keeps one step count for all parameters",
                s.step
            );
            for (what, values) in [("exp_avg", &s.exp_avg), ("exp_avg_sq", &s.exp_avg_sq)] {
                ensure!(
                    values.len() == p.len,
                    "optimiser state: {what}.{name} has {} values; the parameter has {}",
                    values.len(),
                    p.len
                );
            }
            upload_into(&g, &s.exp_avg, &mut p.m, "exp_avg")?;
            upload_into(&g, &s.exp_avg_sq, &mut p.v, "exp_avg_sq")?;
            known.insert(name);
        }
        if let Some(extra) = state.keys().find(|k| !known.contains(*k)) {
            anyhow::bail!("optimiser state: moments for {extra}, which the model does not have");
        }
        self.step = step;
        g.sync("uploading the optimiser state")
    }

    /// AdamW's moments downloaded, (name, exp_avg, exp_avg_sq) in the parameter tree's order.
    pub fn moments(&self) -> Result<Vec<NamedMoments>> {
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

    /// One decoder layer's forward from its input `x` (the residual stream, [t, H]): the
    /// layer's output and everything its backward needs (`x` itself included). The same
    /// kernels in the same order whether called by the forward or, with gradient
    /// checkpointing, again by the backward: the recomputed activations are bit for bit the
    /// forward's.
    fn layer_forward(
        &self,
        layer: &DecoderLayer<DevParam>,
        x: CudaSlice<f32>,
        t: usize,
        positions: &CudaSlice<u32>,
        seq_start: &CudaSlice<u32>,
    ) -> Result<(CudaSlice<f32>, LayerCache)> {
        let g = &*self.gpu;
        let (h, inter) = (self.hidden, self.intermediate);
        let dims = AttentionDims {
            tokens: t,
            ..self.dims
        };
        let (nh, nkv, hd) = (dims.heads, dims.kv_heads, dims.head_dim);
        let mut xn1 = dev::zeros::<f32>(g, t * h)?;
        let mut rstd1 = dev::zeros::<f32>(g, t)?;
        dev::rms_norm::<f32>(
            g,
            &x,
            &layer.input_layernorm.master,
            self.eps,
            t,
            h,
            &mut xn1,
            &mut rstd1,
        )?;
        let xn1 = self.act(xn1, t * h)?;
        let a = &layer.self_attn;
        let mut q = linear_fwd(g, &a.q_proj, &xn1, t)?;
        let mut k = linear_fwd(g, &a.k_proj, &xn1, t)?;
        let v = linear_fwd(g, &a.v_proj, &xn1, t)?;
        dev::rope::<f32>(g, &self.rope, &mut q, positions, t, nh, false)?;
        dev::rope::<f32>(g, &self.rope, &mut k, positions, t, nkv, false)?;
        let (att, lse) = dev::attention(g, &q, &k, &v, seq_start, dims)?;
        let att = self.act(att, t * nh * hd)?;
        let o = linear_fwd(g, &a.o_proj, &att, t)?;
        let mut x_mid = dup(g, &x)?;
        dev::add_into(g, &mut x_mid, &o, t * h)?;
        let mut xn2 = dev::zeros::<f32>(g, t * h)?;
        let mut rstd2 = dev::zeros::<f32>(g, t)?;
        dev::rms_norm::<f32>(
            g,
            &x_mid,
            &layer.post_attention_layernorm.master,
            self.eps,
            t,
            h,
            &mut xn2,
            &mut rstd2,
        )?;
        let xn2 = self.act(xn2, t * h)?;
        let m = &layer.mlp;
        let gate = linear_fwd(g, &m.gate_proj, &xn2, t)?;
        let up = linear_fwd(g, &m.up_proj, &xn2, t)?;
        let mut hm = dev::zeros::<f32>(g, t * inter)?;
        dev::swiglu::<f32>(g, &gate, &up, &mut hm, t * inter)?;
        let hm = self.act(hm, t * inter)?;
        let down = linear_fwd(g, &m.down_proj, &hm, t)?;
        let mut x_out = dup(g, &x_mid)?;
        dev::add_into(g, &mut x_out, &down, t * h)?;
        Ok((
            x_out,
            LayerCache {
                x_in: x,
                xn1,
                rstd1,
                q,
                k,
                v,
                att,
                lse,
                x_mid,
                xn2,
                rstd2,
                gate,
                up,
                h: hm,
            },
        ))
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
        let mut layers = Vec::with_capacity(self.params.layers.len());
        for (index, layer) in self.params.layers.iter().enumerate() {
            let (x_out, lc) = self.layer_forward(layer, x, t, &positions, &seq_start)?;
            x = x_out;
            layers.push(if keep.keeps_all(index) {
                SavedLayer::All(Box::new(lc))
            } else {
                // Only the layer's input; the backward reruns the layer from it.
                SavedLayer::Input(lc.x_in)
            });
        }
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
        let (h, inter, vocab) = (self.hidden, self.intermediate, self.vocab);
        let dims = AttentionDims {
            tokens: t,
            ..self.dims
        };
        let (nh, nkv, hd) = (dims.heads, dims.kv_heads, dims.head_dim);
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
        let (mut dx, dw) = dev::rms_norm_backward::<f32>(
            g,
            &cache.x_final,
            &self.params.norm.master,
            &cache.rstd_final,
            &dxf,
            t,
            h,
        )?;
        dev::add_into(g, &mut self.params.norm.grad, &dw, h)?;

        for (i, saved) in cache.layers.into_iter().enumerate().rev() {
            let lc = match saved {
                SavedLayer::All(lc) => *lc,
                SavedLayer::Input(x_in) => {
                    self.layer_forward(
                        &self.params.layers[i],
                        x_in,
                        t,
                        &cache.positions,
                        &cache.seq_start,
                    )?
                    .1
                }
            };
            let layer = &mut self.params.layers[i];
            let DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                mlp,
            } = layer;
            // MLP.
            let dxa = Act::new(g, dup(g, &dx)?, t * h, bf16)?;
            let mut dhm = dev::zeros::<f32>(g, t * inter)?;
            linear_bwd(g, &mut mlp.down_proj, &lc.h, &dxa, t, &mut dhm, false)?;
            let (dgate, dupv) = dev::swiglu_backward::<f32>(g, &lc.gate, &lc.up, &dhm, t * inter)?;
            let dgate = Act::new(g, dgate, t * inter, bf16)?;
            let dupv = Act::new(g, dupv, t * inter, bf16)?;
            let mut dxn2 = dev::zeros::<f32>(g, t * h)?;
            linear_bwd(g, &mut mlp.gate_proj, &lc.xn2, &dgate, t, &mut dxn2, false)?;
            linear_bwd(g, &mut mlp.up_proj, &lc.xn2, &dupv, t, &mut dxn2, true)?;
            let (dxn, dw) = dev::rms_norm_backward::<f32>(
                g,
                &lc.x_mid,
                &post_attention_layernorm.master,
                &lc.rstd2,
                &dxn2,
                t,
                h,
            )?;
            dev::add_into(g, &mut post_attention_layernorm.grad, &dw, h)?;
            dev::add_into(g, &mut dx, &dxn, t * h)?;
            // Attention.
            let dxa = Act::new(g, dup(g, &dx)?, t * h, bf16)?;
            let mut datt = dev::zeros::<f32>(g, t * nh * hd)?;
            linear_bwd(g, &mut self_attn.o_proj, &lc.att, &dxa, t, &mut datt, false)?;
            let (mut dq, mut dk, dv) = dev::attention_backward(
                g,
                &lc.q,
                &lc.k,
                &lc.v,
                &lc.att.f32,
                &lc.lse,
                &datt,
                &cache.seq_start,
                &cache.seq_end,
                dims,
            )?;
            dev::rope::<f32>(g, &self.rope, &mut dq, &cache.positions, t, nh, true)?;
            dev::rope::<f32>(g, &self.rope, &mut dk, &cache.positions, t, nkv, true)?;
            let dq = Act::new(g, dq, t * nh * hd, bf16)?;
            let dk = Act::new(g, dk, t * nkv * hd, bf16)?;
            let dv = Act::new(g, dv, t * nkv * hd, bf16)?;
            let mut dxn1 = dev::zeros::<f32>(g, t * h)?;
            linear_bwd(g, &mut self_attn.q_proj, &lc.xn1, &dq, t, &mut dxn1, false)?;
            linear_bwd(g, &mut self_attn.k_proj, &lc.xn1, &dk, t, &mut dxn1, true)?;
            linear_bwd(g, &mut self_attn.v_proj, &lc.xn1, &dv, t, &mut dxn1, true)?;
            let (dxn, dw) = dev::rms_norm_backward::<f32>(
                g,
                &lc.x_in,
                &input_layernorm.master,
                &lc.rstd1,
                &dxn1,
                t,
                h,
            )?;
            dev::add_into(g, &mut input_layernorm.grad, &dw, h)?;
            dev::add_into(g, &mut dx, &dxn, t * h)?;
        }
        let groups = plan::group_by_id(&batch.tokens, vocab)?;
        dev::embedding_backward(g, &dx, &groups, h, &mut self.params.embed_tokens.grad)?;
        Ok(())
    }

    /// Global-norm clipping to `max_norm` (≤ 0: none) and one AdamW step at `lr` on every
    /// parameter; the gradients are zeroed. A non-finite norm skips the update (as the CPU
    /// `ModelUpdater` does).
    pub fn step(&mut self, lr: f32, max_norm: f32) -> Result<CudaStepOutcome> {
        let gpu = self.gpu.clone();
        let g = &*gpu;
        let mut grads: Vec<(&CudaSlice<f32>, usize)> = Vec::new();
        self.params.visit(|_, p| grads.push((&p.grad, p.len)));
        let norm = dev::global_grad_norm(g, &grads)?;
        let applied = norm.is_finite();
        let mut clip_scale = 1.0f32;
        if applied {
            let mut scale = 1.0f32;
            if max_norm > 0.0 && max_norm.is_finite() {
                let coef = max_norm as f64 / (norm + 1e-6);
                if coef < 1.0 {
                    scale = coef as f32;
                }
            }
            clip_scale = scale;
            self.step += 1;
            let c = &self.adamw;
            let lr64 = lr as f64;
            let exponent = i32::try_from(self.step).unwrap_or(i32::MAX);
            let bc1 = 1.0 - c.beta1.powi(exponent);
            let bc2 = 1.0 - c.beta2.powi(exponent);
            let s = dev::AdamWScalars {
                grad_scale: scale,
                decay: (1.0 - lr64 * c.weight_decay) as f32,
                one_minus_beta1: (1.0 - c.beta1) as f32,
                beta2: c.beta2 as f32,
                one_minus_beta2: (1.0 - c.beta2) as f32,
                step_size: (lr64 / bc1) as f32,
                bias_correction2_sqrt: bc2.sqrt() as f32,
                eps: c.eps as f32,
            };
            let mut result = Ok(());
            self.params.visit_mut(|_, p| {
                if result.is_ok() {
                    result = dev::adamw(
                        g,
                        &mut p.master,
                        &p.grad,
                        &mut p.m,
                        &mut p.v,
                        p.len,
                        s,
                        p.bf16.as_mut(),
                    );
                }
            });
            result?;
        }
        let mut result = Ok(());
        self.params.visit_mut(|_, p| {
            if result.is_ok() {
                result = g
                    .stream
                    .memset_zeros(&mut p.grad)
                    .map_err(|e| anyhow::anyhow!("cuda: zeroing a gradient: {e:?}"));
            }
        });
        result?;
        g.sync("optimiser step")?;
        Ok(CudaStepOutcome {
            grad_norm: norm,
            scale: clip_scale,
            applied,
        })
    }

    /// The gradients, downloaded by HF name (checks).
    pub fn gradients(&self) -> Result<Vec<(String, Vec<f32>)>> {
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
