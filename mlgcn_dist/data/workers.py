"""How the data loaders' worker processes start, stop and die: the loader's side of process management.

A loader worker must outlive the stop signals meant for its trainer (SLURM signals every process of a job step,
Ctrl-C the terminal's process group) from the instant it starts, must end when its trainer does however that one
ends, and must not keep its trainer waiting when it dies itself. :class:`StopSafeDataLoader` (every loader the
package builds) and :func:`init_worker` (their worker_init_fn) keep those promises for each way of starting workers
(``data.worker_start``: fork, forkserver, spawn); :mod:`mlgcn_dist.data.forkserver_preload` is the forkserver's
share.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from multiprocessing import resource_tracker

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter  # private: torch is pinned exactly

from mlgcn_dist.checkpoint import SAVING_STOP_SIGNALS
from mlgcn_dist.stacks import print_stacks_on_sigusr2


def init_worker(worker_id: int) -> None:
    """DataLoader workers: python and numpy RNGs from torch's worker seed, itself from (seed, epoch, rank, worker);
    the stop signals left to the trainer (:func:`leave_stop_signals_to_the_trainer`); a worker whose parent is
    not its trainer ends with the trainer (:func:`_end_with_the_trainer`)."""
    leave_stop_signals_to_the_trainer()
    _end_with_the_trainer()
    worker_seed = torch.initial_seed()
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)


# Whether signals can be blocked (POSIX): a blocked one waits until it is unblocked.
_MASKABLE = hasattr(signal, "pthread_sigmask")
# What a worker starts with blocked, until it has its own answer to them: the stop signals (ignored), and SIGUSR2,
# on which the trainer prints its stacks (engine.train) and which ends a process without that answer. SLURM sends
# each to every process of a job step (`scancel --signal=USR2`).
_HELD_SIGNALS = (*SAVING_STOP_SIGNALS, signal.SIGUSR2) if _MASKABLE else SAVING_STOP_SIGNALS


def leave_stop_signals_to_the_trainer() -> None:
    """A worker goes on through the signals that ask its trainer to stop (they are the trainer's business).

    SLURM signals every process of a job step (scancel, preemption, the time limit), the loader's workers too, and
    Ctrl-C reaches the terminal's whole process group. PyTorch ends a worker on a SIGTERM from anyone but its
    trainer, and the trainer then fails on the lost worker instead of finishing its step and saving. Ignored, the
    workers go on until the trainer is done with its loader, which ends them with a sentinel, or they see it gone
    (their watchdog); one still alive when the trainer exits is ended by :func:`end_workers_at_exit`.

    A SIGUSR2 prints the worker's stacks, from Python (:mod:`mlgcn_dist.stacks`), in place of the trainer's answer
    a forked worker inherits (a forkserver's or spawned one had none, and ended on it).

    A worker starts with these signals blocked (:class:`StopSafeDataLoader`): one that came before this point is
    pending, and dropped here, once ignored, as they are unblocked (a SIGUSR2 is answered)."""
    if _MASKABLE and sys.__stderr__ is not None:
        print_stacks_on_sigusr2()
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
        signal.pthread_sigmask(mask, _HELD_SIGNALS)


def start_resource_tracker() -> None:
    """multiprocessing's resource tracker, which a process started by spawn or forkserver needs, started with the
    stop signals held (POSIX, where the tracker runs and blocks).

    Started inside the block that starts such a process, it would end the block: its start blocks SIGINT and
    SIGTERM for its own process and unblocks them after (bpo-33613). Started in a block of its own, it keeps SIGUSR1
    and SIGUSR2 blocked (it ignores SIGINT and SIGTERM only), which SLURM sends every process of the step and which
    would end it."""
    if _MASKABLE:
        with stop_signals_blocked():
            resource_tracker.ensure_running()


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """The stop signals and SIGUSR2 (:data:`_HELD_SIGNALS`) held back from this thread inside, and from the
    processes it starts there (a blocked signal stays blocked across fork and exec); one that comes meanwhile is
    delivered as the block ends."""
    if not _MASKABLE:  # nothing to hold back with
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
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
    (:func:`leave_stop_signals_to_the_trainer`). The trainer's own share of the block lasts as long as starting
    the workers, and a signal it holds back is delivered after."""

    def __iter__(self) -> Iterator:
        if self.num_workers == 0:
            return super().__iter__()
        context = self.multiprocessing_context
        method = context.get_start_method() if context is not None else _default_start_method()
        if method != "fork":
            start_resource_tracker()  # the workers' queues need it
        with stop_signals_blocked():  # a loader with workers starts them here (persistent_workers is off)
            return super().__iter__()

    def _get_iterator(self) -> Iterator:
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _WorkersWatched(self)


# How long a trainer waiting for a batch goes without looking whether its workers are alive.
_WORKERS_LOOKED_AT_EVERY_S = 1.0


class _WorkersWatched(_MultiProcessingDataLoaderIter):
    """PyTorch's iterator over its workers' batches, which notices a dead worker within a second or so however the
    workers were started.

    A forked or spawned worker is the trainer's child, and its death fails the trainer's next wait for a batch at
    once (PyTorch's SIGCHLD handler). A forkserver's worker is the server's child: no signal comes, and PyTorch,
    given a timeout (``data.worker_timeout_s``), looks at its workers only when that expires. A forkserver worker
    killed (by the out-of-memory killer, say) before it yielded cost the whole timeout, 600 s by default; one killed
    while it handed a batch over failed the trainer with a ConnectionResetError from multiprocessing's descriptor
    sharing rather than naming the worker. Here the wait for a batch looks at the workers every
    :data:`_WORKERS_LOOKED_AT_EVERY_S` (as PyTorch's own does every 5 s without a timeout), and a broken handover
    waits that long for the worker that broke it to be seen gone. The error is PyTorch's own, naming the worker."""

    def _get_data(self):
        deadline = time.monotonic() + self._timeout if self._timeout > 0 else math.inf
        while (left := deadline - time.monotonic()) > 0:
            if self._pin_memory and not self._pin_memory_thread.is_alive():
                self._raise_if_a_worker_died(None)  # the likelier cause: a broken handover ends the thread
                raise RuntimeError("Pin memory thread exited unexpectedly")
            got, data = self._try_get_data(min(left, _WORKERS_LOOKED_AT_EVERY_S))
            if got:
                return data
        raise RuntimeError(f"DataLoader timed out after {self._timeout} seconds")

    def _try_get_data(self, timeout: float = _WORKERS_LOOKED_AT_EVERY_S) -> tuple[bool, object]:
        try:
            return super()._try_get_data(timeout)  # raises itself on a worker it sees dead
        except (ConnectionError, EOFError) as handover:
            # A batch's tensors come as file descriptors, each fetched from the worker that holds it: a worker that
            # died in between fails the fetch before its death can be seen.
            self._raise_if_a_worker_died(handover)
            raise

    def _raise_if_a_worker_died(self, cause: BaseException | None) -> None:
        """PyTorch's error for the workers seen dead within :data:`_WORKERS_LOOKED_AT_EVERY_S`, if any."""
        deadline = time.monotonic() + _WORKERS_LOOKED_AT_EVERY_S
        while True:
            dead = [i for i, w in enumerate(self._workers) if self._workers_status[i] and not w.is_alive()]
            if dead or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not dead:
            return
        for i in dead:
            self._mark_worker_as_unavailable(i)
        pids = ", ".join(str(self._workers[i].pid) for i in dead)
        raise RuntimeError(f"DataLoader worker (pid(s) {pids}) exited unexpectedly") from cause


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


def resolve_worker_start(worker_start: str, version: tuple[int, ...] = tuple(sys.version_info[:3])) -> str:
    """``data.worker_start`` with ``auto`` made concrete: fork, except forkserver where fork would fork the workers
    on a Python that can deadlock a worker as it forks it (:func:`fork_warning`). Seen on this project's machines
    (Python 3.11.7): the demo's evaluation hung in one of two fresh clones, a worker waiting forever inside its own
    fork while its rank, and the other rank in a collective, waited for it."""
    if worker_start != "auto":
        return worker_start
    return "forkserver" if _fork_can_deadlock(version) and forks_workers("fork") else "fork"


def worker_context(worker_start: str) -> multiprocessing.context.BaseContext | None:
    """The DataLoader's ``multiprocessing_context`` for ``data.worker_start`` (``auto`` resolved first). fork passes
    none, the platform's own method, as before the key existed: macOS keeps spawn (Python's choice there: a forked
    child can crash in system libraries that started threads), and Linux from Python 3.14 its forkserver.
    forkserver preloads :data:`FORKSERVER_PRELOAD` (a forkserver this process started earlier without it keeps what
    it has; a module it cannot import, it skips). spawn starts each worker bare: seconds of imports (through which
    :class:`StopSafeDataLoader` holds the stop signals back)."""
    worker_start = resolve_worker_start(worker_start)
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


_GH_112275 = "CPython gh-112275, fixed in 3.11.10 and 3.12"  # the bug a fork on an older Python can hit


def fork_warning(
    workers: int, worker_start: str, version: tuple[int, ...] = tuple(sys.version_info[:3])
) -> str | None:
    """A warning when this Python can deadlock a loader worker as it forks it, else None: a child forked while
    another thread holds the runtime's thread-state lock waits for it forever (CPython gh-112275, fixed in 3.11.10
    and 3.12; 3.10 and earlier 3.11 releases have it). Seen here with 3.11.7, at an evaluation's first fork.
    Workers started by forkserver or spawn come from a process without the trainer's threads: no warning."""
    if workers == 0 or not forks_workers(worker_start) or not _fork_can_deadlock(version):
        return None
    python = ".".join(map(str, version))
    return (f"warning: Python {python} can deadlock a data loader worker as it forks it ({_GH_112275}): such a run "
            "stops with 'DataLoader timed out' after data.worker_timeout_s instead of finishing; use a newer Python, "
            "data.worker_start=forkserver (the default, auto, chooses it here) or data.workers=0")


def auto_start_note(
    workers: int, worker_start: str, version: tuple[int, ...] = tuple(sys.version_info[:3])
) -> str | None:
    """A line saying how ``data.worker_start=auto`` starts the workers, when it does not fork them as the key's
    other default would; else None."""
    if workers == 0 or worker_start != "auto" or resolve_worker_start(worker_start, version) == "fork":
        return None
    python = ".".join(map(str, version))
    return (f"data.worker_start=auto: loader workers start from a forkserver, as Python {python} can deadlock a "
            f"worker it forks ({_GH_112275})")


def worker_start_line(workers: int, worker_start: str) -> str | None:
    """What a run says of how its loader workers start: :func:`fork_warning`, else :func:`auto_start_note`."""
    return fork_warning(workers, worker_start) or auto_start_note(workers, worker_start)


def _fork_can_deadlock(version: tuple[int, ...]) -> bool:
    """Whether this Python can deadlock a child forked while another thread starts or ends (CPython gh-112275)."""
    return version < (3, 11, 10)
