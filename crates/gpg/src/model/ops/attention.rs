//! Causal self-attention over a packed variable-length batch with grouped-query heads.
//!
//! Forward, for a sequence and query head h (kv head g = h / (nh/nkv)), scale = 1/√hd:
//!   s_ij = scale·q_i·k_j for j ≤ i (token i sees tokens 0..=i of its own sequence only),
//!   lse_i = log Σ_{j≤i} e^(s_ij),  P_ij = e^(s_ij − lse_i),  o_i = Σ_j P_ij·v_j.
//!
//! Backward (flash-attention style, P recomputed from lse rather than stored):
//!   dv_j = Σ_i P_ij·do_i,  dP_ij = do_i·v_j,
//!   softmax: dS_ij = P_ij·(dP_ij − Σ_l P_il·dP_il) = P_ij·(dP_ij − D_i) with D_i = do_i·o_i,
//!   dq_i = scale·Σ_j dS_ij·k_j,  dk_j = scale·Σ_i dS_ij·q_i,
//! and dk, dv of a kv head sum the contributions of all query heads of its group.

use super::cpu;
use super::cpu::attention::Heads;
use super::tensor_io::{backend, cpu_slice, cpu_tensor, expect_dims, f32_dims, Backend};
use super::varlen::VarLen;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Reads and checks the head layout of q [T, nh, hd] and k, v [T, nkv, hd].
fn heads(op: &str, q: &Tensor, k: &Tensor, v: &Tensor, seqs: &VarLen) -> Result<(usize, Heads)> {
    let qd = f32_dims(op, "q", q, 3)?;
    let (t, nh, hd) = (qd[0], qd[1], qd[2]);
    let kd = f32_dims(op, "k", k, 3)?;
    let nkv = kd[1];
    if nkv == 0 || hd == 0 || nh % nkv != 0 {
        bail!("{op}: need n_heads ({nh}) a multiple of n_kv_heads ({nkv}) and head_dim ({hd}) > 0");
    }
    expect_dims(op, "k", k, &[t, nkv, hd])?;
    expect_dims(op, "v", v, &[t, nkv, hd])?;
    seqs.validate(t, op)?;
    Ok((
        t,
        Heads {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        },
    ))
}

/// Causal GQA attention of `q` [T, nh, hd] over `k`, `v` [T, nkv, hd] within each sequence of
/// `seqs`. Returns `(out [T, nh, hd], lse [T, nh])`, lse being the log-sum-exp of each row of
/// scaled scores (kept for the backward pass).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, seqs: &VarLen) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention";
    let (t, dims) = heads(OP, q, k, v, seqs)?;
    let (nh, hd) = (dims.n_heads, dims.head_dim);
    match backend(OP, &[("q", q), ("k", k), ("v", v)])? {
        Backend::Cpu => {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let mut out = cpu::zeroed(t * nh * hd);
            let mut lse = vec![0.0f32; t * nh];
            cpu::attention::forward(
                cpu_slice(OP, "q", &qs, ql)?,
                cpu_slice(OP, "k", &ks, kl)?,
                cpu_slice(OP, "v", &vs, vl)?,
                &seqs.offsets,
                dims,
                &mut out,
                &mut lse,
            );
            Ok((
                cpu_tensor(OP, out, (t, nh, hd))?,
                cpu_tensor(OP, lse, (t, nh))?,
            ))
        }
    }
}

/// Backward of [`attention`] given dout [T, nh, hd] and the forward's inputs, `out` and `lse`.
/// Returns `(dq [T, nh, hd], dk [T, nkv, hd], dv [T, nkv, hd])`.
pub fn attention_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    seqs: &VarLen,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention_backward";
    let (t, dims) = heads(OP, q, k, v, seqs)?;
    let (nh, nkv, hd) = (dims.n_heads, dims.n_kv_heads, dims.head_dim);
    expect_dims(OP, "dout", dout, &[t, nh, hd])?;
    expect_dims(OP, "out", out, &[t, nh, hd])?;
    expect_dims(OP, "lse", lse, &[t, nh])?;
    let args = [
        ("dout", dout),
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", out),
        ("lse", lse),
    ];
    match backend(OP, &args)? {
        Backend::Cpu => {
            let (dos, dol) = dout.storage_and_layout();
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (os, ol) = out.storage_and_layout();
            let (ls, ll) = lse.storage_and_layout();
            let mut dq = cpu::zeroed(t * nh * hd);
            let mut dk = vec![0.0f32; t * nkv * hd];
            let mut dv = vec![0.0f32; t * nkv * hd];
            cpu::attention::backward(
                cpu_slice(OP, "dout", &dos, dol)?,
                cpu_slice(OP, "q", &qs, ql)?,
                cpu_slice(OP, "k", &ks, kl)?,
                cpu_slice(OP, "v", &vs, vl)?,
                cpu_slice(OP, "out", &os, ol)?,
                cpu_slice(OP, "lse", &ls, ll)?,
                &seqs.offsets,
                dims,
                &mut dq,
                &mut dk,
                &mut dv,
            );
            Ok((
                cpu_tensor(OP, dq, (t, nh, hd))?,
                cpu_tensor(OP, dk, (t, nkv, hd))?,
                cpu_tensor(OP, dv, (t, nkv, hd))?,
            ))
        }
    }
}

