"""Samples as img2dataset stores them (caption from .json or .txt, the image file), and the counters
of samples and shards skipped, by reason."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence

from mgpt4.data.tar_reader import ShardError, TarReader

log = logging.getLogger("mgpt4.data")

# Every reason a sample or shard can be skipped for; stats() reports all of them, zeros included.
SKIP_REASONS = (
    "corrupt_image",
    "truncated_image",
    "too_large",
    "no_image",
    "no_caption",
    "bad_json",
    "no_features",
    "bad_features",
    "shard_open_failed",
    "truncated_shard",
    "corrupt_shard",
    "empty_batch",
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# At most this many skipped samples per reason are logged by each worker; the rest are only counted.
LOG_FIRST = 5


class SkipCounter:
    """Counts skipped samples by reason and logs the first few of each with their shard and key."""

    def __init__(self, counts: dict[str, int] | None = None, failed_shards: Sequence[str] = ()):
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        if counts:
            self.counts.update(counts)
        self.failed_shards = list(failed_shards)

    def add(self, reason: str, where: str, detail: str = "") -> None:
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if reason in ("shard_open_failed", "truncated_shard", "corrupt_shard"):
            # Resampling draws a bad shard again and again: name it once, count it every time.
            if where not in self.failed_shards:
                self.failed_shards.append(where)
                del self.failed_shards[:-50]
                log.warning("skipping shard %s (%s): %s", where, reason, detail)
        elif n <= LOG_FIRST:
            suffix = " (further ones are only counted)" if n == LOG_FIRST else ""
            log.warning("skipping sample %s (%s): %s%s", where, reason, detail, suffix)


def sample_caption(files: dict[str, bytes]) -> str | None:
    """The caption as img2dataset stores it: json["caption"], else the .txt; None when there is none.

    Raises ValueError when the .json cannot be parsed and there is no .txt to fall back on.
    """
    raw = files.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError as e:
            if "txt" not in files:
                raise ValueError(f"bad .json: {e}") from e
            meta = {}
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str) and caption.strip():
            return caption
    txt = files.get("txt")
    if txt is not None:
        caption = txt.decode("utf-8", "replace")
        if caption.strip():
            return caption
    return None


def caption_or_skip(files: dict[str, bytes], where: str, skips: SkipCounter) -> str | None:
    """`sample_caption`, with a sample that has none (or an unreadable .json) counted in `skips`
    (`no_caption` or `bad_json`) and None returned, so every reader of shards skips alike."""
    try:
        caption = sample_caption(files)
    except ValueError as e:
        skips.add("bad_json", where, str(e))
        return None
    if caption is None:
        skips.add("no_caption", where, "no .json caption and no .txt")
    return caption


def sample_image(files: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTS:
        data = files.get(ext)
        if data is not None:
            return data
    return None


class ShardSamples:
    """The usable samples of one shard in order, as (key, where, image bytes, caption), for readers that
    take a shard whole (validation's held-out shards, feature extraction).

    Counted in `skips` and passed over: samples with bad JSON, no caption or no image, and the shard's
    own failure (it cannot be opened, is damaged or cut short: the samples before the damage are kept).
    Afterwards `error` holds that failure, if any, and `read` how many samples the shard gave.
    """

    def __init__(self, url: str, skips: SkipCounter):
        self.url = url
        self.skips = skips
        self.error: ShardError | None = None
        self.read = 0

    def __iter__(self) -> Iterator[tuple[str, str, bytes, str]]:
        try:
            reader = TarReader(self.url)
        except ShardError as e:
            self._fail(e)
            return
        try:
            while True:
                try:
                    sample = reader.next_sample()
                except ShardError as e:
                    self._fail(e)
                    return
                if sample is None:
                    return
                self.read += 1
                key, files = sample
                where = f"{key} in {self.url}"
                caption = caption_or_skip(files, where, self.skips)
                if caption is None:
                    continue
                image = sample_image(files)
                if image is None:
                    self.skips.add("no_image", where, f"no image file among {sorted(files)}")
                    continue
                yield key, where, image, caption
        finally:
            reader.close()

    def _fail(self, e: ShardError) -> None:
        self.error = e
        self.skips.add(e.reason, self.url, str(e))
