"""Reliability: bad input, faults and interruptions never lose a user's run, and never pass unnoticed.

Each fault below is provoked for real on the 32 px toy set (README.md's Reliability section has the table of faults,
what the system does and which test proves it): damaged shards and images, impossible configurations, a NaN loss,
kill -9 of a rank / all ranks / the launcher (also while a checkpoint is being written), a hung rank, a full disk,
two runs on one directory, and secrets in the environment. In-process runs come first (seconds); the real
multi-process ones are marked slow.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import process_alive
from launching import (
    REPO,
    TRAIN,
    another_ranks_training_counts,
    check,
    kill_tree,
    overrides,
    process_env,
    run,
    summary,
    torchrun_cmd,
    wait_for,
    weights,
)
from test_loader import rewrite_shard, truncate

from mlgcn_dist.checkpoint import (
    INTERRUPTED_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    CheckpointError,
    CheckpointManager,
    TrainState,
    atomic_torch_save,
    check_resume_ema,
    check_resume_precision,
    complete_checkpoints,
    resolve_resume,
    saved_precision,
)
from mlgcn_dist.cli import main as mlgcn
from mlgcn_dist.config import Config, ConfigError, load_config
from mlgcn_dist.data.folder import read_split
from mlgcn_dist.data.loader import ShardError, read_meta
from mlgcn_dist.data.pack import pack_dataset
from mlgcn_dist.engine import NonFiniteLossError, Trainer, train
from mlgcn_dist.tracking import read_jsonl

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # in-process runs each start from a clean state


@pytest.fixture(scope="module")
def tiny_shards(tiny_toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_shards") / "shards"
    pack_dataset("coco", tiny_toy, out, ["train", "val"], shard_count=2, workers=1)
    return out


@pytest.fixture
def shards(tiny_shards, tmp_path) -> Path:
    """A private copy of the pack, for a test to damage."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


def tiny_config(toy: Path, run_dir: Path, *extra: str) -> Config:
    args = overrides(toy, run_dir, *extra)
    return load_config(args[1], args[2:])


def from_shards(shards: Path) -> tuple[str, ...]:
    return "data.format=wds", f"data.shards={shards}", "data.shuffle_buffer=16"


def damage_sample(shard: Path, position: int, damage: str) -> int:
    """Damage sample ``position`` of ``shard`` in place; returns its image id."""
    damaged = []

    def edit(at: int, sample: dict) -> None:
        if at != position:
            return
        info = json.loads(sample["json"])
        damaged.append(info["image_id"])
        if damage == "truncated_jpeg":
            sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
        elif damage == "missing_json":
            del sample["json"]
        elif damage == "label_out_of_range":
            sample["json"] = json.dumps({**info, "labels": [99]}).encode()

    rewrite_shard(shard, edit)
    return damaged[0]


def truncate_image_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ----------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("damage", ["truncated_jpeg", "missing_json", "truncated_tar"])
def test_training_skips_damaged_samples_and_counts_them_in_the_summary(damage, tiny_toy, shards, tmp_path):
    shard = shards / "coco-train-000000.tar"
    if damage == "truncated_tar":
        truncate(shard, inside_member=True)
    else:
        damage_sample(shard, 1, damage)
    run_dir = tmp_path / "run"
    lost_rest = pytest.warns(RuntimeWarning, match="coco-train-000000.tar: read .* skipping the rest of this shard")
    with lost_rest if damage == "truncated_tar" else contextlib.nullcontext():
        # 16 batches of 8: more than two passes over the 62 training images, so the damaged one is met
        result = train(tiny_config(tiny_toy, run_dir, *from_shards(shards), "data.max_bad_fraction=0.5",
                                   "data.steps_per_epoch=16"))
    assert result["bad_samples"] >= 2
    assert json.loads((run_dir / "summary.json").read_text())["bad_samples"] == result["bad_samples"]
    assert result["global_step"] == 16 and result["eval_bad_ids"] == []


def test_the_skipped_training_images_of_every_rank_and_every_resume_add_up_in_the_summary(tiny_toy, shards, tmp_path,
                                                                                          monkeypatch):
    damage_sample(shards / "coco-train-000000.tar", 1, "truncated_jpeg")
    run = (*from_shards(shards), "data.max_bad_fraction=0.5", "data.steps_per_epoch=16")
    whole = train(tiny_config(tiny_toy, tmp_path / "whole", *run))["bad_samples"]
    assert whole >= 2  # 16 batches of 8: the damaged image is met in more than one pass
    train(tiny_config(tiny_toy, tmp_path / "split", *run, "train.max_steps=9"))
    assert train(tiny_config(tiny_toy, tmp_path / "split", *run, "train.resume=auto"))["bad_samples"] == whole
    # Another rank's count is summed in (one process here: its gather of the training counts, images trained and
    # skipped, is stood in for: another rank that trained as many and skipped 3).
    another_ranks_training_counts(monkeypatch, lambda mine: (mine[0], 3))
    assert train(tiny_config(tiny_toy, tmp_path / "ranks", *run))["bad_samples"] == whole + 3


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_training_micro_batch_of_only_unreadable_images_is_skipped_and_training_goes_on(decode, tiny_toy,
                                                                                          tmp_path, monkeypatch):
    """Batches of one image, one of them truncated: that step runs on a stand-in with no gradient (on every rank,
    so none waits in the all-reduce), leaves the BatchNorm statistics as they were, and is counted."""
    toy = Path(shutil.copytree(tiny_toy, tmp_path / "toy"))
    truncate_image_file(Path(read_split("coco", toy, "train").records[0].path))
    stand_in_step, kept_statistics = Trainer._stand_in_step, []

    def watched(self: Trainer) -> None:
        before = {n: b.clone() for n, b in self.model.named_buffers() if "running" in n}
        stand_in_step(self)
        after = dict(self.model.named_buffers())
        kept_statistics.append(bool(before) and all(torch.equal(b, after[n]) for n, b in before.items()))

    monkeypatch.setattr(Trainer, "_stand_in_step", watched)
    result = train(tiny_config(tiny_toy, tmp_path / "run", f"data.root={toy}", f"data.decode={decode}",
                               "model.backbone=cifar_resnet_tiny",  # with BatchNorm
                               "data.batch_size=1", "data.max_bad_fraction=0.5", "train.log_every=4"))
    assert result["bad_samples"] == 1 and result["global_step"] == len(read_split("coco", toy, "train").records)
    assert kept_statistics == [True]
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "run" / "train_log.jsonl")]
    assert losses and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize(("fmt", "decode"), [("wds", "cpu"), ("wds", "gpu"), ("folder", "cpu")])
