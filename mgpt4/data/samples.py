"""Samples as img2dataset stores them (caption from .json or .txt, the image file), and the counters
of samples and shards skipped, by reason."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

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


def sample_image(files: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTS:
        data = files.get(ext)
        if data is not None:
            return data
    return None
