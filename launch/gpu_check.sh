#!/usr/bin/env bash
# The GPU check, run on a lent H100/H200 (from any directory), results in $OUT. CHECKS names its steps, in order
# (default: pytest eager compile compile_cudagraphs loader):
#   pytest              the CUDA-marked tests (pytest -m gpu), while a 640 px toy set is drawn in the background;
#   eager, compile,     `mlgcn bench train` for GCN-ResNet101 @448 (bf16, channels_last, batch 64) eagerly, with
#   compile_cudagraphs  torch.compile, and with torch.compile mode=reduce-overhead (each: ceiling, end to end with
#                       CPU / GPU decode / GPU decode in a process of its own (data.augment_process) / GPU decode
#                       inline / GPU decode with the augment launched by the loop, the ceiling again, the GPU data
#                       path alone, the ML-GCN reference; the helper's (or the augment process's) decode and augment
#                       ms per batch; where a loss first went
#                       non-finite; 5 more steps of each phase under torch.profiler: the device's busy and idle
#                       ms a step, traces in $OUT/profiles.tar); the first of them waits for the toy set and packs
#                       it to shards;
#   compile_b96         `compile` at 96 images per GPU (40 timed steps after 7 warm-up: as many images): the same
#                       host work a step for 1.5x the device work, whether the data path then keeps up (run F:
#                       at 64 the compiled step is host-bound; not in the default);
#   compile_nopin       `compile` with data.pin_memory=false: no pinning thread in the trainer (the JPEG bytes
#                       gain nothing from pinned memory: `mlgcn bench decode`; not in the default);
#   compile_threads16   `compile` with each end-to-end phase run twice in a row (`--also-threads 16`): with the one
#                       intra-op thread `accelerate launch` gives a GPU process (the bench's and the trainer's
#                       default) and with 16, as bench runs A-G ran; side by side in one run, which separate runs
#                       cannot rank (run G; run H: CPU decode 0.96 of the ceiling at one thread, 0.90 at 16); it
#                       replaces `compile` (not in the default);
#   compile_foreach     `compile` with optim.implementation=foreach: the SGD step before fused became the CUDA
#                       default (not in the default);
#   compile_mps         `compile` run through launch/with_mps.sh: the trainer and its augment process as clients of
#                       one MPS daemon of their own, whose kernels then share the SMs instead of the two CUDA
#                       contexts taking turns (run I: the process phase's step 4.6-6.5 ms of device time above the
#                       ceiling's); the log's last line says how many clients the daemon saw (not in the default);
#   loader              `mlgcn bench loader` (CPU decode to uint8 at 448 px) with 1, 4 and 15 workers: img/s per worker;
#   contention          `mlgcn bench contention`: one thread's kernel launch rate alone and beside a background
#                       thread of Python, of small CPU ops, of GIL-free C++, and of the GPU data path (decode +
#                       augment) in the process and in a process of its own, and of CPU-decode batches arriving
#                       from loader workers, pinned, their shared memory dropped or released: whose work slows the
#                       step's launching thread (run H; not in the default);
#   decode              `mlgcn bench decode`: nvJPEG decode of 64 JPEGs idle and behind queued work, and the
#                       augment after it: GpuAugment.apply device ms (not in the default);
#   deepspeed           the README's ZeRO-2 recipe (`accelerate launch --config_file
#                       configs/accelerate/deepspeed_zero2.yaml`) on one GPU: 2 toy epochs each in bf16 with the GCN
#                       and the HGAT head and in fp16 with the GCN, EMA on; prints each run's final mAP (not in the
#                       default; DeepSpeed and pydantic must be in .whl).
# PHASES (default: all) names the end-to-end phases of every `bench train` step (`--phases`), e.g.
# PHASES=e2e_decode_cpu,e2e_decode_gpu,e2e_decode_gpu_process: the ceiling, its repeat and the reference always run;
# PHASES_<check> (e.g. PHASES_compile_cudagraphs=e2e_decode_gpu,e2e_decode_gpu_process) overrides it for one check.
# A bench cut by its timeout still logs every phase it finished (`[bench] <phase>: ... img/s` lines); an end-to-end
# phase that fails is logged with its traceback, reported as failed, and the phases after it still run (exit 1).
# Every step runs under its own timeout, cut to what is left of the budget, and logs to $OUT/<step>.log;
# $OUT/summary.txt lists each step's exit status and duration. BUDGET_S (default 450) bounds the whole script.
# At most 8 files come back from a device run: everything else stays in $WORK, and more than 5 logs and reports
# go back as one results.tar.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:?set OUT to the folder whose files come back}"
PY="${PY:-python3}"
WORK="${WORK:-/tmp/mlgcn-gpu-check}"
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/profiles"  # a warm machine keeps $WORK: no traces of an earlier call

