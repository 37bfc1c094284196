"""Where a loop's time goes: the throughput meter's window and the data-stall clock (CUDA parts in test_gpu.py)."""

from __future__ import annotations

import time

import pytest
import torch

from mlgcn_dist.timing import DataStall, ThroughputMeter, timed_next


def test_a_window_reports_images_per_second_and_the_hosts_wait_then_starts_afresh():
    meter = ThroughputMeter(torch.device("cpu"))
    time.sleep(0.05)
    meter.images, meter.data_wait = 10, 0.025
    img_s, wait_frac, stall_frac = meter.window()
    assert img_s == pytest.approx(10 / 0.05, rel=0.5) and wait_frac == pytest.approx(0.5, rel=0.5)
    assert stall_frac is None  # off CUDA the host's wait is the device's
    assert (meter.images, meter.data_wait) == (0, 0.0)


def test_the_data_stall_clock_is_a_no_op_off_cuda():
    stall = DataStall(torch.device("cpu"))
    stall.waiting()
    stall.got_batch()
    assert not stall.enabled and stall.read() is None


def test_timed_next_returns_the_batch_with_the_seconds_the_host_blocked_and_passes_the_end_of_the_epoch_through():
    def slow_loader():
        time.sleep(0.05)
        yield "batch"

    batches, stall = slow_loader(), DataStall(torch.device("cpu"))
    batch, waited = timed_next(batches, stall)
    assert batch == "batch" and waited >= 0.05
    with pytest.raises(StopIteration):
        timed_next(batches, stall)
