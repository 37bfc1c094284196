"""Evaluate and predict from checkpoints: ours (``best.pt``/``last.pt``) and the original ML-GCN's.

``mlgcn evaluate`` runs under ``accelerate launch`` too: every rank evaluates its part of the validation split and
the AP meter is gathered, each image counted once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from mlgcn_dist.arguments import positive_int, probability
from mlgcn_dist.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_overrides,
    set_key,
    shaping_keys_that_differ,
    validate,
)
from mlgcn_dist.data.records import LabelSpace, label_space_difference
from mlgcn_dist.errors import first_line, one_line
from mlgcn_dist.files import write_text_atomic


def resolve_checkpoint(path: str | Path) -> Path:
    """A portable checkpoint file, or a run directory (its ``checkpoints/best.pt``, else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            for candidate in (path / "checkpoints" / name, path / name):
                if candidate.is_file():
                    return candidate
        raise FileNotFoundError(f"{path}: no checkpoints/best.pt or last.pt in this directory")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _read_checkpoint(path: str | Path) -> object:
    """``torch.load`` of a checkpoint file with ``weights_only``: tensors, containers and numbers only, so a file
    from elsewhere (a published ML-GCN checkpoint) cannot run code as it loads. A file it cannot read is a
    ValueError naming it."""
    if _is_zip_or_pickle(path) is False:  # torch.load reads any other file as a pickle: an unrelated error
        raise ValueError(
            f"{path}: not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle (older torch.save); "
            "a text file or an image?"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (UnpicklingError: {first_line(err)})") from err
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint: it holds objects beyond tensors, containers and numbers, "
            "which could run code as they load, so it is refused (an mlgcn-dist checkpoint written before "
            "2026-11-27 holds numpy arrays: if you trust it, torch.load it with weights_only=False and save it "
            "again with them as lists)"
        ) from err
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, UnicodeDecodeError, OSError) as err:  # OSError: a zip cut short
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({one_line(err)})"
        ) from err


