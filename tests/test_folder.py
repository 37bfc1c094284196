"""Specifications of the map-style folder dataset, its collate function and the split dispatch."""

from __future__ import annotations

import itertools
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import declare_huge_size
from PIL import Image
from torch.utils.data import DataLoader

from mlgcn_dist.data.folder import Batch, FolderDataset, PackedJpegs, collate, read_split
from mlgcn_dist.data.records import Skipped
from mlgcn_dist.data.transforms import CpuTransform, GpuAugment, normalise, to_device

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they remain the supported path here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture
def small_index(toy_root, tmp_path):
    """The first 8 toy val images, copied so a test may corrupt them; records point at the copies."""
    index = read_split("coco", toy_root, "val")
    index.records = [replace(r, path=str(shutil.copy(r.path, tmp_path))) for r in index.records[:8]]
    return index


def test_read_split_dispatches_to_the_coco_and_voc_readers(toy_root, voc_root):
    assert read_split("coco", toy_root, "val").dataset == "coco"
    assert len(read_split("coco", toy_root, "val", keep_empty=True)) == 32
    assert read_split("voc", voc_root, "trainval").labels.num_classes == 20
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        read_split("imagenet", toy_root, "val")


def test_folder_dataset_targets_and_ids_match_the_index(toy_root):
    index = read_split("coco", toy_root, "train")
    loader = DataLoader(FolderDataset(index, CpuTransform(32, train=True)), batch_size=16, collate_fn=collate)
    batches = list(loader)
    assert torch.equal(torch.cat([b["target"] for b in batches]), torch.from_numpy(index.targets()))
    assert torch.cat([b["image_id"] for b in batches]).tolist() == [r.image_id for r in index.records]
    first = batches[0]
    assert first["image"].shape == (16, 3, 32, 32) and first["image"].dtype == torch.uint8
    assert first["target"].dtype == torch.int8 and first["image_id"].dtype == torch.int64 and first["n_bad"] == 0


def test_raw_mode_yields_the_file_bytes(small_index):
    sample = FolderDataset(small_index, None, raw=True)[3]
    with open(small_index.records[3].path, "rb") as f:
        assert sample["jpeg"].dtype == torch.uint8 and sample["jpeg"].numpy().tobytes() == f.read()
    batch = collate([sample, FolderDataset(small_index, None, raw=True)[4]])
    assert len(batch["jpeg"]) == 2 and batch["image_id"].shape == (2,) and "image" not in batch


def test_a_batch_of_jpegs_travels_as_one_tensor_of_their_bytes_and_gives_back_each_file(small_index):
    dataset = FolderDataset(small_index, None, raw=True)
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate, num_workers=1)  # through a worker's queue
    batch = next(iter(loader))
    packed = batch["jpeg"]
    assert isinstance(packed, PackedJpegs) and packed.data.ndim == 1 and len(packed) == 3
    for record, data in zip(small_index.records, packed.files()):
        assert data.numpy().tobytes() == Path(record.path).read_bytes()
    assert [file.data_ptr() for file in packed] == [packed.data.data_ptr() + sum(packed.lengths[:i]) for i in range(3)]


def test_the_loaders_pinning_thread_pins_a_batchs_targets_and_ids_and_leaves_its_jpeg_bytes_as_they_are(
    small_index, monkeypatch
):
    from torch.utils.data._utils.pin_memory import pin_memory  # what the DataLoader's pinning thread runs

    pinned_tensors = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *_: pinned_tensors.append(self) or self.clone())
    batch = collate([FolderDataset(small_index, None, raw=True)[i] for i in range(4)])
    pinned = pin_memory(batch)
    assert pinned["jpeg"] is batch["jpeg"]  # no copy: the decoders read the bytes no faster pinned
    assert [id(t) for t in pinned_tensors] == [id(batch["target"]), id(batch["image_id"])]


def _from_a_worker(dataset: FolderDataset, size: int) -> dict:
    """A batch as the training process receives it from a loader worker: its tensors in shared memory."""
    return next(iter(DataLoader(dataset, batch_size=size, collate_fn=collate, num_workers=1)))


