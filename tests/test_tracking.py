"""Tracker: local metrics files, best-mAP bookkeeping, and W&B offline runs read back from their .wandb files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlgcn_dist.compare import collect_offline_wandb_runs, read_wandb_records
from mlgcn_dist.config import ConfigError, load_config
from mlgcn_dist.tracking import Tracker, git_state, json_safe, resolve_wandb_mode, scalar_metrics

REPO = Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "person"]


def fake_metrics(mAP: float, cf1: float = 60.0) -> dict:
    """An AveragePrecisionMeter.compute() result (class "person" absent) with its top-3 counterpart."""
    metrics = {"mAP": mAP, "OP": 70.0, "OR": 60.0, "OF1": 64.6, "CP": 68.0, "CR": 55.0, "CF1": cf1,
               "ap": [mAP - 5.0, mAP + 5.0, math.nan], "absent_classes": [2], "num_images": 12}
    return {**metrics, "top3": {**metrics, "OF1": 50.0, "CF1": cf1 - 10.0}}


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No WANDB_* setting from the outside; W&B's home directories under tmp_path; nothing printed."""
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "wandb_home"
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return home


def flush_wandb() -> None:
    """Wait until W&B's service has written every run file: run.finish() returns before the .wandb file is
    flushed (measured with wandb 0.31: often only its 7-byte header right after finish)."""
    import wandb

    wandb.teardown()


def record_run(root: Path, name: str, maps: list[tuple[float, float | None]], overrides: tuple[str, ...] = (),
               wandb: str = "disabled", img_per_s: float = 100.0, world_size: int = 1, cf1: float = 60.0,
               first_epoch: int = 0) -> Path:
    """A finished run made through the Tracker: one step line and one evaluation (model, EMA) per epoch, from
    ``first_epoch`` on (a resumed run)."""
    cfg = load_config(None, [f"train.run_name={name}", f"train.output_dir={root / name}", f"log.wandb={wandb}",
                             *overrides])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=world_size, label_names=LABELS,
                      system={"device": "cpu", "torch": "test"})
    for epoch, (model_map, ema_map) in enumerate(maps, start=first_epoch):
        tracker.log_step(10 * epoch + 5, {"train/loss": 1.0 / (epoch + 1), "train/img_per_s": img_per_s})
        results = {"model": fake_metrics(model_map, cf1)}
        if ema_map is not None:
            results["ema"] = fake_metrics(ema_map, cf1)
        tracker.log_eval(epoch, 10 * epoch + 10, results)
    tracker.finish({})
    if wandb != "disabled":
        flush_wandb()
    return cfg.run_dir


def test_metrics_jsonl_has_one_line_per_eval_with_named_per_class_ap_and_null_for_absent(tmp_path):
    run_dir = record_run(tmp_path, "a", [(50.0, 49.0), (55.0, None)])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in lines] == [(0, 10), (1, 20)]
    assert lines[0]["model"]["mAP"] == 50.0 and lines[0]["ema"]["mAP"] == 49.0 and "ema" not in lines[1]
    assert lines[0]["model"]["top3"] == {"mAP": 50.0, "OP": 70.0, "OR": 60.0, "OF1": 50.0, "CP": 68.0,
                                         "CR": 55.0, "CF1": 50.0, "num_images": 12}  # its scalars alone
    assert "ap" not in lines[0]["model"]
    assert lines[0]["per_class_ap"] == {"cat": 45.0, "dog": 55.0, "person": None}
    assert lines[0]["per_class_ap_ema"]["person"] is None
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [5, 15] and steps[1]["train/loss"] == 0.5