def test_evaluation_reports_an_undecodable_image_by_id_in_results_summary_and_log(
    fmt, decode, tiny_toy, shards, tmp_path, capsys
):
    if fmt == "wds":
        bad_id = damage_sample(shards / "coco-val-000000.tar", 2, "truncated_jpeg")
        data = from_shards(shards)
    else:
        toy = Path(shutil.copytree(tiny_toy, tmp_path / "toy"))
        image = sorted((toy / "val2014").glob("*.jpg"))[2]
        annotations = json.loads((toy / "annotations" / "instances_val2014.json").read_text())
        bad_id = next(im["id"] for im in annotations["images"] if im["file_name"] == image.name)
        truncate_image_file(image)
        data = (f"data.root={toy}",)
    run_dir = tmp_path / "run"
    result = train(tiny_config(tiny_toy, run_dir, *data, f"data.decode={decode}"))
    assert result["eval_bad_ids"] == [bad_id]
    assert json.loads((run_dir / "summary.json").read_text())["eval_bad_ids"] == [bad_id]
    last_eval = read_jsonl(run_dir / "metrics.jsonl")[-1]["model"]
    assert last_eval["bad_ids"] == [bad_id] and last_eval["num_bad"] == 1
    assert re.search(rf"evaluation skipped 1 image\(s\) .*image ids: \[{bad_id}\]", capsys.readouterr().out)
    # ... and `mlgcn evaluate` says it too
    assert mlgcn(["evaluate", "--checkpoint", str(run_dir)]) == 0
    assert f"skipped as unreadable: 1, ids [{bad_id}]" in capsys.readouterr().out


@pytest.mark.parametrize(("fmt", "decode"), [("wds", "cpu"), ("wds", "gpu"), ("folder", "cpu")])
def test_an_evaluation_batch_of_only_unreadable_images_is_counted_not_scored(fmt, decode, tiny_toy, shards, tmp_path):
    """Validation batches of all images but one: the last batch holds one image, made unreadable."""
    images = len(read_split("coco", tiny_toy, "val").records)
    if fmt == "wds":
        last_shard = read_meta(shards)["splits"]["val"]["shards"][-1]
        bad_id = damage_sample(shards / last_shard["file"], last_shard["count"] - 1, "truncated_jpeg")
        data = from_shards(shards)
    else:
        toy = Path(shutil.copytree(tiny_toy, tmp_path / "toy"))
        last = read_split("coco", toy, "val").records[-1]
        truncate_image_file(Path(last.path))
        bad_id, data = last.image_id, (f"data.root={toy}",)
    result = train(tiny_config(tiny_toy, tmp_path / "run", *data, f"data.decode={decode}",
                               f"data.eval_batch_size={images - 1}"))
    assert result["eval_bad_ids"] == [bad_id] and result["num_val_images"] == images - 1


def test_an_evaluation_that_can_score_no_image_is_an_error_not_a_nan_map(tiny_toy, tmp_path, monkeypatch):
    toy = Path(shutil.copytree(tiny_toy, tmp_path / "toy"))
    annotations = toy / "annotations" / "instances_val2014.json"
    unlabelled = {**json.loads(annotations.read_text()), "annotations": []}  # COCO drops images without labels
    annotations.write_text(json.dumps(unlabelled))
    monkeypatch.setattr("mlgcn_dist.engine.build_model_for", _heavy_work_started)
    with pytest.raises(ConfigError, match="data.val_split='val' holds no image"):
        train(tiny_config(tiny_toy, tmp_path / "empty", f"data.root={toy}"))
    monkeypatch.undo()

    toy = Path(shutil.copytree(tiny_toy, tmp_path / "unreadable"))
    for image in (toy / "val2014").glob("*.jpg"):
        truncate_image_file(image)
    with pytest.raises(RuntimeError, match=r"evaluation scored no image of split 'val': all \d+ were unreadable"):
        train(tiny_config(tiny_toy, tmp_path / "run", f"data.root={toy}"))


def test_a_label_out_of_range_stops_training_with_an_error_naming_shard_and_sample(tiny_toy, shards, tmp_path):
    damage_sample(shards / "coco-train-000001.tar", 0, "label_out_of_range")
    with pytest.raises(ValueError, match=r"coco-train-000001.tar: sample '\w+' has label indices \[99\]"):
        train(tiny_config(tiny_toy, tmp_path / "run", *from_shards(shards)))


def test_a_missing_json_in_a_validation_shard_stops_evaluation_with_an_error_naming_the_shard(
    tiny_toy, shards, tmp_path
):
    damage_sample(shards / "coco-val-000001.tar", 1, "missing_json")
    with pytest.raises(ShardError, match="coco-val-000001.tar: sample .* lacks its .jpg or .json"):
        train(tiny_config(tiny_toy, tmp_path / "run", *from_shards(shards)))


def test_a_shard_listed_in_meta_but_missing_stops_training_before_any_heavy_work(
    tiny_toy, shards, tmp_path, monkeypatch
):
    (shards / "coco-train-000001.tar").unlink()
    monkeypatch.setattr("mlgcn_dist.engine.build_model_for", _heavy_work_started)
    with pytest.raises(FileNotFoundError, match="coco-train-000001.tar of split 'train'.* is missing"):
        train(tiny_config(tiny_toy, tmp_path / "run", *from_shards(shards)))


def _heavy_work_started(*args, **kwargs):
    raise AssertionError("the model was built before the error was found")


def test_more_skipped_samples_than_max_bad_fraction_stop_training(tiny_toy, shards, tmp_path):
    for position in (0, 3, 5):
        damage_sample(shards / "coco-train-000000.tar", position, "truncated_jpeg")
    with pytest.raises(RuntimeError, match=r"undecodable training samples out of \d+ exceed data.max_bad_fraction"):
        train(tiny_config(tiny_toy, tmp_path / "run", *from_shards(shards), "data.max_bad_fraction=0.01"))
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------------------------- config


IMPOSSIBLE = {  # case: (overrides, what the error says); {optimizer}/{scheduler}: a DeepSpeed JSON with that block,
    # {zero3}: one asking for ZeRO stage 3
    # train.device=auto: the machine has no GPU (train.device=cpu would be refused at load time already).
    "fp16_without_a_gpu": (("train.device=auto", "train.precision=fp16"), "train.precision=fp16 needs a GPU"),
    "grad_accum_beyond_the_epoch": (("train.grad_accum=16",),
                                    r"7 micro-batch\(es\) per process, fewer than train.grad_accum=16"),
    "deepspeed_json_with_an_optimizer": (("train.deepspeed={optimizer}",), "remove the 'optimizer' block"),
    "deepspeed_json_with_a_scheduler": (("train.deepspeed={scheduler}",), "remove the 'scheduler' block"),
    # ZeRO-3 crashed: with EMA at start (copying empty weight placeholders), without it at the first best.pt.
    "deepspeed_zero3": (("train.deepspeed={zero3}",), "zero_optimization.stage must be 0, 1 or 2, got 3"),
}


