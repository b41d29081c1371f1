"""The data side: stage-1 webdataset shards, stage-2 cc_sbu_align, static-shape batches, device feeder.

Needs a tokenizer, never the model. The trainer uses:

    from mgpt4.data import DataConfig, build_loader, DeviceFeeder, ensure_synthetic
"""

from mgpt4.data.config import DataConfig, SourceConfig
from mgpt4.data.feeder import DeviceFeeder
from mgpt4.data.loader import Loader, build_loader
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


def __getattr__(name: str):
    # Imported on first use, not with the package: `python -m mgpt4.data.synthetic` runs that module
    # as __main__, and runpy warns when the package has imported it already.
    if name in ("SyntheticData", "ensure_synthetic"):
        from mgpt4.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
