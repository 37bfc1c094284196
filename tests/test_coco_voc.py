"""Specifications of the COCO 2014 and VOC2007 readers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import declare_huge_size, reference_dir
from PIL import Image

from mlgcn_dist.data.coco import coco_label_space, read_coco
from mlgcn_dist.data.voc import VOC_CLASSES, read_voc

REFERENCE_README = reference_dir() / "README.txt"
# The 80 COCO 2014 categories in category_id order (ids 1..90 with gaps), as instances_*2014.json lists them.
COCO_NAMES_BY_ID = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant - stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe - backpack umbrella - - handbag tie suitcase "
    "frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle - "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair "
    "couch potted_plant bed - dining_table - - toilet - tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator - book clock vase scissors teddy_bear hair_drier toothbrush"
).split()


def write_coco(root: Path, split: str, images: list[dict], annotations: list[dict], files=None) -> Path:
    """A COCO 2014 layout with the given json entries; ``files`` (default: every image) exist as tiny JPEGs."""
    categories = [
        {"id": 18, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
        {"id": 44, "name": "bottle", "supercategory": "kitchen"},
    ]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2014").mkdir(parents=True, exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(document))
    for name in files if files is not None else [im["file_name"] for im in images]:
        Image.new("RGB", (8, 6)).save(root / f"{split}2014" / name)
    return root


def image(i: int) -> dict:
    return {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 8, "height": 6}


def ann(i: int, image_id: int, category_id: int) -> dict:
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": [0, 0, 1, 1], "iscrowd": 0}


# ---------------------------------------------------------------- COCO


def test_read_coco_orders_labels_by_name_and_maps_category_ids(tmp_path):
    root = write_coco(tmp_path, "val", [image(7), image(3)], [ann(1, 7, 18), ann(2, 7, 44), ann(3, 3, 3)])
    index = read_coco(root, "val")
    assert index.labels.names == ["bottle", "car", "dog"]
    assert index.labels.supercategories == ["kitchen", "vehicle", "animal"]
    assert {r.image_id: r.labels for r in index.records} == {7: (0, 2), 3: (1,)}
    assert index.targets().tolist() == [[1, 0, 1], [0, 1, 0]]
    assert all(Path(r.path).is_file() and r.width == 8 and r.height == 6 for r in index.records)


def test_read_coco_drops_unannotated_images_unless_keep_empty(tmp_path):
    root = write_coco(tmp_path, "val", [image(1), image(2)], [ann(1, 1, 3)])
    dropped = read_coco(root, "val")
    assert [r.image_id for r in dropped.records] == [1]
    assert dropped.skipped == [{"image_id": 2, "file_name": image(2)["file_name"], "reason": "no_annotations"}]
    kept = read_coco(root, "val", keep_empty=True)
    assert [r.labels for r in kept.records] == [(1,), ()] and kept.skipped == []
    assert kept.targets()[1].tolist() == [0, 0, 0]


def test_read_coco_split_without_an_annotated_image_has_no_records_and_targets_of_every_label(tmp_path):
    index = read_coco(write_coco(tmp_path, "val", [image(1), image(2)], []), "val")
    assert len(index) == 0 and len(index.skipped) == 2
    assert index.targets().shape == (0, 3)  # label statistics of it are zeros, not a shape error


def test_read_coco_counts_image_with_missing_file_as_skip(tmp_path):
    files = [image(1)["file_name"]]
    root = write_coco(tmp_path, "val", [image(1), image(2)], [ann(1, 1, 3), ann(2, 2, 18)], files=files)
    index = read_coco(root, "val")
    assert [r.image_id for r in index.records] == [1]
    assert [(s["image_id"], s["reason"]) for s in index.skipped] == [(2, "missing_file")]


@pytest.mark.parametrize("missing", ["annotations/instances_val2014.json", "val2014"])
def test_read_coco_missing_json_or_image_folder_names_the_path(tmp_path, missing):
    root = write_coco(tmp_path, "val", [image(1)], [ann(1, 1, 3)])
    target = root / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(target))):
        read_coco(root, "val")


@pytest.mark.parametrize("damage", ["deleted", "not_a_list"])
@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_read_coco_json_without_a_top_level_list_names_file_and_key(tmp_path, key, damage):
    root = write_coco(tmp_path, "val", [image(1)], [ann(1, 1, 3)])
    path = root / "annotations" / "instances_val2014.json"
    document = json.loads(path.read_text())
    if damage == "deleted":
        del document[key]
    else:  # an object keyed by position: iterating it would give its keys, not its entries
        document[key] = dict(enumerate(document[key]))
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=rf"instances_val2014\.json.*'{key}'"):
        read_coco(root, "val")


@pytest.mark.parametrize(("bad", "key"), [(ann(1, 99, 3), "image_id"), (ann(1, 1, 5), "category_id")])
def test_read_coco_annotation_with_unknown_image_or_category_names_file_and_key(tmp_path, bad, key):
    root = write_coco(tmp_path, "val", [image(1)], [bad])
    with pytest.raises(ValueError, match=rf"instances_val2014\.json.*'{key}'"):
        read_coco(root, "val")


def test_read_coco_annotation_without_category_names_the_key(tmp_path):
    root = write_coco(tmp_path, "val", [image(1)], [{"id": 1, "image_id": 1}])
    with pytest.raises(ValueError, match=r"instances_val2014\.json: an annotation lacks key 'category_id'"):
        read_coco(root, "val")


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "not valid JSON"),
    (b'{"images": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
    (b"[]", "expected a JSON object"),
])
def test_read_coco_invalid_json_is_a_value_error_naming_the_file(tmp_path, content, message):
    root = write_coco(tmp_path, "val", [image(1)], [ann(1, 1, 3)])
    (root / "annotations" / "instances_val2014.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"instances_val2014\.json: {message}"):
        read_coco(root, "val")


@pytest.mark.parametrize(("entry", "message"), [
    (7, "an image lacks key 'id'"),
    ({**image(1), "id": True}, "an image has 'id' = True, expected int"),
    ({**image(1), "width": "8"}, "an image has 'width' = '8', expected int"),
    ({**image(1), "file_name": None}, "an image has 'file_name' = None, expected str"),
])
def test_read_coco_image_that_is_no_object_or_has_a_mistyped_field_names_file_and_key(tmp_path, entry, message):
    root = write_coco(tmp_path, "val", [entry], [ann(1, 1, 3)], files=[image(1)["file_name"]])
    with pytest.raises(ValueError, match=rf"instances_val2014\.json: {re.escape(message)}"):
        read_coco(root, "val")


def test_read_coco_images_repeating_an_id_are_an_error_not_silently_merged(tmp_path):
    twin = {**image(2), "id": 1}
    root = write_coco(tmp_path, "val", [image(1), twin], [ann(1, 1, 3)])
    with pytest.raises(ValueError, match=r"instances_val2014\.json: 'images' repeats an id"):
        read_coco(root, "val")


@pytest.mark.parametrize("repeated", ["name", "id"])
def test_coco_categories_repeating_a_name_or_an_id_are_an_error(repeated):
    dog, car = {"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 3, "name": "car", "supercategory": "vehicle"}
    with pytest.raises(ValueError, match="'categories' repeats a name or an id"):
        coco_label_space([dog, {**car, repeated: dog[repeated]}], "instances_val2014.json")


def test_coco_label_order_matches_mlgcn_reference_order():
    """Sorting the real 80 category names reproduces the row order of ML-GCN's adjacency and GloVe pickles."""
    if not REFERENCE_README.is_file():
        pytest.skip("ML-GCN reference README not available")
    text = REFERENCE_README.read_text()
    block = text[text.index("Index order:") : text.index("(NOT the COCO")]
    reference = [m.group(2).strip() for m in re.finditer(r"(\d+) ([a-z ]+?)(?=,|\n|$)", block)]
    categories = [
        {"id": i, "name": name.replace("_", " "), "supercategory": "any"}
        for i, name in enumerate(COCO_NAMES_BY_ID, 1)
        if name != "-"
    ]
    labels, label_of = coco_label_space(categories)
    assert len(reference) == 80
    assert labels.names == reference
    assert labels.names[label_of[1]] == "person" and label_of[1] == 49  # argmax of the reference 'nums'


