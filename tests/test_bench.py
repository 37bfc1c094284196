"""Specifications of ``mlgcn bench``: the report's fields, every derived number computed from measured ones.

Nothing here asserts a speed (CI machines are shared and noisy). The smoke run uses configs/toy.yaml, tiny.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import timed_worker_loader
from test_timing import FakeClock
from torch import nn

from mlgcn_dist.bench import phases, train, window
from mlgcn_dist.bench.phases import (
    ConversionClock,
    augment_in_loop_conversion,
    data_path_phase,
    loader_phase,
    timed_conversion,
)
from mlgcn_dist.bench.profiling import ProfileRequest, StepProfiler
from mlgcn_dist.bench.report import format_report, profile_lines
from mlgcn_dist.bench.step import (
    ORIGINAL_MLGCN,
    TRAIN_FLOPS_PER_FORWARD,
    Setting,
    TrainStep,
    cuda_numerics,
    forward_flops_per_image,
    peak_tflops,
    run_setting,
)
from mlgcn_dist.bench.train import (
    batches_per_phase,
    describe_shards,
    end_to_end_phases,
    make_toy_shards,
    select_phases,
    with_mfu,
)
from mlgcn_dist.bench.window import (
    DeviceMemory,
    LoaderQueue,
    peak_memory,
    taken_by_other_processes,
    time_training,
)
from mlgcn_dist.cli import main
from mlgcn_dist.config import load_config, set_key
from mlgcn_dist.data import loader as loader_module
from mlgcn_dist.data.loader import bench_loader, build_train_loader, dataset_info
from mlgcn_dist.data.prefetch import device_batches
from mlgcn_dist.engine import build_model_for

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

PHASES = ("ceiling", "e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_process", "e2e_decode_gpu_inline",
          "e2e_decode_gpu_augment_in_loop", "ceiling_repeat", "reference")
PHASE_FIELDS = (
    "steps",
    "images",
    "seconds",
    "queued_batches_dropped",
    "img_s",
    "step_ms",
    "data_wait_s",
    "data_wait_frac",
    "data_stall_s",
    "data_stall_frac",
    "first_step_s",
    "warmup_s",
    "first_loss",
    "final_loss",
    "nonfinite_steps",
    "first_nonfinite_step",
    "max_grad_norm",
    "nonfinite_grad_norms",
    "peak_mem_bytes",
    "peak_mem_reserved_bytes",
    "peak_mem_kind",
    "setting",
    "numerics",
    "train_stream",
    "peak_tflops",
    "achieved_tflops",
    "mfu",
    "profile",
)
STEPS, WARMUP, PROFILED = 2, 1, 1


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, print_after_run) -> dict:
    """`mlgcn bench train` on the toy config: a 32-image toy set at 64 px, batch 4, 2 timed steps a phase and 1
    profiled. Its table is printed after the test run, so the CPU figures (loader img/s per worker, toy step time)
    show in CI logs, where a regression can be seen."""
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
        "--profile-dir",
        str(out.parent / "profiles"),
        "--profile-steps",
        str(PROFILED),
        "train.device=cpu",
        "data.batch_size=4",
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    print_after_run("mlgcn bench train on the toy config (CPU figures, not asserted)", format_report(result))
    return result


def test_bench_train_report_has_every_phase_and_field(report):
    assert tuple(report["phases"]) == PHASES
    for name, phase in report["phases"].items():
        missing = [f for f in PHASE_FIELDS if f not in phase]
        assert not missing, f"phase {name} lacks {missing}"
        assert phase["steps"] == STEPS and phase["images"] == STEPS * report["batch_size"]
        assert math.isfinite(phase["final_loss"]) and phase["peak_mem_bytes"] > 0
    for key in ("device", "torch", "model", "flops", "compile_s", "ratios", "loader_cpu", "data_gpu", "data"):
        assert key in report
    assert report["data"]["toy"] == {"images": 32, "size": 64} and report["data"]["mean_sample_bytes"] > 0
    assert report["loader_cpu"]["images_per_s_per_worker"] > 0
    frees = [report["loader_cpu"][key] for key in ("free_ms", "release_ms", "free_after_release_ms")]
    assert report["loader_cpu"]["workers"] > 0 and all(ms is not None and ms >= 0 for ms in frees)  # shared memory


def test_bench_profiles_steps_after_each_training_phases_timed_ones_and_keeps_a_trace_each(report):
    for name, phase in report["phases"].items():
        profile = phase["profile"]
        assert profile["steps"] == PROFILED and Path(profile["trace"]).name == f"{name}.json.gz"
        assert Path(profile["trace"]).stat().st_size > 0
        assert profile["device"] is None  # on CPU; on CUDA the device timeline (tests/test_profiling.py)
    assert "profiled: 1 steps after each phase's timed ones" in format_report(report)


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_bench_train_refuses_a_profile_dir_that_cannot_be_a_directory_before_any_work(where, tmp_path, capsys):
    """Under a file, it failed only after the first phase's timed steps, losing the measured phases."""
    taken = tmp_path / "profiles"
    taken.write_text("not a directory")
    profile_dir = taken if where == "a_file" else taken / "traces"
    assert main(["bench", "train", "--config", "configs/toy.yaml", "--profile-dir", str(profile_dir)]) == 2
    assert f"--profile-dir {profile_dir}: cannot be a directory (" in capsys.readouterr().err


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
        for e2e in ("e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_process", "e2e_decode_gpu_inline",
                    "e2e_decode_gpu_augment_in_loop")
        for base in ("ceiling", "reference")
    }
    assert report["ratios"] == pytest.approx(expected)
    assert report["ceiling_drift"] == pytest.approx(phases["ceiling_repeat"]["img_s"] / phases["ceiling"]["img_s"])
    flops = report["flops"]
    assert flops["forward_per_image"] > 0
    assert flops["train_per_image"] == TRAIN_FLOPS_PER_FORWARD * flops["forward_per_image"]


def test_bench_on_cpu_reports_no_mfu_and_labels_the_device_decode_path(report):
    assert report["device"] == "cpu" and report["compile_s"] is None
    # No CUDA stream to choose: every phase on the default one, and no side-stream phase (PHASES).
    assert all(p["train_stream"] == "default" for p in report["phases"].values())
    assert all(
        p["mfu"] is None and p["peak_mem_kind"] == "process_max_rss" and p["data_stall_frac"] is None
        for p in report["phases"].values()
    )
    phases = report["phases"]
    assert phases["e2e_decode_gpu"]["decode_on"] == phases["e2e_decode_gpu_inline"]["decode_on"]
    assert phases["e2e_decode_gpu"]["decode_on"] == "torchvision on cpu (no CUDA)"
    assert phases["e2e_decode_cpu"]["decode_on"] == "cpu workers (PIL)"
    assert phases["e2e_decode_gpu_augment_in_loop"]["decode_on"] == (
        "torchvision on cpu (no CUDA), augment launched by the loop"
    )
    assert phases["e2e_decode_gpu_process"]["decode_on"] == (
        "torchvision on cpu (no CUDA), decode and augment in a process of their own"
    )
    assert phases["e2e_decode_gpu_process"]["augment_process_device_bytes"] is None  # no device memory to read
    assert "augment process held" not in format_report(report)


def test_the_memory_other_processes_took_is_the_devices_growth_beyond_this_processs_allocator_reserve():
    gib = 2**30
    before = DeviceMemory(used=10 * gib, reserved=8 * gib)
    assert taken_by_other_processes(before, DeviceMemory(used=12 * gib, reserved=9 * gib)) == 1 * gib
    # This process's allocator gave 3 GiB of cache back meanwhile (the bench empties it as each phase starts).
    assert taken_by_other_processes(before, DeviceMemory(used=8 * gib, reserved=5 * gib)) == 1 * gib
    assert taken_by_other_processes(None, None) is None


def test_bench_runs_the_device_conversion_ahead_except_in_the_inline_and_reference_phases(report):
    phases = report["phases"]
    assert phases["e2e_decode_cpu"]["device_prefetch"] == phases["e2e_decode_gpu"]["device_prefetch"] == 2
    assert phases["e2e_decode_gpu_augment_in_loop"]["device_prefetch"] == 2
    assert phases["e2e_decode_gpu_process"]["device_prefetch"] == 2
    assert phases["e2e_decode_gpu_inline"]["device_prefetch"] == phases["reference"]["device_prefetch"] == 0


def test_bench_times_the_device_conversion_per_batch_and_splits_the_gpu_path(report):
    phases = report["phases"]
    for name in ("e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_inline", "reference"):
        phase = phases[name]
        assert phase["convert_ms"] > 0
        assert phase["convert_busy"] == pytest.approx(phase["convert_ms"] / phase["step_ms"])
    for name in ("e2e_decode_gpu", "e2e_decode_gpu_inline"):
        phase = phases[name]
        assert 0 < phase["decode_ms"] < phase["convert_ms"] and 0 < phase["augment_ms"] < phase["convert_ms"]
    assert phases["e2e_decode_cpu"]["decode_ms"] is None and phases["e2e_decode_cpu"]["augment_ms"] is None
    # Augment launched by the loop: the helper's conversion is the decode alone.
    in_loop = phases["e2e_decode_gpu_augment_in_loop"]
    assert 0 < in_loop["decode_ms"] <= in_loop["convert_ms"] and in_loop["augment_ms"] > 0
    # In a process of their own: the helper's whole wait, and the child's parts (within the wait).
    in_process = phases["e2e_decode_gpu_process"]
    assert 0 < in_process["decode_ms"] < in_process["convert_ms"]
    assert 0 < in_process["augment_ms"] < in_process["convert_ms"]


