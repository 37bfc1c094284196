"""Training and evaluation loaders over WebDataset shards (``data.format=wds``) or the original layout (``folder``).

Both formats yield the batch dict of :mod:`mlgcn_dist.data.folder` ("image" or "jpeg", "target", "image_id",
"n_bad") and keep the same two promises, which distributed training depends on:

* Training: every rank yields exactly :func:`steps_per_epoch` batches per epoch (``len(loader)``), so no rank waits
  forever in a collective for a peer that ran out of data, and an epoch trains on each image once. A pass is the
  samples of all shards, the shards in a (seed, epoch, pass)-shuffled order; every (rank, worker) consumer reads its
  own span of that sequence (:func:`train_span`: the spans of one pass are disjoint and cover it, whatever the
  number of shards), shuffled in a buffer that empties before the next pass. A consumer that needs more samples
  than its span holds (skipped images, more steps than one pass) goes on with its span of the next pass, so it
  never runs dry. A span may start inside a shard: the reader seeks to it over the tar headers. The sample
  shuffle buffer and augmentation come from (seed, epoch, rank, worker): runs are reproducible, and nothing
  depends on pid or time.
* Evaluation: every sample exactly once across all ranks and workers, no padding, no drop. The samples (in
  meta.json order) are cut into one contiguous range per rank, then per worker; a worker reads only the shards its
  range touches. A rank whose range is empty (more ranks than samples) yields no batch: evaluation gathers with
  uneven counts, so this cannot hang.

A JPEG that does not decode is skipped, counted in the next batch's ``n_bad`` (a trailing one in a batch of
B = 0) and named by image id in its ``bad_ids``: evaluation reports every image it could not score. A truncated
shard costs training the rest of that shard (a warning names it; the samples meta.json lists but the tar lost count
in ``n_bad``) but stops evaluation with an error naming it: evaluation must never silently score fewer images.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import statistics
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from mlgcn_dist.config import ConfigError, DataConfig
from mlgcn_dist.data.folder import FolderDataset, check_same_label_space, collate, read_split
from mlgcn_dist.data.jpeg import device_decodable_jpeg
from mlgcn_dist.data.pack import META_FILE, TRAINING_SPLIT
from mlgcn_dist.data.records import UNREADABLE_IMAGE_ERRORS, Skipped, SplitIndex, encode_target
from mlgcn_dist.data.shared_memory import release_each
from mlgcn_dist.data.transforms import CpuTransform
from mlgcn_dist.data.workers import StopSafeDataLoader, end_workers_at_exit, init_worker, worker_context
from mlgcn_dist.graph import label_stats, read_stats
from mlgcn_dist.threads import intra_op_threads

# Distinct first words keep the seed streams of different purposes apart (see _seed).
_SEED_SHARD_ORDER, _SEED_WORKER, _SEED_LOADER, _SEED_PERMUTATION, _SEED_DEVICE_AUGMENT = 1, 2, 3, 4, 5
_WDS_SKIPPED = r"__[^/]*__($|/)"  # webdataset's tar reader drops such metadata members (its skip_meta)


class ShardError(RuntimeError):
    """A shard that cannot be read as meta.json describes it; the message names the shard."""


class Shard(NamedTuple):
    path: str
    count: int  # samples, as listed in meta.json


@dataclass
class DatasetInfo:
    label_names: list[str]
    supercategories: list[str]
    num_classes: int
    nums: np.ndarray  # label counts of the training split (ML-GCN statistics)
    adj: np.ndarray  # label co-occurrence counts of the training split
    num_train: int
    num_val: int


@dataclass
class TrainLoader:
    """One epoch of training batches: exactly ``steps`` of them on every rank."""

    loader: Iterable[dict]
    steps: int

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader)


# ----------------------------------------------------------------------------------------------- metadata


def read_meta(shards_dir: str | Path) -> dict:
    """meta.json of a pack, after checking that every shard it lists exists (a missing shard is named)."""
    path = Path(shards_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {shards_dir} holds no complete pack (run `mlgcn pack`; an interrupted pack has no "
            f"meta.json)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    missing_keys = [k for k in ("dataset", "label_names", "supercategories", "splits") if k not in meta]
    if missing_keys:
        raise ConfigError(
            f"{path}: missing key(s) {', '.join(missing_keys)}; not a meta.json written by mlgcn pack"
        )
    _check_meta_structure(meta, path)
    for split, body in meta["splits"].items():
        for shard in body["shards"]:
            if not (Path(shards_dir) / shard["file"]).is_file():
                raise FileNotFoundError(
                    f"shard {Path(shards_dir) / shard['file']} of split '{split}', listed in "
                    f"{path}, is missing"
                )
    return meta


def _check_meta_structure(meta: dict, path: Path) -> None:
    """The parts of meta.json the loaders read, each of the type the packer writes, or a ConfigError naming it."""

    def fail(where: str, expected: str) -> None:
        raise ConfigError(f"{path}: {where}: expected {expected}; not a meta.json written by mlgcn pack")

    for key in ("label_names", "supercategories"):
        if not isinstance(meta[key], list) or not all(isinstance(name, str) for name in meta[key]):
            fail(f"'{key}'", "a list of strings")
    if len(meta["supercategories"]) != len(meta["label_names"]):
        fail("'supercategories'", f"one per label ({len(meta['label_names'])})")
    if not isinstance(meta["splits"], dict):
        fail("'splits'", "an object of split name -> {shards, count}")
    for split, body in meta["splits"].items():
        shards = body.get("shards") if isinstance(body, dict) else None
        if not isinstance(shards, list):
            fail(f"split '{split}'", "an object with 'shards' (a list) and 'count'")
        for i, shard in enumerate(shards):
            if not (
                isinstance(shard, dict)
                and isinstance(shard.get("file"), str)
                and isinstance(shard.get("count"), int)
                and shard["count"] >= 0
            ):
                fail(f"split '{split}' shard {i}", "an object with 'file' (a file name) and 'count' (an integer >= 0)")
        if not isinstance(body.get("count"), int):
            fail(f"split '{split}' 'count'", "an integer")
    stats = meta.get("stats")
    if stats is not None and not (
        isinstance(stats, dict) and all(isinstance(stats.get(k), str) for k in ("split", "pickle"))
    ):
        fail("'stats'", "null or an object with 'split' and 'pickle' (strings)")


def _packed_split(meta: dict, shards_dir: str | Path, split: str) -> dict:
    if split not in meta["splits"]:
        raise ConfigError(
            f"{Path(shards_dir) / META_FILE}: no split '{split}'; packed splits: {', '.join(meta['splits'])}"
        )
    return meta["splits"][split]


def _split_shards(meta: dict, shards_dir: str | Path, split: str) -> list[Shard]:
    return [Shard(str(Path(shards_dir) / s["file"]), int(s["count"]))
            for s in _packed_split(meta, shards_dir, split)["shards"]]


def _checked_meta(data_cfg: DataConfig) -> dict:
    """The pack's meta.json, checked to hold ``data.dataset``."""
    meta = read_meta(data_cfg.shards)
    if meta["dataset"] != data_cfg.dataset:
        raise ConfigError(
            f"{Path(data_cfg.shards) / META_FILE}: shards of '{meta['dataset']}' but "
            f"data.dataset={data_cfg.dataset}"
        )
    # The pack decided which images exist; a setting that says otherwise would change the mAP's images unseen.
    packed_config = meta.get("config")
    packed_empty = packed_config.get("keep_empty", False) if isinstance(packed_config, dict) else False
    if data_cfg.dataset == "coco" and packed_empty != data_cfg.keep_empty:
        raise ConfigError(
            f"{Path(data_cfg.shards) / META_FILE}: packed {'with' if packed_empty else 'without'} the images that "
            f"have no annotation (mlgcn pack --keep-empty) but data.keep_empty={str(data_cfg.keep_empty).lower()}: "
            f"set data.keep_empty={str(packed_empty).lower()} or pack again "
            f"{'without' if packed_empty else 'with'} --keep-empty"
        )
    return meta


