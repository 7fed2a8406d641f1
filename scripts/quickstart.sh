#!/usr/bin/env bash
# The main job on the embedded default: cpt-server (SQLite in cpt-data/, one local CPU worker)
# continues SmolLM2-135M on Tang poems with English replay, measuring domain (learning) and general
# (forgetting) perplexity, then the result is exported as a HuggingFace directory.
# Safe to interrupt and re-run: Ctrl-C checkpoints the job, and the next run resumes it exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=cpt-data
PORT=${CPT_QUICKSTART_PORT:-8080}
URL="http://127.0.0.1:$PORT"
SPEC=examples/smollm2-tang-poetry.json

assets=$(scripts/fetch-assets.sh | tail -n 1)
cargo build --release -p cpt-server -p cpt-worker
bin=${CARGO_TARGET_DIR:-$PWD/target}/release

model="$DATA/models/smollm2-135m"
[ -d "$model" ] || "$bin/cpt-worker" import "$assets/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$model"
for corpus in tang-poems brown; do
  dataset="$DATA/datasets/$corpus-256"
  [ -d "$dataset" ] || "$bin/cpt-worker" prepare --tokenizer "$model/tokenizer.json" --input "$assets/text/$corpus.jsonl" \
    --out "$dataset" --seq-len 256 --config examples/prepare-demo.json >/dev/null
done

# The server and its local worker; on exit (or Ctrl-C) it checkpoints the job and stops.
"$bin/cpt-server" --data-dir "$DATA" --bind "127.0.0.1:$PORT" >>"$DATA/server.log" 2>&1 &
server=$!
watcher=
stop() {
  [ -z "$watcher" ] || kill "$watcher" 2>/dev/null || true
  kill -TERM $server 2>/dev/null && wait $server 2>/dev/null
}
trap stop EXIT
trap 'exit 130' INT TERM
until curl -sf "$URL/readyz" >/dev/null; do
  kill -0 $server 2>/dev/null || { tail -n 20 "$DATA/server.log"; echo "cpt-server did not start (port $PORT taken? set CPT_QUICKSTART_PORT)" >&2; exit 1; }
  sleep 0.2
done
echo "cpt-server on $URL (log: $DATA/server.log, database: $DATA/cpt.sqlite3)"

# The same spec gets the same job on every run (Idempotency-Key); an interrupted one is resumed.
key="quickstart-$(sha256sum "$SPEC" | cut -c1-16)"
job=$(curl -sf -XPOST "$URL/v1/jobs" -H 'Content-Type: application/json' -H "Idempotency-Key: $key" -d @"$SPEC")
field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
id=$(field id <<<"$job")
case $(field state <<<"$job") in
  cancelled | failed) curl -sf -XPOST "$URL/v1/jobs/$id/resume" >/dev/null ;;
esac
echo "job page:   $URL/jobs/$id   (live curves, checkpoints, samples; every job at $URL/)"
# In the background so that a signal reaches the traps at once (bash runs them only between commands).
"$bin/cpt-worker" watch "$id" --server "$URL" &
watcher=$!
wait $watcher
watcher=

final=$(curl -sf "$URL/v1/jobs/$id/checkpoints" | python3 -c 'import json,sys; print(json.load(sys.stdin)["checkpoints"][-1]["path"])')
export_dir="$DATA/exports/$id"
[ -d "$export_dir" ] || "$bin/cpt-worker" export "$final" --out "$export_dir" --dtype bf16 >/dev/null

cat <<EOF

job:        $id
checkpoint: $final
HF export:  $export_dir   (transformers.AutoModelForCausalLM.from_pretrained loads it)
try:        $bin/cpt-worker generate --model $final --prompt '床前明月光，' --max-new-tokens 24

The server stops with this script; its database keeps everything. To explore:
  $bin/cpt-server --data-dir $DATA &
  # then open $URL/jobs/$id in a browser: the job page (curves, checkpoints, samples)
  curl -s $URL/v1/jobs/$id                      # state, progress, latest metrics
  curl -s '$URL/v1/jobs/$id/events?kind=eval'   # every evaluation
  curl -s $URL/v1/jobs/$id/metrics              # per-step series for plotting
  curl -s $URL/v1/jobs/$id/checkpoints
  curl -s $URL/metrics | grep cpt_eval_perplexity
EOF
