#!/usr/bin/env bash
# Device check A: CORRECTNESS of the CUDA engine, ≤ 5 min on the device machine, useful alone.
#   run(command="bash bench/gpu/check-a.sh", carry=[".gpu"], timeout_s=330)
# Prepare here first: bench/gpu/build-carry.sh. Writes $OUT/check-a.log and $OUT/summary.txt
# (one line per part: ok / FAILED / skipped). Every part gets min(its cap, what is left of the
# 300 s budget), so the script ends in time whatever hangs.
#
# Parts and their estimated time on an H100/H200 (on paper: nothing here has run on a GPU yet):
#   probe     one line: GPU, driver + its CUDA version, torch/transformers, NVRTC/cuBLAS found  ~5 s
#   ops       `cuda::` tests of the carried test binary: every op's CUDA forward/backward vs the
#             CPU kernel, the GPU sampler vs the CPU sampler, the CUDA decoder vs the CPU decoder
#             (f32, bf16), the GPU train step vs the CPU engine (log-probs, every gradient, one
#             AdamW step), the CUBIN of every module; ≈ 12 tests, each opening the device
#             (≈ 0.5 s) with NVRTC compiling once per process (≈ 3 s)                  ~40–70 s (cap 100)
#   updater   `engine::cuda::` tests: checkpoint state resumes exactly, gradient checkpointing
#             equals keeping everything bit for bit, the decoder over the train step's
#             weights equals an uploaded one                                             ~20–40 s (cap 60)
#   nccl      `collective::nccl::` tests at world 1 (the tool lends one GPU): the communicator
#             from a unique id sent over the host collective, bucketed in-place sums, a train
#             step through NCCL / through the host = the plain step bit for bit; skip (not
#             fail) when no libnccl.so.2 is found                                        ~5–15 s (cap 30)
#   train     bench/gpu/train_gpu_vs_cpu.sh: a 3-step GPG `gpg-rl train` on cpu and on cuda
#             from one recipe (same completions; loss, grad norm, entropy within 1e-3; final
#             weights within 1e-3 relative L2), exact --resume on cuda, a CPU checkpoint
#             resumed on cuda                                                           ~60–100 s (cap 130)
#   total ≈ 2–3.5 min; budget 300 s.
# Two GPUs (NCCL between ranks) are not checked here: the device tool lends one GPU. On a
# machine with two, after `cargo build --release -p gpg-rl --features cuda,mpi`:
#   mpirun -np 2 target/release/gpg-rl train --config R --set device=cuda --set output_dir=/tmp/dp2
#   target/release/gpg-rl train --config R --set device=cuda --set output_dir=/tmp/dp1
#   python3 bench/gpu/compare_runs.py /tmp/dp1 /tmp/dp2      # loss, grad norm, final weights
# (docs/engine.md, "NCCL"); the 2-GPU target (within 10% of linear) stays unmeasured.
BUDGET_S=300
source "$(dirname "$0")/common.sh"
exec > >(tee -a "$OUT/check-a.log") 2>&1

step "probe"
probe || { echo "environment unusable: see the ENV line"; exit 1; }
unpack || exit 1
[ -x $bin/gpg-tests ] || { verdict unpack "FAILED (no gpg-tests in .gpu)"; exit 1; }

step "ops, sampler, decoder, train step: CUDA vs CPU"
run_for 100 ops env GPG_RL_REQUIRE_GPU=1 $bin/gpg-tests ops::cuda:: --test-threads 1 2>&1 | tail -n 30

step "updater"
run_for 60 updater env GPG_RL_REQUIRE_GPU=1 $bin/gpg-tests engine::cuda:: --test-threads 1 2>&1 | tail -n 12

step "NCCL at world 1"
run_for 30 nccl env GPG_RL_REQUIRE_GPU=1 $bin/gpg-tests collective::nccl:: --test-threads 1 --nocapture 2>&1 | tail -n 12

step "3-step gpg-rl train, cpu vs cuda, resume"
run_for 130 train bash bench/gpu/train_gpu_vs_cpu.sh $bin/gpg-rl /tmp/gpg-3step cuda 2>&1 | tail -n 25

step "done"
cat "$summary"
# run_for ran in pipelines (subshells): the summary holds the verdicts.
! grep -q FAILED "$summary" || fail=1
exit $fail
