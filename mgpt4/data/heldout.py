"""Held-out samples for the validation loss: the same inputs at every evaluation of every run.

`read_heldout` takes the first `data.val.samples` usable samples of the held-out source in its order
(stage 1: the shards of `data.val.shards`, shard by shard; stage 2: the pairs of `data.val.align_root`
or of the `data.val.holdout` slice), decodes them with the eval transform (the whole image resized,
no random crop) and gives each an instruction drawn from a generator keyed by its index only. Every
rank reads the same list, so the set does not depend on the number of ranks; each keeps the pixels
of its own share. `heldout_batches` cuts that share into static-shape batches of one instruction
each, padded with token-less rows and empty batches so that every rank runs the same number of
forwards (ZeRO-3 gathers parameters in every forward, on every rank).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mgpt4.data.align import load_align, split_holdout
from mgpt4.data.batches import BatchText
from mgpt4.data.config import DataConfig
from mgpt4.data.samples import ShardSamples, SkipCounter
from mgpt4.data.shard_lists import expand_shards
from mgpt4.data.streams import Stream, stream_rng
from mgpt4.data.transforms import ImageError, ImageTransform, clean_caption

log = logging.getLogger("mgpt4.data")


def fewer_samples(usable: int) -> str:
    """What to set when the held-out source has only `usable` samples: for the end of an error line."""
    if usable:
        return f"set data.val.samples={usable} or fewer, or give a larger held-out source"
    return "give a held-out source with usable samples, or set data.val.samples=0 and train.eval_every=0"


def sample_instruction(index: int, num_instructions: int) -> int:
    """The instruction of held-out sample `index`: uniform, fixed by the index alone (not the seed)."""
    return int(stream_rng(Stream.HELDOUT_INSTRUCTION, index=index).integers(num_instructions))


@dataclass
class HeldOut:
    """The held-out set as one rank keeps it: every sample's caption and instruction, its share's pixels."""

    captions: list[str]
    instructions: list[int]  # per sample; empty for stage 1 (no instruction)
    images: dict[int, torch.Tensor]  # sample index -> uint8 [3, S, S], this rank's share only
    image_size: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def _shard_samples(cfg: DataConfig, skips: SkipCounter) -> Iterator[tuple[str, bytes, str]]:
    """(where, image bytes, caption) of every usable sample of the held-out shards, in order."""
    for url in expand_shards(cfg.val.shards, "data.val.shards"):
        for _, where, image, caption in ShardSamples(url, skips):
            yield where, image, caption


def _align_samples(cfg: DataConfig, skips: SkipCounter) -> Iterator[tuple[str, bytes, str]]:
    val = cfg.val
    pairs = (
        load_align(val.align_root)
        if val.align_root
        else split_holdout(load_align(cfg.align_root or ""), val.holdout)[1]
    )
    for pair in pairs:
        try:
            with open(pair.path, "rb") as f:
                data = f.read()
        except OSError as e:  # gone since the check at start-up
            skips.add("no_image", pair.path, str(e))
            continue
        yield pair.path, data, pair.caption


def read_heldout(cfg: DataConfig, num_instructions: int = 0, rank: int = 0, world_size: int = 1) -> HeldOut:
    """The first `cfg.val.samples` usable held-out samples; this rank keeps the pixels of samples
    `rank, rank + world_size, ...`.

    Unusable samples are skipped and counted (`skipped`), as in training. Raises ValueError naming
    the source when it has fewer usable samples than asked for, and FileNotFoundError for a missing
    cc_sbu_align folder or image.
    """
    want = cfg.val.samples
    skips = SkipCounter()
    transform = ImageTransform(cfg.image_size, train=False, fast=cfg.fast_decode, dct_margin=cfg.dct_margin)
    clean = cfg.cleans_captions()
    samples = _shard_samples(cfg, skips) if cfg.kind != "align" else _align_samples(cfg, skips)
    captions: list[str] = []
    images: dict[int, torch.Tensor] = {}
    buffer = torch.empty(3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    for where, data, caption in samples:
        try:
            # Every rank decodes every sample: whether one is usable decides the indices of the rest.
            transform(data, None, buffer)
        except ImageError as e:
            skips.add(e.reason, where, str(e))
            continue
        index = len(captions)
        if index % world_size == rank:
            images[index] = buffer.clone()
        captions.append(clean_caption(caption, cfg.caption_max_words) if clean else caption)
        if len(captions) == want:
            break
    samples.close()  # closes the shard it stopped in
    skipped = {k: v for k, v in skips.counts.items() if v}
    if len(captions) < want:
        source = "data.val.shards" if cfg.kind != "align" else "data.val"
        raise ValueError(
            f"{source}: the held-out source has {len(captions)} usable samples, data.val.samples asks for "
            f"{want}" + (f" (skipped: {skipped})" if skipped else "") + f"; {fewer_samples(len(captions))}"
        )
    instructions = [sample_instruction(i, num_instructions) for i in range(want)] if num_instructions else []
    return HeldOut(captions, instructions, images, cfg.image_size, skipped)


def _groups(held: HeldOut, rank: int, world_size: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """(instruction or -1, sample indices) of each batch of one rank's share, in index order."""
    share = range(rank, len(held), world_size)
    by_instruction: dict[int, list[int]] = {}
    for i in share:
        by_instruction.setdefault(held.instructions[i] if held.instructions else -1, []).append(i)
    return [
        (ins, idx[b : b + batch_size])
        for ins, idx in sorted(by_instruction.items())
        for b in range(0, len(idx), batch_size)
    ]


def heldout_batches(
    held: HeldOut, text: BatchText, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """This rank's share as static batches: image uint8 [B,3,S,S], text_ids / text_mask int64
    [B, max_txt_len] and, with instructions, `instruction` int64 [B] (one value per batch).

    Rows past the share's end have an all-zero text_mask, so they add no tokens to the loss. Every
    rank gets as many batches as the rank with the most; the extra ones hold no tokens at all.
    """
    mine = _groups(held, rank, world_size, batch_size)
    most = max(len(_groups(held, r, world_size, batch_size)) for r in range(world_size))
    size = held.image_size
    batches = []
    for b in range(most):
        instruction, idx = mine[b] if b < len(mine) else (0, [])
        images = torch.zeros(batch_size, 3, size, size, dtype=torch.uint8)
        for row, i in enumerate(idx):
            images[row] = held.images[i]
        captions = [held.captions[i] for i in idx] + [""] * (batch_size - len(idx))
        ids, mask = text.encode(captions)  # encode_answers, a huge caption cut first
        mask[len(idx) :] = 0
        batch = {"image": images, "text_ids": ids, "text_mask": mask}
        if held.instructions:
            batch["instruction"] = torch.full((batch_size,), max(instruction, 0), dtype=torch.int64)
        batches.append(batch)
    return batches
