//! The bucket plan of a device gradient all-reduce: the gradient leaves, in one fixed order,
//! cut into contiguous runs ("buckets") of at most [`BUCKET_BYTES`] bytes, each reduced as one
//! NCCL group (one launch per bucket instead of one per leaf). Pure host logic: it depends only
//! on the leaves' sizes and the cap, so every rank — holding the same model — computes the same
//! buckets and issues the same operations in the same order, which is what a collective needs
//! (the NCCL collective checks it across ranks with [`BucketPlan::digest`] at set-up).

use std::ops::Range;

use anyhow::{bail, Result};

/// The default cap of one bucket (PyTorch DDP's default, 25 MiB: 6.5 M f32 gradients).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Contiguous runs of leaf indices covering `0..leaves` once each, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    /// Element count of each leaf, in the plan's order.
    lens: Vec<usize>,
    buckets: Vec<Range<usize>>,
}

impl BucketPlan {
    /// Cuts leaves of `lens` elements of `elem_bytes` bytes each, in the given order, into
    /// buckets of at most `cap_bytes`: a bucket takes leaves while the next one still fits; a
    /// leaf larger than the cap is a bucket of its own (it is never split: NCCL takes 64-bit
    /// counts). Empty leaves join the bucket they fall in (they cost nothing).
    pub fn new(lens: &[usize], elem_bytes: usize, cap_bytes: usize) -> Result<Self> {
        if elem_bytes == 0 || cap_bytes == 0 {
            bail!("internal: a bucket plan with {elem_bytes}-byte elements and a {cap_bytes}-byte cap");
        }
        let mut buckets = Vec::new();
        let mut start = 0;
        let mut bytes = 0usize;
        for (i, &n) in lens.iter().enumerate() {
            let b = n.saturating_mul(elem_bytes);
            if i > start && bytes.saturating_add(b) > cap_bytes {
                buckets.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes = bytes.saturating_add(b);
        }
        if start < lens.len() {
            buckets.push(start..lens.len());
        }
        Ok(BucketPlan {
            lens: lens.to_vec(),
            buckets,
        })
    }

    /// The buckets, in the order they are reduced.
    pub fn buckets(&self) -> &[Range<usize>] {
        &self.buckets
    }

    /// Number of leaves the plan covers.
    pub fn leaves(&self) -> usize {
        self.lens.len()
    }

    /// Elements in bucket `b`.
    pub fn elems(&self, b: usize) -> usize {
        self.lens[self.buckets[b].clone()].iter().sum()
    }

    /// Bytes that identify the plan (leaf sizes and cuts), for the cross-rank check.
    pub fn digest(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * (self.lens.len() + 2 * self.buckets.len() + 1));
        out.extend((self.lens.len() as u64).to_le_bytes());
        for &n in &self.lens {
            out.extend((n as u64).to_le_bytes());
        }
        for b in &self.buckets {
            out.extend((b.start as u64).to_le_bytes());
            out.extend((b.end as u64).to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every leaf is in exactly one bucket, buckets are contiguous and in order.
    fn check_cover(plan: &BucketPlan, n: usize) {
        let mut next = 0;
        for b in plan.buckets() {
            assert_eq!(b.start, next, "{plan:?}");
            assert!(b.end > b.start, "empty bucket in {plan:?}");
            next = b.end;
        }
        assert_eq!(next, n, "{plan:?}");
        assert_eq!(plan.leaves(), n);
    }

    #[test]
    fn every_leaf_is_covered_once_in_order_within_the_cap() {
        let lens = [10, 20, 5, 40, 1, 1, 100, 3, 0, 7];
        for cap_elems in [1, 5, 10, 25, 30, 41, 64, 1000] {
            let plan = BucketPlan::new(&lens, 4, cap_elems * 4).unwrap();
            check_cover(&plan, lens.len());
            for (i, b) in plan.buckets().iter().enumerate() {
                let elems = plan.elems(i);
                assert_eq!(elems, lens[b.clone()].iter().sum::<usize>());
                // Over the cap only as a single leaf larger than the cap.
                assert!(
                    elems <= cap_elems || b.len() == 1,
                    "cap {cap_elems}: bucket {b:?} holds {elems}"
                );
                // Greedy: the next leaf would not have fitted.
                if b.end < lens.len() {
                    assert!(
                        elems + lens[b.end] > cap_elems,
                        "cap {cap_elems}: bucket {b:?} could take leaf {}",
                        b.end
                    );
                }
            }
        }
    }

    #[test]
    fn edge_cases() {
        // No leaves: no buckets.
        let plan = BucketPlan::new(&[], 4, 100).unwrap();
        assert!(plan.buckets().is_empty());
        // Everything fits: one bucket.
        let plan = BucketPlan::new(&[1, 2, 3], 4, 1 << 20).unwrap();
        assert_eq!(plan.buckets(), std::slice::from_ref(&(0..3)));
        // Each leaf over the cap: one bucket each, never split.
        let plan = BucketPlan::new(&[8, 9, 10], 4, 4).unwrap();
        assert_eq!(plan.buckets(), &[0..1, 1..2, 2..3]);
        // Empty leaves ride along.
        let plan = BucketPlan::new(&[0, 0, 4, 0], 4, 16).unwrap();
        assert_eq!(plan.buckets(), std::slice::from_ref(&(0..4)));
        // Exactly at the cap stays together.
        let plan = BucketPlan::new(&[2, 2, 1], 4, 16).unwrap();
        assert_eq!(plan.buckets(), &[0..2, 2..3]);
        assert!(BucketPlan::new(&[1], 0, 4).is_err());
        assert!(BucketPlan::new(&[1], 4, 0).is_err());
    }

    /// The plan is a function of the sizes and the cap only (every rank computes the same);
    /// the digest tells different plans apart.
    #[test]
    fn the_plan_is_deterministic_and_its_digest_discriminates() {
        let lens: Vec<usize> = (0..300).map(|i| (i * 7919) % 500 + 1).collect();
        let a = BucketPlan::new(&lens, 4, 4096).unwrap();
        let b = BucketPlan::new(&lens, 4, 4096).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.digest(), b.digest());
        check_cover(&a, lens.len());
        assert!(a.buckets().len() > 1);
        let c = BucketPlan::new(&lens, 4, 8192).unwrap();
        assert!(c.buckets().len() < a.buckets().len());
        assert!(a.digest() != c.digest());
        let mut other = lens.clone();
        other[17] += 1;
        assert!(a.digest() != BucketPlan::new(&other, 4, 4096).unwrap().digest());
        // A 0.5B-like tree at the default cap: the 136 M-element embedding alone, the layers
        // grouped.
        let mut tree = vec![151_936 * 896];
        for _ in 0..24 {
            tree.extend([
                896,
                896 * 896,
                896,
                128 * 896,
                128,
                128 * 896,
                128,
                896 * 896,
            ]);
            tree.extend([896, 4864 * 896, 4864 * 896, 896 * 4864]);
        }
        tree.push(896);
        let plan = BucketPlan::new(&tree, 4, BUCKET_BYTES).unwrap();
        check_cover(&plan, tree.len());
        assert_eq!(plan.buckets()[0], 0..1);
        assert!(
            plan.buckets().len() < tree.len() / 2,
            "{}",
            plan.buckets().len()
        );
    }
}
