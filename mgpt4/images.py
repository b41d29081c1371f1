"""Image constants and the official eval transform, shared by training data, chat and curation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation, which EVA-CLIP and BLIP-2 were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eval_transform(img: Image.Image, size: int) -> torch.Tensor:
    """The official eval transform: bicubic resize to size x size, to [0, 1], CLIP normalisation -> [3,S,S]."""
    img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