def test_pinning_a_batch_from_a_worker_frees_the_shared_memory_its_tensors_came_in(small_index, monkeypatch):
    """The DataLoader's pinning thread calls Batch.pin_memory; after the pinned copies, the worker's shared memory
    is given back without the GIL (mlgcn_dist/data/shared_memory.py), not freed by the pinning thread holding it."""
    from torch.utils.data._utils.pin_memory import pin_memory  # what the DataLoader's pinning thread runs

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *_: self.clone())  # no CUDA here to pin with
    batch = _from_a_worker(FolderDataset(small_index, CpuTransform(64, train=False)), 4)
    received = {key: batch[key] for key in ("image", "target", "image_id")}
    want = {key: tensor.clone() for key, tensor in received.items()}
    pinned = pin_memory(batch)
    assert isinstance(pinned, Batch) and pinned.keys() == batch.keys()
    assert all(torch.equal(pinned[key], want[key]) for key in want)
    assert received["image"].numel() % 4096 == 0 and int(received["image"].count_nonzero()) == 0  # pages freed


def test_to_device_takes_the_pixels_out_of_a_batch_and_frees_the_shared_memory_they_came_in(small_index):
    cpu = _from_a_worker(FolderDataset(small_index, CpuTransform(64, train=False)), 4)
    pixels = cpu["image"]
    want = normalise(pixels.clone())
    images, _, _ = to_device(cpu, "cpu", None, random.Random(0), channels_last=False)
    assert torch.equal(images, want) and "image" not in cpu and int(pixels.count_nonzero()) == 0

    raw = _from_a_worker(FolderDataset(small_index, None, raw=True), 4)
    jpegs = raw["jpeg"]
    want_images, _ = GpuAugment(32, train=False)(PackedJpegs.of([f.clone() for f in jpegs]), "cpu", random.Random(0))
    images, _, _ = to_device(raw, "cpu", GpuAugment(32, train=False), random.Random(0), channels_last=False)
    assert torch.equal(images, want_images) and "jpeg" not in raw
    assert jpegs.data.numel() > 4096 and int(jpegs.data[:4096].count_nonzero()) == 0  # its whole pages freed


def test_packed_jpegs_whose_bytes_do_not_add_up_to_their_lengths_are_refused():
    with pytest.raises(ValueError, match=r"expected uint8 \[sum\(lengths\)=7\] bytes, got torch.uint8 \(6,\)"):
        PackedJpegs(torch.zeros(6, dtype=torch.uint8), [3, 4])
    assert len(PackedJpegs.of([])) == 0 and PackedJpegs.of([]).files() == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "huge"])
def test_corrupt_image_on_the_cpu_path_gives_n_bad_1_and_the_rest_of_the_batch(small_index, damage):
    _damage(small_index.records[2].path, damage)
    dataset = FolderDataset(small_index, CpuTransform(32, train=False))
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["n_bad"] == 1 and batch["image"].shape[0] == 7
    kept = [r for i, r in enumerate(small_index.records) if i != 2]
    assert batch["image_id"].tolist() == [r.image_id for r in kept]
    assert torch.equal(batch["target"], torch.from_numpy(small_index.targets()[[i for i in range(8) if i != 2]]))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "huge"])
def test_corrupt_image_on_the_raw_path_gives_n_bad_1_after_device_decode(small_index, damage):
    """Unreadable files fail in the worker, a truncated JPEG too (nvJPEG would fill it in), as on the CPU path."""
    _damage(small_index.records[2].path, damage)
    dataset = FolderDataset(small_index, None, raw=True)
    assert dataset[2] == Skipped(small_index.records[2].image_id)
    batch = collate([dataset[i] for i in range(len(dataset))])
    images, targets, ids = to_device(batch, "cpu", GpuAugment(32, train=False), random.Random(0), False)
    assert batch["n_bad"] == 1 and images.shape[0] == targets.shape[0] == 7
    assert 2 not in ids.tolist() and ids.tolist() == [r.image_id for i, r in enumerate(small_index.records) if i != 2]


