"""mlgcn compare: runs collected from run directories, W&B run files and (faked) W&B API; table, filters, plot."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from test_tracking import LABELS, fake_metrics, flush_wandb, record_run, wandb_env  # noqa: F401 (wandb_env: a fixture)

from mlgcn_dist import engine as engine_module
from mlgcn_dist.checkpoint import mark_requeue
from mlgcn_dist.cli import main
from mlgcn_dist.compare import (
    RunRecord,
    add_compare_arguments,
    collect_local_runs,
    collect_offline_wandb_runs,
    collect_wandb_runs,
    filter_runs,
    format_table,
    parse_filters,
    plot_map_curves,
    read_wandb_records,
    run_compare,
    wandb_filters,
    why_nothing_matched,
    with_distinct_names,
)
from mlgcn_dist.config import load_config
from mlgcn_dist.engine import train
from mlgcn_dist.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What the engine's Trainer._finish adds to the summary of a run that trained to its end (a preemption does not).
ENGINE_FINISH = {"finished": True, "global_batch": 16, "global_step": 20, "frequency_baseline_mAP": 17.2,
                 "num_val_images": 12, "img_per_s": 90.0, "img_per_s_window_median": 100.0}


def finish_as_the_engine_does(run_dir: Path) -> None:
    """``record_run`` finishes the Tracker only; the engine's finish also writes ENGINE_FINISH, the run's img_per_s
    here its one window's."""
    summary = json.loads((run_dir / "summary.json").read_text())
    window = summary["img_per_s_window_median"]
    (run_dir / "summary.json").write_text(json.dumps({**summary, **ENGINE_FINISH, "img_per_s": window,
                                                      "img_per_s_window_median": window}))


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """Three finished runs: a (lr 0.1, gcn, best 55), b (lr 0.05, gcn, best 60 by its EMA), c (linear, 2 GPUs)."""
    root = tmp_path / "runs"
    for run_dir in [
        record_run(root, "a", [(50.0, None), (55.0, None)], ("optim.lr=0.1",), img_per_s=100.0, cf1=61.0),
        record_run(root, "b", [(52.0, 51.0), (58.0, 60.0)], ("optim.lr=0.05",), img_per_s=90.0, cf1=62.0),
        record_run(root, "c", [(45.0, None), (50.0, None)], ("optim.lr=0.1", "model.head=linear"), img_per_s=180.0,
                   world_size=2, cf1=55.0),
    ]:
        finish_as_the_engine_does(run_dir)
    return root


def train_session(root: Path, name: str, epochs: int, evaluated: int, end: str, first_epoch: int = 0,
                  wandb: str = "disabled") -> Path:
    """One training session on run directory ``root/name`` as the engine leaves it: REQUEUE removed at the start,
    a logged step (120 img/s) and an evaluation per epoch from ``first_epoch``, then ``end``: "finished"
    (Trainer._finish), "preempted" (SIGTERM/USR1: the REQUEUE marker, then a summary flagged preempted with the run's
    img_per_s), "ctrl_c" (saved, a summary flagged stopped, no marker) or "killed" (kill -9: nothing more; W&B's
    files are flushed all the same)."""
    cfg = load_config(None, [f"train.run_name={name}", f"train.output_dir={root / name}", f"train.epochs={epochs}",
                             f"log.wandb={wandb}"])
    (cfg.run_dir / "REQUEUE").unlink(missing_ok=True)
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS, resumed=first_epoch > 0)
    for epoch in range(first_epoch, first_epoch + evaluated):
        tracker.log_step(10 * epoch + 5, {"train/img_per_s": 120.0})
        tracker.log_eval(epoch, 10 * epoch + 10, {"model": fake_metrics(50.0 + epoch)})
    if end == "finished":
        tracker.finish(ENGINE_FINISH)
    elif end == "preempted":
        mark_requeue(cfg.run_dir, "preempted at step 25")
        tracker.finish({"preempted": True, "global_step": 25, "img_per_s": 100.0, "img_per_s_window_median": 120.0})
    elif end == "ctrl_c":  # saved, no REQUEUE marker
        tracker.finish({"stopped": "Ctrl-C", "global_step": 25, "img_per_s": 100.0})
    if wandb != "disabled":
        flush_wandb()
    return cfg.run_dir