@pytest.mark.parametrize("case", IMPOSSIBLE)
def test_an_impossible_combination_is_one_config_error_before_any_heavy_work(case, tiny_toy, tmp_path, monkeypatch):
    if case == "fp16_without_a_gpu" and torch.cuda.is_available():
        pytest.skip("fp16 is possible on this machine")
    overrides, message = IMPOSSIBLE[case]
    deepspeed_json = {}
    for block in ("optimizer", "scheduler"):
        deepspeed_json[block] = tmp_path / f"ds_{block}.json"
        deepspeed_json[block].write_text(json.dumps({"zero_optimization": {"stage": 2}, block: {"type": "AdamW"}}))
    deepspeed_json["zero3"] = tmp_path / "ds_zero3.json"
    deepspeed_json["zero3"].write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setattr("mlgcn_dist.engine.build_model_for", _heavy_work_started)
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(tiny_toy, tmp_path / "run", *(o.format(**deepspeed_json) for o in overrides)))


LOAD_TIME_ERRORS = {  # override (with train.grad_accum=4): what the error says
    "data.steps_per_epoch=2": "cannot fill one optimiser step of train.grad_accum=4",
    "train.log_every=0": "train.log_every must be >= 1",
    "optim.lr=1.0e999": "optim.lr must be a finite number",
    "optim.base_batch_size=0": "optim.base_batch_size must be >= 1",
    "optim.gamma=-1": "optim.gamma must be > 0",  # would flip the learning rate's sign at the decay
    "optim.momentum=5": "optim.momentum must be in [0, 1)",
    "optim.clip_grad=-1": "optim.clip_grad must be >= 0 (0 disables clipping)",
    "graph.t=2": "graph.t must be in [0, 1]",  # a label graph without edges
    "graph.p=-1": "graph.p must be in [0, 1]",
    "train.run_name=../elsewhere": "train.run_name must be a plain directory name",
}


@pytest.mark.parametrize("override", LOAD_TIME_ERRORS)
def test_config_errors_reach_the_user_as_exit_status_2_and_one_message(override, tiny_toy, tmp_path, capsys):
    args = overrides(tiny_toy, tmp_path / "run", "train.grad_accum=4", override)
    assert mlgcn(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and LOAD_TIME_ERRORS[override] in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_yaml_section_given_twice_is_an_error_naming_it_not_a_silent_override(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 0.1\ntrain:\n  epochs: 3\noptim:\n  lrp: 0.5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: key 'optim' given twice"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file is a directory"):
        load_config(tmp_path)


def _setup_error_case(case: str, tmp_path: Path, tiny_shards: Path) -> tuple[tuple[str, ...], str]:
    """Overrides whose file or value is found unusable while the run is set up (not at load time), and what the
    error says."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(random.Random(0).randbytes(256))  # no file format: the same bytes in every run
    other_net = tmp_path / "other_net.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other_net)
    words = tmp_path / "glove.txt"
    words.write_text("unrelated 0.1 0.2 0.3\n")
    return {
        "unknown_backbone": (("model.backbone=no_such_net",), "model.backbone: unknown backbone 'no_such_net'"),
        "imagenet_weights_for_a_cifar_net": (("model.pretrained=imagenet",), "has no ImageNet weights"),
        "weights_file_that_is_no_state_dict": ((f"model.pretrained={junk}",), "model.pretrained: cannot read"),
        "weights_of_another_net": ((f"model.pretrained={other_net}",), "not a state dict of backbone"),
        "label_statistics_file_that_is_no_pickle": ((f"graph.stats={junk}",), "graph.stats: "),
        "word_vectors_without_the_label_words": ((f"graph.embeddings={words}",),
                                                  "graph.embeddings: .*no vector for the word"),
        "shards_of_another_dataset": ((*from_shards(tiny_shards), "data.dataset=voc"),
                                      "shards of 'coco' but data.dataset=voc"),
    }[case]


@pytest.mark.parametrize("case", ["unknown_backbone", "imagenet_weights_for_a_cifar_net",
                                  "weights_file_that_is_no_state_dict", "weights_of_another_net",
                                  "label_statistics_file_that_is_no_pickle", "word_vectors_without_the_label_words",
                                  "shards_of_another_dataset"])
def test_an_unusable_file_or_value_found_while_setting_up_is_exit_status_2_and_one_message_naming_the_key(
    case, tiny_toy, tiny_shards, tmp_path, capsys
):
    extra, message = _setup_error_case(case, tmp_path, tiny_shards)
    assert mlgcn(["train", *overrides(tiny_toy, tmp_path / "run", *extra)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and re.search(message, err) and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 3, err  # one message, not a wall of mismatched tensor names


def test_resuming_with_another_architecture_names_the_model_keys_that_differ_before_loading(
    trained_run, tiny_toy, tmp_path, capsys
):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    assert mlgcn(["train", *overrides(tiny_toy, run_dir, "train.resume=auto", "model.gcn_hidden=16")]) == 2
    err = capsys.readouterr().err
    assert "is of another model: model.gcn_hidden=16 (checkpoint: 32)" in err and "Traceback" not in err


def _damage_checkpoint(step: Path, damage: str) -> str:
    """Damage a DDP full-state checkpoint as ``damage`` says; the message the resume must give."""
    if damage == "weights_deleted":
        (step / "model.safetensors").unlink()
        return "has lost its weights (model.safetensors or pytorch_model.bin)"
    if damage == "deepspeed_state":  # what a DeepSpeed run saves: its engine's state in pytorch_model/
        (step / "pytorch_model").mkdir()
        return "was saved by a DeepSpeed run and this run uses DDP"
    cut = step / {"weights_cut_short": "model.safetensors", "optimizer_cut_short": "optimizer.bin"}[damage]
    cut.write_bytes(cut.read_bytes()[:100])
    return "could not be loaded ("


@pytest.mark.parametrize("damage", ["weights_deleted", "weights_cut_short", "optimizer_cut_short", "deepspeed_state"])
def test_resuming_from_a_damaged_checkpoint_or_another_launchers_is_one_message_naming_it(
    damage, trained_run, tiny_toy, tmp_path, capsys
):
    """Before, a bare AssertionError from DeepSpeed, a missing pytorch_model.bin that never existed, or a
    safetensors traceback without a path."""
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    (step,) = complete_checkpoints(run_dir / "checkpoints")[-1:]
    expected = _damage_checkpoint(step, damage)
    described = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "summary.json")}
    assert mlgcn(["train", *overrides(tiny_toy, run_dir, "train.resume=auto", "train.epochs=3",
                                      "data.batch_size=4")]) == 2
    err = capsys.readouterr().err
    assert f"train.resume: checkpoint {step} {expected}" in err and "Traceback" not in err, err
    # The run's own description stays the one of the run that trained (before, the failed session's).
    assert {name: (run_dir / name).read_bytes() for name in described} == described


def test_starting_afresh_in_a_directory_with_checkpoints_says_that_they_will_be_replaced(trained_run, tiny_toy,
                                                                                          tmp_path, capsys):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    train(tiny_config(tiny_toy, run_dir, "train.resume=none", "train.max_steps=1"))
    assert f"train.resume=none: starting afresh in {run_dir}, whose checkpoints of an earlier run" in \
        capsys.readouterr().out


def test_a_checkpoint_evaluates_without_the_graph_files_it_was_trained_with(tiny_toy, tmp_path, capsys):
    """best.pt/last.pt carry the GCN's graph inputs as buffers: another machine needs no graph.stats or
    graph.embeddings file at the training run's paths."""
    from mlgcn_dist.graph import label_stats, write_stats

    files = tmp_path / "graph_files"
    files.mkdir()
    targets = np.asarray(read_split("coco", tiny_toy, "train").targets())
    write_stats(files / "stats.pkl", *label_stats(targets))
    with (files / "words.pkl").open("wb") as fh:
        pickle.dump(np.random.default_rng(0).standard_normal((targets.shape[1], 6)).astype(np.float32), fh)
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_toy, run_dir, f"graph.stats={files / 'stats.pkl'}",
                      f"graph.embeddings={files / 'words.pkl'}"))
    shutil.rmtree(files)
    out = tmp_path / "metrics.json"
    assert mlgcn(["evaluate", "--checkpoint", str(run_dir / "checkpoints/last.pt"), "--metrics-out", str(out)]) == 0
    saved = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert json.loads(out.read_text())["mAP"] == pytest.approx(saved["metrics"]["model"]["mAP"], abs=1e-6)


