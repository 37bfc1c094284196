"""Throughput benchmarks (``mlgcn bench train`` and ``mlgcn bench loader``): where training time goes.

``bench train`` times training steps (forward, loss, backward, clipping, SGD with the backbone/head parameter
groups) on one device, in one process, in these phases:

* ceiling: synthetic tensors already on the device, with the run's settings (precision, channels_last,
  compile, batch size): the fastest this model can train here;
* end to end: the same settings fed by the real training loader from shards, decoding JPEGs in the CPU
  workers (PIL), then on the device (nvJPEG; without CUDA, torchvision's CPU decoder), both with the device
  conversion running ``data.device_prefetch`` batches ahead as in the engine; and once more decoding on the
  device inline (``e2e_decode_gpu_inline``), which shows what running ahead gains, and with only the decode
  ahead on the helper, the augment launched by the training loop (``e2e_decode_gpu_augment_in_loop``, which
  the engine does not do: an experiment, see :func:`augment_in_loop_conversion`); the batches the loader's
  workers queued during the warm-up are dropped and the timed steps are whole rounds of the workers
  (:class:`LoaderQueue`), so a loader slower than the model is timed at its steady rate;
* the ceiling again (``ceiling_repeat``): its difference from the first is the drift of the device over the
  run, the spread to read the ratios against;
* reference: the original ML-GCN setting (fp32 without TF32, NCHW, eager, CPU decode) on the same data;

and, without training, the GPU data path alone (``data_gpu``: loader, decode, augment, run ahead as in training).
Every phase of one model starts from the same initial weights (``TrainStep.restart``).

End to end / ceiling is what the input pipeline costs; end to end / reference is what the settings gain over
the original code. The data-wait fraction ("wait") is the share of the timed window the host spent blocked
waiting for the next batch (loader and device-side decode together); on a GPU the device may meanwhile still run
the steps already queued, so what throughput loses is the data-stall fraction ("stall", CUDA only): the share of
the window the training stream sat idle while the loop waited for its batch.
MFU is the achieved training FLOP rate (3x the forward's, per image) over the device's dense peak for the
phase's numerics. Each end-to-end phase also reports the host time of the device conversion per batch
(``convert_ms``; on the GPU path split into ``decode_ms`` and ``augment_ms``) and its share of the step
(``convert_busy``): near 1.0 the prefetch helper, not the model, sets the pace. A diverging model is reported
(``first_nonfinite_step``, ``max_grad_norm``) without a per-step sync. With a ``StepProfiler``
(``--profile-dir``) every training phase ends with a few steps under torch.profiler, untimed: the device's busy
and idle time per step (``profile``) says whether a slower phase lost time to slower kernels or to a device left
idle within its steps (:mod:`mlgcn_dist.profiling`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlgcn_dist.arguments import non_negative_int, positive_int
from mlgcn_dist.config import Config, load_config, set_key
from mlgcn_dist.data.loader import (
    DatasetInfo,
    bench_loader,
    build_train_loader,
    dataset_info,
    read_meta,
    whole_rounds,
)
from mlgcn_dist.data.pack import TRAINING_SPLIT, pack_dataset
from mlgcn_dist.data.prefetch import device_batches
from mlgcn_dist.data.toy import make_toy
from mlgcn_dist.data.transforms import CropParams, GpuAugment, to_device
from mlgcn_dist.decode_bench import add_decode_arguments, run_decode_bench
from mlgcn_dist.distributed import concrete_precision, uses_cuda_graphs
from mlgcn_dist.engine import build_model_for
from mlgcn_dist.losses import build_loss
from mlgcn_dist.optim import build_optimizer
from mlgcn_dist.profiling import ProfileRequest, StepProfiler, profile_steps, request_for
from mlgcn_dist.streams import running_on, side_stream
from mlgcn_dist.timing import DataStall, timed_next

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets, looked up by the first key contained in
# torch.cuda.get_device_name ("H100 PCIe" and "H100 NVL" before "H100", whose numbers are the SXM part's; NVL: per
# GPU). fp32: CUDA cores.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
# FlopCounterMode counts a forward; the backward costs about twice as much (input and weight gradients; the first
# convolution's input gradient, ~0.5% of ResNet-101's training FLOPs, is never computed, so MFU reads that much high).
TRAIN_FLOPS_PER_FORWARD = 3
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setting:
    """How a training step runs: numerics, memory layout, compilation."""

    precision: str  # fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler)
    channels_last: bool
    compile: bool
    tf32: bool  # fp32 matmuls and convolutions on TF32 tensor cores (CUDA)
    cudnn_benchmark: bool
    compile_mode: str = "default"  # torch.compile mode (reduce-overhead: CUDA graphs)

    @property
    def numerics(self) -> str:
        """The key of PEAK_TFLOPS this setting runs at."""
        return "tf32" if self.precision == "fp32" and self.tf32 else self.precision


# The original code trained in fp32 on GPUs without TF32, NCHW, eagerly, with cudnn.benchmark on.
ORIGINAL_MLGCN = Setting("fp32", channels_last=False, compile=False, tf32=False, cudnn_benchmark=True)


def run_setting(cfg: Config, device: torch.device) -> Setting:
    """The configured setting on ``device`` (``train.precision=auto`` resolved as the engine resolves it); TF32
    and cuDNN autotuning as the engine enables them (unless deterministic)."""
    fast = not cfg.train.deterministic
    return Setting(
        concrete_precision(cfg.train.precision, torch.device(device).type),
        cfg.train.channels_last,
        cfg.train.compile,
        tf32=fast and torch.device(device).type == "cuda",  # TF32 is a CUDA tensor-core format
        cudnn_benchmark=fast,
        compile_mode=cfg.train.compile_mode,
    )


def peak_tflops(device_name: str, numerics: str) -> float | None:
    """Dense peak TFLOP/s of a known GPU at ``numerics`` (bf16, fp16, tf32, fp32); None if unknown or CPU."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks[numerics]
    return None


