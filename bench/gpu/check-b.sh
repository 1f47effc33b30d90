#!/usr/bin/env bash
# Device check B: SPEED at the Qwen2.5-0.5B shape, ≤ 5 min on the device machine, useful alone
# (run A first if the engine is new: B's figures mean nothing if A fails).
#   run(command="bash bench/gpu/check-b.sh", carry=[".gpu"], timeout_s=330)
# Prepare here first: bench/gpu/build-carry.sh. Writes $OUT/check-b.log, $OUT/summary.txt and
# each bench's log. Every part gets min(its cap, what is left of the 300 s budget).
#
# Parts and their estimated time on an H100/H200 (on paper: nothing has run on a GPU yet):
#   probe     as check A                                                                   ~5 s
#   model     a 0.5B-shaped random bf16 model by transformers (make_qwen_shape.py)        ~30 s (cap 60)
#   step      `bench engine --device cuda`: the GPU train step at 16 × 1024 tokens (MFU,
#             device memory) beside PyTorch's (pure bf16 + SDPA, torch_train_step.py)     ~60–90 s (cap 110)
#   sample    `bench engine --sampling-only`: batch 64 × 512 new tokens beside HF generate ~40–60 s (cap 80)
#   trainer   `bench trainer --device cuda`: whole GPG steps (GPU rollout, update, AdamW),
#             4 prompts × 8, 128 new tokens, 2 steps after 1 warm-up                      ~40–60 s (cap 70)
#   total ≈ 3–4.5 min; budget 300 s. The 1.5B shape is left out (it needs an H200 or
#   gradient checkpointing, which `bench engine --device cuda` now chooses by itself when the
#   activations would not fit; run it alone: SHAPE=1.5b bash bench/gpu/check-b.sh).
BUDGET_S=300
SHAPE=${SHAPE:-0.5b}
source "$(dirname "$0")/common.sh"
exec > >(tee -a "$OUT/check-b.log") 2>&1

step "probe"
probe || { echo "environment unusable: see the ENV line"; exit 1; }
unpack || exit 1
m=/tmp/qwen-$SHAPE

step "model ($SHAPE, bf16, transformers)"
run_for 60 model $py bench/compare/make_qwen_shape.py $m --shape $SHAPE --dtype bfloat16 \
  --device cuda --threads 16 --tokenizer-from .gpu/tokenizer || exit 1

step "train step, 16 x 1024 tokens (256 prompt), beside PyTorch pure bf16 + SDPA"
run_for 110 step $bin/gpg-rl bench engine --model $m --precision bf16 --device cuda \
  --batch 16 --seq-len 1024 --prompt-len 256 --steps 3 --new-tokens 8 --runs 1 \
  --peer-python $py --peer-dtype bf16 --peer-bf16-mode pure 2>&1 | tee "$OUT/train-$SHAPE.log"

step "sampling, batch 64 x 512 new tokens, beside HF generate"
run_for 80 sample $bin/gpg-rl bench engine --model $m --precision bf16 --device cuda \
  --sampling-only --batch 64 --sample-prompt-len 64 --new-tokens 512 --runs 1 \
  --peer-python $py --peer-dtype bf16 2>&1 | tee "$OUT/sample-$SHAPE-b64.log"

step "bench trainer --device cuda (4 prompts x 8, 128 new tokens)"
run_for 70 trainer $bin/gpg-rl bench trainer --model $m --precision bf16 --device cuda \
  --steps 2 --warmup 1 --prompts-per-step 4 --num-generations 8 --max-new-tokens 128 2>&1 \
  | tee "$OUT/bench-trainer-$SHAPE.log"

step "done"
cat "$summary"
# run_for ran in pipelines (subshells): the summary holds the verdicts.
! grep -q FAILED "$summary" || fail=1
exit $fail
