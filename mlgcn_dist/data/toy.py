"""A small synthetic multi-label dataset written in the real COCO 2014 layout, for tests and smoke runs.

Each image shows 1-4 objects; a class is recognisable from its shape, colour and texture. Images belong to a
"scene" that makes some classes likely together (street: car, bus, bicycle ...; kitchen: cup, bowl, bottle ...),
so the label co-occurrence graph carries real signal, as COCO's does. Category ids and names are real COCO ones
(non-contiguous ids, name order != id order), and about 3% of the images have no annotation at all, as in COCO.
The same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (COCO category id, name, supercategory, shape, RGB colour, texture)
CATEGORIES = (
    (1, "person", "person", "star", (230, 60, 60), "solid"),
    (2, "bicycle", "vehicle", "circle", (40, 120, 230), "stripes"),
    (3, "car", "vehicle", "wide_bar", (240, 200, 30), "solid"),
    (6, "bus", "vehicle", "square", (250, 130, 20), "checker"),
    (16, "bird", "animal", "triangle", (60, 200, 90), "solid"),
    (17, "cat", "animal", "diamond", (170, 80, 220), "dots"),
    (18, "dog", "animal", "pentagon", (140, 90, 40), "stripes"),
    (44, "bottle", "kitchen", "tall_bar", (30, 200, 200), "checker"),
    (47, "cup", "kitchen", "hexagon", (240, 240, 240), "dots"),
    (51, "bowl", "kitchen", "trapezoid", (230, 110, 170), "solid"),
    (62, "chair", "furniture", "cross", (120, 120, 250), "checker"),
    (63, "couch", "furniture", "chevron", (20, 90, 60), "dots"),
)
# scene -> (background RGB, {category name: relative weight of drawing it})
SCENES = {
    "street": ((110, 110, 115), {"car": 3, "bus": 2, "bicycle": 2, "person": 2, "bird": 0.5}),
    "home": ((150, 120, 90), {"couch": 3, "chair": 2, "cat": 2.5, "dog": 1.5, "person": 1}),
    "kitchen": ((190, 180, 160), {"cup": 3, "bowl": 3, "bottle": 2.5, "chair": 1, "person": 1}),
    "park": ((70, 130, 60), {"dog": 3, "bird": 2.5, "bicycle": 1.5, "person": 2}),
}
STRAY_CLASS_P = 0.1  # chance that an object is any class, whatever the scene
EMPTY_FRACTION = 0.03
ASPECTS = ((1.0, 1.0), (1.0, 0.75), (0.75, 1.0))  # (width, height) factors of `size`
ASPECT_P = (0.6, 0.25, 0.15)
SPLITS = ("train", "val")


def _regular(n: int, start: float, inner: float = 1.0) -> list[tuple[float, float]]:
    """``n`` vertices around the unit circle from angle ``start``; odd ones at radius ``inner`` (a star if < 1)."""
    radii = [1.0 if k % 2 == 0 else inner for k in range(n)]
    angles = [start + 2 * math.pi * k / n for k in range(n)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at 0, within the unit circle."""
    regular = {
        "circle": (20, 0.0),
        "triangle": (3, -math.pi / 2),
        "square": (4, math.pi / 4),
        "diamond": (4, 0.0),
        "pentagon": (5, -math.pi / 2),
        "hexagon": (6, 0.0),
    }
    if shape in regular:
        return _regular(*regular[shape])
    if shape == "star":
        return _regular(10, -math.pi / 2, inner=0.45)
    outlines = {
        "wide_bar": [(-1, -0.45), (1, -0.45), (1, 0.45), (-1, 0.45)],
        "tall_bar": [(-0.4, -1), (0.4, -1), (0.4, 1), (-0.4, 1)],
        "trapezoid": [(-1, 0.6), (1, 0.6), (0.5, -0.6), (-0.5, -0.6)],
        "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                  (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
        "chevron": [(-1, -0.8), (0, 0), (1, -0.8), (1, 0), (0, 0.8), (-1, 0)],
    }
    radius = max(math.hypot(x, y) for x, y in outlines[shape])  # fit the unit circle, so rotation stays inside
    return [(x / radius, y / radius) for x, y in outlines[shape]]


