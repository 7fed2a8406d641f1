#!/usr/bin/env bash
# Prints the environment for compiling cpt's `cuda` feature on a machine without a GPU or a CUDA
# install: NVIDIA's CUDA 13.4 compiler and headers from PyPI (`cuda-toolkit[nvcc,cccl]`, ≈130 MB of
# wheels) in ~/.cache/cpt/cuda. Enough for `cargo check --features cuda`; linking a binary also needs
# the CUDA libraries (the GPU machine's own, or the nvidia-cublas/curand/nvrtc wheels).
#   eval "$(scripts/cuda-env.sh)" && cargo check --release -p cpt-worker --features cuda
set -euo pipefail
root=${CPT_CUDA_ENV:-$HOME/.cache/cpt/cuda}
[ -x "$root/bin/python" ] || python3 -m venv "$root" >&2
# Pinned as one meta-package: mixing component versions breaks ptxas.
"$root/bin/pip" install -q "cuda-toolkit[nvcc,cccl]==13.4.3" >&2
cuda=$("$root/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
# cudarc and candle's build scripts look for the unversioned library name.
[ -e "$cuda/lib/libcudart.so" ] || ln -s libcudart.so.13 "$cuda/lib/libcudart.so"
cat <<ENV
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_ROOT="$cuda"
export PATH="$cuda/bin:\$PATH" LIBRARY_PATH="$cuda/lib:\${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
ENV
