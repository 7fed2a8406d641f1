#!/usr/bin/env bash
# Runs every test: the Rust workspace (unit, integration and CLI tests on the real SmolLM2) and the
# Python reference checks against transformers. Fetches assets and the Python environment first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
python=$(scripts/python-env.sh | tail -n 1)
cargo fmt --all -- --check
cargo test --release --workspace
# `cargo test` built target/release/cpt-worker for the CLI tests; pytest drives that same binary.
"$python" -m pytest -q tests/python
