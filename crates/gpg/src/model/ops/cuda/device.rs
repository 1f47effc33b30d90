//! Opening a CUDA device, compiling the kernel modules with NVRTC (once per process and
//! device) and launching them on the device's one stream.
//!
//! Everything is enqueued on one stream, so work runs in program order and cudarc's per-buffer
//! event tracking is switched off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::sources::Module;

/// cudarc's probe of one library (tries to dlopen each candidate name).
type Probe = unsafe fn() -> bool;

/// The shared libraries a GPU run loads: name, what it is, cudarc's probe.
fn libraries() -> [(&'static str, &'static str, Probe); 4] {
    [
        (
            "cuda",
            "the NVIDIA driver",
            cudarc::driver::sys::is_culib_present,
        ),
        (
            "nvrtc",
            "NVRTC, the CUDA runtime compiler (pip: nvidia-cuda-nvrtc)",
            cudarc::nvrtc::sys::is_culib_present,
        ),
        (
            "cublas",
            "cuBLAS (pip: nvidia-cublas)",
            cudarc::cublas::sys::is_culib_present,
        ),
        (
            "cublasLt",
            "cuBLASLt (pip: nvidia-cublas)",
            cudarc::cublaslt::sys::is_culib_present,
        ),
    ]
}

/// The file names cudarc tries for `lib` (libcuda.so, libcuda.so.1, …), for messages.
fn candidates(lib: &str) -> String {
    let mut names: Vec<String> = Vec::new();
    for n in cudarc::get_lib_name_candidates(lib) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names.join(", ")
}

/// Whether libnvrtc can be loaded (the kernels can be compiled on this machine).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiled kernel images of this process, by (module, arch): a module is compiled once per
/// process whatever the number of devices opened (each test, bench and decoder opens its own).
type ImageCache = Mutex<HashMap<(&'static str, String), Arc<Vec<u8>>>>;

fn image_cache() -> &'static ImageCache {
    static CACHE: OnceLock<ImageCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// NVRTC's version (major, minor), for messages.
fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (rc == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// The CUDA version the driver supports (e.g. 12080 → "12.8"), for messages.
fn driver_version() -> String {
    let mut v = 0;
    // SAFETY: one out-parameter.
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if rc == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        format!("{}.{}", v / 1000, v % 1000 / 10)
    } else {
        "unknown".into()
    }
}

/// Compiles `module` for the real architecture `arch` (e.g. "sm_90") to a CUBIN: machine code
/// the driver loads as is, so an NVRTC newer than the driver's CUDA version still works (PTX
/// would have to be JIT-compiled by the driver, which refuses PTX newer than itself). The
/// error holds NVRTC's log. Cached per process.
pub fn compile_for_arch(module: &Module, arch: &str) -> Result<Arc<Vec<u8>>> {
    if !nvrtc_available() {
        bail!(
            "cuda: cannot compile kernel module `{}`: libnvrtc not found (looked for {}); put the \
             directory holding libnvrtc.so.13 on LD_LIBRARY_PATH",
            module.name,
            candidates("nvrtc")
        );
    }
    let key = (module.name, arch.to_string());
    if let Some(image) = image_cache()
        .lock()
        .map_err(|_| anyhow!("cuda: kernel cache poisoned"))?
        .get(&key)
    {
        return Ok(image.clone());
    }
    let image = Arc::new(compile_cubin(module, arch)?);
    image_cache()
        .lock()
        .map_err(|_| anyhow!("cuda: kernel cache poisoned"))?
        .insert(key, image.clone());
    Ok(image)
}

fn compile_cubin(module: &Module, arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let src = std::ffi::CString::new(module.text())
        .map_err(|_| anyhow!("cuda: kernel module `{}` holds a NUL byte", module.name))?;
    let name = std::ffi::CString::new(format!("{}.cu", module.name))
        .map_err(|_| anyhow!("cuda: bad module name"))?;
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| anyhow!("cuda: NVRTC on `{}.cu`: {e:?}", module.name))?;
    let opts = [format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    // SAFETY: `prog` was created above and is destroyed once, below.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let out = match compiled {
            Err(_) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&c| c != 0)
                    .collect();
                Err(anyhow!(
                    "cuda: NVRTC failed on kernel module `{}.cu` for {arch}:\n{}",
                    module.name,
                    String::from_utf8_lossy(&log)
                ))
            }
            Ok(()) => {
                let mut size = 0usize;
                let rc = sys::nvrtcGetCUBINSize(prog, &mut size);
                if rc != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                    Err(anyhow!(
                        "cuda: NVRTC gave no CUBIN for `{}.cu` ({arch} must be a real \
                         architecture, sm_XY): {rc:?}",
                        module.name
                    ))
                } else {
                    let mut image = vec![0u8; size];
                    match sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut _) {
                        sys::nvrtcResult::NVRTC_SUCCESS => Ok(image),
                        rc => Err(anyhow!("cuda: NVRTC CUBIN of `{}.cu`: {rc:?}", module.name)),
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

/// Raises the device's default memory pool's release threshold to "never": cudarc allocates
/// with cuMemAllocAsync, and with the default threshold (0) every synchronisation hands the
/// pool's free memory back to the driver, so each step re-maps its buffers.
fn keep_pool_memory(ordinal: usize) -> Result<()> {
    use cudarc::driver::sys;
    let mut dev: sys::CUdevice = 0;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: out-parameters and a u64 attribute value, as cuMemPoolSetAttribute documents.
    unsafe {
        let rc = sys::cuDeviceGet(&mut dev, ordinal as i32);
        ensure!(rc == sys::CUresult::CUDA_SUCCESS, "cuDeviceGet: {rc:?}");
        let rc = sys::cuDeviceGetDefaultMemPool(&mut pool, dev);
        ensure!(
            rc == sys::CUresult::CUDA_SUCCESS,
            "cuDeviceGetDefaultMemPool: {rc:?}"
        );
        let rc = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        );
        ensure!(
            rc == sys::CUresult::CUDA_SUCCESS,
            "cuMemPoolSetAttribute: {rc:?}"
        );
    }
    Ok(())
}

