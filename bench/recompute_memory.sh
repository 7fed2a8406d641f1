#!/usr/bin/env bash
# Activation recomputation: peak memory and tokens/s of full training without it and with it every
# layer (the spec's recompute_every: 1), beside the plan's estimate, on one model config.
#   bench/recompute_memory.sh [config] [seq_len] [steps]
# (default: bench/configs/llama-1b-8-layers.json 2048 1). The full 16-layer 1B needs ≈20 GiB for its
# weights, gradients and AdamW moments alone: on a 24 GiB machine `cpt-worker bench` refuses it up
# front ("does not fit"), which this script reports with the plan's estimate. The run without
# recomputation ignores the estimate, an upper bound (--ignore-estimate), to measure what the
# explicit step really holds.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-bench/configs/llama-1b-8-layers.json}
seq_len=${2:-2048}
steps=${3:-1}
threads=${THREADS:-2}
cargo build --release -p cpt-worker >/dev/null 2>&1
worker=${CARGO_TARGET_DIR:-$PWD/target}/release/cpt-worker
out=$(mktemp -d)
# With recomputation first: where even that does not fit, the run without it is not tried.
for mode in 1 none; do
  if [ "$mode" = none ]; then
    if grep -q error "$out/1.json"; then echo '{"error": "not tried: recomputing every layer does not fit either"}' >"$out/none.json"; continue; fi
    extra=(--ignore-estimate)
  else
    extra=(--recompute-every "$mode")
  fi
  if ! RAYON_NUM_THREADS=$threads "$worker" bench --config "$config" --seq-len "$seq_len" --batch 1 \
      --steps "$steps" --warmup 0 "${extra[@]}" >"$out/$mode.json" 2>"$out/$mode.err"; then
    echo "{\"error\": $(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().strip()))' "$out/$mode.err")}" >"$out/$mode.json"
  fi
done
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
python3 - "$out" "$config" "$seq_len" "$cpu" <<'PY'
import json, sys, pathlib
out, config, seq_len, cpu = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
print(f"{config}, seq {seq_len}, batch 1, on {cpu}")
print(f"{'recompute_every':18}{'tokens/s':>10}{'peak RSS GiB':>14}{'estimate GiB':>14}")
runs = {}
for mode in ("none", "1"):
    r = runs[mode] = json.loads((out / f"{mode}.json").read_text())
    if "error" in r:
        print(f"{mode:18}{'':>10}{'':>14}   {r['error'].splitlines()[-1]}")
        continue
    print(f"{mode:18}{r['tokens_per_second']:>10.1f}{r['peak_rss_mib'] / 1024:>14.2f}{r['memory_estimate_mib'] / 1024:>14.2f}")
a, b = runs["none"], runs["1"]
if "error" not in a and "error" not in b:
    print(f"recompute every layer: {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x peak memory "
          f"({(a['peak_rss_mib'] - b['peak_rss_mib']) / 1024:.2f} GiB less), {b['tokens_per_second'] / a['tokens_per_second']:.2f}x tokens/s")
PY
