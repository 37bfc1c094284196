"""Specifications of the training/evaluation loaders over shards (wds) and the original layout (folder).

Ranks are simulated in one process: each rank's loader is built with its rank number and read in turn.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import webdataset as wds
from conftest import drop_category, jpeg, photo, process_alive, timed_worker_loader
from PIL import Image
from torch.utils.data import DataLoader
from webdataset.tariterators import group_by_keys, tar_file_expander

from mlgcn_dist.checkpoint import SAVING_STOP_SIGNALS
from mlgcn_dist.config import ConfigError, DataConfig
from mlgcn_dist.data import loader as loader_module
from mlgcn_dist.data import workers as workers_module
from mlgcn_dist.data.folder import read_split
from mlgcn_dist.data.loader import (
    SampleDecoder,
    Shard,
    ShardError,
    TrainShardStream,
    _read_shard,
    batch_samples,
    bench_loader,
    build_eval_loader,
    build_train_loader,
    dataset_info,
    device_augment_rng,
    epoch_indices,
    pass_order,
    read_meta,
    steps_per_epoch,
    train_span,
)
from mlgcn_dist.data.pack import pack_dataset
from mlgcn_dist.data.records import Skipped, encode_target
from mlgcn_dist.data.transforms import CpuTransform

BATCH = 4


@pytest.fixture(scope="module")
def shards(toy_root, tmp_path_factory) -> Path:
    """The toy set in 2 shards per split: fewer shards than ranks x workers in most tests below."""
    out = tmp_path_factory.mktemp("loader") / "shards"
    pack_dataset("coco", toy_root, out, ["train", "val"], shard_count=2, workers=1)
    return out


@pytest.fixture
def copied_shards(shards, tmp_path) -> Path:
    """A private copy of the pack, for tests that damage it."""
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def config(fmt: str, toy_root: Path, shards: Path, workers: int = 0, **overrides) -> DataConfig:
    return DataConfig(
        dataset="coco",
        format=fmt,
        root=str(toy_root),
        shards=str(shards),
        image_size=32,
        batch_size=BATCH,
        workers=workers,
        **{"shuffle_buffer": 16, "pin_memory": False, **overrides},
    )


def read_train_shards(shards: Path) -> list[Shard]:
    return [Shard(str(shards / s["file"]), s["count"]) for s in read_meta(shards)["splits"]["train"]["shards"]]


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite one shard with ``edit(position, sample)`` applied to every sample (webdataset's own reader/writer)."""
    with open(path, "rb") as stream:
        samples = list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))
    with wds.TarWriter(str(path), encoder=False) as writer:
        for position, sample in enumerate(samples):
            edit(position, sample)
            if sample:  # an edit that clears a sample drops it
                writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})


def eval_ids(cfg: DataConfig, world: int, decode: str = "cpu") -> list[int]:
    return [
        i
        for rank in range(world)
        for b in build_eval_loader(cfg, rank=rank, world_size=world, decode=decode)
        for i in b["image_id"].tolist()
    ]


def train_batches(
    cfg: DataConfig, rank: int = 0, world: int = 1, epoch: int = 0, seed: int = 0
) -> list[dict]:
    return list(build_train_loader(cfg, rank=rank, world_size=world, epoch=epoch, seed=seed, decode="cpu"))


@pytest.mark.parametrize("fmt", ["wds", "folder"])
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_yields_every_image_exactly_once_across_ranks_and_workers(
    fmt, workers, world, toy_root, shards
):
    index = read_split("coco", toy_root, "val")
    cfg = config(fmt, toy_root, shards, workers)
    expected = {
        r.image_id: encode_target(r.labels, r.difficult, index.labels.num_classes) for r in index.records
    }
    seen = []
    for rank in range(world):
        for batch in build_eval_loader(cfg, rank=rank, world_size=world, decode="cpu"):
            assert batch["image"].shape[1:] == (3, 32, 32) and batch["n_bad"] == 0
            for image_id, target in zip(batch["image_id"].tolist(), batch["target"]):
                np.testing.assert_array_equal(target.numpy(), expected[image_id])
            seen += batch["image_id"].tolist()
    assert sorted(seen) == sorted(expected)


