"""Specifications of the transforms: ML-GCN's crop sampler, and the CPU (PIL) and tensor (device) paths agreeing."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jpeg, photo
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mlgcn_dist.data.folder import PackedJpegs
from mlgcn_dist.data.jpeg import device_decodable_jpeg
from mlgcn_dist.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCALES,
    CpuTransform,
    CropParams,
    GpuAugment,
    fixed_offsets,
    normalise,
    sample_crop,
    to_device,
)

# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they remain the supported path here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

# PIL resamples in two passes and rounds to uint8 after each; the tensor path stays in float. The two differ by
# up to one grey level (measured: max 1.0, mean 0.3 of 255), i.e. 1/255/std after normalisation.
ONE_GREY_LEVEL = 1.0 / 255 / min(IMAGENET_STD)
TOLERANCE = 1.05 * ONE_GREY_LEVEL


def decoded_pil(data: torch.Tensor) -> Image.Image:
    return Image.open(io.BytesIO(data.numpy().tobytes()))


def as_float(images: torch.Tensor) -> torch.Tensor:
    """The CPU workers' uint8 output ([3, H, W] or a batch) as the model receives it, normalised."""
    return normalise(images[None])[0] if images.ndim == 3 else normalise(images)


def tensor_path(data: torch.Tensor, size: int, train: bool, params: CropParams) -> torch.Tensor:
    augment = GpuAugment(size, train)
    images, _ = augment.decode([data], "cpu")
    return augment.apply(images, [params], "cpu")[0]


# ---------------------------------------------------------------- the crop sampler


def test_fixed_offsets_are_mlgcn_13_point_grid():
    offsets = fixed_offsets(100, 80, 60, 40)  # quarter steps of 10 px in x and y
    corners_centre = [(0, 0), (40, 0), (0, 40), (40, 40), (20, 20)]
    edges = [(0, 20), (40, 20), (20, 40), (20, 0)]
    quarters = [(10, 10), (30, 10), (10, 30), (30, 30)]
    assert offsets == corners_centre + edges + quarters


def test_crop_scales_are_ml_gcns_five_from_the_whole_to_half_the_shorter_side():
    assert SCALES == (1.0, 0.875, 0.75, 0.66, 0.5)  # ML-GCN's MultiScaleCrop(scales=...), max_distort=2


def test_sample_crop_sides_come_from_scales_with_bounded_distortion():
    rng = random.Random(0)
    sides = [480, 420, 360, 316, 240]  # int(480 x (1, .875, .75, .66, .5)): ML-GCN's scales of a 640x480 image
    seen = set()
    for _ in range(2000):
        p = sample_crop(640, 480, 448, rng)
        i, j = sides.index(p.h), sides.index(p.w)
        assert abs(i - j) <= 2
        assert (p.x, p.y) in fixed_offsets(640, 480, p.w, p.h)
        seen.add((p.w, p.h))
    assert len(seen) == 5 * 5 - 6  # every pair with |i - j| <= 2


def test_sample_crop_draws_each_fixed_offset_and_flip_about_equally():
    rng = random.Random(1)
    draws = [sample_crop(400, 400, 224, rng, scales=(0.5,)) for _ in range(13 * 400)]
    offsets = Counter((p.x, p.y) for p in draws)
    assert len(offsets) == 13 and min(offsets.values()) > 300
    assert 0.45 < sum(p.flip for p in draws) / len(draws) < 0.55


@pytest.mark.parametrize(("side", "expected"), [(446, 448), (450, 448), (445, 445), (451, 451)])
def test_sample_crop_snaps_sides_less_than_3px_from_the_output_size_to_it(side, expected):
    # ML-GCN: ``input_size if abs(x - input_size) < 3 else x``: a side exactly 3 px away keeps its size.
    p = sample_crop(2 * side, 2 * side, 448, random.Random(0), scales=(0.5,))  # room for a side snapped up
    assert (p.w, p.h) == (expected, expected)