def table_rows(table: str) -> list[list[str]]:
    """Table lines below the header and rule, split into cells on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line) for line in table.splitlines()[2:]]


def test_collect_local_runs_reads_run_dirs_and_directories_of_run_dirs(runs_root):
    assert sorted(r.name for r in collect_local_runs([runs_root])) == ["a", "b", "c"]
    (run,) = collect_local_runs([runs_root / "b"])
    assert run.config["optim.lr"] == 0.05 and run.summary["best_mAP"] == 60.0
    assert run.curves == {"model": [(0, 52.0), (1, 58.0)], "ema": [(0, 51.0), (1, 60.0)]}
    with pytest.raises(ValueError, match="nowhere: no run found"):
        collect_local_runs([runs_root / "nowhere"])


def test_table_shows_only_differing_config_keys_best_map_first(runs_root):
    table = format_table(collect_local_runs([runs_root]))
    assert table.splitlines()[0].split() == ["name", "config", "best_mAP", "CF1", "OF1", "img_per_s", "procs",
                                             "status"]
    assert table_rows(table) == [
        ["b", "model.head=gcn optim.lr=0.05", "60.00", "62.00", "64.60", "90.00", "1", "finished"],
        ["a", "model.head=gcn optim.lr=0.1", "55.00", "61.00", "64.60", "100.00", "1", "finished"],
        ["c", "model.head=linear optim.lr=0.1", "50.00", "55.00", "64.60", "180.00", "2", "finished"],
    ]
    header, rule, *rows = table.splitlines()  # every cell starts where the rule's dashes of its column start
    starts = [m.start() for m in re.finditer(r"-+", rule)]
    assert all(line[s - 2:s] == "  " and line[s] != " " for line in (header, *rows) for s in starts[1:])


@pytest.mark.parametrize(("column", "order"), [
    ("img_per_s", ["c", "a", "b"]),  # metrics: descending
    ("CF1", ["b", "a", "c"]),
    ("name", ["a", "b", "c"]),  # names and config values: ascending
    ("optim.lr", ["b", "a", "c"]),
    ("best_epoch", ["a", "b", "c"]),  # any summary key: descending (all 1, stable)
])
def test_table_sorts_by_any_column(runs_root, column, order):
    rows = table_rows(format_table(collect_local_runs([runs_root]), sort_by=column))
    assert [row[0] for row in rows] == order


def test_table_sort_by_unknown_column_names_the_valid_columns(runs_root):
    with pytest.raises(ValueError, match="--sort 'speed': not a column .*best_mAP"):
        format_table(collect_local_runs([runs_root]), sort_by="speed")


def test_filters_compare_yaml_typed_values_with_config_values(runs_root):
    runs = collect_local_runs([runs_root])
    assert [r.name for r in filter_runs(runs, parse_filters(["optim.lr=0.1", "model.head=gcn"]))] == ["a"]
    assert wandb_filters(parse_filters(["optim.lr=0.1", "best_epoch=1"])) == {
        "config.optim.lr": 0.1, "summary_metrics.best_epoch": 1}
    for item in ("optim.lr", "=0.1"):
        with pytest.raises(ValueError, match=f"--filter '{item}': expected key=value"):
            parse_filters([item])


def record(name: str, config: dict, **summary) -> RunRecord:
    return RunRecord(name=name, source=name, config=config, summary=summary)


def test_a_filter_on_a_summary_key_keeps_the_runs_with_that_value(runs_root):
    runs = collect_local_runs([runs_root])
    assert [r.name for r in filter_runs(runs, parse_filters(["world_size=2"]))] == ["c"]
    assert sorted(r.name for r in filter_runs(runs, parse_filters(["world_size=1", "optim.lr=0.1"]))) == ["a"]


def test_a_filter_value_in_exponent_notation_matches_as_the_same_override_would_set_it():
    """YAML 1.1 reads 1e-4 as a string; the training override optim.weight_decay=1e-4 sets the number."""
    runs = [record("a", {"optim.weight_decay": 1e-4, "optim.lr": 1e-3, "train.run_name": "1e-4x"})]
    assert [r.name for r in filter_runs(runs, parse_filters(["optim.weight_decay=1e-4", "optim.lr=1e-3"]))] == ["a"]
    assert parse_filters(["train.run_name=1e-4x", "model.head=gcn"]) == {"train.run_name": "1e-4x", "model.head": "gcn"}
    # Leading zeros stay text, as train.run_name=007 sets it (YAML 1.1 read 007 as 7, the float fallback 7.0).
    assert parse_filters(["train.run_name=007", "train.epochs=8"]) == {"train.run_name": "007", "train.epochs": 8}


def test_a_filter_on_a_list_key_given_one_value_matches_the_list_the_same_override_sets():
    """Training reads optim.epoch_step=8 as [8]; the filter read 8 and matched no run."""
    runs = [record("a", {"optim.epoch_step": [8]}), record("b", {"optim.epoch_step": [8, 12]})]
    assert [r.name for r in filter_runs(runs, parse_filters(["optim.epoch_step=8"]))] == ["a"]
    assert [r.name for r in filter_runs(runs, parse_filters(["optim.epoch_step=[8,12]"]))] == ["b"]
    # A key this version's config has not (a run of an older one), and summary keys: typed as YAML.
    assert parse_filters(["optim.old_key=3", "best_mAP=50.5", "optim.old_decay=1e-4"]) == {
        "optim.old_key": 3, "best_mAP": 50.5, "optim.old_decay": 1e-4}


def test_runs_that_share_a_name_are_listed_with_where_they_were_read_from():
    runs = [RunRecord(name, source, {}, {}) for name, source in [("toy", "runs/a"), ("toy", "runs/b"), ("c", "runs/c")]]
    assert [r.name for r in with_distinct_names(runs)] == ["toy [runs/a]", "toy [runs/b]", "c"]


def test_sorting_by_the_config_column_is_ascending(runs_root):
    rows = table_rows(format_table(collect_local_runs([runs_root]), sort_by="config"))
    assert [row[0] for row in rows] == ["b", "a", "c"]  # model.head=gcn optim.lr=0.05 < ...=0.1 < model.head=linear


def test_runs_without_the_sorted_value_come_last_whatever_the_direction():
    runs = [record("none", {}), record("low", {"optim.lr": 0.1}, best_mAP=50.0),
            record("high", {"optim.lr": 0.05}, best_mAP=60.0)]
    assert [row[0] for row in table_rows(format_table(runs))] == ["high", "low", "none"]
    assert [row[0] for row in table_rows(format_table(runs, sort_by="optim.lr"))] == ["high", "low", "none"]


def test_the_config_column_leaves_out_a_key_a_run_does_not_have_and_the_runs_identity():
    runs = [record("a", {"optim.lr": 0.1, "train.run_name": "a"}, best_mAP=50.0),
            record("b", {"optim.lr": 0.2, "train.run_name": "b", "model.head": "gcn"}, best_mAP=60.0)]
    assert table_rows(format_table(runs, columns=("name", "config"))) == [["b", "model.head=gcn optim.lr=0.2"],
                                                                         ["a", "optim.lr=0.1"]]


def test_plot_map_curves_writes_a_png(runs_root, tmp_path):
    out = plot_map_curves(collect_local_runs([runs_root]), tmp_path / "plots" / "map.png")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_compare_cli_prints_the_filtered_sorted_table_and_writes_the_plot(runs_root, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    out = tmp_path / "map.png"
    args = parser.parse_args([str(runs_root), "--filter", "model.head=gcn", "--sort", "name", "--plot", str(out)])
    assert run_compare(args) == 0
    printed = capsys.readouterr().out
    assert [row[0] for row in table_rows(printed.split("\nwrote ")[0])] == ["a", "b"]
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_compare_cli_without_matching_runs_exits_1(runs_root, capsys):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    assert run_compare(parser.parse_args([str(runs_root), "--filter", "model.head=hgat"])) == 1
    assert "no runs to compare" in capsys.readouterr().err


@pytest.mark.usefixtures("wandb_env")
@pytest.mark.parametrize("first_prefix", ["offline-run-", "run-"])  # run-: the local files of an online run
def test_offline_runs_of_one_id_are_merged_in_time_order(tmp_path, monkeypatch, first_prefix):
    # A requeued job: the first process evaluated epochs 0-2, the second resumed from epoch 2's start.
    merged_dir = tmp_path / "wandb_runs"
    for index, (maps, first_epoch) in enumerate([([(50.0, None), (52.0, None), (60.0, None)], 0),
                                                 ([(51.0, None), (53.0, None)], 2)]):
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / f"w{index}"))
        record_run(tmp_path, "r", maps, ("log.run_id=rq1",), wandb="offline", first_epoch=first_epoch)
        (run_files,) = (tmp_path / f"w{index}" / "wandb").glob("offline-run-*-rq1")
        prefix = first_prefix if index == 0 else "offline-run-"
        shutil.copytree(run_files, merged_dir / f"{prefix}20260101_00000{index}-rq1")
    assert not (tmp_path / "r" / "wandb").exists(), "WANDB_DIR replaces the run directory as W&B's directory"
    (run,) = collect_offline_wandb_runs(merged_dir)
    assert run.curves["model"] == [(0, 50.0), (1, 52.0), (2, 51.0), (3, 53.0)]
    assert (run.summary["best_mAP"], run.summary["best_epoch"]) == (53.0, 3)
    assert run.source.endswith("offline-run-20260101_000001-rq1/run-rq1.wandb")


@pytest.mark.usefixtures("wandb_env")
def test_offline_reader_joins_records_split_across_blocks_and_stops_at_a_torn_one(tmp_path):
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), id="big1", project="p")
    run.summary["notes"] = "x" * 100_000  # one record over three 32 KiB blocks
    run.log({"epoch": 0, "val/mAP": 40.0}, step=1)
    run.finish()
    flush_wandb()
    (run,) = collect_offline_wandb_runs(tmp_path)
    assert len(run.summary["notes"]) == 100_000 and run.curves == {"model": [(0, 40.0)]}
    (wandb_file,) = tmp_path.glob("wandb/offline-run-*/run-big1.wandb")
    wandb_file.write_bytes(wandb_file.read_bytes()[:50_000])  # killed while writing the long record
    with pytest.warns(UserWarning, match="torn or corrupt record"):
        (run,) = collect_offline_wandb_runs(tmp_path)
    assert "notes" not in run.summary and run.config == {}


class FakeRun:
    def __init__(self, name: str, lr: float, best: float) -> None:
        self.name, self.id = name, f"id-{name}"
        self.config = {"optim": {"lr": lr}, "_wandb": {"x": 1}}
        self.summary_metrics = {"best_mAP": best, "world_size": 8, "_runtime": 3}

    def scan_history(self, keys: list[str]) -> list[dict]:
        return [{"epoch": 0, keys[1]: 10.0}, {"epoch": 1, keys[1]: 20.0}] if keys[1] == "val/mAP" else []


def test_collect_wandb_runs_asks_the_api_for_filtered_runs_best_map_first(monkeypatch):
    import wandb

    calls = []

    class FakeApi:
        def runs(self, path, filters, order):
            calls.append((path, filters, order))
            return [FakeRun("x", 0.1, 70.0), FakeRun("y", 0.2, 65.0)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    runs = collect_wandb_runs("team/mlgcn", {"config.optim.lr": 0.1}, curves=True)
    assert calls == [("team/mlgcn", {"config.optim.lr": 0.1}, "-summary_metrics.best_mAP")]
    assert [(r.name, r.source, r.config, r.summary) for r in runs][0] == (
        "x", "team/mlgcn/id-x", {"optim.lr": 0.1}, {"best_mAP": 70.0, "world_size": 8})
    assert runs[1].curves == {"model": [(0, 10.0), (1, 20.0)]}
    assert [row[0] for row in table_rows(format_table(runs))] == ["x", "y"]
    assert [run.curves for run in collect_wandb_runs("team/mlgcn")] == [{}, {}]  # no history queries asked


def test_an_evaluation_logged_without_a_finite_map_is_no_point_of_the_curve(monkeypatch):
    import wandb

    class NanRun(FakeRun):
        def scan_history(self, keys: list[str]) -> list[dict]:  # epoch 0 had no class with a positive
            return [{"epoch": 0, keys[1]: float("nan")}, {"epoch": 1, keys[1]: 20.0}] if keys[1] == "val/mAP" else []

    class FakeApi:
        def runs(self, path, filters, order):
            return [NanRun("x", 0.1, 20.0)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    (run,) = collect_wandb_runs("team/mlgcn", curves=True)
    assert run.curves == {"model": [(1, 20.0)]}


def test_a_damaged_summary_json_exits_2_naming_the_file(runs_root, capsys):
    damaged = next(runs_root.rglob("summary.json"))
    damaged.write_text("{")
    assert main(["compare", str(runs_root)]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}: not valid JSON" in err and "Traceback" not in err


def test_comparing_a_wandb_project_without_a_login_exits_2_with_what_to_do(monkeypatch, capsys):
    import wandb

    class NoLogin:
        def runs(self, *args, **kwargs):
            raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "Api", NoLogin)
    assert main(["compare", "--wandb", "team/mlgcn"]) == 2
    err = capsys.readouterr().err
    assert "W&B project 'team/mlgcn': api_key not configured" in err and "wandb login" in err


def test_a_run_without_a_config_leaves_the_config_column_to_the_keys_that_differ_between_the_others():
    """A W&B run killed before it logged its config: its row shows no config, and the others show only lr."""
    runs = [record("a", {"optim.lr": 0.1, "model.head": "gcn"}), record("b", {"optim.lr": 0.05, "model.head": "gcn"}),
            record("killed", {})]
    rows = {row[0]: row[1:] for row in table_rows(format_table(runs))}
    assert rows["a"][0] == "optim.lr=0.1" and rows["b"][0] == "optim.lr=0.05"


@pytest.mark.usefixtures("wandb_env")
def test_offline_runs_are_found_in_a_directory_of_run_directories(tmp_path):
    for name in ("a", "b"):
        record_run(tmp_path / "runs", name, [(50.0, None)], wandb="offline")
    assert sorted(run.name for run in collect_offline_wandb_runs(tmp_path / "runs")) == ["a", "b"]


def test_the_status_column_tells_finished_preempted_and_killed_runs_apart(tmp_path):
    root = tmp_path / "runs"
    train_session(root, "done", epochs=8, evaluated=8, end="finished")
    train_session(root, "short", epochs=2, evaluated=2, end="finished")
    train_session(root, "killed", epochs=8, evaluated=2, end="killed")
    train_session(root, "preempted", epochs=8, evaluated=3, end="preempted")
    train_session(root, "resumed", epochs=8, evaluated=3, end="preempted")
    train_session(root, "resumed", epochs=8, evaluated=5, end="finished", first_epoch=3)
    train_session(root, "resumed_killed", epochs=8, evaluated=3, end="preempted")
    train_session(root, "resumed_killed", epochs=8, evaluated=1, end="killed", first_epoch=3)
    rows = table_rows(format_table(collect_local_runs([root]), sort_by="name", columns=("name", "status")))
    assert dict(rows) == {"done": "finished", "short": "finished", "killed": "incomplete: epoch 2 of 8",
                          "preempted": "preempted (requeue pending)", "resumed": "finished",
                          "resumed_killed": "incomplete: epoch 4 of 8"}


def test_a_wandb_run_finished_after_a_preemption_reads_finished_though_its_summary_keeps_the_preempted_flag():
    """W&B's summary of a resumed run is the sessions' updates merged: a first session's "preempted" stayed in runs
    whose sessions did not clear it at their start (before 2026-11-27; before "finished", the label-frequency
    baseline told a finished run)."""
    runs = [record("resumed", {"train.epochs": 8}, preempted=True, frequency_baseline_mAP=17.2),
            record("resumed_now", {"train.epochs": 8}, preempted=True, finished=True),
            record("preempted", {"train.epochs": 8}, preempted=True, epoch=2)]
    assert table_rows(format_table(runs, sort_by="status", columns=("name", "status"))) == [
        ["resumed", "finished"], ["resumed_now", "finished"], ["preempted", "preempted"]]


def test_a_finished_flag_a_session_cleared_at_its_start_is_not_finished_though_an_older_finishs_baseline_stays():
    """A finished W&B run given more epochs (resume=auto): its new session sets finished=False, and the summary still
    holds the first finish's frequency_baseline_mAP."""
    runs = [record("extended", {"train.epochs": 12}, finished=False, preempted=False, frequency_baseline_mAP=17.2,
                   epoch=9)]
    assert table_rows(format_table(runs, columns=("name", "status"))) == [["extended", "incomplete: epoch 10 of 12"]]


