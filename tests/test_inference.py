"""`mlgcn evaluate` and `mlgcn predict` on our checkpoints, and evaluation of an original ML-GCN checkpoint."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from mlgcn_dist.cli import main
from mlgcn_dist.config import load_config
from mlgcn_dist.engine import train
from mlgcn_dist.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train_briefly(toy_root: Path, out: Path, *extra: str) -> Path:
    """A toy run of one epoch of two steps, without an EMA."""
    train(load_config(REPO / "configs/toy.yaml", [
        f"data.root={toy_root}", "data.workers=0", "data.batch_size=8", "data.steps_per_epoch=2", "train.epochs=1",
        "train.resume=none", f"train.output_dir={out}", "log.wandb=disabled", "train.ema_decay=0", *extra,
    ]))
    AcceleratorState._reset_state(reset_partial_state=True)  # an in-process evaluation follows
    return out


def evaluated_map(checkpoint: Path, tmp_path: Path) -> float:
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--metrics-out", str(out)]) == 0
    return json.loads(out.read_text())["mAP"]


@pytest.fixture(scope="module")
def run_dir(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("infer") / "run"
    train(load_config(REPO / "configs/toy.yaml", [
        f"data.root={toy_root}", "data.workers=0", "data.batch_size=8", "train.epochs=2", "train.resume=none",
        f"train.output_dir={out}", "log.wandb=disabled", "train.ema_decay=0.9",
    ]))
    return out


def test_evaluate_prints_the_metrics_table_and_per_class_ap_and_matches_training(run_dir, tmp_path, capsys):
    metrics_out, scores_out = tmp_path / "m.json", tmp_path / "s.jsonl"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--metrics-out", str(metrics_out),
                 "--scores-out", str(scores_out)]) == 0
    out = capsys.readouterr().out
    assert "mAP" in out and "per-class AP:" in out and "person" in out
    metrics = json.loads(metrics_out.read_text())
    best = torch.load(run_dir / "checkpoints/best.pt", map_location="cpu", weights_only=False)
    logged = best["metrics"]
    # Which file, epoch, step and weights, and what training logged for each: best.pt's best may be the EMA's.
    assert out.startswith(f"evaluated {run_dir / 'checkpoints/best.pt'}: epoch {best['epoch']}, step "
                          f"{best['global_step']}, model weights (mAP logged by training: model "
                          f"{logged['model']['mAP']:.2f}, ema {logged['ema']['mAP']:.2f}; --weights picks one)\n")
    assert metrics["mAP"] == pytest.approx(best["metrics"]["model"]["mAP"], abs=1e-6)
    lines = scores_out.read_text().splitlines()
    assert len(lines) == metrics["num_images"]
    assert len(json.loads(lines[0])["scores"]) == 12


def test_evaluate_needs_only_the_validation_split(run_dir, toy_root, tmp_path):
    """Another machine may hold only val2014 and its annotations (and COCO's training annotations take seconds)."""
    val_only = tmp_path / "coco"
    shutil.copytree(toy_root / "val2014", val_only / "val2014")
    (val_only / "annotations").mkdir()
    shutil.copy(toy_root / "annotations/instances_val2014.json", val_only / "annotations")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--metrics-out", str(out), f"data.root={val_only}"]) == 0
    best = torch.load(run_dir / "checkpoints/best.pt", map_location="cpu", weights_only=False)
    assert json.loads(out.read_text())["mAP"] == pytest.approx(best["metrics"]["model"]["mAP"], abs=1e-6)


def test_evaluate_with_ema_weights(run_dir, tmp_path):
    out = tmp_path / "ema.json"
    assert main(["evaluate", "--checkpoint", str(run_dir / "checkpoints/last.pt"), "--weights", "ema",
                 "--metrics-out", str(out)]) == 0
    best = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=False)
    assert json.loads(out.read_text())["mAP"] == pytest.approx(best["metrics"]["ema"]["mAP"], abs=1e-6)


