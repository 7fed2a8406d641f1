#!/usr/bin/env bash
# Reproduces the CPT findings of docs/cpt-findings.md through the API alone: a cpt-server with one
# local CPU worker (data in cpt-findings/), SmolLM2-135M, Tang poems as the domain and the Brown
# corpus as general text, both prepared by POST /v1/datasets. It queues a learning-rate sweep, a
# constant-small-lr job, a replay sweep, a high-lr job under a pausing forgetting budget, and a
# continuation; waits for them; and writes every table, curve and plot to docs/findings/.
# ~35 minutes on 2 cores. Safe to re-run: Idempotency-Keys give back the same jobs, and an
# interrupted job is resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${CPT_FINDINGS_DATA:-cpt-findings}
PORT=${CPT_FINDINGS_PORT:-8081}
URL="http://127.0.0.1:$PORT"
OUT=docs/findings
mkdir -p "$DATA/text" "$OUT"

assets=$(scripts/fetch-assets.sh | tail -n 1)
cargo build --release -p cpt-server -p cpt-worker
bin=${CARGO_TARGET_DIR:-$PWD/target}/release
model="$DATA/models/smollm2-135m"
[ -d "$model" ] || "$bin/cpt-worker" import "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model"
cp -n "$assets/text/tang-poems.jsonl" "$assets/text/brown.jsonl" "$DATA/text/"

"$bin/cpt-server" --data-dir "$DATA" --bind "127.0.0.1:$PORT" >>"$DATA/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null && wait $server 2>/dev/null' EXIT
trap 'exit 130' INT TERM
until curl -sf "$URL/readyz" >/dev/null; do
  kill -0 $server 2>/dev/null || { tail -n 20 "$DATA/server.log"; exit 1; }
  sleep 0.2
done

# post PATH KEY BODY: the response (the same resource on a re-run, by its Idempotency-Key).
post() { curl -sf -XPOST "$URL$1" -H 'Content-Type: application/json' -H "Idempotency-Key: findings-$2" -d "$3"; }
# field EXPR: evaluates a Python expression over the JSON on stdin, `d`.
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }
# settle PATH: waits until the job or sweep at PATH is at rest (resuming it once if it was interrupted).
settle() {
  local state
  state=$(curl -sf "$URL$1" | field 'd["state"]')
  case $state in cancelled | failed) curl -sf -XPOST "$URL$1/resume" >/dev/null ;; esac
  while state=$(curl -sf "$URL$1" | field 'd["state"]'); [[ $state =~ ^(queued|running|cancelling)$ ]]; do sleep 5; done
  echo "$1: $state"
}

dataset() {
  local id
  id=$(post /v1/datasets "$1" "{\"name\": \"$1-128\", \"tokenizer\": \"$model/tokenizer.json\",
    \"inputs\": [\"$DATA/text/$1.jsonl\"], \"config\": {\"seq_len\": 128, \"validation_fraction\": 0.02}}" | field 'd["id"]')
  while [[ $(curl -sf "$URL/v1/datasets/$id" | field 'd["state"]') =~ ^(queued|running)$ ]]; do sleep 2; done
  curl -sf "$URL/v1/datasets/$id" | field 'd["path"]'
}
tang=$(dataset tang-poems)
brown=$(dataset brown)

base=$(
  cat <<EOF
{"name": "base", "base_model": "$model",
 "train_data": [{"dataset": "$tang", "weight": 0.9}, {"dataset": "$brown", "weight": 0.1}],
 "eval_data": {"domain": "$tang", "general": "$brown"},
 "seq_len": 128, "micro_batch_size": 4, "grad_accum_steps": 1,
 "lr": 1e-3, "schedule": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1,
 "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
 "max_steps": 30, "eval_every": 3, "eval_blocks": 8, "checkpoint_every": 0, "keep_checkpoints": 1, "seed": 0}
EOF
)
with() { python3 -c 'import json,sys; b=json.loads(sys.argv[1]); b.update(json.loads(sys.argv[2])); print(json.dumps(b))' "$base" "$1"; }

# 1 and 2: re-warming to four peaks; the constant small rate is finding 1's reference.
lr=$(post /v1/sweeps lr "{\"name\": \"peak lr\", \"base\": $base, \"grid\": {\"lr\": [1e-4, 3e-4, 1e-3, 3e-3]}}" | field 'd["id"]')
constant=$(post /v1/jobs constant "$(with '{"name": "constant lr 3e-5", "lr": 3e-5, "schedule": "constant", "warmup_steps": 0}')" | field 'd["id"]')
# 3: replay of general text, 0%, 5% and 25% of the drawn blocks, at the middle peak.
replay=$(post /v1/sweeps replay "{\"name\": \"replay\", \"base\": $base, \"grid\": {\"train_data\": [
  [{\"dataset\": \"$tang\"}],
  [{\"dataset\": \"$tang\", \"weight\": 0.95}, {\"dataset\": \"$brown\", \"weight\": 0.05}],
  [{\"dataset\": \"$tang\", \"weight\": 0.75}, {\"dataset\": \"$brown\", \"weight\": 0.25}]]}}" | field 'd["id"]')
# 4: the highest peak under a +10% budget on general perplexity that pauses.
budget=$(post /v1/jobs budget "$(with '{"name": "lr 3e-3, general budget +10% pause", "lr": 3e-3,
  "forgetting_budget": {"general": {"max_rise": 0.10, "action": "pause"}}}')" | field 'd["id"]')

settle "/v1/sweeps/$lr"
settle "/v1/jobs/$constant"
settle "/v1/sweeps/$replay"
settle "/v1/jobs/$budget"
# The constant run goes on for 15 more steps at the same rate: one curve across both jobs.
continued=$(post "/v1/jobs/$constant/continue" continued '{"max_steps": 15}' | field 'd["id"]')
settle "/v1/jobs/$continued"

for sweep in lr replay; do
  id=${!sweep}
  curl -sf "$URL/v1/sweeps/$id" >"$OUT/$sweep-sweep.json"
  curl -sf "$URL/v1/sweeps/$id/plot.svg" >"$OUT/$sweep-plot.svg"
done
# Every job's eval and step series, and the budget and lineage records.
python3 - "$URL" "$OUT" "$lr" "$replay" "$constant" "$budget" "$continued" <<'PY'
import json, sys, urllib.request
url, out, lr, replay, constant, budget, continued = sys.argv[1:]
get = lambda path: json.load(urllib.request.urlopen(url + path))
def events(job, kind):
    return [e["data"] for e in get(f"/v1/jobs/{job}/events?kind={kind}&limit=1000")["events"]]
jobs = [line["job_id"] for s in (lr, replay) for line in get(f"/v1/sweeps/{s}")["jobs"]] + [constant, budget, continued]
series = {}
for job in jobs:
    view = get(f"/v1/jobs/{job}")
    series[view["name"]] = {
        "job_id": job, "state": view["state"], "lineage": view["lineage"],
        "loss": [[e["step"], round(e["loss"], 4), e["lr"]] for e in events(job, "step")],
        "eval": [[e["step"], e["set"], round(e["perplexity"], 3), round(e.get("bits_per_byte") or 0, 4)] for e in events(job, "eval")],
        "forgetting_budget": events(job, "forgetting_budget"),
    }
json.dump(series, open(f"{out}/series.json", "w"), indent=1, ensure_ascii=False)
PY

python3 scripts/findings-tables.py "$OUT" >/dev/null
echo "wrote $OUT/: lr-sweep.json lr-plot.svg replay-sweep.json replay-plot.svg series.json tables.md"
