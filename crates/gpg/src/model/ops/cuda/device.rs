//! Opening a CUDA device, compiling the kernel modules with NVRTC (once per process and
//! device) and launching them on the device's one stream.
//!
//! Everything is enqueued on one stream, so work runs in program order and cudarc's per-buffer
//! event tracking is switched off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::{CompileOptions, Ptx};

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

/// Compiles `module` to PTX for `arch` (e.g. "sm_90"); the error holds NVRTC's log.
pub fn compile_for_arch(module: &Module, arch: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        bail!(
            "cuda: cannot compile kernel module `{}`: libnvrtc not found (looked for {}); put the \
             directory holding libnvrtc.so.13 on LD_LIBRARY_PATH",
            module.name,
            candidates("nvrtc")
        );
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(module.text(), opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => anyhow!(
            "cuda: NVRTC failed on kernel module `{}.cu` for {arch}:\n{}",
            module.name,
            log.to_string_lossy()
        ),
        other => anyhow!(
            "cuda: NVRTC failed on kernel module `{}.cu`: {other}",
            module.name
        ),
    })
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
                    let ptx = compile_for_arch(module, &self.arch)?;
                    let m = self.ctx.load_module(ptx).map_err(|e| {
                        anyhow!("cuda: loading kernel module `{}`: {e:?}", module.name)
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
