//! The GELU activations of the vision tower, elementwise on a tensor of any shape.
//!
//! * exact GELU (torch `nn.GELU()`, the patch merger's):  g(x) = x·Φ(x) = ½x(1 + erf(x/√2)),
//!   g'(x) = Φ(x) + x·φ(x) with φ(x) = e^(−x²/2)/√(2π);
//! * quick GELU (transformers' `quick_gelu`, Qwen2-VL's vision MLP):  q(x) = x·σ(1.702x),
//!   q'(x) = σ(1.702x) + 1.702·x·σ(1.702x)·(1 − σ(1.702x)).
//!
//! Backward: dx = dy ⊙ f'(x). Both are computed per element in f64 and rounded to f32.

use super::cpu;
use super::tensor_io::{backend, cpu_tensor, expect_dims, Backend};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// ½x(1 + erf(x/√2)).
    Exact,
    /// x·σ(1.702x).
    Quick,
}

fn checked(op: &str, name: &str, t: &Tensor) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        bail!("{op}: `{name}` must be f32, got {:?}", t.dtype());
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// y = f(x) elementwise.
pub fn gelu(x: &Tensor, kind: Gelu) -> Result<Tensor> {
    const OP: &str = "gelu";
    let xv = checked(OP, "x", x)?;
    match backend(OP, &[("x", x)])? {
        Backend::Cpu => cpu_tensor(OP, cpu::gelu::forward(&xv, kind), x.dims()),
    }
}

/// dx = dy ⊙ f'(x).
pub fn gelu_backward(dy: &Tensor, x: &Tensor, kind: Gelu) -> Result<Tensor> {
    const OP: &str = "gelu_backward";
    expect_dims(OP, "dy", dy, x.dims())?;
    let (dyv, xv) = (checked(OP, "dy", dy)?, checked(OP, "x", x)?);
    match backend(OP, &[("dy", dy), ("x", x)])? {
        Backend::Cpu => cpu_tensor(OP, cpu::gelu::backward(&dyv, &xv, kind), x.dims()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    #[test]
    fn hand_values_and_finite_differences() {
        let x = tensor(&[0.0, 1.0, -2.0], &[3]);
        // Φ(1) = 0.8413447, Φ(−2) = 0.0227501.
        assert_close(
            &values(&gelu(&x, Gelu::Exact).unwrap()),
            &[0.0, 0.8413447460685429, -2.0 * 0.022750131948179195],
            1e-6,
            1e-7,
            "exact",
        );
        let s = 1.0 / (1.0 + (-1.702f64).exp());
        assert_close(
            &values(&gelu(&x, Gelu::Quick).unwrap())[1..2],
            &[s],
            1e-6,
            0.0,
            "quick",
        );
        let mut g = rng(12);
        for kind in [Gelu::Exact, Gelu::Quick] {
            let xv = rand_vec(&mut g, 40, 4.0);
            let r = rand_vec(&mut g, 40, 1.0);
            let dx = gelu_backward(&tensor(&r, &[8, 5]), &tensor(&xv, &[8, 5]), kind).unwrap();
            let fd = finite_diff(&xv, 1e-3, |xp| {
                weighted_sum(&values(&gelu(&tensor(xp, &[8, 5]), kind).unwrap()), &r)
            });
            assert_close(&values(&dx), &fd, 1e-3, 1e-4, "dx");
        }
    }
}
