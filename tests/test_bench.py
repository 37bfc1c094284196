"""Specifications of ``mlgcn bench``: the report's fields, every derived number computed from measured ones.

Nothing here asserts a speed (CI machines are shared and noisy). The smoke run uses configs/toy.yaml, tiny.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import timed_worker_loader
from torch import nn

from mlgcn_dist.bench import phases, window
from mlgcn_dist.bench.phases import (
    ConversionClock,
    augment_in_loop_conversion,
    data_path_phase,
    loader_phase,
    timed_conversion,
)
from mlgcn_dist.bench.profiling import ProfileRequest
from mlgcn_dist.bench.report import format_report, profile_lines
from mlgcn_dist.bench.step import (
    ORIGINAL_MLGCN,
    TRAIN_FLOPS_PER_FORWARD,
    TrainStep,
    forward_flops_per_image,
    peak_tflops,
    run_setting,
)
from mlgcn_dist.bench.train import batches_per_phase, make_toy_shards
from mlgcn_dist.bench.window import LoaderQueue, time_training
from mlgcn_dist.cli import main
from mlgcn_dist.config import load_config, set_key
from mlgcn_dist.data.loader import build_train_loader, dataset_info
from mlgcn_dist.data.prefetch import device_batches
from mlgcn_dist.engine import build_model_for

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

PHASES = ("ceiling", "e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_inline", "e2e_decode_gpu_augment_in_loop",
          "ceiling_repeat", "reference")
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


def test_bench_profiles_steps_after_each_training_phases_timed_ones_and_keeps_a_trace_each(report):
    for name, phase in report["phases"].items():
        profile = phase["profile"]
        assert profile["steps"] == PROFILED and Path(profile["trace"]).name == f"{name}.json.gz"
        assert Path(profile["trace"]).stat().st_size > 0
        assert profile["device"] is None  # on CPU; on CUDA the device timeline (tests/test_profiling.py)
    assert "profiled: 1 steps after each phase's timed ones" in format_report(report)


def test_bench_train_refuses_a_profile_dir_that_is_a_file_before_any_work(tmp_path, capsys):
    taken = tmp_path / "profiles"
    taken.write_text("not a directory")
    assert main(["bench", "train", "--config", "configs/toy.yaml", "--profile-dir", str(taken)]) == 2
    assert f"--profile-dir {taken} exists and is not a directory" in capsys.readouterr().err


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
        for e2e in ("e2e_decode_cpu", "e2e_decode_gpu", "e2e_decode_gpu_inline", "e2e_decode_gpu_augment_in_loop")
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


def test_bench_runs_the_device_conversion_ahead_except_in_the_inline_and_reference_phases(report):
    phases = report["phases"]
    assert phases["e2e_decode_cpu"]["device_prefetch"] == phases["e2e_decode_gpu"]["device_prefetch"] == 2
    assert phases["e2e_decode_gpu_augment_in_loop"]["device_prefetch"] == 2
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
    assert phases["e2e_decode_gpu"]["max_grad_norm"] == pytest.approx(phases["e2e_decode_gpu_inline"]["max_grad_norm"])
    assert all(p["first_nonfinite_step"] is None for p in phases.values())


class _DivergingStep:
    """A stand-in TrainStep whose loss turns NaN at its fourth call, and whose gradient norm grows until then."""

    device = torch.device("cpu")
    setting = ORIGINAL_MLGCN

    def __init__(self) -> None:
        self.calls, self.restarts, self.grad_norm = 0, 0, None

    def restart(self) -> None:
        self.restarts += 1

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        diverged = self.calls >= 4
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
    assert result["profile"] == {"trace": None, "steps": 2, "device": None, "error": "CUPTI_ERROR_NOT_INITIALIZED"}
    assert result["steps"] == 2 and result["img_s"] > 0
    report_lines = profile_lines({"ceiling": result})
    assert report_lines[-1].split() == ["ceiling", "profiling", "failed:", "CUPTI_ERROR_NOT_INITIALIZED"]


def test_time_training_reports_no_divergence_for_finite_losses():
    step = _DivergingStep()
    step.calls = -100  # stays finite for the whole phase
    result = time_training(step, itertools.repeat((torch.zeros(1), None)), lambda b: b, steps=3, warmup=1)
    assert result["first_nonfinite_step"] is None and result["nonfinite_steps"] == 0


class _StepThatCompilesFirst:
    """A stand-in TrainStep that takes ``compile_s`` at its first call and no time after it."""

    device = torch.device("cpu")
    setting = ORIGINAL_MLGCN
    grad_norm = None

    def __init__(self, compile_s: float) -> None:
        self.compile_s, self.calls = compile_s, 0

    def restart(self) -> None:
        pass

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.compile_s)
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


@pytest.mark.parametrize(("warmup", "batches"), [(1, 4), (2, 4), (3, 3)])
def test_the_data_path_alone_is_timed_at_the_loaders_steady_rate_wherever_its_window_starts(monkeypatch, toy_root,
                                                                                            warmup, batches):
    """3 workers making a batch of 4 in 0.2 s: 60 images/s. A window of 4 batches that starts mid-round read 0.7x
    to 1.3x of it."""
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "data.workers=3", "data.prefetch_factor=2"])
    monkeypatch.setattr(phases, "build_train_loader",
                        lambda data_cfg, **_: timed_worker_loader(workers=3, batches=60, batch_size=4, seconds=0.2))
    monkeypatch.setattr(phases, "timed_conversion",
                        lambda *_: (lambda batch: (batch["image"], batch["target"], batch["image_id"]),
                                    ConversionClock()))
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

    def counting_loader(data_cfg, **_):
        for index in range(data_cfg.steps_per_epoch):
            pulled.append(index)
            yield {"image": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "target": torch.zeros(2, 12),
                   "image_id": torch.arange(2), "n_bad": 0}

    monkeypatch.setattr(phases, "build_train_loader", counting_loader)
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


def test_peak_tflops_are_looked_up_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert peak_tflops("NVIDIA H200", "fp16") == 989.4
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
