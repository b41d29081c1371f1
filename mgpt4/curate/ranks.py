"""Ranks for the heavy steps: read from the launcher's environment, and share out the pending items.

Items are independent, so ranks never talk during the work. The one collective is a barrier after
every rank has read what is already done and before any rank writes, so that all ranks split the
same pending list; each rank then writes its own store part.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def rank_info() -> RankInfo:
    """From RANK / WORLD_SIZE / LOCAL_RANK (set by deepspeed, torchrun, or by hand under srun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise SystemExit(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise SystemExit(f"RANK={rank} is not within WORLD_SIZE={world}")
    return RankInfo(rank, world, local)


def init_group(info: RankInfo) -> bool:
    """Join the gloo group when there are several ranks; True when this call created it."""
    if info.world_size == 1 or dist.is_initialized():
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise SystemExit(f"{var} is not set: start several ranks with the deepspeed launcher or torchrun")
    minutes = float(os.environ.get("DEEPSPEED_TIMEOUT", "60"))
    # gloo: the barrier is all the group does, and it works whether or not there are GPUs.
    dist.init_process_group(
        "gloo",
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=minutes),
    )
    return True


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def close_group(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def share(ids: list[str], info: RankInfo) -> list[str]:
    """This rank's part of the pending ids: every world_size-th one, so ranks get equal shares."""
    return ids[info.rank :: info.world_size]


def rank_device(device: str, info: RankInfo) -> str:
    """A bare `cuda` means this rank's GPU (LOCAL_RANK) when several ranks run on a node."""
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return f"cuda:{info.local_rank}"
    return device
