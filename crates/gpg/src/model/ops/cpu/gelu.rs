//! GELU kernels (see `ops::gelu` for the equations).

use super::super::gelu::Gelu;
use candle_core::cpu::erf::erf_f64;
use rayon::prelude::*;

const QUICK: f64 = 1.702;

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn value(x: f64, kind: Gelu) -> f64 {
    match kind {
        Gelu::Exact => 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2)),
        Gelu::Quick => x * sigmoid(QUICK * x),
    }
}

fn derivative(x: f64, kind: Gelu) -> f64 {
    match kind {
        Gelu::Exact => {
            let cdf = 0.5 * (1.0 + erf_f64(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        Gelu::Quick => {
            let s = sigmoid(QUICK * x);
            s + QUICK * x * s * (1.0 - s)
        }
    }
}

pub(crate) fn forward(x: &[f32], kind: Gelu) -> Vec<f32> {
    x.par_iter()
        .map(|&v| value(v as f64, kind) as f32)
        .collect()
}

pub(crate) fn backward(dy: &[f32], x: &[f32], kind: Gelu) -> Vec<f32> {
    dy.par_iter()
        .zip(x.par_iter())
        .map(|(&d, &v)| (d as f64 * derivative(v as f64, kind)) as f32)
        .collect()
}
