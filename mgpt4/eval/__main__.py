"""`python -m mgpt4.eval {captions,score}`: caption metrics for a checkpoint (see mgpt4/eval/__init__.py).

Several ranks: `deepspeed --num_gpus N --module mgpt4.eval captions ...` (or torchrun, or srun with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set); each rank captions its share of the images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from mgpt4.curate.sources import SourceError
from mgpt4.eval.references import ReferencesError
from mgpt4.eval.scores import ScoringError
from mgpt4.model.generation import GREEDY, GenerationError
from mgpt4.strict_config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from mgpt4.chat.flags import add_decoding_args, add_model_args

    parser = argparse.ArgumentParser(
        prog="python -m mgpt4.eval",
        description="COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) for a checkpoint.",
    )
    # The deepspeed launcher puts --local_rank before the command name.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("captions", help="caption every image with a checkpoint, then score (multi-rank)")
    c.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="image folders, .tar shards ({a..b} and globs) or list files",
    )
    c.add_argument(
        "--references", required=True, help="reference captions, COCO format (captions_val2014.json)"
    )
    c.add_argument("--out", required=True, help="folder for predictions.jsonl and metrics.json")
    c.add_argument(
        "--prompt",
        help="prompt with one <ImageHere> (default: the stage's: stage 2 its first instruction in the "
        "template, stage 1 the image alone)",
    )
    c.add_argument("--batch-size", type=int, default=16, help="images per generate call")
    c.add_argument("--num-workers", type=int, default=2, help="image decoding workers")
    c.add_argument(
        "--tensorboard",
        nargs="?",
        const="run",
        metavar="DIR",
        help="also log the scores as captions/<metric> scalars: to DIR, or without DIR to the tensorboard/ "
        "folder of the --checkpoint's run, at the checkpoint's step",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    add_model_args(c)
    add_decoding_args(c, GREEDY, "decoding (greedy by default, so a re-run gives the same captions)")
    # The caption length the model was trained on is the natural limit; it is known once the model is.
    c.set_defaults(max_new_tokens=None)
    for action in c._actions:
        if action.dest == "max_new_tokens":
            action.help = "longest caption, in tokens (default: the model's text.max_txt_len)"

    s = sub.add_parser("score", help="score a predictions.jsonl against references (no model)")
    s.add_argument("--predictions", required=True, help="predictions.jsonl: {'image_id', 'caption'} per line")
    s.add_argument("--references", required=True, help="reference captions, COCO format")
    s.add_argument("--out", help="write the scores to this JSON file")
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


def _captions(args: argparse.Namespace) -> None:
    from mgpt4 import dist
    from mgpt4.chat.flags import model_config_from_args, settings_from_args
    from mgpt4.chat.placement import model_from_args
    from mgpt4.eval.captions import CaptionEvalConfig, run_caption_eval
    from mgpt4.train.checkpoints import find_checkpoint

    model_cfg = model_config_from_args(args)  # fails fast on a bad --checkpoint or --set
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
    cfg = CaptionEvalConfig(
        images=args.images,
        references=args.references,
        out=args.out,
        prompt=args.prompt,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        decoding=settings_from_args(args),
        tensorboard=tensorboard,
        step=step,
        progress=not args.no_progress,
        checkpoint=ckpt,
    )
    cfg.validate()
    info = dist.rank_info()
    args.device = dist.rank_device(args.device, info)
    run_caption_eval(lambda: model_from_args(args), cfg, info)


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"captions": _captions, "score": _score}[args.command](args)
    except (ConfigError, GenerationError, ReferencesError, SourceError, ScoringError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
