//! Mixed-precision matrix product: bf16 operands, f32 accumulation, f32 output.
//!
//! dst ← α·(a·b)            (`accumulate` false)
//! dst ← dst + α·(a·b)      (`accumulate` true)
//!
//! with a: m×k and b: k×n given as [`Operand`]s: strided views over f32 data (rounded to bf16,
//! nearest even, while packing) or over bf16 data (used as is). The sum over k is carried in
//! f32 (on AVX512-BF16 by `vdpbf16ps`, which multiplies bf16 pairs exactly and adds them in f32).
//!
//! The three products of a linear layer with a bf16 weight W [out, in] (row-major, as Hugging
//! Face stores it) and f32 activations:
//! - forward       y[T,out]  = x[T,in]·Wᵀ:   `gemm_mixed(y, x.into(), w.t().into(), false, 1.0, ..)`
//! - input grad    dx[T,in]  = dy[T,out]·W:  `gemm_mixed(dx, dy.into(), w.into(), false, 1.0, ..)`
//! - weight grad   dW[out,in] += dyᵀ·x:      `gemm_mixed(dw, dy.t().into(), x.into(), true, 1.0, ..)`
//!
//! # Algorithm
//! Both operands are first packed (once per call, in parallel) into k-pair-interleaved bf16
//! panels, the layout `vdpbf16ps` consumes: with kp = ⌈k/2⌉ pairs (an odd k is padded with a
//! zero), a 32-bit word holds the pair (v[2p], v[2p+1]) with v[2p] in the low half, and
//! - A is cut into panels of [`MR`] rows: word `(ip·kp + p)·MR + r` = (a[ip·MR+r, 2p], a[ip·MR+r, 2p+1]);
//! - B is cut into panels of [`NR`] columns: word `(jp·kp + p)·NR + c` = (b[2p, jp·NR+c], b[2p+1, jp·NR+c]);
//!
//! rows/columns past the edge of the matrix are zero. The output is split into blocks of
//! [`MC`]×[`NC`] (one rayon task each: every output element is computed by one task, in a fixed
//! order, so the result does not depend on scheduling or on the number of threads). A task walks
//! k in blocks of [`KC`] pairs; for each it runs the micro-kernel on every (B panel, A panel)
//! pair of its block, B panel outer, so that the KC×NR B micro-panel (32 KiB) stays in L1 while
//! the MC×KC A block (224 KiB) stays in L2. The AVX-512 micro-kernel keeps a 14×32 tile in 28
//! zmm accumulators: per k pair it loads two B vectors and broadcasts 14 A words (28 `vdpbf16ps`).
//! Each k block's partial product is added to dst (scaled by α) as the block ends.
//!
//! Which micro-kernel runs on an AVX512-BF16 CPU is fixed per CPU by [`kernel_for`]:
//! `vdpbf16ps` ([`Kernel::Dot`]) on AMD; elsewhere [`Kernel::WideFma`], which packs the same
//! panels widened to f32 (word `((ip·kp + p)·2 + h)·MR + r` holds bf16(a[ip·MR+r, 2p+h]) as
//! f32, likewise for B, k blocks of [`KC`]/2 pairs) and runs 28 `vfmadd231ps zmm` per k,
//! because `vdpbf16ps` issued at about a fifth of the FMA rate on the Intel Xeon measured.
//!
//! The AVX2 path uses the same panels, widening bf16 to f32 by a 16-bit shift (or a mask for
//! the high half) and accumulating with FMA; the portable path is plain loops over the panels.

use half::bf16;
use rayon::prelude::*;
use std::cell::Cell;

use super::bf16::round_bits;
use super::isa::{isa, Isa};
use super::matmul::{MatMut, MatRef, MatRefBf16, Threads};

/// Rows of the register tile (rows of an A panel).
pub(crate) const MR: usize = 14;
/// Columns of the register tile (columns of a B panel): two zmm of f32.
pub(crate) const NR: usize = 32;
/// k pairs per cache block (512 values of k).
pub(crate) const KC: usize = 256;
/// Output rows per task.
pub(crate) const MC: usize = MR * 16;
/// Output columns per task.
pub(crate) const NC: usize = NR * 16;

/// k pairs per cache block for the widened (f32) panels, which take twice the space.
const KC_WIDE: usize = KC / 2;

/// Which micro-kernel (and panel format) a product uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `vdpbf16ps` on k-pair-interleaved bf16 panels (AVX512-BF16).
    Dot,
    /// `vfmadd231ps zmm` on panels widened to f32 while packing (AVX-512F): for CPUs whose
    /// `vdpbf16ps` is slow (see [`kernel_for`]).
    WideFma,
    /// AVX2 FMA on the bf16 pair panels, widened in registers.
    Avx2,
    /// Plain loops on the bf16 pair panels.
    Portable,
}

impl Kernel {
    /// 32-bit words per k pair and panel lane: 1 for bf16 pairs, 2 for widened f32.
    fn words(self) -> usize {
        if self == Kernel::WideFma {
            2
        } else {
            1
        }
    }
    /// Whether the CPU can run this kernel.
    #[cfg_attr(not(test), allow(dead_code))] // tests pick the kernels the CPU supports
    pub(crate) fn isa_supported(self) -> bool {
        self.isa().supported()
    }

    /// The level the CPU needs.
    fn isa(self) -> Isa {
        match self {
            Kernel::Dot | Kernel::WideFma => Isa::Avx512Bf16,
            Kernel::Avx2 => Isa::Avx2,
            Kernel::Portable => Isa::Portable,
        }
    }
}