def test_evaluate_validates_its_overrides_and_output_paths_before_any_evaluation(trained_run, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setattr("mlgcn_dist.engine.evaluate", _heavy_work_started)
    assert mlgcn(["evaluate", "--checkpoint", str(trained_run), "data.batch_size=0"]) == 2
    assert "data.batch_size must be >= 1" in capsys.readouterr().err
    # Overrides read as training reads them: a key without a value is a form error, not an empty value.
    assert mlgcn(["evaluate", "--checkpoint", str(trained_run), "data.workers"]) == 2
    assert "override 'data.workers' is not of the form section.key=value" in capsys.readouterr().err
    missing = tmp_path / "no_such_dir" / "scores.jsonl"
    assert mlgcn(["evaluate", "--checkpoint", str(trained_run), "--scores-out", str(missing)]) == 2
    assert f"its directory {missing.parent} does not exist" in capsys.readouterr().err
    # A path that is a directory, and one path for both files, were found only after the evaluation.
    assert mlgcn(["evaluate", "--checkpoint", str(trained_run), "--metrics-out", str(tmp_path)]) == 2
    assert f"--metrics-out {tmp_path}: is a directory; give the path of a file to write" in capsys.readouterr().err
    same = tmp_path / "out.json"
    assert mlgcn(["evaluate", "--checkpoint", str(trained_run), "--scores-out", str(same), "--metrics-out",
                  str(same)]) == 2
    assert "--scores-out and --metrics-out name the same file" in capsys.readouterr().err
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    if not os.access(read_only, os.W_OK):  # root writes anywhere
        assert mlgcn(["evaluate", "--checkpoint", str(trained_run), "--scores-out", str(read_only / "s.jsonl")]) == 2
        assert "cannot be written" in capsys.readouterr().err


def test_evaluate_on_a_truncated_validation_shard_is_one_line_naming_it_and_exit_status_2(trained_run, shards,
                                                                                       capsys):
    truncate(shards / "coco-val-000000.tar", inside_member=True)
    assert mlgcn(["evaluate", "--checkpoint", str(trained_run), *from_shards(shards)]) == 2
    err = capsys.readouterr().err
    assert "coco-val-000000.tar" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [
    ["predict", "--checkpoint", "x", "--top-k", "0", "a.jpg"],
    ["predict", "--checkpoint", "x", "--threshold", "2", "a.jpg"],
    ["predict", "--checkpoint", "x", "--threshold", "nan", "a.jpg"],
    ["make-toy", "--out", "x", "--train", "-3"],
    ["pack", "coco", "--root", "x", "--out", "y", "--shard-count", "0"],
    ["pack", "coco", "--root", "x", "--out", "y", "--workers", "-2"],
    ["bench", "loader", "--shards", "x", "--workers", "-1"],
])
def test_a_flag_out_of_its_range_is_a_usage_error_naming_it(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mlgcn(argv)
    assert exit_info.value.code == 2
    flag = next(a for a in argv if a.startswith("--") and a not in ("--checkpoint", "--out", "--root", "--shards"))
    assert f"argument {flag}" in capsys.readouterr().err


def test_packing_a_split_without_any_image_on_disk_fails_naming_the_split_and_the_reasons_and_writes_nothing(
    tiny_toy, tmp_path, capsys
):
    toy = Path(shutil.copytree(tiny_toy, tmp_path / "toy"))
    for image in (toy / "train2014").glob("*.jpg"):
        image.unlink()
    out = tmp_path / "shards"
    assert mlgcn(["pack", "coco", "--root", str(toy), "--out", str(out), "--workers", "1"]) == 2
    assert re.search(r"split 'train' has no image to pack \(missing_file: \d+", capsys.readouterr().err)
    assert not out.exists()


def test_a_failure_during_training_keeps_its_traceback_and_is_not_reported_as_a_configuration_error(
    tiny_toy, tmp_path, monkeypatch
):
    def fails(cfg):
        raise ValueError("Expected more than 1 value per channel when training")

    monkeypatch.setattr("mlgcn_dist.engine.train", fails)
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        mlgcn(["train", *overrides(tiny_toy, tmp_path / "run")])


@pytest.fixture(scope="module")
def trained_run(tiny_toy, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(tiny_toy, run_dir))
    return run_dir


def voc_data(voc_root: Path) -> tuple[str, ...]:
    return "data.dataset=voc", f"data.root={voc_root}", "data.train_split=trainval", "data.val_split=test"


def test_resuming_on_a_dataset_with_another_label_count_is_a_config_error_before_loading(
    trained_run, tiny_toy, voc_root, monkeypatch
):
    monkeypatch.setattr("mlgcn_dist.engine.build_model_for", _heavy_work_started)
    cfg = tiny_config(tiny_toy, trained_run, *voc_data(voc_root), "train.resume=auto", "data.batch_size=2")
    with pytest.raises(ConfigError, match="was trained on 12 labels, the dataset has 20"):
        train(cfg)


def test_evaluating_a_checkpoint_on_a_dataset_with_another_label_count_is_a_config_error(
    trained_run, voc_root, capsys
):
    assert mlgcn(["evaluate", "--checkpoint", str(trained_run), *voc_data(voc_root)]) == 2
    assert "the checkpoint was trained on 12 labels, the dataset has 20" in capsys.readouterr().err


def test_a_run_resumed_with_auto_precision_goes_on_in_the_precision_it_started_with(
    trained_run, tiny_toy, tmp_path, monkeypatch
):
    # As if requeued onto a GPU where auto means bf16: the run, started in fp32, stays in fp32.
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    monkeypatch.setattr("mlgcn_dist.distributed.concrete_precision",
                        lambda precision, device: "bf16" if precision == "auto" else precision)
    train(tiny_config(tiny_toy, run_dir, "train.precision=auto", "train.resume=auto", "train.epochs=2"))
    assert load_config(run_dir / "config.yaml").train.precision == "fp32"
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] > 0


