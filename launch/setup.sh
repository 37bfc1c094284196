#!/usr/bin/env bash
# Create ./.venv and install mlgcn-dist (editable) with its dev extras. Idempotent: when the venv already matches
# pyproject.toml (a stamp holds its hash) this returns in well under a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=".venv"
STAMP="$VENV/.mlgcn-setup-stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/python" -c "import mlgcn_dist" 2>/dev/null; then
    exit 0
fi

echo "[setup] installing into $VENV (first run takes a few minutes: torch is large)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# pip prints many 'Location ... is ignored' lines from some site configs; they are harmless, so keep the log quiet.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -c "import mlgcn_dist, torch, torchvision, accelerate, webdataset" \
    || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "[setup] ready: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
