#!/usr/bin/env bash
# Set everything up, write the embedded synthetic COCO-format dataset, and train ML-GCN on it with two CPU
# processes (one per GPU on a machine with two or more). Extra args are config overrides, e.g.
# `bash launch/demo.sh train.epochs=3`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA=data/toy
[[ -f "$DATA/annotations/instances_val2014.json" ]] || .venv/bin/mlgcn make-toy --out "$DATA" --train 800 --val 400 --size 64
GPUS="$(.venv/bin/python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if (( GPUS >= 2 )); then
    NPROC="${NPROC:-$GPUS}"
    DEVICE=auto
else  # two processes need two GPUs (each takes the one of its local rank): on one, both run on the CPU
    NPROC="${NPROC:-2}"
    DEVICE=cpu
fi
exec .venv/bin/accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
    --dynamo_backend no --main_process_port "${PORT:-29511}" \
    launch/train.py --config configs/toy.yaml train.output_dir=runs/demo train.run_name=demo \
    train.resume=none "train.device=$DEVICE" "$@"
