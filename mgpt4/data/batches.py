"""Static-shape batches: uint8 images and fixed-length answer ids.

Every batch has the same shapes (images [B, 3, S, S], ids and masks [B, max_txt_len]) so the model
step can be captured once as a CUDA graph and the allocator never sees a new size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from mgpt4.tokenizer import encode_answers


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


@dataclass(frozen=True)
class BatchText:
    """How a batch's text is made: the answer encoding (from the model's TextConfig) and the number of
    instructions the loader draws from (0: stage 1, no instruction)."""

    tokenizer: Any
    max_txt_len: int
    end_sym: str
    num_instructions: int = 0


# The stream tag of the instruction draw, apart from the other random streams under one seed.
_TAG_INSTRUCTION = 31


def make_batch(
    images: torch.Tensor,
    captions: Sequence[str],
    text: BatchText,
    draw_key: Sequence[int],
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The batch contract: image uint8 [B,3,S,S], text_ids / text_mask int64 [B, max_txt_len], and with
    instructions, `instruction` int64 [B]: the index of the one instruction of this batch.

    The instruction is drawn uniformly (as the official `random.choice` per batch) from a generator
    seeded by `draw_key` (seed and the batch's position), so a resumed run draws the same ones.
    """
    ids, mask = encode_answers(
        text.tokenizer, list(captions), text.end_sym, text.max_txt_len, pad_to_max_len=True
    )
    batch = {"image": images, "text_ids": ids, "text_mask": mask}
    if text.num_instructions:
        rng = np.random.default_rng([_TAG_INSTRUCTION, *draw_key])
        batch["instruction"] = torch.full(
            (len(captions),), int(rng.integers(text.num_instructions)), dtype=torch.int64
        )
    if extra:
        batch.update(extra)
    return batch
