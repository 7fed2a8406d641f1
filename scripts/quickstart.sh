#!/usr/bin/env bash
# The main job, standalone on the CPU: continue SmolLM2-135M on Tang poems with English replay,
# watching domain and general perplexity, then export the result as a HuggingFace directory.
# Safe to interrupt and re-run: finished steps are skipped and training resumes exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=cpt-data
assets=$(scripts/fetch-assets.sh | tail -n 1)
cargo build --release -p cpt-worker
worker=${CARGO_TARGET_DIR:-$PWD/target}/release/cpt-worker

model="$DATA/models/smollm2-135m"
[ -d "$model" ] || "$worker" import "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model"
for corpus in tang-poems brown; do
  dataset="$DATA/datasets/$corpus-256"
  [ -d "$dataset" ] || "$worker" prepare --tokenizer "$model/tokenizer.json" --input "$assets/text/$corpus.jsonl" \
    --out "$dataset" --seq-len 256 --config examples/prepare-demo.json >/dev/null
done

run="$DATA/runs/smollm2-tang-poetry"
"$worker" train --spec examples/smollm2-tang-poetry.json --run-dir "$run" --resume
final=$(ls -d "$run"/checkpoints/step-* | sort -V | tail -n 1)
export_dir="$DATA/exports/smollm2-tang-poetry"
[ -d "$export_dir" ] || "$worker" export "$final" --out "$export_dir" --dtype bf16

echo
echo "== learning (domain) vs forgetting (general), from $run/events.jsonl"
python3 - "$run/events.jsonl" <<'PY'
import json, sys
evals = [e for e in map(json.loads, open(sys.argv[1])) if e["kind"] == "eval"]
for e in evals:
    print(f"step {e['step']:>4}  {e['set']:<8} perplexity {e['perplexity']:8.2f}")
PY
echo
echo "checkpoint: $final"
echo "HF export:  $export_dir   (transformers.AutoModelForCausalLM.from_pretrained loads it)"
echo "try:        $worker generate --model $final --prompt '床前明月光，' --max-new-tokens 24"
