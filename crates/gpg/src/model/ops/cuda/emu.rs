//! The CUDA kernels executed on the CPU, in the default test suite (no GPU, no CUDA toolkit, no
//! `cuda` feature): every module of [`super::sources::ALL`] — `kernels/common.cuh` followed by
//! its `.cu` file, the text NVRTC compiles — is compiled by the host's C++ compiler after
//! `emu/cuda_emu.hpp`, a header that emulates CUDA's execution model (grid and block loops,
//! threads as cooperative fibers, `__syncthreads`, warps of 32 lanes with shuffles, shared
//! memory, atomics, bit casts; its comment lists what is and is not emulated). The one textual
//! change: `extern __shared__ T name[];` becomes a pointer to the launch's dynamic shared
//! buffer (C++ has no such declaration).
//!
//! Kernels are launched by name with [`Launch`] geometry from the same `plan` functions the GPU
//! path uses and arguments pushed in the order of `ops.rs`, into [`DevBuf`]s: device-memory
//! stand-ins with 4 KiB guards of 0xff bytes on both sides (a write outside the buffer is an
//! error naming the kernel and argument; a read outside reads NaN), and outputs can start as
//! NaN (`DevBuf::poisoned`) so that an element a kernel fails to write shows. Each launch also
//! checks the argument count and sizes against the kernel's parameters, CUDA's limits (1024
//! threads, 48 KiB of dynamic shared memory) and `__launch_bounds__`.
//!
//! The library is built once per source text (a hash in the file name, under the system's temp
//! directory) with `$CXX`, else `c++`, `g++` or `clang++`; without any, the tests skip, saying
//! so.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::plan::Launch;
use super::sources::{kernel_definitions, Module, ALL};

/// The emulation header.
const HEADER: &str = include_str!("emu/cuda_emu.hpp");

/// Bytes of poison on each side of a [`DevBuf`].
const GUARD: usize = 4096;

/// `module`'s text (common header + source) with each `extern __shared__ T name[];` turned into
/// `T* name = emu::dynamic_shared<T>();`.
pub(crate) fn emulated_text(m: &Module) -> String {
    let text = m.text();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    const DECL: &str = "extern __shared__ ";
    while let Some(at) = rest.find(DECL) {
        out.push_str(&rest[..at]);
        let after = &rest[at + DECL.len()..];
        let end = after
            .find("[];")
            .unwrap_or_else(|| panic!("{}: `extern __shared__` without `[];`", m.name));
        let decl = after[..end].trim();
        let split = decl
            .rfind(|c: char| c.is_whitespace() || c == '*')
            .unwrap_or_else(|| panic!("{}: cannot read `extern __shared__ {decl}`", m.name));
        let (ty, name) = (decl[..=split].trim(), decl[split + 1..].trim());
        out.push_str(&format!("{ty}* {name} = emu::dynamic_shared<{ty}>();"));
        rest = &after[end + 3..];
    }
    out.push_str(rest);
    out
}

/// Kernels breaking CUDA's rules on purpose, for the emulator's own tests (not a GPU module).
pub(crate) const SELFTEST: Module = Module {
    name: "emu_selftest",
    source: include_str!("emu/selftest.cu"),
    kernels: &[
        "emu_mirror",
        "emu_shuffle_after_exit",
        "emu_divergent_barrier",
        "emu_shared_writes",
        "emu_write_past",
    ],
};

/// The one translation unit: the header, each module in its own namespace, one export each.
pub(crate) fn translation_unit() -> String {
    let mut tu = String::from(HEADER);
    for m in ALL.iter().chain([&SELFTEST]) {
        tu.push_str(&format!(
            "\nnamespace gpg_{} {{\n{}\n}}  // namespace gpg_{}\n",
            m.name,
            emulated_text(m),
            m.name
        ));
        for k in m.kernels {
            tu.push_str(&format!("EMU_EXPORT(gpg_{}, {k})\n", m.name));
        }
    }
    tu
}

/// Block and thread order of the emulated launches on this test thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Blocks, and the threads between two barriers, in index order.
    Forward,
    /// Both reversed: a race shows as a result that differs from the forward order's.
    Reverse,
}

thread_local! {
    static ORDER: Cell<Order> = const { Cell::new(Order::Forward) };
}