/// The micro-kernel for an instruction-set level. On AVX512-BF16 CPUs: `vdpbf16ps` on AMD
/// (Zen 4 issues it at the rate of an FMA, for twice the work), widened f32 FMAs elsewhere:
/// on the Intel Xeon (Sapphire Rapids class) this was developed on, `vdpbf16ps zmm` issued at
/// 0.7–1.1 G/s per core against 3.3–6.2 G/s for `vfmadd231ps zmm` (the test
/// `bench_tile_throughput`), so 16-lane f32 FMAs on bf16 values widened while packing do 2–3×
/// more multiply-adds per second. The choice is fixed per CPU, so results are reproducible.
pub(crate) fn kernel_for(isa: Isa) -> Kernel {
    match isa {
        Isa::Avx512Bf16 => {
            static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            if *AMD.get_or_init(is_amd) {
                Kernel::Dot
            } else {
                Kernel::WideFma
            }
        }
        Isa::Avx2 => Kernel::Avx2,
        Isa::Portable => Kernel::Portable,
    }
}

/// Whether the CPU vendor string is "AuthenticAMD".
fn is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // cpuid leaf 0 (the vendor string) exists on every x86-64 CPU.
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A matrix operand of [`gemm_mixed`]: a strided view over f32 or bf16 data.
#[derive(Clone, Copy)]
pub(crate) enum Operand<'a> {
    /// f32 data, rounded to bf16 (nearest even) when packed.
    F32(MatRef<'a>),
    /// bf16 data.
    Bf16(MatRefBf16<'a>),
}

impl Operand<'_> {
    /// Number of rows.
    pub(crate) fn rows(&self) -> usize {
        match self {
            Operand::F32(m) => m.rows(),
            Operand::Bf16(m) => m.rows(),
        }
    }

    /// Number of columns.
    pub(crate) fn cols(&self) -> usize {
        match self {
            Operand::F32(m) => m.cols(),
            Operand::Bf16(m) => m.cols(),
        }
    }

    /// The transposed view (no copy).
    #[cfg_attr(not(test), allow(dead_code))] // tests transpose operands of either kind
    pub(crate) fn t(self) -> Self {
        match self {
            Operand::F32(m) => Operand::F32(m.t()),
            Operand::Bf16(m) => Operand::Bf16(m.t()),
        }
    }
}

impl<'a> From<MatRef<'a>> for Operand<'a> {
    fn from(m: MatRef<'a>) -> Self {
        Operand::F32(m)
    }
}

impl<'a> From<MatRefBf16<'a>> for Operand<'a> {
    fn from(m: MatRefBf16<'a>) -> Self {
        Operand::Bf16(m)
    }
}

/// dst ← (dst if `accumulate`) + α·(a·b), bf16 operands, f32 sums (see the module docs).
///
/// Panics if the shapes do not agree (a: m×k, b: k×n, dst: m×n).
pub(crate) fn gemm_mixed(
    dst: MatMut<'_>,
    a: Operand<'_>,
    b: Operand<'_>,
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    gemm_mixed_with(isa(), dst, a, b, accumulate, alpha, threads)
}

/// Where the output lives; shared by the tasks, which write disjoint blocks.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    rs: isize,
    cs: isize,
}
// SAFETY: tasks write disjoint sets of elements (their own output block).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

thread_local! {
    /// Packing buffers reused between calls on this thread (taken out while in use, so a
    /// nested call on the same thread simply allocates its own).
    static PACK_A: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static PACK_B: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// [`gemm_mixed`] on an explicit instruction-set level (which the CPU must support).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_mixed_with(
    isa: Isa,
    dst: MatMut<'_>,
    a: Operand<'_>,
    b: Operand<'_>,
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    gemm_mixed_kernel(kernel_for(isa), dst, a, b, accumulate, alpha, threads)
}

/// [`gemm_mixed`] with an explicit micro-kernel (which the CPU must support).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_mixed_kernel(
    kernel: Kernel,
    mut dst: MatMut<'_>,
    a: Operand<'_>,
    b: Operand<'_>,
    accumulate: bool,
    alpha: f32,
    threads: Threads,
) {
    let isa = kernel.isa();
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert!(
        b.rows() == k && dst.rows() == m && dst.cols() == n,
        "gemm_mixed shapes: dst {}x{}, a {}x{}, b {}x{}",
        dst.rows(),
        dst.cols(),
        a.rows(),
        a.cols(),
        b.rows(),
        b.cols()
    );
    assert!(isa.supported(), "gemm_mixed: CPU lacks {isa:?}");
    let (ptr, rs, cs) = dst.raw();
    let d = Dst { ptr, rs, cs };
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside the view, which the constructors bound-checked.
                    unsafe { *d.ptr.offset(i as isize * d.rs + j as isize * d.cs) = 0.0 };
                }
            }
        }
        return;
    }
    let kp = k.div_ceil(2);
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    let mut abuf = PACK_A.with(Cell::take);
    let mut bbuf = PACK_B.with(Cell::take);
    // Every word is written by the packing, so old contents need no clearing.
    let wd = kernel.words();
    let (alen, blen) = (mp * kp * MR * wd, np * kp * NR * wd);
    if abuf.len() < alen {
        abuf.resize(alen, 0);
    }
    if bbuf.len() < blen {
        bbuf.resize(blen, 0);
    }
    let apack = &mut abuf[..alen];
    let bpack = &mut bbuf[..blen];
    // A panels run along A's rows; B panels along B's columns.
    pack(isa, wd == 2, a, false, MR, apack, threads);
    pack(isa, wd == 2, b, true, NR, bpack, threads);

    let (mb, nb) = (m.div_ceil(MC), n.div_ceil(NC));
    let (apack, bpack) = (&*apack, &*bpack);
    let task = |t: usize| {
        let (bi, bj) = (t / nb, t % nb);
        // SAFETY: the task writes only rows bi·MC.. and columns bj·NC.. of its block, inside
        // the m×n view; the packed panels hold mp·kp·MR and np·kp·NR words.
        unsafe { block(kernel, apack, bpack, kp, m, n, bi, bj, d, accumulate, alpha) };
    };
    match threads {
        Threads::All if mb * nb > 1 => (0..mb * nb).into_par_iter().for_each(task),
        _ => (0..mb * nb).for_each(task),
    }
    PACK_A.with(|c| c.set(abuf));
    PACK_B.with(|c| c.set(bbuf));
}

