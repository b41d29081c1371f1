"""Resumable item stores: a folder of append-only JSONL parts, one per writer, keyed by item id.

    <store>/meta.json                    which step wrote it, from which input, with which settings
    <store>/part-r00000.jsonl            records written by rank 0 (any run, any world size)
    <store>/part-r00001.jsonl            ...

Every record is one line `{"id": ..., "status": "done"|"failed", ...}` written with flush + fsync,
so a run killed at any point keeps every record it finished. Readers read all parts: an item is
`done` if any part says so (a failure never replaces a success), otherwise its last record wins.
A torn line (a kill mid-write) is ignored, and the next writer starts on a fresh line.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

DONE = "done"
FAILED = "failed"
STATUSES = (DONE, FAILED)
META_FILE = "meta.json"
PART_GLOB = "part-r*.jsonl"


class StoreError(ValueError):
    """A store folder or one of its records is not what a step expects; the message names the file."""


def part_path(root: str, rank: int) -> str:
    return os.path.join(root, f"part-r{rank:05d}.jsonl")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class StoreState:
    """Everything the parts of a store say, merged: the final record of each item."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    torn_lines: int = 0

    def done(self) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.records.items() if r["status"] == DONE}

    def failed(self) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.records.items() if r["status"] == FAILED}


def _merge(state: StoreState, rec: dict[str, Any]) -> None:
    old = state.records.get(rec["id"])
    if old is not None and old["status"] == DONE and rec["status"] != DONE:
        return
    state.records[rec["id"]] = rec


def read_part(path: str, state: StoreState) -> None:
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            # A write cut by a kill; the next writer started a fresh line after it. The item was
            # not finished, so it is simply still to do.
            state.torn_lines += 1
            continue
        if (
            not isinstance(rec, dict)
            or not isinstance(rec.get("id"), str)
            or rec.get("status") not in STATUSES
        ):
            raise StoreError(
                f"{path}:{n}: expected an object with a string 'id' and a 'status' in {STATUSES}"
            )
        _merge(state, rec)


def read_store(root: str) -> StoreState:
    """Merge every part of the store at `root` (an empty state when the folder has none yet)."""
    state = StoreState()
    for path in sorted(glob.glob(os.path.join(root, PART_GLOB))):
        read_part(path, state)
    return state


def read_meta(root: str) -> dict[str, Any] | None:
    path = os.path.join(root, META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise StoreError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), str):
        raise StoreError(f"{path}: expected an object with a 'step' key")
    return meta


def write_json_atomic(path: str, data: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_store(root: str, step: str, settings: dict[str, Any], input_root: str | None, rank: int) -> None:
    """Create the store folder, or check that an existing one was written by the same step.

    Only rank 0 writes meta.json. Changed settings are reported, not refused: records made with the
    old settings stay done, and the user decides whether to start a fresh folder.
    """
    os.makedirs(root, exist_ok=True)
    meta = read_meta(root)
    if meta is not None and meta["step"] != step:
        raise StoreError(
            f"{os.path.join(root, META_FILE)}: this folder holds the output of '{meta['step']}', "
            f"not '{step}'; give '{step}' its own --out folder"
        )
    if meta is not None:
        changed = sorted(k for k in settings if meta.get("settings", {}).get(k) != settings[k])
        if changed and rank == 0:
            print(
                f"note: {root} was started with other settings for {changed}; items already done keep "
                "their records (use a new --out folder to redo them)",
                file=sys.stderr,
            )
    if rank == 0:
        write_json_atomic(
            os.path.join(root, META_FILE),
            {
                "step": step,
                "input": os.path.abspath(input_root) if input_root else None,
                "settings": settings,
                "created": meta.get("created") if meta else now(),
                "updated": now(),
            },
        )


class PartWriter:
    """Appends records to one part file; every write is flushed and fsync'd. Thread-safe."""

    def __init__(self, root: str, rank: int):
        self.path = part_path(root, rank)
        self._lock = threading.Lock()
        self._f = open(self.path, "ab")  # noqa: SIM115 - kept open for the whole run, closed in close()
        # A killed writer can leave a torn line without its newline; start ours on a fresh line.
        if self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self._f.write(b"\n")

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        data = b"".join(
            json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n" for r in records
        )
        if not data:
            return
        with self._lock:
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def record(item_id: str, status: str, **fields: Any) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return {"id": item_id, "status": status, **fields, "time": now()}


def pending_ids(
    ids: Iterable[str],
    state: StoreState,
    retry_failed: bool,
    failed_on_now: Callable[[str, dict[str, Any]], str | None] | None = None,
) -> list[str]:
    """Ids still to do: not done, and (unless `retry_failed`) not failed either.

    A failure that would repeat is not retried: a failed record may carry `failed_on`, a
    fingerprint of what it failed on (an image file's size and time, a prompt and settings), and
    when `failed_on_now(id, record)` gives the same fingerprint today, nothing has changed and the
    item stays failed. This is decided before any model is loaded, so a re-run with nothing that can
    succeed loads nothing.
    """
    out = []
    for i in ids:
        rec = state.records.get(i)
        retry = rec is not None and rec["status"] == FAILED and retry_failed
        if rec is None or (retry and not unchanged_failure(i, rec, failed_on_now)):
            out.append(i)
    return out


def unchanged_failure(
    item_id: str, rec: dict[str, Any], failed_on_now: Callable[[str, dict[str, Any]], str | None] | None
) -> bool:
    """True when `rec` failed on inputs that have not changed since (see `pending_ids`)."""
    if rec["status"] != FAILED or failed_on_now is None or rec.get("failed_on") is None:
        return False
    return rec["failed_on"] == failed_on_now(item_id, rec)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a step; every finished record is in the store and the message says what is left."""


def upstream_chain(root: str) -> list[tuple[str, str]]:
    """[(step, store folder), ...] from `root` back through each meta.json's input, nearest first."""
    chain: list[tuple[str, str]] = []
    seen: set[str] = set()
    cur: str | None = root
    while cur and os.path.abspath(cur) not in seen:
        seen.add(os.path.abspath(cur))
        meta = read_meta(cur)
        if meta is None:
            break
        chain.append((meta["step"], cur))
        cur = meta.get("input")
        if cur and not os.path.isdir(cur):
            break
    return chain
