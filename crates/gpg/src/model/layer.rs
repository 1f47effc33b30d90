//! The decoder layer, defined once: its forward and its backward written over a backend
//! ([`LayerOps`], [`LayerBackwardOps`]) that every pass of every device implements.
//!
//! One layer, as the forward computes it (x is the residual stream, [T, H]; T = packed tokens
//! of a training batch or a prefill, or one token per row of a decoding step):
//!
//! ```text
//! xn    = rms_norm(x, input_layernorm)                    rstd1 = 1/rms(x)
//! q,k,v = xn·Wqᵀ+bq, xn·Wkᵀ+bk, xn·Wvᵀ+bv                q:[T,nh,hd]  k,v:[T,nkv,hd]
//! q,k   = rms_norm(q, q_norm), rms_norm(k, k_norm)        Qwen3 only: over each head's hd values
//! qr,kr = rope(q), rope(k)
//! att   = attend(qr, kr, v)       packed causal (training, prefill) or over the KV cache
//! xm    = x + att·Woᵀ
//! xn2   = rms_norm(xm, post_attention_layernorm)          rstd2 = 1/rms(xm)
//! h     = silu(xn2·Wgᵀ) ⊙ (xn2·Wuᵀ)
//! x'    = xm + h·Wdᵀ
//! ```
//!
//! and the backward walks the same lines bottom to top, given dx' = ∂L/∂x':
//!
//! ```text
//! dh          = dx'·Wd            (+ ∂Wd, adapter or base)
//! dgate, dup  = swiglu_backward(dh, gate, up)
//! dxn2        = dgate·Wg + dup·Wu (+ ∂Wg, ∂Wu)
//! dxm         = dx' + rms_norm_backward(dxn2, xm)         (+ ∂post_attention_layernorm)
//! datt        = dxm·Wo            (+ ∂Wo)
//! dq, dk, dv  = attention_backward(datt, qr, kr, v, att, lse); dq, dk = rope_backward(dq, dk)
//! dq, dk      = rms_norm_backward(dq, q), rms_norm_backward(dk, k)   (Qwen3: + ∂q_norm, ∂k_norm)
//! dxn         = dq·Wq + dk·Wk + dv·Wv                     (+ ∂Wq, ∂Wk, ∂Wv, ∂b)
//! dx          = dxm + rms_norm_backward(dxn, x)           (+ ∂input_layernorm)
//! ```
//!
//! A backend decides where each value lives and which weights a projection reads (the base
//! weight, a LoRA pair beside it, a bf16 copy on a GPU). The CPU training backend holds
//! tensors (a value is a new tensor); the CPU decoding backend names preallocated buffers (a
//! value is a buffer handle, and a residual update writes in place), so the same lines serve a
//! training pass, a prefill and a decoding step with nothing allocated per token. The one
//! rule a definition here keeps for that: a value is not read after a later op of the same
//! kind could have overwritten it (the decoder reuses one buffer per kind: `xn` serves both
//! norms, x is updated in place by the residual products).

use anyhow::Result;

use super::params::{DecoderLayer, Linear};

/// The linear layers of a decoder layer, in tree order (the index also tells the modules'
/// LoRA dropout masks apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    Gate = 4,
    Up = 5,
    Down = 6,
}

impl Proj {
    /// All seven, in tree order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// Position in tree order (0..7).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl<T> DecoderLayer<T> {
    /// The linear layer `p` of this layer.
    pub fn linear(&self, p: Proj) -> &Linear<T> {
        match p {
            Proj::Q => &self.self_attn.q_proj,
            Proj::K => &self.self_attn.k_proj,
            Proj::V => &self.self_attn.v_proj,
            Proj::O => &self.self_attn.o_proj,
            Proj::Gate => &self.mlp.gate_proj,
            Proj::Up => &self.mlp.up_proj,
            Proj::Down => &self.mlp.down_proj,
        }
    }

    /// The linear layer `p` of this layer, mutably.
    pub fn linear_mut(&mut self, p: Proj) -> &mut Linear<T> {
        match p {
            Proj::Q => &mut self.self_attn.q_proj,
            Proj::K => &mut self.self_attn.k_proj,
            Proj::V => &mut self.self_attn.v_proj,
            Proj::O => &mut self.self_attn.o_proj,
            Proj::Gate => &mut self.mlp.gate_proj,
            Proj::Up => &mut self.mlp.up_proj,
            Proj::Down => &mut self.mlp.down_proj,
        }
    }
}

