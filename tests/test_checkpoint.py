"""Checkpoint bookkeeping in one process: which checkpoint counts as complete, where a resume starts, the training
state a checkpoint carries, the run-directory lock, the preemption signals and the requeue marker (saving and
rotation through Accelerate: test_reliability.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from mlgcn_dist.checkpoint import (
    CheckpointManager,
    PreemptionHandler,
    RunLock,
    TrainState,
    check_resume_ema,
    check_resume_labels,
    check_resume_launcher,
    check_resume_model,
    complete_checkpoints,
    mark_requeue,
    optim_as_resumed,
    resolve_resume,
    saved_precision,
)
from mlgcn_dist.config import ConfigError, ModelConfig, OptimConfig


def checkpoint_dir(path: Path, step: int, saved_at: float | None, epoch: int = 0, **record) -> Path:
    """A complete checkpoint directory as CheckpointManager.save leaves it (its train_state.json last).
    ``record``: more of that file (config, label_names); ``saved_at`` None: saved before it was recorded."""
    path.mkdir(parents=True)
    state = TrainState(epoch=epoch, global_step=step).state_dict()
    times = {} if saved_at is None else {"saved_at": saved_at}
    (path / "train_state.json").write_text(json.dumps({"state": state, **times, **record}))
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
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("pid 4242 on a-node-that-died\n")  # flock died with that run
    first, second = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RuntimeError, match=rf"in use by pid {os.getpid()} on [^\n]*; choose another"):
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


@pytest.mark.parametrize("new_parent", [1, 777], ids=["init", "subreaper"])
def test_a_worker_of_a_launcher_stops_when_the_launcher_is_gone_and_not_before(handler, monkeypatch,
                                                                                new_parent):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    monkeypatch.setattr(os, "getppid", lambda: 4242)  # the launcher (pytest's own parent may be init already)
    handler.install()
    assert handler.stop_reason() is None
    monkeypatch.setattr(os, "getppid", lambda: new_parent)  # orphaned: re-parented to init or a subreaper
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


def test_a_checkpoint_saved_before_saved_at_was_recorded_counts_as_older_than_any_that_has_it(tmp_path):
    """Such checkpoints sort by step among themselves, before every checkpoint with a save time."""
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (4, 2):
        checkpoint_dir(ckpts / f"step-{step:08d}", step, saved_at=None)
    checkpoint_dir(ckpts / "step-00000003", 3, saved_at=10.0)
    assert [p.name for p in complete_checkpoints(ckpts)] == [f"step-0000000{n}" for n in (2, 4, 3)]


def test_a_step_moved_aside_whose_resave_was_never_renamed_in_is_still_a_checkpoint(tmp_path):
    """Killed between the two renames of a re-save: the old step, moved aside, is all there is of it."""
    ckpts = tmp_path / "run" / "checkpoints"
    aside = checkpoint_dir(ckpts / ".replaced-step-00000007", 7, saved_at=200.0)
    checkpoint_dir(ckpts / ".tmp-step-00000007", 7, saved_at=300.0)  # the re-save, not renamed in
    assert complete_checkpoints(ckpts) == [aside]


@pytest.mark.parametrize("damage", ["[1, 2]", '{"state": '], ids=["json_list", "cut_short"])
def test_a_damaged_newest_train_state_stops_resume_auto_naming_it_and_the_newest_intact_one(tmp_path, damage):
    ckpts = tmp_path / "run" / "checkpoints"
    checkpoint_dir(ckpts / "step-00000007", 7, saved_at=1.0)
    newest_intact = checkpoint_dir(ckpts / "step-00000014", 14, saved_at=2.0)
    damaged = checkpoint_dir(ckpts / "step-00000021", 21, saved_at=3.0)
    (damaged / "train_state.json").write_text(damage)
    problem = "a JSON list, not an object" if damage.startswith("[") else "JSONDecodeError"
    state, intact = re.escape(str(damaged / "train_state.json")), re.escape(str(newest_intact))
    with pytest.raises(ConfigError, match=rf"damaged checkpoint state {state} \({problem}.* or set "
                                          rf"train.resume={intact} \(the newest intact one\)"):
        resolve_resume("auto", tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"train.resume={re.escape(str(damaged))}: damaged checkpoint"):
        resolve_resume(str(damaged), tmp_path / "run")


def test_a_resume_on_labels_of_another_count_or_order_is_refused_saying_which(tmp_path):
    path = checkpoint_dir(tmp_path / "step-2", 2, saved_at=1.0, label_names=["cat", "dog", "person"])
    check_resume_labels(path, ["cat", "dog", "person"])
    with pytest.raises(ConfigError, match=r"trained on the dataset's 3 labels in another order \(label 0 is 'cat', "
                       r"the dataset's 'dog'\); resume"):
        check_resume_labels(path, ["dog", "cat", "person"])
    with pytest.raises(ConfigError, match=r"trained on 3 labels, the dataset has 2; resume"):
        check_resume_labels(path, ["cat", "dog"])
    older = checkpoint_dir(tmp_path / "older", 2, saved_at=1.0)  # saved before labels were recorded
    check_resume_labels(older, ["any", "labels"])


def test_a_checkpoint_without_a_config_record_resumes_with_this_runs_model_optimiser_and_precision(tmp_path):
    path = checkpoint_dir(tmp_path / "step-2", 2, saved_at=1.0)
    check_resume_model(path, dataclasses.asdict(ModelConfig()))
    check_resume_ema(path, 0.9)
    assert optim_as_resumed(path, OptimConfig(lr=0.5)) == (OptimConfig(lr=0.5), [])
    assert saved_precision(path) is None


def test_a_resume_trains_with_the_checkpoints_learning_rates_and_param_groups_naming_the_values_it_ignored(
    tmp_path
):
    saved = OptimConfig(lr=0.1, lrp=0.2, lr_scaling="linear", base_batch_size=64, momentum=0.8,
                        weight_decay=1e-3)
    path = checkpoint_dir(tmp_path / "step-2", 2, saved_at=1.0, config={"optim": dataclasses.asdict(saved)})
    asked = OptimConfig(lr=0.5, momentum=0.8, epoch_step=[5], gamma=0.5)
    resumed, ignored = optim_as_resumed(path, asked)
    assert resumed == dataclasses.replace(saved, epoch_step=[5], gamma=0.5)  # the schedule stays this run's
    assert ignored == ["optim.lr=0.5 (checkpoint: 0.1)", "optim.lrp=0.1 (checkpoint: 0.2)",
                       "optim.lr_scaling=fixed (checkpoint: linear)",
                       "optim.base_batch_size=32 (checkpoint: 64)",
                       "optim.weight_decay=0.0001 (checkpoint: 0.001)"]
    assert optim_as_resumed(None, asked) == (asked, [])


@pytest.mark.parametrize(("saved", "expected"),
                         [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("auto", None)])
def test_the_saved_precision_is_one_a_run_trains_in_or_none(tmp_path, saved, expected):
    path = checkpoint_dir(tmp_path / "step-2", 2, saved_at=1.0, config={"train": {"precision": saved}})
    assert saved_precision(path) == expected


@pytest.mark.parametrize(("saved_by", "run_under", "message"), [
    ("deepspeed", False, "was saved by a DeepSpeed run and this run uses DDP: resume it under DeepSpeed"),
    ("ddp", True, "was saved by a DDP run and this run uses DeepSpeed: resume it under DDP"),
])
def test_a_checkpoint_resumes_only_under_the_launcher_that_saved_it(tmp_path, saved_by, run_under, message):
    path = tmp_path / "step-00000002"
    path.mkdir()
    if saved_by == "deepspeed":
        (path / "pytorch_model").mkdir()
    (path / "model.safetensors").touch()
    with pytest.raises(ConfigError, match=message):
        check_resume_launcher(path, deepspeed=run_under, world_size=1)


def test_a_zero_0_checkpoint_without_optimiser_partitions_resumes_on_any_process_count(tmp_path):
    """ZeRO-0 keeps the optimiser state whole (mp_rank_00_model_states.pt): nothing to partition anew."""
    state = tmp_path / "step-00000002" / "pytorch_model"
    state.mkdir(parents=True)
    (state / "mp_rank_00_model_states.pt").touch()
    for world_size in (1, 2, 4):
        check_resume_launcher(state.parent, deepspeed=True, world_size=world_size)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_ddp_checkpoint_resumes_with_either_weights_file_and_is_refused_without_one(tmp_path, weights):
    path = tmp_path / "step-00000002"
    path.mkdir()
    with pytest.raises(ConfigError, match=r"has lost its weights \(model.safetensors or pytorch_model.bin\)"):
        check_resume_launcher(path, deepspeed=False, world_size=1)
    (path / weights).touch()
    check_resume_launcher(path, deepspeed=False, world_size=1)


class FakeAccelerator:
    """What CheckpointManager uses of Accelerate: one process; save_state writes the weights file."""

    def __init__(self, is_main_process: bool = True) -> None:
        self.is_main_process = is_main_process

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        (Path(output_dir) / "model.safetensors").write_bytes(b"weights")


def saved_steps(ckpt: CheckpointManager) -> list[int]:
    return [json.loads((p / "train_state.json").read_text())["state"]["global_step"]
            for p in complete_checkpoints(ckpt.dir)]


def test_rotation_renames_a_checkpoint_out_of_the_listing_before_deleting_it(tmp_path, monkeypatch):
    """A kill in the middle of the delete leaves a directory that no longer counts, not half a step-*."""
    ckpt = CheckpointManager(FakeAccelerator(), tmp_path / "run", keep=1)
    ckpt.save(TrainState(global_step=7), {}, [])

    def killed_after_deleting_the_weights(path, ignore_errors=False):
        for weights in Path(path).glob("model.safetensors"):
            weights.unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_after_deleting_the_weights)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(TrainState(global_step=14), {}, [])
    monkeypatch.undo()
    assert saved_steps(ckpt) == [14]
    assert all((p / "model.safetensors").is_file() for p in complete_checkpoints(ckpt.dir))
    ckpt.save(TrainState(global_step=21), {}, [])  # the next rotation clears what the kill left
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["step-00000021"]


def test_rotation_keeps_a_step_moved_aside_by_a_killed_resave_while_it_is_among_the_newest(tmp_path):
    ckpt = CheckpointManager(FakeAccelerator(), tmp_path / "run", keep=2)
    ckpt.save(TrainState(global_step=7), {}, [])
    (ckpt.dir / "step-00000007").rename(ckpt.dir / ".replaced-step-00000007")  # killed between the renames
    ckpt.save(TrainState(global_step=14), {}, [])
    assert saved_steps(ckpt) == [7, 14]


def test_only_the_main_process_writes_a_portable_checkpoint(tmp_path):
    for main, written in ((False, False), (True, True)):
        ckpt = CheckpointManager(FakeAccelerator(main), tmp_path / "run", keep=1)
        path = ckpt.save_portable("best.pt", {"a": 1})
        assert path == tmp_path / "run" / "checkpoints" / "best.pt" and path.is_file() is written