@lru_cache(maxsize=8)
def _cached_split(dataset: str, root: str, split: str, keep_empty: bool) -> SplitIndex:
    """read_split, once per process: loaders are rebuilt every epoch and COCO's annotation files take seconds."""
    return read_split(dataset, root, split, keep_empty=keep_empty)


def _folder_split(data_cfg: DataConfig, split: str) -> SplitIndex:
    return _cached_split(data_cfg.dataset, str(data_cfg.root), split, data_cfg.keep_empty)


def split_label_names(data_cfg: DataConfig, split: str) -> list[str]:
    """The label space as ``split`` holds it: what evaluating a trained model needs, without reading (or having)
    the training split (COCO's training annotations take seconds to parse)."""
    if data_cfg.format == "wds":
        return list(_checked_meta(data_cfg)["label_names"])
    return list(_folder_split(data_cfg, split).labels.names)


def dataset_info(data_cfg: DataConfig, val: bool = True) -> DatasetInfo:
    """Label space, training-split label statistics and split sizes, for either data format. ``val=False``: the
    validation split is not read (num_val 0), for work that trains only (the benchmark)."""
    if data_cfg.format == "wds":
        meta = _checked_meta(data_cfg)
        stats = meta.get("stats")
        if not stats or stats["split"] != data_cfg.train_split:
            packed = f"statistics of split '{stats['split']}'" if stats else "none"
            raise ConfigError(
                f"{Path(data_cfg.shards) / META_FILE}: no label statistics of the training split "
                f"data.train_split='{data_cfg.train_split}' (the pack holds {packed}; `mlgcn pack` computes them "
                f"for {data_cfg.dataset}'s training split '{TRAINING_SPLIT[data_cfg.dataset]}')"
            )
        nums, adj = read_stats(Path(data_cfg.shards) / stats["pickle"])
        names, supers = meta["label_names"], meta["supercategories"]
        # A split that was not packed is named as such (it read as one of no image).
        num_train = _packed_split(meta, data_cfg.shards, data_cfg.train_split)["count"]
        num_val = _packed_split(meta, data_cfg.shards, data_cfg.val_split)["count"] if val else 0
    elif data_cfg.format == "folder":
        train = _folder_split(data_cfg, data_cfg.train_split)
        num_val = 0
        if val:
            val_split = _folder_split(data_cfg, data_cfg.val_split)
            try:
                check_same_label_space(train, val_split, data_cfg.root)
            except ValueError as err:
                raise ConfigError(str(err)) from err
            num_val = len(val_split)
        nums, adj = label_stats(train.targets())
        names, supers = train.labels.names, train.labels.supercategories
        num_train = len(train)
    else:
        raise ValueError(f"data.format must be 'wds' or 'folder', got {data_cfg.format!r}")
    return DatasetInfo(list(names), list(supers), len(names), nums, adj, num_train, num_val)


