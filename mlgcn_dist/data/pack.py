"""Pack a COCO/VOC split into WebDataset tar shards plus ``meta.json`` (``mlgcn pack``).

One sample per image: key ``str(image_id)``, ``.jpg`` = the original file's bytes untouched (CMYK JPEGs and
other formats are re-encoded to RGB JPEG, grayscale JPEGs with other than 1x1 sampling with 1x1, each listed as
"converted"), ``.json`` = image id, file name, size, label indices and difficult indices. Records come from the
same readers as ``format=folder`` (``folder.read_split``), so a toy set and the real datasets pack by one code path.

Completeness is visible from the file names alone: a shard is written as ``<name>.partial`` and renamed when
closed, and ``meta.json`` is written last (atomically), so a killed pack never looks complete.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mlgcn_dist import __version__
from mlgcn_dist.arguments import positive_int
from mlgcn_dist.data.folder import check_same_label_space, read_split
from mlgcn_dist.data.jpeg import encoded, nvjpeg_misreads
from mlgcn_dist.data.records import UNREADABLE_IMAGE_ERRORS, ImageRecord, SplitIndex
from mlgcn_dist.files import fsync_directory, fsync_file, write_text_atomic
from mlgcn_dist.graph import label_stats, write_stats, write_stats_json

PACKER_VERSION = 1
DEFAULT_SHARD_SIZE = 500 * 10**6
DEFAULT_SPLITS = {"coco": ["train", "val"], "voc": ["trainval", "test"]}
# The split whose label statistics feed the graph, as ML-GCN computed them.
TRAINING_SPLIT = {"coco": "train", "voc": "trainval"}
META_FILE = "meta.json"
PARTIAL_SUFFIX = ".partial"
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SHARD_NAME = re.compile(r"^[a-z0-9]+-[A-Za-z0-9_]+-\d{6}\.tar(\.partial)?$")
# Image modes a JPEG may keep untouched: every decoder we use (PIL, nvJPEG via torchvision) reads them as RGB,
# nvJPEG a grayscale one only with 1x1 sampling (jpeg.nvjpeg_misreads).
_JPEG_MODES_KEPT = ("RGB", "L")
_PROGRESS_EVERY = 16  # images between progress reports from a worker process


class UndecodableImage(ValueError):
    """An image file that no decoder can read; the packer skips it and lists it in meta.json."""


def parse_size(text: str) -> int:
    """Bytes in "500MB", "1GB", "64MiB" or "1000" (decimal units as on disk labels; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"shard size {text!r}: expected a positive number with a unit such as 500MB or 1GB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def plan_shards(sizes: list[int], shard_size: int | None, shard_count: int | None) -> list[range]:
    """Contiguous record ranges, one per shard: ``shard_count`` equal parts, or cut where bytes exceed ``shard_size``.

    Deterministic in the record order and the file sizes, so packing the same input twice gives the same shards.
    """
    n = len(sizes)
    if shard_count is not None:
        parts = max(1, min(shard_count, n))
        return [range(i * n // parts, (i + 1) * n // parts) for i in range(parts)] if n else []
    limit = shard_size if shard_size is not None else DEFAULT_SHARD_SIZE
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            ranges.append(range(start, i))
            start, total = i, 0
        total += size
    if start < n:
        ranges.append(range(start, n))
    return ranges


def jpeg_bytes(path: str) -> tuple[bytes, str | None]:
    """The bytes to store for one image and why it was re-encoded (None: the original file, untouched).

    The image is fully decoded so that a truncated or corrupt file is caught here, once, rather than in every
    training epoch. What a decoder of ours would read otherwise than PIL (:mod:`mlgcn_dist.data.jpeg`) is
    re-encoded, so the shards need no fixing on the GPU path. Raises :class:`UndecodableImage` when PIL cannot
    read it.
    """
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if nvjpeg_misreads(img):
                sampling = "x".join(map(str, img.layer[0][1:3]))
                return encoded(img), f"JPEG L with {sampling} sampling re-encoded with 1x1 (nvJPEG misreads it)"
            if img.format == "JPEG" and img.mode in _JPEG_MODES_KEPT:
                return data, None
            return encoded(img.convert("RGB")), f"{img.format} {img.mode} re-encoded to RGB JPEG"
    except UNREADABLE_IMAGE_ERRORS as err:
        raise UndecodableImage(f"{path}: cannot decode image ({err})") from err


def sample_json(record: ImageRecord) -> dict:
    """The ``.json`` member of a sample: everything the loaders need besides the pixels."""
    return {
        "image_id": record.image_id,
        "file_name": record.file_name,
        "width": record.width,
        "height": record.height,
        "labels": list(record.labels),
        "difficult": list(record.difficult),
    }


def _record_note(record: ImageRecord, reason: str, detail: str) -> dict:
    """An entry of meta.json's skipped/converted lists, shaped like the readers' skipped entries."""
    return {"image_id": record.image_id, "file_name": record.file_name, "reason": reason, "detail": detail}


@dataclasses.dataclass(frozen=True)
class ShardTask:
    path: str  # final shard path; written as path + PARTIAL_SUFFIX first
    records: list[ImageRecord]


def pack_shard(task: ShardTask, report: Callable[[int], object]) -> dict:
    """Write one shard; returns {file, count, image_ids, skipped, converted}. ``report(n)`` counts progress."""
    partial = task.path + PARTIAL_SUFFIX
    image_ids, skipped, converted, unreported = [], [], [], 0
    try:
        # mtime fixed: packing the same input twice gives byte-identical shards.
        with wds.TarWriter(partial, encoder=False, mtime=0) as writer:
            for record in task.records:
                unreported += 1
                if unreported == _PROGRESS_EVERY:
                    report(unreported)
                    unreported = 0
                try:
                    data, reason = jpeg_bytes(record.path)
                except UndecodableImage as err:
                    skipped.append(_record_note(record, "undecodable", str(err)))
                    continue
                if reason is not None:
                    converted.append(_record_note(record, "converted", reason))
                sample = {
                    "__key__": str(record.image_id),
                    "jpg": data,
                    "json": json.dumps(sample_json(record)).encode("utf-8"),
                }
                writer.write(sample)
                image_ids.append(record.image_id)
        fsync_file(Path(partial))  # meta.json, written last and durably, must not list a shard still in memory
        os.replace(partial, task.path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    report(unreported)
    return {
        "file": os.path.basename(task.path),
        "count": len(image_ids),
        "image_ids": image_ids,
        "skipped": skipped,
        "converted": converted,
    }


def _progress_bar(total: int) -> tqdm:
    return tqdm(total=total, unit="img", desc="pack", dynamic_ncols=True)


def _run_tasks(tasks: list[ShardTask], workers: int) -> list[dict]:
    """Pack every shard, in parallel processes when ``workers > 1``, with an images/s progress bar."""
    total = sum(len(t.records) for t in tasks)
    if workers <= 1 or len(tasks) <= 1:
        with _progress_bar(total) as bar:
            return [pack_shard(task, bar.update) for task in tasks]
    # fork on Linux: a spawned worker would spend seconds importing torch (via webdataset) before packing. The
    # pool forks all its workers on the first submit, before any thread of ours (its manager thread, the
    # progress bar's monitor) exists, and the workers use neither torch nor tqdm.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with (
        context.Manager() as manager,
        ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool,
    ):
        progress = manager.Queue()
        futures = [pool.submit(pack_shard, task, progress.put) for task in tasks]
        pending = set(futures)
        with _progress_bar(total) as bar:
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                    for future in done:
                        future.result()  # re-raise a worker's error now, not after every other shard
                    while not progress.empty():
                        bar.update(progress.get())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return [future.result() for future in futures]


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse to pack over an earlier pack unless asked; with ``overwrite``, remove the files a pack writes."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"pack output {out} exists and is not a directory")
    ours = [
        p
        for p in out.iterdir()
        if p.name in (META_FILE, META_FILE + PARTIAL_SUFFIX)
        or _SHARD_NAME.match(p.name)
        or re.fullmatch(r"[a-z0-9]+_adj\.(pkl|json)", p.name)
    ]
    if ours and not overwrite:
        names = ", ".join(sorted(p.name for p in ours)[:5])
        raise FileExistsError(f"{out} already holds a pack ({names}, ...): pass --overwrite to replace it")
    # meta.json first: if this removal is interrupted, what is left no longer looks complete.
    for path in sorted(ours, key=lambda p: p.name != META_FILE):
        path.unlink()


def _split_tasks(
    dataset: str, index: SplitIndex, out: Path, shard_size: int | None, shard_count: int | None
) -> list[ShardTask]:
    sizes = [os.path.getsize(r.path) for r in index.records]
    ranges = plan_shards(sizes, shard_size, shard_count)
    return [
        ShardTask(str(out / f"{dataset}-{index.split}-{i:06d}.tar"), index.records[r.start : r.stop])
        for i, r in enumerate(ranges)
    ]


def skip_reasons(skipped: list[dict]) -> str:
    """``reason: count, ...`` of skipped entries (no_annotations, missing_file, undecodable ...), or "none"."""
    counts = collections.Counter(entry["reason"] for entry in skipped)
    return ", ".join(f"{reason}: {n}" for reason, n in counts.most_common()) or "none"


def _split_meta(index: SplitIndex, results: list[dict]) -> dict:
    shards = [{"file": r["file"], "count": r["count"]} for r in results]
    return {
        "shards": shards,
        "count": sum(s["count"] for s in shards),
        "skipped": index.skipped + [note for r in results for note in r["skipped"]],
        "converted": [note for r in results for note in r["converted"]],
    }


def _write_label_stats(dataset: str, index: SplitIndex, packed_ids: set[int], out: Path) -> dict:
    """ML-GCN statistics pickle + json twin of the packed (decodable) images of the training split."""
    packed = dataclasses.replace(index, records=[r for r in index.records if r.image_id in packed_ids])
    nums, adj = label_stats(packed.targets())
    pickle_name, json_name = f"{dataset}_adj.pkl", f"{dataset}_adj.json"
    write_stats(out / pickle_name, nums, adj)
    write_stats_json(out / json_name, nums, adj, index.labels.names)
    return {"split": index.split, "pickle": pickle_name, "json": json_name}


def pack_dataset(
    dataset: str,
    root: str | Path,
    out: str | Path,
    splits: list[str],
    shard_size: int | None = None,
    shard_count: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    keep_empty: bool = False,
) -> dict:
    """Pack ``splits`` of the dataset at ``root`` into shards under ``out``; returns the meta.json content.

    Give at most one of ``shard_size`` (bytes of source images per shard, default 500 MB) and ``shard_count``
    (shards per split). Label statistics are written when the training split (train / trainval) is packed.
    """
    if shard_size is not None and shard_count is not None:
        raise ValueError("give either shard_size or shard_count, not both")
    if (shard_count is not None and shard_count < 1) or (shard_size is not None and shard_size < 1):
        raise ValueError(f"shard_count and shard_size must be positive, got {shard_count} and {shard_size}")
    if not splits:
        raise ValueError("no split to pack")
    repeated = sorted({split for split in splits if splits.count(split) > 1})
    if repeated:  # its shards would be written twice over, the second pass renaming files the first moved
        raise ValueError(f"split {', '.join(repeated)} given more than once ({','.join(splits)}); name each once")
    out = Path(out)
    # Read every annotation file before touching the output: a wrong root fails without side effects.
    indexes = [read_split(dataset, root, split, keep_empty=keep_empty) for split in splits]
    reference = next((i for i in indexes if i.split == TRAINING_SPLIT[dataset]), indexes[0])
    for index in indexes:
        check_same_label_space(reference, index, root)  # meta.json holds one label space for every split
    for index in indexes:
        if not index.records:
            hint = "check --root and that the images are in place" if index.skipped else "its annotations list no image"
            raise ValueError(f"{root}: split '{index.split}' has no image to pack ({skip_reasons(index.skipped)}); "
                             f"{hint}")
    _check_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tasks = [_split_tasks(dataset, index, out, shard_size, shard_count) for index in indexes]
    flat_results = iter(_run_tasks([t for split_tasks in tasks for t in split_tasks], workers))
    results = [[next(flat_results) for _ in split_tasks] for split_tasks in tasks]
    stats = None
    for index, split_results in zip(indexes, results):
        if index.split == TRAINING_SPLIT[dataset]:
            packed_ids = {i for r in split_results for i in r["image_ids"]}
            stats = _write_label_stats(dataset, index, packed_ids, out)
    labels = reference.labels
    meta = {
        "dataset": dataset,
        "packer_version": PACKER_VERSION,
        "mlgcn_dist_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "root": str(Path(root).resolve()),
            "splits": list(splits),
            "shard_size": shard_size,
            "shard_count": shard_count,
            "workers": workers,
            "keep_empty": keep_empty,
        },
        "label_names": list(labels.names),
        "supercategories": list(labels.supercategories),
        "splits": {index.split: _split_meta(index, r) for index, r in zip(indexes, results)},
        "stats": stats,
        "pack_seconds": round(time.monotonic() - started, 1),
    }
    fsync_directory(out)  # the shards' renames before the meta.json that lists them
    write_text_atomic(out / META_FILE, json.dumps(meta, indent=1), tmp=out / (META_FILE + PARTIAL_SUFFIX))
    return meta


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mlgcn pack coco|voc --root DIR --out DIR ...``."""
    parser.add_argument("dataset", choices=sorted(DEFAULT_SPLITS), help="which reader and label space")
    parser.add_argument(
        "--root",
        required=True,
        help="dataset root in its original layout: COCO's folder of annotations/, train2014/, val2014/; for VOC the "
        "folder holding VOCdevkit/ (or VOCdevkit/VOC2007 itself)",
    )
    parser.add_argument("--out", required=True, help="output directory for the shards and meta.json")
    parser.add_argument(
        "--split",
        default=None,
        help="comma-separated splits (default: train,val for coco; trainval,test for voc)",
    )
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument(
        "--shard-size",
        type=_size_argument,
        default=None,
        help="source bytes per shard, e.g. 500MB (default) or 1GB",
    )
    sizing.add_argument(
        "--shard-count", type=positive_int, default=None, help="number of shards per split (instead of --shard-size)"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=min(8, os.cpu_count() or 1),
        help="shards packed in parallel processes (default: %(default)s, the CPU count up to 8)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pack in --out")
    parser.add_argument(
        "--keep-empty", action="store_true", help="keep images without annotations as all-negative samples"
    )


def run_pack(args: argparse.Namespace) -> int:
    """``mlgcn pack``: pack, then print one line per split."""
    splits = args.split.split(",") if args.split else DEFAULT_SPLITS[args.dataset]
    meta = pack_dataset(
        args.dataset,
        args.root,
        args.out,
        [s.strip() for s in splits if s.strip()],
        shard_size=args.shard_size,
        shard_count=args.shard_count,
        workers=args.workers,
        overwrite=args.overwrite,
        keep_empty=args.keep_empty,
    )
    for name, split in meta["splits"].items():
        print(
            f"{name}: {split['count']} images in {len(split['shards'])} shards, "
            f"{len(split['skipped'])} skipped ({skip_reasons(split['skipped'])}), {len(split['converted'])} converted"
        )
    print(f"wrote {Path(args.out) / META_FILE}")
    return 0