/// The two RMSNorms of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `input_layernorm`, before attention.
    Input,
    /// `post_attention_layernorm`, before the MLP.
    PostAttention,
}

/// Which heads a rotation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// The query heads (q: nh heads).
    Query,
    /// The key heads (k: nkv heads).
    Key,
}

/// The buffers of an in-place decoding backend (CPU `decode.rs`, GPU `cuda_decode.rs`): one
/// buffer per kind of value, which is the value's handle (the two norms share `Xn`, the
/// residual products add into `X` in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepBuf {
    X,
    Xn,
    Rstd,
    Q,
    K,
    V,
    Att,
    Gate,
    Up,
    H,
}

/// What one layer's forward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPass {
    /// The layer's output only (inference, or a checkpointed forward).
    Output,
    /// The output and every value the layer's backward reads.
    OutputAndCache,
    /// The values the backward reads, not the output (gradient checkpointing's recomputation:
    /// the next layer's input is already saved). The down projection, whose output the
    /// backward does not read (29% of a layer's products at the 0.5B shape), is skipped.
    Recompute,
}

/// The forward ops of a decoder layer on one backend, for one pass. `layer` indexes the
/// model's layers; the backend knows the weights, positions and attention strategy of the
/// pass.
pub trait LayerOps {
    /// An activation [rows, width] on this backend: a tensor, or a handle of a buffer.
    type Act: Clone;

    /// (rms_norm(x)·w, 1/rms(x)) with the layer's norm `norm`.
    fn rms_norm(
        &mut self,
        layer: usize,
        norm: Norm,
        x: &Self::Act,
    ) -> Result<(Self::Act, Self::Act)>;

    /// x·Wᵀ (+ b) (+ the adapter's s·B(A·x)) of projection `p`.
    fn linear(&mut self, layer: usize, p: Proj, x: &Self::Act) -> Result<Self::Act>;

    /// residual + x·Wᵀ (+ b) (+ adapter) of projection `p` (a backend may update `residual`'s
    /// storage in place and return it).
    fn residual_linear(
        &mut self,
        layer: usize,
        p: Proj,
        x: &Self::Act,
        residual: Self::Act,
    ) -> Result<Self::Act>;

    /// Whether the model normalises each head of q and k before the rotation (Qwen3's
    /// QK-norm; then [`Self::head_norm`] runs on q and k).
    fn qk_norm(&self) -> bool;

    /// Qwen3's QK-norm: (rms_norm of each head of x, weight `q_norm` or `k_norm` [head_dim],
    /// 1/rms per (row, head)) — the model's RMSNorm on x seen as [rows·heads, head_dim]. x
    /// from [`Self::linear`] of Q or K; a backend may normalise its storage in place.
    fn head_norm(
        &mut self,
        layer: usize,
        heads: Heads,
        x: Self::Act,
    ) -> Result<(Self::Act, Self::Act)>;

    /// x rotated to the pass's positions (x from [`Self::linear`] of Q or K).
    fn rope(&mut self, x: Self::Act, heads: Heads) -> Result<Self::Act>;

    /// Attention of the rotated q over the keys and values the pass's strategy holds (the
    /// packed batch's causal prefix, or a row's KV cache, to which k and v are appended):
    /// (att [rows, q_dim], the log-sum-exp of each query row's scores when the backward needs
    /// it).
    fn attend(
        &mut self,
        layer: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
    ) -> Result<(Self::Act, Option<Self::Act>)>;