def test_a_png_under_a_jpeg_name_is_scored_on_the_raw_path_as_on_the_cpu_path(small_index):
    _damage(small_index.records[2].path, "png")
    for dataset in (FolderDataset(small_index, None, raw=True), FolderDataset(small_index, CpuTransform(32, False))):
        batch = collate([dataset[i] for i in range(len(dataset))])
        assert batch["n_bad"] == 0 and batch["image_id"].tolist() == [r.image_id for r in small_index.records]


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("size", [0, 1, 3])
def test_collate_makes_every_tensor_of_a_batch_anew(small_index, raw, size):
    """What Batch.pin_memory relies on to free a batch's shared memory once pinned: no tensor of a batch shares
    memory with its samples (a worker could keep or send them again)."""
    dataset = FolderDataset(small_index, None if raw else CpuTransform(32, train=False), raw=raw)
    samples = [dataset[i] for i in range(size)]
    batch = collate(samples or [Skipped(None)])
    theirs = {v.untyped_storage().data_ptr() for s in samples for v in s.values() if isinstance(v, torch.Tensor)}
    ours = [v for v in batch.values() if isinstance(v, torch.Tensor)] + ([batch["jpeg"].data] if raw and size else [])
    assert len(ours) == 3 and not theirs & {t.untyped_storage().data_ptr() for t in ours if t.numel() > 0}


def test_collate_counts_every_bad_sample_and_names_those_whose_image_id_is_known():
    good = {"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "target": torch.zeros(5, dtype=torch.int8), "image_id": 1}
    batch = collate([Skipped(None), good, None, Skipped(5)])
    assert batch["n_bad"] == 3 and batch["bad_ids"] == [5] and batch["image_id"].tolist() == [1]


def test_collate_of_only_bad_samples_is_an_empty_batch_with_n_bad():
    batch = collate([None, None])
    assert batch["n_bad"] == 2 and batch["image"].shape[0] == 0 and batch["target"].shape[0] == 0
    images, targets, ids = to_device(batch, "cpu", None, random.Random(0), channels_last=False)
    assert images.shape[0] == targets.shape[0] == ids.shape[0] == 0


def test_augmentation_depends_on_seed_epoch_and_index_not_on_workers(small_index):
    dataset = FolderDataset(small_index, CpuTransform(32, train=True), seed=5)
    first = torch.stack([dataset[i]["image"] for i in range(8)])
    assert torch.equal(first, torch.stack([dataset[i]["image"] for i in range(8)]))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate)
    assert torch.equal(torch.cat([b["image"] for b in loader]), first)
    dataset.set_epoch(1)
    second = torch.cat([b["image"] for b in loader])
    assert not torch.equal(second, first)  # new epoch, new crops (workers see set_epoch on the next iterator)
    assert not torch.equal(FolderDataset(small_index, CpuTransform(32, train=True), seed=6)[0]["image"], first[0])


def test_every_seed_epoch_and_index_draws_its_own_augmentation_stream(toy_root):
    """Not one stream for all images, and no two (seed, epoch, index) alike, e.g. (1, 11, 0) and (11, 1, 0)."""
    index = read_split("coco", toy_root, "val")
    draws = []
    for seed, epoch in itertools.product((1, 11), (1, 11)):
        dataset = FolderDataset(index, lambda img, rng: rng.random(), seed=seed)  # the image: its first draw
        dataset.set_epoch(epoch)
        draws += [dataset[i]["image"] for i in (0, 1, 10)]
    assert len(set(draws)) == len(draws) == 12


def test_folder_dataset_needs_a_transform_unless_raw(small_index):
    with pytest.raises(ValueError, match="CpuTransform"):
        FolderDataset(small_index, None)


def _damage(path: str, how: str) -> None:
    """Make one image file unreadable: deleted, overwritten with garbage, cut in half, declaring a size past PIL's
    decompression-bomb limit, or (readable) a PNG."""
    file = Path(path)
    if how == "missing":
        file.unlink()
    elif how == "huge":
        declare_huge_size(file)
    elif how == "garbage":
        file.write_bytes(b"\x00garbage" * 50)
    elif how == "png":  # a readable picture, but not a JPEG: the device decoder is given it re-encoded
        with Image.open(file) as img:
            img.load()
        img.save(file, "PNG")
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