def test_augmenting_in_the_loop_gives_the_images_and_targets_of_the_engines_conversion(toy_root):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0", "data.batch_size=4"])
    loader = build_train_loader(cfg.data, rank=0, world_size=1, epoch=0, seed=0, decode="gpu")
    batches = list(itertools.islice(loader, 3))
    cpu = torch.device("cpu")
    convert, _ = timed_conversion(cfg, "gpu", cpu, channels_last=True)
    decode, to_inputs, _ = augment_in_loop_conversion(cfg, cpu, channels_last=True)
    for batch in batches:
        images, targets, _ = convert(dict(batch))
        split_images, split_targets = to_inputs((batch, decode(batch)))
        assert torch.equal(split_images, images) and torch.equal(split_targets, targets)
        assert split_images.is_contiguous(memory_format=torch.channels_last)


def test_the_ceiling_compares_its_first_loss_with_the_uncompiled_models(report):
    """Uncompiled on both sides here (toy.yaml): the probe and the first step see the same weights and batch."""
    for name in ("ceiling", "ceiling_repeat"):
        phase = report["phases"][name]
        assert phase["eager_first_loss"] == pytest.approx(phase["first_loss"], rel=1e-5)


def test_bench_measures_the_gpu_data_path_alone(report):
    data = report["data_gpu"]
    assert data["batches"] == STEPS and data["images"] == STEPS * report["batch_size"]
    assert data["img_s"] == pytest.approx(data["images"] / data["seconds"])
    assert data["decode_on"] == "torchvision on cpu (no CUDA)" and data["device_prefetch"] == 2
    assert data["decode_ms"] > 0 and data["augment_ms"] > 0


def test_every_phase_of_one_model_starts_from_the_same_weights(report):
    """Decoding ahead and inline feed the same batches (one seed); from the same weights, the same gradients."""
    phases = report["phases"]
    for same_batches in ("e2e_decode_gpu_inline", "e2e_decode_gpu_process"):
        assert phases["e2e_decode_gpu"]["max_grad_norm"] == pytest.approx(phases[same_batches]["max_grad_norm"])
    assert all(p["first_nonfinite_step"] is None for p in phases.values())


class _DivergingStep:
    """A stand-in TrainStep whose loss is NaN at the calls in ``nan_calls`` (by default from its fourth on), and
    whose gradient norm is NaN there and the call's number elsewhere."""

    device = torch.device("cpu")
    setting = ORIGINAL_MLGCN

    def __init__(self, nan_calls: range = range(4, 2**31)) -> None:
        self.calls, self.restarts, self.grad_norm = 0, 0, None
        self.nan_calls = nan_calls

    def restart(self) -> None:
        self.restarts += 1

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        diverged = self.calls in self.nan_calls
        self.grad_norm = torch.tensor(float("nan") if diverged else float(self.calls))
        return torch.tensor(float("nan") if diverged else 1.0)


def test_time_training_reports_the_first_non_finite_step_and_the_largest_finite_gradient_norm():
    step = _DivergingStep()
    batch = (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1))
    result = time_training(step, itertools.repeat(batch), lambda b: b, steps=4, warmup=2)
    assert step.restarts == 1 and step.calls == 6
    assert result["first_nonfinite_step"] == 4  # 1-based, warm-up steps counted
    assert result["nonfinite_steps"] == 3  # timed steps 3..6
    assert result["max_grad_norm"] == 3.0 and result["nonfinite_grad_norms"] == 3  # NaN norms counted apart


def test_profiled_steps_come_after_the_timed_ones_and_count_for_divergence_but_not_for_the_timing(tmp_path):
    step = _DivergingStep()  # losses turn NaN from the 4th call: here the first profiled step
    batch = (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1))
    request = ProfileRequest(tmp_path / "steps.json.gz", steps=2)
    result = time_training(step, itertools.repeat(batch), lambda b: b, steps=2, warmup=1, profile=request)
    assert step.calls == 1 + 2 + 2
    assert result["steps"] == 2 and result["images"] == 4 and result["nonfinite_steps"] == 0  # the timed window
    assert result["first_nonfinite_step"] == 4 and result["max_grad_norm"] == 3.0
    assert result["profile"]["steps"] == 2 and request.trace.exists()


def test_a_failing_profile_is_reported_with_its_error_and_keeps_the_phases_timings(tmp_path, monkeypatch):
    def broken_profiler(run, request, device):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore detail")

    monkeypatch.setattr(window, "profile_steps", broken_profiler)
    step = _DivergingStep()
    step.calls = -100
    batch = (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1))
    request = ProfileRequest(tmp_path / "steps.json.gz", steps=2)
    result = time_training(step, itertools.repeat(batch), lambda b: b, steps=2, warmup=1, profile=request)
    assert result["profile"] == {"trace": None, "steps": 2, "device": None, "host": None,
                                 "error": "CUPTI_ERROR_NOT_INITIALIZED"}
    assert result["steps"] == 2 and result["img_s"] > 0
    report_lines = profile_lines({"ceiling": result})
    assert report_lines[-1].split() == ["ceiling", "profiling", "failed:", "CUPTI_ERROR_NOT_INITIALIZED"]


def test_time_training_reports_no_divergence_for_finite_losses():
    step = _DivergingStep()
    step.calls = -100  # stays finite for the whole phase
    result = time_training(step, itertools.repeat((torch.zeros(1), None)), lambda b: b, steps=3, warmup=1)
    assert result["first_nonfinite_step"] is None and result["nonfinite_steps"] == 0


class _StepThatCompilesFirst:
    """A stand-in TrainStep that takes ``compile_s`` at its first call and ``step_s`` at each one after it."""

    device = torch.device("cpu")
    setting = ORIGINAL_MLGCN
    grad_norm = None

    def __init__(self, compile_s: float, step_s: float = 0.0) -> None:
        self.compile_s, self.step_s, self.calls = compile_s, step_s, 0

    def restart(self) -> None:
        pass

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.compile_s if self.calls == 1 else self.step_s)
        return torch.tensor(1.0)


@pytest.mark.parametrize("depth", [0, 2])
def test_a_loader_slower_than_the_model_is_timed_at_its_steady_rate_not_on_the_queue_it_filled_during_warmup(depth):
    # 2 workers making a batch of 4 in 0.2 s: 40 images/s. While the first step compiles (1 s) the loader's queue
    # fills (2 workers x prefetch 4: more than the untimed steps after the warm-up take); timed from there, the 4
    # steps would take their batches from it.
    loader = timed_worker_loader(workers=2, batches=40, batch_size=4, seconds=0.2, prefetch_factor=4)
    queue = LoaderQueue(loader, workers=2, prefetch_factor=4)
    with device_batches(queue, lambda batch: (batch["image"], batch["target"]), torch.device("cpu"), depth) as pairs:
        result = time_training(_StepThatCompilesFirst(compile_s=1.0), pairs, lambda pair: pair[1], steps=4,
                               warmup=2, queue=queue, depth=depth)
    assert result["queued_batches_dropped"] == 8
    assert 0.8 * 40 <= result["img_s"] <= 1.1 * 40


def _unconverted(*_) -> tuple:
    """A stand-in for ``timed_conversion``: the batch's own tensors, untimed."""
    return lambda batch: (batch["image"], batch["target"], batch["image_id"]), ConversionClock()


def _counting_loader(pulled: list[int]):
    """A stand-in for ``build_train_loader``: ``data.steps_per_epoch`` batches of 2, each pull's index appended to
    ``pulled``."""

    def loader(data_cfg, **_):
        for index in range(data_cfg.steps_per_epoch):
            pulled.append(index)
            yield {"image": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "target": torch.zeros(2, 12),
                   "image_id": torch.arange(2), "n_bad": 0}

    return loader


