//! The CUDA decoder: the [`DecodeEngine`] / [`DecodeBatch`] seam on a GPU (feature `cuda`).
//!
//! [`CudaDecoder`] uploads a [`Qwen2`]'s weights once (matrices in the model's dtype, f32 or bf16
//! bits; norms and biases f32). A batch holds the KV cache in fixed-size blocks
//! ([`plan::KV_BLOCK`] positions; a pool per layer, block tables per row, [`plan::BlockTables`])
//! and the activation buffers for its capacity. A step for B rows is the CPU decoder's
//! (model/decode.rs) equation, layer by layer:
//!
//! ```text
//! x = embed[tokens];  xn = rms_norm(x);  q, k, v = xn·Wᵀ + b  (cuBLAS)
//! q, k = rope(q, pos), rope(k, pos);  append k, v at each row's next slot
//! att = softmax(q·Kᵀ/√hd)·V over the row's blocks;  x += att·W_oᵀ
//! x += (silu(rms_norm(x)·W_gateᵀ) ⊙ rms_norm(x)·W_upᵀ)·W_downᵀ
//! logits = rms_norm(x)·W_headᵀ
//! ```
//!
//! With bf16 weights the activations are rounded to bf16 before each product (bf16 × bf16 with
//! f32 accumulation), as the CPU's bf16 products do. Sampling runs on the GPU
//! (kernels/sampling.cu) with each row's uniform drawn on the host from its own seeded stream;
//! only token ids, log-probs and a status per row come back. Prompts are prefilled on the GPU
//! too (one packed forward with the varlen causal attention kernel), their keys and values
//! written into the blocks of each of their rows.
//!
//! The trainer's rollouts and held-out evaluation on a GPU use [`CudaDecoder::from_train_step`]:
//! the decoder borrows the training step's device parameters (bf16 compute copies or f32
//! masters, f32 norms and biases, the RoPE tables), so the weights live once on the GPU and are
//! never uploaded per `generate` call.
//!
//! Verified here only as far as compiling: its kernels compile with NVRTC for sm_90, and
//! `bench/gpu/check-a.sh` compares it with the CPU decoder on a GPU.

use std::borrow::Cow;
use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use cudarc::driver::CudaSlice;

use super::cuda_train::{CudaTrainStep, DevParam};
use super::decoding::{non_finite_logits, DecodeBatch, DecodeEngine};
use super::layer::{layer_forward, Heads, LayerOps, LayerPass, Norm, Proj, StepBuf as Buf};
use super::ops::cuda::ops::{self as dev, AttentionDims, KvPools, RopeTables};
use super::ops::cuda::plan::{self, BlockTables};
use super::ops::cuda::Gpu;
use super::ops::VarLen;
use super::params::Linear;
use super::qwen2::Qwen2;
use crate::sampling::TokenSampler;

/// A device buffer the decoder owns (uploaded from a host model) or borrows (a training step's
/// parameters, read in place).
type Held<'w, T> = Cow<'w, CudaSlice<T>>;

/// A weight matrix on the device in the model's dtype.
enum Matrix<'w> {
    F32(Held<'w, f32>),
    Bf16(Held<'w, u16>),
}

impl Matrix<'_> {
    fn upload(gpu: &Gpu, t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        Ok(match t.dtype() {
            DType::BF16 => {
                let bits: Vec<u16> = flat
                    .to_vec1::<half::bf16>()?
                    .into_iter()
                    .map(|b| b.to_bits())
                    .collect();
                Matrix::Bf16(Cow::Owned(dev::upload(gpu, &bits)?))
            }
            _ => Matrix::F32(Cow::Owned(dev::upload(
                gpu,
                &flat.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            )?)),
        })
    }
}

fn upload_f32<'w>(gpu: &Gpu, t: &Tensor) -> Result<Held<'w, f32>> {
    Ok(Cow::Owned(dev::upload(
        gpu,
        &t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
    )?))
}

struct DevLinear<'w> {
    w: Matrix<'w>,
    bias: Option<Held<'w, f32>>,
    out: usize,
    inp: usize,
}

