#!/usr/bin/env bash
# ML-GCN training on N nodes x G GPUs under SLURM: one `accelerate launch` per node, one process per GPU.
# Preemption-safe: on SIGUSR1 (sent before the time limit, see --signal) or SIGTERM every process finishes its step,
# a checkpoint is saved and the job requeues itself; the requeued job (same job id, same run directory, same W&B
# run id) resumes from that checkpoint. See slurm/README.md for the signal path.
#
#   mkdir -p logs
#   sbatch slurm/coco_gcn.sh configs/coco_gcn.yaml [section.key=value ...]
#   sbatch --nodes=4 slurm/coco_gcn.sh configs/coco_gcn.yaml optim.lr=0.05
#
# Paths (config, overrides) are relative to the repository root. Site settings: edit the #SBATCH lines below, or
# override them per job on the sbatch command line (-p PARTITION -A ACCOUNT --nodes ...) or with SBATCH_* variables
# (SBATCH_PARTITION, SBATCH_ACCOUNT, ...). Environment variables read here (sbatch passes the submitting shell's):
#   MLGCN_REPO           repository root (default: found from this script or the directory sbatch ran in)
#   MLGCN_VENV           Python environment with mlgcn-dist installed (default: $MLGCN_REPO/.venv)
#   MLGCN_MODULES        modules to `module load` first, e.g. "cuda/12.4 nccl/2.21"
#   MLGCN_GPUS_PER_NODE  processes per node (default: the GPUs SLURM gave the node)
#   MLGCN_RUNS_DIR       parent of the run directories (default: $MLGCN_REPO/runs); must be shared by all nodes
#   MLGCN_PORT           rendezvous port on the first node (default: 20000 + job id % 10000)
#   MLGCN_DEEPSPEED      a DeepSpeed JSON, e.g. configs/deepspeed/zero2.json: train with DeepSpeed ZeRO instead of DDP
#   MLGCN_LAUNCH_FLAGS   extra `accelerate launch` flags, placed last so they win over the ones set here
#
#SBATCH --job-name=mlgcn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one launcher per node; it starts the node's processes itself
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64             # the node's cores, for the training processes and their data workers
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180              # to the training processes 3 min before the time limit: save and requeue
#SBATCH --open-mode=append             # a requeued job continues the same log file
#SBATCH --output=logs/%x-%j.out        # relative to the submit directory: logs/ must exist

set -euo pipefail

die() {
    echo "[slurm] error: $*" >&2
    exit 2
}

find_repo() {
    # sbatch runs a spooled copy of this script, so its own location only helps when called by path (single_node.sh).
    if [[ -n "${MLGCN_REPO:-}" ]]; then
        echo "$MLGCN_REPO"
        return
    fi
    local dir
    for dir in "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}"; do
        if [[ -n "$dir" && -f "$dir/launch/train.py" ]]; then
            (cd "$dir" && pwd)
            return
        fi
    done
    return 1
}

gpus_per_node() {
    local typed="${SLURM_GPUS_PER_NODE:-}"
    local gpus="${MLGCN_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${typed##*:}}}" # --gpus-per-node may name a type: h100:8
    [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "no GPU count for this node (got '${gpus}'): set MLGCN_GPUS_PER_NODE"
    echo "$gpus"
}

[[ -n "${SLURM_JOB_ID:-}" ]] || die "submit with sbatch: SLURM_JOB_ID is not set"
(($# >= 1)) || die "usage: sbatch slurm/coco_gcn.sh CONFIG.yaml [section.key=value ...]"
repo="$(find_repo)" || die "repository not found: submit from its root or set MLGCN_REPO"
cd "$repo"
config="$1"
shift
[[ -f "$config" ]] || die "config file not found: $repo/$config"

if [[ -n "${MLGCN_MODULES:-}" ]]; then
    command -v module >/dev/null || die "MLGCN_MODULES is set but there is no 'module' command in the job's shell"
    set +u # module init scripts read unset variables
    # shellcheck disable=SC2086  # one word per module
    module load $MLGCN_MODULES
    set -u
fi
venv="${MLGCN_VENV:-$repo/.venv}"
[[ -x "$venv/bin/accelerate" ]] || die "$venv/bin/accelerate not found: set MLGCN_VENV (launch/setup.sh creates .venv)"
export PATH="$venv/bin:$PATH"

# Everything that names the run derives from the job id, which a requeued job keeps: the requeued job finds its
# checkpoints (train.resume=auto) and continues the same W&B run.
name="$(basename "$config" .yaml)-$SLURM_JOB_ID"
run_dir="${MLGCN_RUNS_DIR:-$repo/runs}/$name"
for arg in "$@"; do
    case "$arg" in train.output_dir=*) run_dir="${arg#*=}" ;; esac # the user's choice, applied last, wins
done
overrides=("train.output_dir=$run_dir" "train.run_name=$name" "log.run_id=$name" "train.resume=auto")
# A requeued job that has saved a checkpoint continues from it, whatever the first start was told (train.resume=none,
# or a checkpoint of another run): applied after the user's overrides, or every requeue would start over. Before its
# first save, the first start's own choice holds.
requeued=()
if ((${SLURM_RESTART_COUNT:-0} > 0)) && compgen -G "$run_dir/checkpoints/step-*/train_state.json" >/dev/null; then
    requeued=("train.resume=auto")
fi

nodes="${SLURM_NNODES:-1}"
gpus="$(gpus_per_node)"
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#hosts[@]} > 0)) || die "no hosts in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
port="${MLGCN_PORT:-$((20000 + SLURM_JOB_ID % 10000))}" # below Linux's ephemeral range (32768+)
# Static rendezvous: SLURM fixes the nodes and their ranks, so node 0 (first host) hosts the store and global rank 0.
launch_flags=(
    --num_machines "$nodes" --num_processes "$((nodes * gpus))"
    --main_process_ip "${hosts[0]}" --main_process_port "$port" --rdzv_backend static
    --mixed_precision no --dynamo_backend no # both are set by the training config (train.precision/compile)
)
if [[ -n "${MLGCN_DEEPSPEED:-}" ]]; then
    launch_flags+=(--use_deepspeed --deepspeed_multinode_launcher standard) # standard: torchrun, no pdsh/ssh
    overrides+=("train.deepspeed=$MLGCN_DEEPSPEED")
else
    launch_flags+=(--multi_gpu)
fi
# shellcheck disable=SC2206  # flags are words
launch_flags+=(${MLGCN_LAUNCH_FLAGS:-})

# Trainer processes get SIGUSR1/SIGTERM straight from SLURM (it signals every process of the step). The launcher
# must survive USR1 (its default action is to die, and SLURM would then kill the trainers mid-save), so it is
# started with USR1 ignored; the trainers install their own handler. On SIGTERM the launcher forwards SIGTERM and
# waits this long before SIGKILL; SLURM's own KillWait/GraceTime is then the real bound.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
rm -f "$run_dir/REQUEUE" "$run_dir/REQUEUE.terminated" # only a marker written by this launch may requeue the job

echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${nodes} node(s) x ${gpus}: ${hosts[*]}"
echo "[slurm] run dir $run_dir; rendezvous ${hosts[0]}:$port; $(date -Is)"

terminated=0
# SIGTERM reaches this shell on scancel, preemption and the time limit: SLURM itself then ends the job (and requeues
# a preempted one), so this script must not requeue it.
trap 'terminated=1' TERM
# With --signal=B:USR1@... or `scancel --batch --signal=USR1`, only this shell gets USR1: pass it to the trainers.
trap 'scancel --signal=USR1 "$SLURM_JOB_ID"' USR1

# --kill-on-bad-exit=0: a node whose trainers stopped must not kill the others before the main process has written
# the REQUEUE marker; a crashed node ends the rest through the collective timeout (train.dist_timeout_s).
srun_flags=(--nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0)
# Since SLURM 22.05 srun no longer inherits --cpus-per-task from the job: without this the step gets one core.
[[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || srun_flags+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun "${srun_flags[@]}" \
    bash -c 'trap "" USR1 USR2; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' accelerate \
    "${launch_flags[@]}" launch/train.py --config "$config" "${overrides[@]}" "$@" ${requeued[@]+"${requeued[@]}"} &
srun_pid=$!
# Poll, not `wait`, while srun runs: a trap that interrupts `wait` just as srun ends can make bash lose srun's exit
# status (every later `wait` returns -1: the job ended 255, a finished training included). A foreground `sleep` is
# not interrupted: the traps run when it returns. SIGTERM to the whole batch step (scancel) ends it too.
while kill -0 "$srun_pid" 2>/dev/null; do
    sleep 0.2 || true
done
status=0
wait "$srun_pid" || status=$?
if ((status > 128)); then
    # 128 + a signal's number from a `wait` a trap interrupted just now, or srun's own: bash keeps an ended child's
    # status, and a `wait` now returns it (127: none kept, the status stands).
    saved=0
    wait "$srun_pid" || saved=$?
    ((saved == 127)) || status=$saved
fi

if [[ -f "$run_dir/REQUEUE" && "$terminated" == 0 ]]; then
    echo "[slurm] $(cat "$run_dir/REQUEUE"); requeueing job $SLURM_JOB_ID; $(date -Is)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [[ -f "$run_dir/REQUEUE" ]]; then
    # SLURM ends this job (and requeues it only under PreemptMode=REQUEUE, whose restart removes the marker): a
    # REQUEUE left here would read "requeue pending" forever (mlgcn compare). Its checkpoint stays for a resubmission
    # with train.output_dir=$run_dir (train.resume=auto reads the checkpoints, not the marker).
    mv -f "$run_dir/REQUEUE" "$run_dir/REQUEUE.terminated"
    echo "[slurm] job $SLURM_JOB_ID terminated by SLURM: not requeued by this script; $run_dir/REQUEUE.terminated"
fi
echo "[slurm] training exited with status $status; $(date -Is)"
exit "$status"
