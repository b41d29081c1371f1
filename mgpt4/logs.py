"""Console logging for every mgpt4 command: one line per event, through `logging`, with a rank filter.

Informational lines come from rank 0 only, so N ranks do not print N copies of every progress line;
warnings and errors come from every rank, tagged with it, because they are each rank's own news (a
damaged shard, a failed collective), and so do lines logged with `extra=ALL_RANKS` (each rank's
wiring at start-up). Each line is written with one call, so lines of ranks sharing a log do not
interleave. `MGPT4_LOG_RANKS=all` (or a list such as `0,3`) shows the
informational lines of other ranks too. The pattern follows torchtitan's `LOG_RANK`.

Lines go to standard error, looked up when each line is written, so a test or a wrapper that swaps
`sys.stderr` sees them. The handler sits on the `mgpt4` logger, installed on import of this module.
"""

from __future__ import annotations

import logging
import os
import sys

from mgpt4.dist import process_rank

ROOT = "mgpt4"
_FORMAT = "%(asctime)s %(levelname)s %(rank_tag)s%(name)s: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def _shown_ranks(spec: str | None) -> set[int] | None:
    """None means every rank; otherwise the set of ranks whose informational lines are shown."""
    if spec is None or not spec.strip():
        return {0}
    if spec.strip().lower() == "all":
        return None
    try:
        return {int(r) for r in spec.split(",") if r.strip()}
    except ValueError:
        raise ValueError(f"MGPT4_LOG_RANKS={spec!r}: expected 'all' or ranks such as '0,3'") from None


class RankFilter(logging.Filter):
    """Passes warnings from every rank and informational lines from the shown ranks; tags each line.

    The rank is `mgpt4.dist.process_rank()`'s when the line is written: the process group's once
    there is one, the launcher's variables before that."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = _shown_ranks(os.environ.get("MGPT4_LOG_RANKS"))

    def filter(self, record: logging.LogRecord) -> bool:
        rank, world_size = process_rank()
        record.rank_tag = f"[rank {rank}] " if world_size > 1 else ""
        if record.levelno >= logging.WARNING or getattr(record, "all_ranks", False):
            return True
        return self.shown is None or rank in self.shown


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a line is written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _install() -> logging.Handler:
    logger = logging.getLogger(ROOT)
    for h in logger.handlers:
        if isinstance(h, _StderrHandler):
            return h
    handler = _StderrHandler()
    rank_filter = RankFilter()
    handler.addFilter(rank_filter)
    handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return handler


_HANDLER = _install()

# `log.info(..., extra=ALL_RANKS)`: a line every rank must write (who it is, where it runs).
ALL_RANKS = {"all_ranks": True}


def get_logger(name: str) -> logging.Logger:
    """The logger of an mgpt4 module: `get_logger(__name__)`."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