    /// silu(gate) ⊙ up.
    fn swiglu(&mut self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act>;
}

/// The values of one layer's forward its backward reads. The normed inputs xn, xn2 and the
/// MLP's h are not kept: the backward recomputes them with the same ops (a third of a layer's
/// activations at the 0.5B shape, for elementwise work).
pub struct LayerCache<A> {
    pub x: A,
    pub rstd1: A,
    pub q: A,
    pub k: A,
    pub v: A,
    pub att: A,
    pub lse: A,
    pub xm: A,
    pub rstd2: A,
    pub gate: A,
    pub up: A,
    /// What the QK-norm's backward reads (Qwen3), `None` without QK-norm.
    pub qk_norm: Option<QkNormCache<A>>,
}

/// The inputs of Qwen3's QK-norm (q, k before the norm, [rows, heads·hd]) and their 1/rms
/// per (row, head).
pub struct QkNormCache<A> {
    pub q: A,
    pub k: A,
    pub rstd_q: A,
    pub rstd_k: A,
}

/// The backward ops of a decoder layer. Parameter gradients go where the backend's sink says
/// (every base parameter, or the adapter's A and B only); each op returns the input gradient.
pub trait LayerBackwardOps: LayerOps {
    /// Given dy and the product's input x: adds ∂W = dyᵀ·x, ∂b = Σ dy (or the adapter's ∂A,
    /// ∂B) to the sink and returns ∂L/∂x = dy·W (+ the adapter's path).
    fn linear_backward(
        &mut self,
        layer: usize,
        p: Proj,
        dy: &Self::Act,
        x: &Self::Act,
    ) -> Result<Self::Act>;

    /// Given dy = ∂L/∂(rms_norm(x)·w): adds ∂w to the sink (when norms train) and returns
    /// ∂L/∂x.
    fn rms_norm_backward(
        &mut self,
        layer: usize,
        norm: Norm,
        dy: &Self::Act,
        x: &Self::Act,
        rstd: &Self::Act,
    ) -> Result<Self::Act>;

    /// (∂L/∂gate, ∂L/∂up) given dh = ∂L/∂(silu(gate) ⊙ up).
    fn swiglu_backward(
        &mut self,
        dh: &Self::Act,
        gate: &Self::Act,
        up: &Self::Act,
    ) -> Result<(Self::Act, Self::Act)>;

    /// (dq, dk, dv) of the packed causal attention, P recomputed from the saved log-sum-exp;
    /// dq and dk still rotated.
    fn attention_backward(
        &mut self,
        datt: &Self::Act,
        cache: &LayerCache<Self::Act>,
    ) -> Result<(Self::Act, Self::Act, Self::Act)>;

    /// Backward of [`LayerOps::head_norm`]: given dy = ∂L/∂(normed x) and x before the norm,
    /// adds ∂q_norm or ∂k_norm to the sink (when norms train) and returns ∂L/∂x.
    fn head_norm_backward(
        &mut self,
        layer: usize,
        heads: Heads,
        dy: &Self::Act,
        x: &Self::Act,
        rstd: &Self::Act,
    ) -> Result<Self::Act>;

    /// The gradient before the rotation, given the one after it.
    fn rope_backward(&mut self, dx: Self::Act, heads: Heads) -> Result<Self::Act>;

