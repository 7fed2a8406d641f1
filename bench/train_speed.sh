#!/usr/bin/env bash
# Training speed, candle (cpt-worker bench: fused kernels, and the composed ops) against PyTorch
# eager f32 (bench/torch_train.py: transformers' LlamaForCausalLM) on the same model, token shape and
# AdamW settings, with the same number of threads. Rounds alternate the three so machine noise hits
# all of them; the medians and the ratio are printed.
#   bench/train_speed.sh [reference|smollm2-135m] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-reference}
rounds=${2:-3}
threads=${THREADS:-2}
case $preset in
  reference) args=(--seq-len 256 --batch 8 --steps 10 --warmup 2) ;;
  smollm2-135m) args=(--seq-len 256 --batch 2 --steps 3 --warmup 1) ;;
  *) echo "unknown preset $preset" >&2; exit 2 ;;
esac
config=bench/configs/$preset.json
cargo build --release -p cpt-worker >/dev/null 2>&1
worker=${CARGO_TARGET_DIR:-$PWD/target}/release/cpt-worker
python=$(scripts/python-env.sh | tail -n 1)
out=$(mktemp -d)
for round in $(seq "$rounds"); do
  RAYON_NUM_THREADS=$threads "$worker" bench --config "$config" "${args[@]}" >>"$out/fused.jsonl"
  "$python" bench/torch_train.py --config "$config" "${args[@]}" --threads "$threads" >>"$out/torch.jsonl"
  RAYON_NUM_THREADS=$threads "$worker" bench --config "$config" "${args[@]}" --kernels composed >>"$out/composed.jsonl"
  echo "round $round/$rounds done" >&2
done
"$python" - "$out" "$preset" "$threads" <<'PY'
import json, statistics, sys, pathlib
out, preset, threads = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
runs = {name: [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines()] for name in ("fused", "composed", "torch")}
median = lambda name, key: statistics.median(r[key] for r in runs[name])
print(f"{preset}: {runs['torch'][0]['parameters']:,} parameters, {runs['torch'][0]['tokens_per_step']} tokens/step, {threads} threads, {len(runs['torch'])} rounds (medians)")
print(f"{'':22}{'tokens/s':>10}{'peak RSS MiB':>14}   per round tokens/s")
for name, label in (("fused", "candle fused"), ("composed", "candle composed"), ("torch", "PyTorch eager f32")):
    rounds = " ".join(f"{r['tokens_per_second']:.0f}" for r in runs[name])
    print(f"{label:22}{median(name, 'tokens_per_second'):>10.0f}{median(name, 'peak_rss_mib'):>14.0f}   {rounds}")
for name in ("fused", "composed"):
    print(f"{name} / torch: {median(name, 'tokens_per_second') / median('torch', 'tokens_per_second'):.2f}x tokens/s, "
          f"{median(name, 'peak_rss_mib') / median('torch', 'peak_rss_mib'):.2f}x peak memory")
f = runs["fused"][0]
print(f"candle fused: {median('fused', 'gflops_per_second'):.1f} GFLOP/s (model FLOPs)")
PY
