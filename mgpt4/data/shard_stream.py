"""Stage 1: img2dataset webdataset shards, mixed by ratio, as static-shape batches.

Each reader (one per rank x worker) walks a shard stream that is a pure function of its position:
shard draw k is chosen from (seed, source, reader, k), with replacement ("resampled", as the official
ResampledShards) or from the reader's own share of the shards in a fresh order every epoch ("split").
Samples are read in blocks of `shuffle_buffer` raw samples and each block is permuted by
(seed, source, reader, block). The position of a source is therefore four numbers (block start:
shard draw and byte offset; block index; index inside the block), and resuming re-reads at most one
block of raw bytes.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from mgpt4.data.batches import BatchText, make_batch
from mgpt4.data.config import DataConfig
from mgpt4.data.feature_shards import annotation_parts, features_folder
from mgpt4.data.formats.annotations import AnnotationIndex, load_index
from mgpt4.data.formats.hf import HFIndex, load_hf_once
from mgpt4.data.formats.stream import AnnotationStream
from mgpt4.data.payloads import PAYLOAD_ERRORS, make_payload
from mgpt4.data.samples import SkipCounter, SkipRun, caption_or_skip, found_files
from mgpt4.data.shard_lists import (
    check_local_shards,
    check_url,
    expand_shards,
    missing_local_shards,
    shard_file_name,
)
from mgpt4.data.streams import Stream, stream_rng
from mgpt4.data.tar_reader import ShardError, TarReader
from mgpt4.data.transforms import (
    CROP_UNIFORMS,
    clean_caption,
    sample_crop_uniforms,
)
from mgpt4.data.workers import DataSourceError, WorkerDataset

log = logging.getLogger("mgpt4.data")

# A run of this many shards without one sample means the source is unusable, not unlucky.
_MAX_BAD_RUN = 100
# How many absent shards the start-up warning names.
_NAME_MISSING = 5


def _sources_key(cfg: DataConfig, rank_count: int, workers: int) -> tuple:
    """What `check_sources` depends on (not the seed: a later data pass reads the same shards)."""
    return (repr(cfg.sources), cfg.kind, cfg.features_root, cfg.resampled, rank_count, max(1, workers))


# The sources `check_sources` passed in this process: the run's config check (`mgpt4.train.resolve`)
# checks them, and the loader it then builds trusts that instead of checking them again.
_CHECKED: set[tuple] = set()


def check_sources(
    cfg: DataConfig, rank_count: int, workers: int, will_exist: Collection[str] = ()
) -> list[str]:
    """Check every source's shards: URL schemes the reader can open and, in split mode, a shard for
    each reader (ValueError naming the source otherwise). Returns one message per source whose local
    shards all miss (a wrong path, not bad luck), leaving out sources whose shards are all in
    `will_exist`; with none, the sources count as checked for `source_urls`."""
    missing = []
    for i in range(len(cfg.sources)):
        if cfg.sources[i].reads_annotations(cfg.kind):
            try:
                check_readers(cfg, i, range(len(source_entries(cfg, i))), rank_count, workers, "entries")
            except FileNotFoundError as e:
                missing.append(f"data.sources[{i}].annotations: {e}")
            continue
        where = source_field(cfg, i)
        urls = expand_source(cfg, i)  # kind 'features' with features_root: the feature shards
        for url in urls:
            check_url(url, where)
        check_readers(cfg, i, urls, rank_count, workers)
        if not set(urls) <= set(will_exist):
            try:
                check_local_shards(urls, where, cfg.source_names()[i])
            except ValueError as e:
                missing.append(str(e))
    if not missing:
        _CHECKED.add(_sources_key(cfg, rank_count, workers))
    return missing


def source_entries(cfg: DataConfig, index: int) -> AnnotationIndex | HFIndex:
    """The indexed, checked annotation file of source `index` (format llava or sharegpt), built once per
    process (`mgpt4.data.formats.annotations.load_index`): AnnotationError lists every problem."""
    src = cfg.sources[index]
    if src.format == "huggingface":
        return load_hf_once(src.annotations, src.image_column, src.text_column, src.image_root)
    return load_index(src.annotations, src.format, src.image_root or None, pairs=True)


def source_urls(
    cfg: DataConfig, rank_count: int, workers: int, rank: int = 0
) -> list[list[str] | AnnotationIndex | HFIndex]:
    """Expanded URL lists per source (an annotation source: its index), checked by `check_sources`
    unless the run's config check did so (ValueError naming the source: a bad scheme, too few shards for
    split mode, no shard there at all, an annotation file with problems).

    When only some of a source's local shards are missing, rank 0 says how many and names the first
    few, and the run trains on the rest (each draw of an absent shard is skipped and counted as
    `shard_open_failed`).
    """
    if _sources_key(cfg, rank_count, workers) not in _CHECKED:
        missing = check_sources(cfg, rank_count, workers)
        if missing:
            raise ValueError(missing[0])
    out: list[list[str] | AnnotationIndex | HFIndex] = []
    for i in range(len(cfg.sources)):
        if cfg.sources[i].reads_annotations(cfg.kind):
            out.append(source_entries(cfg, i))
            continue
        urls = expand_source(cfg, i)
        if rank == 0:
            warn_missing(urls, source_field(cfg, i), cfg.source_names()[i])
        out.append(urls)
    return out


def source_field(cfg: DataConfig, index: int) -> str:
    """The config field that names source `index`'s shards, for messages: an annotation source read as
    features names no shards itself; its parts are the ones extracted under `data.features_root`."""
    if cfg.kind == "features" and cfg.features_root and cfg.sources[index].is_annotations():
        return f"data.sources[{index}].annotations (its feature parts under data.features_root)"
    return f"data.sources[{index}].shards"


def warn_missing(urls: Sequence[str], where: str, name: str) -> None:
    """Log how many of a source's local shards are absent, naming the first few (nothing if none is)."""
    missing = missing_local_shards(urls)
    if missing:
        more = f" and {len(missing) - _NAME_MISSING} more" if len(missing) > _NAME_MISSING else ""
        log.warning(
            f"{where}: {len(missing)} of {len(urls)} shard(s) of source {name!r} are missing "
            f"({', '.join(missing[:_NAME_MISSING])}{more}); training on the other {len(urls) - len(missing)}, "
            f"each draw of a missing shard is skipped and counted as shard_open_failed"
        )


