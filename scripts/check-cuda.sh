#!/usr/bin/env bash
# Compiles the CUDA path (`--features cuda`) on a machine without a GPU, so it cannot rot: NVIDIA's
# compiler and headers come from PyPI (scripts/cuda-env.sh). The first run builds candle's CUDA
# kernels (≈14 min on 2 cores); later runs only recheck cpt's crates. Its own target dir, so the
# CPU build is not invalidated.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-env.sh)"
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}-cuda13.0 cargo check --release -p cpt-worker --features cuda
