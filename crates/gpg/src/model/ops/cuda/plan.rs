//! Host-side logic of the CUDA backend, with no CUDA in it: what the launches are given.
//! Compiled in every build and unit-tested on CPU.

use anyhow::{bail, ensure, Result};

/// Threads per block of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Threads per block of the row kernels (RMSNorm, the head's fold, embedding rows).
pub const ROW_THREADS: u32 = 256;
/// Warps per block of the attention kernels (one query row, or one key row, per warp).
pub const ATTENTION_WARPS: u32 = 4;
/// Largest head dimension the attention kernels hold per warp (kernels/attention.cu HD_MAX).
pub const HEAD_DIM_MAX: usize = 256;
/// Positions per block of the decoding KV cache.
pub const KV_BLOCK: usize = 16;
/// Threads per block of the sampling kernel (kernels/sampling.cu SAMPLE_THREADS).
pub const SAMPLE_THREADS: u32 = 1024;

/// Blocks of the global gradient norm's first pass (`sum_squares`) per tensor.
pub const GRAD_NORM_BLOCKS: usize = 264;
/// Threads per block of `sum_squares` (its `__launch_bounds__`; any block size is correct).
pub const GRAD_NORM_THREADS: u32 = 1024;
/// Row parts of the RMSNorm backward's dw reduction (about two waves of an H100's 132 SMs).
pub const RMS_NORM_DW_PARTS: usize = 264;

/// One kernel launch's geometry: grid, threads per block (x only) and dynamic shared memory.
/// The GPU path (`ops.rs`) turns it into cudarc's `LaunchConfig`; the CPU emulator of the
/// kernel tests (`emu.rs`) runs the kernel with the very same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub shared_bytes: u32,
}

impl Launch {
    /// One thread per element, [`ELEMENTWISE_THREADS`] per block; None for no elements (nothing
    /// is launched).
    pub fn elementwise(n: usize) -> Result<Option<Launch>> {
        Self::elementwise_with(n, ELEMENTWISE_THREADS)
    }

    /// One thread per element, `threads` per block; None for no elements.
    pub fn elementwise_with(n: usize, threads: u32) -> Result<Option<Launch>> {
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(Launch {
            grid: (blocks_for(n, threads)?, 1, 1),
            block: threads,
            shared_bytes: 0,
        }))
    }

    /// One block of `threads` per row; None for no rows (a block would read row 0).
    pub fn rows(rows: usize, threads: u32) -> Result<Option<Launch>> {
        if rows == 0 {
            return Ok(None);
        }
        ensure!(
            rows <= i32::MAX as usize,
            "cuda: {rows} rows exceed the grid limit"
        );
        Ok(Some(Launch {
            grid: (rows as u32, 1, 1),
            block: threads,
            shared_bytes: 0,
        }))
    }
}

/// RMSNorm forward, the head's fold, embedding rows: one block of [`ROW_THREADS`] per row.
pub fn row_launch(rows: usize) -> Result<Option<Launch>> {
    Launch::rows(rows, ROW_THREADS)
}

/// The RMSNorm backward: (parts, rows per part, the launch: one block per part).
pub fn rms_norm_backward_launch(rows: usize) -> Result<(usize, usize, Option<Launch>)> {
    let (parts, per) = reduction_parts(rows, RMS_NORM_DW_PARTS);
    Ok((
        parts,
        per,
        Launch::rows(if rows == 0 { 0 } else { parts }, ROW_THREADS)?,
    ))
}

/// The varlen attention kernels over `tokens` rows (one warp per query or key row,
/// [`ATTENTION_WARPS`] per block), `y` blocks along the grid's y (heads or kv heads), with
/// `shared_rows` rows of `head_dim` f32 per warp in dynamic shared memory (1: the forward's
/// scaled q; 2: dq's q and dO, dk/dv's k and v); `shared_rows` 0 for `attention_bwd_dot`.
pub fn attention_launch(
    tokens: usize,
    y: usize,
    shared_rows: usize,
    head_dim: usize,
) -> Result<Option<Launch>> {
    if tokens == 0 || y == 0 {
        return Ok(None);
    }
    ensure!(
        y <= 65535,
        "cuda attention: {y} heads exceed the grid's y limit"
    );
    Ok(Some(Launch {
        grid: (blocks_for(tokens, ATTENTION_WARPS)?, y as u32, 1),
        block: ATTENTION_WARPS * 32,
        shared_bytes: (ATTENTION_WARPS as usize * shared_rows * head_dim * 4) as u32,
    }))
}

