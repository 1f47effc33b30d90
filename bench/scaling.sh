#!/usr/bin/env bash
# How cost grows: gpg-rl beside PyTorch/transformers as the completion gets longer and the
# model gets bigger. Every line runs `gpg-rl bench engine --peer-python`, so each figure comes
# with its peer's, measured in the same run on the same model files.
#
#   bench/scaling.sh PYTHON [OUT_DIR]
#
# PYTHON: an interpreter with torch + transformers (bench/compare/setup.sh makes one).
# Models (random, written by `gpg-rl init` into OUT_DIR, default /tmp/gpg-rl-scaling):
#   s4m    hidden 256, 4 layers, 4/2 heads, intermediate 1024, vocab 4096   (~5.0 M params)
#   s30m   hidden 512, 8 layers, 8/2 heads, intermediate 2048, vocab 4096   (~32 M)
#   s120m  hidden 768, 12 layers, 12/4 heads, intermediate 3584, vocab 4096 (~121 M)
set -euo pipefail
python="${1:?usage: $0 PYTHON [OUT_DIR]}"
out="${2:-/tmp/gpg-rl-scaling}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$here/target/release/gpg-rl"
[ -x "$bin" ] || cargo build --release -p gpg-rl --manifest-path "$here/Cargo.toml"
mkdir -p "$out"

model() { # name hidden layers heads kv_heads intermediate
    [ -f "$out/$1/model.safetensors" ] || "$bin" init --out "$out/$1" --hidden "$2" --layers "$3" \
        --heads "$4" --kv-heads "$5" --intermediate "$6" --vocab 4096 --max-positions 4096 >/dev/null
}
model s4m 256 4 4 2 1024
model s30m 512 8 8 2 2048
model s120m 768 12 12 4 3584

run() { echo "== $*"; "$bin" bench engine --peer-python "$python" "$@"; echo; }

# Completion length: 8 sequences of 64 prompt + L completion tokens (train step);
# 8 prompts of 32 tokens + L new tokens (sampling).
for len in 64 256 1024; do
    run --model "$out/s4m" --batch 8 --prompt-len 64 --seq-len $((64 + len)) --steps 3 \
        --sample-prompt-len 32 --new-tokens "$len" --runs 1
done

# Model size: 16 × 256 tokens (192 completion) per train step; sampling 16 × (32 + 128).
for m in s4m s30m s120m; do
    run --model "$out/$m" --batch 16 --prompt-len 64 --seq-len 256 --steps 3 \
        --sample-prompt-len 32 --new-tokens 128 --runs 1
done
