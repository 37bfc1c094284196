"""Map-style dataset over a COCO/VOC folder layout, and the collate function that builds the batch dict.

Batch contract (shared with the WebDataset loaders): "image" uint8 [B,3,S,S] cropped and resized (CPU decode;
``to_device`` normalises it on the device) or "jpeg" :class:`PackedJpegs`, B files' raw bytes (decoded on the
device); "target" int8 [B,C] (1/0/-1); "image_id" int64 [B]; "n_bad" int, samples of this batch dropped
because their file could not be read or decoded, and "bad_ids" the image ids of those whose id is known. A batch
whose samples all failed has B = 0 and an empty "image".

Augmentation is reproducible whatever the worker count: each sample's random stream is derived from
(seed, epoch, index). Call :meth:`FolderDataset.set_epoch` before iterating the loader each epoch (workers receive
a copy of the dataset when an iterator starts, so persistent workers would keep the old epoch).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from mlgcn_dist.data.coco import coco_paths, read_coco
from mlgcn_dist.data.jpeg import device_decodable_jpeg
from mlgcn_dist.data.records import UNREADABLE_IMAGE_ERRORS, Skipped, SplitIndex, encode_target
from mlgcn_dist.data.shared_memory import release_each
from mlgcn_dist.data.transforms import CpuTransform
from mlgcn_dist.data.voc import read_voc

logger = logging.getLogger(__name__)


def read_split(dataset: str, root: str | Path, split: str, keep_empty: bool = False) -> SplitIndex:
    """Index ``split`` of ``dataset`` (coco | voc) in its original layout under ``root``.

    ``keep_empty`` applies to COCO only: VOC keeps every listed image, as its protocol scores them all.
    """
    if dataset == "coco":
        return read_coco(root, split, keep_empty=keep_empty)
    if dataset == "voc":
        return read_voc(root, split)
    raise ValueError(f"unknown dataset {dataset!r}: expected 'coco' or 'voc'")


def check_same_label_space(reference: SplitIndex, other: SplitIndex, root: str | Path) -> None:
    """``other``'s labels are ``reference``'s, in the same order, or a ValueError naming both splits' sources.

    Each split's label indices come from its own annotations (COCO: its ``categories``); a split listing one
    category more or less would shift every label after it, and score the wrong label without an error.
    """
    if other.labels.names == reference.labels.names:
        return
    first, second = set(reference.labels.names), set(other.labels.names)
    if first == second:
        what = "the same labels in another order"
    else:
        what = (
            f"only in '{reference.split}': {sorted(first - second)}; "
            f"only in '{other.split}': {sorted(second - first)}"
        )
    raise ValueError(
        f"{_split_source(reference, root)} and {_split_source(other, root)} list different label spaces ({what}): "
        f"label indices would mean other labels in split '{other.split}' than in '{reference.split}'; give both "
        f"splits the same categories"
    )


def _split_source(index: SplitIndex, root: str | Path) -> str:
    if index.dataset == "coco":
        return str(coco_paths(root, index.split)[0])
    return f"{index.dataset} split '{index.split}' under {root}"


class FolderDataset(torch.utils.data.Dataset):
    """Samples of a :class:`SplitIndex`: a transformed image (CPU path) or the raw JPEG bytes (``raw``, GPU path)."""

    def __init__(self, index: SplitIndex, transform: CpuTransform | None, raw: bool = False, seed: int = 0) -> None:
        if transform is None and not raw:
            raise ValueError("FolderDataset needs a CpuTransform unless raw=True (JPEG bytes for device decode)")
        self.index = index
        self.transform = transform
        self.raw = raw
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index.records)

    def __getitem__(self, i: int) -> dict | Skipped:
        """The sample dict, or Skipped(image id) when the file cannot be read or decoded (collate counts and names
        it in n_bad and bad_ids)."""
        record = self.index.records[i]
        try:
            payload = _read_jpeg(record.path) if self.raw else _load_rgb(record.path)
        except UNREADABLE_IMAGE_ERRORS as err:
            logger.warning("skipping unreadable image %s: %s", record.path, err)
            return Skipped(record.image_id)
        if self.raw:
            sample = {"jpeg": payload}
        else:
            sample = {"image": self.transform(payload, self.sample_rng(i))}
        target = encode_target(record.labels, record.difficult, self.index.labels.num_classes)
        return {**sample, "target": torch.from_numpy(target), "image_id": record.image_id}

    def sample_rng(self, i: int) -> random.Random:
        """Sample ``i``'s random stream this epoch (str seeds are hashed with SHA-512: stable across processes)."""
        return random.Random(f"{self.seed}:{self.epoch}:{i}")


def _load_rgb(path: str) -> Image.Image:
    """Fully decoded RGB image: decoding here, not lazily in the transform, surfaces a truncated file as OSError."""
    with Image.open(path) as im:
        return im.convert("RGB")


