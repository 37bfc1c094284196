"""Distributed plumbing: building the Accelerator for CUDA, CPU process groups, MPS and DeepSpeed ZeRO.

Everything about "how many processes, which backend, which precision" is decided here, so the engine only sees an
Accelerator. Launch with ``accelerate launch`` or ``torchrun``; a plain ``python`` run is a single process.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
)

from mlgcn_dist.config import Config, ConfigError, flatten_config
from mlgcn_dist.deepspeed_config import (
    deepspeed_config,
    launcher_wants_deepspeed,
    refuse_accelerate_fields_beside_a_deepspeed_json,
)
from mlgcn_dist.threads import threads_phrase

_DTYPES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Topology:
    """What a run looks like once launched; printed at start so the global batch is never implicit."""

    world_size: int
    rank: int
    local_rank: int
    device: str
    distributed_type: str
    per_device_batch: int
    grad_accum: int
    # torch's intra-op threads in this process: on a GPU one unless OMP_NUM_THREADS says otherwise, as
    # `accelerate launch` gives (threads.use_launcher_threads); on a CPU what the launcher or torch gave.
    intra_op_threads: int

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (
            f"{self.distributed_type} on {self.device}: world size {self.world_size}; global batch = "
            f"{self.per_device_batch} per device x {self.grad_accum} accumulation x {self.world_size} processes "
            f"= {self.global_batch}; {threads_phrase(self.intra_op_threads)} per process"
        )


def accelerator_available() -> str:
    """cuda, mps or cpu: the accelerator this machine offers."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def training_device(cfg: Config) -> str:
    """cuda, mps or cpu: where this process trains (``train.device=cpu`` forces the CPU)."""
    return "cpu" if cfg.train.device == "cpu" else accelerator_available()


def concrete_precision(precision: str, device: str) -> str:
    """``train.precision`` as it runs on ``device`` (cuda, mps, cpu); only ``auto`` depends on the device.

    auto: bf16 on a GPU that computes it natively (Ampere and later); fp16 with loss scaling on older GPUs, where
    bf16 is emulated (no bf16 tensor cores) and several times slower; fp32 on CPU and MPS, where autocast gains
    little or is not supported across the ops of these models.
    """
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def resolve_precision(cfg: Config, device: str, resumed: str | None = None) -> Config:
    """A copy of ``cfg`` whose ``train.precision`` is concrete (the caller's config is left as it was).

    ``auto`` resumed from a checkpoint (``resumed``: the precision it was trained in) keeps that precision: a
    requeued job may land on another GPU generation, and the run must go on in the numerics it started with
    (whose loss-scaler state the checkpoint holds, or does not). Otherwise ``auto`` is what runs on ``device``.
    Resolved once, before anything reads the precision: the Accelerator, the DeepSpeed JSON, the non-finite loss
    policy, the run's saved config and W&B all see the same value. Each process resolves it alone: processes on
    GPUs of different generations would disagree (mixed clusters are not supported).
    """
    resolved = copy.deepcopy(cfg)
    if cfg.train.precision == "auto" and resumed is not None:
        resolved.train.precision = resumed
    else:
        resolved.train.precision = concrete_precision(cfg.train.precision, device)
    return resolved


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(cfg: Config) -> Accelerator:
    device = training_device(cfg)
    if cfg.train.precision == "auto":
        raise ValueError("build_accelerator: resolve train.precision=auto first (resolve_precision)")
    world_size = launched_world_size()
    if cfg.train.precision == "fp16" and device == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU (loss scaling on CPU is unsupported): use bf16 or fp32")
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    handlers = [
        # gradient_as_bucket_view saves a gradient copy per step; every parameter is used (the adjacency is a
        # buffer), so unused-parameter detection stays off.
        DistributedDataParallelKwargs(
            gradient_as_bucket_view=True, find_unused_parameters=False, bucket_cap_mb=cfg.train.ddp_bucket_mb
        ),
    ]
    kwargs: dict = {}
    if cfg.train.deepspeed or launcher_wants_deepspeed():
        refuse_accelerate_fields_beside_a_deepspeed_json()
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world_size))
    else:
        # On a machine without CUDA/MPS, cpu=True is what makes several processes form one gloo group.
        kwargs["cpu"] = device == "cpu"
    if world_size > 1:
        # Without CUDA, Accelerate leaves a DeepSpeed run's backend unset and then believes each process runs
        # alone (num_processes=1): naming gloo makes the process group a real one on CPU.
        handlers.append(InitProcessGroupKwargs(backend="gloo" if device == "cpu" else "nccl", timeout=timeout))
    return Accelerator(
        mixed_precision=_DTYPES[cfg.train.precision],
        gradient_accumulation_steps=cfg.train.grad_accum,
        # We step the LR scheduler ourselves, once per optimiser step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        **_compile_kwargs(cfg),
        **kwargs,
    )


