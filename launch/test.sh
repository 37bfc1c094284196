#!/usr/bin/env bash
# Set everything up, then run the whole test suite (slow multi-process tests included). Args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
export WANDB_MODE="${WANDB_MODE:-disabled}"   # tests never reach a W&B server
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"  # DeepSpeed's CPU op, built once
exec .venv/bin/python -m pytest "$@"
