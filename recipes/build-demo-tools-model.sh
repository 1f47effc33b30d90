#!/usr/bin/env bash
# Builds runs/demo-tools-sft, the warm start of the tool demo (recipes/demo-tools.toml): the demo
# model (demo/model) fine-tuned 1000 steps on the arithmetic task with large numbers (operands
# and factors up to 99), half of the targets calling the calculator in Qwen's tool-call format,
# half worked solutions (recipes/demo-tools-sft.toml). ≈20 minutes on the shared 2-core VM with
# RAYON_NUM_THREADS=1. Deterministic for a given machine and thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p gpg-rl
rm -rf runs/demo-tools-sft
target/release/gpg-rl sft --config recipes/demo-tools-sft.toml
echo "runs/demo-tools-sft built"
