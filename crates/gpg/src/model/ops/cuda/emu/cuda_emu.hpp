// CUDA's execution model on the CPU, so that the kernel sources of kernels/*.cu run in the
// default test suite (no GPU, no CUDA toolkit): the test harness (emu.rs) compiles this header
// followed by each module's text (kernels/common.cuh + the .cu file, exactly what NVRTC gets)
// with the host's C++ compiler into one shared library, and launches the kernels through
// `emu_launch_<kernel>` with the grid, block and dynamic shared size of the host-side plan.
//
// What is emulated:
//   * a launch: the blocks of the grid one after another (in index order, or reversed), each
//     block's threads as cooperative fibers on the launching OS thread (own stacks; x86-64: a
//     12-instruction register switch, elsewhere ucontext);
//   * __syncthreads: a block barrier (exited threads count as arrived, as on the GPU); a
//     barrier some threads of a warp reach while others of the same warp wait at a warp
//     operation is a deadlock, reported as an error;
//   * warps: 32 consecutive threads; __shfl*_sync, __syncwarp, __ballot_sync/__any/__all are
//     warp barriers over the mask's lanes, with the values exchanged through per-warp slots; a
//     lane of the mask that has exited, or that is outside the block, is an error (undefined on
//     the GPU). Between barriers threads run one after another, in index order or reversed
//     (the launch's `order`), so a race (a value read before the barrier that publishes it) gives
//     different results in the two orders;
//   * __shared__: block-scope `thread_local` (one instance per launching OS thread, shared by
//     the block's fibers; blocks run one at a time). `extern __shared__ T name[]` (dynamic
//     shared memory) is the launch's buffer of exactly `shared_bytes`, 16-byte aligned, filled
//     with 0xff bytes (NaN) at each block's start and followed by a guard that must stay intact:
//     reading beyond the requested size or before writing reads NaN; writing beyond it is an
//     error naming the kernel. The harness rewrites that one declaration form (see emu.rs);
//   * launch limits: at most 1024 threads per block, 48 KiB of dynamic shared memory (the
//     default without an opt-in), grid y/z ≤ 65535;
//   * atomics (plain read-modify-write: fibers never interleave inside one), math intrinsics,
//     bit casts, __launch_bounds__ (checked by the harness against the launch).
// What is not: real warp scheduling and memory ordering beyond barriers, the GPU's math
// library's last-ulp results (expf, logf, rsqrtf are the host's), FMA contraction, timing,
// the driver, cuBLAS.

#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <array>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

struct Dim3 {
    unsigned x, y, z;
};

/// What the harness passes per launch.
struct Config {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
    /// 0: blocks and threads in index order; 1: both reversed.
    unsigned order;
};

enum State : unsigned char { READY, AT_BLOCK, AT_WARP, DONE };

struct Fiber {
    void* sp;
    Dim3 tid;
    unsigned linear;
    State state;
    unsigned mask;
#if !defined(__x86_64__)
    ucontext_t ctx;
#endif
};

static const size_t STACK_BYTES = 64 * 1024;
static const size_t SHARED_GUARD = 4096;
static const size_t SHARED_LIMIT = 48 * 1024;

struct Launch {
    Dim3 grid, block, bidx;
    unsigned threads;
    unsigned order;
    std::vector<Fiber> fibers;
    Fiber* cur;
    void* sched_sp;
#if !defined(__x86_64__)
    ucontext_t sched_ctx;
#endif
    void (*body)(void*);
    void* ctx;
    unsigned char* dyn;  // 16-byte aligned
    size_t dyn_bytes;
    std::vector<uint64_t> slots;  // per thread: the value it offers to its warp
    bool aborted;
    std::string error;
};

inline thread_local Launch* L = nullptr;
inline thread_local std::string last_error;
inline thread_local char* stack_arena = nullptr;
inline thread_local size_t stack_arena_fibers = 0;
inline thread_local std::vector<unsigned char> dyn_arena;

#if defined(__x86_64__)
// emu_switch(save, to): pushes the callee-saved registers and the FP control words, stores
// the stack pointer in *save, loads `to` and pops the same from there.
extern "C" void emu_switch(void** save, void* to);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

[[noreturn]] inline void fiber_exit();

inline void fiber_entry() {
    Launch* l = L;
    l->body(l->ctx);
    fiber_exit();
}

#if !defined(__x86_64__)
inline void fiber_entry_uc() { fiber_entry(); }
#endif

