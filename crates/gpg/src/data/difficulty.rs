//! Difficulty-weighted prompt sampling, as the GPG authors ran their 7B model
//! (`--weighted_sample --sample_strategy medium` in their open-r1 fork).
//!
//! During an epoch the trainer records, for every group it samples, the group's mean reward
//! r̄ (its share of correct completions when the reward is an accuracy in [0, 1]). At the
//! start of the next epoch each prompt i gets a weight from the mean p_i of the r̄ recorded
//! for it since it was last drawn,
//!
//! ```text
//!   uniform:  w(p) = 1
//!   hard:     w(p) = 1 − p                       (harder prompts more often)
//!   soft:     w(p) = 0 if p ∈ {0, 1}, else 1 − p
//!   medium:   w(p) = 0 if p ∈ {0, 1}, else 1     (drop prompts that were all right / all wrong)
//!   a prompt with nothing recorded: w = 1
//! ```
//!
//! and the epoch's n indices are drawn with replacement with probability w_i / Σ w
//! ([`weighted_epoch_order`]); the records of the prompts drawn are then cleared, so their
//! weight in the epoch after is measured afresh (the prompts not drawn keep theirs). The first
//! epoch (nothing recorded yet) is the plain shuffle. p ≤ 0 and p ≥ 1 count as 0 and 1, so a
//! reward sum above 1 (accuracy + format) reads as "all correct": the strategies assume a
//! reward in [0, 1], as the reference does. When every weight is 0 the epoch falls back to
//! the plain shuffle (and nothing is cleared).
//!
//! Everything is a pure function of (seed, epoch, records), and the records and the epoch's
//! order are saved with the sampler's position, so a resumed run draws the same prompts.

use std::collections::BTreeMap;

use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How recorded group rewards weight a prompt in later epochs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleStrategy {
    Uniform,
    Hard,
    Soft,
    Medium,
}

impl SampleStrategy {
    /// The weight of a prompt whose recorded mean group reward is `p` (`None`: nothing
    /// recorded).
    pub fn weight(self, p: Option<f64>) -> f64 {
        let Some(p) = p else { return 1.0 };
        let extreme = p <= 0.0 || p >= 1.0;
        let p = p.clamp(0.0, 1.0);
        match self {
            SampleStrategy::Uniform => 1.0,
            SampleStrategy::Hard => 1.0 - p,
            SampleStrategy::Soft if extreme => 0.0,
            SampleStrategy::Soft => 1.0 - p,
            SampleStrategy::Medium if extreme => 0.0,
            SampleStrategy::Medium => 1.0,
        }
    }
}

/// The group rewards recorded for one prompt since it was last drawn: Σ r̄ and how many.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    pub sum: f64,
    pub count: u32,
}

impl Recorded {
    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }
}

/// The weighting's whole state: the strategy, what was recorded per prompt index, and (when
/// the current epoch was drawn by weight) that epoch's order, which depends on records since
/// cleared and so cannot be recomputed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightingState {
    pub strategy: SampleStrategy,
    #[serde(default)]
    pub recorded: BTreeMap<usize, Recorded>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_order: Option<Vec<usize>>,
}

impl WeightingState {
    pub fn new(strategy: SampleStrategy) -> Self {
        Self {
            strategy,
            recorded: BTreeMap::new(),
            epoch_order: None,
        }
    }

    /// Records one sampled group of prompt `index` with mean reward `mean`.
    pub fn record(&mut self, index: usize, mean: f64) {
        let r = self
            .recorded
            .entry(index)
            .or_insert(Recorded { sum: 0.0, count: 0 });
        r.sum += mean;
        r.count += 1;
    }

    /// Every prompt's weight for a dataset of `len` prompts.
    pub fn weights(&self, len: usize) -> Vec<f64> {
        (0..len)
            .map(|i| {
                self.strategy
                    .weight(self.recorded.get(&i).map(Recorded::mean))
            })
            .collect()
    }

    /// The order of epoch `epoch` (≥ 1 records): drawn by weight, clearing the records of the
    /// prompts drawn; `None` when nothing is recorded or every weight is 0 (then the caller
    /// shuffles as usual and the records stay).
    pub fn next_epoch_order(&mut self, seed: u64, epoch: u64, len: usize) -> Option<Vec<usize>> {
        if self.recorded.is_empty() {
            self.epoch_order = None;
            return None;
        }
        let order = weighted_epoch_order(seed, epoch, &self.weights(len));
        if let Some(order) = &order {
            for i in order {
                self.recorded.remove(i);
            }
        }
        self.epoch_order = order.clone();
        order
    }
}

