"""`python -m mgpt4.features extract`: run the frozen vision path once over a recipe's image shards.

    python -m mgpt4.features extract --recipe stage1_vicuna13b --out /data/features \
        --set data.sources.0.shards='/data/laion/{00000..10488}.tar'
    deepspeed --num_gpus 8 --module mgpt4.features extract --recipe stage1_vicuna13b --out /data/features
    srun --ntasks=8 python -m mgpt4.features extract ...       # ranks wired as training wires them

Each source of the recipe becomes `<out>/<source name>/` with one feature shard per image shard (same
file names) and a `features.json` manifest. Running it again does only the shards that are missing.
Train from it with `--set data.kind=features --set data.features_root=<out>`.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from mgpt4.dataclass_flags import HelpWithDefaults, add_config_args, config_from_args
from mgpt4.logs import get_logger
from mgpt4.strict_config import ConfigError, apply_overrides

if TYPE_CHECKING:
    from mgpt4.features.extract import ExtractOptions

log = get_logger("mgpt4.features")


def build_parser() -> argparse.ArgumentParser:
    from mgpt4.features.extract import ExtractOptions
    from mgpt4.train.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="python -m mgpt4.features", description=__doc__.split("\n\n")[0])
    # The deepspeed launcher puts --local_rank before the command; LOCAL_RANK is what is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "extract",
        help="image shards -> feature shards (resumable, multi-rank)",
        formatter_class=HelpWithDefaults,
    )
    e.add_argument("--recipe", default="tiny_stage1", choices=list(RECIPES), help="model, weights and data")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    add_config_args(e, ExtractOptions)
    e.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    return parser


def extract_options(args: argparse.Namespace) -> ExtractOptions:
    """The extraction options the flags give."""
    from mgpt4.features.extract import ExtractOptions

    return config_from_args(ExtractOptions, args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from mgpt4 import dist
    from mgpt4.features.extract import extract
    from mgpt4.model import WeightsError
    from mgpt4.train.assets import ensure_demo_assets, fill_demo_paths
    from mgpt4.train.recipes import get_recipe

    info = dist.rank_info()  # this process's environment stays as it was
    created = False
    try:
        cfg = apply_overrides(get_recipe(args.recipe), args.set)
        fill_demo_paths(cfg)
        cfg.validate()
        created = dist.init_group(info)
        ensure_demo_assets(cfg)  # the tiny recipes' demo weights and shards: rank 0 makes them first
        extract(cfg, extract_options(args), info)
        if info.rank == 0:
            log.info(f"train from it: --set data.kind=features --set data.features_root={args.out}")
    except (ConfigError, WeightsError, FileNotFoundError, ValueError) as e:
        if os.environ.get("MGPT4_DEBUG"):
            raise
        raise SystemExit(f"mgpt4.features: error: {e}") from None
    finally:
        dist.close_group(created)


if __name__ == "__main__":
    main()
