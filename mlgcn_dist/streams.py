"""The CUDA stream the training steps run on.

PyTorch queues a thread's kernels on the legacy default stream unless told otherwise. That stream is implicitly
ordered with every blocking stream and with any library call that uses it: a copy or memset on it, issued from
another thread, waits until every training kernel queued before it has run. A stream PyTorch creates is
non-blocking: it is ordered only with what is queued on it and the events it waits for. ``train.side_stream``
runs the training steps on one, so that no such call in the input pipeline can wait for a step.

Off by default: it was added when an H100 run showed the GPU decode waiting for the training queued before
it. Measured since (README Performance, runs C and D): +1% with GPU decode, eager and under CUDA graphs, within
what one run tells; the decode's wait is for SMs, not for a stream (``mlgcn bench decode``: the same behind work
queued on any stream). ``mlgcn bench train`` still measures both kinds of stream on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def side_stream(device: torch.device, enabled: bool) -> torch.cuda.Stream | None:
    """A non-default stream of ``device`` for the training steps, or None (not enabled, or not CUDA).

    Made once per run: everything the steps allocate (gradients, optimiser state) then comes from one stream's
    pool, which the caching allocator keeps apart from the default stream's. PyTorch hands out such streams
    round-robin from a pool of 32 per priority, shared with torchvision's decoder and GpuAugment's decode stream;
    a run takes about four, so they stay distinct.
    """
    device = torch.device(device)
    return torch.cuda.Stream(device) if enabled and device.type == "cuda" else None


@contextlib.contextmanager
def running_on(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block with ``stream`` current (None: as is).

    Entering, ``stream`` waits for the caller's stream (the model and optimiser were made there); leaving, the
    caller's stream waits for ``stream``, so code after the block (evaluation, checkpoints, ``.cpu()``) reads
    finished tensors.
    """
    if stream is None:
        yield
        return
    caller = torch.cuda.current_stream(stream.device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        caller.wait_stream(stream)
