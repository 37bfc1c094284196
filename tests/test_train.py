"""Single-process training end to end on the toy dataset, in this process: the loop, its files and its numbers."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from launching import (
    another_ranks_training_counts,
    losses_changed_at_the_third_call,
    nan_gradient_with_a_finite_loss,
    train_log,
    weights,
)
from launching import summary as saved_summary
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mlgcn_dist import engine as engine_module
from mlgcn_dist.checkpoint import (
    INTERRUPTED_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    PreemptionHandler,
    RunLock,
    TrainState,
    complete_checkpoints,
)
from mlgcn_dist.config import ConfigError, load_config
from mlgcn_dist.data.loader import build_eval_loader
from mlgcn_dist.data.workers import worker_start_line
from mlgcn_dist.distributed import (
    build_accelerator,
    concrete_precision,
    resolve_precision,
    training_device,
    uses_cuda_graphs,
)
from mlgcn_dist.engine import METRIC_KEYS, NonFiniteLossError, Trainer, train
from mlgcn_dist.metrics import AveragePrecisionMeter
from mlgcn_dist.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def newest_state(run_dir: Path) -> dict:
    """The training state (epoch, steps, images, seconds) of the run's newest complete checkpoint."""
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    return json.loads((newest / "train_state.json").read_text())["state"]


def evaluated_epochs(run_dir: Path) -> list[int]:
    """The epoch of each evaluation the run logged to metrics.jsonl, in order."""
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def toy_config(toy_root: Path, run_dir: Path, *extra: str):
    return load_config(REPO / "configs/toy.yaml", [
        f"data.root={toy_root}", "data.workers=0", "data.batch_size=8", "train.epochs=3", "train.log_every=2",
        "train.resume=none", f"train.output_dir={run_dir}", "log.wandb=disabled", "optim.epoch_step=[100]",
        "train.precision=fp32",  # the same numbers on a machine with a GPU (toy.yaml's auto would be bf16 there)
        *extra,
    ])


@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    summary = train(toy_config(toy_root, run_dir, "train.ema_decay=0.9"))
    return run_dir, summary


def test_training_lowers_the_loss_and_beats_the_label_frequency_baseline(trained):
    run_dir, summary = trained
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [s["train/loss"] for s in steps]
    assert losses[-1] < losses[0]
    assert summary["best_mAP"] > summary["frequency_baseline_mAP"] + 10


def test_run_directory_holds_config_metrics_summary_and_checkpoints(trained):
    run_dir, summary = trained
    assert load_config(run_dir / "config.yaml").train.output_dir == str(run_dir)
    assert evaluated_epochs(run_dir) == [0, 1, 2]
    saved = saved_summary(run_dir)
    assert saved["best_mAP"] == pytest.approx(summary["best_mAP"])
    assert {"model", "ema"} <= set(saved["final"])
    assert saved["finished"] is True  # `mlgcn compare`'s status
    assert (run_dir / "checkpoints/best.pt").is_file() and (run_dir / "checkpoints/last.pt").is_file()
    assert len(complete_checkpoints(run_dir / "checkpoints")) == 2  # train.keep_checkpoints: older ones rotated
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_portable_checkpoint_holds_weights_config_and_label_names(trained):
    run_dir, _ = trained
    payload = torch.load(run_dir / "checkpoints/best.pt", map_location="cpu", weights_only=False)
    assert len(payload["label_names"]) == 12
    assert payload["ema"] is not None
    assert payload["config"]["model"]["head"] == "gcn"


def test_resume_auto_continues_from_the_newest_checkpoint(trained, toy_root, tmp_path):
    run_dir, summary = trained
    more = train(toy_config(toy_root, run_dir, "train.ema_decay=0.9", "train.epochs=4", "train.resume=auto"))
    assert more["global_step"] > summary["global_step"]
    assert evaluated_epochs(run_dir) == [0, 1, 2, 3]
    # The run's throughput counts both sessions' images and time (one process, batch 8).
    state = newest_state(run_dir)
    assert state["trained_images"] == 8 * more["global_step"]
    assert more["img_per_s"] == pytest.approx(state["trained_images"] / state["train_seconds"])


def test_a_run_stopped_by_max_steps_inside_an_epoch_resumes_there_with_a_larger_budget(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    run = ("train.epochs=2", "data.steps_per_epoch=5")
    assert train(toy_config(toy_root, run_dir, *run, "train.max_steps=3"))["global_step"] == 3
    state = newest_state(run_dir)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 3, 3)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (0, 3)  # the evaluation of the epoch it stopped in
    # The same budget again: nothing more to train, the metrics are reported all the same.
    assert train(toy_config(toy_root, run_dir, *run, "train.max_steps=3", "train.resume=auto"))["global_step"] == 3
    # No limit: the rest of epoch 0, then epoch 1 (2 + 5 steps), not epoch 1 alone.
    assert train(toy_config(toy_root, run_dir, *run, "train.max_steps=0", "train.resume=auto"))["global_step"] == 10


def test_a_finished_run_resumed_with_as_many_epochs_trains_no_more_and_reports_its_last_epoch_again(toy_root,
                                                                                                    tmp_path):
    run_dir = tmp_path / "run"
    run = ("train.epochs=1", "data.steps_per_epoch=2")
    assert train(toy_config(toy_root, run_dir, *run))["global_step"] == 2
    assert train(toy_config(toy_root, run_dir, *run, "train.resume=auto"))["global_step"] == 2
    assert evaluated_epochs(run_dir) == [0]


def test_a_run_stopped_by_max_steps_at_an_epochs_end_keeps_its_place_as_the_start_of_the_next_epoch(toy_root,
                                                                                                    tmp_path):
    """Not as the end of the epoch, whose batches a resume would make again only to skip them all."""
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=2", "data.steps_per_epoch=2", "train.max_steps=2"))
    state = newest_state(run_dir)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 2)


def test_eval_every_2_evaluates_after_every_second_epoch_and_after_the_last(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.eval_every=2", "train.epochs=3", "data.steps_per_epoch=1"))
    assert evaluated_epochs(run_dir) == [1, 2]


def test_a_run_stopped_by_max_steps_evaluates_and_saves_the_epoch_it_stopped_in_whatever_eval_every(toy_root,
                                                                                                   tmp_path):
    run_dir = tmp_path / "run"
    summary = train(toy_config(toy_root, run_dir, "train.eval_every=2", "train.epochs=3", "data.steps_per_epoch=2",
                               "train.max_steps=3"))
    assert summary["global_step"] == 3
    assert (portable(run_dir, "last.pt")["epoch"], portable(run_dir, "last.pt")["global_step"]) == (1, 3)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_run_stopped_inside_an_epoch_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(decode, toy_root,
                                                                                                  tmp_path):
    """Also where the crops are drawn on the device (data.decode=gpu): each batch's draw is seeded by its place in
    the epoch, not by the batches converted before it in this process."""
    run = ("train.epochs=1", "data.steps_per_epoch=4", f"data.decode={decode}", "train.deterministic=true")
    train(toy_config(toy_root, tmp_path / "whole", *run))
    train(toy_config(toy_root, tmp_path / "split", *run, "train.max_steps=2"))
    train(toy_config(toy_root, tmp_path / "split", *run, "train.resume=auto"))
    whole, split = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=False)
                    for name in ("whole", "split"))
    for weights_of in ("model", "ema"):  # the EMA model too (toy.yaml's ema_decay): it goes on from the checkpoint's
        assert all(torch.equal(whole[weights_of][key], split[weights_of][key]) for key in whole[weights_of])


