#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, integration and CLI tests on the real SmolLM2) and the
# Python reference checks against transformers. Fetches assets, promtool and the Python environment first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
# promtool (Debian's prometheus package) checks the server's /metrics exposition.
if ! command -v promtool >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
python=$(scripts/python-env.sh | tail -n 1)
cargo fmt --all -- --check
cargo test --release --workspace
# `cargo test` built target/release/cpt-worker for the CLI tests; pytest drives that same binary.
"$python" -m pytest -q tests/python
