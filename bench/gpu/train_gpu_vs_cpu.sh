#!/usr/bin/env bash
# A 3-step GPG run (`gpg-rl train`, the real Trainer path) on the CPU and on the GPU from the
# same recipe, compared (bench/gpu/compare_runs.py: the same sampled completions, loss /
# grad_norm / entropy within 1e-3 relative, final weights within 1e-3 relative L2 per tensor),
# then exact resumption on the GPU (checkpoint-1 → step 3 equals the uninterrupted GPU run bit
# for bit) and a CPU checkpoint resumed on the GPU (within the same tolerances).
#
# The model: a fresh `gpg-rl init` model, f32, hidden 128, 2 layers, 4/2 heads (head_dim 32),
# tied head; micro-batches of 64 tokens, so each step accumulates over several micro-batches;
# held-out evaluation (on the run's device) before training and at step 3.
#
# Usage: bench/gpu/train_gpu_vs_cpu.sh GPG_RL_BINARY WORK_DIR [DEVICE_B]
#   DEVICE_B defaults to cuda; `cpu` dry-runs every part of the script on a machine without a
#   GPU (the comparison then holds trivially).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$1
work=$2
dev_b=${3:-cuda}
py=${PYTHON:-python3}
rm -rf "$work" && mkdir -p "$work"
"$bin" init --hidden 128 --layers 2 --heads 4 --kv-heads 2 --intermediate 256 --vocab 512 \
  --max-positions 512 --corpus synthetic --seed 1 --out "$work/model" > /dev/null
cat > "$work/recipe.toml" <<EOF
model = "$work/model"
output_dir = "$work/unused"
steps = 3
seed = 5
precision = "f32"
[data]
train = "synthetic"
[data.fields]
apply_chat_template = false
[data.synthetic]
level = 1
n_train = 200
n_heldout = 8
[rollout]
prompts_per_step = 4
num_generations = 4
max_new_tokens = 16
[algorithm]
loss = { name = "gpg" }
micro_batch_tokens = 64
[optim]
lr = 1e-3
[[reward.functions]]
name = "accuracy"
[[reward.functions]]
name = "boxed_format"
weight = 0.5
[[reward.functions]]
name = "length"
weight = 0.01
[eval]
every = 3
data = "synthetic"
[logging]
save_every = 1
keep_checkpoints = 10
progress = false
EOF
run() { # output_dir device [extra…]
  local out=$1 dev=$2
  shift 2
  "$bin" train --config "$work/recipe.toml" --quiet --set "output_dir=\"$out\"" \
    --set "device=\"$dev\"" "$@" > "$out.log" 2>&1 || { cat "$out.log"; return 1; }
  tail -n 3 "$out.log"
}
# Keeps checkpoint-1 only: what a run killed during step 2 leaves (metrics beyond step 1 are
# dropped by the resume).
cut_to_step_1() {
  cp -r "$1" "$2"
  rm -rf "$2/checkpoint-2" "$2/checkpoint-3" "$2/final"
}
fail=0
echo "--- 3 steps on cpu"
t0=$(date +%s%N)
run "$work/run-cpu" cpu
t1=$(date +%s%N)
echo "--- 3 steps on $dev_b"
run "$work/run-b" "$dev_b"
t2=$(date +%s%N)
echo "wall: cpu $(( (t1 - t0) / 1000000 )) ms, $dev_b $(( (t2 - t1) / 1000000 )) ms (loading and evaluations included)"
echo "--- cpu vs $dev_b"
$py "$here/compare_runs.py" "$work/run-cpu" "$work/run-b" || fail=1
echo "--- $dev_b: resumed from checkpoint-1 vs uninterrupted (exact)"
cut_to_step_1 "$work/run-b" "$work/run-b-resumed"
run "$work/run-b-resumed" "$dev_b" --resume
$py "$here/compare_runs.py" --exact "$work/run-b" "$work/run-b-resumed" || fail=1
echo "--- cpu checkpoint-1 resumed on $dev_b vs the cpu run"
cut_to_step_1 "$work/run-cpu" "$work/run-cpu-to-b"
run "$work/run-cpu-to-b" "$dev_b" --resume
$py "$here/compare_runs.py" "$work/run-cpu" "$work/run-cpu-to-b" || fail=1
exit $fail
