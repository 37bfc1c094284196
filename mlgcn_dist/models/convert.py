"""State dicts written by other code: unwrapping checkpoint containers, importing original ML-GCN weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from mlgcn_dist.config import ConfigError

# Keys under which training scripts commonly nest the weights (ML-GCN, torchvision references, timm).
_CONTAINER_KEYS = ("state_dict", "model")


def clean_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The tensors inside ``obj``, unwrapped from {"state_dict": ...} or {"model": ...}, ``module.`` stripped.

    ``source`` names where ``obj`` came from (a file path) for the error message.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[key] for key in _CONTAINER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{source}: expected a state dict (a mapping of parameter names to tensors, possibly under "
            f"'state_dict' or 'model'), got {type(obj).__name__}"
        )
    # DataParallel / DDP prefix every key with "module."; a plain model has no such prefix.
    return {key.removeprefix("module."): value for key, value in obj.items()}


def import_mlgcn_state_dict(state: Mapping, source: str = "ML-GCN checkpoint") -> tuple[dict[str, torch.Tensor],
                                                                                        torch.Tensor]:
    """Convert a checkpoint of the original ML-GCN code (GCNResnet) to this package's ``gcn`` model keys.

    Original layout: ``features.0`` ... ``features.7`` (conv1, bn1, relu, maxpool, layer1-4 of the ResNet:
    the same indices as our ResNet backbones), ``gc1.weight`` [E, hidden], ``gc2.weight`` [hidden, F] and the
    re-weighted adjacency ``A`` [C, C] (a parameter there, normalised on every forward).
    Returns ``(state_dict, A)``; ``source`` (the file) begins the messages of a checkpoint of another layout.

    ``A`` comes back separately because our model keeps only its normalised form, as a buffer: build the model
    with ``adj=graph.gen_adj(A)`` and the label embeddings, then ``model.load_state_dict(state_dict,
    strict=False)``; the only missing keys are then ``head.adj`` and ``head.embeddings`` (and BatchNorm
    ``num_batches_tracked`` counters for checkpoints from PyTorch < 0.4).
    """
    weights = clean_state_dict(state, source)
    converted: dict[str, torch.Tensor] = {}
    adjacency = None
    for key, value in weights.items():
        if key == "A":
            adjacency = value
        elif key.startswith("features."):
            converted["backbone." + key.removeprefix("features.")] = value
        elif key.startswith(("gc1.", "gc2.")):
            converted["head." + key] = value
        else:
            raise ValueError(
                f"{source}: unexpected key '{key}'; "
                "expected features.*, gc1.*, gc2.* and A (GCNResnet)"
            )
    if adjacency is None:
        raise ValueError(
            f"{source}: no 'A' (the re-weighted adjacency) among its keys; is it a GCNResnet?"
        )
    return converted, adjacency


def load_fitting(
    net: nn.Module, state: Mapping[str, torch.Tensor], misfit: str, ignored: Callable[[str], bool] = lambda key: False
) -> None:
    """``state`` into ``net``, every key and shape matching except missing keys ``ignored`` accepts. A misfit is a
    ConfigError beginning with ``misfit`` and naming a few keys (torch's own error lists every tensor)."""
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"{misfit}: {first_lines(err)}") from err
    missing = [key for key in result.missing_keys if not ignored(key)]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{misfit}; missing keys {missing[:5]} ({len(missing)} in all), unexpected keys "
            f"{result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)"
        )


def first_lines(err: Exception) -> str:
    """The first two lines of a torch error (load_state_dict lists every mismatched tensor, one per line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return " ".join(lines[:2]) + more
