#!/usr/bin/env bash
# gpu_check.sh's `deepspeed` step: the README's DeepSpeed ZeRO-2 recipe on one GPU, on a small toy set, in bf16 (GCN
# and HGAT heads) and fp16 (GCN), EMA on. Usage: gpu_check_deepspeed.sh PYTHON WORKDIR. Exits non-zero on the first
# run that fails; prints each run's final mAP (model and EMA) and the launch line naming the device.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$1 WORK=$2
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}  # DeepSpeed otherwise trusts the accelerator its wheel was built on
mkdir -p "$WORK"
"$PY" -m mlgcn_dist.cli make-toy --out "$WORK/toy" --train 192 --val 64 --size 64 > "$WORK/make_toy.log"
for run in ${RUNS:-bf16:gcn bf16:hgat fp16:gcn}; do
    precision=${run%%:*} head=${run##*:} dir="$WORK/${run/:/_}"
    "$PY" -m accelerate.commands.launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 1 \
        --main_process_port 29533 launch/train.py --config configs/toy.yaml "data.root=$WORK/toy" \
        "train.output_dir=$dir" train.resume=none train.epochs=2 "train.precision=$precision" "model.head=$head" \
        train.ema_decay=0.9 log.wandb=disabled > "$dir.log" 2>&1 || { tail -n 40 "$dir.log"; exit 1; }
    grep -m1 "DEEPSPEED on" "$dir.log" || true
    "$PY" -c 'import json, sys; f = json.load(open(sys.argv[1]))["final"]
print(sys.argv[2], "final mAP: model %.2f, EMA %.2f" % (f["model"]["mAP"], f["ema"]["mAP"]))' "$dir/summary.json" "$run"
done
