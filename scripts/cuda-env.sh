#!/usr/bin/env bash
# Prints the environment for compiling and linking cpt's `cuda` feature on a machine without a GPU
# or a CUDA install: NVIDIA's CUDA 13.0 compiler and headers from PyPI (nvcc, nvvm, crt, runtime,
# cccl: ≈130 MB of wheels) in ~/.cache/cpt/cuda-13.0, plus link-time stubs of the CUDA libraries.
#   eval "$(scripts/cuda-env.sh)" && cargo check --release -p cpt-worker --features cuda
#
# Why 13.0: candle's kernels and ours ship as PTX that the driver compiles when a program starts,
# and a driver compiles PTX only up to its own CUDA version. The GPU machines we are lent run
# driver 580 (CUDA 13.0); PTX from a newer nvcc would not load there.
#
# Why stubs: the libraries (libcuda from the driver; cuBLAS, cuBLASLt, cuRAND, NVRTC) are only
# needed where the binary runs. Linking needs their names, so each stub defines the symbols
# cudarc declares for it, under the real library's soname; at run time the real ones load.
set -euo pipefail
root=${CPT_CUDA_ENV:-$HOME/.cache/cpt/cuda-13.0}
[ -x "$root/bin/python" ] || python3 -m venv "$root" >&2
# Every component pinned: the meta-package leaves nvvm/crt/runtime free, and a newer nvvm writes PTX
# that this ptxas refuses ("Unsupported .version 9.5").
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
      nvidia-cuda-cccl==13.0.85)
"$root/bin/pip" freeze 2>/dev/null | grep -qx "nvidia-nvvm==13.0.88" || "$root/bin/pip" install -q "${pins[@]}" >&2
cuda=$("$root/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
# cudarc and candle's build scripts look for the unversioned library name.
[ -e "$cuda/lib/libcudart.so" ] || ln -s libcudart.so.13 "$cuda/lib/libcudart.so"

stubs=$root/stubs
if [ ! -e "$stubs/libnvrtc.so" ]; then
  cudarc=$(cd "$(dirname "$0")/.." && cargo metadata --format-version 1 --all-features 2>/dev/null |
    "$root/bin/python" -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
  mkdir -p "$stubs"
  # library, soname, cudarc's bindings of it
  for spec in cuda:libcuda.so.1:driver cublas:libcublas.so.13:cublas cublasLt:libcublasLt.so.13:cublaslt \
              curand:libcurand.so.10:curand nvrtc:libnvrtc.so.13:nvrtc; do
    IFS=: read -r lib soname module <<<"$spec"
    sed -nE 's/^pub unsafe fn ([A-Za-z_0-9]+)\(.*/void \1(void) {}/p' "$(dirname "$cudarc")/src/$module/sys/mod.rs" | sort -u >"$stubs/$lib.c"
    cc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
  done
fi
cat <<ENV
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_ROOT="$cuda"
export PATH="$cuda/bin:\$PATH" LIBRARY_PATH="$cuda/lib:$stubs:\${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
ENV
