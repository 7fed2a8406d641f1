#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, integration and CLI tests on the real SmolLM2) and the
# Python reference checks against transformers. Fetches assets, Prometheus, docker-compose and the
# Python environment first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
# Debian's prometheus (promtool checks /metrics; a real Prometheus scrapes a job), docker-compose
# (validates docker-compose.yml without a Docker daemon) and chromium (the job page, headless).
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python=$(scripts/python-env.sh | tail -n 1)
cargo fmt --all -- --check
cargo test --release --workspace
# `cargo test` built target/release/cpt-worker for the CLI tests; pytest drives that same binary.
"$python" -m pytest -q tests/python
