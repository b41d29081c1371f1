"""Device feeder: pinned, non-blocking copies of the next batch while the current one computes.

On CUDA the copy of batch n+1 and its uint8 -> float normalisation are queued on a side stream before
batch n is handed to the trainer, so they overlap the step; the compute stream waits on the side
stream only when it takes the batch. On the CPU it normalises and passes batches through.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mgpt4.data.transforms import normalize_uint8


class DeviceFeeder:
    """Wraps a batch iterable (normally a `Loader`); yields the same dicts on `device` with
    `"image"` CLIP-normalised to `dtype` (feature batches have none).

    `last_wait_s` is how long the latest `next()` was blocked waiting for the loader (the data-wait
    metric); `total_wait_s` and `steps` accumulate it.
    """

    def __init__(
        self,
        batches: Iterable[dict[str, Any]],
        device: str | torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        self.source = batches
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0
        self.steps = 0
        self._ack = getattr(batches, "ack", None)
        hold = getattr(batches, "hold_until_ack", None)
        if hold is not None:
            hold()

    def _move(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                if self.cuda and not value.is_pinned():
                    value = value.pin_memory()
                value = value.to(self.device, non_blocking=True)
            out[key] = value
        if "image" in out:  # cached features come as they are used
            out["image"] = normalize_uint8(out["image"], self.dtype)
        return out

    def _next(self, it: Iterator[dict[str, Any]]) -> tuple[dict[str, Any] | None, float]:
        """(batch moved to the device or None at the end, seconds blocked waiting for the loader)."""
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return None, time.perf_counter() - start
        waited = time.perf_counter() - start
        if self.stream is None:
            return self._move(batch), waited
        with torch.cuda.stream(self.stream):
            return self._move(batch), waited

    def _hand_out(self, batch: dict[str, Any], waited: float) -> dict[str, Any]:
        self.last_wait_s = waited
        self.total_wait_s += waited
        self.steps += 1
        if self._ack is not None:
            self._ack()
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.source)
        if not self.cuda:
            while True:
                batch, waited = self._next(it)
                if batch is None:
                    return
                yield self._hand_out(batch, waited)
        ready, waited = self._next(it)
        while ready is not None:
            batch = ready
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)
            for value in batch.values():
                if isinstance(value, torch.Tensor):
                    # Made on the side stream, used on the compute stream: keep the allocator from
                    # reusing the memory before the compute stream is done with it.
                    value.record_stream(main)
            # Queue the next copy before the trainer computes on this batch.
            ready, waited_next = self._next(it)
            yield self._hand_out(batch, waited + waited_next)
            waited = 0.0

    # The position and counters live in the loader; the feeder only decides when a batch is consumed.
    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.source.load_state_dict(sd)  # type: ignore[attr-defined]

    def stats(self) -> dict[str, int]:
        return self.source.stats()  # type: ignore[attr-defined]
