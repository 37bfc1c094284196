"""The ``mlgcn`` command: one subcommand per job, each a thin layer over a package module.

Imports are done inside the subcommands so ``mlgcn --help`` and ``mlgcn make-toy`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlgcn_dist.arguments import positive_int
from mlgcn_dist.config import ConfigError


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is none to show (None, a flag's False) or
    the help already says it: "(default: None)" on every optional path would only be noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_config_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML file in configs/")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.05 model.backbone=resnet50")


def _cmd_train(args: argparse.Namespace) -> int:
    from mlgcn_dist.config import load_config
    from mlgcn_dist.engine import train

    train(load_config(args.config, args.overrides))
    return 0


def _cmd_make_toy(args: argparse.Namespace) -> int:
    from mlgcn_dist.data.toy import dataset_folders, make_toy, remove_toy

    # --out may name a real data set (/data/coco): make-toy would overwrite its annotations and put its JPEGs among
    # the real ones, so it writes over earlier data only when asked.
    held = dataset_folders(args.out)
    if held and not args.overwrite:
        raise FileExistsError(
            f"--out {args.out} already holds a data set ({', '.join(held)}); pass --overwrite to replace its "
            f"train2014/, val2014/ and annotations/instances_*2014.json with the toy set"
        )
    if args.overwrite:
        remove_toy(args.out)  # an earlier, larger set's JPEGs would otherwise stay beside this one's
    summary = make_toy(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(f"wrote a synthetic COCO-2014-format dataset to {args.out}: {summary}")
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from mlgcn_dist.data.pack import run_pack

    return run_pack(args) or 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mlgcn_dist.inference import run_evaluate

    return run_evaluate(args) or 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from mlgcn_dist.inference import run_predict

    return run_predict(args) or 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mlgcn_dist.compare import run_compare

    return run_compare(args) or 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from mlgcn_dist.bench.cli import run_bench

    return run_bench(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlgcn", description="ML-GCN multi-label training, distributed.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train (use `accelerate launch launch/train.py` for several processes)",
        formatter_class=DefaultsHelpFormatter,
    )
    _add_config_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "make-toy", help="write the synthetic dataset in COCO 2014 layout", formatter_class=DefaultsHelpFormatter
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory to write annotations/, train2014/ and val2014/ into"
    )
    p.add_argument("--train", type=positive_int, default=400, help="images in the training split")
    p.add_argument("--val", type=positive_int, default=200, help="images in the validation split")
    p.add_argument("--size", type=positive_int, default=96, help="long side of the images, in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes byte-identical files")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier data set in --out (its train2014/, val2014/ and instances_*2014.json)",
    )
    p.set_defaults(func=_cmd_make_toy)

    p = sub.add_parser("pack", help="repack COCO 2014 / VOC 2007 into WebDataset shards")
    from mlgcn_dist.data.pack import add_pack_arguments

    add_pack_arguments(p)
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on the validation split (distributed-aware)")
    from mlgcn_dist.inference import add_evaluate_arguments, add_predict_arguments

    add_evaluate_arguments(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="labels of images from a checkpoint")
    add_predict_arguments(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("compare", help="compare runs (local run directories or W&B)")
    from mlgcn_dist.compare import add_compare_arguments

    add_compare_arguments(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "bench",
        help="benchmarks: `bench train` (ceiling vs end to end), `bench loader`, `bench decode`",
        formatter_class=DefaultsHelpFormatter,  # add_bench_arguments gives it to each benchmark's parser
    )
    from mlgcn_dist.bench.cli import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"mlgcn {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"mlgcn {args.command}: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as err:
        # A failure during training keeps its traceback (exit 1): 2 means the configuration was wrong. Bad input to
        # a tool (a file that is not a checkpoint, image or run directory, a filter that does not parse, a damaged
        # shard) is one message naming the file or option; a traceback would bury that. Other RuntimeErrors
        # (torch's) keep theirs.
        if args.command == "train" and (hint := _data_worker_hint(err)):
            print(f"mlgcn train: {hint}", file=sys.stderr)
        if args.command == "train" or (isinstance(err, RuntimeError) and not _is_shard_error(err)):
            raise
        print(f"mlgcn {args.command}: {err}", file=sys.stderr)
        return 2


def _data_worker_hint(err: BaseException) -> str | None:
    """A line on the likely causes of a data loader worker's failure, printed before its traceback; else None."""
    if "DataLoader timed out" in str(err):
        return (f"a data loader worker yielded no batch within data.worker_timeout_s ({err}). A worker deadlocked "
                "while forking is one cause (CPython before 3.11.10, gh-112275: upgrade Python or set "
                "data.worker_start=forkserver, or auto, which chooses it there); a stalled filesystem another. Resume "
                "with train.resume=auto.")
    if "DataLoader worker (pid" in str(err):  # PyTorch's "exited unexpectedly", "is killed by signal: Killed."
        return (f"a data loader worker died ({err}). The out-of-memory killer is the usual cause (the kernel log "
                "says so, and SLURM's job log an oom-kill event): fewer data.workers, a smaller "
                "data.prefetch_factor or more memory per task. Resume with train.resume=auto.")
    return None


def _is_shard_error(err: RuntimeError) -> bool:
    from mlgcn_dist.data.loader import ShardError  # already imported wherever one was raised

    return isinstance(err, ShardError)

if __name__ == "__main__":
    sys.exit(main())
