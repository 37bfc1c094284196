"""torch's intra-op threads: set for a stretch of code, and named in a line.

torch is imported where the threads are set, not at the top: the bench's report names them and imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator
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