impl<'w> DevLinear<'w> {
    /// The training step's weight (its bf16 compute copy when it has one) and bias, borrowed.
    fn borrowed(l: &'w Linear<DevParam>) -> Result<Self> {
        let dims = l.weight.dims();
        ensure!(
            dims.len() == 2,
            "cuda decoder: a linear weight of shape {dims:?}"
        );
        Ok(DevLinear {
            w: Matrix::borrowed(&l.weight),
            bias: l.bias.as_ref().map(|b| Cow::Borrowed(&b.master)),
            out: dims[0],
            inp: dims[1],
        })
    }

    fn new(gpu: &Gpu, l: &Linear<Tensor>) -> Result<Self> {
        let (out, inp) = l.weight.dims2()?;
        Ok(DevLinear {
            w: Matrix::upload(gpu, &l.weight)?,
            bias: l.bias.as_ref().map(|b| upload_f32(gpu, b)).transpose()?,
            out,
            inp,
        })
    }
}

struct DevLayer<'w> {
    input_norm: Held<'w, f32>,
    q: DevLinear<'w>,
    k: DevLinear<'w>,
    v: DevLinear<'w>,
    o: DevLinear<'w>,
    post_norm: Held<'w, f32>,
    /// Qwen3's QK-norm weights [head_dim] (query, key).
    head_norms: Option<(Held<'w, f32>, Held<'w, f32>)>,
    gate: DevLinear<'w>,
    up: DevLinear<'w>,
    down: DevLinear<'w>,
}

/// A [`Qwen2`]'s weights on a GPU, laid out for decoding: uploaded from a host model
/// ([`CudaDecoder::new`]) or borrowed from a training step's device parameters
/// ([`CudaDecoder::from_train_step`]: nothing is copied).
pub struct CudaDecoder<'w> {
    gpu: Arc<Gpu>,
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    eps: f32,
    dims: AttentionDims,
    embed: Matrix<'w>,
    head: DevLinear<'w>,
    layers: Vec<DevLayer<'w>>,
    norm: Held<'w, f32>,
    rope: Cow<'w, RopeTables>,
}

impl Matrix<'_> {
    fn borrowed(p: &DevParam) -> Matrix<'_> {
        match &p.bf16 {
            Some(b) => Matrix::Bf16(Cow::Borrowed(b)),
            None => Matrix::F32(Cow::Borrowed(&p.master)),
        }
    }
}