def _texture(name: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Boolean [H, W] pattern: True where the object shows its full colour, False where a darker shade."""
    if name == "stripes":
        return (xx + yy) // 4 % 2 == 0
    if name == "checker":
        return (xx // 5 + yy // 5) % 2 == 0
    if name == "dots":
        return (xx % 6 - 3) ** 2 + (yy % 6 - 3) ** 2 > 4
    return np.ones_like(xx, dtype=bool)


class _Painter:
    """Draws scenes and returns their COCO annotations; holds the one random generator so output is seeded."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.names = [c[1] for c in CATEGORIES]
        self.polygons = {c[1]: _unit_polygon(c[3]) for c in CATEGORIES}

    def image_shape(self) -> tuple[int, int]:
        fw, fh = ASPECTS[self.rng.choice(len(ASPECTS), p=ASPECT_P)]
        return round(self.size * fw), round(self.size * fh)

    def pick_classes(self, scene: str, count: int) -> list[int]:
        weights = SCENES[scene][1]
        p = np.array([weights.get(n, 0.0) for n in self.names])
        p = (1 - STRAY_CLASS_P) * p / p.sum() + STRAY_CLASS_P / len(p)
        return list(self.rng.choice(len(p), size=count, p=p))

    def paint(self, width: int, height: int, empty: bool) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
        """uint8 [H, W, 3] image and its objects as (category index, flat polygon [x0, y0, x1, y1, ...])."""
        scene = list(SCENES)[self.rng.integers(len(SCENES))]
        yy, xx = np.mgrid[0:height, 0:width]
        ramp = (xx / width - 0.5)[..., None].astype(np.float32) * self.rng.uniform(-40, 40, 3).astype(np.float32)
        canvas = np.asarray(SCENES[scene][0], dtype=np.float32) + ramp + 18 * self._noise(height, width)
        classes = [] if empty else self.pick_classes(scene, self.rng.integers(1, 5))
        objects = [(k, self._place(k, width, height)) for k in classes]
        for k, polygon in objects:
            mask = Image.new("L", (width, height))
            ImageDraw.Draw(mask).polygon(polygon, fill=255)
            inside = np.asarray(mask) > 0
            colour = np.asarray(CATEGORIES[k][4], dtype=np.float32)
            pattern = _texture(CATEGORIES[k][5], xx[inside], yy[inside])
            canvas[inside] = np.where(pattern[:, None], colour, colour * 0.45)
        canvas += 8 * self._noise(height, width)
        return np.clip(canvas, 0, 255).astype(np.uint8), objects

    def _noise(self, height: int, width: int) -> np.ndarray:
        return self.rng.standard_normal((height, width, 3), dtype=np.float32)

    def _place(self, k: int, width: int, height: int) -> list[float]:
        radius = self.rng.uniform(0.14, 0.3) * min(width, height)
        cx, cy = self.rng.uniform(radius, width - radius), self.rng.uniform(radius, height - radius)
        angle = self.rng.uniform(-0.35, 0.35)
        cos, sin = math.cos(angle), math.sin(angle)
        polygon = []
        for x, y in self.polygons[self.names[k]]:
            polygon += [round(cx + radius * (cos * x - sin * y), 2), round(cy + radius * (sin * x + cos * y), 2)]
        return polygon


def _annotation(ann_id: int, image_id: int, category_id: int, polygon: list[float]) -> dict:
    xs, ys = polygon[0::2], polygon[1::2]
    area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))  # shoelace
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
        "area": round(area, 2),
        "iscrowd": 0,
        "segmentation": [polygon],
    }


def _image_dir(out: Path, split: str) -> Path:
    return out / f"{split}2014"


def _annotation_file(out: Path, split: str) -> Path:
    return out / "annotations" / f"instances_{split}2014.json"


def dataset_folders(out: str | Path) -> list[str]:
    """The folders of a COCO 2014 layout that ``out`` already holds ("annotations/", "train2014/", ...)."""
    out = Path(out)
    folders = [out / "annotations", *(_image_dir(out, split) for split in SPLITS)]
    return [f"{folder.name}/" for folder in folders if folder.exists()]


def remove_toy(out: str | Path) -> None:
    """Remove what :func:`make_toy` writes under ``out`` (each split's image folder and annotation file) and
    nothing else: another data set's files beside them stay."""
    out = Path(out)
    for split in SPLITS:
        if _image_dir(out, split).exists():
            shutil.rmtree(_image_dir(out, split))
        _annotation_file(out, split).unlink(missing_ok=True)


def _write_split(out: Path, split: str, image_ids: list[int], first_ann_id: int, painter: _Painter) -> dict:
    image_dir = _image_dir(out, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    n_empty = max(1, round(EMPTY_FRACTION * len(image_ids))) if image_ids else 0
    empty = set(painter.rng.choice(len(image_ids), size=n_empty, replace=False).tolist()) if n_empty else set()
    images, annotations = [], []
    for i, image_id in enumerate(image_ids):
        width, height = painter.image_shape()
        pixels, objects = painter.paint(width, height, empty=i in empty)
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, "JPEG", quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1})
        for k, polygon in objects:
            annotations.append(_annotation(first_ann_id + len(annotations), image_id, CATEGORIES[k][0], polygon))
    document = {
        "info": {"description": "mlgcn-dist synthetic toy set (COCO 2014 layout)", "version": "1.0", "year": 2014},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c[0], "name": c[1], "supercategory": c[2]} for c in CATEGORIES],
    }
    annotation_file = _annotation_file(out, split)
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(document))
    return {"images": len(images), "annotations": len(annotations), "empty": n_empty}


def make_toy(out: str | Path, train: int = 400, val: int = 200, size: int = 96, seed: int = 0) -> dict:
    """Write the toy set under ``out`` (annotations/, train2014/, val2014/); returns counts per split."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    # Sparse, COCO-like image ids (unique across both splits), sorted within each split.
    ids = (rng.choice(999_999, size=train + val, replace=False) + 1).tolist()
    painter = _Painter(size, rng)
    summary = {"root": str(out), "categories": len(CATEGORIES)}
    summary["train"] = _write_split(out, "train", sorted(ids[:train]), 1, painter)
    summary["val"] = _write_split(out, "val", sorted(ids[train:]), 1 + 4 * train, painter)
    return summary
