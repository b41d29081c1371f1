"""What the steps trained on, counted exactly from the batches themselves: samples, tokens, padding, FLOPs.

A packed step holds a varying number of samples, so `samples_seen`, throughput and MFU cannot come from
the batch size. Each batch's counts are summed on the device (no host sync per step) and summed over
ranks only when read: at a log line and at a checkpoint, which every rank reaches together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mgpt4.config import ModelConfig
from mgpt4.model.layout import Layout
from mgpt4.model.llm import LLMSizes, llm_sizes, resolve_llm_config
from mgpt4.train.flops import train_flops

# samples; their real tokens (context + answer); LLM positions computed (padding included); and the
# tokens and squared lengths the FLOP count uses (unpacked: every position; packed: each sample's own).
COUNTS = ("samples", "tokens", "positions", "flop_tokens", "flop_square")


def batch_counts(batch: dict[str, Any], context: torch.Tensor) -> torch.Tensor:
    """int64 [len(COUNTS)] on the batch's device. `context` int64 [instructions] holds the positions
    before the answer under each instruction (`Layout.context_length` of `MiniGPT4.sample_layouts`), on
    the same device; a sample is its context, then its answer tokens."""
    mask = batch["text_mask"]
    slots, answer_len = mask.shape
    if "pack_slot" in batch:
        slot = batch["pack_slot"].flatten() + 1  # 0 = padding
        # scatter_add rather than bincount: bincount reads the maximum back to the host every step.
        lengths = slot.new_zeros(slots + 1).scatter_add_(0, slot, torch.ones_like(slot))[1:]
        tokens, square = lengths.sum(), (lengths * lengths).sum()
        positions = lengths.new_full((), slot.numel())  # made on the device: a host copy would sync
        return torch.stack([(lengths > 0).sum(), tokens, positions, tokens, square])
    ins = batch.get("instruction")
    ctx = context.index_select(0, ins[:1] if ins is not None else context.new_zeros(1))[0]
    seq = ctx + answer_len
    b = mask.new_full((), slots)
    return torch.stack([b, b * ctx + mask.sum(), b * seq, b * seq, b * seq * seq])


@dataclass
class Window:
    """Counts over all ranks since the last log line, and their model FLOPs."""

    samples: int
    tokens: int
    positions: int
    flops: float

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.positions if self.positions else 0.0


class Tally:
    """Per-rank counts summed on the device; `sync` adds every rank's to the window and returns the
    number of samples it added (a collective call). `layouts` are the samples' under each instruction
    (`MiniGPT4.sample_layouts`), in the loader's order."""

    def __init__(
        self,
        model: ModelConfig,
        layouts: Sequence[Layout],
        cached: bool,
        device: torch.device,
        llm: LLMSizes | None = None,
    ):
        self.model = model
        self.llm = llm or llm_sizes(resolve_llm_config(model))  # read once, not at every window
        self.cached = cached
        context = [lay.context_length for lay in layouts]
        self.context = torch.tensor(context, dtype=torch.int64, device=device)
        self._pending = torch.zeros(len(COUNTS), dtype=torch.int64, device=device)
        self._window = torch.zeros(len(COUNTS), dtype=torch.int64)

    def add(self, batch: dict[str, Any]) -> None:
        self._pending += batch_counts(batch, self.context.to(batch["text_mask"].device))

    def sync(self) -> int:
        total = self._pending.clone()
        self._pending.zero_()
        if dist.is_initialized():
            dist.all_reduce(total)
        total = total.cpu()
        self._window += total
        return int(total[0])

    def take_window(self) -> Window:
        c = dict(zip(COUNTS, (int(v) for v in self._window.tolist())))
        flops = train_flops(
            self.model, c["samples"], c["flop_tokens"], c["flop_square"], self.cached, self.llm
        )
        self._window.zero_()
        return Window(c["samples"], c["tokens"], c["positions"], flops)
