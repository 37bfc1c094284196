"""Specifications of the training stream (``train.side_stream``): a no-op off CUDA; on CUDA, work done on the
side stream is finished for whatever the caller's stream runs after the block."""

from __future__ import annotations

import pytest
import torch

from mlgcn_dist.config import load_config
from mlgcn_dist.streams import running_on, side_stream


def test_no_side_stream_off_cuda_or_when_disabled():
    assert side_stream(torch.device("cpu"), True) is None
    assert side_stream(torch.device("cpu"), False) is None
    with running_on(None):
        assert torch.ones(2).sum() == 2


def test_side_stream_is_off_by_default_and_set_by_an_override():
    assert load_config(None, []).train.side_stream is False
    assert load_config(None, ["train.side_stream=true"]).train.side_stream is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_work_on_the_side_stream_is_finished_for_the_callers_stream_after_the_block():
    device = torch.device("cuda")
    stream = side_stream(device, True)
    assert stream is not None and stream != torch.cuda.current_stream(device)
    x = torch.zeros(1 << 20, device=device)  # made on the caller's stream: the side stream waits for it
    with running_on(stream):
        assert torch.cuda.current_stream(device) == stream
        torch.cuda._sleep(20_000_000)  # the side stream's result is late...
        x += 1
    assert torch.cuda.current_stream(device) != stream
    assert float(x.sum()) == x.numel()  # ...and the caller's stream still reads it finished