@contextmanager
def cuda_numerics(setting: Setting) -> Iterator[None]:
    """TF32 and cuDNN autotuning as ``setting`` says, restored afterwards (these flags are process-global)."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting.tf32
    torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = saved


class TrainStep:
    """One optimiser step as the engine takes it: autocast forward, fp32 loss, backward, clipping, SGD."""

    def __init__(self, model: torch.nn.Module, cfg: Config, setting: Setting, device: torch.device) -> None:
        memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format).train()
        self.forward = torch.compile(self.model, mode=setting.compile_mode) if setting.compile else self.model
        self.cuda_graphs = uses_cuda_graphs(setting.compile, setting.compile_mode)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.optim.lr)
        self.criterion = build_loss(cfg.optim)
        self.clip_grad = cfg.optim.clip_grad
        self.setting = setting
        self.device = device
        self.scaler = self._new_scaler()
        # The pre-clip gradient norm of the last step (a device tensor: reading it would wait for the device).
        self.grad_norm: torch.Tensor | None = None
        # On the host: a copy on the device would count in every phase's peak memory.
        self._initial = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def eager_loss(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """The loss of the uncompiled model on one batch, without a step (BatchNorm statistics do move: restart
        after it)."""
        with torch.no_grad(), self._autocast():
            logits = self.model(images)
        return float(self.criterion(logits.float(), targets))

    def _autocast(self) -> torch.autocast:
        dtype = _AUTOCAST_DTYPES.get(self.setting.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _new_scaler(self) -> torch.amp.GradScaler:
        """fp16 loss scaling from its initial scale; a no-op for the other precisions."""
        return torch.amp.GradScaler(self.device.type, enabled=self.setting.precision == "fp16")

    def restart(self) -> None:
        """Back to the initial weights, buffers and empty optimiser state, in place.

        Every phase starts from the same model: the phases are then comparable steps of one training run's
        start, and a divergence in one phase does not carry into the next. In place, so a compiled model (and
        its CUDA graphs, which read the parameters where they are) stays valid.
        """
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                value.copy_(self._initial[key])
        self.optimizer.state.clear()  # SGD makes its momentum buffers again at the next step
        self.scaler = self._new_scaler()
        self.grad_norm = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:  # as the engine: the previous replay's outputs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            logits = self.forward(images)
        loss = self.criterion(logits.float(), targets)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def forward_flops_per_image(
    model: torch.nn.Module, image_size: int, device: torch.device, batch_size: int = 1
) -> float:
    """FLOPs of one image's forward in a batch of ``batch_size``: convolutions and matmuls, 2 per multiply-add (as
    FlopCounterMode). The GCN head computes its label classifiers once per batch: counted at batches of 1 and 2,
    that per-batch part is shared by the batch's images instead of charged to each."""
    was_training = model.training
    model.eval()  # no BatchNorm statistics update from this probe

    def flops(batch: int) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(batch, 3, image_size, image_size, device=device))
        return counter.get_total_flops()

    one, two = flops(1), flops(2)
    model.train(was_training)
    per_image = two - one
    return per_image + (one - per_image) / batch_size


def _synced_clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory(device: torch.device) -> dict:
    """Peak CUDA memory allocated since the last reset, and reserved by the caching allocator (allocated plus its
    cached blocks: what the process holds, less the CUDA context and library workspaces); on CPU the process's
    peak RSS (never reset)."""
    if device.type == "cuda":
        return {
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device),
            "peak_mem_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "peak_mem_kind": "cuda_max_allocated",
        }
    return {
        "peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_mem_reserved_bytes": None,
        "peak_mem_kind": "process_max_rss",
    }


class LoaderQueue:
    """The training loader's batches, able to drop the ones its workers made ahead.

    A DataLoader keeps ``workers x prefetch_factor`` batches requested. While the device is busy elsewhere (the
    first step compiles for a minute) all of them get made and wait; a timed window that starts on that full
    queue gets them for free, and overstates a loader slower than the model by up to the queue over the window
    (15 workers: 30 of 60 batches). :meth:`drop_queued` makes the next pull (always on the loop's thread: the
    prefetch helper only converts) first take and discard that many batches: after it, every worker is at work on
    a batch begun since, as in a long run whose loader cannot keep up. A loader that can keep up refills part of
    its queue in the untimed steps that follow (:func:`time_training`); its batches come as the steps need them
    whatever the queue's level.
    """

    def __init__(self, batches: Iterable, workers: int, prefetch_factor: int) -> None:
        self.workers = workers
        self.capacity = self.queued(workers, prefetch_factor)
        self.dropped = 0
        self._batches = iter(batches)
        self._drop = False

    @staticmethod
    def queued(workers: int, prefetch_factor: int) -> int:
        """Batches a DataLoader keeps requested from its workers (none in process: ``workers=0``)."""
        return workers * prefetch_factor

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> object:
        if self._drop:
            self._drop = False
            for _ in range(self.capacity):
                next(self._batches)
                self.dropped += 1
        return next(self._batches)

    def drop_queued(self) -> None:
        self._drop = True

    def drop_warmup_queue(self, depth: int) -> int:
        """After the warm-up: drop what the workers queued (:meth:`drop_queued`) and return how many untimed
        batches to take before a timed window (:func:`untimed_after_drop`; none without workers)."""
        if not self.capacity:
            return 0
        self.drop_queued()
        return untimed_after_drop(self.workers, depth)


