#!/usr/bin/env bash
# Data-parallel cost on one machine: 1 process × T threads against `mpirun -np R` × (T/R)
# threads on the same global batch (the demo recipe, no evaluation, no checkpoints), then the
# per-step time, the time in collectives, and the gradient bytes each step all-reduces.
# Usage: bench/dp/scaling.sh [--steps N] [--model DIR] [--ranks R] [--threads T] [--set k=v]...
# Needs gpg-rl built with --features mpi (it builds it) and mpirun.
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=8; MODEL=demo/model; RANKS=2; THREADS=2; EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) STEPS=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --ranks) RANKS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --set) EXTRA+=(--set "$2"); shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
cargo build --release --workspace --features gpg-rl/mpi >/dev/null
BIN=target/release/gpg-rl
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ARGS=(train --config recipes/demo.toml --model "$MODEL" --steps "$STEPS" --quiet
      --set 'eval.every=1000000' --set logging.save_every=0 --set distributed.weight_check_every=0
      "${EXTRA[@]}")
RAYON_NUM_THREADS=$THREADS "$BIN" "${ARGS[@]}" --output-dir "$OUT/one" >/dev/null 2>"$OUT/one.log"
mpirun --allow-run-as-root --oversubscribe -np "$RANKS" -x RAYON_NUM_THREADS=$((THREADS / RANKS)) \
    "$BIN" "${ARGS[@]}" --output-dir "$OUT/many" >/dev/null 2>"$OUT/many.log"
python3 - "$OUT" "$MODEL" "$RANKS" "$THREADS" <<'PY'
import json, struct, sys, pathlib
out, model, ranks, threads = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def params(d):
    n = 0
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                p = 1
                for s in v["shape"]:
                    p *= s
                n += p
    return n
def summary(run):
    m = [json.loads(l) for l in open(out / run / "metrics.jsonl")]
    m = m[1:] if len(m) > 2 else m  # the first step warms caches
    avg = lambda k: sum(x.get(k, 0.0) for x in m) / len(m)
    return {k: avg(k) for k in ["time_step_s", "time_rollout_s", "time_update_s", "time_comm_s", "time_comm_grad_s"]}, [x["reward"] for x in m]
one, r1 = summary("one"); many, r2 = summary("many")
n = params(model)
print(f"model {model}: {n:,} parameters; gradient all-reduced per step: {4*n/1e6:.1f} MB (f32)")
print(f"{'setting':<28} {'step':>9} {'rollout':>9} {'update':>9} {'comm':>9} {'grad a-r':>9}")
for name, s in [(f"1 process x {threads} threads", one), (f"{ranks} ranks x {threads//ranks} thread(s)", many)]:
    print(f"{name:<28} {s['time_step_s']:8.3f}s {s['time_rollout_s']:8.3f}s {s['time_update_s']:8.3f}s {s['time_comm_s']:8.3f}s {s['time_comm_grad_s']:8.4f}s")
g = many["time_comm_grad_s"]
if g > 0:
    print(f"gradient all-reduce: {4*n/1e6:.1f} MB in {g*1e3:.1f} ms = {4*n/g/1e9:.2f} GB/s algorithm bandwidth")
print(f"ratio (ranks / threads) step time: {many['time_step_s']/one['time_step_s']:.2f}x; same rewards: {r1 == r2}")
PY
