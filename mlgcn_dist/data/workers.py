"""How the data loaders' worker processes start, stop and die: the loader's side of process management.

A loader worker must outlive the stop signals meant for its trainer (SLURM signals every process of a job step,
Ctrl-C the terminal's process group) from the instant it starts, must end when its trainer does however that one
ends. :class:`StopSafeDataLoader` (every loader the package builds) and :func:`init_worker` (their worker_init_fn)
keep those promises for each way of starting workers (``data.worker_start``: fork, forkserver, spawn);
:mod:`mlgcn_dist.data.forkserver_preload` is the forkserver's share.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from multiprocessing import resource_tracker

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlgcn_dist.checkpoint import SAVING_STOP_SIGNALS


def init_worker(worker_id: int) -> None:
    """DataLoader workers: python and numpy RNGs from torch's worker seed, itself from (seed, epoch, rank, worker);
    the stop signals left to the trainer (:func:`_leave_stop_signals_to_the_trainer`); a worker whose parent is
    not its trainer ends with the trainer (:func:`_end_with_the_trainer`)."""
    _leave_stop_signals_to_the_trainer()
    _end_with_the_trainer()
    worker_seed = torch.initial_seed()
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)


# Whether signals can be blocked (POSIX): a blocked one waits until it is unblocked.
_MASKABLE = hasattr(signal, "pthread_sigmask")


def _leave_stop_signals_to_the_trainer() -> None:
    """A worker goes on through the signals that ask its trainer to stop (they are the trainer's business).

    SLURM signals every process of a job step (scancel, preemption, the time limit), the loader's workers too, and
    Ctrl-C reaches the terminal's whole process group. PyTorch ends a worker on a SIGTERM from anyone but its
    trainer, and the trainer then fails on the lost worker instead of finishing its step and saving. Ignored, the
    workers go on until the trainer is done with its loader, which ends them with a sentinel, or they see it gone
    (their watchdog); one still alive when the trainer exits is ended by :func:`end_workers_at_exit`.

    A worker starts with these signals blocked (:class:`StopSafeDataLoader`): one that came before this point is
    pending, and dropped here, once ignored, as they are unblocked."""
    _ignore_stop_signals_then(signal.SIG_UNBLOCK)


def _end_with_the_trainer() -> None:
    """In a forkserver's worker, a thread that ends the worker once its trainer is gone.

    PyTorch's worker loop ends a worker whose parent process is gone, and a forkserver's worker is the server's
    child, not the trainer's. The server in turn lives while any of its workers does (each holds its "alive"
    pipe), so a trainer killed outright (SIGKILL, the out-of-memory killer, a timeout) left its workers and the
    server waiting for each other for good, shards open. multiprocessing gives the worker a sentinel of the
    process that started it, the trainer, which becomes ready as that process ends."""
    trainer = multiprocessing.parent_process()
    if trainer is None or trainer.pid == os.getppid():  # forked or spawned by the trainer: PyTorch watches it
        return

    def end_with_it() -> None:
        multiprocessing.connection.wait([trainer.sentinel])
        os._exit(1)  # nobody reads the status: the trainer is gone

    threading.Thread(target=end_with_it, name="mlgcn-trainer-watch", daemon=True).start()


def serve_workers_with_stop_signals_held() -> None:
    """The forkserver's: the stop signals ignored, and blocked, so each worker it forks starts with them blocked
    as a worker the trainer starts does (:class:`StopSafeDataLoader`). Ignoring them is not enough: PyTorch's
    worker loop sets a SIGTERM handler of its own before the worker_init_fn, which ends a worker on a SIGTERM
    from anyone but its parent (for a forkserver's worker, the server)."""
    _ignore_stop_signals_then(signal.SIG_BLOCK)


def _ignore_stop_signals_then(mask: int) -> None:
    """The stop signals ignored, then blocked or unblocked (``mask``: SIG_BLOCK, SIG_UNBLOCK) where signals can be
    masked."""
    for sig in SAVING_STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _MASKABLE:
        signal.pthread_sigmask(mask, SAVING_STOP_SIGNALS)


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """The stop signals held back from this thread inside, and from the processes it starts there (a blocked
    signal stays blocked across fork and exec); one that comes meanwhile is delivered as the block ends."""
    if not _MASKABLE:  # nothing to hold back with
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SAVING_STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class StopSafeDataLoader(DataLoader):
    """A DataLoader whose workers a stop signal cannot end before their worker_init_fn ignores it.

    Until then a worker runs on the signal dispositions it started with, the trainer's (forked) or Python's
    (spawned, through seconds of imports), and from its worker loop's start on PyTorch's SIGTERM handler, which
    ends it on a SIGTERM its parent did not send. A scancel or Ctrl-C in that window ended a worker (forked,
    spawned or forkserver's: a test sees each), and the trainer then failed on it instead of saving, or waited
    data.worker_timeout_s for it. So the workers are started with the signals blocked (a forkserver keeps them
    blocked for its workers: :func:`serve_workers_with_stop_signals_held`) and unblock them once ignored
    (:func:`_leave_stop_signals_to_the_trainer`). The trainer's own share of the block lasts as long as starting
    the workers, and a signal it holds back is delivered after."""

    def __iter__(self) -> Iterator:
        if self.num_workers == 0:
            return super().__iter__()
        context = self.multiprocessing_context
        method = context.get_start_method() if context is not None else _default_start_method()
        if method != "fork" and _MASKABLE:  # POSIX, where the tracker runs and blocks
            # The workers' queues need multiprocessing's resource tracker. Started inside the block, it would end
            # it: its start blocks SIGINT and SIGTERM for its own process and unblocks them after (bpo-33613).
            resource_tracker.ensure_running()
        with _stop_signals_blocked():  # a loader with workers starts them here (persistent_workers is off)
            return super().__iter__()


@lru_cache(maxsize=1)  # registers its hook once
def end_workers_at_exit() -> None:
    """At the trainer's exit, SIGKILL its loader workers still alive (a loader left in an error's traceback).

    multiprocessing's own exit hook ends them with SIGTERM, which they ignore, then waits for them forever: a run
    that failed would never exit. Registered after multiprocessing's hook, so it runs before it."""

    def end_workers() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:  # DataLoader workers; a non-daemonic child is joined as usual
                child.kill()

    atexit.register(end_workers)


# What the forkserver imports before it forks a worker: torch, the loader, the stop signals held (see it).
FORKSERVER_PRELOAD = "mlgcn_dist.data.forkserver_preload"


def worker_context(worker_start: str) -> multiprocessing.context.BaseContext | None:
    """The DataLoader's ``multiprocessing_context`` for ``data.worker_start``. fork passes none, the platform's own
    method, as before the key existed: macOS keeps spawn (Python's choice there: a forked child can crash in system
    libraries that started threads), and Linux from Python 3.14 its forkserver. forkserver preloads
    :data:`FORKSERVER_PRELOAD` (a forkserver this process started earlier without it keeps what it has; a module
    it cannot import, it skips). spawn starts each worker bare: seconds of imports (through which
    :class:`StopSafeDataLoader` holds the stop signals back)."""
    if worker_start == "fork":
        return None
    context = multiprocessing.get_context(worker_start)
    if worker_start == "forkserver":
        context.set_forkserver_preload([FORKSERVER_PRELOAD])
    return context


def forks_workers(worker_start: str) -> bool:
    """Whether the loader's workers are forked: ``data.worker_start=fork`` where the method in effect is fork (a
    start method set in this process, else the platform's default, the first one listed)."""
    return worker_start == "fork" and _default_start_method() == "fork"


def _default_start_method() -> str:
    """The start method a process gets without a context: one set in this process, else the platform's default
    (the first one listed)."""
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def fork_warning(
    workers: int, worker_start: str, version: tuple[int, ...] = tuple(sys.version_info[:3])
) -> str | None:
    """A warning when this Python can deadlock a loader worker as it forks it, else None: a child forked while
    another thread holds the runtime's thread-state lock waits for it forever (CPython gh-112275, fixed in 3.11.10
    and 3.12; 3.10 and earlier 3.11 releases have it). Seen here with 3.11.7, at an evaluation's first fork.
    Workers started by forkserver or spawn come from a process without the trainer's threads: no warning."""
    if workers == 0 or not forks_workers(worker_start) or version >= (3, 11, 10):
        return None
    python = ".".join(map(str, version))
    return (f"warning: Python {python} can deadlock a data loader worker as it forks it (CPython gh-112275, fixed "
            "in 3.11.10 and 3.12): such a run stops with 'DataLoader timed out' after data.worker_timeout_s "
            "instead of finishing; use a newer Python, data.worker_start=forkserver or data.workers=0")
