//! The f32 master of a bf16 parameter held as its lower halves beside the bf16 tensor.
//!
//! A bf16 leaf is trained through an f32 master m, and the model's tensor holds w = bf16(m)
//! (round to nearest even) after every update. w already carries m's upper 16 bits up to the
//! rounding carry, so the master is kept as m's lower 16 bits only ([`SplitMaster`]): 2 bytes
//! per parameter instead of 4 (942 MiB less at the Qwen2.5-0.5B shape). m is rebuilt exactly:
//!
//! ```text
//! lo = bits(m) & 0xFFFF,  w = bf16(m)
//! hi = w − 1  if lo > 0x8000, or lo = 0x8000 and w even   (rounded up: RNE added the carry)
//!      w      otherwise                                   (rounded down)
//! bits(m) = hi·2¹⁶ + lo
//! ```
//!
//! The one case w and lo cannot tell apart is an exact tie (lo = 0x8000) with w even: m was
//! rounded up from w − 1 or down from w. Every value the rule would not give back (those ties
//! rounded down, about one in 131,072 updated values; non-finite values; denormals the bf16
//! conversion flushes) is kept whole in a short per-chunk list, and every split is checked
//! against the rule, so the rebuilt master is m bit for bit and the AdamW update on it is the
//! update on a plain f32 master (`optim::adamw`), element for element.

use anyhow::{ensure, Result};
use half::bf16;
use rayon::prelude::*;

use super::adamw::AdamW;
use crate::model::ops::cpu::bf16::{as_bits, f32_to_bf16};

/// Elements per chunk (the unit of the parallel update and of the lists of whole values).
const CHUNK: usize = 1 << 13;

/// An f32 master kept as its lower 16 bits beside the bf16 tensor (module docs).
#[derive(Debug, Clone)]
pub struct SplitMaster {
    /// bits(m) & 0xFFFF per element.
    lo: Vec<u16>,
    /// Per chunk of [`CHUNK`] elements: (offset in the chunk, bits(m)) of the values the rule
    /// does not give back.
    whole: Vec<Vec<(u16, u32)>>,
}

/// bits(m) from w = bf16(m) and lo = bits(m) & 0xFFFF, by the rule of the module docs.
#[inline]
fn join(w: u16, lo: u16) -> u32 {
    let hi = if lo > 0x8000 || (lo == 0x8000 && w & 1 == 0) {
        w.wrapping_sub(1)
    } else {
        w
    };
    (hi as u32) << 16 | lo as u32
}

/// One chunk's master values into `out`.
fn join_chunk(w: &[bf16], lo: &[u16], whole: &[(u16, u32)], out: &mut [f32]) {
    for ((o, &w), &lo) in out.iter_mut().zip(as_bits(w)).zip(lo) {
        *o = f32::from_bits(join(w, lo));
    }
    for &(i, bits) in whole {
        out[i as usize] = f32::from_bits(bits);
    }
}

/// Splits one chunk of master values: w ← bf16(values), lo ← their lower halves, `whole` ←
/// the values the rule does not give back.
fn split_chunk(values: &[f32], w: &mut [bf16], lo: &mut [u16], whole: &mut Vec<(u16, u32)>) {
    f32_to_bf16(values, w);
    whole.clear();
    for (i, ((&v, &wb), l)) in values.iter().zip(as_bits(w)).zip(lo.iter_mut()).enumerate() {
        let bits = v.to_bits();
        *l = bits as u16;
        if join(wb, bits as u16) != bits {
            whole.push((i as u16, bits));
        }
    }
}

