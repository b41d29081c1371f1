"""The config as this machine runs it: demo assets filled in, the batch split over ranks, validated.

DeepSpeed-free, so `--dry-run` prints without starting anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mgpt4.config import Config
from mgpt4.train.checkpoints import PROJ_FILE, find_checkpoint
from mgpt4.train.ds_config import build_ds_config, resolve_batch


def resolve_config(
    cfg: Config, ds_path: str, world_size: int, rank: int = 0, barrier: Callable[[], None] = lambda: None
) -> tuple[Config, dict[str, Any]]:
    """Fill in what depends on the machine (demo assets, batch split) and validate; returns (cfg, ds config)."""
    if cfg.train.demo_assets:
        from mgpt4.train.assets import prepare_demo_assets

        # Rank 0 generates; the others wait and then find the cached files.
        if rank == 0:
            prepare_demo_assets(cfg)
        barrier()
        if rank != 0:
            prepare_demo_assets(cfg)
    proj = cfg.model.weights.proj
    if proj and os.path.isdir(proj):
        # Stage 2 may start from an mgpt4 run: its newest checkpoint's official-format export.
        found = find_checkpoint(proj)
        if found is None:
            raise SystemExit(f"model.weights.proj={proj}: a folder without an mgpt4 checkpoint")
        cfg.model.weights.proj = os.path.join(found, PROJ_FILE)
    resolve_batch(cfg, world_size)
    cfg.validate()
    return cfg, build_ds_config(ds_path, cfg, world_size)
