"""Specifications of the JPEG bytes given to the device decoder: every file the CPU path scores, with its pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import jpeg, photo
from PIL import Image, ImageFile, ImageFilter

from mlgcn_dist.data.jpeg import device_decodable_jpeg, nvjpeg_misreads


def as_bytes(img: Image.Image, subsampling: int | None = None) -> bytes:
    return jpeg(img, subsampling).numpy().tobytes()


def pixels(data: bytes, mode: str | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode) if mode else img, dtype=int)


@pytest.mark.parametrize("subsampling", [2, 1], ids=["2x2", "2x1"])
def test_grayscale_jpegs_with_other_than_1x1_sampling_are_reencoded_with_1x1_and_their_pixels_kept(subsampling):
    odd = as_bytes(photo(mode="L"), subsampling=subsampling)
    with Image.open(io.BytesIO(odd)) as img:
        assert nvjpeg_misreads(img)
    fixed = device_decodable_jpeg(odd)
    with Image.open(io.BytesIO(fixed)) as img:
        assert img.format == "JPEG" and img.mode == "L" and img.layer[0][1:3] == (1, 1) and not nvjpeg_misreads(img)
    assert np.abs(pixels(fixed) - pixels(odd)).mean() < 1.5  # one quality-95 re-encoding


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_whole_jpegs_the_device_reads_right_are_passed_on_byte_for_byte(mode):
    data = as_bytes(photo(mode=mode))
    assert device_decodable_jpeg(data) is data


def test_a_whole_jpeg_is_passed_on_without_being_decoded_on_the_cpu(monkeypatch):
    """Its pixels are the device decoder's work: only a JPEG that lacks its end marker is decoded here."""
    data = as_bytes(photo())

    def decode(self):
        raise AssertionError("decoded on the CPU")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    assert device_decodable_jpeg(data) is data


def test_a_whole_jpeg_with_bytes_after_its_end_marker_is_passed_on():
    data = as_bytes(photo()) + b"\0" * 7
    assert device_decodable_jpeg(data) is data


def test_a_truncated_jpeg_raises_as_the_cpu_path_does_instead_of_being_filled_in_by_the_device():
    data = as_bytes(photo())
    with pytest.raises(OSError, match="truncated"):
        device_decodable_jpeg(data[: len(data) * 2 // 3])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L"])
def test_another_format_under_a_jpeg_name_is_reencoded_to_a_jpeg_of_the_same_picture(mode):
    png = io.BytesIO()
    smooth = photo().filter(ImageFilter.GaussianBlur(2))  # what JPEG keeps to about a grey level
    picture = smooth.quantize(256) if mode == "P" else smooth.convert(mode)
    picture.save(png, "PNG")
    fixed = device_decodable_jpeg(png.getvalue())
    with Image.open(io.BytesIO(fixed)) as img:
        assert img.format == "JPEG" and img.mode in ("RGB", "L")
    want = np.asarray(picture.convert("RGB"), dtype=int)
    assert np.abs(pixels(fixed, "RGB") - want).mean() < 4  # one quality-95 encoding, chroma at 4:2:0


def test_bytes_that_are_no_image_raise_what_the_readers_count_as_unreadable():
    with pytest.raises(OSError):
        device_decodable_jpeg(b"not an image at all")
