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
from mgpt4.curate.hf_rewriter import HFRewriterConfig
from mgpt4.curate.prompts import FIX_PROMPT
from mgpt4.curate.rules import RULE_ORDER, RulesConfig
from mgpt4.curate.sources import SourceError
from mgpt4.curate.store import StoreError
from mgpt4.model.loading import WeightsError
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict, to_dict

# Exit status of a step stopped by Ctrl-C, as a shell reports a process ended by SIGINT.
EXIT_INTERRUPTED = 130


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="leave items that failed in an earlier run as they are (by default they are tried again)",
    )
    # Launchers that pass --local_rank after the step; LOCAL_RANK from the environment is what is used.
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


# Flags of one back end of fix; given with the other back end they would be ignored, so they are refused.
API_FLAGS = {
    "api_key_env": "--api-key-env",
    "concurrency": "--concurrency",
    "max_attempts": "--max-attempts",
    "timeout": "--timeout",
    "backoff": "--backoff",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
}
HF_FLAGS = {
    "device": "--device",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
    "max_new_tokens": "--max-new-tokens",
}


def build_parser() -> argparse.ArgumentParser:
    from mgpt4.chat.flags import HelpWithDefaults, OneLineErrors, add_decoding_args, add_model_args

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
    d.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="image folders, .tar shards ({a..b} and globs) or list files",
    )
    d.add_argument("--out", required=True, help="store folder for the descriptions")
    dd = DescribeConfig(images=[], out="")
    d.add_argument("--batch-size", type=int, default=dd.batch_size, help="images per generate call")
    d.add_argument("--num-workers", type=int, default=dd.num_workers, help="image decoding workers")
    d.add_argument(
        "--continue-below",
        type=int,
        default=dd.continue_below_tokens,
        help="answers under this many tokens get the 'Continue' turn (0: never)",
    )
    d.add_argument(
        "--prompt",
        default=dd.prompt,
        help="describe prompt with one <ImageHere> (default: the paper's question in the model's template)",
    )
    d.add_argument(
        "--sample",
        dest="sample_count",
        type=int,
        default=None,
        help="describe a seeded random subset of this many images",
    )
    d.add_argument("--seed", type=int, default=dd.seed, help="seed of --sample (and of sampled decoding)")
    add_model_args(d)
    add_decoding_args(d, dd.decoding, "decoding (greedy by default, so a re-run gives the same text)")
    _common(d)

    f = step("fix", "an LLM rewrites every description (API endpoint or local HF model)")
    f.add_argument("--input", required=True, help="describe's store folder")
    f.add_argument("--out", required=True, help="store folder for the fixed descriptions")
    f.add_argument(
        "--prompt-file",
        help=f"a text file with another fix instruction (default: the paper's: {FIX_PROMPT[:40]}...)",
    )
    # The back-end flags default to None, so that one given with the other back end can be refused;
    # their real defaults are filled in by _fix and shown in --help.
    api = ChatAPIConfig(base_url="", model="")
    g = f.add_argument_group("OpenAI-compatible endpoint")
    g.add_argument("--base-url", help="e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    g.add_argument("--model", help="model name served by the endpoint")
    for flag, kind, default, help_text in (
        ("--api-key-env", str, api.api_key_env, "environment variable holding the key"),
        ("--concurrency", int, api.concurrency, "requests in flight"),
        (
            "--max-attempts",
            int,
            api.max_attempts,
            "tries per item on 429/5xx, dropped connections, cut replies",
        ),
        ("--timeout", float, api.timeout_s, "seconds per request"),
        ("--backoff", float, api.backoff_base_s, "first retry delay in seconds (doubles)"),
        ("--max-tokens", int, api.max_tokens, "longest reply; a reply cut there fails"),
        ("--temperature", float, api.temperature, "sampling temperature of the endpoint"),
    ):
        g.add_argument(flag, type=kind, help=f"{help_text} (default: {default})")
    hf = HFRewriterConfig(model_path="")
    h = f.add_argument_group("local Hugging Face model")
    h.add_argument("--hf-model", help="a local Hugging Face causal LM folder")
    for flag, kind, default, help_text in (
        ("--device", str, hf.device, "device of the model"),
        ("--dtype", str, hf.dtype, "auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16 or fp16"),
        ("--batch-size", int, hf.batch_size, "paragraphs per generate call"),
        ("--max-new-tokens", int, hf.max_new_tokens, "longest reply; a reply cut there fails"),
    ):
        h.add_argument(flag, type=kind, help=f"{help_text} (default: {default})")
    _common(f)

    r = step("filter", "rules drop bad captions; the rest is written as cc_sbu_align")
    r.add_argument("--input", help="fix's store folder (or describe's, to skip fixing)")
    r.add_argument("--out", help="the cc_sbu_align folder to write")
    r.add_argument("--rules", help="a JSON file with rule settings (see --print-rules)")
    r.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. too_short.min_words=30"
    )
    r.add_argument("--disable", action="append", default=[], choices=RULE_ORDER, help="turn a rule off")
    r.add_argument("--rejects", help="rejects file (default: <out>/rejects.jsonl)")
    r.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    r.add_argument("--print-rules", action="store_true", help="print the rule settings as JSON and exit")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
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