/// `weights.len()` indices drawn with replacement, index i with probability w_i / Σ w, from
/// ChaCha8 seeded with `seed` on a stream of `epoch` distinct from the shuffle's
/// ([`super::epoch_order`]); `None` when Σ w = 0. Each draw takes u = (53 random bits)·2⁻⁵³·Σw
/// and returns the first i whose cumulative weight exceeds u.
pub fn weighted_epoch_order(seed: u64, epoch: u64, weights: &[f64]) -> Option<Vec<usize>> {
    const WEIGHTED_STREAMS: u64 = 1 << 63;
    let mut cumulative = Vec::with_capacity(weights.len());
    let mut total = 0.0f64;
    for &w in weights {
        total += w.max(0.0);
        cumulative.push(total);
    }
    if total <= 0.0 {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch | WEIGHTED_STREAMS);
    let last = weights.len() - 1;
    Some(
        (0..weights.len())
            .map(|_| {
                let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) * total;
                cumulative.partition_point(|&c| c <= u).min(last)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_the_reference_strategies() {
        use SampleStrategy::*;
        // (strategy, p, weight), worked by hand from the reference's four functions.
        let cases = [
            (Uniform, Some(0.0), 1.0),
            (Uniform, Some(1.0), 1.0),
            (Hard, Some(0.25), 0.75),
            (Hard, Some(1.0), 0.0),
            (Hard, Some(0.0), 1.0),
            (Soft, Some(0.0), 0.0),
            (Soft, Some(1.0), 0.0),
            (Soft, Some(0.25), 0.75),
            (Medium, Some(0.0), 0.0),
            (Medium, Some(1.0), 0.0),
            (Medium, Some(1.2), 0.0),
            (Medium, Some(0.5), 1.0),
            (Medium, None, 1.0),
            (Hard, None, 1.0),
        ];
        for (s, p, w) in cases {
            assert_eq!(s.weight(p), w, "{s:?} {p:?}");
        }
    }

    #[test]
    fn zero_weight_prompts_are_never_drawn_and_frequencies_follow_the_weights() {
        let weights = [0.0, 1.0, 3.0, 0.0];
        let mut counts = [0usize; 4];
        for epoch in 0..2_000 {
            for i in weighted_epoch_order(5, epoch, &weights).unwrap() {
                counts[i] += 1;
            }
        }
        assert_eq!(counts[0] + counts[3], 0, "{counts:?}");
        // 8,000 draws, expected 2,000 : 6,000.
        assert!((1_850..2_150).contains(&counts[1]), "{counts:?}");
        assert_eq!(counts[1] + counts[2], 8_000);
        assert_eq!(weighted_epoch_order(5, 0, &[0.0, 0.0]), None);
        // Deterministic, and epochs differ.
        assert_eq!(
            weighted_epoch_order(5, 1, &weights),
            weighted_epoch_order(5, 1, &weights)
        );
        assert_ne!(
            weighted_epoch_order(5, 1, &[1.0; 16]),
            weighted_epoch_order(5, 2, &[1.0; 16])
        );
    }

    #[test]
    fn medium_drops_solved_and_unsolved_prompts_and_clears_what_it_drew() {
        let mut w = WeightingState::new(SampleStrategy::Medium);
        // Prompt 0 always right, prompt 1 always wrong, prompt 2 half right twice, 3 unseen.
        w.record(0, 1.0);
        w.record(0, 1.0);
        w.record(1, 0.0);
        w.record(2, 0.5);
        w.record(2, 0.25);
        assert_eq!(w.weights(4), vec![0.0, 0.0, 1.0, 1.0]);
        let order = w.next_epoch_order(9, 1, 4).unwrap();
        assert_eq!(order.len(), 4);
        assert!(order.iter().all(|&i| i == 2 || i == 3), "{order:?}");
        // Drawn prompts start afresh; the others keep their records.
        for i in &order {
            assert!(!w.recorded.contains_key(i));
        }
        assert!(w.recorded.contains_key(&0) && w.recorded.contains_key(&1));
        assert_eq!(w.epoch_order.as_ref(), Some(&order));
    }

    #[test]
    fn all_zero_weights_fall_back_to_the_shuffle_and_keep_the_records() {
        let mut w = WeightingState::new(SampleStrategy::Medium);
        w.record(0, 0.0);
        w.record(1, 1.0);
        assert_eq!(w.next_epoch_order(1, 1, 2), None);
        assert_eq!(w.recorded.len(), 2);
        let mut empty = WeightingState::new(SampleStrategy::Hard);
        assert_eq!(empty.next_epoch_order(1, 1, 2), None);
    }
}