impl<'w> CudaDecoder<'w> {
    /// A decoder over `step`'s device parameters, read in place (the one weight store on the
    /// GPU: no upload, no copy; every optimiser step is seen by the next decoder). `model`
    /// supplies the configuration; its host weights are not read.
    pub fn from_train_step(step: &'w CudaTrainStep, model: &Qwen2) -> Result<Self> {
        let c = &model.config;
        plan::check_head_dim(c.head_dim())?;
        let p = step.params();
        let layers = p
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                Ok(DevLayer {
                    input_norm: Cow::Borrowed(&l.input_layernorm.master),
                    q: DevLinear::borrowed(&a.q_proj)?,
                    k: DevLinear::borrowed(&a.k_proj)?,
                    v: DevLinear::borrowed(&a.v_proj)?,
                    o: DevLinear::borrowed(&a.o_proj)?,
                    post_norm: Cow::Borrowed(&l.post_attention_layernorm.master),
                    head_norms: match (&a.q_norm, &a.k_norm) {
                        (Some(q), Some(k)) => {
                            Some((Cow::Borrowed(&q.master), Cow::Borrowed(&k.master)))
                        }
                        (None, None) => None,
                        _ => anyhow::bail!("internal: a layer has one QK-norm weight of two"),
                    },
                    gate: DevLinear::borrowed(&m.gate_proj)?,
                    up: DevLinear::borrowed(&m.up_proj)?,
                    down: DevLinear::borrowed(&m.down_proj)?,
                })
            })
            .collect::<Result<_>>()?;
        let head = p.lm_head.as_ref().unwrap_or(&p.embed_tokens);
        ensure!(
            head.dims() == [c.vocab_size, c.hidden_size],
            "cuda decoder: the head is {:?}, expected [{}, {}]",
            head.dims(),
            c.vocab_size,
            c.hidden_size
        );
        Ok(CudaDecoder {
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
            embed: Matrix::borrowed(&p.embed_tokens),
            head: DevLinear {
                w: Matrix::borrowed(head),
                bias: None,
                out: c.vocab_size,
                inp: c.hidden_size,
            },
            layers,
            norm: Cow::Borrowed(&p.norm.master),
            rope: Cow::Borrowed(step.rope_tables()),
            gpu: step.gpu().clone(),
        })
    }

    /// Uploads `model`'s weights to `gpu` (read once: a decoder made after an optimiser step
    /// sees the new weights).
    pub fn new(gpu: Arc<Gpu>, model: &Qwen2) -> Result<Self> {
        let c = &model.config;
        plan::check_head_dim(c.head_dim())?;
        let g = &gpu;
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                Ok(DevLayer {
                    input_norm: upload_f32(g, &l.input_layernorm)?,
                    q: DevLinear::new(g, &a.q_proj)?,
                    k: DevLinear::new(g, &a.k_proj)?,
                    v: DevLinear::new(g, &a.v_proj)?,
                    o: DevLinear::new(g, &a.o_proj)?,
                    post_norm: upload_f32(g, &l.post_attention_layernorm)?,
                    head_norms: match (&a.q_norm, &a.k_norm) {
                        (Some(q), Some(k)) => Some((upload_f32(g, q)?, upload_f32(g, k)?)),
                        (None, None) => None,
                        _ => anyhow::bail!("internal: a layer has one QK-norm weight of two"),
                    },
                    gate: DevLinear::new(g, &m.gate_proj)?,
                    up: DevLinear::new(g, &m.up_proj)?,
                    down: DevLinear::new(g, &m.down_proj)?,
                })
            })
            .collect::<Result<_>>()?;
        let head = DevLinear {
            w: Matrix::upload(g, model.head_weight())?,
            bias: None,
            out: c.vocab_size,
            inp: c.hidden_size,
        };
        let decoder = CudaDecoder {
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
            embed: Matrix::upload(g, &w.embed_tokens)?,
            head,
            layers,
            norm: upload_f32(g, &w.norm)?,
            rope: Cow::Owned(RopeTables::new(g, model.rope())?),
            gpu,
        };
        decoder.gpu.sync("uploading the weights")?;
        Ok(decoder)
    }

    fn q_dim(&self) -> usize {
        self.dims.heads * self.dims.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.dims.kv_heads * self.dims.head_dim
    }

    fn bf16(&self) -> bool {
        matches!(self.embed, Matrix::Bf16(_))
    }

    /// Whether the layers normalise each head of q and k (Qwen3).
    fn qk_norm(&self) -> bool {
        self.layers.iter().any(|l| l.head_norms.is_some())
    }
}

