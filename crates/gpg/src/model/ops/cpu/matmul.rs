//! Strided matrix views and a thin, bounds-checked wrapper around the `gemm` crate
//! (the same kernels candle's CPU matmul uses, without candle's allocation of the output
//! and with arbitrary row/column strides, so blocks of a `[T, heads, head_dim]` tensor are
//! multiplied in place).

use std::marker::PhantomData;

/// A read-only matrix view: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    _data: PhantomData<&'a [f32]>,
}

// SAFETY: a MatRef is a shared borrow of f32 data.
unsafe impl Send for MatRef<'_> {}
unsafe impl Sync for MatRef<'_> {}

/// Offset one past the last element addressed by a `rows × cols` view with row stride `rs`
/// (column stride 1); 0 for an empty view.
fn extent(rows: usize, cols: usize, rs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + cols
    }
}

impl<'a> MatRef<'a> {
    /// `rows × cols` view of `data[..]` with row stride `row_stride` and unit column stride.
    /// Panics if the view exceeds `data`.
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            extent(rows, cols, row_stride) <= data.len(),
            "MatRef {rows}x{cols} (stride {row_stride}) exceeds a slice of {}",
            data.len()
        );
        MatRef {
            ptr: data.as_ptr(),
            rows,
            cols,
            rs: row_stride as isize,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// Dense row-major `rows × cols` view of `data`.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// The transposed view (no copy).
    pub(crate) fn t(self) -> Self {
        MatRef {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            _data: PhantomData,
        }
    }

    /// Number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Pointer to element (0, 0) and the (row, column) strides in elements.
    pub(crate) fn raw(&self) -> (*const f32, isize, isize) {
        (self.ptr, self.rs, self.cs)
    }
}

/// A writable matrix view: element (i, j) is at `ptr + i·rs + j·cs`.
pub(crate) struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    _data: PhantomData<&'a mut [f32]>,
}

impl<'a> MatMut<'a> {
    /// `rows × cols` view of `data[..]` with row stride `row_stride` and unit column stride.
    /// Panics if the view exceeds `data`.
    pub(crate) fn strided(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Self {
        assert!(
            extent(rows, cols, row_stride) <= data.len(),
            "MatMut {rows}x{cols} (stride {row_stride}) exceeds a slice of {}",
            data.len()
        );
        MatMut {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs: row_stride as isize,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// Dense row-major `rows × cols` view of `data`.
    pub(crate) fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// View of `rows × cols` elements at `ptr` with row stride `row_stride`, unit column stride.
    ///
    /// # Safety
    /// Every addressed element must lie in one live allocation of f32, and no other code may
    /// read or write those elements while the view is alive (views of interleaved but disjoint
    /// rows of one buffer, held by different threads, are fine).
    pub(crate) unsafe fn from_raw(
        ptr: *mut f32,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Self {
        MatMut {
            ptr,
            rows,
            cols,
            rs: row_stride as isize,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// Number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The transposed view (no copy): writing (i, j) of it writes (j, i) of `self`.
    #[cfg_attr(not(test), allow(dead_code))] // used by tests until the model needs it
    pub(crate) fn t(self) -> Self {
        MatMut {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            _data: PhantomData,
        }
    }

    /// Pointer to element (0, 0) and the (row, column) strides in elements.
    pub(crate) fn raw(&mut self) -> (*mut f32, isize, isize) {
        (self.ptr, self.rs, self.cs)
    }
}

/// A read-only view of a bf16 matrix (`half::bf16`, e.g. a weight as Hugging Face stores
/// it): element (i, j) is at `ptr + i·rs + j·cs`. The bf16 counterpart of [`MatRef`].
#[derive(Clone, Copy)]
pub(crate) struct MatRefBf16<'a> {
    ptr: *const half::bf16,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
    _data: PhantomData<&'a [half::bf16]>,
}

// SAFETY: a MatRefBf16 is a shared borrow of bf16 data.
unsafe impl Send for MatRefBf16<'_> {}
unsafe impl Sync for MatRefBf16<'_> {}

impl<'a> MatRefBf16<'a> {
    /// `rows × cols` view of `data[..]` with row stride `row_stride` and unit column stride.
    /// Panics if the view exceeds `data`.
    pub(crate) fn strided(
        data: &'a [half::bf16],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Self {
        assert!(
            extent(rows, cols, row_stride) <= data.len(),
            "MatRefBf16 {rows}x{cols} (stride {row_stride}) exceeds a slice of {}",
            data.len()
        );
        MatRefBf16 {
            ptr: data.as_ptr(),
            rows,
            cols,
            rs: row_stride as isize,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// Dense row-major `rows × cols` view of `data`.
    pub(crate) fn row_major(data: &'a [half::bf16], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// The transposed view (no copy).
    pub(crate) fn t(self) -> Self {
        MatRefBf16 {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            _data: PhantomData,
        }
    }

    /// Number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Pointer to element (0, 0) and the (row, column) strides in elements.
    pub(crate) fn raw(&self) -> (*const half::bf16, isize, isize) {
        (self.ptr, self.rs, self.cs)
    }
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Threads {
    /// Run on the calling thread (inside an already parallel loop).
    One,
    /// Use every thread of the rayon pool.
    All,
}

/// dst ← α·(a·b)            (when `accumulate` is false)
/// dst ← dst + α·(a·b)      (when `accumulate` is true)
///
/// Panics if the shapes do not agree (a: m×k, b: k×n, dst: m×n).
pub(crate) fn gemm(
    dst: MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && dst.rows == m && dst.cols == n,
        "gemm shapes: dst {}x{}, a {}x{}, b {}x{}",
        dst.rows,
        dst.cols,
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside the view, which the constructors bound-checked.
                    unsafe { *dst.ptr.offset(i as isize * dst.rs + j as isize * dst.cs) = 0.0 };
                }
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(0),
    };
    // SAFETY: the views were bound-checked when built (or promised by `from_raw`'s caller), the
    // shapes agree, and `dst` is exclusively borrowed for the call (gemm's `alpha` multiplies
    // dst and is only used when read_dst is true; its `beta` multiplies the product).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.cs,
            dst.rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_with_transpose_stride_and_accumulate() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.3).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.7).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0; m * n];
        gemm(
            MatMut::row_major(&mut c, m, n),
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&b, k, n),
            false,
            1.0,
            Threads::One,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // bᵀ stored as n×k, used through .t(); dst with row stride 4 and accumulate + alpha.
        let mut bt = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = b[p * n + j];
            }
        }
        let mut c2 = vec![1.0; m * 4];
        gemm(
            MatMut::strided(&mut c2, m, n, 4),
            MatRef::row_major(&a, m, k),
            MatRef::row_major(&bt, n, k).t(),
            true,
            2.0,
            Threads::All,
        );
        for i in 0..m {
            for j in 0..n {
                assert!((c2[i * 4 + j] - (1.0 + 2.0 * want[i * n + j])).abs() < 1e-5);
            }
            assert_eq!(c2[i * 4 + 3], 1.0);
        }
    }
}
