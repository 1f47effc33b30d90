# Sourced by check-a.sh and check-b.sh on the device machine: a time budget, the one-line
# environment probe, the libraries' path and the carried binaries. Nothing here needs Rust or
# the network. Sets: OUT, py, bin, fail, and the functions step, left, run_for, verdict.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
t_start=$(date +%s)
# Every step gets at most what is left of BUDGET_S (each script sets it), so the script ends
# within its budget whatever hangs.
left() { echo $(( BUDGET_S - ($(date +%s) - t_start) )); }
step() { echo; echo "=== $* ($(( $(date +%s) - t_start )) s of $BUDGET_S)"; }
fail=0
summary=$OUT/summary.txt
: > "$summary"
verdict() { echo "$1: $2" | tee -a "$summary"; [ "$2" = ok ] || fail=1; }
# run_for CAP NAME CMD...: runs CMD with a timeout of min(CAP, time left − 5 s), records NAME.
run_for() {
  local cap=$1 name=$2; shift 2
  local t=$(( $(left) - 5 ))
  if [ "$t" -le 5 ]; then verdict "$name" "skipped (budget spent)"; return 1; fi
  [ "$t" -lt "$cap" ] || t=$cap
  timeout "$t" "$@"; local rc=$?
  if [ $rc -eq 0 ]; then verdict "$name" ok
  elif [ $rc -eq 124 ]; then verdict "$name" "FAILED (timed out after $t s)"
  else verdict "$name" "FAILED (exit $rc)"; fi
  return $rc
}

py=${PYTHON:-python3}
site=$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || echo /nonexistent)
find_lib() { find "$site" /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu -name "$1" 2>/dev/null | head -n1; }
libs=""
for l in libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
  f=$(find_lib "$l"); [ -n "$f" ] && libs="$libs:$(dirname "$f")"
done
# NCCL (data parallel on GPUs; optional): cudarc loads `libnccl.so`, the nvidia-nccl wheels (and
# torch's dependencies) ship only `libnccl.so.2`, so a link is made in a directory of our own.
nccl=$(find_lib libnccl.so.2)
if [ -n "$nccl" ]; then
  mkdir -p /tmp/gpg-nccl && ln -sf "$nccl" /tmp/gpg-nccl/libnccl.so && libs="$libs:/tmp/gpg-nccl"
fi
export LD_LIBRARY_PATH="${libs#:}:${LD_LIBRARY_PATH:-}"

# The environment in one line: a mismatch shows here, not as a cascade of failures below.
probe() {
  local gpu driver cuda torchv nvrtc cublas
  gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n1)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)
  cuda=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | awk '{print $3}')
  torchv=$($py -c 'import torch, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU {torch.cuda.is_available()}), transformers {transformers.__version__}")' 2>/dev/null || echo "torch/transformers absent")
  nvrtc=$(find_lib libnvrtc.so.13); cublas=$(find_lib libcublas.so.13)
  echo "ENV: gpu=${gpu:-none} driver=${driver:-none} driver-cuda=${cuda:-none} | $torchv | libnvrtc.so.13 ${nvrtc:+found}${nvrtc:-MISSING} | libcublas.so.13 ${cublas:+found}${cublas:-MISSING} | libnccl.so.2 ${nccl:+found}${nccl:-absent}" | tee -a "$summary"
  [ -n "$gpu" ] || { verdict probe "FAILED (no GPU: nvidia-smi sees none)"; return 1; }
  [ -n "$nvrtc" ] && [ -n "$cublas" ] || { verdict probe "FAILED (NVRTC/cuBLAS 13 wheels not found under $site)"; return 1; }
  # Kernels are loaded as CUBIN for the device's sm_XY, so NVRTC 13 works with an older driver
  # too; cuBLAS 13 needs a driver with CUDA ≥ 13.0.
  case "$cuda" in 1[3-9].*|[2-9][0-9].*) ;; *) echo "note: driver CUDA $cuda < 13.0: cuBLAS 13 may not load" | tee -a "$summary";; esac
  verdict probe ok
}

bin=/tmp/gpg-bin && mkdir -p $bin
unpack() {
  [ -f .gpu/gpg-rl.gz ] || { verdict unpack "FAILED (.gpu/ not carried: run bench/gpu/build-carry.sh here, carry [\".gpu\"])"; return 1; }
  gunzip -c .gpu/gpg-rl.gz > $bin/gpg-rl && chmod +x $bin/gpg-rl
  [ ! -f .gpu/gpg-tests.gz ] || { gunzip -c .gpu/gpg-tests.gz > $bin/gpg-tests && chmod +x $bin/gpg-tests; }
}