# ----------------------------------------------------------------------------------------------- helpers


def steps_per_epoch(data_cfg: DataConfig, num_train: int, world_size: int) -> int:
    """Batches per rank per epoch: data.steps_per_epoch, else the training set over the global batch (>= 1)."""
    return data_cfg.steps_per_epoch or max(1, num_train // (data_cfg.batch_size * world_size))


def _seed(*parts: int) -> int:
    """A 64-bit seed mixed from ints (SeedSequence: no pid, no time, the same in every process)."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1, np.uint64)[0])


def device_augment_rng(seed: int, epoch: int, rank: int, batch_index: int) -> random.Random:
    """The random draws of the device augmentation (GPU decode) of one training batch: a function of its place in
    the run alone, so a run resumed mid-epoch crops as an uninterrupted one does."""
    return random.Random(_seed(_SEED_DEVICE_AUGMENT, seed, epoch, rank, batch_index))


def _part(n: int, part: int, parts: int) -> range:
    """The ``part``-th of ``parts`` contiguous, near-equal pieces of range(n)."""
    return range(n * part // parts, n * (part + 1) // parts)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def loader_kwargs(data_cfg: DataConfig, seed: int, epoch: int, rank: int) -> dict:
    """A :class:`StopSafeDataLoader`'s arguments for ``data_cfg``: its workers, how they start, are seeded, time
    out and are ended at exit, and pinning."""
    kwargs = {
        "num_workers": data_cfg.workers,
        "pin_memory": data_cfg.pin_memory and torch.cuda.is_available(),
        "persistent_workers": False,  # a loader lives one epoch: its dataset carries that epoch's seeds
        "worker_init_fn": init_worker,
        "generator": torch.Generator().manual_seed(_seed(_SEED_LOADER, seed, epoch, rank)),
    }
    if data_cfg.workers > 0:
        kwargs["prefetch_factor"] = data_cfg.prefetch_factor
        # A worker that never yields (one forked by CPython before 3.11.10 can deadlock in the fork itself,
        # gh-112275, seen here with 3.11.7) would hang its trainer for good (the other ranks until
        # train.dist_timeout_s): the timeout turns that into an error the run can be resumed from.
        kwargs["timeout"] = data_cfg.worker_timeout_s
        # DataLoader refuses a context without workers, hence only here.
        kwargs["multiprocessing_context"] = worker_context(data_cfg.worker_start)
        end_workers_at_exit()  # once per process (cached)
    return kwargs


def _check_decode(decode: str) -> None:
    if decode not in ("cpu", "gpu"):
        raise ValueError(f"decode must be 'cpu' or 'gpu' (resolve 'auto' first), got {decode!r}")


# ----------------------------------------------------------------------------------------------- shard reading


def _tar_samples(stream: BinaryIO, path: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's own tar expansion and grouping, over a file we open and close ourselves (its opener leaves
    the file open when a reader stops early, as ours do)."""
    files = tar_file_expander([{"url": path, "stream": stream}], handler=handler)
    return group_by_keys(files, handler=handler)


def _read_shard(shard: Shard, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Training: samples ``start``..``stop`` of one shard (default: all). A truncated or corrupt tar ends the span
    early, with one warning, and a stand-in for each sample it lost: they count as skipped (n_bad,
    data.max_bad_fraction)."""
    stop = shard.count if stop is None else stop
    errors: list[str] = []

    def stop_reading(exn: Exception) -> bool:  # webdataset handler: False = stop this shard, go on with the next
        errors.append(str(exn.args[0]) if exn.args else repr(exn))
        return False

    read = 0
    try:
        offset = _sample_offset(shard.path, start)
    except (tarfile.TarError, OSError) as err:
        offset = None
        errors.append(str(err.args[0]) if err.args else repr(err))
    if offset is not None:
        with open(shard.path, "rb") as stream:
            stream.seek(offset)
            for sample in _tar_samples(stream, shard.path, stop_reading):
                read += 1
                yield sample
                if read == stop - start:
                    return
    reason = errors[0] if errors else "the tar ends early"
    warnings.warn(
        f"{shard.path}: read {read} of samples {start}..{stop} ({reason}); skipping the rest of this shard",
        RuntimeWarning,
        stacklevel=2,
    )
    yield from ({"__url__": shard.path} for _ in range(stop - start - read))


def _sample_offset(path: str, index: int) -> int | None:
    """Where sample ``index`` of a tar starts (the header of its first member, webdataset grouping members by
    key), found from the member headers alone: tarfile seeks over the data. None if the tar holds fewer."""
    if index == 0:
        return 0
    key, seen = None, -1
    with tarfile.open(path, "r:") as tar:
        while (member := tar.next()) is not None:
            prefix, _ = base_plus_ext(member.name)
            if not member.isreg() or prefix is None or re.match(_WDS_SKIPPED, member.name):
                continue  # what webdataset's reader skips too
            if prefix != key:
                key, seen = prefix, seen + 1
                if seen == index:
                    return member.offset
    return None


def _read_shard_exactly(shard: Shard, start: int, stop: int) -> Iterator[dict]:
    """Evaluation: samples ``start``..``stop`` of a shard, read from sample ``start`` on (:func:`_sample_offset`, as
    training reads its spans: a rank whose range begins inside a shard does not read the samples before it); a tar
    error, an incomplete sample or fewer samples than meta.json lists is an error naming the shard."""
    seen = start
    try:
        offset = _sample_offset(shard.path, start)
        if offset is not None:
            with open(shard.path, "rb") as stream:
                stream.seek(offset)
                for sample in _tar_samples(stream, shard.path, reraise_exception):
                    if "jpg" not in sample or "json" not in sample:
                        raise ShardError(
                            f"{shard.path}: sample '{sample['__key__']}' lacks its .jpg or .json member"
                        )
                    yield sample
                    seen += 1
                    if seen >= stop:
                        return
    except (tarfile.TarError, OSError, ValueError) as err:
        reason = err.args[0] if err.args else err
        raise ShardError(f"{shard.path}: unreadable or truncated tar ({reason})") from err
    held = f"ends after {seen} samples" if offset is not None else f"holds fewer than {start + 1} samples"
    raise ShardError(f"{shard.path}: {held}, meta.json lists {shard.count} (truncated or replaced after packing?)")


def _samples_in_range(
    shards: list[Shard], start: int, stop: int, read: Callable[[Shard, int, int], Iterator[dict]]
) -> Iterator[dict]:
    """Samples ``start``..``stop`` of the shards' samples in the given shard order, reading only the shards that
    hold them, each with ``read(shard, first, last)``."""
    offset = 0
    for shard in shards:
        first, last = max(start, offset), min(stop, offset + shard.count)
        if first < last:
            yield from read(shard, first - offset, last - offset)
        offset += shard.count


def pass_order(shards: list[Shard], seed: int, epoch: int, pass_index: int) -> list[Shard]:
    """The non-empty shards in the (seed, epoch, pass)-shuffled order of one training pass."""
    order = [shard for shard in shards if shard.count > 0]
    random.Random(_seed(_SEED_SHARD_ORDER, seed, epoch, pass_index)).shuffle(order)
    return order


def train_span(total: int, rank: int, world_size: int, worker: int, workers: int, steps: int) -> range:
    """The positions one (rank, worker) consumer reads in every training pass of ``total`` samples.

    The rank's equal share of the pass, cut between its workers in proportion to the batches each yields (worker
    ``w`` yields ``len(_part(steps, w, workers))``): the spans of all consumers are disjoint and cover the pass,
    and each holds at least the samples its batches need when one pass is enough for the epoch. A consumer with
    batches to make never gets an empty span (more steps asked than samples): it then reads one sample a pass.
    """
    mine = _part(total, rank, world_size)
    before, through = steps * worker // workers, steps * (worker + 1) // workers
    start = mine.start + len(mine) * before // steps
    stop = mine.start + len(mine) * through // steps
    if stop == start and through > before:
        start = start % total
        stop = start + 1
    return range(start, stop)


# ----------------------------------------------------------------------------------------------- samples


class SampleDecoder:
    """A shard sample (jpg + json bytes) -> the sample dict FolderDataset yields, or Skipped if it is broken."""

    def __init__(self, num_classes: int, transform: CpuTransform | None) -> None:
        self.num_classes = num_classes
        self.transform = transform  # None: GPU decode, pass the bytes on

    def __call__(self, sample: dict, rng: random.Random) -> dict | Skipped:
        if "json" not in sample:
            return Skipped(None)  # a sample that lost its .json, or a stand-in for one a truncated tar lost
        try:
            info = json.loads(sample["json"])
            image_id = int(info["image_id"])
        except (KeyError, TypeError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError too
            raise ValueError(
                f"{sample.get('__url__')}: sample '{sample.get('__key__')}': bad .json ({err!r})"
            ) from err
        target = self.target(info, sample)
        if "jpg" not in sample:
            return Skipped(image_id)
        data = sample["jpg"]
        try:
            if self.transform is None:
                # Packs fix such files since the packer does (pack.jpeg_bytes); earlier packs may hold them.
                payload = {"jpeg": torch.frombuffer(bytearray(device_decodable_jpeg(data)), dtype=torch.uint8)}
            else:
                with Image.open(io.BytesIO(data)) as img:
                    rgb = img.convert("RGB")  # decodes fully: a truncated JPEG fails here
                payload = {"image": self.transform(rgb, rng)}
        except UNREADABLE_IMAGE_ERRORS:
            return Skipped(image_id)
        return {**payload, "target": target, "image_id": image_id}

    def target(self, info: dict, sample: dict) -> torch.Tensor:
        labels, difficult = info.get("labels"), info.get("difficult", [])
        if not isinstance(labels, list) or not isinstance(difficult, list):
            raise ValueError(
                f"{sample.get('__url__')}: sample '{sample.get('__key__')}': bad .json: expected 'labels' (and, "
                f"if present, 'difficult') to be lists of label indices, found labels={labels!r}, "
                f"difficult={difficult!r}"
            )
        bad = [i for i in (*labels, *difficult) if not (isinstance(i, int) and 0 <= i < self.num_classes)]
        if bad:
            raise ValueError(
                f"{sample.get('__url__')}: sample '{sample.get('__key__')}' has label indices {bad} "
                f"outside 0..{self.num_classes - 1} (meta.json lists {self.num_classes} labels)"
            )
        return torch.from_numpy(encode_target(labels, difficult, self.num_classes))


def batch_samples(
    samples: Iterable[dict | Skipped | None], batch_size: int, max_bad_run: int | None = None
) -> Iterator[dict]:
    """Collate every ``batch_size`` decodable samples; undecodable ones (Skipped, None) go to the next batch's
    n_bad and bad_ids.

    ``max_bad_run``: more undecodable samples in a row than this is an error (an endless training stream of
    broken images would otherwise never yield).
    """
    good: list[dict] = []
    bad: list[Skipped | None] = []
    run = 0
    for sample in samples:
        if not isinstance(sample, dict):
            bad.append(sample)
            run += 1
            if max_bad_run is not None and run > max_bad_run:
                raise RuntimeError(f"{run} undecodable samples in a row: the shards hold no readable JPEG")
            continue
        good.append(sample)
        run = 0
        if len(good) == batch_size:
            yield collate(good + bad)
            good, bad = [], []
    if good or bad:
        yield collate(good + bad)


# ----------------------------------------------------------------------------------------------- wds datasets


class TrainShardStream(IterableDataset):
    """Training batches from shards; each worker yields its share of ``steps`` (see the module docstring)."""

    def __init__(
        self,
        shards: list[Shard],
        *,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        steps: int,
        batch_size: int,
        shuffle_buffer: int,
        decoder: SampleDecoder,
    ) -> None:
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.seed, self.epoch, self.steps = seed, epoch, steps
        self.batch_size, self.shuffle_buffer, self.decoder = batch_size, shuffle_buffer, decoder

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        rng = random.Random(_seed(_SEED_WORKER, self.seed, self.epoch, self.rank, worker))
        total = sum(s.count for s in self.shards)
        span = train_span(total, self.rank, self.world_size, worker, workers, self.steps)

        def one_pass(pass_index: int) -> Iterator[dict]:
            order = pass_order(self.shards, self.seed, self.epoch, pass_index)
            samples = _samples_in_range(order, span.start, span.stop, _read_shard)
            # Shuffled within the pass: a buffer reading on into the next pass would leave some of this pass's
            # samples unread at the end of the epoch and take others' in their place.
            return wds.shuffle(self.shuffle_buffer, rng=rng)(samples) if self.shuffle_buffer > 1 else samples

        samples = itertools.chain.from_iterable(one_pass(p) for p in itertools.count())
        decoded = (self.decoder(s, rng) for s in samples)
        yield from itertools.islice(
            batch_samples(decoded, self.batch_size, max_bad_run=total),
            len(_part(self.steps, worker, workers)),
        )


class EvalShardStream(IterableDataset):
    """Evaluation batches from shards: this rank's contiguous range of samples, split again per worker."""

    def __init__(
        self, shards: list[Shard], *, rank: int, world_size: int, batch_size: int, decoder: SampleDecoder
    ) -> None:
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.decoder = batch_size, decoder

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        mine = _part(sum(s.count for s in self.shards), self.rank, self.world_size)
        part = _part(len(mine), worker, workers)
        samples = _samples_in_range(self.shards, mine.start + part.start, mine.start + part.stop,
                                    _read_shard_exactly)
        rng = random.Random(0)  # the evaluation transform draws nothing; the argument is only the interface
        yield from batch_samples((self.decoder(s, rng) for s in samples), self.batch_size)


# ----------------------------------------------------------------------------------------------- builders


def _transform(data_cfg: DataConfig, decode: str, train: bool) -> CpuTransform | None:
    return CpuTransform(data_cfg.image_size, train=train) if decode == "cpu" else None


def epoch_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, count: int) -> list[int]:
    """``count`` dataset indices for ``rank``: positions rank, rank + world, ... of an endless stream of
    (seed, epoch, pass)-seeded permutations of range(n). Ranks never share an index within a pass (as
    DistributedSampler with drop_last), and any ``count`` is served, so every rank runs the same steps."""
    stream = itertools.chain.from_iterable(
        np.random.default_rng(_seed(_SEED_PERMUTATION, seed, epoch, p)).permutation(n).tolist()
        for p in itertools.count()
    )
    return list(itertools.islice(stream, rank, rank + count * world_size, world_size))


