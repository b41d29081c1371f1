"""Stage 2: the cc_sbu_align folder (`filter_cap.json` + `image/{image_id}.jpg`) as static-shape batches.

The order is a distributed sampler over an endless run of epochs: epoch e is a permutation drawn from
(seed, e); rank r takes every world_size-th pair of it, cut to the same length on every rank, and
cuts that into full batches (the partial one is dropped, as the official drop_last does). Global
batch g of a rank is batch g % per_epoch of epoch g // per_epoch, and worker w makes the batches
with g % W == w, so the sequence the trainer sees does not depend on the number of workers and the
position is just the next g of each worker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mgpt4.data.batches import BatchText, image_buffer, make_batch
from mgpt4.data.config import DataConfig
from mgpt4.data.samples import SkipCounter, SkipRun, not_text
from mgpt4.data.streams import Stream, stream_rng
from mgpt4.data.transforms import CROP_UNIFORMS, ImageError, clean_caption, image_transform
from mgpt4.data.workers import WorkerDataset

# How many entries of one kind of problem the error names before it just gives the count.
_LIST_MISSING = 20


@dataclass
class AlignPair:
    image_id: str
    caption: str
    path: str


def _listed(items: list[str], limit: int = _LIST_MISSING) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_align(root: str) -> list[AlignPair]:
    """Read and check `root/filter_cap.json`; every referenced image must exist under `root/image/`.

    Every problem of the file is reported in one error (entries that are not objects, ids that are not
    strings, duplicate ids, empty or non-string captions, missing image files), so one pass over a
    broken copy of the data fixes it before the first step. Raises FileNotFoundError when images are
    all that is wrong (a copy still in progress, or data this machine cannot see), ValueError otherwise.
    """
    ann_path = os.path.join(root, "filter_cap.json")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"cc_sbu_align folder {root!r} does not exist")
    try:
        with open(ann_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{ann_path}: missing; expected the cc_sbu_align annotation file") from e
    except ValueError as e:
        raise ValueError(f"{ann_path}: not valid JSON: {e}") from e
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(
            f'{ann_path}: expected {{"annotations": [{{"image_id": ..., "caption": ...}}, ...]}}'
        )
    if not anns:
        raise ValueError(
            f"{ann_path}: 0 pairs (an empty annotations list), nothing to train on; if "
            "`python -m mgpt4.curate filter` wrote it, its rules kept no caption (see rejects.jsonl)"
        )
    found: list[str] = []  # in file order; duplicate ids and missing images follow
    pairs, missing = [], []
    where: dict[str, list[int]] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            found.append(f"annotations[{i}] is {ann!r:.60}, expected an object")
            continue
        image_id, caption = ann.get("image_id"), ann.get("caption")
        good_id = isinstance(image_id, (str, int)) and not isinstance(image_id, bool) and str(image_id) != ""
        if not good_id:
            found.append(f"annotations[{i}].image_id: expected a string, got {image_id!r:.60}")
        if not isinstance(caption, str) or not caption.strip():
            found.append(f"annotations[{i}].caption: expected a non-empty string, got {caption!r:.60}")
        elif bad := not_text(caption):
            found.append(f"annotations[{i}].caption: has {bad}, got {caption!r:.60}")
        if not good_id:
            continue
        where.setdefault(str(image_id), []).append(i)
        path = os.path.join(root, "image", f"{image_id}.jpg")
        if not os.path.isfile(path):
            missing.append(f"{image_id}.jpg")
        pairs.append(AlignPair(str(image_id), caption, path))
    found += [
        f"image_id {k!r} appears {len(v)} times ({', '.join(f'annotations[{i}]' for i in v)})"
        for k, v in where.items()
        if len(v) > 1
    ]
    missing_line = (
        f"{len(missing)} of {len(pairs)} images listed in filter_cap.json are missing from "
        f"{os.path.join(root, 'image')}: {_listed(missing)}"
    )
    if found:
        shown = found[:_LIST_MISSING]
        if len(found) > _LIST_MISSING:
            shown.append(f"... and {len(found) - _LIST_MISSING} more")
        count = len(found) + bool(missing)
        raise ValueError(
            "\n  ".join(
                [f"{ann_path}: {count} problem(s) among {len(anns)} annotations:", *shown]
                + ([missing_line] if missing else [])
            )
        )
    if missing:
        raise FileNotFoundError(f"cc_sbu_align at {root!r}: {missing_line}")
    return pairs


def split_holdout(pairs: list[AlignPair], holdout: int, where: str = "data.val.holdout") -> tuple[list, list]:
    """(training pairs, held-out pairs): `holdout` pairs picked by a fixed generator, so every run on
    the same filter_cap.json holds out the same ones, whatever its seed; both lists keep the file's order."""
    if holdout <= 0:
        return pairs, []
    if holdout >= len(pairs):
        raise ValueError(f"{where}: {holdout} held-out pairs leave none of the {len(pairs)} to train on")
    held = set(stream_rng(Stream.ALIGN_HOLDOUT).permutation(len(pairs))[:holdout].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


class AlignOrder:
    """Which pairs global batch g of a rank holds."""

    def __init__(self, count: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.count = count
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.per_rank = count // world_size
        self.per_epoch = self.per_rank // batch_size
        if self.per_epoch == 0:
            raise ValueError(
                f"cc_sbu_align has {count} pairs: {world_size} rank(s) x batch {batch_size} leaves no full "
                f"batch per epoch; lower data.batch_size"
            )
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_of(self, g: int) -> int:
        return g // self.per_epoch

    def indices(self, g: int) -> np.ndarray:
        epoch, b = divmod(g, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            perm = stream_rng(Stream.ALIGN_EPOCH, seed=self.seed, epoch=epoch).permutation(self.count)
            self._cache = (epoch, perm[self.rank :: self.world_size][: self.per_rank])
        return self._cache[1][b * self.batch_size : (b + 1) * self.batch_size]


class AlignDataset(WorkerDataset):
    """The IterableDataset a DataLoader runs for stage 2 (one rank)."""

    def __init__(
        self,
        cfg: DataConfig,
        text: BatchText,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(cfg.num_workers)
        self.cfg = cfg
        # Pairs held out for validation (data.val.holdout) are never trained on.
        self.pairs = split_holdout(load_align(cfg.align_root or ""), cfg.val.holdout)[0]
        self.order = AlignOrder(len(self.pairs), cfg.batch_size, rank, world_size, cfg.seed)
        self.text = text
        self.rank = rank

    def worker_batches(self, worker: int, state: dict[str, Any] | None) -> Iterator[tuple[dict, dict]]:
        cfg = self.cfg
        state = state or {}
        g = int(state.get("next", worker))
        if g % self.num_workers != worker:
            raise ValueError(f"align position {g} does not belong to worker {worker} of {self.num_workers}")
        skips = SkipCounter(state.get("counts"))
        # A folder whose images are all unreadable (HTML pages saved as .jpg) stops after MAX_SKIP_RUN pairs.
        run = SkipRun(cfg.align_root or "")
        transform = image_transform(cfg)
        clean = cfg.cleans_captions()
        while True:
            idx = self.order.indices(g)
            u = stream_rng(Stream.ALIGN_CROP, seed=cfg.seed, rank=self.rank, batch=g).random(
                (len(idx), CROP_UNIFORMS)
            )
            images = image_buffer(cfg.batch_size, cfg.image_size)
            good: list[int] = []
            bad: list[int] = []
            for slot, i in enumerate(idx):
                pair = self.pairs[int(i)]
                try:
                    with open(pair.path, "rb") as f:
                        data = f.read()
                    transform(data, u[slot], images[slot])
                    good.append(slot)
                    run.clear()
                except (OSError, ImageError) as e:
                    # OSError: the file went away after the check at start-up.
                    skips.add(e.reason if isinstance(e, ImageError) else "no_image", pair.path, str(e))
                    bad.append(slot)
                    run.add(*skips.last)
            g_done, g = g, g + self.num_workers
            if not good:
                skips.add("empty_batch", f"batch {g_done}", "no image of the batch could be read")
                continue
            # A static shape needs B samples: a damaged pair is replaced by a good one of the same batch.
            slots = list(range(len(idx)))
            for n, slot in enumerate(bad):
                src = good[n % len(good)]
                images[slot].copy_(images[src])
                slots[slot] = src
            captions = [self.pairs[int(idx[s])].caption for s in slots]
            if clean:
                captions = [clean_caption(c, cfg.caption_max_words) for c in captions]
            batch = make_batch(
                images,
                captions,
                self.text,
                (cfg.seed, self.rank, g_done),
                {
                    "epoch": torch.full((cfg.batch_size,), self.order.epoch_of(g_done), dtype=torch.int64),
                    "sample_id": torch.tensor([int(idx[s]) for s in slots], dtype=torch.int64),
                },
            )
            yield batch, {"next": g, "counts": dict(skips.counts)}
