#!/usr/bin/env bash
# The peer side at the Qwen2.5-0.5B shape, one benchmark at a time, each logged to its own file:
#
#   bench/compare/run_qwen_shape.sh F32_MODEL_DIR BF16_MODEL_DIR LOG_DIR [PYTHON] [ONLY...]
#
# F32/BF16_MODEL_DIR: make_qwen_shape.py --dtype float32 / bfloat16 outputs. Runs, in order:
#   trl-f32, trl-bf16        trl_grpo_step.py, 4 prompts x 8 completions, <= 64 tokens,
#                            warmup 1 + 2 steps (f32; --bf16 = GRPOConfig bf16=True autocast)
#   torch-f32, torch-autocast, torch-pure
#                            torch_train_step.py, 4 x 256 tokens (completion 192), warmup 1 + 2
#   hf-f32, hf-bf16          hf_generate.py, batch 32, prompt 16, 32 new tokens, warmup 1 + 3
#   llama-f32, llama-bf16    to_gguf.py then llama_cpp_generate.py, same shape, warmup 1 + 3
# ONLY: names from that list to run just those. 2 threads, OMP_WAIT_POLICY=PASSIVE. Each log
# gets `uptime` before and after, /usr/bin/time -v figures, and the JSON line last on stdout.
# The GGUF files go to LOG_DIR/gguf (large; delete them afterwards).
set -euo pipefail
F32=${1:?F32 model dir}
BF16=${2:?BF16 model dir}
LOGS=${3:?log dir}
PY=${4:-${GPG_RL_VENV:-/work/venv}/bin/python}
shift $(( $# < 4 ? $# : 4 ))
ONLY=("$@")
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$LOGS/gguf"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PROMPTS="$LOGS/trl-prompts.jsonl"
"$PY" - "$PROMPTS" <<'PY'
import json, random, sys
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        f.write(json.dumps({"prompt": f"Compute {a}+{b}=", "answer": str(a + b)}) + "\n")
PY

want() {
  [ ${#ONLY[@]} -eq 0 ] && return 0
  local n
  for n in "${ONLY[@]}"; do [ "$n" = "$1" ] && return 0; done
  return 1
}

bench() {  # name, command...
  local name=$1; shift
  want "$name" || return 0
  local log="$LOGS/$name.log"
  { echo "# $(date -u '+%F %T UTC') $*"; echo "# before: $(uptime)"; } > "$log"
  if /usr/bin/time -v "$@" > "$log.json" 2>> "$log"; then
    echo "# after: $(uptime)" >> "$log"
    echo "$name: $(cut -c1-160 "$log.json")"
  else
    echo "# FAILED, after: $(uptime)" >> "$log"
    echo "$name: FAILED (see $log)"
  fi
}

TRL=(--data "$PROMPTS" --threads 2 --steps 2 --warmup 1 --seed 0 --prompts-per-step 4
     --group-size 8 --max-completion-len 64 --lr 1e-5)
TORCH=(--threads 2 --batch 4 --seq-len 256 --completion-len 192 --steps 2 --warmup 1)
GEN=(--threads 2 --batch 32 --prompt-len 16 --new-tokens 32 --runs 3 --warmup 1)

bench trl-f32 "$PY" "$HERE/trl_grpo_step.py" --model "$F32" "${TRL[@]}"
bench trl-bf16 "$PY" "$HERE/trl_grpo_step.py" --model "$F32" "${TRL[@]}" --bf16
bench torch-f32 "$PY" "$HERE/torch_train_step.py" --model "$F32" "${TORCH[@]}" --dtype f32
bench torch-autocast "$PY" "$HERE/torch_train_step.py" --model "$F32" "${TORCH[@]}" \
  --dtype bf16 --bf16-mode autocast
bench torch-pure "$PY" "$HERE/torch_train_step.py" --model "$BF16" "${TORCH[@]}" \
  --dtype bf16 --bf16-mode pure
bench hf-f32 "$PY" "$HERE/hf_generate.py" --model "$F32" "${GEN[@]}" --dtype f32
bench hf-bf16 "$PY" "$HERE/hf_generate.py" --model "$BF16" "${GEN[@]}" --dtype bf16
for dt in f32 bf16; do
  src=$F32; [ "$dt" = bf16 ] && src=$BF16
  if want "llama-$dt"; then
    [ -f "$LOGS/gguf/model-$dt.gguf" ] || "$PY" "$HERE/to_gguf.py" "$src" "$LOGS/gguf/model-$dt.gguf" --dtype "$dt"
  fi
  bench "llama-$dt" "$PY" "$HERE/llama_cpp_generate.py" --model "$LOGS/gguf/model-$dt.gguf" "${GEN[@]}"
done