@pytest.mark.parametrize(("warmup", "batches"), [(1, 4), (2, 4), (3, 3)])
def test_the_data_path_alone_is_timed_at_the_loaders_steady_rate_wherever_its_window_starts(monkeypatch, toy_root,
                                                                                            warmup, batches):
    """3 workers making a batch of 4 in 0.2 s: 60 images/s. A window of 4 batches that starts mid-round read 0.7x
    to 1.3x of it."""
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "data.workers=3", "data.prefetch_factor=2"])
    monkeypatch.setattr(phases, "build_train_loader",
                        lambda data_cfg, **_: timed_worker_loader(workers=3, batches=60, batch_size=4, seconds=0.2))
    monkeypatch.setattr(phases, "timed_conversion", _unconverted)
    result = data_path_phase(cfg, torch.device("cpu"), "cpu", batches, warmup)
    assert result["batches"] == -(-batches // 3) * 3 and result["queued_batches_dropped"] == 6  # 3 x prefetch 2
    assert 0.85 * 60 <= result["img_s"] <= 1.1 * 60


@pytest.mark.parametrize("profiled", [0, 4])
def test_a_phases_loader_epoch_outlasts_the_phase_by_a_round_of_the_workers(monkeypatch, toy_root, tmp_path, profiled):
    """The timed and profiled steps never see the end of the loader's epoch, where workers that finished their
    share stop."""
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "data.workers=3", "data.batch_size=2"])
    steps, warmup = 5, 2
    set_key(cfg, "data.steps_per_epoch", batches_per_phase(cfg, steps, warmup, profiled), "test")
    pulled = []
    monkeypatch.setattr(phases, "build_train_loader", _counting_loader(pulled))
    profile = ProfileRequest(tmp_path / "phase.json.gz", profiled) if profiled else None
    result = loader_phase(_StepThatCompilesFirst(compile_s=0.0), cfg, "cpu", steps, warmup, profile=profile)
    assert result["steps"] == 6 and result["queued_batches_dropped"] == 6  # whole rounds; 3 workers x prefetch 2
    assert len(pulled) <= cfg.data.steps_per_epoch - 3


def test_train_step_restart_restores_the_initial_weights_and_optimiser_state(toy_root):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}"])
    info = dataset_info(cfg.data)
    step = TrainStep(build_model_for(cfg, info), cfg, run_setting(cfg, "cpu"), torch.device("cpu"))
    initial = {k: v.clone() for k, v in step.model.state_dict().items()}
    images = torch.randn(4, 3, 64, 64)
    targets = (torch.rand(4, info.num_classes) < 0.3).to(torch.int8)
    first = step(images, targets)
    step(images, targets)
    assert step.optimizer.state  # momentum buffers exist
    step.restart()
    assert not step.optimizer.state and step.grad_norm is None
    for key, value in step.model.state_dict().items():
        assert torch.equal(value, initial[key]), key
    assert torch.equal(step(images, targets), first)


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
    assert report["phases"]["ceiling"]["setting"]["precision"] == "fp32"  # toy.yaml's auto, on the CPU


@pytest.mark.parametrize("platform, unit", [("linux", 1024), ("darwin", 1)])
def test_the_cpu_peak_memory_is_in_bytes_whatever_unit_the_platform_gives_ru_maxrss_in(platform, unit, monkeypatch):
    import resource
    import sys

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: type("Usage", (), {"ru_maxrss": 5000})())
    assert peak_memory(torch.device("cpu"))["peak_mem_bytes"] == 5000 * unit


def test_peak_tflops_are_looked_up_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("cpu", "fp32") is None
    assert ORIGINAL_MLGCN.numerics == "fp32"


def test_tf32_is_reported_only_where_it_exists_on_cuda(toy_root):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "train.precision=fp32"])
    assert run_setting(cfg, "cpu").numerics == "fp32"
    assert run_setting(cfg, "cuda").numerics == "tf32"


def test_forward_flops_count_two_per_multiply_add():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    assert forward_flops_per_image(model, 4, torch.device("cpu")) == 2 * 48 * 10


def test_forward_flops_per_image_share_the_gcn_classifiers_computed_once_per_batch(toy_root):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}"])
    model, cpu = build_model_for(cfg, dataset_info(cfg.data)), torch.device("cpu")
    head = model.head
    embeddings, hidden, features = head.embeddings.shape[1], head.gc1.weight.shape[1], head.gc2.weight.shape[1]
    labels = head.adj.shape[0]
    # Two graph convolutions (x @ W, then adj @ that) per batch, whatever its size.
    gcn = 2 * labels * (embeddings * hidden + labels * hidden + hidden * features + labels * features)
    per_image_at_1 = forward_flops_per_image(model, 32, cpu, batch_size=1)
    assert per_image_at_1 - forward_flops_per_image(model, 32, cpu, batch_size=8) == pytest.approx(gcn * 7 / 8)


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True)])
def test_train_step_updates_the_backbone_and_head_groups(toy_root, precision, channels_last):
    cfg = load_config(
        "configs/toy.yaml",
        [f"data.root={toy_root}", f"train.precision={precision}", f"train.channels_last={channels_last}"],
    )
    info = dataset_info(cfg.data)
    step = TrainStep(build_model_for(cfg, info), cfg, run_setting(cfg, "cpu"), torch.device("cpu"))
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
    out = tmp_path / "not" / "made" / "loader.json"  # its folders are made
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
    assert result["process_cpu_ms_per_batch"] > 0  # without workers: the loading itself, in this process
    assert result["free_ms"] is result["release_ms"] is result["free_after_release_ms"] is None  # no shared memory


@pytest.mark.parametrize("batches", [1, 2, 3, 5])
def test_bench_loader_without_workers_times_the_reading_of_every_image_it_counts(tmp_path, monkeypatch, clock,
                                                                                 batches):
    """Reading a sample is all that takes time here (1 ms): the steady rate is 1,000 images/s whatever the window.
    16 images in batches of 4: a shuffle buffer holding the whole pass read it during the untimed first batch, and
    the next 3 batches came with no read at all (--batches 2: 0 s timed, reported as 0 images/s; a refill in the
    window: 4 passes' worth of reads for 1 of images)."""
    shards = make_toy_shards(tmp_path, images=16, size=32, workers=1, seed=0)
    read_shard = loader_module._read_shard

    def slow_read(*args, **kwargs):
        for sample in read_shard(*args, **kwargs):
            time.sleep(0.001)
            yield sample

    monkeypatch.setattr(loader_module, "_read_shard", slow_read)
    result = bench_loader(shards, "gpu", workers=0, batches=batches, batch_size=4, image_size=32)
    assert (result["images"], result["images_per_s"]) == (4 * batches, 1000.0)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """time.perf_counter moved by time.sleep alone: a stand-in step or loader takes exactly the seconds it sleeps."""
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(time, "sleep", lambda seconds: setattr(clock, "now", clock.now + seconds))
    return clock


def _batches_every(seconds: float, images: int = 2):
    """Batches of ``images`` that each keep the loop waiting ``seconds``."""
    while True:
        time.sleep(seconds)
        yield torch.zeros(images, 3, 4, 4), torch.zeros(images, 1)


def test_the_timed_window_excludes_the_warmup_and_its_rates_come_from_its_own_seconds(clock):
    # First step 10 s (compiling), then 0.75 s a step; each batch keeps the loop waiting 0.25 s.
    step = _StepThatCompilesFirst(compile_s=10.0, step_s=0.75)
    result = time_training(step, _batches_every(0.25), lambda b: b, steps=4, warmup=3)
    assert result["first_step_s"] == pytest.approx(10.25)
    assert result["warmup_s"] == pytest.approx(10.25 + 2 * 1.0)
    assert result["seconds"] == pytest.approx(4.0) and result["images"] == 8
    assert result["img_s"] == pytest.approx(2.0) and result["step_ms"] == pytest.approx(1000.0)
    assert result["data_wait_s"] == pytest.approx(1.0) and result["data_wait_frac"] == pytest.approx(0.25)


class _StallEveryWait:
    """A DataStall (its CUDA clock faked) whose training stream sits idle 0.1 s at every wait for a batch."""

    def __init__(self, device: torch.device) -> None:
        self.stalled = 0.0

    def waiting(self) -> None:
        pass

    def got_batch(self) -> None:
        self.stalled += 0.1

    def read(self) -> float:
        stalled, self.stalled = self.stalled, 0.0
        return stalled


def test_the_windows_data_stall_leaves_out_the_warmups_and_is_a_share_of_the_windows_seconds(clock, monkeypatch):
    monkeypatch.setattr(window, "DataStall", _StallEveryWait)
    step = _StepThatCompilesFirst(compile_s=10.0, step_s=0.75)
    result = time_training(step, _batches_every(0.25), lambda b: b, steps=4, warmup=3)
    assert result["data_stall_s"] == pytest.approx(0.4)  # the 4 timed waits, not the 3 warm-up ones
    assert result["data_stall_frac"] == pytest.approx(0.4 / 4.0)


def test_a_loss_that_is_finite_again_after_a_non_finite_one_keeps_the_first_non_finite_step():
    step = _DivergingStep(nan_calls=range(3, 4))  # NaN at the third call alone
    batch = (torch.zeros(2, 3, 4, 4), torch.zeros(2, 1))
    result = time_training(step, itertools.repeat(batch), lambda b: b, steps=3, warmup=2)
    assert result["first_nonfinite_step"] == 3 and result["nonfinite_steps"] == 1
    assert result["max_grad_norm"] == 5.0 and result["nonfinite_grad_norms"] == 1


