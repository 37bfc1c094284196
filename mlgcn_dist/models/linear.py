"""Baseline head: one linear classifier on the globally max-pooled feature."""

from __future__ import annotations

from torch import nn


class LinearHead(nn.Linear):
    """Pooled features [B, F] -> logits [B, C]."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__(feature_dim, num_classes)
