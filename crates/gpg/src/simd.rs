//! Vectorisable scalar building blocks (exp, dot, reductions) and the AVX2 dispatch.
//!
//! The crate is compiled for the baseline x86-64 target (SSE2). [`vectorize`] runs a closure
//! inside a function compiled with AVX2+FMA enabled when the running CPU has them, so that the
//! loops inlined into it are vectorised 8 wide. Every helper here is `#[inline(always)]` so that
//! it is compiled inside that function. Reductions keep 16 independent partial sums, which lets
//! the compiler vectorise them without reassociating floating-point additions.

/// Number of independent lanes in the reductions.
const LANES: usize = 16;

/// Runs `f`, compiled with AVX2 and FMA enabled when the CPU supports them.
#[inline(always)]
pub(crate) fn vectorize<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled with.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

/// e^x in f32 with a relative error below 2e-7 (Cephes `expf`: x = n·ln2 + r with
/// |r| ≤ ln2/2, e^r by a degree-7 polynomial, 2^n by building the exponent bits).
/// Branch free, so loops over it vectorise. Returns 0 for x < −87.33 (below the smallest
/// normal number) and saturates at e^88 ≈ 1.65e38 for larger x (softmax arguments are ≤ 0).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Keeps n ≤ 127 so that 2^n is a normal number.
    const HI: f32 = 88.0;
    const LO: f32 = -87.336_54;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5·2^23: adding it rounds to the nearest integer and leaves n in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let nr = xc * LOG2E + ROUND;
    let n = nr - ROUND;
    let ni = (nr.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let er = p * (r * r) + r + 1.0;
    let two_n = f32::from_bits(((ni + 127) << 23) as u32);
    let y = er * two_n;
    if x < LO {
        0.0
    } else {
        y
    }
}

/// The logistic function σ(x) = 1 / (1 + e^(−x)).
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Σ a_i·b_i over equal-length slices.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (xa, xb) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    sum_lanes(&acc) + tail
}

/// Σ a_i·b_i·c_i over equal-length slices.
#[inline(always)]
pub(crate) fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    debug_assert!(a.len() == b.len() && b.len() == c.len());
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    let mut cc = c.chunks_exact(LANES);
    for ((xa, xb), xc) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l] * xc[l];
        }
    }
    let mut tail = 0.0f32;
    for ((x, y), z) in ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
    {
        tail += x * y * z;
    }
    sum_lanes(&acc) + tail
}

/// Σ a_i² .
#[inline(always)]
pub(crate) fn sum_squares(a: &[f32]) -> f32 {
    dot(a, a)
}

/// max_i a_i (−∞ for an empty slice).
#[inline(always)]
pub(crate) fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut ca = a.chunks_exact(LANES);
    for xa in &mut ca {
        for l in 0..LANES {
            acc[l] = if xa[l] > acc[l] { xa[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(ca.remainder()) {
        m = if x > m { x } else { m };
    }
    m
}

/// Pairwise sum of the lane accumulators.
#[inline(always)]
fn sum_lanes(acc: &[f32; LANES]) -> f32 {
    let mut half = [0.0f32; LANES / 2];
    for l in 0..LANES / 2 {
        half[l] = acc[l] + acc[l + LANES / 2];
    }
    let mut quarter = [0.0f32; LANES / 4];
    for l in 0..LANES / 4 {
        quarter[l] = half[l] + half[l + LANES / 4];
    }
    (quarter[0] + quarter[2]) + (quarter[1] + quarter[3])
}

/// In place: x_i ← e^(x_i − shift); returns Σ_i e^(x_i − shift).
#[inline(always)]
pub(crate) fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut cx = x.chunks_exact_mut(LANES);
    for xs in &mut cx {
        for l in 0..LANES {
            let e = exp(xs[l] - shift);
            xs[l] = e;
            acc[l] += e;
        }
    }
    let mut tail = 0.0f32;
    for v in cx.into_remainder() {
        let e = exp(*v - shift);
        *v = e;
        tail += e;
    }
    sum_lanes(&acc) + tail
}

/// y_i ← y_i + a·x_i.
#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// x_i ← a·x_i.
#[inline(always)]
pub(crate) fn scale(x: &mut [f32], a: f32) {
    for xi in x.iter_mut() {
        *xi *= a;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_to_two_ulp_relative() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = vectorize(|| exp(x)) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(100.0).is_finite());
        assert_eq!(exp(100.0), exp(88.0));
    }

    #[test]
    fn reductions_match_naive_sums() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - naive).abs() < 1e-5);
        let m = a.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max(&a), m);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let mut e = a.clone();
        let s = exp_shift_sum(&mut e, 0.5);
        let want: f64 = a.iter().map(|x| (*x as f64 - 0.5).exp()).sum();
        assert!((s as f64 - want).abs() < 1e-5 * want);
        for (ei, ai) in e.iter().zip(&a) {
            assert!((*ei as f64 - (*ai as f64 - 0.5).exp()).abs() < 1e-6);
        }
    }
}
