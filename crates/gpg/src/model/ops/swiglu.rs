//! SwiGLU as in Qwen2's MLP: h = silu(gate) ⊙ up, silu(z) = z·σ(z), σ(z) = 1/(1+e^(−z)).
//!
//! Backward: σ' = σ(1−σ), so silu'(z) = σ(z)·(1 + z·(1 − σ(z))) and
//!   dgate = dh ⊙ up ⊙ silu'(gate),   dup = dh ⊙ silu(gate).

use super::cpu;
use super::tensor_io::{backend, cpu_slice, cpu_tensor, expect_dims, f32_dims, Backend};
use anyhow::Result;
use candle_core::Tensor;

/// h = silu(gate) ⊙ up for `gate`, `up` of shape [T, I].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "swiglu";
    let dims = f32_dims(OP, "gate", gate, 2)?.to_vec();
    expect_dims(OP, "up", up, &dims)?;
    match backend(OP, &[("gate", gate), ("up", up)])? {
        Backend::Cpu => {
            let (gs, gl) = gate.storage_and_layout();
            let (us, ul) = up.storage_and_layout();
            let mut h = cpu::zeroed(dims[0] * dims[1]);
            cpu::swiglu::forward(
                cpu_slice(OP, "gate", &gs, gl)?,
                cpu_slice(OP, "up", &us, ul)?,
                &mut h,
            );
            cpu_tensor(OP, h, (dims[0], dims[1]))
        }
    }
}

/// Backward of [`swiglu`]: returns `(dgate, dup)`, each [T, I].
pub fn swiglu_backward(dh: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "swiglu_backward";
    let dims = f32_dims(OP, "gate", gate, 2)?.to_vec();
    expect_dims(OP, "up", up, &dims)?;
    expect_dims(OP, "dh", dh, &dims)?;
    match backend(OP, &[("dh", dh), ("gate", gate), ("up", up)])? {
        Backend::Cpu => {
            let (ds, dl) = dh.storage_and_layout();
            let (gs, gl) = gate.storage_and_layout();
            let (us, ul) = up.storage_and_layout();
            let n = dims[0] * dims[1];
            let mut dgate = cpu::zeroed(n);
            let mut dup = cpu::zeroed(n);
            cpu::swiglu::backward(
                cpu_slice(OP, "dh", &ds, dl)?,
                cpu_slice(OP, "gate", &gs, gl)?,
                cpu_slice(OP, "up", &us, ul)?,
                &mut dgate,
                &mut dup,
            );
            Ok((
                cpu_tensor(OP, dgate, (dims[0], dims[1]))?,
                cpu_tensor(OP, dup, (dims[0], dims[1]))?,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    #[test]
    fn forward_matches_formula() {
        let mut g = rng(6);
        let (t, i) = (7, 45);
        let gate = rand_vec(&mut g, t * i, 8.0);
        let up = rand_vec(&mut g, t * i, 2.0);
        let h = swiglu(&tensor(&gate, &[t, i]), &tensor(&up, &[t, i])).unwrap();
        let want: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(&z, &u)| {
                let z = z as f64;
                z / (1.0 + (-z).exp()) * u as f64
            })
            .collect();
        assert_close(&values(&h), &want, 1e-6, 1e-7, "h");
        // silu(0) = 0, silu(1) = σ(1) = 0.7310585786300049.
        let h = swiglu(&tensor(&[0.0, 1.0], &[1, 2]), &tensor(&[5.0, 2.0], &[1, 2])).unwrap();
        assert_close(
            &values(&h),
            &[0.0, 2.0 * 0.7310585786300049],
            1e-7,
            0.0,
            "hand",
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut g = rng(7);
        let (t, i) = (3, 11);
        let gate = rand_vec(&mut g, t * i, 4.0);
        let up = rand_vec(&mut g, t * i, 2.0);
        let r = rand_vec(&mut g, t * i, 1.0);
        let loss = |gate: &[f32], up: &[f32]| {
            let h = swiglu(&tensor(gate, &[t, i]), &tensor(up, &[t, i])).unwrap();
            weighted_sum(&values(&h), &r)
        };
        let (dg, du) = swiglu_backward(
            &tensor(&r, &[t, i]),
            &tensor(&gate, &[t, i]),
            &tensor(&up, &[t, i]),
        )
        .unwrap();
        let dg_fd = finite_diff(&gate, 1e-2, |gp| loss(gp, &up));
        let du_fd = finite_diff(&up, 1e-2, |upp| loss(&gate, upp));
        assert_close(&values(&dg), &dg_fd, 1e-3, 1e-4, "dgate");
        assert_close(&values(&du), &du_fd, 1e-3, 1e-4, "dup");
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let err = swiglu(&tensor(&[0.0; 6], &[2, 3]), &tensor(&[0.0; 6], &[3, 2])).unwrap_err();
        assert!(
            err.to_string()
                .contains("swiglu: `up` must have shape [2, 3]"),
            "{err}"
        );
    }
}
