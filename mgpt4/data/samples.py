"""Samples as img2dataset stores them (caption from .json or .txt, the image file), and the counters
of samples and shards skipped, by reason."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence

from mgpt4.data.tar_reader import ShardError, TarReader
from mgpt4.data.workers import DataSourceError

log = logging.getLogger("mgpt4.data")

# Every reason a sample or shard can be skipped for; stats() reports all of them, zeros included.
SKIP_REASONS = (
    "corrupt_image",
    "truncated_image",
    "too_large",
    "no_image",
    "no_caption",
    "bad_json",
    "bad_caption",
    "no_features",
    "bad_features",
    "shard_open_failed",
    "truncated_shard",
    "corrupt_shard",
    "empty_batch",
    "image_url",
    "too_long",
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# At most this many skipped samples per reason are logged by each worker; the rest are only counted.
LOG_FIRST = 5
# A source whose last this many samples were all skipped is unusable, not unlucky: even a source with
# only 1% usable samples gives one within 1000 with probability 1 - 0.99**1000 > 0.9999.
MAX_SKIP_RUN = 1000
# Characters that never belong to a caption: U+FFFD is what a decoder leaves of bytes that were not
# text in its encoding; NUL is what UTF-16 text read as UTF-8 shows between its letters.
_NOT_TEXT = {"\ufffd": "U+FFFD replacement characters (text that was not UTF-8)", "\x00": "NUL characters"}


class SkipCounter:
    """Counts skipped samples by reason and logs the first few of each with their shard and key."""

    def __init__(self, counts: dict[str, int] | None = None, failed_shards: Sequence[str] = ()):
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        if counts:
            self.counts.update(counts)
        self.failed_shards = list(failed_shards)
        self.last = ("", "", "")  # (reason, where, detail) of the last skip

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.last = (reason, where, detail)
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


class SkipRun:
    """The samples of one source skipped in a row, by reason. At `limit` of them the source stops with a
    DataSourceError (one line) naming the reasons and the last skipped sample: a source whose every
    sample is skipped would otherwise keep a worker spinning until the job's time limit."""

    def __init__(self, source: str, limit: int = MAX_SKIP_RUN):
        self.source = source
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.n = 0

    def add(self, reason: str, where: str, detail: str = "") -> None:
        self.n += 1
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self.n >= self.limit:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1]))
            raise DataSourceError(
                f"source {self.source!r}: {self.n} samples in a row gave no samples to train on, all "
                f"skipped ({reasons}); the last, {where} ({reason}): {detail}"
            )

    def clear(self) -> None:
        self.counts.clear()
        self.n = 0


def found_files(files: dict[str, bytes]) -> str:
    """'found only .jpg and .json', for a skip reason; names the key rule when an extension has a dot."""
    exts = [f".{e}" for e in sorted(files)]
    listed = exts[0] if len(exts) == 1 else ", ".join(exts[:-1]) + " and " + exts[-1]
    text = f"found only {listed}" if exts else "found no file"
    if any("." in e for e in files):
        text += (
            " (as in webdataset, a sample's key ends at the first dot of the file name: "
            "'a.b.jpg' is key 'a' with extension 'b.jpg')"
        )
    return text


class CaptionError(ValueError):
    """A sample's caption cannot be used; `reason` is the skip counter it goes to (bad_json, bad_caption)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def not_text(caption: str) -> str | None:
    """What makes `caption` unfit to train on (U+FFFD or NUL characters), or None."""
    for char, what in _NOT_TEXT.items():
        if char in caption:
            return what
    return None


def _checked(caption: str, source: str) -> str:
    bad = not_text(caption)
    if bad:
        raise CaptionError("bad_caption", f"the caption in {source} has {bad}: {caption[:60]!r}")
    return caption


def sample_caption(files: dict[str, bytes]) -> str | None:
    """The caption as img2dataset stores it: json["caption"], else the .txt; None when there is none.

    Decoding rule: a .json is read by `json.loads` (UTF-8, or UTF-16/32 as JSON's own encoding
    detection finds them); a .txt must be UTF-8 (a UTF-8 byte order mark is dropped). Raises
    CaptionError (a ValueError) with reason `bad_json` when the .json cannot be parsed and there is no
    .txt to fall back on, and `bad_caption` for a .txt that is not UTF-8 (cp1252, UTF-16) or a caption
    with U+FFFD or NUL characters: such text would train as replacement characters.
    """
    raw = files.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError as e:
            if "txt" not in files:
                raise CaptionError("bad_json", f"bad .json: {e}") from e
            meta = {}
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if isinstance(caption, str) and caption.strip():
            return _checked(caption, ".json")
    txt = files.get("txt")
    if txt is not None:
        try:
            caption = txt.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            bom = (
                " (it starts with a UTF-16 byte order mark)" if txt[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
            )
            raise CaptionError(
                "bad_caption", f"the .txt is not UTF-8{bom}: {e.reason} at byte {e.start}: {txt[:40]!r}"
            ) from None
        if caption.strip():
            return _checked(caption, ".txt")
    return None


def caption_or_skip(files: dict[str, bytes], where: str, skips: SkipCounter) -> str | None:
    """`sample_caption`, with a sample that has none (or an unusable one) counted in `skips`
    (`no_caption`, `bad_json` or `bad_caption`) and None returned, so every reader of shards skips alike."""
    try:
        caption = sample_caption(files)
    except CaptionError as e:
        skips.add(e.reason, where, str(e))
        return None
    if caption is None:
        skips.add("no_caption", where, f"no caption: {found_files(files)}")
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
                    self.skips.add("no_image", where, f"no image: {found_files(files)}")
                    continue
                yield key, where, image, caption
        finally:
            reader.close()

    def _fail(self, e: ShardError) -> None:
        self.error = e
        self.skips.add(e.reason, self.url, str(e))
