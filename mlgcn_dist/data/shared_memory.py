"""Free the shared memory a loader worker's batch arrived in without holding the GIL.

A batch's tensors cross from a loader worker to the training process as shared memory: a file in /dev/shm, unlinked,
mapped by both. The worker lets go of its mapping once it has sent the batch, so the training process drops the last
one, and the kernel frees the file's pages then, in the call that unmaps it. PyTorch makes that call when a tensor's
last reference goes, in whichever thread drops it, holding the GIL while the kernel frees the pages: for a batch of
64 uint8 images at 448 px (38.5 MB) a Python thread beside it stood still 6-13 ms a drop on a 2-core CPU (``mlgcn
bench loader``: ``free_ms``; README, Performance). On a GPU that is the DataLoader's pinning thread once a batch, or
the prefetch helper, beside the threads that launch the step's kernels, which under torch.compile need the GIL for
every launch.

:func:`release_pages` frees the pages first, with ``madvise(MADV_REMOVE)`` (which takes them out of the file: every
mapping of it reads zeros after), called through ctypes, which lets go of the GIL around a foreign call. What remains
for PyTorch is an empty mapping to unmap, a few microseconds. Only for memory nothing will read again: the caller
owns the only tensors over it (:meth:`mlgcn_dist.data.folder.Batch.pin_memory`, after copying them).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Iterable

import torch

MADV_REMOVE = 9  # linux/mman-common.h: free the range's pages and the file's backing store (tmpfs, shmem)


def release_pages(tensor: torch.Tensor) -> bool:
    """Give the whole pages of ``tensor``'s storage back to the kernel if it is shared memory, without the GIL.

    Returns whether it did: False for a storage that is not shared memory (an in-process batch, pinned or device
    memory), off Linux, or where the kernel refuses. The storage's partial first and last pages are left: a
    storage of the ``file_system`` sharing strategy keeps its reference count in front of its data.
    """
    storage = tensor.untyped_storage()
    if tensor.device.type != "cpu" or not storage.is_shared():
        return False
    madvise = _madvise()
    if madvise is None:
        return False
    begin = -(-storage.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
    return end > begin and madvise(begin, end - begin, MADV_REMOVE) == 0


def release_each(tensors: Iterable[torch.Tensor]) -> bool:
    """:func:`release_pages` on every one of ``tensors`` (none skipped once one is released); whether any was."""
    return any([release_pages(tensor) for tensor in tensors])


@functools.lru_cache(maxsize=1)
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise through ctypes (which releases the GIL for the call), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise
