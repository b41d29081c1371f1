"""Feature shards: the frozen vision path's output per sample, in the tar layout the loader reads.

`python -m mgpt4.features extract` writes, for every image shard `NAME.tar` of a source, a shard of the
same name under `<out>/<source name>/` with per sample:

    KEY.npy    the Q-Former's output, [num_query_tokens, qformer width], fp16 (or fp32), NumPy format
    KEY.txt    the caption as the image shard had it (cleaned at training time, as for images)
    KEY.json   {"key", "caption", "image_shard"}

and beside the shards `NAME.json` (samples written and skipped, by reason) and, once a run has
finished, `features.json`: the manifest that says which model, weights, crops and dtype made them.
An annotation source (a LLaVA/ShareGPT file or a Hugging Face dataset) has no shards to name the
outputs, so its entries are cut into parts of `entries_per_part` in file order, written as
`entries-000000.tar`, ...; the manifest lists the parts (`parts`) and records the annotation file it read.
Training with `data.kind: features` reads these shards with the same stream, shuffling, mixing and
resume as image shards.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mgpt4.data.shard_lists import local_path

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


def weight_digest(path: str) -> str:
    """sha256 of a weight file, or of every file in a weight folder (with its relative path): two
    files of one architecture have the same size, so only their contents tell them apart. Reads the
    whole file (about 1 s a GB)."""
    digest = hashlib.sha256()
    files = (
        sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
        if os.path.isdir(path)
        else [""]
    )
    for rel in files:
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(path, rel) if rel else path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def shard_identity(url: str) -> list | None:
    """[size in bytes, sha256 of the first 4 KiB] of a local image shard, None for a pipe or a missing
    file: what tells one set of shards from another under the same file names, without reading them."""
    path = local_path(url)
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return [os.path.getsize(path), hashlib.sha256(f.read(4096)).hexdigest()]


# The feature shard of entries [k * entries_per_part, (k + 1) * entries_per_part) of an annotation source.
PART_NAME = "entries-{:06d}.tar"


def annotation_identity(path: str) -> list:
    """[bytes, sha256] of an annotation file (read whole: an edited caption keeps the size; about 0.3 s
    for 150 MB here); [bytes of every file, None] for a folder (a save_to_disk dataset) or a
    glob of parquet files, whose embedded images can make them far larger: what tells a cache that its
    annotation source changed."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return [os.path.getsize(path), hashlib.file_digest(f, "sha256").hexdigest()]
    files = [path] if os.path.isdir(path) else sorted(glob.glob(path))
    return [sum(weight_bytes(p) for p in files), None]


def annotation_parts(folder: str, where: str) -> list[str]:
    """The feature shard paths of an annotation source's cache folder, as its manifest lists them;
    ValueError naming `where` when the folder holds no finished extraction of an annotation source."""
    manifest = read_manifest(folder)
    if manifest is None or "parts" not in manifest:
        what = (
            "no " + MANIFEST_FILE
            if manifest is None
            else f"a {MANIFEST_FILE} of image shards, not of entries"
        )
        raise ValueError(
            f"{where}: {folder} has {what}: extract this source's features first "
            f"(`python -m mgpt4.features extract --recipe ... --out <features_root>`; a re-run does only what is missing)"
        )
    return [os.path.join(folder, name) for name in manifest["parts"]]


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
