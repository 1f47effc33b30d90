//! The NVRTC compile check of every kernel in the default build (no `cuda` feature): the test
//! loads libnvrtc.so.13 with `libloading` (a dev-dependency), compiles each module of
//! [`super::sources::ALL`] for sm_90 and checks that the PTX defines every declared kernel.
//! Runs wherever libnvrtc loads (CI installs pip's nvidia-cuda-nvrtc wheel with
//! .ci/install-nvrtc.sh: no GPU needed) and skips, printing why, elsewhere.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use super::sources::ALL;

type Program = *mut c_void;
type Create = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type Compile = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> c_int;
type Size = unsafe extern "C" fn(Program, *mut usize) -> c_int;
type Get = unsafe extern "C" fn(Program, *mut c_char) -> c_int;
type Destroy = unsafe extern "C" fn(*mut Program) -> c_int;

/// Compiles `source` for `arch`; Ok((PTX, CUBIN size)) or Err(NVRTC's log). The GPU path
/// loads the CUBIN (machine code for the real architecture), so it must exist.
fn compile(
    lib: &libloading::Library,
    name: &str,
    source: &str,
    arch: &str,
) -> Result<(String, usize), String> {
    // SAFETY: the symbols have NVRTC's documented signatures; every buffer is sized by NVRTC.
    unsafe {
        let create: libloading::Symbol<Create> =
            lib.get(b"nvrtcCreateProgram").map_err(|e| e.to_string())?;
        let compile: libloading::Symbol<Compile> =
            lib.get(b"nvrtcCompileProgram").map_err(|e| e.to_string())?;
        let ptx_size: libloading::Symbol<Size> =
            lib.get(b"nvrtcGetPTXSize").map_err(|e| e.to_string())?;
        let get_ptx: libloading::Symbol<Get> =
            lib.get(b"nvrtcGetPTX").map_err(|e| e.to_string())?;
        let cubin_size: libloading::Symbol<Size> =
            lib.get(b"nvrtcGetCUBINSize").map_err(|e| e.to_string())?;
        let log_size: libloading::Symbol<Size> = lib
            .get(b"nvrtcGetProgramLogSize")
            .map_err(|e| e.to_string())?;
        let get_log: libloading::Symbol<Get> =
            lib.get(b"nvrtcGetProgramLog").map_err(|e| e.to_string())?;
        let destroy: libloading::Symbol<Destroy> =
            lib.get(b"nvrtcDestroyProgram").map_err(|e| e.to_string())?;
        let src = CString::new(source).map_err(|e| e.to_string())?;
        let cname = CString::new(format!("{name}.cu")).map_err(|e| e.to_string())?;
        let mut prog: Program = std::ptr::null_mut();
        if create(
            &mut prog,
            src.as_ptr(),
            cname.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        ) != 0
        {
            return Err("nvrtcCreateProgram failed".into());
        }
        let opts = [
            CString::new(format!("--gpu-architecture={arch}")).map_err(|e| e.to_string())?,
            CString::new("--std=c++17").map_err(|e| e.to_string())?,
        ];
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let status = compile(prog, ptrs.len() as c_int, ptrs.as_ptr());
        let result = if status != 0 {
            let mut n = 0usize;
            log_size(prog, &mut n);
            let mut buf = vec![0 as c_char; n.max(1)];
            get_log(prog, buf.as_mut_ptr());
            Err(CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
        } else {
            let mut n = 0usize;
            ptx_size(prog, &mut n);
            let mut buf = vec![0 as c_char; n.max(1)];
            get_ptx(prog, buf.as_mut_ptr());
            let mut cubin = 0usize;
            cubin_size(prog, &mut cubin);
            Ok((
                CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
                cubin,
            ))
        };
        destroy(&mut prog);
        result
    }
}

#[test]
fn every_kernel_compiles_with_nvrtc_for_sm_90_without_the_feature() {
    // SAFETY: loading NVRTC runs no foreign initialisers beyond the library's own.
    let lib = match unsafe { libloading::Library::new("libnvrtc.so.13") } {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "skipped: libnvrtc.so.13 not loadable ({e}); run .ci/install-nvrtc.sh and put the \
                 directory it prints on LD_LIBRARY_PATH, as .ci/run does"
            );
            return;
        }
    };
    for m in ALL {
        let (ptx, cubin) = compile(&lib, m.name, &m.text(), "sm_90")
            .unwrap_or_else(|log| panic!("NVRTC failed on {}.cu:\n{log}", m.name));
        assert!(cubin > 0, "{}.cu: no CUBIN for sm_90", m.name);
        assert!(ptx.contains(".target sm_90"), "{}", m.name);
        for k in m.kernels {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "kernel {k} missing from {}.cu's PTX",
                m.name
            );
        }
        if let Some(v) = ptx.lines().find(|l| l.starts_with(".version")) {
            eprintln!(
                "{}.cu: {} kernels, PTX {}, CUBIN {cubin} bytes",
                m.name,
                m.kernels.len(),
                v.trim_start_matches(".version").trim()
            );
        }
    }
}