# step NAME LIMIT_S CMD...: CMD under `timeout` (LIMIT_S, or less if the budget is nearly spent).
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) start=$SECONDS rc=0
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 30)); then
        echo "$name: skipped, budget spent" | tee -a "$OUT/summary.txt"
        return
    fi
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

# Wheels this machine lacks (webdataset ...), unless the caller has installed them already.
if [[ -d .whl ]] && ! "$PY" -c "import webdataset" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi; "$PY" -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"; } \
    > "$OUT/env.txt" 2>&1

# Drawing the toy set takes ~30 s on one core: it overlaps the tests (or the first step). A warm machine's second
# call finds the shards of its first (meta.json is written last: a pack that finished).
toy_pid=
if [[ ! -f "$WORK/shards/meta.json" ]]; then
    timeout 150 "$PY" -m mlgcn_dist.cli make-toy --out "$WORK/toy" --train 256 --val 16 --size 640 --overwrite \
        > "$WORK/make_toy.log" 2>&1 &
    toy_pid=$!
fi
toy_ready() {
    [[ -n "${toy_pid:-}" ]] || return 0
    local rc=0
    wait "$toy_pid" || rc=$?
    echo "make_toy: exit $rc" | tee -a "$OUT/summary.txt"
    ((rc == 0)) || tail -n 5 "$WORK/make_toy.log" >> "$OUT/summary.txt"
    toy_pid=
    step pack 90 "$PY" -m mlgcn_dist.cli pack coco --root "$WORK/toy" --out "$WORK/shards" --shard-count 32 \
        --workers 16 --overwrite
}

# --ceiling-each: the ceiling again before each end-to-end phase after the first (run I's moved 15% between its
# first and last measurements, the device's work unchanged): 60 steps of the compiled step, seconds each.
# --pinned-ceiling: the ceiling once more with its launching threads held on a core each, beside the first: whether
# the host's pace is those threads moving between cores (each phase's host counters say whether they moved).
bench_all=("$PY" -m mlgcn_dist.cli bench train --config configs/coco_gcn.yaml --shards "$WORK/shards"
           --steps 60 --warmup 10 --ceiling-each --pinned-ceiling ${PHASES:+--phases "$PHASES"})
# lr 0.01: from random weights the configured 0.1 can diverge within the timed steps (speed is the same, but the
# reported loss should be a number). data.worker_timeout_s=120: a loader worker or augment process that stops
# answering fails its phase in 2 minutes, not 10, and the bench goes on with the next phase.
overrides=(model.pretrained=none graph.embeddings=onehot log.wandb=disabled data.batch_size=64 data.workers=15
           train.precision=bf16 train.channels_last=true optim.lr=0.01 data.worker_timeout_s=120)

