"""Static-shape batches: uint8 images, fixed-length answer ids, and the per-sample skip counters.

Every batch has the same shapes (images [B, 3, S, S], ids and masks [B, max_txt_len]) so the model
step can be captured once as a CUDA graph and the allocator never sees a new size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import torch
from torch.utils.data import get_worker_info

from mgpt4.tokenizer import encode_answers

log = logging.getLogger("mgpt4.data")

# Every reason a sample or shard can be skipped for; stats() reports all of them, zeros included.
SKIP_REASONS = (
    "corrupt_image",
    "truncated_image",
    "too_large",
    "no_image",
    "no_caption",
    "bad_json",
    "shard_open_failed",
    "truncated_shard",
    "corrupt_shard",
    "empty_batch",
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# At most this many skipped samples per reason are logged by each worker; the rest are only counted.
LOG_FIRST = 5


def image_buffer(batch: int, size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] in channels-last memory (what the resampler writes, so filling a slot is a
    plain copy). In a DataLoader worker it lives in shared memory from the start, so handing the batch
    to the trainer costs no copy (the default collate does the same)."""
    if get_worker_info() is None:
        storage = torch.empty(batch * size * size * 3, dtype=torch.uint8)
    else:
        shared = torch.UntypedStorage._new_shared(batch * size * size * 3)
        storage = torch.empty(0, dtype=torch.uint8).set_(shared)
    return storage.view(batch, size, size, 3).permute(0, 3, 1, 2)


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


def make_batch(
    images: torch.Tensor,
    captions: Sequence[str],
    tokenizer,
    max_txt_len: int,
    end_sym: str,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The batch contract: image uint8 [B,3,S,S], text_ids / text_mask int64 [B, max_txt_len]."""
    ids, mask = encode_answers(tokenizer, list(captions), end_sym, max_txt_len, pad_to_max_len=True)
    batch = {"image": images, "text_ids": ids, "text_mask": mask}
    if extra:
        batch.update(extra)
    return batch