def test_summary_holds_best_map_over_model_and_ema_with_config_and_throughput(tmp_path):
    run_dir = record_run(tmp_path, "a", [(50.0, 52.0), (55.0, 54.0), (53.0, 56.0)], ("optim.lr=0.05",),
                         img_per_s=80.0, world_size=4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_mAP"], summary["best_epoch"], summary["best_step"], summary["best_source"]) == (
        56.0, 2, 30, "ema")
    assert summary["best_CF1"] == 60.0 and summary["best_OF1"] == 64.6
    assert [summary[f"best_{k}"] for k in ("OP", "OR", "CP", "CR")] == [70.0, 60.0, 68.0, 55.0]
    assert summary["final"]["epoch"] == 2 and summary["final"]["model"]["mAP"] == 53.0
    assert summary["final"]["ema"]["mAP"] == 56.0
    assert summary["img_per_s_window_median"] == 80.0 and summary["world_size"] == 4 and summary["run_name"] == "a"
    assert summary["config"]["optim"]["lr"] == 0.05 and summary["system"]["device"] == "cpu"
    assert not list(run_dir.glob(".*.tmp*")), "atomic writes leave no temporary file behind"


def test_finish_merges_caller_values_and_a_second_call_changes_nothing(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_eval(0, 3, {"model": fake_metrics(40.0)})
    tracker.finish({"img_per_s": 123.0, "global_step": 3, "world_size": 2})
    tracker.finish({"img_per_s": 1.0})
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["img_per_s"] == 123.0 and summary["global_step"] == 3 and summary["best_mAP"] == 40.0
    assert summary["world_size"] == 2  # the caller's values win over the tracker's own


def test_non_main_rank_writes_no_file_and_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would raise
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline", "log.log_artifact=true"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=False, world_size=2, label_names=LABELS)
    tracker.log_step(1, {"train/loss": 1.0})
    tracker.log_eval(0, 1, {"model": fake_metrics(40.0)})
    tracker.log_checkpoint(tmp_path / "ckpt.pt", 0, True)
    tracker.finish({})
    assert not tmp_path.joinpath("r").exists()


def test_disabled_tracking_writes_local_files_without_importing_wandb(tmp_path, monkeypatch, wandb_env):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_dir = record_run(tmp_path, "a", [(50.0, None)], ("log.log_artifact=true",))
    assert {p.name for p in run_dir.iterdir()} == {"metrics.jsonl", "train_log.jsonl", "summary.json"}


def test_relogged_epochs_and_steps_replace_later_lines_and_best_after_resume(tmp_path):
    run_dir = record_run(tmp_path, "a", [(50.0, None), (52.0, None), (60.0, None)])
    # Requeued with the checkpoint of epoch 1: epoch 2 is trained and evaluated again, worse this time.
    cfg = load_config(None, ["train.run_name=a", f"train.output_dir={run_dir}"])
    tracker = Tracker(cfg, run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_step(22, {"train/loss": 0.3})
    tracker.log_eval(2, 30, {"model": fake_metrics(51.0)})
    tracker.finish({})
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["model"]["mAP"]) for r in evals] == [(0, 50.0), (1, 52.0), (2, 51.0)]
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == [5, 15, 22]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_mAP"], summary["best_epoch"]) == (52.0, 1)


def test_a_line_torn_by_a_crash_is_dropped_before_the_resumed_run_appends(tmp_path):
    run_dir = record_run(tmp_path, "a", [(50.0, None), (52.0, None)])
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "step": 30, "mod')  # killed while writing epoch 2
    cfg = load_config(None, ["train.run_name=a", f"train.output_dir={run_dir}"])
    tracker = Tracker(cfg, run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_eval(2, 30, {"model": fake_metrics(55.0)})
    tracker.log_eval(3, 45, {"model": fake_metrics(56.0)})
    tracker.finish({})
    evals = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole
    assert [(r["epoch"], r["model"]["mAP"]) for r in evals] == [(0, 50.0), (1, 52.0), (2, 55.0), (3, 56.0)]


@pytest.mark.parametrize("label_names", [LABELS[:2], [*LABELS, "bird"]])
def test_log_eval_rejects_per_class_ap_not_matching_the_label_names(tmp_path, label_names):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=label_names)
    expected = rf"results\['model'\]\['ap'\] has 3 values for {len(label_names)} label names"
    with pytest.raises(ValueError, match=expected):
        tracker.log_eval(0, 1, {"model": fake_metrics(40.0)})


