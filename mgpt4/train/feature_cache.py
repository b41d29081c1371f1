"""Training from a feature cache: the cache must come from this model's vision path.

A cache holds the Q-Former's output of one ViT + Q-Former with one set of weights. Training a
projection on features of another one would run without error and learn the wrong thing, so before
training every local cache folder's `features.json` is compared with the model config.
"""

from __future__ import annotations

import functools
import glob
import os

from mgpt4.config import Config
from mgpt4.data.feature_shards import (
    MANIFEST_FILE,
    annotation_identity,
    read_manifest,
    shard_identity,
    weight_bytes,
    weight_digest,
)
from mgpt4.data.shard_lists import expand_shards, local_path, shard_file_name
from mgpt4.data.shard_stream import expand_source
from mgpt4.strict_config import ConfigError, to_dict


def cache_folders(cfg: Config) -> list[tuple[str, str]]:
    """(source name, folder) of every local feature shard folder the sources read."""
    out = []
    for i, name in enumerate(cfg.data.source_names()):
        folders = {os.path.dirname(p) for p in map(local_path, expand_source(cfg.data, i)) if p is not None}
        out.extend((name, f) for f in sorted(folders))
    return out


def check_feature_cache(cfg: Config) -> list[str]:
    """Messages for cache folders without a finished extraction (a missing input, like a missing shard);
    raises ConfigError when a cache was made by another vision path than `cfg.model`'s."""
    if cfg.data.kind != "features":
        return []
    missing = []
    for name, folder in cache_folders(cfg):
        if not os.path.isdir(folder):
            continue  # the shard check reports missing folders
        manifest = read_manifest(folder)
        if manifest is None:
            missing.append(
                f"data.sources ({name}): {folder} has no {MANIFEST_FILE}: the extraction has not finished "
                f"(run `python -m mgpt4.features extract` again; it does only what is missing)"
            )
            continue
        problems = manifest_mismatches(cfg, manifest) + image_shard_mismatches(cfg, name, manifest)
        if problems:
            raise ConfigError(
                f"the feature cache in {folder} was not made by this model's vision path from these sources:\n  "
                + "\n  ".join(problems)
            )
    return missing


def image_shard_mismatches(cfg: Config, source: str, manifest: dict, checked: int = 32) -> list[str]:
    """The source's image shards (those on this machine) that are not the ones the cache was made
    from: a name the cache does not hold, another size, or (for `checked` shards spread over the list,
    so that a start-up reads 4 KiB of a few files, not of ten thousand) other first bytes. One line
    each, the first five."""
    index = cfg.data.source_names().index(source)
    src = cfg.data.sources[index]
    if src.is_annotations():
        return annotation_mismatches(src.annotations, f"data.sources[{index}].annotations", manifest)
    made_from = manifest.get("image_shards")
    if not cfg.data.features_root or made_from is None:
        return []  # shards that name feature shards directly, or a cache that did not record them
    field = f"data.sources[{index}].shards"
    urls = expand_shards(cfg.data.sources[index].shards, field)
    read = set(urls[:: max(1, len(urls) // checked)])
    problems = []
    for url in urls:
        path = local_path(url)
        if path is None or not os.path.isfile(path):
            continue
        name, size = shard_file_name(url), os.path.getsize(path)
        theirs = made_from.get(name)
        if name not in made_from:
            problems.append(f"{field}: {path}: the cache holds no shard of that name")
        elif theirs is not None and theirs[0] != size:
            problems.append(
                f"{field}: {path} has {size} bytes; the cache was made from a {name} of {theirs[0]} bytes"
            )
        elif theirs is not None and url in read and shard_identity(url) != theirs:
            problems.append(
                f"{field}: {path} begins with other bytes than the {name} the cache was made from"
            )
    return problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])


def annotation_mismatches(path: str, field: str, manifest: dict) -> list[str]:
    """Whether an annotation source is the file (or dataset) its cache was made from: one line if not."""
    made_from = manifest.get("annotations")
    if made_from is None:
        return [f"{field}: {path}, but the cache was made from image shards, not from an annotation file"]
    if not os.path.exists(path) and not glob.glob(path):
        return []  # the features train without it; the cache recorded which file it was
    if annotation_identity(path) != made_from.get("identity"):
        return [
            f"{field}: {path} is not the annotation file the cache was made from ({made_from.get('path')}, "
            f"{made_from.get('identity', [None])[0]} bytes): extract again into a new folder"
        ]
    return []


def manifest_mismatches(cfg: Config, manifest: dict) -> list[str]:
    """Where a cache's manifest and the model config disagree, one line each."""
    m = cfg.model
    problems = []
    shape = list(m.image_token_shape())
    if manifest.get("shape") != shape:
        problems.append(
            f"features are {manifest.get('shape')} per sample; the model's image tokens are {shape} "
            "(count, width: model.qformer, or model.vision with model.connector)"
        )
    made = manifest.get("model", {})
    theirs = (made.get("connector", "qformer"), made.get("concat_tokens", m.concat_tokens))  # older: Q-Former
    ours = (m.connector_kind(), m.concat_tokens)
    if theirs[0] != ours[0] or (ours[0] == "concat" and theirs[1] != ours[1]):
        problems.append(
            f"model.connector: the cache has {theirs[0]!r} ({theirs[1]}), the config {ours[0]!r} ({ours[1]})"
        )
    parts = [("vision", to_dict(m.vision))] + (
        [("qformer", to_dict(m.qformer))] if m.connector_kind() == "qformer" else []
    )
    for part, ours in parts:
        theirs = manifest.get("model", {}).get(part) or {}  # a cache without a Q-Former has none
        for key, value in ours.items():
            if theirs.get(key) != value:
                problems.append(
                    f"model.{part}.{key}: the cache has {theirs.get(key)!r}, the config {value!r}"
                )
    # Weight files named by the config must be the ones the cache was made with; unnamed ones are fine
    # (the step never runs the vision path, so its weights do not matter then).
    made_with = manifest.get("weights", {})
    for part, path in m.vision_files().items():
        if not os.path.exists(path):
            continue
        if part not in made_with:
            problems.append(f"model.weights.{part}: {path}, but the cache was made without that file")
        elif not _same_file(made_with[part], path):
            problems.append(
                f"model.weights.{part}: {path} is not the file the cache was made with ({made_with[part].get('path')})"
            )
    return problems


def _same_file(recorded: dict, path: str) -> bool:
    """Whether `path` is the weight file (or folder) a manifest recorded: its size first, then its
    contents, hashed once per process for each file as it is now (a check per cache folder would
    otherwise read a 2 GB ViT file once for every source)."""
    if recorded.get("bytes") != weight_bytes(path):
        return False
    stat = os.stat(path)
    return recorded.get("sha256") == _digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return weight_digest(path)
