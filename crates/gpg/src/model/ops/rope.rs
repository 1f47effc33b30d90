//! Rotary position embedding, HF "rotate_half" convention (Qwen2).
//!
//! For a head vector x ∈ ℝ^d and i < d/2, with f_i = θ^(−2i/d) and angle a_i = pos·f_i:
//!   y[i]       = x[i]·cos a_i − x[i+d/2]·sin a_i
//!   y[i+d/2]   = x[i+d/2]·cos a_i + x[i]·sin a_i
//! i.e. y = R(pos)·x with R a block rotation of the pairs (x[i], x[i+d/2]).
//!
//! Backward: y is linear in x, so dx = R(pos)ᵀ·dy, the rotation by −a:
//!   dx[i] = dy[i]·cos a_i + dy[i+d/2]·sin a_i,   dx[i+d/2] = dy[i+d/2]·cos a_i − dy[i]·sin a_i.
//!
//! The cos/sin tables are computed the way `transformers` does (all in f32):
//! inv_freq_i = 1 / θ^((2i)/d), angle = (pos as f32)·inv_freq_i, then cos/sin of that f32 angle,
//! so results match `Qwen2RotaryEmbedding` to about 1e-6.

use super::cpu;
use super::tensor_io::{backend, cpu_slice, cpu_tensor, f32_dims, Backend};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Precomputed rotary tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    max_positions: usize,
    /// cos of the angles, `[max_positions, head_dim/2]` row-major.
    cos: Vec<f32>,
    /// sin of the angles, `[max_positions, head_dim/2]` row-major.
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for `head_dim`-wide heads, base `theta`, positions `0..max_positions`.
    /// (An odd `head_dim` is accepted here and rejected by `forward`/`backward`.)
    pub fn new(head_dim: usize, theta: f64, max_positions: usize) -> Rope {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self::from_inv_freq(head_dim, &inv_freq, max_positions)
    }

    /// Tables for given inverse frequencies (head_dim/2 of them; a scaled RoPE such as Llama
    /// 3's computes its own, `Qwen2Config::rope_inv_freq`): angle = (pos as f32)·inv_freq_i.
    pub fn from_inv_freq(head_dim: usize, inv_freq: &[f32], max_positions: usize) -> Rope {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Rope {
            head_dim,
            max_positions,
            cos,
            sin,
        }
    }

    /// Tables given row by row, `[rows, head_dim/2]` each: row r holds the cos/sin of the angles
    /// that "position" r rotates by. Per-token tables (M-RoPE's sections, the vision tower's 2-D
    /// angles) are built this way and indexed by packed row.
    pub fn from_tables(head_dim: usize, cos: Vec<f32>, sin: Vec<f32>) -> Result<Rope> {
        let half = head_dim / 2;
        if half == 0 || cos.len() != sin.len() || !cos.len().is_multiple_of(half) {
            bail!(
                "Rope::from_tables: cos ({}) and sin ({}) must be whole rows of head_dim/2 = {half}",
                cos.len(),
                sin.len()
            );
        }
        Ok(Rope {
            head_dim,
            max_positions: cos.len() / half,
            cos,
            sin,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The (cos, sin) tables, each [max_positions, head_dim/2] row-major (the GPU kernels read
    /// the same values).
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` [T, n_heads, head_dim]; token t uses position `positions[t]`.
    pub fn forward(&self, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        self.apply::<false>("Rope::forward", "x", x, positions)
    }

    /// Backward of [`Rope::forward`]: dx = R(pos)ᵀ·dy (the inverse rotation).
    pub fn backward(&self, dy: &Tensor, positions: &[u32]) -> Result<Tensor> {
        self.apply::<true>("Rope::backward", "dy", dy, positions)
    }

    /// In-place forward rotation of a slice laid out `[positions.len(), n_heads, head_dim]`
    /// (for the decoding path, which works on slices).
    pub fn forward_slice(&self, x: &mut [f32], n_heads: usize, positions: &[u32]) -> Result<()> {
        const OP: &str = "Rope::forward_slice";
        let row_len = n_heads * self.head_dim;
        if x.len() != positions.len() * row_len {
            bail!(
                "{OP}: slice has {} elements, expected {} tokens × {n_heads} heads × {} = {}",
                x.len(),
                positions.len(),
                self.head_dim,
                positions.len() * row_len
            );
        }
        self.check(OP, positions)?;
        let half = self.head_dim / 2;
        for (row, &pos) in x.chunks_exact_mut(row_len.max(1)).zip(positions) {
            let p = pos as usize * half;
            let (c, s) = (&self.cos[p..p + half], &self.sin[p..p + half]);
            for head in row.chunks_exact_mut(self.head_dim) {
                cpu::rope::rotate_head_in_place(head, c, s);
            }
        }
        Ok(())
    }

    fn check(&self, op: &str, positions: &[u32]) -> Result<()> {
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            bail!(
                "{op}: head_dim must be even and positive, got {}",
                self.head_dim
            );
        }
        if let Some(i) = positions
            .iter()
            .position(|&p| p as usize >= self.max_positions)
        {
            bail!(
                "{op}: positions[{i}] = {} is beyond the table (max_positions = {})",
                positions[i],
                self.max_positions
            );
        }
        Ok(())
    }

    fn apply<const INVERSE: bool>(
        &self,
        op: &str,
        name: &str,
        x: &Tensor,
        positions: &[u32],
    ) -> Result<Tensor> {
        let dims = f32_dims(op, name, x, 3)?;
        let (t, nh, hd) = (dims[0], dims[1], dims[2]);
        if hd != self.head_dim {
            bail!(
                "{op}: `{name}` has head_dim {hd} but the tables were built for {}",
                self.head_dim
            );
        }
        if positions.len() != t {
            bail!(
                "{op}: {} positions for {t} tokens of `{name}`",
                positions.len()
            );
        }
        self.check(op, positions)?;
        match backend(op, &[(name, x)])? {
            Backend::Cpu => {
                let (xs, xl) = x.storage_and_layout();
                let xv = cpu_slice(op, name, &xs, xl)?;
                let mut y = cpu::zeroed(t * nh * hd);
                cpu::rope::rotate::<INVERSE>(
                    xv,
                    &mut y,
                    positions,
                    &self.cos,
                    &self.sin,
                    nh * hd,
                    hd / 2,
                );
                cpu_tensor(op, y, (t, nh, hd))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::test_util::*;

    /// The direct formula in f64 (angles from f64 frequencies).
    fn direct(x: &[f32], nh: usize, hd: usize, theta: f64, positions: &[u32]) -> Vec<f64> {
        let half = hd / 2;
        let mut y = vec![0.0f64; x.len()];
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..nh {
                let base = (t * nh + h) * hd;
                for i in 0..half {
                    let a = pos as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
                    let (x1, x2) = (x[base + i] as f64, x[base + i + half] as f64);
                    y[base + i] = x1 * a.cos() - x2 * a.sin();
                    y[base + i + half] = x2 * a.cos() + x1 * a.sin();
                }
            }
        }
        y
    }

    #[test]
    fn forward_matches_direct_formula() {
        let mut g = rng(3);
        let (t, nh, hd) = (6, 3, 8);
        let theta = 10_000.0;
        let x = rand_vec(&mut g, t * nh * hd, 1.0);
        let positions = [0u32, 1, 2, 7, 30, 63];
        let rope = Rope::new(hd, theta, 64);
        let y = rope.forward(&tensor(&x, &[t, nh, hd]), &positions).unwrap();
        // f32 angles (as transformers computes them) differ from f64 ones by ~pos·1e-7.
        assert_close(
            &values(&y),
            &direct(&x, nh, hd, theta, &positions),
            2e-6,
            1e-6,
            "y",
        );
        // Position 0 is the identity.
        assert_eq!(&values(&y)[..nh * hd], &x[..nh * hd]);
    }

    #[test]
    fn hand_computed_quarter_turn() {
        // d = 2: a single pair, f_0 = 1, position 1 → angle 1 rad.
        let rope = Rope::new(2, 10_000.0, 4);
        let y = rope
            .forward(&tensor(&[1.0, 0.0], &[1, 1, 2]), &[1])
            .unwrap();
        assert_close(&values(&y), &[1f64.cos(), 1f64.sin()], 1e-7, 0.0, "y");
    }

    #[test]
    fn backward_is_inverse_rotation_and_matches_finite_differences() {
        let mut g = rng(4);
        let (t, nh, hd) = (5, 2, 6);
        let rope = Rope::new(hd, 1_000_000.0, 100);
        let positions = [3u32, 0, 99, 42, 7];
        let x = rand_vec(&mut g, t * nh * hd, 1.0);
        let y = rope.forward(&tensor(&x, &[t, nh, hd]), &positions).unwrap();
        let back = rope.backward(&y, &positions).unwrap();
        assert_close(&values(&back), &widen(&x), 1e-6, 1e-7, "R^T R x");

        let r = rand_vec(&mut g, t * nh * hd, 1.0);
        let dx = rope
            .backward(&tensor(&r, &[t, nh, hd]), &positions)
            .unwrap();
        let fd = finite_diff(&x, 1e-2, |xp| {
            let y = rope.forward(&tensor(xp, &[t, nh, hd]), &positions).unwrap();
            weighted_sum(&values(&y), &r)
        });
        assert_close(&values(&dx), &fd, 1e-4, 1e-5, "dx");
    }

    #[test]
    fn forward_slice_matches_tensor_forward() {
        let mut g = rng(5);
        let (t, nh, hd) = (3, 2, 4);
        let rope = Rope::new(hd, 10_000.0, 16);
        let positions = [5u32, 9, 15];
        let x = rand_vec(&mut g, t * nh * hd, 1.0);
        let y = rope.forward(&tensor(&x, &[t, nh, hd]), &positions).unwrap();
        let mut xs = x.clone();
        rope.forward_slice(&mut xs, nh, &positions).unwrap();
        assert_eq!(xs, values(&y));
    }

    #[test]
    fn out_of_range_position_is_an_error() {
        let rope = Rope::new(4, 10_000.0, 8);
        let x = tensor(&[0.0; 8], &[2, 1, 4]);
        let err = rope.forward(&x, &[1, 8]).unwrap_err().to_string();
        assert!(
            err.contains("positions[1] = 8") && err.contains("max_positions = 8"),
            "{err}"
        );
        assert!(rope.forward(&x, &[1]).is_err());
        let odd = Rope::new(3, 10_000.0, 8);
        assert!(odd.forward(&tensor(&[0.0; 3], &[1, 1, 3]), &[0]).is_err());
    }
}
