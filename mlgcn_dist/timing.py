"""Where a training loop's time goes: images/s, the host's wait for data, and the device's stall on it.

The two waits differ on a GPU. Kernels run asynchronously: while the host blocks on ``next(batches)``, the
device may still be running the steps already queued, and loses nothing. What costs throughput is the time the
training stream has no step to run because the batch is late, measured here with CUDA events around each wait
and read only when the caller syncs anyway (at logging intervals, at the end of a timed window).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


class DataStall:
    """Seconds the current CUDA stream sat idle while the loop waited for its next batch.

    Call :meth:`waiting` before taking the batch and :meth:`got_batch` after. An event recorded at
    ``waiting`` completes when the stream has run everything queued before (the previous step, its EMA update,
    its bookkeeping); one recorded at ``got_batch`` completes when the stream reaches it, at once if the stream
    was idle by then. The time between the two is what the data wait cost the device: zero while queued steps
    still ran, and including any conversion queued on the training stream itself (inline decode). Device time
    lost elsewhere (a host busy logging) is not in it. Off CUDA execution is synchronous, the host's wait is the
    device's, and every method is a no-op (``read`` returns None).
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self._waits: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._since: torch.cuda.Event | None = None

    @staticmethod
    def _event() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def waiting(self) -> None:
        if self.enabled:
            self._since = self._event()

    def got_batch(self) -> None:
        if self.enabled and self._since is not None:
            self._waits.append((self._since, self._event()))
            self._since = None

    def read(self) -> float | None:
        """Stalled seconds since the last read (a host sync on the last recorded event)."""
        if not self.enabled:
            return None
        if self._waits:
            self._waits[-1][1].synchronize()
        stalled = sum(since.elapsed_time(got) for since, got in self._waits) / 1000
        self._waits.clear()
        return stalled


def timed_next(batches: Iterator[T], stall: DataStall) -> tuple[T, float]:
    """``next(batches)`` and the host seconds it blocked (the loader and the device conversion: the data wait),
    with the device's stall meanwhile recorded in ``stall``. StopIteration passes through, recording no wait."""
    t0 = time.perf_counter()
    stall.waiting()
    batch = next(batches)
    stall.got_batch()
    return batch, time.perf_counter() - t0


class ThroughputMeter:
    """Over a logging window: images/s, the fraction of wall time the host waited for data, and the fraction the
    device stalled on data (CUDA; None elsewhere, where the host's wait is the device's)."""

    def __init__(self, device: torch.device) -> None:
        self.images, self.data_wait, self.start = 0, 0.0, time.perf_counter()
        self.stall = DataStall(device)

    def window(self) -> tuple[float, float, float | None]:
        stalled = self.stall.read()  # first: it waits for the window's last batch, which the elapsed time covers
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = self.images / elapsed, self.data_wait / elapsed, None if stalled is None else stalled / elapsed
        self.images, self.data_wait, self.start = 0, 0.0, time.perf_counter()
        return rates