@pytest.mark.parametrize(("configured", "environ", "expected"), [
    ("auto", {}, "disabled"),
    ("auto", {"WANDB_MODE": "offline"}, "offline"),
    ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
    ("auto", {"WANDB_MODE": " Offline\n"}, "offline"),
    ("auto", {"WANDB_MODE": "online"}, "online"),
    ("online", {}, "online"),
    ("online", {"WANDB_MODE": "offline"}, "offline"),
    ("online", {"WANDB_MODE": "disabled"}, "disabled"),
    ("offline", {"WANDB_MODE": "disabled"}, "offline"),  # needs no server: launch/test.sh's WANDB_MODE leaves it
    ("offline", {"WANDB_MODE": "online"}, "offline"),
    ("disabled", {"WANDB_MODE": "online"}, "disabled"),
])
def test_wandb_mode_in_the_environment_decides_for_auto_and_online_while_offline_and_disabled_stay(
        configured, environ, expected):
    assert resolve_wandb_mode(configured, environ) == expected


@pytest.mark.parametrize("configured", ["auto", "online"])
def test_unknown_wandb_mode_environment_value_is_a_config_error_naming_it(configured):
    with pytest.raises(ConfigError, match=f"WANDB_MODE='sometimes' \\(log.wandb={configured}\\)"):
        resolve_wandb_mode(configured, {"WANDB_MODE": "sometimes"})


@pytest.mark.parametrize("environ_mode", ["offline", "disabled"])
def test_a_config_that_says_online_starts_the_mode_wandb_mode_lowers_it_to_and_says_so_once(
        tmp_path, wandb_env, monkeypatch, capsys, environ_mode):
    """The shipped GPU configs say log.wandb=online; WANDB_MODE=offline|disabled is how a cluster without internet
    or a login turns W&B down without editing them."""
    monkeypatch.setenv("WANDB_MODE", environ_mode)
    if environ_mode == "disabled":
        monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would raise
    cfg = load_config(REPO / "configs" / "coco_gcn.yaml", [f"train.output_dir={tmp_path / 'r'}"])
    assert cfg.log.wandb == "online"
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_eval(0, 10, {"model": fake_metrics(50.0)})
    tracker.finish({})
    if environ_mode == "offline":
        flush_wandb()
    run_dir = cfg.run_dir
    printed = capsys.readouterr().out
    assert printed.count(f"W&B: WANDB_MODE={environ_mode} in the environment turns log.wandb=online into "
                         f"{environ_mode}") == 1
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == (environ_mode == "offline")
    assert not list(run_dir.glob("wandb/run-*")), "no online run was started"
    assert json.loads((run_dir / "summary.json").read_text())["best_mAP"] == 50.0


