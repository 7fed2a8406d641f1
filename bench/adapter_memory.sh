#!/usr/bin/env bash
# Peak memory and speed of full training against adapter training of one random model, each in its
# own process (peak RSS is per process), beside the plan's memory estimate:
#   full: every weight in f32 with AdamW state; lora: rank 16 on every projection over a bf16 base;
#   lora+embeddings: the same plus embed_tokens/lm_head trained in full.
#   bench/adapter_memory.sh [config] [seq_len] [rounds]     (default: bench/configs/llama-1b.json 256 1)
# Full training of the 1B (≈22 GiB) does not fit a 24 GiB machine: bench/configs/llama-1b-8-layers.json
# is the same model with half its layers (0.75B), where all three fit.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-bench/configs/llama-1b.json}
seq_len=${2:-256}
rounds=${3:-1}
cargo build --release -p cpt-worker >/dev/null 2>&1
worker=${CARGO_TARGET_DIR:-$PWD/target}/release/cpt-worker
out=$(mktemp -d)
targets='["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
echo "{\"lora\": {\"rank\": 16, \"alpha\": 32, \"target_modules\": $targets}, \"base_dtype\": \"bf16\"}" >"$out/lora.json"
echo "{\"lora\": {\"rank\": 16, \"alpha\": 32, \"target_modules\": $targets}, \"base_dtype\": \"bf16\",
       \"modules_to_save\": [\"embed_tokens\", \"lm_head\"], \"embedding_lr\": 1e-5}" >"$out/lora+embeddings.json"
for round in $(seq "$rounds"); do
  for variant in full lora lora+embeddings; do
    adapter=()
    [ "$variant" = full ] || adapter=(--adapter "$out/$variant.json")
    # A variant the plan says cannot fit is refused before it allocates; its reason is kept.
    "$worker" bench --config "$config" --seq-len "$seq_len" --batch 1 --steps 2 --warmup 1 "${adapter[@]}" \
      >>"$out/$variant.jsonl" 2>"$out/$variant.err" || tail -n 1 "$out/$variant.err" >"$out/$variant.refused"
  done
  echo "round $round/$rounds done" >&2
done
python3 - "$out" "$config" "$seq_len" <<'PY'
import json, statistics, sys, pathlib
out, config, seq_len = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
print(f"{config}, seq {seq_len}, batch 1, on {cpu} (medians over the rounds)")
print(f"{'':18}{'trainable':>14}{'tokens/s':>10}{'peak RSS MiB':>14}{'estimate MiB':>14}{'estimate/peak':>15}")
for variant in ("full", "lora", "lora+embeddings"):
    runs = [json.loads(l) for l in (out / f"{variant}.jsonl").read_text().splitlines()]
    if not runs:
        reason = (out / f"{variant}.refused").read_text().strip() or "killed (out of memory)"
        print(f"{variant:18}{reason}")
        continue
    m = lambda key: statistics.median(r[key] for r in runs)
    print(f"{variant:18}{runs[0]['trainable_parameters']:>14,}{m('tokens_per_second'):>10.1f}"
          f"{m('peak_rss_mib'):>14.0f}{m('memory_estimate_mib'):>14.0f}{m('memory_estimate_mib') / m('peak_rss_mib'):>15.2f}")
PY
