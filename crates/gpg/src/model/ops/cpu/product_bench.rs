//! Timing of the three matrix products of a linear layer through the engine's own dispatch
//! ([`super::mixed`]), for `gpg-rl bench products` (which runs PyTorch on the same shapes).

use std::time::Instant;

use super::mixed;
use crate::model::ops::tensor_io::WeightSlice;

/// Which product of a linear layer with weight W [out, inp].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductKind {
    /// y[rows, out] = x[rows, inp]·Wᵀ.
    Forward,
    /// dx[rows, inp] = dy[rows, out]·W.
    InputGrad,
    /// dW[out, inp] += dy[rows, out]ᵀ·x[rows, inp] (f32 accumulator).
    WeightGrad,
}

impl ProductKind {
    /// Short name: "x·Wᵀ", "dy·W", "dyᵀ·x".
    pub fn as_str(self) -> &'static str {
        match self {
            ProductKind::Forward => "x·Wᵀ",
            ProductKind::InputGrad => "dy·W",
            ProductKind::WeightGrad => "dyᵀ·x",
        }
    }

    /// The peer script's name: "fwd", "dx", "dw".
    pub fn key(self) -> &'static str {
        match self {
            ProductKind::Forward => "fwd",
            ProductKind::InputGrad => "dx",
            ProductKind::WeightGrad => "dw",
        }
    }
}

/// One product to time.
#[derive(Clone, Debug)]
pub struct ProductCase {
    /// The layer ("q/o", "k/v", "gate/up", "down").
    pub layer: &'static str,
    pub kind: ProductKind,
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

impl ProductCase {
    /// 2·rows·inp·out.
    pub fn flops(&self) -> f64 {
        2.0 * self.rows as f64 * self.inp as f64 * self.out as f64
    }
}

/// The products of a Qwen2 layer with hidden size `hidden`, `kv` key/value columns and
/// intermediate size `inter`, at `rows` tokens: q/o, k/v, gate/up and down, each forward,
/// input gradient and weight gradient.
pub fn layer_products(rows: usize, hidden: usize, kv: usize, inter: usize) -> Vec<ProductCase> {
    let layers = [
        ("q/o", hidden, hidden),
        ("k/v", hidden, kv),
        ("gate/up", hidden, inter),
        ("down", inter, hidden),
    ];
    let mut v = Vec::new();
    for kind in [
        ProductKind::Forward,
        ProductKind::InputGrad,
        ProductKind::WeightGrad,
    ] {
        for (layer, inp, out) in layers {
            v.push(ProductCase {
                layer,
                kind,
                rows,
                inp,
                out,
            });
        }
    }
    v
}

/// Deterministic values in [-scale, scale).
fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// What a product's time is measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// Wall-clock time.
    Wall,
    /// CPU time of the whole process (every thread), which other processes' load on a shared
    /// machine barely moves; with one rayon thread it is the product's own work.
    ProcessCpu,
}

impl Clock {
    /// Seconds on this clock (from an arbitrary origin).
    pub fn now(self) -> f64 {
        match self {
            Clock::Wall => {
                static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
                T0.get_or_init(Instant::now).elapsed().as_secs_f64()
            }
            Clock::ProcessCpu => process_cpu_seconds(),
        }
    }
}

#[cfg(unix)]
fn process_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(not(unix))]
fn process_cpu_seconds() -> f64 {
    Clock::Wall.now()
}

/// Best milliseconds on `clock` of `reps` runs (after one warm-up) of the product with a bf16
/// weight (`bf16`) or an f32 one, through the dispatch the training step uses.
pub fn time_product(case: &ProductCase, bf16: bool, reps: usize, clock: Clock) -> f64 {
    let (rows, inp, out) = (case.rows, case.inp, case.out);
    let w = values(out * inp, 1, 0.05);
    let wh: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let ws = if bf16 {
        WeightSlice::Bf16(&wh)
    } else {
        WeightSlice::F32(&w)
    };
    let x = values(rows * inp, 2, 1.0);
    let dy = values(rows * out, 3, 1.0);
    let mut dst = match case.kind {
        ProductKind::Forward => vec![0.0f32; rows * out],
        ProductKind::InputGrad => vec![0.0f32; rows * inp],
        ProductKind::WeightGrad => vec![0.0f32; out * inp],
    };
    let mut run = || match case.kind {
        ProductKind::Forward => mixed::x_wt(&mut dst, &x, ws, rows, inp, out, 1.0, false),
        ProductKind::InputGrad => mixed::dy_w(&mut dst, &dy, ws, rows, out, inp, 1.0, false),
        ProductKind::WeightGrad => mixed::dyt_x(&mut dst, &dy, &x, rows, out, inp, 1.0, true, bf16),
    };
    run();
    (0..reps.max(1))
        .map(|_| {
            let t0 = clock.now();
            run();
            (clock.now() - t0) * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}
