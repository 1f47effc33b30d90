//! Each op's launch on device buffers: the GPU counterparts of the CPU kernels in `ops/cpu/`,
//! with the same equations (stated in each kernel source) and layouts. Buffers are cudarc
//! `CudaSlice`s; bf16 is `CudaSlice<u16>` holding the raw bits.
//!
//! Shapes are checked here (a mismatch is an error naming the op and the argument); launch
//! geometry comes from [`super::plan`].

use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::device::Gpu;
use super::plan::{self, Launch};
use super::sources::{
    ATTENTION, ELEMENTWISE, EMBEDDING, LM_HEAD, OPTIM, RMS_NORM, ROPE, SAMPLING, SWIGLU,
};

/// An element type the kernels come in: f32, or bf16 carried as u16 bits.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + 'static {
    /// The kernel-name suffix ("f32", "bf16").
    const SUFFIX: &'static str;
    /// cuBLAS's name for the type.
    const CUDA_TYPE: cudaDataType;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}

impl Elem for u16 {
    const SUFFIX: &'static str = "bf16";
    const CUDA_TYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}

fn err(op: &str) -> impl Fn(cudarc::driver::DriverError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuda {op}: {e:?}")
}

/// Copies `data` to a new device buffer.
pub fn upload<T: Elem>(gpu: &Gpu, data: &[T]) -> Result<CudaSlice<T>> {
    gpu.stream.clone_htod(data).map_err(err("upload"))
}

/// u32 data (token ids, positions, tables) to the device.
pub fn upload_u32(gpu: &Gpu, data: &[u32]) -> Result<CudaSlice<u32>> {
    gpu.stream.clone_htod(data).map_err(err("upload"))
}

/// Copies a device buffer back.
pub fn download<T: DeviceRepr + Default + Clone>(gpu: &Gpu, buf: &CudaSlice<T>) -> Result<Vec<T>> {
    gpu.stream.clone_dtoh(buf).map_err(err("download"))
}

/// A zeroed device buffer of `n` elements.
pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>> {
    gpu.stream.alloc_zeros(n.max(1)).map_err(err("alloc"))
}

/// A device buffer of `n` elements left unset, for outputs a kernel writes in full (the CPU
/// emulator's tests start such outputs as NaN and check every element is written).
pub fn uninit<T: DeviceRepr>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the callers' kernels write every element before anything reads it.
    unsafe { gpu.stream.alloc(n.max(1)) }.map_err(err("alloc"))
}

/// cudarc's launch configuration of a plan's geometry.
fn config(at: Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: at.grid,
        block_dim: (at.block, 1, 1),
        shared_mem_bytes: at.shared_bytes,
    }
}

/// Launches `args` with the plan's geometry; nothing when the plan has no work (None).
fn run(mut args: LaunchArgs<'_>, at: Option<Launch>, op: &str) -> Result<()> {
    if let Some(at) = at {
        // SAFETY: every caller checked its buffers' extents and pushed the kernel's parameters
        // in the order of its signature (the CPU emulator's tests check count and sizes).
        unsafe { args.launch(config(at)) }.map_err(|e| anyhow!("cuda {op}: {e:?}"))?;
    }
    Ok(())
}

fn check_len<T>(op: &str, name: &str, buf: &CudaSlice<T>, want: usize) -> Result<()> {
    ensure!(
        buf.len() >= want,
        "cuda {op}: `{name}` holds {} elements, {want} needed",
        buf.len()
    );
    Ok(())
}

// ---------------------------------------------------------------- matrix products (cuBLAS)

/// y[m, n] = alpha·x[m, k]·W[n, k]ᵀ + beta·y (row-major): the linear layer's product. x and W
/// share the element type (f32 with f32 accumulation and no TF32, or bf16 with f32
/// accumulation); y is f32.
#[allow(clippy::too_many_arguments)]
pub fn gemm_x_wt<T: Elem>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    y: &mut CudaSlice<f32>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    check_len("gemm", "x", x, m * k)?;
    check_len("gemm", "w", w, n * k)?;
    check_len("gemm", "y", y, m * n)?;
    // Column-major view: yᵀ[n, m] = Wᵀ… : C = op(A)·B with A = W (k × n, ld k) transposed and
    // B = x (k × m, ld k).
    gemm_raw(
        gpu,
        (
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
        ),
        (n, m, k),
        (w, k),
        (x, k),
        (y, n),
        alpha,
        beta,
    )
}

/// dx[m, k] = alpha·dy[m, n]·W[n, k] + beta·dx (row-major).
#[allow(clippy::too_many_arguments)]
pub fn gemm_dy_w<T: Elem>(
    gpu: &Gpu,
    dy: &CudaSlice<T>,
    w: &CudaSlice<T>,
    dx: &mut CudaSlice<f32>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    check_len("gemm", "dy", dy, m * n)?;
    check_len("gemm", "w", w, n * k)?;
    check_len("gemm", "dx", dx, m * k)?;
    gemm_raw(
        gpu,
        (
            cublasOperation_t::CUBLAS_OP_N,
            cublasOperation_t::CUBLAS_OP_N,
        ),
        (k, m, n),
        (w, k),
        (dy, n),
        (dx, k),
        alpha,
        beta,
    )
}