def _is_zip_or_pickle(path: str | Path) -> bool | None:
    """Whether a file starts as torch.save's zip archive or a pickle (protocol 2 and later) does; None for an
    empty or unreadable file (torch.load names what is wrong with those)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    return (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")) if head else None


def load_portable(path: Path) -> dict:
    payload = _read_checkpoint(path)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: not an mlgcn-dist checkpoint (holds a {type(payload).__name__}, not a dict)")
    missing = [k for k in ("model", "config", "label_names") if k not in payload]
    if missing:
        raise ValueError(
            f"{path}: not an mlgcn-dist checkpoint (missing {', '.join(missing)}); for a checkpoint of the original "
            "ML-GCN code pass --import-mlgcn"
        )
    return payload


def model_from_payload(payload: dict, cfg: Config, weights: str = "model") -> torch.nn.Module:
    """Rebuild the model the checkpoint was trained as (label graph from its own statistics) and load weights."""
    from mlgcn_dist.graph import build_graph_inputs
    from mlgcn_dist.models import build_model
    from mlgcn_dist.models.convert import load_fitting

    names = payload["label_names"]
    state = payload["ema"] if weights == "ema" else payload["model"]
    if state is None:
        raise ValueError("this checkpoint holds no EMA weights (trained with train.ema_decay=0); use --weights model")
    state = _without_compile_prefix(state)
    if "head.adj" in state and "head.embeddings" in state:
        # The GCN's graph inputs are buffers of its saved weights: evaluating needs neither the graph.stats nor the
        # graph.embeddings file of the training machine.
        adj, embeddings = state["head.adj"], state["head.embeddings"]
    elif cfg.model.head == "gcn":  # an imported original checkpoint: built from the statistics and word vectors
        adj, embeddings = build_graph_inputs(cfg.graph, names, np.asarray(payload["nums"]),
                                             np.asarray(payload["adj"]))
    else:  # the other heads take no graph inputs
        adj = embeddings = None
    groups = LabelSpace(names, payload["supercategories"]).groups()
    # Every weight comes from the checkpoint: the backbone's initial ones (model.pretrained: ImageNet's, a
    # download, or a file of the training machine) would only be overwritten.
    arch = dataclasses.replace(cfg.model, pretrained="none")
    model = build_model(arch, len(names), adj=adj, embeddings=embeddings, groups=groups)
    if "A" not in payload:
        # A --config or model.* overrides of another network than the checkpoint's: named, not torch's traceback.
        load_fitting(model, state, _misfit(payload["config"].get("model") or {}, cfg))
        return model.eval()
    # An imported original checkpoint has no adjacency/embedding buffers: they come from our graph inputs. Any
    # other key missing or left over means the config describes another network (resnet50 against a ResNet-101
    # checkpoint would load a part of it and leave the rest random).
    load_fitting(model, state, _import_misfit(state, model, cfg),
                 ignored=lambda key: key in ("head.adj", "head.embeddings") or key.endswith("num_batches_tracked"))
    return model.eval()


def _misfit(saved: dict, cfg: Config) -> str:
    changed = shaping_keys_that_differ(dataclasses.asdict(cfg.model), saved)
    which = f" ({', '.join(changed)})" if changed else ""
    return (f"the checkpoint does not fit the model of the config given{which}: evaluate it with its own config (no "
            "--config, no model.* overrides)")


def _import_misfit(state: dict, model: torch.nn.Module, cfg: Config) -> str:
    """What to change when an original checkpoint does not fit: the word vectors or hidden width where its first
    graph convolution differs (gc1.weight is [vector length, hidden]), else the backbone."""
    theirs, ours = state.get("head.gc1.weight"), model.state_dict().get("head.gc1.weight")
    hints = []
    if theirs is not None and ours is not None:
        if theirs.shape[0] != ours.shape[0]:
            hints.append(f"its gc1 takes label vectors of length {theirs.shape[0]}, graph.embeddings="
                         f"{cfg.graph.embeddings} gives {ours.shape[0]}: pass the word vectors it was trained with "
                         "(ML-GCN's: the 300-d GloVe pickle)")
        if theirs.shape[1] != ours.shape[1]:
            hints.append(f"its GCN's hidden width is {theirs.shape[1]}, model.gcn_hidden={cfg.model.gcn_hidden}")
    hints = hints or ["pass the backbone it was trained with: ML-GCN's is resnet101"]
    return (f"the ML-GCN checkpoint does not fit model.backbone={cfg.model.backbone}, model.head={cfg.model.head} "
            f"({'; '.join(hints)})")


def _without_compile_prefix(state: dict) -> dict:
    """A state dict under the bare module's names: best.pt/last.pt of a train.compile=true run saved before
    2026-11-27 name every weight ``_orig_mod.<name>`` (torch.compile's wrapper)."""
    prefix = "_orig_mod."
    if not state or not all(key.startswith(prefix) for key in state):
        return state
    return {key.removeprefix(prefix): value for key, value in state.items()}


def _config_for(payload: dict, args: argparse.Namespace) -> Config:
    if args.config:
        cfg = load_config(args.config, [])
    else:
        cfg = config_from_dict(payload["config"])
        # The saved precision is what the training machine ran (a V100's fp16 cannot run on a CPU); evaluation has
        # no loss scaling to carry on, so it runs at this machine's precision unless an override sets one.
        cfg.train.precision = "auto"
    for key, value in parse_overrides(args.overrides):  # read as training reads them
        set_key(cfg, key, value, f"override {key}={value}")
    validate(cfg)
    _check_data_path(cfg)
    return cfg


def _check_data_path(cfg: Config) -> None:
    """The data path a stored config names is as training gave it, often relative to where training ran: from
    another directory, say so and how to point at the data, instead of a reader's missing-file error."""
    key, where = ("data.shards", cfg.data.shards) if cfg.data.format == "wds" else ("data.root", cfg.data.root)
    path = Path(where)
    if not path.exists():
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"{key} {where} does not exist{relative}; run where training ran or pass {key}=<path>")


def check_label_space(payload: dict, dataset_names: list[str], source: str) -> None:
    if difference := label_space_difference(payload["label_names"], dataset_names):
        raise ConfigError(f"{source}: the checkpoint was trained on {difference}; evaluate on the dataset it was "
                          "trained on")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="best.pt / last.pt, a run directory (its best.pt), or an ML-GCN .pth.tar (--import-mlgcn)")
    p.add_argument("--config", help="config to use instead of the one stored in the checkpoint")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="the trained weights or their exponential moving average (default: %(default)s)")
    p.add_argument("--import-mlgcn", action="store_true", help="the checkpoint comes from the original ML-GCN code")
    p.add_argument("--scores-out", help="write per-image scores (JSON lines: image_id, scores, target)")
    p.add_argument("--metrics-out", help="write the metrics (and top-3, per-class AP) as JSON")
    p.add_argument("overrides", nargs="*",
                   help="dotted config overrides, e.g. data.shards=/data/coco-shards (the stored config's data paths "
                   "are relative to where training ran)")


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt or a run directory (its best.pt)")
    p.add_argument("--weights", choices=("model", "ema"), default="model",
                   help="the trained weights or their exponential moving average (default: %(default)s)")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="probability above which a label is printed (default: %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=3,
                   help="also print the k most probable labels (default: %(default)s)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...); an unreadable one is named, the rest "
                   "predicted, exit status 2")