@pytest.mark.parametrize(("workers", "depth", "untimed"), [(0, 2, 0), (2, 0, 1 + 2), (2, 2, 2 + 1 + 2)])
def test_after_the_warmup_the_workers_queue_is_dropped_then_the_converted_batches_and_a_round_stay_untimed(
    workers, depth, untimed
):
    """Without workers nothing is queued: nothing dropped, no untimed steps added. With them, the ``depth``
    batches converted before the drop, a spare and a round of the workers run untimed before the window."""
    pulled = []
    queue = LoaderQueue(_counting_loader(pulled)(SimpleNamespace(steps_per_epoch=100)), workers, prefetch_factor=3)
    step = _StepThatCompilesFirst(compile_s=0.0)
    result = time_training(step, queue, lambda batch: (batch["image"], batch["target"]), steps=4, warmup=2,
                           queue=queue, depth=depth)
    assert step.calls == 2 + untimed + 4
    assert result["queued_batches_dropped"] == 3 * workers and len(pulled) == step.calls + 3 * workers


def test_mfu_is_the_training_flop_rate_over_the_devices_peak_for_the_phases_numerics():
    h100 = "NVIDIA H100 80GB HBM3"
    bf16 = with_mfu({"numerics": "bf16", "img_s": 500.0}, 2e11, h100)  # 1e14 FLOP/s
    assert bf16["achieved_tflops"] == pytest.approx(100.0) and bf16["peak_tflops"] == 989.4
    assert bf16["mfu"] == pytest.approx(100.0 / 989.4)
    assert with_mfu({"numerics": "fp32", "img_s": 500.0}, 2e11, h100)["mfu"] == pytest.approx(100.0 / 66.9)
    on_cpu = with_mfu({"numerics": "fp32", "img_s": 500.0}, 2e11, "cpu")
    assert on_cpu["peak_tflops"] is None and on_cpu["mfu"] is None and on_cpu["achieved_tflops"] == pytest.approx(100)


def test_bench_train_derives_compile_time_training_flops_ratios_and_drift_from_its_phases(monkeypatch, toy_root):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "train.compile=true", "data.workers=3"])

    def phase(img_s: float, **fields: object) -> dict:
        return {"img_s": img_s, "numerics": "fp32", "first_step_s": 30.0, "warmup_s": 42.0, **fields}

    measured = {"ceiling": phase(400.0), "e2e_decode_cpu": phase(100.0), "ceiling_repeat": phase(380.0)}
    loaders = []
    monkeypatch.setattr(train, "_configured_phases", lambda *_: (dict(measured), {}, 2e9))
    monkeypatch.setattr(train, "data_path_phase", lambda *_: {"img_s": 1.0})
    monkeypatch.setattr(train, "_reference_phase", lambda *_: phase(50.0))
    monkeypatch.setattr(train, "bench_loader", lambda shards, decode, **kw: loaders.append((decode, kw)) or {})
    report = train.bench_train(cfg, steps=5, warmup=3)
    assert report["compile_s"] == 30.0  # the ceiling's first step, not its whole warm-up
    assert report["flops"] == {"forward_per_image": 2e9, "train_per_image": 6e9}  # 3x the forward
    assert report["phases"]["e2e_decode_cpu"]["achieved_tflops"] == pytest.approx(6e9 * 100.0 / 1e12)
    assert report["ratios"] == pytest.approx({"e2e_decode_cpu/ceiling": 0.25, "e2e_decode_cpu/reference": 2.0})
    assert report["ceiling_drift"] == pytest.approx(380.0 / 400.0)
    assert loaders == [("cpu", {"workers": 3, "batches": 3 + 5, "batch_size": 16, "image_size": 64})]


@pytest.mark.parametrize(("prefetch", "ahead"), [(0, False), (2, True)])
def test_the_inline_and_in_loop_phases_run_only_where_the_device_conversion_runs_ahead(monkeypatch, toy_root,
                                                                                     prefetch, ahead):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", f"data.device_prefetch={prefetch}"])
    fed, flops_batches = {}, []

    def loader_phase(step, cfg, decode, steps, warmup, depth=None, profile=None, **options):
        fed[profile.trace.name] = (decode, depth, options.get("augment_in_loop", False),
                                   options.get("augment_process", False))
        return {}

    monkeypatch.setattr(train, "loader_phase", loader_phase)
    monkeypatch.setattr(train, "synthetic_phase", lambda *_: {})
    monkeypatch.setattr(train, "_progress", lambda name, result: result)
    monkeypatch.setattr(train, "forward_flops_per_image",
                        lambda model, size, device, batch_size=1: flops_batches.append(batch_size) or 1.0)
    profiler = StepProfiler(Path("profiles"), steps=1)
    cpu = torch.device("cpu")
    names, failed, _ = train._configured_phases(cfg, dataset_info(cfg.data), cpu, 2, 1, profiler,
                                                end_to_end_phases(cfg, cpu))
    expected = {"e2e_decode_cpu.json.gz": ("cpu", None, False, False),
                "e2e_decode_gpu.json.gz": ("gpu", None, False, False),
                "e2e_decode_gpu_process.json.gz": ("gpu", None, False, True)}
    if ahead:
        expected |= {"e2e_decode_gpu_inline.json.gz": ("gpu", 0, False, False),
                     "e2e_decode_gpu_augment_in_loop.json.gz": ("gpu", None, True, False)}
    assert fed == expected and failed == {}
    assert list(names) == ["ceiling", *(name.removesuffix(".json.gz") for name in expected), "ceiling_repeat"]
    assert flops_batches == [16]  # the GCN head's per-batch FLOPs shared by the configured batch


def test_the_conversion_clock_reports_the_median_milliseconds_a_batch_of_each_part(clock):
    conversion = ConversionClock()
    for seconds in (0.001, 0.1, 0.002):  # one slow conversion (start-up) moves a mean, not the median
        conversion.timed("convert", time.sleep, seconds)
    conversion.timed("decode", time.sleep, 0.004)
    assert conversion.per_batch_ms() == pytest.approx({"convert_ms": 2.0, "decode_ms": 4.0, "augment_ms": None})


def test_the_data_path_alone_takes_its_warmup_the_dropped_queue_and_a_round_before_whole_rounds(monkeypatch,
                                                                                               toy_root):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "data.workers=3", "data.prefetch_factor=2",
                                           "data.device_prefetch=0", "data.steps_per_epoch=100"])
    pulled = []
    monkeypatch.setattr(phases, "build_train_loader", _counting_loader(pulled))
    monkeypatch.setattr(phases, "timed_conversion", _unconverted)
    result = data_path_phase(cfg, torch.device("cpu"), "cpu", batches=4, warmup=2)
    assert result["batches"] == 6 and result["images"] == 12 and result["queued_batches_dropped"] == 6
    assert len(pulled) == 2 + 6 + (0 + 1 + 3) + 6  # warm-up, dropped, untimed after the drop, timed


def _phase_row(**fields: object) -> dict:
    """A phase as format_report reads it: every number distinct, overridden by ``fields``."""
    return {
        "img_s": 123.45, "step_ms": 32.4, "data_wait_frac": 0.25, "data_stall_frac": None,
        "peak_mem_bytes": 3 * 2**30, "mfu": None, "first_nonfinite_step": None, "max_grad_norm": None,
        "nonfinite_grad_norms": 0, "train_stream": "default", "first_loss": 2.5, "eager_first_loss": 2.5,
        "warmup_s": 42.0, "profile": None,
        "setting": {"precision": "bf16", "channels_last": True, "compile": True, "compile_mode": "reduce-overhead"},
        **fields,
    }


def _bench_report(**phases: dict) -> dict:
    return {
        "device": "NVIDIA H100 80GB HBM3", "model": {"backbone": "resnet101", "head": "gcn"}, "image_size": 448,
        "batch_size": 64, "steps": 50, "warmup": 10, "workers": 15, "compile_s": 61.0, "ceiling_drift": 0.987,
        "phases": {"ceiling": _phase_row(mfu=0.4), **phases},
        "ratios": {"e2e_decode_gpu/ceiling": 0.875, "e2e_decode_gpu/reference": 3.5}, "failed_phases": {},
        "flops": {"forward_per_image": 31.4e9, "train_per_image": 94.2e9},
        "loader_cpu": {"workers": 15, "images_per_s": 900.0, "images_per_s_per_worker": 60.0},
        "data_gpu": {"decode_on": "cuda (nvJPEG)", "device_prefetch": 2, "img_s": 3000.0, "decode_ms": 7.0,
                     "augment_ms": 1.5},
    }


