"""Specifications of the profiled-steps timeline: device busy and idle time per step from a Chrome trace."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from mlgcn_dist.bench.profiling import ProfileRequest, StepProfiler, device_timeline, profile_steps, union_ms


def _kernel(stream: int, start_us: float, end_us: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": "k", "ts": start_us, "dur": end_us - start_us, "args": {"stream": stream}}


def test_union_counts_overlapping_intervals_once():
    assert union_ms([(0, 1000), (500, 1500), (3000, 4000), (3200, 3300)]) == pytest.approx(2.5)
    assert union_ms([]) == 0.0


def test_device_timeline_splits_each_steps_window_into_busy_and_idle_and_the_training_stream_from_the_others():
    # Training stream 7: 0-10 ms, 12-20 ms, a copy 20-22 ms; stream 13 (the input pipeline): 5-11 ms, overlapping
    # the first kernel. The device is idle only 11-12 ms. Two steps: every figure is per step.
    trace = {"traceEvents": [
        _kernel(7, 0, 10_000), _kernel(7, 12_000, 20_000), _kernel(7, 20_000, 22_000, cat="gpu_memcpy"),
        _kernel(13, 5_000, 11_000),
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": -50_000, "dur": 200_000},  # host work: not device
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 90_000},  # not a complete event
    ]}
    timeline = device_timeline(trace, steps=2)
    assert timeline == pytest.approx({"window_ms": 11.0, "busy_ms": 10.5, "idle_ms": 0.5, "training_stream_ms": 10.0,
                                      "other_streams_ms": 3.0, "streams": 2})


def test_device_timeline_is_none_when_nothing_ran_on_a_device():
    assert device_timeline({"traceEvents": [{"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 5}]}, steps=1) is None
    assert device_timeline({}, steps=1) is None


def test_profile_steps_runs_the_steps_once_and_keeps_a_gzipped_chrome_trace(tmp_path):
    calls = []

    def steps() -> None:
        for _ in range(3):
            calls.append(torch.ones(8, 8).matmul(torch.ones(8, 8)).sum())

    request = StepProfiler(tmp_path / "traces", steps=3).request("ceiling")
    assert request == ProfileRequest(tmp_path / "traces" / "ceiling.json.gz", 3)
    result = profile_steps(steps, request, torch.device("cpu"))
    assert len(calls) == 3
    assert result == {"trace": str(request.trace), "steps": 3, "device": None}  # no CUDA: no device timeline
    with gzip.open(request.trace, "rt") as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert "aten::matmul" in names


def test_memsets_are_device_work_and_the_other_streams_overlapping_work_counts_once():
    # Training stream 7: 0-10 ms; a memset on stream 9, 10-11 ms; the input pipeline on streams 13 and 14 at once,
    # 2-6 ms and 4-8 ms: 6 ms of the other streams' work together, not 8.
    trace = {"traceEvents": [_kernel(7, 0, 10_000), _kernel(9, 10_000, 11_000, cat="gpu_memset"),
                             _kernel(13, 2_000, 6_000), _kernel(14, 4_000, 8_000)]}
    timeline = device_timeline(trace, steps=1)
    assert timeline == pytest.approx({"window_ms": 11.0, "busy_ms": 11.0, "idle_ms": 0.0, "training_stream_ms": 10.0,
                                      "other_streams_ms": 7.0, "streams": 4})
