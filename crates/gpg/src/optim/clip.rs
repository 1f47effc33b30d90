//! Global-norm gradient clipping, as `torch.nn.utils.clip_grad_norm_` (L2 norm).
//!
//! ```text
//! norm  = sqrt(Σ_buffers Σ_i g_i²)                 (accumulated in f64)
//! scale = min(1, max_norm / (norm + 1e-6))         applied to every gradient when < 1
//! ```
//!
//! A non-finite norm (an inf or NaN gradient somewhere) is reported and the gradients are left
//! untouched, so the caller can skip the optimiser step (torch would scale by NaN).
//! The sum of squares is computed in fixed chunks and summed in order, so the result does not
//! depend on the number of threads.

use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 16;

/// torch's constant in max_norm / (norm + 1e-6).
pub const CLIP_EPSILON: f64 = 1e-6;

/// The outcome of one clipping call.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GradClip {
    /// The global L2 norm before clipping (what trainers log as `grad_norm`).
    pub norm: f64,
    /// The factor the gradients were multiplied by (1 when unchanged).
    pub scale: f32,
    /// False when the norm is inf or NaN: the gradients were not touched; skip the update.
    pub finite: bool,
}

/// Global L2 norm over all buffers, sqrt(Σ g²), accumulated in f64.
pub fn global_grad_norm(grads: &[&[f32]]) -> f64 {
    grads.iter().map(|g| sum_of_squares(g)).sum::<f64>().sqrt()
}

fn sum_of_squares(g: &[f32]) -> f64 {
    let partial: Vec<f64> = g
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// The factor a finite global norm `norm` scales the gradients by: max_norm / (norm + 1e-6)
/// when `max_norm` is finite and > 0 and that is below 1, else 1 (the same for gradients held
/// anywhere: the GPU engine applies it inside its AdamW kernel).
pub fn clip_scale(norm: f64, max_norm: f32) -> f32 {
    if max_norm > 0.0 && max_norm.is_finite() {
        let coef = max_norm as f64 / (norm + CLIP_EPSILON);
        if coef < 1.0 {
            return coef as f32;
        }
    }
    1.0
}

/// Measures the global norm and, when `max_norm` is finite and > 0 and the norm exceeds it,
/// scales every gradient by max_norm / (norm + 1e-6). A `max_norm` ≤ 0 or infinite only
/// measures (HF's `max_grad_norm = 0` / `None`).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> GradClip {
    let norm = grads.iter().map(|g| sum_of_squares(g)).sum::<f64>().sqrt();
    if !norm.is_finite() {
        return GradClip {
            norm,
            scale: 1.0,
            finite: false,
        };
    }
    let scale = clip_scale(norm, max_norm);
    if scale != 1.0 {
        for g in grads.iter_mut() {
            g.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|x| *x *= scale));
        }
    }
    GradClip {
        norm,
        scale,
        finite: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_by_hand() {
        // Buffers [3, 0] and [4]: norm = sqrt(9 + 16) = 5. max_norm 1 → scale = 1 / (5 + 1e-6)
        // = 0.19999996; gradients become [0.6, 0, 0.8] (× 0.99999980).
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![4.0f32];
        let clip = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(clip.norm, 5.0);
        assert!(clip.finite);
        let scale = 1.0 / (5.0 + 1e-6);
        assert!((clip.scale as f64 - scale).abs() < 1e-8);
        assert!((a[0] as f64 - 3.0 * scale).abs() < 1e-7);
        assert_eq!(a[1], 0.0);
        assert!((b[0] as f64 - 4.0 * scale).abs() < 1e-7);
        assert!((global_grad_norm(&[&a, &b]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn below_max_norm_is_unchanged() {
        // norm 5, max_norm 10: coef = 10 / 5.000001 ≈ 2 > 1 → untouched.
        let mut a = vec![3.0f32, 4.0];
        let clip = clip_grad_norm(&mut [&mut a], 10.0);
        assert_eq!(clip.scale, 1.0);
        assert_eq!(a, vec![3.0, 4.0]);
        // max_norm 0 only measures.
        let clip = clip_grad_norm(&mut [&mut a], 0.0);
        assert_eq!((clip.norm, clip.scale), (5.0, 1.0));
        // All-zero gradients: norm 0, nothing to do.
        let mut z = vec![0.0f32; 4];
        assert_eq!(clip_grad_norm(&mut [&mut z], 1.0).norm, 0.0);
    }

    #[test]
    fn non_finite_is_reported_and_untouched() {
        let mut a = vec![1.0f32, f32::INFINITY];
        let mut b = vec![2.0f32];
        let clip = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert!(!clip.finite);
        assert_eq!(b, vec![2.0]);
        let mut n = vec![f32::NAN];
        assert!(!clip_grad_norm(&mut [&mut n], 1.0).finite);
    }

    #[test]
    fn large_buffers_are_chunked_consistently() {
        // 200_000 elements of 0.5: Σ g² = 50_000, norm = sqrt(50_000) = 223.6068.
        let mut g = vec![0.5f32; 200_000];
        let clip = clip_grad_norm(&mut [&mut g], 2.0);
        assert!((clip.norm - 50_000f64.sqrt()).abs() < 1e-9);
        assert!((global_grad_norm(&[&g]) - 2.0).abs() < 1e-5);
    }
}
