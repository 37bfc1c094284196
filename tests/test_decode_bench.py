"""``mlgcn bench decode``: the GPU decoders timed idle and behind queued device work (the measurement itself needs
CUDA: tests/test_gpu.py); here, what it does without one and what it prints."""

from __future__ import annotations

import pytest
import torch
from torchvision.io import decode_jpeg

from mlgcn_dist.bench.decode import format_decode_report, toy_jpegs
from mlgcn_dist.cli import main


def test_bench_decode_without_a_cuda_device_says_it_needs_one_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "decode"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_the_decode_bench_draws_real_jpegs_of_at_most_the_requested_size():
    jpegs = toy_jpegs(3, size=160)
    assert len(jpegs) == 3 and all(j.dtype == torch.uint8 and j.dim() == 1 for j in jpegs)
    for data in jpegs:
        image = decode_jpeg(data)
        assert image.shape[0] == 3 and max(image.shape[1:]) <= 160


def test_the_decode_report_has_a_row_per_decoder_and_case_with_whether_the_queued_work_had_run_and_the_augment():
    report = {
        "device": "H100",
        "batch": 64,
        "jpeg_kb_mean": 178.0,
        "busy_ms": 99.0,
        "decoders": {
            "torchvision": {
                "idle": {"return_ms": 6.0, "ready_ms": 6.0},
                "busy_side_graph": {"return_ms": 113.9, "ready_ms": 113.9, "busy_done_when_ready": "5/5"},
            },
            "nvimgcodec": {"idle": {"return_ms": 4.3, "ready_ms": 4.9}},
        },
        "nvimgcodec_vs_torchvision": 3.8,
        "augment": {"size": 448, "crop_sizes": 19, "antialiased_crop_sizes": 5,
                    "apply": {"device_ms": 1.5, "host_ms": 3.1}, "always_antialiased": {"device_ms": 2.0, "host_ms": 3.0}},
    }
    text = format_decode_report(report)
    assert "64 JPEGs" in text and "99 ms" in text
    rows = [line.split() for line in text.splitlines()[2:5]]
    assert rows[0] == ["torchvision", "idle", "6.0", "6.0"]
    assert rows[1] == ["torchvision", "busy_side_graph", "113.9", "113.9", "5/5"]
    assert rows[2] == ["nvimgcodec", "idle", "4.3", "4.9"]
    assert "3.80 grey levels" in text
    augment = next(line for line in text.splitlines() if line.startswith("GpuAugment.apply"))
    assert "448 px (19 crop sizes, 5 antialiased): device 1.50 ms" in augment and "device time ratio 0.75" in augment


def test_the_decode_report_without_nvimagecodec_or_the_augment_has_only_the_decode_rows():
    report = {"device": "H100", "batch": 8, "jpeg_kb_mean": 20.0, "busy_ms": 50.0,
              "decoders": {"torchvision": {"idle": {"return_ms": 1.0, "ready_ms": 1.0}}}}
    lines = format_decode_report(report).splitlines()
    assert len(lines) == 3 and lines[2].split() == ["torchvision", "idle", "1.0", "1.0"]


@pytest.mark.parametrize("option", ["--batch", "--size", "--image-size", "--busy-ms", "--repeats"])
def test_bench_decode_refuses_counts_and_times_that_are_not_positive(option, capsys, monkeypatch):
    from mlgcn_dist.bench import cli

    monkeypatch.setattr(cli, "run_decode_bench", lambda args: pytest.fail("the command ran"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "decode", option, "0"])
    assert exit_.value.code == 2 and "expected" in capsys.readouterr().err
