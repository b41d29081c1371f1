"""Command line of the training launchers: recipe, overrides, DeepSpeed config, dry run, resume."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from mgpt4.config import Config
from mgpt4.dist import process_rank
from mgpt4.logs import get_logger
from mgpt4.strict_config import ConfigError, apply_overrides, check_override_keys, to_dict

log = get_logger(__name__)


def parse_args(argv: list[str] | None, default_recipe: str, description: str) -> argparse.Namespace:
    from mgpt4.train.recipes import RECIPES

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--deepspeed", default="ds_configs/z2.json", help="DeepSpeed JSON (ZeRO settings only)")
    p.add_argument("--recipe", default=default_recipe, choices=list(RECIPES), help="named config")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. --set train.steps=100"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and DeepSpeed config, then exit"
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start at step 0; an earlier run's files in the output folder are moved to its archive/, not overwritten",
    )
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # the deepspeed launcher adds it
    return p.parse_args(argv)


def check_override_keys_first(argv: list[str] | None) -> None:
    """Stop on a `--set` key that no config has, with the nearest keys, before the recipes and the
    model code are imported (the recipes import transformers' models: seconds a typo need not cost).
    Under the deepspeed launcher this runs in each rank: the launcher itself starts ranks without
    running any of mgpt4's code, so its own start-up cannot be spared."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--set", action="append", default=[])
    try:
        check_override_keys(Config, early.parse_known_args(argv)[0].set)
    except ConfigError as e:
        if os.environ.get("MGPT4_DEBUG"):
            raise
        raise SystemExit(f"{_rank_tag()}config error: {e}") from None


def main(argv: list[str] | None = None, default_recipe: str = "tiny_stage1", description: str = "") -> None:
    check_override_keys_first(argv)
    args = parse_args(argv, default_recipe, description)
    from mgpt4.model import WeightsError
    from mgpt4.train.recipes import get_recipe
    from mgpt4.train.run_state import SaveError, resume_hint

    cfg = None
    try:
        cfg = apply_overrides(get_recipe(args.recipe), args.set)
        if args.dry_run:
            dry_run(cfg, args.deepspeed)
            return
        from mgpt4.train.trainer import train

        # The deepspeed launcher answers a terminal's Ctrl-C by sending SIGTERM to every rank at once,
        # which by default kills a rank before it can say where the run stands: treat it as Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupted)
        train(cfg, args.deepspeed, resume=not args.no_resume)
    except KeyboardInterrupt:
        # A second signal (Ctrl-C, then the launcher's SIGTERM) must not cut this message short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.environ.get("MGPT4_DEBUG"):
            raise
        # Ctrl-C: no traceback, but where the run stands (130: the shell's code for SIGINT).
        where = "" if cfg is None else f"; rerun {resume_hint(cfg.train.output_dir)}"
        print(f"{_rank_tag()}mgpt4: interrupted{where}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ConfigError, WeightsError, FileNotFoundError, ValueError, SaveError, RuntimeError) as e:
        # Bad input stops with what to fix; MGPT4_DEBUG=1 shows the traceback instead.
        # A bare RuntimeError is a library's failure, shown whole unless it is a port in use; the
        # ones that are also ValueErrors (DataSourceError) are bad input like any other.
        message = (
            _port_in_use(e)
            if not isinstance(e, ValueError | OSError) and isinstance(e, RuntimeError)
            else str(e)
        )
        if message is None or os.environ.get("MGPT4_DEBUG"):
            raise
        prefix = "config error" if isinstance(e, ConfigError) else "mgpt4: error"
        # Every rank says it: tagged like the logger's warnings, so that a log of many ranks reads.
        raise SystemExit(f"{_rank_tag()}{prefix}: {message}") from None


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _rank_tag() -> str:
    rank, world = process_rank()
    return f"[rank {rank}] " if world > 1 else ""


def _port_in_use(e: RuntimeError) -> str | None:
    """The one line for a rendezvous port that another process holds (torch's TCPStore raises a
    DistNetworkError, a RuntimeError, with EADDRINUSE deep in its text); None for any other error."""
    text = str(e)
    if "EADDRINUSE" not in text and "address already in use" not in text.lower():
        return None
    addr = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    return (
        f"the rendezvous port {addr} is in use (EADDRINUSE): another job or a run still ending holds it; "
        f"choose a free port with `deepspeed --master_port PORT ...` (or torchrun's --master-port)"
    )


def dry_run(cfg: Config, ds_path: str) -> None:
    """Print the resolved config and DeepSpeed config after every check that needs no weights loaded;
    inputs missing on this machine are listed, not fatal (a login node may not see the data).
    Writes nothing: demo assets are generated by a real run only."""
    from mgpt4.train.resolve import resolve_config

    world = process_rank()[1]
    cfg, ds, missing = resolve_config(cfg, ds_path, world, missing_ok=True)
    print(json.dumps({"config": to_dict(cfg), "deepspeed": ds, "missing_inputs": missing}, indent=2))
    for line in missing:
        log.warning(f"not found on this machine: {line}")
