//! The linear layer y = x·Wᵀ + b and its backward, for weights stored in f32 or bf16.
//!
//! x is [T, in] (f32, the activations), W is [out, in] (the parameter, f32 or bf16), b [out].
//! Backward, given dy = ∂L/∂y [T, out]:
//!
//! ```text
//! ∂L/∂x = dy·W            [T, in]
//! ∂L/∂W = dyᵀ·x           [out, in]   (accumulated into the caller's f32 gradient buffer)
//! ∂L/∂b = Σ_t dy[t, :]    [out]
//! ```
//!
//! With bf16 weights every product takes bf16 operands and accumulates in f32 (mixed
//! precision); results and gradients are f32.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use rayon::prelude::*;

use super::cpu::{self, mixed};
use super::tensor_io::{
    backend, cpu_slice, cpu_tensor, f32_dims, update_in_place, with_weight, Backend, WeightSliceMut,
};

/// Up to this many rows, the forward uses the few-rows (decode) kernel instead of a GEMM.
const FEW_ROWS: usize = 32;

/// Checks W [out, in] (f32 or bf16, contiguous) and returns (out, in).
fn weight_dims(op: &str, w: &Tensor) -> Result<(usize, usize)> {
    if !matches!(w.dtype(), DType::F32 | DType::BF16) {
        bail!("{op}: `w` must be f32 or bf16, got {:?}", w.dtype());
    }
    if !w.is_contiguous() {
        bail!("{op}: `w` must be contiguous");
    }
    match w.dims() {
        &[o, i] => Ok((o, i)),
        d => bail!("{op}: `w` must have rank 2, got shape {d:?}"),
    }
}

/// y = x·Wᵀ (+ b).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    const OP: &str = "linear";
    let (out, inp) = weight_dims(OP, w)?;
    let xd = f32_dims(OP, "x", x, 2)?;
    if xd[1] != inp {
        bail!("{OP}: `x` has shape {xd:?} but `w` is [{out}, {inp}]");
    }
    let rows = xd[0];
    match backend(OP, &[("x", x), ("w", w)])? {
        Backend::Cpu => {
            let (xs, xl) = x.storage_and_layout();
            let xs = cpu_slice(OP, "x", &xs, xl)?;
            let mut y = cpu::zeroed(rows * out);
            with_weight(OP, "w", w, |ws| {
                if rows <= FEW_ROWS {
                    // A few rows (a prompt batch's last tokens, the logits of a prefill): the
                    // decode kernel streams W as stored, with no packing of the whole matrix.
                    mixed::rows_x_wt(xs, ws, None, rows, inp, out, &mut y, false)
                } else {
                    mixed::x_wt(&mut y, xs, ws, rows, inp, out, 1.0, false)
                }
            })?;
            if let Some(b) = b {
                let (bs, bl) = b.storage_and_layout();
                let bs = cpu_slice(OP, "b", &bs, bl)?;
                if bs.len() != out {
                    bail!("{OP}: `b` has {} elements, `w` has {out} rows", bs.len());
                }
                let add = |row: &mut [f32]| row.iter_mut().zip(bs).for_each(|(v, b)| *v += b);
                if rows > FEW_ROWS {
                    y.par_chunks_mut(out).for_each(add);
                } else {
                    y.chunks_exact_mut(out).for_each(add);
                }
            }
            cpu_tensor(OP, y, (rows, out))
        }
    }
}

/// ∂L/∂x = dy·W.
pub fn linear_backward_input(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear_backward_input";
    let (out, inp) = weight_dims(OP, w)?;
    let dd = f32_dims(OP, "dy", dy, 2)?;
    if dd[1] != out {
        bail!("{OP}: `dy` has shape {dd:?} but `w` is [{out}, {inp}]");
    }
    let rows = dd[0];
    match backend(OP, &[("dy", dy), ("w", w)])? {
        Backend::Cpu => {
            let (ds, dl) = dy.storage_and_layout();
            let ds = cpu_slice(OP, "dy", &ds, dl)?;
            let mut dx = cpu::zeroed(rows * inp);
            with_weight(OP, "w", w, |ws| {
                mixed::dy_w(&mut dx, ds, ws, rows, out, inp, 1.0, false)
            })?;
            cpu_tensor(OP, dx, (rows, inp))
        }
    }
}

/// Adds ∂L/∂W = dyᵀ·x to `dw` ([out, in], f32) and ∂L/∂b = Σ_t dy to `db`. `bf16` selects
/// bf16 operands (the precision of a bf16 weight).
pub fn linear_backward_params(
    dy: &Tensor,
    x: &Tensor,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    bf16: bool,
) -> Result<()> {
    const OP: &str = "linear_backward_params";
    let dd = f32_dims(OP, "dy", dy, 2)?;
    let xd = f32_dims(OP, "x", x, 2)?;
    let (rows, out, inp) = (dd[0], dd[1], xd[1]);
    if xd[0] != rows {
        bail!("{OP}: `dy` has {rows} rows but `x` has {}", xd[0]);
    }
    if dw.len() != out * inp {
        bail!(
            "{OP}: gradient buffer has {} elements, expected {out}×{inp}",
            dw.len()
        );
    }
    match backend(OP, &[("dy", dy), ("x", x)])? {
        Backend::Cpu => {
            let (ds, dl) = dy.storage_and_layout();
            let ds = cpu_slice(OP, "dy", &ds, dl)?;
            let (xs, xl) = x.storage_and_layout();
            let xs = cpu_slice(OP, "x", &xs, xl)?;
            mixed::dyt_x(dw, ds, xs, rows, out, inp, 1.0, true, bf16);
            if let Some(db) = db {
                if db.len() != out {
                    bail!(
                        "{OP}: bias gradient buffer has {} elements, expected {out}",
                        db.len()
                    );
                }
                for row in ds.chunks_exact(out) {
                    db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                }
            }
            Ok(())
        }
    }
}

/// y += α·x·Wᵀ in place (`y` [T, out] f32, contiguous, read by no one else: e.g. the fresh
/// output of [`linear`]). The adapter path of a LoRA layer (α = s, W = B) with no [T, out]
/// temporary.
pub fn linear_accumulate(y: &Tensor, x: &Tensor, w: &Tensor, alpha: f32) -> Result<()> {
    const OP: &str = "linear_accumulate";
    let (out, inp) = weight_dims(OP, w)?;
    let xd = f32_dims(OP, "x", x, 2)?;
    let yd = f32_dims(OP, "y", y, 2)?;
    if xd[1] != inp || yd != [xd[0], out] {
        bail!("{OP}: `x` {xd:?}, `y` {yd:?} and `w` [{out}, {inp}] do not fit");
    }
    let rows = xd[0];
    match backend(OP, &[("x", x), ("w", w), ("y", y)])? {
        Backend::Cpu => {
            let (xs, xl) = x.storage_and_layout();
            let xs = cpu_slice(OP, "x", &xs, xl)?;
            with_weight(OP, "w", w, |ws| {
                update_in_place(y, |slot| match slot {
                    WeightSliceMut::F32(ys) => {
                        mixed::x_wt(ys, xs, ws, rows, inp, out, alpha, true);
                        Ok(())
                    }
                    WeightSliceMut::Bf16(_) => bail!("{OP}: `y` must be f32"),
                })
            })?
        }
    }
}

