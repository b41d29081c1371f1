"""What a stage-1 sample contributes besides its caption: a decoded, cropped image, or cached features.

The shard stream is the same for both kinds; only the file a sample must have, how it becomes a tensor
and the batch entry differ. Both write into slots of a preallocated batch tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info

from mgpt4.data.batches import image_buffer
from mgpt4.data.config import DataConfig
from mgpt4.data.feature_shards import FEATURE_EXT, FeatureError, decode_features
from mgpt4.data.samples import sample_image
from mgpt4.data.transforms import ImageError, image_transform

# The errors a payload raises for an unusable sample; each carries the skip counter in `reason`.
PAYLOAD_ERRORS = (ImageError, FeatureError)


class ImagePayload:
    """JPEG (or PNG/WebP) bytes -> uint8 [3, S, S], cropped as the config says."""

    key = "image"
    missing_reason = "no_image"

    def __init__(self, cfg: DataConfig):
        self.size = cfg.image_size
        self.transform = image_transform(cfg)

    def buffer(self, slots: int) -> torch.Tensor:
        return image_buffer(slots, self.size)

    def find(self, files: dict[str, bytes]) -> bytes | None:
        return sample_image(files)

    def fill(self, data: bytes, uniforms: Sequence[float] | None, out: torch.Tensor) -> None:
        self.transform(data, uniforms, out)


class FeaturePayload:
    """A `.npy` member -> float32 [num_query_tokens, qformer width]: no decode, no crop (fixed at extraction).

    fp16 files widen to fp32 losslessly; the model casts to the projection's dtype.
    """

    key = "features"
    missing_reason = "no_features"

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)

    def buffer(self, slots: int) -> torch.Tensor:
        out = torch.zeros((slots, *self.shape), dtype=torch.float32)
        # In a DataLoader worker, shared memory from the start: handing the batch over copies nothing.
        return out.share_memory_() if get_worker_info() is not None else out

    def find(self, files: dict[str, bytes]) -> bytes | None:
        return files.get(FEATURE_EXT)

    def fill(self, data: bytes, uniforms: Sequence[float] | None, out: torch.Tensor) -> None:
        decode_features(data, self.shape, out)


def make_payload(cfg: DataConfig, feature_shape: Sequence[int] | None) -> ImagePayload | FeaturePayload:
    if cfg.kind == "features":
        if feature_shape is None:
            raise ValueError("data.kind 'features' needs the feature shape (num_query_tokens, qformer width)")
        return FeaturePayload(feature_shape)
    return ImagePayload(cfg)
