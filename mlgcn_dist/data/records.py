"""The records every reader produces and every loader consumes: one image, its labels, and the label space.

Target encoding used throughout (loaders, loss, AP meter): 1 = positive, 0 = negative, -1 = difficult
(VOC "difficult" objects: ignored by the AP meter, counted as positive by the loss, as ML-GCN does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image

# What PIL raises for a file it cannot read as an image: OSError (UnidentifiedImageError, truncated data),
# SyntaxError or ValueError from some format plugins, and DecompressionBombError (a header declaring more than
# ~179M pixels), which derives from Exception alone. Every reader skips such a file, and counts it.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str  # name inside the split's image folder (COCO_train2014_000000000009.jpg, 000005.jpg)
    path: str  # absolute path of the image file
    width: int
    height: int
    labels: tuple[int, ...]  # label indices (model order) present in the image
    difficult: tuple[int, ...] = ()  # label indices present only as difficult objects (VOC)


class Skipped(NamedTuple):
    """A sample that could not be read or decoded: dropped from its batch, counted in n_bad, named in bad_ids."""

    image_id: int | None  # None when the sample lost its .json (the image id is not known)


@dataclass
class LabelSpace:
    names: list[str]  # label names in model order (COCO: sorted by name, as ML-GCN; VOC: the standard 20)
    supercategories: list[str]  # supercategory of each label (HGAT groups)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def groups(self) -> list[int]:
        """Group index per label: supercategories numbered in order of first appearance."""
        order: dict[str, int] = {}
        return [order.setdefault(s, len(order)) for s in self.supercategories]


def label_space_difference(trained: list[str], dataset: list[str]) -> str | None:
    """How the labels a model was trained on differ from a dataset's, in words for an error ("trained on ..."); None
    when they are the same labels in the same order. The same names in another order matter as much as another
    count: every score would be reported, and trained, under another label's name."""
    trained, dataset = list(trained), list(dataset)
    if trained == dataset:
        return None
    if len(trained) != len(dataset):
        return f"{len(trained)} labels, the dataset has {len(dataset)}"
    known = set(dataset)
    if others := [name for name in trained if name not in known]:
        return (f"{len(trained)} labels, {len(others)} of them not the dataset's "
                f"({', '.join(map(repr, others[:3]))}{', ...' if len(others) > 3 else ''})")
    i = next(i for i, (ours, theirs) in enumerate(zip(trained, dataset)) if ours != theirs)
    return (f"the dataset's {len(dataset)} labels in another order (label {i} is {trained[i]!r}, the dataset's "
            f"{dataset[i]!r})")


@dataclass
class SplitIndex:
    dataset: str  # coco | voc
    split: str  # train | val | trainval | test
    labels: LabelSpace
    records: list[ImageRecord]
    skipped: list[dict] = field(default_factory=list)  # {"image_id", "file_name", "reason"} of dropped images

    def __len__(self) -> int:
        return len(self.records)

    def targets(self) -> np.ndarray:
        """[N, C] int8 targets in the encoding above."""
        c = self.labels.num_classes
        if not self.records:
            return np.zeros((0, c), dtype=np.int8)
        return np.stack([encode_target(r.labels, r.difficult, c) for r in self.records])


def encode_target(labels, difficult, num_classes: int) -> np.ndarray:
    """One image's int8 target vector in the encoding above."""
    out = np.zeros(num_classes, dtype=np.int8)
    out[list(difficult)] = -1
    out[list(labels)] = 1
    return out