/// dx += α·dy·W in place (`dx` [T, in] f32, contiguous, read by no one else: e.g. the fresh
/// output of [`linear_backward_input`]).
pub fn linear_backward_input_accumulate(
    dx: &Tensor,
    dy: &Tensor,
    w: &Tensor,
    alpha: f32,
) -> Result<()> {
    const OP: &str = "linear_backward_input_accumulate";
    let (out, inp) = weight_dims(OP, w)?;
    let dd = f32_dims(OP, "dy", dy, 2)?;
    let xd = f32_dims(OP, "dx", dx, 2)?;
    if dd[1] != out || xd != [dd[0], inp] {
        bail!("{OP}: `dy` {dd:?}, `dx` {xd:?} and `w` [{out}, {inp}] do not fit");
    }
    let rows = dd[0];
    match backend(OP, &[("dy", dy), ("w", w), ("dx", dx)])? {
        Backend::Cpu => {
            let (ds, dl) = dy.storage_and_layout();
            let ds = cpu_slice(OP, "dy", &ds, dl)?;
            with_weight(OP, "w", w, |ws| {
                update_in_place(dx, |slot| match slot {
                    WeightSliceMut::F32(xs) => {
                        mixed::dy_w(xs, ds, ws, rows, out, inp, alpha, true);
                        Ok(())
                    }
                    WeightSliceMut::Bf16(_) => bail!("{OP}: `dx` must be f32"),
                })
            })?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
    }

    /// Naive f64 products against the three kernels, for f32 and bf16 weights.
    #[test]
    fn linear_products_match_naive_f64_for_f32_and_bf16_weights() {
        let (rows, inp, out) = (7, 13, 5);
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.07)
            .collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.3).collect();
        let dy: Vec<f32> = (0..rows * out)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) * 0.2)
            .collect();
        for dtype in [DType::F32, DType::BF16] {
            let wt = t(&w, &[out, inp]).to_dtype(dtype).unwrap();
            // The reference uses the weights as stored (bf16-rounded for bf16) and, for bf16,
            // the activations rounded to bf16 too.
            let wr: Vec<f64> = wt
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let round = |v: &[f32]| -> Vec<f64> {
                v.iter()
                    .map(|&a| {
                        if dtype == DType::BF16 {
                            half::bf16::from_f32(a).to_f64()
                        } else {
                            a as f64
                        }
                    })
                    .collect()
            };
            let (xr, dyr) = (round(&x), round(&dy));
            let tol = if dtype == DType::BF16 { 2e-2 } else { 1e-5 };
            let y = linear(&t(&x, &[rows, inp]), &wt, Some(&t(&b, &[out]))).unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for r in 0..rows {
                for o in 0..out {
                    let want: f64 = (0..inp)
                        .map(|i| xr[r * inp + i] * wr[o * inp + i])
                        .sum::<f64>()
                        + b[o] as f64;
                    assert!(
                        (y[r * out + o] as f64 - want).abs() < tol * (1.0 + want.abs()),
                        "{dtype:?} y"
                    );
                }
            }
            let dx = linear_backward_input(&t(&dy, &[rows, out]), &wt).unwrap();
            let dx = dx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for r in 0..rows {
                for i in 0..inp {
                    let want: f64 = (0..out).map(|o| dyr[r * out + o] * wr[o * inp + i]).sum();
                    assert!(
                        (dx[r * inp + i] as f64 - want).abs() < tol * (1.0 + want.abs()),
                        "{dtype:?} dx"
                    );
                }
            }
            let mut dw = vec![1.0f32; out * inp];
            let mut db = vec![0.5f32; out];
            linear_backward_params(
                &t(&dy, &[rows, out]),
                &t(&x, &[rows, inp]),
                &mut dw,
                Some(&mut db),
                dtype == DType::BF16,
            )
            .unwrap();
            for o in 0..out {
                for i in 0..inp {
                    let want: f64 = 1.0
                        + (0..rows)
                            .map(|r| dyr[r * out + o] * xr[r * inp + i])
                            .sum::<f64>();
                    assert!(
                        (dw[o * inp + i] as f64 - want).abs() < tol * (1.0 + want.abs()),
                        "{dtype:?} dw"
                    );
                }
                let want: f64 = 0.5 + (0..rows).map(|r| dy[r * out + o] as f64).sum::<f64>();
                assert!((db[o] as f64 - want).abs() < 1e-5);
            }
        }
    }

    /// The in-place accumulating products against the allocating ones plus an add.
    #[test]
    fn accumulating_products_equal_product_plus_add() {
        let (rows, inp, out) = (40, 9, 6);
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.07)
            .collect();
        let base: Vec<f32> = (0..rows * out).map(|i| (i % 5) as f32 * 0.3).collect();
        let (xt, wt) = (t(&x, &[rows, inp]), t(&w, &[out, inp]));
        let y = t(&base, &[rows, out]).copy().unwrap();
        linear_accumulate(&y, &xt, &wt, 0.5).unwrap();
        let want =
            (t(&base, &[rows, out]) + (linear(&xt, &wt, None).unwrap() * 0.5).unwrap()).unwrap();
        let d = (y - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        let dy = t(&base, &[rows, out]);
        let dx = t(&x, &[rows, inp]).copy().unwrap();
        linear_backward_input_accumulate(&dx, &dy, &wt, 2.0).unwrap();
        let want =
            (xt.clone() + (linear_backward_input(&dy, &wt).unwrap() * 2.0).unwrap()).unwrap();
        let d = (dx - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(linear_accumulate(&t(&base, &[rows, out]), &wt, &wt, 1.0).is_err());
    }
}