/// Back to the scheduler (the calling fiber's state is already set).
__attribute__((noinline)) inline void yield() {
    Launch* l = L;
#if defined(__x86_64__)
    emu_switch(&l->cur->sp, l->sched_sp);
#else
    swapcontext(&l->cur->ctx, &l->sched_ctx);
#endif
}

[[noreturn]] inline void fiber_exit() {
    L->cur->state = DONE;
    yield();
    __builtin_unreachable();
}

/// Ends the launch with an error (from inside a fiber).
[[noreturn]] inline void fail(const std::string& msg) {
    Launch* l = L;
    if (!l->aborted) {
        l->aborted = true;
        char where[160];
        snprintf(where, sizeof where, " (block (%u,%u,%u), thread (%u,%u,%u))", l->bidx.x,
                 l->bidx.y, l->bidx.z, l->cur->tid.x, l->cur->tid.y, l->cur->tid.z);
        l->error = msg + where;
    }
    fiber_exit();
}

inline void init_fiber(Launch* l, unsigned i, char* stack) {
    Fiber& f = l->fibers[i];
    f.linear = i;
    f.tid.x = i % l->block.x;
    f.tid.y = (i / l->block.x) % l->block.y;
    f.tid.z = i / (l->block.x * l->block.y);
    f.state = READY;
    f.mask = 0;
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)(stack + STACK_BYTES)) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                           // alignment: fiber_entry starts at rsp ≡ 8 (mod 16)
    *--sp = (uint64_t)(&fiber_entry);    // emu_switch's `ret` lands here
    for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp rbx r12 r13 r14 r15
    uint64_t csr = 0;
    asm volatile("stmxcsr (%0)\n\tfnstcw 4(%0)" : : "r"(&csr) : "memory");
    *--sp = csr;
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = STACK_BYTES;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())fiber_entry_uc, 0);
#endif
}

inline void resume(Launch* l, Fiber& f) {
    l->cur = &f;
#if defined(__x86_64__)
    emu_switch(&l->sched_sp, f.sp);
#else
    swapcontext(&l->sched_ctx, &f.ctx);
#endif
}

/// Runs the current block to completion; false (with l->error) on a deadlock or a fiber's error.
inline bool run_block(Launch* l) {
    unsigned n = l->threads;
    for (unsigned i = 0; i < n; ++i) init_fiber(l, i, stack_arena + (size_t)i * STACK_BYTES);
    memset(l->dyn, 0xff, l->dyn_bytes + SHARED_GUARD);
    unsigned warps = (n + 31) / 32;
    for (;;) {
        for (unsigned k = 0; k < n; ++k) {
            unsigned i = l->order ? n - 1 - k : k;
            Fiber& f = l->fibers[i];
            if (f.state != READY) continue;
            resume(l, f);
            if (l->aborted) return false;
        }
        // Every fiber is now done or waiting at a barrier.
        bool released = false, all_done = true;
        for (unsigned w = 0; w < warps; ++w) {
            unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
            unsigned mask = 0;
            bool any = false;
            for (unsigned i = lo; i < hi; ++i)
                if (l->fibers[i].state == AT_WARP) {
                    mask |= l->fibers[i].mask;
                    any = true;
                }
            if (!any) continue;
            bool ready = true;
            for (unsigned b = 0; b < 32; ++b) {
                if (!(mask >> b & 1u)) continue;
                unsigned i = lo + b;
                char msg[200];
                if (i >= n) {
                    snprintf(msg, sizeof msg,
                             "warp operation with mask 0x%08x names lane %u of warp %u, outside "
                             "the block of %u threads",
                             mask, b, w, n);
                    l->error = msg;
                    return false;
                }
                State s = l->fibers[i].state;
                if (s == DONE) {
                    snprintf(msg, sizeof msg,
                             "warp operation with mask 0x%08x in warp %u: lane %u has exited "
                             "(undefined on the GPU)",
                             mask, w, b);
                    l->error = msg;
                    return false;
                }
                if (s != AT_WARP) ready = false;
            }
            if (!ready) continue;
            for (unsigned b = 0; b < 32; ++b)
                if (mask >> b & 1u) l->fibers[lo + b].state = READY;
            released = true;
        }
        if (released) continue;
        unsigned waiting = 0, at_warp = 0;
        for (unsigned i = 0; i < n; ++i) {
            State s = l->fibers[i].state;
            if (s != DONE) all_done = false;
            if (s == AT_BLOCK) ++waiting;
            if (s == AT_WARP) ++at_warp;
        }
        if (all_done) break;
        if (at_warp == 0 && waiting > 0) {
            for (unsigned i = 0; i < n; ++i)
                if (l->fibers[i].state == AT_BLOCK) l->fibers[i].state = READY;
            continue;
        }
        char msg[200];
        snprintf(msg, sizeof msg,
                 "deadlock in block (%u,%u,%u): %u threads wait at __syncthreads while %u wait "
                 "at a warp operation whose lanes never all arrive",
                 l->bidx.x, l->bidx.y, l->bidx.z, waiting, at_warp);
        l->error = msg;
        return false;
    }
    for (size_t i = 0; i < SHARED_GUARD; ++i) {
        if (l->dyn[l->dyn_bytes + i] != 0xff) {
            char msg[200];
            snprintf(msg, sizeof msg,
                     "block (%u,%u,%u) wrote byte %zu of dynamic shared memory, beyond the %zu "
                     "bytes the launch gives",
                     l->bidx.x, l->bidx.y, l->bidx.z, l->dyn_bytes + i, l->dyn_bytes);
            l->error = msg;
            return false;
        }
    }
    return true;
}

