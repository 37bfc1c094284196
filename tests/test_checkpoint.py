"""Checkpoint bookkeeping in one process: which checkpoint counts as complete, where a resume starts, the training
state a checkpoint carries, the run-directory lock, the preemption signals and the requeue marker (saving and
rotation through Accelerate: test_reliability.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest

from mlgcn_dist.checkpoint import (
    PreemptionHandler,
    RunLock,
    TrainState,
    check_resume_launcher,
    complete_checkpoints,
    mark_requeue,
    resolve_resume,
)
from mlgcn_dist.config import ConfigError


def checkpoint_dir(path: Path, step: int, saved_at: float, epoch: int = 0) -> Path:
    """A complete checkpoint directory as CheckpointManager.save leaves it (its train_state.json last)."""
    path.mkdir(parents=True)
    state = TrainState(epoch=epoch, global_step=step).state_dict()
    (path / "train_state.json").write_text(json.dumps({"state": state, "saved_at": saved_at}))
    return path


def saved_epoch(path: Path) -> int:
    return json.loads((path / "train_state.json").read_text())["state"]["epoch"]


# ------------------------------------------------------------------------------------------------ listing


@pytest.mark.parametrize("listing", [sorted, lambda paths: sorted(paths, reverse=True)],
                         ids=["ascending", "descending"])
def test_a_resave_killed_before_deleting_the_step_moved_aside_lists_the_new_checkpoint_whatever_the_listing_order(
    tmp_path, monkeypatch, listing
):
    """Killed between renaming the re-saved step in and deleting the old one: both are on disk, the new one counts."""
    ckpts = tmp_path / "run" / "checkpoints"
    checkpoint_dir(ckpts / "step-00000003", 3, saved_at=100.0, epoch=0)
    old = checkpoint_dir(ckpts / ".replaced-step-00000007", 7, saved_at=200.0, epoch=0)
    new = checkpoint_dir(ckpts / "step-00000007", 7, saved_at=300.0, epoch=1)
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(listing(list(real_iterdir(self)))))
    assert complete_checkpoints(ckpts) == [ckpts / "step-00000003", new]
    assert resolve_resume("auto", tmp_path / "run") == new and saved_epoch(new) == 1
    assert old.is_dir()


# ------------------------------------------------------------------------------------------------- resume


def test_resume_none_starts_afresh_and_auto_without_checkpoints_too(tmp_path):
    checkpoint_dir(tmp_path / "run" / "checkpoints" / "step-00000001", 1, saved_at=1.0)
    assert resolve_resume("none", tmp_path / "run") is None
    assert resolve_resume("auto", tmp_path / "elsewhere") is None


def test_resume_auto_takes_the_last_saved_checkpoint_not_the_first(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    checkpoint_dir(ckpts / "step-00000005", 5, saved_at=1.0)
    checkpoint_dir(ckpts / "step-00000009", 9, saved_at=2.0)
    assert resolve_resume("auto", tmp_path / "run") == ckpts / "step-00000009"


def test_an_explicit_resume_path_is_used_as_given_when_complete_and_refused_without_its_train_state(tmp_path):
    complete = checkpoint_dir(tmp_path / "some" / "step-00000004", 4, saved_at=1.0)
    assert resolve_resume(str(complete), tmp_path / "run") == complete
    partial = tmp_path / "some" / ".tmp-step-00000008"
    partial.mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint directory"):
        resolve_resume(str(partial), tmp_path / "run")


def test_train_state_round_trips_every_field_through_the_json_a_checkpoint_holds():
    saved = TrainState(epoch=3, step_in_epoch=5, global_step=41, best_metric=61.5, best_epoch=2, best_source="ema",
                       trained_images=1312, train_seconds=12.5, bad_samples=2, steps_per_epoch=12, micro_batches=24,
                       data_order="2 processes x 4 data workers, 24 batches of 32, shuffle buffer 1000",
                       images_of_all_ranks=False)
    assert all(getattr(saved, f.name) != f.default for f in dataclasses.fields(TrainState))  # every field set
    loaded = TrainState()
    loaded.load_state_dict(json.loads(json.dumps(saved.state_dict())))
    assert loaded == saved


def test_an_older_checkpoints_image_count_of_rank_0_alone_is_taken_once_for_each_process_of_the_resume():
    """Checkpoints saved before 2026-11-27 counted rank 0's images in trained_images (the run's img_per_s then
    multiplied them by the resumed session's process count)."""
    older = TrainState(trained_images=640).state_dict()
    del older["images_of_all_ranks"]
    state = TrainState()
    state.load_state_dict(older)
    state.count_images_of_all_ranks(world_size=2)
    state.count_images_of_all_ranks(world_size=2)
    assert (state.trained_images, state.images_of_all_ranks) == (1280, True)


