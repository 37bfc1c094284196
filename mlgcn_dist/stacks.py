"""``kill -USR2 <pid>`` or ``scancel --signal=USR2 <job>`` in a data worker or the augment process: it prints its
Python stacks and goes on.

From a Python signal handler, with the GIL held, so that no other thread changes its frames while they are read.
faulthandler's answer from the C signal handler, which the trainer keeps (engine.train: a trainer's main thread
stuck in C, in a collective that never completes, would never run a Python handler), reads them while the other
threads run: a forkserver data worker crashed so in CI (SIGSEGV) while its resource-sharer thread handed the trainer
a batch's file descriptor, and failed the run; a process whose other threads ran Python crashed within 1,000 such
signals in each of 3 runs on this project's machine, and survived them with this answer (``tests/test_stacks.py``).
Even the interrupted thread's own stack alone, printed from the C handler, crashed a worker once. A worker's main
thread waits in Python or in short C calls (a queue's poll, a JPEG's decode), so its answer comes within moments.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from collections.abc import Callable
from typing import TextIO


def print_stacks_on_sigusr2(file: TextIO | None = None) -> Callable[[], None]:
    """Answer SIGUSR2 in this process as the module says, writing to ``file`` (default ``sys.__stderr__``), in place
    of any answer it had, one inherited through fork included; returns what gives SIGUSR2 back the answer it had.
    Call it from the main thread (Python's signal handlers run there)."""
    file = sys.__stderr__ if file is None else file
    faulthandler.unregister(signal.SIGUSR2)  # a forked worker inherits its trainer's C handler
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: faulthandler.dump_traceback(file, all_threads=True))

    def restore() -> None:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL if previous is None else previous)

    return restore
