#!/usr/bin/env bash
# The MPI version of the data-parallel acceptance test (issue 12): `mpirun -np 2 gpg-rl train`
# against one process on the same global batch (crates/gpg-rl/tests/mpi.rs), a rank-0 error and
# a SIGKILLed rank ending the job. Installs OpenMPI and libclang (Debian) when missing, builds
# with `--features mpi`, runs the test. Used by .ci/run; ≈ 3 min on 2 cores after the main build.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v mpirun >/dev/null || ! dpkg -s libopenmpi-dev libclang-dev >/dev/null 2>&1; then
    echo "installing OpenMPI and libclang (Debian packages)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev libopenmpi-dev openmpi-bin >/dev/null
fi
# --workspace keeps the dependency features of `cargo test --release --workspace`, so only gpg
# and gpg-rl are rebuilt (with -p gpg-rl alone cargo would rebuild candle-core too).
cargo test --release --workspace --features gpg-rl/mpi --test mpi -- --test-threads 1 --nocapture
