//! The CPU backend of the decoder layer ([`super::layer`]) over candle tensors: training
//! forward and backward, the recomputation of gradient checkpointing, and the prefill of
//! sampling. A value is a tensor; every op dispatches to `ops` (CPU kernels).
//!
//! A layer is seen as its base weights plus, when the model has an adapter, that layer's LoRA
//! pairs ([`LayerView`]): the forward adds s·B(A·d(x)) after each adapted product; with the
//! adapter's gradient sink the backward never forms a base weight's gradient.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

use super::layer::{Heads, LayerBackwardOps, LayerCache, LayerOps, Norm, Proj};
use super::lora::{Dropout, LoraGrad, LoraPair};
use super::ops::{self, Rope, VarLen};
use super::params::{DecoderLayer, Linear};
use super::qwen2::Qwen2;

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

/// One decoder layer's weights as a pass sees them: the base layer and, when the model has an
/// adapter, that layer's LoRA pairs and (training forward) their dropout.
#[derive(Clone, Copy)]
pub(crate) struct LayerView<'a> {
    pub base: &'a DecoderLayer<Tensor>,
    pub lora: Option<&'a DecoderLayer<Option<LoraPair>>>,
    pub index: usize,
    /// (p, seed) of the adapter dropout in a training pass with dropout > 0.
    pub dropout: Option<(f32, u64)>,
}

impl LayerView<'_> {
    fn pair(&self, p: Proj) -> Option<&LoraPair> {
        self.lora.and_then(|l| l.linear(p).weight.as_ref())
    }

    fn dropout(&self, p: Proj) -> Option<Dropout> {
        self.dropout.map(|(prob, seed)| Dropout {
            p: prob,
            seed,
            module: (self.index * Proj::ALL.len() + p.index()) as u64,
        })
    }

    /// Linear layer `p` of this layer on `x`: x·Wᵀ (+ b) (+ s·B(A·d(x))).
    pub fn linear(&self, p: Proj, x: &Tensor) -> Result<Tensor> {
        let y = self.base.linear(p).forward(x)?;
        match self.pair(p) {
            Some(pair) => pair.forward_add(x, y, self.dropout(p)),
            None => Ok(y),
        }
    }

    /// Backward of linear layer `p` given dy and its input x: gradients into `grads`, returns
    /// ∂L/∂x. With an adapter the base weight's gradient is never computed.
    fn linear_backward(
        &self,
        p: Proj,
        dy: &Tensor,
        x: &Tensor,
        grads: &mut LayerGrads<'_>,
    ) -> Result<Tensor> {
        let base = self.base.linear(p);
        match grads {
            LayerGrads::Full(g) => base.backward(dy, x, g.linear_mut(p)),
            LayerGrads::Adapter(g) => {
                let dx = ops::linear_backward_input(dy, &base.weight)?;
                match (self.pair(p), g.linear_mut(p).weight.as_mut()) {
                    (Some(pair), Some(grad)) => pair.backward(dy, x, self.dropout(p), grad, dx),
                    (None, None) => Ok(dx),
                    _ => bail!("internal: the adapter gradient tree does not match the adapter"),
                }
            }
        }
    }
}

/// Where a layer's backward puts its gradients.
pub(crate) enum LayerGrads<'g> {
    /// Every base parameter (full fine-tuning).
    Full(&'g mut DecoderLayer<Vec<f32>>),
    /// Only the adapter's A and B (the base is frozen).
    Adapter(&'g mut DecoderLayer<Option<LoraGrad>>),
}

impl LayerGrads<'_> {
    /// The norm weight's gradient buffer, when base parameters are trained.
    fn norm(&mut self, norm: Norm) -> Option<&mut Vec<f32>> {
        match self {
            LayerGrads::Full(g) => Some(match norm {
                Norm::Input => &mut g.input_layernorm,
                Norm::PostAttention => &mut g.post_attention_layernorm,
            }),
            LayerGrads::Adapter(_) => None,
        }
    }

    /// The QK-norm weight's gradient buffer (Qwen3), when base parameters are trained.
    fn head_norm(&mut self, heads: Heads) -> Result<Option<&mut Vec<f32>>> {
        match self {
            LayerGrads::Full(g) => {
                let a = &mut g.self_attn;
                let buf = match heads {
                    Heads::Query => a.q_norm.as_mut(),
                    Heads::Key => a.k_norm.as_mut(),
                };
                match buf {
                    Some(b) => Ok(Some(b)),
                    None => bail!("internal: the gradient tree has no QK-norm leaf"),
                }
            }
            LayerGrads::Adapter(_) => Ok(None),
        }
    }
}

