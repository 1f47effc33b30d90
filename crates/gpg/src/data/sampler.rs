//! Deterministic epoch-shuffled sampling of prompt indices, resumable exactly.
//!
//! Epoch e visits the indices 0..n in the order `epoch_order(seed, e, n)`, a permutation
//! that depends only on (seed, e, n). The sampler's whole position is (seed, epoch, cursor):
//! the next index is `epoch_order(seed, epoch, n)[cursor]`. Saving that triple and restoring
//! it continues the exact same stream of batches.
//!
//! With a [`SampleStrategy`] (difficulty-weighted sampling, see [`super::difficulty`]) every
//! epoch after the first is drawn by weight from the group rewards recorded with
//! [`EpochSampler::record_group`]; the records and the drawn order travel in the state.

use anyhow::Context;
use rand::RngCore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::difficulty::{SampleStrategy, WeightingState};

/// The sampler's position, as saved in a training checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerState {
    pub seed: u64,
    /// Epochs completed so far.
    pub epoch: u64,
    /// Indices of the current epoch already handed out (0 ≤ cursor < dataset_len).
    pub cursor: usize,
    /// Size of the dataset the state belongs to (checked on restore).
    pub dataset_len: usize,
    /// Difficulty weighting (absent: every epoch is a plain shuffle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighting: Option<WeightingState>,
}

/// Hands out batches of dataset indices, reshuffling at each epoch.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    state: SamplerState,
    order: Vec<usize>,
    /// With a weighting, an epoch's order is drawn when its first index is asked for, so the
    /// groups of the previous epoch's last batch are recorded by then.
    order_pending: bool,
}

/// A uniform integer in 0..n (n > 0), without modulo bias: draws below the threshold
/// 2^64 mod n are rejected so the accepted range is a multiple of n.
pub(crate) fn uniform_below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let threshold = n.wrapping_neg() % n;
    loop {
        let x = rng.next_u64();
        if x >= threshold {
            return x % n;
        }
    }
}

/// The visiting order of epoch `epoch`: a Fisher–Yates shuffle of 0..len driven by
/// ChaCha8 seeded with `seed` on stream `epoch`. Implemented here (not `rand`'s shuffle) so
/// the order stays the same across `rand` versions.
pub fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

impl EpochSampler {
    /// A sampler at the start of epoch 0.
    pub fn new(dataset_len: usize, seed: u64) -> anyhow::Result<Self> {
        Self::weighted(dataset_len, seed, None)
    }

    /// A sampler at the start of epoch 0 that draws later epochs by `strategy` (`None`: the
    /// plain shuffle, as [`Self::new`]).
    pub fn weighted(
        dataset_len: usize,
        seed: u64,
        strategy: Option<SampleStrategy>,
    ) -> anyhow::Result<Self> {
        Self::from_state(SamplerState {
            seed,
            epoch: 0,
            cursor: 0,
            dataset_len,
            weighting: strategy.map(WeightingState::new),
        })
    }

    /// A sampler at a saved position.
    pub fn from_state(state: SamplerState) -> anyhow::Result<Self> {
        anyhow::ensure!(state.dataset_len > 0, "cannot sample from an empty dataset");
        anyhow::ensure!(
            state.cursor < state.dataset_len,
            "sampler state: cursor {} is not below the dataset size {}",
            state.cursor,
            state.dataset_len
        );
        let drawn = state.weighting.as_ref().and_then(|w| w.epoch_order.clone());
        let order = match drawn {
            Some(order) => {
                anyhow::ensure!(
                    order.len() == state.dataset_len
                        && order.iter().all(|&i| i < state.dataset_len),
                    "sampler state: the weighted epoch order does not fit a dataset of {} prompts",
                    state.dataset_len
                );
                order
            }
            None => epoch_order(state.seed, state.epoch, state.dataset_len),
        };
        let order_pending = state.cursor == 0
            && state
                .weighting
                .as_ref()
                .is_some_and(|w| w.epoch_order.is_none());
        Ok(Self {
            order,
            state,
            order_pending,
        })
    }

    /// Restores a saved position for a dataset of `dataset_len` records drawn by `strategy`;
    /// errors if the dataset's size or the strategy changed since the state was saved.
    pub fn resume(
        state: SamplerState,
        dataset_len: usize,
        strategy: Option<SampleStrategy>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            state.dataset_len == dataset_len,
            "sampler state was saved for {} prompts but the dataset now has {dataset_len}; \
             resuming would not continue the same order",
            state.dataset_len
        );
        let saved = state.weighting.as_ref().map(|w| w.strategy);
        anyhow::ensure!(
            saved == strategy,
            "the checkpoint's prompts were drawn with data.sample_strategy = {} but the recipe \
             says {}; resuming would not continue the same order (set it back, or start a new \
             run)",
            strategy_name(saved),
            strategy_name(strategy)
        );
        Self::from_state(state).context("restoring the sampler")
    }

    /// The current position (save this to resume).
    pub fn state(&self) -> SamplerState {
        self.state.clone()
    }

    /// Records a sampled group of prompt `index` whose rewards average `mean` (for the
    /// difficulty weighting; nothing happens without one).
    pub fn record_group(&mut self, index: usize, mean: f64) {
        if let Some(w) = &mut self.state.weighting {
            w.record(index, mean);
        }
    }

    /// Epochs completed so far.
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// The next index; moves to the next epoch (and its new order) after the last one.
    pub fn next_index(&mut self) -> usize {
        let (seed, len) = (self.state.seed, self.state.dataset_len);
        if self.order_pending {
            self.order_pending = false;
            let epoch = self.state.epoch;
            self.order = self
                .state
                .weighting
                .as_mut()
                .and_then(|w| w.next_epoch_order(seed, epoch, len))
                .unwrap_or_else(|| epoch_order(seed, epoch, len));
        }
        let index = self.order[self.state.cursor];
        self.state.cursor += 1;
        if self.state.cursor == len {
            self.state.epoch += 1;
            self.state.cursor = 0;
            match &mut self.state.weighting {
                Some(w) => {
                    w.epoch_order = None;
                    self.order_pending = true;
                }
                None => self.order = epoch_order(seed, self.state.epoch, len),
            }
        }
        index
    }

    /// The next `batch_size` indices. A batch that reaches the end of an epoch continues
    /// with the start of the next one, so every batch is full.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        (0..batch_size).map(|_| self.next_index()).collect()
    }
}