def test_a_resume_with_another_batch_size_keeps_the_learning_rate_decay_on_its_epoch(toy_root, tmp_path):
    """Epoch 0 in batches of 8, epoch 1 resumed in batches of 4 (as on twice the GPUs at the same global batch
    per step, or half the batch): the decay at epoch 1 applies from epoch 1's first step, not some steps later."""
    run_dir = tmp_path / "run"
    run = ("optim.epoch_step=[1]", "optim.warmup_epochs=0", "train.log_every=1")
    train(toy_config(toy_root, run_dir, "train.epochs=1", "data.batch_size=8", *run))
    first_session = len((run_dir / "train_log.jsonl").read_text().splitlines())
    train(toy_config(toy_root, run_dir, "train.epochs=2", "data.batch_size=4", "train.resume=auto", *run))
    logged = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    full = logged[0]["train/lr_head"]
    assert {r["train/lr_head"] for r in logged[:first_session]} == {full}
    assert [r["train/lr_head"] for r in logged[first_session:]] == pytest.approx([full * 0.1] * 15)  # 62 // 4


def test_a_resume_with_another_grad_accum_steps_on_whole_accumulations_and_at_each_epochs_end(toy_root, tmp_path):
    """Accelerate restores its micro-batch counter, which places every grad_accum-th step: a run saved in single
    micro-batches and resumed in pairs stepped on odd micro-batches, carrying each epoch's last one into the next."""
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=2", "train.max_steps=3", "train.log_every=1"))
    first_session = len(train_log(run_dir))
    train(toy_config(toy_root, run_dir, "train.epochs=2", "train.log_every=1", "data.batch_size=4",
                     "train.grad_accum=2", "train.resume=auto"))
    epochs = [record["train/epoch"] for record in train_log(run_dir)[first_session:]]
    micro_batches = 62 // 4  # toy set: 62 training images
    per_epoch = micro_batches // 2 * 2  # whole accumulations
    positions = [round((e % 1 or 1.0) * per_epoch) for e in epochs]
    assert all(p % 2 == 0 for p in positions), positions
    assert epochs[-1] == pytest.approx(2.0) and 1.0 in [pytest.approx(e) for e in epochs]


def test_a_resume_in_pairs_of_micro_batches_goes_on_from_a_whole_accumulation_and_steps_to_the_epochs_end(
        toy_root, tmp_path):
    """Saved after 1 of 3 batches of 8 (a third of the epoch), resumed in 8 micro-batches of 4, 2 a step: a third
    is 2.67 micro-batches, rounded down to 2, a whole accumulation; the 6 left make 3 steps (3 would leave 2
    steps and a micro-batch that completes none)."""
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=3", "train.max_steps=1"))
    resumed = train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=8", "data.batch_size=4",
                               "train.grad_accum=2", "train.resume=auto"))
    assert resumed["global_step"] == 1 + 3


@pytest.mark.parametrize(("fmt", "step_in_epoch", "warned"), [("wds", 3, True), ("wds", 0, False), ("folder", 3, False)],
                         ids=["shards_inside_an_epoch", "shards_at_an_epochs_start", "folder_inside_an_epoch"])
def test_only_a_resume_inside_a_shard_epoch_with_another_layout_warns_that_the_rest_of_the_epoch_is_reordered(
        fmt, step_in_epoch, warned, toy_root, tmp_path, capsys):
    """A resume at an epoch's start has trained none of its batches to skip; the folder format draws one
    permutation of the epoch whatever the layout (tests/test_reliability.py: resumed runs). The layout is recorded
    either way, for the next resume."""
    cfg = toy_config(toy_root, tmp_path)
    cfg.data.format = fmt
    state = TrainState(step_in_epoch=step_in_epoch, data_order="2 processes x 0 data workers, 4 batches of 8")
    trainer = SimpleNamespace(cfg=cfg, state=state, topo=SimpleNamespace(world_size=1),
                              accelerator=SimpleNamespace(is_main_process=True))
    Trainer._warn_of_a_reordered_epoch(trainer, 7)
    assert ("warning: resumed inside epoch 0 with another shard order" in capsys.readouterr().out) is warned
    assert state.data_order.startswith("1 processes x 0 data workers, 7 batches of 8")


def test_a_resume_keeps_the_checkpoints_base_learning_rates_on_this_runs_schedule(toy_root, tmp_path):
    """What the resume message says: optim.lr applies to a fresh start; optim.schedule to the steps to come."""
    run_dir = tmp_path / "run"
    run = ("optim.warmup_epochs=0", "train.log_every=1", "train.epochs=2")
    train(toy_config(toy_root, run_dir, *run, "train.max_steps=3", "optim.lr=0.1"))
    first_session = len(train_log(run_dir))
    train(toy_config(toy_root, run_dir, *run, "train.resume=auto", "optim.lr=0.5", "optim.schedule=cosine"))
    steps_per_epoch = 62 // 8
    total = 2 * steps_per_epoch
    logged = train_log(run_dir)[first_session:]
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * (r["step"] - 1) / total)) for r in logged]
    assert [r["train/lr_head"] for r in logged] == pytest.approx(expected)


def test_a_resumed_runs_config_records_the_checkpoints_optimiser_settings_it_trains_with_and_says_which_it_ignored(
    toy_root, tmp_path, capsys
):
    """config.yaml (and with it summary, W&B and `mlgcn compare --filter`) said optim.lr=0.5 for a run that went on
    at the checkpoint's 0.1; momentum and weight decay come with the optimiser's state as well."""
    run_dir = tmp_path / "run"
    run = ("train.epochs=2", "train.max_steps=3", "optim.lr=0.1", "optim.momentum=0.9", "optim.weight_decay=1e-4")
    train(toy_config(toy_root, run_dir, *run))
    asked = ("train.resume=auto", "optim.lr=0.5", "optim.momentum=0.5", "optim.weight_decay=0.01",
             "optim.schedule=cosine", "train.max_steps=4")
    with built_trainer(toy_config(toy_root, run_dir, *run, *asked)) as trainer:
        assert {g["momentum"] for g in trainer.optimizer.param_groups} == {0.9}
        assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {1e-4}
    assert ("train.resume: ignored optim.lr=0.5 (checkpoint: 0.1), optim.momentum=0.5 (checkpoint: 0.9), "
            "optim.weight_decay=0.01 (checkpoint: 0.0001)") in capsys.readouterr().out
    recorded = load_config(run_dir / "config.yaml").optim
    assert (recorded.lr, recorded.momentum, recorded.weight_decay) == (0.1, 0.9, 1e-4)
    assert recorded.schedule == "cosine"  # the schedule is this session's


