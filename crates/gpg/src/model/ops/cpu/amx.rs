//! bf16 matrix product on Intel AMX tiles (Sapphire Rapids and later): bf16 operands, f32
//! accumulation, f32 output, the same contract as [`super::gemm_bf16::gemm_mixed`]:
//!
//! dst ← α·(a·b)            (`accumulate` false)
//! dst ← dst + α·(a·b)      (`accumulate` true)
//!
//! # The instructions
//! AMX has eight tile registers of up to 16 rows × 64 bytes. `tdpbf16ps C, A, B` adds to the
//! 16×16 f32 tile C the product of A, 16 rows × 16 bf16 pairs (each row: 32 consecutive values
//! of k), and B, 16 pair-rows × 16 columns (each 32-bit word: the pair (b[2p, j], b[2p+1, j]),
//! the "VNNI" layout of [`super::gemm_bf16`]'s B panels): 8,192 multiply-adds per instruction,
//! products of bf16 pairs exact, sums in f32 (input and output denormals flushed, round to
//! nearest even). `ldtilecfg` sets the tile shapes (all eight here: 16 rows × 64 bytes),
//! `tileloadd`/`tilestored` move a tile from/to memory with a row stride, `tilerelease` returns
//! the thread's tile state to its initial (empty) state. Stable Rust has no AMX intrinsics, so
//! these are written with `asm!`. Linux enables the 8 KiB tile-data state per process on
//! request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which [`available`] makes
//! once, after checking CPUID; without it the first tile instruction would raise SIGILL.
//!
//! # Algorithm
//! k is padded with zeros to kpp pairs, a multiple of 16 (one tile's depth).
//! - A is packed whole, once per call, into strips of 32 rows: word `((s·nch + c)·32 + r)·16 + q`
//!   = (a[32s+r, 32c+2q], a[32s+r, 32c+2q+1]), nch = kpp/16, zero past the edges; a 16-row half
//!   of a strip's chunk is one A tile (row stride 64 bytes), and a strip's k block is contiguous.
//! - B is packed whole, once per call (in parallel over panels), into panels of 32 columns
//!   over all of k: word `(j·kpp + p)·32 + c` = (b[2p, 32j+c], b[2p+1, 32j+c]); a 16-column
//!   half of 16 pair rows is one B tile (row stride 128 bytes).
//!
//! The output is cut into column blocks of [`NCA`] and, where there are too few of them to
//! keep the threads busy, row groups; one rayon task per (row group, column block) computes
//! its outputs, each 32×32 block over all of k in four C tiles (per 16 pairs two A tiles and
//! two B tiles loaded and four `tdpbf16ps`), so every output element is summed by one task in
//! a fixed order: the result does not depend on scheduling or the thread count, and dst is
//! read (when adding) and written once. A task walks its rows in blocks of [`A_BLOCK`] bytes of
//! packed A (kept in L2) and runs each of its B panels against every strip of the block. A
//! whole block of a row-major dst with α = 1 is loaded into the C tiles from dst (when adding)
//! and stored back there; any other block is stored to an aligned scratch block, scaled by α
//! and added to dst (or written). Every packing buffer is 64-byte aligned, so each tile row is
//! one cache line (unaligned rows made the products 3× slower).
//!
//! A product whose packed A would exceed [`A_CAP`] bytes is cut into several along m (B packed
//! once for all of them) or along k (summed in order), one whose packed B would exceed it
//! along n, so the packing buffers stay small whatever the shape (the head's dz·W has k = the
//! vocabulary).

use rayon::prelude::*;
use std::cell::Cell;
use std::sync::OnceLock;

use super::gemm_bf16::Operand;
use super::matmul::{MatMut, Threads};

/// Rows of an A strip (two A tiles).
const MRA: usize = 32;
/// Columns of a B panel (two B tiles).
const NRA: usize = 32;
/// Pairs of k per tile (its depth).
const KT: usize = 16;
/// Output columns per task.
const NCA: usize = NRA * 16;
/// Bytes of packed A strips per inner row block of a task (kept in L2 while the block's B
/// panels pass over it).
const A_BLOCK: usize = 768 << 10;
/// Most bytes of packed A, and of packed B, per product (larger products are cut, see the
/// module docs).
pub(crate) const A_CAP: usize = 16 << 20;

/// Whether this process can run AMX-BF16: the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7,
/// EDX bits 24 and 22) and AVX-512 (for packing), and Linux granted the tile-data state. The
/// check (and the permission request) runs once per process.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect_and_enable)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect_and_enable() -> bool {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512bf16")) {
        return false;
    }
    // cpuid leaf 7 exists on every CPU with AVX-512.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    /// arch_prctl codes (arch/x86/include/uapi/asm/prctl.h) and the tile-data feature bit.
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes only reads its integer arguments or writes the u64
    // whose address it is given.
    unsafe {
        if libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) != 0
        {
            return false;
        }
        let mut mask: u64 = 0;
        if libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut mask as *mut u64,
        ) != 0
        {
            return false;
        }
        mask & (1 << XFEATURE_XTILEDATA) != 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect_and_enable() -> bool {
    false
}

/// A strided operand: element (i, j) at `ptr + i·rs + j·cs`, f32 (rounded to bf16 when
/// packed) or bf16 bits.
#[derive(Clone, Copy)]
struct View {
    data: Data,
    rs: isize,
    cs: isize,
}

#[derive(Clone, Copy)]
enum Data {
    F32(*const f32),
    Bf16(*const u16),
}

// SAFETY: a shared view of the operand's data, only read.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    fn of(op: Operand<'_>) -> View {
        match op {
            Operand::F32(m) => {
                let (p, rs, cs) = m.raw();
                View {
                    data: Data::F32(p),
                    rs,
                    cs,
                }
            }
            Operand::Bf16(m) => {
                let (p, rs, cs) = m.raw();
                View {
                    data: Data::Bf16(p.cast()),
                    rs,
                    cs,
                }
            }
        }
    }

    /// The view starting at element (i, j).
    ///
    /// # Safety
    /// (i, j) must be inside the viewed matrix (or one past it with nothing read after).
    unsafe fn at(self, i: usize, j: usize) -> View {
        let off = i as isize * self.rs + j as isize * self.cs;
        // SAFETY: caller's contract.
        let data = unsafe {
            match self.data {
                Data::F32(p) => Data::F32(p.offset(off)),
                Data::Bf16(p) => Data::Bf16(p.offset(off)),
            }
        };
        View { data, ..self }
    }

    /// bf16 bits of element (i, j).
    ///
    /// # Safety
    /// (i, j) must be inside the viewed matrix.
    #[inline(always)]
    unsafe fn bits(self, i: usize, j: usize) -> u16 {
        let off = i as isize * self.rs + j as isize * self.cs;
        // SAFETY: caller's contract.
        unsafe {
            match self.data {
                Data::F32(p) => super::bf16::round_bits(*p.offset(off)),
                Data::Bf16(p) => *p.offset(off),
            }
        }
    }
}

