"""Typed run configuration: dataclasses per concern, loaded from YAML, overridden with dotted ``key=value``.

``load_config("configs/toy.yaml", ["optim.lr=0.05", "model.backbone=resnet50"])`` returns a :class:`Config`.
Every key is checked against the dataclass fields: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the key (and the file it came from) and listing the valid keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key and what was expected."""


@dataclass
class DataConfig:
    dataset: str = "coco"  # coco | voc: which reader / label space
    format: str = "folder"  # folder: read the COCO/VOC layout directly; wds: WebDataset shards
    root: str = "data/toy"  # dataset root in its original layout (format=folder, and the packer's input)
    shards: str = ""  # directory holding meta.json and the tar shards (format=wds)
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 448
    batch_size: int = 16  # per device, per micro-step
    eval_batch_size: int = 0  # 0: same as batch_size
    workers: int = 4
    prefetch_factor: int = 2
    pin_memory: bool = True
    decode: str = "auto"  # auto | cpu | gpu: where JPEGs are decoded and augmented
    device_prefetch: int = 2  # batches moved/decoded onto the device ahead, on a helper thread (0: inline)
    # GPU decode (data.decode=gpu, or auto on CUDA): decode and augment in a process of its own, the helper thread
    # only waiting for it, so the data path's Python shares neither the GIL nor the CUDA context with the thread
    # launching the step (mlgcn_dist/data/augment_process.py). The GPU recipes turn it on (configs/coco_gcn.yaml:
    # faster than the thread in run I, README Performance); unused with CPU decode, so that such a recipe trains with
    # data.decode=cpu as it is. Off by default: with decode=gpu on a CPU (tests, debugging) it gains nothing.
    augment_process: bool = False
    shuffle_buffer: int = 1000
    keep_empty: bool = False  # keep images without any annotation as all-negative samples
    max_bad_fraction: float = 0.01  # more skipped (corrupt) training samples than this fraction is an error
    worker_timeout_s: float = 600.0  # a loader worker that yields no batch this long fails the run (0: wait forever)
    # How loader workers start. fork: the platform's own method (fork on Linux up to Python 3.13, spawn on macOS).
    # forkserver and spawn start them from a process without the trainer's threads (prefetch, pinning), which a
    # fork before CPython 3.11.10 can deadlock in (gh-112275); their workers inherit none of the trainer's memory.
    # forkserver's server has torch imported (data/forkserver_preload.py); spawn's workers import it, every epoch.
    # auto: fork, except forkserver where fork would fork the workers on such a Python.
    worker_start: str = "auto"
    steps_per_epoch: int = 0  # 0: dataset size / global batch


@dataclass
class GraphConfig:
    t: float = 0.4  # binarisation threshold of the conditional co-occurrence probability
    p: float = 0.25  # weight given to neighbours after re-weighting
    variant: str = "original"  # original (ML-GCN code) | paper (diagonal 1-p, as in the paper's eq. 8)
    stats: str = ""  # ML-GCN adjacency pickle {'nums','adj'}; "" = computed from the training split
    embeddings: str = "onehot"  # ML-GCN word-vector pickle, GloVe text file, or "onehot"


@dataclass
class ModelConfig:
    head: str = "gcn"  # gcn | hgat | hgat_fc | linear
    backbone: str = "resnet101"
    pretrained: str = "none"  # none | imagenet | /path/to/weights.pth
    gcn_hidden: int = 1024
    leaky_slope: float = 0.2
    hgat_reduce: int = 512  # HGAT: width of the shared reduction before the per-group heads
    hgat_heads_dim: int = 256  # HGAT: per-label feature width inside the group heads


# Model keys that change the shapes of the saved weights: a checkpoint loads only into a model built with its own.
SHAPING_MODEL_KEYS = ("backbone", "head", "gcn_hidden", "hgat_reduce", "hgat_heads_dim")


def shaping_keys_that_differ(model: dict, saved: dict) -> list[str]:
    """The :data:`SHAPING_MODEL_KEYS` whose value in ``model`` (a config's model section) differs from a
    checkpoint's ``saved`` one, as ``model.gcn_hidden=16 (checkpoint: 256)``."""
    return [f"model.{key}={model[key]} (checkpoint: {saved[key]})" for key in SHAPING_MODEL_KEYS
            if key in saved and saved[key] != model[key]]


