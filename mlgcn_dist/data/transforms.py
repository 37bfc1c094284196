"""ML-GCN's image transforms, on two paths with the same semantics: PIL on CPU workers, or tensors on the device.

Training (ML-GCN ``MultiScaleCrop`` + ``RandomHorizontalFlip``): a crop whose sides are taken from
``scales x min(W, H)`` (sides within 3 px of the output size snap to it; the width and height scale indices differ
by at most ``max_distort``), placed at one of 13 fixed offsets drawn uniformly (4 corners, centre, 4 edge middles,
4 quarter points), resized bilinearly to ``size x size``, flipped with probability 1/2. Evaluation (ML-GCN ``Warp``):
the whole image resized to ``size x size``. Both then scale to [0, 1] and apply the ImageNet normalisation (the
CPU path in :func:`normalise`, after the workers, which stop at uint8; the tensor path before its resize, which
commutes with it).

Both paths draw their parameters from :func:`crop_params`, so a given ``random.Random`` state gives the same crop on
either path. Bilinear downscaling is antialiased on both (PIL always antialiases; the tensor path asks
``interpolate`` for it where a side shrinks; on an enlarged side the filter is plain bilinear either way), so the
paths agree to about one grey level (PIL rounds to uint8 after each resampling pass). The decoders themselves
differ for 4:2:0 colour JPEGs (most photos): libjpeg-turbo (PIL) interpolates the chroma planes, nvJPEG does not,
which moves pixels by a few grey levels at colour edges (measured on an H200: mean 0.8 grey levels on the toy scenes
after augmentation, 3.3 on chroma noise); 4:4:4 and grayscale files decode identically. The files the decoders
would read otherwise (truncated, misread, not JPEG) are made alike before decoding: :mod:`mlgcn_dist.data.jpeg`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mlgcn_dist.data.shared_memory import release_pages
from mlgcn_dist.errors import first_line

if TYPE_CHECKING:  # folder.py imports this module: the batch type for annotations only
    from mlgcn_dist.data.folder import PackedJpegs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALES = (1.0, 0.875, 0.75, 0.66, 0.5)  # ML-GCN's training scales
MAX_DISTORT = 2
SNAP_PX = 3  # ML-GCN snaps a crop side to the output size when it is this close

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropParams:
    """A crop box in source pixels, and whether the resized crop is mirrored."""

    x: int
    y: int
    w: int
    h: int
    flip: bool = False


def fixed_offsets(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 candidate top-left corners of ML-GCN's "more fix crop": a 5x5 grid of quarter steps, 13 of its points."""
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    return [(i * ws, j * hs) for i, j in grid]


def sample_crop(
    width: int,
    height: int,
    size: int,
    rng: random.Random,
    scales: tuple[float, ...] = SCALES,
    max_distort: int = MAX_DISTORT,
) -> CropParams:
    """Draw one training crop + flip for a ``width x height`` image (ML-GCN MultiScaleCrop, then the flip coin)."""
    sides = [max(1, int(min(width, height) * s)) for s in scales]
    sides = [size if abs(s - size) < SNAP_PX else s for s in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= max_distort]
    crop_w, crop_h = rng.choice(pairs)
    # A snapped side can exceed a small image (size > min side): clamp so the box stays inside it.
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    x, y = rng.choice(fixed_offsets(width, height, crop_w, crop_h))
    return CropParams(x, y, crop_w, crop_h, flip=rng.random() < 0.5)


def crop_params(width: int, height: int, size: int, train: bool, rng: random.Random) -> CropParams:
    """Training: a random crop + flip; evaluation: the whole frame (the resize alone is ML-GCN's Warp)."""
    if train:
        return sample_crop(width, height, size, rng)
    return CropParams(0, 0, width, height)


class CpuTransform:
    """PIL image -> uint8 tensor [3, size, size] (crop, resize, flip); used inside DataLoader workers.

    The workers stop at uint8: :func:`normalise` turns a batch into floats where it is used (``to_device``).
    Measured on the 640 px toy JPEGs, one core: the float conversion and normalisation cost 2.4 ms an image and
    stacking floats 1.5 ms, against 0.2 and 0.3 ms in uint8, next to 3.1 ms of decoding and 2.3 of crop + resize;
    and a uint8 batch is a quarter of the bytes through shared memory, pinning and the copy to the device.
    """

    def __init__(self, size: int, train: bool) -> None:
        self.size = size
        self.train = train

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.apply(img, crop_params(img.width, img.height, self.size, self.train, rng))

    def apply(self, img: Image.Image, p: CropParams) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        # Crop first, then resize (as ML-GCN): resize(box=...) would also blend pixels just outside the box.
        img = img.crop((p.x, p.y, p.x + p.w, p.y + p.h)).resize((self.size, self.size), Image.BILINEAR)
        if p.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> float32 scaled to [0, 1] and ImageNet-normalised, on their device.

    Per-channel scalars rather than a constants tensor: making one on a CUDA device copies from pageable memory,
    which waits for the current stream. On CPU this is the arithmetic the workers did before, bit for bit; CUDA
    divides by a scalar as a multiplication by its reciprocal, up to one ulp away.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"normalise: expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    x = images.float().div_(255.0)
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        x[:, channel].sub_(mean).div_(std)
    return x


