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
    assert side_stream(torch.device("cuda"), False) is None  # disabled: no CUDA call, so none needed here
    with running_on(None):
        assert torch.ones(2).sum() == 2


def test_side_stream_is_off_by_default_and_set_by_an_override():
    assert load_config(None, []).train.side_stream is False
    assert load_config(None, ["train.side_stream=true"]).train.side_stream is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_side_stream_waits_for_the_caller_on_entry_and_the_caller_for_it_on_exit():
    device = torch.device("cuda")
    stream = side_stream(device, True)
    assert stream is not None and stream != torch.cuda.current_stream(device)
    x = torch.zeros(1 << 20, device=device)
    torch.cuda._sleep(20_000_000)  # the caller's write is late...
    x.fill_(1)
    with running_on(stream):
        assert torch.cuda.current_stream(device) == stream
        y = x * 2  # ...and the side stream still reads it finished
        torch.cuda._sleep(20_000_000)  # the side stream's result is late...
        y += 1
    assert torch.cuda.current_stream(device) != stream
    assert float(y.sum()) == 3 * y.numel()  # ...and the caller's stream still reads it finished
