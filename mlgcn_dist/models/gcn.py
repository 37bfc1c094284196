"""ML-GCN head (Chen et al., CVPR 2019): a two-layer GCN over the label graph turns label embeddings into one
classifier per label; the logits are the pooled image feature dotted with each classifier."""

from __future__ import annotations

import math

import torch
from torch import nn


class GraphConvolution(nn.Module):
    """``adj @ (x @ W)`` (Kipf & Welling), with ML-GCN's initialisation uniform(-1/sqrt(out), 1/sqrt(out))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(out_features)
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        out = adj @ (x @ self.weight)
        return out if self.bias is None else out + self.bias


class GCNHead(nn.Module):
    """Pooled features [B, F] -> logits [B, C].

    The normalised adjacency [C, C] and the label embeddings [C, E] are buffers, not parameters: they are
    fixed inputs (the original kept ``A`` as a parameter it never trained), and a parameter without gradient
    makes DDP fail with "unused parameters". Saved with the model, so a checkpoint alone rebuilds the head.
    """

    def __init__(
        self,
        adj: torch.Tensor,
        embeddings: torch.Tensor,
        feature_dim: int,
        hidden: int = 1024,
        slope: float = 0.2,
    ) -> None:
        super().__init__()
        num_classes = adj.shape[0]
        if adj.ndim != 2 or adj.shape[1] != num_classes:
            raise ValueError(f"gcn head: adj must be a square [C, C] matrix, got shape {tuple(adj.shape)}")
        if embeddings.ndim != 2 or embeddings.shape[0] != num_classes:
            raise ValueError(
                f"gcn head: embeddings must be [C, E] with C={num_classes} (one row per label), "
                f"got shape {tuple(embeddings.shape)}"
            )
        for name, value in (("adj", adj), ("embeddings", embeddings)):
            if not torch.isfinite(value).all():
                raise ValueError(f"gcn head: {name} contains NaN or infinite values")
        self.register_buffer("adj", adj.detach().float().clone())
        self.register_buffer("embeddings", embeddings.detach().float().clone())
        self.gc1 = GraphConvolution(embeddings.shape[1], hidden)
        self.gc2 = GraphConvolution(hidden, feature_dim)
        self.act = nn.LeakyReLU(slope)

    def classifiers(self) -> torch.Tensor:
        """[C, F]: one classifier per label, computed once per forward for the whole batch."""
        hidden = self.act(self.gc1(self.embeddings, self.adj))
        return self.gc2(hidden, self.adj)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.classifiers().t()