/// Decoding attention: one block per (row, head); shared memory holds the scaled q row and
/// each warp's (m, l, o[head_dim]) for the merge.
pub fn attention_decode_launch(
    rows: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Option<Launch>> {
    if rows == 0 || heads == 0 {
        return Ok(None);
    }
    ensure!(
        heads <= 65535,
        "cuda attention: {heads} heads exceed the grid's y limit"
    );
    Ok(Some(Launch {
        grid: (rows as u32, heads as u32, 1),
        block: ATTENTION_WARPS * 32,
        shared_bytes: ((head_dim + ATTENTION_WARPS as usize * (2 + head_dim)) * 4) as u32,
    }))
}

/// The gradient norm's first pass over one tensor: [`GRAD_NORM_BLOCKS`] partial sums.
pub fn grad_norm_launch() -> Launch {
    Launch {
        grid: (GRAD_NORM_BLOCKS as u32, 1, 1),
        block: GRAD_NORM_THREADS,
        shared_bytes: 0,
    }
}

/// `sum_f64`: one warp (only thread 0 works: the partials are few).
pub fn sum_f64_launch() -> Launch {
    Launch {
        grid: (1, 1, 1),
        block: 32,
        shared_bytes: 0,
    }
}

/// (parts, rows per part, the two passes' launches) of a bias gradient's column sums.
pub type ColSumPlan = (usize, usize, Option<(Launch, Launch)>);

/// Row parts of a bias gradient's column sums: a few hundred blocks over columns × parts.
pub const COL_SUM_PARTS: usize = 64;

/// A bias gradient over `rows` × `n`: (parts, rows per part, the first pass's launch: column
/// blocks of [`ELEMENTWISE_THREADS`] × parts, the second pass's: one thread per column); None
/// for no rows or columns.
pub fn col_sum_launch(rows: usize, n: usize) -> Result<ColSumPlan> {
    let (parts, per) = reduction_parts(rows, COL_SUM_PARTS);
    if rows == 0 || n == 0 {
        return Ok((parts, per, None));
    }
    let first = Launch {
        grid: (blocks_for(n, ELEMENTWISE_THREADS)?, parts as u32, 1),
        block: ELEMENTWISE_THREADS,
        shared_bytes: 0,
    };
    let second = Launch::elementwise(n)?.unwrap_or(first);
    Ok((parts, per, Some((first, second))))
}

/// Sampling: one block of [`SAMPLE_THREADS`] per row.
pub fn sample_launch(rows: usize) -> Result<Option<Launch>> {
    Launch::rows(rows, SAMPLE_THREADS)
}

/// Blocks of `threads` covering `n` elements (at least 1), refusing grids CUDA cannot launch.
pub fn blocks_for(n: usize, threads: u32) -> Result<u32> {
    let blocks = n.div_ceil(threads as usize).max(1);
    ensure!(
        blocks <= i32::MAX as usize,
        "cuda: {n} elements need {blocks} blocks of {threads}, beyond the grid limit"
    );
    Ok(blocks as u32)
}

/// Checks a head dimension the attention kernels accept: a multiple of 32, at most 256.
pub fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(32) || head_dim > HEAD_DIM_MAX {
        bail!(
            "cuda attention: head_dim {head_dim} is not supported (a multiple of 32, at most \
             {HEAD_DIM_MAX})"
        );
    }
    Ok(())
}

/// Per token of a packed batch with sequence `offsets` [S + 1], the first token of its sequence
/// and one past its last: token t attends to keys start[t]..=t (forward, dq) and is attended by
/// queries t..end[t] (dk, dv).
pub fn sequence_bounds(offsets: &[usize]) -> (Vec<u32>, Vec<u32>) {
    let total = offsets.last().copied().unwrap_or(0);
    let mut start = Vec::with_capacity(total);
    let mut end = Vec::with_capacity(total);
    for w in offsets.windows(2) {
        for _ in w[0]..w[1] {
            start.push(w[0] as u32);
            end.push(w[1] as u32);
        }
    }
    (start, end)
}