@pytest.mark.parametrize("fmt", ["wds", "folder"])
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 1), (3, 2)])
def test_training_gives_every_rank_the_same_number_of_full_batches(fmt, world, workers, toy_root, shards):
    cfg = config(fmt, toy_root, shards, workers)
    num_train = dataset_info(cfg).num_train
    expected = max(1, num_train // (BATCH * world))
    for rank in range(world):
        loader = build_train_loader(cfg, rank=rank, world_size=world, epoch=0, seed=0, decode="cpu")
        batches = list(loader)
        assert len(loader) == len(batches) == expected
        assert all(b["image"].shape == (BATCH, 3, 32, 32) for b in batches)


@pytest.mark.parametrize("fmt", ["wds", "folder"])
def test_steps_per_epoch_overrides_the_epoch_length_even_beyond_one_pass(fmt, toy_root, shards):
    cfg = config(fmt, toy_root, shards, workers=2, steps_per_epoch=25)  # 100 samples per rank > 62 images
    for rank in range(2):
        assert len(train_batches(cfg, rank, world=2)) == 25


@pytest.mark.parametrize("fmt", ["wds", "folder"])
def test_training_order_and_augmentation_repeat_with_the_seed_and_change_with_the_epoch(
    fmt, toy_root, shards
):
    cfg = config(fmt, toy_root, shards, workers=2)
    first, again = train_batches(cfg, epoch=3, seed=7), train_batches(cfg, epoch=3, seed=7)
    assert [b["image_id"].tolist() for b in first] == [b["image_id"].tolist() for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    ids = [b["image_id"].tolist() for b in first]
    assert ids != [b["image_id"].tolist() for b in train_batches(cfg, epoch=4, seed=7)]
    assert ids != [b["image_id"].tolist() for b in train_batches(cfg, epoch=3, seed=8)]


@pytest.mark.parametrize("fmt", ["wds", "folder"])
def test_training_ranks_read_disjoint_images_when_an_epoch_fits_in_one_pass(fmt, toy_root, shards):
    cfg = config(fmt, toy_root, shards)
    per_rank = [
        {i for b in train_batches(cfg, rank, world=2) for i in b["image_id"].tolist()} for rank in range(2)
    ]
    assert not per_rank[0] & per_rank[1]


class FirstDraw:
    """A CpuTransform stand-in: a sample's "image" is the first number its augmentation draws."""

    def __call__(self, img, rng) -> torch.Tensor:
        return torch.tensor(rng.random(), dtype=torch.float64)


def augmentation_draws(shards: Path, rank: int, world: int, workers: int, steps: int = 4) -> list[float]:
    """What the augmentation of every training sample of ``rank`` drew first, over all its DataLoader workers."""
    stream = TrainShardStream(
        read_train_shards(shards), rank=rank, world_size=world, seed=0, epoch=0, steps=steps, batch_size=BATCH,
        shuffle_buffer=1, decoder=SampleDecoder(len(read_meta(shards)["label_names"]), FirstDraw()),
    )
    return [draw for b in DataLoader(stream, batch_size=None, num_workers=workers) for draw in b["image"].tolist()]


def test_every_rank_and_every_worker_of_a_rank_draws_its_own_cpu_augmentation(shards):
    """The crops and flips come from (seed, epoch, rank, worker): no consumer repeats another's random draws."""
    rank0, rank1 = (augmentation_draws(shards, rank, world=2, workers=2) for rank in range(2))
    assert len(rank0) == len(rank1) == 4 * BATCH
    assert not set(rank0) & set(rank1)  # ranks
    assert len(set(rank0)) == len(set(rank1)) == 4 * BATCH  # the two workers of a rank


def test_device_augmentation_draws_are_a_function_of_seed_epoch_rank_and_batch_index_alone():
    first = device_augment_rng(7, 3, 0, 5).random()
    assert device_augment_rng(7, 3, 0, 5).random() == first  # a resumed run crops as an uninterrupted one
    changed = {"seed": (8, 3, 0, 5), "epoch": (7, 4, 0, 5), "rank": (7, 3, 1, 5), "batch index": (7, 3, 0, 6)}
    for what, args in changed.items():
        assert device_augment_rng(*args).random() != first, f"another {what} draws the same"


@pytest.fixture(scope="module")
def packs(toy_root, tmp_path_factory):
    """The toy training split packed into 1, 2, 3 and 5 shards (none divides 3 ranks x 2 workers evenly)."""
    root = tmp_path_factory.mktemp("packs")
    made: dict[int, Path] = {}

    def pack(count: int) -> Path:
        if count not in made:
            made[count] = root / f"shards{count}"
            pack_dataset("coco", toy_root, made[count], ["train"], shard_count=count, workers=1)
        return made[count]

    return pack


@pytest.mark.parametrize("shard_count", [1, 2, 3, 5])
@pytest.mark.parametrize(("world", "workers"), [(1, 4), (2, 1), (3, 2)])
def test_an_epoch_trains_on_each_image_once_whatever_the_shards_per_rank_and_worker(
    shard_count, world, workers, toy_root, packs
):
    """One shard read by four workers, or three shards dealt to two ranks: nobody reads another's images, and
    the epoch's batches are distinct images (all but the remainder that does not fill a global batch)."""
    cfg = config("wds", toy_root, packs(shard_count), workers, shuffle_buffer=1000)
    num_train = dataset_info(cfg, val=False).num_train  # a pack of the training split alone
    ids = [i for rank in range(world) for b in train_batches(cfg, rank, world) for i in b["image_id"].tolist()]
    assert len(ids) == (num_train // (BATCH * world)) * BATCH * world
    assert len(set(ids)) == len(ids)


def test_train_spans_partition_a_pass_in_proportion_to_each_workers_batches_and_are_never_empty():
    for total, world, workers, steps in [(62, 3, 2, 5), (10, 1, 4, 2), (1000, 8, 4, 31), (7, 2, 3, 1)]:
        spans = [train_span(total, r, world, w, workers, steps) for r in range(world) for w in range(workers)]
        assert [i for span in spans for i in span] == list(range(total))
        for w in range(workers):
            batches = steps * (w + 1) // workers - steps * w // workers
            assert len(train_span(total, 0, world, w, workers, steps)) >= batches * (total // world // steps)
    # More steps than samples: a worker with batches to make reads one sample a pass rather than nothing.
    assert [len(train_span(3, 0, 1, w, 4, 8)) for w in range(4)] == [1, 1, 1, 1]
    assert [len(train_span(5, 0, 1, w, 4, 1)) for w in range(4)] == [0, 0, 0, 5]


def test_each_pass_orders_the_non_empty_shards_by_seed_epoch_and_pass():
    shards = [Shard(f"s{i}", 10) for i in range(6)] + [Shard("empty", 0)]
    first = pass_order(shards, seed=0, epoch=0, pass_index=0)
    assert sorted(s.path for s in first) == [f"s{i}" for i in range(6)]
    assert first == pass_order(shards, seed=0, epoch=0, pass_index=0)
    others = [pass_order(shards, 0, 0, 1), pass_order(shards, 0, 1, 0), pass_order(shards, 1, 0, 0)]
    assert all(order != first for order in others)


def test_a_span_inside_a_shard_is_read_from_its_first_sample_as_a_full_read_would_give_it(shards):
    shard = next(s for s in read_train_shards(shards) if s.count >= 10)
    everything = [sample["__key__"] for sample in _read_shard(shard)]
    assert len(everything) == shard.count
    assert [sample["__key__"] for sample in _read_shard(shard, 5, 9)] == everything[5:9]
    assert [sample["__key__"] for sample in _read_shard(shard, shard.count - 1, shard.count)] == everything[-1:]


def test_a_span_is_found_past_the_metadata_members_webdataset_skips(shards, tmp_path):
    shard = next(s for s in read_train_shards(shards) if s.count >= 10)
    path = tmp_path / "with_meta.tar"
    with tarfile.open(shard.path) as source, tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("__meta__/info.json")  # not a sample: webdataset's reader drops it
        tar.addfile(info)
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member))
    everything = [sample["__key__"] for sample in _read_shard(Shard(str(path), shard.count))]
    assert len(everything) == shard.count
    assert [sample["__key__"] for sample in _read_shard(Shard(str(path), shard.count), 5, 9)] == everything[5:9]


def test_epoch_indices_are_disjoint_across_ranks_and_serve_any_count():
    parts = [epoch_indices(10, rank, 3, seed=0, epoch=0, count=3) for rank in range(3)]
    assert len({i for p in parts for i in p}) == 9
    assert epoch_indices(10, 0, 1, seed=0, epoch=0, count=25)[:10] != list(range(10))
    assert sorted(epoch_indices(10, 0, 1, seed=0, epoch=0, count=20)[10:]) == list(range(10))
    two_passes = epoch_indices(10, 0, 1, seed=0, epoch=0, count=20)
    assert two_passes[10:] != two_passes[:10]  # each pass a new permutation


def test_an_epoch_has_at_least_one_step_even_when_the_set_is_smaller_than_a_global_batch(tmp_path):
    cfg = config("folder", tmp_path, tmp_path)  # batch 4
    assert steps_per_epoch(cfg, num_train=7, world_size=2) == 1
    assert steps_per_epoch(cfg, num_train=17, world_size=2) == 2
    assert steps_per_epoch(config("folder", tmp_path, tmp_path, steps_per_epoch=5), num_train=7, world_size=2) == 5


def test_wds_and_folder_describe_the_dataset_identically(toy_root, shards):
    a, b = dataset_info(config("wds", toy_root, shards)), dataset_info(config("folder", toy_root, shards))
    assert (a.label_names, a.supercategories, a.num_classes) == (
        b.label_names,
        b.supercategories,
        b.num_classes,
    )
    assert (a.num_train, a.num_val) == (b.num_train, b.num_val)
    np.testing.assert_array_equal(a.nums, b.nums)
    np.testing.assert_array_equal(a.adj, b.adj)


@pytest.mark.parametrize("fmt", ["wds", "folder"])
@pytest.mark.parametrize("train", [False, True])
def test_gpu_decode_carries_the_original_jpeg_bytes(fmt, train, toy_root, shards):
    index = read_split("coco", toy_root, "train" if train else "val")
    by_id = {r.image_id: Path(r.path).read_bytes() for r in index.records}
    cfg = config(fmt, toy_root, shards, steps_per_epoch=2)
    if train:
        batches = list(build_train_loader(cfg, rank=0, world_size=1, epoch=0, seed=0, decode="gpu"))
    else:
        batches = list(build_eval_loader(cfg, rank=0, world_size=1, decode="gpu"))
    assert "image" not in batches[0]
    for batch in batches:
        for image_id, data in zip(batch["image_id"].tolist(), batch["jpeg"]):
            assert data.dtype == torch.uint8 and data.numpy().tobytes() == by_id[image_id]


def test_the_gpu_path_fixes_or_skips_the_shard_images_the_device_would_decode_wrong(toy_root, copied_shards):
    """Shards packed before the packer re-encoded such files, or written by other tools: a grayscale JPEG with 2x2
    sampling (nvJPEG misreads it) reaches the device re-encoded, a truncated one (nvJPEG fills it in) is skipped,
    as the CPU path does."""
    changed = {}

    def damage(position, sample):
        if position in (0, 1):
            odd = jpeg(photo(mode="L"), subsampling=2).numpy().tobytes()
            sample["jpg"] = odd if position == 0 else sample["jpg"][: len(sample["jpg"]) // 2]
            changed[position] = int(sample["__key__"])

    rewrite_shard(copied_shards / "coco-val-000000.tar", damage)
    batches = list(build_eval_loader(config("wds", toy_root, copied_shards), rank=0, world_size=1, decode="gpu"))
    given = {i: bytes(j.numpy()) for b in batches for i, j in zip(b["image_id"].tolist(), b["jpeg"])}
    with Image.open(io.BytesIO(given[changed[0]])) as fixed:
        assert fixed.layer[0][1:3] == (1, 1)
    assert changed[1] not in given and [i for b in batches for i in b["bad_ids"]] == [changed[1]]


@pytest.mark.parametrize("labels", ["missing", 3, "3"])
def test_a_sample_json_without_a_list_of_labels_is_an_error_naming_shard_and_key(toy_root, copied_shards, labels):
    keys = []

    def bad_labels(position, sample):
        if position == 0:
            info = json.loads(sample["json"])
            info.pop("labels") if labels == "missing" else info.update(labels=labels)
            sample["json"] = json.dumps(info).encode()
            keys.append(sample["__key__"])

    rewrite_shard(copied_shards / "coco-val-000000.tar", bad_labels)
    with pytest.raises(ValueError, match=rf"coco-val-000000.tar: sample '{keys[0]}': bad .json: expected 'labels'"):
        eval_ids(config("wds", toy_root, copied_shards), world=1)


@pytest.mark.parametrize(
    "edit, names",
    [
        (lambda m: m["splits"]["val"].pop("shards"), "split 'val'"),
        (lambda m: m["splits"]["val"]["shards"][0].pop("count"), "split 'val' shard 0"),
        (lambda m: m.update(splits=[m["splits"]]), "'splits'"),
        (lambda m: m.update(label_names="person"), "'label_names'"),
        (lambda m: m.update(stats={"split": "train"}), "'stats'"),
    ],
)
def test_a_meta_json_of_another_shape_is_a_config_error_naming_the_part(copied_shards, edit, names):
    meta = read_meta(copied_shards)
    edit(meta)
    (copied_shards / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=rf"meta.json: {re.escape(names)}: expected .*not a meta.json written by"):
        read_meta(copied_shards)


def test_data_keep_empty_must_match_what_the_pack_was_made_with(toy_root, shards):
    with pytest.raises(ConfigError, match=r"packed without the images that have no annotation .* "
                                          r"data.keep_empty=true: set data.keep_empty=false or pack again with"):
        dataset_info(config("wds", toy_root, shards, keep_empty=True))


def test_folder_splits_with_different_label_spaces_are_a_config_error_naming_both_files(toy_root, tmp_path):
    root = Path(shutil.copytree(toy_root, tmp_path / "toy"))
    drop_category(root, "val", "bicycle")
    with pytest.raises(ConfigError, match=r"instances_train2014.json and .*instances_val2014.json list different"):
        dataset_info(config("folder", root, tmp_path / "no-shards"))


@pytest.mark.parametrize("fmt", ["wds", "folder"])
def test_evaluation_images_are_the_whole_frame_resized_without_random_crop_or_flip(fmt, toy_root, shards):
    paths = {r.image_id: r.path for r in read_split("coco", toy_root, "val").records}
    warp = CpuTransform(32, train=False)
    for batch in build_eval_loader(config(fmt, toy_root, shards), rank=0, world_size=1, decode="cpu"):
        for image_id, image in zip(batch["image_id"].tolist(), batch["image"]):
            with Image.open(paths[image_id]) as original:
                assert torch.equal(image, warp(original.convert("RGB"), random.Random(1)))


def test_folder_training_crops_an_image_anew_for_each_epoch_and_seed(toy_root, shards):
    def crops(epoch: int, seed: int) -> dict[int, torch.Tensor]:
        batches = train_batches(config("folder", toy_root, shards), epoch=epoch, seed=seed)
        return {i: image for b in batches for i, image in zip(b["image_id"].tolist(), b["image"])}

    first = crops(epoch=3, seed=7)
    for other in (crops(epoch=4, seed=7), crops(epoch=3, seed=8)):
        common = first.keys() & other.keys()
        same = sum(torch.equal(first[i], other[i]) for i in common)
        assert len(common) > 20 and same < len(common) / 2  # a few crops and flips may coincide, not most


def test_a_shard_listed_in_meta_but_missing_is_an_error_naming_it(toy_root, copied_shards):
    (copied_shards / "coco-val-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="coco-val-000001.tar"):
        read_meta(copied_shards)
    with pytest.raises(FileNotFoundError, match="coco-val-000001.tar"):
        build_eval_loader(config("wds", toy_root, copied_shards), rank=0, world_size=1, decode="cpu")


def test_dataset_info_refuses_a_pack_whose_statistics_are_of_another_split_naming_both(toy_root, shards):
    cfg = config("wds", toy_root, shards, train_split="val", val_split="train")  # the pack's statistics: train
    with pytest.raises(ConfigError, match=r"data.train_split='val' \(the pack holds statistics of split 'train'; .* coco's "
                                          r"training split 'train'\)"):
        dataset_info(cfg)


def test_a_split_the_pack_does_not_hold_is_a_config_error_naming_the_packed_ones(toy_root, shards):
    """dataset_info, which training reads first, said the unpacked split held no image."""
    cfg = config("wds", toy_root, shards, val_split="test")
    for read in (lambda: build_eval_loader(cfg, rank=0, world_size=1, decode="cpu"), lambda: dataset_info(cfg)):
        with pytest.raises(ConfigError, match="no split 'test'; packed splits: train, val"):
            read()
    assert dataset_info(cfg, val=False).num_val == 0  # the benchmark trains only


def test_a_training_split_without_samples_is_an_error_naming_it(toy_root, copied_shards):
    meta = read_meta(copied_shards)
    meta["splits"]["train"].update(shards=[], count=0)
    (copied_shards / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="split 'train' holds no samples"):
        build_train_loader(config("wds", toy_root, copied_shards), rank=0, world_size=1, epoch=0, seed=0,
                           decode="cpu")


def test_missing_or_invalid_meta_is_a_clear_error(copied_shards):
    (copied_shards / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json: not valid JSON"):
        read_meta(copied_shards)
    (copied_shards / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="mlgcn pack"):
        read_meta(copied_shards)


def truncate(path: Path, inside_member: bool) -> None:
    """Cut a shard halfway through its middle member's data, or exactly before that member's header."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[len(tar.getmembers()) // 2]
    cut = member.offset_data + member.size // 2 if inside_member else member.offset
    path.write_bytes(path.read_bytes()[:cut])


@pytest.mark.parametrize("inside_member", [True, False])
def test_truncated_shard_warns_naming_it_and_training_goes_on(toy_root, copied_shards, inside_member):
    truncate(copied_shards / "coco-train-000000.tar", inside_member)
    cfg = config("wds", toy_root, copied_shards)
    with pytest.warns(RuntimeWarning, match="coco-train-000000.tar: read .* skipping the rest of this shard"):
        batches = train_batches(cfg)
    assert len(batches) == len(build_train_loader(cfg, rank=0, world_size=1, epoch=0, seed=0, decode="cpu"))


@pytest.mark.parametrize("inside_member", [True, False])
def test_a_truncated_shard_counts_exactly_the_samples_it_lost_as_bad(copied_shards, inside_member):
    path = copied_shards / "coco-train-000000.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    truncate(path, inside_member)
    left = path.stat().st_size
    whole = {int(m.name.split(".")[0]) for m in members} - {
        int(m.name.split(".")[0]) for m in members if m.offset_data + m.size > left
    }
    shard = next(s for s in read_train_shards(copied_shards) if s.path == str(path))
    assert 0 < len(whole) < shard.count
    with pytest.warns(RuntimeWarning, match="coco-train-000000.tar"):
        samples = list(_read_shard(shard))
    assert len(samples) == shard.count  # the samples meta.json lists: read, or a stand-in for one the tar lost
    decoder = SampleDecoder(len(read_meta(copied_shards)["label_names"]), CpuTransform(32, train=True))
    batches = list(batch_samples((decoder(s, random.Random(0)) for s in samples), shard.count))
    assert sum(b["n_bad"] for b in batches) == shard.count - len(whole)
    assert sorted(i for b in batches for i in b["image_id"].tolist()) == sorted(whole)
    for start in (2, shard.count - 2):  # a span starting before the cut, and one starting past it
        with pytest.warns(RuntimeWarning, match="coco-train-000000.tar"):
            assert len(list(_read_shard(shard, start, shard.count))) == shard.count - start


@pytest.mark.parametrize("damage", ["cut_inside_member", "cut_at_member_boundary", "sample_removed", "jpg_removed"])
def test_truncated_shard_stops_evaluation_with_an_error_naming_it(toy_root, copied_shards, damage):
    path = copied_shards / "coco-val-000001.tar"
    if damage == "sample_removed":
        rewrite_shard(path, lambda position, sample: sample.clear() if position == 3 else None)
    elif damage == "jpg_removed":  # an incomplete sample is damage too, not an undecodable image to count
        rewrite_shard(path, lambda position, sample: sample.pop("jpg") if position == 3 else None)
    else:
        truncate(path, inside_member=damage == "cut_inside_member")
    with pytest.raises(ShardError, match="coco-val-000001.tar"):
        eval_ids(config("wds", toy_root, copied_shards), world=1)


def test_undecodable_jpeg_in_a_shard_is_counted_in_n_bad_not_fatal(toy_root, copied_shards):
    broken = []

    def corrupt_second(position, sample):
        if position == 1:
            sample["jpg"] = b"\xff\xd8 not really a jpeg"
            broken.append(int(sample["__key__"]))

    rewrite_shard(copied_shards / "coco-val-000000.tar", corrupt_second)
    cfg = config("wds", toy_root, copied_shards, workers=2)
    batches = [b for rank in range(2) for b in build_eval_loader(cfg, rank=rank, world_size=2, decode="cpu")]
    ids = [i for b in batches for i in b["image_id"].tolist()]
    assert sum(b["n_bad"] for b in batches) == 1
    assert (
        broken[0] not in ids
        and len(ids) == len(set(ids)) == read_meta(copied_shards)["splits"]["val"]["count"] - 1
    )


@pytest.mark.parametrize("label", [-1, 12, 99])  # the toy set has 12 labels; -1 would silently mark the last
def test_label_index_out_of_range_is_an_error_naming_shard_and_key(toy_root, copied_shards, label):
    keys = []

    def bad_label(position, sample):
        if position == 0:
            sample["json"] = json.dumps({**json.loads(sample["json"]), "labels": [label]}).encode()
            keys.append(sample["__key__"])

    rewrite_shard(copied_shards / "coco-val-000000.tar", bad_label)
    with pytest.raises(
        ValueError, match=rf"coco-val-000000.tar: sample '{keys[0]}' has label indices \[{label}\]"
    ):
        eval_ids(config("wds", toy_root, copied_shards), world=1)


def test_a_sample_that_lost_its_jpg_or_its_json_decodes_to_a_skip_naming_what_is_known():
    decoder, rng = SampleDecoder(12, CpuTransform(32, train=True)), random.Random(0)
    info = json.dumps({"image_id": 7, "labels": [1]}).encode()
    assert decoder({"__key__": "000007", "json": info}, rng) == Skipped(7)
    assert decoder({"__key__": "000007", "jpg": b"\xff\xd8"}, rng) == Skipped(None)


def test_batches_carry_skipped_samples_in_n_bad_and_a_trailing_skip_in_an_empty_batch():
    sample = {"image": torch.zeros(3, 2, 2), "target": torch.zeros(5, dtype=torch.int8), "image_id": 1}
    batches = list(batch_samples([None, sample, sample, None], 2))
    assert [(len(b["image_id"]), b["n_bad"]) for b in batches] == [(2, 1), (0, 1)]
    with pytest.raises(RuntimeError, match="undecodable samples in a row"):
        list(batch_samples([None] * 5, 2, max_bad_run=4))


def test_training_on_shards_without_a_readable_image_is_an_error_not_an_endless_stream(shards):
    train = read_train_shards(shards)
    total, decoded = sum(s.count for s in train), itertools.count(1)

    def nothing_decodes(sample, rng) -> Skipped:
        assert next(decoded) <= 3 * total, "three passes of broken images and the stream still goes on"
        return Skipped(None)

    stream = TrainShardStream(train, rank=0, world_size=1, seed=0, epoch=0, steps=2, batch_size=BATCH,
                              shuffle_buffer=1, decoder=nothing_decodes)
    with pytest.raises(RuntimeError, match=f"{total + 1} undecodable samples in a row"):
        list(stream)


def test_exactly_max_bad_run_undecodable_samples_in_a_row_pass_and_one_more_is_an_error():
    sample = {"image": torch.zeros(3, 2, 2), "target": torch.zeros(5, dtype=torch.int8), "image_id": 1}
    batches = list(batch_samples([None] * 3 + [sample] + [None] * 3 + [sample], 2, max_bad_run=3))
    assert [(len(b["image_id"]), b["n_bad"]) for b in batches] == [(2, 6)]  # a decodable sample ends a run
    with pytest.raises(RuntimeError, match="4 undecodable samples in a row"):
        list(batch_samples([None] * 4 + [sample], 2, max_bad_run=3))


@pytest.mark.parametrize("fmt", ["wds", "folder"])
def test_eval_batch_size_sets_the_evaluation_batch_size_apart_from_the_training_one(fmt, toy_root, shards):
    cfg = config(fmt, toy_root, shards, eval_batch_size=3)  # training batches: BATCH = 4
    num_val = dataset_info(cfg).num_val
    sizes = [len(b["image_id"]) for b in build_eval_loader(cfg, rank=0, world_size=1, decode="cpu")]
    assert sizes == [3] * (num_val // 3) + [num_val % 3] * (num_val % 3 > 0)


def test_bench_loader_reports_images_per_second(shards):
    result = bench_loader(shards, decode="cpu", workers=0, batches=3, batch_size=4, image_size=32)
    assert result["images"] == 12 and result["images_per_s"] > 0 and result["n_bad"] == 0


def test_bench_loader_reads_the_training_split_whatever_the_order_of_the_packed_splits(copied_shards):
    meta = read_meta(copied_shards)
    meta["splits"] = dict(reversed(meta["splits"].items()))  # val first
    (copied_shards / "meta.json").write_text(json.dumps(meta))
    assert bench_loader(copied_shards, batches=1, batch_size=2, image_size=32)["split"] == "train"


def test_bench_loader_without_workers_leaves_its_first_batch_untimed(shards, monkeypatch):
    def loader(cfg, **_):  # the first batch stands for start-up: counting it would skew the rate
        return [{"image_id": torch.arange(100), "n_bad": 0}] + [
            {"image_id": torch.arange(cfg.batch_size), "n_bad": 0}] * (cfg.steps_per_epoch - 1)

    monkeypatch.setattr(loader_module, "build_train_loader", loader)
    result = bench_loader(shards, decode="cpu", workers=0, batches=3, batch_size=4)
    assert result["batches"] == 3 and result["images"] == 12


def test_bench_loader_reports_the_workers_steady_rate_not_the_burst_of_their_first_batches(shards, monkeypatch):
    # 4 workers making a batch of 8 in 0.2 s: 160 images/s. Timed from the first batch, the other workers' first
    # batches (made alongside it) would count as made in no time: 8 batches would read 7 x 8 images in 0.2 s.
    monkeypatch.setattr(loader_module, "build_train_loader", lambda cfg, **_: timed_worker_loader(
        cfg.workers, cfg.steps_per_epoch, cfg.batch_size, seconds=0.2))
    result = bench_loader(shards, decode="cpu", workers=4, batches=7, batch_size=8)
    assert result["batches"] == 8 and result["images"] == 64  # whole rounds: two batches from every worker
    assert 0.85 * 160 <= result["images_per_s"] <= 1.05 * 160


@pytest.mark.parametrize("fmt", ["wds", "folder"])
def test_loader_workers_outlive_the_stop_signals_slurm_sends_every_process_of_the_job(fmt, toy_root, shards):
    """scancel, preemption and --signal=USR1 reach the workers too; PyTorch ends a worker on a SIGTERM its main
    process did not send, and the trainer then failed on the lost worker instead of finishing its step and
    saving. --signal=USR2 asks every process for its stacks: a worker prints them and goes on."""
    # Forked, the workers are this process's children (the other start methods: the tests further down).
    loader = build_train_loader(config(fmt, toy_root, shards, workers=2, worker_start="fork"), rank=0, world_size=1,
                                epoch=0, seed=0, decode="cpu")
    before = {child.pid for child in psutil.Process().children()}
    batches = iter(loader)
    next(batches)
    workers = [child for child in psutil.Process().children() if child.pid not in before]
    assert len(workers) == 2
    for worker in workers:
        for sig in ("TERM", "USR1", "INT", "USR2"):  # from another process, as SLURM's and the terminal's
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    assert 1 + sum(1 for _ in batches) == len(loader)


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_a_process_that_fails_with_its_loader_workers_running_exits(start, toy_root, shards, tmp_path):
    """An error raised while a loader is alive keeps it in the traceback until the interpreter exits, where
    multiprocessing ends the workers with SIGTERM, which they ignore, and then waits for them: it waited forever."""
    script = tmp_path / "fails.py"
    script.write_text(
        "from mlgcn_dist.config import DataConfig\n"
        "from mlgcn_dist.data.loader import build_train_loader\n"
        "if __name__ == '__main__':  # a forkserver's worker imports this file\n"
        f"    cfg = DataConfig(dataset='coco', format='wds', root={str(toy_root)!r}, shards={str(shards)!r},"
        f" image_size=32, batch_size=4, workers=2, pin_memory=False, worker_start={start!r})\n"
        "    batches = iter(build_train_loader(cfg, rank=0, world_size=1, epoch=0, seed=0, decode='cpu'))\n"
        "    next(batches)\n"
        "    raise RuntimeError('the training step failed')\n"
    )
    failed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "the training step failed" in failed.stderr


def _a_worker_that_never_yields(worker_id: int) -> None:
    time.sleep(60)  # as a worker deadlocked in its own fork (CPython gh-112275) never yields


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_a_loader_worker_that_yields_nothing_within_data_worker_timeout_s_fails_the_epoch_instead_of_hanging_it(
    fmt, toy_root, shards, monkeypatch
):
    """Seen with Python 3.11.7: a worker deadlocked while forking, its trainer waited forever, and under DDP every
    rank with it."""
    monkeypatch.setattr(loader_module, "init_worker", _a_worker_that_never_yields)  # forked workers inherit it
    loader = build_train_loader(config(fmt, toy_root, shards, workers=1, worker_timeout_s=2), rank=0, world_size=1,
                                epoch=0, seed=0, decode="cpu")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="DataLoader timed out after 2 seconds"):
        next(iter(loader))
    assert time.monotonic() - start < 30


def test_a_python_that_can_deadlock_a_forked_worker_is_warned_about_only_when_workers_are_forked():
    warning = workers_module.fork_warning(4, "fork", (3, 11, 7))
    assert "Python 3.11.7 can deadlock a data loader worker" in warning and "data.worker_start=forkserver" in warning
    assert workers_module.fork_warning(4, "fork", (3, 10, 14)) is not None
    assert workers_module.fork_warning(0, "fork", (3, 11, 7)) is None  # no workers: nothing is forked
    assert workers_module.fork_warning(1, "fork", (3, 11, 7)) is not None
    for start in ("forkserver", "spawn"):  # workers from a process without the trainer's threads
        assert workers_module.fork_warning(4, start, (3, 11, 7)) is None
    fixed = [workers_module.fork_warning(4, "fork", version) for version in ((3, 11, 10), (3, 12, 3))]
    assert fixed == [None, None]


def test_worker_start_fork_keeps_the_platforms_method_and_is_not_warned_about_where_that_method_is_spawn(
    monkeypatch,
):
    """macOS starts workers with spawn by default; data.worker_start=fork leaves it so, and nothing is forked."""
    monkeypatch.setattr(workers_module.multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert workers_module.worker_context("fork") is None
    assert workers_module.fork_warning(4, "fork", (3, 11, 7)) is None


def test_worker_start_auto_forks_the_workers_except_on_a_python_that_can_deadlock_a_forked_one(monkeypatch):
    """Seen here with Python 3.11.7: the demo's evaluation hung in one of two fresh clones, a worker deadlocked
    inside its own fork (gh-112275). auto then starts the workers from a forkserver, and says so once."""
    monkeypatch.setattr(workers_module.multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    assert workers_module.resolve_worker_start("auto", (3, 11, 7)) == "forkserver"
    assert workers_module.resolve_worker_start("auto", (3, 10, 14)) == "forkserver"
    assert [workers_module.resolve_worker_start("auto", v) for v in ((3, 11, 10), (3, 12, 3))] == ["fork", "fork"]
    assert workers_module.resolve_worker_start("fork", (3, 11, 7)) == "fork"  # asked for: kept, and warned about
    note = workers_module.auto_start_note(4, "auto", (3, 11, 7))
    assert "loader workers start from a forkserver, as Python 3.11.7 can deadlock a worker it forks" in note
    assert workers_module.fork_warning(4, "auto", (3, 11, 7)) is None
    assert workers_module.auto_start_note(4, "auto", (3, 12, 3)) is None  # forked, as fork would: nothing to say
    assert workers_module.auto_start_note(0, "auto", (3, 11, 7)) is None  # no workers
    assert workers_module.auto_start_note(4, "fork", (3, 11, 7)) is None  # fork_warning's case
    assert workers_module.auto_start_note(1, "auto", (3, 11, 7)) is not None
    for start in ("forkserver", "spawn"):  # asked for by name: auto chose nothing
        assert workers_module.auto_start_note(4, start, (3, 11, 7)) is None


def test_a_run_states_the_fork_warning_or_else_the_auto_note_once(monkeypatch):
    """What engine.train prints of how its workers start, on a Python that can deadlock a forked worker."""
    monkeypatch.setattr(workers_module.multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    monkeypatch.setattr(workers_module, "_fork_can_deadlock", lambda version: True)
    assert "can deadlock a data loader worker" in workers_module.worker_start_line(4, "fork")
    assert "loader workers start from a forkserver" in workers_module.worker_start_line(4, "auto")
    assert workers_module.worker_start_line(4, "spawn") is workers_module.worker_start_line(0, "auto") is None


def test_without_a_start_method_set_the_platforms_first_listed_one_is_in_effect(monkeypatch):
    """Linux lists fork first (before Python 3.14), macOS spawn; whether workers are forked follows it."""
    monkeypatch.setattr(workers_module.multiprocessing, "get_start_method", lambda allow_none=False: None)
    mp = workers_module.multiprocessing
    linux, macos = ["fork", "spawn", "forkserver"], ["spawn", "fork", "forkserver"]
    for methods, forked in ((linux, True), (macos, False)):
        monkeypatch.setattr(mp, "get_all_start_methods", lambda methods=methods: methods)
        assert workers_module.forks_workers("fork") is forked


def test_worker_start_auto_keeps_the_platforms_method_where_that_method_is_not_fork(monkeypatch):
    """macOS spawns its workers: nothing is forked, so auto has nothing to avoid."""
    monkeypatch.setattr(workers_module.multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert workers_module.resolve_worker_start("auto", (3, 11, 7)) == "fork"  # the platform's own method
    assert workers_module.worker_context("auto") is None
    assert workers_module.auto_start_note(4, "auto", (3, 11, 7)) is None


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_worker_start_reaches_the_training_and_evaluation_loaders_that_have_workers(fmt, toy_root, shards):
    def contexts(workers: int, start: str) -> list:
        cfg = config(fmt, toy_root, shards, workers, worker_start=start)
        train = build_train_loader(cfg, rank=0, world_size=1, epoch=0, seed=0, decode="cpu").loader
        return [loader.multiprocessing_context for loader in (train, build_eval_loader(cfg, rank=0, world_size=1,
                                                                                         decode="cpu"))]

    for start in ("forkserver", "spawn"):
        assert [context.get_start_method() for context in contexts(1, start)] == [start, start]
        assert contexts(0, start) == [None, None]  # DataLoader refuses a context without workers
    assert contexts(1, "fork") == [None, None]  # the platform's own method, as before data.worker_start


def assert_same_batches(batches: list[dict], expected: list[dict]) -> None:
    assert len(batches) == len(expected) > 0
    for batch, want in zip(batches, expected):
        assert batch["image_id"].tolist() == want["image_id"].tolist()
        assert torch.equal(batch["image"], want["image"]) and torch.equal(batch["target"], want["target"])
        assert (batch["n_bad"], batch["bad_ids"]) == (want["n_bad"], want["bad_ids"])


@pytest.mark.parametrize("fmt", ["folder", "wds"])
@pytest.mark.parametrize("start", ["forkserver", pytest.param("spawn", marks=pytest.mark.slow)])
def test_workers_started_by_forkserver_or_spawn_yield_the_batches_forked_workers_yield(start, fmt, toy_root, shards):
    """Nothing the workers need is inherited: the datasets, worker_init_fn and collate reach them pickled, and
    their seeds come from the loader, so training repeats its order and augmentation of a forked run exactly."""
    forked, started = (config(fmt, toy_root, shards, workers=2, worker_start=s) for s in ("fork", start))
    train = build_train_loader(started, rank=1, world_size=2, epoch=1, seed=3, decode="cpu")
    assert train.loader.multiprocessing_context.get_start_method() == start
    assert_same_batches(list(train), train_batches(forked, rank=1, world=2, epoch=1, seed=3))
    evaluation = build_eval_loader(started, rank=1, world_size=2, decode="cpu")
    assert_same_batches(list(evaluation), list(build_eval_loader(forked, rank=1, world_size=2, decode="cpu")))


class _Worker:
    def __init__(self, pid: int, alive: bool) -> None:
        self.pid, self.alive = pid, alive

    def is_alive(self) -> bool:
        return self.alive


class _Watched:
    """What _WorkersWatched reads of PyTorch's iterator: its workers and which of them it still waits for."""

    def __init__(self, workers: list[_Worker], waited_for: list[bool]) -> None:
        self._workers, self._workers_status = workers, waited_for

    def _mark_worker_as_unavailable(self, i: int) -> None:
        self._workers_status[i] = False


def test_only_a_worker_still_waited_for_is_named_dead(monkeypatch):
    """A worker whose share of an iterable dataset is done exits, and PyTorch stops waiting for it."""
    monkeypatch.setattr(workers_module, "_WORKERS_LOOKED_AT_EVERY_S", 0.05)
    raise_if_dead = workers_module._WorkersWatched._raise_if_a_worker_died
    raise_if_dead(_Watched([_Worker(101, alive=False), _Worker(102, alive=True)], [False, True]), None)
    watched = _Watched([_Worker(101, alive=False), _Worker(102, alive=False)], [False, True])
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid\(s\) 102\) exited unexpectedly"):
        raise_if_dead(watched, None)
    assert watched._workers_status == [False, False]


_TRAINER_WITH_FORKSERVER_WORKERS = """
import os, sys, time
from mlgcn_dist.config import DataConfig
from mlgcn_dist.data.loader import build_eval_loader
cfg = DataConfig(dataset="coco", format="wds", shards=sys.argv[1], image_size=32, batch_size=4, workers=2,
                 pin_memory=False, worker_start="forkserver", prefetch_factor=1)
batches = iter(build_eval_loader(cfg, rank=0, world_size=1, decode="cpu"))
next(batches)
print(*[worker.pid for worker in batches._workers], flush=True)
time.sleep(600)  # killed here, its workers alive and waiting to be asked for more
"""


@pytest.mark.slow
def test_forkserver_workers_and_their_server_end_with_a_trainer_killed_outright(shards):
    """A forkserver's workers are the server's children, and the server lives while they do: PyTorch's watchdog,
    which ends a worker whose parent is gone, kept them all alive after a SIGKILLed trainer, for good."""
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER_WITH_FORKSERVER_WORKERS, str(shards)],
                               stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in trainer.stdout.readline().split()]
    server = psutil.Process(workers[0]).ppid()
    assert len(workers) == 2 and server != trainer.pid
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 30
    while any(map(process_alive, [*workers, server])) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in [*workers, server] if process_alive(pid)]
    for pid in left:  # not to leave them to the next tests
        os.kill(pid, signal.SIGKILL)
    assert not left


@pytest.mark.parametrize("pinned", [False, pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("when", ["before_its_first_batch", "after_its_first_batch"])
def test_a_killed_forkserver_worker_fails_the_epoch_within_seconds_naming_it(when, pinned, toy_root, shards):
    """A forkserver's worker is the server's child, so no SIGCHLD tells the trainer it died (a forked or spawned
    worker's death fails the next wait at once). PyTorch, given a timeout, looked at its workers only when it
    expired: 40 s of a 40 s timeout for one killed before its first batch. One killed later failed the epoch with a
    ConnectionResetError or an EOFError, which name no worker (5 of 8 tries), as its next batch's tensors could no
    longer be fetched from it. Pinned (CUDA), that error ends PyTorch's pinning thread, which PyTorch, given a
    timeout, does not look at while it waits."""
    cfg = config("wds", toy_root, shards, workers=2, worker_start="forkserver", worker_timeout_s=120,
                 pin_memory=pinned)
    batches = iter(build_eval_loader(cfg, rank=0, world_size=1, decode="cpu"))  # 4 batches a worker
    victim = batches._workers[0].pid
    if when == "after_its_first_batch":
        next(batches), next(batches)  # one from each worker
    start = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=rf"DataLoader worker \(pid\(s\) {victim}\) exited unexpectedly"):
        list(batches)
    assert time.monotonic() - start < 15


_BLOCKED_AT_WORKER_START: list[int] = []  # set in a forked worker by _record_the_mask_then_init


def _record_the_mask_then_init(worker_id: int) -> None:
    _BLOCKED_AT_WORKER_START[:] = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    workers_module.init_worker(worker_id)


class _WorkerSignalState(torch.utils.data.IterableDataset):
    def __iter__(self):
        stop = [int(s) for s in SAVING_STOP_SIGNALS]
        now = {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])}
        yield {"blocked_at_start": [s for s in stop if s in _BLOCKED_AT_WORKER_START],
               "usr2_blocked_at_start": int(signal.SIGUSR2) in _BLOCKED_AT_WORKER_START,
               "blocked_now": [s for s in stop if s in now],
               "ignored": [s for s in stop if signal.getsignal(s) == signal.SIG_IGN]}


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_loader_workers_start_with_the_stop_signals_blocked_and_unblock_them_once_ignored():
    """So a stop signal that reaches a worker before its worker_init_fn waits for it, and is then dropped
    (and a SIGUSR2, which ends a process that has no answer to it yet, is answered); the trainer's own block
    ends as its workers are started."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader = workers_module.StopSafeDataLoader(_WorkerSignalState(), batch_size=None, num_workers=1,
                                              worker_init_fn=_record_the_mask_then_init)
    batches = iter(loader)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    (state,) = list(batches)
    stop = [int(s) for s in SAVING_STOP_SIGNALS]
    assert state == {"blocked_at_start": stop, "usr2_blocked_at_start": True, "blocked_now": [],
                     "ignored": stop}


_FIRST_SPAWNED_WORKERS_MASK = """
import sys
from multiprocessing import resource_tracker
from pathlib import Path
from mlgcn_dist.config import DataConfig
from mlgcn_dist.data.loader import build_eval_loader
cfg = DataConfig(dataset="coco", format="wds", shards=sys.argv[1], image_size=32, batch_size=4, workers=1,
                 pin_memory=False, worker_start="spawn")
