"""The worker side of a resumable loader: logical worker ids and per-worker start states.

A DataLoader hands batches out round-robin over its workers, worker 0 first. Each batch leaves the
worker tagged with its logical worker id and that worker's position *after* the batch, so the trainer
side can record exactly what it consumed, however far the workers have run ahead. On resume the
physical workers are rotated (physical p plays logical (p + offset) % W) so that the round robin
continues with the worker whose turn it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

WORKER_KEY = "_worker"
STATE_KEY = "_state"
FATAL_KEY = "_fatal"


class DataSourceError(ValueError, RuntimeError):
    """A source that cannot give a single sample (every shard it reached missing or damaged): a setup to
    fix, not bad luck, so the run stops with this one line (the launchers print `mgpt4: error: ...`).
    A ValueError for the launchers' bad-input handling; a RuntimeError as it was before it had a name."""


class WorkerDataset(IterableDataset):
    """Base class: subclasses implement `worker_batches(worker, state)`, an endless batch stream that
    is a pure function of (config, rank, logical worker, start state)."""

    def __init__(self, num_workers: int):
        self.num_workers = max(1, num_workers)
        self.worker_offset = 0
        self.start_states: dict[int, dict[str, Any]] = {}

    def resume(self, worker_offset: int, states: dict[int, dict[str, Any]]) -> None:
        self.worker_offset = worker_offset % self.num_workers
        self.start_states = dict(states)

    def worker_batches(self, worker: int, state: dict[str, Any] | None) -> Iterator[tuple[dict, dict]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"dataset built for {self.num_workers} workers runs in {info.num_workers}")
        worker = (physical + self.worker_offset) % self.num_workers
        try:
            for batch, state in self.worker_batches(worker, self.start_states.get(worker)):
                batch[WORKER_KEY] = worker
                batch[STATE_KEY] = state
                yield batch
        except DataSourceError as e:
            # Raised here, a DataLoader would re-raise it in the trainer with the worker's traceback
            # folded into the message; handed over as a batch, the loader raises it as the line it is.
            yield {FATAL_KEY: str(e), WORKER_KEY: worker}