impl DecodeEngine for CudaDecoder<'_> {
    fn device_name(&self) -> String {
        self.gpu.description().to_string()
    }

    fn new_batch(&self, capacity: usize, max_len: usize) -> Result<Box<dyn DecodeBatch + '_>> {
        let g = &self.gpu;
        let cap = capacity.max(1);
        let n_blocks = cap * BlockTables::blocks_for(max_len).max(1);
        let pool_len = n_blocks * plan::KV_BLOCK * self.kv_dim();
        let pools = (0..self.layers.len())
            .map(|_| {
                Ok(KvPools {
                    k: dev::zeros(g, pool_len)?,
                    v: dev::zeros(g, pool_len)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(CudaDecodeBatch {
            d: self,
            tables: BlockTables::new(n_blocks),
            pools,
            capacity: cap,
            acts: Acts::new(self, cap)?,
            logits: dev::zeros(g, cap * self.vocab)?,
        }))
    }
}

/// The activation buffers of a forward over `rows` rows (tokens).
struct Acts {
    x: CudaSlice<f32>,
    xn: CudaSlice<f32>,
    /// The bf16 copy of a product's activation operand (bf16 weights only).
    x_bf16: CudaSlice<u16>,
    rstd: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    att: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    h: CudaSlice<f32>,
    /// QK-norm outputs (Qwen3; one element otherwise), swapped with `q` / `k` after each norm.
    q_normed: CudaSlice<f32>,
    k_normed: CudaSlice<f32>,
    /// 1/rms per (row, head) of the QK-norm (not read by decoding).
    head_rstd: CudaSlice<f32>,
}

impl Acts {
    fn new(d: &CudaDecoder<'_>, rows: usize) -> Result<Self> {
        let g = &d.gpu;
        let widest = d.hidden.max(d.intermediate).max(d.q_dim());
        let qk = d.qk_norm();
        Ok(Acts {
            x: dev::zeros(g, rows * d.hidden)?,
            xn: dev::zeros(g, rows * d.hidden)?,
            x_bf16: dev::zeros(g, if d.bf16() { rows * widest } else { 1 })?,
            rstd: dev::zeros(g, rows)?,
            q: dev::zeros(g, rows * d.q_dim())?,
            k: dev::zeros(g, rows * d.kv_dim())?,
            v: dev::zeros(g, rows * d.kv_dim())?,
            att: dev::zeros(g, rows * d.q_dim())?,
            gate: dev::zeros(g, rows * d.intermediate)?,
            up: dev::zeros(g, rows * d.intermediate)?,
            h: dev::zeros(g, rows * d.intermediate)?,
            q_normed: dev::zeros(g, if qk { rows * d.q_dim() } else { 1 })?,
            k_normed: dev::zeros(g, if qk { rows * d.kv_dim() } else { 1 })?,
            head_rstd: dev::zeros(g, if qk { rows * d.dims.heads } else { 1 })?,
        })
    }
}

impl CudaDecoder<'_> {
    /// x = embed[ids] then every layer ([`super::layer::layer_forward`]) over `rows` rows at
    /// `pos`; `attend(acts, pools)` turns the rotated q, k, v into `acts.att` (and stores k, v
    /// in the cache).
    fn layers_forward(
        &self,
        acts: &mut Acts,
        pools: &mut [KvPools],
        ids: &CudaSlice<u32>,
        pos: &CudaSlice<u32>,
        rows: usize,
        mut attend: impl FnMut(&mut Acts, &mut KvPools) -> Result<()>,
    ) -> Result<()> {
        let g = &*self.gpu;
        match &self.embed {
            Matrix::F32(e) => dev::embedding::<f32>(g, e, ids, rows, self.hidden, &mut acts.x)?,
            Matrix::Bf16(e) => dev::embedding::<u16>(g, e, ids, rows, self.hidden, &mut acts.x)?,
        }
        let mut ops = CudaStepOps {
            d: self,
            acts,
            pools,
            pos,
            rows,
            attend: &mut attend,
        };
        for li in 0..self.layers.len() {
            layer_forward(&mut ops, li, Buf::X, LayerPass::Output)?;
        }
        Ok(())
    }

    /// logits[rows, V] = rms_norm(x)·W_headᵀ over the first `rows` rows of `acts.x`.
    fn head_logits(&self, acts: &mut Acts, rows: usize, logits: &mut CudaSlice<f32>) -> Result<()> {
        let g = &*self.gpu;
        dev::rms_norm::<f32>(
            g,
            &acts.x,
            &self.norm,
            self.eps,
            rows,
            self.hidden,
            &mut acts.xn,
            &mut acts.rstd,
        )?;
        linear(
            g,
            &self.head,
            &acts.xn,
            &mut acts.x_bf16,
            rows,
            logits,
            false,
        )
    }

    fn check_inputs(&self, tokens: &[u32], positions: &[u32]) -> Result<()> {
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            anyhow::bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab
            );
        }
        if let Some(bad) = positions
            .iter()
            .find(|&&p| p as usize >= self.rope.max_positions)
        {
            anyhow::bail!(
                "position {bad} is beyond the model's {} positions",
                self.rope.max_positions
            );
        }
        Ok(())
    }
}

/// One batch on the GPU.
struct CudaDecodeBatch<'d> {
    d: &'d CudaDecoder<'d>,
    tables: BlockTables,
    /// Per layer.
    pools: Vec<KvPools>,
    capacity: usize,
    acts: Acts,
    logits: CudaSlice<f32>,
}

