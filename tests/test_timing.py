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
    assert not DataStall(torch.device("mps")).enabled  # CUDA events time CUDA streams alone
    assert DataStall(torch.device("cuda")).enabled


def test_timed_next_returns_the_batch_with_the_seconds_the_host_blocked_and_passes_the_end_of_the_epoch_through():
    def slow_loader():
        time.sleep(0.05)
        yield "batch"

    batches, stall = slow_loader(), DataStall(torch.device("cpu"))
    batch, waited = timed_next(batches, stall)
    assert batch == "batch" and waited >= 0.05
    with pytest.raises(StopIteration):
        timed_next(batches, stall)


class FakeClock:
    """time.perf_counter, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_window_measures_from_the_end_of_the_previous_one(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    meter = ThroughputMeter(torch.device("cpu"))
    clock.now += 8.0
    meter.images, meter.data_wait = 80, 2.0
    assert meter.window() == (10.0, 0.25, None)
    clock.now += 2.0
    meter.images, meter.data_wait = 40, 1.0
    assert meter.window() == (20.0, 0.5, None)  # 40 images in the 2 s since the last window, not in 10 s


class FakeEvent:
    """A CUDA event on a clock in milliseconds, as ``torch.cuda.Event.elapsed_time`` reports."""

    def __init__(self, ms: float) -> None:
        self.ms, self.synchronized = ms, False

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.ms - self.ms

    def synchronize(self) -> None:
        self.synchronized = True


def test_the_data_stall_clock_adds_up_each_wait_in_seconds_and_starts_afresh_after_a_read(monkeypatch):
    stall = DataStall(torch.device("cpu"))
    stall.enabled = True  # the CUDA clock, its events faked
    events = [FakeEvent(ms) for ms in (0.0, 30.0, 50.0, 60.0, 100.0, 105.0)]
    monkeypatch.setattr(DataStall, "_event", staticmethod(iter(events).__next__))
    for _ in range(2):
        stall.waiting()
        stall.got_batch()
    assert stall.read() == pytest.approx(0.040)  # 30 ms + 10 ms
    assert events[3].synchronized  # the read waited for the last batch's event
    stall.got_batch()  # no wait in progress: nothing recorded
    assert stall.read() == 0.0
    stall.waiting()
    stall.got_batch()
    assert stall.read() == pytest.approx(0.005)


def test_a_windows_stall_is_the_share_of_its_seconds_the_device_sat_idle_on_data(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    meter = ThroughputMeter(torch.device("cpu"))
    monkeypatch.setattr(meter.stall, "read", lambda: 2.0)  # the CUDA clock's stalled seconds, faked
    clock.now += 8.0
    meter.images, meter.data_wait = 80, 4.0
    assert meter.window() == (10.0, 0.5, 0.25)


def test_timed_next_clocks_the_devices_stall_from_before_the_loaders_wait_to_after_it(monkeypatch):
    ms = [0.0]  # the device's clock: nothing is queued, so each event completes as it is recorded

    def loader():
        ms[0] += 30.0  # the host waits 30 ms for the batch
        yield "batch"

    stall = DataStall(torch.device("cpu"))
    stall.enabled = True  # the CUDA clock, its events faked
    monkeypatch.setattr(DataStall, "_event", staticmethod(lambda: FakeEvent(ms[0])))
    assert timed_next(loader(), stall)[0] == "batch"
    assert stall.read() == pytest.approx(0.030)


def test_a_windows_seconds_run_until_its_last_batchs_stall_is_known(monkeypatch):
    """Reading the stall waits for the device to reach the window's last batch: the window ends after that wait,
    or the stalled seconds could outnumber the window's own."""
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    meter = ThroughputMeter(torch.device("cpu"))

    def read() -> float:  # the host syncs on the last batch's event while 2 s of queued steps still run
        clock.now += 2.0
        return 1.0

    monkeypatch.setattr(meter.stall, "read", read)
    clock.now += 8.0
    meter.images = 100
    assert meter.window() == (10.0, 0.0, 0.1)
