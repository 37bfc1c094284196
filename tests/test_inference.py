"""`mlgcn evaluate` and `mlgcn predict` on our checkpoints, and evaluation of an original ML-GCN checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from mlgcn_dist.cli import main
from mlgcn_dist.config import load_config
from mlgcn_dist.data.folder import read_split
from mlgcn_dist.data.records import encode_target
from mlgcn_dist.engine import train
from mlgcn_dist.inference import load_portable, resolve_checkpoint
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


def evaluated_map(checkpoint: Path, tmp_path: Path, *args: str) -> float:
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), *args, "--metrics-out", str(out)]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)  # another in-process evaluation may follow
    return json.loads(out.read_text())["mAP"]


def toy_config_file(toy_root: Path, tmp_path: Path, *overrides: str) -> Path:
    """The toy config on ``toy_root`` (with ``overrides``) as a file, for --config: what --import-mlgcn needs."""
    config = tmp_path / "toy.yaml"
    config.write_text(load_config(REPO / "configs/toy.yaml", [f"data.root={toy_root}", "data.workers=0",
                                                              *overrides]).to_yaml())
    return config


def imported_map(original: Path, toy_root: Path, tmp_path: Path) -> float:
    """The mAP of an original ML-GCN checkpoint evaluated with --import-mlgcn on the toy config."""
    return evaluated_map(original, tmp_path, "--import-mlgcn", "--config", str(toy_config_file(toy_root, tmp_path)))


def edited_checkpoint(source: Path, path: Path, edit) -> Path:
    """``source`` saved at ``path`` after ``edit(payload)``."""
    payload = torch.load(source, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def run_dir(toy_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("infer") / "run"
    train(load_config(REPO / "configs/toy.yaml", [
        f"data.root={toy_root}", "data.workers=0", "data.batch_size=8", "train.epochs=2", "train.resume=none",
        f"train.output_dir={out}", "log.wandb=disabled", "train.ema_decay=0.9",
    ]))
    return out


def test_evaluate_prints_the_metrics_table_and_per_class_ap_and_matches_training(run_dir, toy_root, tmp_path,
                                                                                capsys):
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
    assert f"images evaluated: {metrics['num_images']} (duplicates removed: 0)\n" in out
    for name, ap in zip(best["label_names"], metrics["ap"]):
        line = f"  {name:20s} {ap:6.2f}" if ap is not None else f"  {name:20s}    n/a (no positive)"
        assert line + "\n" in out
    index = read_split("coco", toy_root, "val")
    targets = {r.image_id: encode_target(r.labels, r.difficult, 12).tolist() for r in index.records}
    lines = [json.loads(line) for line in scores_out.read_text().splitlines()]
    assert len(lines) == metrics["num_images"] == len(targets)
    assert {line["image_id"]: line["target"] for line in lines} == targets
    assert all(len(line["scores"]) == 12 for line in lines)


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


def test_a_run_directory_gives_its_best_pt_from_checkpoints_or_beside_it_and_says_when_it_holds_none(
    run_dir, tmp_path, capsys
):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(run_dir / "checkpoints/best.pt", flat / "best.pt")
    assert resolve_checkpoint(flat) == flat / "best.pt"
    assert main(["predict", "--checkpoint", str(tmp_path / "flat" / "nothing"), "x.jpg"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--checkpoint", str(empty), "x.jpg"]) == 2
    assert f"{empty}: no checkpoints/best.pt or last.pt in this directory" in capsys.readouterr().err


class _RunsCodeAsItLoads:
    """What a tampered checkpoint can hold: unpickled, it calls any function it names (here os.mkdir)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_that_would_run_code_as_it_loads_is_refused_without_running_it(tmp_path, capsys):
    marker, path = tmp_path / "ran", tmp_path / "best.pt"
    torch.save({"model": _RunsCodeAsItLoads(marker), "config": {}, "label_names": []}, path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds objects beyond tensors, containers and numbers, which could run code" in err
    assert not marker.exists()


def test_a_checkpoint_in_torch_saves_older_pickle_format_loads(tmp_path):
    payload = {"model": {"w": torch.ones(2)}, "config": {}, "label_names": ["cat"]}
    torch.save(payload, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded = load_portable(tmp_path / "old.pt")
    assert torch.equal(loaded["model"]["w"], torch.ones(2)) and loaded["label_names"] == ["cat"]


def test_ema_weights_of_a_checkpoint_trained_without_an_ema_are_refused_naming_the_other_choice(
    run_dir, tmp_path, capsys
):
    path = edited_checkpoint(run_dir / "checkpoints/last.pt", tmp_path / "last.pt",
                             lambda payload: payload.update(ema=None))
    assert main(["evaluate", "--checkpoint", str(path), "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert "holds no EMA weights (trained with train.ema_decay=0); use --weights model" in err


def test_a_checkpoint_whose_labels_come_in_another_order_than_the_datasets_is_refused(run_dir, tmp_path,
                                                                                      capsys):
    """Same names, same count: every score would be reported under another label's name."""
    path = edited_checkpoint(run_dir / "checkpoints/last.pt", tmp_path / "last.pt",
                             lambda payload: payload["label_names"].reverse())
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint was trained on the dataset's 12 labels in another order (label 0 is " in err


def test_evaluate_runs_at_this_machines_precision_and_without_the_deepspeed_json_training_used(run_dir,
                                                                                               tmp_path):
    """A run trained in fp16 under DeepSpeed on GPUs evaluates here, on a CPU, with plain Accelerate (its
    DeepSpeed JSON, a file of the training machine, is not read)."""

    def trained_elsewhere(payload: dict) -> None:
        payload["config"]["train"].update(precision="fp16", deepspeed=str(tmp_path / "gone" / "zero2.json"))

    path = edited_checkpoint(run_dir / "checkpoints/best.pt", tmp_path / "best.pt", trained_elsewhere)
    logged = torch.load(path, map_location="cpu", weights_only=True)["metrics"]["model"]["mAP"]
    assert evaluated_map(path, tmp_path) == pytest.approx(logged, abs=1e-6)


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
    imported = imported_map(ckpt, toy_root, tmp_path)
    assert imported == pytest.approx(evaluated_map(run_dir / "checkpoints/last.pt", tmp_path), abs=1e-4)


def test_an_original_checkpoints_own_label_graph_replaces_the_one_from_the_statistics(run_dir, toy_root,
                                                                                      tmp_path):
    """ML-GCN's A may be learned or fixed otherwise: evaluated as ours whose graph is that A, normalised."""
    from mlgcn_dist.graph import gen_adj

    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    raw = torch.load(ckpt, weights_only=False)
    raw["state_dict"]["module.A"] = torch.eye(12) + 0.5 * torch.ones(12, 12)
    torch.save(raw, ckpt)
    imported = imported_map(ckpt, toy_root, tmp_path)
    ours = edited_checkpoint(run_dir / "checkpoints/last.pt", tmp_path / "last.pt", lambda payload: payload[
        "model"].update({"head.adj": gen_adj(raw["state_dict"]["module.A"])}))
    with_that_graph = evaluated_map(ours, tmp_path)
    assert imported == pytest.approx(with_that_graph, abs=1e-4)
    from_statistics = evaluated_map(run_dir / "checkpoints/last.pt", tmp_path)
    assert with_that_graph != pytest.approx(from_statistics, abs=1e-4)  # the graph matters


def test_an_original_checkpoint_imported_with_another_backbone_is_refused_not_half_loaded(run_dir, toy_root,
                                                                                          tmp_path, capsys):
    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    config = toy_config_file(toy_root, tmp_path, "model.backbone=cifar_resnet18")
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
    config = toy_config_file(toy_root, tmp_path, change.format(vectors=vectors))
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
    config = toy_config_file(toy_root, tmp_path)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--import-mlgcn", "--config", str(config)]) == 2
    assert f"{ckpt} (ML-GCN checkpoint): unexpected key 'conv1.weight'" in capsys.readouterr().err


@pytest.mark.parametrize(("case", "says"), [
    ("junk_checkpoint", "not a PyTorch checkpoint"),
    ("foreign_pickle", "not an mlgcn-dist checkpoint (holds a list, not a dict)"),
    ("checkpoint_cut_short", "not a readable PyTorch checkpoint"),  # torch.load: a bare OSError, no name
    ("not_an_image", "not a readable image"),
])
def test_bad_files_given_to_evaluate_and_predict_exit_2_with_a_message_naming_them(
    case, says, run_dir, toy_root, tmp_path, capsys
):
    junk, image = tmp_path / "junk.pt", sorted((toy_root / "val2014").glob("*.jpg"))[0]
    if case == "junk_checkpoint":
        junk.write_text("not a checkpoint")
    elif case == "foreign_pickle":
        torch.save([1, 2, 3], junk)
    elif case == "checkpoint_cut_short":
        torch.save({"model": {"w": torch.ones(1000)}}, junk)
        junk.write_bytes(junk.read_bytes()[:-30])
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
        assert str(named) in err and says in err and "Traceback" not in err


@pytest.mark.parametrize(("flags", "says"), [
    ([], "not an mlgcn-dist checkpoint (missing model, config, label_names); for a checkpoint of the "
         "original ML-GCN code pass --import-mlgcn"),
    (["--import-mlgcn"], "--import-mlgcn needs --config (the original checkpoint stores no configuration)"),
], ids=["without_import_mlgcn", "without_config"])
def test_an_original_checkpoint_evaluated_without_what_it_needs_says_what_to_pass(flags, says, run_dir,
                                                                                  tmp_path, capsys):
    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    assert main(["evaluate", "--checkpoint", str(ckpt), *flags]) == 2
    assert says in capsys.readouterr().err


def test_an_original_checkpoint_of_another_label_count_is_refused_naming_both_counts(run_dir, toy_root, tmp_path,
                                                                                   capsys):
    ckpt = original_mlgcn_checkpoint(run_dir, tmp_path / "model_best.pth.tar")
    raw = torch.load(ckpt, weights_only=False)
    raw["state_dict"]["module.A"] = torch.eye(20)  # a VOC-sized graph against the 12-label toy set
    torch.save(raw, ckpt)
    config = toy_config_file(toy_root, tmp_path)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--import-mlgcn", "--config", str(config)]) == 2
    assert "label graph A is (20, 20), for 20 labels, but the dataset of --config has 12" in capsys.readouterr().err


def printed_prediction(logits: torch.Tensor, flags: list[str], run_dir, toy_root, monkeypatch, capsys) -> str:
    """What ``mlgcn predict`` prints for one image whose model gives ``logits`` [1, C]."""
    monkeypatch.setattr("mlgcn_dist.inference.predict", lambda model, size, paths: (paths, logits, {}))
    image = sorted((toy_root / "val2014").glob("*.jpg"))[0]
    assert main(["predict", "--checkpoint", str(run_dir), *flags, str(image)]) == 0
    return capsys.readouterr().out


def label_names(run_dir: Path) -> list[str]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["label_names"]


def test_predict_decides_on_the_logit_as_evaluation_does(run_dir, toy_root, monkeypatch, capsys):
    """sigmoid(-1e-8) rounds to 0.5 in float32: evaluation calls that logit negative, so must predict."""
    names = label_names(run_dir)
    logits = torch.full((1, len(names)), -1e-8)
    logits[0, 0] = 0.0
    assert float(torch.sigmoid(logits[0, 1])) == 0.5
    out = printed_prediction(logits, ["--threshold", "0.5"], run_dir, toy_root, monkeypatch, capsys)
    assert f"above 0.50: {names[0]} 0.500\n" in out


def test_predict_lists_exactly_the_labels_at_or_above_the_threshold_given(run_dir, toy_root, monkeypatch, capsys):
    names = label_names(run_dir)
    probabilities = torch.full((1, len(names)), 0.05)
    probabilities[0, 2], probabilities[0, 5], probabilities[0, 7] = 0.4, 0.35, 0.25  # 0.25: below 0.3
    logits = torch.logit(probabilities)
    out = printed_prediction(logits, ["--threshold", "0.3"], run_dir, toy_root, monkeypatch, capsys)
    assert f"above 0.30: {names[2]} 0.400, {names[5]} 0.350\n" in out


@pytest.mark.parametrize(("threshold", "listed"), [("0", 12), ("1", 0)])
def test_predict_at_threshold_0_lists_every_label_and_at_1_none(threshold, listed, run_dir, toy_root,
                                                                 monkeypatch, capsys):
    logits = torch.linspace(-30, 30, 12)[None]  # probabilities from ~0 to ~1, neither reached
    out = printed_prediction(logits, ["--threshold", threshold], run_dir, toy_root, monkeypatch, capsys)
    above = out.split("above ")[1].split("\n")[0].split(": ", 1)[1]
    assert (above.count(",") + 1 if above != "none" else 0) == listed


def test_predict_top_k_beyond_the_label_count_lists_every_label_most_probable_first(run_dir, toy_root,
                                                                                    monkeypatch, capsys):
    names = label_names(run_dir)
    logits = torch.linspace(-3, 3, 12)[None]
    out = printed_prediction(logits, ["--top-k", "50"], run_dir, toy_root, monkeypatch, capsys)
    top = out.split("top-50: ")[1].splitlines()[0].split(", ")
    assert [entry.split()[0] for entry in top] == names[::-1]


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


def test_predict_gives_the_models_logits_for_the_whole_image_resized_and_normalised(run_dir, toy_root):
    """The evaluation transform: no random crop or flip, the ImageNet normalisation of training."""
    from PIL import Image

    from mlgcn_dist.config import config_from_dict
    from mlgcn_dist.data.transforms import CpuTransform, normalise
    from mlgcn_dist.inference import model_from_payload, predict

    payload = load_portable(run_dir / "checkpoints" / "last.pt")
    model = model_from_payload(payload, config_from_dict(payload["config"]))
    paths = [str(p) for p in sorted((toy_root / "val2014").glob("*.jpg"))[:2]]
    _, logits, _ = predict(model, 32, paths)
    with torch.no_grad():
        for path, got in zip(paths, logits):
            with Image.open(path) as img:
                pixels = CpuTransform(32, train=False)(img.convert("RGB"), random.Random())
            torch.testing.assert_close(got, model(normalise(pixels[None]))[0], atol=1e-5, rtol=1e-5)


def test_predict_names_each_unreadable_image_prints_the_others_and_exits_2(run_dir, toy_root, tmp_path, capsys):
    """PIL's errors for a truncated JPEG ("Truncated File Read") do not name the file."""
    good = sorted((toy_root / "val2014").glob("*.jpg"))[0]
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:500])
    assert main(["predict", "--checkpoint", str(run_dir), str(cut), str(good)]) == 2
    out, err = capsys.readouterr()
    assert f"mlgcn predict: {cut}: not a readable image (Truncated File Read)" in err
    assert "Traceback" not in err
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