def test_predict_prints_labels_above_the_threshold_and_top_k(run_dir, toy_root, capsys):
    images = sorted((toy_root / "val2014").glob("*.jpg"))[:2]
    assert main(["predict", "--checkpoint", str(run_dir), "--threshold", "0.3", "--top-k", "2",
                 *map(str, images)]) == 0
    out = capsys.readouterr().out
    assert out.count("top-2:") == 2 and str(images[0]) in out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "x.jpg"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def original_mlgcn_checkpoint(run_dir: Path, path: Path) -> Path:
    """Our trained GCN written in the original code's layout (features.*, gc1, gc2, A, DataParallel prefixes)."""
    from mlgcn_dist.graph import gen_A

    payload = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=False)
    original = {f"module.{k.replace('backbone.', 'features.', 1).replace('head.', '', 1)}": v
                for k, v in payload["model"].items() if k not in ("head.adj", "head.embeddings")}
    cfg = payload["config"]
    original["module.A"] = torch.from_numpy(gen_A(payload["nums"], payload["adj"], cfg["graph"]["t"],
                                                  cfg["graph"]["p"])).float()
    torch.save({"epoch": 2, "state_dict": original, "best_score": 0.0}, path)
    return path


def test_an_original_mlgcn_checkpoint_evaluates_after_import(run_dir, toy_root, tmp_path):
    """Evaluated with --import-mlgcn, the original layout must score what our own checkpoint scores."""
    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    config = tmp_path / "toy.yaml"
    config.write_text(load_config(REPO / "configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0"]).to_yaml())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--import-mlgcn", "--config", str(config),
                 "--metrics-out", str(a)]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)  # a second in-process evaluation
    assert main(["evaluate", "--checkpoint", str(run_dir / "checkpoints/last.pt"), "--metrics-out", str(b)]) == 0
    assert json.loads(a.read_text())["mAP"] == pytest.approx(json.loads(b.read_text())["mAP"], abs=1e-4)


def test_an_original_checkpoint_imported_with_another_backbone_is_refused_not_half_loaded(run_dir, toy_root,
                                                                                          tmp_path, capsys):
    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    config = tmp_path / "toy.yaml"
    config.write_text(load_config(REPO / "configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0",
                                                              "model.backbone=cifar_resnet18"]).to_yaml())
    assert main(["evaluate", "--checkpoint", str(ckpt), "--import-mlgcn", "--config", str(config)]) == 2
    assert "does not fit model.backbone=cifar_resnet18" in capsys.readouterr().err


@pytest.mark.parametrize("change, hint", [
    ("graph.embeddings={vectors}", "its gc1 takes label vectors of length 12, graph.embeddings={vectors} gives 5: "
                                   "pass the word vectors it was trained with"),
    ("model.gcn_hidden=16", "its GCN's hidden width is 256, model.gcn_hidden=16"),
], ids=["word_vectors", "hidden_width"])
def test_an_original_checkpoint_that_does_not_fit_its_graph_convolution_names_the_key_to_change(
    change, hint, run_dir, toy_root, tmp_path, capsys
):
    """The message named the backbone, which fitted, where the word vectors or the hidden width did not."""
    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    vectors = tmp_path / "vectors.pkl"
    vectors.write_bytes(pickle.dumps(np.ones((12, 5), dtype=np.float32)))
    config = tmp_path / "toy.yaml"
    config.write_text(load_config(REPO / "configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0",
                                                              change.format(vectors=vectors)]).to_yaml())
    assert main(["evaluate", "--checkpoint", str(ckpt), "--import-mlgcn", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert hint.format(vectors=vectors) in err and "resnet101" not in err


def test_our_checkpoint_evaluated_with_a_config_of_another_model_names_the_keys_that_differ(run_dir, capsys):
    """A --config or model.* override of another network than the checkpoint's: torch's load_state_dict traceback."""
    assert main(["evaluate", "--checkpoint", str(run_dir), "model.gcn_hidden=16"]) == 2
    err = capsys.readouterr().err
    assert ("the checkpoint does not fit the model of the config given (model.gcn_hidden=16 (checkpoint: 256)): "
            "evaluate it with its own config") in err and "Traceback" not in err


def test_a_checkpoint_of_another_layout_given_as_an_original_one_is_named(run_dir, toy_root, tmp_path, capsys):
    ckpt = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, ckpt)
    config = tmp_path / "toy.yaml"
    config.write_text(load_config(REPO / "configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0"]).to_yaml())
    assert main(["evaluate", "--checkpoint", str(ckpt), "--import-mlgcn", "--config", str(config)]) == 2
    assert f"{ckpt} (ML-GCN checkpoint): unexpected key 'conv1.weight'" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["junk_checkpoint", "foreign_pickle", "not_an_image"])
