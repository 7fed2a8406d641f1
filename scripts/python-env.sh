#!/usr/bin/env bash
# Creates (or refreshes) the Python environment of the reference checks: transformers and PyTorch
# from PyPI, pinned in tests/python/requirements.txt. Prints the interpreter's path on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CPT_VENV:-$HOME/.cache/cpt/venv}
requirements="$here/tests/python/requirements.txt"
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$requirements"
  echo "$want" > "$stamp"
fi
echo "$VENV/bin/python"