def test_ema_decay_0_trains_no_ema_model(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(toy_config(toy_root, run_dir, "train.ema_decay=0", "train.epochs=1", "data.steps_per_epoch=1"))
    assert set(summary["final"]) == {"model"} and portable(run_dir, "best.pt")["ema"] is None


def test_linear_lr_scaling_counts_every_image_of_an_accumulated_optimiser_step(toy_root, tmp_path):
    """optim.lr_scaling=linear scales optim.lr by the global batch: 2 micro-batches of 4 a step are 8 images."""
    cfg = toy_config(toy_root, tmp_path / "run", "optim.lr_scaling=linear", "optim.base_batch_size=16",
                     "data.batch_size=4", "train.grad_accum=2", "optim.warmup_epochs=0")
    with built_trainer(cfg) as trainer:
        assert {group["lr"] for group in trainer.optimizer.param_groups} == {0.1 * 8 / 16}


def test_a_resumed_session_names_the_wandb_run_of_its_directory_even_with_wandb_off(toy_root, tmp_path):
    """So that the next session with W&B on continues that W&B run instead of opening another."""
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=1"))
    summary_json = run_dir / "summary.json"
    summary_json.write_text(json.dumps({**json.loads(summary_json.read_text()), "wandb_run_id": "abc123"}))
    train(toy_config(toy_root, run_dir, "train.epochs=2", "data.steps_per_epoch=1", "train.resume=auto"))
    assert json.loads(summary_json.read_text())["wandb_run_id"] == "abc123"


def test_the_ema_model_takes_the_weights_of_every_optimiser_step(toy_root, tmp_path):
    """With a decay next to 0 the EMA model is the model itself (tests/test_ema.py: the average it keeps)."""
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.ema_decay=1e-9", "train.epochs=1", "data.steps_per_epoch=2"))
    last = portable(run_dir, "last.pt")
    for key, value in last["model"].items():
        torch.testing.assert_close(last["ema"][key], value, msg=lambda m, k=key: f"{k}: {m}")


def test_clip_grad_0_steps_on_the_unclipped_gradient(monkeypatch, toy_root, tmp_path):
    """As with a bound no gradient reaches; not a bound of 0, which would leave no gradient."""
    norms: list[float] = []
    sgd_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    for clip in ("0", "1e9"):
        train(toy_config(toy_root, tmp_path / clip, f"optim.clip_grad={clip}", "train.epochs=1",
                         "data.steps_per_epoch=2", "train.deterministic=true"))
    assert len(norms) == 4 and norms[:2] == norms[2:] and min(norms) > 0


def test_gradient_accumulation_keeps_the_optimiser_step_count(toy_root, tmp_path):
    summary = train(toy_config(toy_root, tmp_path / "accum", "train.epochs=1", "train.grad_accum=2",
                               "data.batch_size=4", "data.steps_per_epoch=8"))
    assert summary["global_step"] == 4 and summary["global_batch"] == 8


@pytest.mark.parametrize("head", ["hgat", "hgat_fc", "linear"])
def test_every_head_trains_one_short_epoch(head, toy_root, tmp_path):
    summary = train(toy_config(toy_root, tmp_path / head, f"model.head={head}", "train.epochs=1",
                               "data.steps_per_epoch=3"))
    assert summary["global_step"] == 3 and summary["final"]["model"]["mAP"] > 0


def test_asl_loss_cosine_schedule_and_bf16_autocast_train(toy_root, tmp_path):
    summary = train(toy_config(toy_root, tmp_path / "asl", "optim.loss=asl", "optim.schedule=cosine",
                               "train.precision=bf16", "train.channels_last=true", "train.epochs=1",
                               "data.steps_per_epoch=3"))
    assert summary["global_step"] == 3


def test_a_second_run_on_the_same_directory_refuses(toy_root, tmp_path):
    run_dir = tmp_path / "locked"
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        with pytest.raises(RuntimeError, match="is in use by pid"):
            train(toy_config(toy_root, run_dir, "train.epochs=1"))
    finally:
        lock.release()


def test_a_run_that_fails_leaves_its_directory_unlocked_while_its_traceback_is_still_held(monkeypatch, toy_root,
                                                                                          tmp_path):
    """An interactive session keeps the last traceback, and with it the failed run's frames: the lock must not
    depend on them being collected, or the next run there would find the directory in use by this process."""
    losses_changed_at_the_third_call(monkeypatch, lambda value, logits: value + float("nan"))
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as failed:
        train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=3"))
    lock = RunLock(run_dir)
    lock.acquire()
    lock.release()
    assert failed.traceback  # still held


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_running_the_device_conversion_ahead_or_in_a_process_of_its_own_trains_and_scores_the_same(toy_root,
                                                                                                  tmp_path):
    """data.device_prefetch only moves the decode/augment onto a helper thread, data.augment_process into a process
    of its own: same batches, same weights, same evaluation."""
    trained, scored = [], []
    for name, where in {"inline": ("data.device_prefetch=0",), "ahead": ("data.device_prefetch=2",),
                        "process": ("data.device_prefetch=2", "data.augment_process=true")}.items():
        run_dir = tmp_path / name
        summary = train(toy_config(toy_root, run_dir, "data.decode=gpu", *where, "train.epochs=1",
                                   "data.steps_per_epoch=4", "train.deterministic=true"))
        trained.append(weights(run_dir))
        scored.append(summary["final"])
    for other, other_scores in zip(trained[1:], scored[1:]):
        assert other.keys() == trained[0].keys()
        assert all(torch.equal(trained[0][k], other[k]) for k in trained[0])
        assert other_scores == scored[0]
    assert not [child for child in multiprocessing.active_children() if child.name == "mlgcn-augment"]  # ended


aten = torch.ops.aten


class HostReadOps(TorchDispatchMode):
    """Counts, in this thread, the operators that read a tensor's values on the host: on a GPU each one waits for
    the device to finish everything queued before it. ``item``, ``bool``, ``int``, ``float``, an f-string of a
    tensor: ``_local_scalar_dense``; ``torch.equal``; ``nonzero``; ``masked_select``; indexing with a mask. A
    copy to the host (``.cpu()``) is no operator on a CPU tensor: the CUDA test under sync debug mode covers it."""

    READS = frozenset({aten._local_scalar_dense.default, aten.equal.default, aten.nonzero.default,
                       aten.masked_select.default, aten.is_nonzero.default})

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        self.reads += func in self.READS or masked
        return func(*args, **(kwargs or {}))


class HostCopies(TorchFunctionMode):
    """Counts ``tolist`` and ``numpy`` calls in this thread: host reads that reach no operator."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in (torch.Tensor.tolist, torch.Tensor.numpy)
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_the_training_loop_reads_no_tensor_on_the_host_between_logging_intervals(decode, monkeypatch, toy_root,
                                                                                  tmp_path):
    """An epoch of 6 steps reads as many values on the host as one of 2 (the end-of-epoch finiteness check): no
    per-step read in the loop, the step, the EMA or the device conversion (inline here, so in the counted thread)."""
    reads: list[int] = []
    train_batches = Trainer._train_batches

    def counted(self, pairs, bar):
        with HostReadOps() as ops, HostCopies() as copies:
            try:
                return train_batches(self, pairs, bar)
            finally:
                reads.append(ops.reads + copies.reads)

    monkeypatch.setattr(Trainer, "_train_batches", counted)
    for steps in (2, 6):
        train(toy_config(toy_root, tmp_path / f"steps{steps}", f"data.decode={decode}", "data.device_prefetch=0",
                         "train.epochs=1", f"data.steps_per_epoch={steps}", "train.log_every=100",
                         "train.ema_decay=0.9"))
    assert reads[0] == reads[1]


def test_the_runs_img_per_s_pays_every_epochs_loader_start_up_and_the_window_median_does_not(monkeypatch, toy_root,
                                                                                          tmp_path):
    build = engine_module.build_train_loader

    def slow_to_start(*args, **kwargs):  # workers forking, shuffle buffers filling: once an epoch
        time.sleep(0.5)
        return build(*args, **kwargs)

    monkeypatch.setattr(engine_module, "build_train_loader", slow_to_start)
    summary = train(toy_config(toy_root, tmp_path / "run", "train.epochs=2", "data.steps_per_epoch=2",
                               "train.log_every=1"))
    images = summary["global_step"] * 8  # batch 8, one process
    assert summary["img_per_s"] < images / (2 * 0.5)
    assert summary["img_per_s_window_median"] > 2 * summary["img_per_s"]
    logged = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[0])
    assert "train/data_wait_frac" in logged and "train/data_stall_frac" not in logged  # CUDA only


def test_every_logged_loss_is_the_mean_over_the_micro_batches_of_its_window_and_each_epoch_logs_its_last(
    monkeypatch, toy_root, tmp_path
):
    """Epochs of 3 steps, a log every 2: the first epoch's last window (step 3) holds one step, logged at its end;
    the window that ends at step 4 began in the second epoch and holds one step too; a constant loss of 1 must read 1
    in each. An epoch shorter than log_every logs once, at its end."""
    monkeypatch.setattr(engine_module, "build_loss", lambda cfg: lambda logits, targets: (logits * 0).sum() + 1.0)
    train(toy_config(toy_root, tmp_path / "run", "train.epochs=2", "data.steps_per_epoch=3"))
    logged = train_log(tmp_path / "run")
    assert [r["step"] for r in logged] == [2, 3, 4, 6]
    assert [r["train/loss"] for r in logged] == [1.0, 1.0, 1.0, 1.0]
    train(toy_config(toy_root, tmp_path / "short", "train.epochs=2", "data.steps_per_epoch=3", "train.log_every=5"))
    logged = train_log(tmp_path / "short")
    assert [r["step"] for r in logged] == [3, 5, 6]


def test_the_logged_learning_rates_are_those_the_logged_step_used(monkeypatch, toy_root, tmp_path):
    """Warmup over the first epoch, a decay at the second: the log must show the first warmup rate and the decay
    where it happened (the scheduler steps before the log and sets the next step's rate)."""
    used: list[dict[str, float]] = []
    sgd_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        used.append({group["name"]: group["lr"] for group in self.param_groups})
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    train(toy_config(toy_root, tmp_path / "run", "train.epochs=2", "data.steps_per_epoch=3", "train.log_every=1",
                     "optim.warmup_epochs=1", "optim.epoch_step=[1]"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == len(used) == 6
    assert [{name: r[f"train/lr_{name}"] for name in used[0]} for r in logged] == used
    assert len({tuple(lrs.values()) for lrs in used}) >= 3  # warmup and decay: the rates did change


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_mode_reaches_accelerates_dynamo_plugin(mode, toy_root, tmp_path):
    cfg = resolve_precision(toy_config(toy_root, tmp_path, "train.compile=true", f"train.compile_mode={mode}"), "cpu")
    accelerator = build_accelerator(cfg)
    assert accelerator.state.dynamo_plugin.backend.value.lower() == "inductor"
    assert accelerator.state.dynamo_plugin.mode == mode
    assert uses_cuda_graphs(cfg.train.compile, cfg.train.compile_mode) == (mode == "reduce-overhead")


@pytest.mark.parametrize("native_bf16,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_is_bf16_where_the_gpu_computes_it_natively_else_fp16(monkeypatch, native_bf16,
                                                                                       expected):
    # A pre-Ampere GPU "supports" bf16 only through emulation.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    assert concrete_precision("auto", "cuda") == expected


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_precision_is_fp32_on_cpu_and_mps(device):
    assert concrete_precision("auto", device) == "fp32"


@pytest.mark.parametrize("device", ["cuda", "mps", "cpu"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_on_every_device(precision, device):
    assert concrete_precision(precision, device) == precision


def test_resolving_precision_copies_the_config_and_leaves_the_callers_as_it_was(monkeypatch, toy_root, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cfg = toy_config(toy_root, tmp_path, "train.precision=auto")
    resolved = resolve_precision(cfg, "cuda")
    assert resolved.train.precision == "bf16" and cfg.train.precision == "auto"
    assert resolved.data is not cfg.data and resolved.data == cfg.data
    again = resolve_precision(resolved, "cuda")
    assert again is not resolved and again.train.precision == "bf16"  # always a copy


def test_auto_precision_resumed_keeps_the_checkpoints_and_an_explicit_one_wins(monkeypatch, toy_root, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    auto = toy_config(toy_root, tmp_path, "train.precision=auto")
    assert resolve_precision(auto, "cuda", resumed="fp16").train.precision == "fp16"
    assert resolve_precision(auto, "cuda", resumed=None).train.precision == "bf16"
    explicit = toy_config(toy_root, tmp_path, "train.precision=fp32")
    assert resolve_precision(explicit, "cuda", resumed="bf16").train.precision == "fp32"


def test_building_the_accelerator_refuses_an_unresolved_auto_precision(toy_root, tmp_path):
    with pytest.raises(ValueError, match="resolve train.precision=auto first"):
        build_accelerator(toy_config(toy_root, tmp_path, "train.precision=auto"))


def test_ddp_gets_gradient_bucket_views_the_configured_bucket_size_and_no_unused_parameter_search(toy_root, tmp_path):
    cfg = resolve_precision(toy_config(toy_root, tmp_path, "train.ddp_bucket_mb=50"), "cpu")
    ddp = build_accelerator(cfg).ddp_handler.to_kwargs()
    assert ddp["gradient_as_bucket_view"] is True and ddp["bucket_cap_mb"] == 50
    assert ddp.get("find_unused_parameters", False) is False


@pytest.mark.parametrize("preset", [None, ":16:8"])
def test_deterministic_mode_fixes_the_cublas_workspace_unless_the_user_did(preset, monkeypatch, toy_root, tmp_path):
    """Without CUBLAS_WORKSPACE_CONFIG cuBLAS may reduce in another order each run, and torch only warns."""
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        engine_module._configure_determinism(toy_config(toy_root, tmp_path, "train.deterministic=true"), rank=0)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (preset or ":4096:8")
        # An op without a deterministic CUDA kernel warns, naming itself, instead of stopping the run.
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


@pytest.mark.parametrize("start", ["auto", "fork"])
def test_a_run_with_loader_workers_says_how_they_start_where_this_python_could_deadlock_a_forked_one(
    start, toy_root, tmp_path, capsys
):
    train(toy_config(toy_root, tmp_path / "run", "data.workers=1", f"data.worker_start={start}", "train.epochs=1",
                     "data.steps_per_epoch=1"))
    out = capsys.readouterr().out
    line = worker_start_line(1, start)  # None on a Python with CPython gh-112275 fixed: nothing to say
    assert (line in out) if line else "gh-112275" not in out


def test_a_run_with_auto_precision_records_the_precision_it_ran_in(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.precision=auto", "train.epochs=1", "data.steps_per_epoch=2"))
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.precision == concrete_precision("auto", training_device(saved)) != "auto"


def test_an_accelerate_config_that_sets_what_a_deepspeed_json_owns_is_refused_naming_those_fields(
    toy_root, tmp_path, monkeypatch
):
    """What `accelerate launch --config_file` exports for a deepspeed section with zero_stage and mixed_precision
    beside its deepspeed_config_file: Accelerate would refuse it on every rank with a message about its own env."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "configs/deepspeed/zero2.json"))
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,zero_stage,mixed_precision")
    cfg = resolve_precision(toy_config(toy_root, tmp_path), "cpu")
    with pytest.raises(ConfigError, match=r"sets mixed_precision, zero_stage, which Accelerate refuses"):
        build_accelerator(cfg)


# --------------------------------------------------------------------------------- gradient accumulation


def test_with_gradient_accumulation_the_schedule_advances_once_per_optimiser_step(toy_root, tmp_path):
    """6 micro-batches of 4, 2 per optimiser step: 3 steps an epoch. Warmup spans epoch 0's 3 steps and the decay
    comes at epoch 1's first step, not 2x sooner."""
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=2", "data.batch_size=4", "train.grad_accum=2",
                     "data.steps_per_epoch=6", "train.log_every=1", "optim.warmup_epochs=1", "optim.epoch_step=[1]"))
    logged = train_log(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["train/lr_head"] for r in logged] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.01, 0.01, 0.01])


NO_BATCHNORM = ("model.backbone=cifar_plainnet", "model.head=gcn")  # a batch's images never interact


@pytest.mark.parametrize("clip", ["0", "0.05"])
def test_accumulating_two_micro_batches_of_4_trains_the_weights_of_one_batch_of_8(clip, toy_root, tmp_path):
    """The accumulated gradient is the mean over the micro-batches, as a batch's is over its images: the same
    images in the same order (the order does not depend on the batch size) give the same weights. No BatchNorm,
    which would normalise each 4 apart from the other 4. Unclipped (clip 0), where a clip would hide a scale; and
    with a clip that binds, which must clip the step's accumulated gradient, as the batch's, not each micro-batch's."""
    run = ("train.epochs=1", f"optim.clip_grad={clip}", *NO_BATCHNORM)
    train(toy_config(toy_root, tmp_path / "batch8", *run, "data.batch_size=8", "data.steps_per_epoch=3"))
    train(toy_config(toy_root, tmp_path / "accum", *run, "data.batch_size=4", "train.grad_accum=2",
                     "data.steps_per_epoch=6"))
    whole, accumulated = weights(tmp_path / "batch8"), weights(tmp_path / "accum")
    assert whole.keys() == accumulated.keys()
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_micro_batches_left_over_after_the_last_whole_optimiser_step_are_not_trained(toy_root, tmp_path):
    """7 micro-batches an epoch, 2 per step: 3 steps an epoch, and the 7th neither steps nor adds its gradient to
    the next epoch's first step. Two epochs end as with 6 micro-batches an epoch (the same first 6 each epoch)."""
    run = ("train.epochs=2", "data.batch_size=4", "train.grad_accum=2")
    odd = train(toy_config(toy_root, tmp_path / "odd", *run, "data.steps_per_epoch=7"))
    even = train(toy_config(toy_root, tmp_path / "even", *run, "data.steps_per_epoch=6"))
    assert odd["global_step"] == even["global_step"] == 6
    state = json.loads((complete_checkpoints(tmp_path / "odd" / "checkpoints")[-1] / "train_state.json").read_text())
    assert (state["state"]["steps_per_epoch"], state["state"]["micro_batches"]) == (3, 6)
    odd_weights, even_weights = weights(tmp_path / "odd"), weights(tmp_path / "even")
    assert all(torch.equal(odd_weights[key], even_weights[key]) for key in even_weights)


def test_a_resume_with_more_steps_per_epoch_goes_on_at_the_same_point_of_a_cosine_schedule(toy_root, tmp_path):
    """Epoch 0 in 4 steps of 8 images, epoch 1 resumed in 8 steps of 4: the resumed run's schedule is 16 steps
    long and epoch 1 starts at its step 8, halfway down the cosine (lr x 0.5), neither a step early nor late."""
    run_dir = tmp_path / "run"
    run = ("train.epochs=2", "optim.schedule=cosine", "optim.warmup_epochs=0", "train.log_every=1")
    train(toy_config(toy_root, run_dir, *run, "data.batch_size=8", "data.steps_per_epoch=4", "train.max_steps=4"))
    first_session = len(train_log(run_dir))
    cfg = toy_config(toy_root, run_dir, *run, "data.batch_size=4", "data.steps_per_epoch=8", "train.resume=auto")
    train(cfg)
    resumed = [r["train/lr_head"] for r in train_log(run_dir)[first_session:]]
    assert resumed[0] == pytest.approx(0.1 * 0.5)
    assert resumed == pytest.approx([0.1 * lr_factor(step, cfg.optim, 8, 2) for step in range(8, 16)])


@contextlib.contextmanager
def built_trainer(cfg):
    """A Trainer set up as ``train`` sets it up (model, optimiser, checkpoints), for a test to drive directly."""
    lock = RunLock(cfg.run_dir)
    trainer = Trainer(cfg, PreemptionHandler(), lock)
    try:
        yield trainer
    finally:
        trainer._release()
        lock.release()


def test_the_trainer_takes_the_intra_op_threads_of_its_launcher_for_its_device_before_it_names_them(
        monkeypatch, toy_root, tmp_path):
    """On a GPU one thread unless OMP_NUM_THREADS says otherwise (threads.use_launcher_threads, tested on every
    device there); here, on the CPU, the spy stands in for it and sets 3, which the start line must then name."""
    import mlgcn_dist.engine as engine

    seen = []

    def spy(device_type, environ):
        seen.append((device_type, environ is os.environ))
        torch.set_num_threads(3)

    monkeypatch.setattr(engine, "use_launcher_threads", spy)
    before = torch.get_num_threads()
    try:
        with built_trainer(toy_config(toy_root, tmp_path / "run")) as trainer:
            assert seen == [("cpu", True)]
            assert trainer.topo.intra_op_threads == 3
    finally:
        torch.set_num_threads(before)


def test_the_stand_in_step_for_an_all_unreadable_micro_batch_leaves_no_gradient(toy_root, tmp_path):
    """Its loss is weighted 0: every gradient it leaves is zero (or none), so the optimiser step it belongs to
    learns nothing from the two blank stand-in images. With 2 micro-batches a step, its gradient is still there
    to see after it: the optimiser steps only after the second. No BatchNorm: at initialisation it would turn two
    identical blank images into zero features, which give no gradient even unweighted."""
    cfg = toy_config(toy_root, tmp_path / "run", "train.grad_accum=2", "data.batch_size=4", *NO_BATCHNORM)
    with built_trainer(cfg) as trainer:
        trainer._stand_in_step()
        assert not trainer.accelerator.sync_gradients  # no optimiser step yet: nothing zeroed the gradients
        grads = {name: p.grad for name, p in trainer.model.named_parameters()}
        assert grads
        assert [name for name, grad in grads.items() if grad is not None and bool(grad.any())] == []


def test_the_stand_in_step_gives_every_batchnorm_its_momentum_back(toy_root, tmp_path):
    """Its momentum 0 holds for the stand-in step alone: the next steps update the running statistics again."""
    with built_trainer(toy_config(toy_root, tmp_path / "run")) as trainer:  # cifar_resnet_tiny: BatchNorm
        norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        trainer._stand_in_step()
        assert norms and [m.momentum for m in norms] == momenta


# --------------------------------------------------------------------------------- best.pt


def scored(mAP: float, CF1: float = 50.0) -> dict:
    """One source's evaluation as ``evaluate`` returns it (12 toy labels), with the given mAP and CF1."""
    metrics = {**{k: 50.0 for k in engine_module.METRIC_KEYS}, "mAP": mAP, "CF1": CF1}
    return {**metrics, "top3": dict(metrics), "ap": [mAP] * 12, "absent_classes": [], "num_images": 32,
            "duplicates": 0, "num_bad": 0, "bad_ids": [], "frequency_baseline_mAP": 20.0}


def scripted_evaluations(monkeypatch, *evaluations: dict) -> None:
    """Each evaluation of the run returns the next of ``evaluations`` ({"model": scored(..), "ema": ..})."""
    queue = list(evaluations)
    monkeypatch.setattr(engine_module, "_evaluate_all", lambda *args: queue.pop(0))


def portable(run_dir: Path, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


def test_best_pt_is_the_evaluation_with_the_highest_map_over_the_model_and_its_ema(monkeypatch, toy_root, tmp_path):
    """Epoch 1's EMA has the highest mAP; epoch 2 is worse on mAP (better on CF1): best.pt stays epoch 1's, the
    EMA is named its source, and the summary's best_mAP is that mAP."""
    scripted_evaluations(monkeypatch,
                         {"model": scored(50.0, CF1=90.0), "ema": scored(40.0, CF1=10.0)},
                         {"model": scored(55.0, CF1=20.0), "ema": scored(60.0, CF1=30.0)},
                         {"model": scored(52.0, CF1=95.0), "ema": scored(58.0, CF1=99.0)})
    run_dir = tmp_path / "run"
    summary = train(toy_config(toy_root, run_dir, "train.ema_decay=0.9", "train.epochs=3", "data.steps_per_epoch=1"))
    assert (summary["best_mAP"], summary["best_epoch"], summary["best_source"]) == (60.0, 1, "ema")
    saved = saved_summary(run_dir)
    assert (saved["best_mAP"], saved["best_epoch"], saved["best_source"]) == (60.0, 1, "ema")
    best, last = portable(run_dir, "best.pt"), portable(run_dir, "last.pt")
    assert (best["epoch"], last["epoch"]) == (1, 2)
    assert best["metrics"]["ema"]["mAP"] == 60.0


def test_a_resumed_run_keeps_its_best_map_so_a_worse_epoch_after_the_resume_leaves_best_pt_alone(monkeypatch,
                                                                                                 toy_root, tmp_path):
    scripted_evaluations(monkeypatch, {"model": scored(60.0)}, {"model": scored(50.0)}, {"model": scored(55.0)})
    run_dir = tmp_path / "run"
    run = ("train.ema_decay=0", "data.steps_per_epoch=1")
    train(toy_config(toy_root, run_dir, *run, "train.epochs=2"))
    summary = train(toy_config(toy_root, run_dir, *run, "train.epochs=3", "train.resume=auto"))
    assert (summary["best_mAP"], summary["best_epoch"], summary["best_source"]) == (60.0, 0, "model")
    assert (portable(run_dir, "best.pt")["epoch"], portable(run_dir, "last.pt")["epoch"]) == (0, 2)


# --------------------------------------------------------------------------------- stop signals


def signalled_at_the_third_micro_batch(monkeypatch, signum: int, change=lambda value, logits: value) -> None:
    """This process sends itself ``signum`` as the third micro-batch's loss is computed (``change`` it too)."""
    losses_changed_at_the_third_call(monkeypatch, lambda value, logits: os.kill(os.getpid(), signum) or
                                     change(value, logits))


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["preemption", "ctrl_c"])
def test_a_stop_signal_saves_at_the_next_logging_step_and_exits_with_its_code_leaving_the_signal_handlers_as_they_were(
        signum, monkeypatch, toy_root, tmp_path):
    """In this process (the slow tests send real signals to launched runs): a preemption asks for a requeue (exit
    75, the REQUEUE marker SLURM's script reads, summary "preempted"); Ctrl-C only stops (exit 130, no marker)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    signalled_at_the_third_micro_batch(monkeypatch, signum)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=6", "train.log_every=2"))
    preempted = signum != signal.SIGINT
    assert stopped.value.code == (REQUEUE_EXIT_CODE if preempted else INTERRUPTED_EXIT_CODE)
    assert [path.name for path in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000004"]
    assert (run_dir / "REQUEUE").exists() is preempted
    summary = saved_summary(run_dir)
    assert (summary.get("preempted"), summary.get("stopped")) == ((True, None) if preempted else (None, "Ctrl-C"))
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_a_stop_signal_to_another_process_alone_stops_this_one_at_the_same_logging_step(monkeypatch, toy_root,
                                                                                      tmp_path):
    """A Ctrl-C reaches rank 0's process group alone, and SLURM's signal may land between two ranks' windows: the
    ranks agree at each logging step (any_rank) and all save and stop there, or the others would train on into a
    collective the stopped one never joins. Another rank's signal, stood in for, at the second window."""
    windows: list[bool] = []

    def another_rank_signalled_at_the_second_window(flag: bool, device: torch.device) -> bool:
        windows.append(flag)
        return flag or len(windows) == 2

    monkeypatch.setattr(engine_module.distributed, "any_rank", another_rank_signalled_at_the_second_window)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=6", "train.log_every=2"))
    assert stopped.value.code == REQUEUE_EXIT_CODE and windows == [False, False]
    assert [path.name for path in complete_checkpoints(run_dir / "checkpoints")] == ["step-00000004"]
    assert (run_dir / "REQUEUE").read_text().startswith("preempted at step 4")


def test_a_run_clears_the_requeue_marker_of_the_preempted_session_before_it(toy_root, tmp_path):
    """The SLURM script requeues a job that leaves the marker: the requeued session's must not be the old one."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "REQUEUE").write_text("preempted at step 4\n")
    train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=1"))
    assert not (run_dir / "REQUEUE").exists()


def test_a_preemption_after_a_gradient_overflow_stops_with_the_error_and_saves_no_checkpoint_of_the_broken_weights(
        monkeypatch, toy_root, tmp_path):
    signalled_at_the_third_micro_batch(monkeypatch, signal.SIGUSR1, nan_gradient_with_a_finite_loss)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights after step 3 \(epoch 0\) with finite losses"):
        train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=6", "train.log_every=1"))
    assert complete_checkpoints(run_dir / "checkpoints") == [] and not (run_dir / "REQUEUE").exists()


def test_the_batchnorm_statistics_averaged_over_the_processes_are_those_of_the_model_and_ema_evaluated_and_saved(
        monkeypatch, toy_root, tmp_path):
    """Each rank's running statistics come from its own batches; the averaging (stood in for: it sets every
    running mean to 7) comes before the evaluation and save, for the EMA model as well."""
    def averaged(*modules):
        for module in modules:
            for name, buffer in module.named_buffers():
                if name.endswith("running_mean"):
                    buffer.fill_(7.0)

    monkeypatch.setattr(engine_module.distributed, "average_running_stats", averaged)
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.ema_decay=0.9", "train.epochs=1", "data.steps_per_epoch=2"))
    last = portable(run_dir, "last.pt")
    means = {source: [t for k, t in last[source].items() if k.endswith("running_mean")] for source in ("model", "ema")}
    assert all(means.values()) and all(bool((t == 7).all()) for ts in means.values() for t in ts)


# --------------------------------------------------------------------------------- non-finite loss, throughput


def test_an_infinite_loss_stops_the_run_as_a_nan_does_naming_its_step_before_any_checkpoint(monkeypatch, toy_root,
                                                                                            tmp_path):
    losses_changed_at_the_third_call(monkeypatch, lambda value, logits: value + float("inf"))
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in 1 micro-batch\(es\) up to step 3 \(epoch 0\)"):
        train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=5", "train.log_every=1"))
    assert complete_checkpoints(run_dir / "checkpoints") == []


def test_a_non_finite_loss_on_one_rank_of_two_stops_the_run_at_that_logging_window(monkeypatch, toy_root, tmp_path):
    """A window's counts are summed over the ranks, not averaged: the other rank's finite micro-batches (its share
    of the reduction stood in for: as many, all finite) must not dilute this rank's one non-finite loss to half."""
    def with_a_finite_rank(self, tensor, reduction="sum", scale=1.0):
        other = tensor.clone()
        other[1] = 0  # [loss sum, non-finite count, micro-batches]
        return tensor + other if reduction == "sum" else (tensor + other) / 2

    monkeypatch.setattr(Accelerator, "reduce", with_a_finite_rank)
    losses_changed_at_the_third_call(monkeypatch, lambda value, logits: value + float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in 1 micro-batch\(es\) up to step 4 \(epoch 0\)"):
        train(toy_config(toy_root, tmp_path / "run", "train.epochs=1", "data.steps_per_epoch=6", "train.log_every=2"))


@pytest.mark.parametrize("clip", ["10", "0"])
def test_a_non_finite_gradient_under_a_finite_loss_stops_the_run_before_its_weights_are_evaluated_or_saved(
        clip, monkeypatch, toy_root, tmp_path):
    """A backward overflow with a finite loss (the loss check cannot see it): clipping spread the NaN into every
    weight, which were evaluated and checkpointed, the step checkpoint named "last good" by the next epoch's
    error. The epoch's last step here."""
    losses_changed_at_the_third_call(monkeypatch, nan_gradient_with_a_finite_loss)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights after step 3 \(epoch 0\) with finite losses"):
        train(toy_config(toy_root, run_dir, "train.epochs=2", "data.steps_per_epoch=3", f"optim.clip_grad={clip}"))
    assert complete_checkpoints(run_dir / "checkpoints") == []
    assert not (run_dir / "checkpoints" / "best.pt").exists() and not (run_dir / "checkpoints" / "last.pt").exists()


def test_a_single_non_finite_weight_is_enough_to_stop_the_run_before_its_weights_are_evaluated(toy_root, tmp_path):
    with built_trainer(toy_config(toy_root, tmp_path / "run")) as trainer:
        trainer._check_weights_finite()  # all finite: nothing to say
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = float("inf")
        with pytest.raises(NonFiniteLossError, match=r"non-finite weights after step 0 \(epoch 0\)"):
            trainer._check_weights_finite()


def training_loaders_yielding(monkeypatch, batches) -> None:
    """Each training loader keeps its length (``len``, what the engine plans the epoch by) but yields
    ``batches(iterator over its batches)``. (Past 10 loaders, the run is taken to repeat an epoch forever.)"""
    build, built = engine_module.build_train_loader, []

    class Yielding:
        def __init__(self, loader) -> None:
            built.append(loader)
            assert len(built) <= 10, "the run keeps starting an epoch again"
            self.loader = loader

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self):
            return batches(iter(self.loader))

    monkeypatch.setattr(engine_module, "build_train_loader", lambda *args, **kwargs: Yielding(build(*args, **kwargs)))


def loaders_running_short(monkeypatch, batches: int) -> None:
    """Each epoch's loader yields its first ``batches`` alone: a loader that broke its promise of ``len(loader)``."""
    training_loaders_yielding(monkeypatch, lambda epoch: itertools.islice(epoch, batches))


def test_an_epoch_whose_loader_runs_short_ends_there_and_the_next_epoch_begins(monkeypatch, toy_root, tmp_path):
    loaders_running_short(monkeypatch, 3)
    run_dir = tmp_path / "run"
    assert train(toy_config(toy_root, run_dir, "train.epochs=2", "data.steps_per_epoch=5"))["global_step"] == 6
    assert evaluated_epochs(run_dir) == [0, 1]


def test_a_nan_loss_after_the_last_optimiser_step_of_a_loader_that_ran_short_stops_the_run_before_any_checkpoint(
        monkeypatch, toy_root, tmp_path):
    """2 micro-batches a step, the loader ends after 3: the third, NaN, completed no step and no logging window."""
    loaders_running_short(monkeypatch, 3)
    losses_changed_at_the_third_call(monkeypatch, lambda value, logits: value * float("nan"))
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in 1 micro-batch\(es\) up to step 1 \(epoch 0\)"):
        train(toy_config(toy_root, run_dir, "train.epochs=1", "data.batch_size=4", "train.grad_accum=2",
                         "data.steps_per_epoch=6", "train.log_every=1"))
    assert complete_checkpoints(run_dir / "checkpoints") == []


def test_the_batches_a_resume_makes_again_to_skip_them_are_not_counted_as_training_time(monkeypatch, toy_root,
                                                                                         tmp_path):
    """Each batch takes 100 s to make, on the clock the engine reads (and no other time passes): an epoch of 4
    batches, stopped after the first and resumed, trained for 400 s, not 500 (its img_per_s is over that time)."""
    clock = [0.0]

    def made_in_100_s_each(epoch):
        for batch in epoch:
            clock[0] += 100
            yield batch

    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    training_loaders_yielding(monkeypatch, made_in_100_s_each)
    run_dir, run = tmp_path / "run", ("train.epochs=1", "data.steps_per_epoch=4", "data.device_prefetch=0")
    train(toy_config(toy_root, run_dir, *run, "train.max_steps=1"))
    train(toy_config(toy_root, run_dir, *run, "train.resume=auto"))
    state = newest_state(run_dir)
    assert (state["global_step"], state["train_seconds"]) == (4, 400)


def test_the_runs_trained_images_add_up_the_images_of_every_rank(monkeypatch, toy_root, tmp_path):
    """Another rank trained 5 images (its gather of the counts, trained and skipped, is stood in for)."""
    another_ranks_training_counts(monkeypatch, lambda mine: (5, 0))
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=2"))
    state = newest_state(run_dir)
    assert state["trained_images"] == 2 * 8 + 5


def test_a_logging_windows_data_wait_adds_up_the_wait_for_each_of_its_batches(monkeypatch, toy_root, tmp_path):
    """Each batch is said to have kept the loop waiting 0.25 s: a window of 2 batches waited 0.5 s, not the last
    batch's 0.25 s (train/data_wait_frac is that over the window's time)."""
    windows: list[float] = []
    timed_next = engine_module.timed_next

    class RecordingMeter(engine_module.ThroughputMeter):
        def window(self):
            windows.append(self.data_wait)
            return super().window()

    def a_quarter_second_each(batches, stall):
        batch, _ = timed_next(batches, stall)
        return batch, 0.25

    monkeypatch.setattr(engine_module, "ThroughputMeter", RecordingMeter)
    monkeypatch.setattr(engine_module, "timed_next", a_quarter_second_each)
    train(toy_config(toy_root, tmp_path / "run", "train.epochs=1", "data.steps_per_epoch=4", "train.log_every=2"))
    assert windows == [0.5, 0.5]


def test_a_process_of_two_reports_the_window_throughput_of_both_and_img_per_s_over_the_images_counted(
    monkeypatch, toy_root, tmp_path
):
    """The processes step together, so a logging window's rate is this process's x 2 (an in-process run told it
    is rank 0 of 2; nothing it does here needs the other): train/img_per_s and their median. The run's img_per_s
    is the images the ranks counted, summed at each save, over the time, not multiplied by the process count (a
    resume on another count: tests/test_distributed.py)."""
    topology = engine_module.distributed.topology
    monkeypatch.setattr(engine_module.distributed, "topology",
                        lambda acc, cfg: dataclasses.replace(topology(acc, cfg), world_size=2))
    run_dir = tmp_path / "run"
    summary = train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=3", "train.log_every=1"))
    assert summary["world_size"] == 2
    state = newest_state(run_dir)
    assert state["trained_images"] == 3 * 8  # the ranks' counts summed: here this process's alone
    assert summary["img_per_s"] == pytest.approx(state["trained_images"] / state["train_seconds"])
    logged = train_log(run_dir)
    assert [r["train/img_per_s"] for r in logged] == [2 * r["train/img_per_s_per_process"] for r in logged]
    assert summary["img_per_s_window_median"] == statistics.median(r["train/img_per_s"] for r in logged)


def test_a_checkpoint_that_counted_rank_0s_images_alone_is_resumed_with_its_count_taken_once_for_each_process(
    monkeypatch, toy_root, tmp_path
):
    """Saved before trained_images counted every rank's images (its state lacks images_of_all_ranks) and resumed
    on 2 processes (stood in for, as above): 8 images of rank 0 count as 8 for each."""
    state_dict = TrainState.state_dict
    monkeypatch.setattr(TrainState, "state_dict",
                        lambda self: {k: v for k, v in state_dict(self).items() if k != "images_of_all_ranks"})
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=2", "data.steps_per_epoch=2", "train.max_steps=1"))
    monkeypatch.undo()
    topology = engine_module.distributed.topology
    monkeypatch.setattr(engine_module.distributed, "topology",
                        lambda acc, cfg: dataclasses.replace(topology(acc, cfg), world_size=2))
    with built_trainer(toy_config(toy_root, run_dir, "train.epochs=2", "train.resume=auto")) as trainer:
        assert trainer.state.trained_images == 2 * 8


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads file names of descriptors from /proc")
def test_every_file_of_a_checkpoint_reaches_the_disk_before_its_train_state_json_makes_it_complete(
        toy_root, tmp_path, monkeypatch):
    """Accelerate writes the weights, optimiser and RNG states without fsync; train_state.json (fsynced) is what
    makes a directory count as complete, so after a power loss it must not outlive the files it vouches for."""
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "train.epochs=1", "data.steps_per_epoch=2"))
    (step,) = complete_checkpoints(run_dir / "checkpoints")
    tmp = step.with_name(f".tmp-{step.name}")
    state_json = next(i for i, p in enumerate(synced) if p.parent == tmp and p.name.startswith(".train_state.json"))
    files = [tmp / p.relative_to(step) for p in step.rglob("*") if p.is_file() and p.name != "train_state.json"]
    assert files and all(f in synced[:state_json] for f in files), (files, synced)
    assert run_dir / "checkpoints" in synced[state_json:]  # and the rename that publishes it


def test_skipped_training_images_may_make_up_max_bad_fraction_of_the_images_met_and_no_more(toy_root, tmp_path):
    cfg = toy_config(toy_root, tmp_path, "data.max_bad_fraction=0.25")
    engine_module._check_bad_fraction(cfg, bad=1, seen=3)  # 1 of the 4 met: at the limit
    with pytest.raises(RuntimeError, match=r"2 undecodable training samples out of 5 exceed data.max_bad_fraction=0.25"):
        engine_module._check_bad_fraction(cfg, bad=2, seen=3)


# --------------------------------------------------------------------------------- decoding and evaluation


def test_auto_decode_decodes_on_a_cuda_device_and_in_the_loader_elsewhere_and_an_explicit_choice_is_kept(
        toy_root, tmp_path):
    auto, cpu = (toy_config(toy_root, tmp_path, f"data.decode={decode}") for decode in ("auto", "cpu"))
    assert engine_module.resolve_decode(auto, torch.device("cuda")) == "gpu"
    assert engine_module.resolve_decode(auto, torch.device("cpu")) == "cpu"
    assert engine_module.resolve_decode(cpu, torch.device("cuda")) == "cpu"


def first_jpeg_of_each_batch_refused_by_the_device(monkeypatch, in_training: bool) -> None:
    """data.decode=gpu: the device's decoder refuses the first JPEG of each training or evaluation batch (one the
    loader passed on: workers hand raw bytes over), which to_device then drops."""
    decode = engine_module.GpuAugment.decode

    def first_refused(self, jpegs, device):
        images, kept = decode(self, jpegs, device)
        return (images[1:], kept[1:]) if self.train == in_training else (images, kept)

    monkeypatch.setattr(engine_module.GpuAugment, "decode", first_refused)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_evaluation_counts_and_names_the_images_the_device_could_not_decode(monkeypatch, toy_root, tmp_path):
    first_jpeg_of_each_batch_refused_by_the_device(monkeypatch, in_training=False)
    cfg = toy_config(toy_root, tmp_path / "run", "data.decode=gpu", "train.epochs=1", "data.steps_per_epoch=1")
    batches = [batch["image_id"].tolist() for batch in build_eval_loader(cfg.data, rank=0, world_size=1, decode="gpu")]
    summary = train(cfg)
    assert len(batches) > 1 and summary["eval_bad_ids"] == sorted(ids[0] for ids in batches)
    assert summary["num_val_images"] == sum(len(ids) - 1 for ids in batches)


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_training_counts_the_images_the_device_could_not_decode_as_skipped_not_trained(monkeypatch, toy_root,
                                                                                        tmp_path):
    first_jpeg_of_each_batch_refused_by_the_device(monkeypatch, in_training=True)
    run_dir = tmp_path / "run"
    summary = train(toy_config(toy_root, run_dir, "data.decode=gpu", "train.epochs=1", "data.steps_per_epoch=2",
                               "data.max_bad_fraction=0.5"))
    state = newest_state(run_dir)
    assert (summary["bad_samples"], state["trained_images"]) == (2, 2 * 7)  # 2 batches of 8


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_a_logging_window_of_a_stand_in_step_alone_logs_no_loss(monkeypatch, toy_root, tmp_path):
    """The device refuses every JPEG of the second training batch: its step is a stand-in, with no loss to log
    (tests/test_reliability.py: the stand-in step); its window, of that step alone, logs nothing, not a loss of 0."""
    decode, made = engine_module.GpuAugment.decode, []

    def second_batch_refused(self, jpegs, device):
        images, kept = decode(self, jpegs, device)
        made.append(self.train)
        return (images[:0], kept[:0]) if self.train and made.count(True) == 2 else (images, kept)

    monkeypatch.setattr(engine_module.GpuAugment, "decode", second_batch_refused)
    run_dir = tmp_path / "run"
    train(toy_config(toy_root, run_dir, "data.decode=gpu", "train.epochs=1", "data.steps_per_epoch=3",
                     "train.log_every=1", "data.max_bad_fraction=0.5"))
    assert [r["step"] for r in train_log(run_dir)] == [1, 3]


def evaluated(trainer: Trainer):
    """``evaluate`` of the trainer's model on the validation split, as the run does it: (results, merged meter)."""
    model = engine_module.bare_model(trainer.accelerator, trainer.model)
    return engine_module.evaluate(model, trainer.cfg, trainer.accelerator, "cpu", None)


def test_evaluation_counts_and_names_the_unreadable_images_of_every_rank_in_image_id_order(monkeypatch, toy_root,
                                                                                           tmp_path):
    """Another rank could read neither image 900 nor image 5 (its gather of (count, ids) is stood in for): the
    results count and name the run's unreadable images, not rank 0's."""
    gather = engine_module.distributed.gather_objects

    def with_another_rank(mine):
        return [mine, (2, [900, 5])] if isinstance(mine, tuple) and isinstance(mine[1], list) else gather(mine)

    monkeypatch.setattr(engine_module.distributed, "gather_objects", with_another_rank)
    with built_trainer(toy_config(toy_root, tmp_path / "run")) as trainer:
        results, _ = evaluated(trainer)
    assert (results["num_bad"], results["bad_ids"]) == (2, [5, 900])


def test_evaluation_reports_the_metrics_of_each_images_three_top_scored_labels_beside_the_thresholded_ones(
        toy_root, tmp_path):
    with built_trainer(toy_config(toy_root, tmp_path / "run")) as trainer:
        results, merged = evaluated(trainer)
    top3, thresholded = merged.compute(top_k=3), merged.compute()
    assert {k: results["top3"][k] for k in METRIC_KEYS} == {k: top3[k] for k in METRIC_KEYS}
    assert {k: top3[k] for k in METRIC_KEYS} != {k: thresholded[k] for k in METRIC_KEYS}


def test_the_label_frequency_baseline_is_the_mean_positive_rate_of_the_present_labels_in_percent():
    """Ranking at random, a label's AP is the share of its images that hold it (its difficult ones left out); a
    label no image holds has no AP, and no rate in the mean either."""
    meter = AveragePrecisionMeter()
    meter.add(torch.zeros(4, 3), torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0], [-1, 0, 0]]), torch.arange(4))
    assert engine_module.frequency_baseline_map(meter) == pytest.approx((1 / 3 + 2 / 4) / 2 * 100)


def test_each_rank_seeds_its_own_random_draws_with_the_seed_plus_its_rank(toy_root, tmp_path):
    """Weights are initialised and images augmented with draws of each rank's own (the data order is seeded
    apart, by seed and epoch)."""
    engine_module._configure_determinism(toy_config(toy_root, tmp_path, "train.seed=5"), rank=3)
    assert torch.initial_seed() == 8 and random.random() == random.Random(8).random()
