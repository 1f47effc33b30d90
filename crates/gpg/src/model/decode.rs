//! The decoding step of sampling, on plain CPU slices with nothing allocated per token.
//!
//! [`Decoder`] reads the model's weights where they are stored (f32 or bf16, no copy: the
//! optimiser updates them in place, so a decoder made after a step sees the new weights) and
//! [`DecodeState`] holds the per-row KV cache and every activation buffer, sized once for the
//! largest batch. A step for B rows (each feeding one token) runs the decoder layer of
//! [`super::layer`] (the same definition as training and prefill) over the state's buffers
//! ([`StepOps`]: a value is a buffer, residual products add into `x` in place, attention
//! appends k and v to each row's cache and reads it), per layer:
//!
//! ```text
//! xn   = rms_norm(x)                          [B, H]
//! q, k, v = xn·W_qᵀ + b_q, xn·W_kᵀ + b_k, xn·W_vᵀ + b_v
//! q, k = rope(q, pos), rope(k, pos); append k, v to each row's cache
//! att  = softmax(q·Kᵀ/√hd)·V per row and head [B, q_dim]
//! x   += att·W_oᵀ
//! g, u = rms_norm(x)·W_gateᵀ, rms_norm(x)·W_upᵀ   [B, I]
//! x   += (silu(g) ⊙ u)·W_downᵀ
//! ```
//!
//! then `logits = rms_norm(x)·W_headᵀ` [B, V]. The products use the few-rows kernels
//! (`ops::cpu::rows_matmul`), which stream the weights as stored; the result equals
//! [`Qwen2`]'s forward up to floating-point summation order (and, for bf16 weights, the
//! rounding of the activations to bf16 inside the products).

use anyhow::{ensure, Result};
use candle_core::Tensor;
use rayon::prelude::*;

use super::layer::{layer_forward, Heads, LayerOps, LayerPass, Norm, Proj, StepBuf as Buf};
use super::lora::LoraPair;
use super::ops::cpu::mixed::rows_x_wt;
use super::ops::cpu::{rms_norm, swiglu};
use super::ops::tensor_io::{with_weight, WeightSlice};
use super::ops::{self, DecodeCache, Rope};
use super::params::Linear;
use super::qwen2::Qwen2;

thread_local! {
    /// Attention scores of one row (per thread, reused across steps).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// s·(x·Aᵀ) of an adapted layer, [rows, r] (reused across steps).
    static LORA_U: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The f32 elements of a small tensor (norm weights, biases), copied.
fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

/// A linear layer as decoding uses it: the model's weight tensor, an f32 copy of its bias and,
/// for an adapted layer, its LoRA pair (run as its own path: y += s·(x·Aᵀ)·Bᵀ, see
/// [`super::lora`]; the base weight is never copied or merged).
struct Dense<'m> {
    w: &'m Tensor,
    bias: Option<Vec<f32>>,
    lora: Option<&'m LoraPair>,
    out: usize,
    inp: usize,
}

impl<'m> Dense<'m> {
    fn new(l: &'m Linear<Tensor>, lora: Option<&'m Linear<Option<LoraPair>>>) -> Result<Self> {
        let (out, inp) = l.weight.dims2()?;
        Ok(Dense {
            w: &l.weight,
            bias: l.bias.as_ref().map(flat).transpose()?,
            lora: lora.and_then(|l| l.weight.as_ref()),
            out,
            inp,
        })
    }

    /// y[rows, out] (+)= x[rows, inp]·wᵀ + b.
    fn apply(&self, x: &[f32], rows: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        with_weight("decode", "weight", self.w, |w| {
            rows_x_wt(
                x,
                w,
                self.bias.as_deref(),
                rows,
                self.inp,
                self.out,
                y,
                accumulate,
            )
        })?;
        if let Some(p) = self.lora {
            let r = p.a.dims()[0];
            let mut path = |u: &mut Vec<f32>| {
                u.resize(rows * r, 0.0);
                with_weight("decode", "lora_A", &p.a, |a| {
                    rows_x_wt(x, a, None, rows, self.inp, r, u, false)
                })?;
                u.iter_mut().for_each(|v| *v *= p.scale);
                with_weight("decode", "lora_B", &p.b, |b| {
                    rows_x_wt(u, b, None, rows, r, self.out, y, true)
                })
            };
            // The thread's buffer, or a fresh one if this thread is already inside another
            // decoder's product (a rayon worker that stole a job while waiting).
            LORA_U.with(|u| match u.try_borrow_mut() {
                Ok(mut u) => path(&mut u),
                Err(_) => path(&mut Vec::new()),
            })?;
        }
        Ok(())
    }
}

