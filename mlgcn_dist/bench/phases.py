"""The phases of ``mlgcn bench train``, each a timed window (:func:`~mlgcn_dist.bench.window.time_training`) fed
its own way: synthetic tensors on the device (the ceiling), the real loader with the engine's device conversion
(end to end), and the data path alone, without training."""

from __future__ import annotations

import contextlib
import itertools
import random
import statistics
import time
from collections.abc import Callable

import torch

from mlgcn_dist.bench.profiling import ProfileRequest
from mlgcn_dist.bench.step import TrainStep
from mlgcn_dist.bench.window import (
    LoaderQueue,
    device_memory,
    synced_clock,
    taken_by_other_processes,
    time_training,
)
from mlgcn_dist.config import Config
from mlgcn_dist.data.augment_process import AugmentProcess
from mlgcn_dist.data.loader import build_train_loader, whole_rounds
from mlgcn_dist.data.prefetch import device_batches
from mlgcn_dist.data.transforms import CropParams, DeviceAugment, GpuAugment, to_device


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
            self.add(part, time.perf_counter() - t0)

    def add(self, part: str, seconds: float) -> None:
        """One batch's ``seconds`` of ``part``, timed elsewhere (the augment process times its own parts)."""
        self.samples.setdefault(part, []).append(seconds)

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
    cfg: Config, decode: str, device: torch.device, channels_last: bool, augment: DeviceAugment | None = None
) -> tuple[Callable[[dict], tuple[torch.Tensor, ...]], ConversionClock]:
    """The engine's ``to_device`` for ``decode`` (cpu: copies; gpu: decode + augment), timed per batch; on the GPU
    path with ``augment`` where given (timed as a whole), else with a GpuAugment timed in its parts."""
    clock = ConversionClock()
    if augment is None and decode == "gpu":
        augment = TimedGpuAugment(cfg.data.image_size, train=True, clock=clock)
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
            images, kept = augment.decode(batch["jpeg"].files(), device)
            batch["crops"] = augment.crops(images, rng)
            return (batch["target"][kept].to(device, non_blocking=True), *images)

        return clock.timed("convert", run)

    def to_inputs(pair: tuple[dict, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, (targets, *images) = pair
        return augment.apply(images, batch["crops"], device, channels_last), targets

    return decode, to_inputs, clock


def process_conversion(
    cfg: Config, device: torch.device, channels_last: bool
) -> tuple[Callable[[dict], tuple[torch.Tensor, ...]], ConversionClock, AugmentProcess]:
    """The engine's ``to_device`` with data.augment_process: the decode and augment in a process of their own (its
    start-up begun here), the helper only waiting for them. ``convert`` is the helper's whole wait a batch;
    ``decode`` and ``augment`` the child's host time in the nvJPEG call and the augment's launches, as the
    helper's are timed on the in-process path: a decode call much longer than the data path's alone waits for
    the device (on one GPU the two processes' CUDA contexts take turns). The caller closes the process."""
    process = AugmentProcess(device, cfg.data.image_size, channels_last, cfg.data.worker_timeout_s)
    process.start()
    timed, clock = timed_conversion(cfg, "gpu", device, channels_last, process.augment(train=True))

    def convert(batch: dict) -> tuple[torch.Tensor, ...]:
        converted = timed(batch)
        for part, seconds in process.last_batch_s.items():  # the batch just converted: calls are in order
            clock.add(part, seconds)
        return converted

    return convert, clock, process


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
    augment_process: bool = False,
) -> dict:
    """End to end: batches of the real training loader, moved (on the GPU path: decoded) by ``to_device`` as the
    engine does it, ``depth`` (default ``data.device_prefetch``) batches ahead on a helper thread and stream;
    the steps on ``stream`` (None: the default stream). The batches the workers made during the warm-up are
    dropped, and ``steps`` rounded up to whole rounds of the workers (:class:`LoaderQueue`). ``augment_in_loop``
    (GPU decode): the helper only decodes, the loop launches the augment (:func:`augment_in_loop_conversion`);
    ``augment_process``: the decode and augment in a process of their own (:func:`process_conversion`)."""
    depth = cfg.data.device_prefetch if depth is None else depth
    channels_last = step.setting.channels_last
    with contextlib.ExitStack() as stack:
        if augment_process:  # first: its start-up overlaps the loader's
            memory_before = device_memory(step.device)  # before the child has a CUDA context
            convert, clock, process = process_conversion(cfg, step.device, channels_last)
            stack.enter_context(process)
        elif augment_in_loop:
            convert, to_inputs, clock = augment_in_loop_conversion(cfg, step.device, channels_last)
        else:
            convert, clock = timed_conversion(cfg, decode, step.device, channels_last)
        if not augment_in_loop:
            to_inputs = _images_and_targets
        loader = build_train_loader(cfg.data, rank=0, world_size=1, epoch=0, seed=cfg.train.seed, decode=decode)
        queue = LoaderQueue(loader, cfg.data.workers, cfg.data.prefetch_factor)
        with device_batches(queue, convert, step.device, depth) as pairs:
            timed = whole_rounds(steps, cfg.data.workers)
            result = time_training(step, pairs, to_inputs, timed, warmup, stream, queue, depth, profile)
        if augment_process:  # what its CUDA context, nvJPEG and its allocator hold, the child still running
            result["augment_process_device_bytes"] = taken_by_other_processes(memory_before,
                                                                             device_memory(step.device))
    # Every conversion of the phase, the ones run ahead past the last step included.
    result.update(clock.per_batch_ms())
    result["convert_busy"] = result["convert_ms"] / result["step_ms"]
    result["device_prefetch"] = depth
    result["decode_on"] = _decode_on(decode, step.device)
    if augment_in_loop:
        result["decode_on"] += ", augment launched by the loop"
    result["augment_process"] = augment_process
    if augment_process:
        result["decode_on"] += ", decode and augment in a process of their own"
    return result


def _images_and_targets(pair: tuple[dict, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets, _ = pair[1]
    return images, targets


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
        start = synced_clock(device)  # the last untimed batch is on the device
        for _ in range(timed):
            _, (batch_images, _, _) = next(pairs)
            images += len(batch_images)
        seconds = synced_clock(device) - start
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