/// An element type that packs into bf16 bits.
trait Elem: Copy + Sync {
    fn bits(self) -> u16;
}
impl Elem for f32 {
    #[inline(always)]
    fn bits(self) -> u16 {
        round_bits(self)
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// A raw strided source: element (idx, kk) at `ptr + idx·sp + kk·sk`.
#[derive(Clone, Copy)]
struct Src<T> {
    ptr: *const T,
    sp: isize,
    sk: isize,
}
// SAFETY: a shared view of the operand's data, only read.
unsafe impl<T: Sync> Send for Src<T> {}
unsafe impl<T: Sync> Sync for Src<T> {}

/// k pairs per chunk of the strided-write packing loops (≤ 32 KiB of panel per chunk).
const PACK_CHUNK: usize = 64;

/// Packs an operand into panels of `w` along its panel dimension (A's rows when
/// `along_cols` is false, B's columns when true); see the module docs for the layout.
fn pack(
    isa: Isa,
    wide: bool,
    op: Operand<'_>,
    along_cols: bool,
    w: usize,
    out: &mut [u32],
    threads: Threads,
) {
    let (len, k) = if along_cols {
        (op.cols(), op.rows())
    } else {
        (op.rows(), op.cols())
    };
    match op {
        Operand::F32(v) => {
            let (ptr, rs, cs) = v.raw();
            let (sp, sk) = if along_cols { (cs, rs) } else { (rs, cs) };
            pack_typed(isa, wide, Src { ptr, sp, sk }, len, k, w, out, threads)
        }
        Operand::Bf16(v) => {
            let (ptr, rs, cs) = v.raw();
            let (sp, sk) = if along_cols { (cs, rs) } else { (rs, cs) };
            pack_typed(isa, wide, Src { ptr, sp, sk }, len, k, w, out, threads)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn pack_typed<T: Elem>(
    isa: Isa,
    wide: bool,
    src: Src<T>,
    len: usize,
    k: usize,
    w: usize,
    out: &mut [u32],
    threads: Threads,
) {
    let pl = k.div_ceil(2) * w * if wide { 2 } else { 1 };
    let one = |(q, panel): (usize, &mut [u32])| {
        let mut run = move || {
            // SAFETY: the view (bound-checked at construction) holds every (idx, kk) with
            // idx < len, kk < k, and pack_panel reads no other.
            unsafe {
                if wide {
                    pack_panel_wide(src, len, k, w, q, panel)
                } else {
                    pack_panel(src, len, k, w, q, panel)
                }
            }
        };
        if isa == Isa::Portable {
            run()
        } else {
            super::simd::vectorize(run)
        }
    };
    match threads {
        Threads::All if out.len() > pl => out.par_chunks_mut(pl).enumerate().for_each(one),
        _ => out.chunks_mut(pl).enumerate().for_each(one),
    }
}

/// Panel `q` (indices q·w .. q·w+w of the panel dimension) into `out` (kp·w words).
///
/// # Safety
/// Every element (idx, kk) with idx < len and kk < k must be readable through `src`.
#[inline(always)]
unsafe fn pack_panel<T: Elem>(
    src: Src<T>,
    len: usize,
    k: usize,
    w: usize,
    q: usize,
    out: &mut [u32],
) {
    let (k2, kp) = (k / 2, k.div_ceil(2));
    let valid = len.saturating_sub(q * w).min(w);
    // SAFETY: (idx, kk) is inside the view whenever idx < len and kk < k (caller's contract).
    let get = |idx: usize, kk: usize| unsafe {
        (*src.ptr.offset(idx as isize * src.sp + kk as isize * src.sk)).bits() as u32
    };
    let base = q * w;
    if src.sp.abs() == 1 && src.sk.abs() != 1 {
        // Contiguous along the panel dimension: read across it, write each pair row.
        for p in 0..k2 {
            let o = &mut out[p * w..p * w + valid];
            for (r, o) in o.iter_mut().enumerate() {
                *o = get(base + r, 2 * p) | (get(base + r, 2 * p + 1) << 16);
            }
        }
    } else {
        // Contiguous (or neither) along k: read along k, write strided, a chunk of pairs at
        // a time so that the written lines stay in L1 while every row fills its words.
        for p0 in (0..k2).step_by(PACK_CHUNK) {
            let p1 = (p0 + PACK_CHUNK).min(k2);
            for r in 0..valid {
                for p in p0..p1 {
                    out[p * w + r] = get(base + r, 2 * p) | (get(base + r, 2 * p + 1) << 16);
                }
            }
        }
    }
    if k % 2 == 1 {
        for r in 0..valid {
            out[k2 * w + r] = get(base + r, k - 1);
        }
    }
    if valid < w {
        for p in 0..kp {
            out[p * w + valid..(p + 1) * w].fill(0);
        }
    }
}

/// Panel `q` widened: word `(2p + h)·w + r` holds the f32 bits of bf16(element (q·w + r,
/// 2p + h)), zero past the edges (`out` holds 2·kp·w words).
///
/// # Safety
/// As [`pack_panel`].
#[inline(always)]
unsafe fn pack_panel_wide<T: Elem>(
    src: Src<T>,
    len: usize,
    k: usize,
    w: usize,
    q: usize,
    out: &mut [u32],
) {
    let k2 = 2 * k.div_ceil(2);
    let valid = len.saturating_sub(q * w).min(w);
    // SAFETY: (idx, kk) is inside the view whenever idx < len and kk < k (caller's contract).
    let get = |idx: usize, kk: usize| unsafe {
        ((*src.ptr.offset(idx as isize * src.sp + kk as isize * src.sk)).bits() as u32) << 16
    };
    let base = q * w;
    if src.sp.abs() == 1 && src.sk.abs() != 1 {
        for kk in 0..k {
            for (r, o) in out[kk * w..kk * w + valid].iter_mut().enumerate() {
                *o = get(base + r, kk);
            }
        }
    } else {
        for k0 in (0..k).step_by(2 * PACK_CHUNK) {
            let k1 = (k0 + 2 * PACK_CHUNK).min(k);
            for r in 0..valid {
                for kk in k0..k1 {
                    out[kk * w + r] = get(base + r, kk);
                }
            }
        }
    }
    if k < k2 {
        out[k * w..k * w + valid].fill(0);
    }
    if valid < w {
        for kk in 0..k2 {
            out[kk * w + valid..(kk + 1) * w].fill(0);
        }
    }
}

/// Output block (bi, bj): rows bi·MC.., columns bj·NC.., over all of k.
///
/// # Safety
/// `d` must address a live m×n f32 view whose block (bi, bj) no one else accesses; `apack` and
/// `bpack` must hold ⌈m/MR⌉·kp·MR and ⌈n/NR⌉·kp·NR words.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    kernel: Kernel,
    apack: &[u32],
    bpack: &[u32],
    kp: usize,
    m: usize,
    n: usize,
    bi: usize,
    bj: usize,
    d: Dst,
    accumulate: bool,
    alpha: f32,
) {
    let (ip0, ip1) = (bi * MC / MR, ((bi + 1) * MC).min(m).div_ceil(MR));
    let (jp0, jp1) = (bj * NC / NR, ((bj + 1) * NC).min(n).div_ceil(NR));
    let mut pc = 0;
    while pc < kp {
        let kc = if kernel == Kernel::WideFma {
            KC_WIDE
        } else {
            KC
        };
        let pairs = kc.min(kp - pc);
        let wd = kernel.words();
        let add = accumulate || pc > 0;
        for jp in jp0..jp1 {
            let bp = &bpack[(jp * kp + pc) * NR * wd..(jp * kp + pc + pairs) * NR * wd];
            let (j0, nj) = (jp * NR, NR.min(n - jp * NR));
            for ip in ip0..ip1 {
                let ap = &apack[(ip * kp + pc) * MR * wd..(ip * kp + pc + pairs) * MR * wd];
                let (i0, mi) = (ip * MR, MR.min(m - ip * MR));
                let out = Tile {
                    d,
                    i0,
                    j0,
                    mi,
                    nj,
                    add,
                    alpha,
                };
                // SAFETY: the panels hold `pairs` words per lane (sliced above); the tile is
                // inside this task's block (caller's contract); the CPU supports `isa`.
                unsafe {
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Dot => x86::tile_avx512(ap, bp, pairs, out),
                        #[cfg(target_arch = "x86_64")]
                        Kernel::WideFma => x86::tile_avx512_fma(ap, bp, pairs, out),
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => x86::tile_avx2(ap, bp, pairs, out),
                        _ => tile_portable(ap, bp, pairs, out),
                    }
                }
            }
        }
        pc += pairs;
    }
}

/// Where a micro-tile's result goes: rows i0..i0+mi, columns j0..j0+nj of dst, stored as
/// α·tile (or added, when `add`).
#[derive(Clone, Copy)]
struct Tile {
    d: Dst,
    i0: usize,
    j0: usize,
    mi: usize,
    nj: usize,
    add: bool,
    alpha: f32,
}

impl Tile {
    /// Writes the valid part of an MR×NR result held in memory.
    ///
    /// # Safety
    /// The tile's rows and columns must be inside the dst view and owned by the caller.
    #[inline(always)]
    unsafe fn store(&self, t: &[[f32; NR]; MR]) {
        for (r, row) in t.iter().enumerate().take(self.mi) {
            for (c, &v) in row.iter().enumerate().take(self.nj) {
                let off = (self.i0 + r) as isize * self.d.rs + (self.j0 + c) as isize * self.d.cs;
                // SAFETY: inside the view (caller's contract).
                let p = unsafe { self.d.ptr.offset(off) };
                let v = self.alpha * v;
                // SAFETY: as above.
                unsafe { *p = if self.add { *p + v } else { v } };
            }
        }
    }
}

/// The micro-kernel in plain Rust: f32 sums of the widened bf16 pairs.
///
/// # Safety
/// As [`Tile::store`]; `a` and `b` hold `pairs·MR` and `pairs·NR` words.
unsafe fn tile_portable(a: &[u32], b: &[u32], pairs: usize, out: Tile) {
    let lo = |x: u32| f32::from_bits(x << 16);
    let hi = |x: u32| f32::from_bits(x & 0xFFFF_0000);
    let mut t = [[0.0f32; NR]; MR];
    for p in 0..pairs {
        let bp = &b[p * NR..(p + 1) * NR];
        for (r, row) in t.iter_mut().enumerate() {
            let av = a[p * MR + r];
            let (alo, ahi) = (lo(av), hi(av));
            for (acc, &bv) in row.iter_mut().zip(bp) {
                *acc = *acc + alo * lo(bv) + ahi * hi(bv);
            }
        }
    }
    // SAFETY: caller's contract.
    unsafe { out.store(&t) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, MR, NR};
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

    /// The AVX512-BF16 micro-kernel: an MR×NR tile in 28 zmm accumulators.
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW/VL and AVX512-BF16; `a` and `b` hold `pairs·MR` and
    /// `pairs·NR` words; the tile is inside the dst view and owned by the caller.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn tile_avx512(a: &[u32], b: &[u32], pairs: usize, out: Tile) {
        debug_assert!(a.len() >= pairs * MR && b.len() >= pairs * NR);
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            // SAFETY: p < pairs, so the 32 words at p·NR and the 14 at p·MR are in bounds;
            // __m512i and __m512bh are both 512-bit vectors of plain bits.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16).cast()));
                let ar = ap.add(p * MR);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(r) as i32));
                    acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                    acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
                }
            }
        }
        // SAFETY: caller's contract.
        unsafe { finish_avx512(&acc, out) };
    }

    /// Writes an MR×NR tile of accumulators to dst.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; the tile is inside the dst view and owned by the caller.
    #[target_feature(enable = "avx512f")]
    unsafe fn finish_avx512(acc: &[[__m512; 2]; MR], out: Tile) {
        // The tile goes through memory (constant indices only, so the accumulators stay in
        // registers during the caller's loop); 28 stores, then row updates of the valid part.
        let mut t = [[0.0f32; NR]; MR];
        for (row, acc_r) in t.iter_mut().zip(acc) {
            // SAFETY: each row of t holds 32 floats.
            unsafe {
                _mm512_storeu_ps(row.as_mut_ptr(), acc_r[0]);
                _mm512_storeu_ps(row.as_mut_ptr().add(16), acc_r[1]);
            }
        }
        if out.d.cs != 1 {
            // SAFETY: caller's contract.
            unsafe { out.store(&t) };
            return;
        }
        // Unit column stride: masked vector updates of each row.
        let va = _mm512_set1_ps(out.alpha);
        let masks = [lanes(out.nj), lanes(out.nj.saturating_sub(16))];
        for (r, t_r) in t.iter().enumerate().take(out.mi) {
            let off = (out.i0 + r) as isize * out.d.rs + out.j0 as isize;
            for (h, &mk) in masks.iter().enumerate() {
                if mk == 0 {
                    continue;
                }
                // SAFETY: the masked lanes are columns j0..j0+nj of a row of the tile, inside
                // the view (caller's contract); masked-off lanes are not accessed; t_r holds
                // 32 floats.
                unsafe {
                    let v = _mm512_loadu_ps(t_r.as_ptr().add(16 * h));
                    let p = out.d.ptr.offset(off + 16 * h as isize);
                    let v = if out.add {
                        _mm512_fmadd_ps(va, v, _mm512_maskz_loadu_ps(mk, p))
                    } else {
                        _mm512_mul_ps(va, v)
                    };
                    _mm512_mask_storeu_ps(p, mk, v);
                }
            }
        }
    }

    /// The AVX-512F micro-kernel on widened panels: per k, two B vectors and 14 broadcasts
    /// (from memory, folded into the FMAs) for 28 `vfmadd231ps zmm`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `a` and `b` hold `2·pairs·MR` and `2·pairs·NR` words;
    /// the tile is inside the dst view and owned by the caller.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512_fma(a: &[u32], b: &[u32], pairs: usize, out: Tile) {
        debug_assert!(a.len() >= 2 * pairs * MR && b.len() >= 2 * pairs * NR);
        let (ap, bp) = (a.as_ptr() as *const f32, b.as_ptr() as *const f32);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for kk in 0..2 * pairs {
            // SAFETY: kk < 2·pairs, so the 32 words at kk·NR and the 14 at kk·MR are in
            // bounds; the words are f32 bits.
            unsafe {
                let b0 = _mm512_loadu_ps(bp.add(kk * NR));
                let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
                let ar = ap.add(kk * MR);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ar.add(r));
                    acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
                    acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
                }
            }
        }
        // SAFETY: caller's contract.
        unsafe { finish_avx512(&acc, out) };
    }

    /// The AVX2 micro-kernel on the same panels: 8 columns × 7 rows at a time in 7 ymm
    /// accumulators, bf16 widened by shifting (low half) or masking (high half).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; otherwise as [`tile_avx512`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(a: &[u32], b: &[u32], pairs: usize, out: Tile) {
        const RG: usize = 7;
        debug_assert!(a.len() >= pairs * MR && b.len() >= pairs * NR);
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let himask = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut t = [[0.0f32; NR]; MR];
        for g in 0..NR / 8 {
            for rg in 0..MR / RG {
                let mut acc = [_mm256_setzero_ps(); RG];
                for p in 0..pairs {
                    // SAFETY: p < pairs: the 8 words at p·NR + 8g and the 7 at p·MR + 7rg are
                    // in bounds.
                    unsafe {
                        let bv = _mm256_loadu_si256(bp.add(p * NR + g * 8).cast());
                        let blo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bv));
                        let bhi = _mm256_castsi256_ps(_mm256_and_si256(bv, himask));
                        let ar = ap.add(p * MR + rg * RG);
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let av = _mm256_set1_epi32(*ar.add(r) as i32);
                            let alo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(av));
                            let ahi = _mm256_castsi256_ps(_mm256_and_si256(av, himask));
                            *acc_r = _mm256_fmadd_ps(alo, blo, *acc_r);
                            *acc_r = _mm256_fmadd_ps(ahi, bhi, *acc_r);
                        }
                    }
                }
                for (r, acc_r) in acc.iter().enumerate() {
                    // SAFETY: row rg·7 + r of t has columns 8g..8g+8.
                    unsafe { _mm256_storeu_ps(t[rg * RG + r].as_mut_ptr().add(g * 8), *acc_r) };
                }
            }
        }
        // SAFETY: caller's contract.
        unsafe { out.store(&t) };
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Every micro-kernel the CPU can run.
    fn kernels() -> Vec<Kernel> {
        [Kernel::Dot, Kernel::WideFma, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .filter(|k| k.isa().supported())
            .collect()
    }

    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2_654_435_761);
                ((h >> 8) % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    /// A test matrix stored in one of four ways: f32 or bf16, row-major with padded stride
    /// or stored transposed (and viewed through `.t()`). `vals[i·cols + j]` is element (i, j)
    /// before bf16 rounding.
    pub(crate) struct Stored {
        pub(crate) rows: usize,
        pub(crate) cols: usize,
        f: Vec<f32>,
        h: Vec<bf16>,
        bf16: bool,
        transposed: bool,
        stride: usize,
    }

    impl Stored {
        pub(crate) fn new(
            vals: &[f32],
            rows: usize,
            cols: usize,
            bf16: bool,
            transposed: bool,
        ) -> Self {
            let (sr, sc) = if transposed {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let stride = sc + 3;
            let mut f = vec![f32::NAN; sr * stride];
            for i in 0..rows {
                for j in 0..cols {
                    let (si, sj) = if transposed { (j, i) } else { (i, j) };
                    f[si * stride + sj] = vals[i * cols + j];
                }
            }
            let h = f.iter().map(|&x| bf16::from_f32(x)).collect();
            Stored {
                rows,
                cols,
                f,
                h,
                bf16,
                transposed,
                stride,
            }
        }

        pub(crate) fn op(&self) -> Operand<'_> {
            let (sr, sc) = if self.transposed {
                (self.cols, self.rows)
            } else {
                (self.rows, self.cols)
            };
            let op: Operand = if self.bf16 {
                MatRefBf16::strided(&self.h, sr, sc, self.stride).into()
            } else {
                MatRef::strided(&self.f, sr, sc, self.stride).into()
            };
            if self.transposed {
                op.t()
            } else {
                op
            }
        }

        /// Element (i, j) as the kernel sees it (bf16-rounded), in f64.
        pub(crate) fn at(&self, i: usize, j: usize) -> f64 {
            let (si, sj) = if self.transposed { (j, i) } else { (i, j) };
            self.h[si * self.stride + sj].to_f64()
        }
    }

    /// Checks `got` (m×n, row stride ld, or transposed when `dst_t`) against the f64 product
    /// of the bf16-rounded operands. With the operands exact in f64, the only error is f32
    /// rounding in the k sum and the final scaling: ≤ ~k·2⁻²⁴ relative to Σ|a||b|, and
    /// typically √k·2⁻²⁴; 1e-5 of |α|·Σ|a||b| (+ |dst₀|) leaves a wide margin for k ≤ 600.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check(
        what: &str,
        got: &[f32],
        ld: usize,
        dst_t: bool,
        a: &Stored,
        b: &Stored,
        init: Option<&[f32]>,
        alpha: f32,
    ) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut sa) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let t = a.at(i, p) * b.at(p, j);
                    s += t;
                    sa += t.abs();
                }
                let idx = if dst_t { j * ld + i } else { i * ld + j };
                let d0 = init.map_or(0.0, |v| v[idx] as f64);
                let want = d0 + alpha as f64 * s;
                let tol = 1e-5 * (alpha.abs() as f64 * sa + d0.abs()) + 1e-30;
                let g = got[idx] as f64;
                assert!(
                    (g - want).abs() <= tol,
                    "{what}: m={m} k={k} n={n} ({i},{j}): got {g} want {want} tol {tol}"
                );
            }
        }
    }

    /// One product `gemm(dst, a, b)` of an m×k by a k×n operand against the f64 reference;
    /// `layout` picks operand types (f32/bf16), orientations (stored transposed or not) and
    /// the dst orientation (with two padding columns); `what` names the path.
    pub(crate) fn check_case(
        what: &str,
        (m, k, n): (usize, usize, usize),
        layout: usize,
        acc: bool,
        alpha: f32,
        gemm: &mut dyn FnMut(MatMut<'_>, Operand<'_>, Operand<'_>),
    ) {
        let a = Stored::new(
            &values(m * k, 1 + layout as u32),
            m,
            k,
            layout & 1 == 1,
            layout & 2 == 2,
        );
        let b = Stored::new(
            &values(k * n, 7 + layout as u32),
            k,
            n,
            layout & 4 == 4,
            layout & 8 == 8,
        );
        let dst_t = layout.is_multiple_of(3);
        let ld = if dst_t { m + 2 } else { n + 2 };
        let len = if dst_t { n * ld } else { m * ld };
        let init = values(len, 99);
        let mut c = if acc {
            init.clone()
        } else {
            vec![f32::NAN; len]
        };
        let view = if dst_t {
            MatMut::strided(&mut c, n, m, ld).t()
        } else {
            MatMut::strided(&mut c, m, n, ld)
        };
        gemm(view, a.op(), b.op());
        let what = format!("{what} layout {layout} acc {acc} alpha {alpha}");
        check(
            &what,
            &c,
            ld,
            dst_t,
            &a,
            &b,
            acc.then_some(&init[..]),
            alpha,
        );
    }

    /// One product on one path.
    #[allow(clippy::too_many_arguments)]
    fn case(
        kern: Kernel,
        m: usize,
        k: usize,
        n: usize,
        layout: usize,
        acc: bool,
        alpha: f32,
        th: Threads,
    ) {
        check_case(
            &format!("{kern:?}"),
            (m, k, n),
            layout,
            acc,
            alpha,
            &mut |d, a, b| gemm_mixed_kernel(kern, d, a, b, acc, alpha, th),
        );
    }

    #[test]
    fn matches_f64_reference_on_ragged_shapes_every_path() {
        for kern in kernels() {
            let mut layout = 0;
            for m in [1, 2, 13, 14, 15, 29, 37] {
                for k in [1, 2, 7, 64, 129] {
                    for n in [1, 5, 31, 32, 33, 70] {
                        layout = (layout + 5) % 16;
                        let acc = (m + k + n) % 2 == 0;
                        let alpha = if layout % 4 == 1 { -0.75 } else { 1.0 };
                        case(kern, m, k, n, layout, acc, alpha, Threads::One);
                    }
                }
            }
        }
    }

    #[test]
    fn several_tasks_and_k_blocks_every_path() {
        // More rows than MC, columns than NC and pairs than KC; every layout once.
        for kern in kernels() {
            for layout in [0, 5, 6, 9, 10, 15] {
                let (m, k, n) = (MC + 11 - layout, 2 * KC + 77 + layout, NC + 3 + 5 * layout);
                let th = if layout % 2 == 0 {
                    Threads::All
                } else {
                    Threads::One
                };
                case(kern, m, k, n, layout, layout % 3 == 1, 1.5, th);
            }
        }
    }

    /// Checks the three products of a linear layer with a bf16 weight W [out, in], run by
    /// `gemm(dst, a, b, accumulate)` as `mixed.rs` calls them (y = x·Wᵀ, dx = dy·W, dW += dyᵀ·x
    /// onto 0.5), against f64 sums of the bf16-rounded operands; `what` names the path.
    pub(crate) fn check_linear_layer_products(
        what: &str,
        (t, inp, out): (usize, usize, usize),
        gemm: &mut dyn FnMut(MatMut<'_>, Operand<'_>, Operand<'_>, bool),
    ) {
        let x = values(t * inp, 1);
        let w: Vec<bf16> = values(out * inp, 2)
            .iter()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let dy = values(t * out, 3);
        let r = |v: f32| bf16::from_f32(v).to_f64();
        let mut y = vec![0.0; t * out];
        gemm(
            MatMut::row_major(&mut y, t, out),
            MatRef::row_major(&x, t, inp).into(),
            MatRefBf16::row_major(&w, out, inp).t().into(),
            false,
        );
        let mut dx = vec![0.0; t * inp];
        gemm(
            MatMut::row_major(&mut dx, t, inp),
            MatRef::row_major(&dy, t, out).into(),
            MatRefBf16::row_major(&w, out, inp).into(),
            false,
        );
        let mut dw = vec![0.5; out * inp];
        gemm(
            MatMut::row_major(&mut dw, out, inp),
            MatRef::row_major(&dy, t, out).t().into(),
            MatRef::row_major(&x, t, inp).into(),
            true,
        );
        let close = |g: f32, s: f64, sa: f64| (g as f64 - s).abs() <= 1e-5 * sa + 1e-30;
        for i in 0..t {
            for o in 0..out {
                let p = (0..inp).map(|q| r(x[i * inp + q]) * w[o * inp + q].to_f64());
                let (s, sa) = p.fold((0.0, 0.0), |(s, sa), v| (s + v, sa + v.abs()));
                assert!(close(y[i * out + o], s, sa), "{what} y ({i},{o})");
            }
            for q in 0..inp {
                let p = (0..out).map(|o| r(dy[i * out + o]) * w[o * inp + q].to_f64());
                let (s, sa) = p.fold((0.0, 0.0), |(s, sa), v| (s + v, sa + v.abs()));
                assert!(close(dx[i * inp + q], s, sa), "{what} dx ({i},{q})");
            }
        }
        for o in 0..out {
            for q in 0..inp {
                let p = (0..t).map(|i| r(dy[i * out + o]) * r(x[i * inp + q]));
                let (s, sa) = p.fold((0.0, 0.0), |(s, sa), v| (s + v, sa + v.abs()));
                assert!(
                    close(dw[o * inp + q], 0.5 + s, sa + 0.5),
                    "{what} dw ({o},{q})"
                );
            }
        }
    }

    /// The three products of a linear layer with a bf16 weight W [out, in], every kernel.
    #[test]
    fn linear_layer_products() {
        for kern in kernels() {
            check_linear_layer_products(&format!("{kern:?}"), (37, 67, 45), &mut |d, a, b, acc| {
                gemm_mixed_kernel(kern, d, a, b, acc, 1.0, Threads::All)
            });
        }
    }

    #[test]
    fn deterministic_and_independent_of_threads() {
        let (m, k, n) = (2 * MC + 5, 3 * KC + 1, 2 * NC + 9);
        let a = values(m * k, 5);
        let b = values(k * n, 6);
        for kern in kernels() {
            let run = |th| {
                let mut c = vec![0.0f32; m * n];
                gemm_mixed_kernel(
                    kern,
                    MatMut::row_major(&mut c, m, n),
                    MatRef::row_major(&a, m, k).into(),
                    MatRef::row_major(&b, k, n).into(),
                    false,
                    1.0,
                    th,
                );
                c
            };
            let bits = |c: &[f32]| c.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (c1, c2, c3) = (run(Threads::All), run(Threads::All), run(Threads::One));
            if kern == kernel_for(isa()) {
                // The public entry point runs this kernel.
                let mut c4 = vec![0.0f32; m * n];
                gemm_mixed(
                    MatMut::row_major(&mut c4, m, n),
                    MatRef::row_major(&a, m, k).into(),
                    MatRef::row_major(&b, k, n).into(),
                    false,
                    1.0,
                    Threads::All,
                );
                assert_eq!(bits(&c1), bits(&c4), "{kern:?}: gemm_mixed differs");
            }
            assert_eq!(bits(&c1), bits(&c2), "{kern:?}: two runs differ");
            assert_eq!(
                bits(&c1),
                bits(&c3),
                "{kern:?}: one thread differs from all"
            );
        }
    }

    /// Instruction throughput of the AVX-512 micro-kernel on L1-resident panels, against the
    /// same loop shape with f32 FMAs (`vfmadd231ps zmm`): tells whether `vdpbf16ps` issues as
    /// fast as an FMA on this CPU. Run with `--ignored bench_ --nocapture`.
    #[test]
    #[ignore = "micro-benchmark"]
    #[cfg(target_arch = "x86_64")]
    fn bench_tile_throughput() {
        use std::arch::x86_64::*;
        use std::time::Instant;
        if !Isa::Avx512Bf16.supported() {
            println!("skipped: no AVX512-BF16");
            return;
        }
        let pairs = 256;
        let a = vec![0x3F80_3F80u32; pairs * MR];
        let b = vec![0x3F80_3F80u32; pairs * NR];
        let mut c = vec![0.0f32; MR * NR];
        let calls = 4000;
        let t0 = Instant::now();
        for _ in 0..calls {
            let out = Tile {
                d: Dst {
                    ptr: c.as_mut_ptr(),
                    rs: NR as isize,
                    cs: 1,
                },
                i0: 0,
                j0: 0,
                mi: MR,
                nj: NR,
                add: true,
                alpha: 1.0,
            };
            // SAFETY: the CPU has the features; the panels hold `pairs` words per lane; c is
            // MR×NR.
            unsafe { x86::tile_avx512(std::hint::black_box(&a), &b, pairs, out) };
        }
        let dt = t0.elapsed().as_secs_f64();
        let n = (calls * pairs * 2 * MR) as f64;
        println!(
            "vdpbf16ps: {:.2} G/s ({:.1} GFLOP/s, {:.1} ns per tile)",
            n / dt / 1e9,
            n * 64.0 / dt / 1e9,
            dt / calls as f64 * 1e9
        );
        #[target_feature(enable = "avx512f")]
        fn fma_probe(a: &[f32], b: &[f32], steps: usize) -> f32 {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for p in 0..steps {
                // SAFETY: p < steps; a holds steps·MR and b steps·NR floats.
                unsafe {
                    let b0 = _mm512_loadu_ps(b.as_ptr().add(p * NR));
                    let b1 = _mm512_loadu_ps(b.as_ptr().add(p * NR + 16));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*a.as_ptr().add(p * MR + r));
                        acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
                        acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
                    }
                }
            }
            let mut s = _mm512_setzero_ps();
            for acc_r in &acc {
                s = _mm512_add_ps(s, _mm512_add_ps(acc_r[0], acc_r[1]));
            }
            _mm512_reduce_add_ps(s)
        }
        let af = vec![1e-3f32; pairs * MR];
        let bf = vec![1e-3f32; pairs * NR];
        let t0 = Instant::now();
        let mut s = 0.0;
        for _ in 0..calls {
            // SAFETY: the CPU has AVX-512F (checked above).
            s += unsafe { fma_probe(std::hint::black_box(&af), std::hint::black_box(&bf), pairs) };
        }
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "vfmadd231ps zmm: {:.2} G/s ({:.1} GFLOP/s) [{s:.1}]",
            n / dt / 1e9,
            n * 32.0 / dt / 1e9
        );
    }
}
