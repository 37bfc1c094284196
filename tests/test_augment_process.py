"""Specifications of the augment process (``data.augment_process``): GPU decode's decode and augment in a process
of its own, behind GpuAugment's call. Here on CPU, where the batches travel through shared memory; the CUDA
branch (IPC buffer and events) is specified in tests/test_gpu.py."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import jpeg, photo, process_alive

from mlgcn_dist import engine
from mlgcn_dist.checkpoint import SAVING_STOP_SIGNALS
from mlgcn_dist.config import ConfigError, load_config
from mlgcn_dist.data.augment_process import AugmentProcess, AugmentProcessError, ipc_shareable_allocations
from mlgcn_dist.data.folder import PackedJpegs
from mlgcn_dist.data.transforms import GpuAugment

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SIZE = 48


class FailingRandom(random.Random):
    """A crop draw that fails, in the process that draws it."""

    def choice(self, seq):
        raise RuntimeError("the crop draw failed on purpose")


class StalledRandom(random.Random):
    """A crop draw that does not return for a minute: an augment process that stops answering."""

    def choice(self, seq):
        time.sleep(60)
        return super().choice(seq)


def photos(count: int, seed: int = 0) -> PackedJpegs:
    """A batch of JPEGs of several sizes (crops of several sizes: several resize groups), as the loader packs it."""
    return PackedJpegs.of([jpeg(photo(64 + 8 * (i % 3), 56 + 4 * i, seed=seed + i)) for i in range(count)])


def not_a_jpeg() -> torch.Tensor:
    return torch.tensor([1, 2, 3, 4], dtype=torch.uint8)


@pytest.mark.slow  # spawns an augment process
def test_the_augment_process_gives_the_batch_the_kept_positions_and_the_rng_state_of_gpu_augment_here():
    """Training and evaluation batches, in either memory format, a JPEG that does not decode dropped, and batches
    that outgrow the shared buffers: the child computes what GpuAugment computes in the caller's process, and the
    caller's rng advances as it would have there."""
    mixed = PackedJpegs.of(photos(3, seed=10).files()[:2] + [not_a_jpeg()] + photos(1, seed=20).files())
    batches = [photos(4), mixed, photos(9, seed=30)]
    for channels_last in (False, True):
        with AugmentProcess("cpu", SIZE, channels_last) as process:
            for train in (True, False):
                remote, here = process.augment(train), GpuAugment(SIZE, train)
                theirs, ours = random.Random(7), random.Random(7)
                for jpegs in batches:
                    images, kept = remote(jpegs, "cpu", theirs, channels_last)
                    expected, expected_kept = here(jpegs, "cpu", ours, channels_last)
                    assert kept == expected_kept and torch.equal(images, expected)
                    assert images.is_contiguous(memory_format=torch.channels_last if channels_last
                                                else torch.contiguous_format)
                    assert theirs.getstate() == ours.getstate()
                    # The child's own host time of the decode call and the augment, for `mlgcn bench train`.
                    assert set(process.last_batch_s) == {"decode", "augment"}
                    assert all(seconds > 0 for seconds in process.last_batch_s.values())
                    remote(photos(0), "cpu", theirs, channels_last)  # nothing sent: no times of its own, none kept
                    assert process.last_batch_s == {}
                    if jpegs is mixed:
                        assert kept == [0, 1, 3]  # the JPEG that does not decode is dropped


@pytest.mark.slow  # spawns an augment process
def test_a_batch_the_augment_process_fails_on_is_an_error_with_its_traceback_and_the_next_batch_is_augmented():
    with AugmentProcess("cpu", SIZE, channels_last=False) as process:
        augment = process.augment(train=True)
        with pytest.raises(AugmentProcessError, match=r"(?s)failed on batch 1:.*the crop draw failed on purpose"):
            augment(photos(2), "cpu", FailingRandom(0))
        images, kept = augment(photos(2), "cpu", random.Random(0))
        assert images.shape == (2, 3, SIZE, SIZE) and kept == [0, 1]


@pytest.mark.slow  # spawns an augment process
def test_a_killed_augment_process_fails_the_next_batch_within_seconds_naming_its_end_and_every_batch_after():
    with AugmentProcess("cpu", SIZE, channels_last=False) as process:
        augment = process.augment(train=True)
        augment(photos(2), "cpu", random.Random(0))
        process._process.kill()
        started = time.monotonic()
        with pytest.raises(AugmentProcessError, match=r"pid \d+\) .*batch 2: exit code -9 \(signal 9\)"):
            augment(photos(2), "cpu", random.Random(0))
        assert time.monotonic() - started < 15
        with pytest.raises(AugmentProcessError, match="can take no more batches: .*exit code -9"):
            augment(photos(2), "cpu", random.Random(0))


