"""Every checkpoint file name and the DeepSpeed-free helpers: the trainer writes, chat, curation and
evaluation read.

<output>/checkpoints/latest              name of the newest complete checkpoint folder
<output>/checkpoints/step_00000100/      one checkpoint
    config.json                          the resolved config tree (its "model" part rebuilds the model)
    llama_proj.pth                       the projection in the official MiniGPT-4 format
    ...                                  DeepSpeed's own files (optimizer, scheduler, RNG, data position)
"""

from __future__ import annotations

import json
import os
import shutil

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
CONFIG_FILE = "config.json"
PROJ_FILE = "llama_proj.pth"
# Per-rank trainer state (data position, RNG, sample images) beside DeepSpeed's own files.
RANK_STATE = "trainer_state_rank{rank}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def find_checkpoint(path: str) -> str | None:
    """A checkpoint folder from itself, its `checkpoints/` parent or the run's output folder (newest)."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, PROJ_FILE)):
        return path
    for root in (os.path.join(path, CHECKPOINTS_DIR), path):
        latest = os.path.join(root, LATEST_FILE)
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                name = f.read().strip()
            candidate = os.path.join(root, name)
            if os.path.isdir(candidate):
                return candidate
    return None


def read_checkpoint_config(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def latest_tag(root: str) -> str | None:
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        tag = f.read().strip()
    return tag if tag and os.path.isdir(os.path.join(root, tag)) else None


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rotate(root: str, keep: int, newest: str) -> None:
    steps = sorted(
        d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d))
    )
    # Partial folders newer than `latest` (a crash mid-save) are left for the next save to overwrite.
    complete = [d for d in steps if d <= newest]
    for old in complete[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
