#!/usr/bin/env bash
# The GPU check of the CUDA engine: ONE command on the device machine (an H200, CUDA 13.0
# driver, PyTorch + transformers installed, no Rust, no network), everything it writes under
# $OUT. Prepare here with bench/gpu/build-carry.sh, then run it with the device tool:
#   run(command="bash bench/gpu/check.sh", carry=[".gpu"], timeout_s=540)
# Steps (each logged to $OUT/check.log; a failing step is reported and the next one runs):
#   1. the GPU and the libraries (nvidia-smi; libcuda from the driver; libnvrtc/libcublas from
#      the pip wheels under PyTorch's site-packages)
#   2. every op's CUDA forward/backward against the CPU kernel, the CUDA sampler against the
#      CPU sampler, the CUDA decoder against the CPU decoder (f32 and bf16), every kernel
#      compiled for the device by NVRTC: the `ops::cuda::` tests of the carried test binary; the
#      trainer's GPU engine (`engine::cuda::`: its checkpoint state resumes exactly on the GPU
#      and closely on the CPU; gradient checkpointing gives the same gradients bit for bit; the
#      decoder over the train step's weights equals an uploaded one)
#   2b. the trainer end to end (bench/gpu/train_gpu_vs_cpu.sh): a 3-step GPG run of
#      `gpg-rl train` on cpu and on cuda from one recipe (same completions; loss, grad_norm,
#      entropy within 1e-3 relative; final weights within 1e-3 relative L2 per tensor), exact
#      --resume on the GPU, a CPU checkpoint resumed on the GPU
#   3. Qwen2.5-0.5B- and 1.5B-shaped random bf16 models made by transformers
#      (make_qwen_shape.py); greedy `generate` on cuda vs cpu (same tokens expected up to
#      bf16 ties); `logprobs` on cuda vs cpu (worst |diff| < 0.25 in bf16); `bench engine --device cuda`: the GPU train step (16 × 1024 tokens, MFU,
#      device memory) beside PyTorch's (torch_train_step.py, pure bf16, sdpa, on the GPU), and
#      sampling at batch 64 × 512 new tokens (and batch 1) beside HF generate on the GPU
#   4. `bench trainer --device cuda` (whole GPG steps through the Trainer: GPU rollout, update,
#      AdamW) at the 0.5B shape, bf16 (no TRL peer: TRL is not installed there)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
log=$OUT/check.log
exec > >(tee -a "$log") 2>&1
t_start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - t_start )) s)"; }
fail=0

step "1. machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || fail=1
py=python3
site=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(dirname "$(find "$site" -name 'libnvrtc.so.13' | head -n1)")
for l in libcublas.so.13 libcublasLt.so.13; do
  d=$(dirname "$(find "$site" -name "$l" | head -n1)")
  libs="$libs:$d"
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
bin=/tmp/gpg-bin && mkdir -p $bin
gunzip -c .gpu/gpg-rl.gz > $bin/gpg-rl && gunzip -c .gpu/gpg-tests.gz > $bin/gpg-tests
chmod +x $bin/gpg-rl $bin/gpg-tests

step "2. ops, sampler and decoder: CUDA vs CPU"
GPG_RL_REQUIRE_GPU=1 timeout 180 $bin/gpg-tests ops::cuda:: --test-threads 1 --nocapture 2>&1 | tee "$OUT/ops.log" | tail -n 40
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: cuda tests"; fail=1; }
GPG_RL_REQUIRE_GPU=1 timeout 60 $bin/gpg-tests engine::cuda:: --test-threads 1 --nocapture 2>&1 | tee "$OUT/engine.log" | tail -n 12
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: engine::cuda tests"; fail=1; }

step "2b. a 3-step GPG run (gpg-rl train) on cpu vs cuda; exact resume on cuda"
timeout 150 bash bench/gpu/train_gpu_vs_cpu.sh $bin/gpg-rl /tmp/gpg-3step cuda 2>&1 | tee "$OUT/train-3step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "FAILED: 3-step GPG run cpu vs cuda"; fail=1; }

step "3. models (transformers, bf16)"
for shape in 0.5b 1.5b; do
  timeout 150 $py bench/compare/make_qwen_shape.py /tmp/qwen-$shape --shape $shape \
    --dtype bfloat16 --device cuda --threads 16 --tokenizer-from .gpu/tokenizer || fail=1
done

step "3a. greedy generate, cuda vs cpu (0.5B shape, 24 tokens)"
for dev in cpu cuda; do
  timeout 120 $bin/gpg-rl generate --model /tmp/qwen-0.5b --precision bf16 --device $dev \
    --prompt "The capital of France is" --prompt "1 + 1 =" --temperature 0 \
    --max-new-tokens 24 --ignore-eos --format json > "$OUT/greedy-$dev.jsonl" || fail=1
