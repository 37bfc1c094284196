#!/usr/bin/env bash
# ML-GCN training on one node with all of its GPUs: slurm/coco_gcn.sh with a one-node allocation. Same arguments,
# environment variables and preemption behaviour (read that script's header); sbatch only reads #SBATCH lines from
# the file it is given, which is why this header exists.
#
#   mkdir -p logs
#   sbatch slurm/single_node.sh configs/coco_gcn.yaml [section.key=value ...]
#
#SBATCH --job-name=mlgcn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8              # the node's GPUs: edit for your site
#SBATCH --cpus-per-task=64             # the node's cores
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
# sbatch runs a spooled copy of this file: the repository is MLGCN_REPO or the directory sbatch was called from.
main="${MLGCN_REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/coco_gcn.sh"
[[ -f "$main" ]] || { echo "[slurm] error: $main not found: submit from the repository root or set MLGCN_REPO" >&2; exit 2; }
exec bash "$main" "$@"
