"""The worker side of a resumable loader: logical worker ids and per-worker start states.

A DataLoader hands batches out round-robin over its workers, worker 0 first. Each batch leaves the
worker tagged with its logical worker id and that worker's position *after* the batch, so the trainer
side can record exactly what it consumed, however far the workers have run ahead. On resume the
physical workers are rotated (physical p plays logical (p + offset) % W) so that the round robin
continues with the worker whose turn it was.
"""

from __future__ import annotations

import os
import select
import threading
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
        self.trainer_pid = os.getpid()  # the process that reads the batches (pickled into each worker)
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


def exit_with(pid: int) -> None:
    """End this process when process `pid` ends, however it ends (kill -9 included).

    A worker started from a fork server is the server's child, not the trainer's: DataLoader's own
    check (has my parent changed?) never fires when the trainer dies, and the worker, which also holds
    the server's liveness pipe, would keep itself and the server running forever. A daemon thread
    waits on the trainer's pidfd (Linux 5.3+; polls once a second elsewhere) and exits the worker.
    """

    def wait_and_exit() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd here: poll
            while _alive(pid):
                threading.Event().wait(1.0)
        else:
            select.select([fd], [], [])  # readable once the process has ended
        os._exit(0)

    if not _alive(pid):
        os._exit(0)
    threading.Thread(target=wait_and_exit, name="mgpt4-exit-with-trainer", daemon=True).start()


def watch_trainer(trainer_pid: int, worker_id: int) -> None:
    """DataLoader's `worker_init_fn` (with `functools.partial(watch_trainer, pid)`): each worker watches
    the trainer from the moment it starts. Watching from the dataset's first batch instead left a worker
    that had not yet been asked for one (an idle second worker, a slow start under load) running
    forever after a kill -9 of the trainer."""
    exit_with(trainer_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
