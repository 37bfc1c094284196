"""Specifications of the ``mlgcn`` command: exit statuses and messages (mlgcn_dist/cli.py), the ranges its argument
types accept (mlgcn_dist/arguments.py), make-toy passing its flags on and keeping off an existing data set, and the
help of the commands this file builds (train, make-toy, bench *)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from mlgcn_dist.arguments import non_negative_int, positive_float, positive_int, probability
from mlgcn_dist.cli import build_parser, main
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


def test_a_loader_timeout_in_training_keeps_its_traceback_after_a_line_on_its_likely_causes(monkeypatch, capsys):
    timed_out = RuntimeError("DataLoader timed out after 600 seconds")
    monkeypatch.setattr("mlgcn_dist.engine.train", raising(timed_out))
    with pytest.raises(RuntimeError, match="DataLoader timed out"):
        main(["train", "--config", TOY_CONFIG])
    err = capsys.readouterr().err
    assert "a data loader worker yielded no batch within data.worker_timeout_s" in err
    assert "CPython before 3.11.10, gh-112275" in err and "data.worker_start=forkserver" in err
    assert "train.resume=auto" in err


@pytest.mark.parametrize("message", ["DataLoader worker (pid(s) 4242) exited unexpectedly",
                                     "DataLoader worker (pid 4242) is killed by signal: Killed. "])
def test_a_dead_loader_worker_in_training_keeps_its_traceback_after_a_line_on_its_likely_cause(
    message, monkeypatch, capsys
):
    monkeypatch.setattr("mlgcn_dist.engine.train", raising(RuntimeError(message)))
    with pytest.raises(RuntimeError, match="4242"):
        main(["train", "--config", TOY_CONFIG])
    err = capsys.readouterr().err
    assert f"a data loader worker died ({message})" in err and "out-of-memory killer" in err
    assert "data.workers" in err and "train.resume=auto" in err


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


def _real_dataset(root: Path) -> dict[Path, bytes]:
    """A stand-in for a real COCO directory: its annotations, images and a file make-toy never writes."""
    files = {
        root / "annotations" / "instances_train2014.json": b'{"real": "coco"}',
        root / "annotations" / "captions_train2014.json": b'{"captions": []}',
        root / "train2014" / "COCO_train2014_000000000009.jpg": b"real jpeg",
        root / "README": b"mine",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_make_toy_refuses_a_directory_holding_a_data_set_naming_it_and_the_flag(tmp_path, capsys):
    files = _real_dataset(tmp_path / "coco")
    assert main(["make-toy", "--out", str(tmp_path / "coco"), "--train", "3", "--val", "2", "--size", "16"]) == 2
    assert capsys.readouterr().err == (
        f"mlgcn make-toy: --out {tmp_path / 'coco'} already holds a data set (annotations/, train2014/); pass "
        f"--overwrite to replace its train2014/, val2014/ and annotations/instances_*2014.json with the toy set\n"
    )
    assert all(path.read_bytes() == data for path, data in files.items())


def test_make_toy_overwrite_replaces_its_own_files_leaving_no_stale_jpeg_and_nothing_else_touched(tmp_path):
    out = tmp_path / "coco"
    files = _real_dataset(out)
    assert main(["make-toy", "--out", str(out), "--train", "6", "--val", "3", "--size", "16"] + ["--overwrite"]) == 0
    assert main(["make-toy", "--out", str(out), "--train", "3", "--val", "2", "--size", "16", "--overwrite"]) == 0
    listed = json.loads((out / "annotations" / "instances_train2014.json").read_text())["images"]
    assert sorted(p.name for p in (out / "train2014").iterdir()) == sorted(im["file_name"] for im in listed)
    assert len(list((out / "val2014").iterdir())) == 2
    assert [path for path in files if path.exists() and path.read_bytes() == files[path]] == [
        out / "annotations" / "captions_train2014.json",
        out / "README",
    ]


def _command_parser(*names: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subcommands.choices[name]
    return parser


@pytest.mark.parametrize("command", [("train",), ("make-toy",), ("bench", "train"), ("bench", "loader"),
                                     ("bench", "decode")], ids=" ".join)
def test_every_option_of_a_command_has_a_help_line_that_shows_its_default_and_never_none(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    parser = _command_parser(*command)
    entries = re.split(r"\n  (?=-)", parser.format_help())  # an option's entry: its flags, then its help
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            entry = next(e for e in entries if e.startswith(action.option_strings[-1]))
            assert "default" in entry, entry
    assert "(default: None)" not in parser.format_help()


def test_help_shows_the_defaults_users_asked_about(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    make_toy_help = _command_parser("make-toy").format_help()
    for text in ("images in the training split (default: 400)", "(default: 200)", "(default: 96)", "(default: 0)"):
        assert text in make_toy_help
    train_help = _command_parser("bench", "train").format_help()
    for text in ("(default: 50)", "(default: 10)", "(default: 256)", "(default: 640)", "(default: 5)",
                 "(default: runs/bench/train.json)"):
        assert text in train_help
    assert "(default: 64)" in _command_parser("bench", "decode").format_help()
    loader_help = _command_parser("bench", "loader").format_help()
    assert "(default: 32)" in loader_help and "(default: 448)" in loader_help and "(default: 20," in loader_help
