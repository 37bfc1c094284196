"""Specifications of the synthetic toy dataset (real COCO 2014 layout, label co-occurrence with signal)."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mlgcn_dist.data import toy
from mlgcn_dist.data.coco import read_coco
from mlgcn_dist.data.toy import make_toy


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' mask decoding under numpy 2
def test_toy_loads_with_read_coco_and_with_pycocotools(toy_root):
    index = read_coco(toy_root, "train")
    api = COCO(str(toy_root / "annotations" / "instances_train2014.json"))
    assert len(api.getCatIds()) == index.labels.num_classes == 12
    names = {c["id"]: c["name"] for c in api.loadCats(api.getCatIds())}
    for record in index.records[:20]:
        anns = api.loadAnns(api.getAnnIds(imgIds=[record.image_id]))
        assert sorted({names[a["category_id"]] for a in anns}) == [index.labels.names[i] for i in record.labels]
        assert api.annToMask(anns[0]).sum() > 0
    assert len(read_coco(toy_root, "val")) > 0


def test_toy_uses_non_contiguous_coco_ids_and_name_order_differs_from_id_order(toy_root):
    categories = json.loads((toy_root / "annotations" / "instances_val2014.json").read_text())["categories"]
    ids = [c["id"] for c in categories]
    assert ids != list(range(1, len(ids) + 1))
    by_id = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    labels = read_coco(toy_root, "val").labels
    assert labels.names == sorted(by_id) != by_id
    assert len(set(labels.supercategories)) >= 4


def test_toy_file_names_sizes_and_boxes_follow_coco_conventions(toy_root):
    document = json.loads((toy_root / "annotations" / "instances_train2014.json").read_text())
    images = {im["id"]: im for im in document["images"]}
    shapes = set()
    for im in images.values():
        assert im["file_name"] == f"COCO_train2014_{im['id']:012d}.jpg"
        with Image.open(toy_root / "train2014" / im["file_name"]) as pil:
            assert pil.size == (im["width"], im["height"]) and pil.format == "JPEG"
        shapes.add((im["width"], im["height"]))
    assert len(shapes) > 1  # non-square images occur
    for a in document["annotations"]:
        x, y, w, h = a["bbox"]
        im = images[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= im["width"] + 0.01 and y + h <= im["height"] + 0.01
        assert 0 < a["area"] <= w * h + 0.01 and a["iscrowd"] == 0 and len(a["segmentation"][0]) >= 6


def test_toy_unannotated_images_are_dropped_by_default_and_kept_with_keep_empty(toy_root):
    dropped, kept = read_coco(toy_root, "val"), read_coco(toy_root, "val", keep_empty=True)
    assert 1 <= len(dropped.skipped) <= 3
    assert {s["reason"] for s in dropped.skipped} == {"no_annotations"}
    assert len(kept) == len(dropped) + len(dropped.skipped) == 32
    assert sum(1 for r in kept.records if not r.labels) == len(dropped.skipped)


def test_toy_even_a_tiny_split_holds_an_unannotated_image(tmp_path):
    make_toy(tmp_path, train=6, val=3, size=16, seed=0)  # 3% of 6 or 3 images rounds to none
    for split in ("train", "val"):
        assert [s["reason"] for s in read_coco(tmp_path, split).skipped] == ["no_annotations"]


def test_toy_image_and_annotation_ids_are_unique_across_splits_and_images_sorted_by_id(toy_root):
    documents = [json.loads((toy_root / "annotations" / f"instances_{split}2014.json").read_text())
                 for split in ("train", "val")]
    image_ids = [[im["id"] for im in d["images"]] for d in documents]
    assert all(ids == sorted(ids) for ids in image_ids)
    assert not set(image_ids[0]) & set(image_ids[1])
    ann_ids = [a["id"] for d in documents for a in d["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)


def test_toy_image_ids_are_unique_however_many_are_drawn(tmp_path, monkeypatch):
    handed = []  # the ids make_toy hands each split, their images left unpainted
    monkeypatch.setattr(toy, "_write_split", lambda out, split, ids, first_ann_id, painter: handed.extend(ids) or {})
    make_toy(tmp_path, train=20_000, val=10_000)
    assert len(set(handed)) == len(handed) == 30_000 and min(handed) >= 1


def test_toy_annotated_images_show_one_to_four_objects(toy_root):
    document = json.loads((toy_root / "annotations" / "instances_train2014.json").read_text())
    objects = Counter(a["image_id"] for a in document["annotations"])
    assert set(objects.values()) == {1, 2, 3, 4}


def test_toy_is_byte_identical_for_the_same_seed_and_differs_for_another(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = make_toy(tmp_path / "a", train=6, val=3, size=40, seed=3)
    make_toy(tmp_path / "b", train=6, val=3, size=40, seed=3)
    make_toy(tmp_path / "c", train=6, val=3, size=40, seed=4)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    assert a["train"]["images"] == 6 and a["val"]["images"] == 3


def test_toy_label_pairs_cooccur_far_above_and_below_independence(toy_root):
    """Scenes make some pairs much likelier together than apart, so the adjacency carries signal."""
    targets = read_coco(toy_root, "train").targets().astype(float)
    n = len(targets)
    p = targets.mean(0)
    joint = targets.T @ targets / n
    lift = joint / np.outer(p, p)
    np.fill_diagonal(lift, np.nan)
    assert np.nanmax(lift) > 2.0
    assert np.nanmin(lift) < 0.5
    assert targets.sum(1).max() >= 3  # multi-label images


def test_toy_writes_600_images_of_96px_in_a_few_seconds(tmp_path):
    start = time.perf_counter()
    summary = make_toy(tmp_path, train=400, val=200, size=96, seed=1)
    elapsed = time.perf_counter() - start
    assert summary["train"]["images"] == 400 and summary["val"]["images"] == 200
    assert elapsed < 15.0, f"make_toy took {elapsed:.1f} s"
