"""Multi-label losses on logits [B, C] and int8 targets [B, C]: 1 = positive, 0 = negative, -1 = difficult.

Difficult labels count as positive, as in the original ML-GCN training (its VOC loader marks them 0 and its
engine turns 0 into 1 before the loss); the AP meter ignores them instead. Both losses return the batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlgcn_dist.config import OptimConfig


def positive_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float {0, 1} targets (difficult -> 1) after checking they match the logits' shape."""
    if targets.shape != logits.shape:
        raise ValueError(
            f"loss: targets have shape {tuple(targets.shape)}, logits {tuple(logits.shape)}; expected equal"
        )
    return (targets != 0).float()


class MultiLabelSoftMarginLoss(nn.Module):
    """torch's MultiLabelSoftMarginLoss (binary cross-entropy averaged over labels, then over the batch)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # float32 so that bf16/fp16 logits from autocast do not lose the small per-label terms.
        return F.multilabel_soft_margin_loss(logits.float(), positive_mask(logits, targets))


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss (Ridnik et al., ICCV 2021), summed over labels, averaged over the batch.

    Positives: -(1 - p)^gamma_pos log p. Negatives use the shifted probability p_m = max(p - clip, 0):
    -p_m^gamma_neg log(1 - p_m): easy negatives (p < clip) contribute nothing and the rest are down-weighted.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positives = positive_mask(logits, targets)
        x = logits.float()
        p = torch.sigmoid(x)
        if self.clip > 0:
            p_neg = (p - self.clip).clamp(min=0)
            log_not_neg = torch.log(1 - p_neg)  # 1 - p_neg >= clip > 0: finite
        else:
            p_neg, log_not_neg = p, F.logsigmoid(-x)  # log(1 - sigmoid(x)) without underflow
        loss_pos = positives * (1 - p).pow(self.gamma_pos) * F.logsigmoid(x)
        loss_neg = (1 - positives) * p_neg.pow(self.gamma_neg) * log_not_neg
        return -(loss_pos + loss_neg).sum(dim=1).mean()


def build_loss(cfg: OptimConfig) -> nn.Module:
    if cfg.loss == "mlsm":
        return MultiLabelSoftMarginLoss()
    if cfg.loss == "asl":
        return AsymmetricLoss(cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip)
    raise ValueError(f"optim.loss: unknown loss '{cfg.loss}'; expected mlsm or asl")