/// dW[n, k] = alpha·dy[m, n]ᵀ·x[m, k] + beta·dW (row-major).
#[allow(clippy::too_many_arguments)]
pub fn gemm_dyt_x<T: Elem>(
    gpu: &Gpu,
    dy: &CudaSlice<T>,
    x: &CudaSlice<T>,
    dw: &mut CudaSlice<f32>,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    check_len("gemm", "dy", dy, m * n)?;
    check_len("gemm", "x", x, m * k)?;
    check_len("gemm", "dw", dw, n * k)?;
    gemm_raw(
        gpu,
        (
            cublasOperation_t::CUBLAS_OP_N,
            cublasOperation_t::CUBLAS_OP_T,
        ),
        (k, n, m),
        (x, k),
        (dy, n),
        (dw, k),
        alpha,
        beta,
    )
}

/// cublasGemmEx, column-major C[m, n] = alpha·op(A)·op(B) + beta·C with f32 C and compute.
#[allow(clippy::too_many_arguments)]
fn gemm_raw<T: Elem>(
    gpu: &Gpu,
    (ta, tb): (cublasOperation_t, cublasOperation_t),
    (m, n, k): (usize, usize, usize),
    (a, lda): (&CudaSlice<T>, usize),
    (b, ldb): (&CudaSlice<T>, usize),
    (c, ldc): (&mut CudaSlice<f32>, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let int = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| anyhow!("cuda gemm: {what} = {v} exceeds cuBLAS's i32"))
    };
    let compute = if T::SUFFIX == "f32" {
        // No TF32: f32 products as accurate as the CPU's.
        cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
    } else {
        cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let stream = &gpu.stream;
    let (pa, _ga) = a.device_ptr(stream);
    let (pb, _gb) = b.device_ptr(stream);
    let (pc, _gc) = c.device_ptr_mut(stream);
    // SAFETY: the buffers hold the extents checked by the callers; cuBLAS runs on the stream.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *gpu.blas.handle(),
            ta,
            tb,
            int(m, "m")?,
            int(n, "n")?,
            int(k, "k")?,
            &alpha as *const f32 as *const _,
            pa as *const _,
            T::CUDA_TYPE,
            int(lda, "lda")?,
            pb as *const _,
            T::CUDA_TYPE,
            int(ldb, "ldb")?,
            &beta as *const f32 as *const _,
            pc as *mut _,
            cudaDataType::CUDA_R_32F,
            int(ldc, "ldc")?,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| anyhow!("cuda gemm ({m}×{n}×{k}): {e:?}"))
}

// ---------------------------------------------------------------- element-wise

/// y[rows, n] += b[n].
pub fn add_bias(
    gpu: &Gpu,
    y: &mut CudaSlice<f32>,
    b: &CudaSlice<f32>,
    rows: usize,
    n: usize,
) -> Result<()> {
    check_len("add_bias", "y", y, rows * n)?;
    check_len("add_bias", "b", b, n)?;
    let f = gpu.function(&ELEMENTWISE, "add_bias_f32")?;
    let (rows64, n32) = (rows as u64, n as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(y).arg(b).arg(&rows64).arg(&n32);
    run(l, Launch::elementwise(rows * n)?, "add_bias")?;
    Ok(())
}

/// out[..n] = bf16(x[..n]) (the activation operand of a bf16 product).
pub fn cast_to_bf16(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    out: &mut CudaSlice<u16>,
    n: usize,
) -> Result<()> {
    check_len("cast", "x", x, n)?;
    check_len("cast", "out", out, n)?;
    let f = gpu.function(&ELEMENTWISE, "cast_f32_bf16")?;
    let n64 = n as u64;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(x).arg(out).arg(&n64);
    run(l, Launch::elementwise(n)?, "cast")?;
    Ok(())
}

/// y[..n] += x[..n].
pub fn add_into(gpu: &Gpu, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, n: usize) -> Result<()> {
    check_len("add", "y", y, n)?;
    check_len("add", "x", x, n)?;
    let f = gpu.function(&ELEMENTWISE, "add_f32")?;
    let n64 = n as u64;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(y).arg(x).arg(&n64);
    run(l, Launch::elementwise(n)?, "add")?;
    Ok(())
}

/// out[j] += Σ_r x[r, j]: a bias gradient, as per-part column sums (rows in order within
/// each part) then the parts added in order (kernels/elementwise.cu).
pub fn add_col_sums(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    rows: usize,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("add_col_sums", "x", x, rows * n)?;
    check_len("add_col_sums", "out", out, n)?;
    let (parts, per, launches) = plan::col_sum_launch(rows, n)?;
    let Some((first, second)) = launches else {
        return Ok(());
    };
    let mut partial = uninit::<f32>(gpu, parts * n)?;
    let f = gpu.function(&ELEMENTWISE, "col_sum_parts")?;
    let (r32, n32, per32, p32) = (rows as i32, n as i32, per as i32, parts as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(x).arg(&r32).arg(&n32).arg(&per32).arg(&mut partial);
    run(l, Some(first), "add_col_sums")?;
    let f = gpu.function(&ELEMENTWISE, "add_sum_parts")?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&partial).arg(&p32).arg(&n32).arg(out);
    run(l, Some(second), "add_col_sums")
}

/// The device address of element `offset` of `buf` (for products on parts of a buffer: the
/// head's vocabulary chunks). Valid while `buf` lives; one stream, no event tracking.
pub fn address<T>(gpu: &Gpu, buf: &CudaSlice<T>, offset: usize) -> u64 {
    let (p, _sync) = buf.device_ptr(&gpu.stream);
    p + (offset * std::mem::size_of::<T>()) as u64
}

/// One operand of [`gemm_at`]: a device address and its element type.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub addr: u64,
    pub bf16: bool,
}

