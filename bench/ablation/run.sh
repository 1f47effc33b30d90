#!/usr/bin/env bash
# The GPG paper's ablation at small scale, in one command (docs/ablation.md).
#
#   bench/ablation/run.sh [--quick] [--seeds N] [--steps N] [--out DIR]
#
# Trains the six variants of bench/ablation/variants.tsv (GRPO, Dr.GRPO, GPG F_norm=1 α=1,
# GPG F_norm=std α=1, GPG α=B/(B−M), GPG α + β_th 0.6) from recipes/ablation/base.toml — same
# warm start (demo/model), problems (synthetic levels 1-4 mixed), steps, batch and sampling —
# for seeds 0..N-1, evaluating each on the 400 held-out problems × 2 samples every 10 steps and
# after the last; then prints the report (crates/gpg/examples/ablation_report.rs) and writes it
# with the curves to DIR/ablation.md and DIR/ablation-curves.png.
#
#   full (default): 3 seeds × 50 steps, DIR = runs/ablation        (≈ 45 min on 2 cores)
#   --quick:        1 seed  ×  5 steps, DIR = runs/ablation-quick  (≈ 2 min)
#
# Runs one training process at a time. A run whose folder already holds the finished result of
# the same command is kept (an interrupted ablation continues where it stopped); --fresh redoes
# everything. Deterministic for a given thread count (RAYON_NUM_THREADS).
set -euo pipefail
cd "$(dirname "$0")/../.."

quick=0
seeds=""
steps=""
out=""
fresh=0
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) quick=1 ;;
    --seeds) seeds="${2:?--seeds needs a number}"; shift ;;
    --steps) steps="${2:?--steps needs a number}"; shift ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    --fresh) fresh=1 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then
    seeds="${seeds:-1}" steps="${steps:-5}" out="${out:-runs/ablation-quick}"
else
    seeds="${seeds:-3}" steps="${steps:-50}" out="${out:-runs/ablation}"
fi
case "$seeds$steps" in *[!0-9]*) echo "run.sh: --seeds and --steps take numbers" >&2; exit 2 ;; esac
[ "$seeds" -ge 1 ] && [ "$steps" -ge 1 ] || { echo "run.sh: --seeds and --steps must be ≥ 1" >&2; exit 2; }
every=$(( steps < 10 ? steps : 10 ))

# One build for the CLI and the report: the same feature set as `cargo test --release
# --workspace`, so after the tests (.ci/run) nothing is recompiled.
cargo build --release -q --workspace --bins --examples
bin=target/release/gpg-rl
report=target/release/examples/ablation_report
recipe=recipes/ablation/base.toml
variants=bench/ablation/variants.tsv

mkdir -p "$out"
[ "$fresh" = 1 ] && rm -rf "${out:?}"/*/seed*
{
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC') run.sh seeds=$seeds steps=$steps on $(nproc) cores"
    echo "# start: $(uptime)"
} >>"$out/load.txt"
t_all=$(date +%s)
for ((seed = 0; seed < seeds; seed++)); do
    while IFS=$'\t' read -r -a cols; do
        [ "${#cols[@]}" -eq 0 ] && continue
        case "${cols[0]}" in '#'* | '') continue ;; esac
        name="${cols[0]}"
        dir="$out/$name/seed$seed"
        args=(train --config "$recipe" --output-dir "$dir" --steps "$steps"
            --set "seed=$seed" --set "eval.every=$every")
        for kv in "${cols[@]:1}"; do args+=(--set "$kv"); done
        key="${args[*]}"
        if [ -f "$dir/done" ] && [ "$(cat "$dir/done")" = "$key" ]; then
            echo "== $name seed $seed: already done, kept"
            continue
        fi
        rm -rf "$dir"
        mkdir -p "$(dirname "$dir")"
        echo "== $name seed $seed ($(uptime | sed 's/.*load/load/'))"
        t0=$(date +%s)
        if ! "$bin" "${args[@]}" >"$dir.log" 2>&1; then
            echo "run.sh: $name seed $seed failed; last lines of $dir.log:" >&2
            tail -n 20 "$dir.log" >&2
            exit 1
        fi
        t1=$(date +%s)
        grep -E "held-out pass@1 (before|after)" "$dir.log" | sed 's/^/   /' || true
        echo "   $((t1 - t0)) s"
        echo "$name seed$seed $((t1 - t0)) s, after: $(uptime | sed 's/.*load/load/')" >>"$out/load.txt"
        echo "$key" >"$dir/done"
    done <"$variants"
done
echo "# end: $(uptime); $(( $(date +%s) - t_all )) s in all" >>"$out/load.txt"
echo
"$report" "$out" --variants "$variants"