/// Where the output lives; shared by the tasks, which write disjoint elements.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    rs: isize,
    cs: isize,
}
// SAFETY: tasks write disjoint sets of elements (their own output block).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// 64 bytes, cache-line aligned: the unit of the packing buffers, so that every tile row is
/// one aligned cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; 16]);

/// The first `n` words of `buf`, grown (never shrunk) to hold them.
fn words(buf: &mut Vec<Line>, n: usize) -> &mut [u32] {
    let lines = n.div_ceil(16);
    if buf.len() < lines {
        buf.resize(lines, Line([0; 16]));
    }
    // SAFETY: a Line is 16 u32 with no padding; the slice covers n ≤ 16·len words.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u32>(), n) }
}

/// A 32×32 f32 block, cache-line aligned (the four C tiles are stored here).
#[repr(C, align(64))]
struct Block([[f32; NRA]; MRA]);

thread_local! {
    /// Packed A, reused between calls on the calling thread (≤ A_CAP bytes).
    static PACK_A: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    /// Packed B (every panel, all of k), reused between calls on the calling thread (≤ A_CAP
    /// bytes).
    static PACK_B: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// dst ← (dst if `accumulate`) + α·(a·b) on AMX tiles (see the module docs).
///
/// Panics if the shapes do not agree (a: m×k, b: k×n, dst: m×n) or if [`available`] is false.
pub(crate) fn gemm_amx(
    dst: MatMut<'_>,
    a: Operand<'_>,
    b: Operand<'_>,
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    gemm_amx_capped(dst, a, b, accumulate, alpha, threads, A_CAP)
}

/// [`gemm_amx`] with packed A limited to `cap` bytes (tests use small caps to cut products).
fn gemm_amx_capped(
    mut dst: MatMut<'_>,
    a: Operand<'_>,
    b: Operand<'_>,
    accumulate: bool,
    alpha: f32,
    threads: Threads,
    cap: usize,
) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert!(
        b.rows() == k && dst.rows() == m && dst.cols() == n,
        "gemm_amx shapes: dst {}x{}, a {}x{}, b {}x{}",
        dst.rows(),
        dst.cols(),
        a.rows(),
        a.cols(),
        b.rows(),
        b.cols()
    );
    assert!(available(), "gemm_amx: this CPU/OS cannot run AMX-BF16");
    let (ptr, rs, cs) = dst.raw();
    let d = Dst { ptr, rs, cs };
    // SAFETY: the views were bound-checked at construction and the shapes agree.
    unsafe {
        product(
            d,
            View::of(a),
            View::of(b),
            (m, k, n),
            accumulate,
            alpha,
            threads,
            cap,
        )
    }
}

/// The product on raw views: cut along k or m when packed A would exceed `cap` bytes, along n
/// when packed B would; then B packed once (every panel, all of k) and shared by the tasks of
/// every row piece.
///
/// # Safety
/// `a` (m×k), `b` (k×n) and `d` (m×n) must address live matrices; no one else accesses d.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    d: Dst,
    a: View,
    b: View,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
    alpha: f32,
    threads: Threads,
    cap: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside dst (caller's contract).
                    unsafe { *d.ptr.offset(i as isize * d.rs + j as isize * d.cs) = 0.0 };
                }
            }
        }
        return;
    }
    let kpp = k.div_ceil(2 * KT) * KT;
    let a_bytes = m.div_ceil(MRA) * MRA * kpp * 4;
    let pairs_fit = cap / (m.div_ceil(MRA) * MRA * 4);
    if a_bytes > cap && k >= m && pairs_fit >= KT {
        // Cut k (the head's dz·W: k = vocabulary): pieces of whole tiles, summed in order.
        let kpiece = pairs_fit / KT * KT * 2;
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + kpiece).min(k);
            // SAFETY: column k0 of a and row k0 of b are inside (k0 < k).
            unsafe {
                let (ap, bp) = (a.at(0, k0), b.at(k0, 0));
                let acc = accumulate || k0 > 0;
                product(d, ap, bp, (m, k1 - k0, n), acc, alpha, threads, cap);
            }
            k0 = k1;
        }
        return;
    }
    let panels = n.div_ceil(NRA);
    let ppl = kpp * NRA; // words per packed B panel
    if panels * ppl * 4 > cap && panels > 1 {
        // Cut n: independent columns of dst, each piece's B within the cap.
        let cols = (cap / (ppl * 4)).max(1) * NRA;
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + cols).min(n);
            let dj = Dst {
                // SAFETY: column j0 < n of dst.
                ptr: unsafe { d.ptr.offset(j0 as isize * d.cs) },
                ..d
            };
            // SAFETY: column j0 of b is inside.
            unsafe {
                let bj = b.at(0, j0);
                product(dj, a, bj, (m, k, j1 - j0), accumulate, alpha, threads, cap)
            };
            j0 = j1;
        }
        return;
    }

    let mut bbuf = PACK_B.with(Cell::take);
    {
        let bpack = words(&mut bbuf, panels * ppl);
        let one = |(j, panel): (usize, &mut [u32])| {
            // SAFETY: b is k×n (caller's contract); the panel holds kpp·32 words.
            unsafe { pack_b_panel(b, k, n, 0, kpp, j * NRA, panel) }
        };
        match threads {
            Threads::All if panels > 1 => bpack.par_chunks_mut(ppl).enumerate().for_each(one),
            _ => bpack.chunks_mut(ppl).enumerate().for_each(one),
        }
    }
    let bpack = &*words(&mut bbuf, panels * ppl);
    // Rows per piece: packed A within the cap.
    let rows = if a_bytes > cap {
        (cap / (kpp * 4) / MRA * MRA).max(MRA)
    } else {
        m
    };
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + rows).min(m);
        // SAFETY: row i0 < m of a and of dst; the piece is (i1 - i0)×k times the packed B.
        unsafe {
            let di = Dst {
                ptr: d.ptr.offset(i0 as isize * d.rs),
                ..d
            };
            let ai = a.at(i0, 0);
            rows_piece(di, ai, bpack, (i1 - i0, k, n), accumulate, alpha, threads);
        }
        i0 = i1;
    }
    PACK_B.with(|c| c.set(bbuf));
}