/// Column-major C[m, n] = alpha·op(A)·op(B) + beta·C (f32 C) on raw addresses; `transpose`
/// gives (op A, op B). Operands share the element type. The caller guarantees the extents.
#[allow(clippy::too_many_arguments)]
pub fn gemm_at(
    gpu: &Gpu,
    transpose: (bool, bool),
    (m, n, k): (usize, usize, usize),
    (a, lda): (At, usize),
    (b, ldb): (At, usize),
    (c, ldc): (u64, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    ensure!(a.bf16 == b.bf16, "cuda gemm: operands of different types");
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (ty, compute) = if a.bf16 {
        (
            cudaDataType::CUDA_R_16BF,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
        )
    } else {
        (
            cudaDataType::CUDA_R_32F,
            cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC,
        )
    };
    let int = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| anyhow!("cuda gemm: {what} = {v} exceeds cuBLAS's i32"))
    };
    // SAFETY: the caller guarantees that the addresses hold the extents; cuBLAS runs on the
    // stream.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *gpu.blas.handle(),
            op(transpose.0),
            op(transpose.1),
            int(m, "m")?,
            int(n, "n")?,
            int(k, "k")?,
            &alpha as *const f32 as *const _,
            a.addr as *const _,
            ty,
            int(lda, "lda")?,
            b.addr as *const _,
            ty,
            int(ldb, "ldb")?,
            &beta as *const f32 as *const _,
            c as *mut _,
            cudaDataType::CUDA_R_32F,
            int(ldc, "ldc")?,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| anyhow!("cuda gemm ({m}×{n}×{k}): {e:?}"))
}

/// dz in place over one head chunk z [rows, cols] (columns c0..): g·(1[v = target] − e^(z − lse)).
#[allow(clippy::too_many_arguments)]
pub fn head_dlogits(
    gpu: &Gpu,
    z: &mut CudaSlice<f32>,
    rows: usize,
    cols: usize,
    c0: usize,
    targets: &CudaSlice<u32>,
    lse: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
) -> Result<()> {
    check_len("head_dlogits", "z", z, rows * cols)?;
    check_len("head_dlogits", "targets", targets, rows)?;
    check_len("head_dlogits", "lse", lse, rows)?;
    check_len("head_dlogits", "g", g, rows)?;
    let f = gpu.function(&LM_HEAD, "head_chunk_dlogits")?;
    let (r32, c32, c032) = (rows as i32, cols as i32, c0 as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(z)
        .arg(&r32)
        .arg(&c32)
        .arg(&c032)
        .arg(targets)
        .arg(lse)
        .arg(g);
    run(l, Launch::elementwise(rows * cols)?, "head_dlogits")?;
    Ok(())
}

// ---------------------------------------------------------------- RMSNorm

/// y = x·rstd·w per row of `h`; returns rstd [rows] (kernels/rms_norm.cu).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm<T: Elem>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    w: &CudaSlice<f32>,
    eps: f32,
    rows: usize,
    h: usize,
    y: &mut CudaSlice<T>,
    rstd: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("rms_norm", "x", x, rows * h)?;
    check_len("rms_norm", "w", w, h)?;
    check_len("rms_norm", "y", y, rows * h)?;
    check_len("rms_norm", "rstd", rstd, rows)?;
    let f = gpu.function(&RMS_NORM, &format!("rms_norm_fwd_{}", T::SUFFIX))?;
    let h32 = h as i32;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(x).arg(w).arg(&eps).arg(&h32).arg(y).arg(rstd);
    run(l, plan::row_launch(rows)?, "rms_norm")?;
    Ok(())
}