def test_resuming_with_the_ema_model_switched_on_is_a_config_error_before_loading(trained_run, tiny_toy, tmp_path,
                                                                                 monkeypatch):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))  # trained without an EMA model
    monkeypatch.setattr("mlgcn_dist.engine.build_model_for", _heavy_work_started)
    with pytest.raises(ConfigError, match=r"train.ema_decay=0.9: checkpoint .* was trained without an EMA model"):
        train(tiny_config(tiny_toy, run_dir, "train.resume=auto", "train.ema_decay=0.9"))


@pytest.mark.parametrize(("saved", "asked", "refused"),
                         [(0.0, 0.9, True), (0.9, 0.0, True), (0.9, 0.99, False), (0.0, 0.0, False), (None, 0.9, False)])
def test_a_resume_keeps_the_ema_model_on_or_off_as_the_checkpoint_has_it(saved, asked, refused, tmp_path):
    config = {"train": {"ema_decay": saved}} if saved is not None else {}
    (tmp_path / "train_state.json").write_text(json.dumps({"state": {}, "config": config, "label_names": []}))
    if refused:
        with pytest.raises(ConfigError, match="train.ema_decay"):
            check_resume_ema(tmp_path, asked)
    else:
        check_resume_ema(tmp_path, asked)


@pytest.mark.parametrize(
    "saved,asked,refused",
    [("bf16", "fp16", True), ("fp32", "fp16", True), ("fp16", "fp16", False), ("bf16", "fp32", False),
     ("fp16", "bf16", False), (None, "fp16", False)],
)
def test_resuming_into_fp16_needs_a_checkpoint_trained_in_fp16(saved, asked, refused, tmp_path):
    """Only an fp16 checkpoint holds the loss-scaler state an fp16 run loads; the other switches load."""
    config = {"train": {"precision": saved}} if saved else {}
    (tmp_path / "train_state.json").write_text(json.dumps({"state": {}, "config": config, "label_names": []}))
    if refused:
        with pytest.raises(ConfigError, match=f"was trained in {saved} and holds no loss-scaler state"):
            check_resume_precision(tmp_path, saved_precision(tmp_path), asked)
    else:
        check_resume_precision(tmp_path, saved_precision(tmp_path), asked)


def test_evaluating_a_checkpoint_trained_in_fp16_on_a_gpu_runs_at_this_machines_precision(trained_run, tmp_path):
    payload = torch.load(trained_run / "checkpoints/best.pt", map_location="cpu", weights_only=False)
    payload["config"]["train"]["precision"] = "fp16"  # as saved by a run on a V100 (auto resolved to fp16 there)
    torch.save(payload, tmp_path / "fp16.pt")
    assert mlgcn(["evaluate", "--checkpoint", str(tmp_path / "fp16.pt")]) == 0


# ----------------------------------------------------------------------------------------------- numerics


def test_a_diverging_run_stops_at_the_first_nan_loss_naming_step_and_image_ids(tiny_toy, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"up to step \d+ .*image ids of the last batch \[\d+, .*"
                                                 r"last good checkpoint: none"):
        train(tiny_config(tiny_toy, tmp_path / "run", "optim.lr=1e6"))


@pytest.mark.parametrize("log_every", [1, 100])  # 100: the NaN falls after the last logging window of the epoch
def test_a_nan_loss_stops_the_run_before_it_is_checkpointed_and_names_the_last_good_checkpoint(
    log_every, tiny_toy, tmp_path, monkeypatch
):
    import mlgcn_dist.engine as engine

    real_build_loss, calls = engine.build_loss, []

    def loss_turning_nan_at_step_10(cfg):
        criterion = real_build_loss(cfg)

        def loss(logits, targets):
            calls.append(1)
            value = criterion(logits, targets)
            return value * float("nan") if len(calls) >= 10 else value

        return loss

    monkeypatch.setattr(engine, "build_loss", loss_turning_nan_at_step_10)
    run_dir = tmp_path / "run"
    good = run_dir / "checkpoints" / "step-00000007"  # 7 steps per epoch: the NaN comes in epoch 1
    with pytest.raises(NonFiniteLossError, match=rf"epoch 1\); image ids of the last batch \[\d+.*{re.escape(str(good))}"):
        train(tiny_config(tiny_toy, run_dir, "train.epochs=2", f"train.log_every={log_every}"))
    assert complete_checkpoints(run_dir / "checkpoints") == [good]
    monkeypatch.undo()
    assert train(tiny_config(tiny_toy, run_dir, "train.epochs=2", "train.resume=auto"))["global_step"] == 14


# ----------------------------------------------------------------------------------------------- disk


def fill_disk(directory: Path) -> Path:
    """Write a file until the filesystem holding ``directory`` is full."""
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("fault", ["tmpfs_full", "enospc_in_save"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_uses_it(
    fault, tiny_toy, tmp_path, monkeypatch, request
):
    disk = request.getfixturevalue("small_disk") if fault == "tmpfs_full" else tmp_path
    run_dir = disk / "run"
    real_save, saves, filler = CheckpointManager.save, [], []

    def second_save_meets_a_full_disk(self, *args):
        saves.append(1)
        if len(saves) == 2 and fault == "tmpfs_full":
            filler.append(fill_disk(disk))
        elif len(saves) == 2:
            real_save_state = self.accelerator.save_state

            def save_state_then_enospc(output_dir):
                real_save_state(output_dir)  # every file written, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "extra.bin"))

            monkeypatch.setattr(self.accelerator, "save_state", save_state_then_enospc)
        return real_save(self, *args)

    monkeypatch.setattr(CheckpointManager, "save", second_save_meets_a_full_disk)
    first = run_dir / "checkpoints" / "step-00000007"
    expected = rf"step-00000014 .*No space left .*; \d+ MiB free there\); .*{re.escape(str(first))} is intact"
    with pytest.raises(CheckpointError, match=expected):
        train(tiny_config(tiny_toy, run_dir, "train.epochs=2"))
    assert complete_checkpoints(run_dir / "checkpoints") == [first]
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the partial checkpoint still takes space"
    assert resolve_resume("auto", run_dir) == first

    monkeypatch.undo()  # space is back
    for path in filler:
        path.unlink()
    resumed = train(tiny_config(tiny_toy, run_dir, "train.epochs=2", "train.resume=auto"))
    assert resumed["global_step"] == 14


def test_a_failed_write_of_a_portable_checkpoint_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    atomic_torch_save({"epoch": 1}, path)

    def torch_save_meets_a_full_disk(obj, fh):
        fh.write(b"half a file")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_save_meets_a_full_disk)
    with pytest.raises(CheckpointError, match=r"best.pt .*file write failed; \d+ MiB free there\); the previous"):
        atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_a_partial_checkpoint_directory_is_never_resumed_from_and_is_replaced_on_the_next_save(tiny_toy, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_toy, run_dir))
    ckpts = run_dir / "checkpoints"
    partial = ckpts / ".tmp-step-00000014"  # what a kill during the next save leaves behind
    shutil.copytree(ckpts / "step-00000007", partial)
    (partial / "train_state.json").unlink()
    assert resolve_resume("auto", run_dir) == ckpts / "step-00000007"
    train(tiny_config(tiny_toy, run_dir, "train.epochs=2", "train.resume=auto"))
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step-00000007", "step-00000014"]
    assert not partial.exists()