def expand_source(cfg: DataConfig, index: int) -> list[str]:
    """The shard URLs of source `index`. Kind 'features' with `features_root`: the feature shards of the
    same file names under features_root/<source name>/ (the layout `mgpt4.features extract` writes);
    for an annotation source, the parts its manifest lists there (ValueError when it has none)."""
    src = cfg.sources[index]
    if cfg.kind == "features" and cfg.features_root:
        folder = features_folder(cfg.features_root, cfg.source_names()[index])
        if src.is_annotations():
            return annotation_parts(folder, f"data.sources[{index}] ({cfg.source_names()[index]})")
        urls = expand_shards(src.shards, f"data.sources[{index}].shards")
        return [os.path.join(folder, shard_file_name(u)) for u in urls]
    return expand_shards(src.shards, f"data.sources[{index}].shards")


def check_readers(
    cfg: DataConfig, index: int, urls: Sequence, rank_count: int, workers: int, what: str = "shard(s)"
) -> None:
    """Split mode (`resampled: false`) needs a shard (or entry) for each reader (rank x worker)."""
    readers = rank_count * max(1, workers)
    if not cfg.resampled and len(urls) < readers:
        field = "annotations" if what == "entries" else "shards"
        raise ValueError(
            f"data.sources[{index}].{field}: source {cfg.source_names()[index]!r} has {len(urls)} {what}, "
            f"fewer than {rank_count} rank(s) x {max(1, workers)} worker(s) = {readers} readers in split mode "
            f"(data.resampled: false); give at least {readers} {what}, use fewer workers, "
            f"or set data.resampled: true"
        )


def sample_id(url: str, key: str) -> int:
    """A stable 63-bit id of a sample (shard URL and key), e.g. to check coverage or find duplicates."""
    return zlib.crc32(url.encode()) << 31 | zlib.crc32(key.encode()) >> 1