/// Backward of [`rms_norm`]: returns (dx [rows, h], dw [h]); dw is reduced in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward<T: Elem>(
    gpu: &Gpu,
    x: &CudaSlice<T>,
    w: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    dy: &CudaSlice<T>,
    rows: usize,
    h: usize,
) -> Result<(CudaSlice<T>, CudaSlice<f32>)> {
    check_len("rms_norm_backward", "x", x, rows * h)?;
    check_len("rms_norm_backward", "dy", dy, rows * h)?;
    check_len("rms_norm_backward", "rstd", rstd, rows)?;
    let (parts, per, launch) = plan::rms_norm_backward_launch(rows)?;
    let mut dx = uninit::<T>(gpu, rows * h)?;
    let mut partial = uninit::<f32>(gpu, parts * h)?;
    let mut dw = uninit::<f32>(gpu, h)?;
    let f = gpu.function(&RMS_NORM, &format!("rms_norm_bwd_{}", T::SUFFIX))?;
    let (h32, rows32, per32) = (h as i32, rows as i32, per as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(x)
        .arg(w)
        .arg(rstd)
        .arg(dy)
        .arg(&h32)
        .arg(&rows32)
        .arg(&per32);
    l.arg(&mut dx).arg(&mut partial);
    if launch.is_none() {
        // No rows: nothing to launch, and dw is zero.
        return Ok((dx, zeros::<f32>(gpu, h)?));
    }
    run(l, launch, "rms_norm_backward")?;
    sum_parts(gpu, &partial, parts, h, &mut dw)?;
    Ok((dx, dw))
}

/// out[j] = Σ_p partial[p, j] in part order.
fn sum_parts(
    gpu: &Gpu,
    partial: &CudaSlice<f32>,
    parts: usize,
    h: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let f = gpu.function(&RMS_NORM, "sum_parts")?;
    let (p32, h32) = (parts as i32, h as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(partial).arg(&p32).arg(&h32).arg(out);
    run(l, Launch::elementwise(h)?, "sum_parts")?;
    Ok(())
}

// ---------------------------------------------------------------- RoPE

/// The cos/sin tables of an `ops::Rope`, on the device.
#[derive(Clone)]
pub struct RopeTables {
    pub cos: CudaSlice<f32>,
    pub sin: CudaSlice<f32>,
    pub head_dim: usize,
    pub max_positions: usize,
}

impl RopeTables {
    pub fn new(gpu: &Gpu, rope: &crate::model::ops::Rope) -> Result<Self> {
        let (cos, sin) = rope.tables();
        Ok(RopeTables {
            cos: upload(gpu, cos)?,
            sin: upload(gpu, sin)?,
            head_dim: rope.head_dim(),
            max_positions: rope.max_positions(),
        })
    }
}

/// Rotates x [tokens, heads, head_dim] in place (backward: the inverse rotation).
pub fn rope<T: Elem>(
    gpu: &Gpu,
    tables: &RopeTables,
    x: &mut CudaSlice<T>,
    positions: &CudaSlice<u32>,
    tokens: usize,
    heads: usize,
    backward: bool,
) -> Result<()> {
    let hd = tables.head_dim;
    check_len("rope", "x", x, tokens * heads * hd)?;
    check_len("rope", "positions", positions, tokens)?;
    let f = gpu.function(&ROPE, &format!("rope_{}", T::SUFFIX))?;
    let (t32, h32, d32) = (tokens as i32, heads as i32, hd as i32);
    let sign: f32 = if backward { -1.0 } else { 1.0 };
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(x).arg(positions).arg(&tables.cos).arg(&tables.sin);
    l.arg(&t32).arg(&h32).arg(&d32).arg(&sign);
    run(l, Launch::elementwise(tokens * heads * hd / 2)?, "rope")?;
    Ok(())
}

// ---------------------------------------------------------------- SwiGLU

/// h = silu(g)·u over n values.
pub fn swiglu<T: Elem>(
    gpu: &Gpu,
    g: &CudaSlice<T>,
    u: &CudaSlice<T>,
    h: &mut CudaSlice<T>,
    n: usize,
) -> Result<()> {
    check_len("swiglu", "g", g, n)?;
    check_len("swiglu", "u", u, n)?;
    check_len("swiglu", "h", h, n)?;
    let f = gpu.function(&SWIGLU, &format!("swiglu_fwd_{}", T::SUFFIX))?;
    let n64 = n as u64;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(g).arg(u).arg(h).arg(&n64);
    run(l, Launch::elementwise(n)?, "swiglu")?;
    Ok(())
}

/// Backward of [`swiglu`]: (dg, du).
pub fn swiglu_backward<T: Elem>(
    gpu: &Gpu,
    g: &CudaSlice<T>,
    u: &CudaSlice<T>,
    dh: &CudaSlice<T>,
    n: usize,
) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    check_len("swiglu_backward", "g", g, n)?;
    check_len("swiglu_backward", "u", u, n)?;
    check_len("swiglu_backward", "dh", dh, n)?;
    let mut dg = uninit::<T>(gpu, n)?;
    let mut du = uninit::<T>(gpu, n)?;
    let f = gpu.function(&SWIGLU, &format!("swiglu_bwd_{}", T::SUFFIX))?;
    let n64 = n as u64;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(g).arg(u).arg(dh).arg(&mut dg).arg(&mut du).arg(&n64);
    run(l, Launch::elementwise(n)?, "swiglu_backward")?;
    Ok((dg, du))
}

// ---------------------------------------------------------------- attention

/// Shapes of a varlen attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    fn check(&self) -> Result<()> {
        plan::check_head_dim(self.head_dim)?;
        ensure!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "cuda attention: {} heads are not a multiple of {} kv heads",
            self.heads,
            self.kv_heads
        );
        Ok(())
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// Causal GQA attention within each sequence: (out [T, nh, hd], lse [T, nh]). `bounds` are
/// [`plan::sequence_bounds`]'s start array on the device.
pub fn attention(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    seq_start: &CudaSlice<u32>,
    d: AttentionDims,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    d.check()?;
    let (t, nh, nkv, hd) = (d.tokens, d.heads, d.kv_heads, d.head_dim);
    check_len("attention", "q", q, t * nh * hd)?;
    check_len("attention", "k", k, t * nkv * hd)?;
    check_len("attention", "v", v, t * nkv * hd)?;
    check_len("attention", "seq_start", seq_start, t)?;
    let mut out = uninit::<f32>(gpu, t * nh * hd)?;
    let mut lse = uninit::<f32>(gpu, t * nh)?;
    let f = gpu.function(&ATTENTION, "attention_fwd")?;
    let (t32, nh32, nkv32, hd32, scale) = (t as i32, nh as i32, nkv as i32, hd as i32, d.scale());
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(q)
        .arg(k)
        .arg(v)
        .arg(seq_start)
        .arg(&t32)
        .arg(&nh32)
        .arg(&nkv32)
        .arg(&hd32);
    l.arg(&scale).arg(&mut out).arg(&mut lse);
    run(l, plan::attention_launch(t, nh, 1, hd)?, "attention")?;
    Ok((out, lse))
}

