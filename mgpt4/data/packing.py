"""Packing whole samples into fixed rows: where each sample goes, decided in the loader.

A packed batch keeps static shapes: `rows` rows of `length` tokens and at most `slots` samples. Each
sample is one whole MiniGPT-4 sequence (BOS, optional instruction, image queries, answer + end_sym),
never split over rows. Samples are placed first-fit in the order the stream gives them; the first one
that fits in no row ends the batch and opens the next one, so nothing is dropped and the placement is a
pure function of the sample stream (a resumed run places the same samples in the same places).

The layout the model reads is two int64 [rows, length] maps: `pack_slot` (which sample of the batch a
position holds, -1 for padding) and `pack_pos` (the position inside that sample, 0 for padding), so
positions restart at 0 for each sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RowPacker:
    """First-fit placement of samples into `rows` rows of `length` tokens, at most `slots` samples."""

    rows: int
    length: int
    slots: int
    placed: list[tuple[int, int, int]] = field(default_factory=list)  # (row, start, tokens) per sample

    def __post_init__(self) -> None:
        if self.rows < 1 or self.length < 1 or self.slots < 1:
            raise ValueError(
                f"packing needs rows, length and slots >= 1, got {self.rows}, {self.length}, {self.slots}"
            )
        self._used = [0] * self.rows

    @property
    def full(self) -> bool:
        return len(self.placed) >= self.slots

    def place(self, tokens: int) -> bool:
        """Put a sample of `tokens` tokens into the first row with room; False when none has room."""
        if tokens > self.length:
            raise ValueError(f"a sample of {tokens} tokens is longer than a packed row ({self.length})")
        if self.full:
            return False
        for row, used in enumerate(self._used):
            if used + tokens <= self.length:
                self.placed.append((row, used, tokens))
                self._used[row] = used + tokens
                return True
        return False

    def layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pack_slot, pack_pos), int64 [rows, length]; sample n of the batch is slot n."""
        slot = np.full((self.rows, self.length), -1, dtype=np.int64)
        pos = np.zeros((self.rows, self.length), dtype=np.int64)
        for n, (row, start, tokens) in enumerate(self.placed):
            slot[row, start : start + tokens] = n
            pos[row, start : start + tokens] = np.arange(tokens)
        return torch.from_numpy(slot), torch.from_numpy(pos)


def suggest_rows(batch_size: int, mean_tokens: float, length: int) -> int:
    """Rows of `length` tokens that hold `batch_size` samples of `mean_tokens` on average (at least one)."""
    return max(1, round(batch_size * mean_tokens / length))
