"""Extraction: image shards -> feature shards of the same names, over any number of ranks, resumable.

The unit of work is one image shard, or for an annotation source (LLaVA, ShareGPT, Hugging Face) one
part of `--entries-per-part` entries in file order (`entries-000000.tar`, ...). Ranks list what is already done (a finished feature shard exists
under its final name: it is renamed into place only when complete), meet once, and then each takes every
world_size-th pending shard, so a re-run does only what is missing. Inside a rank, DataLoader workers
read and decode whole shards (the training transform with `data.crops: sample`); the main process runs
the frozen vision path on the device and writes. Bad samples are skipped and counted by the same
reasons as in training; a shard that cannot be opened is reported by name and tried again next run.
"""

from __future__ import annotations

import copy
import datetime
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mgpt4 import dist
from mgpt4.config import Config, LLMConfig, ModelConfig, WeightsConfig
from mgpt4.data.batches import image_buffer
from mgpt4.data.config import DataConfig
from mgpt4.data.feature_shards import (
    FEATURE_DTYPES,
    FEATURE_EXT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PART_NAME,
    annotation_identity,
    encode_features,
    features_folder,
    read_manifest,
    shard_identity,
    weight_bytes,
    weight_digest,
)
from mgpt4.data.samples import SKIP_REASONS, ShardSamples, SkipCounter, caption_or_skip
from mgpt4.data.shard_lists import expand_shards, shard_file_name
from mgpt4.data.shard_stream import source_entries
from mgpt4.data.transforms import ImageError, image_transform, normalize_uint8, sample_crop_uniforms
from mgpt4.dist import RankInfo
from mgpt4.logs import get_logger
from mgpt4.model import MiniGPT4, load_weights
from mgpt4.strict_config import to_dict

log = get_logger(__name__)

STATS_SUFFIX = ".stats.json"
DEFAULT_ENTRIES_PER_PART = 10_000
# Ranks meet after listing what is done (all start together) and when every share is written.


@dataclass
class ExtractOptions:
    """How to extract: where to, in what batches and dtype, on which device. Each field is a flag of
    `python -m mgpt4.features extract` (metadata: its help)."""

    out: str = field(metadata={"help": "folder of the cache: <out>/<source name>/<shard>.tar"})
    # Source names; None: every source of the config.
    sources: list[str] | None = field(
        default=None, metadata={"help": "source names (default: all of the recipe)"}
    )
    batch_size: int = field(default=64, metadata={"help": "images per vision forward"})
    num_workers: int = field(default=4, metadata={"help": "decoding workers per rank"})
    # Of the stored features: fp16 (48 KiB per sample at 32 x 768) or fp32.
    dtype: str = field(
        default="fp16", metadata={"choices": list(FEATURE_DTYPES), "help": "stored feature dtype"}
    )
    # An annotation source is written in parts of this many entries (a re-run must keep the number).
    entries_per_part: int | None = field(
        default=None,
        metadata={
            "help": "entries per feature shard of an annotation source (default: the cache folder's, else 10000)"
        },
    )
    # "auto": this rank's GPU when there is one, else the CPU.
    device: str = field(default="auto", metadata={"help": "auto (this rank's GPU, else CPU), cuda or cpu"})


@dataclass
class SourceReport:
    """What one rank did for one source."""

    name: str
    shards_total: int = 0
    shards_pending: int = 0
    shards_written: int = 0
    samples: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    failed_shards: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The frozen vision path without the LLM