def _check_outputs(**flags: str | None) -> None:
    """Output files that could not be written fail before the evaluation, not after it (an evaluation pass over
    COCO is minutes of work): a missing or unwritable directory, a path that is a directory or an unwritable
    file, one path given to two flags. Checked without writing (every process of a launch parses the flags)."""
    given = {flag: Path(path) for flag, path in flags.items() if path}
    for flag, path in given.items():
        parent = path.resolve().parent
        if path.is_dir():
            raise ConfigError(f"{flag} {path}: is a directory; give the path of a file to write")
        if not parent.is_dir():
            raise ConfigError(f"{flag} {path}: its directory {parent} does not exist")
        if not os.access(path if path.exists() else parent, os.W_OK):
            raise ConfigError(f"{flag} {path}: cannot be written (no write permission)")
    if len({p.resolve() for p in given.values()}) < len(given):
        raise ConfigError(f"{' and '.join(given)} name the same file; give each its own")


def _imported_payload(args: argparse.Namespace) -> dict:
    """Wrap an original ML-GCN checkpoint as ours: weights converted, graph statistics from the configured data."""
    from mlgcn_dist.data.loader import dataset_info
    from mlgcn_dist.models.convert import import_mlgcn_state_dict

    if not args.config:
        raise ConfigError("--import-mlgcn needs --config (the original checkpoint stores no configuration)")
    cfg = load_config(args.config, args.overrides)
    path = resolve_checkpoint(args.checkpoint)
    state, a_matrix = import_mlgcn_state_dict(_read_checkpoint(path), f"{path} (ML-GCN checkpoint)")
    info = dataset_info(cfg.data)
    if tuple(a_matrix.shape) != (info.num_classes,) * 2:
        raise ConfigError(
            f"{args.checkpoint}: the ML-GCN checkpoint's label graph A is {tuple(a_matrix.shape)}, for "
            f"{a_matrix.shape[0]} labels, but the dataset of --config has {info.num_classes}; evaluate it on the "
            "dataset it was trained on"
        )
    return {"model": state, "ema": None, "config": cfg.to_dict(), "label_names": info.label_names,
            "supercategories": info.supercategories, "nums": info.nums, "adj": info.adj, "A": a_matrix}


def run_evaluate(args: argparse.Namespace) -> int:
    from mlgcn_dist import distributed
    from mlgcn_dist.data.loader import split_label_names
    from mlgcn_dist.data.transforms import GpuAugment
    from mlgcn_dist.engine import evaluate, format_metrics_table, resolve_decode

    _check_outputs(**{"--scores-out": args.scores_out, "--metrics-out": args.metrics_out})
    if args.import_mlgcn:
        payload = _imported_payload(args)
        source = f"{args.checkpoint} (original ML-GCN), its weights"
    else:
        path = resolve_checkpoint(args.checkpoint)
        payload = load_portable(path)
        source = describe_checkpoint(path, payload, args.weights)
    cfg = _config_for(payload, args)
    cfg = distributed.resolve_precision(cfg, distributed.training_device(cfg))
    cfg.train.resume = "none"
    cfg.train.deepspeed = ""
    check_label_space(payload, split_label_names(cfg.data, cfg.data.val_split), str(args.checkpoint))
    accelerator = distributed.build_accelerator(cfg)
    model = model_from_payload(payload, cfg, args.weights)
    if "A" in payload:  # the original's learned/fixed correlation matrix replaces the one from statistics
        from mlgcn_dist.graph import gen_adj

        model.head.adj.copy_(gen_adj(torch.as_tensor(payload["A"]).float()))
    model = model.to(accelerator.device)
    decode = resolve_decode(cfg, accelerator.device)
    augment = GpuAugment(cfg.data.image_size, train=False) if decode == "gpu" else None
    results, merged = evaluate(model, cfg, accelerator, decode, augment)
    if accelerator.is_main_process:
        print(f"evaluated {source}")
        print(format_metrics_table({args.weights: results}))
        skipped = f"; skipped as unreadable: {results['num_bad']}, ids {results['bad_ids']}" if results["num_bad"] else ""
        print(f"images evaluated: {results['num_images']} (duplicates removed: {results['duplicates']}{skipped})")
        print("per-class AP:")
        for name, ap in zip(payload["label_names"], results["ap"]):
            print(f"  {name:20s} {ap:6.2f}" if ap == ap else f"  {name:20s}    n/a (no positive)")
        if args.scores_out:
            _write_scores(Path(args.scores_out), merged)
        if args.metrics_out:
            from mlgcn_dist.tracking import json_safe

            write_text_atomic(Path(args.metrics_out), json.dumps(json_safe(results), indent=1))
    accelerator.end_training()
    return 0