def test_the_report_table_shows_each_phases_numbers_in_their_columns():
    e2e = _phase_row(data_stall_frac=0.125, mfu=0.35, train_stream="side", device_prefetch=2,
                     decode_on="cuda (nvJPEG)", convert_ms=8.1, decode_ms=6.0, augment_ms=2.0, convert_busy=0.25)
    lines = format_report(_bench_report(e2e_decode_gpu=e2e)).splitlines()
    assert lines[0].startswith("bench train on NVIDIA H100 80GB HBM3: resnet101+gcn @448, batch 64, bf16, "
                               "channels_last, compile (reduce-overhead); 50 timed steps after 10 warmup")
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert rows["ceiling"] == ["ceiling", "123.5", "32.4", "25.0%", "n/a", "3.00", "GiB", "40.0%", "synthetic", "on",
                               "device"]
    assert rows["e2e_decode_gpu"] == ["e2e_decode_gpu", "123.5", "32.4", "25.0%", "12.5%", "3.00", "GiB", "35.0%",
                                      "0.88x", "3.50x", "cuda", "(nvJPEG),", "2", "batches", "ahead,", "steps", "on",
                                      "a", "side", "stream"]
    assert ("e2e_decode_gpu: conversion 8.1 ms a batch on the host (25% of the step); decode 6.0 ms, augment 2.0 ms"
            in lines)
    assert "compile: first step took 61.0 s, the ceiling's whole warm-up 42.0 s (excluded from the timings)" in lines
    assert lines[-1] == ("data path alone (cuda (nvJPEG), 2 batches ahead, no training): 3000.0 img/s; a batch: "
                         "decode 7.0 ms, augment 1.5 ms")


def test_the_report_gives_what_freeing_a_batch_from_the_workers_costs_where_the_loader_measured_it():
    report = _bench_report()
    report["loader_cpu"].update(free_ms=4.25, release_ms=4.5, free_after_release_ms=0.05)
    assert ("loader alone (cpu decode, 15 workers): 900.0 img/s, 60.0 img/s per worker; a batch's shared memory "
            "freed in 4.25 ms holding the GIL, or released in 4.50 ms without it, then freed in 0.05"
            in format_report(report).splitlines())


def test_the_report_says_the_decode_and_augment_times_of_the_process_phase_are_the_augment_process_s():
    in_process = _phase_row(decode_on="cuda (nvJPEG), decode and augment in a process of their own",
                            convert_ms=9.0, decode_ms=6.5, augment_ms=1.8, convert_busy=0.3, augment_process=True)
    lines = format_report(_bench_report(e2e_decode_gpu_process=in_process)).splitlines()
    assert ("e2e_decode_gpu_process: conversion 9.0 ms a batch on the host (30% of the step); decode 6.5 ms, "
            "augment 1.8 ms in the augment process") in lines


@pytest.mark.parametrize("drift, warned", [(0.987, False), (1.2, False), (1 / 1.2, False), (1.3, True),
                                           (1 / 6.9, True)])
def test_the_report_warns_that_its_ratios_are_not_to_be_trusted_when_its_two_ceilings_differ_widely(drift, warned):
    """Seen under load on 2 cores: the first ceiling at a seventh of its repeat, end to end printed at 3.6x it."""
    report = _bench_report()
    report["ceiling_drift"] = drift
    warning = [line for line in format_report(report).splitlines() if line.startswith("warning: the two ceilings")]
    assert bool(warning) is warned
    if drift == 1 / 6.9:
        assert warning[0].startswith("warning: the two ceilings differ by 6.9x: the machine was busy or throttled")


def test_the_report_names_the_phases_that_diverged_and_their_largest_gradient_norms():
    report = _bench_report(e2e_decode_gpu=_phase_row(first_nonfinite_step=7, max_grad_norm=12.5,
                                                     nonfinite_grad_norms=3))
    report["phases"]["ceiling"]["max_grad_norm"] = 2.0
    lines = format_report(report).splitlines()
    assert ("non-finite loss, each phase starting from the same weights: e2e_decode_gpu (from step 7) "
            "(same kernels, same speed)") in lines
    assert "largest finite gradient norm before clipping: ceiling 2, e2e_decode_gpu 12.5 (3 non-finite)" in lines


def test_the_profiled_device_timeline_and_launch_threads_host_time_are_shown_per_phase_in_their_columns(tmp_path):
    timeline = {"window_ms": 40.0, "busy_ms": 36.5, "idle_ms": 3.5, "training_stream_ms": 30.25,
                "other_streams_ms": 9.0, "streams": 2}
    profile = {"trace": str(tmp_path / "ceiling.json.gz"), "steps": 5, "device": timeline,
               "host": {"loop_thread_ms": 20.5, "backward_thread_ms": 31.0}}
    on_cpu = {"trace": str(tmp_path / "reference.json.gz"), "steps": 5, "device": None,
              "host": {"loop_thread_ms": 12.25, "backward_thread_ms": None}}
    no_ops = {"trace": str(tmp_path / "ceiling_repeat.json.gz"), "steps": 5, "device": timeline, "host": None}
    lines = profile_lines({"ceiling": {"profile": profile}, "e2e_decode_gpu": {"profile": None},
                           "reference": {"profile": on_cpu}, "ceiling_repeat": {"profile": no_ops}})
    assert lines[0].startswith(f"profiled: 5 steps after each phase's timed ones, traces in {tmp_path};")
    assert lines[1].split()[-3:] == ["host:", "loop", "backward"]
    assert lines[2].split() == ["ceiling", "40.0", "36.5", "3.5", "30.2", "9.0", "20.5", "31.0"]
    assert lines[3].split()[-4:] == ["CUDA)", "12.2", "in", "loop"]  # the backward ran in the loop's thread
    assert lines[4].split()[-2:] == ["n/a", "n/a"]  # a trace without host ops
    assert len(lines) == 5  # a phase not profiled has no row


def test_each_profiled_phases_host_time_is_broken_down_by_outermost_span_with_each_threads_launches_and_gaps():
    ops = {"loop": [["Torch-Compiled Region: 0/0", 22.5, 1.0], ["Optimizer.step#SGD.step", 3.62, 1.0]],
           "backward": [["autograd::engine::evaluate_function: CompiledFunctionBackward", 27.3, 1.0],
                        ["autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 1.9, 314.0]],
           "launches": {"loop": 783.0, "backward": 870.0, "others": 114.0},
           "gaps": {"median_us": 24.0, "others_working_median_us": 26.5, "others_quiet_median_us": 18.3,
                    "others_working_fraction": 0.56}}
    on_cpu = {"loop": [["aten::conv2d", 4.0, 2.0]], "backward": None,
              "launches": {"loop": 0.0, "backward": None, "others": 0.0}, "gaps": None}
    before_gaps = {key: value for key, value in ops.items() if key != "gaps"}  # a report written before them
    only_waits = {**ops, "gaps": {"median_us": None, "others_working_median_us": None,
                                  "others_quiet_median_us": None, "others_working_fraction": None}}
    profile = {"trace": None, "steps": 5, "device": None, "host": None}
    lines = profile_lines({"ceiling": {"profile": {**profile, "host_ops": ops}},
                           "reference": {"profile": {**profile, "host_ops": on_cpu}},
                           "e2e_decode_cpu": {"profile": {**profile, "host_ops": before_gaps}},
                           "e2e_decode_gpu": {"profile": {**profile, "host_ops": only_waits}},
                           "ceiling_repeat": {"profile": profile}})  # a report written before the breakdown
    assert lines[-5] == "host ms a step by outermost span (calls a step where more than one), and kernel launches a step:"
    breakdown = ("loop: Torch-Compiled Region: 0/0 22.5, Optimizer.step#SGD.step 3.6; backward: "
                 "CompiledFunctionBackward 27.3, torch::autograd::AccumulateGrad 1.9 (x314); launches: loop 783, "
                 "backward 870, other threads 114")
    assert lines[-4] == (f"  ceiling: {breakdown}; the loop's gaps between CUDA calls, median us: 24.0 (while other "
                         "threads issue theirs, 56% of gaps: 26.5; otherwise 18.3)")
    assert lines[-3] == "  reference: loop: aten::conv2d 4.0 (x2); launches: loop 0, other threads 0"
    assert lines[-2] == f"  e2e_decode_cpu: {breakdown}"
    assert lines[-1] == f"  e2e_decode_gpu: {breakdown}; the loop's gaps between CUDA calls: none under 1 ms"


def test_on_cpu_a_phases_peak_memory_is_the_processs_peak_resident_set_in_bytes():
    with open("/proc/self/status") as status:  # Linux: VmHWM, the peak resident set, in kB
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    memory = peak_memory(torch.device("cpu"))
    assert memory["peak_mem_kind"] == "process_max_rss" and memory["peak_mem_reserved_bytes"] is None
    assert memory["peak_mem_bytes"] == pytest.approx(peak_kb * 1024, rel=0.1)


def test_a_deterministic_run_is_benched_without_tf32_or_cudnn_autotuning_and_in_its_compile_mode(toy_root):
    overrides = [f"data.root={toy_root}", "train.precision=fp32", "train.compile_mode=reduce-overhead"]
    fast = run_setting(load_config("configs/toy.yaml", overrides), "cuda")
    assert fast.tf32 and fast.cudnn_benchmark and fast.compile_mode == "reduce-overhead"
    deterministic = run_setting(load_config("configs/toy.yaml", [*overrides, "train.deterministic=true"]), "cuda")
    assert not deterministic.tf32 and not deterministic.cudnn_benchmark and deterministic.numerics == "fp32"


def test_tf32_names_the_numerics_of_fp32_steps_alone():
    assert Setting("bf16", channels_last=True, compile=False, tf32=True, cudnn_benchmark=True).numerics == "bf16"
    assert Setting("fp32", channels_last=True, compile=False, tf32=True, cudnn_benchmark=True).numerics == "tf32"


def test_a_settings_tf32_and_cudnn_autotuning_hold_inside_it_and_the_process_flags_are_restored_after():
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), (
        torch.backends.cudnn, "benchmark")
    saved = [getattr(owner, name) for owner, name in flags]
    try:
        for owner, name in flags:
            setattr(owner, name, name == "allow_tf32")  # tf32 on, autotuning off
        with cuda_numerics(ORIGINAL_MLGCN):  # tf32 off, autotuning on
            assert [getattr(owner, name) for owner, name in flags] == [False, False, True]
        assert [getattr(owner, name) for owner, name in flags] == [True, True, False]
    finally:
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)


