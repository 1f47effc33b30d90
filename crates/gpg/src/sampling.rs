//! Choosing the next token from logits: greedy, temperature, top-k, top-p.
//!
//! A layer below the engine: the decoders (model/decoding.rs, model/cuda_decode.rs) call a
//! [`TokenSampler`] per row and rollout/ sets up the [`SamplingParams`]; it depends only on the
//! CPU kernels' SIMD helpers.
//!
//! The order follows transformers' logits processors: divide by the temperature, keep the k
//! most likely tokens, then the smallest set of most likely tokens whose probability reaches
//! top_p (always at least one), renormalise and draw.

use anyhow::{ensure, Result};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::simd::{exp_shift_sum, max, scale, vectorize};

/// How to sample completions.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Completions per prompt.
    pub n: usize,
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: u64,
    /// Extra end-of-sequence ids, besides the model's and the tokenizer's EOS.
    pub stop_token_ids: Vec<u32>,
    /// A completion ends once its decoded text contains one of these (kept in the output).
    pub stop_strings: Vec<String>,
    /// Keep generating through EOS until `max_new_tokens`.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be ≥ 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p must be in (0, 1], got {}",
            self.top_p
        );
        Ok(())
    }
}

/// Draws tokens for one completion from its own random stream.
#[derive(Debug, Clone)]
pub struct TokenSampler {
    rng: ChaCha8Rng,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    /// Scratch space for the candidate set, reused across steps.
    candidates: Vec<(f32, u32)>,
}

impl TokenSampler {
    /// The random stream depends only on (seed, prompt, sample): reproducible whatever the
    /// batch holds.
    pub fn new(params: &SamplingParams, prompt_index: u64, sample_index: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        rng.set_stream(
            prompt_index
                .wrapping_mul(1 << 20)
                .wrapping_add(sample_index),
        );
        Self {
            rng,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            candidates: Vec::new(),
        }
    }

    /// Picks the next token from `logits` (overwritten as scratch). Returns the token and its
    /// log-prob under softmax(logits / T) (T = 1 when greedy), before any truncation.
    ///
    /// One vectorised pass turns the logits into e_i = exp(l_i/T − max) with Z = Σ e_i, so that
    /// log π(i) = ln(e_i) − ln(Z); the draw then walks the e_i (or the top-k/top-p subset).
    pub fn sample(&mut self, logits: &mut [f32]) -> (u32, f32) {
        let greedy = self.temperature == 0.0;
        let inv_t = if greedy { 1.0 } else { 1.0 / self.temperature };
        let (argmax, z) = vectorize(|| {
            if inv_t != 1.0 {
                scale(logits, inv_t);
            }
            let m = max(logits);
            // Only greedy needs the position of the maximum (one more pass over the vocabulary).
            let argmax = if greedy {
                logits.iter().position(|&l| l == m).unwrap_or(0)
            } else {
                0
            };
            (argmax, exp_shift_sum(logits, m))
        });
        let ln_z = z.ln();
        if greedy {
            // e_argmax = exp(0) = 1 exactly.
            return (argmax as u32, -ln_z);
        }
        let token = self.draw(logits, z);
        (token, logits[token as usize].ln() - ln_z)
    }

    /// (temperature, top_k, top_p) of this sampler.
    pub fn settings(&self) -> (f32, usize, f32) {
        (self.temperature, self.top_k, self.top_p)
    }

    /// The uniform in [0, 1) that [`Self::sample`] would draw from this stream over a vocabulary
    /// of `vocab` tokens (none when greedy: 0), consuming it: a GPU sampler given it draws from
    /// the same random stream as the CPU.
    pub fn next_uniform(&mut self, vocab: usize) -> f64 {
        if self.temperature == 0.0 {
            return 0.0;
        }
        let truncate = self.top_k > 0 && self.top_k < vocab || self.top_p < 1.0;
        if truncate {
            self.rng.gen::<f64>()
        } else {
            self.rng.gen::<f32>() as f64
        }
    }