@pytest.mark.slow  # spawns an augment process
def test_an_augment_process_that_stops_answering_fails_the_batch_once_the_timeout_has_passed():
    """data.worker_timeout_s bounds a batch as it bounds a loader worker's: no hang, and the child is ended."""
    with AugmentProcess("cpu", SIZE, channels_last=False, timeout_s=120) as process:
        augment = process.augment(train=True)
        augment(photos(1), "cpu", random.Random(0))  # started (seconds of imports, more on a loaded machine)
        process.timeout_s = 3  # from here on the timeout is the batch's alone
        started = time.monotonic()
        with pytest.raises(AugmentProcessError, match=r"gave no answer in 3 s \(data.worker_timeout_s\) while "
                                                      r"augmenting batch 2: exit code -9"):
            augment(photos(1), "cpu", StalledRandom(0))
        assert time.monotonic() - started < 20
        assert not process._process.is_alive()


@pytest.mark.slow  # spawns an augment process
def test_the_augment_process_goes_on_through_the_stop_signals_meant_for_its_trainer():
    """SLURM signals every process of a job step, Ctrl-C the terminal's process group: the trainer saves on them
    and needs its batches meanwhile."""
    with AugmentProcess("cpu", SIZE, channels_last=False) as process:
        augment = process.augment(train=True)
        augment(photos(1), "cpu", random.Random(0))
        for sig in SAVING_STOP_SIGNALS:
            os.kill(process.pid, sig)
        time.sleep(0.5)
        images, _ = augment(photos(2), "cpu", random.Random(0))
        assert images.shape[0] == 2 and process._process.is_alive()
        status = Path(f"/proc/{process.pid}/status")
        if status.exists():  # Linux: started with them blocked, it unblocked them once ignored (SIGUSR2 answered)
            blocked = int(next(line for line in status.read_text().splitlines() if line.startswith("SigBlk:"))
                          .split()[1], 16)
            assert not any(blocked >> (sig - 1) & 1 for sig in (*SAVING_STOP_SIGNALS, signal.SIGUSR2))


TRAINER = textwrap.dedent("""
    import random, sys, time
    sys.path.insert(0, {tests!r})
    from conftest import jpeg, photo
    from mlgcn_dist.data.augment_process import AugmentProcess
    from mlgcn_dist.data.folder import PackedJpegs

    if __name__ == "__main__":
        process = AugmentProcess("cpu", 32, channels_last=False)
        process.augment(train=True)(PackedJpegs.of([jpeg(photo())]), "cpu", random.Random(0))
        print(process.pid, flush=True)
        if sys.argv[1:] == ["fail"]:
            keep = [process]  # held to the end, as by an error's traceback: never closed
            raise RuntimeError("the run failed")
        time.sleep(600)
""")