def test_counting_the_forwards_flops_leaves_a_training_model_training():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48), nn.Linear(48, 10)).train()
    forward_flops_per_image(model, 4, torch.device("cpu"))
    assert model.training and all(module.training for module in model.modules())


def _toy_step(toy_root: Path, setting: Setting | None = None, *overrides: str) -> tuple[TrainStep, tuple]:
    """A TrainStep of the toy config on the CPU (its setting by default) and a batch of 4 for it."""
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", *overrides])
    info = dataset_info(cfg.data)
    step = TrainStep(build_model_for(cfg, info), cfg, setting or run_setting(cfg, "cpu"), torch.device("cpu"))
    return step, (torch.randn(4, 3, 64, 64), (torch.rand(4, info.num_classes) < 0.3).to(torch.int8))


def test_restart_gives_fp16_steps_their_initial_loss_scale_back(toy_root):
    fp16 = Setting("fp16", channels_last=False, compile=False, tf32=False, cudnn_benchmark=False)
    step, batch = _toy_step(toy_root, fp16)
    step(*batch)
    initial = step.scaler.get_scale()
    step.scaler.update(1.0)  # as after overflows: the scale backed off
    step.restart()
    assert step.scaler.get_scale() == initial


def test_a_step_without_clipping_computes_no_gradient_norm(toy_root):
    step, batch = _toy_step(toy_root, None, "optim.clip_grad=0")
    step(*batch)
    assert step.grad_norm is None


@pytest.mark.parametrize("argv", [["train", "--steps", "0"], ["train", "--warmup", "0"],
                                  ["train", "--profile-steps", "0"], ["loader", "--shards", "s", "--workers", "-1"]])
def test_bench_refuses_step_and_worker_counts_out_of_range_before_any_work(argv, capsys, monkeypatch):
    from mlgcn_dist.bench import cli

    for work in ("load_config", "bench_loader"):  # reached only if the arguments were taken
        monkeypatch.setattr(cli, work, lambda *_, **__: pytest.fail("the command ran"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    assert exit_.value.code == 2 and "expected an integer" in capsys.readouterr().err


def test_bench_train_sizes_each_phases_loader_epoch_for_its_warmup_timed_and_profiled_steps(monkeypatch, tmp_path):
    from mlgcn_dist.bench import cli

    sized, benched = [], []
    monkeypatch.setattr(cli, "point_config_at_shards", lambda cfg, shards, batches: sized.append((shards, batches)))
    monkeypatch.setattr(cli, "bench_train", lambda cfg, steps, warmup, profiler, end_to_end, ceiling_each,
                        pinned_ceiling: benched.append((cfg, steps, warmup, profiler, end_to_end, ceiling_each,
                                                        pinned_ceiling)) or {"phases": {}, "failed_phases": {}})
    monkeypatch.setattr(cli, "describe_shards", lambda shards, split: {"shards": str(shards)})
    monkeypatch.setattr(cli, "format_report", lambda report: "")
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--config", "configs/toy.yaml", "--steps", "5", "--warmup", "3", "--shards",
            str(tmp_path / "pack"), "--profile-dir", str(tmp_path / "profiles"), "--profile-steps", "4",
            "--json", str(out), "data.workers=3"]
    assert main(argv) == 0
    [(cfg, steps, warmup, profiler, end_to_end, ceiling_each, pinned_ceiling)] = benched
    assert (steps, warmup, profiler.steps, profiler.out_dir) == (5, 3, 4, tmp_path / "profiles")
    assert end_to_end == end_to_end_phases(cfg, torch.device("cpu"))  # every phase, once each
    assert not ceiling_each  # the ceiling first and last only, unless --ceiling-each
    assert not pinned_ceiling  # unless --pinned-ceiling
    assert sized == [(tmp_path / "pack", batches_per_phase(cfg, steps=5, warmup=3, profiled=4))]
    assert json.loads(out.read_text())["data"] == {"shards": str(tmp_path / "pack"), "toy": None}


def test_the_report_describes_its_data_by_the_mean_bytes_a_training_sample_takes_in_its_shards(tmp_path):
    shards = make_toy_shards(tmp_path, images=16, size=64, workers=1, seed=0)
    described = describe_shards(shards, "train")
    train_bytes = sum(f.stat().st_size for f in shards.glob("coco-train-*.tar"))
    assert described["images"] > 0 and described["shards"] == str(shards) and described["split"] == "train"
    assert described["mean_sample_bytes"] == pytest.approx(train_bytes / described["images"])


def _bench_toy_phases(tmp_path: Path, phases: str, *options: str) -> tuple[int, dict]:
    """`mlgcn bench train --phases <phases> <options>` at its quickest (a step a phase on 16 toy images, no
    workers): its exit status and report."""
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--config", "configs/toy.yaml", "--steps", "1", "--warmup", "1", "--toy-images", "16",
            "--toy-size", "64", "--json", str(out), "--phases", phases, *options, "train.device=cpu",
            "data.batch_size=4", "data.workers=0"]
    status = main(argv)
    return status, json.loads(out.read_text())


def test_bench_train_runs_only_the_end_to_end_phases_named_and_always_the_ceiling_its_repeat_and_the_reference(
    tmp_path,
):
    status, report = _bench_toy_phases(tmp_path, "e2e_decode_gpu, e2e_decode_cpu")
    assert status == 0
    assert tuple(report["phases"]) == ("ceiling", "e2e_decode_cpu", "e2e_decode_gpu", "ceiling_repeat", "reference")
    assert set(report["ratios"]) == {f"e2e_decode_{d}/{base}" for d in ("cpu", "gpu") for base in ("ceiling",
                                                                                                    "reference")}


def test_every_phase_reports_what_the_hosts_cpus_did_over_its_timed_steps(tmp_path, capsys):
    """Run I's ceiling launched its kernels 25-30 us apart and the process phase 14-16, the device's work unchanged:
    each phase says how its loop thread spent the window (mlgcn_dist.bench.host), and the report prints it."""
    status, report = _bench_toy_phases(tmp_path, "e2e_decode_cpu")
    assert status == 0
    for name, phase in report["phases"].items():
        assert set(phase["host"]) >= {"loop", "backward", "process_cores_busy", "host_busy_frac", "mhz_median"}, name
        if Path("/proc/thread-self/schedstat").exists():
            assert phase["host"]["loop"]["cpu_ms"] > 0, name
    assert set(report["host"]) == {"cpu_model", "governors", "idle_states"}
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert [name for name in rows if name in report["phases"]] == list(report["phases"])


def test_with_pinned_ceiling_the_ceiling_runs_again_right_after_with_its_threads_on_a_core_each_and_a_ratio_to_it(
    tmp_path, capsys
):
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_setaffinity") else None
    status, report = _bench_toy_phases(tmp_path, "e2e_decode_cpu", "--pinned-ceiling")
    assert status == 0
    assert tuple(report["phases"])[:3] == ("ceiling", "ceiling_pinned", "e2e_decode_cpu")
    pinned = report["phases"]["ceiling_pinned"]
    assert report["ratios"]["ceiling_pinned/ceiling"] == pytest.approx(pinned["img_s"]
                                                                       / report["phases"]["ceiling"]["img_s"])
    assert "e2e_decode_cpu/ceiling_before" not in report["ratios"]  # not --ceiling-each
    out = capsys.readouterr().out
    if hasattr(os, "sched_setaffinity"):
        (core,) = pinned["pinned_cores"].values()  # the loop thread: a CPU's backward runs in it
        assert (f"ceiling with its launching threads held on one core each (the loop thread on core {core}): "
                f"{report['ratios']['ceiling_pinned/ceiling']:.2f}x the ceiling") in out.splitlines()
        assert os.sched_getaffinity(0) == mask  # the loop thread's cores given back


