"""Specifications of SIGUSR2's answer (``mlgcn_dist.stacks``): a process prints its Python stacks and goes on."""

from __future__ import annotations

import faulthandler
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlgcn_dist.stacks import print_stacks_on_sigusr2

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")

# Two threads calling Python functions without pause, 20 frames deep down to an HMAC, while the main thread sleeps a
# millisecond at a time: where faulthandler's all-thread dump from the C handler crashed the process (SIGSEGV) within
# 1,000 signals in 3 runs of 3 (the resource-sharer thread of the worker that crashed in CI was in hmac).
BUSY_PROCESS = textwrap.dedent("""
    import hmac, sys, threading, time
    from mlgcn_dist.stacks import print_stacks_on_sigusr2

    print_stacks_on_sigusr2(open(sys.argv[1], "w"))

    def churn_deep(depth):
        return hmac.new(b"key", b"message", "md5").digest() if depth == 0 else churn_deep(depth - 1)

    def churn():
        while True:
            churn_deep(20)

    for _ in range(2):
        threading.Thread(target=churn, daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(0.001)
""")


def test_a_process_whose_other_threads_run_python_prints_every_threads_stack_and_survives_a_thousand_sigusr2(
    tmp_path: Path,
):
    stacks = tmp_path / "stacks.txt"
    process = subprocess.Popen([sys.executable, "-c", BUSY_PROCESS, str(stacks)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        for _ in range(1000):
            process.send_signal(signal.SIGUSR2)
            time.sleep(0.002)
        time.sleep(0.5)
        assert process.poll() is None, f"it ended with {process.returncode}"
    finally:
        process.kill()
        process.wait()
    printed = stacks.read_text()
    # Signals that come while one is pending are answered once, and the answer waits for the main thread to get the
    # GIL from the two busy ones: 88 answers in a loaded CI run, hundreds alone. Dozens of dumps, each with every
    # thread, while they run.
    assert printed.count("Current thread") >= 25 and "in churn_deep" in printed


def test_giving_sigusr2_back_its_answer_leaves_no_handler_of_ours(tmp_path: Path):
    before = signal.getsignal(signal.SIGUSR2)
    with open(tmp_path / "stacks.txt", "w") as file:
        restore = print_stacks_on_sigusr2(file)
        assert signal.getsignal(signal.SIGUSR2) is not before
        restore()
    assert signal.getsignal(signal.SIGUSR2) == before
    assert not faulthandler.unregister(signal.SIGUSR2)  # nothing left registered
