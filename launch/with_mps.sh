#!/usr/bin/env bash
# with_mps.sh CMD...: run CMD under NVIDIA's Multi-Process Service (MPS), then quit it.
#
# Why: with data.augment_process the trainer and its augment process each hold a CUDA context, and without MPS the
# GPU runs one context's kernels at a time: in run I (H200, README Performance) the child's nvJPEG call took 28 ms
# a batch against 7 on an idle device, and the step's device time grew 4.6-6.5 ms over the ceiling's. Under MPS the
# processes' kernels share the SMs. This wrapper is how the GPU check measures that (launch/gpu_check.sh,
# CHECKS=compile_mps); on a cluster, a job can run its training command through it the same way.
#
# The control daemon is this user's, with its pipe and log directories in a fresh temporary directory: only
# processes started with that CUDA_MPS_PIPE_DIRECTORY (CMD and its children) become its clients; every other CUDA
# process on the machine runs as before, and the GPU's settings (compute mode, clocks, MIG) are not touched. The
# daemon is quit when CMD ends, fails, or this script is stopped (a `timeout`'s TERM included), and the number of
# clients the daemon saw is printed, so a log says whether CMD ran under MPS at all.
#
# Exit status: CMD's; 3 when MPS could not start (nvidia-cuda-mps-control missing, or the daemon refused).
set -uo pipefail
CONTROL="${MPS_CONTROL:-nvidia-cuda-mps-control}"
(($#)) || { echo "usage: with_mps.sh CMD [ARGS...]" >&2; exit 2; }
if ! command -v "$CONTROL" > /dev/null; then
    echo "with_mps: $CONTROL not found: MPS comes with the NVIDIA driver's compute utilities; CMD not run" >&2
    exit 3
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/mlgcn-mps.XXXXXX")
export CUDA_MPS_PIPE_DIRECTORY="$dir/pipe" CUDA_MPS_LOG_DIRECTORY="$dir/log"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"

quit_daemon() {
    echo quit | "$CONTROL" > /dev/null 2>&1
    # Wait (at most 10 s) until the daemon no longer answers: it is gone before its directory is removed.
    for _ in $(seq 50); do
        echo get_server_list | "$CONTROL" > /dev/null 2>&1 || break
        sleep 0.2
    done
    local clients
    clients=$(grep -c "New client" "$CUDA_MPS_LOG_DIRECTORY/control.log" 2> /dev/null) || clients=0
    echo "with_mps: the MPS daemon saw $clients client connection(s) and was quit" >&2
    rm -rf "$dir"
}

if ! "$CONTROL" -d; then
    echo "with_mps: $CONTROL -d failed (see $CUDA_MPS_LOG_DIRECTORY/control.log); CMD not run" >&2
    cat "$CUDA_MPS_LOG_DIRECTORY/control.log" >&2 2> /dev/null
    rm -rf "$dir"
    exit 3
fi
trap quit_daemon EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
echo "with_mps: MPS daemon started, pipe directory $CUDA_MPS_PIPE_DIRECTORY" >&2
rc=0
"$@" || rc=$?
exit "$rc"
