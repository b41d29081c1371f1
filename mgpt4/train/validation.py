"""Validation during training: the mean answer-token loss over the held-out set (`data.val`), every
`train.eval_every` steps and at the last step.

Each rank runs the batches of its share (`mgpt4.data.heldout`: the same number on every rank, since
ZeRO-3 gathers parameters in every forward), then one all-reduce sums (loss x tokens, tokens) over
the ranks. The result is the token-weighted mean over the whole set, as if one forward had seen it
all: the same for any number of ranks, batch size or ZeRO stage, not a mean of per-rank means. It
reads nothing from the training stream and draws no random numbers, so a resumed run gets the same
values at the same steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mgpt4.config import DTYPES, Config
from mgpt4.data.batches import BatchText
from mgpt4.data.heldout import heldout_batches, read_heldout
from mgpt4.data.transforms import normalize_uint8
from mgpt4.logs import get_logger
from mgpt4.model import MiniGPT4

log = get_logger(__name__)


def loss_sums(
    forward: Callable[..., Any],
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """float64 [2] on `device`: (sum over batches of mean loss x answer tokens, answer tokens).

    `forward(image, text_ids, text_mask, instruction=...)` returns an output with `.loss`, the mean
    over the batch's answer tokens (`MiniGPT4.forward`, or the DeepSpeed engine around it). Every
    answer token with mask 1 is predicted from the position before it, so a batch's token count is
    its mask's sum; batches without tokens still run (ZeRO-3) and add nothing.
    """
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            tokens = int(batch["text_mask"].sum())
            instruction = batch.get("instruction")
            out = forward(
                normalize_uint8(batch["image"].to(device), dtype),
                batch["text_ids"].to(device),
                batch["text_mask"].to(device),
                instruction=None if instruction is None else instruction.to(device),
            )
            if tokens:
                sums[0] += out.loss.detach().double() * tokens
                sums[1] += tokens
    return sums


class Validation:
    """The held-out batches of this rank and when to evaluate them."""

    def __init__(
        self,
        batches: list[dict[str, torch.Tensor]],
        samples: int,
        every: int,
        steps: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.batches = batches
        self.samples = samples
        self.every = every
        self.steps = steps
        self.device = device
        self.dtype = dtype

    def due(self, step: int) -> bool:
        """Every `every` steps (0: never) and at the run's last step: a function of the step alone, so
        a resumed run keeps the schedule."""
        return bool(self.every and step % self.every == 0) or step == self.steps

    def evaluate(self, forward: Callable[..., Any], model: torch.nn.Module) -> tuple[dict[str, float], float]:
        """A collective call (every rank): (scalars `val/loss`, `val/tokens`, `perf/eval_s`; seconds)."""
        start = time.perf_counter()
        model.eval()
        try:
            sums = loss_sums(forward, self.batches, self.device, self.dtype)
        finally:
            model.train()
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss_sum, tokens = (float(x) for x in sums.tolist())
        seconds = time.perf_counter() - start
        loss = loss_sum / tokens if tokens else float("nan")
        log.info(
            f"validation: val/loss {loss:.4f} over {self.samples} held-out samples ({int(tokens)} answer tokens)"
            f" in {seconds:.2f} s, not counted in the throughput"
        )
        return {"val/loss": loss, "val/tokens": tokens, "perf/eval_s": seconds}, seconds


def build_validation(cfg: Config, model: MiniGPT4, rank: int, world_size: int, device: torch.device):
    """Read the held-out set once (`data.val`); None when validation is off (`data.val.samples` 0)."""
    val = cfg.data.val
    if not val.enabled():
        return None
    text = cfg.model.text
    held = read_heldout(cfg.data, len(text.instructions), rank, world_size)
    if held.skipped:
        log.warning(f"validation: unusable held-out samples skipped: {held.skipped}")
    batch_text = BatchText(model.tokenizer, text.max_txt_len, model.text_spec.end_sym, len(text.instructions))
    batches = heldout_batches(held, batch_text, val.batch_size or cfg.data.batch_size, rank, world_size)
    every = cfg.train.eval_every
    log.info(
        f"validation: {len(held)} held-out samples, {len(batches)} batches per rank, "
        + (f"every {every} steps and at the end" if every else "at the end")
    )
    return Validation(batches, len(held), every, cfg.train.steps, device, DTYPES[cfg.train.precision])
