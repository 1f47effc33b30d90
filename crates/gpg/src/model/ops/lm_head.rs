//! Output head fused with log-softmax, gather and entropy, chunked over the vocabulary so that
//! the N × V logits never exist at once (Qwen's vocabulary has 151,936 entries) and the head
//! matrix is read once per pass (the softmax statistics are accumulated online, chunk by chunk:
//! cpu/lm_head.rs).
//!
//! Forward, per row n with τ⁻¹ = `inv_temperature`:
//!   z_n = τ⁻¹·W h_n,  lse_n = log Σ_v e^(z_nv),  logp_n = z_n[target_n] − lse_n,
//!   p_nv = e^(z_nv − lse_n),  entropy_n = −Σ_v p_nv·log p_nv   (of the tempered distribution).
//!
//! Backward, given g_n = ∂L/∂logp_n: ∂logp_n/∂z_nv = 1[v = target_n] − p_nv, so
//!   dz_nv = g_n·(1[v = target_n] − p_nv)  (p recomputed from lse, chunk by chunk),
//!   dh_n = τ⁻¹·Σ_v dz_nv·W_v,  dW_v = τ⁻¹·Σ_n dz_nv·h_n.
//! The entropy output carries no gradient (it is a diagnostic).

use super::cpu;
use super::cpu::lm_head::HeadDims;
use super::tensor_io::{backend, cpu_slice, cpu_tensor, f32_dims, with_weight, Backend};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Default budget of logits alive at once (rows × chunk columns ≤ this): 8M f32 = 32 MiB.
pub const LM_HEAD_CHUNK_LOGITS: usize = 8 << 20;

/// Per-row results of [`lm_head_logprobs`], each of length N.
#[derive(Debug, Clone, PartialEq)]
pub struct LmHeadOutput {
    /// log p(target_n) under the tempered distribution.
    pub logprobs: Vec<f32>,
    /// Entropy of the tempered distribution of row n (nats).
    pub entropy: Vec<f32>,
    /// log Σ_v e^(z_nv), kept for the backward pass.
    pub lse: Vec<f32>,
}

impl LmHeadOutput {
    fn zeros(rows: usize) -> Self {
        Self {
            logprobs: vec![0.0; rows],
            entropy: vec![0.0; rows],
            lse: vec![0.0; rows],
        }
    }
}

/// Each of `values` (name, per-row values) must have one entry per row of `h`.
fn check_row_values(op: &str, d: HeadDims, values: &[(&str, &[f32])]) -> Result<()> {
    for (name, v) in values {
        if v.len() != d.rows {
            bail!(
                "{op}: {name} has {} entries, expected {} (rows of `h`)",
                v.len(),
                d.rows
            );
        }
    }
    Ok(())
}

/// The head's gradient buffer must be [V, H].
fn check_head_grad(op: &str, d: HeadDims, dw: &[f32]) -> Result<()> {
    if dw.len() != d.vocab * d.hidden {
        bail!(
            "{op}: gradient buffer has {} elements, expected {}×{}",
            dw.len(),
            d.vocab,
            d.hidden
        );
    }
    Ok(())
}

/// Vocabulary entries per chunk for a budget of `chunk_logits` logits over `rows` rows: a
/// multiple of 64 when the budget allows (whole register tiles), at least 1, at most V.
fn chunk_columns(chunk_logits: usize, rows: usize, vocab: usize) -> usize {
    let cols = (chunk_logits / rows.max(1)).max(1);
    let cols = if cols >= 64 { cols / 64 * 64 } else { cols };
    cols.min(vocab)
}