/// One opened CUDA device: context, its stream, a cuBLAS handle and the compiled modules.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    ordinal: usize,
    arch: String,
    description: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl Gpu {
    /// Opens device `ordinal`. Without a driver (or without NVRTC / cuBLAS) the error names the
    /// library and every file name that was looked for; nothing panics.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        let name = format!("cuda:{ordinal}");
        for (lib, what, present) in libraries() {
            // SAFETY: the probe only tries to dlopen the candidate names.
            if !unsafe { present() } {
                bail!(
                    "device `{name}`: {what} is not installed or not on the library path: looked \
                     for {} (LD_LIBRARY_PATH and the system's library directories). Use \
                     `--device cpu` on a machine without an NVIDIA GPU",
                    candidates(lib)
                );
            }
        }
        let count = CudaContext::device_count()
            .map_err(|e| anyhow!("device `{name}`: the CUDA driver failed to start: {e:?}"))?;
        if ordinal as i32 >= count {
            bail!(
                "device `{name}`: the driver sees {count} CUDA device(s) (cuda:0..cuda:{})",
                count - 1
            );
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("device `{name}`: cannot create a CUDA context: {e:?}"))?;
        // SAFETY: every launch and copy goes through the one stream below, in program order.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("device `{name}`: {e:?}"))?;
        let gpu_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // Without it, memory is returned to the driver at every synchronisation (slower, not
        // wrong): a failure is reported and the device is used anyway.
        if let Err(e) = keep_pool_memory(ordinal) {
            eprintln!("warning: device `{name}`: memory pool threshold not raised: {e:#}");
        }
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow!("device `{name}`: cannot create a cuBLAS handle: {e:?}"))?;
        let arch = format!("sm_{major}{minor}");
        Ok(Arc::new(Gpu {
            description: format!("{name} ({gpu_name}, {arch})"),
            ctx,
            stream,
            blas,
            ordinal,
            arch,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// "cuda:0 (NVIDIA H200, sm_90)".
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Kernel `kernel` of `module`, compiling and loading the module on first use.
    pub fn function(&self, module: &Module, kernel: &str) -> Result<CudaFunction> {
        let loaded = {
            let mut modules = self
                .modules
                .lock()
                .map_err(|_| anyhow!("cuda: module cache poisoned"))?;
            match modules.get(module.name) {
                Some(m) => m.clone(),
                None => {
                    let image = compile_for_arch(module, &self.arch)?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_binary(image.as_ref().clone()))
                        .map_err(|e| {
                            anyhow!(
                                "cuda: loading kernel module `{}` ({} CUBIN from NVRTC {}, \
                                 driver supports CUDA {}): {e:?}",
                                module.name,
                                self.arch,
                                nvrtc_version().map_or("?".into(), |(a, b)| format!("{a}.{b}")),
                                driver_version()
                            )
                        })?;
                    modules.insert(module.name, m.clone());
                    m
                }
            }
        };
        loaded
            .load_function(kernel)
            .map_err(|e| anyhow!("cuda: kernel `{kernel}` of `{}`: {e:?}", module.name))
    }

    /// Waits for the stream's work; surfaces an asynchronous kernel failure with `what`.
    pub fn sync(&self, what: &str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("cuda: {what}: {e:?}"))
            .context("a kernel failed on the GPU")
    }
}