def vision_only_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with a one-layer, 8-wide stand-in LLM and only the vision weights: extraction never runs
    the LLM, so a 13B one is never built or read."""
    out = copy.deepcopy(cfg)
    out.llm = LLMConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, max_position_embeddings=8
    )
    w = cfg.weights
    out.weights = WeightsConfig(eva_vit=w.eva_vit, blip2=w.blip2, blip2_hf=w.blip2_hf, timm=w.timm)
    out.precision.llm = out.precision.proj = "fp32"
    return out


def build_vision_model(cfg: ModelConfig, device: torch.device) -> MiniGPT4:
    """The ViT, ln_vision, Q-Former and query tokens of `cfg`, loaded strictly from its weight files
    (random when none are named), frozen, in eval mode, on `device`."""
    model = MiniGPT4(vision_only_config(cfg))
    load_weights(model)
    model.requires_grad_(False)
    return model.eval().to(device)


# ---------------------------------------------------------------------------------------------
# Reading and decoding (DataLoader workers)


class ShardImages(IterableDataset):
    """Whole image shards, each in chunks of up to `batch_size` decoded samples; the last chunk of a shard
    has `end` set and carries the shard's skip counts. Worker w reads shards w, w + W, ..."""

    def __init__(self, urls: Sequence[str], cfg: DataConfig, batch_size: int):
        self.urls = list(urls)
        self.cfg = cfg
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        transform = image_transform(self.cfg)
        for index in range(worker, len(self.urls), workers):
            yield from self._shard(index, transform)

    def _chunk(
        self, index: int, images: torch.Tensor, keys: list[str], captions: list[str]
    ) -> dict[str, Any]:
        return {
            "shard": index,
            "image": images[: len(keys)],
            "keys": keys,
            "captions": captions,
            "end": False,
        }

    def _shard(self, index: int, transform) -> Iterator[dict[str, Any]]:
        url = self.urls[index]
        name = shard_file_name(url)
        skips = SkipCounter()
        shard = ShardSamples(url, skips)
        samples = ((key, where, data, caption, name) for key, where, data, caption in shard)
        # A shard that gave samples before its damage is written with them, as training reads it.
        yield from self._batches(
            index, samples, skips, transform, lambda: shard.error is None or shard.read > 0
        )

    def _batches(
        self,
        index: int,
        samples: Iterator[tuple[str, str, bytes, str, str]],
        skips: SkipCounter,
        transform,
        opened,
    ) -> Iterator[dict[str, Any]]:
        """Unit `index`'s (key, where, image bytes, caption, crop name) samples decoded with the crop
        drawn from (crop name, key), in chunks of `batch_size`; the last has `end` set, the unit's skip
        counts and `opened()` (whether it could be read at all)."""
        keys: list[str] = []
        captions: list[str] = []
        images = image_buffer(self.batch_size, self.cfg.image_size)
        for key, where, data, caption, crop_name in samples:
            try:
                transform(data, sample_crop_uniforms(self.cfg.seed, crop_name, key), images[len(keys)])
            except ImageError as e:
                skips.add(e.reason, where, str(e))
                continue
            keys.append(key)
            captions.append(caption)
            if len(keys) == self.batch_size:
                yield self._chunk(index, images, keys, captions)
                keys, captions = [], []
                images = image_buffer(self.batch_size, self.cfg.image_size)
        last = self._chunk(index, images, keys, captions)
        last.update(end=True, counts=dict(skips.counts), opened=opened())
        yield last


class AnnotationImages(ShardImages):
    """Parts of an annotation source, each read whole in entry order as `ShardImages` reads a shard:
    part p holds entries `spans[p][0]` to `spans[p][1] - 1`. Crops are drawn as training from the images
    with `data.crops: sample` draws them: from the annotation file's name and the entry's key (its
    entry or line number), so the cache holds the crops that run would see."""

    def __init__(
        self,
        entries,
        spans: Sequence[tuple[int, int]],
        names: Sequence[str],
        cfg: DataConfig,
        batch_size: int,
    ):
        super().__init__(list(names), cfg, batch_size)
        self.entries = entries
        self.spans = list(spans)

    def _shard(self, index: int, transform) -> Iterator[dict[str, Any]]:
        skips = SkipCounter()
        yield from self._batches(index, self._entries(index, skips), skips, transform, lambda: True)

    def _entries(self, index: int, skips: SkipCounter) -> Iterator[tuple[str, str, bytes, str, str]]:
        first, end = self.spans[index]
        for i in range(first, end):
            got = self.entries.sample(i)
            if got[0] != "ok":  # (reason, where, detail): an unreadable image, an image URL, a changed file
                skips.add(*got)
                continue
            _, url, key, files, where = got
            caption = caption_or_skip(files, where, skips)
            if caption is not None:
                yield key, where, files["jpg"], caption, shard_file_name(url)


# ---------------------------------------------------------------------------------------------
# Writing


