"""``mlgcn bench contention``: whose work slows the thread that launches the training step's kernels.

Why: on an H100 (README, run H) the compiled step launched its kernels slower while the GPU data path's helper
thread worked beside it in the same process (26.5 us between two launches against 18.3), and GPU decode trained at
0.65-0.77 of the ceiling though the device was no busier. A GIL shared with the helper's Python would do that; so
would a host short of cores or caches, or the CUDA driver's locks, which the helper's calls take too. This bench
tells them apart, in one process and one run: one thread launches small kernels one at a time (``x.add_(1)`` on a
1K tensor: host work, the device idle) for ``seconds``, alone and then beside one background thread at a time:

- ``python``: bytecode that holds the GIL, letting it go only when the interpreter makes it (every 5 ms);
- ``small_ops``: many tiny torch ops on the CPU, each short Python around a call that releases the GIL, as the
  augment's Python around its launches;
- ``cpp``: matrix products on the CPU, long GIL-free calls with little Python between them: busy cores alone;
- ``data_path``: what the helper does, :class:`~mlgcn_dist.data.transforms.GpuAugment` decoding and augmenting a
  batch of JPEGs over and over (nvJPEG on CUDA; on the CPU, libjpeg-turbo);
- ``data_path_process``: the same batches decoded and augmented in a process of their own
  (:class:`~mlgcn_dist.data.augment_process.AugmentProcess`, ``data.augment_process``), the background thread doing
  what the helper then does: hand the bytes over, wait, copy the batch out;
- ``batches_dropped``, ``batches_released``: batches of CPU decode's size (uint8 images at ``image_size``) arriving
  from two loader workers as fast as they are made, taken by the background thread (on CUDA pinned first, by the
  DataLoader's pinning thread, as in training): as plain dicts, whose shared memory PyTorch frees when they are
  dropped, holding the GIL, or as :class:`~mlgcn_dist.data.folder.Batch`, whose shared memory is released
  without it (:mod:`mlgcn_dist.data.shared_memory`; on the CPU the background thread releases it, as ``to_device``
  does). The workers fill the images rather than decode them: what is measured is a batch's arrival.

The launch rate beside each, as a fraction of the rate alone, says which kind of work costs the launching thread:
if ``data_path`` costs what ``small_ops`` costs and ``cpp`` little, the helper's Python is the cost, and
``data_path_process`` against ``data_path`` says how much of it a process of its own takes off the launching thread.
For the arrivals, the launching thread's time lost a batch (``lost_ms_per_round``: the fraction of its rate lost over
the batches a second) says what a batch's arrival costs it each way.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mlgcn_dist.arguments import positive_float, positive_int
from mlgcn_dist.bench.decode import toy_jpegs
from mlgcn_dist.config import DataConfig
from mlgcn_dist.data.augment_process import AugmentProcess
from mlgcn_dist.data.folder import Batch, PackedJpegs
from mlgcn_dist.data.loader import loader_kwargs
from mlgcn_dist.data.shared_memory import release_each
from mlgcn_dist.data.transforms import GpuAugment
from mlgcn_dist.data.workers import StopSafeDataLoader
from mlgcn_dist.threads import intra_op_threads

BACKGROUNDS = ("none", "python", "small_ops", "cpp", "data_path", "data_path_process", "batches_dropped",
               "batches_released")
ARRIVAL_WORKERS = 2  # loader workers making the arriving batches
LAUNCHES_PER_ROUND = 100  # launches between two clock reads
SETTLE_S = 0.05  # the background thread runs this long before the clock starts


def bench_contention(
    device: torch.device, seconds: float, jpegs: list[torch.Tensor], image_size: int, repeats: int = 3
) -> dict:
    """Launches per second of this thread alone and beside each background, each measured ``repeats`` times in
    turn (alone, python, ..., alone, python, ...: a drift of the machine spreads over all of them) and the median
    kept; and each background's own rounds per second (how hard it worked). One intra-op thread, as a GPU
    training process has."""
    device = torch.device(device)
    rates: dict[str, list[float]] = {name: [] for name in BACKGROUNDS}
    rounds: dict[str, list[float]] = {name: [] for name in BACKGROUNDS}
    with intra_op_threads(1), AugmentProcess(device, image_size, channels_last=True) as process, \
            _arrivals(device, len(jpegs), image_size) as arrivals:
        work = {**_backgrounds(device, jpegs, image_size, process), **arrivals}
        work["data_path_process"]()  # the process started (seconds of imports), outside the measurements
        _launch_rate(device, min(seconds, 0.2))  # kernels loaded, the allocator warm
        for _ in range(repeats):
            for name in BACKGROUNDS:
                launched, worked = _beside(device, seconds, work.get(name))
                rates[name].append(launched)
                rounds[name].append(worked)
    median = {name: statistics.median(rates[name]) for name in BACKGROUNDS}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seconds": seconds,
        "repeats": repeats,
        "batch": len(jpegs),
        "backgrounds": {
            name: {
                "launches_per_s": median[name],
                "vs_alone": median[name] / median["none"],
                "us_per_launch": 1e6 / median[name],
                "background_rounds_per_s": None if name == "none" else statistics.median(rounds[name]),
                "lost_ms_per_round": _lost_ms(median[name] / median["none"], statistics.median(rounds[name])),
            }
            for name in BACKGROUNDS
        },
    }


def _beside(device: torch.device, seconds: float, work: Callable[[], object] | None) -> tuple[float, float]:
    """(launches a second of this thread, rounds a second of ``work`` in a thread beside it; 0 without work)."""
    if work is None:
        return _launch_rate(device, seconds), 0.0
    stop = threading.Event()
    done = [0]

    def background() -> None:
        while not stop.is_set():
            work()
            done[0] += 1

    thread = threading.Thread(target=background, name=f"contention-{getattr(work, '__name__', 'work')}",
                              daemon=True)
    thread.start()
    try:
        time.sleep(SETTLE_S)
        before, t0 = done[0], time.perf_counter()
        launched = _launch_rate(device, seconds)
        worked = (done[0] - before) / (time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join()
    return launched, worked


def _launch_rate(device: torch.device, seconds: float) -> float:
    """Launches a second of ``x.add_(1)`` from this thread for ``seconds`` (whole rounds; the device is left to
    finish after the clock stops: what is timed is the host issuing them)."""
    x = torch.zeros(1024, device=device)
    launched = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(LAUNCHES_PER_ROUND):
            x.add_(1)
        launched += LAUNCHES_PER_ROUND
        now = time.perf_counter()
        if now >= deadline:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launched / (now - start)


def _backgrounds(
    device: torch.device, jpegs: list[torch.Tensor], image_size: int, process: AugmentProcess
) -> dict[str, Callable[[], object]]:
    """One round of each background's work, as a function the background thread calls until told to stop;
    ``data_path_process``'s in ``process``."""
    products = torch.randn(192, 192)
    tiny = torch.zeros(16)
    augment = GpuAugment(image_size, train=True)
    rng = random.Random(0)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def python() -> int:
        return sum(i * i for i in range(2000))

    def small_ops() -> None:
        for _ in range(50):
            tiny.add_(1)

    def cpp() -> torch.Tensor:
        return torch.mm(products, products)

    packed = PackedJpegs.of(jpegs)  # as the loader's workers give a batch

    def on_a_stream_of_its_own(augmenter: Callable) -> Callable[[], None]:
        def data_path() -> None:
            if stream is None:
                augmenter(packed, device, rng, channels_last=True)
                return
            with torch.cuda.stream(stream):  # a stream of its own, as the trainer's prefetch helper has
                augmenter(packed, device, rng, channels_last=True)
            stream.synchronize()  # one batch at a time: the helper waits for its queue, not faster than the device

        return data_path

    return {"python": python, "small_ops": small_ops, "cpp": cpp, "data_path": on_a_stream_of_its_own(augment),
            "data_path_process": on_a_stream_of_its_own(process.augment(train=True))}