/// Runs `body(ctx)` as every thread of every block of the launch; 0 or -1 (see last_error).
inline int run(const Config* c, void (*body)(void*), void* ctx) {
    Launch l;
    l.grid = {c->grid[0], c->grid[1], c->grid[2]};
    l.block = {c->block[0], c->block[1], c->block[2]};
    l.threads = c->block[0] * c->block[1] * c->block[2];
    l.order = c->order;
    l.body = body;
    l.ctx = ctx;
    l.aborted = false;
    l.cur = nullptr;
    l.sched_sp = nullptr;
    char msg[200];
    if (l.threads == 0 || l.threads > 1024 || c->block[2] > 64) {
        snprintf(msg, sizeof msg, "block of %u×%u×%u threads: CUDA allows 1 to 1024 (z ≤ 64)",
                 c->block[0], c->block[1], c->block[2]);
        last_error = msg;
        return -1;
    }
    if (c->grid[0] == 0 || c->grid[1] == 0 || c->grid[2] == 0 || c->grid[0] > 0x7fffffffu ||
        c->grid[1] > 65535 || c->grid[2] > 65535) {
        snprintf(msg, sizeof msg, "grid of %u×%u×%u blocks: CUDA cannot launch it", c->grid[0],
                 c->grid[1], c->grid[2]);
        last_error = msg;
        return -1;
    }
    if (c->shared_bytes > SHARED_LIMIT) {
        snprintf(msg, sizeof msg,
                 "%u bytes of dynamic shared memory: above the 48 KiB a launch gets without "
                 "cudaFuncAttributeMaxDynamicSharedMemorySize",
                 c->shared_bytes);
        last_error = msg;
        return -1;
    }
    if (stack_arena_fibers < l.threads) {
        free(stack_arena);
        stack_arena = (char*)aligned_alloc(4096, (size_t)l.threads * STACK_BYTES);
        stack_arena_fibers = l.threads;
    }
    l.fibers.resize(l.threads);
    l.slots.assign(((l.threads + 31) / 32) * 32, 0);
    dyn_arena.resize(c->shared_bytes + SHARED_GUARD + 16);
    uintptr_t base = ((uintptr_t)dyn_arena.data() + 15) & ~(uintptr_t)15;
    l.dyn = (unsigned char*)base;
    l.dyn_bytes = c->shared_bytes;
    Launch* saved = L;
    L = &l;
    uint64_t blocks = (uint64_t)l.grid.x * l.grid.y * l.grid.z;
    int rc = 0;
    for (uint64_t k = 0; k < blocks; ++k) {
        uint64_t b = l.order ? blocks - 1 - k : k;
        l.bidx.x = (unsigned)(b % l.grid.x);
        l.bidx.y = (unsigned)((b / l.grid.x) % l.grid.y);
        l.bidx.z = (unsigned)(b / ((uint64_t)l.grid.x * l.grid.y));
        if (!run_block(&l)) {
            last_error = l.error;
            rc = -1;
            break;
        }
    }
    L = saved;
    return rc;
}

template <typename... A, size_t... I>
inline void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<A*>(args[I])...);
}

template <typename... A>
struct Bound {
    void (*k)(A...);
    void** args;
    static void body(void* p) {
        Bound* b = static_cast<Bound*>(p);
        call(b->k, b->args, std::index_sequence_for<A...>{});
    }
};

