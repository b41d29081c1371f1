"""Feature shards: the frozen vision path's output per sample, in the tar layout the loader reads.

`python -m mgpt4.features extract` writes, for every image shard `NAME.tar` of a source, a shard of the
same name under `<out>/<source name>/` with per sample:

    KEY.npy    the Q-Former's output, [num_query_tokens, qformer width], fp16 (or fp32), NumPy format
    KEY.txt    the caption as the image shard had it (cleaned at training time, as for images)
    KEY.json   {"key", "caption", "image_shard"}

and beside the shards `NAME.json` (samples written and skipped, by reason) and, once a run has
finished, `features.json`: the manifest that says which model, weights, crops and dtype made them.
Training with `data.kind: features` reads these shards with the same stream, shuffling, mixing and
resume as image shards.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

FEATURE_EXT = "npy"
MANIFEST_FILE = "features.json"
FORMAT_VERSION = 1
FEATURE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


class FeatureError(Exception):
    """A sample's features cannot be used; `reason` is the skip counter it goes to."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def encode_features(features: np.ndarray) -> bytes:
    """[Q, W] float array -> the bytes of a `.npy` file."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(features), allow_pickle=False)
    return buf.getvalue()


def decode_features(data: bytes, shape: Sequence[int], out: torch.Tensor) -> None:
    """Read a `.npy` member into `out` (its dtype); FeatureError("bad_features") unless it is a float
    array of exactly `shape`."""
    try:
        arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError or OSError on damaged files
        raise FeatureError("bad_features", f"not a .npy array: {type(e).__name__}: {e}") from e
    if tuple(arr.shape) != tuple(shape) or arr.dtype not in (np.float16, np.float32):
        raise FeatureError(
            "bad_features",
            f"expected a float16/float32 array of shape {list(shape)} (model.qformer num_query_tokens x width), "
            f"found {arr.dtype} {list(arr.shape)}",
        )
    out.copy_(torch.from_numpy(arr))


def weight_bytes(path: str) -> int:
    """Size of a weight file, or of every file in a weight folder: how a manifest tells weight files apart."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def features_folder(root: str, source_name: str) -> str:
    return os.path.join(root, source_name)


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of a folder of feature shards, or None when there is none (yet)."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            manifest = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: expected a feature manifest with format_version {FORMAT_VERSION}")
    return manifest
