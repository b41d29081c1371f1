"""Static-shape batches: uint8 images (or cached features) and fixed-length answer ids, plain or packed.

Every batch has the same shapes (images [B, 3, S, S], ids and masks [B, max_txt_len]; packed batches
add a [rows, length] layout) so the model step can be captured once as a CUDA graph and the allocator
never sees a new size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import get_worker_info

from mgpt4.data.streams import Stream, stream_rng
from mgpt4.data.transforms import caption_char_limit, cut_caption
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
    instructions the loader draws from (0: stage 1, no instruction).

    Packing also needs `context_lengths`: the LLM positions before the answer under each instruction
    (one value without instructions), `Layout.context_length` of the model's sample layouts
    (`mgpt4.model.layout`).
    """

    tokenizer: Any
    max_txt_len: int
    end_sym: str
    num_instructions: int = 0
    context_lengths: tuple[int, ...] = ()

    def context_length(self, instruction: int | None) -> int:
        if not self.context_lengths:
            raise ValueError(
                "packing needs the context length of each instruction (BatchText.context_lengths)"
            )
        return self.context_lengths[instruction or 0]

    @functools.cached_property
    def caption_chars(self) -> int:
        """Characters of a caption kept before tokenizing (`mgpt4.data.transforms.caption_char_limit`)."""
        return caption_char_limit(self.tokenizer, self.max_txt_len)

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask int64 [len(captions), max_txt_len] (`mgpt4.tokenizer.encode_answers`); captions
        are cut by characters first (`cut_caption`), which keeps the same ids."""
        cut = [cut_caption(c, self.caption_chars, self.tokenizer, self.max_txt_len) for c in captions]
        return encode_answers(self.tokenizer, cut, self.end_sym, self.max_txt_len, pad_to_max_len=True)


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
    seeded by `draw_key` (seed, reader, batch: `Stream.INSTRUCTION`), so a resumed run draws the same ones.
    """
    ids, mask = text.encode(captions)
    batch = {"image": images, "text_ids": ids, "text_mask": mask}
    instruction = draw_instruction(text, draw_key)
    if instruction is not None:
        batch["instruction"] = torch.full((len(captions),), instruction, dtype=torch.int64)
    if extra:
        batch.update(extra)
    return batch


def draw_instruction(text: BatchText, draw_key: Sequence[int]) -> int | None:
    """The batch's instruction index, uniform (the official `random.choice` per batch) from a generator
    seeded by `draw_key`; None without instructions."""
    if not text.num_instructions:
        return None
    seed, reader, batch = draw_key
    rng = stream_rng(Stream.INSTRUCTION, seed=seed, reader=reader, batch=batch)
    return int(rng.integers(text.num_instructions))


def make_packed_batch(
    payload: tuple[str, torch.Tensor],
    ids: Sequence[torch.Tensor],
    layout: tuple[torch.Tensor, torch.Tensor],
    text: BatchText,
    instruction: int | None,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The packed batch contract: the payload (`image` uint8 [N,3,S,S] or `features` [N,Q,W]) with one slot
    per sample, the first len(ids) of them used; text_ids / text_mask int64 [N, max_txt_len] (empty slots:
    pad, mask 0); `pack_slot` / `pack_pos` int64 [rows, length] (`mgpt4.data.packing`); with
    instructions, `instruction` int64 [N], the batch's one index.
    """
    key, data = payload
    slots = data.shape[0]
    text_ids = torch.full((slots, text.max_txt_len), text.tokenizer.pad_token_id, dtype=torch.int64)
    text_mask = torch.zeros((slots, text.max_txt_len), dtype=torch.int64)
    for n, row in enumerate(ids):
        text_ids[n, : len(row)] = row
        text_mask[n, : len(row)] = 1
    batch = {key: data, "text_ids": text_ids, "text_mask": text_mask}
    batch["pack_slot"], batch["pack_pos"] = layout
    if instruction is not None:
        batch["instruction"] = torch.full((slots,), instruction, dtype=torch.int64)
    if extra:
        batch.update(extra)
    return batch


# The batch entries MiniGPT4.forward takes; the rest (source, sample_id, ...) are for bookkeeping.
MODEL_INPUTS = (
    "image",
    "features",
    "text_ids",
    "text_mask",
    "instruction",
    "pack_slot",
    "pack_pos",
    "text_labels",
    "image_at",
)


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The keyword arguments of `MiniGPT4.forward` for a plain or packed, image or feature batch."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}
