#!/usr/bin/env bash
# The Python package's tests (called by .ci/run): builds the gpg_rl wheel with maturin into a
# fresh venv (target/py-venv), reusing the workspace's target directory so that only the PyO3
# crates and gpg-py are compiled (≈ 30 s after `cargo test --release --workspace`), then runs
# pytest (≈ 5 s; the CLI comparison uses target/release/gpg-rl, built by the test command).
# Skips, saying so, only when no python3 is available.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 not found: skipping the Python package's tests (crates/gpg-py)" >&2
  exit 0
fi
venv="$root/target/py-venv"
rm -rf "$venv"
if ! python3 -m venv "$venv"; then
  echo "python3 -m venv failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2
  exit 1
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check maturin pytest
export CARGO_TARGET_DIR="$root/target"
(cd crates/gpg-py && VIRTUAL_ENV="$venv" "$venv/bin/maturin" develop --release --quiet)
GPG_RL_BIN="$root/target/release/gpg-rl" "$venv/bin/python" -m pytest -q crates/gpg-py/tests
