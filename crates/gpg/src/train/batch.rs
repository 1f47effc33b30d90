//! The step's batch as one rank trains on it, and its micro-batches.
//!
//! After the rollout rounds every rank holds the rewards and completion lengths of all the
//! step's groups, and the completions of its own share. [`StepBatch::of`] keeps this rank's
//! sequences (in batch order) and the global counts every rank agrees on; [`micro_batches`]
//! cuts the sequences into runs that fit the token budget of one forward/backward.

use std::ops::Range;

use crate::algo::ResampledBatch;
use crate::rollout::Completion;

/// A group of the step's pool: where it came from, its completions' lengths (known on every
/// rank) and, on the rank that sampled it, the completions themselves.
#[derive(Debug, Clone)]
pub(crate) struct GroupPayload {
    /// Index of the prompt in the training set.
    pub prompt: usize,
    pub lengths: Vec<usize>,
    pub completions: Option<Vec<Completion>>,
}

/// One (prompt, completion) sequence this rank trains on.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    /// Index of the prompt in the training set.
    pub prompt: usize,
    pub completion: Vec<u32>,
    /// The loss mask of a multi-turn completion (false at tool-response tokens); `None`:
    /// every token is trained on.
    pub mask: Option<Vec<bool>>,
}

/// The step's batch as this rank trains on it.
#[derive(Debug, Default)]
pub(crate) struct StepBatch {
    /// This rank's sequences, group by group.
    pub seqs: Vec<Sequence>,
    /// Positions in the batch of this rank's groups.
    pub local_groups: Vec<usize>,
    /// Global counts: sequences, completion tokens (the model's own: tool responses are
    /// not counted), longest completion (likewise).
    pub n_sequences: usize,
    pub n_tokens: usize,
    pub max_length: usize,
}

impl StepBatch {
    /// The batch's sequences that this rank trains on (its own groups, in batch order) and the
    /// global counts every rank agrees on (from the gathered lengths).
    pub fn of(batch: &ResampledBatch<GroupPayload>) -> Self {
        let mut out = StepBatch::default();
        for (k, group) in batch.groups.iter().enumerate() {
            out.n_sequences += group.payload.lengths.len();
            out.n_tokens += group.payload.lengths.iter().sum::<usize>();
            out.max_length = out
                .max_length
                .max(group.payload.lengths.iter().copied().max().unwrap_or(0));
            if let Some(completions) = &group.payload.completions {
                out.local_groups.push(k);
                for c in completions {
                    out.seqs.push(Sequence {
                        prompt: group.payload.prompt,
                        completion: c.token_ids.clone(),
                        mask: c.mask().map(<[bool]>::to_vec),
                    });
                }
            }
        }
        out
    }

    /// This rank's advantages, sequence by sequence: group k's G values of `advantages` (all
    /// the batch's groups) for each local group k.
    pub fn local_advantages(&self, advantages: &[f32], g: usize) -> Vec<f32> {
        self.local_groups
            .iter()
            .flat_map(|&k| advantages[k * g..(k + 1) * g].iter().copied())
            .collect()
    }
}

/// Cuts sequences of `lengths` tokens (prompt + completion) into consecutive micro-batches of at
/// most `budget` tokens each; a sequence longer than the budget makes a micro-batch of its own.
/// Every sequence is in exactly one range, in order; no range is empty.
pub(crate) fn micro_batches(lengths: &[usize], budget: usize) -> Vec<Range<usize>> {
    let mut micro = Vec::new();
    if lengths.is_empty() {
        return micro;
    }
    let mut start = 0;
    let mut tokens = 0;
    for (i, &len) in lengths.iter().enumerate() {
        if i > start && tokens + len > budget {
            micro.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += len;
    }
    micro.push(start..lengths.len());
    micro
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_fill_the_budget_in_order() {
        assert_eq!(micro_batches(&[3, 3, 3, 3], 6), [0..2, 2..4]);
        assert_eq!(micro_batches(&[3, 3, 3, 3], 7), [0..2, 2..4]);
        assert_eq!(micro_batches(&[3, 3, 3, 3], 9), [0..3, 3..4]);
        assert_eq!(micro_batches(&[4, 1, 1, 4], 4), [0..1, 1..3, 3..4]);
        // Longer than the budget: alone.
        assert_eq!(micro_batches(&[2, 10, 2], 5), [0..1, 1..2, 2..3]);
        assert!(micro_batches(&[], 5).is_empty());
    }
}