/// Launches kernel `k` with the arguments `args[i]` (pointers to values, as cuLaunchKernel
/// takes them) whose sizes must be the kernel's parameter sizes.
template <typename... A>
inline int launch(const char* name, void (*k)(A...), const Config* c, void** args,
                  const size_t* sizes, size_t nargs) {
    std::array<size_t, sizeof...(A)> want = {sizeof(A)...};
    char msg[200];
    if (nargs != want.size()) {
        snprintf(msg, sizeof msg, "kernel %s takes %zu arguments, %zu given", name, want.size(),
                 nargs);
        last_error = msg;
        return -1;
    }
    for (size_t i = 0; i < nargs; ++i) {
        if (sizes[i] != want[i]) {
            snprintf(msg, sizeof msg,
                     "kernel %s: argument %zu is %zu bytes, the parameter is %zu bytes", name, i,
                     sizes[i], want[i]);
            last_error = msg;
            return -1;
        }
    }
    Bound<A...> b{k, args};
    int rc = run(c, &Bound<A...>::body, &b);
    if (rc != 0) last_error = std::string("kernel ") + name + ": " + last_error;
    return rc;
}

// ---- the device-side API ----

inline void block_barrier() {
    L->cur->state = AT_BLOCK;
    yield();
}

inline void warp_barrier(unsigned mask) {
    Fiber* f = L->cur;
    unsigned lane = f->linear & 31;
    if (!(mask >> lane & 1u)) {
        char msg[120];
        snprintf(msg, sizeof msg, "warp operation with mask 0x%08x called by lane %u, not in it",
                 mask, lane);
        fail(msg);
    }
    f->mask = mask;
    f->state = AT_WARP;
    yield();
}

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

/// The value lane `src(lane)` offered, after a warp barrier over `mask`.
template <typename T, typename Src>
inline T exchange(unsigned mask, T v, Src src) {
    Launch* l = L;
    unsigned i = l->cur->linear, lane = i & 31, w0 = i & ~31u;
    l->slots[i] = to_bits(v);
    warp_barrier(mask);
    int s = src(lane);
    T r = v;
    if (s >= 0) {
        if (!(mask >> s & 1u)) {
            char msg[120];
            snprintf(msg, sizeof msg, "shuffle reads lane %d, outside the mask 0x%08x", s, mask);
            fail(msg);
        }
        r = from_bits<T>(l->slots[w0 + s]);
    }
    warp_barrier(mask);  // nobody overwrites a slot before every lane has read it
    return r;
}

inline unsigned ballot(unsigned mask, int pred) {
    Launch* l = L;
    unsigned i = l->cur->linear, w0 = i & ~31u;
    l->slots[i] = pred ? 1 : 0;
    warp_barrier(mask);
    unsigned r = 0;
    for (unsigned b = 0; b < 32; ++b)
        if ((mask >> b & 1u) && l->slots[w0 + b]) r |= 1u << b;
    warp_barrier(mask);
    return r;
}

template <typename T>
inline T* dynamic_shared() {
    return reinterpret_cast<T*>(L->dyn);
}

}  // namespace emu

// ---- CUDA's names ----

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __constant__ const

#define threadIdx (emu::L->cur->tid)
#define blockIdx (emu::L->bidx)
#define blockDim (emu::L->block)
#define gridDim (emu::L->grid)
#define warpSize 32

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_barrier(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::exchange(mask, v, [&](unsigned lane) {
        return (int)((lane & ~(unsigned)(width - 1)) + ((unsigned)src & (width - 1)));
    });
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::exchange(mask, v, [&](unsigned lane) {
        unsigned s = lane ^ (unsigned)lane_mask;
        return (int)((s & ~(unsigned)(width - 1)) == (lane & ~(unsigned)(width - 1)) ? s : lane);
    });
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::exchange(mask, v, [&](unsigned lane) {
        unsigned s = lane + delta;
        return (int)((s & (width - 1)) >= (lane & (width - 1)) && s / width == lane / width ? s
                                                                                            : lane);
    });
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::exchange(mask, v, [&](unsigned lane) {
        return (int)((lane & (width - 1)) >= delta ? lane - delta : lane);
    });
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu::ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return emu::ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return emu::ballot(mask, pred) == mask; }

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double d) { long long x; memcpy(&x, &d, 8); return x; }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
using std::isfinite;
using std::isinf;
using std::isnan;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Atomics: fibers never interleave inside one call, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T>
inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <typename T>
inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <typename T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

#define EMU_EXPORT(ns, kernel)                                                              \
    extern "C" __attribute__((visibility("default"))) int emu_launch_##kernel(              \
        const emu::Config* c, void** args, const size_t* sizes, size_t nargs) {             \
        return emu::launch(#kernel, &ns::kernel, c, args, sizes, nargs);                    \
    }

extern "C" __attribute__((visibility("default"))) const char* emu_last_error() {
    return emu::last_error.c_str();
}
