"""Image bytes -> the model's eval input, and image bytes -> a cc_sbu_align JPEG.

Kept apart from `mgpt4.data` on purpose: curation needs only the eval transform of the reference
(resize to SxS bicubic, CLIP normalisation), which PIL and torch give directly.
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode (so truncation shows up here, not later) and convert to RGB."""
    with warnings.catch_warnings():
        # A decompression-bomb warning is an image we still accept; the error above PIL's limit is not.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    return img.convert("RGB")


def write_jpeg(data: bytes, dst: str, src_path: str | None = None, quality: int = 95) -> None:
    """Put image `data` at `dst` as a JPEG, atomically.

    A JPEG file is hard-linked when it can be (same file system) or copied byte for byte; anything
    else (PNG, WebP, ...) is decoded and re-encoded, since cc_sbu_align names every image `.jpg`.
    """
    tmp = f"{dst}.tmp{os.getpid()}"
    if data.startswith(JPEG_MAGIC):
        decode_rgb(data)  # an unreadable JPEG must not reach the training set
        linked = False
        if src_path is not None:
            try:
                os.link(src_path, tmp)
                linked = True
            except OSError:
                linked = False
        if not linked:
            with open(tmp, "wb") as f:
                f.write(data)
    else:
        decode_rgb(data).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, dst)
