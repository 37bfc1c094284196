"""Specifications of ``prefetch_to_device``: the device conversion runs ahead on one helper thread, and the
training loop sees exactly what inline conversion would have given it, in the same order, errors included."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from mlgcn_dist.data.prefetch import device_batches, prefetch_to_device

CPU = torch.device("cpu")


def numbered(count: int) -> list[dict]:
    return [{"index": i, "n_bad": 0} for i in range(count)]


def seeded_convert(seed: int):
    """A conversion that draws from a seeded rng (as the GPU augmentation does) and records its thread."""
    rng = random.Random(seed)
    threads: list[str] = []

    def convert(batch: dict) -> tuple[torch.Tensor, ...]:
        threads.append(threading.current_thread().name)
        return (torch.tensor([batch["index"], rng.random()]),)

    return convert, threads


def helper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("device-prefetch")]


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_prefetched_batches_equal_inline_conversion_in_order(depth):
    inline_convert, _ = seeded_convert(7)
    ahead_convert, threads = seeded_convert(7)
    inline = [(b["index"], out[0]) for b, out in prefetch_to_device(numbered(9), inline_convert, CPU, depth=0)]
    ahead = [(b["index"], out[0]) for b, out in prefetch_to_device(numbered(9), ahead_convert, CPU, depth=depth)]
    assert [i for i, _ in ahead] == list(range(9))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(inline, ahead))
    assert set(threads) != {threading.current_thread().name}  # converted on the helper thread


def test_conversion_runs_depth_batches_ahead_of_the_consumer_and_no_further():
    converted: list[int] = []

    def convert(batch: dict) -> tuple[torch.Tensor, ...]:
        converted.append(batch["index"])
        return (torch.zeros(1),)

    with device_batches(numbered(10), convert, CPU, depth=2) as pairs:
        first, _ = next(pairs)
        assert first["index"] == 0
        assert wait_until(lambda: converted == [0, 1, 2])
        time.sleep(0.1)
        assert converted == [0, 1, 2]  # batch 3 waits until the consumer takes batch 1
        next(pairs)
        assert wait_until(lambda: converted == [0, 1, 2, 3])


def test_depth_zero_and_devices_without_thread_support_convert_inline():
    convert, threads = seeded_convert(0)
    for device, depth in ((CPU, 0), (torch.device("mps"), 2)):  # convert never touches mps
        pairs = prefetch_to_device(numbered(3), convert, device, depth=depth)
        assert [batch["index"] for batch, _ in pairs] == [0, 1, 2]
    assert threads == [threading.current_thread().name] * 6


def test_a_mutation_of_the_batch_by_the_conversion_is_visible_when_it_is_yielded():
    def convert(batch: dict) -> tuple[torch.Tensor, ...]:
        batch["n_bad"] += batch["index"]  # to_device adds the JPEGs the device could not decode
        return (torch.zeros(1),)

    assert [b["n_bad"] for b, _ in prefetch_to_device(numbered(4), convert, CPU, depth=2)] == [0, 1, 2, 3]


def test_a_conversion_error_is_raised_at_the_batch_that_caused_it():
    def convert(batch: dict) -> tuple[torch.Tensor, ...]:
        if batch["index"] == 2:
            raise ValueError("batch 2 holds no JPEG")
        return (torch.zeros(1),)

    seen = []
    with pytest.raises(ValueError, match="batch 2 holds no JPEG"):
        for batch, _ in prefetch_to_device(numbered(6), convert, CPU, depth=2):
            seen.append(batch["index"])
    assert seen == [0, 1]
    assert wait_until(lambda: not helper_threads())


def test_a_loader_error_reaches_the_consumer_after_the_batches_before_it():
    def failing_loader():
        yield from numbered(3)
        raise OSError("shard-00001.tar: unexpected end of archive")

    seen = []
    with pytest.raises(OSError, match="shard-00001.tar"):
        for batch, _ in prefetch_to_device(failing_loader(), lambda b: (torch.zeros(1),), CPU, depth=2):
            seen.append(batch["index"])
    assert seen == [0, 1, 2]  # the batches read before the error still train, as without prefetching
    assert wait_until(lambda: not helper_threads())


def test_leaving_the_loop_early_stops_the_helper_thread_and_the_loader():
    pulled: list[int] = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield {"index": i, "n_bad": 0}
            i += 1

    with device_batches(endless(), lambda b: (torch.zeros(1),), CPU, depth=2) as pairs:
        for batch, _ in pairs:
            if batch["index"] == 3:
                break
    assert wait_until(lambda: not helper_threads())
    assert len(pulled) <= 3 + 2 + 1  # what was consumed, the depth ahead, and the one being queued


def test_closing_cancels_the_queued_conversions_and_waits_only_for_the_running_one():
    converted: list[int] = []
    running, gate = threading.Event(), threading.Event()

    def convert(batch: dict) -> tuple[torch.Tensor, ...]:
        if batch["index"] > 0:
            running.set()
            gate.wait(10)  # batch 1 is still converting when the consumer leaves
        converted.append(batch["index"])
        return (torch.zeros(1),)

    pairs = prefetch_to_device(numbered(10), convert, CPU, depth=3)
    assert next(pairs)[0]["index"] == 0
    assert running.wait(10)
    threading.Timer(0.2, gate.set).start()
    pairs.close()  # returns once batch 1's conversion is done; batches 2 and 3 were queued, never started
    assert converted == [0, 1]
    assert wait_until(lambda: not helper_threads())
