"""Reader of the PASCAL VOC2007 layout: ``root/VOCdevkit/VOC2007/`` (or ``root`` pointing at ``VOC2007/`` itself).

Labels come from ``ImageSets/Main/{class}_{split}.txt`` (lines ``<id> <flag>``: 1 present, 0 present only as
difficult objects, -1 absent), as ML-GCN reads them. Every image listed is kept, with or without a positive
label, as ML-GCN does and as the VOC protocol scores them. Width and height come from the JPEG header.

Supercategories follow the four groups of the VOC2007 development kit documentation: person, animal, vehicle,
indoor.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from mlgcn_dist.data.records import UNREADABLE_IMAGE_ERRORS, ImageRecord, LabelSpace, SplitIndex

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_SUPERCATEGORY = {
    **dict.fromkeys(("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"), "vehicle"),
    **dict.fromkeys(("bird", "cat", "cow", "dog", "horse", "sheep"), "animal"),
    **dict.fromkeys(("bottle", "chair", "diningtable", "pottedplant", "sofa", "tvmonitor"), "indoor"),
    "person": "person",
}
FLAGS = {"1": "present", "0": "difficult", "-1": "absent"}


def voc_label_space() -> LabelSpace:
    return LabelSpace(names=list(VOC_CLASSES), supercategories=[VOC_SUPERCATEGORY[c] for c in VOC_CLASSES])


def voc_dir(root: str | Path) -> Path:
    """The VOC2007 folder: ``root/VOCdevkit/VOC2007`` or ``root`` itself when it holds ``ImageSets/Main``."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2007", root):
        if (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no VOC2007 layout at {root}: neither {root / 'VOCdevkit/VOC2007/ImageSets/Main'} "
        f"nor {root / 'ImageSets/Main'} exists"
    )


def read_voc(root: str | Path, split: str) -> SplitIndex:
    """Index one VOC2007 split (train | val | trainval | test)."""
    base = voc_dir(root)
    image_dir = base / "JPEGImages"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"VOC {split} split: {image_dir} does not exist")
    flags = _read_class_flags(base / "ImageSets" / "Main", split)
    on_disk = set(os.listdir(image_dir))  # one listing, not a stat per image
    records, skipped = [], []
    for stem, per_class in flags.items():
        file_name = f"{stem}.jpg"
        image_id = _image_id(stem, base / "ImageSets" / "Main" / f"{VOC_CLASSES[0]}_{split}.txt")
        size = _image_size(image_dir / file_name) if file_name in on_disk else None
        if size is None:
            reason = "missing_file" if file_name not in on_disk else "unreadable"
            skipped.append({"image_id": image_id, "file_name": file_name, "reason": reason})
            continue
        records.append(
            ImageRecord(
                image_id=image_id,
                file_name=file_name,
                path=str((image_dir / file_name).absolute()),
                width=size[0],
                height=size[1],
                labels=tuple(i for i, f in enumerate(per_class) if f == "present"),
                difficult=tuple(i for i, f in enumerate(per_class) if f == "difficult"),
            )
        )
    return SplitIndex(dataset="voc", split=split, labels=voc_label_space(), records=records, skipped=skipped)


def _read_class_flags(main_dir: Path, split: str) -> dict[str, list[str]]:
    """image stem -> per-class flag names, in the order of the first class file; every file must list the same ids."""
    flags: dict[str, list[str]] = {}
    first = f"{VOC_CLASSES[0]}_{split}.txt"
    for c, name in enumerate(VOC_CLASSES):
        path = main_dir / f"{name}_{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"VOC {split} split: {path} does not exist")
        try:
            text = path.read_text()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a text file ({err})") from err
        seen = 0
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in FLAGS:
                raise ValueError(f"{path}:{line_no}: expected '<image id> <1|0|-1>', got {line!r}")
            stem, flag = parts
            per_class = flags.setdefault(stem, []) if c == 0 else flags.get(stem)
            if per_class is None or len(per_class) != c:
                raise ValueError(f"{path}:{line_no}: image id {stem!r} is repeated or not in {first}")
            per_class.append(FLAGS[flag])
            seen += 1
        if seen != len(flags):
            raise ValueError(f"{path}: lists {seen} image ids, {first} lists {len(flags)}")
    return flags


def _image_id(stem: str, source: Path) -> int:
    try:
        return int(stem)
    except ValueError:
        raise ValueError(f"{source}: image id {stem!r} is not an integer (VOC2007 ids are like 000005)") from None


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header alone (PIL does not decode on open); None when it cannot be parsed."""
    try:
        with Image.open(path) as im:
            return im.size
    except UNREADABLE_IMAGE_ERRORS:
        return None
