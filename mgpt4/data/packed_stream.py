"""Stage-1 batches packed into fixed rows (`data.pack_length`, `data.pack_rows`), from images or features.

The samples come from the same shard streams, in the same order, as unpacked batches; only how many go
into a batch differs. A batch takes samples until one fits in no row (or its `batch_size` slots are
full). That sample is not dropped: it waits, decoded, as its source's pending sample and opens the next
batch that draws its source. The worker's saved position of that source is the stream's position
before the pending sample, so a resumed run reads it again and packs exactly as the uninterrupted run.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from mgpt4.data.batches import draw_instruction, make_packed_batch
from mgpt4.data.packing import RowPacker
from mgpt4.data.shard_stream import ShardBatches, ShardDataset, Taken


class Pending(NamedTuple):
    """A sample read and decoded that did not fit into the batch it was read for."""

    taken: Taken
    ids: torch.Tensor  # its answer ids, end_sym included, cut to max_txt_len
    data: torch.Tensor  # its decoded image (or features), copied out of the batch it did not fit


class PackedShardBatches(ShardBatches):
    """The packed batches of one reader (rank, worker); see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any):  # ShardBatches' arguments
        super().__init__(*args, **kwargs)
        self.pending: list[Pending | None] = [None] * len(self.streams)

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["sources"] = [
            p.taken.before if p is not None else s.state() for p, s in zip(self.pending, self.streams)
        ]
        return state

    def _answer_ids(self, caption: str) -> torch.Tensor:
        ids, mask = self.text.encode([caption])
        return ids[0, : int(mask[0].sum())]

    def _next_sample(self, source: int, out: torch.Tensor) -> tuple[Taken, torch.Tensor]:
        """The source's pending sample, or its next usable one, written into `out`."""
        pending = self.pending[source]
        if pending is not None:
            self.pending[source] = None
            out.copy_(pending.data)
            return pending.taken, pending.ids
        taken = self._fill_slot(self.streams[source], out)
        return taken, self._answer_ids(taken.caption)

    def next_batch(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        instruction = draw_instruction(self.text, (cfg.seed, self.reader, self.batches))
        context = self.text.context_length(instruction)
        sources = self._sources()  # one per slot: the batch's source, or each sample's
        slots = self.payload.buffer(cfg.batch_size)
        packer = RowPacker(cfg.pack_rows, cfg.pack_length, cfg.batch_size)
        taken: list[Taken] = []
        ids: list[torch.Tensor] = []
        while not packer.full:
            n = len(taken)
            source = int(sources[n])
            sample, answer = self._next_sample(source, slots[n])
            if not packer.place(context + len(answer)):
                self.pending[source] = Pending(sample, answer, slots[n].clone())
                break
            taken.append(sample)
            ids.append(answer)
        self.batches += 1
        used = len(taken)
        slots[used:].zero_()  # unused slots hold no sample; zeros keep the batch a function of the stream
        extra = {
            "source": torch.cat([torch.from_numpy(sources[:used]), torch.full((cfg.batch_size - used,), -1)]),
            "sample_id": torch.tensor(
                [t.sample_id for t in taken] + [-1] * (cfg.batch_size - used), dtype=torch.int64
            ),
        }
        return make_packed_batch(
            (self.payload.key, slots), ids, packer.layout(), self.text, instruction, extra
        )


class PackedShardDataset(ShardDataset):
    """The IterableDataset a DataLoader runs for packed stage-1 batches (one rank)."""

    batches_class = PackedShardBatches