@pytest.mark.parametrize(("width", "height", "expected"), [(600, 446, (448, 446)), (446, 600, (446, 448))])
def test_a_side_snapped_past_the_image_is_cut_back_to_it(width, height, expected):
    # The shorter side, 2 px under the output size, snaps up to 448: more than the image holds.
    p = sample_crop(width, height, 448, random.Random(0), scales=(1.0,))
    assert (p.w, p.h) == expected and p.x + p.w <= width and p.y + p.h <= height


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(1, 1024), st.integers(0, 2**32))
def test_sample_crop_always_lies_inside_the_image(width, height, size, seed):
    p = sample_crop(width, height, size, random.Random(seed))
    assert 1 <= p.w and 1 <= p.h and 0 <= p.x and 0 <= p.y
    assert p.x + p.w <= width and p.y + p.h <= height


# ---------------------------------------------------------------- CPU path == tensor path


@pytest.mark.parametrize(
    "params",
    [
        CropParams(0, 0, 120, 120, False),
        CropParams(40, 0, 120, 90, True),
        CropParams(10, 15, 79, 60, False),
        CropParams(25, 30, 60, 60, True),
    ],
)
@pytest.mark.parametrize("size", [48, 96, 200])  # downscale, near 1:1, upscale
def test_cpu_and_tensor_paths_agree_within_one_grey_level_for_the_same_crop(params, size):
    data = jpeg(photo())
    cpu = as_float(CpuTransform(size, train=True).apply(decoded_pil(data), params))
    tensor = tensor_path(data, size, True, params)
    assert cpu.shape == tensor.shape == (3, size, size)
    diff = (cpu - tensor).abs()
    print(f"size {size} {params}: max |cpu - tensor| = {diff.max():.4f} (tolerance {TOLERANCE:.4f})")
    assert diff.max() <= TOLERANCE
    assert diff.mean() <= 0.5 * ONE_GREY_LEVEL


def test_eval_paths_warp_the_whole_image_and_agree():
    data = jpeg(photo(200, 130))
    cpu = as_float(CpuTransform(64, train=False)(decoded_pil(data), random.Random(0)))
    tensor = GpuAugment(64, train=False)(PackedJpegs.of([data]), "cpu", random.Random(0))[0][0]
    plain = torch.from_numpy(np.asarray(decoded_pil(data).resize((64, 64), Image.BILINEAR)).copy())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    expected = (plain.permute(2, 0, 1).float() / 255 - mean) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(cpu, expected, atol=1e-5)  # eval is exactly ML-GCN's Warp + normalise
    assert (cpu - tensor).abs().max() <= TOLERANCE


def test_same_seed_draws_the_same_crop_on_both_paths():
    data = jpeg(photo())
    for seed in range(5):
        cpu = as_float(CpuTransform(64, train=True)(decoded_pil(data), random.Random(seed)))
        again = as_float(CpuTransform(64, train=True)(decoded_pil(data), random.Random(seed)))
        tensor, _ = GpuAugment(64, train=True)(PackedJpegs.of([data]), "cpu", random.Random(seed))
        assert torch.equal(cpu, again)
        assert (cpu - tensor[0]).abs().max() <= TOLERANCE


def test_flip_mirrors_the_resized_crop_on_both_paths():
    data = jpeg(photo())
    plain, flipped = CropParams(20, 10, 100, 100, False), CropParams(20, 10, 100, 100, True)
    transform = CpuTransform(50, train=True)
    assert torch.equal(transform.apply(decoded_pil(data), flipped), transform.apply(decoded_pil(data), plain).flip(2))
    assert torch.equal(tensor_path(data, 50, True, flipped), tensor_path(data, 50, True, plain).flip(2))
    assert not torch.equal(transform.apply(decoded_pil(data), flipped), transform.apply(decoded_pil(data), plain))