/// y[rows, out] = beta·y + x·Wᵀ (+ b): f32 weights directly, bf16 weights through a bf16 copy
/// of x.
fn linear(
    gpu: &Gpu,
    l: &DevLinear<'_>,
    x: &CudaSlice<f32>,
    x_bf16: &mut CudaSlice<u16>,
    rows: usize,
    y: &mut CudaSlice<f32>,
    accumulate: bool,
) -> Result<()> {
    let beta = if accumulate { 1.0 } else { 0.0 };
    match &l.w {
        Matrix::F32(w) => dev::gemm_x_wt::<f32>(gpu, x, w, y, rows, l.out, l.inp, 1.0, beta)?,
        Matrix::Bf16(w) => {
            dev::cast_to_bf16(gpu, x, x_bf16, rows * l.inp)?;
            dev::gemm_x_wt::<u16>(gpu, x_bf16, w, y, rows, l.out, l.inp, 1.0, beta)?
        }
    }
    if let Some(b) = &l.bias {
        dev::add_bias(gpu, y, b, rows, l.out)?;
    }
    Ok(())
}

impl DecodeBatch for CudaDecodeBatch<'_> {
    fn rows(&self) -> usize {
        self.tables.rows()
    }

    fn push_row(&mut self, kv: &[(&[f32], &[f32])], max_len: usize, logits: &[f32]) -> Result<()> {
        let d = self.d;
        let g = &d.gpu;
        ensure!(
            self.tables.rows() < self.capacity,
            "cuda decoder: batch of {} rows is full",
            self.capacity
        );
        ensure!(
            kv.len() == d.layers.len(),
            "cuda decoder: one k/v pair per layer"
        );
        ensure!(
            logits.len() == d.vocab,
            "cuda decoder: prompt logits of {} values for a vocabulary of {}",
            logits.len(),
            d.vocab
        );
        let kv_dim = d.kv_dim();
        let len = kv.first().map_or(0, |(k, _)| k.len() / kv_dim);
        for (layer, (k, v)) in kv.iter().enumerate() {
            ensure!(
                k.len() == len * kv_dim && v.len() == len * kv_dim,
                "cuda decoder: prompt k/v of layer {layer} are not [{len}, {kv_dim}]"
            );
        }
        let blocks = self.tables.push(len, max_len)?.to_vec();
        let row = self.tables.rows() - 1;
        for (b, &block) in blocks.iter().enumerate() {
            let p0 = b * plan::KV_BLOCK;
            if p0 >= len {
                break;
            }
            let p1 = len.min(p0 + plan::KV_BLOCK);
            let dst = block as usize * plan::KV_BLOCK * kv_dim;
            let n = (p1 - p0) * kv_dim;
            for (pool, (k, v)) in self.pools.iter_mut().zip(kv) {
                let mut kd = pool.k.slice_mut(dst..dst + n);
                g.stream
                    .memcpy_htod(&k[p0 * kv_dim..p1 * kv_dim], &mut kd)
                    .map_err(|e| {
                        anyhow::anyhow!("cuda decoder: uploading a prompt cache: {e:?}")
                    })?;
                let mut vd = pool.v.slice_mut(dst..dst + n);
                g.stream
                    .memcpy_htod(&v[p0 * kv_dim..p1 * kv_dim], &mut vd)
                    .map_err(|e| {
                        anyhow::anyhow!("cuda decoder: uploading a prompt cache: {e:?}")
                    })?;
            }
        }
        let mut dst = self.logits.slice_mut(row * d.vocab..(row + 1) * d.vocab);
        g.stream
            .memcpy_htod(logits, &mut dst)
            .map_err(|e| anyhow::anyhow!("cuda decoder: uploading prompt logits: {e:?}"))?;
        Ok(())
    }

    /// The GPU prefill: one packed forward over every prompt token (varlen causal attention,
    /// kernels/attention.cu), the keys and values of each layer written into the blocks of each
    /// of the prompt's rows, and the head over each prompt's last token.
    fn push_prompts(
        &mut self,
        prompts: &[Vec<u32>],
        n: usize,
        max_new_tokens: usize,
    ) -> Result<()> {
        let d = self.d;
        let g = &*d.gpu;
        let first_row = self.tables.rows();
        ensure!(
            first_row + prompts.len() * n <= self.capacity,
            "cuda decoder: {} new rows exceed the batch's capacity of {}",
            prompts.len() * n,
            self.capacity
        );
        if prompts.is_empty() || n == 0 {
            return Ok(());
        }
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        ensure!(lens.iter().all(|&l| l > 0), "cuda decoder: an empty prompt");
        let seqs = VarLen::from_lens(&lens);
        let t = seqs.total();
        let tokens: Vec<u32> = prompts.concat();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        d.check_inputs(&tokens, &positions)?;
        // The rows and their blocks, then where each prompt position goes in each row.
        let (mut src_rows, mut slots) = (Vec::new(), Vec::new());
        for (pi, &len) in lens.iter().enumerate() {
            for _ in 0..n {
                self.tables.push(len, len + max_new_tokens)?;
                let row = self.tables.rows() - 1;
                for p in 0..len {
                    src_rows.push((seqs.offsets[pi] + p) as u32);
                    slots.push(self.tables.slot(row, p) as u32);
                }
            }
        }
        let (start, _) = plan::sequence_bounds(&seqs.offsets);
        let ids = dev::upload_u32(g, &tokens)?;
        let pos = dev::upload_u32(g, &positions)?;
        let start = dev::upload_u32(g, &start)?;
        let src_rows_d = dev::upload_u32(g, &src_rows)?;
        let slots_d = dev::upload_u32(g, &slots)?;
        let dims = AttentionDims {
            tokens: t,
            ..d.dims
        };
        let kvd = d.kv_dim();
        let mut acts = Acts::new(d, t)?;
        d.layers_forward(&mut acts, &mut self.pools, &ids, &pos, t, |a, pool| {
            let (att, _lse) = dev::attention(g, &a.q, &a.k, &a.v, &start, dims)?;
            a.att = att;
            dev::kv_write_rows(
                g,
                &a.k,
                &a.v,
                &src_rows_d,
                &slots_d,
                src_rows.len(),
                kvd,
                pool,
            )
        })?;
        // The last token of each prompt, then the head, then one copy of a prompt's logits per
        // row (row gathers through the f32 embedding kernel).
        let last: Vec<u32> = (0..lens.len())
            .map(|s| (seqs.offsets[s + 1] - 1) as u32)
            .collect();
        let last = dev::upload_u32(g, &last)?;
        let mut last_acts = Acts::new(d, lens.len())?;
        dev::embedding::<f32>(g, &acts.x, &last, lens.len(), d.hidden, &mut last_acts.x)?;
        let mut prompt_logits = dev::zeros::<f32>(g, lens.len() * d.vocab)?;
        d.head_logits(&mut last_acts, lens.len(), &mut prompt_logits)?;
        let owners: Vec<u32> = (0..lens.len() as u32)
            .flat_map(|p| std::iter::repeat_n(p, n))
            .collect();
        let owners_d = dev::upload_u32(g, &owners)?;
        let mut rows_logits = dev::zeros::<f32>(g, owners.len() * d.vocab)?;
        dev::embedding::<f32>(
            g,
            &prompt_logits,
            &owners_d,
            owners.len(),
            d.vocab,
            &mut rows_logits,
        )?;
        let mut dst = self
            .logits
            .slice_mut(first_row * d.vocab..(first_row + owners.len()) * d.vocab);
        g.stream
            .memcpy_dtod(&rows_logits, &mut dst)
            .map_err(|e| anyhow::anyhow!("cuda decoder: prompt logits: {e:?}"))?;
        g.sync("prefill")
    }

    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        self.tables.retain(keep)
    }

    fn step(&mut self, tokens: &[u32], positions: &[u32]) -> Result<()> {
        let d = self.d;
        let g = &*d.gpu;
        let b = tokens.len();
        ensure!(
            b == self.tables.rows() && positions.len() == b,
            "cuda decoder: {b} tokens for a batch of {} rows",
            self.tables.rows()
        );
        if b == 0 {
            return Ok(());
        }
        d.check_inputs(tokens, positions)?;
        // Room for this step's position in every row, checked before kv_append writes it (it
        // writes at lens[r], which must lie inside the row's blocks).
        self.tables.check_room()?;
        let kvd = d.kv_dim();
        let (table, max_blocks) = self.tables.table();
        let lens_before = self.tables.lens().to_vec();
        let lens_after: Vec<u32> = lens_before.iter().map(|l| l + 1).collect();
        let ids = dev::upload_u32(g, tokens)?;
        let pos = dev::upload_u32(g, positions)?;
        let table = dev::upload_u32(g, &table)?;
        let lens_before = dev::upload_u32(g, &lens_before)?;
        let lens_after = dev::upload_u32(g, &lens_after)?;
        let dims = AttentionDims {
            tokens: b,
            ..d.dims
        };
        d.layers_forward(&mut self.acts, &mut self.pools, &ids, &pos, b, |a, pool| {
            dev::kv_append(
                g,
                &a.k,
                &a.v,
                &table,
                &lens_before,
                b,
                max_blocks,
                kvd,
                pool,
            )?;
            dev::attention_decode(
                g,
                &a.q,
                pool,
                &table,
                &lens_after,
                b,
                max_blocks,
                dims,
                &mut a.att,
            )
        })?;
        d.head_logits(&mut self.acts, b, &mut self.logits)?;
        self.tables.advance()
    }

    fn sample(
        &mut self,
        samplers: &mut [&mut TokenSampler],
        step: usize,
    ) -> Result<Vec<(u32, f32)>> {
        let d = self.d;
        let rows = self.tables.rows();
        ensure!(
            samplers.len() == rows,
            "cuda decoder: {} samplers for {rows} rows",
            samplers.len()
        );
        if rows == 0 {
            return Ok(Vec::new());
        }
        let settings = samplers[0].settings();
        ensure!(
            samplers.iter().all(|s| s.settings() == settings),
            "cuda decoder: every row of a batch must sample with the same temperature, top_k and top_p"
        );
        let uniforms: Vec<f64> = samplers
            .iter_mut()
            .map(|s| s.next_uniform(d.vocab))
            .collect();
        let (temperature, top_k, top_p) = settings;
        let drawn = dev::sample(
            &d.gpu,
            &mut self.logits,
            rows,
            d.vocab,
            temperature,
            top_k,
            top_p,
            &uniforms,
        )?;
        if let Some(row) = drawn.status.iter().position(|&s| s != 0) {
            non_finite_logits(step, row)?;
        }
        Ok(drawn.tokens.into_iter().zip(drawn.logprobs).collect())
    }

    fn logits(&mut self) -> Result<Vec<f32>> {
        let rows = self.tables.rows();
        let mut all = dev::download(&self.d.gpu, &self.logits)?;
        all.truncate(rows * self.d.vocab);
        Ok(all)
    }
}

