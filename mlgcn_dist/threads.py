"""torch's intra-op threads: what a launcher gives a training process, set for a stretch of code, named in a line.

torch is imported where the threads are set, not at the top: the bench's report names them and imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager


def threads_phrase(threads: int) -> str:
    """"1 intra-op thread", "16 intra-op threads"."""
    return f"{threads} intra-op thread{'s' if threads != 1 else ''}"


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside (None: left as they are), and restored after."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def launcher_threads(device_type: str, environ: Mapping[str, str]) -> int | None:
    """The intra-op threads a training process gets from ``accelerate launch`` (and torchrun with several
    processes a node): ``OMP_NUM_THREADS`` where set, else 1 for a GPU process; None for a CPU one (Accelerate then
    divides the cores between the processes: for one, all of them, as torch does by itself).

    With 16 threads in a GPU process the thread that launches the step's kernels ran slower (README, run H: twice
    the time between two of its launches), and CPU decode trained at 0.90 of the ceiling against 0.96 with one."""
    if environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"])
    return 1 if device_type == "cuda" else None


def use_launcher_threads(device_type: str, environ: Mapping[str, str]) -> None:
    """This process's intra-op threads set to :func:`launcher_threads` (left as they are where that is None): a
    bare ``python launch/train.py`` on a GPU then trains as ``accelerate launch`` would start it."""
    import torch

    threads = launcher_threads(device_type, environ)
    if threads is not None:
        torch.set_num_threads(threads)
