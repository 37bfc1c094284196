"""Specifications of ``mlgcn bench``: the report's fields, every derived number computed from measured ones.

Nothing here asserts a speed (CI machines are shared and noisy). The smoke run uses configs/toy.yaml, tiny.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mlgcn_dist.bench import (
    ORIGINAL_MLGCN,
    TRAIN_FLOPS_PER_FORWARD,
    TrainStep,
    forward_flops_per_image,
    make_toy_shards,
    peak_tflops,
    run_setting,
)
from mlgcn_dist.cli import main
from mlgcn_dist.config import load_config
from mlgcn_dist.data.loader import dataset_info
from mlgcn_dist.engine import build_model_for

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

PHASES = ("ceiling", "e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_inline", "ceiling_repeat", "reference")
PHASE_FIELDS = (
    "steps",
    "images",
    "seconds",
    "img_s",
    "step_ms",
    "data_wait_s",
    "data_wait_frac",
    "first_step_s",
    "final_loss",
    "nonfinite_steps",
    "peak_mem_bytes",
    "peak_mem_kind",
    "setting",
    "numerics",
    "peak_tflops",
    "achieved_tflops",
    "mfu",
)
STEPS, WARMUP = 2, 1


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`mlgcn bench train` on the toy config: a 32-image toy set at 64 px, batch 4, 2 timed steps a phase."""
    out = tmp_path_factory.mktemp("bench") / "train.json"
    argv = [
        "bench",
        "train",
        "--config",
        "configs/toy.yaml",
        "--steps",
        str(STEPS),
        "--warmup",
        str(WARMUP),
        "--toy-images",
        "32",
        "--toy-size",
        "64",
        "--json",
        str(out),
        "train.device=cpu",
        "data.batch_size=4",
    ]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_bench_train_report_has_every_phase_and_field(report):
    assert tuple(report["phases"]) == PHASES
    for name, phase in report["phases"].items():
        missing = [f for f in PHASE_FIELDS if f not in phase]
        assert not missing, f"phase {name} lacks {missing}"
        assert phase["steps"] == STEPS and phase["images"] == STEPS * report["batch_size"]
        assert math.isfinite(phase["final_loss"]) and phase["peak_mem_bytes"] > 0
    for key in ("device", "torch", "model", "flops", "compile_s", "ratios", "loader_cpu", "data", "notes"):
        assert key in report
    assert report["data"]["toy"] == {"images": 32, "size": 64} and report["data"]["mean_sample_bytes"] > 0
    assert report["loader_cpu"]["images_per_s_per_worker"] > 0


def test_bench_rates_and_ratios_are_computed_from_the_measured_numbers(report):
    phases = report["phases"]
    for phase in phases.values():
        assert phase["img_s"] == pytest.approx(phase["images"] / phase["seconds"])
        assert phase["step_ms"] == pytest.approx(1000 * phase["seconds"] / phase["steps"])
        assert phase["data_wait_frac"] == pytest.approx(phase["data_wait_s"] / phase["seconds"])
        assert 0.0 <= phase["data_wait_frac"] <= 1.0
        assert phase["achieved_tflops"] == pytest.approx(
            report["flops"]["train_per_image"] * phase["img_s"] / 1e12
        )
    expected = {
        f"{e2e}/{base}": phases[e2e]["img_s"] / phases[base]["img_s"]
        for e2e in ("e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_inline")
        for base in ("ceiling", "reference")
    }
    assert report["ratios"] == pytest.approx(expected)
    assert report["ceiling_drift"] == pytest.approx(phases["ceiling_repeat"]["img_s"] / phases["ceiling"]["img_s"])
    flops = report["flops"]
    assert flops["forward_per_image"] > 0
    assert flops["train_per_image"] == TRAIN_FLOPS_PER_FORWARD * flops["forward_per_image"]


def test_bench_on_cpu_reports_no_mfu_and_labels_the_device_decode_path(report):
    assert report["device"] == "cpu" and report["compile_s"] is None
    assert all(
        p["mfu"] is None and p["peak_mem_kind"] == "process_max_rss" for p in report["phases"].values()
    )
    phases = report["phases"]
    assert phases["e2e_decode_gpu"]["decode_on"] == phases["e2e_decode_gpu_inline"]["decode_on"]
    assert phases["e2e_decode_gpu"]["decode_on"] == "torchvision on cpu (no CUDA)"
    assert phases["e2e_decode_cpu"]["decode_on"] == "cpu workers (PIL)"


def test_bench_runs_the_device_conversion_ahead_except_in_the_inline_and_reference_phases(report):
    phases = report["phases"]
    assert phases["e2e_decode_cpu"]["device_prefetch"] == phases["e2e_decode_gpu"]["device_prefetch"] == 2
    assert phases["e2e_decode_gpu_inline"]["device_prefetch"] == phases["reference"]["device_prefetch"] == 0


def test_bench_reference_phase_runs_the_original_mlgcn_setting(report):
    reference = report["phases"]["reference"]
    assert reference["setting"] == {
        "precision": "fp32",
        "channels_last": False,
        "compile": False,
        "tf32": False,
        "cudnn_benchmark": True,
        "compile_mode": "default",
    }
    assert reference["decode_on"] == "cpu workers (PIL)"
    assert report["phases"]["ceiling"]["setting"]["precision"] == "fp32"  # toy.yaml's own setting


def test_peak_tflops_are_looked_up_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("cpu", "fp32") is None
    assert ORIGINAL_MLGCN.numerics == "fp32"


def test_forward_flops_count_two_per_multiply_add():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    assert forward_flops_per_image(model, 4, torch.device("cpu")) == 2 * 48 * 10


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True)])
def test_train_step_updates_the_backbone_and_head_groups(toy_root, precision, channels_last):
    cfg = load_config(
        "configs/toy.yaml",
        [f"data.root={toy_root}", f"train.precision={precision}", f"train.channels_last={channels_last}"],
    )
    info = dataset_info(cfg.data)
    step = TrainStep(build_model_for(cfg, info), cfg, run_setting(cfg), torch.device("cpu"))
    assert [g["name"] for g in step.optimizer.param_groups] == ["backbone", "head"]
    before = {name: p.detach().clone() for name, p in step.model.named_parameters()}
    images = torch.randn(4, 3, 64, 64)
    targets = (torch.rand(4, info.num_classes) < 0.3).to(torch.int8)
    loss = step(images, targets)
    assert torch.isfinite(loss)
    changed = {
        name.split(".")[0] for name, p in step.model.named_parameters() if not torch.equal(p, before[name])
    }
    assert changed == {"backbone", "head"}
    assert all(p.grad is None for p in step.model.parameters())


def test_bench_loader_command_writes_its_json(tmp_path: Path):
    shards = make_toy_shards(tmp_path, images=16, size=64, workers=1, seed=0)
    out = tmp_path / "loader.json"
    argv = [
        "bench",
        "loader",
        "--shards",
        str(shards),
        "--workers",
        "0",
        "--batches",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 * 4 and result["images_per_s"] > 0 and result["decode"] == "cpu"