# ---------------------------------------------------------------- VOC


def test_read_voc_maps_flags_to_present_difficult_and_absent(voc_root, voc_labels):
    index = read_voc(voc_root, "trainval")
    assert index.labels.names == list(VOC_CLASSES)
    expected = voc_labels["trainval"]
    assert [f"{r.image_id:06d}" for r in index.records] == list(expected)
    for record in index.records:
        present, difficult = expected[f"{record.image_id:06d}"]
        assert [VOC_CLASSES[i] for i in record.labels] == sorted(present, key=VOC_CLASSES.index)
        assert [VOC_CLASSES[i] for i in record.difficult] == list(difficult)
    targets = index.targets()
    assert targets[0, VOC_CLASSES.index("chair")] == 1 and targets[0, VOC_CLASSES.index("pottedplant")] == -1
    assert (targets[0] == 0).sum() == 18


def test_read_voc_reads_image_size_from_the_jpeg_header(voc_root):
    for record in read_voc(voc_root, "test").records:
        with Image.open(record.path) as im:
            assert (record.width, record.height) == im.size


def test_read_voc_accepts_root_pointing_at_voc2007(voc_root):
    direct = read_voc(voc_root / "VOCdevkit" / "VOC2007", "test")
    assert direct.records == read_voc(voc_root, "test").records