@pytest.mark.usefixtures("wandb_env")
@pytest.mark.parametrize(("first_end", "first_epochs"), [("preempted", 8), ("finished", 4)])
def test_a_resumed_session_that_crashes_reads_incomplete_in_wandb_as_in_its_run_directory(tmp_path, monkeypatch,
                                                                                         first_end, first_epochs):
    """W&B keeps summary keys across the sessions of a resumed run: one preempted, resumed, then killed read
    "preempted" with the first session's img_per_s; one finished, given more epochs, then killed read "finished"."""
    root = tmp_path / "runs"
    sessions = [(first_epochs, 4, first_end, 0), (8, 1, "killed", 4)]
    for index, (epochs, evaluated, end, first_epoch) in enumerate(sessions):
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / f"w{index}"))  # sessions apart, whatever second they start in
        train_session(root, "r", epochs, evaluated, end, first_epoch, wandb="offline")
    (from_wandb,) = collect_offline_wandb_runs(tmp_path / "w0", tmp_path / "w1")
    (from_dir,) = collect_local_runs([root])
    for run in (from_wandb, from_dir):
        assert table_rows(format_table([run], columns=("name", "img_per_s", "status"))) == [
            ["r", "-", "incomplete: epoch 5 of 8"]], run.source


def test_a_preempted_run_whose_job_slurm_ended_reads_job_ended_instead_of_requeue_pending(tmp_path):
    """scancel, or a preemption that cancels, after the trainers asked for a requeue: slurm/coco_gcn.sh renames REQUEUE
    (tests/test_slurm.py), which no requeued job would remove. A resubmission resumes and reads as any run."""
    root = tmp_path / "runs"
    for name in ("pending", "ended", "resubmitted"):
        train_session(root, name, epochs=8, evaluated=3, end="preempted")
    for name in ("ended", "resubmitted"):
        (root / name / "REQUEUE").rename(root / name / "REQUEUE.terminated")
    train_session(root, "resubmitted", epochs=8, evaluated=1, end="killed", first_epoch=3)
    rows = table_rows(format_table(collect_local_runs([root]), sort_by="name", columns=("name", "status")))
    assert dict(rows) == {"pending": "preempted (requeue pending)", "ended": "preempted (job ended)",
                          "resubmitted": "incomplete: epoch 4 of 8"}


