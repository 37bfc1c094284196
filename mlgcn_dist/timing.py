"""Where a training loop's time goes: images/s, the host's wait for data, and the device's idle time.

The two waits differ on a GPU. Kernels run asynchronously: while the host blocks on ``next(batches)``, the
device may still be running the steps already queued, and loses nothing. What costs throughput is the time the
training stream has no work, measured here with CUDA events recorded around each step, read only when the caller
syncs anyway (at logging intervals, at the end of a timed window).
"""

from __future__ import annotations

import time

import torch


class ThroughputMeter:
    """Over a logging window: images/s, the fraction of wall time the host waited for data, and the fraction the
    device's training stream sat idle (CUDA; None elsewhere, where the host's wait is the device's)."""

    def __init__(self, device: torch.device) -> None:
        self.images, self.data_wait, self.start = 0, 0.0, time.perf_counter()
        self.idle = DeviceIdle(device)
        self.idle.mark()

    def window(self) -> tuple[float, float, float | None]:
        idle = self.idle.read()  # first: it waits for the window's last step, which the elapsed time must cover
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = self.images / elapsed, self.data_wait / elapsed, None if idle is None else idle / elapsed
        self.images, self.data_wait, self.start = 0, 0.0, time.perf_counter()
        return rates


class DeviceIdle:
    """Seconds the current CUDA stream sat idle between training steps.

    Call :meth:`step_starts` after the batch is taken and before the step's first kernel is queued, and
    :meth:`step_ended` after its last. The gap between a step's end event and the next step's start event is
    time the stream had nothing to run: the host was late to queue the step (it waited for data, or for
    anything else), or the stream waited inside for the batch's conversion (``wait_event``). :meth:`mark` opens a
    window at the current point of the stream (the caller has just synced); :meth:`read` waits for the events
    recorded so far and returns the idle seconds since the last read. Off CUDA execution is synchronous, the
    host's wait is the device's, and every method is a no-op returning None.
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self._gaps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._last_end: torch.cuda.Event | None = None

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> None:
        """From here on: the gaps before this point are dropped, the next step's gap counts from here."""
        if self.enabled:
            self._gaps.clear()
            self._last_end = self._event()

    def step_starts(self) -> None:
        if self.enabled:
            start = self._event()
            if self._last_end is not None:
                self._gaps.append((self._last_end, start))

    def step_ended(self) -> None:
        if self.enabled:
            self._last_end = self._event()

    def read(self) -> float | None:
        """Idle seconds since the last read or mark (a host sync on the last recorded event)."""
        if not self.enabled:
            return None
        if self._last_end is not None:
            self._last_end.synchronize()
        idle = sum(end.elapsed_time(start) for end, start in self._gaps) / 1000
        self._gaps.clear()
        return idle