class GpuAugment:
    """Encoded JPEGs -> normalised float [B, 3, size, size] on ``device``: batched decode (nvJPEG on CUDA)."""

    def __init__(self, size: int, train: bool) -> None:
        self.size = size
        self.train = train
        self._constants: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decode_streams: dict[str, torch.cuda.Stream] = {}

    def __call__(
        self, jpegs: PackedJpegs, device: torch.device | str, rng: random.Random, channels_last: bool = False
    ) -> tuple[torch.Tensor, list[int]]:
        """The augmented batch of the JPEGs that decode, and their positions in ``jpegs``.

        A corrupt file only shows itself here (workers pass raw bytes on), so it is dropped rather than
        failing the whole batch; the caller drops its target too.
        """
        images, kept = self.decode(jpegs.files(), device)
        return self.apply(images, self.crops(images, rng), device, channels_last), kept

    def crops(self, images: list[torch.Tensor], rng: random.Random) -> list[CropParams]:
        """The crop of each decoded [3, H, W] image, drawn from ``rng`` in order (a seeded rng: the same crops)."""
        return [crop_params(im.shape[2], im.shape[1], self.size, self.train, rng) for im in images]

    def decode(self, jpegs: list[torch.Tensor], device: torch.device | str) -> tuple[list[torch.Tensor], list[int]]:
        """uint8 [3, H, W] per decodable image and their positions (see :func:`decode_jpegs`), usable on the
        caller's current stream.

        On CUDA the decoded images are allocated on a stream of their own, never on the caller's. torchvision's
        decoder takes its output memory from the caching allocator on the current stream and nvJPEG's hardware
        engine writes it without waiting for that stream's queued work (torchcodec #1634 describes and fixes
        the same in its copy of the decoder). A block freed on the caller's stream while queued kernels still
        read it (the last step's activations on the training stream, the last batch's crops on the prefetch
        stream) could then be overwritten: wrong pixels, NaN activations. On a stream that only ever holds
        decoded images, whose readers are recorded (``record_stream``), a block is reused only after they ran.
        """
        device = torch.device(device)
        if device.type != "cuda":
            return decode_jpegs(jpegs, device)
        caller = torch.cuda.current_stream(device)
        own = self._decode_streams.get(str(device))
        while own is None or own == caller:  # PyTorch hands streams out round-robin: never decode on the caller's
            own = self._decode_streams[str(device)] = torch.cuda.Stream(device)
        with torch.cuda.stream(own):
            images, kept = decode_jpegs(jpegs, device)
        caller.wait_stream(own)  # the decoder made ``own`` wait for its work; the caller waits for ``own``
        for image in images:
            image.record_stream(caller)
        return images, kept

    def apply(
        self,
        images: list[torch.Tensor],
        params: list[CropParams],
        device: torch.device | str,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """Crop, normalise, resize, flip each decoded uint8 [3, H, W] image, into one batch in input order.

        Every kernel here shares the device with the training step, so the work is cut to few kernels and few
        passes over the batch:

        * crops of the same size are stacked and resized by one call (COCO photos share a few sizes, and the
          crop sides come from five scales): for 64 COCO-shaped images ~19 resizes, not 64;
        * the normalisation is one ``addcmul`` on each group's uint8 crops, before the resize: bilinear
          weights sum to one, so it commutes with the resize, and it replaces the float conversion;
        * the resize antialiases only crops with a side longer than the output. On an enlarged side the
          antialiasing filter is the bilinear one (weights agree to float rounding), at twice the cost
          (measured on an H100: 0.68 against 0.32 ms for 64 crops of 400 px); ML-GCN's crops of a 640x480
          photo are all within 480 px, and 14 of its 19 crop sizes enlarge both sides to 448;
        * the mirrored crops of all groups are gathered at the end of the batch and flipped by one call;
        * one ``index_select`` puts the batch in input order and writes it in the requested memory format
          (``channels_last``), which would otherwise cost a copy of its own.

        Nothing here waits for the device (the index goes up from pinned memory, the normalisation constants
        are made once).
        """
        device = torch.device(device)
        if not images:
            return empty_batch(self.size, device, channels_last)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        scale, shift = self._normalisation(device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i in sorted(range(len(params)), key=lambda i: params[i].flip):  # mirrored last within each group
            groups.setdefault((params[i].h, params[i].w), []).append(i)
        plain, mirrored, plain_ids, mirrored_ids = [], [], [], []
        for (h, w), members in groups.items():
            crops = torch.stack([images[i][:, params[i].y : params[i].y + h, params[i].x : params[i].x + w]
                                 for i in members])
            out = F.interpolate(torch.addcmul(shift, crops, scale), size=(self.size, self.size), mode="bilinear",
                                align_corners=False, antialias=self.antialiases(h, w))
            cut = sum(not params[i].flip for i in members)
            plain.append(out[:cut])
            mirrored.append(out[cut:])
            plain_ids += members[:cut]
            mirrored_ids += members[cut:]
        batch = torch.cat(plain + mirrored)  # every mirrored crop at the end: one flip for all of them
        if mirrored_ids:
            tail = batch[len(plain_ids) :]
            tail.copy_(tail.flip(3))
        index = torch.tensor(plain_ids + mirrored_ids).argsort()  # the row of each input image in ``batch``
        if device.type == "cuda":
            index = index.pin_memory()
        out = torch.empty(batch.shape, device=device, memory_format=memory_format)
        return torch.index_select(batch, 0, index.to(device, non_blocking=True), out=out)

    def antialiases(self, h: int, w: int) -> bool:
        """Whether an ``h x w`` crop is resized with antialiasing: where a side shrinks (see :meth:`apply`)."""
        return max(h, w) > self.size

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scale and shift taking uint8 pixels to ImageNet-normalised floats, ``x * scale + shift``
        = ``(x / 255 - mean) / std``, on ``device`` and made once (a tensor from a list waits for the device)."""
        key = str(device)
        if key not in self._constants:
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            self._constants[key] = ((1.0 / (255.0 * std)).to(device), (-mean / std).to(device))
        return self._constants[key]


def empty_batch(size: int, device: torch.device | str, channels_last: bool) -> torch.Tensor:
    """The augmented batch of no images, [0, 3, size, size] on ``device`` in the memory format asked for: a batch
    whose every JPEG failed."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(0, 3, size, size, device=device).contiguous(memory_format=memory_format)


# What ``to_device`` calls to decode and augment a batch of JPEGs on the device: a :class:`GpuAugment`, or one in a
# process of its own (:class:`mlgcn_dist.data.augment_process.RemoteAugment`). (jpegs, device, rng, channels_last)
# -> (the augmented batch, the positions of the JPEGs in it). It takes the batch's "jpeg" as the loader packed it,
# not a tensor a file: the augment process copies the bytes into its shared memory in one copy.
DeviceAugment = Callable[["PackedJpegs", "torch.device | str", random.Random, bool], tuple[torch.Tensor, list[int]]]


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """uint8 [3, H, W] per decodable image and their positions; RGB mode makes grayscale/CMYK 3-channel.

    One file the batched call cannot take (corrupt, or CMYK, which nvJPEG refuses) fails the whole call: then
    each image is decoded alone, on the device or else on the CPU with libjpeg-turbo, and only a file that
    fails both is dropped. nvJPEG does not notice truncation (it fills the missing part in), the CPU path does.
    """
    if not jpegs:  # a batch whose samples all failed in the workers
        return [], []
    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device), list(range(len(jpegs)))
    except RuntimeError as err:
        reason = first_line(err)
        logger.warning("batched JPEG decode on %s failed (%s); decoding one at a time", device, reason)
    images, kept = [], []
    for i, data in enumerate(jpegs):
        image = _decode_one(data, device)
        if image is None:
            logger.warning("undecodable JPEG at batch position %d (%d bytes) dropped", i, data.numel())
        else:
            images.append(image)
            kept.append(i)
    return images, kept


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    for where in dict.fromkeys((device, torch.device("cpu"))):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=where).to(device)
        except RuntimeError:
            continue
    return None