/// One decoder layer as decoding reads it.
struct Layer<'m> {
    input_norm: Vec<f32>,
    q: Dense<'m>,
    k: Dense<'m>,
    v: Dense<'m>,
    o: Dense<'m>,
    post_norm: Vec<f32>,
    /// Qwen3's QK-norm weights [head_dim] (query, key).
    head_norms: Option<(Vec<f32>, Vec<f32>)>,
    gate: Dense<'m>,
    up: Dense<'m>,
    down: Dense<'m>,
}

/// A [`Qwen2`]'s weights seen by the decoding step (borrowed, not copied).
pub struct Decoder<'m> {
    hidden: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    eps: f32,
    /// [V, H]; also the output head when the model ties them.
    embed: &'m Tensor,
    /// The output head [V, H].
    head: Dense<'m>,
    layers: Vec<Layer<'m>>,
    norm: Vec<f32>,
    rope: Rope,
}

/// The KV cache of one sequence, all layers, sized for its whole completion.
struct RowCache {
    /// `kt[layer]`: keys transposed in blocks, [kv_heads, cap/B, head_dim, B] (see
    /// [`DecodeCache::key_offset`]).
    kt: Vec<Vec<f32>>,
    /// `v[layer]`: values [len, kv_dim] row-major, capacity reserved up to `cap`.
    v: Vec<Vec<f32>>,
    /// Cached positions.
    len: usize,
    /// Room in `kt`: the longest the sequence may grow, rounded up to DecodeCache::BLOCK.
    cap: usize,
}

/// Per-row KV caches and the activation buffers of [`Decoder::step`], for up to `capacity`
/// rows. Finished rows leave with [`DecodeState::retain`].
pub struct DecodeState {
    rows: Vec<RowCache>,
    x: Vec<f32>,
    xn: Vec<f32>,
    rstd: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    h: Vec<f32>,
    logits: Vec<f32>,
    /// QK-norm outputs (Qwen3; empty otherwise), swapped with `q` / `k` after each norm.
    q_normed: Vec<f32>,
    k_normed: Vec<f32>,
    /// 1/rms per (row, head) of the QK-norm (not read by decoding).
    head_rstd: Vec<f32>,
}

impl DecodeState {
    /// Number of rows in the batch.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Keeps the rows whose flag is true, in order.
    pub fn retain(&mut self, keep: &[bool]) {
        let mut flags = keep.iter();
        self.rows.retain(|_| flags.next().copied().unwrap_or(false));
    }

    /// Logits of the last step, [rows, V].
    pub fn logits_mut(&mut self, rows: usize, vocab: usize) -> &mut [f32] {
        &mut self.logits[..rows * vocab]
    }
}

