"""HGAT head: hierarchical graph attention over label groups (e.g. COCO supercategories), and its FC ablation.

Pooled feature [B, F]
  -> shared reduction (Linear F->R, BN, ReLU)                                   [B, R]
  -> one residual block per group (batched grouped weights)                     [B, G, R]
  -> mixing ACROSS groups: every group vector attends to all groups             [B, G, R]
  -> one node per label: its group's vector projected, plus a label embedding  [B, C, D]
  -> mixing WITHIN groups: label nodes attend only to labels of their own group [B, C, D]
  -> one logit per label                                                        [B, C]

``hgat`` mixes with GAT attention (Velickovic et al. 2018) whose coefficients depend on the input; ``hgat_fc``
replaces both attention layers with learned input-independent coefficients (same masks, same normalisation).
Labels are addressed through their group index (a gather and a same-group mask), so labels of one group may be
interleaved with others and the logits come out in the original label order without any permutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupedLinear(nn.Module):
    """``n`` independent Linear layers applied at once to ``n`` slots: [B, n, in] -> [B, n, out]."""

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default range, per slot
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bni,nio->bno", x, self.weight) + self.bias


class GroupResidualBlocks(nn.Module):
    """One residual bottleneck MLP (R -> R/4 -> R, as ResNet's bottleneck ratio) per group on the shared
    vector: [B, R] -> [B, G, R]."""

    def __init__(self, num_groups: int, dim: int) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.fc1 = GroupedLinear(num_groups, dim, max(dim // 4, 1))
        self.fc2 = GroupedLinear(num_groups, max(dim // 4, 1), dim)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        x = shared.unsqueeze(1).expand(-1, self.num_groups, -1)
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


class NodeMixing(nn.Module):
    """Residual message passing ``x + ELU(alpha @ (x W))`` over N nodes; ``alpha`` rows are softmax-normalised
    over the neighbours ``mask`` [N, N] allows (True: node i may read node j). Subclasses define alpha."""

    def __init__(self, dim: int, mask: torch.Tensor) -> None:
        super().__init__()
        if not mask.any(dim=1).all():
            raise ValueError("node mixing: every node needs at least one allowed neighbour in the mask")
        self.proj = nn.Linear(dim, dim, bias=False)
        self.register_buffer("mask", mask.bool(), persistent=False)  # structure, rebuilt from the groups

    def coefficients(self, projected: torch.Tensor) -> torch.Tensor:
        """Mixing weights [B, N, N] or [N, N]: rows sum to 1, zero where the mask forbids."""
        raise NotImplementedError

    def _normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores.masked_fill(~self.mask, float("-inf")), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.proj(x)
        return x + F.elu(self.coefficients(projected) @ projected)


class GraphAttention(NodeMixing):
    """GAT attention: e_ij = LeakyReLU(a_dst . Wx_i + a_src . Wx_j), alpha = masked softmax over j."""

    def __init__(self, dim: int, mask: torch.Tensor, slope: float = 0.2) -> None:
        super().__init__(dim, mask)
        bound = 1.0 / math.sqrt(dim)
        self.att_dst = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.att_src = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.slope = slope

    def coefficients(self, projected: torch.Tensor) -> torch.Tensor:
        scores = (projected @ self.att_dst).unsqueeze(-1) + (projected @ self.att_src).unsqueeze(-2)
        return self._normalise(F.leaky_relu(scores, self.slope))


class FullyConnectedMixing(NodeMixing):
    """The ablation: learned coefficients, independent of the input (uniform over allowed nodes at init)."""

    def __init__(self, dim: int, mask: torch.Tensor) -> None:
        super().__init__(dim, mask)
        self.scores = nn.Parameter(torch.zeros(mask.shape))

    def coefficients(self, projected: torch.Tensor) -> torch.Tensor:
        return self._normalise(self.scores)


class LabelNodes(nn.Module):
    """One node per label from its group's vector: a per-group projection R -> D plus a learned per-label
    embedding that tells the labels of a group apart: [B, G, R] -> [B, C, D]. (A projection per label would
    cost C*R*D parameters, 10M for COCO, for little gain over the embedding and the per-label classifier.)"""

    def __init__(self, label_group: torch.Tensor, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.register_buffer("label_group", label_group, persistent=False)  # structure, rebuilt from groups
        self.proj = GroupedLinear(int(label_group.max()) + 1, in_dim, out_dim)
        self.embedding = nn.Parameter(
            torch.empty(len(label_group), out_dim).normal_(std=1.0 / math.sqrt(out_dim))
        )

    def forward(self, group_vectors: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(group_vectors)[:, self.label_group] + self.embedding)


def dense_group_index(groups: list[int]) -> torch.Tensor:
    """Group ids renumbered 0..G-1 in order of first appearance (ids need not be contiguous)."""
    if not groups:
        raise ValueError("hgat head: groups is empty; expected one group id per label")
    order: dict[int, int] = {}
    return torch.tensor([order.setdefault(int(g), len(order)) for g in groups], dtype=torch.long)


class HGATHead(nn.Module):
    """Pooled features [B, F] -> logits [B, C] for labels partitioned by ``groups`` (group id per label)."""

    def __init__(
        self,
        feature_dim: int,
        groups: list[int],
        reduce_dim: int = 512,
        label_dim: int = 256,
        attention: bool = True,
        slope: float = 0.2,
    ) -> None:
        super().__init__()
        label_group = dense_group_index(groups)
        num_groups, num_labels = int(label_group.max()) + 1, len(label_group)
        self.reduce = nn.Sequential(
            nn.Linear(feature_dim, reduce_dim), nn.BatchNorm1d(reduce_dim), nn.ReLU(inplace=True)
        )
        self.group_blocks = GroupResidualBlocks(num_groups, reduce_dim)
        all_groups = torch.ones(num_groups, num_groups, dtype=torch.bool)
        same_group = label_group.unsqueeze(0) == label_group.unsqueeze(1)
        if attention:
            self.group_mixing: NodeMixing = GraphAttention(reduce_dim, all_groups, slope)
            self.label_mixing: NodeMixing = GraphAttention(label_dim, same_group, slope)
        else:
            self.group_mixing = FullyConnectedMixing(reduce_dim, all_groups)
            self.label_mixing = FullyConnectedMixing(label_dim, same_group)
        self.label_nodes = LabelNodes(label_group, reduce_dim, label_dim)
        self.classifier = GroupedLinear(num_labels, label_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        group_vectors = self.group_mixing(self.group_blocks(self.reduce(features)))
        return self.classifier(self.label_mixing(self.label_nodes(group_vectors))).squeeze(-1)
