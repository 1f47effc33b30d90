//! The packed variable-length batch descriptor.

use anyhow::{bail, Result};
use std::ops::Range;

/// Packed variable-length batch: sequences laid end to end, no padding.
///
/// Invariant (checked by [`VarLen::validate`]): `offsets` has `n_seqs + 1` entries,
/// `offsets[0] = 0`, `offsets` is non-decreasing, and sequence `s` occupies token rows
/// `offsets[s]..offsets[s+1]`. Empty sequences are allowed (they occupy no rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarLen {
    pub offsets: Vec<usize>,
}

impl VarLen {
    /// Builds the offsets of sequences with the given lengths: `offsets = [0, l0, l0+l1, …]`.
    pub fn from_lens(lens: &[usize]) -> VarLen {
        let mut offsets = Vec::with_capacity(lens.len() + 1);
        let mut total = 0usize;
        offsets.push(0);
        for &len in lens {
            total += len;
            offsets.push(total);
        }
        VarLen { offsets }
    }

    /// Number of sequences (`offsets.len() - 1`, or 0 for an empty offsets vector).
    pub fn n_seqs(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Total number of tokens (`offsets[n_seqs]`, or 0 for an empty offsets vector).
    pub fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Token rows of sequence `s`.
    pub fn range(&self, s: usize) -> Range<usize> {
        self.offsets[s]..self.offsets[s + 1]
    }

    /// Length of sequence `s`.
    pub fn len_of(&self, s: usize) -> usize {
        self.offsets[s + 1] - self.offsets[s]
    }

    /// Length of the longest sequence (0 when there is none).
    pub fn max_len(&self) -> usize {
        (0..self.n_seqs())
            .map(|s| self.len_of(s))
            .max()
            .unwrap_or(0)
    }

    /// Checks the invariant and that the batch covers exactly `tokens` rows.
    pub fn validate(&self, tokens: usize, op: &str) -> Result<()> {
        if self.offsets.first() != Some(&0) {
            bail!(
                "{op}: VarLen.offsets must start with 0 (got {:?})",
                self.offsets.first()
            );
        }
        if let Some(w) = self.offsets.windows(2).position(|w| w[1] < w[0]) {
            bail!(
                "{op}: VarLen.offsets must be non-decreasing (offsets[{}]={} > offsets[{}]={})",
                w,
                self.offsets[w],
                w + 1,
                self.offsets[w + 1]
            );
        }
        if self.total() != tokens {
            bail!(
                "{op}: VarLen covers {} tokens but the tensors have {tokens} rows",
                self.total()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_lens_builds_prefix_sums() {
        let v = VarLen::from_lens(&[3, 0, 1, 5]);
        assert_eq!(v.offsets, vec![0, 3, 3, 4, 9]);
        assert_eq!(v.n_seqs(), 4);
        assert_eq!(v.total(), 9);
        assert_eq!(v.range(2), 3..4);
        assert_eq!(v.max_len(), 5);
        assert!(v.validate(9, "t").is_ok());
        assert!(v.validate(8, "t").is_err());
        assert!(VarLen {
            offsets: vec![1, 2]
        }
        .validate(2, "t")
        .is_err());
        assert!(VarLen {
            offsets: vec![0, 3, 2]
        }
        .validate(2, "t")
        .is_err());
        assert!(VarLen { offsets: vec![] }.validate(0, "t").is_err());
    }
}
