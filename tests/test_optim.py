"""Optimiser groups and LR schedule: ML-GCN's lr x lrp for the backbone, decay at epoch_step, warmup."""

import pytest
import torch
from torch import nn

from mlgcn_dist.config import ConfigError, OptimConfig, load_config
from mlgcn_dist.optim import (
    build_optimizer,
    build_scheduler,
    fused_sgd,
    group_lrs,
    lr_factor,
    param_groups,
    scaled_lr,
)


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)


def test_backbone_gets_lr_times_lrp_and_head_gets_lr():
    groups = param_groups(TwoPart(), lr=0.1, lrp=0.1)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"backbone": pytest.approx(0.01), "head": 0.1}
    assert sum(len(g["params"]) for g in groups) == len(list(TwoPart().parameters()))


def test_norm_and_bias_exempt_from_weight_decay_only_when_asked():
    groups = param_groups(TwoPart(), lr=0.1, lrp=0.1, weight_decay=1e-4, no_decay_norm_bias=True)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert len(by_name["backbone"]["params"]) == 1  # conv weight only
    assert len(by_name["head_no_decay"]["params"]) == 1  # head bias
    assert by_name["backbone_no_decay"]["lr"] == pytest.approx(0.01)


def test_step_schedule_decays_at_epoch_step_measured_in_optimiser_steps():
    cfg = OptimConfig(lr=0.1, lrp=0.1, epoch_step=[2, 4], gamma=0.1)
    opt = build_optimizer(TwoPart(), cfg, cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, total_epochs=6)
    seen = []
    for _ in range(30):
        seen.append(group_lrs(opt)["head"])
        opt.step()
        sched.step()
    assert seen[9] == pytest.approx(0.1) and seen[10] == pytest.approx(0.01) and seen[20] == pytest.approx(0.001)
    assert group_lrs(opt)["backbone"] == pytest.approx(0.0001)


def test_warmup_rises_linearly_then_cosine_ends_near_zero():
    cfg = OptimConfig(schedule="cosine", warmup_epochs=1)
    assert lr_factor(0, cfg, 10, 5) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 10, 5) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 10, 5) == pytest.approx(1.0)
    assert lr_factor(49, cfg, 10, 5) < 0.01


def test_a_fractional_warmup_rises_to_one_and_not_beyond():
    cfg = OptimConfig(warmup_epochs=0.25)  # 2.5 optimiser steps of 10 a epoch
    assert [lr_factor(step, cfg, 10, 5) for step in range(4)] == pytest.approx([0.4, 0.8, 1.0, 1.0])


def test_build_optimizer_takes_the_lr_it_is_given_and_momentum_weight_decay_and_exemptions_from_the_config():
    """The LR argument is the head LR after scaling (scaled_lr), not optim.lr."""
    cfg = OptimConfig(lr=0.1, lrp=0.2, momentum=0.5, weight_decay=3e-4, no_decay_norm_bias=True)
    opt = build_optimizer(TwoPart(), cfg, lr=0.4)
    groups = {g["name"]: (g["lr"], g["momentum"], g["weight_decay"]) for g in opt.param_groups}
    assert groups == {"backbone": pytest.approx((0.08, 0.5, 3e-4)), "head": pytest.approx((0.4, 0.5, 3e-4)),
                      "backbone_no_decay": pytest.approx((0.08, 0.5, 0)),
                      "head_no_decay": pytest.approx((0.4, 0.5, 0))}


def test_linear_scaling_rule_scales_with_global_batch():
    assert scaled_lr(OptimConfig(lr=0.1, lr_scaling="linear", base_batch_size=32), 256) == pytest.approx(0.8)
    assert scaled_lr(OptimConfig(lr=0.1, lr_scaling="fixed"), 256) == pytest.approx(0.1)


class Norms(nn.Module):
    """A head with LayerNorm and GroupNorm (the transformer and GCN heads' norm layers) and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.GroupNorm(2, 4))
        self.backbone_proj = nn.Linear(4, 4, bias=False)  # a head module whose name only starts like "backbone"
        self.head = nn.Sequential(nn.Linear(4, 4, bias=False), nn.LayerNorm(4))
        self.frozen = nn.Linear(4, 4, bias=False)
        self.frozen.weight.requires_grad_(False)


def grouped_names(model: nn.Module, **kwargs) -> dict[str, list[str]]:
    """Group name -> the names of its parameters."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in param_groups(model, **kwargs)}


def test_layer_and_group_norm_weights_are_exempt_from_weight_decay_like_batchnorm():
    assert grouped_names(Norms(), lr=0.1, lrp=0.1, no_decay_norm_bias=True) == {
        "backbone": ["backbone.0.weight"],
        "backbone_no_decay": ["backbone.1.weight", "backbone.1.bias"],
        "head": ["backbone_proj.weight", "head.0.weight"],
        "head_no_decay": ["head.1.weight", "head.1.bias"],
    }