def test_bad_files_given_to_evaluate_and_predict_exit_2_with_a_message_naming_them(case, run_dir, toy_root, tmp_path,
                                                                                   capsys):
    junk, image = tmp_path / "junk.pt", sorted((toy_root / "val2014").glob("*.jpg"))[0]
    if case == "junk_checkpoint":
        junk.write_text("not a checkpoint")
    elif case == "foreign_pickle":
        torch.save([1, 2, 3], junk)
    else:
        image = tmp_path / "notes.jpg"
        image.write_text("not an image")
    checkpoint = run_dir if case == "not_an_image" else junk
    named = image if case == "not_an_image" else junk
    commands = [["predict", "--checkpoint", str(checkpoint), str(image)]]
    if case != "not_an_image":
        commands.append(["evaluate", "--checkpoint", str(junk)])
    for command in commands:
        assert main(command) == 2
        err = capsys.readouterr().err
        assert str(named) in err and "Traceback" not in err


def test_an_original_checkpoint_of_another_label_count_is_refused_naming_both_counts(run_dir, toy_root, tmp_path,
                                                                                   capsys):
    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    raw = torch.load(ckpt, weights_only=False)
    raw["state_dict"]["module.A"] = torch.eye(20)  # a VOC-sized graph against the 12-label toy set
    torch.save(raw, ckpt)
    config = tmp_path / "toy.yaml"
    config.write_text(load_config(REPO / "configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0"]).to_yaml())
    assert main(["evaluate", "--checkpoint", str(ckpt), "--import-mlgcn", "--config", str(config)]) == 2
    assert "label graph A is (20, 20), for 20 labels, but the dataset of --config has 12" in capsys.readouterr().err


def test_predict_decides_on_the_logit_as_evaluation_does(run_dir, toy_root, monkeypatch, capsys):
    """sigmoid(-1e-8) rounds to 0.5 in float32: evaluation calls that logit negative, so must predict."""
    names = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["label_names"]
    logits = torch.full((1, len(names)), -1e-8)
    logits[0, 0] = 0.0
    assert float(torch.sigmoid(logits[0, 1])) == 0.5
    monkeypatch.setattr("mlgcn_dist.inference.predict", lambda model, size, paths: (paths, logits, {}))
    image = sorted((toy_root / "val2014").glob("*.jpg"))[0]
    assert main(["predict", "--checkpoint", str(run_dir), "--threshold", "0.5", str(image)]) == 0
    assert f"above 0.50: {names[0]} 0.500\n" in capsys.readouterr().out


def test_predict_lists_exactly_the_labels_at_or_above_the_threshold_given(run_dir, toy_root, monkeypatch, capsys):
    names = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["label_names"]
    probabilities = torch.full((1, len(names)), 0.05)
    probabilities[0, 2], probabilities[0, 5], probabilities[0, 7] = 0.4, 0.35, 0.25  # 0.25: below 0.3
    logits = torch.logit(probabilities)
    monkeypatch.setattr("mlgcn_dist.inference.predict", lambda model, size, paths: (paths, logits, {}))
    image = sorted((toy_root / "val2014").glob("*.jpg"))[0]
    assert main(["predict", "--checkpoint", str(run_dir), "--threshold", "0.3", str(image)]) == 0
    assert f"above 0.30: {names[2]} 0.400, {names[5]} 0.350\n" in capsys.readouterr().out


def test_predict_runs_a_few_images_at_a_time_and_gives_each_the_logits_of_one_run_over_all(run_dir, toy_root):
    """Every file stacked into one batch held them all in memory: thousands of 448 px images would not fit."""
    from mlgcn_dist.config import config_from_dict
    from mlgcn_dist.inference import load_portable, model_from_payload, predict

    payload = load_portable(run_dir / "checkpoints" / "last.pt")
    model = model_from_payload(payload, config_from_dict(payload["config"]))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    paths = [str(p) for p in sorted((toy_root / "val2014").glob("*.jpg"))[:7]]
    read, logits, unreadable = predict(model, 32, paths, batch_size=3)
    assert seen == [3, 3, 1] and read == paths and not unreadable
    _, whole, _ = predict(model, 32, paths, batch_size=len(paths))
    torch.testing.assert_close(logits, whole, atol=1e-5, rtol=1e-5)


