"""Stage 2 on conversations (`data.kind: conversations`): LLaVA / ShareGPT sources mixed by ratio, each
conversation rendered in the model's template by the encoder the model gives (`conversation` of
`build_loader`: `MiniGPT4.conversation_encoder`), plain or packed.

The sources are read by the same streams as stage-1 annotation sources (`mgpt4.data.formats.stream`),
so mixing, shuffling, crops and the resumable position are theirs. A batch holds, per sample: `image`
uint8 [B, 3, S, S]; `text_ids` int64 [B, T] the conversation's text (T = data.conversation_tokens, pad
after it), `text_mask` 1 on its tokens, `text_labels` 1 where the loss reads (answers + end_sym), and
`image_at` int64 [B], the text position the image goes before. Packed batches add `pack_slot` /
`pack_pos` as stage 1's do, a sample being its text and image tokens. A conversation that cannot keep
the exchange with its image within T is skipped and counted (`too_long`).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import torch

from mgpt4.data.formats.records import parse_record
from mgpt4.data.packing import RowPacker
from mgpt4.data.payloads import PAYLOAD_ERRORS
from mgpt4.data.samples import SkipRun
from mgpt4.data.shard_stream import ShardBatches, ShardDataset, sample_id


class Conversation(NamedTuple):
    """One usable conversation: its encoding, stable id and its stream's position before it."""

    encoded: Any  # mgpt4.model.conversation_text.EncodedConversation
    sample_id: int
    before: dict[str, int]


class ConversationBatches(ShardBatches):
    """The conversation batches of one reader (rank, worker)."""

    def __init__(self, *args: Any, encoder: Any, **kwargs: Any):  # ShardBatches' arguments
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        # Packed: a conversation that did not fit the batch it was read for opens the next one of its
        # source (as stage 1's packed batches do).
        self.pending: list[tuple[Conversation, torch.Tensor] | None] = [None] * len(self.streams)

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["sources"] = [
            p[0].before if p is not None else s.state() for p, s in zip(self.pending, self.streams)
        ]
        return state

    def _read(self, source: int, out: torch.Tensor) -> Conversation:
        """The next usable conversation of `source`, its image written into `out`."""
        pending = self.pending[source]
        if pending is not None:
            self.pending[source] = None
            out.copy_(pending[1])
            return pending[0]
        stream = self.streams[source]
        run = SkipRun(stream.name)
        while True:
            before = stream.state()
            entry, u = stream.next()
            if entry[0] != "ok":
                self.skips.add(entry[0], entry[1], entry[2])
                run.add(*self.skips.last)
                continue
            _, path, key, files, where = entry
            record, _ = parse_record(json.loads(files["json"]), stream.entries.fmt)
            if record is None:  # the file changed since it was checked
                self.skips.add("bad_json", where, "the entry is no longer a well-formed conversation")
                run.add(*self.skips.last)
                continue
            encoded = self.encoder.encode(record.turns, record.system)
            if encoded is None:
                self.skips.add(
                    "too_long",
                    where,
                    f"the exchange with the image does not fit data.conversation_tokens={self.encoder.max_tokens}",
                )
                run.add(*self.skips.last)
                continue
            try:
                self.payload.fill(files["jpg"], u, out)
            except PAYLOAD_ERRORS as e:
                self.skips.add(e.reason, where, str(e))
                run.add(*self.skips.last)
                continue
            return Conversation(encoded, sample_id(path, key), before)

    def next_batch(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        sources = self._sources()
        images = self.payload.buffer(cfg.batch_size)
        taken: list[Conversation] = []
        packer = RowPacker(cfg.pack_rows, cfg.pack_length, cfg.batch_size) if cfg.packs() else None
        while len(taken) < cfg.batch_size:
            n = len(taken)
            source = int(sources[n])
            conv = self._read(source, images[n])
            if packer is not None and not packer.place(len(conv.encoded.ids) + self.encoder.image_tokens):
                self.pending[source] = (conv, images[n].clone())
                break
            taken.append(conv)
        self.batches += 1
        used = len(taken)
        images[used:].zero_()  # unused slots hold no sample; zeros keep the batch a function of the stream
        length = cfg.conversation_tokens
        pad = self.text.tokenizer.pad_token_id
        ids = torch.full((cfg.batch_size, length), pad, dtype=torch.int64)
        mask = torch.zeros((cfg.batch_size, length), dtype=torch.int64)
        labels = torch.zeros((cfg.batch_size, length), dtype=torch.int64)
        image_at = torch.zeros(cfg.batch_size, dtype=torch.int64)
        for n, conv in enumerate(taken):
            enc = conv.encoded
            ids[n, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.int64)
            mask[n, : len(enc.ids)] = 1
            labels[n, : len(enc.loss)] = torch.tensor(enc.loss, dtype=torch.int64)
            image_at[n] = enc.image_at
        unused = cfg.batch_size - used
        batch = {
            "image": images,
            "text_ids": ids,
            "text_mask": mask,
            "text_labels": labels,
            "image_at": image_at,
            "source": torch.cat([torch.from_numpy(sources[:used]), torch.full((unused,), -1)]),
            "sample_id": torch.tensor([c.sample_id for c in taken] + [-1] * unused, dtype=torch.int64),
        }
        if packer is not None:
            batch["pack_slot"], batch["pack_pos"] = packer.layout()
        return batch


class ConversationDataset(ShardDataset):
    """The IterableDataset a DataLoader runs for conversations (one rank)."""

    def __init__(self, *args: Any, encoder: Any, **kwargs: Any):  # ShardDataset's arguments
        super().__init__(*args, **kwargs)
        self.encoder = encoder

    def worker_batches(self, worker: int, state: dict[str, Any] | None):
        return iter(
            ConversationBatches(
                self.cfg,
                self.urls,
                self.text,
                self.rank,
                self.world_size,
                worker,
                self.cfg.num_workers,
                state,
                self.feature_shape,
                encoder=self.encoder,
            )
        )
