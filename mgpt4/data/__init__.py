"""The data side: stage-1 webdataset shards, stage-2 cc_sbu_align, static-shape batches, device feeder.

Needs a tokenizer, never the model. The trainer uses:

    from mgpt4.data import DataConfig, build_loader, DeviceFeeder, ensure_synthetic
"""

from mgpt4.data.config import DataConfig, SourceConfig
from mgpt4.data.feeder import DeviceFeeder
from mgpt4.data.loader import Loader, build_loader
from mgpt4.data.synthetic import SyntheticData, ensure_synthetic
from mgpt4.data.transforms import CLIP_MEAN, CLIP_STD, clean_caption, normalize_uint8

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DataConfig",
    "DeviceFeeder",
    "Loader",
    "SourceConfig",
    "SyntheticData",
    "build_loader",
    "clean_caption",
    "ensure_synthetic",
    "normalize_uint8",
]
