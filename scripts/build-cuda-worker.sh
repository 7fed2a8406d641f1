#!/usr/bin/env bash
# Builds cpt-worker with the `cuda` feature on a machine without a GPU (scripts/cuda-env.sh: CUDA
# 13.0 compiler from PyPI, link-time stubs) and puts the stripped, gzipped binary (66 → 17 MB: the
# device tool carries at most 64 MiB) in .device/, which it carries to a GPU machine for
# bench/gpu.sh. 8 min cold on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-env.sh)"
target=${CARGO_TARGET_DIR:-$PWD/target}-cuda13.0
cargo build --release -p cpt-worker --features cuda --target-dir "$target"
mkdir -p .device
strip -o .device/cpt-worker "$target/release/cpt-worker"
gzip -f .device/cpt-worker
ls -l .device/cpt-worker.gz