def test_a_run_stopped_by_ctrl_c_reads_stopped_not_preempted_with_a_requeue_pending(tmp_path):
    root = tmp_path / "runs"
    train_session(root, "stopped", epochs=8, evaluated=2, end="ctrl_c")
    train_session(root, "resumed", epochs=8, evaluated=2, end="ctrl_c")
    train_session(root, "resumed", epochs=8, evaluated=1, end="killed", first_epoch=2)
    rows = table_rows(format_table(collect_local_runs([root]), sort_by="name", columns=("name", "status")))
    assert dict(rows) == {"stopped": "stopped (Ctrl-C)", "resumed": "incomplete: epoch 3 of 8"}


def test_img_per_s_is_the_engines_whole_run_rate_and_a_summary_with_the_windows_median_alone_shows_none(tmp_path):
    """The tracker wrote the logging windows' median as img_per_s on every rewrite, the engine's finish the run's
    images over its epochs' time (loader start-ups included): a killed or running run showed the higher window rate
    beside finished runs' whole-run rates. An old summary.json holds the windows' median alone, as img_per_s."""
    root = tmp_path / "runs"
    train_session(root, "finished", epochs=2, evaluated=2, end="finished")
    train_session(root, "preempted", epochs=8, evaluated=2, end="preempted")
    train_session(root, "killed", epochs=8, evaluated=2, end="killed")
    old = train_session(root, "old_killed", epochs=8, evaluated=2, end="killed")
    summary = json.loads((old / "summary.json").read_text())
    summary["img_per_s"] = summary.pop("img_per_s_window_median")
    (old / "summary.json").write_text(json.dumps(summary))
    rows = table_rows(format_table(collect_local_runs([root]), sort_by="img_per_s", columns=("name", "img_per_s")))
    assert rows == [["preempted", "100.00"], ["finished", "90.00"], ["killed", "-"], ["old_killed", "-"]]


