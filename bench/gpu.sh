#!/usr/bin/env bash
# Issue #9's GPU checks as one device call (< 10 minutes on an H100/H200): the fused ops' CUDA
# kernels against the composed ops in f64 (check-kernels), GPU vs CPU losses over 20 steps, then
# bf16 training speed, MFU and GPU memory for SmolLM2-135M (fused CUDA kernels and composed ops)
# and a ~1B Llama.
#
# The GPU machine reaches no registry and has no Rust, so the binary is built here:
#   scripts/build-cuda-worker.sh          (→ .device/cpt-worker.gz, linked against CUDA 13 stubs)
# then run on the device with `.device` carried:  bench/gpu.sh   (results in $OUT, else /tmp/gpu-out)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1
worker=${CPT_WORKER:-/tmp/cpt-worker}
[ -n "${CPT_WORKER:-}" ] || { gunzip -c .device/cpt-worker.gz >"$worker" && chmod +x "$worker"; }

# The CUDA 13 libraries the binary loads: the machine's Python NVIDIA packages, then the system's.
libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
wanted = ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudart.so.13")
dirs = {os.path.dirname(p) for r in roots for w in wanted for p in glob.glob(f"{r}/nvidia/**/{w}", recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$worker" | grep "not found"; then
  echo "the libraries above are missing on this machine" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
name=$(head -n 1 "$out/gpu.txt" | cut -d, -f1)

# 1. Each fused op's CUDA kernel (f32 and bf16 storage) against the composed ops on the CPU in f64.
"$worker" check-kernels --device cuda:0 | tee "$out/kernels.jsonl" || echo "check-kernels FAILED"

# 2. The same 20 steps (fixed init, fixed tokens) on the CPU in f32 and on the GPU in f32 and bf16.
steps=(--config bench/configs/reference.json --seq-len 256 --batch 8 --steps 18 --warmup 2)
RAYON_NUM_THREADS=16 "$worker" bench "${steps[@]}" --device cpu >"$out/parity-cpu-f32.json"
"$worker" bench "${steps[@]}" --device cuda:0 >"$out/parity-gpu-f32.json"
"$worker" bench "${steps[@]}" --device cuda:0 --bf16 >"$out/parity-gpu-bf16.json"

# 3. Speed in bf16, with the GPU's memory sampled alongside.
speed() { # label, bench args…
  local label=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$out/$label.mem" &
  local sampler=$!
  timeout 150 "$worker" bench "$@" --device cuda:0 --bf16 >"$out/$label.json" ||
    echo "{\"error\": \"$label failed or timed out\"}" >"$out/$label.json"
  kill $sampler
}
speed smollm2 --config bench/configs/smollm2-135m.json --seq-len 2048 --batch 8 --steps 10 --warmup 3
speed smollm2-composed --config bench/configs/smollm2-135m.json --seq-len 2048 --batch 8 --steps 10 --warmup 3 --kernels composed
speed llama-1b --config bench/configs/llama-1b.json --seq-len 2048 --batch 4 --steps 8 --warmup 2

python3 - "$out" "$name" <<'PY'
import json, pathlib, sys
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
peak = 989e12 if ("H100" in name or "H200" in name) else float("nan")
load = lambda f: json.loads((out / f).read_text())
cpu = load("parity-cpu-f32.json")["losses"]
for label, bound in (("gpu-f32", 1e-3), ("gpu-bf16", 3e-2)):
    gpu = load(f"parity-{label}.json")["losses"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(gpu, cpu))
    print(f"{label} vs cpu f32 over {len(cpu)} steps: worst relative loss difference {worst:.2e} (bound {bound}) {'ok' if worst <= bound else 'FAIL'}")
for label in ("smollm2", "smollm2-composed", "llama-1b"):
    r = load(f"{label}.json")
    if "error" in r:
        print(label, r["error"]); continue
    mem = max((int(l) for l in (out / f"{label}.mem").read_text().split() if l.strip().isdigit()), default=0)
    print(f"{label} ({r['kernels']}): {r['parameters']:,} params, {r['tokens_per_second']:.0f} tokens/s, "
          f"{r['gflops_per_second']/1e3:.1f} TFLOP/s = MFU {r['gflops_per_second']*1e9/peak:.1%} of {name} bf16 dense peak, "
          f"GPU memory {mem} MiB")
PY
