//! RMSNorm as in Qwen2 (HF `Qwen2RMSNorm`).
//!
//! Forward, per row x ∈ ℝ^H:  rstd = 1/√(mean_j x_j² + ε),  y_j = w_j · (x_j · rstd).
//!
//! Backward: ∂rstd/∂x_k = −rstd³·x_k/H, so with c = Σ_j dy_j·w_j·x_j
//!   dx_k = rstd·w_k·dy_k − (rstd³/H)·c·x_k,
//!   dw_j = Σ_rows dy_j·x_j·rstd.

use super::cpu;
use super::tensor_io::{backend, cpu_slice, cpu_tensor, expect_dims, f32_dims, Backend};
use anyhow::Result;
use candle_core::Tensor;

/// RMSNorm of each row of `x` [T, H] with weight `w` [H]; returns `(y [T, H], rstd [T])`
/// (rstd is kept for the backward pass).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm";
    let (t, h) = match f32_dims(OP, "x", x, 2)? {
        &[t, h] => (t, h),
        _ => unreachable!("rank checked"),
    };
    expect_dims(OP, "w", w, &[h])?;
    match backend(OP, &[("x", x), ("w", w)])? {
        Backend::Cpu => {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let xv = cpu_slice(OP, "x", &xs, xl)?;
            let wv = cpu_slice(OP, "w", &ws, wl)?;
            let mut y = cpu::zeroed(t * h);
            let mut rstd = vec![0.0f32; t];
            cpu::rms_norm::forward(xv, wv, eps as f32, &mut y, &mut rstd);
            Ok((cpu_tensor(OP, y, (t, h))?, cpu_tensor(OP, rstd, t)?))
        }
    }
}

/// Backward of [`rms_norm`]: given dy [T, H], the forward's x, w and rstd, returns
/// `(dx [T, H], dw [H])`.
pub fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm_backward";
    let (t, h) = match f32_dims(OP, "x", x, 2)? {
        &[t, h] => (t, h),
        _ => unreachable!("rank checked"),
    };
    expect_dims(OP, "dy", dy, &[t, h])?;
    expect_dims(OP, "w", w, &[h])?;
    expect_dims(OP, "rstd", rstd, &[t])?;
    match backend(OP, &[("dy", dy), ("x", x), ("w", w), ("rstd", rstd)])? {
        Backend::Cpu => {
            let (dys, dyl) = dy.storage_and_layout();
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (rs, rl) = rstd.storage_and_layout();
            let mut dx = cpu::zeroed(t * h);
            let mut dw = vec![0.0f32; h];
            cpu::rms_norm::backward(
                cpu_slice(OP, "dy", &dys, dyl)?,
                cpu_slice(OP, "x", &xs, xl)?,
                cpu_slice(OP, "w", &ws, wl)?,
                cpu_slice(OP, "rstd", &rs, rl)?,
                &mut dx,
                &mut dw,
            );
            Ok((cpu_tensor(OP, dx, (t, h))?, cpu_tensor(OP, dw, h)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    fn naive(x: &[f32], w: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let h = w.len();
        let mut y = Vec::new();
        let mut rstd = Vec::new();
        for row in x.chunks(h) {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
            let r = 1.0 / (ms + eps).sqrt();
            rstd.push(r);
            y.extend(
                row.iter()
                    .zip(w)
                    .map(|(xi, wi)| *wi as f64 * *xi as f64 * r),
            );
        }
        (y, rstd)
    }

    #[test]
    fn forward_matches_formula() {
        let mut g = rng(1);
        for &(t, h) in &[(1, 1), (5, 7), (9, 64), (3, 300)] {
            let x = rand_vec(&mut g, t * h, 2.0);
            let w = rand_vec(&mut g, h, 1.5);
            let (y, rstd) = rms_norm(&tensor(&x, &[t, h]), &tensor(&w, &[h]), 1e-6).unwrap();
            let (y_ref, r_ref) = naive(&x, &w, 1e-6);
            assert_close(&values(&y), &y_ref, 1e-6, 1e-7, "y");
            assert_close(&values(&rstd), &r_ref, 1e-6, 0.0, "rstd");
        }
    }

    #[test]
    fn hand_computed_row() {
        // x = [3, 4]: mean(x²) = 12.5, rstd = 1/√12.5; w = [1, 2].
        let (y, rstd) = rms_norm(
            &tensor(&[3.0, 4.0], &[1, 2]),
            &tensor(&[1.0, 2.0], &[2]),
            0.0,
        )
        .unwrap();
        let r = 1.0 / 12.5f64.sqrt();
        assert_close(&values(&rstd), &[r], 1e-7, 0.0, "rstd");
        assert_close(&values(&y), &[3.0 * r, 8.0 * r], 1e-7, 0.0, "y");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut g = rng(2);
        let (t, h) = (4, 19);
        let eps = 1e-5;
        let x = rand_vec(&mut g, t * h, 1.0);
        let w = rand_vec(&mut g, h, 1.0);
        let r = rand_vec(&mut g, t * h, 1.0);
        let loss = |x: &[f32], w: &[f32]| {
            let (y, _) = rms_norm(&tensor(x, &[t, h]), &tensor(w, &[h]), eps).unwrap();
            weighted_sum(&values(&y), &r)
        };
        let (_, rstd) = rms_norm(&tensor(&x, &[t, h]), &tensor(&w, &[h]), eps).unwrap();
        let (dx, dw) = rms_norm_backward(
            &tensor(&r, &[t, h]),
            &tensor(&x, &[t, h]),
            &tensor(&w, &[h]),
            &rstd,
        )
        .unwrap();
        let dx_fd = finite_diff(&x, 1e-2, |xp| loss(xp, &w));
        let dw_fd = finite_diff(&w, 1e-2, |wp| loss(&x, wp));
        assert_close(&values(&dx), &dx_fd, 2e-3, 1e-4, "dx");
        assert_close(&values(&dw), &dw_fd, 2e-3, 1e-4, "dw");
    }

    #[test]
    fn shape_errors_are_clear() {
        let x = tensor(&[1.0; 6], &[2, 3]);
        let err = rms_norm(&x, &tensor(&[1.0; 2], &[2]), 1e-6).unwrap_err();
        assert!(
            err.to_string()
                .contains("rms_norm: `w` must have shape [3]"),
            "{err}"
        );
        let xt = x.t().unwrap();
        let err = rms_norm(&xt, &tensor(&[1.0; 2], &[2]), 1e-6).unwrap_err();
        assert!(err.to_string().contains("contiguous"), "{err}");
    }
}
