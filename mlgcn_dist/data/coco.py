"""Reader of the COCO 2014 layout: ``root/annotations/instances_{split}2014.json`` and ``root/{split}2014/*.jpg``.

Label order is the category names in plain Python sort order, as ML-GCN built its category.json (its adjacency
and word-vector pickles are in that order), not COCO's category_id order. Every annotation counts, crowd ones
included, as in ML-GCN. The json is parsed with the json module: pycocotools' index is not needed for labels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlgcn_dist.data.records import ImageRecord, LabelSpace, SplitIndex


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation json, image folder) of ``split`` (train | val) under a COCO 2014 root."""
    root = Path(root)
    return root / "annotations" / f"instances_{split}2014.json", root / f"{split}2014"


def coco_label_space(categories: list[dict], source: str | Path = "categories") -> tuple[LabelSpace, dict[int, int]]:
    """The label space of COCO ``categories`` (names sorted) and the map category_id -> label index."""
    ids = [_field(c, "id", source, "a category", int) for c in categories]
    names = [_field(c, "name", source, "a category", str) for c in categories]
    supers = [_field(c, "supercategory", source, "a category", str) for c in categories]
    if len(set(names)) != len(names) or len(set(ids)) != len(ids):
        raise ValueError(f"{source}: 'categories' repeats a name or an id; each must be unique")
    order = sorted(range(len(names)), key=names.__getitem__)
    labels = LabelSpace(names=[names[i] for i in order], supercategories=[supers[i] for i in order])
    return labels, {ids[i]: index for index, i in enumerate(order)}


def read_coco(root: str | Path, split: str, keep_empty: bool = False) -> SplitIndex:
    """Index one COCO 2014 split; images without annotations are skipped unless ``keep_empty``."""
    json_path, image_dir = coco_paths(root, split)
    for path in (json_path, image_dir):
        if not path.exists():
            raise FileNotFoundError(f"COCO {split} split: {path} does not exist (expected the COCO 2014 layout)")
    data = _load_json(json_path)
    labels, label_of = coco_label_space(data["categories"], json_path)
    images = {_field(im, "id", json_path, "an image", int): im for im in data["images"]}
    if len(images) != len(data["images"]):
        raise ValueError(f"{json_path}: 'images' repeats an id; image ids must be unique")
    present = _labels_per_image(data["annotations"], images, label_of, json_path)
    on_disk = set(os.listdir(image_dir))  # one listing, not a stat per image (COCO train has 83k files)
    records, skipped = [], []
    for image_id, im in images.items():
        file_name = _field(im, "file_name", json_path, "an image", str)
        found = present.get(image_id, set())
        if file_name not in on_disk or not (found or keep_empty):
            reason = "missing_file" if file_name not in on_disk else "no_annotations"
            skipped.append({"image_id": image_id, "file_name": file_name, "reason": reason})
            continue
        records.append(
            ImageRecord(
                image_id=image_id,
                file_name=file_name,
                path=str((image_dir / file_name).absolute()),
                width=_field(im, "width", json_path, "an image", int),
                height=_field(im, "height", json_path, "an image", int),
                labels=tuple(sorted(found)),
            )
        )
    return SplitIndex(dataset="coco", split=split, labels=labels, records=records, skipped=skipped)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing key '{key}' (a list) of the COCO instances format")
    return data


def _labels_per_image(
    annotations: list[dict], images: dict[int, dict], label_of: dict[int, int], source: Path
) -> dict[int, set[int]]:
    present: dict[int, set[int]] = {}
    for ann in annotations:
        image_id = _field(ann, "image_id", source, "an annotation", int)
        category_id = _field(ann, "category_id", source, "an annotation", int)
        if image_id not in images:
            raise ValueError(f"{source}: annotation {ann.get('id')} has 'image_id' {image_id} not in 'images'")
        if category_id not in label_of:
            raise ValueError(
                f"{source}: annotation {ann.get('id')} has 'category_id' {category_id} not in 'categories'"
            )
        present.setdefault(image_id, set()).add(label_of[category_id])
    return present


def _field(entry: Any, key: str, source: str | Path, what: str, kind: type) -> Any:
    """``entry[key]`` if it is a ``kind``, or a ValueError naming the file and the missing or mistyped key."""
    try:
        value = entry[key]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"{source}: {what} lacks key '{key}': {str(entry)[:200]}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{source}: {what} has '{key}' = {value!r:.100}, expected {kind.__name__}")
    return value
