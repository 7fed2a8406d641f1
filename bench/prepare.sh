#!/usr/bin/env bash
# Preparation throughput and memory: cpt-worker prepare (clean + tokenize + pack) beside a Python
# reference (HF tokenizers + numpy packing, no cleaning), on the same corpus in the same run.
# Deduplication is off: the corpus repeats its texts with perturbations that MinHash still calls near
# duplicates (the Tang poems' shuffled lines: 38% of the tokens at 1 GB), and dropping them would
# spare cpt tokenizing what the reference tokenizes. Both token counts are printed.
# usage: bench/prepare.sh [SIZE_MB (default 1024)] [ROUNDS (default 1)]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1024}
rounds=${2:-1}
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
echo '{"seq_len": 2048, "dedup": {"exact": false, "near": false}}' > "$work/prepare.json"
: > "$work/rounds"
for round in $(seq "$rounds"); do
  rm -rf "$work/dataset" "$work/reference.bin"
  /usr/bin/time -f '%e %M' -o "$work/cpt.time" "$worker" prepare --tokenizer "$model/tokenizer.json" \
    --input "$corpus" --out "$work/dataset" --config "$work/prepare.json" >/dev/null 2>"$work/cpt.log"
  /usr/bin/time -f '%e %M' -o "$work/ref.time" "$python" bench/prepare_reference.py "$model/tokenizer.json" \
    "$corpus" "$work/reference.bin" 2048 >/dev/null
  echo "$(cat "$work/cpt.time") $(cat "$work/ref.time")" >> "$work/rounds"
done
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) threads"
"$python" - "$(stat -c %s "$corpus")" "$work/rounds" "$work/dataset/manifest.json" "$work/reference.bin" <<'PY'
import json, os, statistics, sys
size = float(sys.argv[1])
manifest = json.load(open(sys.argv[3]))
cpt_tokens = sum(split["tokens"] for split in manifest["splits"].values())
print(f"tokens: cpt {cpt_tokens:,} (after cleaning), reference {os.path.getsize(sys.argv[4]) // 2:,} (whole blocks)")
rounds = [list(map(float, line.split())) for line in open(sys.argv[2])]
print(f"corpus {size / 1e6:.0f} MB, {len(rounds)} alternating rounds (cpt, then the reference)")
for i, (cpt_s, cpt_kb, ref_s, ref_kb) in enumerate(rounds, 1):
    print(f"  round {i}: cpt {size / 1e6 / cpt_s:6.2f} MB/s ({cpt_kb / 1024:.0f} MiB), "
          f"reference {size / 1e6 / ref_s:6.2f} MB/s ({ref_kb / 1024:.0f} MiB), ratio {ref_s / cpt_s:.2f}x")
median = lambda column: statistics.median(r[column] for r in rounds)
print(f"cpt-worker prepare (clean+tokenize+pack):       {size / 1e6 / median(0):6.2f} MB/s, peak RSS {median(1) / 1024:7.0f} MiB")
print(f"python reference (tokenize+pack):               {size / 1e6 / median(2):6.2f} MB/s, peak RSS {median(3) / 1024:7.0f} MiB")
print(f"median ratio cpt / reference: {statistics.median(r[2] / r[0] for r in rounds):.2f}x")
PY
tail -n 12 "$work/cpt.log" | grep -v '^  '
