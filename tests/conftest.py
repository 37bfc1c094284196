"""Shared fixtures: a small synthetic COCO-layout dataset and a tiny VOC2007 layout, each written once per session;
test pictures and their JPEG bytes."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, IterableDataset

from mlgcn_dist.data.toy import make_toy
from mlgcn_dist.data.voc import VOC_CLASSES


def reference_dir() -> Path:
    """The original ML-GCN data files (third-party, never copied into the repo): ``shared/`` beside the checkout,
    or MLGCN_REFERENCE_DIR."""
    if "MLGCN_REFERENCE_DIR" in os.environ:
        return Path(os.environ["MLGCN_REFERENCE_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "reference" / "mlgcn"


# split -> {image stem: (present class names, difficult-only class names)}; sizes vary to test header reading
VOC_FIXTURE = {
    "trainval": {
        "000005": (("chair",), ("pottedplant",)),
        "000007": (("car",), ()),
        "000009": (("horse", "person"), ()),
        "000012": (("car",), ("person",)),
        "000016": (("bicycle",), ()),
        "000017": (("horse", "person"), ()),
    },
    "test": {
        "000001": (("dog", "person"), ()),
        "000002": (("train",), ()),
        "000004": (("car",), ("bus",)),
        "000006": (("chair", "diningtable", "pottedplant"), ()),
    },
}


def write_voc(root: Path, splits: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]]) -> Path:
    """Write ``root/VOCdevkit/VOC2007`` with one small JPEG per image and the 20 class files per split."""
    base = root / "VOCdevkit" / "VOC2007"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, images in splits.items():
        for n, stem in enumerate(images):
            size = (40 + 4 * n, 30 + 2 * n)
            Image.new("RGB", size, (20 * n % 256, 90, 160)).save(base / "JPEGImages" / f"{stem}.jpg", quality=90)
        for name in VOC_CLASSES:
            lines = []
            for stem, (present, difficult) in images.items():
                flag = 1 if name in present else 0 if name in difficult else -1
                lines.append(f"{stem} {flag:2d}")
            (base / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy COCO 2014 layout: 64 train / 32 val images of 64 px (some 64x48 / 48x64), 12 categories."""
    root = tmp_path_factory.mktemp("toy")
    make_toy(root, train=64, val=32, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VOC2007 layout (``root/VOCdevkit/VOC2007``): splits trainval (6 images) and test (4), see VOC_FIXTURE."""
    return write_voc(tmp_path_factory.mktemp("voc"), VOC_FIXTURE)


@pytest.fixture(scope="session")
def voc_labels() -> dict:
    """What ``voc_root`` holds: split -> {stem: (present names, difficult-only names)}."""
    return VOC_FIXTURE


@pytest.fixture
def voc_writer():
    """``write_voc(root, splits)`` for tests that need their own (e.g. broken) VOC layout."""
    return write_voc


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; an in-process training or evaluation run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest toy set (64 train / 40 val images at 32 px), for tests that start real training processes."""
    root = tmp_path_factory.mktemp("tiny_toy")
    make_toy(root, train=64, val=40, size=32, seed=3)
    return root


# Figures a test measured, printed after the run (CI logs show them; nothing asserts a speed).
_MEASURED = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def print_after_run(pytestconfig: pytest.Config):
    """``print_after_run(title, text)``: ``text`` appears in the terminal summary, after pytest's own output."""
    measured = pytestconfig.stash.setdefault(_MEASURED, [])
    return lambda title, text: measured.append((title, text))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for title, text in config.stash.get(_MEASURED, []):
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)


def photo(width: int = 160, height: int = 120, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A textured test picture: smooth gradients plus noise, so crops and resampling show in every pixel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 64 * 4], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def jpeg(img: Image.Image, subsampling: int | None = None) -> torch.Tensor:
    """Encoded bytes; colour defaults to 4:2:0 chroma (PIL's default, as most photos), subsampling=0 is 4:4:4."""
    buffer = io.BytesIO()
    options = {} if subsampling is None else {"subsampling": subsampling}
    img.save(buffer, "JPEG", quality=90, **options)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def drop_category(root: Path, split: str, name: str) -> None:
    """Remove category ``name`` and its annotations from a COCO split's annotation file: a split whose label
    space lacks one of the other split's labels."""
    path = root / "annotations" / f"instances_{split}2014.json"
    data = json.loads(path.read_text())
    (dropped,) = [c["id"] for c in data["categories"] if c["name"] == name]
    data["categories"] = [c for c in data["categories"] if c["id"] != dropped]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != dropped]
    path.write_text(json.dumps(data))


class TimedWorkerBatches(IterableDataset):
    """A stand-in for the training loader's dataset whose DataLoader workers each make a batch in ``seconds``
    (sleeping, so a busy CI host does not change the rate): ``workers`` of them make ``workers x batch_size /
    seconds`` images/s, exactly. Batches are the loader's dict; every worker makes ``per_worker`` of them."""

    def __init__(self, per_worker: int, batch_size: int, seconds: float) -> None:
        self.per_worker, self.batch_size, self.seconds = per_worker, batch_size, seconds

    def __iter__(self):
        for _ in range(self.per_worker):
            time.sleep(self.seconds)
            yield {"image": torch.zeros(self.batch_size, 3, 2, 2), "target": torch.zeros(self.batch_size, 2),
                   "image_id": torch.arange(self.batch_size), "n_bad": 0}


def declare_huge_size(path: str | Path, side: int = 60000) -> None:
    """Rewrite a baseline JPEG's frame header to declare ``side`` x ``side`` pixels: past PIL's decompression-bomb
    limit, PIL refuses it on open with DecompressionBombError, which is no OSError."""
    data = bytearray(Path(path).read_bytes())
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length (2), precision (1), height (2), width (2)
    data[frame + 5 : frame + 9] = side.to_bytes(2, "big") * 2
    Path(path).write_bytes(bytes(data))


def timed_worker_loader(workers: int, batches: int, batch_size: int, seconds: float,
                        prefetch_factor: int = 2) -> DataLoader:
    """A real DataLoader (worker processes, its prefetch queue) over :class:`TimedWorkerBatches`."""
    return DataLoader(TimedWorkerBatches(batches // workers, batch_size, seconds), batch_size=None,
                      num_workers=workers, prefetch_factor=prefetch_factor)


class TorchCalls(TorchFunctionMode):
    """Counts the torch calls made from Python under it: the host-side work of a step, whatever the device (each
    one a moment when another thread can take the GIL)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie counts as gone: an orphan's parent is init, which in a container may never
    reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