@pytest.mark.usefixtures("wandb_env")
def test_sorting_by_a_wandb_metric_kept_as_its_max_orders_runs_by_the_number(tmp_path):
    """define_metric(summary="max") makes W&B keep val/mAP as {"max": x}, which sorted by its text: 9.5 above 10."""
    for name, value in (("nine", 9.5), ("ten", 10.0), ("eleven", 11.0)):
        record_run(tmp_path / "runs", name, [(value, None)], wandb="offline")
    runs = collect_offline_wandb_runs(tmp_path / "runs")
    assert {run.name: run.summary["val/mAP"] for run in runs} == {"nine": {"max": 9.5}, "ten": {"max": 10},
                                                                  "eleven": {"max": 11}}
    assert [row[0] for row in table_rows(format_table(runs, sort_by="val/mAP"))] == ["eleven", "ten", "nine"]


WANDB_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # all a W&B run killed before its first record holds


def test_a_wandb_file_without_a_record_is_listed_by_its_run_id_as_holding_no_data(tmp_path, capsys):
    run_files = tmp_path / "e" / "wandb" / "offline-run-20260101_000000-k9"
    run_files.mkdir(parents=True)
    (run_files / "run-k9.wandb").write_bytes(WANDB_FILE_HEADER)
    assert main(["compare", "--wandb-offline", str(tmp_path / "e" / "wandb")]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert row[0] == "k9" and row[-1] == "no data"


def test_a_run_given_twice_is_listed_once(runs_root, tmp_path, monkeypatch):
    assert sorted(run.name for run in collect_local_runs([runs_root / "a", runs_root / ".." / "runs" / "a", runs_root])) == [
        "a", "b", "c"]
    monkeypatch.chdir(runs_root.parent)
    assert sorted(run.name for run in collect_local_runs([Path("runs"), runs_root / "a"])) == ["a", "b", "c"]
    run_files = tmp_path / "w" / "offline-run-20260101_000000-k9"
    run_files.mkdir(parents=True)
    (run_files / "run-k9.wandb").write_bytes(WANDB_FILE_HEADER)
    assert len(collect_offline_wandb_runs(tmp_path / "w", tmp_path / ".." / tmp_path.name / "w")) == 1


def test_the_config_column_shows_a_list_as_the_filter_value_that_selects_it():
    runs = [record("a", {"optim.epoch_step": [8]}), record("b", {"optim.epoch_step": [4, 6]})]
    configs = dict(table_rows(format_table(runs, sort_by="name", columns=("name", "config"))))
    assert configs == {"a": "optim.epoch_step=[8]", "b": "optim.epoch_step=[4,6]"}
    for name, shown in configs.items():
        assert [run.name for run in filter_runs(runs, parse_filters([shown]))] == [name]


@pytest.mark.parametrize(("filters", "reason"), [
    (["optim.lrr=0.1"], "--filter optim.lrr: no run has this key (did you mean optim.lr"),
    (["model.head=hgat"], "--filter model.head=hgat matches none of the 3 runs (their values: gcn, linear)"),
    (["model.head=linear", "optim.lr=0.05"], "no run matches all of --filter model.head=linear optim.lr=0.05"),
    (["world_size=3"], "--filter world_size=3 matches none of the 3 runs (their values: 1, 2)"),
    (["optim.epoch_step=[8,12]"],
     "--filter optim.epoch_step=[8,12] matches none of the 3 runs (their values: [30])"),
])
def test_compare_without_matching_runs_exits_1_saying_which_filter_matched_nothing(runs_root, capsys, filters,
                                                                                   reason):
    assert main(["compare", str(runs_root), *(arg for f in filters for arg in ("--filter", f))]) == 1
    err = capsys.readouterr().err
    assert "no runs to compare" in err and reason in err


def test_every_compare_option_says_what_it_does_and_its_default():
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    options = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert [action.dest for action in options if "default" not in action.help] == []
    assert "(default: best_mAP)" in " ".join(parser.format_help().split())


def train_until(root: Path, name: str, toy_root: Path, *overrides: str) -> Path:
    """Start the engine on run directory ``root/name``; it is expected to stop in its setup (a failure standing
    in for a kill there), before its Tracker writes summary.json."""
    cfg = load_config(REPO / "configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0", "train.epochs=3",
                                                 "train.resume=none", f"train.output_dir={root / name}",
                                                 f"train.run_name={name}", "log.wandb=disabled", *overrides])
    with pytest.raises(SetupStopped):
        train(cfg)
    assert not (cfg.run_dir / "summary.json").exists()
    return cfg.run_dir