/// How a pass attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attend {
    /// Causal attention within each sequence of the packed batch (training, scoring).
    PackedCausal,
    /// The same, keeping every layer's rotated keys and values for a KV cache (prefill).
    PackedCausalKeepingKv,
}

/// One pass of the CPU model over a packed batch.
pub(crate) struct CpuLayerOps<'a, 'g> {
    model: &'a Qwen2,
    seqs: &'a VarLen,
    rope: &'a Rope,
    /// The row of `rope`'s table each packed token rotates by.
    positions: &'a [u32],
    /// The adapter dropout seed of a training pass.
    dropout_seed: Option<u64>,
    attend: Attend,
    /// Per layer, [T, kv_dim] keys and values (with [`Attend::PackedCausalKeepingKv`]).
    pub kv: Vec<(Tensor, Tensor)>,
    /// Per layer, where the backward adds its gradients (empty in a forward-only pass).
    grads: Vec<LayerGrads<'g>>,
}

impl<'a, 'g> CpuLayerOps<'a, 'g> {
    pub fn new(
        model: &'a Qwen2,
        seqs: &'a VarLen,
        rope: &'a Rope,
        positions: &'a [u32],
        dropout_seed: Option<u64>,
        attend: Attend,
    ) -> Self {
        Self {
            model,
            seqs,
            rope,
            positions,
            dropout_seed,
            attend,
            kv: Vec::new(),
            grads: Vec::new(),
        }
    }

    /// The same pass with a gradient sink for the backward (one entry per layer).
    pub fn with_grads(mut self, grads: Vec<LayerGrads<'g>>) -> Self {
        self.grads = grads;
        self
    }

    fn view(&self, layer: usize) -> LayerView<'a> {
        self.model.layer_view(layer, self.dropout_seed)
    }

    fn heads(&self, heads: Heads) -> usize {
        let c = &self.model.config;
        match heads {
            Heads::Query => c.num_attention_heads,
            Heads::Key => c.num_kv_heads(),
        }
    }

    fn norm_weight(&self, layer: usize, norm: Norm) -> &'a Tensor {
        let l = &self.model.weights.layers[layer];
        match norm {
            Norm::Input => &l.input_layernorm,
            Norm::PostAttention => &l.post_attention_layernorm,
        }
    }

    fn head_norm_weight(&self, layer: usize, heads: Heads) -> Result<&'a Tensor> {
        let a = &self.model.weights.layers[layer].self_attn;
        match heads {
            Heads::Query => a.q_norm.as_ref(),
            Heads::Key => a.k_norm.as_ref(),
        }
        .with_context(|| format!("internal: layer {layer} has no QK-norm weight"))
    }

    fn sink(&mut self, layer: usize) -> Result<&mut LayerGrads<'g>> {
        match self.grads.get_mut(layer) {
            Some(g) => Ok(g),
            None => bail!("internal: layer {layer}'s backward has no gradient sink"),
        }
    }
}

impl LayerOps for CpuLayerOps<'_, '_> {
    type Act = Tensor;

    fn rms_norm(&mut self, layer: usize, norm: Norm, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let eps = self.model.config.rms_norm_eps;
        ops::rms_norm(x, self.norm_weight(layer, norm), eps)
    }

    fn linear(&mut self, layer: usize, p: Proj, x: &Tensor) -> Result<Tensor> {
        self.view(layer).linear(p, x)
    }

    fn residual_linear(
        &mut self,
        layer: usize,
        p: Proj,
        x: &Tensor,
        residual: Tensor,
    ) -> Result<Tensor> {
        Ok((&residual + self.view(layer).linear(p, x)?)?)
    }

    fn qk_norm(&self) -> bool {
        self.model.config.qk_norm()
    }

    fn head_norm(&mut self, layer: usize, heads: Heads, x: Tensor) -> Result<(Tensor, Tensor)> {
        let (t, hd, n) = (x.dim(0)?, self.model.config.head_dim(), self.heads(heads));
        let w = self.head_norm_weight(layer, heads)?;
        let (y, rstd) = ops::rms_norm(&x.reshape((t * n, hd))?, w, self.model.config.rms_norm_eps)?;
        Ok((y.reshape((t, n * hd))?, rstd))
    }

