"""ModelEMA: the moving average of the weights (with its warm-up), the copied buffers, and its checkpointed state."""

from __future__ import annotations

import torch
from torch import nn

from mlgcn_dist.ema import ModelEMA


def small_model() -> nn.Module:
    """A layer with weights and a BatchNorm with running statistics (buffers)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def trained_a_little(model: nn.Module) -> dict[str, torch.Tensor]:
    """Moves every weight and every BatchNorm statistic away from their initial values; returns the new weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # updates running_mean / running_var / num_batches_tracked
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def ema_weights(ema: ModelEMA) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in ema.module.named_parameters()}


def test_after_its_warm_up_an_update_moves_the_ema_by_one_minus_decay_towards_the_weights():
    model = small_model()
    ema = ModelEMA(model, decay=0.9)
    ema.updates = 1000  # warm-up over: (1 + u) / (10 + u) > 0.9, the configured decay applies
    before = ema_weights(ema)
    weights = trained_a_little(model)
    ema.update(model)
    for name, value in ema_weights(ema).items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * weights[name])


def test_the_first_update_uses_the_warm_up_decay_two_elevenths_not_the_configured_one():
    """decay = min(configured, (1 + updates) / (10 + updates)): 2/11 at the first update, so the random
    initialisation keeps only 2/11 of the average."""
    model = small_model()
    ema = ModelEMA(model, decay=0.99)
    before = ema_weights(ema)
    weights = trained_a_little(model)
    ema.update(model)
    assert ema.updates == 1
    for name, value in ema_weights(ema).items():
        torch.testing.assert_close(value, 2 / 11 * before[name] + 9 / 11 * weights[name])


def test_an_update_copies_every_buffer_of_the_model_such_as_batchnorm_statistics():
    model = small_model()
    ema = ModelEMA(model, decay=0.99)
    trained_a_little(model)
    ema.update(model)
    model_buffers = dict(model.named_buffers())
    assert set(model_buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for name, buffer in ema.module.named_buffers():
        assert torch.equal(buffer, model_buffers[name]), name


def test_the_update_count_survives_a_state_dict_round_trip_so_a_resume_does_not_restart_the_warm_up():
    model = small_model()
    ema = ModelEMA(model, decay=0.99)
    for _ in range(5):
        trained_a_little(model)
        ema.update(model)
    resumed = ModelEMA(small_model(), decay=0.99)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.updates == ema.updates == 5
    # The next update of both uses the same (warm-up) decay: they stay equal.
    trained_a_little(model)
    ema.update(model)
    resumed.update(model)
    for name, value in ema_weights(resumed).items():
        torch.testing.assert_close(value, ema_weights(ema)[name])


def test_the_ema_copy_is_frozen_and_in_eval_mode():
    ema = ModelEMA(small_model().train(), decay=0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
