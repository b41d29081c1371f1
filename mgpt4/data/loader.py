"""The trainer-facing loader: a DataLoader over a resumable dataset, with the consumed position.

    loader = build_loader(cfg.data, tokenizer, max_txt_len, end_sym, rank, world_size)
    loader.load_state_dict(saved)        # optional, before iterating: continue exactly
    loader.start_pass(n)                 # or instead: data pass n, a fresh seeded order from its start
    for batch in loader: ...             # or through DeviceFeeder(loader, device)
    ckpt["data"] = loader.state_dict()   # the position after the last batch the trainer took

Workers run ahead of the trainer (prefetch, pinning, the feeder's next batch), so the position is not
what the workers have made but what the trainer has taken: every batch carries its worker's state
after it, and the loader keeps the snapshot that belongs to each batch until that batch is consumed.

A position is only meaningful for the settings and the inputs it was taken with: the state holds both
(the shard list of every source, or the pairs of filter_cap.json), and loading it under others stops
with what changed instead of applying a byte offset to another shard.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from mgpt4.data.align import AlignDataset
from mgpt4.data.batches import BatchText
from mgpt4.data.config import DataConfig
from mgpt4.data.conversations import ConversationDataset
from mgpt4.data.formats.annotations import AnnotationIndex
from mgpt4.data.formats.hf import HFIndex
from mgpt4.data.packed_stream import PackedShardDataset
from mgpt4.data.samples import SKIP_REASONS
from mgpt4.data.shard_stream import ShardDataset
from mgpt4.data.streams import Stream, stream_seed
from mgpt4.data.workers import FATAL_KEY, STATE_KEY, WORKER_KEY, DataSourceError, WorkerDataset, watch_trainer

STATE_VERSION = 2  # 2: the state also holds the inputs (shard lists, align pairs) and the data pass
# How many names of added or removed shards a message shows.
_SHOW_NAMES = 3


_UNSET = object()  # a setting one side of a comparison does not hold


def _setting(setup: dict[str, Any], key: str) -> str:
    return repr(setup[key]) if key in setup else "unset"


class DataStateMismatch(ValueError):
    """A saved data position does not belong to these data settings or inputs; the message says what changed."""


def pass_seed(seed: int, data_pass: int) -> int:
    """The seed of data pass `data_pass`: pass 0 is `seed` itself, later passes draw fresh orders."""
    if data_pass == 0:
        return seed
    return int(stream_seed(Stream.DATA_PASS, seed=seed, data_pass=data_pass).generate_state(1)[0])


def describe_list_change(what: str, saved: Sequence[str], now: Sequence[str]) -> str:
    """One phrase for how a list of inputs (shards, image ids) changed, e.g. `2 shard(s) appended (a, b)`."""
    saved, now = list(saved), list(now)

    def names(items: list[str]) -> str:
        more = f", ... {len(items) - _SHOW_NAMES} more" if len(items) > _SHOW_NAMES else ""
        return ", ".join(items[:_SHOW_NAMES]) + more

    if sorted(saved) == sorted(now):
        return f"the same {len(now)} {what}(s) in another order"
    if now[: len(saved)] == saved:
        return f"{len(now) - len(saved)} {what}(s) appended ({names(now[len(saved) :])})"
    old, new = set(saved), set(now)
    added, removed = [u for u in now if u not in old], [u for u in saved if u not in new]
    parts = [f"{len(saved)} {what}(s) at the checkpoint, {len(now)} now"]
    if removed:
        parts.append(f"{len(removed)} removed ({names(removed)})")
    if added:
        parts.append(f"{len(added)} added ({names(added)})")
    if not removed and not added:
        parts.append("the same names in another order or repeated")
    return ": ".join(parts[:1]) + ("; " + "; ".join(parts[1:]) if parts[1:] else "")


def worker_context() -> multiprocessing.context.BaseContext:
    """How the loader starts its workers: forked from a fork server, not from the trainer.

    A worker forked from the trainer shares every page of it, a loaded model included: each showed
    the whole process as resident (8.8 GB at 7B, copy-on-write), and the kernel's OOM killer counts it
    per process. The fork server is a fresh interpreter started at the first worker; it imports
    the mgpt4 modules this process has imported (so each worker starts warm) and never holds a model.
    The dataset travels to each worker pickled, and each worker runs the script
    that started this process again as `__mp_main__` (Python's rule for these start methods): a
    script that trains must do so under `if __name__ == "__main__":`, as the launchers do. Where
    there is no fork server (Windows), workers are spawned.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Read when the server starts (once per process); later calls change nothing.
    mgpt4 = [m for m in sys.modules if m.split(".")[0] == "mgpt4" and not m.endswith("__main__")]
    ctx.set_forkserver_preload(sorted(mgpt4))
    return ctx


@dataclass
class _Position:
    batches: int = 0
    next_worker: int = 0
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)