/// The tokens of `ids` grouped by id for the embedding's scatter-add: `unique` ids in increasing
/// order, CSR `offsets` [unique + 1] into `tokens`, the token indices of each id in increasing
/// order (a stable counting sort). Block u of the kernel sums the rows tokens[offsets[u]..
/// offsets[u+1]] in that order, so the result does not depend on thread timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdGroups {
    pub unique: Vec<u32>,
    pub offsets: Vec<u32>,
    pub tokens: Vec<u32>,
}

pub fn group_by_id(ids: &[u32], vocab: usize) -> Result<IdGroups> {
    if let Some((t, &bad)) = ids.iter().enumerate().find(|(_, &i)| i as usize >= vocab) {
        bail!("embedding: token {t} has id {bad}, outside the vocabulary of {vocab}");
    }
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_by_key(|&t| ids[t as usize]); // stable: equal ids keep token order
    let mut unique = Vec::new();
    let mut offsets = vec![0u32];
    for (k, &t) in order.iter().enumerate() {
        let id = ids[t as usize];
        if unique.last() != Some(&id) {
            if !unique.is_empty() {
                offsets.push(k as u32);
            }
            unique.push(id);
        }
    }
    if !unique.is_empty() {
        offsets.push(order.len() as u32);
    }
    Ok(IdGroups {
        unique,
        offsets,
        tokens: order,
    })
}

/// Parts of the RMSNorm backward's dw reduction for `rows` rows: (parts, rows per part). Each
/// part sums its rows in order; `sum_parts` then adds the parts in order.
pub fn reduction_parts(rows: usize, target_parts: usize) -> (usize, usize) {
    let per = rows.div_ceil(target_parts.max(1)).max(1);
    (rows.div_ceil(per).max(1), per)
}

/// Vocabulary columns per chunk of the fused head: at most `budget` logits alive at once over
/// `rows` rows, at least 1 column, at most `vocab`.
///
/// Rounded down to a multiple of 8 when at least 8 (and short of the whole vocabulary): the
/// chunk is the leading dimension of the logits cuBLAS writes, and bf16/f32 tensor-core paths
/// want it 16-byte aligned.
pub fn head_chunk_columns(budget: usize, rows: usize, vocab: usize) -> usize {
    let cols = (budget / rows.max(1)).clamp(1, vocab.max(1));
    if cols >= 8 && cols < vocab {
        cols / 8 * 8
    } else {
        cols
    }
}

/// The decoding KV cache's block tables: a pool of `n_blocks` blocks of [`KV_BLOCK`] positions
/// (per layer the same block numbers index that layer's key and value pools); each row owns the
/// blocks for its whole length, taken when it is pushed and returned when it leaves.
#[derive(Debug, Clone)]
pub struct BlockTables {
    free: Vec<u32>,
    /// Per row: its blocks in position order.
    rows: Vec<Vec<u32>>,
    /// Per row: cached positions.
    lens: Vec<u32>,
    /// Per row: the most positions it may hold.
    caps: Vec<u32>,
}

impl BlockTables {
    pub fn new(n_blocks: usize) -> Self {
        BlockTables {
            free: (0..n_blocks as u32).rev().collect(),
            rows: Vec::new(),
            lens: Vec::new(),
            caps: Vec::new(),
        }
    }