/// Rows of the product against the packed B (`bpack`: every 32-column panel over all kpp
/// pairs): packs A (one strip per task, in parallel), then one rayon task per (row group,
/// column block).
///
/// # Safety
/// `a` (m×k) and `d` (m×n) must address live matrices; `bpack` holds n.div_ceil(32) panels
/// of kpp·32 words; no one else accesses d.
unsafe fn rows_piece(
    d: Dst,
    a: View,
    bpack: &[u32],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    let kpp = k.div_ceil(2 * KT) * KT;
    let nch = kpp / KT;
    let strips = m.div_ceil(MRA);
    let spl = nch * MRA * KT; // words per packed A strip
    let alen = strips * spl;
    let mut abuf = PACK_A.with(Cell::take);
    {
        let apack = words(&mut abuf, alen);
        let one = |(s, strip): (usize, &mut [u32])| {
            // SAFETY: a is m×k (caller's contract); the strip holds nch·32·16 words.
            unsafe { pack_a_strip(a, m, k, s, nch, strip) }
        };
        match threads {
            Threads::All if strips > 1 => apack.par_chunks_mut(spl).enumerate().for_each(one),
            _ => apack.chunks_mut(spl).enumerate().for_each(one),
        }
    }
    let apack = &*words(&mut abuf, alen);

    // Tasks: column blocks × row groups (row groups only where column blocks are too few).
    let nb = n.div_ceil(NCA);
    let nthreads = match threads {
        Threads::All => rayon::current_num_threads(),
        Threads::One => 1,
    };
    let groups = if nthreads > 1 {
        (2 * nthreads).div_ceil(nb).clamp(1, strips)
    } else {
        1
    };
    let per_group = strips.div_ceil(groups);
    let groups = strips.div_ceil(per_group);
    let task = |t: usize| {
        let (g, bj) = (t / nb, t % nb);
        let s0 = g * per_group;
        let s1 = (s0 + per_group).min(strips);
        // SAFETY: the task writes rows 32·s0.. 32·s1 and columns bj·NCA.. of dst only (inside
        // the m×n view); apack holds every strip, bpack every panel.
        unsafe { task_block(apack, bpack, nch, m, n, s0, s1, bj, d, accumulate, alpha) };
    };
    match threads {
        Threads::All if groups * nb > 1 => (0..groups * nb).into_par_iter().for_each(task),
        _ => (0..groups * nb).for_each(task),
    }
    PACK_A.with(|c| c.set(abuf));
}

/// One task: strips s0..s1 of A times column block bj of B, over all of k: for each row
/// block of strips (A_BLOCK bytes, kept in L2), each 32-column panel of the block is run
/// against every strip (the panel stays in L1/L2); each 32×32 output block is summed over all
/// of k in its four C tiles, so dst is read (when adding) and written once.
///
/// # Safety
/// As described at the call site: the task's rows/columns of `d` belong to it alone.
#[allow(clippy::too_many_arguments)]
unsafe fn task_block(
    apack: &[u32],
    bpack: &[u32],
    nch: usize,
    m: usize,
    n: usize,
    s0: usize,
    s1: usize,
    bj: usize,
    d: Dst,
    accumulate: bool,
    alpha: f32,
) {
    let spl = nch * MRA * KT;
    let ppl = nch * KT * NRA;
    let p0 = bj * NCA / NRA;
    let p1 = (p0 + NCA / NRA).min(n.div_ceil(NRA));
    let per_block = (A_BLOCK / (spl * 4)).max(1);
    let cfg = TileConfig::all_16x64();
    // SAFETY: the process has the tile-data permission (gemm_amx checked `available`).
    unsafe { tiles::configure(&cfg) };
    let mut sb = s0;
    while sb < s1 {
        let se = (sb + per_block).min(s1);
        for pj in p0..p1 {
            let bp = &bpack[pj * ppl..(pj + 1) * ppl];
            let cj = pj * NRA;
            let nj = NRA.min(n - cj);
            for s in sb..se {
                let ap = &apack[s * spl..(s + 1) * spl];
                let (i0, mi) = (s * MRA, MRA.min(m - s * MRA));
                if alpha == 1.0 && d.cs == 1 && d.rs > 0 && mi == MRA && nj == NRA {
                    // A whole block, unscaled, in a row-major dst: the C tiles are loaded
                    // from (when adding) and stored to dst itself.
                    // SAFETY: rows i0..i0+32, columns cj..cj+32 are this task's, inside dst;
                    // ap holds nch chunks of 32×16 words, bp nch·16×32 words; tiles are
                    // configured on this thread.
                    unsafe {
                        let c = d.ptr.offset(i0 as isize * d.rs + cj as isize);
                        let stride = d.rs as usize * 4;
                        tiles::block_32x32(
                            tiles::ATiles::packed(ap),
                            bp,
                            nch,
                            accumulate.then_some(c),
                            c,
                            stride,
                        );
                    }
                } else {
                    let mut blk = std::mem::MaybeUninit::<Block>::uninit();
                    let c = blk.as_mut_ptr().cast::<f32>();
                    // SAFETY: as above, the four tiles fill the 32×32 floats of blk; then
                    // rows i0..i0+mi, columns cj..cj+nj are this task's, inside dst.
                    unsafe {
                        tiles::block_32x32(tiles::ATiles::packed(ap), bp, nch, None, c, NRA * 4);
                        store(
                            &blk.assume_init_ref().0,
                            d,
                            i0,
                            mi,
                            cj,
                            nj,
                            accumulate,
                            alpha,
                        );
                    }
                }
            }
        }
        sb = se;
    }
    // SAFETY: tiles were configured on this thread.
    unsafe { tiles::release() };
}

/// dst[i0+r, j0+c] ← (dst if `add`) + α·t[r][c] for r < mi, c < nj.
///
/// # Safety
/// The elements must be inside dst and owned by the caller.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn store(
    t: &[[f32; NRA]; MRA],
    d: Dst,
    i0: usize,
    mi: usize,
    j0: usize,
    nj: usize,
    add: bool,
    alpha: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if d.cs == 1 {
        // SAFETY: AVX-512 is part of `available`; caller's contract.
        unsafe { x86::store_rows(t, d.ptr, d.rs, i0, mi, j0, nj, add, alpha) };
        return;
    }
    for (r, row) in t.iter().enumerate().take(mi) {
        for (c, &v) in row.iter().enumerate().take(nj) {
            let off = (i0 + r) as isize * d.rs + (j0 + c) as isize * d.cs;
            // SAFETY: caller's contract.
            unsafe {
                let p = d.ptr.offset(off);
                *p = if add { *p + alpha * v } else { alpha * v };
            }
        }
    }
}

