"""Optimiser and learning-rate schedule: ML-GCN's per-group learning rates, warmup, step or cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from mlgcn_dist.config import ConfigError, OptimConfig

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(
    model: nn.Module, lr: float, lrp: float, weight_decay: float = 1e-4, no_decay_norm_bias: bool = False
) -> list[dict]:
    """ML-GCN's get_config_optim: the backbone learns at ``lr * lrp``, everything else (the head) at ``lr``.

    Each group carries a ``name`` (backbone, head, and ``*_no_decay`` when norm layers and biases are exempt from
    weight decay) so LRs can be logged and checked per group after Accelerate/DeepSpeed wrap the optimiser.
    """
    buckets: dict[str, list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            part = "backbone" if module_name == "backbone" or module_name.startswith("backbone.") else "head"
            exempt = no_decay_norm_bias and (isinstance(module, _NORM_TYPES) or name == "bias")
            buckets.setdefault(part + ("_no_decay" if exempt else ""), []).append(param)
    groups = []
    for name in ("backbone", "backbone_no_decay", "head", "head_no_decay"):
        if name in buckets:
            groups.append({
                "name": name,
                "params": buckets[name],
                "lr": lr * lrp if name.startswith("backbone") else lr,
                "weight_decay": 0.0 if name.endswith("no_decay") else weight_decay,
            })
    return groups


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The head LR after the configured scaling rule (linear: proportional to the global batch)."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch / cfg.base_batch_size
    return cfg.lr


def fused_sgd(implementation: str, device_type: str, deepspeed: bool = False, fp16: bool = False) -> bool:
    """Whether ``optim.implementation`` means torch's fused SGD for parameters on ``device_type``.

    auto picks it on CUDA, where a compiled step is launch-bound: the fused step is one kernel a parameter group
    and dtype where foreach makes a few per list, with their host work. Not under DeepSpeed, which steps the
    optimiser on its own flattened partitions (foreach is what its runs were tested with), nor on other devices,
    nor in fp16: the fused step takes the loss scaler's overflow flag itself and skips on the device, so Accelerate,
    which tells a skipped step by the scaler not calling ``step``, reads every step as taken and the LR schedule
    would advance on the skipped ones (huggingface/accelerate#4242). build_optimizer refuses an explicit fused there.
    """
    if implementation == "auto":
        return device_type == "cuda" and not deepspeed and not fp16
    return implementation == "fused"


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, deepspeed: bool = False, fp16: bool = False
                    ) -> torch.optim.Optimizer:
    """ML-GCN's SGD over :func:`param_groups`, fused or foreach as ``cfg.implementation`` says for the device the
    model's parameters are on and the precision (``fp16``: loss-scaled)."""
    if fp16 and cfg.implementation == "fused":
        raise ConfigError("optim.implementation=fused with train.precision=fp16: the fused step skips overflowed "
                          "steps where Accelerate cannot see it, and the LR schedule would advance on them "
                          "(huggingface/accelerate#4242); use optim.implementation=auto or foreach")
    groups = param_groups(model, lr, cfg.lrp, cfg.weight_decay, cfg.no_decay_norm_bias)
    device_type = next(model.parameters()).device.type
    fused = fused_sgd(cfg.implementation, device_type, deepspeed, fp16)
    # fused=None leaves torch its default (foreach where the tensors allow it); the two flags are exclusive.
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=True if fused else None)


def lr_factor(step: int, cfg: OptimConfig, steps_per_epoch: int, total_epochs: int) -> float:
    """Multiplier of every group's base LR at optimiser step ``step`` (warmup, then step or cosine decay).

    Epoch boundaries are expressed in optimiser steps so the schedule is stepped once per optimiser step and still
    decays exactly at ML-GCN's ``epoch_step`` epochs.
    """
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return min(1.0, (step + 1) / warmup)
    epoch = step / steps_per_epoch
    if cfg.schedule == "cosine":
        total = max(total_epochs * steps_per_epoch - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / total, 1.0)))
    return cfg.gamma ** sum(epoch >= milestone for milestone in cfg.epoch_step)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # A torch LambdaLR keeps each group's own base LR (lr*lrp survives), unlike DeepSpeed's built-in schedulers.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch, total_epochs)
    )


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
