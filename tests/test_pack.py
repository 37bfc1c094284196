"""Specifications of the shard packer (``mlgcn pack``): standard WebDataset shards, meta.json, label statistics."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import drop_category, photo
from PIL import Image

from mlgcn_dist.data import pack
from mlgcn_dist.data.folder import read_split
from mlgcn_dist.data.loader import read_meta
from mlgcn_dist.data.pack import (
    ShardTask,
    add_pack_arguments,
    pack_dataset,
    pack_shard,
    parse_size,
    plan_shards,
    run_pack,
    skip_reasons,
)
from mlgcn_dist.data.records import encode_target, label_space_difference
from mlgcn_dist.data.toy import make_toy
from mlgcn_dist.graph import label_stats, read_stats


@pytest.fixture(scope="module")
def packed(toy_root, tmp_path_factory) -> tuple[Path, dict]:
    """The conftest toy set packed into 3 shards per split."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    return out, pack_dataset("coco", toy_root, out, ["train", "val"], shard_count=3, workers=1)


def shard_paths(out: Path, meta: dict, split: str) -> list[str]:
    return [str(out / s["file"]) for s in meta["splits"][split]["shards"]]


def plain_wds_samples(urls: list[str]) -> list[dict]:
    """Samples read by webdataset alone: no code of ours involved."""
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_shards_list_with_tar_one_jpg_and_json_per_image_keyed_by_image_id(packed):
    out, meta = packed
    for split in ("train", "val"):
        for shard in meta["splits"][split]["shards"]:
            assert shard["file"].startswith(f"coco-{split}-") and shard["file"].endswith(".tar")
            names = subprocess.run(
                ["tar", "tf", str(out / shard["file"])], capture_output=True, text=True, check=True
            ).stdout.split()
            keys = [n.split(".", 1)[0] for n in names]
            assert len(names) == 2 * shard["count"]
            assert sorted(names) == sorted(f"{k}.{ext}" for k in set(keys) for ext in ("jpg", "json"))
            assert all(k.isdigit() for k in keys)


@pytest.mark.parametrize("split", ["train", "val"])
def test_plain_webdataset_reads_every_image_with_labels_and_untouched_bytes(packed, toy_root, split):
    out, meta = packed
    index = read_split("coco", toy_root, split)
    samples = plain_wds_samples(shard_paths(out, meta, split))
    assert len(samples) == len(index) == meta["splits"][split]["count"]
    by_id = {r.image_id: r for r in index.records}
    for sample in samples:
        info = json.loads(sample["json"])
        record = by_id[info["image_id"]]
        assert sample["__key__"] == str(record.image_id)
        assert (info["labels"], info["difficult"]) == (list(record.labels), list(record.difficult))
        assert (info["file_name"], info["width"], info["height"]) == (
            record.file_name,
            record.width,
            record.height,
        )
        assert sample["jpg"] == Path(record.path).read_bytes()
    assert [s["__key__"] for s in samples] == [str(r.image_id) for r in index.records]  # contiguous sharding


def test_label_stats_pickle_and_json_equal_stats_of_the_shards_training_targets(packed):
    out, meta = packed
    assert meta["stats"] == {"split": "train", "pickle": "coco_adj.pkl", "json": "coco_adj.json"}
    num_classes = len(meta["label_names"])
    infos = [json.loads(s["json"]) for s in plain_wds_samples(shard_paths(out, meta, "train"))]
    targets = np.stack([encode_target(i["labels"], i["difficult"], num_classes) for i in infos])
    nums, adj = label_stats(targets)
    read_nums, read_adj = read_stats(out / "coco_adj.pkl")
    np.testing.assert_array_equal(read_nums, nums)
    np.testing.assert_array_equal(read_adj, adj)
    twin = json.loads((out / "coco_adj.json").read_text())
    assert twin["label_names"] == meta["label_names"]
    assert twin["nums"] == nums.tolist() and twin["adj"] == adj.tolist()


def test_meta_records_labels_splits_skips_and_the_pack_config(packed, toy_root):
    _, meta = packed
    index = read_split("coco", toy_root, "val")
    assert meta["dataset"] == "coco" and meta["packer_version"] == pack.PACKER_VERSION
    assert meta["label_names"] == index.labels.names
    assert meta["supercategories"] == index.labels.supercategories
    assert meta["config"] == {  # keep_empty: the loaders refuse a data.keep_empty other than the pack's
        "root": str(Path(toy_root).resolve()), "splits": ["train", "val"], "shard_size": None,
        "shard_count": 3, "workers": 1, "keep_empty": False,
    }
    assert meta["splits"]["val"]["skipped"] == index.skipped  # images without annotations, from the reader
    assert meta["splits"]["val"]["converted"] == []
    assert "created" in meta