impl<'w> DevLayer<'w> {
    fn dense(&self, p: Proj) -> &DevLinear<'w> {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }

    fn norm(&self, norm: Norm) -> &CudaSlice<f32> {
        match norm {
            Norm::Input => &self.input_norm,
            Norm::PostAttention => &self.post_norm,
        }
    }
}

/// The backend of a GPU prefill or decoding step ([`LayerOps`] over [`Acts`]): `rows` rows at
/// `pos`, attention by the caller's `attend` (packed causal + cache writes for a prefill,
/// cache append + paged attention for a step).
struct CudaStepOps<'a, 'd> {
    d: &'a CudaDecoder<'d>,
    acts: &'a mut Acts,
    pools: &'a mut [KvPools],
    pos: &'a CudaSlice<u32>,
    rows: usize,
    attend: &'a mut dyn FnMut(&mut Acts, &mut KvPools) -> Result<()>,
}

fn wrong_buffer(op: &str, b: Buf) -> anyhow::Error {
    anyhow::anyhow!("internal: the GPU decoder's {op} does not read {b:?}")
}

impl LayerOps for CudaStepOps<'_, '_> {
    type Act = Buf;

    fn rms_norm(&mut self, layer: usize, norm: Norm, x: &Buf) -> Result<(Buf, Buf)> {
        ensure!(*x == Buf::X, wrong_buffer("rms_norm", *x));
        let d = self.d;
        let a = &mut *self.acts;
        dev::rms_norm::<f32>(
            &d.gpu,
            &a.x,
            d.layers[layer].norm(norm),
            d.eps,
            self.rows,
            d.hidden,
            &mut a.xn,
            &mut a.rstd,
        )?;
        Ok((Buf::Xn, Buf::Rstd))
    }

