"""An annotation source read by one reader as the shard stream reads shards: a pure function of position.

Entry draw k of a reader is, with `resampled` (the default), drawn with replacement from
(seed, source, reader, block k // block_size) as the official ResampledShards draws shards; without it,
each epoch is a permutation of all entries from (seed, source, epoch) of which reader r takes every
readers-th entry. The crops of a block come from the same block generator. The position is one number,
the next draw, so a resumed run reads exactly the same entries with the same crops.

Each draw gives what a shard sample gives (`("ok", file, key, {"jpg": image bytes, "txt": caption,
"json": the entry}, where)`, where `where` names the entry and its image file for skip lines),
or a skip (`(reason, where, detail)`): an image that cannot be read (`no_image`) or an image URL
(`image_url`: mgpt4 reads local files; fetch them with img2dataset first).
"""

from __future__ import annotations

import numpy as np

from mgpt4.data.formats.annotations import AnnotationIndex
from mgpt4.data.streams import Stream, stream_rng
from mgpt4.data.transforms import CROP_UNIFORMS


class AnnotationStream:
    """One annotation source as seen by one reader: an endless sequence of (sample or skip, crop uniforms)."""

    def __init__(
        self,
        name: str,
        index: int,
        entries: AnnotationIndex,
        resampled: bool,
        block_size: int,
        seed: int,
        reader: int,
        readers: int,
        state: dict[str, int] | None = None,
    ):
        self.name = name
        self.index = index
        self.entries = entries
        self.resampled = resampled
        self.block_size = block_size
        self.seed = seed
        self.reader = reader
        self.readers = readers
        n = len(entries)
        self.per_epoch = len(range(reader, n, readers))
        if not resampled and self.per_epoch == 0:
            raise ValueError(f"source {name!r}: reader {reader} of {readers} has no entries of the {n}")
        self.k = int((state or {}).get("k", 0))
        self._block: tuple[int, np.ndarray | None, np.ndarray] | None = None
        self._epoch: tuple[int, np.ndarray] | None = None

    def state(self) -> dict[str, int]:
        return {"k": self.k}

    def _block_of(self, k: int) -> tuple[np.ndarray | None, np.ndarray]:
        j = k // self.block_size
        if self._block is None or self._block[0] != j:
            rng = stream_rng(
                Stream.ENTRY_BLOCK, seed=self.seed, shards=self.index, reader=self.reader, block=j
            )
            draws = rng.integers(len(self.entries), size=self.block_size) if self.resampled else None
            self._block = (j, draws, rng.random((self.block_size, CROP_UNIFORMS)))
        return self._block[1], self._block[2]

    def entry_at(self, k: int) -> int:
        """The entry number of draw k."""
        draws, _ = self._block_of(k)
        if draws is not None:
            return int(draws[k % self.block_size])
        epoch, i = divmod(k, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            perm = stream_rng(Stream.ENTRY_EPOCH, seed=self.seed, shards=self.index, epoch=epoch).permutation(
                len(self.entries)
            )
            self._epoch = (epoch, perm[self.reader :: self.readers])
        return int(self._epoch[1][i])

    def next(self) -> tuple[tuple, np.ndarray]:
        k = self.k
        i = self.entry_at(k)
        _, uniforms = self._block_of(k)
        self.k += 1
        return self.read(i), uniforms[k % self.block_size]

    def read(self, i: int) -> tuple:
        """Entry i as a shard sample ("ok", file, key, files, where) or a skip (reason, where, detail)."""
        return self.entries.sample(i)

    def close(self) -> None:
        self.entries.close()