def test_parallel_pack_writes_the_same_bytes_as_a_serial_pack(toy_root, tmp_path):
    serial = pack_dataset("coco", toy_root, tmp_path / "serial", ["val"], shard_count=3, workers=1)
    parallel = pack_dataset("coco", toy_root, tmp_path / "parallel", ["val"], shard_count=3, workers=2)
    assert serial["splits"] == parallel["splits"]
    for shard in serial["splits"]["val"]["shards"]:
        assert (tmp_path / "serial" / shard["file"]).read_bytes() == (
            tmp_path / "parallel" / shard["file"]
        ).read_bytes()


def test_rerun_over_an_existing_pack_is_refused_unless_overwrite(toy_root, tmp_path):
    out = tmp_path / "shards"
    pack_dataset("coco", toy_root, out, ["val"], shard_count=2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack_dataset("coco", toy_root, out, ["val"], shard_count=2)
    (out / "meta.json").unlink()  # shards alone also count as an earlier pack
    with pytest.raises(FileExistsError, match="coco-val-000000.tar"):
        pack_dataset("coco", toy_root, out, ["val"], shard_count=2)
    meta = pack_dataset("coco", toy_root, out, ["val"], shard_count=1, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["coco-val-000000.tar"]
    assert read_meta(out)["splits"] == meta["splits"]


def test_overwrite_without_the_training_split_leaves_no_statistics_of_the_old_pack(toy_root, tmp_path):
    out = tmp_path / "shards"
    pack_dataset("coco", toy_root, out, ["train"], shard_count=1)
    assert (out / "coco_adj.pkl").exists() and (out / "coco_adj.json").exists()
    meta = pack_dataset("coco", toy_root, out, ["val"], shard_count=1, overwrite=True)
    assert meta["stats"] is None
    assert sorted(p.name for p in out.iterdir()) == ["coco-val-000000.tar", "meta.json"]


def test_shard_count_splits_records_into_contiguous_near_equal_shards(toy_root, tmp_path):
    meta = pack_dataset("coco", toy_root, tmp_path / "s", ["val"], shard_count=4)
    counts = [s["count"] for s in meta["splits"]["val"]["shards"]]
    assert (
        len(counts) == 4 and sum(counts) == meta["splits"]["val"]["count"] and max(counts) - min(counts) <= 1
    )


def test_shard_size_caps_the_source_bytes_of_each_shard(toy_root, tmp_path):
    index = read_split("coco", toy_root, "val")
    sizes = [Path(r.path).stat().st_size for r in index.records]
    limit = sum(sizes) // 3
    meta = pack_dataset("coco", toy_root, tmp_path / "s", ["val"], shard_size=limit)
    shards = meta["splits"]["val"]["shards"]
    assert len(shards) >= 3
    start = 0
    for shard in shards:
        assert sum(sizes[start : start + shard["count"]]) <= limit
        start += shard["count"]


def test_plan_shards_cuts_by_bytes_or_count_and_never_leaves_an_empty_shard():
    assert plan_shards([5, 5, 5, 5], 10, None) == [range(0, 2), range(2, 4)]
    assert plan_shards([20, 1, 1], 10, None) == [
        range(0, 1),
        range(1, 3),
    ]  # an oversized image gets its own shard
    assert plan_shards([1] * 10, None, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    assert plan_shards([1, 1], None, 5) == [range(0, 1), range(1, 2)]
    assert plan_shards([], None, 3) == [] == plan_shards([], 10, None)


@pytest.mark.parametrize(("sizing", "message"), [
    ({"shard_count": 0}, "must be positive"),
    ({"shard_size": 0}, "must be positive"),
    ({"shard_count": 2, "shard_size": 10**6}, "either shard_size or shard_count, not both"),
])
def test_pack_dataset_refuses_shard_sizing_it_cannot_honour(sizing, message, toy_root, tmp_path):
    with pytest.raises(ValueError, match=message):
        pack_dataset("coco", toy_root, tmp_path / "shards", ["val"], **sizing)
    assert not (tmp_path / "shards").exists()


def test_pack_progress_counts_each_image_once(toy_root, tmp_path):
    records = read_split("coco", toy_root, "train").records
    assert len(records) > 2 * pack._PROGRESS_EVERY  # reported in steps, and the rest at the end
    reports: list[int] = []
    pack_shard(ShardTask(str(tmp_path / "coco-train-000000.tar"), records), reports.append)
    assert sum(reports) == len(records) and max(reports) <= pack._PROGRESS_EVERY


def test_skip_reasons_counts_each_reason_most_frequent_first():
    skipped = [{"reason": "missing_file"}, {"reason": "undecodable"}, {"reason": "undecodable"}]
    assert skip_reasons(skipped) == "undecodable: 2, missing_file: 1"
    assert skip_reasons([]) == "none"


def test_parse_size_reads_decimal_and_binary_units_and_rejects_nonsense():
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GB") == parse_size("1 gb") == 10**9
    assert parse_size("64MiB") == 64 * 2**20
    assert parse_size("4096") == 4096
    assert [parse_size(f"2{unit}") for unit in ("B", "KB", "KiB", "GiB", "TB", "TiB")] == [
        2, 2000, 2 * 2**10, 2 * 2**30, 2 * 10**12, 2 * 2**40]
    assert parse_size("1.5GB") == 1_500_000_000
    for bad in ("", "MB", "5XB", "-1GB", "0MB"):
        with pytest.raises(ValueError, match="shard size"):
            parse_size(bad)


def test_interrupted_pack_leaves_nothing_that_looks_complete(toy_root, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    real, calls = pack.jpeg_bytes, []

    def dies_on_the_fifteenth_image(path):
        calls.append(path)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(pack, "jpeg_bytes", dies_on_the_fifteenth_image)
    with pytest.raises(KeyboardInterrupt):
        pack_dataset("coco", toy_root, out, ["val"], shard_count=3)
    assert not (out / "meta.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["coco-val-000000.tar"]  # only the shard that was closed
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_meta(out)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads file names of descriptors from /proc")
def test_a_pack_whose_meta_json_cannot_reach_the_disk_leaves_no_meta_json(toy_root, tmp_path, monkeypatch):
    out = tmp_path / "shards"

    real_fsync = os.fsync

    def disk_full_at_meta_json(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("meta.json.partial"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_at_meta_json)
    with pytest.raises(OSError, match="No space left"):
        pack_dataset("coco", toy_root, out, ["val"], shard_count=2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["coco-val-000000.tar", "coco-val-000001.tar"]
    assert not (out / "meta.json").exists() and not (out / "meta.json.partial").exists()
    with pytest.raises(FileNotFoundError, match="no complete pack"):
        read_meta(out)


def test_overwrite_removes_the_old_meta_json_before_any_shard(toy_root, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    pack_dataset("coco", toy_root, out, ["val"], shard_count=2)
    real_unlink, removed = Path.unlink, []

    def interrupted_after_the_first_removal(path, *args, **kwargs):
        if removed:
            raise KeyboardInterrupt
        removed.append(path.name)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", interrupted_after_the_first_removal)
    with pytest.raises(KeyboardInterrupt):
        pack_dataset("coco", toy_root, out, ["val"], shard_count=1, overwrite=True)
    monkeypatch.undo()
    assert removed == ["meta.json"]
    assert (out / "coco-val-000000.tar").exists() and (out / "coco-val-000001.tar").exists()
    with pytest.raises(FileNotFoundError, match="no complete pack"):
        read_meta(out)  # what is left of the old pack no longer looks complete


def test_a_killed_packs_partial_shard_never_counts_and_blocks_a_rerun_without_overwrite(toy_root, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "coco-val-000000.tar.partial").write_bytes(b"half a tar")  # what a SIGKILL mid-shard leaves
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_meta(out)
    with pytest.raises(FileExistsError):
        pack_dataset("coco", toy_root, out, ["val"], shard_count=1)
    pack_dataset("coco", toy_root, out, ["val"], shard_count=1, overwrite=True)
    assert not list(out.glob("*.partial"))


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (24, 16), (10, 200, 30, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 10, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_broken_images_are_skipped_and_png_or_cmyk_reencoded_and_all_listed(tmp_path):
    root = tmp_path / "toy"
    make_toy(root, train=10, val=4, size=32, seed=1)
    records = read_split("coco", root, "train").records
    corrupt, truncated, png, cmyk, cut_in_scan = records[:5]
    Path(corrupt.path).write_bytes(b"this is not an image")
    Path(truncated.path).write_bytes(Path(truncated.path).read_bytes()[:300])
    data = Path(cut_in_scan.path).read_bytes()  # its header intact: PIL opens it, only decoding fails
    Path(cut_in_scan.path).write_bytes(data[: len(data) * 3 // 4])
    Path(png.path).write_bytes(_png())
    Path(cmyk.path).write_bytes(_cmyk_jpeg())
    meta = pack_dataset("coco", root, tmp_path / "shards", ["train"], shard_count=2)

    split = meta["splits"]["train"]
    skipped = {s["image_id"] for s in split["skipped"] if s["reason"] == "undecodable"}
    assert skipped == {corrupt.image_id, truncated.image_id, cut_in_scan.image_id}
    assert {c["image_id"]: c["detail"].split()[:2] for c in split["converted"]} == {
        png.image_id: ["PNG", "RGB"],
        cmyk.image_id: ["JPEG", "CMYK"],
    }
    assert split["count"] == len(records) - 3
    samples = {s["__key__"]: s for s in plain_wds_samples(shard_paths(tmp_path / "shards", meta, "train"))}
    assert not {str(r.image_id) for r in (corrupt, truncated, cut_in_scan)} & set(samples)
    for record in (png, cmyk):
        with Image.open(io.BytesIO(samples[str(record.image_id)]["jpg"])) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (24, 16))
    nums, _ = read_stats(tmp_path / "shards" / "coco_adj.pkl")  # statistics of the packed images only
    kept = [r for r in records if r.image_id not in skipped]
    assert nums.sum() == sum(len(r.labels) for r in kept)


def test_a_grayscale_jpeg_is_stored_untouched_with_1x1_sampling_and_re_encoded_to_it_otherwise(tmp_path):
    """nvJPEG misreads grayscale JPEGs of other sampling (jpeg.nvjpeg_misreads), 1x1 ones it reads as PIL."""
    root = tmp_path / "toy"
    make_toy(root, train=6, val=2, size=32, seed=1)
    odd, plain = read_split("coco", root, "train").records[:2]
    photo(mode="L").save(odd.path, "JPEG", quality=90, subsampling=2)
    photo(mode="L").save(plain.path, "JPEG", quality=90)
    meta = pack_dataset("coco", root, tmp_path / "shards", ["train"], shard_count=1)
    (converted,) = meta["splits"]["train"]["converted"]
    assert converted["image_id"] == odd.image_id and converted["detail"].startswith("JPEG L with 2x2 sampling")
    samples = {s["__key__"]: s for s in plain_wds_samples(shard_paths(tmp_path / "shards", meta, "train"))}
    with Image.open(io.BytesIO(samples[str(odd.image_id)]["jpg"])) as stored:
        assert (stored.format, stored.mode, stored.layer[0][1:3]) == ("JPEG", "L", (1, 1))
    assert samples[str(plain.image_id)]["jpg"] == Path(plain.path).read_bytes()


def test_splits_with_different_label_spaces_are_refused_naming_both_annotation_files(tmp_path):
    root = tmp_path / "toy"
    make_toy(root, train=6, val=4, size=32, seed=1)
    drop_category(root, "val", "bicycle")  # every val label after it would shift down by one
    with pytest.raises(
        ValueError,
        match=r"instances_train2014.json and .*instances_val2014.json list different label spaces "
        r"\(only in 'train': \['bicycle'\]; only in 'val': \[\]\)",
    ):
        pack_dataset("coco", root, tmp_path / "shards", ["train", "val"], shard_count=1)
    assert not (tmp_path / "shards").exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads file names of descriptors from /proc")
@pytest.mark.parametrize("splits", [["train", "val"], ["val"]])  # val alone: no statistics file syncs the dir
def test_every_file_a_pack_writes_reaches_the_disk_before_meta_json_names_it(splits, toy_root, tmp_path,
                                                                             monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "shards"
    meta = pack_dataset("coco", toy_root, out, splits, shard_count=2)
    meta_at = synced.index(str(out / "meta.json.partial"))
    shards = [str(out / s["file"]) + ".partial" for split in meta["splits"].values() for s in split["shards"]]
    stats = [p for p in synced if Path(p).name.startswith((".coco_adj.pkl.tmp", ".coco_adj.json.tmp"))]
    expected_stats = 2 if "train" in splits else 0
    assert set(shards) <= set(synced[:meta_at]) and len(stats) == expected_stats
    assert all(synced.index(p) < meta_at for p in stats)
    assert str(out) in synced[:meta_at]  # the shards' renames are in the directory before meta.json is
    assert synced[-1] == str(out)  # and meta.json's own rename


def test_voc_packs_trainval_statistics_and_difficult_labels(voc_root, voc_labels, tmp_path):
    meta = pack_dataset("voc", voc_root, tmp_path / "shards", ["trainval", "test"], shard_count=2)
    assert meta["stats"]["split"] == "trainval"
    assert {k: v["count"] for k, v in meta["splits"].items()} == {k: len(v) for k, v in voc_labels.items()}
    samples = plain_wds_samples(shard_paths(tmp_path / "shards", meta, "trainval"))
    names = meta["label_names"]
    by_stem = {json.loads(s["json"])["file_name"][:-4]: json.loads(s["json"]) for s in samples}
    for stem, (present, difficult) in voc_labels["trainval"].items():
        assert sorted(names[i] for i in by_stem[stem]["labels"]) == sorted(present)
        assert sorted(names[i] for i in by_stem[stem]["difficult"]) == sorted(difficult)


def test_missing_annotations_fail_naming_the_path_before_writing_anything(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        pack_dataset("coco", tmp_path / "nowhere", tmp_path / "shards", ["train"], shard_count=1)
    assert not (tmp_path / "shards").exists()


def pack_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_pack_arguments(parser)
    return parser


def test_cli_arguments_pack_and_report_each_split(toy_root, tmp_path, capsys):
    parser = pack_parser()
    out = tmp_path / "shards"
    args = parser.parse_args(
        [
            "coco",
            "--root",
            str(toy_root),
            "--out",
            str(out),
            "--split",
            " val,",  # as typed: spaces and a trailing comma
            "--shard-size",
            "1MB",
            "--workers",
            "1",
        ]
    )
    assert args.shard_size == 10**6
    assert run_pack(args) == 0
    assert capsys.readouterr().out == (
        "val: 31 images in 1 shards, 1 skipped (no_annotations: 1), 0 converted\n"
        f"wrote {out / 'meta.json'}\n"
    )
    assert read_meta(out)["config"]["shard_size"] == 10**6
    with pytest.raises(SystemExit):
        parser.parse_args(["coco", "--root", "r", "--out", "o", "--shard-size", "lots"])
    with pytest.raises(SystemExit):
        parser.parse_args(["coco", "--root", "r", "--out", "o", "--shard-size", "1GB", "--shard-count", "2"])


def test_cli_packs_coco_train_and_val_when_no_split_is_given(toy_root, tmp_path):
    out = tmp_path / "shards"
    argv = ["coco", "--root", str(toy_root), "--out", str(out), "--shard-count", "1"]
    args = pack_parser().parse_args(argv)
    assert run_pack(args) == 0
    assert list(read_meta(out)["splits"]) == ["train", "val"]


def test_a_split_named_twice_is_refused_before_anything_is_written(toy_root, tmp_path):
    """The second pass of the split renamed the first's moved shards: a raw errno and half a pack."""
    out = tmp_path / "pack"
    with pytest.raises(ValueError, match=r"split train given more than once \(train,val,train\); name each once"):
        pack_dataset("coco", toy_root, out, ["train", "val", "train"], shard_count=2)
    assert not out.exists()


def test_a_split_whose_annotations_list_no_image_says_so(tmp_path):
    root = tmp_path / "coco"
    for folder in ("annotations", "train2014"):
        (root / folder).mkdir(parents=True)
    empty = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat", "supercategory": "animal"}]}
    (root / "annotations" / "instances_train2014.json").write_text(json.dumps(empty))
    with pytest.raises(ValueError, match=r"split 'train' has no image to pack \(none\); its annotations list no image"):
        pack_dataset("coco", root, tmp_path / "pack", ["train"])


@pytest.mark.parametrize(
    ("trained", "dataset", "said"),
    [
        (["cat", "dog"], ["cat", "dog"], None),
        (["cat", "dog"], ["cat", "dog", "cow"], "2 labels, the dataset has 3"),
        (["cat", "dog", "cow"], ["cat", "cow", "dog"],
         "the dataset's 3 labels in another order (label 1 is 'dog', the dataset's 'cow')"),
        (["a", "b", "c", "d", "e"], ["a", "v", "w", "x", "y"],
         "5 labels, 4 of them not the dataset's ('b', 'c', 'd', ...)"),
        (["a", "b", "c", "d"], ["a", "x", "y", "z"], "4 labels, 3 of them not the dataset's ('b', 'c', 'd')"),
    ],
)
def test_label_space_difference_says_whether_count_order_or_names_differ(trained, dataset, said):
    assert label_space_difference(trained, dataset) == said