class ShardStream:
    """One source as seen by one reader: an endless sequence of (sample or error, crop uniforms)."""

    def __init__(
        self,
        name: str,
        index: int,
        urls: Sequence[str],
        resampled: bool,
        block_size: int,
        seed: int,
        reader: int,
        readers: int,
        state: dict[str, int] | None = None,
    ):
        self.name = name
        self.index = index
        self.resampled = resampled
        self.block_size = block_size
        self.seed = seed
        self.reader = reader
        self.urls = list(urls) if resampled else list(urls)[reader::readers]
        if not self.urls:
            raise ValueError(f"source {name!r}: reader {reader} of {readers} has no shards")
        state = state or {"k": 0, "offset": 0, "j": 0, "p": 0}
        self.k, self.offset, self.j, self.p = state["k"], state["offset"], state["j"], state["p"]
        self._block: list[tuple] | None = None
        self._uniforms: np.ndarray | None = None
        self._next_cursor = (0, 0)
        self._tar: TarReader | None = None
        self._tar_k = -1
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def url(self, k: int) -> str:
        n = len(self.urls)
        if self.resampled:
            rng = stream_rng(
                Stream.SHARD_RESAMPLE, seed=self.seed, shards=self.index, reader=self.reader, draw=k
            )
            return self.urls[int(rng.integers(n))]
        epoch = k // n
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = stream_rng(
                Stream.SHARD_EPOCH, seed=self.seed, shards=self.index, reader=self.reader, epoch=epoch
            )
            self._epoch_order = (epoch, rng.permutation(n))
        return self.urls[int(self._epoch_order[1][k % n])]

    def state(self) -> dict[str, int]:
        if self._block is not None and self.p >= len(self._block):
            k, offset = self._next_cursor
            return {"k": k, "offset": offset, "j": self.j + 1, "p": 0}
        return {"k": self.k, "offset": self.offset, "j": self.j, "p": self.p}

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._tar_k = None, -1

    def _fill(self) -> None:
        k, offset = self.k, self.offset
        entries: list[tuple] = []
        bad_run: list[str] = []
        while len(entries) < self.block_size:
            if self._tar is None or self._tar_k != k:
                self._close()
                url = self.url(k)
                try:
                    self._tar, self._tar_k = TarReader(url, offset), k
                except ShardError as e:
                    entries.append((e.reason, url, str(e)))
                    bad_run.append(url)
                    self._check_bad_run(bad_run, str(e))
                    k, offset = k + 1, 0
                    continue
            tar = self._tar
            try:
                sample = tar.next_sample()
            except ShardError as e:
                entries.append((e.reason, tar.url, str(e)))
                if tar.samples_read == 0:
                    bad_run.append(tar.url)
                    self._check_bad_run(bad_run, str(e))
                self._close()
                k, offset = k + 1, 0
                continue
            if sample is None:
                if tar.samples_read == 0 and offset == 0:
                    bad_run.append(tar.url)
                    self._check_bad_run(bad_run, "no samples in the shard")
                self._close()
                k, offset = k + 1, 0
                continue
            bad_run.clear()
            offset = tar.next_offset
            entries.append(("ok", tar.url, sample[0], sample[1], f"{sample[0]} in {tar.url}"))
        self._next_cursor = (k, offset)
        rng = stream_rng(
            Stream.SHARD_BLOCK, seed=self.seed, shards=self.index, reader=self.reader, block=self.j
        )
        order = rng.permutation(len(entries))
        self._uniforms = rng.random((len(entries), CROP_UNIFORMS))
        self._block = [entries[i] for i in order]

    def _check_bad_run(self, bad_run: list[str], last_error: str) -> None:
        if len(set(bad_run)) >= len(self.urls) or len(bad_run) >= _MAX_BAD_RUN:
            names = ", ".join(sorted(set(bad_run))[:5])
            raise DataSourceError(
                f"source {self.name!r}: {len(bad_run)} shard draw(s) in a row gave no samples "
                f"({len(set(bad_run))} shard(s): {names}); last error: {last_error}"
            )

    def next(self) -> tuple[tuple, np.ndarray]:
        if self._block is not None and self.p >= len(self._block):
            self.k, self.offset = self._next_cursor
            self.j, self.p = self.j + 1, 0
            self._block = None
        if self._block is None:
            self._fill()
        entry, u = self._block[self.p], self._uniforms[self.p]
        self.p += 1
        return entry, u

    def close(self) -> None:
        self._close()


class Taken(NamedTuple):
    """A usable sample written into its slot: caption, stable id, and its stream's position before it."""

    caption: str
    sample_id: int
    before: dict[str, int]