def saved_step(path: Path) -> tuple[int, int]:
    """(global_step, epoch) recorded in a checkpoint."""
    state = json.loads((path / "train_state.json").read_text())["state"]
    return state["global_step"], state["epoch"]


def checkpoints_of(tmp_path: Path, keep: int) -> CheckpointManager:
    from accelerate import Accelerator

    return CheckpointManager(Accelerator(cpu=True), tmp_path / "run", keep)


def test_resaving_a_step_leaves_a_complete_checkpoint_of_it_even_when_killed_between_the_renames(
    tmp_path, monkeypatch
):
    """The epoch's end after a preemption at its last batch saves the same step again (with the next epoch)."""
    ckpt = checkpoints_of(tmp_path, keep=2)
    ckpt.save(TrainState(epoch=0, global_step=7), {}, [])
    real_replace = os.replace

    def killed_after_moving_the_old_one_aside(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith(".replaced-"):
            raise KeyboardInterrupt  # a kill: no cleanup runs
    monkeypatch.setattr(os, "replace", killed_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(TrainState(epoch=1, global_step=7), {}, [])
    monkeypatch.undo()
    survivor = resolve_resume("auto", tmp_path / "run")
    assert survivor is not None and saved_step(survivor) == (7, 0)  # the old one still counts

    ckpt.save(TrainState(epoch=1, global_step=7), {}, [])
    assert [p.name for p in complete_checkpoints(ckpt.dir)] == ["step-00000007"]
    assert saved_step(ckpt.dir / "step-00000007") == (7, 1)
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["step-00000007"]


def test_a_checkpoint_directory_without_its_train_state_is_never_resumed_from(tmp_path):
    """What a kill in the middle of deleting a checkpoint could leave (rotation now renames it away first)."""
    ckpt = checkpoints_of(tmp_path, keep=3)
    older = ckpt.save(TrainState(global_step=7), {}, [])
    newer = ckpt.save(TrainState(global_step=14), {}, [])
    (newer / "train_state.json").unlink()
    assert complete_checkpoints(ckpt.dir) == [older]
    assert resolve_resume("auto", tmp_path / "run") == older


@pytest.mark.parametrize("changed", [(), ("data.workers=1",), ("data.batch_size=4",)], ids=["same", "workers", "batch"])
def test_a_resume_inside_a_shard_epoch_with_another_layout_warns_that_the_rest_of_that_epoch_is_reordered(
    changed, tiny_toy, tiny_shards, tmp_path, capsys
):
    """Each (rank, worker) reads its own span of a shard epoch's samples: skipping the trained batches of another
    layout's order skips other images (the folder format draws one permutation whatever the layout)."""
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_toy, run_dir, *from_shards(tiny_shards), "train.epochs=2", "train.max_steps=2"))
    capsys.readouterr()
    train(tiny_config(tiny_toy, run_dir, *from_shards(tiny_shards), "train.epochs=2", "train.resume=auto", *changed))
    warned = "warning: resumed inside epoch 0 with another shard order (1 processes x " in capsys.readouterr().out
    assert warned == bool(changed)


def test_a_damaged_train_state_stops_a_resume_naming_it_instead_of_falling_back_to_an_older_checkpoint(tmp_path):
    """train_state.json says which checkpoint is newest: a damaged one sorted as the oldest, so the resume went on
    silently from an older checkpoint and rotation later deleted the newer one."""
    ckpt = checkpoints_of(tmp_path, keep=3)
    older = ckpt.save(TrainState(global_step=7), {}, [])
    newer = ckpt.save(TrainState(global_step=14), {}, [])
    state = newer / "train_state.json"
    state.write_text(state.read_text()[:40])
    with pytest.raises(ConfigError, match=rf"train.resume=auto: damaged checkpoint state {re.escape(str(state))} "
                                          rf"\(JSONDecodeError: .*train.resume={re.escape(str(older))} "):
        resolve_resume("auto", tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"train.resume={re.escape(str(newer))}: damaged checkpoint state"):
        resolve_resume(str(newer), tmp_path / "run")
    shutil.rmtree(older)
    with pytest.raises(ConfigError, match=r"move that checkpoint out of \S+/checkpoints$"):
        resolve_resume("auto", tmp_path / "run")


@pytest.mark.parametrize("keep", [1, 2])
def test_newest_is_last_saved_so_a_run_resumed_from_an_older_checkpoint_keeps_its_own_line(tmp_path, keep):
    ckpt = checkpoints_of(tmp_path, keep=3)
    ckpt.save(TrainState(global_step=100), {}, [])
    ckpt.save(TrainState(global_step=200), {}, [])
    ckpt.keep = keep  # resumed from step 100, with the run's keep_checkpoints
    latest = ckpt.save(TrainState(global_step=150), {}, [])
    assert latest.is_dir() and resolve_resume("auto", tmp_path / "run") == latest
    assert [saved_step(p)[0] for p in complete_checkpoints(ckpt.dir)] == [200, 150][-keep:]


# ----------------------------------------------------------------------------------------------- processes

KILL_RUN = ("train.epochs=3", "data.steps_per_epoch=15")  # 45 steps, a checkpoint after steps 15, 30 and 45


@pytest.fixture(scope="module")
def uninterrupted(tiny_toy, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    check(run(torchrun_cmd(2, overrides(tiny_toy, run_dir, *KILL_RUN))))
    return run_dir


def logged_steps(run_dir: Path) -> int:
    return len(read_jsonl(run_dir / "train_log.jsonl"))


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A run in the background, its output in ``log`` (a file never fills up and blocks the run like a pipe)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=process_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def ranks(launcher: subprocess.Popen, count: int) -> dict[int, psutil.Process]:
    """The launcher's worker processes by RANK, once all ``count`` have started."""
    found: dict[int, psutil.Process] = {}

    def started() -> bool:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found[int(rank)] = child
        return len(found) == count

    wait_for(started, 60, launcher)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("victim", "seed"), [("one_rank", 0), ("all_ranks", 6), ("launcher", 2),
                                              ("all_ranks_while_saving", 5)])
