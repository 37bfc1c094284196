"""``mlgcn bench contention``: the launching thread's rate alone and beside each kind of background work (on a GPU
too: tests/test_gpu.py); what it measures, that it leaves no thread behind, and what it prints."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest
import torch

from mlgcn_dist.bench import contention
from mlgcn_dist.bench.contention import BACKGROUNDS, bench_contention, format_contention_report
from mlgcn_dist.bench.decode import toy_jpegs
from mlgcn_dist.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def test_the_launch_rate_is_measured_alone_and_beside_each_background_which_works_meanwhile_and_then_stops(
        monkeypatch):
    threads_before, threads_measured = torch.get_num_threads(), set()
    launch_rate = contention._launch_rate

    def measured_at(device, seconds):
        threads_measured.add(torch.get_num_threads())
        return launch_rate(device, seconds)

    monkeypatch.setattr(contention, "_launch_rate", measured_at)
    report = bench_contention(torch.device("cpu"), 0.05, toy_jpegs(2, 96), image_size=32, repeats=2)
    rows = report["backgrounds"]
    assert list(rows) == list(BACKGROUNDS) == ["none", "python", "small_ops", "cpp", "data_path", "data_path_process",
                                              "batches_dropped", "batches_released"]
    assert rows["none"]["vs_alone"] == 1.0 and rows["none"]["background_rounds_per_s"] is None
    assert rows["none"]["lost_ms_per_round"] is None
    for row in rows.values():
        assert row["launches_per_s"] > 0
        assert row["us_per_launch"] == 1e6 / row["launches_per_s"]
        assert row["vs_alone"] == row["launches_per_s"] / rows["none"]["launches_per_s"]
    for row in list(rows.values())[1:]:  # the launching thread's time lost to each round of the background
        assert row["lost_ms_per_round"] == pytest.approx(1000 * (1 - row["vs_alone"]) / row["background_rounds_per_s"])
    # Every background did its work while the rate was measured: a thread that never ran would measure nothing.
    assert all(rows[name]["background_rounds_per_s"] > 0 for name in BACKGROUNDS[1:])
    assert not [t for t in threading.enumerate() if t.name.startswith("contention-")]
    assert not [child for child in multiprocessing.active_children() if child.name == "mlgcn-augment"]  # closed
    assert not [child for child in multiprocessing.active_children() if child.daemon]  # the loader workers too
    assert threads_measured == {1} and torch.get_num_threads() == threads_before  # as a GPU training process has
    assert (report["device"], report["batch"], report["repeats"]) == ("cpu", 2, 2)


def test_the_contention_report_has_a_row_per_background_with_its_rate_against_the_rate_alone():
    def row(rate, rounds):
        return {"launches_per_s": rate, "vs_alone": rate / 200_000, "us_per_launch": 1e6 / rate,
                "background_rounds_per_s": rounds,
                "lost_ms_per_round": None if rounds is None else 1000 * (1 - rate / 200_000) / rounds}

    report = {"device": "H100", "seconds": 1.0, "repeats": 3, "batch": 64,
              "backgrounds": {"none": row(200_000, None), "python": row(1_000, 9_000.0),
                              "small_ops": row(120_000, 2_000.0), "cpp": row(190_000, 300.0),
                              "data_path": row(130_000, 40.5), "data_path_process": row(180_000, 38.0),
                              "batches_dropped": row(180_000, 20.0), "batches_released": row(198_000, 20.0)}}
    lines = format_contention_report(report).splitlines()
    assert lines[0].startswith("launch rate of one thread issuing small kernels on H100 (1 s a measurement, "
                               "median of 3)") and lines[0].endswith(
        "decode + augment of 64 JPEGs a round (data_path_process: in a process of their own); batches_*: a batch "
        "of 64 uint8 images arriving from loader workers a round")
    assert lines[1].split() == ["beside", "launches/s", "us/launch", "vs", "alone", "background", "rounds/s", "ms",
                                "lost", "a", "round"]
    assert lines[2].split() == ["none", "200000", "5.00", "1.00"]
    assert lines[3].split() == ["python", "1000", "1000.00", "0.01", "9000.0", "0.111"]
    assert lines[6].split() == ["data_path", "130000", "7.69", "0.65", "40.5", "8.642"]
    assert lines[7].split() == ["data_path_process", "180000", "5.56", "0.90", "38.0", "2.632"]
    assert lines[8].split() == ["batches_dropped", "180000", "5.56", "0.90", "20.0", "5.000"]
    assert lines[9].split() == ["batches_released", "198000", "5.05", "0.99", "20.0", "0.500"]


def test_bench_contention_runs_from_the_command_line_on_the_cpu_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "contention.json"
    assert main(["bench", "contention", "--seconds", "0.02", "--repeats", "1", "--batch", "2", "--size", "96",
                 "--image-size", "32", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["backgrounds"]) == set(BACKGROUNDS)
    assert "launch rate of one thread issuing small kernels on cpu" in capsys.readouterr().out
