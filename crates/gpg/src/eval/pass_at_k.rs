//! The unbiased pass@k estimator.
//!
//! With `n` samples of one problem of which `c` are correct, the probability that a random
//! subset of `k` of them holds at least one correct sample is
//!
//! ```text
//! pass@k = 1 − C(n − c, k) / C(n, k)
//! ```
//!
//! and its mean over problems estimates the chance that k fresh samples contain a correct one.
//! pass@1 is c / n: the mean correctness over the samples.

/// `1 − C(n − c, k) / C(n, k)`, computed as `1 − Π_{i = n−c+1}^{n} (1 − k / i)` so that no
/// binomial coefficient overflows.
///
/// Defined for `1 ≤ k ≤ n` and `c ≤ n`. Outside that range it does not panic: `c` is taken as
/// `min(c, n)`, `k = 0` gives 0 (an empty subset never passes), and `k > n` gives 1 when
/// `c > 0` else 0 (every sample is in the subset).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    let c = c.min(n);
    if k == 0 || c == 0 {
        return 0.0;
    }
    if n - c < k {
        // Every k-subset contains a correct sample (C(n − c, k) = 0).
        return 1.0;
    }
    // C(n−c, k)/C(n, k) = Π_{i=0}^{k−1} (n−c−i)/(n−i) = Π_{i=n−c+1}^{n} (1 − k/i).
    let all_wrong: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    1.0 - all_wrong
}

#[cfg(test)]
mod tests {
    use super::*;

    /// C(n, k) as f64 by the multiplicative formula (an independent reference).
    fn binomial(n: usize, k: usize) -> f64 {
        if k > n {
            return 0.0;
        }
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn hand_computed_values() {
        // n = 5, c = 2: pass@1 = 2/5.
        assert!(close(pass_at_k(5, 2, 1), 0.4));
        // k = 2: 1 − C(3,2)/C(5,2) = 1 − 3/10.
        assert!(close(pass_at_k(5, 2, 2), 0.7));
        // k = 3: 1 − C(3,3)/C(5,3) = 1 − 1/10.
        assert!(close(pass_at_k(5, 2, 3), 0.9));
        // k = 4 > n − c = 3: always a correct one.
        assert!(close(pass_at_k(5, 2, 4), 1.0));
        // n = 4, c = 1, k = 2: 1 − C(3,2)/C(4,2) = 1 − 3/6.
        assert!(close(pass_at_k(4, 1, 2), 0.5));
        // n = 10, c = 3, k = 5: 1 − C(7,5)/C(10,5) = 1 − 21/252.
        assert!(close(pass_at_k(10, 3, 5), 1.0 - 21.0 / 252.0));
        // n = k: any correct sample.
        assert!(close(pass_at_k(8, 1, 8), 1.0));
        assert!(close(pass_at_k(8, 0, 8), 0.0));
        assert!(close(pass_at_k(1, 1, 1), 1.0));
    }

    #[test]
    fn pass_at_1_is_the_share_correct() {
        for n in 1..=16 {
            for c in 0..=n {
                assert!(
                    close(pass_at_k(n, c, 1), c as f64 / n as f64),
                    "n={n} c={c}"
                );
            }
        }
    }

    #[test]
    fn matches_binomial_formula() {
        for n in 1..=30 {
            for c in 0..=n {
                for k in 1..=n {
                    let expected = 1.0 - binomial(n - c, k) / binomial(n, k);
                    let got = pass_at_k(n, c, k);
                    assert!(
                        (got - expected).abs() < 1e-9,
                        "n={n} c={c} k={k}: {got} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn monotone_in_k_and_c() {
        let n = 12;
        for c in 0..=n {
            for k in 1..n {
                assert!(pass_at_k(n, c, k) <= pass_at_k(n, c, k + 1) + 1e-15);
            }
        }
        for k in 1..=n {
            for c in 0..n {
                assert!(pass_at_k(n, c, k) <= pass_at_k(n, c + 1, k) + 1e-15);
            }
        }
    }

    #[test]
    fn out_of_range_arguments_do_not_panic() {
        assert_eq!(pass_at_k(0, 0, 1), 0.0);
        assert_eq!(pass_at_k(5, 2, 0), 0.0);
        assert_eq!(pass_at_k(3, 7, 1), 1.0); // c clamped to n
        assert_eq!(pass_at_k(3, 1, 9), 1.0);
        assert_eq!(pass_at_k(3, 0, 9), 0.0);
        // Large n: no overflow, no NaN.
        let v = pass_at_k(100_000, 3, 50_000);
        assert!(v.is_finite() && v > 0.0 && v <= 1.0);
    }
}
