"""`python -m mgpt4.export hf --checkpoint RUN --out DIR`: a folder transformers loads on its own.

The model flags are every tool's (`mgpt4.inference.flags`): a run folder or checkpoint, or a preset with
the official weight files. Bad input (no complete checkpoint, an output folder that is not empty, an
unreadable metrics.json) ends with one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mgpt4.dataclass_flags import HelpWithDefaults


def build_parser() -> argparse.ArgumentParser:
    from mgpt4.inference.flags import add_model_args

    parser = argparse.ArgumentParser(
        prog="python -m mgpt4.export", description="Export a trained MiniGPT-4 for use without mgpt4."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser(
        "hf",
        help="a transformers folder: Blip2ForConditionalGeneration (Q-Former models), for the LLaMA-2 "
        "variant its own modeling code (trust_remote_code=True), for a CLIP or SigLIP tower with mlp2x_gelu "
        "and connector none LlavaForConditionalGeneration",
        formatter_class=HelpWithDefaults,
    )
    hf.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    hf.add_argument(
        "--eval-metrics",
        action="append",
        default=[],
        metavar="FILE",
        help="a metrics.json of `python -m mgpt4.eval captions` to report in the model card (repeatable)",
    )
    add_model_args(hf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mgpt4.checkpoints import find_checkpoint
    from mgpt4.export.hf import check_out_dir, export_hf, export_refusal
    from mgpt4.export.model_card import ExportFacts, eval_scores
    from mgpt4.export.processor import ExportError
    from mgpt4.inference import check_source, load_model, model_config
    from mgpt4.inference.flags import source_from_args

    source = source_from_args(args)
    if source.llm_8bit:
        raise SystemExit(
            "--llm-8bit: an export writes the LLM's weights as they are; use --llm-dtype bf16 or fp16"
        )
    check_out_dir(args.out)
    check_source(source)
    refusal = export_refusal(model_config(source, warn=False))
    if refusal:
        raise SystemExit(f"export: {refusal}")
    try:
        eval_scores(args.eval_metrics)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model = load_model(source, announce=True)
    ckpt = find_checkpoint(source.checkpoint) if source.checkpoint else None
    try:
        export_hf(model, args.out, ExportFacts(checkpoint=ckpt, eval_metrics=args.eval_metrics))
    except ExportError as e:
        raise SystemExit(f"export: {e}") from None
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
