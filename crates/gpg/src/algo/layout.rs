//! Where each completion's tokens sit in a flat per-token vector.
//!
//! Per-token quantities (log-probs, weights g_t) of a micro-batch are stored as one flat slice
//! holding only completion tokens (prompt and padding already removed), sequence after
//! sequence. Sequence `s` owns positions `offsets[s]..offsets[s + 1]`.

use std::ops::Range;

use anyhow::{ensure, Result};

/// Sequence offsets into a flat per-token vector.
///
/// Invariants: `offsets[0] == 0`, non-decreasing, `offsets.len() == n_sequences + 1`.
/// Empty sequences (no completion token) are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    offsets: Vec<usize>,
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
        Self { offsets }
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
        Ok(Self { offsets })
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
}