def test_a_wandb_that_fails_to_start_is_off_for_the_run_with_one_message_and_the_run_files_go_on(
        tmp_path, wandb_env, monkeypatch, capsys):
    """What a shipped GPU config (log.wandb=online) met on a cluster without `wandb login`: wandb.init raised and
    rank 0 crashed at start."""
    import wandb

    def init_without_a_login(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", init_without_a_login)
    run_dir = record_run(tmp_path, "a", [(50.0, None), (55.0, None)], wandb="online")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert (f"W&B start failed (UsageError: No API key configured. Use `wandb login` to log in.); W&B logging is off "
            f"for the rest of this run, its files in {run_dir} go on") in err
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (run_dir / "train_log.jsonl").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_mAP"] == 55.0 and "wandb_run_id" not in summary


def test_offline_wandb_run_holds_map_history_top3_table_config_and_summary(tmp_path, wandb_env):
    run_dir = record_run(tmp_path, "a", [(50.0, 52.0), (55.0, 54.0)], ("optim.lr=0.05", "log.run_id=abc123"),
                         wandb="offline", world_size=2)
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-abc123.wandb")
    history_keys = {item.key or "/".join(item.nested_key)
                    for record in read_wandb_records(wandb_file) if record.WhichOneof("record_type") == "history"
                    for item in record.history.item}
    assert {"val/mAP", "val_ema/mAP", "val/top3/CF1", "val/per_class_ap/_type", "train/loss"} <= history_keys
    (run,) = collect_offline_wandb_runs(run_dir)
    assert run.name == "a" and run.config["optim.lr"] == 0.05 and run.config["runtime.world_size"] == 2
    assert run.summary["best_mAP"] == 55.0 and run.summary["best_source"] == "model"
    assert run.summary["world_size"] == 2 and run.summary["img_per_s_window_median"] == 100.0
    assert run.curves == {"model": [(0, 50.0), (1, 55.0)], "ema": [(0, 52.0), (1, 54.0)]}
    assert json.loads((run_dir / "summary.json").read_text())["wandb_run_id"] == "abc123"


def test_wandb_api_key_in_the_environment_reaches_no_file_under_the_run_dir(tmp_path, wandb_env, monkeypatch):
    secret = "k" * 20 + "0123456789abcdef0123"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    run_dir = record_run(tmp_path, "a", [(50.0, None)], wandb="offline")
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert [p for p in files if secret.encode() in p.read_bytes()] == []


def test_checkpoint_is_logged_as_a_file_reference_artifact(tmp_path, wandb_env):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline", "log.log_artifact=true"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_checkpoint(checkpoint, 3, is_best=True)
    tracker.finish({})
    flush_wandb()
    (wandb_file,) = cfg.run_dir.glob("wandb/offline-run-*/run-*.wandb")
    (artifact,) = [r.artifact for r in read_wandb_records(wandb_file) if r.WhichOneof("record_type") == "artifact"]
    assert artifact.type == "model" and {"latest", "epoch-3", "best"} <= set(artifact.aliases)
    assert [entry.ref for entry in artifact.manifest.contents] == [checkpoint.resolve().as_uri()]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_training_run_with_log_artifact_logs_its_best_pt_as_a_reference_artifact(toy_root, tmp_path, wandb_env):
    """log.log_artifact=true was read by nothing: the engine never logged a checkpoint."""
    from mlgcn_dist.engine import train

    run_dir = tmp_path / "run"
    train(load_config(Path(__file__).resolve().parents[1] / "configs/toy.yaml", [
        f"data.root={toy_root}", "data.workers=0", "data.batch_size=8", "data.steps_per_epoch=2", "train.epochs=1",
        f"train.output_dir={run_dir}", "train.resume=none", "train.ema_decay=0", "log.wandb=offline",
        "log.log_artifact=true",
    ]))
    flush_wandb()
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    logged = {(tuple(sorted(r.artifact.aliases)), tuple(entry.ref for entry in r.artifact.manifest.contents))
              for r in read_wandb_records(wandb_file)
              if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"}
    assert logged == {(("best", "epoch-0", "latest"), ((run_dir / "checkpoints/best.pt").as_uri(),))}


def test_git_state_outside_a_git_checkout_is_none(tmp_path):
    assert git_state(tmp_path) == {"git_commit": None, "git_dirty": None}


def test_an_evaluation_logged_behind_wandbs_step_lands_at_that_step_instead_of_being_dropped(tmp_path, wandb_env):
    """After a resume W&B's step continues from the run's last logged one, which can be the evaluated step itself
    (a run preempted after its epoch's last step logged, before the evaluation): W&B drops a lower step."""
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline", "log.run_id=behind"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_step(20, {"train/loss": 0.5})
    tracker.log_step(21, {"train/loss": 0.4})
    tracker.log_eval(1, 20, {"model": fake_metrics(61.0)})
    tracker.finish({})
    flush_wandb()
    (wandb_file,) = cfg.run_dir.glob("wandb/offline-run-*/run-behind.wandb")
    rows = [{item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            for record in read_wandb_records(wandb_file) if record.WhichOneof("record_type") == "history"]
    (evaluated,) = [row for row in rows if "val/mAP" in row]
    assert json.loads(evaluated["val/mAP"]) == 61.0 and json.loads(evaluated["epoch"]) == 1
    assert json.loads(evaluated["_step"]) == 21


def test_best_metrics_of_the_summary_all_come_from_the_best_evaluation_and_source(tmp_path):
    """The EMA is best: best_CF1 (what `mlgcn compare` ranks) is the EMA's, not the model's of that epoch."""
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_eval(0, 10, {"model": fake_metrics(50.0, cf1=40.0), "ema": fake_metrics(55.0, cf1=70.0)})
    tracker.log_eval(1, 20, {"model": fake_metrics(54.0, cf1=80.0), "ema": fake_metrics(53.0, cf1=81.0)})
    tracker.finish({})
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert (summary["best_mAP"], summary["best_epoch"], summary["best_source"]) == (55.0, 0, "ema")
    assert summary["best_CF1"] == 70.0


def test_a_tie_on_best_map_keeps_the_earlier_evaluation_and_the_model_over_its_ema(tmp_path):
    """As best_summary documents: ties keep the earlier one, and the model is looked at before the EMA."""
    run_dir = record_run(tmp_path, "a", [(50.0, 50.0), (50.0, 50.0)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["best_mAP"], summary["best_epoch"], summary["best_step"], summary["best_source"]) == (
        50.0, 0, 10, "model")


def test_a_resumed_run_continues_the_wandb_run_its_directory_names_and_a_fresh_start_opens_a_new_one(
        tmp_path, wandb_env, capsys):
    """Whatever log.run_id says: a new SLURM job continuing a cancelled job's directory sets its own job's id."""
    def session(resumed: bool, *overrides: str) -> str:
        cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline", *overrides])
        tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS, resumed=resumed)
        tracker.finish({})
        flush_wandb()
        return json.loads((cfg.run_dir / "summary.json").read_text())["wandb_run_id"]

    first = session(False)
    assert session(True) == first
    capsys.readouterr()
    assert session(True, "log.run_id=job-1235") == first
    assert (f"W&B: continuing run {first}, which {tmp_path / 'r'} logs to (log.run_id=job-1235 names the W&B "
            "run of a fresh start)") in capsys.readouterr().out
    assert session(False) != first
    assert session(False, "log.run_id=job-1236") == "job-1236"


def test_a_resumed_session_with_wandb_off_keeps_the_wandb_run_its_directory_names_for_the_next_one(tmp_path,
                                                                                                  wandb_env):
    """A session with W&B off wrote no wandb_run_id, and the next session with W&B on opened a new W&B run."""
    def session(mode: str, resumed: bool) -> str | None:
        cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", f"log.wandb={mode}"])
        Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS, resumed=resumed).finish({})
        if mode != "disabled":
            flush_wandb()
        return json.loads((cfg.run_dir / "summary.json").read_text()).get("wandb_run_id")

    first = session("offline", resumed=False)
    assert first and session("disabled", resumed=True) == first
    assert session("offline", resumed=True) == first
    assert {p.stem for p in (tmp_path / "r" / "wandb").glob("offline-run-*/run-*.wandb")} == {f"run-{first}"}


class _RunWhoseServiceIsGone:
    """A W&B run after its service process was killed (a scancel signals every process of the job)."""

    id, step = "gone", 0

    def __init__(self) -> None:
        self.calls = 0
        self.summary: dict = {}  # written at the start, while the service still ran

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, *args, **kwargs) -> None:
        self.calls += 1
        raise ConnectionResetError("Connection lost")

    finish = log


def test_a_wandb_failure_turns_wandb_off_with_one_message_and_the_run_files_go_on(tmp_path, wandb_env, monkeypatch,
                                                                                   capsys):
    import wandb

    run, teardowns = _RunWhoseServiceIsGone(), []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    monkeypatch.setattr(wandb, "teardown", lambda: teardowns.append(1))  # else W&B's exit hook fails too
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_step(1, {"train/loss": 0.5})
    tracker.log_step(2, {"train/loss": 0.4})
    tracker.log_eval(0, 2, {"model": fake_metrics(61.0)})
    tracker.finish({})
    assert run.calls == 1 and teardowns == [1]
    assert capsys.readouterr().err.count("W&B log failed (ConnectionResetError: Connection lost); W&B logging is off") == 1
    assert [json.loads(line)["step"] for line in (cfg.run_dir / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((cfg.run_dir / "summary.json").read_text())["best_mAP"] == 61.0


class _RecordingRun:
    """A W&B run that keeps what the Tracker hands it."""

    id, step = "rec", 0

    def __init__(self) -> None:
        self.summary: dict = {}
        self.logged: list[tuple[int, dict]] = []
        self.artifacts: list[tuple[object, list[str]]] = []

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def log_artifact(self, artifact: object, aliases: list[str]) -> None:
        self.artifacts.append((artifact, aliases))

    def finish(self) -> None:
        pass


@pytest.fixture
def wandb_inits(wandb_env, monkeypatch) -> list[dict]:
    """wandb.init replaced: each call's keyword arguments, in order; each returns a new _RecordingRun."""
    import wandb

    inits: list[dict] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: inits.append(kwargs) or _RecordingRun())
    return inits


def test_the_environment_names_the_wandb_run_only_where_the_config_is_left_at_its_default(
        tmp_path, wandb_inits, monkeypatch):
    for name, value in (("WANDB_PROJECT", "p_env"), ("WANDB_ENTITY", "e_env"), ("WANDB_RUN_GROUP", "g_env"),
                        ("WANDB_JOB_TYPE", "j_env"), ("WANDB_NAME", "n_env")):
        monkeypatch.setenv(name, value)
    configured = ("log.project=p", "log.entity=e", "log.group=g", "log.job_type=j", "train.run_name=n",
                  "log.tags=a,b")
    for overrides in ((), configured):
        cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline", *overrides])
        Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS).finish({})
    names = ("project", "entity", "group", "job_type", "name", "tags")
    assert [tuple(init[k] for k in names) for init in wandb_inits] == [
        ("p_env", "e_env", "g_env", "j_env", "n_env", None), ("p", "e", "g", "j", "n", ["a", "b"])]
    for name in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_NAME"):
        monkeypatch.delenv(name)
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r2'}", "log.wandb=offline"])
    Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS).finish({})
    assert tuple(wandb_inits[-1][k] for k in names) == ("mlgcn-dist", None, None, "train", "run", None)