class ShardBatches:
    """The batches of one reader (rank, worker): sources drawn by ratio per batch or per sample."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: Sequence[Sequence[str] | AnnotationIndex | HFIndex],
        text: BatchText,
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        state: dict[str, Any] | None = None,
        feature_shape: Sequence[int] | None = None,
    ):
        self.cfg = cfg
        self.text = text
        workers = max(1, num_workers)
        self.reader = rank * workers + worker
        readers = world_size * workers
        ratios = np.array([s.ratio for s in cfg.sources], dtype=np.float64)
        self.ratios = ratios / ratios.sum()
        state = state or {}
        src_states = state.get("sources") or [None] * len(urls)
        self.streams = [
            (AnnotationStream if isinstance(u, (AnnotationIndex, HFIndex)) else ShardStream)(
                name, i, u, cfg.resampled, cfg.shuffle_buffer, cfg.seed, self.reader, readers, src_states[i]
            )
            for i, (name, u) in enumerate(zip(cfg.source_names(), urls))
        ]
        self.batches = int(state.get("batches", 0))
        self.skips = SkipCounter(state.get("counts"), state.get("failed_shards", ()))
        self.payload = make_payload(cfg, feature_shape)
        self.clean = cfg.cleans_captions()

    def state(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "sources": [s.state() for s in self.streams],
            "counts": dict(self.skips.counts),
            "failed_shards": list(self.skips.failed_shards),
        }

    def _sources(self) -> np.ndarray:
        rng = stream_rng(Stream.SHARD_MIX, seed=self.cfg.seed, reader=self.reader, batch=self.batches)
        n, size = len(self.streams), self.cfg.batch_size
        if n == 1:
            return np.zeros(size, dtype=np.int64)
        if self.cfg.mix == "batch":
            return np.full(size, rng.choice(n, p=self.ratios), dtype=np.int64)
        return rng.choice(n, size=size, p=self.ratios).astype(np.int64)

    def _fill_slot(self, stream: ShardStream | AnnotationStream, out: torch.Tensor) -> Taken:
        """Decode the next usable sample of `stream` into `out`; skipped ones are counted, and
        `MAX_SKIP_RUN` of them in a row stop the source (DataSourceError naming why they were skipped)."""
        run = SkipRun(stream.name)
        while True:
            before = stream.state()
            entry, u = stream.next()
            if entry[0] != "ok":
                self.skips.add(entry[0], entry[1], entry[2])
                run.add(*self.skips.last)
                continue
            _, url, key, files, where = entry
            caption = caption_or_skip(files, where, self.skips)
            if caption is None:
                run.add(*self.skips.last)
                continue
            data = self.payload.find(files)
            if data is None:
                reason = self.payload.missing_reason
                detail = f"no {self.payload.key}: {found_files(files)}"
                self.skips.add(reason, where, detail)
                run.add(*self.skips.last)
                continue
            if self.cfg.crops == "sample":
                u = sample_crop_uniforms(self.cfg.seed, shard_file_name(url), key)
            try:
                self.payload.fill(data, u, out)
            except PAYLOAD_ERRORS as e:
                self.skips.add(e.reason, where, str(e))
                run.add(*self.skips.last)
                continue
            if self.clean:
                caption = clean_caption(caption, self.cfg.caption_max_words)
            return Taken(caption, sample_id(url, key), before)

    def next_batch(self) -> dict[str, torch.Tensor]:
        sources = self._sources()
        images = self.payload.buffer(self.cfg.batch_size)
        filled = [self._fill_slot(self.streams[s], images[i]) for i, s in enumerate(sources)]
        self.batches += 1
        extra = {
            "source": torch.from_numpy(sources),
            "sample_id": torch.tensor([f.sample_id for f in filled], dtype=torch.int64),
        }
        key = (self.cfg.seed, self.reader, self.batches - 1)
        batch = make_batch(images, [f.caption for f in filled], self.text, key, extra)
        if self.payload.key != "image":
            batch[self.payload.key] = batch.pop("image")
        return batch

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        try:
            while True:
                batch = self.next_batch()
                yield batch, self.state()
        finally:
            for s in self.streams:
                s.close()


class ShardDataset(WorkerDataset):
    """The IterableDataset a DataLoader runs for stage 1 (one rank)."""

    def __init__(
        self,
        cfg: DataConfig,
        text: BatchText,
        rank: int = 0,
        world_size: int = 1,
        feature_shape: Sequence[int] | None = None,
    ):
        super().__init__(cfg.num_workers)
        self.cfg = cfg
        self.urls = source_urls(cfg, world_size, cfg.num_workers, rank)
        self.text = text
        self.rank = rank
        self.world_size = world_size
        self.feature_shape = feature_shape
        make_payload(cfg, feature_shape)  # a kind that cannot make batches fails here, not in a worker

    batches_class = ShardBatches

    def worker_batches(self, worker: int, state: dict[str, Any] | None) -> Iterator[tuple[dict, dict]]:
        return iter(
            self.batches_class(
                self.cfg,
                self.urls,
                self.text,
                self.rank,
                self.world_size,
                worker,
                self.cfg.num_workers,
                state,
                self.feature_shape,
            )
        )