class SetupStopped(Exception):
    pass


def stop_setup(*args, **kwargs):
    raise SetupStopped


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_run_stopped_in_setup_before_its_summary_is_listed_with_the_config_it_saved(toy_root, tmp_path,
                                                                                     monkeypatch, capsys):
    root = tmp_path / "runs"
    monkeypatch.setattr(engine_module, "dataset_info", stop_setup)  # e.g. killed while reading the annotations
    train_until(root, "no_config", toy_root)
    monkeypatch.undo()
    monkeypatch.setattr(Tracker, "_start_wandb", stop_setup)  # e.g. killed while W&B's start hung
    for lr in ("0.3", "0.2"):
        train_until(root, f"lr{lr}", toy_root, f"optim.lr={lr}")
    capsys.readouterr()  # what the engine printed
    assert main(["compare", str(root), "--sort", "name"]) == 0
    assert table_rows(capsys.readouterr().out) == [
        ["lr0.2", "optim.lr=0.2", "-", "-", "-", "-", "-", "no summary: not past setup"],
        ["lr0.3", "optim.lr=0.3", "-", "-", "-", "-", "-", "no summary: not past setup"],
        ["no_config", "-", "-", "-", "-", "-", "-", "no summary: not past setup"],
    ]
    (run,) = collect_local_runs([root / "lr0.3"])  # given itself, not through its parent
    assert run.config["train.epochs"] == 3


def test_a_directory_holding_nothing_a_run_writes_is_not_listed(runs_root):
    (runs_root / "notes").mkdir()
    (runs_root / "notes" / "todo.txt").write_text("compare lr 0.05 with 0.1\n")
    (runs_root / "empty").mkdir()
    assert sorted(run.name for run in collect_local_runs([runs_root])) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="notes: no run found"):
        collect_local_runs([runs_root / "notes"])