    /// Blocks that hold `positions` positions.
    pub fn blocks_for(positions: usize) -> usize {
        positions.div_ceil(KV_BLOCK)
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Adds a row holding `len` positions with room for `max_len`; returns its blocks.
    pub fn push(&mut self, len: usize, max_len: usize) -> Result<&[u32]> {
        ensure!(
            len <= max_len,
            "kv cache: {len} positions exceed max_len {max_len}"
        );
        let need = Self::blocks_for(max_len).max(1);
        ensure!(
            need <= self.free.len(),
            "kv cache: a row of {max_len} positions needs {need} blocks, {} are free",
            self.free.len()
        );
        let at = self.free.len() - need;
        let mut blocks = self.free.split_off(at);
        blocks.reverse();
        self.rows.push(blocks);
        self.lens.push(len as u32);
        self.caps.push(max_len as u32);
        Ok(self.rows.last().map(|b| b.as_slice()).unwrap_or(&[]))
    }

    /// Keeps the rows whose flag is true (in order); the others' blocks return to the pool.
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        ensure!(
            keep.len() == self.rows.len(),
            "kv cache: {} keep flags for {} rows",
            keep.len(),
            self.rows.len()
        );
        let mut rows = Vec::with_capacity(self.rows.len());
        let (mut lens, mut caps) = (Vec::new(), Vec::new());
        for (((blocks, len), cap), &k) in self
            .rows
            .drain(..)
            .zip(self.lens.drain(..))
            .zip(self.caps.drain(..))
            .zip(keep)
        {
            if k {
                rows.push(blocks);
                lens.push(len);
                caps.push(cap);
            } else {
                self.free.extend(blocks.into_iter().rev());
            }
        }
        self.rows = rows;
        self.lens = lens;
        self.caps = caps;
        Ok(())
    }

    /// Cached positions per row.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// Errors if a row has no room for one more position. Called before a step writes its
    /// keys and values (`kv_append` writes at position lens[r], which must lie in the row's
    /// blocks), so a full row is an error, never a write past its blocks.
    pub fn check_room(&self) -> Result<()> {
        for (r, (len, cap)) in self.lens.iter().zip(&self.caps).enumerate() {
            ensure!(*len < *cap, "kv cache: row {r} outgrew its {cap} positions");
        }
        Ok(())
    }

    /// One more position for every row (after a step appended it); errors if a row is full.
    pub fn advance(&mut self) -> Result<()> {
        for (r, (len, cap)) in self.lens.iter_mut().zip(&self.caps).enumerate() {
            ensure!(*len < *cap, "kv cache: row {r} outgrew its {cap} positions");
            *len += 1;
        }
        Ok(())
    }

    /// The slot (block · KV_BLOCK + offset) of position `pos` of row `row`.
    pub fn slot(&self, row: usize, pos: usize) -> usize {
        self.rows[row][pos / KV_BLOCK] as usize * KV_BLOCK + pos % KV_BLOCK
    }