def test_voc_supercategories_group_the_20_classes_into_four(voc_root):
    labels = read_voc(voc_root, "test").labels
    groups = dict(zip(labels.names, labels.supercategories))
    assert set(groups.values()) == {"person", "animal", "vehicle", "indoor"}
    members = {group: [name for name in labels.names if groups[name] == group] for group in set(groups.values())}
    assert members == {
        "person": ["person"],
        "animal": ["bird", "cat", "cow", "dog", "horse", "sheep"],
        "vehicle": ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"],
        "indoor": ["bottle", "chair", "diningtable", "pottedplant", "sofa", "tvmonitor"],
    }


def test_label_groups_are_numbered_in_order_of_first_appearance(voc_root):
    labels = read_voc(voc_root, "test").labels  # aeroplane (vehicle), bird (animal), bottle (indoor), ... person
    number = {"vehicle": 0, "animal": 1, "indoor": 2, "person": 3}
    assert labels.groups() == [number[s] for s in labels.supercategories]


def test_voc_class_order_matches_mlgcn_reference():
    if not REFERENCE_README.is_file():
        pytest.skip("ML-GCN reference README not available")
    line = re.search(r"VOC: (.*?) \(the standard", REFERENCE_README.read_text(), re.S).group(1)
    assert list(VOC_CLASSES) == [n.strip() for n in line.replace("\n", " ").split(",")]


def test_read_voc_missing_class_file_names_the_path(tmp_path, voc_writer, voc_labels):
    root = voc_writer(tmp_path, {"test": voc_labels["test"]})
    (root / "VOCdevkit/VOC2007/ImageSets/Main/sofa_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"sofa_test\.txt"):
        read_voc(root, "test")


def test_read_voc_without_layout_names_both_candidate_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VOCdevkit/VOC2007/ImageSets/Main"):
        read_voc(tmp_path, "test")


@pytest.mark.parametrize("line", ["000001 2", "000001", "000001 1 extra"])
def test_read_voc_malformed_line_names_file_and_line(tmp_path, voc_writer, voc_labels, line):
    root = voc_writer(tmp_path, {"test": voc_labels["test"]})
    path = root / "VOCdevkit/VOC2007/ImageSets/Main/dog_test.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([line, *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"dog_test\.txt:1: expected"):
        read_voc(root, "test")


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("cat", lambda text: text.replace("000006", "000099"), r"cat_test\.txt:4: image id '000099' is .* not in"),
    ("cat", lambda text: text.replace("000006", "000001"), r"cat_test\.txt:4: image id '000001' is repeated"),
    ("tvmonitor", lambda text: "".join(text.splitlines(True)[:-1]),
     r"tvmonitor_test\.txt: lists 3 image ids, aeroplane_test\.txt lists 4"),
])
def test_read_voc_class_files_listing_different_ids_is_an_error_naming_the_file(
    tmp_path, voc_writer, voc_labels, name, edit, message
):
    """Another, a repeated or a missing id would shift the flags of the classes after it onto the wrong image."""
    root = voc_writer(tmp_path, {"test": voc_labels["test"]})
    path = root / f"VOCdevkit/VOC2007/ImageSets/Main/{name}_test.txt"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=message):
        read_voc(root, "test")


def test_read_voc_ignores_blank_lines_in_a_class_file(tmp_path, voc_writer, voc_labels, voc_root):
    root = voc_writer(tmp_path, {"test": voc_labels["test"]})
    path = root / "VOCdevkit/VOC2007/ImageSets/Main/dog_test.txt"
    path.write_text("\n" + path.read_text().replace("\n", "\n  \n") + "\n")
    assert np.array_equal(read_voc(root, "test").targets(), read_voc(voc_root, "test").targets())


@pytest.mark.parametrize("unreadable", ["garbage", "huge"])
def test_read_voc_missing_or_unreadable_jpeg_is_a_counted_skip(tmp_path, voc_writer, voc_labels, unreadable):
    """Unreadable: not an image, or a header declaring more pixels than PIL opens (DecompressionBombError)."""
    root = voc_writer(tmp_path, {"test": voc_labels["test"]})
    images = root / "VOCdevkit/VOC2007/JPEGImages"
    (images / "000002.jpg").unlink()
    if unreadable == "huge":
        declare_huge_size(images / "000004.jpg")
    else:
        (images / "000004.jpg").write_bytes(b"not an image")
    index = read_voc(root, "test")
    assert [r.image_id for r in index.records] == [1, 6]
    assert [(s["image_id"], s["reason"]) for s in index.skipped] == [(2, "missing_file"), (4, "unreadable")]
    assert np.array_equal(index.targets()[:, VOC_CLASSES.index("dog")], [1, 0])
