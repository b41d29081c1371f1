"""One run per run folder: rank 0 holds an exclusive lock on `train.output_dir` from before its first
write until the run ends, so that two jobs never write, rotate or resume each other's checkpoints.

    lock = take(cfg.train.output_dir, rank)   # every rank calls it; a held folder raises RunFolderLocked
    ...                                       # the run
    release()                                 # at exit (the trainer's `finally`)

The lock is `fcntl.flock` on LOCK_FILE in the folder, which holds who took it (host, pid, start time).
The kernel drops a flock when its process dies, however it dies (kill -9, a node's job killed), so a
dead run never keeps the folder locked: the next run finds only its file, says so and takes over. A
clean exit removes the file. On a cluster file system flock must reach every node (NFSv4 does; Lustre
needs its `flock` mount option), the same as for the checkpoints themselves.

Chat, eval and export only read a run folder and take no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from dataclasses import dataclass

import torch.distributed as tdist

from mgpt4.logs import get_logger

log = get_logger(__name__)

LOCK_FILE = "run.lock"


class RunFolderLocked(ValueError):
    """Another live run holds the run folder; the message names it (host, pid, start time)."""


@dataclass
class RunLock:
    """The lock rank 0 holds (`fd` None on the other ranks: they only learn that rank 0 has it)."""

    path: str
    fd: int | None
    created_folder: bool  # the folder did not exist before: removed again if the run leaves it empty

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still held, so that no run
        locks the old file after the next one made a new one); idempotent."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)  # closing the only descriptor drops the flock
        if self.created_folder:
            with contextlib.suppress(OSError):  # only when empty: a run that wrote nothing
                os.rmdir(os.path.dirname(self.path))


_held: RunLock | None = None


def describe(holder: str) -> str:
    """The lock file's JSON as words: `host h, pid 12, started 2026-01-01T00:00:00Z`."""
    try:
        who = json.loads(holder)
        return f"host {who['host']}, pid {who['pid']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown (the lock file reads {holder[:80]!r})"


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def lock_folder(output_dir: str) -> RunLock:
    """Take the lock on `output_dir` in this process (created when missing); raises RunFolderLocked
    naming the holder when another process has it. Never waits."""
    path = os.path.join(output_dir, LOCK_FILE)
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderLocked(
                f"{output_dir} is in use by another run ({describe(_read(path))}): give this run its own "
                f"train.output_dir, or wait for that run to end (its lock is {path})"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as it ended: lock the new one
    stale = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
    if stale:
        log.warning(
            f"{path}: left by a run that ended without releasing it ({describe(stale)}); no process "
            f"holds it any more, so this run takes the folder over"
        )
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode("utf-8") + b"\n", 0)
    os.fsync(fd)
    return RunLock(path, fd, created)


def take(output_dir: str, rank: int) -> RunLock:
    """Rank 0 locks `output_dir`; every rank (a collective call) then raises the same RunFolderLocked
    when it could not, so a refused run stops at once on all of them. The lock is kept for `release`."""
    global _held
    refusal, lock = None, None
    if rank == 0:
        try:
            lock = lock_folder(output_dir)
        except RunFolderLocked as e:
            refusal = str(e)
    if tdist.is_initialized():  # rank 0's outcome, to every rank
        box = [refusal]
        tdist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunFolderLocked(refusal)
    _held = lock or RunLock(os.path.join(output_dir, LOCK_FILE), None, False)
    return _held


def release() -> None:
    """Drop the lock this process holds, if any (at the end of a run, however it ends)."""
    global _held
    if _held is not None:
        _held.release()
        _held = None