    /// Draws from the distribution ∝ `weights` (e_i, summing to `total`; the most likely token
    /// has weight exp(0) = 1), restricted by top-k and top-p.
    fn draw(&mut self, weights: &[f32], total: f32) -> u32 {
        let truncate = self.top_k > 0 && self.top_k < weights.len() || self.top_p < 1.0;
        if !truncate {
            // Inverse-CDF draw over the full distribution.
            return pick(
                weights.iter().copied().enumerate(),
                self.rng.gen::<f32>() * total,
            );
        }
        let c = &mut self.candidates;
        c.clear();
        c.extend(weights.iter().enumerate().map(|(i, &w)| (w, i as u32)));
        let by_weight_desc =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.top_k > 0 && self.top_k < c.len() {
            c.select_nth_unstable_by(self.top_k - 1, by_weight_desc);
            c.truncate(self.top_k);
        }
        c.sort_unstable_by(by_weight_desc);
        let mut total: f64 = c.iter().map(|&(w, _)| w as f64).sum();
        let mut keep = c.len();
        if self.top_p < 1.0 {
            let target = self.top_p as f64 * total;
            let mut cum = 0.0;
            for (i, &(w, _)) in c.iter().enumerate() {
                cum += w as f64;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            total = c[..keep].iter().map(|&(w, _)| w as f64).sum();
        }
        let u = self.rng.gen::<f64>() * total;
        pick(c[..keep].iter().map(|&(w, i)| (i as usize, w)), u as f32)
    }
}

/// The first index at which the running sum of the weights exceeds `u` (a zero weight is
/// never picked); the last positive-weight index when rounding leaves `u` beyond the total.
/// The weights always hold a positive one (the maximum, 1), so some index is returned.
fn pick(weights: impl Iterator<Item = (usize, f32)>, mut u: f32) -> u32 {
    let mut last = 0;
    for (i, w) in weights {
        if w > 0.0 {
            if u < w {
                return i as u32;
            }
            last = i as u32;
        }
        u -= w;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> TokenSampler {
        let params = SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
            ..Default::default()
        };
        TokenSampler::new(&params, 0, 0)
    }

    #[test]
    fn greedy_picks_argmax_with_its_logprob() {
        let mut s = sampler(0.0, 1.0, 0, 1);
        let mut logits = vec![0.0, 2.0, 1.0];
        let (t, lp) = s.sample(&mut logits);
        assert_eq!(t, 1);
        // log(e^2 / (1 + e^2 + e)) by hand.
        let expected = 2.0 - (1.0f32 + 2.0f32.exp() + 1.0f32.exp()).ln();
        assert!((lp - expected).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_and_logprob_is_untruncated() {
        let mut s = sampler(1.0, 1.0, 1, 7);
        for _ in 0..20 {
            let mut logits = vec![0.5, -1.0, 3.0, 2.9];
            let (t, lp) = s.sample(&mut logits);
            assert_eq!(t, 2);
            let lse = [0.5f32, -1.0, 3.0, 2.9]
                .iter()
                .map(|x| x.exp())
                .sum::<f32>()
                .ln();
            assert!((lp - (3.0 - lse)).abs() < 1e-5);
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.2 : top_p 0.6 keeps {0, 1}; token 2 never drawn.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = sampler(1.0, 0.6, 0, 3);
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            let mut l = logits.to_vec();
            counts[s.sample(&mut l).0 as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        // Renormalised: 0.5/0.8 = 0.625 for token 0.
        let share = counts[0] as f64 / 4000.0;
        assert!((share - 0.625).abs() < 0.03, "share {share}");
    }

    #[test]
    fn full_distribution_frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, -1.0];
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        let mut s = sampler(1.0, 1.0, 0, 11);
        let mut counts = [0usize; 3];
        let n = 20000;
        for _ in 0..n {
            let mut l = logits.to_vec();
            counts[s.sample(&mut l).0 as usize] += 1;
        }
        for i in 0..3 {
            let p = logits[i].exp() / z;
            let share = counts[i] as f32 / n as f32;
            assert!((share - p).abs() < 0.015, "token {i}: {share} vs {p}");
        }
    }

    #[test]
    fn next_uniform_consumes_what_sample_draws() {
        // After one next_uniform, the stream is where one sample() would leave it.
        for (t, p, k) in [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 5), (0.0, 1.0, 0)] {
            let logits: Vec<f32> = (0..50).map(|j| (j % 7) as f32 * 0.4).collect();
            let mut a = sampler(t, p, k, 3);
            let mut b = a.clone();
            a.sample(&mut logits.clone());
            b.next_uniform(logits.len());
            assert_eq!(
                a.sample(&mut logits.clone()),
                b.sample(&mut logits.clone()),
                "T {t} top_p {p} top_k {k}"
            );
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let draw = |seed| {
            let mut s = sampler(1.0, 0.9, 50, seed);
            (0..50)
                .map(|i| {
                    let mut l: Vec<f32> = (0..100).map(|j| ((i * j) % 7) as f32 * 0.3).collect();
                    s.sample(&mut l).0
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }
}
