#!/usr/bin/env bash
# Installs NVRTC 13.0 (pip's nvidia-cuda-nvrtc wheel: libnvrtc.so.13 and its builtins, no GPU
# needed) into DEST (default target/nvrtc) and prints the directory to put on LD_LIBRARY_PATH.
# The `cuda` feature's test every_kernel_compiles_with_nvrtc_for_sm_90 then compiles every
# kernel for sm_90 on this machine. Measured here: ≈ 4 s with pip's cache warm (90 MB wheel).
set -euo pipefail
dest=${1:-target/nvrtc}
lib=$dest/nvidia/cu13/lib
if [ ! -f "$lib/libnvrtc.so.13" ]; then
  mkdir -p "$dest/wheel"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest/wheel" \
    nvidia-cuda-nvrtc==13.0.88 >&2
  python3 -m zipfile -e "$dest"/wheel/nvidia_cuda_nvrtc-13.0.88-*.whl "$dest" >&2
  rm -rf "$dest/wheel"
fi
cd "$lib" && pwd