/// Backward of [`attention`]: (dq, dk, dv).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    seq_start: &CudaSlice<u32>,
    seq_end: &CudaSlice<u32>,
    d: AttentionDims,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    d.check()?;
    let (t, nh, nkv, hd) = (d.tokens, d.heads, d.kv_heads, d.head_dim);
    check_len("attention_backward", "dout", dout, t * nh * hd)?;
    check_len("attention_backward", "out", out, t * nh * hd)?;
    check_len("attention_backward", "lse", lse, t * nh)?;
    check_len("attention_backward", "seq_end", seq_end, t)?;
    let mut dvec = uninit::<f32>(gpu, t * nh)?;
    let (t32, nh32, nkv32, hd32, scale) = (t as i32, nh as i32, nkv as i32, hd as i32, d.scale());
    let rows32 = (t * nh) as i32;
    let f = gpu.function(&ATTENTION, "attention_bwd_dot")?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(dout).arg(out).arg(&rows32).arg(&hd32).arg(&mut dvec);
    run(
        l,
        plan::attention_launch(t * nh, 1, 0, hd)?,
        "attention_backward",
    )?;
    let mut dq = uninit::<f32>(gpu, t * nh * hd)?;
    let f = gpu.function(&ATTENTION, "attention_bwd_dq")?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(q)
        .arg(k)
        .arg(v)
        .arg(dout)
        .arg(lse)
        .arg(&dvec)
        .arg(seq_start);
    l.arg(&t32)
        .arg(&nh32)
        .arg(&nkv32)
        .arg(&hd32)
        .arg(&scale)
        .arg(&mut dq);
    run(
        l,
        plan::attention_launch(t, nh, 2, hd)?,
        "attention_backward",
    )?;
    let mut dk = uninit::<f32>(gpu, t * nkv * hd)?;
    let mut dv = uninit::<f32>(gpu, t * nkv * hd)?;
    let f = gpu.function(&ATTENTION, "attention_bwd_dkv")?;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(q)
        .arg(k)
        .arg(v)
        .arg(dout)
        .arg(lse)
        .arg(&dvec)
        .arg(seq_end);
    l.arg(&t32)
        .arg(&nh32)
        .arg(&nkv32)
        .arg(&hd32)
        .arg(&scale)
        .arg(&mut dk)
        .arg(&mut dv);
    run(
        l,
        plan::attention_launch(t, nkv, 2, hd)?,
        "attention_backward",
    )?;
    Ok((dq, dk, dv))
}

/// The per-layer key and value pools of the decoding cache, [n_blocks, KV_BLOCK, kv_dim].
pub struct KvPools {
    pub k: CudaSlice<f32>,
    pub v: CudaSlice<f32>,
}