def test_kill_9_at_a_random_point_then_resume_auto_ends_equal_to_an_uninterrupted_run(
    victim, seed, tiny_toy, uninterrupted, tmp_path
):
    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    launcher = start(torchrun_cmd(2, overrides(tiny_toy, run_dir, *KILL_RUN)), log)
    try:
        workers = ranks(launcher, 2)
        rng = random.Random(seed)
        if victim == "all_ranks_while_saving":
            partial = run_dir / "checkpoints" / f".tmp-step-{15 * rng.randint(1, 2):08d}"
            wait_for(partial.exists, 120, launcher, poll=0.002)
        else:
            at_step = rng.randint(2, 43)
            wait_for(lambda: logged_steps(run_dir) >= at_step, 120, launcher)
        killed_at = time.monotonic()
        if victim == "one_rank":
            workers[1].kill()
        elif victim == "launcher":
            launcher.kill()
        else:
            for worker in workers.values():
                worker.kill()
        # Every process ends on its own: the launcher takes the group down when a worker dies, and orphaned
        # workers checkpoint and stop when their launcher is gone.
        gone, alive = psutil.wait_procs(list(workers.values()), timeout=60)
        assert not alive, f"workers still running {time.monotonic() - killed_at:.0f} s after the kill"
        status = launcher.wait(timeout=60)
        assert status != 0, log.read_text()[-3000:]
    finally:
        kill_tree(launcher)
    complete = complete_checkpoints(run_dir / "checkpoints")
    if victim == "all_ranks_while_saving":
        assert partial.exists() and partial not in complete
    if victim == "launcher":  # the orphaned workers saw it, saved a checkpoint and marked the run for requeueing
        assert "the launcher (pid" in log.read_text()
        assert complete and complete[-1].name in (run_dir / "REQUEUE").read_text()

    resumed = check(run(torchrun_cmd(2, overrides(tiny_toy, run_dir, *KILL_RUN, "train.resume=auto"))))
    output = resumed.stdout + resumed.stderr
    if complete:
        assert f"resumed from {complete[-1]}:" in output
    else:
        assert "resumed from" not in output
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    a, b = summary(uninterrupted), summary(run_dir)
    assert b["global_step"] == a["global_step"] == 45
    assert b["final"]["model"]["mAP"] == pytest.approx(a["final"]["model"]["mAP"], abs=1e-6)
    for key, value in weights(uninterrupted).items():
        torch.testing.assert_close(weights(run_dir)[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_hung_rank_makes_the_others_exit_within_train_dist_timeout_s_and_the_launcher_fail(tiny_toy, tmp_path):
    run_dir, log, timeout_s = tmp_path / "hung", tmp_path / "hung.log", 5
    launcher = start(torchrun_cmd(2, overrides(tiny_toy, run_dir, "train.epochs=200",
                                               f"train.dist_timeout_s={timeout_s}")), log)
    try:
        workers = ranks(launcher, 2)
        wait_for(lambda: logged_steps(run_dir) >= 3, 120, launcher)
        workers[1].suspend()  # SIGSTOP: alive, holding its sockets, making no progress (a deadlock, a stuck driver)
        hung_at = time.monotonic()
        gone, _ = psutil.wait_procs([workers[0]], timeout=timeout_s + 30)
        assert gone, "rank 0 waits on the hung rank beyond train.dist_timeout_s"
        rank_0_exit = time.monotonic() - hung_at
        # The launcher SIGTERMs the hung rank, SIGKILLs it 30 s later (torch's fixed grace for a failed group) and
        # exits with a failure.
        status = launcher.wait(timeout=60)
        launcher_exit = time.monotonic() - hung_at
    finally:
        kill_tree(launcher)
    assert timeout_s - 1 <= rank_0_exit < timeout_s + 10
    assert status != 0 and launcher_exit < timeout_s + 30 + 15
    assert f"Timed out waiting {timeout_s * 1000}ms" in log.read_text()


@pytest.mark.slow
def test_a_second_real_process_on_the_same_run_directory_refuses_and_the_first_goes_on(tiny_toy, tmp_path):
    run_dir = tmp_path / "shared"
    cmd = [sys.executable, TRAIN, *overrides(tiny_toy, run_dir, "train.epochs=500")]
    first = start(cmd, tmp_path / "first.log")
    try:
        wait_for(lambda: logged_steps(run_dir) >= 1, 120, first)
        second = run(cmd, timeout=120)
        assert second.returncode != 0
        assert f"is in use by pid {first.pid}" in second.stderr
        steps = logged_steps(run_dir)
        wait_for(lambda: logged_steps(run_dir) > steps, 60, first)  # the first run was not disturbed
    finally:
        kill_tree(first)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm_to_every_process", "ctrl_c"])
def test_sigterm_to_every_process_as_scancel_sends_it_or_ctrl_c_saves_with_loader_workers_and_an_offline_wandb_run(
        stop, tiny_toy, tmp_path):
    """SLURM signals every process of the job step (scancel, preemption, a time limit without USR1): the loader's
    workers and W&B's service process too. A worker ended by it, or the W&B service gone, failed the trainer before
    its save; now the workers ignore it and W&B turns itself off. Ctrl-C (SIGINT to the terminal's process group)
    stops the same way; before, it ended the run without a checkpoint."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, TRAIN, *overrides(tiny_toy, run_dir, "train.epochs=5", "data.steps_per_epoch=1000",
                                             "data.workers=2", "log.wandb=offline")]
    log = tmp_path / "run.log"
    wandb_home = {name: str(tmp_path / name.lower()) for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    proc = start(cmd, log, WANDB_SILENT="true", **wandb_home)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, 120, proc)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert {"pt_data_worker", "wandb-core"} <= {p.name() for p in tree}  # training: the epoch's loader is up
        if stop == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)  # the run leads its own process group (start_new_session)
        for process in tree if stop == "sigterm_to_every_process" else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGTERM)
        code = INTERRUPTED_EXIT_CODE if stop == "ctrl_c" else REQUEUE_EXIT_CODE
        assert proc.wait(timeout=120) == code, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
    output = log.read_text()
    signal_name = "SIGINT" if stop == "ctrl_c" else "SIGTERM"
    assert re.search(rf"signal {signal_name}: saved \S+/step-\d+", output) and "Traceback" not in output, output[-3000:]
    assert list((run_dir / "checkpoints").glob("step-*"))
    # Ctrl-C is no preemption: no REQUEUE marker asks the SLURM script for a requeue, compare says "stopped".
    assert (run_dir / "REQUEUE").exists() is (stop != "ctrl_c")
    assert summary(run_dir).get("stopped") == ("Ctrl-C" if stop == "ctrl_c" else None)


@pytest.mark.slow
def test_a_run_that_fails_with_data_workers_running_exits_instead_of_waiting_for_them(tiny_toy, tmp_path):
    """An error raised through the training loop leaves its loader alive until the interpreter exits, whose hook
    then ends the workers with SIGTERM: workers that ignored every SIGTERM held the run (and a SLURM job) forever."""
    cmd = [sys.executable, TRAIN, *overrides(tiny_toy, tmp_path / "run", "train.epochs=5", "data.steps_per_epoch=1000",
                                             "data.workers=2", "optim.lr=1e6")]
    failed = run(cmd, timeout=120)
    assert failed.returncode == 1 and "NonFiniteLossError" in failed.stderr, failed.stderr[-3000:]


def start_a_long_run_with_two_workers(toy: Path, tmp_path: Path, worker_start: str) -> tuple:
    """A training run of minutes with 2 data workers started by ``worker_start``, in the background: (process, run
    directory, log)."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    cmd = [sys.executable, TRAIN, *overrides(toy, run_dir, "train.epochs=5", "data.steps_per_epoch=1000",
                                             "data.workers=2", f"data.worker_start={worker_start}")]
    return start(cmd, log), run_dir, log


