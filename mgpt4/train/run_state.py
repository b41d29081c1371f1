"""The one checkpoint format: a run's state (`Run.state_dict()`) written to and read from a checkpoint
folder, whatever number of ranks wrote or reads it.

    save_checkpoint(cfg, run.state_dict())             # every rank, at a step boundary (collective)
    run.load_state_dict(read_checkpoint(folder, rank)) # rank=None: another number of ranks

The state is one dict, the same on every rank except its "rank" part (this rank's data position and
RNG). Rank 0 writes the shared part to RUN_STATE (with the format version and the world size), every
rank its "rank" part to RANK_STATE, then its marker; `latest` moves only when every rank's marker is
on disk. Every file loads with `torch.load(weights_only=True)`. Beside them: the projection in the
official format, with `model.lora` the adapters as a PEFT folder (`lora_adapter/`), and the resolved
config: what chat, curation and stage 2 read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from mgpt4.checkpoints import (
    CONFIG_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    PROJ_FILE,
    RANK_STATE,
    RUN_STATE,
    ResumeError,
    checkpoint_root,
    find_resume_point,
    format_refusal,
    rotate,
    step_dir_name,
    write_atomic,
    write_done,
)
from mgpt4.config import Config
from mgpt4.dist import barrier
from mgpt4.model.export import save_projection
from mgpt4.model.lora import LORA_DIR, save_peft_adapter
from mgpt4.strict_config import to_dict

PROJ_PREFIX = "llama_proj."


class SaveError(OSError):
    """A checkpoint could not be written (most often a full disk); the message names the folder, the
    free space and the checkpoint a rerun resumes from. `latest` still names that one."""


def save_checkpoint(cfg: Config, state: dict[str, Any]) -> str:
    """Write `state` as checkpoint `step_N` of `cfg.train.output_dir` (every rank calls it); returns the
    folder. `latest` moves to it, and older ones are rotated away, only once all of it is on disk."""
    root = checkpoint_root(cfg.train.output_dir)
    tag = step_dir_name(int(state["step"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = os.path.join(root, tag)
    if rank == 0:
        if os.path.isdir(folder):
            # Left by an attempt that crashed mid-save (or superseded by a rollback of `latest`): its
            # stale markers must not vouch for the files written now.
            shutil.rmtree(folder)
        os.makedirs(folder)
    barrier()
    shared = {k: v for k, v in state.items() if k != "rank"}
    try:
        _save(folder, RANK_STATE.format(rank=rank), {"format_version": FORMAT_VERSION, **state["rank"]})
        if rank == 0:
            params = shared["trainable"]["params"]
            save_projection(
                {k: v for k, v in params.items() if k.startswith(PROJ_PREFIX)},
                os.path.join(folder, PROJ_FILE),
            )
            if cfg.model.lora.enabled():  # the adapters as a PEFT folder, which peft loads on its own
                save_peft_adapter(params, cfg.model, os.path.join(folder, LORA_DIR))
            write_atomic(os.path.join(folder, CONFIG_FILE), json.dumps(to_dict(cfg), indent=2))
            _save(folder, RUN_STATE, {"format_version": FORMAT_VERSION, "world_size": world, **shared})
        write_done(folder, rank, world, int(state["step"]))  # last: this rank's part is complete
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer reports a full disk as `unexpected pos 832 vs 726`.
        raise _save_error(folder, e, _nbytes(state if rank == 0 else state["rank"])) from e
    barrier()
    if rank == 0:
        write_atomic(os.path.join(root, LATEST_FILE), tag)
        rotate(root, keep=cfg.train.keep_last, newest=tag)
    barrier()
    return folder


def _save(folder: str, name: str, obj: dict[str, Any]) -> None:
    tmp = os.path.join(folder, f"{name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, os.path.join(folder, name))


def _save_error(folder: str, error: Exception, needed: int) -> SaveError:
    """One line for a save that failed: the disk is full (an ENOSPC, or torch's zip writer failing
    where the free space is below what the state needs), or the error's own first line."""
    free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(folder)).free
    code = getattr(error, "errno", None)
    torch_write = isinstance(error, RuntimeError) and any(
        s in str(error) for s in ("unexpected pos", "failed writing", "file write failed")
    )
    full = code in (errno.ENOSPC, errno.EDQUOT) or (torch_write and free < needed)
    if full:
        reason = f"the disk is full ({_mb(free)} free there, this rank's part needs about {_mb(needed)})"
    else:
        reason = (str(error).strip().splitlines() or [repr(error)])[0]
    fix = "free some space, then rerun" if full else "rerun"
    output_dir = os.path.dirname(os.path.dirname(folder))
    return SaveError(f"cannot write checkpoint {folder}: {reason}; {fix} {resume_hint(output_dir)}")


def resume_hint(output_dir: str) -> str:
    """Where the same command continues a run from: 'the same command to resume from <the newest
    complete checkpoint>', or to start over where none is complete yet."""
    try:
        point = find_resume_point(output_dir)
    except ResumeError:
        point = None
    if point is None:
        return f"the same command to start over: {output_dir} holds no complete checkpoint yet"
    return f"the same command to resume from {point.folder}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _nbytes(obj: Any) -> int:
    """The bytes of every tensor in `obj` (nested dicts, lists, tuples): about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def read_checkpoint(folder: str, rank: int | None) -> dict[str, Any]:
    """The state saved in `folder`, with rank `rank`'s part under "rank" (no "rank" when `rank` is None:
    a run on another number of ranks, which starts a fresh data pass). Raises ResumeError for a file
    of another format version."""
    state = _load(folder, RUN_STATE)
    if rank is not None:
        state["rank"] = _load(folder, RANK_STATE.format(rank=rank))
    return state


def _load(folder: str, name: str) -> dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path) and name == RUN_STATE:
        raise ResumeError(f"{path} is missing: {format_refusal(folder, None)}")
    if not os.path.isfile(path):  # its markers vouch for it, so the folder was changed by hand
        raise ResumeError(
            f"{path} is missing: --set train.resume_data=fresh keeps all but this rank's data position "
            f"and RNG and starts a fresh data pass"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise ResumeError(f"{path}: {format_refusal(folder, version)}")
    del state["format_version"]
    return state
