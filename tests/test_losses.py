"""MLSM and ASL on hand-computed values, with the 1/0/-1 target encoding (difficult counts as positive)."""

from __future__ import annotations

import math

import pytest
import torch

from mlgcn_dist.config import OptimConfig
from mlgcn_dist.losses import AsymmetricLoss, MultiLabelSoftMarginLoss, build_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_mlsm_counts_difficult_as_positive_on_hand_computed_values():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    targets = torch.tensor([[1, -1, 0]], dtype=torch.int8)
    # -log sigmoid(x) = softplus(-x) for positives; -log(1 - sigmoid(x)) = softplus(x) for negatives.
    expected = (softplus(-0.0) + softplus(-2.0) + softplus(-1.0)) / 3
    assert build_loss(OptimConfig(loss="mlsm"))(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_mlsm_averages_over_labels_then_over_the_batch():
    logits = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([[0, 1], [1, 0]], dtype=torch.int8)
    rows = [(softplus(3.0) + softplus(0.0)) / 2, (softplus(0.0) + softplus(0.0)) / 2]
    assert MultiLabelSoftMarginLoss()(logits, targets).item() == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_asl_focuses_positives_and_clips_easy_negatives_on_hand_computed_values():
    loss = build_loss(OptimConfig(loss="asl", asl_gamma_neg=2.0, asl_gamma_pos=1.0, asl_clip=0.1))
    logits = torch.tensor([[0.0, 0.0], [0.0, -3.0]])
    targets = torch.tensor([[1, 0], [-1, 0]], dtype=torch.int8)
    positive = -((1 - 0.5) ** 1) * math.log(0.5)  # p = 0.5
    negative = -((0.5 - 0.1) ** 2) * math.log(1 - 0.4)  # p_m = p - clip = 0.4
    # Second row: the difficult label is a positive; sigmoid(-3) = 0.047 < clip: that negative costs nothing.
    expected = ((positive + negative) + (positive + 0.0)) / 2
    assert loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_asl_focusing_weighs_a_positive_by_one_minus_its_probability():
    loss = AsymmetricLoss(gamma_neg=0.0, gamma_pos=2.0, clip=0.0)
    p = 1 / (1 + math.exp(-1.0))  # sigmoid(1)
    expected = -((1 - p) ** 2) * math.log(p)
    assert loss(torch.tensor([[1.0]]), torch.tensor([[1]])).item() == pytest.approx(expected)


def test_asl_without_focusing_or_clipping_is_binary_cross_entropy_summed_over_labels():
    torch.manual_seed(0)
    logits = torch.randn(4, 6) * 3
    targets = torch.randint(-1, 2, (4, 6), dtype=torch.int8)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, (targets != 0).float(), reduction="none"
    )
    asl = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(logits, targets)
    assert asl.item() == pytest.approx(bce.sum(dim=1).mean().item(), rel=1e-5)


LOSS_CONFIGS = {"mlsm": OptimConfig(loss="mlsm"), "asl": OptimConfig(loss="asl"),
                "asl_unclipped": OptimConfig(loss="asl", asl_clip=0.0)}


@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_losses_give_finite_gradients_for_extreme_and_bf16_logits(name):
    logits = torch.tensor([[100.0, -100.0, 30.0, -30.0]], dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([[0, 1, -1, 0]], dtype=torch.int8)
    loss = build_loss(LOSS_CONFIGS[name])(logits, targets)
    loss.backward()
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_losses_of_bf16_logits_are_computed_in_float32(name):
    """Autocast gives bf16 logits; computed in bf16 the per-label log terms would lose about three digits."""
    logits = torch.tensor([[0.1, -2.5, 3.0, 7.0]], dtype=torch.bfloat16)
    targets = torch.tensor([[1, 0, -1, 0]], dtype=torch.int8)
    loss = build_loss(LOSS_CONFIGS[name])
    assert loss(logits, targets).item() == pytest.approx(loss(logits.float(), targets).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["mlsm", "asl"])
def test_losses_reject_targets_of_another_shape(name):
    with pytest.raises(ValueError, match="targets have shape"):
        build_loss(OptimConfig(loss=name))(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int8))


def test_build_loss_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="optim.loss"):
        build_loss(OptimConfig(loss="focal"))
