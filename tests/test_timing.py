"""Where a loop's time goes: the throughput meter's window and the device-idle clock (CUDA parts in test_gpu.py)."""

from __future__ import annotations

import time

import pytest
import torch

from mlgcn_dist.timing import DeviceIdle, ThroughputMeter


def test_a_window_reports_images_per_second_and_the_hosts_wait_then_starts_afresh():
    meter = ThroughputMeter(torch.device("cpu"))
    time.sleep(0.05)
    meter.images, meter.data_wait = 10, 0.025
    img_s, wait_frac, idle_frac = meter.window()
    assert img_s == pytest.approx(10 / 0.05, rel=0.5) and wait_frac == pytest.approx(0.5, rel=0.5)
    assert idle_frac is None  # off CUDA the host's wait is the device's
    assert (meter.images, meter.data_wait) == (0, 0.0)


def test_device_idle_is_a_no_op_off_cuda():
    idle = DeviceIdle(torch.device("cpu"))
    idle.mark()
    idle.step_starts()
    idle.step_ended()
    assert not idle.enabled and idle.read() is None
