"""``mlgcn bench train|loader|decode``: arguments and the commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from mlgcn_dist.arguments import non_negative_int, positive_int
from mlgcn_dist.bench.decode import add_decode_arguments, run_decode_bench
from mlgcn_dist.bench.profiling import StepProfiler
from mlgcn_dist.bench.report import format_report
from mlgcn_dist.bench.train import (
    batches_per_phase,
    bench_device,
    bench_train,
    describe_shards,
    end_to_end_phases,
    make_toy_shards,
    point_config_at_shards,
    select_phases,
)
from mlgcn_dist.config import load_config
from mlgcn_dist.data.loader import bench_loader


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")




def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """``mlgcn bench train ...``, ``mlgcn bench loader ...`` and ``mlgcn bench decode ...``."""
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = sub.add_parser(
        "train", help="training img/s: ceiling, end to end (cpu and gpu decode), ML-GCN reference"
    )
    p.add_argument("--config", help="YAML file in configs/ (default: the built-in defaults)")
    p.add_argument("--steps", type=positive_int, default=50, help="timed steps per phase")
    p.add_argument(
        "--warmup", type=positive_int, default=10, help="untimed steps before them (the first is reported)"
    )
    p.add_argument(
        "--shards", type=Path, help="a pack (meta.json + shards); default: a toy set made in a temp dir"
    )
    p.add_argument("--toy-images", type=positive_int, default=256, help="training images of the toy set")
    p.add_argument(
        "--toy-size", type=positive_int, default=640, help="long side of the toy images (640: ~180 KB)"
    )
    p.add_argument(
        "--json", type=Path, default=Path("runs/bench/train.json"), help="where to write the report"
    )
    p.add_argument(
        "--profile-dir",
        type=Path,
        help="after each phase's timed steps, profile --profile-steps more (torch.profiler): a Chrome trace per "
        "phase here, each step's device busy/idle time in the report",
    )
    p.add_argument("--profile-steps", type=positive_int, default=5, help="steps per profiled phase")
    p.add_argument(
        "--phases",
        type=phase_names,
        help="only these end-to-end phases, comma-separated (default: all; e.g. e2e_decode_cpu,e2e_decode_gpu): "
        "the ceiling, its repeat and the reference always run",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=64")
    p = sub.add_parser("loader", help="img/s of the training loader alone, total and per worker")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batches", type=positive_int, default=20)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--image-size", type=positive_int, default=448)
    p.add_argument(
        "--decode",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: the workers only read the JPEG bytes (decoding happens on the device)",
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    p = sub.add_parser("decode", help="GPU JPEG decode time idle and behind queued device work (CUDA)")
    add_decode_arguments(p)


def phase_names(text: str) -> list[str]:
    """``--phases``: comma-separated names, blanks ignored."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    select_phases(end_to_end_phases(cfg, bench_device(cfg)), args.phases)  # a wrong name fails before any work
    if args.profile_dir is not None:  # made now: a path it cannot be would fail only after the first phase
        try:
            args.profile_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"mlgcn bench train: --profile-dir {args.profile_dir}: cannot be a directory ({err})", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="mlgcn-bench-") as tmp:
        shards = args.shards or make_toy_shards(
            Path(tmp), args.toy_images, args.toy_size, cfg.data.workers, cfg.train.seed
        )
        profiler = None if args.profile_dir is None else StepProfiler(args.profile_dir, args.profile_steps)
        profiled = 0 if profiler is None else profiler.steps
        point_config_at_shards(cfg, shards, batches_per_phase(cfg, args.steps, args.warmup, profiled))
        report = bench_train(cfg, args.steps, args.warmup, profiler, args.phases)
        report["data"] = describe_shards(shards, cfg.data.train_split)
        report["data"]["toy"] = None if args.shards else {"images": args.toy_images, "size": args.toy_size}
    print(format_report(report))
    _write_json(args.json, report)
    return 0


def _run_loader(args: argparse.Namespace) -> int:
    result = bench_loader(
        args.shards,
        args.decode,
        workers=args.workers,
        batches=args.batches,
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


def run_bench(args: argparse.Namespace) -> int:
    return {"train": _run_train, "loader": _run_loader, "decode": _run_decode}[args.bench](args)
