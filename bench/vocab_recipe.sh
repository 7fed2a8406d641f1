#!/usr/bin/env bash
# A new language in two stages, on SmolLM2-135M (the quickstart's GGUF) with Tang poems as the
# domain and Brown as general text (scripts/fetch-assets.sh): extend the vocabulary by 1000 tokens,
# stage 1 trains only the new embedding/output rows, stage 2 LoRA plus the embeddings from stage 1's
# checkpoint. Prints fertility, and bits per byte on both sets at step 0 and after each stage,
# beside the original model's. ~10 minutes on 2 cores.
#   bench/vocab_recipe.sh [work-dir]     (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=${1:-$(mktemp -d)}
assets=${CPT_ASSETS:-$HOME/.cache/cpt/assets}
cargo build --release -p cpt-worker >/dev/null 2>&1
W=${CARGO_TARGET_DIR:-$repo/target}/release/cpt-worker
mkdir -p "$work" && cd "$work"
python3 - "$assets" <<'PY'
import json, sys
assets = sys.argv[1]
poems = [json.loads(l)["text"] for l in open(f"{assets}/text/tang-poems.jsonl")]
open("poems.txt", "w").write("\n\n".join(poems))
open("poems-sample.txt", "w").write("\n\n".join(poems[:50]))
brown = [json.loads(l)["text"] for l in open(f"{assets}/text/brown.jsonl")]
open("brown.txt", "w").write("\n\n".join(t.replace("\n\n", "\n") for t in brown[:200]))
PY
[ -d smollm2 ] || $W import "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --out smollm2 --dtype f32 >/dev/null
[ -d extended ] || $W extend-vocab --model smollm2 --corpus poems.txt --new-tokens 1000 \
  --report-text poems-sample.txt "$repo/tests/fixtures/chinese-docs.txt" "$repo/tests/fixtures/english.txt" --out extended
echo '{"validation_fraction": 0.05}' >prepare.json
for model in smollm2 extended; do
  for text in poems brown; do
    [ -d "data-$model-$text" ] || $W prepare --tokenizer $model/tokenizer.json --input $text.txt \
      --out "data-$model-$text" --seq-len 256 --config prepare.json >/dev/null 2>&1
  done
done
spec() { # name model steps lr adapter
  cat <<JSON
{"name": "$1", "base_model": "$work/$2",
 "train_data": [{"dataset": "$work/data-$2-poems", "weight": 0.9}, {"dataset": "$work/data-$2-brown", "weight": 0.1}],
 "eval_data": {"domain": "$work/data-$2-poems", "general": "$work/data-$2-brown"}, "eval_blocks": 16,
 "seq_len": 256, "micro_batch_size": 4, "lr": $4, "schedule": "cosine", "warmup_steps": 2, "max_steps": $3,
 "eval_every": 0, "checkpoint_every": 0, "sample_prompts": ["床前明月光，"], "sample_tokens": 16,
 "sample_decoding": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.2}, "adapter": $5}
JSON
}
all='["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'
# The original model, measured only (one step at a negligible rate).
spec original smollm2 1 1e-9 '{"lora": {"rank": 16, "alpha": 32, "target_modules": ["q_proj"]}}' >original.json
spec stage1 extended 20 2e-3 '{"modules_to_save": ["embed_tokens", "lm_head"], "train_rows_from": 49152}' >stage1.json
[ -d run-original ] || $W train --spec original.json --run-dir run-original >/dev/null
[ -d run-stage1 ] || $W train --spec stage1.json --run-dir run-stage1 >/dev/null
stage1=$(ls -d "$work"/run-stage1/checkpoints/step-* | tail -1)
spec stage2 extended 20 1e-3 "{\"lora\": {\"rank\": 16, \"alpha\": 32, \"target_modules\": $all},
  \"modules_to_save\": [\"embed_tokens\", \"lm_head\"], \"embedding_lr\": 2e-4, \"init_from\": \"$stage1\"}" >stage2.json
[ -d run-stage2 ] || $W train --spec stage2.json --run-dir run-stage2 >/dev/null
python3 - <<'PY'
import json
print(open("extended/vocab_extension.json").read())
for run in ("original", "stage1", "stage2"):
    events = [json.loads(l) for l in open(f"run-{run}/events.jsonl")]
    steps = [e for e in events if e["kind"] == "step"]
    speed = sorted(s["tokens_per_second"] for s in steps)[len(steps) // 2]
    print(f"{run}: {events[0]['plan']['trainable_parameters']:,} trained, median {speed:.0f} tokens/s")
    for e in (e for e in events if e["kind"] == "eval"):
        print(f"  step {e['step']:>3} {e['set']:<8} bits/byte {e['bits_per_byte']:.4f}  perplexity {e['perplexity']:9.2f}")
    for e in (e for e in events if e["kind"] == "sample"):
        print(f"  sample: {e['prompt']}{e['continuation']}")
PY