def to_device(
    batch: dict,
    device: torch.device | str,
    augment: DeviceAugment | None,
    rng: random.Random,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A collated batch -> (images float [B,3,S,S], targets int8 [B,C], image ids int64 [B]) on ``device``.

    A batch of "jpeg" (:class:`~mlgcn_dist.data.folder.PackedJpegs`) is decoded and augmented on the device by
    ``augment`` (a :class:`GpuAugment`, here or in a process of its own), which writes the memory format;
    JPEGs that fail to decode there are dropped with their targets and added to ``batch["n_bad"]`` (so read n_bad
    after this call). A batch of "image" was cropped and resized by the CPU workers (uint8): it is copied, then
    normalised on the device. Copies are non-blocking (pinned batches overlap them).

    The pixels ("jpeg" or "image") are taken out of ``batch``: once read, the shared memory they came in from a
    loader worker is freed here without holding the GIL (:func:`~mlgcn_dist.data.shared_memory.release_pages`),
    where dropping the batch would free it holding the GIL, beside the thread launching the step's kernels.
    """
    targets, image_ids = batch["target"], batch["image_id"]
    if "jpeg" in batch:
        if augment is None:
            raise ValueError("batch holds raw 'jpeg' bytes but no device augment was given to decode them")
        jpegs = batch.pop("jpeg")
        images, kept = augment(jpegs, device, rng, channels_last)
        release_pages(jpegs.data)  # decoded, or copied into the augment process: the call waited for both
        if len(kept) < len(jpegs):
            batch["n_bad"] += len(jpegs) - len(kept)
            targets, image_ids = targets[kept], image_ids[kept]
    else:
        pixels = batch.pop("image")
        images = normalise(pixels.to(device, non_blocking=True))
        if torch.device(device).type in ("cpu", "cuda"):
            # Read by now: normalised on the CPU, or copied to the GPU (a copy from pageable memory returns once
            # the source is staged; pinned memory is no shared memory, and is not released).
            release_pages(pixels)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True), image_ids.to(device, non_blocking=True)
