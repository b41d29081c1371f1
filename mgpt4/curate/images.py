"""Image bytes -> the model's eval input, and image bytes -> a cc_sbu_align JPEG.

Kept apart from `mgpt4.data` on purpose: curation needs only the eval transform of the reference
(resize to SxS bicubic, CLIP normalisation), which PIL and torch give directly.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
JPEG_MAGIC = b"\xff\xd8\xff"


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode (so truncation shows up here, not later) and convert to RGB."""
    with warnings.catch_warnings():
        # A decompression-bomb warning is an image we still accept; the error above PIL's limit is not.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
    return img.convert("RGB")


def eval_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """The reference's eval transform: SxS bicubic, [0,1], CLIP mean/std -> float32 [3,S,S]."""
    arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (t - mean) / std


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