def _describe(args: argparse.Namespace) -> None:
    from mgpt4 import dist
    from mgpt4.chat.flags import check_model_flags, settings_from_args
    from mgpt4.chat.placement import model_from_args
    from mgpt4.curate.describe import run_describe

    cfg = DescribeConfig(
        images=args.images,
        out=args.out,
        prompt=args.prompt,
        continue_below_tokens=args.continue_below,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        decoding=settings_from_args(args),
        sample=args.sample_count,
        seed=args.seed,
        retry_failed=not args.no_retry_failed,
        progress=not args.no_progress,
    )
    cfg.validate()
    info = dist.rank_info()
    args.device = dist.rank_device(args.device, info)
    # Flags that cannot give a usable model fail now, not after the images are listed.
    check_model_flags(args)
    run_describe(lambda: model_from_args(args), cfg, info)


def _given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    return [flag for dest, flag in flags.items() if getattr(args, dest) is not None]


def _fix(args: argparse.Namespace) -> None:
    from mgpt4.curate.fix import FixConfig, run_fix

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
        if args.hf_model:
            raise ConfigError(
                "fix: choose one back end: --base-url/--model (an API) or --hf-model (a local folder)"
            )
        wrong = _given(args, HF_FLAGS)
        if wrong:
            raise ConfigError(
                f"fix: {', '.join(wrong)} belong(s) to the local back end (--hf-model), not to --base-url"
            )
        d = ChatAPIConfig(base_url=args.base_url, model=args.model)
        api = ChatAPIConfig(
            base_url=args.base_url,
            model=args.model,
            api_key_env=_or(args.api_key_env, d.api_key_env),
            concurrency=_or(args.concurrency, d.concurrency),
            max_attempts=_or(args.max_attempts, d.max_attempts),
            timeout_s=_or(args.timeout, d.timeout_s),
            backoff_base_s=_or(args.backoff, d.backoff_base_s),
            max_tokens=_or(args.max_tokens, d.max_tokens),
            temperature=_or(args.temperature, d.temperature),
        )
    if args.hf_model:
        wrong = _given(args, API_FLAGS)
        if wrong:
            raise ConfigError(
                f"fix: {', '.join(wrong)} belong(s) to the endpoint back end (--base-url), not to --hf-model"
            )
        d = HFRewriterConfig(model_path=args.hf_model)
        hf = HFRewriterConfig(
            model_path=args.hf_model,
            device=_or(args.device, d.device),
            dtype=_or(args.dtype, d.dtype),
            batch_size=_or(args.batch_size, d.batch_size),
            max_new_tokens=_or(args.max_new_tokens, d.max_new_tokens),
        )
    run_fix(
        FixConfig(
            input=args.input,
            out=args.out,
            api=api,
            hf=hf,
            instruction=instruction,
            retry_failed=not args.no_retry_failed,
            progress=not args.no_progress,
        )
    )


def _or(value, default):
    return default if value is None else value


def _filter(args: argparse.Namespace) -> None:
    from mgpt4.curate.filter import run_filter

    rules = rules_from_args(args)
    if args.print_rules:
        print(json.dumps(to_dict(rules), indent=1))
        return
    if not (args.input and args.out):
        raise ConfigError("filter: --input and --out are required")
    run_filter(
        FilterConfig(
            input=args.input,
            out=args.out,
            rules=rules,
            rejects=args.rejects,
            link=not args.copy,
            progress=not args.no_progress,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
