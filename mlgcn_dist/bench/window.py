"""The timed window of a phase: warm-up, timed steps, optional profiled steps, and what is read off them (img/s,
data wait and stall, divergence, peak memory, what the host's CPUs did), with the loader's warm-up queue dropped
first."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from typing import NamedTuple

import torch

from mlgcn_dist.bench import host
from mlgcn_dist.bench.profiling import ProfileRequest, profile_steps
from mlgcn_dist.bench.step import TrainStep
from mlgcn_dist.errors import first_line
from mlgcn_dist.streams import running_on
from mlgcn_dist.timing import DataStall, timed_next


def synced_clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class DeviceMemory(NamedTuple):
    """A moment's CUDA memory: the device's in use, by every process (its total less its free), and this
    process's caching allocator's reserve."""

    used: int
    reserved: int


def device_memory(device: torch.device) -> DeviceMemory | None:
    """:class:`DeviceMemory` now, on CUDA; None elsewhere."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total - free, torch.cuda.memory_reserved(device))


def taken_by_other_processes(before: DeviceMemory | None, after: DeviceMemory | None) -> int | None:
    """Device memory other processes took between ``before`` and ``after``: how much more the device's use grew
    than this process's allocator reserve did. It counts their CUDA contexts and the buffers libraries allocate
    beside PyTorch's allocator, which their own allocator statistics leave out; it assumes this process's memory
    outside its allocator stayed put meanwhile (its context and workspaces were made by earlier phases)."""
    if before is None or after is None:
        return None
    return (after.used - before.used) - (after.reserved - before.reserved)


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
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    return {
        "peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit,
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
    warm-up, timed and profiled steps. What the host's CPUs did over the timed steps, read at their two ends, is
    in ``host`` (:func:`~mlgcn_dist.bench.host.host_window`). With ``profile``, that many more steps run under
    torch.profiler after the timed ones (:func:`~mlgcn_dist.bench.profiling.profile_steps`), outside every
    timing."""
    device = step.device
    step.restart()
    if device.type == "cuda":
        # The reset sets each peak to the current value: the cached blocks of earlier phases would otherwise count
        # in this phase's reserved peak.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
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
        t0 = synced_clock(device)
        _, _, first_loss = run_one()
        first_step_s = synced_clock(device) - t0
        untimed = warmup - 1
        if queue is not None:
            untimed += queue.drop_warmup_queue(depth)
        for _ in range(untimed):
            run_one()
        warmup_s = synced_clock(device) - t0
        data_wait = 0.0
        images = 0
        nonfinite = torch.zeros((), dtype=torch.long, device=device)  # timed steps with a non-finite loss
        stall.read()  # the warm-up's stalls are not the window's
        host_before = host.sample()  # outside the window: /proc reads take a fraction of a ms
        start = synced_clock(device)
        for _ in range(steps):
            waited, count, loss = run_one()
            data_wait += waited
            images += count
            nonfinite += (~torch.isfinite(loss)).long()
        seconds = synced_clock(device) - start
        host_window = host.host_window(host_before, host.sample(), steps, seconds, host.core_mhz())
        stall_s = stall.read()
        profiled = None
        if profile is not None:

            def profiled_steps() -> None:
                for _ in range(profile.steps):
                    run_one()

            try:
                profiled = profile_steps(profiled_steps, profile, device)
            except (RuntimeError, OSError) as err:  # a diagnostic that fails (CUPTI, OOM, its trace file) must not
                # cost the measured phase
                profiled = {"trace": None, "steps": profile.steps, "device": None, "host": None,
                            "error": first_line(err)}
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
        "host": host_window,
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