def _compile_kwargs(cfg: Config) -> dict:
    if not cfg.train.compile:
        return {"dynamo_backend": "no"}
    return {"dynamo_plugin": TorchDynamoPlugin(backend="inductor", mode=cfg.train.compile_mode)}


def uses_cuda_graphs(compiled: bool, compile_mode: str) -> bool:
    """Whether the compiled model replays CUDA graphs (reduce-overhead): each step must then mark its start."""
    return compiled and compile_mode == "reduce-overhead"


def topology(accelerator: Accelerator, cfg: Config) -> Topology:
    return Topology(
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        local_rank=accelerator.local_process_index,
        device=str(accelerator.device),
        distributed_type=str(accelerator.distributed_type.value),
        per_device_batch=cfg.data.batch_size,
        intra_op_threads=torch.get_num_threads(),
        grad_accum=cfg.train.grad_accum,
    )


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model takes its images in: its weights'. DeepSpeed with bf16/fp16 runs the model in that dtype
    outright, without autocast (Accelerate enables none under DeepSpeed); elsewhere the weights are fp32 and autocast
    casts."""
    return next(model.parameters()).dtype


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def average_running_stats(*modules: torch.nn.Module) -> None:
    """All-reduce (mean) the running statistics of every normalisation layer (BatchNorm's running mean and
    variance) of ``modules``, so that every rank holds the same ones.

    Each rank's last forward passes update its statistics from its own batch (DDP broadcasts rank 0's at the start
    of a forward, DeepSpeed never), so after an epoch they differ per rank. Evaluated like that, each rank would
    score its share of the images with another model than the one saved (rank 0's). Other buffers (the GCN's
    adjacency) are equal on every rank and left alone: a mean over three ranks need not give back the same float.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for module in modules:
        for layer in module.modules():
            for name in ("running_mean", "running_var"):
                stats = getattr(layer, name, None)
                if isinstance(stats, torch.Tensor) and stats.is_floating_point():
                    torch.distributed.all_reduce(stats)
                    stats.div_(world)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on at least one (used to agree on stopping at the same step)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def say(accelerator: Accelerator, message: str) -> None:
    """Print ``message`` once for the whole run, from the main process (global rank 0). ``accelerator.print``
    prints once per node, and a multi-node job's nodes write into one log (SLURM's), where each node's copy of a
    message about the whole run (a metrics table, the best mAP, a resume) is noise."""
    if accelerator.is_main_process:
        print(message, flush=True)


# Keys a node may set for itself: where it finds its files, how it feeds its own GPUs, and logging (rank 0's).
# Every other key changes what a rank computes: one launch of every node with the same config and overrides.
NODE_LOCAL_KEYS = frozenset({
    "data.root", "data.shards", "data.workers", "data.prefetch_factor", "data.pin_memory", "data.decode",
    "data.device_prefetch", "data.augment_process", "data.worker_timeout_s", "data.worker_start", "graph.stats",
    "graph.embeddings", "model.pretrained", "train.deepspeed", "train.side_stream",
})


def check_same_config(cfg: Config) -> None:
    """Every rank runs the same config (the node-local keys aside), else a ConfigError on every rank naming the
    keys that differ. A node started with another optim.lr trained other weights on its ranks, silently (the mAP
    logged was rank 0's model, not the one saved); another data.batch_size hung the collectives until
    train.dist_timeout_s, naming nothing."""
    mine = {key: value for key, value in flatten_config(cfg.to_dict()).items()
            if key not in NODE_LOCAL_KEYS and not key.startswith("log.")}
    everyone = gather_objects(mine)
    differing = sorted({key for other in everyone for key in mine if other.get(key) != mine[key]})
    if differing:
        listed = "; ".join(
            f"{key}: " + ", ".join(f"rank {rank} {other.get(key)!r}" for rank, other in enumerate(everyone))
            for key in differing[:5]
        )
        raise ConfigError(f"the ranks of this run were started with different configs ({listed}): start every node "
                          "with the same config file and overrides")


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank; ``[obj]`` without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, obj)
    return parts