    /// The tables as the kernels read them: [rows, max_blocks] row-major (unused entries 0) and
    /// max_blocks.
    pub fn table(&self) -> (Vec<u32>, usize) {
        let max_blocks = self.rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut t = vec![0u32; self.rows.len() * max_blocks];
        for (r, blocks) in self.rows.iter().enumerate() {
            t[r * max_blocks..r * max_blocks + blocks.len()].copy_from_slice(blocks);
        }
        (t, max_blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_elements() {
        assert_eq!(blocks_for(0, 256).unwrap(), 1);
        assert_eq!(blocks_for(256, 256).unwrap(), 1);
        assert_eq!(blocks_for(257, 256).unwrap(), 2);
        assert!(blocks_for(usize::MAX / 2, 1).is_err());
    }

    #[test]
    fn empty_work_launches_nothing() {
        assert_eq!(Launch::elementwise(0).unwrap(), None);
        assert_eq!(row_launch(0).unwrap(), None);
        assert_eq!(rms_norm_backward_launch(0).unwrap().2, None);
        assert_eq!(attention_launch(0, 4, 1, 64).unwrap(), None);
        assert_eq!(attention_decode_launch(0, 4, 64).unwrap(), None);
        assert_eq!(sample_launch(0).unwrap(), None);
        let l = Launch::elementwise(257).unwrap().unwrap();
        assert_eq!((l.grid, l.block), ((2, 1, 1), ELEMENTWISE_THREADS));
        let a = attention_launch(9, 3, 2, 64).unwrap().unwrap();
        assert_eq!(a.grid, (3, 3, 1));
        assert_eq!(a.shared_bytes, 4 * 2 * 64 * 4);
    }

    #[test]
    fn head_dims() {
        assert!(check_head_dim(64).is_ok() && check_head_dim(128).is_ok());
        assert!(check_head_dim(256).is_ok());
        for bad in [0, 48, 288] {
            assert!(check_head_dim(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sequence_bounds_per_token() {
        let (s, e) = sequence_bounds(&[0, 2, 2, 5]);
        assert_eq!(s, vec![0, 0, 2, 2, 2]);
        assert_eq!(e, vec![2, 2, 5, 5, 5]);
        assert_eq!(sequence_bounds(&[0]), (vec![], vec![]));
    }

    #[test]
    fn id_groups_are_a_stable_counting_sort() {
        let g = group_by_id(&[5, 1, 5, 3, 1, 5], 8).unwrap();
        assert_eq!(g.unique, vec![1, 3, 5]);
        assert_eq!(g.offsets, vec![0, 2, 3, 6]);
        assert_eq!(g.tokens, vec![1, 4, 3, 0, 2, 5]);
        // Every token appears once, grouped under its id.
        for (u, &id) in g.unique.iter().enumerate() {
            for &t in &g.tokens[g.offsets[u] as usize..g.offsets[u + 1] as usize] {
                assert_eq!([5, 1, 5, 3, 1, 5][t as usize], id);
            }
        }
        let empty = group_by_id(&[], 8).unwrap();
        assert!(empty.unique.is_empty() && empty.offsets == vec![0]);
        let err = group_by_id(&[1, 9], 8).unwrap_err().to_string();
        assert!(err.contains("token 1") && err.contains('9'), "{err}");
    }

    #[test]
    fn reduction_parts_cover_every_row() {
        for rows in [1, 7, 128, 1000] {
            for target in [1, 3, 132] {
                let (parts, per) = reduction_parts(rows, target);
                assert!(
                    parts * per >= rows && (parts - 1) * per < rows,
                    "{rows} {target}"
                );
                assert!(parts <= target.max(1));
            }
        }
    }

    #[test]
    fn head_chunks() {
        assert_eq!(head_chunk_columns(1000, 10, 50), 50);
        assert_eq!(head_chunk_columns(1000, 10, 500), 96);
        assert_eq!(head_chunk_columns(5, 10, 500), 1);
        // A multiple of 8 below the vocabulary: 64M logits over 16 × 6144 rows = 682 → 680.
        assert_eq!(head_chunk_columns(64 << 20, 16 * 6144, 151_936), 680);
        assert_eq!(head_chunk_columns(1000, 10, 97), 97);
        let (parts, per, l) = col_sum_launch(1000, 300).unwrap();
        assert!(parts * per >= 1000 && parts <= COL_SUM_PARTS);
        let (first, second) = l.unwrap();
        assert_eq!(first.grid, (2, parts as u32, 1));
        assert_eq!(second.grid, (2, 1, 1));
        assert!(col_sum_launch(0, 300).unwrap().2.is_none());
    }

    #[test]
    fn block_tables_allocate_free_and_address() {
        let mut t = BlockTables::new(10);
        let a = t.push(3, 40).unwrap().to_vec(); // 3 blocks
        assert_eq!(a.len(), 3);
        let b = t.push(0, 16).unwrap().to_vec(); // 1 block
        assert_eq!(b.len(), 1);
        assert_eq!(t.free_blocks(), 6);
        // Distinct blocks.
        let mut all = [a.clone(), b.clone()].concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4);
        assert_eq!(t.slot(0, 17), a[1] as usize * KV_BLOCK + 1);
        let (table, max_blocks) = t.table();
        assert_eq!(max_blocks, 3);
        assert_eq!(&table[..3], a.as_slice());
        assert_eq!(&table[3..], &[b[0], 0, 0]);
        // Too big for the pool.
        assert!(t.push(0, 16 * 7).is_err());
        t.advance().unwrap();
        assert_eq!(t.lens(), &[4, 1]);
        t.retain(&[false, true]).unwrap();
        assert_eq!(t.rows(), 1);
        assert_eq!(t.free_blocks(), 9);
        assert_eq!(t.lens(), &[1]);
        assert!(t.retain(&[true, true]).is_err());
        // A full row cannot advance.
        let mut f = BlockTables::new(1);
        f.push(15, 16).unwrap();
        assert!(f.check_room().is_ok());
        f.advance().unwrap();
        assert!(f.check_room().is_err());
        assert!(f.advance().is_err());
    }
}
