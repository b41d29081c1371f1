"""Where a run starts: at step 0, exactly where a checkpoint stopped, or from a checkpoint's trainable
state with a fresh data pass (`train.resume_data=fresh`: after the inputs changed, or on another
number of ranks).

    start = plan_start(cfg, world_size, resume)        # reads files only: before anything is built
    ... build the model, engine and loader ...
    step, samples_seen, images = restore(start, engine, model, loader, world_size)
    prepare_output(cfg, start, ds_config, rank)        # the first write into the run folder

Every refusal (no complete checkpoint, another recipe's checkpoints, another number of ranks, changed
inputs) is raised before `prepare_output`, so a refused run leaves the folder as it found it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mgpt4.config import Config
from mgpt4.data.loader import DataStateMismatch, Loader
from mgpt4.logs import get_logger
from mgpt4.model import MiniGPT4
from mgpt4.strict_config import to_dict
from mgpt4.train import engine as eng_mod
from mgpt4.train.checkpoints import (
    CONFIG_FILE,
    ResumeError,
    ResumePoint,
    archive_run,
    check_resume_point,
    find_resume_point,
)

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
    return Start(point, fresh_data=fresh)


def restore(
    start: Start, engine, model: MiniGPT4, loader: Loader, world_size: int
) -> tuple[int, int, torch.Tensor | None]:
    """Load what `start` names into the engine and the loader: (step, samples seen, sample images)."""
    point = start.point
    if point is None:
        return 0, 0, None
    if point.note:
        log.warning(point.note)
    if point.world_size == world_size:
        client, rank_state = eng_mod.load_checkpoint(engine, point.folder)
        step, seen, images = client["step"], client["samples_seen"], rank_state["sample_images"]
        set_rng_state(rank_state["rng"])
        if not start.fresh_data:
            try:
                loader.load_state_dict(rank_state["data"])
            except DataStateMismatch as e:
                raise ResumeError(
                    f"{point.folder}: {e}. Give the data of the checkpoint to continue exactly, or {FRESH_HINT}"
                ) from None
            log.info(f"resumed from step {step} ({seen} samples seen)")
            return step, seen, images
        data_pass = int(client.get("data_pass", 0)) + 1
    else:
        state = eng_mod.load_run_state(engine, model, point.folder)
        step, seen, images = int(state["step"]), int(state["samples_seen"]), state["sample_images"]
        data_pass = int(state["data_pass"]) + 1
    loader.start_pass(data_pass)
    log.info(
        f"resumed from step {step} ({seen} samples seen, written by {point.world_size} rank(s)) with a fresh "
        f"data pass ({data_pass}) for {world_size} rank(s)"
    )
    return step, seen, images


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