def _lost_ms(vs_alone: float, rounds_per_s: float) -> float | None:
    """Milliseconds of the launching thread's time lost to each round of the background (None without rounds)."""
    return 1000 * (1 - vs_alone) / rounds_per_s if rounds_per_s > 0 else None


class _ArrivingBatches(torch.utils.data.Dataset):
    """Endless batches of ``size`` uint8 images of ``image_size`` px, made by a fill, of type ``kind``."""

    def __init__(self, size: int, image_size: int, kind: type[dict]) -> None:
        self.shape, self.kind = (size, 3, image_size, image_size), kind

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, index: int) -> dict:
        return self.kind(image=torch.full(self.shape, index % 251, dtype=torch.uint8),
                         target=torch.zeros(self.shape[0], 80, dtype=torch.int8),
                         image_id=torch.arange(self.shape[0]), n_bad=0, bad_ids=[])


@contextlib.contextmanager
def _arrivals(device: torch.device, size: int, image_size: int) -> Iterator[dict[str, Callable[[], object]]]:
    """The ``batches_dropped`` and ``batches_released`` rounds: take the next arriving batch and let it go; their
    workers ended on exit."""
    pinned = device.type == "cuda"
    # The training loader's workers (started, seeded, timed out and ended at exit alike), pinning on ``device``'s.
    kwargs = {**loader_kwargs(DataConfig(workers=ARRIVAL_WORKERS), seed=0, epoch=0, rank=0), "pin_memory": pinned}
    batches = {
        name: iter(StopSafeDataLoader(_ArrivingBatches(size, image_size, kind), batch_size=None, **kwargs))
        for name, kind in (("batches_dropped", dict), ("batches_released", Batch))
    }

    def dropped() -> None:
        next(batches["batches_dropped"])

    def released() -> None:
        batch = next(batches["batches_released"])
        if not pinned:  # no pinning thread released it: as to_device does once it has read the pixels
            release_each(value for value in batch.values() if isinstance(value, torch.Tensor))

    try:
        yield {"batches_dropped": dropped, "batches_released": released}
    finally:
        batches.clear()  # the iterators go, and their workers with them


