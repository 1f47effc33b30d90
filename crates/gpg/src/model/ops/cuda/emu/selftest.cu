// Kernels that break CUDA's rules on purpose, compiled only into the CPU emulator's library:
// the emulator's own tests check that it reports each (emu_tests.rs). Not a GPU module.

// Each thread publishes a value in dynamic shared memory and reads its mirror's slot.
// `sync` = 0 leaves out the barrier between the write and the read: a race.
extern "C" __global__ void emu_mirror(const float* in, int sync, float* out) {
    extern __shared__ float s[];
    int t = threadIdx.x;
    s[t] = in[blockIdx.x * blockDim.x + t];
    if (sync) __syncthreads();
    out[blockIdx.x * blockDim.x + t] = s[blockDim.x - 1 - t];
}

// Lane 0 leaves, then the warp shuffles with the full mask (undefined on the GPU).
extern "C" __global__ void emu_shuffle_after_exit(float* out) {
    if (threadIdx.x == 0) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Half a warp waits at __syncthreads, the other half at __syncwarp: a deadlock.
extern "C" __global__ void emu_divergent_barrier(float* out) {
    if (threadIdx.x < 16) __syncthreads();
    else __syncwarp();
    out[threadIdx.x] = 1.0f;
}

// Writes one float per thread into dynamic shared memory (launched with too little of it).
extern "C" __global__ void emu_shared_writes(float* out) {
    extern __shared__ float s[];
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// out[i] = 1 for i < n + extra: writes past a buffer of n when extra > 0.
extern "C" __global__ void emu_write_past(float* out, int n, int extra) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n + extra) out[i] = 1.0f;
}