batches = iter(build_eval_loader(cfg, rank=0, world_size=1, decode="cpu"))
for pid in (batches._workers[0].pid, resource_tracker._resource_tracker._pid):  # the worker still imports
    status = Path(f"/proc/{pid}/status").read_text()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16))
batches._shutdown_workers()
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_the_first_spawned_worker_of_a_process_starts_with_the_stop_signals_blocked_too(shards):
    """The first loader with spawned (or forkserver) workers starts multiprocessing's resource tracker, which
    blocks SIGINT and SIGTERM for its own start and unblocks them after (bpo-33613): started inside the loader's
    block, it ended the block for the workers (seen: a script signalling starting workers lost one in 1 of 8 and
    1 of 16 loaders, always its first). The tracker itself keeps SIGUSR1 and SIGUSR2 blocked, which SLURM
    sends every process of the step and which would end it. A fresh interpreter: no tracker runs yet."""
    out = subprocess.run([sys.executable, "-c", _FIRST_SPAWNED_WORKERS_MASK, str(shards)], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    worker, tracker = map(int, out.split())
    assert all(worker & (1 << (sig - 1)) for sig in SAVING_STOP_SIGNALS)
    assert all(tracker & (1 << (sig - 1)) for sig in (signal.SIGUSR1, signal.SIGUSR2))


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("start", ["fork", "forkserver", pytest.param("spawn", marks=pytest.mark.slow)])
def test_stop_signals_sent_to_starting_workers_do_not_end_them(start, toy_root, shards):
    """SLURM signals every process of a job step and Ctrl-C the whole process group, workers that are still
    starting included (a spawned one imports for seconds): each still yields its batches, as unsignalled."""
    cfg = config("wds", toy_root, shards, workers=2, worker_start=start, worker_timeout_s=120)  # not 600 s on a hang
    batches = iter(build_eval_loader(cfg, rank=0, world_size=1, decode="cpu"))
    for worker in batches._workers:  # started, not yet through their worker_init_fn (surely not when spawned)
        for sig in SAVING_STOP_SIGNALS:
            os.kill(worker.pid, sig)
    unsignalled = build_eval_loader(config("wds", toy_root, shards, workers=2), rank=0, world_size=1, decode="cpu")
    assert_same_batches(list(batches), list(unsignalled))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_forkserver_workers_come_from_a_server_that_already_holds_torch_and_holds_back_the_stop_signals(
    toy_root, shards
):
    """Forked from a preloaded forkserver, a worker starts without seconds of imports and cannot be ended by the
    stop signals SLURM sends every process of a job before it reaches its worker_init_fn: they are blocked, not
    only ignored (PyTorch's worker loop sets a SIGTERM handler of its own before that)."""
    cfg = config("wds", toy_root, shards, workers=1, worker_start="forkserver")
    batches = iter(build_eval_loader(cfg, rank=0, world_size=1, decode="cpu"))
    next(batches)
    worker = batches._workers[0].pid
    server = int(next(line.split()[1] for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                      if line.startswith("PPid:")))
    assert server != os.getpid()  # forked by the forkserver, not by this process
    status = Path(f"/proc/{server}/status").read_text()
    for mask in ("SigIgn:", "SigBlk:"):
        held = int(next(line.split()[1] for line in status.splitlines() if line.startswith(mask)), 16)
        assert all(held & (1 << (sig - 1)) for sig in SAVING_STOP_SIGNALS), mask
    maps = Path(f"/proc/{server}/maps").read_text()
    assert "libtorch" in maps and "torchvision" in maps  # torch, and what the loader imports besides (torchvision)
    batches._shutdown_workers()