def build_train_loader(
    data_cfg: DataConfig, *, rank: int, world_size: int, epoch: int, seed: int, decode: str
) -> TrainLoader:
    """This rank's training batches for ``epoch``: exactly ``len(loader)`` of them, the same count on every rank."""
    _check_decode(decode)
    kwargs = loader_kwargs(data_cfg, seed, epoch, rank)
    transform = _transform(data_cfg, decode, train=True)
    if data_cfg.format == "wds":
        meta = _checked_meta(data_cfg)
        shards = _split_shards(meta, data_cfg.shards, data_cfg.train_split)
        num_train = sum(s.count for s in shards)
        if num_train == 0:
            raise ValueError(f"{data_cfg.shards}: split '{data_cfg.train_split}' holds no samples")
        steps = steps_per_epoch(data_cfg, num_train, world_size)
        stream = TrainShardStream(
            shards,
            rank=rank,
            world_size=world_size,
            seed=seed,
            epoch=epoch,
            steps=steps,
            batch_size=data_cfg.batch_size,
            shuffle_buffer=data_cfg.shuffle_buffer,
            decoder=SampleDecoder(len(meta["label_names"]), transform),
        )
        return TrainLoader(StopSafeDataLoader(stream, batch_size=None, **kwargs), steps)
    index = _folder_split(data_cfg, data_cfg.train_split)
    if len(index) == 0:
        raise ValueError(f"{data_cfg.root}: split '{data_cfg.train_split}' holds no images")
    steps = steps_per_epoch(data_cfg, len(index), world_size)
    dataset = FolderDataset(index, transform, raw=decode == "gpu", seed=seed)
    dataset.set_epoch(epoch)
    indices = epoch_indices(len(index), rank, world_size, seed, epoch, steps * data_cfg.batch_size)
    loader = StopSafeDataLoader(
        dataset, batch_size=data_cfg.batch_size, sampler=indices, drop_last=True, collate_fn=collate, **kwargs
    )
    return TrainLoader(loader, steps)


