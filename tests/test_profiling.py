"""Specifications of the profiled-steps timeline: device busy and idle time per step from a Chrome trace."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from mlgcn_dist.bench.profiling import (
    ProfileRequest,
    StepProfiler,
    device_timeline,
    host_breakdown,
    host_timeline,
    profile_steps,
    union_ms,
)


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
    assert result["device"] is None  # no CUDA: no device timeline
    assert result["trace"] == str(request.trace) and result["steps"] == 3 and result["host"]["loop_thread_ms"] > 0
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


def _op(tid: int, name: str, start_ms: float, end_ms: float, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "tid": tid, "ts": start_ms * 1000, "dur": (end_ms - start_ms) * 1000}


def test_host_timeline_sums_the_loop_threads_and_the_backward_threads_time_inside_ops_per_step():
    # Two steps. Thread 1 runs the loop: a compiled forward 0-30 ms with an op nested in it, the optimizer
    # 60-70 ms (its annotation is how the loop's thread is known); thread 2, autograd's device thread, the
    # backward 30-58 ms; thread 3, the prefetch helper, only launches (runtime calls are not ops).
    trace = {"traceEvents": [
        _op(1, "Torch-Compiled Region: 0/0", 0, 30), _op(1, "aten::mm", 5, 10),
        _op(1, "Optimizer.step#SGD.step", 60, 70, cat="user_annotation"), _op(1, "aten::_foreach_add_", 61, 69),
        _op(2, "autograd::engine::evaluate_function: CompiledFunctionBackward", 30, 58),
        _op(3, "cudaLaunchKernel", 31, 32, cat="cuda_runtime"),
        _op(7, "Optimizer.step#SGD.step", 61, 75, cat="gpu_user_annotation"),  # the device's copy: stream 7
        {"ph": "i", "cat": "cpu_op", "name": "marker", "tid": 1, "ts": 0},  # not a complete event
    ]}
    assert host_timeline(trace, steps=2) == pytest.approx({"loop_thread_ms": 19.0, "backward_thread_ms": 14.0})


def test_a_backward_run_by_the_loops_own_thread_counts_for_the_loop_and_no_trace_of_ops_gives_none():
    # On the CPU autograd runs the backward in the caller's thread; without an optimizer annotation the loop's
    # thread is the one with the most time inside ops.
    trace = {"traceEvents": [_op(1, "aten::conv2d", 0, 10), _op(1, "autograd::engine::evaluate_function: X", 10, 25),
                             _op(4, "aten::copy_", 0, 3)]}
    assert host_timeline(trace, steps=1) == {"loop_thread_ms": 25.0, "backward_thread_ms": None}
    assert host_timeline({"traceEvents": [_op(1, "k", 0, 1, cat="kernel")]}, steps=1) is None


def test_host_breakdown_ranks_each_launch_threads_outermost_spans_and_counts_every_threads_launches():
    # Two steps. The loop's thread: a compiled forward with an op nested in it (counted in the forward alone), the
    # optimizer's annotation around its op, two clipping ops; autograd's thread: the compiled backward and two
    # gradient accumulations a step; a helper: launches only.
    trace = {"traceEvents": [
        _op(1, "Torch-Compiled Region: 0/0", 0, 20), _op(1, "aten::mm", 5, 10),
        _op(1, "cuLaunchKernel", 6, 6.1, cat="cuda_driver"), _op(1, "cudaLaunchKernel", 21, 21.1, cat="cuda_runtime"),
        _op(1, "Optimizer.step#SGD.step", 30, 34, cat="user_annotation"), _op(1, "aten::_foreach_add", 31, 33),
        _op(1, "aten::_foreach_norm", 35, 36), _op(1, "aten::_foreach_norm", 37, 38),
        _op(2, "autograd::engine::evaluate_function: CompiledFunctionBackward", 20, 28),
        _op(2, "autograd::engine::evaluate_function: AccumulateGrad", 28, 28.5),
        _op(2, "autograd::engine::evaluate_function: AccumulateGrad", 28.5, 29),
        _op(2, "cuLaunchKernel", 21, 21.1, cat="cuda_driver"),
        _op(3, "cudaLaunchKernel", 22, 22.1, cat="cuda_runtime"), _op(3, "cudaEventRecord", 23, 23.1, cat="cuda_runtime"),
        _op(7, "Optimizer.step#SGD.step", 31, 35, cat="gpu_user_annotation"),  # the device's copy
    ]}
    breakdown = host_breakdown(trace, steps=2, top=3)
    assert breakdown["loop"] == [["Torch-Compiled Region: 0/0", 10.0, 0.5], ["Optimizer.step#SGD.step", 2.0, 0.5],
                                 ["aten::_foreach_norm", 1.0, 1.0]]  # exact: whole microseconds
    assert breakdown["backward"] == [["autograd::engine::evaluate_function: CompiledFunctionBackward", 4.0, 0.5],
                                     ["autograd::engine::evaluate_function: AccumulateGrad", 0.5, 1.0]]
    assert breakdown["launches"] == {"loop": 1.0, "backward": 0.5, "others": 0.5}
    assert host_breakdown({"traceEvents": [_op(1, "k", 0, 1, cat="kernel")]}, steps=1) is None


def _call(tid: int, start_us: float, end_us: float, name: str = "cudaLaunchKernel") -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": name, "tid": tid, "ts": start_us, "dur": end_us - start_us}


def test_the_loop_threads_gaps_between_cuda_calls_are_split_by_whether_another_thread_issues_calls_then():
    # The loop's thread (it steps the optimizer) makes CUDA calls with gaps of 10, 20, 2,967 (a wait: left out) and
    # 10 us. A helper's two calls 40 us apart, at 0.2 and 40 us, are one stretch of work that spans the first two
    # gaps, though neither call falls in one. Autograd's thread calls in the last gap: its calls are the step's
    # own, not another thread's work.
    trace = {"traceEvents": [
        _op(1, "Optimizer.step#SGD.step", 0, 4, cat="user_annotation"), _op(1, "aten::_foreach_add", 0, 3),
        _op(2, "autograd::engine::evaluate_function: X", 0, 1),
        _call(1, 0, 1), _call(1, 11, 12, "cudaMemcpyAsync"), _call(1, 32, 33, "cuLaunchKernel"),
        _call(1, 3000, 3001), _call(1, 3011, 3012),
        _call(2, 3005, 3006),
        _call(3, 0.2, 0.4), _call(3, 40, 41, "cudaEventRecord"),
    ]}
    assert host_breakdown(trace, steps=1)["gaps"] == {
        "median_us": 10.0, "others_working_median_us": 15.0, "others_quiet_median_us": 10.0,
        "others_working_fraction": pytest.approx(2 / 3),
    }
    helper_later = {"traceEvents": [e for e in trace["traceEvents"] if e["tid"] != 3] + [_call(3, 3100, 3101)]}
    assert host_breakdown(helper_later, steps=1)["gaps"]["others_working_median_us"] is None
    one_call = {"traceEvents": [_op(1, "aten::mm", 0, 1), _call(1, 0, 1), _call(3, 2, 3)]}
    assert host_breakdown(one_call, steps=1)["gaps"] is None