def test_a_run_whose_summary_was_removed_after_training_began_says_so_and_keeps_its_curve(tmp_path):
    run_dir = train_session(tmp_path / "runs", "lost", epochs=8, evaluated=2, end="finished")
    (run_dir / "summary.json").unlink()
    (run,) = collect_local_runs([tmp_path / "runs"])
    assert run.curves == {"model": [(0, 50.0), (1, 51.0)]}
    assert table_rows(format_table([run], columns=("name", "status"))) == [
        ["lost", "no summary: removed after training began"]]


def wandb_record(kind: str, items: dict, **run) -> Any:
    """A W&B record: ``kind`` "run" (``run`` holds its fields), "config", "summary" or "history" with
    ``items`` (a key, or a tuple for a nested key -> its value)."""
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    for name, value in run.items():
        setattr(record.run, name, value)
    target = {"run": None, "config": record.config.update, "summary": record.summary.update,
              "history": record.history.item}[kind]
    for key, value in items.items():
        item = target.add()
        item.nested_key.extend(key) if isinstance(key, tuple) else setattr(item, "key", key)
        item.value_json = json.dumps(value)
    return record


def write_wandb_file(path: Path, records: list) -> Path:
    """``records`` as W&B writes its run file (the LevelDB log format): 32 KiB blocks, a block tail under 7
    bytes padded, a record that does not fit split into first/middle/last fragments (an empty first fragment
    where exactly a header's 7 bytes are left)."""
    data = bytearray(WANDB_FILE_HEADER)
    for record in records:
        payload, first = record.SerializeToString(), True
        while first or payload:
            left = BLOCK - len(data) % BLOCK
            if left < 7:
                data += bytes(left)
                continue
            chunk, payload = payload[:left - 7], payload[left - 7:]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            checksum = zlib.crc32(chunk, zlib.crc32(bytes([kind])))
            data += struct.pack("<IHB", checksum, len(chunk), kind) + chunk
            first = False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


BLOCK = 32 * 1024


def padded_to(size: int, kind: str, items: dict) -> Any:
    """A record of ``kind`` holding ``items`` and a "notes" text sized to serialise to ``size`` bytes."""
    for length in range(size, 0, -1):
        record = wandb_record(kind, {**items, "notes": "x" * length})
        if record.ByteSize() == size:
            return record
    raise AssertionError(f"no padding gives {size} bytes")


def test_a_record_starting_where_a_block_has_just_a_headers_room_is_read_whole(tmp_path):
    """W&B's writer puts an empty first fragment in a block's last 7 bytes and the record in the next one."""
    first = padded_to(BLOCK - 3 * 7, "history", {"epoch": 0, "val/mAP": 40.0, "val_ema/mAP": 39.0})
    records = [first, wandb_record("history", {"epoch": 1, "val/mAP": 41.0})]
    path = write_wandb_file(tmp_path / "offline-run-20260101_000000-edge" / "run-edge.wandb", records)
    assert len(path.read_bytes()) > BLOCK
    assert list(read_wandb_records(path)) == records
    (run,) = collect_offline_wandb_runs(tmp_path)
    assert run.curves == {"model": [(0, 40.0), (1, 41.0)], "ema": [(0, 39.0)]}


def test_a_record_whose_bytes_changed_on_disk_stops_the_reading_there(tmp_path):
    records = [wandb_record("history", {"epoch": 0, "val/mAP": 40.0}),
               wandb_record("history", {"epoch": 1, "val/mAP": 41.0})]
    path = write_wandb_file(tmp_path / "run-bits.wandb", records)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"41.0", b"91.0"))  # a flipped bit: still a record, with another value
    second = len(WANDB_FILE_HEADER) + 7 + records[0].ByteSize()
    with pytest.warns(UserWarning, match=f"torn or corrupt record at byte {second}; reading stops there"):
        assert list(read_wandb_records(path)) == records[:1]


def test_a_wandb_summary_updated_by_nested_keys_reads_as_nested_values_without_wandbs_own_keys(tmp_path):
    write_wandb_file(tmp_path / "offline-run-20260101_000000-n1" / "run-n1.wandb", [
        wandb_record("run", {}, run_id="n1", display_name="nested"),
        wandb_record("config", {"_wandb": {"cli_version": "0.31"}, "optim": {"lr": 0.1}}),
        wandb_record("summary", {"best_mAP": 40.0, ("final", "epoch"): 3, ("final", "model", "mAP"): 40.0,
                                 "_runtime": 12}),
    ])
    (run,) = collect_offline_wandb_runs(tmp_path)
    assert (run.name, run.config) == ("nested", {"optim.lr": 0.1})
    assert run.summary == {"best_mAP": 40.0, "final": {"epoch": 3, "model": {"mAP": 40.0}}}