# CHECKS picks the steps and their order (default: all); a later step gets what the earlier ones left.
for check in ${CHECKS:-pytest eager compile compile_cudagraphs loader}; do
    phases_var="PHASES_$check"
    if [[ -n "${!phases_var:-}" ]]; then  # a later --phases wins over the one in ${bench_all[@]}
        bench=("${bench_all[@]}" --phases "${!phases_var}")
    else
        bench=("${bench_all[@]}")
    fi
    case $check in
        pytest) step pytest_gpu 240 "$PY" -m pytest -m gpu -v -s -p no:cacheprovider -rA \
            tests/test_gpu.py tests/test_transforms.py tests/test_streams.py tests/test_loader.py ;;
        eager) toy_ready; step bench_eager 210 "${bench[@]}" --json "$OUT/bench_eager.json" \
            --profile-dir "$WORK/profiles/eager" "${overrides[@]}" train.compile=false ;;
        compile) toy_ready; step bench_compile 300 "${bench[@]}" --json "$OUT/bench_compile.json" \
            --profile-dir "$WORK/profiles/compile" "${overrides[@]}" train.compile=true ;;
        compile_cudagraphs) toy_ready; step bench_cudagraphs 280 "${bench[@]}" \
            --json "$OUT/bench_cudagraphs.json" --profile-dir "$WORK/profiles/cudagraphs" "${overrides[@]}" \
            train.compile=true train.compile_mode=reduce-overhead ;;
        compile_b96) toy_ready; step bench_compile_b96 300 "${bench[@]}" --json "$OUT/bench_compile_b96.json" \
            --profile-dir "$WORK/profiles/compile_b96" "${overrides[@]}" train.compile=true data.batch_size=96 \
            --steps 40 --warmup 7 ;;
        compile_nopin) toy_ready; step bench_compile_nopin 300 "${bench[@]}" \
            --json "$OUT/bench_compile_nopin.json" --profile-dir "$WORK/profiles/compile_nopin" "${overrides[@]}" \
            train.compile=true data.pin_memory=false ;;
        compile_threads16) toy_ready; step bench_compile_threads16 360 "${bench[@]}" --also-threads 16 \
            --json "$OUT/bench_compile_threads16.json" --profile-dir "$WORK/profiles/compile_threads16" \
            "${overrides[@]}" train.compile=true ;;
        compile_foreach) toy_ready; step bench_compile_foreach 300 "${bench[@]}" \
            --json "$OUT/bench_compile_foreach.json" --profile-dir "$WORK/profiles/compile_foreach" \
            "${overrides[@]}" train.compile=true optim.implementation=foreach ;;
        compile_mps) toy_ready; step bench_compile_mps 300 bash launch/with_mps.sh "${bench[@]}" \
            --json "$OUT/bench_compile_mps.json" --profile-dir "$WORK/profiles/compile_mps" "${overrides[@]}" \
            train.compile=true ;;
        loader) toy_ready; step bench_loader 120 bash -c 'for w in 1 4 15; do "$0" -m mlgcn_dist.cli bench loader \
            --shards "$1" --workers "$w" --batches 16 --batch-size 32; done' "$PY" "$WORK/shards" ;;
        deepspeed) step deepspeed 150 bash launch/gpu_check_deepspeed.sh "$PY" "$WORK/deepspeed" ;;
        contention) step bench_contention 90 "$PY" -m mlgcn_dist.cli bench contention \
            --json "$OUT/bench_contention.json" ;;
        decode) step bench_decode 90 "$PY" -m mlgcn_dist.cli bench decode --json "$OUT/bench_decode.json" ;;
        *) echo "unknown check $check" | tee -a "$OUT/summary.txt" ;;
    esac
done

[[ -d "$WORK/profiles" ]] && tar cf "$OUT/profiles.tar" -C "$WORK" profiles  # one file: 8 come back at most
for name in bench_eager bench_compile bench_compile_nopin bench_compile_threads16 \
    bench_compile_foreach bench_compile_b96 bench_compile_mps \
    bench_cudagraphs bench_loader bench_decode bench_contention deepspeed; do
    [[ -f "$OUT/$name.log" ]] && { echo "== $name"; grep -iv "warn" "$OUT/$name.log" | tail -n 34; }
done
echo "== summary"; cat "$OUT/summary.txt"
# At most 8 files come back: the logs and reports go back as one tar when there are more.
shopt -s nullglob
results=("$OUT"/*.log "$OUT"/*.json)
if ((${#results[@]} > 5)); then
    tar cf "$OUT/results.tar" -C "$OUT" "${results[@]##*/}" && rm -f "${results[@]}"
fi