impl<'m> Decoder<'m> {
    pub fn new(model: &'m Qwen2) -> Result<Self> {
        let c = &model.config;
        let w = &model.weights;
        let adapter = model.adapter().map(|a| &a.pairs.layers);
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (a, m) = (&l.self_attn, &l.mlp);
                let la = adapter.map(|layers| &layers[i]);
                let (aa, am) = (la.map(|l| &l.self_attn), la.map(|l| &l.mlp));
                Ok(Layer {
                    input_norm: flat(&l.input_layernorm)?,
                    q: Dense::new(&a.q_proj, aa.map(|a| &a.q_proj))?,
                    k: Dense::new(&a.k_proj, aa.map(|a| &a.k_proj))?,
                    v: Dense::new(&a.v_proj, aa.map(|a| &a.v_proj))?,
                    o: Dense::new(&a.o_proj, aa.map(|a| &a.o_proj))?,
                    post_norm: flat(&l.post_attention_layernorm)?,
                    head_norms: match (&a.q_norm, &a.k_norm) {
                        (Some(q), Some(k)) => Some((flat(q)?, flat(k)?)),
                        (None, None) => None,
                        _ => anyhow::bail!("internal: layer {i} has one QK-norm weight of two"),
                    },
                    gate: Dense::new(&m.gate_proj, am.map(|m| &m.gate_proj))?,
                    up: Dense::new(&m.up_proj, am.map(|m| &m.up_proj))?,
                    down: Dense::new(&m.down_proj, am.map(|m| &m.down_proj))?,
                })
            })
            .collect::<Result<_>>()?;
        let head = Dense {
            w: model.head_weight(),
            bias: None,
            lora: None,
            out: c.vocab_size,
            inp: c.hidden_size,
        };
        Ok(Decoder {
            hidden: c.hidden_size,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
            embed: &w.embed_tokens,
            head,
            layers,
            norm: flat(&w.norm)?,
            rope: model.rope().clone(),
        })
    }

    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// An empty state whose buffers fit `capacity` rows.
    pub fn state(&self, capacity: usize) -> DecodeState {
        let qk = self.layers.iter().any(|l| l.head_norms.is_some()) as usize;
        DecodeState {
            rows: Vec::with_capacity(capacity),
            x: vec![0.0; capacity * self.hidden],
            xn: vec![0.0; capacity * self.hidden],
            rstd: vec![0.0; capacity],
            q: vec![0.0; capacity * self.q_dim()],
            k: vec![0.0; capacity * self.kv_dim()],
            v: vec![0.0; capacity * self.kv_dim()],
            att: vec![0.0; capacity * self.q_dim()],
            gate: vec![0.0; capacity * self.intermediate],
            up: vec![0.0; capacity * self.intermediate],
            h: vec![0.0; capacity * self.intermediate],
            logits: vec![0.0; capacity * self.vocab],
            q_normed: vec![0.0; qk * capacity * self.q_dim()],
            k_normed: vec![0.0; qk * capacity * self.kv_dim()],
            head_rstd: vec![0.0; qk * capacity * self.n_heads],
        }
    }

    /// Adds a row to the batch whose cache starts with `k`, `v` (a prefilled prompt, each
    /// [len, kv_dim] per layer), reserving room for `max_len` positions.
    pub fn push_row(
        &self,
        state: &mut DecodeState,
        kv: &[(&[f32], &[f32])],
        max_len: usize,
    ) -> Result<()> {
        ensure!(
            kv.len() == self.layers.len(),
            "decoder: one k/v pair per layer"
        );
        let kv_dim = self.kv_dim();
        let len = kv.first().map_or(0, |(k, _)| k.len() / kv_dim);
        ensure!(
            len <= max_len,
            "decoder: prompt of {len} exceeds max_len {max_len}"
        );
        let cap = max_len.next_multiple_of(DecodeCache::BLOCK);
        let mut row = RowCache {
            kt: Vec::with_capacity(kv.len()),
            v: Vec::with_capacity(kv.len()),
            len,
            cap,
        };
        for (layer, (k, v)) in kv.iter().enumerate() {
            ensure!(
                k.len() == len * kv_dim && v.len() == len * kv_dim,
                "decoder: prompt k/v of layer {layer} are not [{len}, {kv_dim}]"
            );
            let mut kt = vec![0.0f32; kv_dim * cap];
            for (t, kr) in k.chunks_exact(kv_dim).enumerate() {
                for (j, &x) in kr.iter().enumerate() {
                    kt[DecodeCache::key_offset(j, t, self.head_dim, cap)] = x;
                }
            }
            let mut vc = Vec::with_capacity(max_len * kv_dim);
            vc.extend_from_slice(v);
            row.kt.push(kt);
            row.v.push(vc);
        }
        state.rows.push(row);
        Ok(())
    }

    /// One step: row b of the batch feeds `tokens[b]` at `positions[b]`; its key and value are
    /// appended to its cache and the logits of its next token are written to row b of
    /// `state.logits_mut()`.
    pub fn step(&self, tokens: &[u32], positions: &[u32], state: &mut DecodeState) -> Result<()> {
        let b = tokens.len();
        ensure!(
            b == state.rows() && positions.len() == b,
            "decoder: {b} tokens for a batch of {} rows",
            state.rows()
        );
        ensure!(
            b * self.hidden <= state.x.len(),
            "decoder: batch of {b} exceeds the state's capacity"
        );
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            anyhow::bail!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab
            );
        }
        let h = self.hidden;
        let s = state;
        with_weight("decode", "model.embed_tokens.weight", self.embed, |e| {
            for (row, &t) in s.x.chunks_exact_mut(h).zip(tokens) {
                let span = t as usize * h..(t as usize + 1) * h;
                match e {
                    WeightSlice::F32(e) => row.copy_from_slice(&e[span]),
                    WeightSlice::Bf16(e) => row
                        .iter_mut()
                        .zip(&e[span])
                        .for_each(|(d, v)| *d = v.to_f32()),
                }
            }
        })?;
        let mut ops = StepOps {
            d: self,
            s: &mut *s,
            positions,
            rows: b,
        };
        for li in 0..self.layers.len() {
            layer_forward(&mut ops, li, Buf::X, LayerPass::Output)?;
        }
        for cache in &mut s.rows {
            cache.len += 1;
        }
        rms_norm::forward(
            &s.x[..b * h],
            &self.norm,
            self.eps,
            &mut s.xn[..b * h],
            &mut s.rstd[..b],
        );
        self.head.apply(&s.xn, b, &mut s.logits, false)?;
        Ok(())
    }
}

