"""The device's timeline over a few training steps, from a torch.profiler trace.

:class:`~mlgcn_dist.timing.DataStall` sees one way a step loses device time: the training stream idles while
the loop waits for its batch. Two others leave it at zero and still slow the step down, and only a timeline tells
them apart:

* the step's kernels run slower, sharing the SMs with the input pipeline's (decode, augment): the device stays
  busy, the training stream's busy time per step grows;
* the host thread that launches the step's kernels (eagerly, or Inductor's Python wrapper under torch.compile)
  falls behind the device, held up by another thread (the prefetch helper: the GIL): the device idles between two
  kernels of one step.

:func:`profile_steps` runs a few steps under torch.profiler, keeps the Chrome trace (gzip, for Perfetto or
chrome://tracing) and :func:`device_timeline` sums the device activity per step: busy on any stream (overlaps
counted once), idle, the training stream's share (the stream with the most activity) and the other streams'.
:func:`host_timeline` sums the host side of the same steps: the time the threads that launch a step's kernels
spent inside PyTorch ops (the loop's thread: forward and optimizer; autograd's device thread: backward). A launch
thread held up by another one for the GIL shows there as ops that take longer than in the ceiling's profile;
:func:`host_breakdown` says which of them (the outermost spans by time), counts each thread's kernel launches and
times the loop's thread between two of its CUDA calls, while another thread issues its own and while none does.
CUPTI's tracing adds host time to every launch, so compare phases profiled alike, not a profiled step with an
unprofiled one.
"""

from __future__ import annotations

import bisect
import gzip
import json
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# Chrome-trace categories of work that occupies the device (kineto's names).
DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
# Host-side calls into CUDA: kernel launches, copies, event records, synchronisations.
CUDA_API_CATEGORIES = frozenset({"cuda_runtime", "cuda_driver"})
# Another thread's CUDA calls less than this apart (us) are one stretch of its work; the loop thread's gaps of
# at least a millisecond are waits (for a batch, for the device), not the time it takes to launch the next call.
OTHERS_STRETCH_US = 300.0
WAIT_US = 1000.0


@dataclass(frozen=True)
class ProfileRequest:
    """Profile ``steps`` training steps after a phase's timed ones; write the trace to ``trace``."""

    trace: Path
    steps: int


@dataclass(frozen=True)
class StepProfiler:
    """Where a run's traces go, one per phase, and how many steps each covers."""

    out_dir: Path
    steps: int

    def request(self, phase: str) -> ProfileRequest:
        return ProfileRequest(self.out_dir / f"{phase}.json.gz", self.steps)


def request_for(profiler: StepProfiler | None, phase: str) -> ProfileRequest | None:
    """``phase``'s request from ``profiler``; None when the run profiles nothing."""
    return None if profiler is None else profiler.request(phase)


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals in microseconds (trace units), in milliseconds."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total / 1000


