"""Image bytes -> a cc_sbu_align JPEG (the model's eval input is `mgpt4.image_sources.EvalImages`).

Pixels follow the rules of `mgpt4.images` (EXIF orientation, 16-bit, transparency on white), as in
training and chat.
"""

from __future__ import annotations

import os

from PIL import Image

from mgpt4 import images

JPEG_MAGIC = b"\xff\xd8\xff"


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode (so truncation shows up here, not later) to RGB by mgpt4.images' rules; raises
    mgpt4.images.ImageError with the reason."""
    return images.decode_rgb(data)


def write_jpeg(data: bytes, dst: str, src_path: str | None = None, quality: int = 95) -> None:
    """Put image `data` at `dst` as a JPEG, atomically.

    A JPEG file is hard-linked when it can be (same file system) or copied byte for byte; anything
    else (PNG, WebP, ...) is decoded and re-encoded, since cc_sbu_align names every image `.jpg`. So is
    a JPEG with an EXIF rotation: stored upright, every reader of the folder (the official code, which
    ignores the tag, included) sees the picture that describe saw.
    """
    tmp = f"{dst}.tmp{os.getpid()}"
    if data.startswith(JPEG_MAGIC) and images.jpeg_orientation(data) == 1:
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
        # Full-resolution colour (4:4:4): the copy should differ from what describe saw as little as a
        # JPEG can; a 3,500-image set can afford the larger files.
        decode_rgb(data).save(tmp, format="JPEG", quality=quality, subsampling=0)
    os.replace(tmp, dst)