/// Shape of a decoding step's caches: `kt` holds the keys transposed in blocks of
/// B = [`DecodeCache::BLOCK`] positions, [n_kv_heads, cap/B, head_dim, B] (see
/// [`DecodeCache::key_offset`]), so that scoring a block of positions streams one contiguous
/// run of memory; `v` holds the values token-major, [len, n_kv_heads, head_dim]. `cap` must be
/// a multiple of B and at least the number of cached positions.
#[derive(Clone, Copy, Debug)]
pub struct DecodeCache<'a> {
    pub kt: &'a [f32],
    pub cap: usize,
    pub v: &'a [f32],
    pub len: usize,
}

impl DecodeCache<'_> {
    /// Positions scored together; `cap` is a multiple of it.
    pub const BLOCK: usize = cpu::attention::DECODE_BLOCK;

    /// Where key element `j` (= kv_head·head_dim + d) of position `t` lives in `kt`.
    pub fn key_offset(j: usize, t: usize, head_dim: usize, cap: usize) -> usize {
        let (g, d) = (j / head_dim, j % head_dim);
        let b = Self::BLOCK;
        ((g * (cap / b) + t / b) * head_dim + d) * b + t % b
    }
}

/// Decoding attention for one new query token against a key/value cache: `q` [nh·hd] attends
/// to all `cache.len` cached positions; writes `out` [nh·hd]. Same equation as [`attention`]
/// for the last row of a sequence. Runs on the calling thread (the decoder parallelises over
/// sequences); `scores` is scratch space. With `len` = 0 the output is 0.
///
/// # Panics
/// If the slice lengths disagree with the shapes, or if `n_heads` is not a positive multiple
/// of `n_kv_heads` (these are internal buffer invariants).
pub fn attention_decode(
    q: &[f32],
    cache: DecodeCache<'_>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let DecodeCache { kt, cap, v, len } = cache;
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention_decode: n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}"
    );
    assert_eq!(q.len(), n_heads * head_dim, "attention_decode: q length");
    assert_eq!(
        out.len(),
        n_heads * head_dim,
        "attention_decode: out length"
    );
    assert!(
        cap.is_multiple_of(DecodeCache::BLOCK) && cap >= len,
        "attention_decode: cap {cap} must be a multiple of {} and at least len {len}",
        DecodeCache::BLOCK
    );
    assert!(
        kt.len() >= n_kv_heads * head_dim * cap && v.len() >= len * n_kv_heads * head_dim,
        "attention_decode: kt/v are smaller than their shapes"
    );
    let dims = Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    };
    cpu::attention::decode(q, kt, cap, v, len, dims, scores, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    /// Explicit masked softmax over each sequence's full score matrix, in f64.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        lens: &[usize],
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let t_total: usize = lens.iter().sum();
        let mut out = vec![0.0f64; t_total * nh * hd];
        let mut lse = vec![0.0f64; t_total * nh];
        let scale = 1.0 / (hd as f64).sqrt();
        let mut o = 0;
        for &len in lens {
            for h in 0..nh {
                let g = h / (nh / nkv);
                for i in 0..len {
                    let qi = &q[((o + i) * nh + h) * hd..][..hd];
                    let mut s = vec![f64::NEG_INFINITY; len];
                    for (j, sj) in s.iter_mut().enumerate().take(i + 1) {
                        let kj = &k[((o + j) * nkv + g) * hd..][..hd];
                        *sj = scale
                            * qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>();
                    }
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    lse[(o + i) * nh + h] = m + z.ln();
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - m).exp() / z;
                        let vj = &v[((o + j) * nkv + g) * hd..][..hd];
                        for d in 0..hd {
                            out[((o + i) * nh + h) * hd + d] += p * vj[d] as f64;
                        }
                    }
                }
            }
            o += len;
        }
        (out, lse)
    }

    fn random_qkv(
        seed: u64,
        t: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut g = rng(seed);
        (
            rand_vec(&mut g, t * nh * hd, 1.5),
            rand_vec(&mut g, t * nkv * hd, 1.5),
            rand_vec(&mut g, t * nkv * hd, 1.0),
        )
    }

    #[test]
    fn forward_matches_naive_masked_softmax() {
        let (nh, nkv, hd) = (4, 2, 8);
        // Lengths: 1, an empty sequence, short, and long ones crossing query-block boundaries.
        let lens = [1usize, 0, 5, 130, 2, 64, 65];
        let t: usize = lens.iter().sum();
        let (q, k, v) = random_qkv(8, t, nh, nkv, hd);
        let (out, lse) = attention(
            &tensor(&q, &[t, nh, hd]),
            &tensor(&k, &[t, nkv, hd]),
            &tensor(&v, &[t, nkv, hd]),
            &VarLen::from_lens(&lens),
        )
        .unwrap();
        let (out_ref, lse_ref) = naive(&q, &k, &v, &lens, nh, nkv, hd);
        assert_close(&values(&out), &out_ref, 1e-6, 1e-6, "out");
        assert_close(&values(&lse), &lse_ref, 1e-6, 1e-6, "lse");
    }

    #[test]
    fn single_token_copies_its_value() {
        // A length-1 sequence attends only to itself: out = v, lse = scale·q·k.
        let (q, k, v) = (vec![1.0, 2.0], vec![3.0, -1.0], vec![0.5, 7.0]);
        let (out, lse) = attention(
            &tensor(&q, &[1, 1, 2]),
            &tensor(&k, &[1, 1, 2]),
            &tensor(&v, &[1, 1, 2]),
            &VarLen::from_lens(&[1]),
        )
        .unwrap();
        assert_eq!(values(&out), v);
        assert_close(&values(&lse), &[1.0 / 2f64.sqrt()], 1e-7, 0.0, "lse");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (nh, nkv, hd) = (4, 2, 4);
        let lens = [1usize, 4, 67];
        let t: usize = lens.iter().sum();
        let seqs = VarLen::from_lens(&lens);
        let (q, k, v) = random_qkv(9, t, nh, nkv, hd);
        let mut g = rng(10);
        let r = rand_vec(&mut g, t * nh * hd, 1.0);
        let qs = [t, nh, hd];
        let ks = [t, nkv, hd];
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            let (out, _) =
                attention(&tensor(q, &qs), &tensor(k, &ks), &tensor(v, &ks), &seqs).unwrap();
            weighted_sum(&values(&out), &r)
        };
        let (out, lse) =
            attention(&tensor(&q, &qs), &tensor(&k, &ks), &tensor(&v, &ks), &seqs).unwrap();
        let (dq, dk, dv) = attention_backward(
            &tensor(&r, &qs),
            &tensor(&q, &qs),
            &tensor(&k, &ks),
            &tensor(&v, &ks),
            &out,
            &lse,
            &seqs,
        )
        .unwrap();
        let h = 1e-2;
        let dq_fd = finite_diff(&q, h, |x| loss(x, &k, &v));
        let dk_fd = finite_diff(&k, h, |x| loss(&q, x, &v));
        let dv_fd = finite_diff(&v, h, |x| loss(&q, &k, x));
        assert_close(&values(&dq), &dq_fd, 2e-3, 2e-4, "dq");
        assert_close(&values(&dk), &dk_fd, 2e-3, 2e-4, "dk");
        assert_close(&values(&dv), &dv_fd, 2e-3, 2e-4, "dv");
    }

    #[test]
    fn decode_matches_last_row_of_training_attention() {
        // head_dim 16 takes the axpy path, 64 the register-blocked one.
        for (nh, nkv, hd, len) in [1usize, 3, 32, 77]
            .into_iter()
            .flat_map(|len| [(4, 2, 16, len), (4, 2, 64, len), (6, 2, 32, len)])
        {
            let (q, k, v) = random_qkv(11 + len as u64, len, nh, nkv, hd);
            let (out, _) = attention(
                &tensor(&q, &[len, nh, hd]),
                &tensor(&k, &[len, nkv, hd]),
                &tensor(&v, &[len, nkv, hd]),
                &VarLen::from_lens(&[len]),
            )
            .unwrap();
            let mut dec = vec![0.0f32; nh * hd];
            let last = (len - 1) * nh * hd;
            // Keys transposed into [nkv, hd, cap] with room to spare past len.
            let cap = (len + 1).next_multiple_of(DecodeCache::BLOCK);
            let mut kt = vec![f32::NAN; nkv * hd * cap];
            for t in 0..len {
                for j in 0..nkv * hd {
                    kt[DecodeCache::key_offset(j, t, hd, cap)] = k[t * nkv * hd + j];
                }
            }
            // Stale entries past len must not matter.
            for j in 0..nkv * hd {
                for t in len..cap {
                    kt[DecodeCache::key_offset(j, t, hd, cap)] = 1e30;
                }
            }
            let cache = DecodeCache {
                kt: &kt,
                cap,
                v: &v,
                len,
            };
            let mut scores = Vec::new();
            attention_decode(&q[last..], cache, nh, nkv, hd, &mut scores, &mut dec);
            let want = widen(&values(&out)[last..]);
            assert_close(&dec, &want, 1e-6, 1e-6, "decode");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let q = tensor(&[0.0; 24], &[2, 3, 4]);
        let kv = tensor(&[0.0; 16], &[2, 2, 4]);
        let err = attention(&q, &kv, &kv, &VarLen::from_lens(&[2])).unwrap_err();
        assert!(err.to_string().contains("multiple of n_kv_heads"), "{err}");
        let q = tensor(&[0.0; 32], &[2, 4, 4]);
        let err = attention(&q, &kv, &kv, &VarLen::from_lens(&[3])).unwrap_err();
        assert!(err.to_string().contains("VarLen covers 3 tokens"), "{err}");
    }
}