fn strategy_name(s: Option<SampleStrategy>) -> String {
    match s {
        Some(s) => serde_json::to_string(&s).unwrap_or_default(),
        None => "(none: the plain shuffle)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        let a = epoch_order(7, 0, 50);
        let b = epoch_order(7, 1, 50);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(7, 0, 50));
        assert_ne!(a, epoch_order(8, 0, 50));
        assert_eq!(epoch_order(1, 3, 1), vec![0]);
        assert!(epoch_order(1, 3, 0).is_empty());
    }

    #[test]
    fn order_is_pinned_for_reproducibility() {
        // Guards against silent changes of the shuffle (which would break resumed runs).
        let pinned = epoch_order(0, 0, 10);
        let again: Vec<usize> = {
            let mut s = EpochSampler::new(10, 0).unwrap();
            s.next_batch(10)
        };
        assert_eq!(pinned, again);
        assert_eq!(pinned, PINNED_SEED0_EPOCH0_LEN10.to_vec());
    }

    const PINNED_SEED0_EPOCH0_LEN10: [usize; 10] = [7, 8, 9, 0, 1, 5, 4, 6, 3, 2];

    #[test]
    fn batches_cross_epochs_and_cover_each_epoch_once() {
        let mut s = EpochSampler::new(5, 3).unwrap();
        let batches: Vec<Vec<usize>> = (0..5).map(|_| s.next_batch(3)).collect();
        let flat: Vec<usize> = batches.concat();
        assert_eq!(&flat[0..5], epoch_order(3, 0, 5).as_slice());
        assert_eq!(&flat[5..10], epoch_order(3, 1, 5).as_slice());
        assert_eq!(&flat[10..15], epoch_order(3, 2, 5).as_slice());
        assert_eq!(
            s.state(),
            SamplerState {
                seed: 3,
                epoch: 3,
                cursor: 0,
                dataset_len: 5,
                weighting: None,
            }
        );
        // A batch larger than the dataset still comes out full.
        assert_eq!(s.next_batch(12).len(), 12);
    }

    #[test]
    fn save_and_restore_continue_exactly() {
        let mut straight = EpochSampler::new(13, 42).unwrap();
        let mut first = EpochSampler::new(13, 42).unwrap();
        let mut expected = Vec::new();
        for _ in 0..9 {
            expected.push(straight.next_batch(4));
        }
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(first.next_batch(4));
        }
        let saved = serde_json::to_string(&first.state()).unwrap();
        let state: SamplerState = serde_json::from_str(&saved).unwrap();
        let mut resumed = EpochSampler::resume(state, 13, None).unwrap();
        for _ in 4..9 {
            got.push(resumed.next_batch(4));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn bad_states_are_rejected() {
        assert!(EpochSampler::new(0, 1).is_err());
        let s = SamplerState {
            seed: 1,
            epoch: 0,
            cursor: 5,
            dataset_len: 5,
            weighting: None,
        };
        assert!(EpochSampler::from_state(s).is_err());
        let s = SamplerState {
            seed: 1,
            epoch: 0,
            cursor: 1,
            dataset_len: 5,
            weighting: None,
        };
        let err = EpochSampler::resume(s.clone(), 6, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains('5') && err.contains('6'), "{err}");
        let err = EpochSampler::resume(s, 5, Some(SampleStrategy::Medium))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("medium") && err.contains("sample_strategy"),
            "{err}"
        );
    }

    #[test]
    fn weighted_epochs_follow_the_records_and_resume_exactly() {
        let n = 6;
        let run = |stop_at: Option<usize>| {
            let mut s = EpochSampler::weighted(n, 11, Some(SampleStrategy::Medium)).unwrap();
            let mut drawn = Vec::new();
            for b in 0..10 {
                if stop_at == Some(b) {
                    let saved = serde_json::to_string(&s.state()).unwrap();
                    let state: SamplerState = serde_json::from_str(&saved).unwrap();
                    s = EpochSampler::resume(state, n, Some(SampleStrategy::Medium)).unwrap();
                }
                let batch = s.next_batch(3);
                // Prompts 0 and 1 are always solved, 2 never, the rest half the time.
                for &i in &batch {
                    s.record_group(i, [1.0, 1.0, 0.0, 0.5, 0.5, 0.5][i]);
                }
                drawn.push(batch);
            }
            drawn
        };
        let straight = run(None);
        let flat = straight.concat();
        // Epoch 0 is the plain shuffle.
        assert_eq!(&flat[..n], epoch_order(11, 0, n).as_slice());
        // Epoch 1 draws only the prompts with weight 1 (3, 4, 5).
        assert!(flat[n..2 * n].iter().all(|&i| i >= 3), "{flat:?}");
        // Saving mid-epoch (records and the drawn order included) continues exactly.
        for stop in [2, 3, 5, 7] {
            assert_eq!(run(Some(stop)), straight, "stopped before batch {stop}");
        }
    }

    #[test]
    fn uniform_below_is_in_range_and_roughly_uniform() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[uniform_below(&mut rng, 3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }
}