impl<'m> Layer<'m> {
    fn dense(&self, p: Proj) -> &Dense<'m> {
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

    fn norm(&self, norm: Norm) -> &[f32] {
        match norm {
            Norm::Input => &self.input_norm,
            Norm::PostAttention => &self.post_norm,
        }
    }
}

impl DecodeState {
    fn buf(&self, b: Buf) -> &[f32] {
        match b {
            Buf::X => &self.x,
            Buf::Xn => &self.xn,
            Buf::Rstd => &self.rstd,
            Buf::Q => &self.q,
            Buf::K => &self.k,
            Buf::V => &self.v,
            Buf::Att => &self.att,
            Buf::Gate => &self.gate,
            Buf::Up => &self.up,
            Buf::H => &self.h,
        }
    }

    fn buf_mut(&mut self, b: Buf) -> &mut Vec<f32> {
        match b {
            Buf::X => &mut self.x,
            Buf::Xn => &mut self.xn,
            Buf::Rstd => &mut self.rstd,
            Buf::Q => &mut self.q,
            Buf::K => &mut self.k,
            Buf::V => &mut self.v,
            Buf::Att => &mut self.att,
            Buf::Gate => &mut self.gate,
            Buf::Up => &mut self.up,
            Buf::H => &mut self.h,
        }
    }

    /// Runs `f` on buffer `src` (read) and `dst` (written), two different buffers: `dst` is
    /// taken out of the state for the call (a pointer swap, no copy).
    fn with_dst<R>(
        &mut self,
        src: Buf,
        dst: Buf,
        f: impl FnOnce(&[f32], &mut [f32]) -> Result<R>,
    ) -> Result<R> {
        ensure!(src != dst, "internal: decoding op reads and writes {src:?}");
        let mut out = std::mem::take(self.buf_mut(dst));
        let r = f(self.buf(src), &mut out);
        *self.buf_mut(dst) = out;
        r
    }
}

/// The backend of one decoding step ([`super::layer::LayerOps`] over the state's buffers):
/// `rows` rows, each feeding one token at its position.
struct StepOps<'s, 'd, 'm> {
    d: &'d Decoder<'m>,
    s: &'s mut DecodeState,
    positions: &'s [u32],
    rows: usize,
}

