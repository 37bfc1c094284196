"""``kill -USR2 <pid>`` or ``scancel --signal=USR2 <job>``: a process of a run (the trainer, its data workers, its
augment process) prints its Python stacks and goes on.

Two answers, since neither alone is both safe and prompt:

* faulthandler, from the C signal handler, at once: the stack of the thread the signal interrupted, even one stuck
  in C (a collective that never completes), which is where a hung run waits;
* then a Python handler, as soon as the main thread runs Python again: every thread's stack, printed holding the
  GIL, so that no other thread changes its frames while they are read.

faulthandler can print every thread from the C handler, but it then reads the other threads' frames while they
run: a process whose two other threads ran Python crashed (SIGSEGV) within 1,000 such signals in each of 3 runs on
this project's machine (within 3 or 4 in a first probe), and survived them with these answers
(``tests/test_stacks.py``); a forkserver data worker crashed so in CI, its resource-sharer thread handing the
trainer a batch's file descriptor meanwhile, and failed the run.
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
    faulthandler.unregister(signal.SIGUSR2)  # a forked worker inherits its trainer's registration
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: faulthandler.dump_traceback(file, all_threads=True))
    # chain: after printing, faulthandler calls the handler it replaced, the Python one above.
    faulthandler.register(signal.SIGUSR2, file=file, all_threads=False, chain=True)

    def restore() -> None:
        faulthandler.unregister(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL if previous is None else previous)

    return restore