/// Writes row r's new key and value (k_new, v_new [rows, kv_dim]) at position lens_before[r].
#[allow(clippy::too_many_arguments)]
pub fn kv_append(
    gpu: &Gpu,
    k_new: &CudaSlice<f32>,
    v_new: &CudaSlice<f32>,
    table: &CudaSlice<u32>,
    lens_before: &CudaSlice<u32>,
    rows: usize,
    max_blocks: usize,
    kv_dim: usize,
    pools: &mut KvPools,
) -> Result<()> {
    check_len("kv_append", "k_new", k_new, rows * kv_dim)?;
    check_len("kv_append", "v_new", v_new, rows * kv_dim)?;
    check_len("kv_append", "table", table, rows * max_blocks)?;
    check_len("kv_append", "lens_before", lens_before, rows)?;
    let f = gpu.function(&ATTENTION, "kv_append")?;
    let (r32, mb32, b32, kd32) = (
        rows as i32,
        max_blocks as i32,
        plan::KV_BLOCK as i32,
        kv_dim as i32,
    );
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(k_new)
        .arg(v_new)
        .arg(table)
        .arg(lens_before)
        .arg(&r32)
        .arg(&mb32)
        .arg(&b32);
    l.arg(&kd32).arg(&mut pools.k).arg(&mut pools.v);
    run(l, Launch::elementwise(rows * kv_dim)?, "kv_append")?;
    Ok(())
}

/// pools[slots[i]] = (k, v)[src_rows[i]] for every i (a prompt's cache into its rows' blocks).
#[allow(clippy::too_many_arguments)]
pub fn kv_write_rows(
    gpu: &Gpu,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    src_rows: &CudaSlice<u32>,
    slots: &CudaSlice<u32>,
    n: usize,
    kv_dim: usize,
    pools: &mut KvPools,
) -> Result<()> {
    check_len("kv_write_rows", "src_rows", src_rows, n)?;
    check_len("kv_write_rows", "slots", slots, n)?;
    let f = gpu.function(&ATTENTION, "kv_write_rows")?;
    let (n32, kd32) = (n as i32, kv_dim as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(k)
        .arg(v)
        .arg(src_rows)
        .arg(slots)
        .arg(&n32)
        .arg(&kd32);
    l.arg(&mut pools.k).arg(&mut pools.v);
    run(l, Launch::elementwise(n * kv_dim)?, "kv_write_rows")?;
    Ok(())
}

/// Decoding attention of q [rows, nh, hd] over each row's `lens[r]` cached positions.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    gpu: &Gpu,
    q: &CudaSlice<f32>,
    pools: &KvPools,
    table: &CudaSlice<u32>,
    lens: &CudaSlice<u32>,
    rows: usize,
    max_blocks: usize,
    d: AttentionDims,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    d.check()?;
    let (nh, nkv, hd) = (d.heads, d.kv_heads, d.head_dim);
    check_len("attention_decode", "q", q, rows * nh * hd)?;
    check_len("attention_decode", "out", out, rows * nh * hd)?;
    check_len("attention_decode", "table", table, rows * max_blocks)?;
    check_len("attention_decode", "lens", lens, rows)?;
    let f = gpu.function(&ATTENTION, "attention_decode_paged")?;
    let (mb32, b32, nh32, nkv32, hd32, scale) = (
        max_blocks as i32,
        plan::KV_BLOCK as i32,
        nh as i32,
        nkv as i32,
        hd as i32,
        d.scale(),
    );
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(q)
        .arg(&pools.k)
        .arg(&pools.v)
        .arg(table)
        .arg(lens)
        .arg(&mb32)
        .arg(&b32);
    l.arg(&nh32).arg(&nkv32).arg(&hd32).arg(&scale).arg(out);
    run(
        l,
        plan::attention_decode_launch(rows, nh, hd)?,
        "attention_decode",
    )?;
    Ok(())
}

// ---------------------------------------------------------------- output head

/// What the fused head returns per row (as `ops::LmHeadOutput`).
pub struct HeadOutput {
    pub logprobs: CudaSlice<f32>,
    pub entropy: CudaSlice<f32>,
    pub lse: CudaSlice<f32>,
}