@dataclass
class OptimConfig:
    lr: float = 0.1  # head learning rate
    lrp: float = 0.1  # backbone learning rate = lr * lrp (ML-GCN get_config_optim)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False
    lr_scaling: str = "fixed"  # fixed | linear (lr *= global_batch / base_batch_size)
    base_batch_size: int = 32
    schedule: str = "step"  # step | cosine
    epoch_step: list[int] = field(default_factory=lambda: [30])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    clip_grad: float = 10.0  # max gradient norm; 0 disables
    # SGD's kernels: fused (a kernel per group and dtype; the foreach step took 3.4-4.1 ms of host time a step of a
    # host-bound compiled step on an H100, README Performance), foreach (torch's own default) or auto (fused on
    # CUDA without DeepSpeed, whose ZeRO steps its flat partitions).
    implementation: str = "auto"
    loss: str = "mlsm"  # mlsm (MultiLabelSoftMarginLoss) | asl (Asymmetric Loss)
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05


@dataclass
class TrainConfig:
    epochs: int = 20
    output_dir: str = ""  # "" = runs/<run_name>
    run_name: str = "run"
    seed: int = 0
    device: str = "auto"  # auto | cpu
    # auto: bf16 on GPUs with native bf16, fp16 (loss-scaled) on older GPUs, fp32 on CPU and MPS
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    # torch.compile mode; reduce-overhead replays CUDA graphs, which removes the per-kernel launch cost from the
    # host: +2% at the ceiling on one H100, but GPU decode then waits a step per batch (README Performance).
    compile_mode: str = "default"
    # Training steps on a non-default CUDA stream, which no library call on the legacy default stream waits for
    # (mlgcn_dist/streams.py; off until bench train measures a gain).
    side_stream: bool = False
    grad_accum: int = 1
    # DDP's all-reduce bucket size (PyTorch's default, 25 MB: GCN-ResNet-101's 180 MB of gradients in ~8 buckets,
    # the first sent while the backward is still running). Larger buckets: fewer, longer all-reduces. DDP only:
    # DeepSpeed takes its bucket sizes from its JSON (configs/deepspeed/).
    ddp_bucket_mb: int = 25
    sync_bn: bool = False
    deterministic: bool = False  # deterministic kernels (cuBLAS workspace fixed, no cuDNN autotuning, no TF32)
    ema_decay: float = 0.0  # 0 disables the EMA model
    resume: str = "auto"  # auto | none | /path/to/checkpoint
    keep_checkpoints: int = 2
    eval_every: int = 1
    log_every: int = 10
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit), mid-epoch too: a resume goes on there
    dist_timeout_s: int = 600
    deepspeed: str = ""  # DeepSpeed JSON (ZeRO stage etc.); batch sizes/precision are filled from this config


@dataclass
class LogConfig:
    wandb: str = "auto"  # auto (WANDB_MODE if set, else disabled) | online | offline | disabled
    project: str = "mlgcn-dist"
    entity: str = ""
    group: str = ""
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    run_id: str = ""  # W&B run id; a requeued SLURM job passes the same id to resume the same run
    log_artifact: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.train.run_name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Keys an earlier version wrote into every checkpoint and config.yaml, since removed, and why. A checkpoint's config
# still loads without them (they chose how a run computed, not what it learned: `mlgcn evaluate` must keep reading
# the weights); a YAML file or an override that sets one is an error saying it went.
RETIRED_KEYS: dict[str, str] = {
    "data.gpu_resample": "removed after bench run G: its matmul resample lost to the grouped resize on an H100",
    "train.compile_cpp_wrapper": "removed after bench run H: Inductor's C++ wrapper failed to compile GCN-ResNet-101's "
                                 "backward on an H100 with torch 2.11",
}

# Values a key may take, checked at load time so a typo fails before any heavy work starts.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("coco", "voc"),
    "data.format": ("folder", "wds"),
    "data.decode": ("auto", "cpu", "gpu"),
    "data.worker_start": ("auto", "fork", "forkserver", "spawn"),
    "graph.variant": ("original", "paper"),
    "model.head": ("gcn", "hgat", "hgat_fc", "linear"),
    "optim.lr_scaling": ("fixed", "linear"),
    "optim.schedule": ("step", "cosine"),
    "optim.loss": ("mlsm", "asl"),
    "optim.implementation": ("auto", "fused", "foreach"),
    "train.device": ("auto", "cpu"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "log.wandb": ("auto", "online", "offline", "disabled"),
}