def test_a_resumed_session_whose_directory_names_no_wandb_run_opens_a_new_one(tmp_path, wandb_inits):
    """Every earlier session ran with W&B off: its summary.json holds no wandb_run_id."""
    for mode, resumed in (("disabled", False), ("offline", True)):
        cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", f"log.wandb={mode}"])
        Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS, resumed=resumed).finish({})
    assert [init["id"] for init in wandb_inits] == [None]


def test_each_evaluation_reaches_wandb_with_its_per_class_table_and_the_best_so_far_in_the_summary(
        tmp_path, wandb_inits):
    """The summary holds the best evaluation before the run ends, so a killed run's W&B summary has it too."""
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    run = tracker._run
    tracker.log_eval(0, 10, {"model": fake_metrics(50.0), "ema": fake_metrics(52.0)})
    tracker.log_eval(1, 20, {"model": fake_metrics(53.0)})
    (_, first), (_, second) = run.logged
    keys = ("epoch", "val/mAP", "val_ema/mAP", "val_ema/top3/CF1")
    assert [first[k] for k in keys] == [0, 50.0, 52.0, 50.0]
    assert first["val/per_class_ap"].columns == ["label", "AP", "AP_ema"]
    assert first["val/per_class_ap"].data == [["cat", 45.0, 47.0], ["dog", 55.0, 57.0],
                                              ["person", None, None]]
    assert second["val/per_class_ap"].data == [["cat", 48.0, None], ["dog", 58.0, None],
                                               ["person", None, None]]
    assert (run.summary["best_mAP"], run.summary["best_epoch"]) == (53.0, 1)


