"""Names inside mgpt4 checkpoint folders, shared by the trainer (writer) and chat/curation (readers).

<output>/checkpoints/latest              name of the newest complete checkpoint folder
<output>/checkpoints/step_00000100/      one checkpoint
    config.json                          the resolved config tree (its "model" part rebuilds the model)
    llama_proj.pth                       the projection in the official MiniGPT-4 format
    ...                                  DeepSpeed's own files (optimizer, scheduler, RNG, data position)
"""

from __future__ import annotations

import json
import os

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
CONFIG_FILE = "config.json"
PROJ_FILE = "llama_proj.pth"


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