class Loader:
    """Static-shape batches for one rank, with `state_dict` / `load_state_dict` and skip `stats`."""

    def __init__(
        self,
        dataset: WorkerDataset,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        dataset_for_pass: Callable[[int], WorkerDataset] | None = None,
    ):
        self.dataset = dataset
        self.data_pass = 0
        self._dataset_for_pass = dataset_for_pass
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, cfg.num_workers)
        self._consumed = _Position()
        self._produced = _Position()
        self._pending: collections.deque[_Position] = collections.deque()
        self._external_ack = False
        self._generation = 0
        self._dl_iter = None

    # -- iteration -----------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def _start(self):
        self.close()
        start = self._consumed
        self.dataset.resume(start.next_worker, start.workers)
        self._produced = _Position(start.batches, start.next_worker, dict(start.workers))
        self._pending.clear()
        workers = self.cfg.num_workers
        dl = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.cfg.prefetch if workers > 0 else None,
            persistent_workers=False,
            multiprocessing_context=worker_context() if workers > 0 else None,
            # Its own generator for the workers' base seed: starting an iteration (after a resume too)
            # leaves the global RNG, which the model's dropout draws from, as it was.
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=functools.partial(watch_trainer, self.dataset.trainer_pid)
            if workers > 0
            else None,
        )
        self._dl_iter = iter(dl)
        return self._dl_iter

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dl_iter = self._start()  # ends any earlier iteration of this loader
        generation = self._generation
        while generation == self._generation:
            try:
                batch = next(dl_iter)
            except StopIteration:
                return
            if FATAL_KEY in batch:
                raise DataSourceError(batch[FATAL_KEY])
            worker = batch.pop(WORKER_KEY)
            state = batch.pop(STATE_KEY)
            prev = self._produced
            workers = dict(prev.workers)
            workers[int(worker)] = state
            self._produced = _Position(prev.batches + 1, (int(worker) + 1) % self.num_workers, workers)
            if self._external_ack:
                self._pending.append(self._produced)
            else:
                self._consumed = self._produced
            yield batch

    def hold_until_ack(self) -> None:
        """Called by a consumer that prefetches (DeviceFeeder): a batch counts as consumed only when it
        calls `ack()` for it, not when it is taken from the loader."""
        self._external_ack = True

    def ack(self) -> None:
        """The oldest batch taken from the loader and not yet acknowledged is now consumed."""
        if self._pending:
            self._consumed = self._pending.popleft()

    def close(self) -> None:
        """Stop the worker processes; a running iteration ends, a new one starts again from the consumed
        position."""
        self._generation += 1
        it, self._dl_iter = self._dl_iter, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    # -- position and statistics ---------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        """The settings that define the sample stream; a position only means something under them."""
        cfg = self.cfg
        setup: dict[str, Any] = {
            "kind": cfg.kind,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": cfg.num_workers,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "num_instructions": self.dataset.text.num_instructions,
        }
        if cfg.kind == "align" and cfg.val.holdout:  # the held-out pairs are not in the stream
            setup["val_holdout"] = cfg.val.holdout
        if cfg.kind != "align":
            setup.update(
                resampled=cfg.resampled,
                shuffle_buffer=cfg.shuffle_buffer,
                mix=cfg.mix,
                sources=cfg.source_names(),
            )
        if cfg.kind == "conversations":
            setup["conversation_tokens"] = cfg.conversation_tokens
        if cfg.packs():  # only when set, so positions saved before packing existed still load
            setup.update(pack_length=cfg.pack_length, pack_rows=cfg.pack_rows)
        if cfg.crops != "stream":
            setup["crops"] = cfg.crops
        return setup

    def _inputs(self) -> dict[str, list[str]]:
        """What the stream reads, by name: each source's shard list (image or feature shards), or the image
        ids of the align set."""
        if self.cfg.kind != "align":
            return {
                f"source {n!r}": u.identity() if isinstance(u, (AnnotationIndex, HFIndex)) else list(u)
                for n, u in zip(self.cfg.source_names(), self.dataset.urls)
            }
        return {"filter_cap.json": [p.image_id for p in self.dataset.pairs]}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last consumed batch (plain ints, strings, lists and dicts)."""
        pos = self._consumed
        return {
            "version": STATE_VERSION,
            "setup": self._fingerprint(),
            "inputs": self._inputs(),
            "data_pass": self.data_pass,
            "batches": pos.batches,
            "next_worker": pos.next_worker,
            "workers": {str(w): s for w, s in sorted(pos.workers.items())},
        }

    def changes_since(self, sd: dict[str, Any]) -> list[str]:
        """What differs between a saved state's settings and inputs and this loader's; [] when the saved
        position can be continued exactly."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            version = sd.get("version") if isinstance(sd, dict) else type(sd).__name__
            return [f"the data state has version {version!r}, this mgpt4 reads version {STATE_VERSION}"]
        saved, now = sd.get("setup", {}), self._fingerprint()
        # Both ways: a setting the checkpoint had and this run lacks (packing dropped) is a change too.
        changed = [
            f"{k}: saved {_setting(saved, k)}, now {_setting(now, k)}"
            for k in [*now, *(k for k in saved if k not in now)]
            if saved.get(k, _UNSET) != now.get(k, _UNSET)
        ]
        saved_inputs, inputs = sd.get("inputs", {}), self._inputs()
        for name, items in inputs.items():
            what = "shard" if name.startswith("source") else "pair"
            before = saved_inputs.get(name)
            if before is None:
                changed.append(f"{name}: not in the saved state")
            elif list(before) != items:
                changed.append(f"{name}: {describe_list_change(what, before, items)}")
        changed += [
            f"{name}: in the saved state, not read now" for name in saved_inputs if name not in inputs
        ]
        return changed

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from a saved position. The data settings and inputs that define the stream must be
        unchanged: otherwise DataStateMismatch lists every change (a byte offset of one shard list
        means nothing in another)."""
        changed = self.changes_since(sd)
        if changed:
            raise DataStateMismatch(
                "the data changed since the checkpoint, so its position cannot be continued: "
                + "; ".join(changed)
            )
        self.start_pass(int(sd.get("data_pass", 0)))
        self._consumed = _Position(
            int(sd["batches"]), int(sd["next_worker"]), {int(w): s for w, s in sd["workers"].items()}
        )

    def start_pass(self, data_pass: int) -> None:
        """Start data pass `data_pass` from its beginning: the stream of pass 0 with a fresh seed (shard
        draws, shard and epoch orders, shuffles, crops and instructions all change), for this loader's
        ranks, workers and inputs. Skip counts start again at zero."""
        if data_pass != self.data_pass:
            if self._dataset_for_pass is None:
                raise ValueError("this loader was built without a dataset factory: it has only data pass 0")
            self.dataset = self._dataset_for_pass(data_pass)
            self.data_pass = data_pass
        self._consumed = _Position()
        self._pending.clear()
        self.close()  # a running iteration stops; the next one starts at the new position

    @property
    def batches_consumed(self) -> int:
        return self._consumed.batches

    def stats(self) -> dict[str, int]:
        """Skipped samples and shards by reason, summed over workers, up to the consumed position."""
        total = dict.fromkeys(SKIP_REASONS, 0)
        for state in self._consumed.workers.values():
            for reason, n in state.get("counts", {}).items():
                total[reason] = total.get(reason, 0) + int(n)
        return total

    def failed_shards(self) -> list[str]:
        """Names of shards that could not be opened or were cut short (most recent last)."""
        names: list[str] = []
        for state in self._consumed.workers.values():
            names.extend(n for n in state.get("failed_shards", []) if n not in names)
        return names


def build_loader(
    cfg: DataConfig,
    tokenizer,
    max_txt_len: int,
    end_sym: str,
    rank: int = 0,
    world_size: int = 1,
    num_instructions: int = 0,
    context_lengths: Sequence[int] = (),
    feature_shape: Sequence[int] | None = None,
    conversation: Any = None,
) -> Loader:
    """The loader of one rank. `max_txt_len`, `end_sym` and the number of instructions to draw from
    (`len(instructions)`, 0 for stage 1) come from the model's TextConfig.

    Packing (`cfg.pack_length`) also needs `context_lengths`, the LLM positions before the answer under
    each instruction (one value without instructions): `Layout.context_length` of each of
    `MiniGPT4.sample_layouts()` (`mgpt4.model.layout`), in the same order; kind 'features' needs
    `feature_shape`, (num_query_tokens, qformer width); kind 'conversations' needs `conversation`, the
    model's `MiniGPT4.conversation_encoder(cfg.conversation_tokens)`. ValueError names what is missing or
    too long.
    """
    cfg.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if max_txt_len < 1:
        raise ValueError(f"max_txt_len must be positive, got {max_txt_len}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; load it with mgpt4.tokenizer.load_tokenizer")
    if cfg.num_workers > 0:
        # The tokenizer's thread pool must not be used in the parent before workers fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if num_instructions < 0:
        raise ValueError(f"num_instructions must be 0 or more, got {num_instructions}")
    if cfg.kind == "conversations":
        check_conversations(cfg, conversation)
        num_instructions, context_lengths = 0, ()  # the conversation is the whole text
    text = BatchText(tokenizer, max_txt_len, end_sym, num_instructions, tuple(context_lengths))
    if cfg.packs() and cfg.kind != "conversations":
        check_packing(cfg, text)

    def dataset_for_pass(data_pass: int) -> WorkerDataset:
        # A fresh data pass (train.resume_data: fresh) is the same stream under a seed of its own.
        pass_cfg = dataclasses.replace(cfg, seed=pass_seed(cfg.seed, data_pass))
        if cfg.kind == "align":
            return AlignDataset(pass_cfg, text, rank, world_size)
        if cfg.kind == "conversations":
            return ConversationDataset(pass_cfg, text, rank, world_size, encoder=conversation)
        dataset_cls = PackedShardDataset if cfg.packs() else ShardDataset
        return dataset_cls(pass_cfg, text, rank, world_size, feature_shape)

    return Loader(dataset_for_pass(0), cfg, rank, world_size, dataset_for_pass)


def check_conversations(cfg: DataConfig, encoder: Any) -> None:
    """Kind 'conversations' needs the model's encoder, made for data.conversation_tokens; a packed row
    must hold the longest conversation and its image."""
    if encoder is None:
        raise ValueError(
            "data.kind 'conversations' needs the model's conversation encoder "
            "(build_loader(..., conversation=model.conversation_encoder(cfg.data.conversation_tokens)))"
        )
    if encoder.max_tokens != cfg.conversation_tokens:
        raise ValueError(
            f"data.conversation_tokens is {cfg.conversation_tokens}, the encoder was made for {encoder.max_tokens}"
        )
    longest = cfg.conversation_tokens + encoder.image_tokens
    if cfg.packs() and cfg.pack_length < longest:
        raise ValueError(
            f"data.pack_length: {cfg.pack_length} tokens cannot hold the longest conversation, "
            f"{cfg.conversation_tokens} text (data.conversation_tokens) + {encoder.image_tokens} image tokens = {longest}"
        )


def check_packing(cfg: DataConfig, text: BatchText) -> None:
    """Every sample must fit a row: a sample is its context (from its layout) and then its answer,
    so the longest is the longest context and max_txt_len answer tokens."""
    expected = max(1, text.num_instructions)
    if len(text.context_lengths) != expected:
        raise ValueError(
            f"data.pack_length: packing needs the context length of each of the {expected} instruction(s), "
            f"got {len(text.context_lengths)}"
        )
    longest = max(text.context_lengths) + text.max_txt_len
    if cfg.pack_length < longest:
        raise ValueError(
            f"data.pack_length: {cfg.pack_length} tokens cannot hold the longest sample, "
            f"{max(text.context_lengths)} context + {text.max_txt_len} answer tokens = {longest}"
        )