def format_contention_report(report: dict) -> str:
    lines = [
        f"launch rate of one thread issuing small kernels on {report['device']} ({report['seconds']:g} s a "
        f"measurement, median of {report['repeats']}), alone and beside one background thread; data_path: "
        f"decode + augment of {report['batch']} JPEGs a round (data_path_process: in a process of their own); "
        f"batches_*: a batch of {report['batch']} uint8 images arriving from loader workers a round",
        f"{'beside':18s}{'launches/s':>12s}{'us/launch':>11s}{'vs alone':>10s}{'background rounds/s':>22s}"
        f"{'ms lost a round':>17s}",
    ]
    for name, row in report["backgrounds"].items():
        rounds = "" if row["background_rounds_per_s"] is None else f"{row['background_rounds_per_s']:.1f}"
        lost = "" if row.get("lost_ms_per_round") is None else f"{row['lost_ms_per_round']:.3f}"
        lines.append(f"{name:18s}{row['launches_per_s']:12.0f}{row['us_per_launch']:11.2f}{row['vs_alone']:10.2f}"
                     f"{rounds:>22s}{lost:>17s}")
    return "\n".join(lines)


def add_contention_arguments(parser: argparse.ArgumentParser) -> None:
    """``mlgcn bench contention``'s options."""
    parser.add_argument("--seconds", type=positive_float, default=1.0, help="length of each measurement")
    parser.add_argument("--repeats", type=positive_int, default=3, help="measurements of each case (median kept)")
    parser.add_argument("--batch", type=positive_int, default=64, help="JPEGs the data_path background decodes a round")
    parser.add_argument(
        "--size", type=positive_int, default=640, help="long side of the toy JPEGs in px (~180 KB each at 640)"
    )
    parser.add_argument("--image-size", type=positive_int, default=448, help="GpuAugment's output size in px")
    parser.add_argument("--json", type=Path, help="also write the report here")


def run_contention_bench(args: argparse.Namespace) -> dict:
    """Measure on this machine's GPU (the CPU without one) and print; the report."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    report = bench_contention(device, args.seconds, toy_jpegs(args.batch, args.size), args.image_size, args.repeats)
    print(format_contention_report(report), flush=True)
    return report