def untimed_after_drop(workers: int, depth: int) -> int:
    """Steps between a :class:`LoaderQueue` drop and the timed window: the ``depth`` batches converted before the
    drop (and one spare), then a round of the ``workers`` (a batch from each) to be past their first batches begun
    since. The window then takes whole rounds (:func:`whole_rounds`): every worker makes as many of its batches."""
    return depth + 1 + workers


def time_training(
    step: TrainStep,
    batches: Iterable,
    to_inputs: Callable[[object], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    warmup: int,
    stream: torch.cuda.Stream | None = None,
    queue: LoaderQueue | None = None,
    depth: int = 0,
    profile: ProfileRequest | None = None,
) -> dict:
    """From the initial weights, on ``stream`` (None: the caller's), ``warmup`` untimed steps (the first one
    timed alone: compilation, cuDNN autotuning, worker start-up), then ``steps`` timed ones. The data wait is
    the host's time blocked on ``next(batches)``; the data stall, what throughput loses, is the time the training
    stream sat idle meanwhile (:class:`~mlgcn_dist.timing.DataStall`; on CUDA, else None). With the loader's
    ``queue`` (converted ``depth`` batches ahead), the batches its workers made during the warm-up are dropped and
    the timed steps wait for a round made since (:class:`LoaderQueue`). Divergence is tracked on the device (no
    per-step sync): the steps before the first non-finite loss and the largest pre-clip gradient norm, over
    warm-up, timed and profiled steps. With ``profile``, that many more steps run under torch.profiler after the
    timed ones (:func:`~mlgcn_dist.profiling.profile_steps`), outside every timing."""
    device = step.device
    step.restart()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    source = iter(batches)
    watch = DivergenceWatch(device)
    stall = DataStall(device)

    def run_one() -> tuple[float, int, torch.Tensor]:
        batch, waited = timed_next(source, stall)
        images, targets = to_inputs(batch)
        loss = step(images, targets)
        watch.update(loss, step.grad_norm)
        return waited, len(images), loss

    with running_on(stream):
        t0 = _synced_clock(device)
        _, _, first_loss = run_one()
        first_step_s = _synced_clock(device) - t0
        untimed = warmup - 1
        if queue is not None:
            untimed += queue.drop_warmup_queue(depth)
        for _ in range(untimed):
            run_one()
        warmup_s = _synced_clock(device) - t0
        data_wait = 0.0
        images = 0
        nonfinite = torch.zeros((), dtype=torch.long, device=device)  # timed steps with a non-finite loss
        stall.read()  # the warm-up's stalls are not the window's
        start = _synced_clock(device)
        for _ in range(steps):
            waited, count, loss = run_one()
            data_wait += waited
            images += count
            nonfinite += (~torch.isfinite(loss)).long()
        seconds = _synced_clock(device) - start
        stall_s = stall.read()
        profiled = None
        if profile is not None:

            def profiled_steps() -> None:
                for _ in range(profile.steps):
                    run_one()

            try:
                profiled = profile_steps(profiled_steps, profile, device)
            except RuntimeError as err:  # a diagnostic that fails (CUPTI, OOM) must not cost the measured phase
                profiled = {"trace": None, "steps": profile.steps, "device": None, "error": f"{err}".splitlines()[0]}
    return {
        "steps": steps,
        "images": images,
        "seconds": seconds,
        "queued_batches_dropped": 0 if queue is None else queue.dropped,
        "img_s": images / seconds,
        "step_ms": 1000 * seconds / steps,
        "data_wait_s": data_wait,
        "data_wait_frac": data_wait / seconds,
        "data_stall_s": stall_s,
        "data_stall_frac": None if stall_s is None else stall_s / seconds,
        "first_step_s": first_step_s,
        "warmup_s": warmup_s,  # every untimed step, the first included (CUDA graphs are recorded after it)
        "first_loss": float(first_loss),
        "final_loss": float(loss),
        # A diverged model trains at the same speed (dense kernels do not slow down on NaN), but says so.
        "nonfinite_steps": int(nonfinite),
        **watch.report(),
        **peak_memory(device),
        "setting": asdict(step.setting),
        "numerics": step.setting.numerics,
        "train_stream": "default" if stream is None else "side",
        "profile": profiled,
    }


class DivergenceWatch:
    """Where training first went non-finite and the largest gradient norm, counted on the device over every step
    (warm-up, timed and profiled ones): no per-step host sync."""

    def __init__(self, device: torch.device) -> None:
        self.taken = 0  # steps so far, compared with finite_run on the device
        self.finite_run = torch.zeros((), dtype=torch.long, device=device)  # steps before the first non-finite loss
        self.max_grad_norm = torch.zeros((), device=device)  # over finite norms (fp16's overflow steps have inf)
        self.nonfinite_norms = torch.zeros((), dtype=torch.long, device=device)
        self.clipped = False

    def update(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.finite_run = self.finite_run + (torch.isfinite(loss) & (self.finite_run == self.taken)).long()
        self.taken += 1
        if grad_norm is not None:
            self.clipped = True
            norm = grad_norm.float()
            finite = torch.isfinite(norm)
            self.max_grad_norm = torch.maximum(self.max_grad_norm, torch.where(finite, norm, 0.0))
            self.nonfinite_norms = self.nonfinite_norms + (~finite).long()

    def report(self) -> dict:
        diverged_at = int(self.finite_run)
        return {
            # 1-based step (warm-up included) of the first non-finite loss; None when every loss was finite.
            "first_nonfinite_step": None if diverged_at == self.taken else diverged_at + 1,
            "max_grad_norm": float(self.max_grad_norm) if self.clipped else None,
            "nonfinite_grad_norms": int(self.nonfinite_norms),
        }


def synthetic_phase(
    step: TrainStep,
    batch_size: int,
    image_size: int,
    num_classes: int,
    steps: int,
    warmup: int,
    stream: torch.cuda.Stream | None = None,
    profile: ProfileRequest | None = None,
) -> dict:
    """The ceiling: one batch of random images and sparse multi-hot targets, already on the device, reused."""
    device = step.device
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if step.setting.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(batch_size, num_classes, device=device) < 0.05).to(torch.int8)
    step.restart()
    eager_loss = step.eager_loss(images, targets)
    result = time_training(
        step, itertools.repeat(None), lambda _: (images, targets), steps, warmup, stream, profile=profile
    )
    # The same first loss from the uncompiled model: a compiled model whose first loss differs (or is not finite)
    # computes something else, which no number of steps explains.
    result["eager_first_loss"] = eager_loss
    return result


class ConversionClock:
    """Host time of the device conversion, per batch, on whichever thread runs it (the prefetch helper or the
    training loop); on the GPU path split into the decode call and the crop/resize/flip/normalise launches.

    torchvision's nvJPEG call returns when its own stream has finished decoding, so ``decode`` is the decode's
    latency on a device busy with training; ``augment`` only launches kernels. Their sum against the step time
    says whether the helper can keep up: at 1.0 of the step the helper is the limit. Medians over the phase's
    conversions: the first (nvJPEG's set-up, worker start-up) and those competing with compilation would move a
    mean.
    """

    PARTS = ("convert", "decode", "augment")

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def timed(self, part: str, fn: Callable, *args: object) -> object:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.samples.setdefault(part, []).append(time.perf_counter() - t0)

    def per_batch_ms(self) -> dict[str, float | None]:
        """Median host ms per converted batch of each part (None for a part this path does not have)."""
        return {
            f"{part}_ms": 1000 * statistics.median(self.samples[part]) if part in self.samples else None
            for part in self.PARTS
        }


class TimedGpuAugment(GpuAugment):
    """GpuAugment whose decode and apply calls are timed by ``clock``; what they compute is unchanged."""

    def __init__(self, size: int, train: bool, clock: ConversionClock) -> None:
        super().__init__(size, train)
        self.clock = clock

    def decode(self, jpegs: list[torch.Tensor], device: torch.device | str) -> tuple[list[torch.Tensor], list[int]]:
        return self.clock.timed("decode", super().decode, jpegs, device)

    def apply(
        self, images: list[torch.Tensor], params: list[CropParams], device: torch.device | str,
        channels_last: bool = False,
    ) -> torch.Tensor:
        return self.clock.timed("augment", super().apply, images, params, device, channels_last)


def timed_conversion(
    cfg: Config, decode: str, device: torch.device, channels_last: bool
) -> tuple[Callable[[dict], tuple[torch.Tensor, ...]], ConversionClock]:
    """The engine's ``to_device`` for ``decode`` (cpu: copies; gpu: decode + augment), timed per batch."""
    clock = ConversionClock()
    augment = TimedGpuAugment(cfg.data.image_size, train=True, clock=clock) if decode == "gpu" else None
    rng = random.Random(cfg.train.seed)

    def convert(batch: dict) -> tuple[torch.Tensor, ...]:
        return clock.timed("convert", to_device, batch, device, augment, rng, channels_last)

    return convert, clock


def augment_in_loop_conversion(
    cfg: Config, device: torch.device, channels_last: bool
) -> tuple[Callable[[dict], tuple[torch.Tensor, ...]], Callable[[tuple], tuple[torch.Tensor, torch.Tensor]],
           ConversionClock]:
    """The GPU path split between two threads: ``decode`` (for the prefetch helper) makes the nvJPEG call, which
    waits for the device without holding the GIL, and draws the crops; ``to_inputs`` (for the training loop)
    launches the crop/resize/flip/normalise kernels on the training stream. Same images as ``to_device``: the
    crops are drawn from the same ``rng`` in the same order. What it tests: whether the helper's many short
    torch calls, each taking the GIL back from the thread launching the step, cost more than launching the
    augment from that thread."""
    clock = ConversionClock()
    augment = TimedGpuAugment(cfg.data.image_size, train=True, clock=clock)
    rng = random.Random(cfg.train.seed)

    def decode(batch: dict) -> tuple[torch.Tensor, ...]:
        def run() -> tuple[torch.Tensor, ...]:
            images, kept = augment.decode(batch["jpeg"], device)
            batch["crops"] = augment.crops(images, rng)
            return (batch["target"][kept].to(device, non_blocking=True), *images)

        return clock.timed("convert", run)

    def to_inputs(pair: tuple[dict, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, (targets, *images) = pair
        return augment.apply(images, batch["crops"], device, channels_last), targets

    return decode, to_inputs, clock


def _decode_on(decode: str, device: torch.device) -> str:
    if decode == "cpu":
        return "cpu workers (PIL)"
    return "cuda (nvJPEG)" if device.type == "cuda" else "torchvision on cpu (no CUDA)"


def loader_phase(
    step: TrainStep,
    cfg: Config,
    decode: str,
    steps: int,
    warmup: int,
    depth: int | None = None,
    stream: torch.cuda.Stream | None = None,
    profile: ProfileRequest | None = None,
    augment_in_loop: bool = False,
) -> dict:
    """End to end: batches of the real training loader, moved (on the GPU path: decoded) by ``to_device`` as the
    engine does it, ``depth`` (default ``data.device_prefetch``) batches ahead on a helper thread and stream;
    the steps on ``stream`` (None: the default stream). The batches the workers made during the warm-up are
    dropped, and ``steps`` rounded up to whole rounds of the workers (:class:`LoaderQueue`). ``augment_in_loop``
    (GPU decode): the helper only decodes, the loop launches the augment (:func:`augment_in_loop_conversion`)."""
    depth = cfg.data.device_prefetch if depth is None else depth
    loader = build_train_loader(cfg.data, rank=0, world_size=1, epoch=0, seed=cfg.train.seed, decode=decode)
    queue = LoaderQueue(loader, cfg.data.workers, cfg.data.prefetch_factor)
    if augment_in_loop:
        convert, to_inputs, clock = augment_in_loop_conversion(cfg, step.device, step.setting.channels_last)
    else:
        convert, clock = timed_conversion(cfg, decode, step.device, step.setting.channels_last)

        def to_inputs(pair: tuple[dict, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
            images, targets, _ = pair[1]
            return images, targets

    with device_batches(queue, convert, step.device, depth) as pairs:
        timed = whole_rounds(steps, cfg.data.workers)
        result = time_training(step, pairs, to_inputs, timed, warmup, stream, queue, depth, profile)
    # Every conversion of the phase, the ones run ahead past the last step included.
    result.update(clock.per_batch_ms())
    result["convert_busy"] = result["convert_ms"] / result["step_ms"]
    result["device_prefetch"] = depth
    result["decode_on"] = _decode_on(decode, step.device)
    if augment_in_loop:
        result["decode_on"] += ", augment launched by the loop"
    return result


def data_path_phase(cfg: Config, device: torch.device, decode: str, batches: int, warmup: int) -> dict:
    """The input pipeline alone: loader + device conversion ``data.device_prefetch`` ahead, as in training, with
    no training step. Its img/s against the ceiling says whether the data path could keep up on an idle device;
    its per-batch times against the end-to-end phase's show what sharing the device with training costs.

    Timed as the end-to-end phases are: after the warm-up the batches the workers queued are dropped
    (:class:`LoaderQueue`), and the window takes whole rounds of the workers, so a loader that sets the pace is
    timed at its steady rate wherever a round begins."""
    depth = cfg.data.device_prefetch
    loader = build_train_loader(cfg.data, rank=0, world_size=1, epoch=0, seed=cfg.train.seed, decode=decode)
    queue = LoaderQueue(loader, cfg.data.workers, cfg.data.prefetch_factor)
    convert, clock = timed_conversion(cfg, decode, device, cfg.train.channels_last)
    timed = whole_rounds(batches, cfg.data.workers)
    images = 0
    with device_batches(queue, convert, device, depth) as pairs:
        for _ in range(warmup):
            next(pairs)
        for _ in range(queue.drop_warmup_queue(depth)):
            next(pairs)
        start = _synced_clock(device)  # the last untimed batch is on the device
        for _ in range(timed):
            _, (batch_images, _, _) = next(pairs)
            images += len(batch_images)
        seconds = _synced_clock(device) - start
    return {
        "decode_on": _decode_on(decode, device),
        "device_prefetch": depth,
        "batches": timed,
        "images": images,
        "seconds": seconds,
        "img_s": images / seconds,
        "queued_batches_dropped": queue.dropped,
        **clock.per_batch_ms(),
    }


def _progress(name: str, result: dict) -> dict:
    """Print a phase as soon as it is measured: a run cut short by a timeout still shows what it got."""
    print(
        f"[bench] {name}: {result['img_s']:.1f} img/s, data wait {result['data_wait_frac']:.1%}, "
        f"first step {result['first_step_s']:.1f} s",
        flush=True,
    )
    return result


def with_mfu(result: dict, train_flops: float, device_name: str) -> dict:
    """``result`` plus the achieved training TFLOP/s and their fraction of the device's peak (MFU)."""
    peak = peak_tflops(device_name, result["numerics"])
    achieved = train_flops * result["img_s"]
    return {
        **result,
        "peak_tflops": peak,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
    }


def ratios(phases: dict[str, dict]) -> dict[str, float]:
    """img/s of each end-to-end phase over the ceiling's and over the reference's."""
    return {
        f"{name}/{base}": phases[name]["img_s"] / phases[base]["img_s"]
        for name in phases
        if name.startswith("e2e_")
        for base in ("ceiling", "reference")
    }


def bench_device(cfg: Config) -> torch.device:
    return torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else "cpu")


def _configured_phases(
    cfg: Config, info: DatasetInfo, device: torch.device, steps: int, warmup: int, profiler: StepProfiler | None
) -> tuple[dict[str, dict], int]:
    """Ceiling and both end-to-end phases on one model (compiled once); also its forward FLOPs per image."""
    setting = run_setting(cfg, device)
    with cuda_numerics(setting):
        torch.manual_seed(cfg.train.seed)
        step = TrainStep(build_model_for(cfg, info), cfg, setting, device)
        forward_flops = forward_flops_per_image(step.model, cfg.data.image_size, device, cfg.data.batch_size)

        stream = side_stream(device, cfg.train.side_stream)

        def ceiling(name: str) -> dict:
            return synthetic_phase(
                step, cfg.data.batch_size, cfg.data.image_size, info.num_classes, steps, warmup, stream,
                request_for(profiler, name),
            )

        phases = {"ceiling": _progress("ceiling", ceiling("ceiling"))}

        def e2e(name: str, decode: str, **options: object) -> None:
            profile = request_for(profiler, name)
            phases[name] = _progress(name, loader_phase(step, cfg, decode, steps, warmup, profile=profile, **options))

        for decode in ("cpu", "gpu"):
            e2e(f"e2e_decode_{decode}", decode, stream=stream)
        if cfg.data.device_prefetch > 0:  # what running the device conversion ahead gains, in the same run
            e2e("e2e_decode_gpu_inline", "gpu", depth=0, stream=stream)
            # Only the decode ahead, on the helper; the loop launches the augment.
            e2e("e2e_decode_gpu_augment_in_loop", "gpu", stream=stream, augment_in_loop=True)
        if device.type == "cuda":  # GPU decode ahead with the steps on the other kind of stream (streams.py)
            other = not cfg.train.side_stream
            e2e(f"e2e_decode_gpu_{'side' if other else 'default'}_stream", "gpu", stream=side_stream(device, other))
        # The ceiling once more: how far the device itself drifted (clocks, temperature) over the phases.
        phases["ceiling_repeat"] = _progress("ceiling_repeat", ceiling("ceiling_repeat"))
    return phases, forward_flops


def _reference_phase(
    cfg: Config, info: DatasetInfo, device: torch.device, steps: int, warmup: int, profiler: StepProfiler | None
) -> dict:
    with cuda_numerics(ORIGINAL_MLGCN):
        torch.manual_seed(cfg.train.seed)
        step = TrainStep(build_model_for(cfg, info), cfg, ORIGINAL_MLGCN, device)
        # The original moved each batch inline (``input.cuda()``): no conversion ahead.
        profile = request_for(profiler, "reference")
        return _progress("reference", loader_phase(step, cfg, "cpu", steps, warmup, depth=0, profile=profile))


def bench_train(cfg: Config, steps: int, warmup: int, profiler: StepProfiler | None = None) -> dict:
    """All phases on ``cfg.data.shards``; returns the report (see the module docstring). With ``profiler``, each
    training phase ends with that many steps under torch.profiler (their device timeline in ``profile``)."""
    device = bench_device(cfg)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = dataset_info(cfg.data)
    phases, forward_flops = _configured_phases(cfg, info, device, steps, warmup, profiler)
    data_gpu = data_path_phase(cfg, device, "gpu", steps, warmup)
    print(f"[bench] data path alone (gpu decode): {data_gpu['img_s']:.1f} img/s", flush=True)
    if device.type == "cuda":  # the first model is gone: the reference's peak memory is its own
        torch.cuda.empty_cache()
    phases["reference"] = _reference_phase(cfg, info, device, steps, warmup, profiler)
    train_flops = TRAIN_FLOPS_PER_FORWARD * forward_flops
    phases = {name: with_mfu(result, train_flops, device_name) for name, result in phases.items()}
    loader = bench_loader(
        cfg.data.shards,
        "cpu",
        workers=cfg.data.workers,
        batches=warmup + steps,
        batch_size=cfg.data.batch_size,
        image_size=cfg.data.image_size,
    )
    return {
        "device": device_name,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "model": {"backbone": cfg.model.backbone, "head": cfg.model.head, "num_classes": info.num_classes},
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "workers": cfg.data.workers,
        "prefetch_factor": cfg.data.prefetch_factor,
        "steps": steps,
        "warmup": warmup,
        "flops": {"forward_per_image": forward_flops, "train_per_image": train_flops},
        "compile_s": phases["ceiling"]["first_step_s"] if cfg.train.compile else None,
        "phases": phases,
        "ratios": ratios(phases),
        "ceiling_drift": phases["ceiling_repeat"]["img_s"] / phases["ceiling"]["img_s"],
        "loader_cpu": loader,
        "data_gpu": data_gpu,
    }


# ---------------------------------------------------------------------------------------------- data


def make_toy_shards(workdir: Path, images: int, size: int, workers: int, seed: int) -> Path:
    """make-toy at ``size`` px (real-sized noisy JPEGs), packed into two shards per loader worker."""
    root, shards = workdir / "toy", workdir / "shards"
    make_toy(root, train=images, val=max(4, images // 16), size=size, seed=seed)
    pack_dataset(
        "coco",
        root,
        shards,
        ["train", "val"],
        shard_count=2 * max(workers, 1),
        workers=max(1, min(workers, os.cpu_count() or 1)),
        overwrite=True,
    )
    return shards


def describe_shards(shards: Path, split: str) -> dict:
    """Where the data came from, and the mean bytes of a training sample (its JPEG, json and tar headers)."""
    body = read_meta(shards)["splits"][split]
    total = sum((shards / s["file"]).stat().st_size for s in body["shards"])
    return {
        "shards": str(shards),
        "split": split,
        "images": body["count"],
        "mean_sample_bytes": total / max(body["count"], 1),
    }


def batches_per_phase(cfg: Config, steps: int, warmup: int, profiled: int = 0) -> int:
    """Batches in a phase's loader epoch: warm-up, the dropped queue and the untimed steps after it
    (:class:`LoaderQueue`), the timed steps in whole rounds of the workers, the ``profiled`` ones, then the
    ``data.device_prefetch`` batches the helper converts past the last step and one more round, so the timed window
    never sees the end of the epoch (workers that finished their share, uneven shares)."""
    workers, depth = cfg.data.workers, cfg.data.device_prefetch
    dropped = LoaderQueue.queued(workers, cfg.data.prefetch_factor)
    timed = whole_rounds(steps, workers)
    return warmup + dropped + untimed_after_drop(workers, depth) + timed + profiled + depth + max(workers, 1)


def point_config_at_shards(cfg: Config, shards: Path, batches: int) -> None:
    """Read ``shards`` whatever the config said, with one loader epoch covering every batch a phase takes."""
    dataset = read_meta(shards)["dataset"]
    for key, value in (
        ("data.format", "wds"),
        ("data.shards", str(shards)),
        ("data.dataset", dataset),
        ("data.train_split", TRAINING_SPLIT[dataset]),
        ("data.steps_per_epoch", batches),
    ):
        set_key(cfg, key, value, "bench")


# ---------------------------------------------------------------------------------------------- report


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict) -> str:
    """The phases as a table, then compile time, FLOPs and the loader's own rate."""
    setting = report["phases"]["ceiling"]["setting"]
    layout = "channels_last" if setting["channels_last"] else "NCHW"
    mode = "eager"
    if setting["compile"]:
        mode = "compile" if setting["compile_mode"] == "default" else f"compile ({setting['compile_mode']})"
    lines = [
        f"bench train on {report['device']}: {report['model']['backbone']}+{report['model']['head']} "
        f"@{report['image_size']}, batch {report['batch_size']}, {setting['precision']}, "
        f"{layout}, {mode}; "
        f"{report['steps']} timed steps after {report['warmup']} warmup (end to end: whole rounds of "
        f"{report['workers']} loader workers)",
        f"{'phase':30s}{'img/s':>9s}{'step ms':>9s}{'wait':>7s}{'stall':>7s}{'peak mem':>12s}{'MFU':>7s}"
        f"{'/ceiling':>10s}{'/reference':>11s}  decode",
    ]
    for name, p in report["phases"].items():
        vs = [report["ratios"].get(f"{name}/{base}") for base in ("ceiling", "reference")]
        lines.append(
            f"{name:30s}{p['img_s']:9.1f}{p['step_ms']:9.1f}{_percent(p['data_wait_frac']):>7s}"
            f"{_percent(p['data_stall_frac']):>7s}"
            f"{_gib(p['peak_mem_bytes']):>12s}{_percent(p['mfu']):>7s}"
            + "".join(f"{'' if v is None else f'{v:.2f}x':>{w}s}" for v, w in zip(vs, (10, 11)))
            + f"  {p.get('decode_on', 'synthetic on device')}{_ahead(p)}"
        )
    flops = report["flops"]
    loader = report["loader_cpu"]
    lines.append(
        f"ceiling re-measured after the end-to-end phases: {report['ceiling_drift']:.3f}x the first "
        "(the spread between two measurements of one setting)"
    )
    diverged = [
        f"{name} (from step {p['first_nonfinite_step']})"
        for name, p in report["phases"].items()
        if p["first_nonfinite_step"] is not None
    ]
    if diverged:
        lines.append(
            f"non-finite loss, each phase starting from the same weights: {', '.join(diverged)} "
            "(same kernels, same speed)"
        )
    ceiling = report["phases"]["ceiling"]
    if setting["compile"]:
        lines.append(
            f"first loss of the ceiling, compiled {ceiling['first_loss']:.4g} vs uncompiled "
            f"{ceiling['eager_first_loss']:.4g} (same weights and batch)"
        )
    norms = [
        f"{name} {p['max_grad_norm']:.3g}"
        + (f" ({p['nonfinite_grad_norms']} non-finite)" if p["nonfinite_grad_norms"] else "")
        for name, p in report["phases"].items()
        if p["max_grad_norm"] is not None
    ]
    if norms:
        lines.append(f"largest finite gradient norm before clipping: {', '.join(norms)}")
    lines += [
        f"{name}: conversion {_ms(p['convert_ms'])} a batch on the host ({p['convert_busy']:.0%} of the step)"
        + ("" if p["decode_ms"] is None else f"; decode {_ms(p['decode_ms'])}, augment {_ms(p['augment_ms'])}")
        for name, p in report["phases"].items()
        if "convert_ms" in p
    ]
    lines += _profile_lines(report["phases"])
    if report["compile_s"] is not None:
        lines.append(
            f"compile: first step took {report['compile_s']:.1f} s, the ceiling's whole warm-up "
            f"{report['phases']['ceiling']['warmup_s']:.1f} s (excluded from the timings)"
        )
    lines.append(
        f"FLOPs per image: forward {flops['forward_per_image'] / 1e9:.2f} G, "
        f"training ~{flops['train_per_image'] / 1e9:.2f} G"
    )
    lines.append(
        f"loader alone (cpu decode, {loader['workers']} workers): {loader['images_per_s']:.1f} img/s, "
        f"{loader['images_per_s_per_worker']:.1f} img/s per worker"
    )
    data = report["data_gpu"]
    lines.append(
        f"data path alone ({data['decode_on']}, {data['device_prefetch']} batches ahead, no training): "
        f"{data['img_s']:.1f} img/s; a batch: decode {_ms(data['decode_ms'])}, augment {_ms(data['augment_ms'])}"
    )
    return "\n".join(lines)


def _profile_lines(phases: dict[str, dict]) -> list[str]:
    """The profiled steps' device timeline per phase (none without --profile-dir)."""
    profiled = {name: p["profile"] for name, p in phases.items() if p.get("profile")}
    if not profiled:
        return []
    first = next(iter(profiled.values()))
    traces = {str(Path(p["trace"]).parent) for p in profiled.values() if p["trace"]}
    lines = [
        f"profiled: {first['steps']} steps after each phase's timed ones, traces in "
        f"{', '.join(sorted(traces)) or 'none'}; device ms a step (any stream: window = busy + idle):",
        f"  {'phase':30s}{'window':>8s}{'busy':>8s}{'idle':>8s}{'training stream':>17s}{'other streams':>15s}",
    ]
    for name, profile in profiled.items():
        timeline = profile["device"]
        if profile.get("error"):
            lines.append(f"  {name:30s} profiling failed: {profile['error']}")
            continue
        if timeline is None:
            lines.append(f"  {name:30s} no device activity recorded (no CUDA)")
            continue
        lines.append(
            f"  {name:30s}"
            + "".join(f"{timeline[key]:{w}.1f}" for key, w in (("window_ms", 8), ("busy_ms", 8), ("idle_ms", 8)))
            + f"{timeline['training_stream_ms']:17.1f}{timeline['other_streams_ms']:15.1f}"
        )
    return lines


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} ms"


def _ahead(phase: dict) -> str:
    depth = phase.get("device_prefetch")
    ahead = "" if not depth else f", {depth} batches ahead"
    return ahead + (", steps on a side stream" if phase["train_stream"] == "side" else "")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- command line


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """``mlgcn bench train ...``, ``mlgcn bench loader ...`` and ``mlgcn bench decode ...``."""
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    p = sub.add_parser(
        "train", help="training img/s: ceiling, end to end (cpu and gpu decode), ML-GCN reference"
    )
    p.add_argument("--config", help="YAML file in configs/ (default: the built-in defaults)")
    p.add_argument("--steps", type=positive_int, default=50, help="timed steps per phase")
    p.add_argument(
        "--warmup", type=positive_int, default=10, help="untimed steps before them (the first is reported)"
    )
    p.add_argument(
        "--shards", type=Path, help="a pack (meta.json + shards); default: a toy set made in a temp dir"
    )
    p.add_argument("--toy-images", type=positive_int, default=256, help="training images of the toy set")
    p.add_argument(
        "--toy-size", type=positive_int, default=640, help="long side of the toy images (640: ~180 KB)"
    )
    p.add_argument(
        "--json", type=Path, default=Path("runs/bench/train.json"), help="where to write the report"
    )
    p.add_argument(
        "--profile-dir",
        type=Path,
        help="after each phase's timed steps, profile --profile-steps more (torch.profiler): a Chrome trace per "
        "phase here, each step's device busy/idle time in the report",
    )
    p.add_argument("--profile-steps", type=positive_int, default=5, help="steps per profiled phase")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=64")
    p = sub.add_parser("loader", help="img/s of the training loader alone, total and per worker")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batches", type=positive_int, default=20)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--image-size", type=positive_int, default=448)
    p.add_argument(
        "--decode",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: the workers only read the JPEG bytes (decoding happens on the device)",
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    p = sub.add_parser("decode", help="GPU JPEG decode time idle and behind queued device work (CUDA)")
    add_decode_arguments(p)


def _run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.profile_dir is not None and args.profile_dir.exists() and not args.profile_dir.is_dir():
        print(f"mlgcn bench train: --profile-dir {args.profile_dir} exists and is not a directory", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mlgcn-bench-") as tmp:
        shards = args.shards or make_toy_shards(
            Path(tmp), args.toy_images, args.toy_size, cfg.data.workers, cfg.train.seed
        )
        profiler = None if args.profile_dir is None else StepProfiler(args.profile_dir, args.profile_steps)
        profiled = 0 if profiler is None else profiler.steps
        point_config_at_shards(cfg, shards, batches_per_phase(cfg, args.steps, args.warmup, profiled))
        report = bench_train(cfg, args.steps, args.warmup, profiler)
        report["data"] = describe_shards(shards, cfg.data.train_split)
        report["data"]["toy"] = None if args.shards else {"images": args.toy_images, "size": args.toy_size}
    print(format_report(report))
    _write_json(args.json, report)
    return 0


def _run_loader(args: argparse.Namespace) -> int:
    result = bench_loader(
        args.shards,
        args.decode,
        workers=args.workers,
        batches=args.batches,
        batch_size=args.batch_size,
        image_size=args.image_size,
    )
    print(" ".join(f"{key}={value}" for key, value in result.items()))
    if args.json:
        _write_json(args.json, result)
    return 0


def _run_decode(args: argparse.Namespace) -> int:
    report = run_decode_bench(args)
    if report is None:
        return 2
    if args.json:
        _write_json(args.json, report)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    return {"train": _run_train, "loader": _run_loader, "decode": _run_decode}[args.bench](args)