/// Checks h [N, H], w [V, H], targets (N entries, each < V) and the temperature.
fn head_dims(
    op: &str,
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    inv_temperature: f32,
    chunk_logits: usize,
) -> Result<HeadDims> {
    let hd = f32_dims(op, "h", h, 2)?;
    let (rows, hidden) = (hd[0], hd[1]);
    if !matches!(
        w.dtype(),
        candle_core::DType::F32 | candle_core::DType::BF16
    ) || !w.is_contiguous()
    {
        bail!(
            "{op}: `w` must be a contiguous f32 or bf16 tensor, got {:?}",
            w.dtype()
        );
    }
    let wd = w.dims();
    if wd.len() != 2 {
        bail!("{op}: `w` must have rank 2, got shape {wd:?}");
    }
    let vocab = wd[0];
    if wd[1] != hidden {
        bail!("{op}: `w` has shape {wd:?} but `h` has hidden size {hidden}");
    }
    if vocab == 0 {
        bail!("{op}: `w` has an empty vocabulary");
    }
    if targets.len() != rows {
        bail!("{op}: {} targets for {rows} rows of `h`", targets.len());
    }
    if let Some(n) = targets.iter().position(|&t| t as usize >= vocab) {
        bail!(
            "{op}: targets[{n}] = {} is outside the vocabulary of {vocab}",
            targets[n]
        );
    }
    if !inv_temperature.is_finite() || inv_temperature <= 0.0 {
        bail!("{op}: inv_temperature must be finite and > 0, got {inv_temperature}");
    }
    Ok(HeadDims {
        rows,
        hidden,
        vocab,
        chunk_cols: chunk_columns(chunk_logits, rows, vocab),
    })
}

/// Log-probabilities of `targets`, entropies and log-sum-exps of z = inv_temperature·(h Wᵀ)
/// for h [N, H], w [V, H], with at most [`LM_HEAD_CHUNK_LOGITS`] logits alive at once.
pub fn lm_head_logprobs(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    inv_temperature: f32,
) -> Result<LmHeadOutput> {
    lm_head_logprobs_chunked(h, w, targets, inv_temperature, LM_HEAD_CHUNK_LOGITS)
}

/// [`lm_head_logprobs`] with an explicit budget of logits alive at once: the vocabulary is
/// processed max(1, chunk_logits / N) entries at a time.
pub fn lm_head_logprobs_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    inv_temperature: f32,
    chunk_logits: usize,
) -> Result<LmHeadOutput> {
    const OP: &str = "lm_head_logprobs";
    let d = head_dims(OP, h, w, targets, inv_temperature, chunk_logits)?;
    match backend(OP, &[("h", h), ("w", w)])? {
        Backend::Cpu => {
            let (hs, hl) = h.storage_and_layout();
            let hs = cpu_slice(OP, "h", &hs, hl)?;
            let mut out = LmHeadOutput::zeros(d.rows);
            with_weight(OP, "w", w, |ws| {
                cpu::lm_head::forward(
                    hs,
                    ws,
                    targets,
                    inv_temperature,
                    d,
                    &mut out.logprobs,
                    &mut out.entropy,
                    &mut out.lse,
                )
            })?;
            Ok(out)
        }
    }
}

/// Backward of [`lm_head_logprobs`] given g_n = ∂L/∂logp_n and the forward's lse.
/// Returns `(dh [N, H], dW [V, H])`.
pub fn lm_head_backward(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    lse: &[f32],
    g: &[f32],
    inv_temperature: f32,
) -> Result<(Tensor, Tensor)> {
    lm_head_backward_chunked(h, w, targets, lse, g, inv_temperature, LM_HEAD_CHUNK_LOGITS)
}

/// [`lm_head_backward`] with an explicit budget of logits alive at once.
pub fn lm_head_backward_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    lse: &[f32],
    g: &[f32],
    inv_temperature: f32,
    chunk_logits: usize,
) -> Result<(Tensor, Tensor)> {
    let (v, hid) = (w.dims()[0], w.dims().get(1).copied().unwrap_or(0));
    let mut dw = vec![0.0f32; v * hid];
    let dh = lm_head_backward_into(
        h,
        w,
        targets,
        lse,
        g,
        inv_temperature,
        chunk_logits,
        &mut dw,
    )?;
    Ok((dh, cpu_tensor("lm_head_backward", dw, (v, hid))?))
}