@pytest.mark.parametrize(("log_artifact", "is_best", "aliases"), [
    (False, True, None), (True, False, ["latest", "epoch-3"]), (True, True, ["latest", "epoch-3", "best"])])
def test_a_checkpoint_reaches_wandb_only_with_log_artifact_and_is_called_best_only_when_it_is(
        tmp_path, wandb_inits, log_artifact, is_best, aliases):
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"weights")
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}", "log.wandb=offline",
                             f"log.log_artifact={str(log_artifact).lower()}"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    tracker.log_checkpoint(checkpoint, 3, is_best=is_best)
    assert [logged_aliases for _, logged_aliases in tracker._run.artifacts] == ([aliases] if aliases else [])


def test_log_wandb_auto_that_follows_wandb_mode_says_nothing(tmp_path, wandb_env, monkeypatch, capsys):
    """Only a configured online mode turned down by WANDB_MODE is worth a line."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS).finish({})
    assert capsys.readouterr().out == ""


def test_summary_json_is_replaced_whole_after_every_evaluation_so_a_killed_run_keeps_its_best(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    summary = cfg.run_dir / "summary.json"
    with summary.open() as opened_before:  # e.g. by mlgcn compare, while the run evaluates
        tracker.log_eval(0, 10, {"model": fake_metrics(50.0)})
        assert json.loads(opened_before.read())["best_mAP"] is None  # the old file, whole
    assert json.loads(summary.read_text())["best_mAP"] == 50.0  # no finish: killed after the evaluation


def test_the_summarys_window_throughput_is_the_median_of_every_logged_window(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'r'}"])
    tracker = Tracker(cfg, cfg.run_dir, is_main=True, world_size=1, label_names=LABELS)
    for step, values in enumerate([{"train/img_per_s": 100.0}, {"train/img_per_s": 400.0},
                                   {"train/img_per_s": 120.0}, {"train/loss": 0.5}]):
        tracker.log_step(step, values)
    tracker.finish({})
    assert json.loads((cfg.run_dir / "summary.json").read_text())["img_per_s_window_median"] == 120.0


def test_json_safe_writes_numpy_and_torch_values_as_plain_json_and_keeps_booleans():
    import numpy as np
    import torch

    safe = json_safe({"a": np.float32(0.5), "b": torch.tensor([1.0, math.nan]), "c": np.int64(3),
                      7: (True, None, "x"), "d": math.inf})
    assert safe == {"a": 0.5, "b": [1.0, None], "c": 3, "7": [True, None, "x"], "d": None}
    assert safe["7"][0] is True and type(safe["c"]) is int
    metrics = {"mAP": 50.0, "num_images": 12, "partial": True, "ap": [1.0], "top3": {"mAP": 1.0}}
    assert scalar_metrics(metrics) == {"mAP": 50.0, "num_images": 12}


def test_git_state_names_the_checkouts_commit_and_whether_its_tracked_files_changed(tmp_path):
    def git(*args: str) -> str:
        command = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c",
                   "commit.gpgsign=false", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1\n")
    git("add", "a.txt")
    git("commit", "-qm", "first")
    commit = git("rev-parse", "HEAD").strip()
    assert git_state(tmp_path) == {"git_commit": commit, "git_dirty": False}
    (tmp_path / "a.txt").write_text("2\n")
    assert git_state(tmp_path) == {"git_commit": commit, "git_dirty": True}
