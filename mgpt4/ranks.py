"""Ranks of the offline jobs (curation's describe and fix, caption evaluation, feature extraction):
wired as training wires them, and the pending items shared out.

Items are independent, so ranks never talk during the work. They meet at the start (a barrier once
every rank has read what is already done, so that all split the same pending list) and at the end
(one gather of their reports, so rank 0 can speak for all). gloo serves both, with or without GPUs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mgpt4.train import launch_env
from mgpt4.train.launch_env import RankInfo

__all__ = ["RankInfo", "barrier", "close_group", "gather", "init_group", "rank_device", "rank_info", "share"]

T = TypeVar("T")

# Ranks meet twice: after reading the store (all start together), and when every share is done.
STARTUP_TIMEOUT_MIN = 60.0
FINISH_TIMEOUT_MIN = 24 * 60.0


def rank_info() -> RankInfo:
    """This process's ranks, wired exactly as training wires them (`mgpt4.train.launch_env.setup`):
    the deepspeed launcher or torchrun, srun (SLURM_*), mpirun (MPI), or a single process. The
    process's own environment is left unchanged: the rendezvous address travels in the RankInfo."""
    return launch_env.setup(dict(os.environ))[1]


def init_group(info: RankInfo) -> bool:
    """Join the gloo group when there are several ranks; True when this call created it."""
    if info.world_size == 1 or dist.is_initialized():
        return False
    # gloo: the barrier and the final gather are all the group does, with or without GPUs.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=STARTUP_TIMEOUT_MIN),
    )
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, on every rank (a list of one without a group). Called when the work is
    done: ranks finish their shares at different times, so it waits up to `FINISH_TIMEOUT_MIN`."""
    if not dist.is_initialized():
        return [value]
    dist.set_timeout(datetime.timedelta(minutes=FINISH_TIMEOUT_MIN))
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def close_group(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def share(items: Sequence[T], info: RankInfo) -> list[T]:
    """This rank's part of the pending items: every world_size-th one, so ranks get equal shares."""
    return list(items[info.rank :: info.world_size])


def rank_device(device: str, info: RankInfo) -> str:
    """A bare `cuda` means this rank's GPU (LOCAL_RANK) when several ranks run on a node; `auto` is
    that GPU when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return f"cuda:{info.local_rank}"
    return device