/// Backward of [`lm_head_logprobs`] that adds dW to `dw` ([V, H], f32) instead of returning it
/// (the gradient accumulator of the head, with no V × H temporary). Returns dh [N, H].
#[allow(clippy::too_many_arguments)]
pub fn lm_head_backward_into(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    lse: &[f32],
    g: &[f32],
    inv_temperature: f32,
    chunk_logits: usize,
    dw: &mut [f32],
) -> Result<Tensor> {
    const OP: &str = "lm_head_backward";
    let d = head_dims(OP, h, w, targets, inv_temperature, chunk_logits)?;
    check_head_grad(OP, d, dw)?;
    check_row_values(OP, d, &[("lse", lse), ("g", g)])?;
    match backend(OP, &[("h", h), ("w", w)])? {
        Backend::Cpu => {
            let (hs, hl) = h.storage_and_layout();
            let hs = cpu_slice(OP, "h", &hs, hl)?;
            let mut dh = cpu::zeroed(d.rows * d.hidden);
            with_weight(OP, "w", w, |ws| {
                cpu::lm_head::backward(
                    hs,
                    ws,
                    targets,
                    lse,
                    g,
                    inv_temperature,
                    d,
                    &mut dh,
                    Some(dw),
                )
            })?;
            cpu_tensor(OP, dh, (d.rows, d.hidden))
        }
    }
}

/// Backward of [`lm_head_logprobs`] for a frozen head: dh [N, H] only (the dZᵀ·h product of
/// the head's gradient is never formed).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_backward_input(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    lse: &[f32],
    g: &[f32],
    inv_temperature: f32,
    chunk_logits: usize,
) -> Result<Tensor> {
    const OP: &str = "lm_head_backward_input";
    let d = head_dims(OP, h, w, targets, inv_temperature, chunk_logits)?;
    check_row_values(OP, d, &[("lse", lse), ("g", g)])?;
    match backend(OP, &[("h", h), ("w", w)])? {
        Backend::Cpu => {
            let (hs, hl) = h.storage_and_layout();
            let hs = cpu_slice(OP, "h", &hs, hl)?;
            let mut dh = cpu::zeroed(d.rows * d.hidden);
            with_weight(OP, "w", w, |ws| {
                cpu::lm_head::backward(hs, ws, targets, lse, g, inv_temperature, d, &mut dh, None)
            })?;
            cpu_tensor(OP, dh, (d.rows, d.hidden))
        }
    }
}

/// Default budget of logits alive at once in [`lm_head_forward_backward`]: 64M f32 = 256 MiB,
/// whole vocabulary rows (421 rows of Qwen2's 151,936 entries; rows fewer than that make the
/// head matrix pass more often through the products).
pub const LM_HEAD_FUSED_LOGITS: usize = 64 << 20;