def test_only_the_backbone_module_learns_at_lr_times_lrp_not_a_head_module_named_like_it_and_frozen_ones_not_at_all():
    assert grouped_names(Norms(), lr=0.1, lrp=0.1) == {
        "backbone": ["backbone.0.weight", "backbone.1.weight", "backbone.1.bias"],
        "head": ["backbone_proj.weight", "head.0.weight", "head.1.weight", "head.1.bias"],  # no frozen.weight
    }


def test_cosine_reaches_zero_at_the_last_epoch_and_stays_there_for_any_step_after_it():
    cfg = OptimConfig(schedule="cosine", warmup_epochs=1)
    assert lr_factor(10, cfg, 10, 5) == pytest.approx(1.0)
    assert lr_factor(30, cfg, 10, 5) == pytest.approx(0.5)  # half way through the 40 steps after warmup
    assert [lr_factor(step, cfg, 10, 5) for step in (50, 55, 70, 90)] == pytest.approx([0.0] * 4, abs=1e-12)


def test_fused_sgd_takes_the_foreach_steps_with_per_group_lrs_momentum_and_weight_decay():
    """The fused implementation (auto's pick on CUDA) is the same SGD: ML-GCN's two learning rates, momentum and
    weight decay give the same parameters after a few steps as torch's foreach one."""
    torch.manual_seed(0)
    models = {name: TwoPart() for name in ("fused", "foreach")}
    models["foreach"].load_state_dict(models["fused"].state_dict())
    grads = [[torch.randn_like(p) for p in models["fused"].parameters()] for _ in range(4)]
    for name, model in models.items():
        cfg = OptimConfig(lr=0.1, lrp=0.1, momentum=0.9, weight_decay=1e-4, implementation=name)
        opt = build_optimizer(model, cfg, cfg.lr)
        assert opt.defaults["fused"] is (True if name == "fused" else None)
        for step in grads:
            for p, g in zip(model.parameters(), step):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(models["fused"].parameters(), models["foreach"].parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("implementation", "device", "deepspeed", "fused"), [
    ("auto", "cuda", False, True),
    ("auto", "cuda", True, False),  # DeepSpeed steps its own flat partitions
    ("auto", "cpu", False, False),
    ("auto", "mps", False, False),
    ("fused", "cpu", False, True),
    ("foreach", "cuda", False, False),
])
def test_auto_picks_fused_sgd_on_cuda_without_deepspeed_and_an_explicit_choice_wins(implementation, device,
                                                                                    deepspeed, fused):
    assert fused_sgd(implementation, device, deepspeed) is fused


def test_build_optimizer_decides_fused_or_foreach_by_the_device_the_parameters_are_on(monkeypatch):
    """Checked without a GPU: the parameters are on the meta device, whose type reaches the decision."""
    import mlgcn_dist.optim as optim

    asked = []
    monkeypatch.setattr(optim, "fused_sgd", lambda *args: asked.append(args) or False)
    build_optimizer(nn.Linear(2, 2, device="meta"), OptimConfig(), 0.1, deepspeed=True, fp16=True)
    assert asked == [("auto", "meta", True, True)]


def test_fp16_steps_with_foreach_sgd_whose_skipped_steps_accelerate_can_see():
    """The fused step skips an overflowed fp16 step on the device, where Accelerate cannot see it: the LR schedule
    advanced on skipped steps (huggingface/accelerate#4242)."""
    assert fused_sgd("auto", "cuda", fp16=True) is False
    with pytest.raises(ConfigError, match=r"optim\.implementation=fused with train\.precision=fp16"):
        build_optimizer(nn.Linear(2, 2), load_config(None, ["optim.implementation=fused"]).optim, 0.1, fp16=True)


def test_an_unknown_optimizer_implementation_is_one_error_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"optim\.implementation.*auto.*fused.*foreach"):
        load_config(None, ["optim.implementation=apex"])


def test_fused_sgd_under_loss_scaling_unscaled_and_clipped_takes_the_same_steps():
    """fp16's path (auto picks fused on CUDA; the CPU's GradScaler drives the same code): the gradients unscaled for
    clipping, then the scaler's step, which a fused optimiser takes with the scale and the inf check itself."""

    def train(implementation: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = TwoPart()
        cfg = OptimConfig(lr=0.1, lrp=0.1, implementation=implementation)
        opt = build_optimizer(model, cfg, cfg.lr)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(3):
            loss = model.head(model.backbone(torch.randn(2, 3, 6, 6)).amax(dim=(2, 3))).square().mean()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return [p.detach() for p in model.parameters()]

    for fused, default in zip(train("fused"), train("foreach")):
        assert torch.allclose(fused, default, rtol=0, atol=1e-6)