def describe_checkpoint(path: Path, payload: dict, weights: str) -> str:
    """Which file, epoch, step and weights, and the mAP training logged for them: a run directory evaluates its
    best.pt, whose best mAP may be its EMA's."""
    logged = payload.get("metrics") or {}
    maps = ", ".join(f"{name} {metrics['mAP']:.2f}" for name, metrics in logged.items() if metrics)
    return (f"{path}: epoch {payload.get('epoch', '?')}, step {payload.get('global_step', '?')}, {weights} weights"
            + (f" (mAP logged by training: {maps}; --weights picks one)" if maps else ""))


def _write_scores(path: Path, meter) -> None:
    state = meter.state()
    with open(path, "w") as fh:
        for image_id, scores, target in zip(state["image_ids"].tolist(), state["scores"].tolist(),
                                            state["targets"].tolist()):
            fh.write(json.dumps({"image_id": image_id, "scores": scores, "target": target}) + "\n")


PREDICT_BATCH = 16  # images decoded and run at once: memory stays that of one batch whatever the number of files


@torch.no_grad()
def predict(model: torch.nn.Module, image_size: int, paths: list[str], batch_size: int = PREDICT_BATCH
            ) -> tuple[list[str], torch.Tensor | None, dict[str, str]]:
    """Label logits [N, C] of the image files that can be read (evaluation transform: plain resize, normalise),
    run ``batch_size`` files at a time: those paths, their logits (None when none could be read) and, per file
    that could not, why."""
    import random

    from PIL import Image

    from mlgcn_dist.data.records import UNREADABLE_IMAGE_ERRORS
    from mlgcn_dist.data.transforms import CpuTransform, normalise

    transform = CpuTransform(image_size, train=False)
    rng = random.Random(0)
    read, logits, unreadable = [], [], {}
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            try:
                with Image.open(path) as img:
                    batch.append(transform(img.convert("RGB"), rng))
                read.append(path)
            except UNREADABLE_IMAGE_ERRORS as err:  # PIL's errors for a truncated file do not name it
                unreadable[path] = first_line(err)
        if batch:
            logits.append(model(normalise(torch.stack(batch))).float())
    return read, (torch.cat(logits) if logits else None), unreadable


def run_predict(args: argparse.Namespace) -> int:
    """The labels of each readable image; an unreadable one is named on stderr and makes the exit status 2, after
    the others are printed."""
    payload = load_portable(resolve_checkpoint(args.checkpoint))
    cfg = config_from_dict(payload["config"])
    model = model_from_payload(payload, cfg, args.weights)
    read, logits, unreadable = predict(model, cfg.data.image_size, args.images)
    for path, reason in unreadable.items():
        print(f"mlgcn predict: {path}: not a readable image ({reason})", file=sys.stderr)
    if logits is None:
        return 2
    # Decided on the logits, as evaluation decides (logit >= 0 at 0.5): in float32, sigmoid of a logit just
    # below 0 rounds to 0.5.
    cut = math.log(args.threshold / (1 - args.threshold)) if 0 < args.threshold < 1 else math.copysign(
        math.inf, args.threshold - 0.5)
    names = payload["label_names"]
    for path, z in zip(read, logits):
        p = torch.sigmoid(z)
        above = [(names[i], float(p[i])) for i in torch.nonzero(z >= cut).flatten().tolist()]
        top = torch.topk(p, min(args.top_k, len(names)))
        print(path)
        print("  above {:.2f}: {}".format(args.threshold, ", ".join(f"{n} {s:.3f}" for n, s in above) or "none"))
        print("  top-{}: {}".format(args.top_k, ", ".join(f"{names[i]} {float(s):.3f}"
                                                          for s, i in zip(top.values, top.indices))))
    return 2 if unreadable else 0
