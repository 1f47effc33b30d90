//! Where each completion's tokens sit in a flat per-token vector.
//!
//! Per-token quantities (log-probs, weights g_t) of a micro-batch are stored as one flat slice
//! holding only completion tokens (prompt and padding already removed), sequence after
//! sequence. Sequence `s` owns positions `offsets[s]..offsets[s + 1]`.
//!
//! A layout may carry a **loss mask** (one flag per position): a multi-turn completion holds
//! tool-response tokens that are in the context but are not the policy's actions. Masked
//! positions get g_t = 0 and are left out of every count the objectives divide by
//! ([`TokenLayout::n_scored`], [`TokenLayout::scored_len`]); without a mask every position
//! is scored.

use std::ops::Range;

use anyhow::{ensure, Result};

/// Sequence offsets into a flat per-token vector.
///
/// Invariants: `offsets[0] == 0`, non-decreasing, `offsets.len() == n_sequences + 1`.
/// Empty sequences (no completion token) are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    offsets: Vec<usize>,
    /// `mask[t]`: whether position t is trained on (None: every position).
    mask: Option<Vec<bool>>,
}

impl TokenLayout {
    /// The layout of sequences with the given completion lengths, in order.
    pub fn from_lengths(lengths: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        let mut end = 0;
        for &len in lengths {
            end += len;
            offsets.push(end);
        }
        Self {
            offsets,
            mask: None,
        }
    }

    /// A layout from explicit offsets; errors unless they start at 0 and never decrease.
    pub fn from_offsets(offsets: Vec<usize>) -> Result<Self> {
        ensure!(
            offsets.first() == Some(&0),
            "token layout offsets must start at 0, got {:?}",
            offsets.first()
        );
        if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
            anyhow::bail!(
                "token layout offsets decrease at sequence {i}: {} then {}",
                offsets[i],
                offsets[i + 1]
            );
        }
        Ok(Self {
            offsets,
            mask: None,
        })
    }

    /// The same layout with a loss mask (`mask[t]` false: position t is context only, e.g. a
    /// tool's response). An all-true mask is dropped (the layout without a mask).
    pub fn with_mask(mut self, mask: Vec<bool>) -> Result<Self> {
        ensure!(
            mask.len() == self.n_tokens(),
            "loss mask of {} flags for a layout of {} completion tokens",
            mask.len(),
            self.n_tokens()
        );
        self.mask = if mask.iter().all(|&m| m) {
            None
        } else {
            Some(mask)
        };
        Ok(self)
    }

    /// Whether position `t` is trained on (not masked).
    pub fn is_scored(&self, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[t])
    }

    /// The loss mask, if some position is masked.
    pub fn mask(&self) -> Option<&[bool]> {
        self.mask.as_deref()
    }

    /// Number of positions trained on (all of them without a mask): the N_tok of the
    /// normaliser and of the token means.
    pub fn n_scored(&self) -> usize {
        match &self.mask {
            None => self.n_tokens(),
            Some(m) => m.iter().filter(|&&b| b).count(),
        }
    }

    /// Number of positions of sequence `s` trained on: its |o_i| in per-sequence means.
    pub fn scored_len(&self, s: usize) -> usize {
        match &self.mask {
            None => self.sequence_len(s),
            Some(m) => m[self.range(s)].iter().filter(|&&b| b).count(),
        }
    }

    /// Number of sequences (completions).
    pub fn n_sequences(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Total number of completion tokens.
    pub fn n_tokens(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    /// Positions of sequence `s` in the flat vector.
    pub fn range(&self, s: usize) -> Range<usize> {
        self.offsets[s]..self.offsets[s + 1]
    }

    /// Number of completion tokens of sequence `s`.
    pub fn sequence_len(&self, s: usize) -> usize {
        self.offsets[s + 1] - self.offsets[s]
    }

    /// The offsets (`n_sequences + 1` entries).
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The sequence ranges in order.
    pub fn ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.offsets.windows(2).map(|w| w[0]..w[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_offsets_agree() {
        let l = TokenLayout::from_lengths(&[2, 0, 3]);
        assert_eq!(l.offsets(), &[0, 2, 2, 5]);
        assert_eq!(l.n_sequences(), 3);
        assert_eq!(l.n_tokens(), 5);
        assert_eq!(l.range(2), 2..5);
        assert_eq!(l.sequence_len(1), 0);
        assert_eq!(TokenLayout::from_offsets(vec![0, 2, 2, 5]).unwrap(), l);
        assert!(TokenLayout::from_offsets(vec![1, 2]).is_err());
        assert!(TokenLayout::from_offsets(vec![0, 3, 2]).is_err());
        assert!(TokenLayout::from_offsets(vec![]).is_err());
        assert_eq!(TokenLayout::from_lengths(&[]).n_tokens(), 0);
    }

    #[test]
    fn mask_counts_only_scored_positions() {
        let l = TokenLayout::from_lengths(&[3, 2])
            .with_mask(vec![true, false, true, false, false])
            .unwrap();
        assert_eq!(l.n_tokens(), 5);
        assert_eq!(l.n_scored(), 2);
        assert_eq!(l.scored_len(0), 2);
        assert_eq!(l.scored_len(1), 0);
        assert!(!l.is_scored(1) && l.is_scored(2));
        // An all-true mask is no mask; a mask of the wrong length is an error.
        let plain = TokenLayout::from_lengths(&[1])
            .with_mask(vec![true])
            .unwrap();
        assert_eq!(plain, TokenLayout::from_lengths(&[1]));
        assert!(TokenLayout::from_lengths(&[2])
            .with_mask(vec![true])
            .is_err());
    }
}