/// Packs strip `s` of A (rows 32s..32s+32) into `out` (nch·32·16 words, layout in the module
/// docs), zeros past the edges.
///
/// # Safety
/// `a` must address an m×k matrix.
unsafe fn pack_a_strip(a: View, m: usize, k: usize, s: usize, nch: usize, out: &mut [u32]) {
    let r0 = s * MRA;
    let rows = MRA.min(m - r0);
    let k2 = k / 2;
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512 (BF16) is part of `available`; the reads stay inside a.
        if unsafe { x86::pack_a_strip_fast(a, r0, rows, k, nch, out) } {
            return;
        }
    }
    for c in 0..nch {
        for r in 0..MRA {
            let row = &mut out[(c * MRA + r) * KT..(c * MRA + r + 1) * KT];
            for (q, w) in row.iter_mut().enumerate() {
                let p = c * KT + q;
                *w = if r >= rows || 2 * p >= k {
                    0
                } else if p < k2 {
                    // SAFETY: row r0 + r < m, columns 2p + 1 < k.
                    unsafe {
                        a.bits(r0 + r, 2 * p) as u32 | (a.bits(r0 + r, 2 * p + 1) as u32) << 16
                    }
                } else {
                    // SAFETY: the last (odd) column, 2p = k - 1.
                    unsafe { a.bits(r0 + r, 2 * p) as u32 }
                };
            }
        }
    }
}

/// Packs pairs p0..p0+kc of B's columns j0..j0+32 into `out` (kc·32 words: word p·32 + c),
/// zeros past the edges.
///
/// # Safety
/// `b` must address a k×n matrix.
unsafe fn pack_b_panel(
    b: View,
    k: usize,
    n: usize,
    p0: usize,
    kc: usize,
    j0: usize,
    out: &mut [u32],
) {
    let cols = NRA.min(n - j0);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX-512 (BF16) is part of `available`; the reads stay inside b.
        if unsafe { x86::pack_b_panel_fast(b, k, p0, kc, j0, cols, out) } {
            return;
        }
    }
    let k2 = k / 2;
    for p in 0..kc {
        let pp = p0 + p;
        for (c, w) in out[p * NRA..(p + 1) * NRA].iter_mut().enumerate() {
            *w = if c >= cols || 2 * pp >= k {
                0
            } else if pp < k2 {
                // SAFETY: rows 2pp + 1 < k, column j0 + c < n.
                unsafe { b.bits(2 * pp, j0 + c) as u32 | (b.bits(2 * pp + 1, j0 + c) as u32) << 16 }
            } else {
                // SAFETY: the last (odd) row.
                unsafe { b.bits(2 * pp, j0 + c) as u32 }
            };
        }
    }
}

/// Rows of x per pass of [`rows_wt`] (the columns of its two B tiles).
const ROWS_PASS: usize = 32;

thread_local! {
    /// [`rows_wt`]'s packed xᵀ (inp/2 × 32 words).
    static PACK_X: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    /// [`rows_wt`]'s zero-padded copy of the last, partial strip of W rows.
    static W_TAIL: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
}

/// y[rows, out] (+)= x[rows, inp]·Wᵀ (+ b) for a few rows (decoding), W [out, inp] bf16 read
/// as stored: computed as yᵀ = W·xᵀ, W's rows loaded straight into A tiles (32 k values, 64
/// bytes, per tile row; row stride inp·2 bytes), xᵀ rounded to bf16 and packed like a B panel
/// (32 rows of x per pass), so W is read once per pass and never packed. The last strip of
/// fewer than 32 W rows is copied into a zero-padded buffer. Every element of y is summed in
/// one fixed order (k ascending, 32 at a time), whatever the threads.
///
/// Returns false, touching nothing, where `inp` is not a multiple of 32 (the caller uses
/// another kernel). Panics if the slices are too short or AMX is not [`available`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows_wt(
    x: &[f32],
    w: &[half::bf16],
    bias: Option<&[f32]>,
    rows: usize,
    inp: usize,
    out: usize,
    y: &mut [f32],
    accumulate: bool,
) -> bool {
    if inp == 0 || !inp.is_multiple_of(2 * KT) {
        return false;
    }
    assert!(available(), "rows_wt: this CPU/OS cannot run AMX-BF16");
    assert!(
        x.len() >= rows * inp && w.len() >= out * inp && y.len() >= rows * out,
        "rows_wt: slices shorter than x [{rows}, {inp}], w [{out}, {inp}], y [{rows}, {out}]"
    );
    if let Some(b) = bias {
        assert!(
            b.len() >= out,
            "rows_wt: bias has {} of {out} values",
            b.len()
        );
    }
    if rows == 0 || out == 0 {
        return true;
    }
    let pairs = inp / 2;
    let strips = out.div_ceil(MRA);
    let mut xline = PACK_X.with(Cell::take);
    let mut tline = W_TAIL.with(Cell::take);
    let tail_rows = out - (strips - 1) * MRA;
    let tail: &[u32] = if tail_rows < MRA {
        let t = words(&mut tline, MRA * inp / 2);
        t.fill(0);
        // SAFETY: u32 words hold two bf16 each; the copy is inside both.
        let src = &w[(strips - 1) * MRA * inp..out * inp];
        for (i, v) in src.chunks_exact(2).enumerate() {
            t[i] = v[0].to_bits() as u32 | (v[1].to_bits() as u32) << 16;
        }
        t
    } else {
        &[]
    };
    let d = Dst {
        ptr: y.as_mut_ptr(),
        rs: out as isize,
        cs: 1,
    };
    // xᵀ as a k×rows operand: element (kk, t) = x[t, kk].
    let xt = View {
        data: Data::F32(x.as_ptr()),
        rs: 1,
        cs: inp as isize,
    };
    let wp = w.as_ptr() as usize;
    let mut t0 = 0;
    while t0 < rows {
        let cnt = ROWS_PASS.min(rows - t0);
        let xp = words(&mut xline, pairs * NRA);
        // SAFETY: xt is inp × rows over x (checked above).
        unsafe { pack_b_panel(xt, inp, rows, 0, pairs, t0, xp) };
        let xp = &*xp;
        let task = |s: usize| {
            // The whole Dst (Sync), not its raw pointer field.
            let d: Dst = d;
            let o0 = s * MRA;
            let (a, stride) = if s + 1 == strips && tail_rows < MRA {
                (tail.as_ptr().cast::<u16>(), inp * 2)
            } else {
                // SAFETY: rows o0..o0+32 of w are inside (checked above).
                ((wp as *const u16).wrapping_add(o0 * inp), inp * 2)
            };
            let mut blk = std::mem::MaybeUninit::<Block>::uninit();
            let c = blk.as_mut_ptr().cast::<f32>();
            let cfg = TileConfig::all_16x64();
            // SAFETY: AMX available; `a` addresses 32 rows of inp bf16, stride inp·2 bytes;
            // xp holds pairs·32 words; c is a 32×32 block.
            let ct = unsafe {
                tiles::configure(&cfg);
                tiles::block_32x32(
                    tiles::ATiles::strided(a, stride),
                    xp,
                    inp / (2 * KT),
                    None,
                    c,
                    NRA * 4,
                );
                tiles::release();
                &blk.assume_init_ref().0
            };
            let ov = MRA.min(out - o0);
            for t in 0..cnt {
                for (o, ct_o) in ct.iter().enumerate().take(ov) {
                    let bv = bias.map_or(0.0, |b| b[o0 + o]);
                    let off = (t0 + t) as isize * d.rs + (o0 + o) as isize;
                    // SAFETY: y[t0+t, o0+o] is inside y and only this task writes column o0+o.
                    unsafe {
                        let p = d.ptr.offset(off);
                        *p = if accumulate { *p } else { 0.0 } + ct_o[t] + bv;
                    }
                }
            }
        };
        if strips > 1 {
            (0..strips).into_par_iter().for_each(task);
        } else {
            task(0);
        }
        t0 += cnt;
    }
    PACK_X.with(|c| c.set(xline));
    W_TAIL.with(|c| c.set(tline));
    true
}