done
$py - "$OUT" <<'PY' || fail=1
import json, sys
out = sys.argv[1]
rows = {d: [json.loads(l) for l in open(f"{out}/greedy-{d}.jsonl")] for d in ("cpu", "cuda")}
for a, b in zip(rows["cpu"], rows["cuda"]):
    ta, tb = a["token_ids"], b["token_ids"]
    same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
    print(f"prompt {a['prompt_index']}: first {same} of {len(ta)} greedy tokens equal; "
          f"max |logprob diff| over them {max([abs(x - y) for x, y in zip(a['logprobs'][:same], b['logprobs'][:same])] or [0]):.3g}")
PY

step "3a''. logprobs, cuda vs cpu (0.5B shape, bf16; the GPU forward of the train step)"
printf '%s\n' '{"prompt": "The capital of France is", "completion": " Paris, on the Seine."}' \
  '{"prompt": "1 + 1 =", "completion": " 2, and 2 + 2 = 4."}' > /tmp/logprobs-in.jsonl
for dev in cpu cuda; do
  timeout 90 $bin/gpg-rl logprobs --model /tmp/qwen-0.5b --precision bf16 --device $dev \
    --input /tmp/logprobs-in.jsonl > "$OUT/logprobs-$dev.jsonl" || fail=1
done
$py - "$OUT" <<'PY' || fail=1
import json, sys
out = sys.argv[1]
rows = {d: [json.loads(l) for l in open(f"{out}/logprobs-{d}.jsonl")] for d in ("cpu", "cuda")}
worst = 0.0
for a, b in zip(rows["cpu"], rows["cuda"]):
    assert a["completion_ids"] == b["completion_ids"], "different tokenization"
    worst = max([worst] + [abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])])
print(f"logprobs cpu vs cuda (bf16): worst |diff| {worst:.3g} over {sum(len(r['logprobs']) for r in rows['cpu'])} tokens")
sys.exit(0 if worst < 0.25 else 1)
PY

step "3a'. determinism: the same sampled completions on the GPU, run after run"
for run in 1 2; do
  timeout 120 $bin/gpg-rl generate --model /tmp/qwen-0.5b --precision bf16 --device cuda \
    --prompt "Once upon a time" -n 4 --temperature 1.0 --top-p 0.9 --seed 7 \
    --max-new-tokens 64 --format json > "$OUT/sampled-$run.jsonl" || fail=1
done
if cmp -s "$OUT/sampled-1.jsonl" "$OUT/sampled-2.jsonl"; then echo "identical"; else
  echo "FAILED: two seeded GPU runs differ"; fail=1; fi

step "3b. bench engine --device cuda beside PyTorch / HF generate on the GPU (bf16)"
for shape in 0.5b 1.5b; do
  echo "--- $shape: train step, 16 x 1024 tokens (256 prompt), PyTorch peer pure bf16 + sdpa"
  timeout 240 $bin/gpg-rl bench engine --model /tmp/qwen-$shape --precision bf16 --device cuda \
    --batch 16 --seq-len 1024 --prompt-len 256 --steps 3 --new-tokens 8 --runs 1 \
    --peer-python $py --peer-dtype bf16 --peer-bf16-mode pure 2>&1 | tee "$OUT/train-$shape.log" \
    || fail=1
  echo "--- $shape: sampling, batch 64 x 512 new tokens"
  timeout 200 $bin/gpg-rl bench engine --model /tmp/qwen-$shape --precision bf16 --device cuda \
    --sampling-only --batch 64 --sample-prompt-len 64 --new-tokens 512 --runs 1 \
    --peer-python $py --peer-dtype bf16 2>&1 | tee "$OUT/sample-$shape-b64.log" || fail=1
done
echo "--- 0.5b: sampling, batch 1 x 256 new tokens (HBM roofline: bytes of the weights per token)"
timeout 120 $bin/gpg-rl bench engine --model /tmp/qwen-0.5b --precision bf16 --device cuda \
  --sampling-only --batch 1 --sample-prompt-len 64 --new-tokens 256 --runs 1 \
  --peer-python $py --peer-dtype bf16 2>&1 | tee "$OUT/sample-0.5b-b1.log" || fail=1

step "4. bench trainer --device cuda (0.5B shape, bf16, 4 prompts x 8, 128 new tokens)"
timeout 150 $bin/gpg-rl bench trainer --model /tmp/qwen-0.5b --precision bf16 --device cuda \
  --steps 2 --warmup 1 --prompts-per-step 4 --num-generations 8 --max-new-tokens 128 2>&1 \
  | tee "$OUT/bench-trainer-0.5b.log" || fail=1

step "done: fail=$fail"
exit $fail