def test_a_damaged_config_yaml_of_a_run_without_a_summary_exits_2_naming_the_file(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "killed"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("optim:\n  lr: [0.1\n")  # killed while writing it
    assert main(["compare", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'config.yaml'}: not valid YAML" in err and "Traceback" not in err


def test_a_run_is_named_by_its_run_name_not_by_the_directory_it_was_written_to(tmp_path):
    """train.output_dir=/scratch/job-1234 with train.run_name=gcn_lr01 is listed as gcn_lr01."""
    root = tmp_path / "runs"
    (root / "job-1").mkdir(parents=True)
    (root / "job-1" / "summary.json").write_text(json.dumps({"run_name": "finished_one", "config": {}}))
    (root / "job-2").mkdir()
    (root / "job-2" / "config.yaml").write_text("train:\n  run_name: in_setup\n")
    (root / "job-3").mkdir()
    (root / "job-3" / ".lock").write_text("pid 1 on node\n")  # killed before it saved its config
    assert [run.name for run in collect_local_runs([root])] == ["finished_one", "in_setup", "job-3"]


def test_a_filter_value_no_run_has_names_at_most_eight_of_the_values_they_have():
    runs = [record(f"r{i}", {"optim.lr": i / 100}) for i in range(1, 11)]
    assert why_nothing_matched(runs, parse_filters(["optim.lr=0.5"])) == (
        "--filter optim.lr=0.5 matches none of the 10 runs "
        "(their values: 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, ...)")


def test_the_config_column_shows_a_float_as_the_filter_value_that_selects_it():
    """An EMA decay of 0.9999975 was shown with six significant digits, as 0.999998, which selects no run."""
    runs = [record("a", {"train.ema_decay": 0.9999975}), record("b", {"train.ema_decay": 0.99999}),
            record("c", {"train.ema_decay": 0.0})]
    configs = dict(table_rows(format_table(runs, sort_by="name", columns=("name", "config"))))
    assert configs == {"a": "train.ema_decay=0.9999975", "b": "train.ema_decay=0.99999",
                       "c": "train.ema_decay=0"}
    for name, shown in configs.items():
        assert [run.name for run in filter_runs(runs, parse_filters([shown]))] == [name]


def test_the_config_column_shows_only_the_runs_config_keys_not_the_runtime_wandb_records_beside_them():
    runs = [record("a", {"optim.lr": 0.1, "runtime.git_commit": "abc", "_wandb.cli_version": "0.31"}),
            record("b", {"optim.lr": 0.2, "runtime.git_commit": "def", "_wandb.cli_version": "0.30"})]
    assert dict(table_rows(format_table(runs, columns=("name", "config")))) == {"a": "optim.lr=0.1",
                                                                                "b": "optim.lr=0.2"}


def test_an_incomplete_run_counts_the_last_epoch_either_model_evaluated_and_one_without_any_says_so():
    curves = {"model": [(0, 50.0), (1, 51.0), (2, 52.0)], "ema": [(0, 49.0)]}
    runs = [RunRecord("ema_behind", "a", {"train.epochs": 8}, {}, curves),
            RunRecord("started", "b", {"train.epochs": 8}, {})]  # a W&B run killed after it logged its config
    assert dict(table_rows(format_table(runs, columns=("name", "status")))) == {
        "ema_behind": "incomplete: epoch 3 of 8", "started": "incomplete: epoch ? of 8"}


def test_sorting_by_a_key_whose_values_mix_types_orders_them_by_their_text():
    """A key whose type changed between versions: numbers and text do not compare."""
    runs = [record(name, {"graph.stats": value}) for name, value in (("a", 3), ("b", "2"), ("c", 1))]
    assert [row[0] for row in table_rows(format_table(runs, sort_by="graph.stats"))] == ["c", "b", "a"]


def test_the_plot_draws_each_runs_model_curve_solid_and_its_ema_dashed_in_the_runs_colour(runs_root, tmp_path,
                                                                                         monkeypatch):
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    a, b, _ = sorted(collect_local_runs([runs_root]), key=lambda run: run.name)
    plot_map_curves([record("no_eval", {}), a, b], tmp_path / "map.png")
    lines = drawn[0].axes[0].get_lines()
    assert [(line.get_label(), line.get_linestyle(), line.get_color()) for line in lines] == [
        ("a", "-", "C0"), ("b", "-", "C1"), ("b (EMA)", "--", "C1")]
    assert [list(line.get_ydata()) for line in lines] == [[50.0, 55.0], [52.0, 58.0], [51.0, 60.0]]
    with pytest.raises(ValueError, match="none of the chosen runs has an evaluation"):
        plot_map_curves([record("no_eval", {})], tmp_path / "none.png")


def test_runs_that_share_a_name_keep_it_plain_when_a_filter_leaves_one_of_them(tmp_path, capsys):
    for job, lr in (("job-1", 0.1), ("job-2", 0.2)):
        (tmp_path / job).mkdir()
        summary = {"run_name": "toy", "config": {"optim": {"lr": lr}}}
        (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(tmp_path), "--filter", "optim.lr=0.1"]) == 0
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["toy"]


def test_compare_asks_wandb_for_the_filtered_runs_under_wandbs_key_names(monkeypatch):
    import wandb

    calls = []

    class FakeApi:
        def runs(self, path, filters, order):
            calls.append(filters)
            return [FakeRun("x", 0.1, 70.0)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert main(["compare", "--wandb", "team/mlgcn", "--filter", "optim.lr=0.1", "--filter",
                 "world_size=8"]) == 0
    assert calls == [{"config.optim.lr": 0.1, "summary_metrics.world_size": 8}]