def test_with_ceiling_each_the_ceiling_runs_before_every_end_to_end_phase_and_each_has_a_ratio_to_the_one_before_it(
    tmp_path, capsys
):
    """Run I's ceiling moved 15% between its first and last measurements, the device's work unchanged: with
    --ceiling-each every end-to-end phase also has a ratio to a ceiling measured just before it."""
    status, report = _bench_toy_phases(tmp_path, "e2e_decode_gpu,e2e_decode_cpu", "--ceiling-each")
    assert status == 0
    phases, ratios = report["phases"], report["ratios"]
    assert tuple(phases) == ("ceiling", "e2e_decode_cpu", "ceiling_before_e2e_decode_gpu", "e2e_decode_gpu",
                             "ceiling_repeat", "reference")
    assert ratios["e2e_decode_cpu/ceiling_before"] == ratios["e2e_decode_cpu/ceiling"]  # the first is just before it
    assert ratios["e2e_decode_gpu/ceiling_before"] == pytest.approx(
        phases["e2e_decode_gpu"]["img_s"] / phases["ceiling_before_e2e_decode_gpu"]["img_s"])
    assert ratios["e2e_decode_gpu/ceiling"] == pytest.approx(phases["e2e_decode_gpu"]["img_s"] / phases["ceiling"]["img_s"])
    out = capsys.readouterr().out
    assert "phases ceiling, e2e_decode_cpu, ceiling_before_e2e_decode_gpu, e2e_decode_gpu, ceiling_repeat, reference" in out
    assert (f"against the ceiling measured just before each: e2e_decode_cpu {ratios['e2e_decode_cpu/ceiling_before']:.2f}x, "
            f"e2e_decode_gpu {ratios['e2e_decode_gpu/ceiling_before']:.2f}x") in out.splitlines()
    assert "against the ceiling measured just before each" not in format_report({**report, "ratios": {
        name: v for name, v in ratios.items() if not name.endswith("/ceiling_before")}})


def test_a_phases_ratio_to_the_ceiling_before_it_skips_a_phase_that_failed_and_its_ceiling():
    measured = {name: {"img_s": img_s} for name, img_s in [
        ("ceiling", 100.0), ("e2e_a", 90.0), ("ceiling_before_e2e_b", 80.0),  # e2e_b failed: not among the phases
        ("ceiling_before_e2e_c", 50.0), ("e2e_c", 40.0), ("ceiling_repeat", 60.0), ("reference", 10.0)]}
    assert train.ratios(measured) == pytest.approx({
        "e2e_a/ceiling": 0.9, "e2e_a/reference": 9.0, "e2e_a/ceiling_before": 0.9,
        "e2e_c/ceiling": 0.4, "e2e_c/reference": 4.0, "e2e_c/ceiling_before": 0.8})


@pytest.mark.slow  # spawns an augment process
def test_an_end_to_end_phase_that_fails_is_reported_with_its_error_and_the_other_phases_are_still_measured(
    tmp_path, monkeypatch, capsys
):
    """A new code path may fail on the first GPU it meets, inside a lease that may not come again: its phase is
    reported, the ceiling's repeat and the reference are still measured, and the bench exits 1."""
    made = phases.process_conversion

    def killed_after_its_first_batch(cfg, device, channels_last):
        convert, clock, process = made(cfg, device, channels_last)
        converted = []

        def convert_then_kill(batch):
            if converted:
                process._process.kill()
            converted.append(batch)
            return convert(batch)

        return convert_then_kill, clock, process

    monkeypatch.setattr(phases, "process_conversion", killed_after_its_first_batch)
    status, report = _bench_toy_phases(tmp_path, "e2e_decode_gpu_process,e2e_decode_cpu")
    assert status == 1
    assert tuple(report["phases"]) == ("ceiling", "e2e_decode_cpu", "ceiling_repeat", "reference")
    assert set(report["ratios"]) == {"e2e_decode_cpu/ceiling", "e2e_decode_cpu/reference"}
    error = report["failed_phases"]["e2e_decode_gpu_process"]
    assert re.fullmatch(r"AugmentProcessError: the augment process \(pid \d+\) .*batch 2.*: exit code -9 \(signal 9\)",
                        error)
    captured = capsys.readouterr()
    assert f"[bench] e2e_decode_gpu_process: failed: {error}" in captured.out
    assert f"e2e_decode_gpu_process: failed: {error}" in format_report(report).splitlines()
    assert "Traceback" in captured.err and "1 phase failed: e2e_decode_gpu_process" in captured.err


def test_a_stop_signal_that_python_wrapped_in_a_phases_error_stops_the_bench_and_is_no_failed_phase(monkeypatch,
                                                                                                   toy_root):
    """Python turns what a signal handler raises inside some hooks into a RuntimeError: Ctrl-C during a phase must
    still stop the bench, not be reported as that phase's failure while the next phase starts."""
    from mlgcn_dist.bench import cli

    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}"])
    started = []

    def loader_phase(step, cfg, decode, steps, warmup, depth=None, profile=None, **options):
        started.append(decode)
        try:
            raise cli.StopSignal(signal.SIGINT)
        except cli.StopSignal as stop:
            raise RuntimeError("Error calling __set_name__") from stop

    monkeypatch.setattr(train, "loader_phase", loader_phase)
    monkeypatch.setattr(train, "synthetic_phase", lambda *_: {})
    monkeypatch.setattr(train, "_progress", lambda name, result: result)
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError) as raised:
        train._configured_phases(cfg, dataset_info(cfg.data), cpu, 2, 1, None, end_to_end_phases(cfg, cpu))
    assert cli.stop_signal_behind(raised.value).signum == signal.SIGINT and started == ["cpu"]


def test_a_phase_name_that_this_run_does_not_measure_is_one_error_naming_those_it_does_before_any_work(
    monkeypatch, capsys
):
    from mlgcn_dist.bench import cli

    monkeypatch.setattr(cli, "make_toy_shards", lambda *_, **__: pytest.fail("the bench started"))
    argv = ["bench", "train", "--config", "configs/toy.yaml", "--phases", "e2e_decode_gpu,e2e_decode_gpu_side_stream",
            "train.device=cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--phases: e2e_decode_gpu_side_stream is not an end-to-end phase of this run" in err
    assert ("(those are: e2e_decode_cpu, e2e_decode_gpu, e2e_decode_gpu_process, e2e_decode_gpu_inline, "
            "e2e_decode_gpu_augment_in_loop; the ceiling, its repeat and the reference always run)") in err


def test_the_end_to_end_phases_of_a_run_follow_its_device_prefetch_and_device():
    cfg = load_config("configs/toy.yaml", ["data.device_prefetch=0"])
    assert list(end_to_end_phases(cfg, torch.device("cpu"))) == ["e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_process"]
    cfg = load_config("configs/toy.yaml", ["data.device_prefetch=2", "train.side_stream=true"])
    on_cuda = end_to_end_phases(cfg, torch.device("cuda"))
    assert list(on_cuda)[-1] == "e2e_decode_gpu_default_stream" and on_cuda["e2e_decode_gpu_default_stream"] == {
        "decode": "gpu", "other_stream": True}
    assert select_phases(on_cuda, None) == on_cuda
    assert list(select_phases(on_cuda, ["e2e_decode_gpu_inline", "e2e_decode_cpu"])) == [
        "e2e_decode_cpu", "e2e_decode_gpu_inline"]  # in the run's order


def test_bench_loader_refuses_too_few_batches_to_time_a_whole_round_after_those_the_workers_made_ahead(
    monkeypatch, capsys
):
    """2 workers, 2 batches: the clock saw only the batches made during the untimed round (13,007 img/s for a
    steady 1,545)."""
    from mlgcn_dist.bench import cli

    monkeypatch.setattr(cli, "bench_loader", lambda *_, **__: pytest.fail("the bench started"))
    assert main(["bench", "loader", "--shards", "pack", "--workers", "2", "--batches", "5"]) == 2
    assert capsys.readouterr().err == (
        "mlgcn bench loader: --batches 5 is too few to time --workers 2: at least 6 (the 4 batches the workers make "
        "ahead during the untimed first round, then one whole round)\n"
    )


@pytest.mark.parametrize(("workers", "batches", "timed"), [(0, None, 20), (0, 1, 1), (2, 6, 6), (8, None, 24)])
def test_bench_loader_times_the_batches_asked_for_and_by_default_20_or_the_fewest_its_workers_need(
    workers, batches, timed, monkeypatch
):
    from mlgcn_dist.bench import cli

    asked = []
    monkeypatch.setattr(cli, "bench_loader", lambda shards, decode, **options: asked.append(options["batches"]) or {})
    argv = ["bench", "loader", "--shards", "pack", "--workers", str(workers)]
    assert main(argv + ([] if batches is None else ["--batches", str(batches)])) == 0
    assert asked == [timed]


class _BenchStarted(Exception):
    pass


def _refuse_to_start(*_, **__):
    raise _BenchStarted


@pytest.mark.parametrize(("config", "hint"), [([], True), (["--config", "configs/toy.yaml"], False)])
def test_bench_train_says_what_it_runs_before_any_work_and_on_a_cpu_hints_the_quick_recipe_for_a_large_model(
    config, hint, monkeypatch, capsys
):
    from mlgcn_dist.bench import cli

    monkeypatch.setattr(cli, "make_toy_shards", _refuse_to_start)
    with pytest.raises(_BenchStarted):
        main(["bench", "train", *config, "train.device=cpu"])
    lines = capsys.readouterr().out.splitlines()
    model = "cifar_resnet_tiny + gcn at 64 px" if config else "resnet101 + gcn at 448 px"
    assert lines[0] == (
        f"[bench] on cpu: {model}, batch 16; phases ceiling, e2e_decode_cpu, e2e_decode_gpu, e2e_decode_gpu_process, "
        "e2e_decode_gpu_inline, e2e_decode_gpu_augment_in_loop, ceiling_repeat, reference; 10 warm-up + 50 timed "
        "steps each; data: a toy set of 256 JPEGs at 640 px"
    )
    assert lines[1:] == ([
        "[bench] hint: resnet101 on a CPU takes many minutes; a quick CPU run: mlgcn bench train --config "
        "configs/toy.yaml --toy-size 64"
    ] if hint else [])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "sent_to", "when"), [
    pytest.param("SIGTERM", "the process", "mlgcn-bench-*/shards/meta.json", id="kill-TERM-while-loading"),
    pytest.param("SIGINT", "its process group", "mlgcn-bench-*", id="ctrl-c-while-making-the-toy-set"),
])
def test_bench_train_stopped_by_a_signal_removes_its_toy_set_and_exits_128_plus_it_with_one_line(
    name, sent_to, when, tmp_path
):
    import os
    import signal
    import subprocess
    import sys

    signum = signal.Signals[name]
    argv = [sys.executable, "-m", "mlgcn_dist.cli", "bench", "train", "--config", "configs/toy.yaml", "--toy-images",
            "16", "--toy-size", "64", "--steps", "5", "--warmup", "1", "--json", str(tmp_path / "b.json"),
            "train.device=cpu", "data.batch_size=4"]
    bench = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TMPDIR": str(tmp_path)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(when)) and bench.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if sent_to == "the process":
        bench.send_signal(signum)
    else:
        os.killpg(bench.pid, signum)
    err = bench.communicate(timeout=60)[1]
    assert bench.returncode == 128 + signum, err
    assert err.splitlines()[-1] == f"mlgcn bench train: stopped by {name}; its temporary toy set is removed"
    assert "Traceback" not in err
    assert not list(tmp_path.glob("mlgcn-bench-*"))



