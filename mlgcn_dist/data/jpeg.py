"""JPEG bytes that every decoder reads alike: what the packer stores and what the device decoder is given.

The CPU path decodes with PIL (libjpeg-turbo), the GPU path with nvJPEG, and they disagree on three kinds of file:

- a grayscale JPEG whose single component declares sampling factors other than 1x1: nvJPEG (torchvision 0.26 +
  CUDA 13 on an H200) decodes it into wrong pixels, up to 114 grey levels off, without raising;
- a truncated JPEG: nvJPEG fills the missing part in without raising, PIL raises (a counted skip);
- a file in another format under a .jpg name (a PNG, say): PIL reads it, nvJPEG reads JPEG only.

Both the packer (once, at pack time) and the GPU path's readers (for files and for shards packed before the packer
did this) apply :func:`device_decodable_jpeg`, so an image is scored on the GPU path exactly when it is on the CPU
path, with the same pixels up to the decoders' chroma upsampling. Torch-free: the packer's processes use it.
"""

from __future__ import annotations

import io

from PIL import Image

QUALITY = 95  # of every re-encoding: one pass moves pixels by about one grey level on average
_END_OF_IMAGE = b"\xff\xd9"


def nvjpeg_misreads(image: Image.Image) -> bool:
    """Whether ``image`` (opened, not necessarily decoded) is a JPEG that nvJPEG decodes into wrong pixels."""
    return image.format == "JPEG" and len(image.layer) == 1 and tuple(image.layer[0][1:3]) != (1, 1)


def encoded(image: Image.Image) -> bytes:
    """``image`` as JPEG bytes (quality 95, 1x1 sampling for grayscale); modes other than RGB and L become RGB."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def device_decodable_jpeg(data: bytes) -> bytes:
    """``data`` as is, or re-encoded, so that nvJPEG decodes what PIL would (module docstring).

    A JPEG nvJPEG misreads, and a file in another format, are re-encoded (:func:`encoded`). A JPEG that does not
    end with its end-of-image marker is decoded here once: a truncated one raises OSError as PIL does on the CPU
    path, a whole one with bytes after the marker is kept. Raises what PIL raises for an unreadable file (one of
    ``records.UNREADABLE_IMAGE_ERRORS``).
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.format != "JPEG" or nvjpeg_misreads(image):
            return encoded(image)
        if not data.endswith(_END_OF_IMAGE):
            image.load()
    return data