class FeatureShardWriter:
    """One feature shard, written under a temporary name and renamed into place when complete."""

    def __init__(self, path: str, image_shard: str, stats: dict | None = None):
        self.path = path
        self.image_shard = image_shard
        self.stats = stats or {}  # more to record in the stats file (an annotation part: its entries)
        self.tmp = path + ".tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in finish)
        self.samples = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, caption: str, features) -> None:
        self._add(f"{key}.{FEATURE_EXT}", encode_features(features))
        self._add(f"{key}.txt", caption.encode("utf-8"))
        meta = {"key": key, "caption": caption, "image_shard": self.image_shard}
        self._add(f"{key}.json", json.dumps(meta).encode("utf-8"))
        self.samples += 1

    def finish(self, skipped: dict[str, int], seconds: float) -> None:
        self.tar.close()
        stats = {
            "image_shard": self.image_shard,
            "samples": self.samples,
            "skipped": skipped,
            "seconds": seconds,
            **self.stats,
        }
        write_json_atomic(self.path[: -len(".tar")] + STATS_SUFFIX, stats)
        os.replace(self.tmp, self.path)  # the shard counts as done only from here on

    def abandon(self) -> None:
        self.tar.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def write_json_atomic(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# One source


def source_shards(cfg: Config, index: int) -> list[str]:
    """The image shard URLs of source `index`; their file names must be unique (they name the outputs)."""
    src = cfg.data.sources[index]
    urls = expand_shards(src.shards, f"data.sources[{index}].shards")
    names = [shard_file_name(u) for u in urls]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(
            f"data.sources[{index}].shards: shard file names repeat ({', '.join(dup)}); they name the feature "
            f"shards, so each must be unique within a source"
        )
    return urls


@dataclass
class SourceUnits:
    """What one source is cut into for extraction: output file names and, per name, the image shard
    URL (a shard source) or the entry span (an annotation source, with its index and identity)."""

    names: list[str]
    urls: list[str] | None = None
    spans: list[tuple[int, int]] | None = None
    entries: Any = None
    identity: list | None = None

    def dataset(self, picked: Sequence[int], cfg: DataConfig, batch_size: int) -> ShardImages:
        if self.urls is not None:
            return ShardImages([self.urls[i] for i in picked], cfg, batch_size)
        assert self.spans is not None
        return AnnotationImages(
            self.entries, [self.spans[i] for i in picked], [self.names[i] for i in picked], cfg, batch_size
        )

    def stats(self, i: int) -> dict:
        if self.spans is None:
            return {}
        return {"entries": list(self.spans[i]), "annotations": self.identity}


def source_units(cfg: Config, index: int, entries_per_part: int) -> SourceUnits:
    """Source `index` as units of work: its image shards, or its entries in parts of `entries_per_part`."""
    src = cfg.data.sources[index]
    if not src.is_annotations():
        urls = source_shards(cfg, index)
        return SourceUnits([shard_file_name(u) for u in urls], urls=urls)
    entries = source_entries(cfg.data, index)
    n = len(entries)
    spans = [(a, min(a + entries_per_part, n)) for a in range(0, n, entries_per_part)]
    names = [PART_NAME.format(k) for k in range(len(spans))]
    return SourceUnits(names, spans=spans, entries=entries, identity=annotation_identity(src.annotations))


def check_parts(folder: str, units: SourceUnits, name: str) -> None:
    """A re-run into a folder of parts must cut the same entries of the same file: ValueError otherwise
    (the parts already written would hold other entries than their names say)."""
    for i, part in enumerate(units.names):
        path = os.path.join(folder, part[: -len(".tar")] + STATS_SUFFIX)
        if not (os.path.exists(os.path.join(folder, part)) and os.path.isfile(path)):
            continue
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
        if stats.get("annotations") != units.identity:
            raise ValueError(
                f"{folder}: its parts were extracted from another version of source {name!r}'s annotation "
                f"file ({stats.get('annotations', [None])[0]} bytes; {units.identity[0]} bytes now, or other "
                "contents): extract into a new folder"
            )
        if stats.get("entries") != list(units.spans[i]):
            first, end = stats.get("entries", [0, 0])
            raise ValueError(
                f"--entries-per-part: {os.path.join(folder, part)} holds entries {first} to {end - 1}, this run "
                f"would cut {units.spans[i][0]} to {units.spans[i][1] - 1}; leave the flag out to keep the "
                "folder's, or extract into a new folder"
            )
        return  # one part tells: all parts of a run are cut alike


def part_size(folder: str, asked: int | None) -> int:
    """Entries per part for a source's cache folder: `asked`, else what the folder's manifest or first
    part says (a re-run keeps the cut), else DEFAULT_ENTRIES_PER_PART."""
    if asked is not None:
        return asked
    manifest = read_manifest(folder) if os.path.isdir(folder) else None
    if manifest and manifest.get("entries_per_part"):
        return int(manifest["entries_per_part"])
    stats = os.path.join(folder, PART_NAME.format(0)[: -len(".tar")] + STATS_SUFFIX)
    if os.path.isfile(stats):  # an interrupted first run: part 0 holds the first `size` entries
        with open(stats, encoding="utf-8") as f:
            first, end = json.load(f)["entries"]
        return end - first
    return DEFAULT_ENTRIES_PER_PART


def extract_source(
    cfg: Config,
    index: int,
    model: MiniGPT4,
    opts: ExtractOptions,
    info: RankInfo,
    device: torch.device,
) -> SourceReport:
    """This rank's share of one source's pending shards (a collective call: ranks meet once first)."""
    name = cfg.data.source_names()[index]
    folder = features_folder(opts.out, name)
    units = source_units(cfg, index, part_size(folder, opts.entries_per_part))
    names = units.names
    os.makedirs(folder, exist_ok=True)
    if units.spans is not None:
        check_parts(folder, units, name)
    pending = [i for i, n in enumerate(names) if not os.path.exists(os.path.join(folder, n))]
    dist.barrier()  # every rank has listed the same pending shards before any rank writes one
    mine = dist.share(pending, info)
    report = SourceReport(name, len(names), len(pending))
    if not mine:
        return report
    loader = DataLoader(
        units.dataset(mine, cfg.data, opts.batch_size),
        batch_size=None,
        num_workers=min(opts.num_workers, len(mine)),
        prefetch_factor=2 if opts.num_workers > 0 else None,
    )
    store = FEATURE_DTYPES[opts.dtype]
    writers: dict[int, tuple[FeatureShardWriter, float]] = {}
    start = time.perf_counter()
    try:
        for chunk in loader:
            shard = chunk["shard"]
            out_name = names[mine[shard]]
            if shard not in writers:
                path = os.path.join(folder, out_name)
                writer = FeatureShardWriter(path, out_name, units.stats(mine[shard]))
                writers[shard] = (writer, time.perf_counter())
            writer, began = writers[shard]
            if chunk["keys"]:
                images = normalize_uint8(chunk["image"].to(device, non_blocking=True))
                with torch.no_grad():
                    feats = model.image_features(images).float().cpu().numpy().astype(store)
                for key, caption, f in zip(chunk["keys"], chunk["captions"], feats):
                    writer.add(key, caption, f)
            if chunk["end"]:
                for reason, n in chunk["counts"].items():
                    report.skipped[reason] = report.skipped.get(reason, 0) + n
                if not chunk["opened"]:  # nothing was read: no output, so the next run tries again
                    writers.pop(shard)[0].abandon()
                    report.failed_shards.append(units.urls[mine[shard]] if units.urls else out_name)
                    continue
                writer.finish(chunk["counts"], time.perf_counter() - began)
                del writers[shard]
                report.shards_written += 1
                report.samples += writer.samples
                log.info(
                    f"extract {name}: {out_name} ({writer.samples} samples) "
                    f"[{report.shards_written}/{len(mine)} of this rank]"
                )
    finally:
        for writer, _ in writers.values():  # an interrupted shard leaves no final file behind
            writer.abandon()
    report.seconds = time.perf_counter() - start
    return report


def write_manifest(cfg: Config, index: int, opts: ExtractOptions, reports: Sequence[SourceReport]) -> dict:
    """Rank 0, after every rank is done: the folder's `features.json`, with totals over all its shards
    (those of earlier runs included, from their stats files)."""
    name = cfg.data.source_names()[index]
    folder = features_folder(opts.out, name)
    size = part_size(folder, opts.entries_per_part)
    units = source_units(cfg, index, size)
    samples, skipped, done = 0, dict.fromkeys(SKIP_REASONS, 0), 0
    for out_name in units.names:
        stem = out_name[: -len(".tar")]
        path = os.path.join(folder, stem + STATS_SUFFIX)
        if os.path.exists(os.path.join(folder, stem + ".tar")) and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                stats = json.load(f)
            done += 1
            samples += int(stats["samples"])
            for reason, n in stats["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + int(n)
    m = cfg.model
    weights = {}
    for part, path in m.vision_files().items():
        if path:
            weights[part] = {
                "path": os.path.abspath(path),
                "bytes": weight_bytes(path),
                "sha256": weight_digest(path),
            }
    d = cfg.data
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": name,
        "shards": len(units.names),
        "shards_done": done,
        "samples": samples,
        "skipped": skipped,
        "failed_shards": sorted({u for r in reports for u in r.failed_shards}),
        "shape": list(m.image_token_shape()),
        "dtype": opts.dtype,
        "model": {
            "vision": to_dict(m.vision),
            "qformer": to_dict(m.qformer) if m.connector_kind() == "qformer" else None,
            "connector": m.connector_kind(),
            "concat_tokens": m.concat_tokens,
            "precision": {"vit": m.precision.vit, "qformer": m.precision.qformer},
        },
        "weights": weights,
        "crops": {
            "draw": "sample",
            "seed": d.seed,
            "transform": d.transform,
            "image_size": d.image_size,
            "crop_scale": list(d.crop_scale),
            "fast_decode": d.fast_decode,
            "dct_margin": d.dct_margin,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if units.urls is not None:
        # Each image shard by file name, [size, sha256 of its first 4 KiB]: training from the cache
        # checks that its sources still name these shards (tar sizes come in 10 KiB steps, so the
        # first header and bytes of image data tell two sets apart where sizes agree).
        manifest["image_shards"] = {shard_file_name(u): shard_identity(u) for u in units.urls}
    else:
        src = cfg.data.sources[index]
        manifest["annotations"] = {
            "path": os.path.abspath(src.annotations),
            "format": src.format,
            "identity": units.identity,
            "entries": len(units.entries),
        }
        manifest["entries_per_part"] = size
        manifest["parts"] = units.names
    write_json_atomic(os.path.join(folder, MANIFEST_FILE), manifest)
    return manifest


def extract(
    cfg: Config, opts: ExtractOptions, info: RankInfo, model: MiniGPT4 | None = None
) -> list[SourceReport]:
    """Every selected source, this rank's share (collective: every rank calls it with the same arguments).

    `model` may be a whole MiniGPT4 already built (the benchmark); otherwise the vision path of
    `cfg.model` is built and loaded here. Returns this rank's reports; rank 0 also writes the manifests.
    """
    d = cfg.data
    if d.kind != "webdataset":
        raise ValueError(f"extract reads stage-1 sources: data.kind must be 'webdataset', not {d.kind!r}")
    if opts.dtype not in FEATURE_DTYPES:
        raise ValueError(f"--dtype: expected one of {tuple(FEATURE_DTYPES)}, got {opts.dtype!r}")
    if opts.batch_size < 1 or opts.num_workers < 0 or (opts.entries_per_part or 1) < 1:
        raise ValueError("--batch-size and --entries-per-part must be positive and --num-workers 0 or more")
    names = d.source_names()
    chosen = opts.sources or names
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise ValueError(f"--sources: {unknown} are not sources of this config (it has {names})")
    device = torch.device(dist.rank_device(opts.device, info))
    if model is None:
        model = build_vision_model(cfg.model, device)
    reports = []
    for index, name in enumerate(names):
        if name not in chosen:
            continue
        report = extract_source(cfg, index, model, opts, info, device)
        everyone = dist.gather(report)
        if info.rank == 0:
            write_manifest(cfg, index, opts, everyone)
            summarize(everyone, info.world_size)
        reports.append(report)
    return reports


def summarize(reports: Sequence[SourceReport], world_size: int) -> None:
    r0 = reports[0]
    samples = sum(r.samples for r in reports)
    skipped = {k: sum(r.skipped.get(k, 0) for r in reports) for k in SKIP_REASONS}
    seconds = max((r.seconds for r in reports), default=0.0)
    rate = f", {samples / seconds:.1f} samples/s" if seconds > 0 and samples else ""
    failed = [u for r in reports for u in r.failed_shards]
    log.info(
        f"extract {r0.name}: {r0.shards_total - r0.shards_pending} of {r0.shards_total} shards were done before, "
        f"{sum(r.shards_written for r in reports)} written now on {world_size} rank(s): {samples} samples, "
        f"{sum(skipped.values())} skipped { ({k: v for k, v in skipped.items() if v}) }{rate}"
    )
    if failed:
        log.warning(
            f"extract {r0.name}: {len(failed)} shard(s) could not be read, run again to retry: {failed[:5]}"
        )


__all__ = ["ExtractOptions", "SourceReport", "build_vision_model", "extract"]