def start_trainer(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """A trainer process with an augment process that has augmented one batch; and the augment process's pid."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.format(tests=str(Path(__file__).parent)))
    trainer = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    return trainer, int(trainer.stdout.readline())


@pytest.mark.slow  # spawns an augment process
def test_the_augment_process_ends_when_its_trainer_is_killed(tmp_path):
    trainer, child = start_trainer(tmp_path)
    try:
        assert process_alive(child)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        deadline = time.monotonic() + 15
        while process_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(child)
    finally:
        trainer.kill()
        trainer.wait()


@pytest.mark.slow  # spawns an augment process
def test_a_trainer_that_fails_without_closing_its_augment_process_exits_and_ends_it(tmp_path):
    """multiprocessing's exit hook SIGTERMs a daemonic child and then waits for it: the augment process ignores
    SIGTERM, so it is SIGKILLed before that hook runs."""
    trainer, child = start_trainer(tmp_path, "fail")
    try:
        trainer.wait(30)
        assert trainer.returncode == 1 and "the run failed" in trainer.stderr.read()
        assert not process_alive(child)
    finally:
        trainer.kill()
        trainer.wait()


@pytest.mark.slow  # spawns an augment process
def test_a_closed_augment_process_has_ended_and_refuses_further_batches():
    process = AugmentProcess("cpu", SIZE, channels_last=False)
    augment = process.augment(train=False)
    augment(photos(1), "cpu", random.Random(0))
    pid = process.pid
    process.close()
    assert not process_alive(pid)
    with pytest.raises(AugmentProcessError, match="can take no more batches: it was closed"):
        augment(photos(1), "cpu", random.Random(0))


def test_an_empty_batch_is_answered_without_starting_the_process():
    process = AugmentProcess("cpu", SIZE, channels_last=True)
    images, kept = process.augment(train=True)(photos(0), "cpu", random.Random(0), True)
    assert images.shape == (0, 3, SIZE, SIZE) and kept == [] and process.pid is None


def test_a_device_whose_memory_another_process_cannot_map_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="a device of type cuda, cpu, not meta"):
        AugmentProcess("meta", SIZE, channels_last=False)


def test_a_cuda_augment_process_under_an_allocator_that_cannot_share_memory_is_refused_naming_it():
    """PyTorch's cudaMallocAsync backend shares no memory through CUDA IPC: refused when the process is made
    (the trainer's ConfigError), not at the first batch. The backend is read from the environment at start-up."""
    script = ("from mlgcn_dist.data.augment_process import AugmentProcess\n"
              "try:\n    AugmentProcess('cuda:0', 48, channels_last=False)\n"
              "except ValueError as err:\n    print(err)\n")
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ("through CUDA IPC, which PyTorch's cudaMallocAsync allocator cannot "
            "(PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync)") in result.stdout


@pytest.fixture
def allocator_settings():
    """The caching allocator's settings string, as ``PYTORCH_CUDA_ALLOC_CONF`` gives it; restored after the test."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    put = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or put is None:
        pytest.skip("this torch cannot change the allocator's settings at run time")
    before = get()
    yield get, put
    put(before)


def test_shareable_allocations_turn_expandable_segments_off_inside_and_give_every_setting_back_after(
    allocator_settings,
):
    """Setting the allocator's settings resets max_split_size_mb, garbage_collection_threshold and
    roundup_power2_divisions where they are not named: inside, they are named as they were."""
    get, put = allocator_settings
    put("max_split_size_mb:256,expandable_segments:True,garbage_collection_threshold:0.6")
    with ipc_shareable_allocations():
        assert get() == "max_split_size_mb:256,expandable_segments:False,garbage_collection_threshold:0.6"
    assert get() == "max_split_size_mb:256,expandable_segments:True,garbage_collection_threshold:0.6"
    with pytest.raises(KeyError), ipc_shareable_allocations():
        raise KeyError("an allocation that failed")
    assert get() == "max_split_size_mb:256,expandable_segments:True,garbage_collection_threshold:0.6"


@pytest.mark.parametrize("settings", ["", "max_split_size_mb:256", "expandable_segments:False"])
def test_shareable_allocations_leave_the_settings_alone_without_expandable_segments(allocator_settings, settings):
    get, put = allocator_settings
    put(settings)
    with ipc_shareable_allocations():
        assert get() == settings
    assert get() == settings


def test_a_batch_for_another_device_or_memory_format_than_the_process_writes_is_refused():
    process = AugmentProcess("cpu", SIZE, channels_last=False)
    with pytest.raises(ValueError, match=r"writes batches on cpu \(channels_last=False\); asked for cpu "
                                         r"\(channels_last=True\)"):
        process.augment(train=True)(photos(1), "cpu", random.Random(0), True)
    assert process.pid is None


def test_the_trainer_refuses_the_augment_process_on_a_device_no_other_process_can_map_naming_the_key():
    cfg = load_config("configs/toy.yaml", ["data.decode=gpu", "data.augment_process=true"])
    with pytest.raises(ConfigError, match="data.augment_process=true: .* a device of type cuda, cpu, not meta"):
        engine._device_augments(cfg, "gpu", torch.device("meta"))


@pytest.mark.slow  # spawns an augment process
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CUDA device the child cannot open")
def test_an_augment_process_that_cannot_open_its_device_fails_the_first_batch_with_the_cause():
    """As on a GPU whose compute mode (Exclusive_Process) admits one process: the child's CUDA start fails, and
    the trainer says so with the child's traceback and the setting that does without it, not a hang or a later,
    stranger error."""
    process = AugmentProcess("cpu", SIZE, channels_last=False)
    process.device = torch.device("cuda", 0)  # what the child is told to open; this machine has no CUDA
    failed = r"(?s)pid \d+\) failed to start \(data.augment_process=false decodes in the trainer\):\n.*set_device.*Error: "
    with pytest.raises(AugmentProcessError, match=failed):
        process.augment(train=True)(photos(1), "cuda:0", random.Random(0))
    with pytest.raises(AugmentProcessError, match="can take no more batches: it failed to start"):
        process.augment(train=True)(photos(1), "cuda:0", random.Random(0))
    process.close()