impl LayerOps for StepOps<'_, '_, '_> {
    type Act = Buf;

    fn rms_norm(&mut self, layer: usize, norm: Norm, x: &Buf) -> Result<(Buf, Buf)> {
        let (n, h) = (self.rows, self.d.hidden);
        let w = self.d.layers[layer].norm(norm);
        let mut rstd = std::mem::take(&mut self.s.rstd);
        let r = self.s.with_dst(*x, Buf::Xn, |x, xn| {
            rms_norm::forward(&x[..n * h], w, self.d.eps, &mut xn[..n * h], &mut rstd[..n]);
            Ok(())
        });
        self.s.rstd = rstd;
        r.map(|()| (Buf::Xn, Buf::Rstd))
    }

    fn linear(&mut self, layer: usize, p: Proj, x: &Buf) -> Result<Buf> {
        let dst = match p {
            Proj::Q => Buf::Q,
            Proj::K => Buf::K,
            Proj::V => Buf::V,
            Proj::Gate => Buf::Gate,
            Proj::Up => Buf::Up,
            Proj::O | Proj::Down => {
                anyhow::bail!("internal: decoding runs {p:?} as a residual product only")
            }
        };
        let dense = self.d.layers[layer].dense(p);
        let rows = self.rows;
        self.s
            .with_dst(*x, dst, |x, y| dense.apply(x, rows, y, false))?;
        Ok(dst)
    }

    fn residual_linear(&mut self, layer: usize, p: Proj, x: &Buf, residual: Buf) -> Result<Buf> {
        let dense = self.d.layers[layer].dense(p);
        let rows = self.rows;
        self.s
            .with_dst(*x, residual, |x, y| dense.apply(x, rows, y, true))?;
        Ok(residual)
    }

    fn qk_norm(&self) -> bool {
        self.d.layers.iter().any(|l| l.head_norms.is_some())
    }

    /// Normalises each head of q or k into its spare buffer, which then becomes `Q` / `K` (a
    /// pointer swap). The returned 1/rms handle is not this norm's (decoding never reads it).
    fn head_norm(&mut self, layer: usize, heads: Heads, x: Buf) -> Result<(Buf, Buf)> {
        let (n_heads, width) = match heads {
            Heads::Query => (self.d.n_heads, self.d.q_dim()),
            Heads::Key => (self.d.n_kv_heads, self.d.kv_dim()),
        };
        let Some((wq, wk)) = &self.d.layers[layer].head_norms else {
            anyhow::bail!("internal: layer {layer} has no QK-norm weights");
        };
        let (w, spare) = match heads {
            Heads::Query => (wq, &mut self.s.q_normed),
            Heads::Key => (wk, &mut self.s.k_normed),
        };
        let mut out = std::mem::take(spare);
        let mut rstd = std::mem::take(&mut self.s.head_rstd);
        let n = self.rows * width;
        rms_norm::forward(
            &self.s.buf(x)[..n],
            w,
            self.d.eps,
            &mut out[..n],
            &mut rstd[..self.rows * n_heads],
        );
        let before = std::mem::replace(self.s.buf_mut(x), out);
        match heads {
            Heads::Query => self.s.q_normed = before,
            Heads::Key => self.s.k_normed = before,
        }
        self.s.head_rstd = rstd;
        Ok((x, Buf::Rstd))
    }

    fn rope(&mut self, x: Buf, heads: Heads) -> Result<Buf> {
        let (n_heads, width) = match heads {
            Heads::Query => (self.d.n_heads, self.d.q_dim()),
            Heads::Key => (self.d.n_kv_heads, self.d.kv_dim()),
        };
        let rope = &self.d.rope;
        let buf = self.s.buf_mut(x);
        for (r, row) in buf[..self.rows * width].chunks_exact_mut(width).enumerate() {
            rope.forward_slice(row, n_heads, &self.positions[r..r + 1])?;
        }
        Ok(x)
    }

    /// Appends each row's k and v to its cache, then attends over the cache (one row per
    /// task).
    fn attend(&mut self, layer: usize, q: &Buf, k: &Buf, v: &Buf) -> Result<(Buf, Option<Buf>)> {
        let d = self.d;
        let (qd, kvd, hd) = (d.q_dim(), d.kv_dim(), d.head_dim);
        let s = &mut *self.s;
        // The row caches are taken out of the state for the append (a pointer swap).
        let mut caches = std::mem::take(&mut s.rows);
        let (ks, vs) = (s.buf(*k), s.buf(*v));
        let appended = caches
            .iter_mut()
            .zip(ks.chunks_exact(kvd).zip(vs.chunks_exact(kvd)))
            .try_for_each(|(cache, (kr, vr))| {
                ensure!(cache.len < cache.cap, "decoder: a row outgrew its cache");
                let kt = &mut cache.kt[layer];
                for (j, &x) in kr.iter().enumerate() {
                    kt[DecodeCache::key_offset(j, cache.len, hd, cache.cap)] = x;
                }
                cache.v[layer].extend_from_slice(vr);
                Ok(())
            });
        s.rows = caches;
        appended?;
        let mut att = std::mem::take(&mut s.att);
        let (rows, qs) = (&s.rows, s.buf(*q));
        att[..self.rows * qd]
            .par_chunks_mut(qd)
            .zip(rows.par_iter())
            .enumerate()
            .for_each(|(r, (out, cache))| {
                let q = &qs[r * qd..(r + 1) * qd];
                let view = DecodeCache {
                    kt: &cache.kt[layer],
                    cap: cache.cap,
                    v: &cache.v[layer],
                    len: cache.len + 1,
                };
                SCORES.with_borrow_mut(|scores| {
                    ops::attention_decode(q, view, d.n_heads, d.n_kv_heads, hd, scores, out)
                });
            });
        s.att = att;
        Ok((Buf::Att, None))
    }

    fn swiglu(&mut self, gate: &Buf, up: &Buf) -> Result<Buf> {
        let n = self.rows * self.d.intermediate;
        let mut h = std::mem::take(&mut self.s.h);
        swiglu::forward(&self.s.buf(*gate)[..n], &self.s.buf(*up)[..n], &mut h[..n]);
        self.s.h = h;
        Ok(Buf::H)
    }
}
