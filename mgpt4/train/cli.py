"""Command line of the training launchers: recipe, overrides, DeepSpeed config, dry run, resume."""

from __future__ import annotations

import argparse
import json
import os

from mgpt4.strict_config import ConfigError, apply_overrides, to_dict
from mgpt4.train.recipes import RECIPES, get_recipe


def parse_args(argv: list[str] | None, default_recipe: str, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--deepspeed", default="ds_configs/z2.json", help="DeepSpeed JSON (ZeRO settings only)")
    p.add_argument("--recipe", default=default_recipe, choices=list(RECIPES), help="named config")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. --set train.steps=100"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and DeepSpeed config, then exit"
    )
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the output folder")
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # the deepspeed launcher adds it
    return p.parse_args(argv)


def main(argv: list[str] | None = None, default_recipe: str = "tiny_stage1", description: str = "") -> None:
    args = parse_args(argv, default_recipe, description)
    try:
        cfg = apply_overrides(get_recipe(args.recipe), args.set)
        if args.dry_run:
            from mgpt4.train.resolve import resolve_config

            world = int(os.environ.get("WORLD_SIZE", "1"))
            cfg, ds = resolve_config(cfg, args.deepspeed, world)
            print(json.dumps({"config": to_dict(cfg), "deepspeed": ds}, indent=2))
            return
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    from mgpt4.model import WeightsError
    from mgpt4.train.trainer import train

    try:
        train(cfg, args.deepspeed, resume=not args.no_resume)
    except (ConfigError, WeightsError, FileNotFoundError, ValueError) as e:
        # Bad input stops with what to fix; MGPT4_DEBUG=1 shows the traceback instead.
        if os.environ.get("MGPT4_DEBUG"):
            raise
        raise SystemExit(f"mgpt4: error: {e}") from None