def build_eval_loader(data_cfg: DataConfig, *, rank: int, world_size: int, decode: str) -> Iterable[dict]:
    """This rank's share of the validation split: over all ranks, every image exactly once (possibly none here)."""
    _check_decode(decode)
    kwargs = loader_kwargs(data_cfg, 0, 0, rank)
    transform = _transform(data_cfg, decode, train=False)
    batch_size = data_cfg.eval_batch_size or data_cfg.batch_size
    if data_cfg.format == "wds":
        meta = _checked_meta(data_cfg)
        stream = EvalShardStream(
            _split_shards(meta, data_cfg.shards, data_cfg.val_split),
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            decoder=SampleDecoder(len(meta["label_names"]), transform),
        )
        return StopSafeDataLoader(stream, batch_size=None, **kwargs)
    index = _folder_split(data_cfg, data_cfg.val_split)
    dataset = FolderDataset(index, transform, raw=decode == "gpu")
    indices = list(_part(len(index), rank, world_size))
    return StopSafeDataLoader(
        dataset, batch_size=batch_size, sampler=indices, drop_last=False, collate_fn=collate, **kwargs
    )


def whole_rounds(batches: int, workers: int) -> int:
    """``batches`` rounded up to a multiple of ``workers`` (one round: a batch from every worker)."""
    return -(-batches // workers) * workers if workers > 1 else batches


def bench_loader(
    shards_dir: str | Path,
    decode: str = "cpu",
    workers: int = 0,
    batches: int = 20,
    batch_size: int = 32,
    image_size: int = 448,
) -> dict:
    """Images/s of the training loader over a pack (``mlgcn bench loader``), total and per worker process, in its
    steady state.

    Untimed: the first round, a batch from every worker (start-up). The workers make their first batches side by
    side, so a clock started at the first one would count the others as made in no time (15 workers, 70 batches:
    ~15% too fast). Timed: ``batches`` rounded up to whole rounds, so every worker makes as many. With
    ``workers=0`` the loading runs in this process on one torch thread, as in a DataLoader worker: the per-image
    tensor ops gain nothing from intra-op threads and lose much on a busy host.

    ``process_cpu_ms_per_batch``: this process's CPU time a timed batch, all its threads. With workers, that is
    what taking a batch from them costs the training process (unpickling it, mapping its shared memory, pinning
    it where pinning is on): host work beside the thread that launches the step's kernels. With none, the loading.

    No sample shuffle buffer (``data.shuffle_buffer=0``): it changes when a sample is read, not how many are or how
    fast, and it reads unevenly: up to 100 samples of a pass before its first, then two per sample served, then none
    while it empties at the pass's end. A pass no longer than the buffer (a toy set) is read whole by its first batch,
    so a window of a few batches timed no read at all (62 images in batches of 8, --workers 0 --batches 2: 3x the
    steady rate) or one pass's reads for a fraction of its images.
    """
    meta = read_meta(shards_dir)
    split = TRAINING_SPLIT[meta["dataset"]]
    split = split if split in meta["splits"] else next(iter(meta["splits"]))
    untimed, timed = max(workers, 1), whole_rounds(batches, workers)
    cfg = DataConfig(
        dataset=meta["dataset"],
        format="wds",
        shards=str(shards_dir),
        train_split=split,
        image_size=image_size,
        batch_size=batch_size,
        workers=workers,
        steps_per_epoch=untimed + timed,
        shuffle_buffer=0,
    )
    with intra_op_threads(1 if workers == 0 else None):
        iterator = iter(build_train_loader(cfg, rank=0, world_size=1, epoch=0, seed=0, decode=decode))
        for _ in range(untimed):
            next(iterator)
        images = n_bad = 0
        frees = _FreeTimes()
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(timed):  # the clocks stop before the workers are shut down
            holder = [next(iterator)]  # the batch's only reference: dropped, and timed, in ``frees.drop``
            images += len(holder[0]["image_id"])
            n_bad += holder[0]["n_bad"]
            frees.drop(holder, release=i % 2 == 1)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rate = images / seconds if seconds > 0 else 0.0
    return {
        "shards": str(shards_dir),
        "split": split,
        "decode": decode,
        "workers": workers,
        "batches": timed,
        "batch_size": batch_size,
        "image_size": image_size,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 1),
        "images_per_s_per_worker": round(rate / max(workers, 1), 1),
        "process_cpu_ms_per_batch": round(1000 * cpu_seconds / timed, 2),
        **frees.medians(),
        "n_bad": n_bad,
    }