    fn rope(&mut self, x: Tensor, heads: Heads) -> Result<Tensor> {
        let (t, hd) = (x.dim(0)?, self.model.config.head_dim());
        self.rope
            .forward(&x.reshape((t, self.heads(heads), hd))?, self.positions)
    }

    fn attend(
        &mut self,
        _layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (t, hd) = (q.dim(0)?, self.model.config.head_dim());
        let nkv = self.heads(Heads::Key);
        let v = v.reshape((t, nkv, hd))?;
        let (att, lse) = ops::attention(q, k, &v, self.seqs)?;
        if self.attend == Attend::PackedCausalKeepingKv {
            self.kv
                .push((k.reshape((t, nkv * hd))?, v.reshape((t, nkv * hd))?));
        }
        Ok((att.reshape((t, self.heads(Heads::Query) * hd))?, Some(lse)))
    }

    fn swiglu(&mut self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        ops::swiglu(gate, up)
    }
}

impl LayerBackwardOps for CpuLayerOps<'_, '_> {
    fn linear_backward(
        &mut self,
        layer: usize,
        p: Proj,
        dy: &Tensor,
        x: &Tensor,
    ) -> Result<Tensor> {
        let view = self.view(layer);
        view.linear_backward(p, dy, x, self.sink(layer)?)
    }

    fn rms_norm_backward(
        &mut self,
        layer: usize,
        norm: Norm,
        dy: &Tensor,
        x: &Tensor,
        rstd: &Tensor,
    ) -> Result<Tensor> {
        let w = self.norm_weight(layer, norm);
        let (dx, dw) = ops::rms_norm_backward(dy, x, w, rstd)?;
        if let Some(buf) = self.sink(layer)?.norm(norm) {
            add_into(buf, &dw)?;
        }
        Ok(dx)
    }

    fn head_norm_backward(
        &mut self,
        layer: usize,
        heads: Heads,
        dy: &Tensor,
        x: &Tensor,
        rstd: &Tensor,
    ) -> Result<Tensor> {
        let (t, hd, n) = (x.dim(0)?, self.model.config.head_dim(), self.heads(heads));
        let w = self.head_norm_weight(layer, heads)?;
        let (dx, dw) =
            ops::rms_norm_backward(&dy.reshape((t * n, hd))?, &x.reshape((t * n, hd))?, w, rstd)?;
        if let Some(buf) = self.sink(layer)?.head_norm(heads)? {
            add_into(buf, &dw)?;
        }
        Ok(dx.reshape((t, n * hd))?)
    }

    fn swiglu_backward(
        &mut self,
        dh: &Tensor,
        gate: &Tensor,
        up: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        ops::swiglu_backward(dh, gate, up)
    }

    fn attention_backward(
        &mut self,
        datt: &Tensor,
        lc: &LayerCache<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (t, hd) = (datt.dim(0)?, self.model.config.head_dim());
        let (nh, nkv) = (self.heads(Heads::Query), self.heads(Heads::Key));
        let att = lc.att.reshape((t, nh, hd))?;
        let datt = datt.reshape((t, nh, hd))?;
        let v = lc.v.reshape((t, nkv, hd))?;
        let (dq, dk, dv) =
            ops::attention_backward(&datt, &lc.q, &lc.k, &v, &att, &lc.lse, self.seqs)?;
        Ok((dq, dk, dv.reshape((t, nkv * hd))?))
    }

    fn rope_backward(&mut self, dx: Tensor, heads: Heads) -> Result<Tensor> {
        let (t, hd) = (dx.dim(0)?, self.model.config.head_dim());
        self.rope
            .backward(&dx, self.positions)?
            .reshape((t, self.heads(heads) * hd))
            .map_err(Into::into)
    }

    fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok((a + b)?)
    }
}

/// grad += t (same number of elements, f32).
pub(crate) fn add_into(grad: &mut [f32], t: &Tensor) -> Result<()> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    anyhow::ensure!(
        v.len() == grad.len(),
        "internal: gradient of {} elements added to a buffer of {}",
        v.len(),
        grad.len()
    );
    grad.iter_mut().zip(&v).for_each(|(g, x)| *g += x);
    Ok(())
}
