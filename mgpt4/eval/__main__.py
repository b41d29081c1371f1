"""`python -m mgpt4.eval {captions,score,bench}`: caption metrics and lmms-eval benchmarks for a checkpoint
(see mgpt4/eval/__init__.py).

Several ranks: `deepspeed --num_gpus N --module mgpt4.eval captions ...` (or torchrun, or srun with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set); each rank captions its share of the images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mgpt4.dataclass_flags import HelpWithDefaults, add_config_args, config_from_args
from mgpt4.eval.references import ReferencesError
from mgpt4.eval.scores import ScoringError
from mgpt4.image_sources import SourceError
from mgpt4.model.generation import GREEDY, GenerationError
from mgpt4.strict_config import ConfigError

if TYPE_CHECKING:
    from mgpt4.config import ModelConfig
    from mgpt4.eval.captions import CaptionEvalConfig


def build_parser() -> argparse.ArgumentParser:
    """The flags of `captions`, derived from `CaptionEvalConfig` and the model's `ModelSource`."""
    from mgpt4.eval.captions import CaptionEvalConfig
    from mgpt4.inference.flags import add_model_args

    parser = argparse.ArgumentParser(
        prog="python -m mgpt4.eval",
        description="COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) and lmms-eval benchmarks "
        "for a checkpoint.",
    )
    # The deepspeed launcher puts --local_rank before the command name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "captions",
        help="caption every image with a checkpoint, then score (multi-rank)",
        formatter_class=HelpWithDefaults,
    )
    # The caption length the model was trained on is the natural limit; it is known once the model is.
    add_config_args(
        c,
        CaptionEvalConfig,
        CaptionEvalConfig(images=[], references="", out="", decoding=GREEDY.replace(max_new_tokens=None)),
        titles={"decoding": "decoding (greedy by default, so a re-run gives the same captions)"},
    )
    for action in c._actions:
        if action.dest == "max_new_tokens":
            action.help = "longest caption, in tokens (default: the model's text.max_txt_len)"
    c.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    add_model_args(c)

    s = sub.add_parser("score", help="score a predictions.jsonl against references (no model)")
    s.add_argument("--predictions", required=True, help="predictions.jsonl: {'image_id', 'caption'} per line")
    s.add_argument("--references", required=True, help="reference captions, COCO format")
    s.add_argument("--out", help="write the scores to this JSON file")

    from mgpt4.eval.bench import add_bench_args

    b = sub.add_parser(
        "bench",
        help="lmms-eval benchmarks on a run's newest checkpoint; scores to its TensorBoard and metrics.json",
        formatter_class=HelpWithDefaults,
    )
    add_bench_args(b)
    return parser


def _run_folder(checkpoint_dir: str) -> tuple[str, int]:
    """(the run's output folder, the step) of a checkpoint folder `<run>/checkpoints/step_N`."""
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    parent = os.path.dirname(os.path.normpath(checkpoint_dir))
    if not name.startswith("step_") or os.path.basename(parent) != "checkpoints":
        raise ConfigError(
            f"--tensorboard without a folder logs to the checkpoint's run, but {checkpoint_dir} is not "
            "<run>/checkpoints/step_N; give --tensorboard DIR"
        )
    return os.path.dirname(parent), int(name[len("step_") :])


def caption_config(args: argparse.Namespace, model_cfg: ModelConfig) -> CaptionEvalConfig:
    """The caption evaluation config the flags give for a model of `model_cfg` (its max_txt_len is the
    default caption length); the checkpoint and its step come from --checkpoint."""
    from mgpt4.checkpoints import find_checkpoint
    from mgpt4.eval.captions import CaptionEvalConfig
    from mgpt4.inference.flags import settings_from_args

    if args.max_new_tokens is None:
        args.max_new_tokens = model_cfg.text.max_txt_len
    ckpt = find_checkpoint(args.checkpoint) if args.checkpoint else None
    tensorboard, step = args.tensorboard, 0
    if ckpt is not None:
        try:
            step = _run_folder(ckpt)[1]
        except ConfigError:
            step = 0
    if tensorboard == "run":
        if ckpt is None:
            raise ConfigError("--tensorboard without a folder needs --checkpoint (a run's checkpoint)")
        run_dir, step = _run_folder(ckpt)
        tensorboard = os.path.join(run_dir, "tensorboard")
    return config_from_args(
        CaptionEvalConfig,
        args,
        decoding=settings_from_args(args),
        tensorboard=tensorboard,
        step=step,
        checkpoint=ckpt,
    )


def _captions(args: argparse.Namespace) -> None:
    from mgpt4 import dist
    from mgpt4.eval.captions import run_caption_eval
    from mgpt4.inference import load_model, model_config
    from mgpt4.inference.flags import source_from_args

    source = source_from_args(args)
    cfg = caption_config(args, model_config(source))  # fails fast on a bad --checkpoint or --set
    cfg.validate()
    info = dist.rank_info()
    source.device = dist.rank_device(source.device, info)
    run_caption_eval(lambda: load_model(source), cfg, info)


def _score(args: argparse.Namespace) -> None:
    from mgpt4.eval.references import check_matches, load_references
    from mgpt4.eval.scores import format_table, score_captions

    refs = load_references(args.references)
    key_of = {str(image_id): key for key, image_id in refs.image_ids.items()}
    predictions: dict[str, str] = {}
    try:
        with open(args.predictions, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if (
                    not isinstance(row, dict)
                    or not isinstance(row.get("caption"), str)
                    or "image_id" not in row
                ):
                    raise ReferencesError(
                        f"{args.predictions}:{n}: expected {{'image_id': ..., 'caption': '...'}}"
                    )
                key = key_of.get(str(row["image_id"]))
                if key is None:
                    raise ReferencesError(
                        f"{args.predictions}:{n}: image_id {row['image_id']!r} is not in {args.references}"
                    )
                predictions[key] = row["caption"]
    except (OSError, ValueError) as e:
        if isinstance(e, ReferencesError):
            raise
        raise ReferencesError(f"{args.predictions}: {e}") from None
    check_matches(list(predictions), refs, args.predictions)
    scores = score_captions(predictions, refs.captions)
    print(format_table(scores, len(predictions)), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({**scores, "images": len(predictions)}, f, indent=2)


def _bench(args: argparse.Namespace) -> int:
    from mgpt4.eval.bench import run_bench

    return run_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = {"captions": _captions, "score": _score, "bench": _bench}[args.command](args)
    except (ConfigError, GenerationError, ReferencesError, SourceError, ScoringError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
