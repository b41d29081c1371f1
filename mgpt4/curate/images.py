"""Image bytes -> the model's eval input, and image bytes -> a cc_sbu_align JPEG.

Kept apart from `mgpt4.data` on purpose: curation needs only the eval transform of the reference
(resize to SxS bicubic, CLIP normalisation), which PIL and torch give directly. Pixels follow the rules
of `mgpt4.images` (EXIF orientation, 16-bit, transparency on white), as in training and chat.
"""

from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from mgpt4 import images
from mgpt4.curate.sources import ImageItem

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


class EvalImages(Dataset):
    """Items' images as the model's eval input [3, S, S], decoded in DataLoader workers; a bad image
    becomes an error string, never an exception (describe records it, caption evaluation scores it as
    an empty caption). Item i is (i, tensor or None, error or None)."""

    def __init__(self, items: list[ImageItem], size: int):
        self.items = items
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            return i, images.eval_transform(decode_rgb(item.read_bytes()), self.size), None
        except Exception as e:  # any decoder failure is this item's, not the run's
            return i, None, f"unreadable image {item.describe()}: {type(e).__name__}: {e}"