/// Forward and backward of the head in one pass, for a g_n = ∂L/∂logp_n known before the
/// forward (GPG's g_n = −α·Â/N_tok does not depend on logp). Same equations as
/// [`lm_head_logprobs`] then [`lm_head_backward_into`], blocked over rows instead of the
/// vocabulary: each block's logits over the whole vocabulary stay alive from the softmax
/// statistics to dz, so they are computed once (three products over the head matrix instead
/// of four). Returns the forward's outputs and dh [N, H]; adds dW to `dw` ([V, H]) unless it
/// is `None` (a frozen head). At most `max(V, chunk_logits)` logits are alive at once.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_forward_backward(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    g: &[f32],
    inv_temperature: f32,
    chunk_logits: usize,
    dw: Option<&mut [f32]>,
) -> Result<(LmHeadOutput, Tensor)> {
    const OP: &str = "lm_head_forward_backward";
    let d = head_dims(OP, h, w, targets, inv_temperature, chunk_logits)?;
    if let Some(dw) = dw.as_deref() {
        check_head_grad(OP, d, dw)?;
    }
    check_row_values(OP, d, &[("g", g)])?;
    let block_rows = (chunk_logits / d.vocab).max(1);
    match backend(OP, &[("h", h), ("w", w)])? {
        Backend::Cpu => {
            let (hs, hl) = h.storage_and_layout();
            let hs = cpu_slice(OP, "h", &hs, hl)?;
            let mut out = LmHeadOutput::zeros(d.rows);
            let mut dh = cpu::zeroed(d.rows * d.hidden);
            with_weight(OP, "w", w, |ws| {
                cpu::lm_head::forward_backward(
                    hs,
                    ws,
                    targets,
                    g,
                    inv_temperature,
                    d,
                    block_rows,
                    cpu::lm_head::HeadRowsOut {
                        logprobs: &mut out.logprobs,
                        entropy: &mut out.entropy,
                        lse: &mut out.lse,
                        dh: &mut dh,
                    },
                    dw,
                )
            })?;
            Ok((out, cpu_tensor(OP, dh, (d.rows, d.hidden))?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    /// Full-logits log-softmax in f64: (logp, entropy, lse) per row.
    fn naive(
        h: &[f32],
        w: &[f32],
        n: usize,
        hid: usize,
        v: usize,
        targets: &[u32],
        inv_t: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut lp, mut ent, mut lses) = (vec![], vec![], vec![]);
        for r in 0..n {
            let z: Vec<f64> = (0..v)
                .map(|c| {
                    inv_t
                        * (0..hid)
                            .map(|j| h[r * hid + j] as f64 * w[c * hid + j] as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            lp.push(z[targets[r] as usize] - lse);
            ent.push(-z.iter().map(|x| (x - lse).exp() * (x - lse)).sum::<f64>());
            lses.push(lse);
        }
        (lp, ent, lses)
    }

    fn setup(seed: u64, n: usize, hid: usize, v: usize) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let mut g = rng(seed);
        let h = rand_vec(&mut g, n * hid, 1.0);
        let w = rand_vec(&mut g, v * hid, 1.0);
        let targets = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
        (h, w, targets)
    }

    #[test]
    fn forward_matches_full_log_softmax_with_temperature_and_chunks() {
        let (n, hid, v) = (13, 16, 37);
        let (h, w, targets) = setup(12, n, hid, v);
        let (ht, wt) = (tensor(&h, &[n, hid]), tensor(&w, &[v, hid]));
        for inv_t in [1.0f32, 1.0 / 0.7, 0.25] {
            let (lp, ent, lse) = naive(&h, &w, n, hid, v, &targets, inv_t as f64);
            // Budgets: all rows at once, 4 rows per chunk (13 = 3·4 + 1), and 1 row.
            for budget in [LM_HEAD_CHUNK_LOGITS, 4 * v + 5, 1] {
                let out = lm_head_logprobs_chunked(&ht, &wt, &targets, inv_t, budget).unwrap();
                assert_close(&out.logprobs, &lp, 1e-6, 2e-6, "logprobs");
                assert_close(&out.entropy, &ent, 1e-6, 2e-6, "entropy");
                assert_close(&out.lse, &lse, 1e-6, 2e-6, "lse");
            }
        }
    }

    #[test]
    fn uniform_logits_have_log_v_entropy() {
        // h = 0 → all logits 0: logp = −ln V, entropy = ln V.
        let (n, hid, v) = (2, 3, 5);
        let out = lm_head_logprobs(
            &tensor(&vec![0.0; n * hid], &[n, hid]),
            &tensor(&vec![1.0; v * hid], &[v, hid]),
            &[0, 4],
            1.0,
        )
        .unwrap();
        let ln_v = (v as f64).ln();
        assert_close(&out.logprobs, &[-ln_v, -ln_v], 1e-7, 0.0, "logp");
        assert_close(&out.entropy, &[ln_v, ln_v], 1e-6, 0.0, "entropy");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, hid, v) = (5, 6, 11);
        let (h, w, targets) = setup(13, n, hid, v);
        let mut gen = rng(14);
        let g = rand_vec(&mut gen, n, 1.0);
        let inv_t = 1.0 / 0.6;
        let loss = |h: &[f32], w: &[f32]| {
            let out = lm_head_logprobs(
                &tensor(h, &[n, hid]),
                &tensor(w, &[v, hid]),
                &targets,
                inv_t,
            )
            .unwrap();
            weighted_sum(&out.logprobs, &g)
        };
        let fwd = lm_head_logprobs(
            &tensor(&h, &[n, hid]),
            &tensor(&w, &[v, hid]),
            &targets,
            inv_t,
        )
        .unwrap();
        let dh_fd = finite_diff(&h, 1e-2, |x| loss(x, &w));
        let dw_fd = finite_diff(&w, 1e-2, |x| loss(&h, x));
        // A budget of 2·V logits over 5 rows gives chunks of 4 + 4 + 3 vocabulary entries.
        for budget in [LM_HEAD_CHUNK_LOGITS, 2 * v] {
            let (dh, dw) = lm_head_backward_chunked(
                &tensor(&h, &[n, hid]),
                &tensor(&w, &[v, hid]),
                &targets,
                &fwd.lse,
                &g,
                inv_t,
                budget,
            )
            .unwrap();
            assert_close(&values(&dh), &dh_fd, 2e-3, 2e-4, "dh");
            assert_close(&values(&dw), &dw_fd, 2e-3, 2e-4, "dw");
        }
    }

    #[test]
    fn forward_backward_in_one_pass_equals_the_two_passes() {
        let (n, hid, v) = (7, 6, 23);
        let (h, w, targets) = setup(15, n, hid, v);
        let mut gen = rng(16);
        let mut g = rand_vec(&mut gen, n, 1.0);
        g[2] = 0.0; // a row with no gradient
        let (ht, wt) = (tensor(&h, &[n, hid]), tensor(&w, &[v, hid]));
        let inv_t = 1.0 / 0.7;
        let fwd = lm_head_logprobs(&ht, &wt, &targets, inv_t).unwrap();
        let (dh, dw) = lm_head_backward(&ht, &wt, &targets, &fwd.lse, &g, inv_t).unwrap();
        let (lp, ent, lse) = naive(&h, &w, n, hid, v, &targets, inv_t as f64);
        // Budgets: every row in one block, 3 rows per block (7 = 2·3 + 1), and 1 row.
        for budget in [LM_HEAD_FUSED_LOGITS, 3 * v + 2, 1] {
            let mut dw_fused = vec![0.5f32; v * hid];
            let (out, dh_fused) = lm_head_forward_backward(
                &ht,
                &wt,
                &targets,
                &g,
                inv_t,
                budget,
                Some(&mut dw_fused),
            )
            .unwrap();
            assert_close(&out.logprobs, &lp, 1e-6, 2e-6, "logprobs");
            assert_close(&out.entropy, &ent, 1e-6, 2e-6, "entropy");
            assert_close(&out.lse, &lse, 1e-6, 2e-6, "lse");
            let dh_ref: Vec<f64> = values(&dh).iter().map(|&x| x as f64).collect();
            assert_close(&values(&dh_fused), &dh_ref, 1e-5, 1e-5, "dh");
            // dw was added to the buffer's 0.5.
            let dw_ref: Vec<f64> = values(&dw).iter().map(|&x| x as f64 + 0.5).collect();
            assert_close(&dw_fused, &dw_ref, 1e-5, 1e-5, "dw");
            // A frozen head: dh only.
            let (_, dh_frozen) =
                lm_head_forward_backward(&ht, &wt, &targets, &g, inv_t, budget, None).unwrap();
            assert_eq!(values(&dh_frozen), values(&dh_fused));
        }
        // A bf16 head: the one pass against the two on the same bf16 weight.
        let w16 = wt.to_dtype(candle_core::DType::BF16).unwrap();
        let fwd = lm_head_logprobs(&ht, &w16, &targets, inv_t).unwrap();
        let (dh, dw) = lm_head_backward(&ht, &w16, &targets, &fwd.lse, &g, inv_t).unwrap();
        let mut dw_fused = vec![0.0f32; v * hid];
        let (out, dh_fused) =
            lm_head_forward_backward(&ht, &w16, &targets, &g, inv_t, 3 * v, Some(&mut dw_fused))
                .unwrap();
        let as_f64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        assert_close(
            &out.logprobs,
            &as_f64(&fwd.logprobs),
            1e-5,
            1e-5,
            "bf16 logprobs",
        );
        assert_close(
            &values(&dh_fused),
            &as_f64(&values(&dh)),
            1e-4,
            1e-5,
            "bf16 dh",
        );
        assert_close(&dw_fused, &as_f64(&values(&dw)), 1e-4, 1e-5, "bf16 dw");
        let err = lm_head_forward_backward(&ht, &wt, &targets, &g[1..], inv_t, 1, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("g has 6 entries, expected 7"), "{err}");
    }

    #[test]
    fn bad_targets_and_temperature_are_errors() {
        let h = tensor(&[0.0; 4], &[2, 2]);
        let w = tensor(&[0.0; 6], &[3, 2]);
        let err = lm_head_logprobs(&h, &w, &[0, 3], 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("targets[1] = 3"), "{err}");
        assert!(lm_head_logprobs(&h, &w, &[0], 1.0).is_err());
        assert!(lm_head_logprobs(&h, &w, &[0, 1], 0.0).is_err());
        assert!(lm_head_backward(&h, &w, &[0, 1], &[0.0], &[0.0, 0.0], 1.0).is_err());
    }
}