def device_timeline(trace: dict, steps: int) -> dict | None:
    """Per step, in ms: the window from the first device activity to the last, the time the device was busy on
    any stream, idle, busy on the training stream (the stream with the most activity: the steps'), and busy on
    the others together (input pipeline, collectives). None when the trace holds no device activity (a run
    without CUDA)."""
    by_stream: dict[object, list[tuple[float, float]]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("cat") in DEVICE_CATEGORIES:
            start = float(event["ts"])
            stream = event.get("args", {}).get("stream")
            by_stream.setdefault(stream, []).append((start, start + float(event.get("dur", 0.0))))
    if not by_stream:
        return None
    everything = [interval for intervals in by_stream.values() for interval in intervals]
    window = (max(end for _, end in everything) - min(start for start, _ in everything)) / 1000
    busy = union_ms(everything)
    per_stream = {stream: union_ms(intervals) for stream, intervals in by_stream.items()}
    training = max(per_stream, key=per_stream.__getitem__)
    others = [interval for stream, intervals in by_stream.items() if stream != training for interval in intervals]
    return {
        "window_ms": window / steps,
        "busy_ms": busy / steps,
        "idle_ms": (window - busy) / steps,
        "training_stream_ms": per_stream[training] / steps,
        "other_streams_ms": union_ms(others) / steps,
        "streams": len(by_stream),
    }


def host_timeline(trace: dict, steps: int) -> dict | None:
    """Per step, in ms: the host time inside PyTorch ops (nested ops counted once) of the loop's thread, the one
    that steps the optimizer (forward, loss, optimizer), and of the backward's thread where it is another one
    (autograd runs a CUDA backward on a device thread of its own; on the CPU, in the caller's: None). Under
    torch.compile the compiled regions' spans include their Python wrappers, so a wrapper that waits for the GIL
    shows as a longer span. None when the trace holds no ops."""
    host = _host_events(trace)
    if host is None:
        return None
    return {
        "loop_thread_ms": union_ms(host.ops[host.loop]) / steps,
        "backward_thread_ms": None if host.backward is None else union_ms(host.ops[host.backward]) / steps,
    }


def host_breakdown(trace: dict, steps: int, top: int = 4) -> dict | None:
    """Where the launch threads' host time goes, per step: for the loop's thread and the backward's, the ``top``
    outermost spans (ops and annotations such as ``Optimizer.step``) by time, as ``[name, ms, calls]``; and the
    kernel launches (CUDA runtime and driver calls) of the loop's thread, the backward's and every other thread
    together (the prefetch helper's); and :func:`launch_gaps`. Which part of a host-bound step to shorten, and
    whether a phase slowed one part or all of them. None when the trace holds no ops."""
    host = _host_events(trace)
    if host is None:
        return None
    loop, backward = host.loop, host.backward
    others = sum(n for tid, n in host.launches.items() if tid not in (loop, backward))
    return {
        "loop": _outermost(host.spans.get(loop, []), steps, top),
        "backward": None if backward is None else _outermost(host.spans.get(backward, []), steps, top),
        "launches": {"loop": host.launches.get(loop, 0) / steps,
                     "backward": None if backward is None else host.launches.get(backward, 0) / steps,
                     "others": others / steps},
        "gaps": launch_gaps(host),
    }


def launch_gaps(host: _HostEvents) -> dict | None:
    """How quickly the loop's thread issues its CUDA calls, and whether the other threads' work slows it: the
    median time in microseconds from the end of one of its CUDA calls to the start of the next (a gap of
    :data:`WAIT_US` or more is a wait, left out), over all its gaps, over those during which a thread other than
    the loop's and the backward's (the prefetch helper, the pinning thread) was issuing CUDA calls (its calls less
    than :data:`OTHERS_STRETCH_US` apart taken as one stretch of work), and over the rest; and the fraction of
    gaps in the first group. Between two launches the thread runs Python (Inductor's wrapper) and torch's
    dispatch: a helper holding the GIL, or threads spinning on its cores, lengthen them. None without two CUDA
    calls on the loop's thread."""
    mine = sorted(host.cuda_calls.get(host.loop, []))
    if len(mine) < 2:
        return None
    stretches: list[list[float]] = []
    theirs = sorted(call for tid, calls in host.cuda_calls.items() if tid not in (host.loop, host.backward)
                    for call in calls)
    for start, end in theirs:
        if stretches and start - stretches[-1][1] < OTHERS_STRETCH_US:
            stretches[-1][1] = max(stretches[-1][1], end)
        else:
            stretches.append([start, end])
    starts = [start for start, _ in stretches]

    def others_working(start: float, end: float) -> bool:
        last = bisect.bisect_right(starts, end) - 1  # stretches do not overlap: only the last to start can reach
        return last >= 0 and stretches[last][1] >= start

    busy: list[float] = []
    quiet: list[float] = []
    for (_, end), (start, _) in zip(mine, mine[1:]):
        if 0 <= start - end < WAIT_US:
            (busy if others_working(end, start) else quiet).append(start - end)
    gaps = busy + quiet
    return {
        "median_us": statistics.median(gaps) if gaps else None,
        "others_working_median_us": statistics.median(busy) if busy else None,
        "others_quiet_median_us": statistics.median(quiet) if quiet else None,
        "others_working_fraction": len(busy) / len(gaps) if gaps else None,
    }


def _outermost(events: list[dict], steps: int, top: int) -> list[list]:
    """The spans not inside another one, summed by name: the ``top`` longest as ``[name, ms a step, calls a
    step]``."""
    total: dict[str, float] = {}
    calls: dict[str, int] = {}
    reached = float("-inf")
    for event in sorted(events, key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0)))):
        start = float(event["ts"])
        if start < reached:
            continue  # nested in the span before
        reached = start + float(event.get("dur", 0.0))
        name = str(event.get("name", ""))
        total[name] = total.get(name, 0.0) + float(event.get("dur", 0.0))
        calls[name] = calls.get(name, 0) + 1
    ranked = sorted(total, key=total.__getitem__, reverse=True)[:top]
    return [[name, total[name] / 1000 / steps, calls[name] / steps] for name in ranked]


