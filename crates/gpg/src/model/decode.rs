//! The decoding step of sampling, on plain CPU slices with nothing allocated per token.
//!
//! [`Decoder`] holds a copy of the weights laid out for decoding — q, k and v fused into one
//! [q_dim + 2·kv_dim, H] matrix with one bias, gate and up fused into one [2·I, H] matrix — and
//! [`DecodeState`] holds the per-row KV cache and every activation buffer, sized once for the
//! largest batch. A step for B rows (each feeding one token) is, per layer:
//!
//! ```text
//! xn   = rms_norm(x)                          [B, H]
//! qkv  = xn·W_qkvᵀ + b_qkv                    [B, q_dim + 2·kv_dim]
//! q, k = rope(q, pos), rope(k, pos); append k, v to each row's cache
//! att  = softmax(q·Kᵀ/√hd)·V per row and head [B, q_dim]
//! x   += att·W_oᵀ
//! gu   = rms_norm(x)·W_guᵀ                    [B, 2·I]
//! x   += (silu(g) ⊙ u)·W_downᵀ
//! ```
//!
//! then `logits = rms_norm(x)·W_headᵀ` [B, V]. The products use the few-rows kernel
//! (`ops::cpu::rows_matmul`), which streams the weights as stored; the result equals
//! [`Qwen2`]'s forward up to floating-point summation order.

use anyhow::{ensure, Result};
use candle_core::Tensor;
use rayon::prelude::*;

use super::ops::cpu::rows_matmul::matmul_wt;
use super::ops::cpu::{rms_norm, swiglu};
use super::ops::{self, DecodeCache, Rope};

thread_local! {
    /// Attention scores of one row (per thread, reused across steps).
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}
use super::qwen2::{Linear, Qwen2};

/// A dense weight [out, inp] row-major with an optional bias [out].
struct Dense {
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    out: usize,
    inp: usize,
}

impl Dense {
    /// The linears stacked along the output dimension (their biases too, zeros for a linear
    /// without one when another has one).
    fn stack(parts: &[&Linear]) -> Result<Self> {
        let inp = parts[0].weight.dim(1)?;
        let mut w = Vec::new();
        let mut bias = Vec::new();
        let mut out = 0;
        let any_bias = parts.iter().any(|l| l.bias.is_some());
        for l in parts {
            let (o, i) = l.weight.dims2()?;
            ensure!(i == inp, "decoder: stacked linears differ in input width");
            w.extend(flat(&l.weight)?);
            match &l.bias {
                Some(b) => bias.extend(flat(b)?),
                None if any_bias => bias.extend(std::iter::repeat_n(0.0, o)),
                None => {}
            }
            out += o;
        }
        Ok(Dense {
            w,
            bias: any_bias.then_some(bias),
            out,
            inp,
        })
    }

