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
from mgpt4.strict_config import ConfigError, apply_overrides, from_dict, to_dict


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


def build_parser() -> argparse.ArgumentParser:
    from mgpt4.chat.flags import add_decoding_args, add_model_args

    parser = argparse.ArgumentParser(
        prog="python -m mgpt4.curate",
        description="Build a cc_sbu_align set from your images: describe -> fix -> filter. Every step resumes.",
    )
    # The deepspeed launcher puts --local_rank before the step name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="step", required=True)

    d = sub.add_parser("describe", help="a stage-1 model describes every image (resumable, multi-rank)")
    d.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="image folders, .tar shards ({a..b} and globs) or list files",
    )
    d.add_argument("--out", required=True, help="store folder for the descriptions")
    dd = DescribeConfig(images=[], out="")
    d.add_argument("--batch-size", type=int, default=dd.batch_size)
    d.add_argument("--num-workers", type=int, default=dd.num_workers, help="image decoding workers")
    d.add_argument(
        "--continue-below",
        type=int,
        default=dd.continue_below_tokens,
        help="answers under this many tokens get the 'Continue' turn (0: never)",
    )
    d.add_argument("--prompt", default=dd.prompt, help="describe prompt with one <ImageHere>")
    d.add_argument(
        "--sample",
        dest="sample_count",
        type=int,
        default=None,
        help="describe a seeded random subset of this many images",
    )
    d.add_argument("--seed", type=int, default=dd.seed)
    add_model_args(d)
    add_decoding_args(d, dd.decoding, "decoding (greedy by default, so a re-run gives the same text)")
    _common(d)

    f = sub.add_parser("fix", help="an LLM rewrites every description (API endpoint or local HF model)")
    f.add_argument("--input", required=True, help="describe's store folder")
    f.add_argument("--out", required=True, help="store folder for the fixed descriptions")
    f.add_argument(
        "--prompt-file",
        help=f"a text file with another fix instruction (default: the paper's: {FIX_PROMPT[:40]}...)",
    )
    api = ChatAPIConfig(base_url="", model="")
    g = f.add_argument_group("OpenAI-compatible endpoint")
    g.add_argument("--base-url", help="e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    g.add_argument("--model", help="model name served by the endpoint")
    g.add_argument("--api-key-env", default=api.api_key_env, help="environment variable holding the key")
    g.add_argument("--concurrency", type=int, default=api.concurrency, help="requests in flight")
    g.add_argument("--max-attempts", type=int, default=api.max_attempts, help="tries per item on 429/5xx")
    g.add_argument("--timeout", type=float, default=api.timeout_s, help="seconds per request")
    g.add_argument("--backoff", type=float, default=api.backoff_base_s, help="first retry delay (doubles)")
    g.add_argument("--max-tokens", type=int, default=api.max_tokens)
    g.add_argument("--temperature", type=float, default=api.temperature)
    hf = HFRewriterConfig(model_path="")
    h = f.add_argument_group("local Hugging Face model")
    h.add_argument("--hf-model", help="a local Hugging Face causal LM folder")
    h.add_argument("--device", default=hf.device)
    h.add_argument("--dtype", default=hf.dtype, help="auto, fp32, bf16 or fp16")
    h.add_argument("--batch-size", type=int, default=hf.batch_size)
    h.add_argument("--max-new-tokens", type=int, default=hf.max_new_tokens)
    _common(f)

    r = sub.add_parser("filter", help="rules drop bad captions; the rest is written as cc_sbu_align")
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
    from mgpt4.chat.flags import settings_from_args
    from mgpt4.chat.placement import model_from_args
    from mgpt4.curate import ranks
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
    info = ranks.rank_info()
    args.device = ranks.rank_device(args.device, info)
    run_describe(lambda: model_from_args(args), cfg, info)


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
        api = ChatAPIConfig(
            base_url=args.base_url,
            model=args.model,
            api_key_env=args.api_key_env,
            concurrency=args.concurrency,
            max_attempts=args.max_attempts,
            timeout_s=args.timeout,
            backoff_base_s=args.backoff,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
        )
    if args.hf_model:
        hf = HFRewriterConfig(
            model_path=args.hf_model,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
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
    except (ConfigError, StoreError, SourceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