class _FreeTimes:
    """What dropping a received batch costs the training process, every other batch with its shared memory released
    first (:func:`~mlgcn_dist.data.shared_memory.release_pages`, as :meth:`Batch.pin_memory` and ``to_device`` do).

    ``free_ms``: the last reference's going, C++ freeing the memory holding the GIL (a Python thread beside it stands
    still meanwhile: README, Performance); ``free_after_release_ms``: the same after the
    release; ``release_ms``: the release, without the GIL. None where no memory came shared (no workers).
    """

    def __init__(self) -> None:
        self.plain: list[float] = []
        self.after_release: list[float] = []
        self.release: list[float] = []

    def drop(self, holder: list[dict], release: bool) -> None:
        """Drop the one batch in ``holder`` (the caller keeps no other reference), timing the last reference's
        going and, if ``release``, the release before it."""
        batch = holder.pop()
        tensors = [value for value in batch.values() if isinstance(value, torch.Tensor)]
        tensors += [batch["jpeg"].data] if "jpeg" in batch else []
        del batch
        if release:
            start = time.perf_counter()
            release = release_each(tensors)
            if release:  # else memory of this process (no workers): no shared memory to release
                self.release.append(time.perf_counter() - start)
        start = time.perf_counter()
        tensors.clear()
        (self.after_release if release else self.plain).append(time.perf_counter() - start)

    def medians(self) -> dict:
        def ms(times: list[float]) -> float | None:
            return round(1000 * statistics.median(times), 3) if times else None

        shared = bool(self.release)
        return {
            "free_ms": ms(self.plain) if shared else None,
            "free_after_release_ms": ms(self.after_release),
            "release_ms": ms(self.release),
        }