def _read_jpeg(path: str) -> torch.Tensor:
    """The file's bytes as uint8 [N]; only the header is checked here, the device decode finds the rest."""
    data = device_decodable_jpeg(Path(path).read_bytes())
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class PackedJpegs:
    """A batch's JPEG files, their bytes end to end in one uint8 tensor: a batch dict's "jpeg".

    One tensor, not one a file, because of what a batch costs the training process on its way from a loader
    worker: each tensor crosses as shared memory of its own, received (a file descriptor, a mapping) by Python in
    the trainer, beside the thread that launches the step's kernels. On a 2-core CPU, for batches of 64 make-toy
    JPEGs at 640 px (~190 KB) from 2 workers, the training process spent 10.6-13.2 ms of CPU a batch taking 64
    tensors (then pinned on CUDA) and 1.8-2.2 taking one, and the loader made 2,000-2,700 against 3,800-4,200 img/s
    (three runs of each, alternated: `mlgcn bench loader --decode gpu`, ``process_cpu_ms_per_batch``).

    Not pinned by the loader (``data.pin_memory`` pins a batch's targets and ids: :meth:`Batch.pin_memory`): the
    decoders read JPEG bytes no faster from pinned memory (on an H100, 64 JPEGs in 6.6 ms pinned against 6.0
    pageable: `mlgcn bench decode`), and the augment process copies them into its own shared memory, so a pinned
    copy would be a memcpy a batch in the trainer for nothing. Nor is this a ``collections.abc.Sequence``, which
    PyTorch's own pinning would rebuild item by item.
    """

    def __init__(self, data: torch.Tensor, lengths: list[int]) -> None:
        if data.dtype != torch.uint8 or data.ndim != 1 or data.numel() != sum(lengths):
            raise ValueError(f"PackedJpegs: expected uint8 [sum(lengths)={sum(lengths)}] bytes, got {data.dtype} "
                             f"{tuple(data.shape)}")
        self.data, self.lengths = data, lengths

    @classmethod
    def of(cls, files: list[torch.Tensor]) -> PackedJpegs:
        """Pack ``files`` (uint8 1-D tensors of each file's bytes) in their order."""
        data = torch.cat(files) if files else torch.empty(0, dtype=torch.uint8)
        return cls(data, [int(file.numel()) for file in files])

    def files(self) -> list[torch.Tensor]:
        """Each file's bytes in order: views into the one tensor."""
        return list(self.data.split(self.lengths))

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.files())


class Batch(dict):
    """The batch dict above, pinned by the DataLoader's pinning thread (``data.pin_memory``) as its tensors are.

    PyTorch's pinning thread calls an object's own ``pin_memory`` before it looks whether the object is a dict
    (torch/utils/data/_utils/pin_memory.py; a PyTorch that looked the other way round would pin the tensors itself,
    without the release). This one pins the batch's tensors as PyTorch would, leaves its :class:`PackedJpegs` as
    they are, and then frees the shared memory the tensors came in from their worker without holding the GIL
    (:func:`~mlgcn_dist.data.shared_memory.release_each`): the thread took them from the worker's queue, so no one
    else holds them, and after the pinned copies no one reads them. That needs every tensor of a batch to be memory
    of its own, never one a worker keeps or sends twice: :func:`collate` makes each anew (``stack``, ``cat``,
    ``tensor``, ``empty``). Dropped as they were, the kernel freed their pages while the thread held the GIL:
    6-8 ms a batch of 64 images at 448 px on a 2-core CPU, beside the threads launching the step's kernels.
    """

    def pin_memory(self, device: str | torch.device | None = None) -> Batch:
        received = {key: value for key, value in self.items() if isinstance(value, torch.Tensor)}
        pinned = Batch(self)
        pinned.update({key: tensor.pin_memory() for key, tensor in received.items()})
        release_each(received.values())
        return pinned


def collate(samples: list[dict | Skipped | None]) -> Batch:
    """Stack the readable samples into the batch dict above; the others (Skipped, None) are dropped, counted in
    n_bad, and named in bad_ids where their image id is known."""
    good = [s for s in samples if isinstance(s, dict)]
    batch = Batch({
        "n_bad": len(samples) - len(good),
        "bad_ids": [s.image_id for s in samples if isinstance(s, Skipped) and s.image_id is not None],
    })
    if not good:
        batch["image"] = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        batch["target"] = torch.empty(0, 0, dtype=torch.int8)
        batch["image_id"] = torch.empty(0, dtype=torch.int64)
        return batch
    if "jpeg" in good[0]:
        batch["jpeg"] = PackedJpegs.of([s["jpeg"] for s in good])
    else:
        batch["image"] = torch.stack([s["image"] for s in good])
    batch["target"] = torch.stack([s["target"] for s in good])
    batch["image_id"] = torch.tensor([s["image_id"] for s in good], dtype=torch.int64)
    return batch
