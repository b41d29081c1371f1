"""Where a run starts: at step 0, exactly where a checkpoint stopped, or from a checkpoint's trainable
state with a fresh data pass (`train.resume_data=fresh`: after the inputs changed, or on another
number of ranks).

    start = plan_start(cfg, world_size, resume)        # reads files only: before anything is built
    ... build the model, engine and loader ...
    run = Run(...)                                     # the model, engine and data it holds
    restore(start, run, rank, world_size)              # run.load_state_dict(checkpoint)
    prepare_output(cfg, start, ds_config, rank)        # the first write into the run folder

Every refusal (no complete checkpoint, another recipe's checkpoints, another format version, another
number of ranks, changed inputs) is raised before `prepare_output`, so a refused run leaves the folder
as it found it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from mgpt4.checkpoints import (
    CONFIG_FILE,
    ResumeError,
    ResumePoint,
    archive_run,
    check_resume_point,
    find_resume_point,
)
from mgpt4.config import Config, LoraConfig
from mgpt4.data.loader import DataStateMismatch
from mgpt4.logs import get_logger
from mgpt4.strict_config import to_dict
from mgpt4.train.run_state import read_checkpoint

log = get_logger(__name__)

FRESH_HINT = (
    "--set train.resume_data=fresh to keep the projection, its optimizer moments, the schedule, step and "
    "samples seen, and start a fresh data pass"
)


def rng_state() -> dict[str, Any]:
    """Every RNG of this process as tensors and plain values, so the file loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Start:
    point: ResumePoint | None  # None: the run starts at step 0
    fresh_data: bool = False  # keep the trainable state, start a fresh data pass
    archive: bool = False  # --no-resume: move an earlier run's files aside first
    schedule_changes: tuple[str, ...] = ()  # optimizer settings that differ from the checkpoint's


# What the optimizer and its schedule follow: a resume applies this run's values from the resumed step.
SCHEDULE_KEYS = ("optim", "train.steps")


def schedule_changes(folder: str, cfg: Config) -> list[str]:
    """`optim.lr: 0.001 at the checkpoint, now 0.0005` for each setting of SCHEDULE_KEYS that differs
    between the checkpoint's config (its CONFIG_FILE; none when it is unreadable) and `cfg`."""
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return []
    now, changes = to_dict(cfg), []
    for key in SCHEDULE_KEYS:
        before, after = _dotted(saved, key), _dotted(now, key)
        pairs = [(key, before, after)]
        if isinstance(before, dict) and isinstance(after, dict):
            pairs = [(f"{key}.{k}", before.get(k), after.get(k)) for k in {**before, **after}]
        changes += [f"{k}: {b!r} at the checkpoint, now {a!r}" for k, b, a in pairs if b != a]
    return changes


def check_lora(folder: str, cfg: Config) -> None:
    """Refuse (ResumeError naming the field) to continue a checkpoint whose `model.lora` differs from this
    run's: its trainable set (the adapters, or none) is another model's. A config from before model.lora
    existed had LoRA off."""
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            saved = _dotted(json.load(f), "model.lora") or {}
    except (OSError, ValueError):
        return  # an unreadable config: the trainable set is checked against the state itself on load
    now = to_dict(cfg)["model"]["lora"]
    saved = {**to_dict(LoraConfig()), **saved}
    for key in now:
        if saved.get(key) != now[key]:
            off = " (LoRA off)" if key == "rank" and 0 in (saved[key], now[key]) else ""
            raise ResumeError(
                f"{folder}: model.lora.{key} is {saved.get(key)!r} at the checkpoint and {now[key]!r} in this "
                f"run{off}: its trainable set is another. Resume with the checkpoint's model.lora, or start "
                f"over with --no-resume (or another train.output_dir)"
            )


def _dotted(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def plan_start(cfg: Config, world_size: int, resume: bool) -> Start:
    """Decide from the files in `train.output_dir` alone; raises ResumeError with what to do when the
    folder holds checkpoints this run must not continue or overwrite."""
    if not resume:
        return Start(None, archive=True)
    point = find_resume_point(cfg.train.output_dir)
    if point is None:
        return Start(None)
    fresh = cfg.train.resume_data == "fresh"
    check_resume_point(point, cfg.train.output_dir, cfg.recipe, world_size, fresh)
    check_lora(point.folder, cfg)
    return Start(point, fresh_data=fresh, schedule_changes=tuple(schedule_changes(point.folder, cfg)))


class Restorable(Protocol):
    """What `restore` loads a checkpoint into: the trainer's `Run`."""

    def load_state_dict(self, state: dict[str, Any], fresh_data: bool = False) -> None: ...


def restore(start: Start, run: Restorable, rank: int, world_size: int) -> None:
    """Load the checkpoint `start` names into `run`, through the one restore path: exactly (the data
    position and RNG of this rank too) on the number of ranks that wrote it, else with a fresh data
    pass. Raises ResumeError with what to do."""
    point = start.point
    if point is None:
        return
    if point.note:
        log.warning(point.note)
    same_ranks = point.world_size == world_size
    state = read_checkpoint(point.folder, rank if same_ranks else None)
    try:
        run.load_state_dict(state, fresh_data=start.fresh_data)
    except DataStateMismatch as e:
        raise ResumeError(
            f"{point.folder}: {e}. Give the data of the checkpoint to continue exactly, or {FRESH_HINT}, "
            f"or start a new run in a folder of its own: --set train.output_dir=<new folder>"
        ) from None
    except ResumeError as e:
        raise ResumeError(f"{point.folder}: {e}") from None
    step, seen = int(state["step"]), int(state["samples_seen"])
    if start.schedule_changes:
        log.warning(
            f"the optimizer settings changed since the checkpoint ({'; '.join(start.schedule_changes)}): "
            f"the optimizer and its lr schedule follow this run's settings from step {step} on"
        )
    if same_ranks and not start.fresh_data:
        log.info(f"resumed from step {step} ({seen} samples seen)")
    else:
        log.info(
            f"resumed from step {step} ({seen} samples seen, written by {point.world_size} rank(s)) with a "
            f"fresh data pass ({int(state['data_pass']) + 1}) for {world_size} rank(s)"
        )


def prepare_output(cfg: Config, start: Start, ds_config: dict[str, Any], rank: int) -> None:
    """The run folder's first writes, on rank 0 once every check has passed: an earlier run's files
    moved aside (--no-resume), then the resolved config."""
    if rank != 0:
        return
    out = cfg.train.output_dir
    if start.archive:
        moved = archive_run(out)
        if moved:
            log.warning(f"--no-resume: the earlier run's checkpoints and logs in {out} were moved to {moved}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"config": to_dict(cfg), "deepspeed": ds_config}, f, indent=2)
