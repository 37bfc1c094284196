"""Specifications of the ``mlgcn`` command: exit statuses and messages (mlgcn_dist/cli.py), the ranges its argument
types accept (mlgcn_dist/arguments.py), and make-toy passing its flags on."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mlgcn_dist.arguments import non_negative_int, positive_float, positive_int, probability
from mlgcn_dist.cli import main
from mlgcn_dist.data.loader import ShardError
from mlgcn_dist.data.toy import make_toy

TOY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")


def raising(err: Exception):
    """A stand-in for a subcommand's job that fails with ``err``."""

    def job(*args, **kwargs):
        raise err

    return job


def test_a_missing_file_is_exit_status_2_and_one_message_naming_it_even_in_training(monkeypatch, capsys):
    monkeypatch.setattr("mlgcn_dist.engine.train", raising(FileNotFoundError("data/coco/train2014 does not exist")))
    assert main(["train", "--config", TOY_CONFIG]) == 2
    assert capsys.readouterr().err == "mlgcn train: data/coco/train2014 does not exist\n"


@pytest.mark.parametrize("err", [
    ShardError("coco-val-000001.tar: unreadable or truncated tar (unexpected end of data)"),
    PermissionError(13, "Permission denied", "scores.jsonl"),
    ValueError("x.pt: not a checkpoint"),
])
def test_bad_input_to_a_tool_is_exit_status_2_and_one_line_naming_it(err, monkeypatch, capsys):
    monkeypatch.setattr("mlgcn_dist.inference.run_evaluate", raising(err))
    assert main(["evaluate", "--checkpoint", "run"]) == 2
    assert capsys.readouterr().err == f"mlgcn evaluate: {err}\n"


def test_a_runtime_error_from_torch_in_a_tool_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr("mlgcn_dist.inference.run_evaluate", raising(RuntimeError("CUDA error: an illegal access")))
    with pytest.raises(RuntimeError, match="CUDA error"):
        main(["evaluate", "--checkpoint", "run"])


def test_make_toy_passes_split_sizes_image_size_and_seed_on(tmp_path, capsys):
    argv = ["make-toy", "--out", str(tmp_path / "cli"), "--train", "3", "--val", "2", "--size", "16", "--seed", "5"]
    assert main(argv) == 0
    assert "'train': {'images': 3" in capsys.readouterr().out
    make_toy(tmp_path / "api", train=3, val=2, size=16, seed=5)
    for name in ("annotations/instances_train2014.json", "annotations/instances_val2014.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


@pytest.mark.parametrize(("kind", "accepted", "refused"), [
    (positive_int, ["1", "7"], ["0", "-3"]),
    (non_negative_int, ["0", "5"], ["-1"]),
    (positive_float, ["0.001", "2"], ["0", "-1", "nan"]),
    (probability, ["0", "0.5", "1"], ["-0.1", "1.01", "nan"]),
])
def test_argument_types_accept_their_range_and_refuse_the_rest_naming_the_value(kind, accepted, refused):
    assert [kind(text) for text in accepted] == [float(text) for text in accepted]
    for text in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text}$"):
            kind(text)