    fn linear(&mut self, layer: usize, p: Proj, x: &Buf) -> Result<Buf> {
        ensure!(*x == Buf::Xn, wrong_buffer("linear", *x));
        let d = self.d;
        let a = &mut *self.acts;
        let (dst, buf) = match p {
            Proj::Q => (&mut a.q, Buf::Q),
            Proj::K => (&mut a.k, Buf::K),
            Proj::V => (&mut a.v, Buf::V),
            Proj::Gate => (&mut a.gate, Buf::Gate),
            Proj::Up => (&mut a.up, Buf::Up),
            Proj::O | Proj::Down => {
                anyhow::bail!("internal: decoding runs {p:?} as a residual product only")
            }
        };
        linear(
            &d.gpu,
            d.layers[layer].dense(p),
            &a.xn,
            &mut a.x_bf16,
            self.rows,
            dst,
            false,
        )?;
        Ok(buf)
    }

    fn residual_linear(&mut self, layer: usize, p: Proj, x: &Buf, residual: Buf) -> Result<Buf> {
        ensure!(
            residual == Buf::X,
            wrong_buffer("residual product", residual)
        );
        let d = self.d;
        let a = &mut *self.acts;
        let src = match x {
            Buf::Att => &a.att,
            Buf::H => &a.h,
            other => return Err(wrong_buffer("residual product", *other)),
        };
        let dense = d.layers[layer].dense(p);
        linear(&d.gpu, dense, src, &mut a.x_bf16, self.rows, &mut a.x, true)?;
        Ok(Buf::X)
    }

