"""The DeepSpeed JSON, completed from the recipe: batch sizes, precision and clipping come from one place.

The files in ds_configs/ say how to shard (ZeRO stage, offload, buckets); everything the recipe owns
is filled in here. A JSON that sets one of those keys to another value is an error, not a silent win.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from mgpt4.config import Config
from mgpt4.strict_config import ConfigError

# Keys the recipe owns; a JSON may leave them out or write "auto".
OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)
# The optimizer and schedule are mgpt4's (AdamW on the trainable set, warmup + cosine).
FORBIDDEN = ("optimizer", "scheduler")


def read_ds_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed {path}: file not found (try ds_configs/z2.json)")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e


def resolve_batch(cfg: Config, world_size: int) -> None:
    """Derive the per-rank micro batch from train.global_batch_size (in place), or check divisibility."""
    t = cfg.train
    if t.global_batch_size is None:
        return
    per_step = world_size * t.grad_accum
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {t.grad_accum} = {per_step}; choose a global batch that is a multiple of {per_step}, "
            f"or change the number of GPUs or train.grad_accum"
        )
    cfg.data.batch_size = t.global_batch_size // per_step


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(path: str, cfg: Config, world_size: int) -> dict[str, Any]:
    """The final DeepSpeed config for `cfg` on `world_size` ranks."""
    ds = copy.deepcopy(read_ds_json(path))
    for key in FORBIDDEN:
        if key in ds:
            raise ConfigError(
                f"{path}: remove {key!r}; mgpt4 sets the optimizer and schedule from the recipe (optim.*)"
            )
    t = cfg.train
    micro = cfg.data.batch_size
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in values.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(
                f'{path}: {key}={ds[key]} disagrees with the recipe ({value}); remove it or write "auto" '
                f"and set it through the recipe (train.global_batch_size, data.batch_size, train.grad_accum, optim.grad_clip)"
            )
        ds[key] = value
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") not in (None, "auto", t.precision == key):
            raise ConfigError(
                f"{path}: {key}.enabled disagrees with train.precision={t.precision}; remove the {key} block"
            )
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    ds["fp16"] = {"enabled": t.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000}
    if t.precision == "fp16":
        ds["fp16"].update({"loss_scale": 0, "hysteresis": 2, "min_loss_scale": 1})
    return ds
