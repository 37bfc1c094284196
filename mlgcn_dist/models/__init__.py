"""Multi-label models: a backbone (feature map), global max pooling, and a head (pooled feature -> logits).

``build_model(cfg.model, num_classes, adj=..., embeddings=..., groups=...)`` builds any head on any
registered backbone. The optimiser gives ``model.backbone`` parameters ``lr * lrp`` and everything else
(``model.head``) ``lr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from mlgcn_dist.config import ConfigError, ModelConfig
from mlgcn_dist.models.backbones import build_backbone, list_backbones, register_backbone
from mlgcn_dist.models.gcn import GCNHead
from mlgcn_dist.models.hgat import HGATHead
from mlgcn_dist.models.linear import LinearHead

__all__ = [
    "GlobalMaxPool",
    "MultiLabelModel",
    "build_backbone",
    "build_model",
    "list_backbones",
    "list_heads",
    "register_backbone",
]


class GlobalMaxPool(nn.Module):
    """[B, F, h, w] -> [B, F] for any h, w (the original's MaxPool2d(14, 14) assumed 448 px ResNet input).

    ``max`` with indices, not ``amax``: the gradient goes to the element the forward picked (as MaxPool2d's),
    whereas ``amax``'s backward finds the maximum again by exact equality with the saved result. Under
    torch.compile in bf16 that equality can miss every element (the compiled backward compares against values
    it computes at another precision): the mask is empty, its count zero, the gradient NaN (pytorch/pytorch
    #186799; tests/test_models.py reproduces it on CPU). The H100 bench's compiled runs were NaN from the
    ceiling on, where eager runs of the same model were finite.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).max(dim=2).values


class MultiLabelModel(nn.Module):
    """images [B, 3, H, W] -> logits [B, C]."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = GlobalMaxPool()
        self.head = head
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.backbone(images)))


def _check_num_labels(head: str, name: str, count: int, num_classes: int) -> None:
    if count != num_classes:
        raise ValueError(
            f"model.head={head}: {name} describes {count} labels, but num_classes is {num_classes}"
        )


def _gcn_head(cfg: ModelConfig, num_classes: int, feature_dim: int, inputs: dict) -> nn.Module:
    adj, embeddings = torch.as_tensor(inputs["adj"]), torch.as_tensor(inputs["embeddings"])
    _check_num_labels(cfg.head, "adj", adj.shape[0], num_classes)
    return GCNHead(adj, embeddings, feature_dim, cfg.gcn_hidden, cfg.leaky_slope)


def _hgat_head(cfg: ModelConfig, num_classes: int, feature_dim: int, inputs: dict) -> nn.Module:
    groups = list(inputs["groups"])
    _check_num_labels(cfg.head, "groups", len(groups), num_classes)
    attention = cfg.head == "hgat"
    return HGATHead(feature_dim, groups, cfg.hgat_reduce, cfg.hgat_heads_dim, attention, cfg.leaky_slope)


def _linear_head(cfg: ModelConfig, num_classes: int, feature_dim: int, inputs: dict) -> nn.Module:
    return LinearHead(feature_dim, num_classes)


class HeadSpec(NamedTuple):
    # (cfg, num_classes, feature_dim, inputs) -> head
    build: Callable[[ModelConfig, int, int, dict], nn.Module]
    needs: tuple[str, ...]  # build_model keyword inputs that must not be None


_HEADS: dict[str, HeadSpec] = {
    "gcn": HeadSpec(_gcn_head, ("adj", "embeddings")),
    "hgat": HeadSpec(_hgat_head, ("groups",)),
    "hgat_fc": HeadSpec(_hgat_head, ("groups",)),
    "linear": HeadSpec(_linear_head, ()),
}


def list_heads() -> list[str]:
    return sorted(_HEADS)


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    *,
    adj: torch.Tensor | np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    groups: list[int] | None = None,
) -> MultiLabelModel:
    """The model ``cfg`` describes for ``num_classes`` labels.

    ``adj``: the ALREADY normalised adjacency [C, C] (graph.gen_adj) and ``embeddings`` [C, E]: for gcn.
    ``groups``: group id per label (LabelSpace.groups()): required by hgat and hgat_fc.
    """
    if cfg.head not in _HEADS:
        raise ConfigError(f"model.head: unknown head '{cfg.head}'; expected one of {', '.join(list_heads())}")
    spec = _HEADS[cfg.head]
    inputs = {"adj": adj, "embeddings": embeddings, "groups": groups}
    missing = [name for name in spec.needs if inputs[name] is None]
    if missing:  # checked before the (slow) backbone is built
        raise ValueError(f"model.head={cfg.head} needs {' and '.join(missing)}; pass them to build_model")
    backbone, feature_dim = build_backbone(cfg.backbone, cfg.pretrained)
    head = spec.build(cfg, num_classes, feature_dim, inputs)
    return MultiLabelModel(backbone, head, num_classes)