/// Per-row log p(target) of the tempered distribution softmax(inv_t·W·h) (with entropy and
/// lse), chunked over the vocabulary: at most `budget` logits alive. h [rows, H] and W [V, H]
/// share the element type.
#[allow(clippy::too_many_arguments)]
pub fn lm_head<T: Elem>(
    gpu: &Gpu,
    h: &CudaSlice<T>,
    w: &CudaSlice<T>,
    targets: &CudaSlice<u32>,
    rows: usize,
    hidden: usize,
    vocab: usize,
    inv_t: f32,
    budget: usize,
) -> Result<HeadOutput> {
    check_len("lm_head", "h", h, rows * hidden)?;
    check_len("lm_head", "w", w, vocab * hidden)?;
    check_len("lm_head", "targets", targets, rows)?;
    let cols = plan::head_chunk_columns(budget, rows, vocab);
    let mut z = uninit::<f32>(gpu, rows * cols)?;
    let mut m = upload(gpu, &vec![f32::NEG_INFINITY; rows])?;
    let mut lsum = zeros::<f32>(gpu, rows)?;
    let mut s = zeros::<f32>(gpu, rows)?;
    // Every target lies in one chunk, whose fold writes it.
    let mut tgt = uninit::<f32>(gpu, rows)?;
    let fold = gpu.function(&LM_HEAD, "head_chunk_fold")?;
    let mut c0 = 0;
    while c0 < vocab {
        let c = cols.min(vocab - c0);
        let wc = w.slice(c0 * hidden..(c0 + c) * hidden);
        gemm_view(gpu, h, &wc, &mut z, rows, c, hidden, inv_t)?;
        let (c32, c032) = (c as i32, c0 as i32);
        let mut l = gpu.stream.launch_builder(&fold);
        l.arg(&z).arg(&c32).arg(&c032).arg(targets);
        l.arg(&mut m).arg(&mut lsum).arg(&mut s).arg(&mut tgt);
        run(l, plan::row_launch(rows)?, "lm_head")?;
        c0 += c;
    }
    let mut out = HeadOutput {
        logprobs: uninit(gpu, rows)?,
        entropy: uninit(gpu, rows)?,
        lse: uninit(gpu, rows)?,
    };
    let f = gpu.function(&LM_HEAD, "head_finish")?;
    let r32 = rows as i32;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&m).arg(&lsum).arg(&s).arg(&tgt).arg(&r32);
    l.arg(&mut out.logprobs)
        .arg(&mut out.entropy)
        .arg(&mut out.lse);
    run(l, Launch::elementwise(rows)?, "lm_head")?;
    Ok(out)
}

/// z[rows, c] = inv_t·h·W_cᵀ for a chunk view of W.
#[allow(clippy::too_many_arguments)]
fn gemm_view<T: Elem>(
    gpu: &Gpu,
    h: &CudaSlice<T>,
    wc: &cudarc::driver::CudaView<'_, T>,
    z: &mut CudaSlice<f32>,
    rows: usize,
    c: usize,
    hidden: usize,
    inv_t: f32,
) -> Result<()> {
    let stream = &gpu.stream;
    let (pa, _ga) = wc.device_ptr(stream);
    let (pb, _gb) = h.device_ptr(stream);
    let (pc, _gc) = z.device_ptr_mut(stream);
    let compute = if T::SUFFIX == "f32" {
        cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
    } else {
        cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let beta = 0.0f32;
    // SAFETY: wc is c × hidden, h rows × hidden, z at least rows × c (the chunk width).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *gpu.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            c as i32,
            rows as i32,
            hidden as i32,
            &inv_t as *const f32 as *const _,
            pa as *const _,
            T::CUDA_TYPE,
            hidden as i32,
            pb as *const _,
            T::CUDA_TYPE,
            hidden as i32,
            &beta as *const f32 as *const _,
            pc as *mut _,
            cudaDataType::CUDA_R_32F,
            c as i32,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(|e| anyhow!("cuda lm_head gemm: {e:?}"))
}

// ---------------------------------------------------------------- embedding

/// x[t, :] = table[ids[t], :] (x f32, table f32 or bf16).
pub fn embedding<T: Elem>(
    gpu: &Gpu,
    table: &CudaSlice<T>,
    ids: &CudaSlice<u32>,
    tokens: usize,
    h: usize,
    x: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("embedding", "x", x, tokens * h)?;
    check_len("embedding", "ids", ids, tokens)?;
    let f = gpu.function(&EMBEDDING, &format!("embedding_fwd_{}", T::SUFFIX))?;
    let h32 = h as i32;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(table).arg(ids).arg(&h32).arg(x);
    run(l, plan::row_launch(tokens)?, "embedding")?;
    Ok(())
}

/// d_table[id, :] += Σ_{t: ids[t] = id} dx[t, :], in token order per id (no atomics).
pub fn embedding_backward(
    gpu: &Gpu,
    dx: &CudaSlice<f32>,
    groups: &plan::IdGroups,
    h: usize,
    d_table: &mut CudaSlice<f32>,
) -> Result<()> {
    if groups.unique.is_empty() {
        return Ok(());
    }
    // Every row read (dx[token]) and written (d_table[id]) inside the buffers.
    let rows_of = |ids: &[u32]| ids.iter().max().map_or(0, |&m| m as usize + 1);
    check_len("embedding_backward", "dx", dx, rows_of(&groups.tokens) * h)?;
    check_len(
        "embedding_backward",
        "d_table",
        d_table,
        rows_of(&groups.unique) * h,
    )?;
    let unique = upload_u32(gpu, &groups.unique)?;
    let offsets = upload_u32(gpu, &groups.offsets)?;
    let tokens = upload_u32(gpu, &groups.tokens)?;
    let f = gpu.function(&EMBEDDING, "embedding_bwd")?;
    let h32 = h as i32;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(dx)
        .arg(&unique)
        .arg(&offsets)
        .arg(&tokens)
        .arg(&h32)
        .arg(d_table);
    run(
        l,
        plan::row_launch(groups.unique.len())?,
        "embedding_backward",
    )?;
    Ok(())
}

// ---------------------------------------------------------------- optimiser

/// The scalars of one AdamW step (computed on the host as optim::adamw does).
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub grad_scale: f32,
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub step_size: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

/// One AdamW update of the f32 master `p` (and its bf16 copy when given).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    gpu: &Gpu,
    p: &mut CudaSlice<f32>,
    g: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    n: usize,
    s: AdamWScalars,
    weight_bf16: Option<&mut CudaSlice<u16>>,
) -> Result<()> {
    for (name, len) in [("g", g.len()), ("m", m.len()), ("v", v.len())] {
        ensure!(
            len >= n,
            "cuda adamw: `{name}` holds {len} elements, {n} needed"
        );
    }
    let f = gpu.function(&OPTIM, "adamw_step")?;
    let n64 = n as u64;
    let null: u64 = 0;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(p)
        .arg(g)
        .arg(m)
        .arg(v)
        .arg(&n64)
        .arg(&s.grad_scale)
        .arg(&s.decay);
    l.arg(&s.one_minus_beta1)
        .arg(&s.beta2)
        .arg(&s.one_minus_beta2)
        .arg(&s.step_size);
    l.arg(&s.bias_correction2_sqrt).arg(&s.eps);
    match weight_bf16 {
        Some(w) => {
            l.arg(w);
        }
        None => {
            l.arg(&null);
        }
    }
    run(l, Launch::elementwise(n)?, "adamw")?;
    Ok(())
}