@pytest.mark.parametrize(("device", "environ", "threads"), [
    ("cuda", {}, 1),  # accelerate launch's default for a GPU process (torchrun's with several a node)
    ("cuda", {"OMP_NUM_THREADS": "4"}, 4),
    ("cpu", {}, None),  # all the cores for one CPU process: torch's own default
    ("cpu", {"OMP_NUM_THREADS": "2"}, 2),
    ("cuda", {"OMP_NUM_THREADS": ""}, 1),
])
def test_the_bench_process_gets_the_intra_op_threads_accelerate_launch_gives_a_training_process(device, environ,
                                                                                                  threads):
    from mlgcn_dist.threads import launcher_threads

    assert launcher_threads(device, environ) == threads


def test_bench_train_runs_with_the_threads_asked_for_and_restores_the_processs_after(monkeypatch, tmp_path):
    from mlgcn_dist.bench import cli

    seen = []
    monkeypatch.setattr(cli, "point_config_at_shards", lambda cfg, shards, batches: None)
    monkeypatch.setattr(cli, "bench_train", lambda *args: seen.append(torch.get_num_threads()) or {"phases": {}, "failed_phases": {}})
    monkeypatch.setattr(cli, "describe_shards", lambda shards, split: {"shards": str(shards)})
    monkeypatch.setattr(cli, "format_report", lambda report: "")
    before = torch.get_num_threads()
    argv = ["bench", "train", "--config", "configs/toy.yaml", "--shards", str(tmp_path), "--json",
            str(tmp_path / "train.json"), "train.device=cpu"]
    assert main([*argv[:2], "--threads", str(before + 1), *argv[2:]]) == 0
    assert main(argv) == 0  # on a CPU: torch's default, left alone
    assert seen == [before + 1, before] and torch.get_num_threads() == before


def test_the_reports_first_line_gives_the_intra_op_threads_the_steps_ran_with():
    report = _bench_report()
    assert "compile (reduce-overhead); 50 timed" in format_report(report).splitlines()[0]  # a report without them
    report["intra_op_threads"] = 1
    assert "compile (reduce-overhead), 1 intra-op thread; 50 timed" in format_report(report).splitlines()[0]
    report["intra_op_threads"] = 16
    assert ", 16 intra-op threads; " in format_report(report).splitlines()[0]


def test_also_threads_runs_each_end_to_end_phase_again_right_after_it_at_that_many_intra_op_threads(monkeypatch,
                                                                                                 toy_root):
    """Two settings of the process side by side in one run: separate runs minutes apart spread by 30% (run G)."""
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "data.device_prefetch=0"])
    before = torch.get_num_threads()
    ran = []

    def loader_phase(step, cfg, decode, steps, warmup, depth=None, stream=None, profile=None, **options):
        ran.append((profile.trace.name.removesuffix(".json.gz"), torch.get_num_threads()))
        return {"decode_on": decode}

    monkeypatch.setattr(train, "loader_phase", loader_phase)
    monkeypatch.setattr(train, "synthetic_phase", lambda *_: {})
    monkeypatch.setattr(train, "_progress", lambda name, result: result)
    monkeypatch.setattr(train, "forward_flops_per_image", lambda *args, **kwargs: 1.0)
    cpu = torch.device("cpu")
    end_to_end = train.with_thread_variants(end_to_end_phases(cfg, cpu), before + 1)
    phases, _, _ = train._configured_phases(cfg, dataset_info(cfg.data), cpu, 2, 1, StepProfiler(Path("p"), 1),
                                         end_to_end)
    assert ran == [("e2e_decode_cpu", before), (f"e2e_decode_cpu_threads{before + 1}", before + 1),
                   ("e2e_decode_gpu", before), (f"e2e_decode_gpu_threads{before + 1}", before + 1),
                   ("e2e_decode_gpu_process", before), (f"e2e_decode_gpu_process_threads{before + 1}", before + 1)]
    assert torch.get_num_threads() == before
    variant = phases[f"e2e_decode_gpu_threads{before + 1}"]
    assert variant["intra_op_threads"] == before + 1 and variant["decode_on"] == f"gpu, {before + 1} intra-op threads"
    assert phases["e2e_decode_gpu"]["intra_op_threads"] == before and phases["e2e_decode_gpu"]["decode_on"] == "gpu"
    assert train.with_thread_variants({"e2e_decode_cpu": {"decode": "cpu"}}, None) == {"e2e_decode_cpu": {"decode": "cpu"}}


def test_bench_train_passes_also_threads_on_after_checking_the_phases_it_follows(monkeypatch, tmp_path, capsys):
    from mlgcn_dist.bench import cli

    benched = []
    monkeypatch.setattr(cli, "point_config_at_shards", lambda cfg, shards, batches: None)
    monkeypatch.setattr(cli, "bench_train", lambda *args: benched.append(args) or {"phases": {}, "failed_phases": {}})
    monkeypatch.setattr(cli, "describe_shards", lambda shards, split: {"shards": str(shards)})
    monkeypatch.setattr(cli, "format_report", lambda report: "")
    argv = ["bench", "train", "--config", "configs/toy.yaml", "--shards", str(tmp_path), "--json",
            str(tmp_path / "train.json"), "--phases", "e2e_decode_gpu", "--also-threads", "16", "train.device=cpu"]
    assert main(argv) == 0
    end_to_end = benched[0][4]
    assert end_to_end == {"e2e_decode_gpu": {"decode": "gpu"}, "e2e_decode_gpu_threads16": {"decode": "gpu", "threads": 16}}
    assert "phases ceiling, e2e_decode_gpu, e2e_decode_gpu_threads16, ceiling_repeat" in capsys.readouterr().out


def test_bench_train_stopped_while_python_wraps_the_signal_in_an_error_of_its_own_still_cleans_up_and_exits_128_plus_it(
        monkeypatch, tmp_path, capsys):
    """Seen in CI: a Ctrl-C landed while PIL defined its plugin classes as it saved the first toy JPEG, and Python
    turned the StopSignal raised in __set_name__ into "RuntimeError: Error calling __set_name__", a traceback and
    exit 1."""
    import os
    import signal

    from mlgcn_dist.bench import cli

    class Descriptor:
        def __set_name__(self, owner, name):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs between two bytecodes of this frame
                pass

    def make_toy_shards(workdir, *args):
        (workdir / "toy").mkdir()
        type("Plugin", (), {"attribute": Descriptor()})
        return workdir

    monkeypatch.setattr(cli, "make_toy_shards", make_toy_shards)
    monkeypatch.setattr(cli.tempfile, "tempdir", str(tmp_path))
    argv = ["bench", "train", "--config", "configs/toy.yaml", "--json", str(tmp_path / "b.json"), "train.device=cpu"]
    assert main(argv) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mlgcn bench train: stopped by SIGTERM; its temporary toy set is removed")
    assert not list(tmp_path.glob("mlgcn-bench-*"))
    assert cli.stop_signal_behind(RuntimeError("no signal")) is None
