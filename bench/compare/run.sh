#!/usr/bin/env bash
# Runs the peer side of the benchmarks once: makes the shared bench model if MODEL_DIR does not
# hold one yet, then the train-step and generate benchmarks (one JSON line each on stdout).
#
#   bench/compare/run.sh MODEL_DIR [--threads N]
#
# Python comes from $GPG_RL_VENV (default bench/compare/.venv, made by setup.sh).
# OMP_WAIT_POLICY defaults to PASSIVE here: with OpenMP's default spinning, 2 threads on a
# shared, oversubscribed machine ran 4-10x slower than 1 thread (see README.md). Set
# OMP_WAIT_POLICY=ACTIVE (or anything) to override on an idle machine.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${GPG_RL_VENV:-$here/.venv}"
py="$venv/bin/python"
if [ $# -lt 1 ]; then
    echo "usage: $0 MODEL_DIR [--threads N]" >&2
    exit 2
fi
model="$1"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
shift
if [ ! -x "$py" ]; then
    echo "no venv at $venv: run $here/setup.sh first (or set GPG_RL_VENV)" >&2
    exit 1
fi
if [ ! -f "$model/model.safetensors" ]; then
    "$py" "$here/make_bench_model.py" "$model" >&2
fi
"$py" "$here/torch_train_step.py" --model "$model" "$@"
"$py" "$here/hf_generate.py" --model "$model" "$@"
