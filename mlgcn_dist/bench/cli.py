"""``mlgcn bench train|loader|decode``: arguments and the commands."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mlgcn_dist.arguments import non_negative_int, positive_int
from mlgcn_dist.bench.contention import add_contention_arguments, run_contention_bench
from mlgcn_dist.bench.decode import add_decode_arguments, run_decode_bench
from mlgcn_dist.bench.profiling import StepProfiler
from mlgcn_dist.bench.report import format_report
from mlgcn_dist.bench.train import (
    CEILING_BEFORE,
    CEILING_PINNED,
    batches_per_phase,
    bench_device,
    bench_train,
    describe_shards,
    end_to_end_phases,
    make_toy_shards,
    point_config_at_shards,
    select_phases,
    with_thread_variants,
)
from mlgcn_dist.config import Config, DataConfig, load_config
from mlgcn_dist.data.loader import bench_loader
from mlgcn_dist.errors import error_chain
from mlgcn_dist.threads import intra_op_threads, launcher_threads

DEFAULT_LOADER_BATCHES = 20
# What bench_loader's workers each keep in flight: it builds its loader with DataConfig's default.
PREFETCH_FACTOR = DataConfig().prefetch_factor
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")


def min_loader_batches(workers: int) -> int:
    """The fewest ``--batches`` that :func:`bench_loader` can time with ``workers``.

    While its untimed first round loads, every worker goes on to the PREFETCH_FACTOR batches it was asked for, so
    those can be ready when the clock starts and count as made in no time (2 workers, 2 batches: 8x the steady
    rate). One whole round made under the clock must follow them. Without workers nothing is made ahead: every
    batch after the untimed first is made while the clock runs, and one is enough."""
    return 1 if workers == 0 else (PREFETCH_FACTOR + 1) * workers


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """``mlgcn bench train ...``, ``mlgcn bench loader ...``, ``mlgcn bench decode ...`` and ``mlgcn bench
    contention ...``; each benchmark's parser formats its help as ``parser`` does (the ``mlgcn`` command's shows
    defaults)."""
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    formatter = parser.formatter_class
    p = sub.add_parser(
        "train",
        help="training img/s: ceiling, end to end (cpu and gpu decode), ML-GCN reference",
        formatter_class=formatter,
    )
    p.add_argument("--config", help="YAML file in configs/ (default: the built-in defaults)")
    p.add_argument("--steps", type=positive_int, default=50, help="timed steps per phase")
    p.add_argument(
        "--warmup", type=positive_int, default=10, help="untimed steps before the timed ones (the first one's time "
        "is reported)"
    )
    p.add_argument(
        "--shards", type=Path, help="a pack to train on, as `mlgcn pack` writes it (default: a toy set made in a "
        "temp dir and removed after)"
    )
    p.add_argument("--toy-images", type=positive_int, default=256, help="training images of the toy set")
    p.add_argument(
        "--toy-size", type=positive_int, default=640, help="long side of the toy images in px (~180 KB each at 640)"
    )
    p.add_argument(
        "--json", type=Path, default=Path("runs/bench/train.json"), help="where to write the report"
    )
    p.add_argument(
        "--profile-dir",
        type=Path,
        help="after each phase's timed steps, profile --profile-steps more (torch.profiler): a Chrome trace per "
        "phase here, each step's device busy/idle time in the report (default: no profiling)",
    )
    p.add_argument("--profile-steps", type=positive_int, default=5, help="steps per profiled phase")
    p.add_argument(
        "--phases",
        type=phase_names,
        help="only these end-to-end phases, comma-separated (default: all; e.g. e2e_decode_cpu,e2e_decode_gpu): "
        "the ceiling, its repeat and the reference always run",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="intra-op threads of this process (default: what `accelerate launch` gives a training process: "
        "$OMP_NUM_THREADS if set, else 1 on a GPU; on a CPU, torch's own default)",
    )
    p.add_argument(
        "--also-threads",
        type=positive_int,
        help="run each end-to-end phase a second time right after it with this many intra-op threads (named "
        "<phase>_threads<N>): the two settings compared within one run, where separate runs spread widely "
        "(default: once each)",
    )
    p.add_argument(
        "--ceiling-each",
        action="store_true",
        help="measure the ceiling again before each end-to-end phase after the first (ceiling_before_<phase>) and "
        "report each phase's ratio to the ceiling measured just before it too: for a host whose pace drifts over "
        "the run (default: the ceiling first and last only)",
    )
    p.add_argument(
        "--pinned-ceiling",
        action="store_true",
        help="measure the ceiling again right after the first with the loop thread and the backward's each held "
        "on one core (ceiling_pinned), and its ratio to the ceiling: whether the host's pace is its launching "
        "threads moving between cores (Linux; default: not measured)",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=64")
    p = sub.add_parser(
        "loader", help="img/s of the training loader alone, total and per worker", formatter_class=formatter
    )
    p.add_argument("--shards", type=Path, required=True, help="a pack to read, as `mlgcn pack` writes it")
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=min(8, os.cpu_count() or 1),
        help="loader worker processes; 0: load in this process (default: min(8, CPUs), here %(default)s)",
    )
    p.add_argument(
        "--batches",
        type=positive_int,
        help=f"timed batches after an untimed first round, rounded up to whole rounds of the workers; at least "
        f"{PREFETCH_FACTOR + 1} per worker, 1 with --workers 0 (default: {DEFAULT_LOADER_BATCHES}, or that "
        f"minimum if more)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch")
    p.add_argument("--image-size", type=positive_int, default=448, help="side of the training crops in px")
    p.add_argument(
        "--decode",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: the workers only read the JPEG bytes (decoding happens on the device)",
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    p = sub.add_parser(
        "decode", help="GPU JPEG decode time idle and behind queued device work (CUDA)", formatter_class=formatter
    )
    add_decode_arguments(p)
    p = sub.add_parser(
        "contention",
        help="launch rate of the step's thread alone and beside Python, C++ and data-path work in the process",
        formatter_class=formatter,
    )
    add_contention_arguments(p)


def phase_names(text: str) -> list[str]:
    """``--phases``: comma-separated names, blanks ignored."""
    return [name.strip() for name in text.split(",") if name.strip()]


class StopSignal(BaseException):
    """SIGTERM or Ctrl-C during ``bench train``: a BaseException, like KeyboardInterrupt, so no ``except Exception``
    in a phase takes it for the phase's own failure, and the stack unwinds through the temporary toy set's
    ``with``, which removes it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`StopSignal` in this process; a second one ends it at once, uncleaned.

    Processes forked meanwhile inherit the handler: there (the packer's pool) a signal ends the process at once,
    quietly; the main process cleans up. The loader's workers ignore both (loader.py) and are ended with their
    loader, or at exit (a SIGKILL from loader.py's exit hook), so they never keep the bench alive."""
    owner = os.getpid()

    def stop(signum: int, frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if os.getpid() != owner:
            os.kill(os.getpid(), signum)
        raise StopSignal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_signal_behind(err: BaseException) -> StopSignal | None:
    """The :class:`StopSignal` ``err`` is, or was raised from or while handling; else None. Python wraps what a
    signal handler raises inside some hooks in an error of its own: a class body's ``__set_name__`` (PIL defines
    its image plugins' classes when it first saves a JPEG) turns it into a RuntimeError."""
    return next((link for link in error_chain(err) if isinstance(link, StopSignal)), None)


def _run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    device = bench_device(cfg)
    # A wrong name fails before any work.
    end_to_end = with_thread_variants(select_phases(end_to_end_phases(cfg, device), args.phases), args.also_threads)
    if args.profile_dir is not None:  # made now: a path it cannot be would fail only after the first phase
        try:
            args.profile_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(
                f"mlgcn bench train: --profile-dir {args.profile_dir}: cannot be a directory ({err})", file=sys.stderr
            )
            return 2
    print(describe_run(cfg, device, args, list(end_to_end)), flush=True)
    try:
        with stop_signals_unwind(), intra_op_threads(args.threads or launcher_threads(device.type, os.environ)):
            report = _bench_train_on_shards(cfg, args, end_to_end)
    except BaseException as err:
        stop = stop_signal_behind(err)
        if stop is None:
            raise
        made = "; its temporary toy set is removed" if args.shards is None else ""
        print(f"mlgcn bench train: stopped by {signal.Signals(stop.signum).name}{made}", file=sys.stderr)
        return 128 + stop.signum
    print(format_report(report))
    _write_json(args.json, report)
    if report["failed_phases"]:
        failed = report["failed_phases"]
        print(f"mlgcn bench train: {len(failed)} phase{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)} "
              "(tracebacks above; the other phases were measured)", file=sys.stderr)
        return 1
    return 0


def _bench_train_on_shards(cfg: Config, args: argparse.Namespace, end_to_end: dict[str, dict]) -> dict:
    """bench_train on ``--shards``, or on a toy set made in a temporary directory, removed however this ends."""
    with tempfile.TemporaryDirectory(prefix="mlgcn-bench-") as tmp:
        shards = args.shards or make_toy_shards(
            Path(tmp), args.toy_images, args.toy_size, cfg.data.workers, cfg.train.seed
        )
        profiler = None if args.profile_dir is None else StepProfiler(args.profile_dir, args.profile_steps)
        profiled = 0 if profiler is None else profiler.steps
        point_config_at_shards(cfg, shards, batches_per_phase(cfg, args.steps, args.warmup, profiled))
        report = bench_train(cfg, args.steps, args.warmup, profiler, end_to_end, args.ceiling_each,
                             args.pinned_ceiling)
        report["data"] = describe_shards(shards, cfg.data.train_split)
        report["data"]["toy"] = None if args.shards else {"images": args.toy_images, "size": args.toy_size}
    return report


def describe_run(cfg: Config, device: torch.device, args: argparse.Namespace, end_to_end: list[str]) -> str:
    """What ``bench train`` is about to run, in a line, before minutes of work show nothing; on a CPU with an
    ImageNet-sized backbone (the built-in defaults: ResNet-101 at 448 px), a second line with the quick recipe."""
    measured = [*end_to_end[:1], *(p for name in end_to_end[1:] for p in (CEILING_BEFORE + name, name))]
    phases = ["ceiling", *([CEILING_PINNED] if args.pinned_ceiling else []),
              *(measured if args.ceiling_each else end_to_end), "ceiling_repeat", "reference"]
    profiled = f" + {args.profile_steps} profiled" if args.profile_dir is not None else ""
    data = args.shards or f"a toy set of {args.toy_images} JPEGs at {args.toy_size} px"
    line = (
        f"[bench] on {device.type}: {cfg.model.backbone} + {cfg.model.head} at {cfg.data.image_size} px, batch "
        f"{cfg.data.batch_size}; phases {', '.join(phases)}; {args.warmup} warm-up + {args.steps} timed"
        f"{profiled} steps each; data: {data}"
    )
    if device.type == "cpu" and not cfg.model.backbone.startswith("cifar_"):  # cifar_*: the small backbones
        line += (
            f"\n[bench] hint: {cfg.model.backbone} on a CPU takes many minutes; a quick CPU run: "
            "mlgcn bench train --config configs/toy.yaml --toy-size 64"
        )
    return line


def _run_loader(args: argparse.Namespace) -> int:
    fewest = min_loader_batches(args.workers)
    if args.batches is not None and args.batches < fewest:
        print(
            f"mlgcn bench loader: --batches {args.batches} is too few to time --workers {args.workers}: at least "
            f"{fewest} (the {fewest - args.workers} batches the workers make ahead during the untimed first "
            f"round, then one whole round)",
            file=sys.stderr,
        )
        return 2
    result = bench_loader(
        args.shards,
        args.decode,
        workers=args.workers,
        batches=args.batches or max(DEFAULT_LOADER_BATCHES, fewest),
        batch_size=args.batch_size,
        image_size=args.image_size,
    )
    print(" ".join(f"{key}={value}" for key, value in result.items()))
    if args.json:
        _write_json(args.json, result)
    return 0


def _run_decode(args: argparse.Namespace) -> int:
    report = run_decode_bench(args)
    if report is None:
        return 2
    if args.json:
        _write_json(args.json, report)
    return 0


def _run_contention(args: argparse.Namespace) -> int:
    report = run_contention_bench(args)
    if args.json:
        _write_json(args.json, report)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    return {"train": _run_train, "loader": _run_loader, "decode": _run_decode,
            "contention": _run_contention}[args.bench](args)