# Lower bounds of integer keys: below them a run fails late (a division by zero after the first epoch, a zero
# collective timeout) instead of at load time.
AT_LEAST: dict[str, int] = {
    "data.image_size": 1,
    "data.batch_size": 1,
    "data.eval_batch_size": 0,
    "data.workers": 0,
    "data.prefetch_factor": 1,
    "data.device_prefetch": 0,
    "data.shuffle_buffer": 0,
    "data.steps_per_epoch": 0,
    "optim.base_batch_size": 1,
    "model.gcn_hidden": 1,
    "model.hgat_reduce": 1,
    "model.hgat_heads_dim": 1,
    "train.epochs": 1,
    "train.grad_accum": 1,
    "train.ddp_bucket_mb": 1,
    "train.keep_checkpoints": 1,
    "train.eval_every": 1,
    "train.log_every": 1,
    "train.max_steps": 0,
    "train.dist_timeout_s": 1,
}


# Ranges of real-valued keys, as (description, test): outside them a run trains on something else than asked (a
# negative decay factor flips the learning rate's sign, t >= 1 leaves the label graph without edges) or fails late.
IN_RANGE: dict[str, tuple[str, Callable[[float], bool]]] = {
    "data.worker_timeout_s": (">= 0 (0 waits forever)", lambda v: v >= 0),
    "optim.lr": ("> 0", lambda v: v > 0),
    "optim.lrp": (">= 0 (0 freezes the backbone)", lambda v: v >= 0),
    "optim.momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "optim.weight_decay": (">= 0", lambda v: v >= 0),
    "optim.gamma": ("> 0", lambda v: v > 0),
    "optim.warmup_epochs": (">= 0", lambda v: v >= 0),
    "optim.clip_grad": (">= 0 (0 disables clipping)", lambda v: v >= 0),
    "optim.asl_gamma_neg": (">= 0", lambda v: v >= 0),
    "optim.asl_gamma_pos": (">= 0", lambda v: v >= 0),
    "optim.asl_clip": ("in [0, 1)", lambda v: 0 <= v < 1),
    "graph.t": ("in [0, 1] (a threshold on conditional probabilities)", lambda v: 0 <= v <= 1),
    "graph.p": ("in [0, 1] (the weight of a label's neighbours)", lambda v: 0 <= v <= 1),
    "model.leaky_slope": (">= 0", lambda v: v >= 0),
}


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``optim.lr``), the reading twin of :func:`set_key`."""
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def flatten_config(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    """Return ``value`` as ``kind`` or raise a ConfigError naming the key; strings from the command line are parsed."""
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        (item_kind,) = typing.get_args(kind)[:1]
        if isinstance(value, str):
            if value.strip().startswith("["):
                value = _parse_yaml_value(value, key, source)
            else:
                value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' expects a list of {item_kind.__name__}, got {value!r}")
        return [_coerce(v, item_kind, key, source) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{source}: '{key}' has an unsupported type {kind}")
    if isinstance(value, str) and kind is not str:
        value = _parse_yaml_value(value, key, source) if value != "" else value
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _YAML11_INT.fullmatch(value):
            raise ConfigError(f"{source}: '{key}' expects a whole number in decimal digits, got {value!r} (YAML 1.1 "
                              "would read 010 as octal 8, 0x10 as 16, 1:30 as 90, 1_000 as 1000)")
    elif kind is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads an exponent without a dot (1e-4) as text
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):  # an integer beyond float's range is reported below
                return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # str(value) would be a different text: YAML reads 1.10 as 1.1, 1e3 as 1000.0
            raise ConfigError(f"{source}: '{key}' expects a string, got the number {value!r}: YAML reads unquoted "
                              "digits as a number (1.10 as 1.1); quote the value")
    raise ConfigError(f"{source}: '{key}' expects {kind.__name__}, got {value!r} ({type(value).__name__})")


# What YAML 1.1 reads as an integer beyond plain decimal digits: octal, hexadecimal, binary, base 60, underscores.
_YAML11_INT = re.compile(r"[-+]?(?:0[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+|[1-9][0-9_]*(?::[0-5]?[0-9])+|[0-9][0-9_]*)")


class _DecimalIntLoader(yaml.SafeLoader):
    """YAML's safe loader reading as integers only plain decimal digits: YAML 1.1 also reads 010 as octal 8, 0x10
    as 16 and 1:30 as 90 (base 60), which would train 8 epochs for ``epochs: 010``. Those stay text, which an
    integer key refuses (:func:`_coerce`) and a text key keeps as written."""


_DecimalIntLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_DecimalIntLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                        list("-+0123456789"))


def read_yaml_value(text: str) -> Any:
    """A value written on a command line, read as the config reads YAML (integers in decimal digits only)."""
    return yaml.load(text, Loader=_DecimalIntLoader)


def _parse_yaml_value(text: str, key: str, source: str) -> Any:
    """A command-line value read as YAML (``[3,6]``, ``true``, ``0.05``); unparsable text names the key."""
    try:
        return read_yaml_value(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: '{key}' has a value that is not valid YAML: {text!r}") from err


def _valid_keys(cfg: Config) -> list[str]:
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def set_key(cfg: Config, key: str, value: Any, source: str = "override") -> None:
    """Set dotted ``key`` (``section.name``) on ``cfg`` after checking it exists and the value has its type."""
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if section_name in Config.__dataclass_fields__ else None
    types_ = _field_types(type(section)) if section is not None else {}
    if section is None or name not in types_:
        if key in RETIRED_KEYS:
            raise ConfigError(f"{source}: config key '{key}' was {RETIRED_KEYS[key]} (README, Performance); delete it")
        valid = ", ".join(_valid_keys(cfg))
        raise ConfigError(f"{source}: unknown config key '{key}'. Valid keys: {valid}")
    coerced = _coerce(value, types_[name], key, source)
    allowed = CHOICES.get(key)
    if allowed is not None and coerced not in allowed:
        raise ConfigError(f"{source}: '{key}' must be one of {', '.join(allowed)}; got {coerced!r}")
    setattr(section, name, coerced)


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str, saved: bool = False) -> None:
    """Set every ``section: {name: value}`` of ``mapping``; ``saved``: a config a run recorded, whose
    :data:`RETIRED_KEYS` are dropped."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, graph, model, optim, train, log)")
    for section_name, body in mapping.items():
        if section_name not in Config.__dataclass_fields__:
            raise ConfigError(
                f"{source}: unknown config section '{section_name}'. Valid sections: "
                + ", ".join(Config.__dataclass_fields__)
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{section_name}' must be a mapping, got {body!r}")
        for name, value in body.items():
            if not (saved and f"{section_name}.{name}" in RETIRED_KEYS):
                set_key(cfg, f"{section_name}.{name}", value, source)


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        pairs.append((key.strip(), value))
    return pairs


class _UniqueKeyLoader(_DecimalIntLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently: a second
    ``optim:`` section would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key fails in the base class, with its own message
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; checked and validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file is a directory: {path}" if path.is_dir() else f"config file not found: {path}")
        try:
            mapping = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        apply_mapping(cfg, mapping, str(path))
    for key, value in parse_overrides(overrides or []):
        set_key(cfg, key, value, f"override {key}={value}")
    validate(cfg)
    return cfg


def config_from_dict(mapping: dict[str, Any], source: str = "checkpoint") -> Config:
    """The config a checkpoint recorded, from any version of this project (its retired keys dropped)."""
    cfg = Config()
    apply_mapping(cfg, mapping, source, saved=True)
    return cfg


def validate(cfg: Config) -> None:
    """Combinations that cannot work, reported before any process starts heavy work."""
    problems = [f"{key} must be >= {low}, got {value}" for key, low in AT_LEAST.items()
                if (value := get_key(cfg, key)) < low]
    problems += [f"{key} must be a finite number, got {value}" for key in _valid_keys(cfg)
                 if isinstance(value := get_key(cfg, key), float) and not math.isfinite(value)]
    problems += [f"{key} must be {text}, got {value}" for key, (text, ok) in IN_RANGE.items()
                 if math.isfinite(value := get_key(cfg, key)) and not ok(value)]
    name = cfg.train.run_name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        problems.append(f"train.run_name must be a plain directory name (runs/<run_name>), got {name!r}")
    if cfg.data.format == "wds" and not cfg.data.shards:
        problems.append("data.format=wds needs data.shards (a directory with meta.json)")
    if 0 < cfg.data.steps_per_epoch < cfg.train.grad_accum:
        problems.append(
            f"data.steps_per_epoch={cfg.data.steps_per_epoch} micro-batches cannot fill one optimiser step of "
            f"train.grad_accum={cfg.train.grad_accum}"
        )
    if cfg.model.head in ("hgat", "hgat_fc") and cfg.data.batch_size < 2:
        problems.append(f"model.head={cfg.model.head} normalises over the batch (BatchNorm in the head): "
                        f"data.batch_size must be >= 2 per process, got {cfg.data.batch_size}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        problems.append("data.max_bad_fraction must lie in [0, 1]")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        problems.append("train.ema_decay must lie in [0, 1)")
    if cfg.train.precision == "fp16" and cfg.train.device == "cpu":
        problems.append("train.precision=fp16 is not supported on CPU: use bf16 or fp32")
    if any(b <= a for a, b in zip(cfg.optim.epoch_step, cfg.optim.epoch_step[1:])):
        problems.append(f"optim.epoch_step must be increasing, got {cfg.optim.epoch_step}")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