    /// a + b.
    fn add(&mut self, a: &Self::Act, b: &Self::Act) -> Result<Self::Act>;
}

/// What a layer's forward returns: the next residual stream (absent in a
/// [`LayerPass::Recompute`]) and the values its backward reads (absent in a
/// [`LayerPass::Output`]).
pub type LayerOutput<A> = (Option<A>, Option<LayerCache<A>>);

/// One layer's forward from its input `x`: per `pass`, the next residual stream and/or the
/// values its backward reads.
pub fn layer_forward<O: LayerOps>(
    ops: &mut O,
    layer: usize,
    x: O::Act,
    pass: LayerPass,
) -> Result<LayerOutput<O::Act>> {
    let (xn, rstd1) = ops.rms_norm(layer, Norm::Input, &x)?;
    let q = ops.linear(layer, Proj::Q, &xn)?;
    let k = ops.linear(layer, Proj::K, &xn)?;
    let v = ops.linear(layer, Proj::V, &xn)?;
    let keep = pass != LayerPass::Output;
    let (q, k, qk_norm) = if ops.qk_norm() {
        let q_in = keep.then(|| q.clone());
        let (q, rstd_q) = ops.head_norm(layer, Heads::Query, q)?;
        let k_in = keep.then(|| k.clone());
        let (k, rstd_k) = ops.head_norm(layer, Heads::Key, k)?;
        let cache = q_in.zip(k_in).map(|(q, k)| QkNormCache {
            q,
            k,
            rstd_q,
            rstd_k,
        });
        (q, k, cache)
    } else {
        (q, k, None)
    };
    let q = ops.rope(q, Heads::Query)?;
    let k = ops.rope(k, Heads::Key)?;
    let (att, lse) = ops.attend(layer, &q, &k, &v)?;
    // A backend that updates the residual in place needs x no more once it is kept.
    let x_kept = keep.then(|| x.clone());
    let xm = ops.residual_linear(layer, Proj::O, &att, x)?;
    let (xn2, rstd2) = ops.rms_norm(layer, Norm::PostAttention, &xm)?;
    let gate = ops.linear(layer, Proj::Gate, &xn2)?;
    let up = ops.linear(layer, Proj::Up, &xn2)?;
    let h = ops.swiglu(&gate, &up)?;
    let xm_kept = keep.then(|| xm.clone());
    let x_next = match pass {
        LayerPass::Recompute => None,
        LayerPass::Output | LayerPass::OutputAndCache => {
            Some(ops.residual_linear(layer, Proj::Down, &h, xm)?)
        }
    };
    let cache = match (x_kept, xm_kept, lse) {
        (Some(x), Some(xm), Some(lse)) => Some(LayerCache {
            x,
            rstd1,
            q,
            k,
            v,
            att,
            lse,
            xm,
            rstd2,
            gate,
            up,
            qk_norm,
        }),
        (Some(_), _, None) => anyhow::bail!(
            "internal: layer {layer}: the pass keeps activations but its attention kept no log-sum-exp"
        ),
        _ => None,
    };
    Ok((x_next, cache))
}

/// One layer's backward: given dx' = ∂L/∂x' and the values its forward kept, adds the layer's
/// parameter gradients to the backend's sink and returns ∂L/∂x.
pub fn layer_backward<O: LayerBackwardOps>(
    ops: &mut O,
    layer: usize,
    dx: &O::Act,
    lc: &LayerCache<O::Act>,
) -> Result<O::Act> {
    // x' = xm + down(swiglu(gate(xn2), up(xn2)))
    let h = ops.swiglu(&lc.gate, &lc.up)?;
    let dh = ops.linear_backward(layer, Proj::Down, dx, &h)?;
    drop(h);
    let (dgate, dup) = ops.swiglu_backward(&dh, &lc.gate, &lc.up)?;
    let (xn2, _) = ops.rms_norm(layer, Norm::PostAttention, &lc.xm)?;
    let dxn2_gate = ops.linear_backward(layer, Proj::Gate, &dgate, &xn2)?;
    let dxn2_up = ops.linear_backward(layer, Proj::Up, &dup, &xn2)?;
    drop(xn2);
    let dxn2 = ops.add(&dxn2_gate, &dxn2_up)?;
    let dxm_norm = ops.rms_norm_backward(layer, Norm::PostAttention, &dxn2, &lc.xm, &lc.rstd2)?;
    let dxm = ops.add(dx, &dxm_norm)?;
    // xm = x + o_proj(att)
    let datt = ops.linear_backward(layer, Proj::O, &dxm, &lc.att)?;
    let (dq, dk, dv) = ops.attention_backward(&datt, lc)?;
    let dq = ops.rope_backward(dq, Heads::Query)?;
    let dk = ops.rope_backward(dk, Heads::Key)?;
    let (dq, dk) = match &lc.qk_norm {
        Some(n) => (
            ops.head_norm_backward(layer, Heads::Query, &dq, &n.q, &n.rstd_q)?,
            ops.head_norm_backward(layer, Heads::Key, &dk, &n.k, &n.rstd_k)?,
        ),
        None => (dq, dk),
    };
    let (xn, _) = ops.rms_norm(layer, Norm::Input, &lc.x)?;
    let dxn_q = ops.linear_backward(layer, Proj::Q, &dq, &xn)?;
    let dxn_k = ops.linear_backward(layer, Proj::K, &dk, &xn)?;
    let dxn_v = ops.linear_backward(layer, Proj::V, &dv, &xn)?;
    drop(xn);
    let dxn = ops.add(&dxn_q, &dxn_k)?;
    let dxn = ops.add(&dxn, &dxn_v)?;
    let dx_norm = ops.rms_norm_backward(layer, Norm::Input, &dxn, &lc.x, &lc.rstd1)?;
    ops.add(&dxm, &dx_norm)
}
