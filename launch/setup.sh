#!/usr/bin/env bash
# Create ./.venv and install mlgcn-dist (editable) with its dev extras. Idempotent: when the venv already matches
# pyproject.toml (a stamp holds its hash) this returns in well under a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.mlgcn-setup-stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"

here="$PWD"
# A venv is not relocatable: every script's #! line names a python of the folder it was made in.
runs_here() { [[ "$(head -1 "$VENV/bin/$1" 2>/dev/null)" == "#!$here/$VENV/bin/python"* ]]; }
made_here() { [[ -x "$VENV/bin/python" ]] && runs_here pip; }
# The package imports from this checkout (checked isolated, from /, so that the source folder on sys.path cannot
# stand in for the install) and the launcher the README's commands call runs.
installed_here() {
    (cd / && "$here/$VENV/bin/python" -I -c \
        'import sys, mlgcn_dist; sys.exit(not mlgcn_dist.__file__.startswith(sys.argv[1]))' "$here/mlgcn_dist/") \
        && runs_here accelerate
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && made_here && installed_here 2>/dev/null; then
    exit 0
fi

if [[ -e "$VENV" ]] && ! made_here; then
    echo "[setup] $VENV was made in another folder (a copied or moved checkout): making it anew here"
    rm -rf "$VENV"
fi
echo "[setup] installing into $VENV (first run takes a few minutes: torch is large)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# pip prints many 'Location ... is ignored' lines from some site configs; they are harmless, so keep the log quiet.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
(cd / && "$here/$VENV/bin/python" -I -c "import mlgcn_dist, torch, torchvision, accelerate, webdataset") \
    && installed_here || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[setup] ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
