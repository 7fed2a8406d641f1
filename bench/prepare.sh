#!/usr/bin/env bash
# Preparation throughput and memory: cpt-worker prepare (clean + dedup + tokenize + pack) beside a
# Python reference (HF tokenizers + numpy packing, no cleaning), on the same corpus in the same run.
# usage: bench/prepare.sh [SIZE_MB (default 1024)]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}
assets=$(scripts/fetch-assets.sh | tail -n 1)
python=$(scripts/python-env.sh | tail -n 1)
cargo build --release -p cpt-worker
worker=${CARGO_TARGET_DIR:-$PWD/target}/release/cpt-worker
work=${CPT_BENCH_DIR:-$(mktemp -d)}
mkdir -p "$work"
model="$work/smollm2"
[ -d "$model" ] || "$worker" import "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model" >/dev/null
corpus="$work/corpus-$size.jsonl"
[ -f "$corpus" ] || "$python" bench/make_corpus.py "$assets" "$corpus" "$size"
rm -rf "$work/dataset" "$work/reference.bin"
echo '{"seq_len": 2048}' > "$work/prepare.json"
/usr/bin/time -f '%e %M' -o "$work/cpt.time" "$worker" prepare --tokenizer "$model/tokenizer.json" \
  --input "$corpus" --out "$work/dataset" --config "$work/prepare.json" >/dev/null 2>"$work/cpt.log"
/usr/bin/time -f '%e %M' -o "$work/ref.time" "$python" bench/prepare_reference.py "$model/tokenizer.json" \
  "$corpus" "$work/reference.bin" 2048 >/dev/null
read -r cpt_s cpt_kb < "$work/cpt.time"
read -r ref_s ref_kb < "$work/ref.time"
bytes=$(stat -c %s "$corpus")
"$python" - "$bytes" "$cpt_s" "$cpt_kb" "$ref_s" "$ref_kb" <<'PY'
import sys
size, cpt_s, cpt_kb, ref_s, ref_kb = float(sys.argv[1]), *map(float, sys.argv[2:])
print(f"corpus {size / 1e6:.0f} MB")
print(f"cpt-worker prepare (clean+dedup+tokenize+pack): {size / 1e6 / cpt_s:6.2f} MB/s, peak RSS {cpt_kb / 1024:7.0f} MiB")
print(f"python reference (tokenize+pack):               {size / 1e6 / ref_s:6.2f} MB/s, peak RSS {ref_kb / 1024:7.0f} MiB")
print(f"ratio cpt / reference: {ref_s / cpt_s:.2f}x")
PY
tail -n 12 "$work/cpt.log" | grep -v '^  '