/// √(Σ over every tensor of Σ g²), summed in f64 in a fixed order.
pub fn global_grad_norm(gpu: &Gpu, grads: &[(&CudaSlice<f32>, usize)]) -> Result<f64> {
    const BLOCKS: usize = plan::GRAD_NORM_BLOCKS;
    let mut partial = uninit::<f64>(gpu, BLOCKS * grads.len().max(1))?;
    let f = gpu.function(&OPTIM, "sum_squares")?;
    for (i, (g, n)) in grads.iter().enumerate() {
        check_len("grad_norm", "gradient", g, *n)?;
        let n64 = *n as u64;
        let mut view = partial.slice_mut(i * BLOCKS..(i + 1) * BLOCKS);
        let mut l = gpu.stream.launch_builder(&f);
        l.arg(*g).arg(&n64).arg(&mut view);
        run(l, Some(plan::grad_norm_launch()), "grad_norm")?;
    }
    let mut total = uninit::<f64>(gpu, 1)?;
    let f = gpu.function(&OPTIM, "sum_f64")?;
    let n64 = (BLOCKS * grads.len()) as u64;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&partial).arg(&n64).arg(&mut total);
    run(l, Some(plan::sum_f64_launch()), "grad_norm")?;
    let total = download(gpu, &total)?;
    Ok(total[0].sqrt())
}

// ---------------------------------------------------------------- sampling

/// What one sampling launch returns per row.
pub struct Drawn {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// 0 ok, 1 non-finite logits.
    pub status: Vec<u32>,
}

/// Draws one token per row of `logits` [rows, vocab] (overwritten) on the GPU with the rows'
/// host-drawn uniforms (kernels/sampling.cu); only tokens, log-probs and status come back.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    gpu: &Gpu,
    logits: &mut CudaSlice<f32>,
    rows: usize,
    vocab: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    uniforms: &[f64],
) -> Result<Drawn> {
    check_len("sample", "logits", logits, rows * vocab)?;
    ensure!(
        uniforms.len() == rows,
        "cuda sample: {} uniforms for {rows} rows",
        uniforms.len()
    );
    let u = gpu.stream.clone_htod(uniforms).map_err(err("sample"))?;
    let mut tokens = uninit::<u32>(gpu, rows)?;
    let mut logprobs = uninit::<f32>(gpu, rows)?;
    let mut status = uninit::<u32>(gpu, rows)?;
    let f = gpu.function(&SAMPLING, "sample_rows")?;
    let (v32, k32) = (vocab as i32, top_k.min(i32::MAX as usize) as i32);
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(logits)
        .arg(&v32)
        .arg(&temperature)
        .arg(&k32)
        .arg(&top_p)
        .arg(&u);
    l.arg(&mut tokens).arg(&mut logprobs).arg(&mut status);
    run(l, plan::sample_launch(rows)?, "sample")?;
    let mut drawn = Drawn {
        tokens: download(gpu, &tokens)?,
        logprobs: download(gpu, &logprobs)?,
        status: download(gpu, &status)?,
    };
    drawn.tokens.truncate(rows);
    drawn.logprobs.truncate(rows);
    drawn.status.truncate(rows);
    Ok(drawn)
}