@pytest.mark.slow
@pytest.mark.parametrize("worker_start", ["fork", "forkserver"])
def test_a_loader_worker_killed_mid_run_fails_it_at_once_naming_the_worker_and_its_likely_cause(
    worker_start, tiny_toy, tmp_path
):
    """The out-of-memory killer picks a large process, a data worker among them: the user reads that a worker died,
    which, why it likely did and how to go on, before PyTorch's traceback. (How fast a forkserver's worker's death is
    seen, which is not the trainer's child, L::test_a_killed_forkserver_worker_fails_the_epoch_within_seconds_naming_it
    proves: here, killed while it hands batches over, it was seen at once before too.)"""
    proc, run_dir, log = start_a_long_run_with_two_workers(tiny_toy, tmp_path, worker_start)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, 120, proc)
        worker = next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "pt_data_worker")
        killed_at = time.monotonic()
        worker.kill()
        proc.wait(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert "mlgcn train: a data loader worker died (DataLoader worker (pid" in text and str(worker.pid) in text
    assert "out-of-memory killer" in text and "train.resume=auto" in text
    assert took < 30


@pytest.mark.slow
@pytest.mark.parametrize("worker_start", ["fork", "forkserver"])
def test_sigusr2_to_every_process_of_a_run_prints_the_trainers_stacks_and_training_goes_on(
    worker_start, tiny_toy, tmp_path
):
    """How to see where a hung run waits (`scancel --signal=USR2 <job>`): no process of the run ends on it. With a
    forkserver the run has two more processes, the server and multiprocessing's resource tracker, and its workers
    do not inherit the trainer's answer to SIGUSR2: the server and the workers ended on it, failing the run (seen
    in CI once auto chose forkserver)."""
    proc, run_dir, log = start_a_long_run_with_two_workers(tiny_toy, tmp_path, worker_start)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, 120, proc)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert "pt_data_worker" in {p.name() for p in tree}
        for process in tree:
            process.send_signal(signal.SIGUSR2)
        wait_for(lambda: "most recent call first" in log.read_text(), 30, proc)
        steps = logged_steps(run_dir)
        wait_for(lambda: logged_steps(run_dir) > steps + 2, 60, proc)  # the run and its data workers go on
        assert "_train_batches" in log.read_text()  # the trainer's own stack, down to the training loop
        assert [p.pid for p in tree if not process_alive(p.pid)] == []  # every process the signal reached
    finally:
        kill_tree(proc)


class _TouchesAFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("command", ["evaluate", "predict", "import"])
def test_a_checkpoint_that_would_run_code_as_it_loads_is_refused_without_running_it(command, tmp_path, capsys):
    """`mlgcn evaluate`/`predict` load checkpoints from elsewhere (a published ML-GCN one): weights_only."""
    marker, evil = tmp_path / "code_ran", tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _TouchesAFileWhenUnpickled(marker)}, evil)
    argv = {"evaluate": ["evaluate", "--checkpoint", str(evil)],
            "predict": ["predict", "--checkpoint", str(evil), "a.jpg"],
            "import": ["evaluate", "--checkpoint", str(evil), "--import-mlgcn", "--config",
                       str(REPO / "configs/toy.yaml")]}[command]
    assert mlgcn(argv) == 2
    assert not marker.exists() and "not a readable PyTorch checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("kept", [5000, 100])
def test_a_checkpoint_file_cut_short_is_refused_naming_it(command, kept, tmp_path, capsys):
    whole, cut = tmp_path / "whole.pt", tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(4096)}, "config": {}, "label_names": ["a"]}, whole)
    cut.write_bytes(whole.read_bytes()[:kept])
    argv = {"evaluate": ["evaluate", "--checkpoint", str(cut)], "predict": ["predict", "--checkpoint", str(cut), "a.jpg"]}
    assert mlgcn(argv[command]) == 2
    assert f"{cut}: not a readable PyTorch checkpoint (" in capsys.readouterr().err


def test_a_checkpoint_holding_numpy_arrays_is_refused_with_how_to_convert_it(tmp_path, capsys):
    old = tmp_path / "last.pt"  # mlgcn-dist wrote the label statistics as numpy arrays before 2026-11-27
    torch.save({"model": {}, "config": {}, "label_names": ["a"], "nums": np.zeros(1), "adj": np.zeros((1, 1))}, old)
    assert mlgcn(["evaluate", "--checkpoint", str(old)]) == 2
    assert "written before 2026-11-27 holds numpy arrays" in capsys.readouterr().err


def test_secrets_in_the_environment_never_reach_logs_configs_or_checkpoints(tiny_toy, tmp_path):
    secret, other = "some-secret-value", "another-secret-in-the-env"
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, TRAIN, *overrides(tiny_toy, run_dir, "train.epochs=2", "log.wandb=offline")],
        cwd=REPO, capture_output=True, timeout=300,
        env=process_env(WANDB_API_KEY=secret, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), MLGCN_TOKEN=other),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = [p for d in (run_dir, wandb_dir) for p in d.rglob("*") if p.is_file()]
    assert {".pt", ".safetensors", ".bin", ".wandb", ".json", ".jsonl", ".yaml"} <= {p.suffix for p in files}
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and other.encode() not in data, f"a secret is in {path}"
    assert secret.encode() not in proc.stdout + proc.stderr and other.encode() not in proc.stdout + proc.stderr
