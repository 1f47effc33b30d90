//! Bidirectional multi-head attention within each segment of a packed batch (the vision
//! tower's: every patch of an image, or of a window, sees every other one; none sees outside).
//!
//! Forward, for a segment and head, scale = 1/√hd:
//!   s_ij = scale·q_i·k_j for all i, j of the segment,  lse_i = log Σ_j e^(s_ij),
//!   P_ij = e^(s_ij − lse_i),  o_i = Σ_j P_ij·v_j.
//!
//! Backward (P recomputed from lse):
//!   dv_j = Σ_i P_ij·do_i,  dP_ij = do_i·v_j,  D_i = do_i·o_i,  dS_ij = P_ij·(dP_ij − D_i),
//!   dq_i = scale·Σ_j dS_ij·k_j,  dk_j = scale·Σ_i dS_ij·q_i.

use super::cpu;
use super::tensor_io::{backend, cpu_tensor, expect_dims, f32_dims, Backend};
use super::varlen::VarLen;
use anyhow::{bail, Result};
use candle_core::Tensor;

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn dims(
    op: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &VarLen,
) -> Result<(usize, usize, usize)> {
    let d = f32_dims(op, "q", q, 3)?;
    let (t, nh, hd) = (d[0], d[1], d[2]);
    if nh == 0 || hd == 0 {
        bail!("{op}: need n_heads and head_dim > 0, got {nh} and {hd}");
    }
    expect_dims(op, "k", k, &[t, nh, hd])?;
    expect_dims(op, "v", v, &[t, nh, hd])?;
    seqs.validate(t, op)?;
    Ok((t, nh, hd))
}

/// Attention of `q`, `k`, `v` [T, nh, hd] within each segment of `seqs`, no mask inside a
/// segment. Returns `(out [T, nh, hd], lse [T, nh])`.
pub fn full_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &VarLen,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "full_attention";
    let (t, nh, hd) = dims(OP, q, k, v, seqs)?;
    match backend(OP, &[("q", q), ("k", k), ("v", v)])? {
        Backend::Cpu => {
            let (out, lse) = cpu::full_attention::forward(
                &flat(q)?,
                &flat(k)?,
                &flat(v)?,
                &seqs.offsets,
                nh,
                hd,
            );
            Ok((
                cpu_tensor(OP, out, (t, nh, hd))?,
                cpu_tensor(OP, lse, (t, nh))?,
            ))
        }
    }
}

/// Backward of [`full_attention`]: returns `(dq, dk, dv)`, each [T, nh, hd].
pub fn full_attention_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    seqs: &VarLen,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "full_attention_backward";
    let (t, nh, hd) = dims(OP, q, k, v, seqs)?;
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
            let (dq, dk, dv) = cpu::full_attention::backward(
                &flat(dout)?,
                &flat(q)?,
                &flat(k)?,
                &flat(v)?,
                &flat(out)?,
                &flat(lse)?,
                &seqs.offsets,
                nh,
                hd,
            );
            Ok((
                cpu_tensor(OP, dq, (t, nh, hd))?,
                cpu_tensor(OP, dk, (t, nh, hd))?,
                cpu_tensor(OP, dv, (t, nh, hd))?,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    /// Direct formula in f64.
    fn naive(q: &[f32], k: &[f32], v: &[f32], offsets: &[usize], nh: usize, hd: usize) -> Vec<f64> {
        let t = *offsets.last().unwrap();
        let mut out = vec![0.0f64; t * nh * hd];
        let scale = 1.0 / (hd as f64).sqrt();
        for w in offsets.windows(2) {
            for h in 0..nh {
                for i in w[0]..w[1] {
                    let s: Vec<f64> = (w[0]..w[1])
                        .map(|j| {
                            (0..hd)
                                .map(|d| {
                                    q[(i * nh + h) * hd + d] as f64
                                        * k[(j * nh + h) * hd + d] as f64
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    for (jj, j) in (w[0]..w[1]).enumerate() {
                        let p = (s[jj] - m).exp() / z;
                        for d in 0..hd {
                            out[(i * nh + h) * hd + d] += p * v[(j * nh + h) * hd + d] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_formula_and_backward_matches_finite_differences() {
        let mut g = rng(13);
        let (nh, hd) = (2, 4);
        let seqs = VarLen::from_lens(&[3, 5, 1]);
        let t = 9;
        let n = t * nh * hd;
        let (q, k, v) = (
            rand_vec(&mut g, n, 1.0),
            rand_vec(&mut g, n, 1.0),
            rand_vec(&mut g, n, 1.0),
        );
        let sh = [t, nh, hd];
        let (qt, kt, vt) = (tensor(&q, &sh), tensor(&k, &sh), tensor(&v, &sh));
        let (out, lse) = full_attention(&qt, &kt, &vt, &seqs).unwrap();
        assert_close(
            &values(&out),
            &naive(&q, &k, &v, &seqs.offsets, nh, hd),
            1e-5,
            1e-6,
            "out",
        );
        let r = rand_vec(&mut g, n, 1.0);
        let (dq, dk, dv) =
            full_attention_backward(&tensor(&r, &sh), &qt, &kt, &vt, &out, &lse, &seqs).unwrap();
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            let o: Vec<f32> = naive(q, k, v, &seqs.offsets, nh, hd)
                .iter()
                .map(|&x| x as f32)
                .collect();
            weighted_sum(&o, &r)
        };
        assert_close(
            &values(&dq),
            &finite_diff(&q, 1e-2, |x| loss(x, &k, &v)),
            2e-3,
            1e-4,
            "dq",
        );
        assert_close(
            &values(&dk),
            &finite_diff(&k, 1e-2, |x| loss(&q, x, &v)),
            2e-3,
            1e-4,
            "dk",
        );
        assert_close(
            &values(&dv),
            &finite_diff(&v, 1e-2, |x| loss(&q, &k, x)),
            2e-3,
            1e-4,
            "dv",
        );
    }
}
