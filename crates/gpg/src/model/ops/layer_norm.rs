//! LayerNorm with affine weight and bias (torch `nn.LayerNorm`, as Qwen2-VL's vision tower uses).
//!
//! Forward, per row x ∈ ℝ^H:  μ = mean_j x_j,  rstd = 1/√(mean_j (x_j − μ)² + ε),
//! x̂_j = (x_j − μ)·rstd,  y_j = w_j·x̂_j + b_j.
//!
//! Backward, with g_j = dy_j·w_j:
//!   dx_j = rstd·(g_j − mean_k g_k − x̂_j·mean_k(g_k·x̂_k)),
//!   dw_j = Σ_rows dy_j·x̂_j,   db_j = Σ_rows dy_j.

use super::cpu;
use super::tensor_io::{backend, cpu_tensor, expect_dims, f32_dims, Backend};
use anyhow::Result;
use candle_core::Tensor;

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// LayerNorm of each row of `x` [T, H] with weight `w` and bias `b` [H]; returns
/// `(y [T, H], rstd [T])`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    const OP: &str = "layer_norm";
    let dims = f32_dims(OP, "x", x, 2)?;
    let (t, h) = (dims[0], dims[1]);
    expect_dims(OP, "w", w, &[h])?;
    expect_dims(OP, "b", b, &[h])?;
    match backend(OP, &[("x", x), ("w", w), ("b", b)])? {
        Backend::Cpu => {
            let mut y = vec![0.0f32; t * h];
            let mut rstd = vec![0.0f32; t];
            cpu::layer_norm::forward(
                &flat(x)?,
                &flat(w)?,
                &flat(b)?,
                eps as f32,
                &mut y,
                &mut rstd,
            );
            Ok((cpu_tensor(OP, y, (t, h))?, cpu_tensor(OP, rstd, t)?))
        }
    }
}

/// Backward of [`layer_norm`]: returns `(dx [T, H], dw [H], db [H])`.
pub fn layer_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm_backward";
    let dims = f32_dims(OP, "x", x, 2)?;
    let (t, h) = (dims[0], dims[1]);
    expect_dims(OP, "dy", dy, &[t, h])?;
    expect_dims(OP, "w", w, &[h])?;
    expect_dims(OP, "rstd", rstd, &[t])?;
    match backend(OP, &[("dy", dy), ("x", x), ("w", w), ("rstd", rstd)])? {
        Backend::Cpu => {
            let mut dx = vec![0.0f32; t * h];
            let mut dw = vec![0.0f32; h];
            let mut db = vec![0.0f32; h];
            cpu::layer_norm::backward(
                &flat(dy)?,
                &flat(x)?,
                &flat(w)?,
                &flat(rstd)?,
                &mut dx,
                &mut dw,
                &mut db,
            );
            Ok((
                cpu_tensor(OP, dx, (t, h))?,
                cpu_tensor(OP, dw, h)?,
                cpu_tensor(OP, db, h)?,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    fn naive(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> Vec<f64> {
        let h = w.len();
        let mut y = Vec::new();
        for row in x.chunks(h) {
            let mu = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / h as f64;
            let r = 1.0 / (var + eps).sqrt();
            y.extend((0..h).map(|j| w[j] as f64 * (row[j] as f64 - mu) * r + b[j] as f64));
        }
        y
    }

    #[test]
    fn forward_matches_formula_and_backward_matches_finite_differences() {
        let mut g = rng(11);
        let (t, h) = (5, 12);
        let x = rand_vec(&mut g, t * h, 2.0);
        let w = rand_vec(&mut g, h, 1.5);
        let b = rand_vec(&mut g, h, 0.5);
        let r = rand_vec(&mut g, t * h, 1.0);
        let (xt, wt, bt) = (tensor(&x, &[t, h]), tensor(&w, &[h]), tensor(&b, &[h]));
        let (y, rstd) = layer_norm(&xt, &wt, &bt, 1e-6).unwrap();
        assert_close(&values(&y), &naive(&x, &w, &b, 1e-6), 1e-6, 1e-6, "y");
        let (dx, dw, db) = layer_norm_backward(&tensor(&r, &[t, h]), &xt, &wt, &rstd).unwrap();
        let fx = finite_diff(&x, 1e-2, |xp| weighted_sum(&naive_f32(xp, &w, &b), &r));
        let fw = finite_diff(&w, 1e-2, |wp| weighted_sum(&naive_f32(&x, wp, &b), &r));
        let fb = finite_diff(&b, 1e-2, |bp| weighted_sum(&naive_f32(&x, &w, bp), &r));
        assert_close(&values(&dx), &fx, 1e-3, 1e-4, "dx");
        assert_close(&values(&dw), &fw, 1e-3, 1e-4, "dw");
        assert_close(&values(&db), &fb, 1e-3, 1e-4, "db");
    }

    fn naive_f32(x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
        naive(x, w, b, 1e-6).into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn shape_errors_name_the_argument() {
        let x = tensor(&[0.0; 6], &[2, 3]);
        let err = layer_norm(&x, &tensor(&[1.0; 2], &[2]), &tensor(&[0.0; 3], &[3]), 1e-6)
            .unwrap_err()
            .to_string();
        assert!(err.contains("layer_norm") && err.contains("`w`"), "{err}");
    }
}