def one_at_a_time(images: list[torch.Tensor], params: list[CropParams], size: int) -> torch.Tensor:
    """The tensor path's definition, image by image: crop, resize (antialiased), flip, normalise."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    out = []
    for im, p in zip(images, params):
        crop = im[None, :, p.y : p.y + p.h, p.x : p.x + p.w].float()
        one = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(((one.flip(2) if p.flip else one) - mean) / std)
    return torch.stack(out)


def mixed_batch(size: int, seed: int = 5) -> tuple[list[torch.Tensor], list[CropParams]]:
    """Images whose ML-GCN crops enlarge (sides < size), shrink, or do one on each side; mirrored and plain."""
    rng = random.Random(seed)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(120, 160), (90, 90), (120, 160)] * 4]
    params = [sample_crop(im.shape[2], im.shape[1], size, rng) for im in images]
    params[0] = CropParams(0, 0, 60, 60, True)  # a group holding both a mirrored and a plain crop
    params[1] = CropParams(5, 5, 60, 60, False)
    params[2] = CropParams(3, 7, 120, 40, True)  # wider than the output, shorter
    return images, params


# Antialiasing on an enlarged side is the bilinear filter; the two kernels accumulate in a different order.
FLOAT_ROUNDING = 0.01 * ONE_GREY_LEVEL


def test_batched_apply_equals_cropping_resizing_and_flipping_each_image_alone():
    """Same-size crops are resized together (antialiased only where a side shrinks) and mirrored by one slice; the
    batch comes back in input order with each image's pixels."""
    images, params = mixed_batch(64)
    sides = {(p.w > 64, p.h > 64) for p in params}
    assert {(False, False), (True, True), (True, False)} <= sides  # enlarged, shrunk and mixed crops
    assert len({(p.w, p.h) for p in params}) < len(params)  # the case that groups
    assert len({tuple(im.shape) for im in images}) > 1  # frames of several sizes
    batch = GpuAugment(64, train=True).apply(images, params, "cpu")
    assert (batch - one_at_a_time(images, params, 64)).abs().max() <= FLOAT_ROUNDING


def test_batched_apply_writes_channels_last_when_asked_with_the_same_values():
    images, params = mixed_batch(48)
    augment = GpuAugment(48, train=True)
    plain = augment.apply(images, params, "cpu")
    packed = augment.apply(images, params, "cpu", channels_last=True)
    assert plain.is_contiguous() and packed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, packed)
    empty = augment.apply([], [], "cpu", channels_last=True)
    assert empty.shape == (0, 3, 48, 48) and empty.is_contiguous(memory_format=torch.channels_last)