    /// y[rows, out] (+)= x[rows, inp]·wᵀ + b.
    fn apply(&self, x: &[f32], rows: usize, y: &mut [f32], accumulate: bool) {
        matmul_wt(
            x,
            &self.w,
            self.bias.as_deref(),
            rows,
            self.inp,
            self.out,
            y,
            accumulate,
        );
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

struct Layer {
    input_norm: Vec<f32>,
    qkv: Dense,
    o: Dense,
    post_norm: Vec<f32>,
    gate_up: Dense,
    down: Dense,
}

/// The weights of a [`Qwen2`] laid out for decoding (a copy: build one per set of weights).
pub struct Decoder {
    hidden: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    eps: f32,
    /// [V, H]; also the output head when the model ties them.
    embed: Vec<f32>,
    /// Untied output head.
    head: Option<Dense>,
    layers: Vec<Layer>,
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
    qkv: Vec<f32>,
    att: Vec<f32>,
    gate_up: Vec<f32>,
    h: Vec<f32>,
    logits: Vec<f32>,
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

impl Decoder {
    pub fn new(model: &Qwen2) -> Result<Self> {
        let c = &model.config;
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                Ok(Layer {
                    input_norm: flat(&l.input_layernorm)?,
                    qkv: Dense::stack(&[&a.q_proj, &a.k_proj, &a.v_proj])?,
                    o: Dense::stack(&[&a.o_proj])?,
                    post_norm: flat(&l.post_attention_layernorm)?,
                    gate_up: Dense::stack(&[&m.gate_proj, &m.up_proj])?,
                    down: Dense::stack(&[&m.down_proj])?,
                })
            })
            .collect::<Result<_>>()?;
        let head = match &model.lm_head {
            Some(w) => Some(Dense::stack(&[&Linear {
                weight: w.clone(),
                bias: None,
            }])?),
            None => None,
        };
        Ok(Decoder {
            hidden: c.hidden_size,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
            embed: flat(&model.embed_tokens)?,
            head,
            layers,
            norm: flat(&model.norm)?,
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
        let qkv_width = self.q_dim() + 2 * self.kv_dim();
        DecodeState {
            rows: Vec::with_capacity(capacity),
            x: vec![0.0; capacity * self.hidden],
            xn: vec![0.0; capacity * self.hidden],
            rstd: vec![0.0; capacity],
            qkv: vec![0.0; capacity * qkv_width],
            att: vec![0.0; capacity * self.q_dim()],
            gate_up: vec![0.0; capacity * 2 * self.intermediate],
            h: vec![0.0; capacity * self.intermediate],
            logits: vec![0.0; capacity * self.vocab],
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
        let (h, inter) = (self.hidden, self.intermediate);
        let (qd, kvd, hd) = (self.q_dim(), self.kv_dim(), self.head_dim);
        let width = qd + 2 * kvd;
        let s = state;
        for (row, &t) in s.x.chunks_exact_mut(h).zip(tokens) {
            row.copy_from_slice(&self.embed[t as usize * h..(t as usize + 1) * h]);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm::forward(
                &s.x[..b * h],
                &layer.input_norm,
                self.eps,
                &mut s.xn[..b * h],
                &mut s.rstd[..b],
            );
            layer.qkv.apply(&s.xn, b, &mut s.qkv, false);
            for (r, (row, cache)) in s.qkv[..b * width]
                .chunks_exact_mut(width)
                .zip(s.rows.iter_mut())
                .enumerate()
            {
                let (q, kv) = row.split_at_mut(qd);
                let (k, v) = kv.split_at_mut(kvd);
                let pos = &positions[r..r + 1];
                self.rope.forward_slice(q, self.n_heads, pos)?;
                self.rope.forward_slice(k, self.n_kv_heads, pos)?;
                ensure!(cache.len < cache.cap, "decoder: a row outgrew its cache");
                let kt = &mut cache.kt[li];
                for (j, &x) in k.iter().enumerate() {
                    kt[DecodeCache::key_offset(j, cache.len, hd, cache.cap)] = x;
                }
                cache.v[li].extend_from_slice(v);
            }
            let (rows, qkv) = (&s.rows, &s.qkv);
            s.att[..b * qd]
                .par_chunks_mut(qd)
                .zip(rows.par_iter())
                .enumerate()
                .for_each(|(r, (out, cache))| {
                    let q = &qkv[r * width..r * width + qd];
                    let view = DecodeCache {
                        kt: &cache.kt[li],
                        cap: cache.cap,
                        v: &cache.v[li],
                        len: cache.len + 1,
                    };
                    SCORES.with_borrow_mut(|scores| {
                        ops::attention_decode(
                            q,
                            view,
                            self.n_heads,
                            self.n_kv_heads,
                            hd,
                            scores,
                            out,
                        )
                    });
                });
            layer.o.apply(&s.att, b, &mut s.x, true);
            rms_norm::forward(
                &s.x[..b * h],
                &layer.post_norm,
                self.eps,
                &mut s.xn[..b * h],
                &mut s.rstd[..b],
            );
            layer.gate_up.apply(&s.xn, b, &mut s.gate_up, false);
            for (gu, hr) in s.gate_up[..b * 2 * inter]
                .chunks_exact(2 * inter)
                .zip(s.h.chunks_exact_mut(inter))
            {
                let (gate, up) = gu.split_at(inter);
                swiglu::forward(gate, up, hr);
            }
            layer.down.apply(&s.h, b, &mut s.x, true);
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
        match &self.head {
            Some(head) => head.apply(&s.xn, b, &mut s.logits, false),
            None => matmul_wt(
                &s.xn,
                &self.embed,
                None,
                b,
                h,
                self.vocab,
                &mut s.logits,
                false,
            ),
        }
        Ok(())
    }
}