/// The 64-byte tile configuration `ldtilecfg` reads.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles 0–7 all 16 rows × 64 bytes (C: 16×16 f32; A: 16 rows × 32 bf16; B: 16 pair
    /// rows × 16 columns).
    fn all_16x64() -> Self {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            c.colsb[t] = 64;
            c.rows[t] = 16;
        }
        c
    }
}

/// The tile instructions (`asm!`: stable Rust has no AMX intrinsics).
mod tiles {
    use super::{TileConfig, KT, MRA, NRA};

    /// Loads the tile configuration on this thread.
    ///
    /// # Safety
    /// The process must have the tile-data permission ([`super::available`]).
    #[inline]
    pub(super) unsafe fn configure(cfg: &TileConfig) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: caller's contract; cfg is a valid 64-byte configuration.
        unsafe {
            std::arch::asm!("ldtilecfg [{}]", in(reg) cfg as *const TileConfig,
                options(nostack, readonly, preserves_flags));
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = cfg;
    }

    /// Returns this thread's tiles to the initial state.
    ///
    /// # Safety
    /// As [`configure`].
    #[inline]
    pub(super) unsafe fn release() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: caller's contract.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    }

    /// Where a 32-row block's A tiles are read: row r of chunk s (32 values of k, 64 bytes)
    /// at `ptr + s·step + r·rs` bytes.
    #[derive(Clone, Copy)]
    pub(super) struct ATiles {
        ptr: *const u8,
        rs: usize,
        step: usize,
    }

    impl ATiles {
        /// A packed strip (chunks of 32 rows × 16 pair words, rows 64 bytes apart).
        pub(super) fn packed(a: &[u32]) -> Self {
            ATiles {
                ptr: a.as_ptr().cast(),
                rs: KT * 4,
                step: MRA * KT * 4,
            }
        }

        /// 32 rows of bf16 as stored at `a`, `rs` bytes apart.
        pub(super) fn strided(a: *const u16, rs: usize) -> Self {
            ATiles {
                ptr: a.cast(),
                rs,
                step: 2 * KT * 2,
            }
        }
    }

