#!/usr/bin/env bash
# Set everything up, write the embedded synthetic COCO-format dataset, and train ML-GCN on it with two CPU
# processes (or every GPU there is). Extra args are config overrides, e.g. `bash launch/demo.sh train.epochs=3`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA=data/toy
[[ -f "$DATA/annotations/instances_val2014.json" ]] || .venv/bin/mlgcn make-toy --out "$DATA" --train 800 --val 400 --size 64
NPROC="${NPROC:-2}"
exec .venv/bin/accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
    --dynamo_backend no --main_process_port "${PORT:-29511}" \
    launch/train.py --config configs/toy.yaml train.output_dir=runs/demo train.run_name=demo \
    train.resume=none "$@"