impl SplitMaster {
    /// The master of a tensor of `n` values whose master is its own (widened) bf16 value: every
    /// lower half 0.
    pub fn widened(n: usize) -> Self {
        SplitMaster {
            lo: vec![0; n],
            whole: vec![Vec::new(); n.div_ceil(CHUNK)],
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.lo.len()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.lo.is_empty()
    }

    fn check(&self, w: &[bf16]) -> Result<()> {
        ensure!(
            w.len() == self.lo.len(),
            "internal: a master of {} values for a tensor of {}",
            self.lo.len(),
            w.len()
        );
        Ok(())
    }

    /// The master's f32 values, given the tensor `w` it belongs to.
    pub fn values(&self, w: &[bf16]) -> Result<Vec<f32>> {
        self.check(w)?;
        let mut out = vec![0.0f32; w.len()];
        out.par_chunks_mut(CHUNK)
            .zip(w.par_chunks(CHUNK))
            .zip(self.lo.par_chunks(CHUNK))
            .zip(self.whole.par_iter())
            .for_each(|(((o, w), lo), whole)| join_chunk(w, lo, whole, o));
        Ok(out)
    }

    /// Sets the master to `values` and the tensor `w` to their bf16 rounding.
    pub fn set(&mut self, values: &[f32], w: &mut [bf16]) -> Result<()> {
        self.check(w)?;
        ensure!(
            values.len() == w.len(),
            "internal: {} master values for a tensor of {}",
            values.len(),
            w.len()
        );
        values
            .par_chunks(CHUNK)
            .zip(w.par_chunks_mut(CHUNK))
            .zip(self.lo.par_chunks_mut(CHUNK))
            .zip(self.whole.par_iter_mut())
            .for_each(|(((v, w), lo), whole)| split_chunk(v, w, lo, whole));
        Ok(())
    }

    /// One AdamW update of parameter `name` (tensor `w`, gradient `grad`) through the master,
    /// then w ← bf16(master): the same values as [`AdamW::update`] on an f32 master followed
    /// by rounding it into w.
    pub fn adamw(
        &mut self,
        optimizer: &mut AdamW,
        lr: f32,
        name: &str,
        weight_decay: bool,
        w: &mut [bf16],
        grad: &[f32],
    ) -> Result<()> {
        self.check(w)?;
        let (scalars, state) = optimizer.begin_update(lr, name, w.len(), grad, weight_decay)?;
        w.par_chunks_mut(CHUNK)
            .zip(self.lo.par_chunks_mut(CHUNK))
            .zip(self.whole.par_iter_mut())
            .zip(grad.par_chunks(CHUNK))
            .zip(state.exp_avg.par_chunks_mut(CHUNK))
            .zip(state.exp_avg_sq.par_chunks_mut(CHUNK))
            .for_each(|(((((w, lo), whole), g), m), v)| {
                let mut buf = [0.0f32; CHUNK];
                let x = &mut buf[..w.len()];
                join_chunk(w, lo, whole, x);
                scalars.apply(x, g, m, v);
                split_chunk(x, w, lo, whole);
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamWConfig, ParamGrad};

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        let mut w = vec![bf16::ZERO; v.len()];
        f32_to_bf16(v, &mut w);
        w
    }

    /// Values of every kind the rule must give back: ties both ways, both signs, zeros,
    /// denormals, the largest finite values, infinities and NaNs, and ordinary numbers.
    fn awkward_values() -> Vec<f32> {
        let mut bits: Vec<u32> = vec![
            0x0000_0000,
            0x8000_0000,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x8001_8000,
            0x007F_FFFF,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7F7F_8000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001,
            0xFFC1_2345,
        ];
        for hi in [0x3F80u32, 0x3F81, 0xBF80, 0xBF81, 0x4049, 0x0080, 0x8080] {
            for lo in [0x0000u32, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234] {
                bits.push(hi << 16 | lo);
            }
        }
        let mut x = 0x9E37_79B9u32;
        for _ in 0..3 * CHUNK + 17 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            bits.push(x);
        }
        bits.into_iter().map(f32::from_bits).collect()
    }

    #[test]
    fn set_then_values_gives_every_bit_back() {
        let v = awkward_values();
        let mut w = vec![bf16::ZERO; v.len()];
        let mut m = SplitMaster::widened(v.len());
        m.set(&v, &mut w).unwrap();
        assert_eq!(as_bits(&w), as_bits(&to_bf16(&v)), "w = bf16(values)");
        let back = m.values(&w).unwrap();
        for (i, (a, b)) in back.iter().zip(&v).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "value {i}");
        }
        let kept: usize = m.whole.iter().map(Vec::len).sum();
        assert!(kept < 200, "{kept} values kept whole");
        // A widened tensor's master: every lower half 0, nothing kept whole.
        let w = to_bf16(&v);
        let widened = SplitMaster::widened(v.len()).values(&w).unwrap();
        for (a, &b) in widened.iter().zip(&w) {
            assert_eq!(a.to_bits(), f32::from(b).to_bits());
        }
        assert!(m.values(&w[1..]).is_err());
    }

    #[test]
    fn adamw_through_the_split_master_is_adamw_on_the_f32_master() {
        // Ordinary parameters with a spread of magnitudes, several steps (ties appear among
        // the updated values), with and without weight decay; tensors of 1, a partial chunk
        // and several chunks.
        for (n, wd) in [(1usize, true), (CHUNK - 3, false), (3 * CHUNK + 101, true)] {
            let config = AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            };
            let (mut plain_opt, mut split_opt) =
                (AdamW::new(config).unwrap(), AdamW::new(config).unwrap());
            let mut s = 12345u64;
            let mut rnd = move || {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            };
            let init: Vec<f32> = (0..n)
                .map(|i| rnd() * 10f32.powi(i as i32 % 7 - 4))
                .collect();
            let mut w = to_bf16(&init);
            let mut plain: Vec<f32> = w.iter().map(|&b| f32::from(b)).collect();
            let mut split = SplitMaster::widened(n);
            for step in 0..6 {
                let grad: Vec<f32> = (0..n).map(|_| rnd() * 0.1).collect();
                let lr = 1e-3 * (step + 1) as f32;
                plain_opt
                    .update(
                        lr,
                        ParamGrad {
                            name: "p",
                            param: &mut plain,
                            grad: &grad,
                            weight_decay: wd,
                        },
                    )
                    .unwrap();
                split
                    .adamw(&mut split_opt, lr, "p", wd, &mut w, &grad)
                    .unwrap();
                assert_eq!(
                    as_bits(&w),
                    as_bits(&to_bf16(&plain)),
                    "n {n} step {step}: w"
                );
                let back = split.values(&w).unwrap();
                for (i, (a, b)) in back.iter().zip(&plain).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "n {n} step {step}: master {i}");
                }
            }
            assert_eq!(plain_opt.state(), split_opt.state(), "moments and steps");
        }
    }
}
