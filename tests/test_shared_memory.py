"""Freeing the shared memory a loader worker's batch arrived in, without the GIL."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mlgcn_dist.data.shared_memory import release_each, release_pages

BIG = 64 << 20  # bytes: freeing them takes the kernel milliseconds, long enough for another thread to be seen
SWITCH_S = 0.5  # the GIL's switch interval while a thread is watched: longer than freeing BIG takes


class _Filled(Dataset):
    """Items of ``nbytes`` bytes of 7, and a small tensor, made in a loader worker."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"big": torch.full((self.nbytes,), 7, dtype=torch.uint8), "small": torch.arange(3)}


def _received(nbytes: int, count: int = 1) -> list[dict]:
    """Items as the training process receives them from a worker: in shared memory, mapped by this process alone."""
    return list(DataLoader(_Filled(nbytes), batch_size=None, num_workers=1, multiprocessing_context="fork"))[:count]


def test_a_tensor_received_from_a_worker_has_its_pages_freed_and_reads_zeros_after():
    item = _received(1 << 20)[0]
    assert item["big"].untyped_storage().is_shared() and int(item["big"][-1]) == 7
    assert release_pages(item["big"])
    assert int(item["big"].count_nonzero()) == 0  # the pages are gone from the file: a read finds new zero pages


def test_memory_of_this_process_and_tensors_smaller_than_a_page_are_left_alone():
    mine = torch.full((1 << 20,), 7, dtype=torch.uint8)
    assert not release_pages(mine) and int(mine.count_nonzero()) == mine.numel()
    item = _received(4096)[0]
    assert not release_pages(item["small"]) and item["small"].tolist() == [0, 1, 2]  # within one page


def test_releasing_each_of_several_tensors_releases_every_one_after_the_first_and_says_whether_any_was():
    first, second = (item["big"] for item in _received(1 << 20, count=2))
    mine = torch.full((1 << 20,), 7, dtype=torch.uint8)
    assert release_each([first, second, mine])
    assert int(first.count_nonzero()) == 0 and int(second.count_nonzero()) == 0  # not stopped at the first
    assert int(mine.count_nonzero()) == mine.numel()
    assert not release_each([mine]) and not release_each([])


def test_a_file_system_shared_tensor_keeps_the_page_holding_its_reference_count():
    """PyTorch's file_system strategy keeps a reference count in front of the data, on the storage's first page."""
    strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        item = _received(1 << 20)[0]
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
    storage = item["big"].untyped_storage()
    assert storage.data_ptr() % 4096 != 0  # the data starts after the count, within the first page
    assert release_pages(item["big"])
    head = 4096 - storage.data_ptr() % 4096
    assert int(item["big"][:head].count_nonzero()) == head and int(item["big"][head:].count_nonzero()) < 4096


def _other_thread_ran_during(action) -> bool:
    """Whether a Python thread spinning beside ``action`` ran while it did. ``action`` starts and ends holding the
    GIL, and with a switch interval longer than it takes the interpreter does not hand the GIL over within it: a
    count that moved between its start and its end moved while ``action`` had let go of the GIL itself."""
    count, running, stop = [0], threading.Event(), threading.Event()

    def spin() -> None:
        running.set()
        while not stop.is_set():
            count[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_S)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        running.wait()
        before = count[0]
        action()
        return count[0] != before
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)


def test_releasing_lets_other_python_threads_run_meanwhile():
    """What it is for: PyTorch, dropping such a tensor, has the kernel free its pages holding the GIL (a spinning
    thread stood still 5.9-6.2 ms a drop of 38.5 MB, median, against 0.15-0.17 released first: the README's "Since
    run H"); ``mlgcn bench loader`` measures the free (``free_ms``). Not asserted here: PyTorch at times lets the GIL
    go for a moment before it frees, which a thread waiting for it may take."""
    released = [_other_thread_ran_during(lambda item=item: release_pages(item["big"])) for item in _received(BIG, 3)]
    assert any(released)  # one in three: on a loaded machine the spinner may not be scheduled in one release


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_memory_off_the_cpu_is_left_alone(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert not release_pages(torch.zeros(1 << 20, dtype=torch.uint8, device=device))
