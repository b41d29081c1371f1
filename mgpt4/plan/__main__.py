"""`python -m mgpt4.plan`: a recipe's memory per GPU under z2, z3 and z3_offload, and the setting to use.

    python -m mgpt4.plan --recipe stage2_vicuna13b --gpus 4 --gpu-memory 40
    python -m mgpt4.plan --recipe tiny_stage1 --set data.batch_size=16 --gpus 1 --gpu-memory 24

Computed from the config alone (a meta-device build: no weight file is read; an LLM folder's config.json
and tokenizer are, when they are on this machine). GB are 10^9 bytes, as GPUs are sold; the table shows GiB.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

from mgpt4.config import QUANTIZED, Config
from mgpt4.dataclass_flags import OneLineErrors
from mgpt4.plan.fit import GIB, SETTINGS, Plan, plan
from mgpt4.plan.weights import build_meta
from mgpt4.strict_config import ConfigError, apply_overrides
from mgpt4.train.assets import fill_demo_paths
from mgpt4.train.ds_config import resolve_batch
from mgpt4.train.recipes import RECIPES, get_recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineErrors(prog="python -m mgpt4.plan", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="tiny_stage1", choices=list(RECIPES), help="named config")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, as the trainer's"
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) in all (default: 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GB (default: 80)")
    p.add_argument(
        "--table",
        metavar="GB,GB,...",
        help="instead of the report, one Markdown table row: the recommended setting for each GPU memory",
    )
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error(f"--gpus: expected a positive number of GPUs, got {args.gpus}")
    if not args.gpu_memory > 0:
        p.error(f"--gpu-memory: expected GB above 0, got {args.gpu_memory}")
    return args


def validate_for_planning(cfg: Config) -> None:
    """Every check of the config (ConfigError naming the key) except where a quantised LLM can run: a plan
    for GPUs is made on any machine, a login node without CUDA or bitsandbytes too."""
    checked = copy.deepcopy(cfg)
    if checked.model.precision.llm in QUANTIZED:
        checked.model.precision.llm = "bf16"
    checked.validate()


def load_tokenizer_if_present(cfg):
    """The tokenizer of the LLM folder when it is on this machine (the exact prompt length), else None."""
    folder = cfg.model.weights.tokenizer or cfg.model.weights.llm
    if not folder or not os.path.isdir(folder):
        return None
    from mgpt4.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def render(p: Plan) -> str:
    cfg, b = p.cfg, p.batch
    width = 34
    head = f"{'per rank, GiB':<{width}}" + "".join(f"{s.name:>12}" for s in SETTINGS)
    lines = [
        f"recipe {cfg.recipe or '(custom)'}: {p.gpus} GPU(s) of {p.gpu_bytes / 1e9:g} GB ({p.gpu_bytes / GIB:.1f} GiB); "
        f"engine {cfg.train.precision}, LLM {cfg.model.precision.llm}, attention {cfg.model.attn_implementation}",
        (
            f"micro-batch: {b.rows} packed rows of {b.length} tokens (up to {b.samples} samples)"
            if b.packed
            else f"micro-batch: {b.rows} padded rows of {b.length} tokens ({p.context_tokens} context"
            f"{'' if p.context_exact else ', estimated without a tokenizer'} + {cfg.model.text.max_txt_len} answer)"
        ),
        "",
        head,
        "-" * len(head),
    ]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>12}" for v in values))

    keys = sorted(
        {k for s in p.stages for k in s.frozen},
        key=lambda k: ("ViT", "Q-Former", "LLM", "projection").index(k[0]),
    )
    for part, dtype in keys:
        row(f"frozen {part} ({dtype})", [_gib(s.frozen.get((part, dtype), 0)) for s in p.stages])
    row("frozen layers gathered (ZeRO-3)", [_gib(s.gathered) for s in p.stages])
    row("trainable weights", [_gib(s.trainable.module) for s in p.stages])
    row("gradients", [_gib(s.trainable.grads) for s in p.stages])
    row("AdamW: fp32 master + 2 moments", [_gib(s.trainable.optimizer) for s in p.stages])
    for ckpt in (False, True):
        tag = "checkpointing " + ("on" if ckpt else "off")
        row(f"activations ({tag})", [_gib(s.activations[ckpt]) for s in p.stages])
        row(f"  + transients ({tag})", [_gib(s.transient[ckpt]) for s in p.stages])
        row(
            f"total ({tag})",
            [_gib(s.fixed + s.activations[ckpt] + s.transient[ckpt]) for s in p.stages],
        )
    row("host memory (offload)", [_gib(s.host) for s in p.stages])
    unit = "rows" if b.packed else "samples"
    for ckpt in (False, True):
        row(
            f"largest micro-batch, {unit} (ckpt {'on' if ckpt else 'off'})",
            [str(s.largest[ckpt]) if s.refused is None else "refused" for s in p.stages],
        )
    lines.append("")
    for s in p.stages:
        if s.refused:
            lines.append(f"{s.setting.name}: refused by the trainer: {s.refused}")
    r = p.recommendation
    lines.append(
        f"recommended: {r.flags}  ({r.why})"
        if r
        else "recommended: nothing fits, not even one row per rank: use more GPUs, or GPUs with more memory"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = apply_overrides(get_recipe(args.recipe), args.set)
        fill_demo_paths(cfg)  # paths only, nothing generated: the plan reads no data
        resolve_batch(cfg, args.gpus)
        validate_for_planning(cfg)
        tokenizer = load_tokenizer_if_present(cfg)
        if args.table:
            model = build_meta(cfg.model)  # once for every cell: the build of a 13B model takes seconds
            cells = [
                plan(cfg, args.gpus, float(gb), tokenizer, model).recommendation
                for gb in args.table.split(",")
            ]
            print(
                f"| {cfg.recipe} | {args.gpus} | "
                + " | ".join(c.short() if c else "does not fit" for c in cells)
                + " |"
            )
            return
        result = plan(cfg, args.gpus, args.gpu_memory, tokenizer)
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(render(result))


if __name__ == "__main__":
    main()
