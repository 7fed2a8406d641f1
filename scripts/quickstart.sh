#!/usr/bin/env bash
# The main job on the embedded default, as far as it exists today: fetch the real SmolLM2-135M,
# build cpt, import the model to HuggingFace format, measure its perplexity on English prose and
# let it continue a prompt. Safe to interrupt and re-run: every step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CPT_DATA:-$PWD/cpt-data}
assets=$(scripts/fetch-assets.sh | tail -n 1)
cargo build --release -p cpt-worker
worker=${CARGO_TARGET_DIR:-$PWD/target}/release/cpt-worker
model="$DATA/models/smollm2-135m"
if [ ! -f "$model/model.safetensors" ]; then
  "$worker" import "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model"
fi
echo "== perplexity of tests/fixtures/english.txt"
"$worker" eval --model "$model" --text tests/fixtures/english.txt
echo "== greedy continuation"
"$worker" generate --model "$model" --prompt "The capital of France is" --max-new-tokens 16
echo "== the model is a HuggingFace directory: $model"