def test_batched_apply_resizes_once_per_crop_size_and_flips_once_per_batch():
    """Kernel count is what a busy GPU charges the helper stream for: it must not grow with the images per size.
    Only crops with a side longer than the output take the (twice as costly) antialiasing resize."""
    rng = random.Random(1)
    images = [torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8) for _ in range(32)]
    params = [sample_crop(160, 120, 80, rng) for _ in images]
    augment = GpuAugment(80, train=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        augment.apply(images, params, "cpu")
    calls = Counter(e.name for e in prof.events() if e.cpu_parent is None)
    shrunk = {(p.h, p.w) for p in params if max(p.h, p.w) > 80}
    enlarged = {(p.h, p.w) for p in params} - shrunk
    assert shrunk and enlarged and len(shrunk) + len(enlarged) < len(images)
    assert calls["aten::_upsample_bilinear2d_aa"] == len(shrunk)
    assert calls["aten::upsample_bilinear2d"] == len(enlarged)
    assert calls["aten::flip"] == 1 and any(p.flip for p in params)
    assert calls["aten::index_select"] == 1


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_come_out_with_three_channels(mode):
    data = jpeg(photo(mode=mode))
    assert decoded_pil(data).mode == mode
    cpu = as_float(CpuTransform(32, train=False)(decoded_pil(data), random.Random(0)))
    tensor, kept = GpuAugment(32, train=False)(PackedJpegs.of([data]), "cpu", random.Random(0))
    assert cpu.shape == (3, 32, 32) and tensor.shape == (1, 3, 32, 32) and kept == [0]
    assert (cpu - tensor[0]).abs().max() <= TOLERANCE


# ---------------------------------------------------------------- to_device


def batch_of(jpegs: list[torch.Tensor]) -> dict:
    n = len(jpegs)
    return {
        "jpeg": PackedJpegs.of(jpegs),
        "target": torch.tensor([[1, 0, -1]] * n, dtype=torch.int8),
        "image_id": torch.arange(10, 10 + n, dtype=torch.int64),
        "n_bad": 1,
    }


def test_to_device_decodes_jpeg_batch_with_the_augment_and_honours_channels_last():
    batch = batch_of([jpeg(photo(seed=s)) for s in range(3)])
    images, targets, ids = to_device(batch, "cpu", GpuAugment(32, train=True), random.Random(0), channels_last=True)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert targets.dtype == torch.int8 and ids.tolist() == [10, 11, 12] and batch["n_bad"] == 1


def test_to_device_drops_an_undecodable_jpeg_with_its_target_and_counts_it():
    good = [jpeg(photo(seed=s)) for s in range(3)]
    truncated = good[1][: good[1].numel() // 2].clone()
    batch = batch_of([good[0], truncated, good[2]])
    images, targets, ids = to_device(batch, "cpu", GpuAugment(32, train=False), random.Random(0), False)
    assert images.shape[0] == 2 and ids.tolist() == [10, 12] and targets.shape == (2, 3)
    assert batch["n_bad"] == 2  # the worker's 1 plus this one
    reference, _ = GpuAugment(32, train=False)(PackedJpegs.of([good[0], good[2]]), "cpu", random.Random(0))
    assert torch.equal(images, reference)


def test_to_device_passes_on_a_jpeg_batch_whose_samples_all_failed_in_the_workers():
    """torchvision's decode_jpeg refuses an empty list."""
    batch = batch_of([])
    images, _, ids = to_device(batch, "cpu", GpuAugment(32, train=True), random.Random(0), False)
    assert images.shape == (0, 3, 32, 32) and ids.numel() == 0 and batch["n_bad"] == 1


def test_to_device_normalises_a_cpu_transformed_uint8_batch_on_the_device():
    batch = {
        "image": torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8),
        "target": torch.zeros(2, 4, dtype=torch.int8),
        "image_id": torch.tensor([5, 6]),
        "n_bad": 0,
    }
    pixels = batch["image"]
    images, targets, ids = to_device(batch, "cpu", None, random.Random(0), channels_last=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(images, (pixels.float() / 255 - mean) / std, atol=1e-6)
    assert images.is_contiguous(memory_format=torch.channels_last) and ids.tolist() == [5, 6]


def test_normalise_uses_the_imagenet_mean_and_std_of_the_pretrained_backbones():
    black_and_white = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    out = normalise(black_and_white)[0, :, 0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out, torch.stack([-mean / std, (1 - mean) / std], dim=1))
    assert (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_normalise_refuses_anything_but_uint8_rgb_batches():
    one_image = torch.zeros(3, 3, 4, dtype=torch.uint8)  # [3, H, W] with H = 3: its dim 1 looks like channels
    for bad in (torch.zeros(2, 3, 4, 4), one_image, torch.zeros(2, 1, 4, 4).byte()):
        with pytest.raises(ValueError, match=r"expected uint8 images \[B, 3, H, W\]"):
            normalise(bad)


def test_cpu_transform_hands_uint8_to_the_loader():
    out = CpuTransform(32, train=True)(decoded_pil(jpeg(photo())), random.Random(0))
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_to_device_refuses_a_jpeg_batch_without_an_augment():
    with pytest.raises(ValueError, match="raw .jpeg. bytes but no device augment was given"):
        to_device(batch_of([jpeg(photo())]), "cpu", None, random.Random(0), channels_last=False)


# ---------------------------------------------------------------- on a CUDA device (nvJPEG)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda_only
def test_normalise_on_cuda_matches_the_cpu_arithmetic():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    on_cuda = normalise(images.cuda()).cpu()
    assert on_cuda.dtype == torch.float32
    assert torch.allclose(on_cuda, normalise(images), rtol=0, atol=1e-6)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("channels_last", [False, True])
def test_batched_apply_on_cuda_gives_the_cpu_batch_in_the_requested_memory_format(channels_last):
    """The same decoded pixels and crops: CUDA's resize kernels, the strided ``index_select`` output and the
    mixed-dtype ``addcmul`` must give the CPU's batch to float rounding."""
    images, params = mixed_batch(64)
    augment = GpuAugment(64, train=True)
    on_cuda = augment.apply([im.cuda() for im in images], params, "cuda", channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert on_cuda.is_contiguous(memory_format=fmt)
    assert (on_cuda.cpu() - augment.apply(images, params, "cpu")).abs().max() <= FLOAT_ROUNDING


@pytest.mark.gpu
@cuda_only
def test_nvjpeg_path_matches_the_cpu_path_within_one_grey_level_without_chroma_subsampling():
    """With 4:4:4 chroma nvJPEG decodes bit-identically to libjpeg-turbo (measured on an H200): only resampling
    rounding remains, as on the CPU."""
    jpegs = [jpeg(photo(160 + 8 * s, 120, seed=s), subsampling=0) for s in range(8)]
    images, kept = GpuAugment(96, train=True)(PackedJpegs.of(jpegs), "cuda", random.Random(3))
    assert images.device.type == "cuda" and kept == list(range(len(jpegs)))
    rng = random.Random(3)
    cpu = as_float(torch.stack([CpuTransform(96, train=True)(decoded_pil(d), rng) for d in jpegs]))
    assert (images.cpu() - cpu).abs().max() <= TOLERANCE


@pytest.mark.gpu
@cuda_only
def test_nvjpeg_chroma_upsampling_of_420_jpegs_differs_modestly_from_libjpeg_turbo():
    """For 4:2:0 files libjpeg-turbo (PIL) interpolates chroma ("fancy upsampling") and nvJPEG does not: a decoder
    difference, not an augmentation one. Measured on an H200 at 96 px: mean 3.3 grey levels on this noisy picture
    (chroma noise is its worst case), 0.8 on the toy scenes; grayscale files decode identically."""
    for mode, mean_limit in (("RGB", 4.5), ("L", 0.5)):
        jpegs = [jpeg(photo(seed=s, mode=mode)) for s in range(4)]
        images, _ = GpuAugment(96, train=True)(PackedJpegs.of(jpegs), "cuda", random.Random(0))
        rng = random.Random(0)
        cpu = as_float(torch.stack([CpuTransform(96, train=True)(decoded_pil(d), rng) for d in jpegs]))
        diff = (images.cpu() - cpu).abs() / ONE_GREY_LEVEL
        print(f"{mode} 4:2:0 nvJPEG vs PIL: mean {diff.mean():.2f}, max {diff.max():.1f} grey levels")
        assert diff.mean() <= mean_limit


@pytest.mark.gpu
@cuda_only
def test_cuda_batch_with_grayscale_cmyk_and_corrupt_files_keeps_every_decodable_image():
    """nvJPEG refuses CMYK (the batch then decodes image by image, CMYK on the CPU); junk bytes are dropped."""
    good = jpeg(photo(), subsampling=0)
    jpegs = [good, jpeg(photo(mode="L")), jpeg(photo(mode="CMYK")), good[: good.numel() // 3].clone(), good]
    jpegs.append(torch.frombuffer(bytearray(b"\x00junk" * 40), dtype=torch.uint8))
    images, kept = GpuAugment(64, train=False)(PackedJpegs.of(jpegs), "cuda", random.Random(0))
    assert images.shape[1:] == (3, 64, 64) and images.device.type == "cuda"
    assert kept[:3] == [0, 1, 2] and kept[-1] == 4 and 5 not in kept  # nvJPEG may fill a truncated file in
    for position, image in zip(kept, images.cpu()):
        if position != 3:
            cpu = as_float(CpuTransform(64, train=False)(decoded_pil(jpegs[position]), random.Random(0)))
            assert (image - cpu).abs().max() <= TOLERANCE


@pytest.mark.gpu
@cuda_only
def test_grayscale_jpeg_with_2x2_sampling_decodes_right_on_cuda_after_device_decodable_jpeg():
    odd = jpeg(photo(mode="L"), subsampling=2)
    fixed = torch.frombuffer(bytearray(device_decodable_jpeg(odd.numpy().tobytes())), dtype=torch.uint8)
    images, _ = GpuAugment(64, train=False)(PackedJpegs.of([fixed]), "cuda", random.Random(0))
    cpu = as_float(CpuTransform(64, train=False)(decoded_pil(odd), random.Random(0)))
    assert (images[0].cpu() - cpu).abs().mean() <= 1.5 * ONE_GREY_LEVEL