/// Runs `f` once in each order and asserts that the results are identical bit for bit (a data
/// race between barriers, or between blocks, makes them differ); returns the forward result.
pub(crate) fn in_both_orders(what: &str, f: impl Fn() -> Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    let bits = |r: &[Vec<f32>]| -> Vec<Vec<u32>> {
        r.iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    ORDER.with(|o| o.set(Order::Forward));
    let forward = f();
    ORDER.with(|o| o.set(Order::Reverse));
    let reverse = f();
    ORDER.with(|o| o.set(Order::Forward));
    assert!(
        bits(&forward) == bits(&reverse),
        "{what}: results depend on the order threads and blocks run in (a race)"
    );
    forward
}

#[repr(C)]
struct Config {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    order: u32,
}

type LaunchFn = unsafe extern "C" fn(*const Config, *mut *mut c_void, *const usize, usize) -> c_int;
type ErrorFn = unsafe extern "C" fn() -> *const c_char;

/// The compiled kernels.
pub(crate) struct Emu {
    lib: libloading::Library,
}

/// The C++ compiler to use: `$CXX`, else the first of c++, g++, clang++ that runs.
fn compiler() -> Option<String> {
    let mut names: Vec<String> = Vec::new();
    if let Ok(cxx) = std::env::var("CXX") {
        names.push(cxx);
    }
    names.extend(["c++", "g++", "clang++"].map(String::from));
    names.into_iter().find(|n| {
        Command::new(n)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

const FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-Wno-unused-variable",
];

fn build() -> Result<Option<PathBuf>, String> {
    let Some(cxx) = compiler() else {
        return Ok(None);
    };
    let tu = translation_unit();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tu.hash(&mut h);
    FLAGS.hash(&mut h);
    cxx.hash(&mut h);
    let dir = std::env::temp_dir().join("gpg-rl-cuda-emu");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let lib = dir.join(format!("kernels-{:016x}.so", h.finish()));
    if lib.exists() {
        return Ok(Some(lib));
    }
    let tag = format!("{:016x}-{}", h.finish(), std::process::id());
    let src = dir.join(format!("kernels-{tag}.cpp"));
    let tmp = dir.join(format!("kernels-{tag}.so.tmp"));
    std::fs::write(&src, &tu).map_err(|e| format!("writing {}: {e}", src.display()))?;
    let out = Command::new(&cxx)
        .args(FLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(|e| format!("running {cxx}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cxx} failed on the emulated kernels ({}):\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let _ = std::fs::remove_file(&src);
    std::fs::rename(&tmp, &lib).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    Ok(Some(lib))
}

/// The compiled kernels, or None (the caller's test passes, having printed why) when no C++
/// compiler exists. A compile error fails the test.
pub(crate) fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Option<Emu>> = OnceLock::new();
    EMU.get_or_init(|| match build() {
        Ok(None) => None,
        Ok(Some(path)) => {
            // SAFETY: our own library; its static initialisers only set up thread-locals.
            let lib = unsafe { libloading::Library::new(&path) }
                .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
            Some(Emu { lib })
        }
        Err(e) => panic!("{e}"),
    })
    .as_ref()
    .or_else(|| {
        eprintln!(
            "skipped: no C++ compiler ($CXX, c++, g++ or clang++) to run the CUDA kernels on \
             the CPU"
        );
        None
    })
}

/// `kernel`'s `__launch_bounds__(N)` in its source, if any.
fn launch_bounds(kernel: &str) -> Option<u32> {
    ALL.iter()
        .flat_map(|m| kernel_definitions(m.source))
        .find(|(name, _)| *name == kernel)
        .and_then(|(_, bounds)| bounds)
}

impl Emu {
    /// Launches `kernel` with `launch`'s geometry (None: nothing, as the GPU path) and `args`,
    /// in this thread's [`Order`]; then checks every buffer argument's guards.
    pub(crate) fn launch(
        &self,
        kernel: &str,
        launch: Option<Launch>,
        args: &Args<'_>,
    ) -> Result<(), String> {
        let Some(l) = launch else { return Ok(()) };
        let bound = launch_bounds(kernel);
        if l.block > 256 && bound.is_none_or(|b| b < l.block) {
            return Err(format!(
                "kernel {kernel} launched with {} threads per block without \
                 __launch_bounds__({}): the compiler may give it more registers than that many \
                 threads can have",
                l.block, l.block
            ));
        }
        if let Some(b) = bound {
            if l.block > b {
                return Err(format!(
                    "kernel {kernel}: {} threads per block, above its __launch_bounds__({b})",
                    l.block
                ));
            }
        }
        let cfg = Config {
            grid: [l.grid.0, l.grid.1, l.grid.2],
            block: [l.block, 1, 1],
            shared_bytes: l.shared_bytes,
            order: match ORDER.with(|o| o.get()) {
                Order::Forward => 0,
                Order::Reverse => 1,
            },
        };
        // SAFETY: the symbols have the signatures of EMU_EXPORT and emu_last_error; the
        // argument pointers point into `args.vals`, alive for the call; buffer arguments point
        // into live DevBufs (borrowed by `args`).
        unsafe {
            let f: libloading::Symbol<LaunchFn> = self
                .lib
                .get(format!("emu_launch_{kernel}\0").as_bytes())
                .map_err(|e| format!("no kernel {kernel}: {e}"))?;
            let mut vals = args.vals.clone();
            let mut ptrs: Vec<*mut c_void> = vals
                .iter_mut()
                .map(|v| v as *mut u64 as *mut c_void)
                .collect();
            let rc = f(
                &cfg,
                ptrs.as_mut_ptr(),
                args.sizes.as_ptr(),
                args.sizes.len(),
            );
            if rc != 0 {
                let e: libloading::Symbol<ErrorFn> = self
                    .lib
                    .get(b"emu_last_error\0")
                    .map_err(|e| e.to_string())?;
                return Err(CStr::from_ptr(e()).to_string_lossy().into_owned());
            }
        }
        for (i, g) in &args.guards {
            // SAFETY: the DevBuf is borrowed by `args` and so alive.
            if let Some(at) = unsafe { g.first_bad_guard() } {
                return Err(format!(
                    "kernel {kernel} wrote outside buffer argument {i} ({} bytes): at byte \
                     offset {at}",
                    g.bytes
                ));
            }
        }
        Ok(())
    }

    /// [`Emu::launch`], panicking with the emulator's error.
    #[track_caller]
    pub(crate) fn run(&self, kernel: &str, launch: Option<Launch>, args: &Args<'_>) {
        if let Err(e) = self.launch(kernel, launch, args) {
            panic!("{e}");
        }
    }
}

/// A guard region to check after a launch.
struct GuardCheck {
    base: *const u8,
    bytes: usize,
}

impl GuardCheck {
    /// The offset (relative to the buffer's start) of the first modified guard byte.
    unsafe fn first_bad_guard(&self) -> Option<isize> {
        let lo = std::slice::from_raw_parts(self.base, GUARD);
        if let Some(i) = lo.iter().position(|&b| b != 0xff) {
            return Some(i as isize - GUARD as isize);
        }
        let hi = std::slice::from_raw_parts(self.base.add(GUARD + self.bytes), GUARD);
        hi.iter()
            .position(|&b| b != 0xff)
            .map(|i| (self.bytes + i) as isize)
    }
}

/// A kernel's arguments, in order: buffers (their device pointer) and scalars, each with its
/// size, as cuLaunchKernel takes them.
#[derive(Default)]
pub(crate) struct Args<'a> {
    vals: Vec<u64>,
    sizes: Vec<usize>,
    guards: Vec<(usize, GuardCheck)>,
    _bufs: PhantomData<&'a ()>,
}

impl<'a> Args<'a> {
    pub(crate) fn new() -> Self {
        Args::default()
    }

    /// A buffer argument (the kernel may write it: the memory is the buffer's raw allocation).
    pub(crate) fn buf<T: Copy>(mut self, b: &'a DevBuf<T>) -> Self {
        self.guards.push((
            self.vals.len(),
            GuardCheck {
                base: b.base,
                bytes: b.n * std::mem::size_of::<T>(),
            },
        ));
        self.vals.push(b.ptr());
        self.sizes.push(8);
        self
    }

    /// A pointer `offset` elements into a buffer (a view, as `CudaSlice::slice`).
    pub(crate) fn buf_at<T: Copy>(mut self, b: &'a DevBuf<T>, offset: usize) -> Self {
        assert!(offset <= b.n, "view beyond the buffer");
        self.guards.push((
            self.vals.len(),
            GuardCheck {
                base: b.base,
                bytes: b.n * std::mem::size_of::<T>(),
            },
        ));
        self.vals
            .push(b.ptr() + (offset * std::mem::size_of::<T>()) as u64);
        self.sizes.push(8);
        self
    }

    /// A null pointer argument.
    pub(crate) fn null(mut self) -> Self {
        self.vals.push(0);
        self.sizes.push(8);
        self
    }

    pub(crate) fn i32(mut self, v: i32) -> Self {
        self.vals.push(v as u32 as u64);
        self.sizes.push(4);
        self
    }

    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.vals.push(v);
        self.sizes.push(8);
        self
    }

    pub(crate) fn f32(mut self, v: f32) -> Self {
        self.vals.push(v.to_bits() as u64);
        self.sizes.push(4);
        self
    }
}

/// Device memory on the host: `n` elements of T with [`GUARD`] bytes of 0xff on each side.
/// Kernels write through its raw pointer, so it holds no Rust reference to its data.
pub(crate) struct DevBuf<T> {
    base: *mut u8,
    n: usize,
    _t: PhantomData<T>,
}

impl<T: Copy> DevBuf<T> {
    fn layout(n: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(2 * GUARD + n * std::mem::size_of::<T>(), 256)
            .expect("buffer layout")
    }

    /// Every byte (guards and data) 0xff: for f32/f64 a NaN in every element, so an output
    /// element the kernel does not write shows.
    pub(crate) fn poisoned(n: usize) -> Self {
        let layout = Self::layout(n);
        // SAFETY: a non-zero-sized layout (the guards).
        let base = unsafe { std::alloc::alloc(layout) };
        assert!(!base.is_null(), "out of memory");
        // SAFETY: `base` holds layout.size() bytes.
        unsafe { std::ptr::write_bytes(base, 0xff, layout.size()) };
        DevBuf {
            base,
            n,
            _t: PhantomData,
        }
    }

    pub(crate) fn from_slice(data: &[T]) -> Self {
        let b = Self::poisoned(data.len());
        // SAFETY: the data region holds data.len() elements of T; alignment 256 + 4096.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), b.base.add(GUARD) as *mut T, data.len())
        };
        b
    }

    pub(crate) fn filled(n: usize, v: T) -> Self {
        Self::from_slice(&vec![v; n])
    }

    pub(crate) fn ptr(&self) -> u64 {
        // SAFETY: inside the allocation.
        unsafe { self.base.add(GUARD) as u64 }
    }

    /// Writes `data` at element `offset` (a host-to-device copy).
    pub(crate) fn write(&self, offset: usize, data: &[T]) {
        assert!(offset + data.len() <= self.n, "write beyond the buffer");
        // SAFETY: inside the data region; no reference to it is alive.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.base.add(GUARD) as *mut T).add(offset),
                data.len(),
            )
        };
    }

    pub(crate) fn to_vec(&self) -> Vec<T> {
        // SAFETY: n initialised elements of T (plain data: every bit pattern is a value).
        unsafe { std::slice::from_raw_parts(self.base.add(GUARD) as *const T, self.n).to_vec() }
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        let layout =
            std::alloc::Layout::from_size_align(2 * GUARD + self.n * std::mem::size_of::<T>(), 256)
                .expect("buffer layout");
        // SAFETY: allocated with this layout in `poisoned`.
        unsafe { std::alloc::dealloc(self.base, layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_declaration_is_the_only_rewrite() {
        for m in ALL {
            let (orig, emu) = (m.text(), emulated_text(m));
            let n = orig.matches("extern __shared__").count();
            assert_eq!(emu.matches("emu::dynamic_shared").count(), n, "{}", m.name);
            assert!(!emu.contains("extern __shared__"));
            // Everything else is the same text.
            if n == 0 {
                assert_eq!(orig, emu);
            }
        }
    }

    #[test]
    fn launch_bounds_are_read_from_the_sources() {
        assert_eq!(launch_bounds("sample_rows"), Some(1024));
        assert_eq!(launch_bounds("sum_squares"), Some(1024));
        assert_eq!(launch_bounds("add_f32"), None);
    }
}