@dataclass
class _HostEvents:
    """A trace's host side, read in one pass: the ops' intervals per thread, the spans (ops and annotations) per
    thread, the kernel launches per thread, the CUDA calls' intervals per thread, the loop's thread and the
    backward's (None where it is the loop's)."""

    ops: dict[object, list[tuple[float, float]]]
    spans: dict[object, list[dict]]
    launches: dict[object, int]
    cuda_calls: dict[object, list[tuple[float, float]]]
    loop: object
    backward: object


def _host_events(trace: dict) -> _HostEvents | None:
    """The trace's :class:`_HostEvents`. The loop's thread is the one that steps the optimizer, else the one with
    the most time inside ops; autograd's backward thread, the other one that runs most autograd nodes (a few may
    run on the loop's). None when the trace holds no ops."""
    ops: dict[object, list[tuple[float, float]]] = {}
    spans: dict[object, list[dict]] = {}
    launches: dict[object, int] = {}
    cuda_calls: dict[object, list[tuple[float, float]]] = {}
    backward_nodes: dict[object, int] = {}
    loop = None
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "X":
            continue
        name, tid, category = str(event.get("name", "")), event.get("tid"), event.get("cat")
        if category == "user_annotation":
            spans.setdefault(tid, []).append(event)
            if name.startswith("Optimizer.step"):  # not its device copy (gpu_user_annotation)
                loop = tid
        elif category == "cpu_op":
            spans.setdefault(tid, []).append(event)
            start = float(event["ts"])
            ops.setdefault(tid, []).append((start, start + float(event.get("dur", 0.0))))
            if name.startswith("autograd::engine::evaluate_function"):
                backward_nodes[tid] = backward_nodes.get(tid, 0) + 1
        elif category in CUDA_API_CATEGORIES:
            start = float(event["ts"])
            cuda_calls.setdefault(tid, []).append((start, start + float(event.get("dur", 0.0))))
            if "Launch" in name:
                launches[tid] = launches.get(tid, 0) + 1
    if not ops:
        return None
    if loop not in ops:  # no optimizer step recorded: the thread with the most time inside ops
        loop = max(ops, key=lambda tid: union_ms(ops[tid]))
    backward_nodes.pop(loop, None)
    backward = max(backward_nodes, key=backward_nodes.__getitem__, default=None)
    return _HostEvents(ops, spans, launches, cuda_calls, loop, backward)


def profile_steps(run: Callable[[], object], request: ProfileRequest, device: torch.device) -> dict:
    """``run()`` (``request.steps`` training steps) under torch.profiler, up to the device's last kernel; the
    gzipped Chrome trace at ``request.trace``; the trace's path, the step count, :func:`device_timeline` and
    :func:`host_timeline`."""
    device = torch.device(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    request.trace.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlgcn-trace-") as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        text = raw.read_bytes()  # read once: parsed here, kept gzipped
    request.trace.write_bytes(gzip.compress(text))
    trace = json.loads(text)
    return {"trace": str(request.trace), "steps": request.steps, "device": device_timeline(trace, request.steps),
            "host": host_timeline(trace, request.steps), "host_ops": host_breakdown(trace, request.steps)}