    fn qk_norm(&self) -> bool {
        self.d.qk_norm()
    }

    /// Normalises each head of q or k into its spare buffer, which then becomes `q` / `k` (a
    /// swap of the two buffers). The returned 1/rms handle is not this norm's (decoding never
    /// reads it).
    fn head_norm(&mut self, layer: usize, heads: Heads, x: Buf) -> Result<(Buf, Buf)> {
        let d = self.d;
        let a = &mut *self.acts;
        let Some((wq, wk)) = &d.layers[layer].head_norms else {
            anyhow::bail!("internal: layer {layer} has no QK-norm weights");
        };
        let (src, spare, w, n_heads) = match (x, heads) {
            (Buf::Q, Heads::Query) => (&mut a.q, &mut a.q_normed, wq, d.dims.heads),
            (Buf::K, Heads::Key) => (&mut a.k, &mut a.k_normed, wk, d.dims.kv_heads),
            (other, _) => return Err(wrong_buffer("head_norm", other)),
        };
        dev::rms_norm::<f32>(
            &d.gpu,
            src,
            w,
            d.eps,
            self.rows * n_heads,
            d.dims.head_dim,
            spare,
            &mut a.head_rstd,
        )?;
        std::mem::swap(src, spare);
        Ok((x, Buf::Rstd))
    }

    fn rope(&mut self, x: Buf, heads: Heads) -> Result<Buf> {
        let d = self.d;
        let a = &mut *self.acts;
        let (buf, n_heads) = match (x, heads) {
            (Buf::Q, Heads::Query) => (&mut a.q, d.dims.heads),
            (Buf::K, Heads::Key) => (&mut a.k, d.dims.kv_heads),
            (other, _) => return Err(wrong_buffer("rope", other)),
        };
        dev::rope::<f32>(&d.gpu, &d.rope, buf, self.pos, self.rows, n_heads, false)?;
        Ok(x)
    }

    fn attend(&mut self, layer: usize, q: &Buf, k: &Buf, v: &Buf) -> Result<(Buf, Option<Buf>)> {
        ensure!(
            (*q, *k, *v) == (Buf::Q, Buf::K, Buf::V),
            "internal: the GPU decoder attends over q, k, v only"
        );
        (self.attend)(self.acts, &mut self.pools[layer])?;
        Ok((Buf::Att, None))
    }

    fn swiglu(&mut self, gate: &Buf, up: &Buf) -> Result<Buf> {
        ensure!(
            (*gate, *up) == (Buf::Gate, Buf::Up),
            "internal: the GPU decoder's swiglu reads gate and up only"
        );
        let a = &mut *self.acts;
        let n = self.rows * self.d.intermediate;
        dev::swiglu::<f32>(&self.d.gpu, &a.gate, &a.up, &mut a.h, n)?;
        Ok(Buf::H)
    }
}
