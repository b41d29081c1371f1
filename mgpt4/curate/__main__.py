"""`python -m mgpt4.curate {describe,fix,filter}`: see mgpt4/curate/__init__.py.

Several ranks: `deepspeed --num_gpus N --module mgpt4.curate describe ...` (or torchrun, or srun with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set); each rank takes its share of the items.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mgpt4.curate.chat_api import ChatAPIConfig, FatalAPIError
from mgpt4.curate.describe import DescribeConfig
from mgpt4.curate.filter import FilterConfig
from mgpt4.curate.fix import FixConfig
from mgpt4.curate.hf_rewriter import HFRewriterConfig
from mgpt4.curate.prompts import FIX_PROMPT
from mgpt4.curate.rules import RULE_ORDER, RulesConfig
from mgpt4.curate.store import StoreError
from mgpt4.dataclass_flags import (
    HelpWithDefaults,
    OneLineErrors,
    add_config_args,
    config_from_args,
    given_flags,
)
from mgpt4.image_sources import SourceError
from mgpt4.inference.flags import settings_from_args
from mgpt4.model.loading import WeightsError
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict, to_dict

# Exit status of a step stopped by Ctrl-C, as a shell reports a process ended by SIGINT.
EXIT_INTERRUPTED = 130


def _launcher_flag(p: argparse.ArgumentParser) -> None:
    # Launchers that pass --local_rank after the step; LOCAL_RANK from the environment is what is used.
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def build_parser(print_rules: bool = False) -> argparse.ArgumentParser:
    """The flags of each step, derived from its config dataclasses (`mgpt4.dataclass_flags`).
    `print_rules`: the command line asks for `filter --print-rules`, which needs no --input or --out."""
    from mgpt4.inference.flags import add_model_args

    parser = OneLineErrors(
        prog="python -m mgpt4.curate",
        description="Build a cc_sbu_align set from your images: describe -> fix -> filter. Every step resumes.",
        formatter_class=HelpWithDefaults,
    )
    # The deepspeed launcher puts --local_rank before the step name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="step", required=True)

    def step(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpWithDefaults)

    d = step("describe", "a stage-1 model describes every image (resumable, multi-rank)")
    add_config_args(
        d,
        DescribeConfig,
        titles={"decoding": "decoding (greedy by default, so a re-run gives the same text)"},
    )
    add_model_args(d)
    _launcher_flag(d)

    f = step("fix", "an LLM rewrites every description (API endpoint or local HF model)")
    add_config_args(f, FixConfig)
    f.add_argument(
        "--prompt-file",
        help=f"a text file with another fix instruction (default: the paper's: {FIX_PROMPT[:40]}...)",
    )
    # The back ends' flags default to None, so that one given with the other back end can be refused;
    # their real defaults are said in --help and filled in by config_from_args.
    g = f.add_argument_group("OpenAI-compatible endpoint")
    add_config_args(g, ChatAPIConfig, required=False, unset=True)
    h = f.add_argument_group("local Hugging Face model")
    add_config_args(h, HFRewriterConfig, required=False, unset=True)
    _launcher_flag(f)

    r = step("filter", "rules drop bad captions; the rest is written as cc_sbu_align")
    # Required, and so shown in --help, except with --print-rules, which needs neither --input nor --out.
    add_config_args(r, FilterConfig, required=not print_rules)
    r.add_argument("--rules", help="a JSON file with rule settings (see --print-rules)")
    r.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. too_short.min_words=30"
    )
    r.add_argument("--disable", action="append", default=[], choices=RULE_ORDER, help="turn a rule off")
    r.add_argument("--print-rules", action="store_true", help="print the rule settings as JSON and exit")
    return parser


def rules_from_args(args: argparse.Namespace) -> RulesConfig:
    rules = RulesConfig()
    if args.rules:
        try:
            with open(args.rules, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--rules {args.rules}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"--rules {args.rules}: expected a JSON object of rules")
        rules = from_dict(RulesConfig, data, "rules")
    if args.set:
        rules = apply_overrides(rules, args.set)
    for name in args.disable:
        getattr(rules, name).enabled = False
    return rules


def describe_config(args: argparse.Namespace) -> DescribeConfig:
    """The describe config the flags give (checked by `DescribeConfig.validate`, not here)."""
    return config_from_args(DescribeConfig, args, decoding=settings_from_args(args))


def _describe(args: argparse.Namespace) -> None:
    from mgpt4 import dist
    from mgpt4.curate.describe import run_describe
    from mgpt4.inference import check_source, load_model
    from mgpt4.inference.flags import source_from_args

    cfg = describe_config(args)
    cfg.validate()
    info = dist.rank_info()
    source = source_from_args(args)
    source.device = dist.rank_device(source.device, info)
    # Flags that cannot give a usable model fail now, not after the images are listed.
    check_source(source)
    run_describe(lambda: load_model(source), cfg, info)


def fix_config(args: argparse.Namespace) -> FixConfig:
    """The fix config the flags give: one back end, its flags' values and its defaults elsewhere."""
    instruction = FIX_PROMPT
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as fh:
            instruction = fh.read().strip()
        if not instruction:
            raise ConfigError(f"--prompt-file {args.prompt_file}: empty")
    api = hf = None
    if args.base_url or args.model:
        if not (args.base_url and args.model):
            raise ConfigError("fix: --base-url and --model go together")
        if args.model_path:
            raise ConfigError(
                "fix: choose one back end: --base-url/--model (an API) or --hf-model (a local folder)"
            )
        wrong = given_flags(HFRewriterConfig, args)
        if wrong:
            raise ConfigError(
                f"fix: {', '.join(wrong)} belong(s) to the local back end (--hf-model), not to --base-url"
            )
        api = config_from_args(ChatAPIConfig, args)
    if args.model_path:
        wrong = given_flags(ChatAPIConfig, args)
        if wrong:
            raise ConfigError(
                f"fix: {', '.join(wrong)} belong(s) to the endpoint back end (--base-url), not to --hf-model"
            )
        hf = config_from_args(HFRewriterConfig, args)
    return config_from_args(FixConfig, args, api=api, hf=hf, instruction=instruction)


def _fix(args: argparse.Namespace) -> None:
    from mgpt4.curate.fix import run_fix

    run_fix(fix_config(args))


def filter_config(args: argparse.Namespace) -> FilterConfig:
    """The filter config the flags give. --input and --out are required here, not by the parser:
    --print-rules needs neither."""
    if not (args.input and args.out):
        raise ConfigError("filter: --input and --out are required")
    return config_from_args(FilterConfig, args, rules=rules_from_args(args))


def _filter(args: argparse.Namespace) -> None:
    from mgpt4.curate.filter import run_filter

    if args.print_rules:
        print(json.dumps(to_dict(rules_from_args(args)), indent=1))
        return
    run_filter(filter_config(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser("--print-rules" in (sys.argv[1:] if argv is None else argv)).parse_args(argv)
    try:
        {"describe": _describe, "fix": _fix, "filter": _filter}[args.step](args)
    except FatalAPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, StoreError, SourceError, WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # No traceback: every finished item is in the store, and the message says what is left.
        print(
            f"\n{e or f'{args.step} interrupted; finished items are kept, run it again to resume'}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
