"""Every random stream of the data pipeline: one registry of purposes and one way to seed them.

A stream is seeded by `[purpose tag, *key]`, the key in the order the registry names (the run's seed
first where the stream depends on it, then the position it is drawn for). The tag comes first and is
unique, so two purposes never share a stream, whatever their keys; naming the key fields at every call
keeps one purpose's key order the same at every call site. A resumed run redraws a stream from its key
alone, which is what makes the data positions exact on resume.
"""

from __future__ import annotations

import enum

import numpy as np


@enum.unique
class Stream(enum.IntEnum):
    """The purposes that draw random numbers; the value is the stream's tag (the first seed word)."""

    SHARD_RESAMPLE = 11  # which shard a resampled shard list reads next
    SHARD_EPOCH = 12  # the shard order of one pass over a shard list
    SHARD_BLOCK = 13  # the shuffle and the crops of one shuffle block of samples
    SHARD_MIX = 14  # which source each slot of a batch comes from (data.mix)
    ALIGN_EPOCH = 21  # the pair order of one stage-2 epoch
    ALIGN_CROP = 22  # the crops of one stage-2 batch
    ALIGN_HOLDOUT = 23  # which pairs data.val.holdout keeps apart (fixed: no seed)
    INSTRUCTION = 31  # the instruction of one training batch
    DATA_PASS = 32  # the seed of a later data pass (train.resume_data)
    HELDOUT_INSTRUCTION = 41  # the instruction of one held-out sample (fixed: no seed)
    SAMPLE_CROP = 42  # the crop of one sample, from its shard and key (data.crops: sample)
    ENTRY_BLOCK = 51  # the entry draws (resampled) and crops of one block of an annotation source
    ENTRY_EPOCH = 52  # the entry order of one pass over an annotation source (resampled: false)


# The key fields of each stream, in seed order.
KEYS: dict[Stream, tuple[str, ...]] = {
    Stream.SHARD_RESAMPLE: ("seed", "shards", "reader", "draw"),
    Stream.SHARD_EPOCH: ("seed", "shards", "reader", "epoch"),
    Stream.SHARD_BLOCK: ("seed", "shards", "reader", "block"),
    Stream.SHARD_MIX: ("seed", "reader", "batch"),
    Stream.ALIGN_EPOCH: ("seed", "epoch"),
    Stream.ALIGN_CROP: ("seed", "rank", "batch"),
    Stream.ALIGN_HOLDOUT: (),
    Stream.INSTRUCTION: ("seed", "reader", "batch"),
    Stream.DATA_PASS: ("seed", "data_pass"),
    Stream.HELDOUT_INSTRUCTION: ("index",),
    Stream.SAMPLE_CROP: ("seed", "shard_crc", "key_crc"),
    Stream.ENTRY_BLOCK: ("seed", "shards", "reader", "block"),
    Stream.ENTRY_EPOCH: ("seed", "shards", "epoch"),
}


def stream_seed(purpose: Stream, **key: int) -> np.random.SeedSequence:
    """The SeedSequence of `purpose` at `key` (exactly the fields KEYS names, non-negative ints).

    Raises TypeError naming the stream and its fields when a field is missing or unknown."""
    names = KEYS[purpose]
    if set(key) != set(names):
        raise TypeError(f"random stream {purpose.name} is keyed by {list(names)}, got {sorted(key)}")
    return np.random.SeedSequence([int(purpose), *(int(key[n]) for n in names)])


def stream_rng(purpose: Stream, **key: int) -> np.random.Generator:
    """A generator on the stream of `purpose` at `key` (see `stream_seed`)."""
    return np.random.default_rng(stream_seed(purpose, **key))