def test_predict_names_each_unreadable_image_prints_the_others_and_exits_2(run_dir, toy_root, tmp_path, capsys):
    """PIL's errors for a truncated JPEG ("Truncated File Read") do not name the file."""
    good = sorted((toy_root / "val2014").glob("*.jpg"))[0]
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:500])
    assert main(["predict", "--checkpoint", str(run_dir), str(cut), str(good)]) == 2
    out, err = capsys.readouterr()
    assert f"mlgcn predict: {cut}: not a readable image (" in err and "Traceback" not in err
    assert str(good) in out and "top-3:" in out and str(cut) not in out
    assert main(["predict", "--checkpoint", str(run_dir), str(cut)]) == 2  # nothing readable


@pytest.mark.parametrize("content", [b"hi\n", b"\xff\xd8\xff\xe0 a JPEG header"])
def test_a_checkpoint_path_to_a_text_file_or_an_image_is_named_as_no_checkpoint_at_all(content, tmp_path, capsys):
    """It was refused as a pickle of objects that could run code, with advice to load it unsafely."""
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle" in err
    assert "weights_only=False" not in err


def test_evaluate_from_another_directory_than_trainings_says_how_to_point_at_the_data(run_dir, capsys):
    """A stored config's relative data path gave the reader's missing-annotations error."""
    assert main(["evaluate", "--checkpoint", str(run_dir), "data.root=data/no_such_toy"]) == 2
    err = capsys.readouterr().err
    assert (f"data.root data/no_such_toy does not exist (relative to {Path.cwd()}); run where training ran or pass "
            "data.root=<path>") in err


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_compiled_runs_best_pt_holds_the_bare_models_weight_names_and_evaluates_to_the_map_training_logged(
    backend, toy_root, tmp_path, monkeypatch
):
    """train.compile=true; "eager": wrapped as for Inductor, compiled with dynamo's eager backend (no C++ compile,
    which takes half a minute here). best.pt held the compiled wrapper's names (`_orig_mod.backbone...`), which
    `mlgcn evaluate` refused."""
    from test_distributed import eager_compile_kwargs

    from mlgcn_dist import distributed

    if backend == "eager":
        monkeypatch.setattr(distributed, "_compile_kwargs", eager_compile_kwargs)
    run = train_briefly(toy_root, tmp_path / "compiled", "train.compile=true")
    best = torch.load(run / "checkpoints/best.pt", map_location="cpu", weights_only=True)
    assert best["model"] and not [name for name in best["model"] if name.startswith("_orig_mod.")]
    assert evaluated_map(run, tmp_path) == pytest.approx(best["metrics"]["model"]["mAP"], abs=1e-6)


def test_a_checkpoint_saved_with_the_compiled_wrappers_weight_names_still_evaluates(run_dir, tmp_path):
    """What train.compile=true runs saved before 2026-11-27: every weight named `_orig_mod.<name>`."""
    payload = torch.load(run_dir / "checkpoints/best.pt", map_location="cpu", weights_only=True)
    payload["model"] = {f"_orig_mod.{name}": value for name, value in payload["model"].items()}
    torch.save(payload, tmp_path / "best.pt")
    assert evaluated_map(tmp_path / "best.pt", tmp_path) == pytest.approx(payload["metrics"]["model"]["mAP"],
                                                                          abs=1e-6)


def test_evaluate_and_predict_need_not_the_pretrained_weights_training_started_from(toy_root, tmp_path, capsys):
    """model.pretrained only initialises training (a file of the training machine here; imagenet is a download of
    170 MB): every weight is in the checkpoint. Evaluate and predict rebuilt the backbone with it."""
    initial = tmp_path / "initial.pth"
    torch.save(build_backbone("cifar_resnet_tiny")[0].state_dict(), initial)
    run = train_briefly(toy_root, tmp_path / "run", f"model.pretrained={initial}")
    initial.unlink()
    best = torch.load(run / "checkpoints/best.pt", map_location="cpu", weights_only=True)
    assert evaluated_map(run, tmp_path) == pytest.approx(best["metrics"]["model"]["mAP"], abs=1e-6)
    image = sorted((toy_root / "val2014").glob("*.jpg"))[0]
    assert main(["predict", "--checkpoint", str(run), str(image)]) == 0
    assert "top-3:" in capsys.readouterr().out