    /// C ← (C₀ or 0) + A·B for `steps` chunks of 32 k values: A's 32 rows from `a`, B a
    /// 32-column panel `b` (`steps`·16 pair rows × 32 words), C a 32×32 f32 block at `c` with
    /// rows `stride` bytes apart, C₀ read from `c0` (same stride) when given. Tiles 0–3 hold
    /// the four 16×16 quarters of C, 4–5 the two A halves, 6–7 the two B halves.
    ///
    /// # Safety
    /// Tiles configured by [`configure`] on this thread; `a` addresses `steps` chunks of 32
    /// rows; `b` holds `steps·512` words; `c` (and `c0`) address 32 rows of 32 floats,
    /// `stride` bytes apart, that the caller owns.
    #[inline]
    pub(super) unsafe fn block_32x32(
        a: ATiles,
        b: &[u32],
        steps: usize,
        c0: Option<*mut f32>,
        c: *mut f32,
        stride: usize,
    ) {
        debug_assert!(b.len() >= steps * KT * NRA);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: caller's contract: every load reads 16 rows of 64 bytes inside a, b or C₀,
        // the stores write the 32×32 floats of C.
        unsafe {
            use std::arch::asm;
            match c0 {
                Some(c0) => asm!(
                    "tileloadd tmm0, [{c00} + {s}*1]",
                    "tileloadd tmm1, [{c01} + {s}*1]",
                    "tileloadd tmm2, [{c10} + {s}*1]",
                    "tileloadd tmm3, [{c11} + {s}*1]",
                    c00 = in(reg) c0,
                    c01 = in(reg) c0.add(16),
                    c10 = in(reg) c0.byte_add(16 * stride),
                    c11 = in(reg) c0.byte_add(16 * stride).add(16),
                    s = in(reg) stride,
                    options(nostack, readonly, preserves_flags)
                ),
                None => asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem, preserves_flags)
                ),
            }
            let bp = b.as_ptr();
            for s in 0..steps {
                let a0 = a.ptr.add(s * a.step);
                let b0 = bp.add(s * KT * NRA);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a0.add(16 * a.rs),
                    b0 = in(reg) b0,
                    b1 = in(reg) b0.add(16),
                    sa = in(reg) a.rs,
                    sb = in(reg) NRA * 4,
                    options(nostack, readonly, preserves_flags)
                );
            }
            asm!(
                "tilestored [{c00} + {s}*1], tmm0",
                "tilestored [{c01} + {s}*1], tmm1",
                "tilestored [{c10} + {s}*1], tmm2",
                "tilestored [{c11} + {s}*1], tmm3",
                c00 = in(reg) c,
                c01 = in(reg) c.add(16),
                c10 = in(reg) c.byte_add(16 * stride),
                c11 = in(reg) c.byte_add(16 * stride).add(16),
                s = in(reg) stride,
                options(nostack, preserves_flags)
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (a, b, steps, c0, c, stride);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Data, View, KT, MRA, NRA};
    use std::arch::x86_64::*;

    /// Bit mask of the first `n` of 16 lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            !0
        } else {
            (1u16 << n) - 1
        }
    }

    /// Rows of a 32×32 block into dst (unit column stride), masked at the right edge.
    ///
    /// # Safety
    /// AVX-512F; rows i0..i0+mi, columns j0..j0+nj of dst (row stride rs) owned by the caller.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_rows(
        t: &[[f32; NRA]; MRA],
        ptr: *mut f32,
        rs: isize,
        i0: usize,
        mi: usize,
        j0: usize,
        nj: usize,
        add: bool,
        alpha: f32,
    ) {
        let va = _mm512_set1_ps(alpha);
        let masks = [lanes(nj), lanes(nj.saturating_sub(16))];
        for (r, t_r) in t.iter().enumerate().take(mi) {
            let off = (i0 + r) as isize * rs + j0 as isize;
            for (h, &mk) in masks.iter().enumerate() {
                if mk == 0 {
                    continue;
                }
                // SAFETY: masked lanes are inside the caller's rows and columns.
                unsafe {
                    let v = _mm512_loadu_ps(t_r.as_ptr().add(16 * h));
                    let p = ptr.offset(off + 16 * h as isize);
                    let v = if add {
                        _mm512_fmadd_ps(va, v, _mm512_maskz_loadu_ps(mk, p))
                    } else {
                        _mm512_mul_ps(va, v)
                    };
                    _mm512_mask_storeu_ps(p, mk, v);
                }
            }
        }
    }

    /// 16 lanes of f32 at `p` (stride 1) rounded to bf16 (nearest even), zero-extended to
    /// 32-bit lanes.
    #[inline(always)]
    unsafe fn bf16_lanes_f32(p: *const f32) -> __m512i {
        // SAFETY: caller reads 16 floats at p.
        unsafe {
            let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(p));
            _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(h))
        }
    }

    /// 16 bf16 at `p` zero-extended to 32-bit lanes.
    #[inline(always)]
    unsafe fn bf16_lanes_u16(p: *const u16) -> __m512i {
        // SAFETY: caller reads 16 u16 at p.
        unsafe { _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())) }
    }

    /// Pair words of 16 consecutive elements (unit stride) of two rows: lane l =
    /// (lo[l], hi[l]).
    #[inline(always)]
    unsafe fn pair_lanes(data: Data, lo: isize, hi: isize) -> __m512i {
        // SAFETY: caller reads 16 elements at each offset.
        unsafe {
            let (l, h) = match data {
                Data::F32(p) => (bf16_lanes_f32(p.offset(lo)), bf16_lanes_f32(p.offset(hi))),
                Data::Bf16(p) => (bf16_lanes_u16(p.offset(lo)), bf16_lanes_u16(p.offset(hi))),
            };
            _mm512_or_si512(l, _mm512_slli_epi32::<16>(h))
        }
    }

    /// 16×16 transpose of 32-bit words: v[i] lane j ↔ v[j] lane i.
    #[inline(always)]
    unsafe fn transpose16(v: &mut [__m512i; 16]) {
        // Stage 1: 32-bit interleave of pairs of rows.
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        // Stage 2: 64-bit interleave.
        for i in 0..4 {
            v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Now v[4i + q] holds, in each 128-bit lane L, words (row 4i..4i+4, column 4L + q).
        // Stage 3: 128-bit lanes across groups of 4 rows.
        for q in 0..4 {
            let (a, b, c, d) = (v[q], v[4 + q], v[8 + q], v[12 + q]);
            // lanes: a = [a0 a1 a2 a3] …; want out column blocks.
            let ab_lo = _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b); // a0 a2 b0 b2
            let ab_hi = _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b); // a1 a3 b1 b3
            let cd_lo = _mm512_shuffle_i32x4::<0b10_00_10_00>(c, d); // c0 c2 d0 d2
            let cd_hi = _mm512_shuffle_i32x4::<0b11_01_11_01>(c, d); // c1 c3 d1 d3
            t[q] = _mm512_shuffle_i32x4::<0b10_00_10_00>(ab_lo, cd_lo); // a0 b0 c0 d0
            t[8 + q] = _mm512_shuffle_i32x4::<0b11_01_11_01>(ab_lo, cd_lo); // a2 b2 c2 d2
            t[4 + q] = _mm512_shuffle_i32x4::<0b10_00_10_00>(ab_hi, cd_hi); // a1 b1 c1 d1
            t[12 + q] = _mm512_shuffle_i32x4::<0b11_01_11_01>(ab_hi, cd_hi); // a3 b3 c3 d3
        }
        *v = t;
    }

    /// The vectorised A packing: rows contiguous along k (cs = 1) or along m (rs = 1). Returns
    /// false (nothing written) for other layouts.
    ///
    /// # Safety
    /// AVX-512F/BW/VL/BF16; `a` addresses rows r0..r0+rows and columns 0..k.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_a_strip_fast(
        a: View,
        r0: usize,
        rows: usize,
        k: usize,
        nch: usize,
        out: &mut [u32],
    ) -> bool {
        let k2 = k / 2;
        // Pair word of element (r, 2p) of the strip, for the scalar edges.
        let word = |r: usize, p: usize| -> u32 {
            if r >= rows || 2 * p >= k {
                0
            } else if p < k2 {
                // SAFETY: inside a.
                unsafe { a.bits(r0 + r, 2 * p) as u32 | (a.bits(r0 + r, 2 * p + 1) as u32) << 16 }
            } else {
                // SAFETY: inside a.
                unsafe { a.bits(r0 + r, 2 * p) as u32 }
            }
        };
        if a.cs == 1 {
            // Each row is contiguous along k: a chunk row is 32 consecutive values.
            let full = k2 / KT; // chunks with all 32 values inside
            for r in 0..MRA {
                for c in 0..nch {
                    let o = (c * MRA + r) * KT;
                    if r < rows && c < full {
                        let off = (r0 + r) as isize * a.rs + (c * 2 * KT) as isize;
                        // SAFETY: 32 elements of row r0 + r from column 32c, inside a; 16
                        // words of out at o.
                        unsafe {
                            let v = match a.data {
                                Data::F32(p) => {
                                    let p = p.offset(off);
                                    let h = _mm512_cvtne2ps_pbh(
                                        _mm512_loadu_ps(p.add(16)),
                                        _mm512_loadu_ps(p),
                                    );
                                    std::mem::transmute::<__m512bh, __m512i>(h)
                                }
                                Data::Bf16(p) => _mm512_loadu_si512(p.offset(off).cast()),
                            };
                            _mm512_storeu_si512(out.as_mut_ptr().add(o).cast(), v);
                        }
                    } else {
                        for q in 0..KT {
                            out[o + q] = word(r, c * KT + q);
                        }
                    }
                }
            }
            true
        } else if a.rs == 1 {
            // Contiguous along m: pair words of 16 rows at a time, then transposed to rows.
            for c in 0..nch {
                for h in 0..2 {
                    let rb = h * 16;
                    let o = (c * MRA + rb) * KT;
                    if rb + 16 <= rows && (c + 1) * KT <= k2 {
                        let mut v = [_mm512_setzero_si512(); 16];
                        for (q, vq) in v.iter_mut().enumerate() {
                            let p = c * KT + q;
                            let base = (r0 + rb) as isize;
                            // SAFETY: rows r0+rb..+16 of columns 2p, 2p+1 < k, inside a.
                            *vq = unsafe {
                                pair_lanes(
                                    a.data,
                                    base + (2 * p) as isize * a.cs,
                                    base + (2 * p + 1) as isize * a.cs,
                                )
                            };
                        }
                        // SAFETY: plain register shuffles.
                        unsafe { transpose16(&mut v) };
                        for (r, vr) in v.iter().enumerate() {
                            // SAFETY: 16 words at o + 16r, inside out.
                            unsafe {
                                _mm512_storeu_si512(out.as_mut_ptr().add(o + r * KT).cast(), *vr)
                            };
                        }
                    } else {
                        for r in rb..rb + 16 {
                            for q in 0..KT {
                                out[(c * MRA + r) * KT + q] = word(r, c * KT + q);
                            }
                        }
                    }
                }
            }
            true
        } else {
            false
        }
    }

    /// The vectorised B packing: B contiguous along n (cs = 1: interleave two rows) or along
    /// k (rs = 1: transpose). Returns false (nothing written) for other layouts.
    ///
    /// # Safety
    /// AVX-512F/BW/VL/BF16; `b` addresses a k×n matrix with columns j0..j0+cols inside.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_b_panel_fast(
        b: View,
        k: usize,
        p0: usize,
        kc: usize,
        j0: usize,
        cols: usize,
        out: &mut [u32],
    ) -> bool {
        let k2 = k / 2;
        let word = |pp: usize, c: usize| -> u32 {
            if c >= cols || 2 * pp >= k {
                0
            } else if pp < k2 {
                // SAFETY: inside b.
                unsafe { b.bits(2 * pp, j0 + c) as u32 | (b.bits(2 * pp + 1, j0 + c) as u32) << 16 }
            } else {
                // SAFETY: inside b.
                unsafe { b.bits(2 * pp, j0 + c) as u32 }
            }
        };
        if b.cs == 1 {
            for p in 0..kc {
                let pp = p0 + p;
                for h in 0..2 {
                    let o = p * NRA + 16 * h;
                    if pp < k2 && 16 * h + 16 <= cols {
                        let col = (j0 + 16 * h) as isize;
                        // SAFETY: rows 2pp, 2pp+1 < k, columns col..col+16 inside b.
                        unsafe {
                            let v = pair_lanes(
                                b.data,
                                (2 * pp) as isize * b.rs + col,
                                (2 * pp + 1) as isize * b.rs + col,
                            );
                            _mm512_storeu_si512(out.as_mut_ptr().add(o).cast(), v);
                        }
                    } else {
                        for c in 16 * h..16 * h + 16 {
                            out[p * NRA + c] = word(pp, c);
                        }
                    }
                }
            }
            true
        } else if b.rs == 1 {
            // Contiguous along k: a column's 16 pairs are 32 consecutive values.
            for pg in (0..kc).step_by(KT) {
                for h in 0..2 {
                    let cb = 16 * h;
                    if cb + 16 <= cols && p0 + pg + KT <= k2 {
                        let mut v = [_mm512_setzero_si512(); 16];
                        for (c, vc) in v.iter_mut().enumerate() {
                            let off = (j0 + cb + c) as isize * b.cs + (2 * (p0 + pg)) as isize;
                            // SAFETY: 32 values of column j0+cb+c from row 2(p0+pg), inside b.
                            *vc = unsafe {
                                match b.data {
                                    Data::F32(p) => {
                                        let p = p.offset(off);
                                        std::mem::transmute::<__m512bh, __m512i>(
                                            _mm512_cvtne2ps_pbh(
                                                _mm512_loadu_ps(p.add(16)),
                                                _mm512_loadu_ps(p),
                                            ),
                                        )
                                    }
                                    Data::Bf16(p) => _mm512_loadu_si512(p.offset(off).cast()),
                                }
                            };
                        }
                        // SAFETY: plain register shuffles.
                        unsafe { transpose16(&mut v) };
                        for (q, vq) in v.iter().enumerate() {
                            // SAFETY: 16 words at (pg+q)·32 + cb, inside out.
                            unsafe {
                                _mm512_storeu_si512(
                                    out.as_mut_ptr().add((pg + q) * NRA + cb).cast(),
                                    *vq,
                                )
                            };
                        }
                    } else {
                        for q in pg..pg + KT {
                            for c in cb..cb + 16 {
                                out[q * NRA + c] = word(p0 + q, c);
                            }
                        }
                    }
                }
            }
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm_bf16::tests::{check_case, check_linear_layer_products, values};
    use super::super::matmul::MatRef;
    use super::*;
    use half::bf16;

    /// Whether the tests can run here; prints why not.
    fn have_amx(test: &str) -> bool {
        if available() {
            true
        } else {
            println!("{test}: skipped: this CPU (or OS) has no AMX-BF16 (amx_bf16/amx_tile)");
            false
        }
    }

    /// One product against the f64 reference (`check_case`), packed A and B within `cap`
    /// bytes.
    fn case(
        mkn: (usize, usize, usize),
        layout: usize,
        acc: bool,
        alpha: f32,
        th: Threads,
        cap: usize,
    ) {
        check_case(
            &format!("amx cap {cap}"),
            mkn,
            layout,
            acc,
            alpha,
            &mut |d, a, b| gemm_amx_capped(d, a, b, acc, alpha, th, cap),
        );
    }

    #[test]
    fn amx_matches_f64_reference_on_ragged_shapes() {
        if !have_amx("amx_matches_f64_reference_on_ragged_shapes") {
            return;
        }
        let mut layout = 0;
        for m in [1, 2, 15, 16, 17, 31, 32, 33, 70] {
            for k in [1, 2, 7, 31, 32, 33, 64, 129] {
                for n in [1, 5, 16, 31, 32, 33, 70] {
                    layout = (layout + 5) % 16;
                    let acc = (m + k + n) % 2 == 0;
                    let alpha = if layout % 4 == 1 { -0.75 } else { 1.0 };
                    case((m, k, n), layout, acc, alpha, Threads::One, A_CAP);
                }
            }
        }
    }

    #[test]
    fn amx_several_tasks_k_blocks_and_every_layout() {
        if !have_amx("amx_several_tasks_k_blocks_and_every_layout") {
            return;
        }
        // More rows than a task's row block, columns than NCA, k over 2,000; every layout.
        for layout in 0..16 {
            let (m, k, n) = (
                A_BLOCK / (2048 * 2) + 37 - layout,
                2048 + 77 + layout,
                NCA + 3 + 5 * layout,
            );
            let th = if layout % 2 == 0 {
                Threads::All
            } else {
                Threads::One
            };
            case((m, k, n), layout, layout % 3 == 1, 1.5, th, A_CAP);
        }
    }

    #[test]
    fn amx_products_cut_along_m_and_k() {
        if !have_amx("amx_products_cut_along_m_and_k") {
            return;
        }
        // A cap of a few strips: k ≥ m cuts k (sums in order), m > k cuts rows.
        for (m, k, n, layout) in [(40, 300, 45, 0), (150, 70, 33, 5), (33, 1000, 17, 10)] {
            let cap = 2 * MRA * 4 * 32;
            case((m, k, n), layout, true, 0.5, Threads::All, cap);
            case((m, k, n), layout + 1, false, 1.0, Threads::One, cap);
        }
    }

    /// The three products of a linear layer with a bf16 weight W [out, in], as `mixed.rs`
    /// calls them.
    #[test]
    fn amx_linear_layer_products() {
        if !have_amx("amx_linear_layer_products") {
            return;
        }
        check_linear_layer_products("amx", (77, 67, 45), &mut |d, a, b, acc| {
            gemm_amx(d, a, b, acc, 1.0, Threads::All)
        });
    }

    /// The decode product against the f64 reference: rows around the 32-row pass, W rows
    /// around the 32-row strip, bias, accumulate.
    #[test]
    fn amx_rows_wt_matches_f64_reference() {
        if !have_amx("amx_rows_wt_matches_f64_reference") {
            return;
        }
        for (rows, inp, out) in [
            (1, 32, 1),
            (3, 64, 45),
            (16, 96, 32),
            (32, 128, 70),
            (37, 64, 33),
            (70, 160, 100),
        ] {
            for (bias_on, acc) in [(false, false), (true, true), (true, false)] {
                let x = values(rows * inp, 11);
                let w: Vec<bf16> = values(out * inp, 12)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                let b = values(out, 13);
                let init = values(rows * out, 14);
                let mut y = if acc {
                    init.clone()
                } else {
                    vec![f32::NAN; rows * out]
                };
                let bias = bias_on.then_some(&b[..]);
                assert!(rows_wt(&x, &w, bias, rows, inp, out, &mut y, acc));
                for t in 0..rows {
                    for o in 0..out {
                        let p = (0..inp).map(|q| {
                            bf16::from_f32(x[t * inp + q]).to_f64() * w[o * inp + q].to_f64()
                        });
                        let (s, sa) = p.fold((0.0, 0.0), |(s, sa), v| (s + v, sa + v.abs()));
                        let base = if acc { init[t * out + o] as f64 } else { 0.0 }
                            + if bias_on { b[o] as f64 } else { 0.0 };
                        let g = y[t * out + o] as f64;
                        assert!(
                            (g - base - s).abs() <= 1e-5 * (sa + base.abs()) + 1e-30,
                            "rows {rows} inp {inp} out {out} ({t},{o}): got {g} want {}",
                            base + s
                        );
                    }
                }
            }
        }
        // k not a multiple of 32: declined, y untouched.
        let mut y = vec![1.0f32; 2 * 3];
        let w = vec![bf16::ONE; 3 * 33];
        assert!(!rows_wt(&[0.5; 2 * 33], &w, None, 2, 33, 3, &mut y, false));
        assert_eq!(y, vec![1.0; 6]);
    }

    #[test]
    fn amx_deterministic_and_independent_of_threads() {
        if !have_amx("amx_deterministic_and_independent_of_threads") {
            return;
        }
        let (m, k, n) = (300, 2049, 2 * NCA + 9);
        let a = values(m * k, 5);
        let b = values(k * n, 6);
        let run = |th| {
            let mut c = vec![0.0f32; m * n];
            gemm_amx(
                MatMut::row_major(&mut c, m, n),
                MatRef::row_major(&a, m, k).into(),
                MatRef::row_major(&b, k, n).into(),
                false,
                1.0,
                th,
            );
            c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let (c1, c2, c3) = (run(Threads::All), run(Threads::All), run(Threads::One));
        assert_eq!(c1, c2, "two runs differ");
        assert_eq!(c1, c3, "one thread differs from all");
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// Rate of the micro-kernel on L1-resident panels (one thread): the ceiling of the
    /// product. Run with `--ignored bench_amx --nocapture`.
    #[test]
    #[ignore = "micro-benchmark"]
    fn bench_amx_tile_throughput() {
        if !available() {
            println!("skipped: no AMX-BF16");
            return;
        }
        for steps in [8usize, 16, 32] {
            let mut abuf = Vec::new();
            let mut bbuf = Vec::new();
            let a = words(&mut abuf, steps * MRA * KT);
            a.fill(0x3F80_3F80);
            let b = words(&mut bbuf, steps * KT * NRA);
            b.fill(0x3F80_3F80);
            let mut blk = Block([[0.0; NRA]; MRA]);
            let calls = 20000;
            let cfg = TileConfig::all_16x64();
            let t0 = std::time::Instant::now();
            // SAFETY: AMX available; buffers sized for `steps`.
            unsafe {
                tiles::configure(&cfg);
                for _ in 0..calls {
                    let c = blk.0.as_mut_ptr().cast::<f32>();
                    tiles::block_32x32(tiles::ATiles::packed(a), b, steps, Some(c), c, NRA * 4);
                }
                tiles::release();
            }
            let dt = t0.elapsed().as_secs_f64();
            let flops = calls as f64 * steps as f64 * 4.0 * 16.0 * 16.0 * 32.0 * 2.0;
            println!(
                "steps {steps}: {:.0} GFLOP/s one thread ({:.1} ns per tdpbf16ps)",
                flops / dt / 1e9,
                dt / (calls * steps * 4) as f64 * 1e9
            );
        }
    }

    /// The decode product at the 0.5B shapes: AMX (`rows_wt`) against the AVX-512 rows
    /// kernel, rows 1..64. Run with `--ignored bench_amx --nocapture`.
    #[test]
    #[ignore = "micro-benchmark"]
    fn bench_amx_rows_wt() {
        use half::bf16;
        if !available() {
            println!("skipped: no AMX-BF16");
            return;
        }
        let best = |f: &mut dyn FnMut()| {
            f();
            (0..7)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    f();
                    t0.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        for (inp, out) in [(896, 896), (896, 4864), (4864, 896), (896, 151936)] {
            let w: Vec<bf16> = (0..out * inp)
                .map(|i| bf16::from_f32(((i % 97) as f32 - 48.0) * 1e-3))
                .collect();
            for rows in [1, 4, 8, 16, 32, 64] {
                let x: Vec<f32> = (0..rows * inp)
                    .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                    .collect();
                let mut y = vec![0.0f32; rows * out];
                let ms_rows = best(&mut || {
                    super::super::rows_matmul::matmul_wt_bf16(
                        &x, &w, None, rows, inp, out, &mut y, false,
                    )
                });
                let ms_amx = best(&mut || {
                    rows_wt(&x, &w, None, rows, inp, out, &mut y, false);
                });
                println!(
                    "{inp}->{out} rows {rows}: rows kernel {ms_rows:.3} ms, amx {ms_amx:.3} ms"
                );
            }
        }
    }
}
