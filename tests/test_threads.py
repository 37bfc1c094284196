"""Specifications of torch's intra-op threads set for a stretch of code, and of the phrase naming them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mlgcn_dist.threads import intra_op_threads, threads_phrase, use_launcher_threads


def test_threads_are_set_inside_and_restored_after_even_when_the_inside_raises():
    before = torch.get_num_threads()
    with intra_op_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), intra_op_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_no_thread_count_leaves_the_processs_as_it_is():
    before = torch.get_num_threads()
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("device, environ, expected", [
    ("cuda", {}, 1),  # a bare `python launch/train.py` on a GPU: as `accelerate launch` would start it
    ("cuda", {"OMP_NUM_THREADS": "3"}, 3),
    ("cpu", {}, None),  # torch's own default (one per core) stays
    ("mps", {}, None),
])
def test_a_training_process_takes_the_intra_op_threads_its_launcher_would_give_it(device, environ, expected):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        use_launcher_threads(device, environ)
        assert torch.get_num_threads() == (before + 1 if expected is None else expected)
    finally:
        torch.set_num_threads(before)


def test_the_phrase_is_singular_for_one_thread_only():
    assert [threads_phrase(n) for n in (1, 2, 16)] == ["1 intra-op thread", "2 intra-op threads",
                                                       "16 intra-op threads"]


def test_the_bench_report_names_the_threads_without_importing_torch():
    """`mlgcn bench train`'s report is text made from its JSON: it needs no torch to be read or written."""
    code = "import sys, mlgcn_dist.threads, mlgcn_dist.bench.report; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