def test_a_checkpoints_image_count_of_every_rank_stays_as_saved_whatever_the_resumes_process_count():
    state = TrainState()
    state.load_state_dict(json.loads(json.dumps(TrainState(trained_images=640).state_dict())))
    state.count_images_of_all_ranks(world_size=4)
    assert state.trained_images == 640


# ------------------------------------------------------------------------------------- lock, preemption


def test_a_second_lock_on_the_run_directory_is_refused_naming_the_holder_until_released(tmp_path):
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RuntimeError, match=rf"in use by pid {os.getpid()} on "):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


@pytest.fixture
def handler():
    installed = PreemptionHandler()
    yield installed
    installed.uninstall()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=["SIGTERM", "SIGUSR1", "Ctrl-C"])
def test_a_preemption_signal_becomes_a_stop_reason_and_uninstall_restores_the_previous_handler(handler, sig):
    previous = signal.getsignal(sig)
    handler.install()
    assert handler.stop_reason() is None
    os.kill(os.getpid(), sig)
    assert handler.stop_reason() == f"signal {sig.name}"
    handler.uninstall()
    assert signal.getsignal(sig) == previous


def test_ctrl_c_asks_for_a_saving_stop_and_a_second_ctrl_c_stops_at_once(handler, capfd):
    handler.install()
    os.kill(os.getpid(), signal.SIGINT)
    assert handler.stop_reason() == "signal SIGINT"
    assert "Ctrl-C: the run stops at its next logging step, with a checkpoint" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_stays_the_reason_when_a_sigterm_follows_and_is_no_preemption(handler, capfd):
    """A SIGTERM after the Ctrl-C (a launcher or a scheduler ending the run) read as a preemption, to be requeued."""
    handler.install()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.stop_reason() == "signal SIGINT" and handler.interrupted()
    capfd.readouterr()


def test_a_preemption_signal_is_not_an_interruption(handler):
    handler.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.stop_reason() == "signal SIGUSR1" and not handler.interrupted()


def test_a_worker_of_a_launcher_stops_when_the_launcher_is_gone_and_not_before(handler, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    monkeypatch.setattr(os, "getppid", lambda: 4242)  # the launcher (pytest's own parent may be init already)
    handler.install()
    assert handler.stop_reason() is None
    monkeypatch.setattr(os, "getppid", lambda: 1)  # orphaned: re-parented to init
    assert handler.stop_reason() == "the launcher (pid 4242) is gone"


def test_a_plain_process_whose_parent_changes_is_not_stopped(handler, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    handler.install()
    monkeypatch.setattr(os, "getppid", lambda: 1)  # e.g. started with nohup from a shell that exited
    assert handler.stop_reason() is None


def test_the_requeue_marker_holds_the_reason(tmp_path):
    mark_requeue(tmp_path, "preempted at step 40; checkpoint step-00000040")
    assert (tmp_path / "REQUEUE").read_text() == "preempted at step 40; checkpoint step-00000040\n"


@pytest.mark.parametrize("prefix", ["", "bf16_"])  # ZeRO-1/2 in bf16 names its partitions bf16_zero_pp_rank_*
def test_a_zero_checkpoint_resumes_only_on_the_process_count_that_saved_it(prefix, tmp_path):
    state = tmp_path / "step-00000002" / "pytorch_model"
    state.mkdir(parents=True)
    for rank in range(2):
        (state / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    check_resume_launcher(state.parent, deepspeed=True, world_size=2)
    for world_size in (1, 4):
        with pytest.raises(ConfigError, match=rf"saved by DeepSpeed ZeRO on 2 processes and this run has "
                                              rf"{world_size}: .*Resume on 2 processes"):
            check_resume_launcher(state.parent, deepspeed=True, world_size=world_size)
