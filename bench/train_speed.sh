#!/usr/bin/env bash
# Training speed on the CPU: candle's explicit step (full training's default), the same fused kernels
# through candle's autograd, and PyTorch f32 (bench/torch_train.py: transformers' LlamaForCausalLM)
# with eager and with scaled-dot-product attention, on the same model, token shape, AdamW settings
# and number of threads (PyTorch clips the gradient norm to 1 as a cpt job does by default). Rounds
# alternate the four so machine noise hits all of them; the medians, the ratios against both PyTorch
# variants (of the medians, and the median of each round's own ratio, which holds up better on a
# machine whose clock shifts between runs) and the CPU model are printed.
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
  RAYON_NUM_THREADS=$threads "$worker" bench --config "$config" "${args[@]}" >>"$out/explicit.jsonl"
  "$python" bench/torch_train.py --config "$config" "${args[@]}" --threads "$threads" --attention sdpa >>"$out/sdpa.jsonl"
  RAYON_NUM_THREADS=$threads "$worker" bench --config "$config" "${args[@]}" --autograd >>"$out/autograd.jsonl"
  "$python" bench/torch_train.py --config "$config" "${args[@]}" --threads "$threads" --attention eager >>"$out/eager.jsonl"
  echo "round $round/$rounds done" >&2
done
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
"$python" - "$out" "$preset" "$threads" "$cpu" <<'PY'
import json, statistics, sys, pathlib
out, preset, threads, cpu = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
names = {"explicit": "candle explicit step", "autograd": "candle autograd", "sdpa": "PyTorch SDPA f32", "eager": "PyTorch eager f32"}
runs = {name: [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines()] for name in names}
median = lambda name, key: statistics.median(r[key] for r in runs[name])
print(f"{preset} on {cpu}: {runs['eager'][0]['parameters']:,} parameters, {runs['eager'][0]['tokens_per_step']} tokens/step, "
      f"{threads} threads, {len(runs['eager'])} rounds (medians)")
print(f"{'':22}{'tokens/s':>10}{'peak RSS MiB':>14}   per round tokens/s")
for name, label in names.items():
    rounds = " ".join(f"{r['tokens_per_second']:.0f}" for r in runs[name])
    print(f"{label:22}{median(name, 'tokens_per_second'):>10.0f}{median(name, 'peak_rss_mib'):>14.0f}   {rounds}")
def paired(name, reference):
    ratios = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(runs[name], runs[reference])]
    return statistics.median(ratios), " ".join(f"{r:.2f}" for r in sorted(ratios))
for name in ("explicit", "autograd"):
    for reference in ("sdpa", "eager"):
        within, each = paired(name, reference)
        print(f"{name} / torch {reference}: {median(name, 'tokens_per_second') / median(reference, 'tokens_per_second'):.2f}x tokens/s "
              f"(per round: median {within:.2f}x of {each}), "
              f"{median(name, 'peak_rss_mib') / median(reference, 'peak_rss_mib'):.2f}x peak memory")
print(f"explicit / autograd: {median('explicit', 'tokens_per_second') / median('autograd', 'tokens_per_second'):.2f}x tokens/s, "
      f"{median('explicit', 'peak_rss_mib') / median('autograd', 'peak_rss_mib'):.2f}x peak memory")
print(f"candle explicit: {median('explicit', 'gflops_per_second'):.1f} GFLOP/s (model FLOPs)")
PY
