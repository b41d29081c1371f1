"""Caption metrics for a checkpoint: a caption per image, then BLEU, METEOR, ROUGE-L and CIDEr.

Every rank checks the inputs (images against references) before any model is loaded, takes every
world_size-th image, generates its captions in batches and hands them over in one gather at the
end; rank 0 writes `predictions.jsonl` and `metrics.json`, prints the table and, when asked, logs
the scores to a run's TensorBoard. Ranks are wired as training wires them (`mgpt4.dist`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mgpt4 import dist
from mgpt4.eval.references import References, check_matches, load_references
from mgpt4.eval.scores import METRICS, format_table, score_captions
from mgpt4.image_sources import EvalImages, ImageItem, list_images
from mgpt4.logs import get_logger
from mgpt4.model.generation import GREEDY, GenerationSettings
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.prompts import IMAGE_PLACEHOLDER
from mgpt4.strict_config import ConfigError

log = get_logger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
TENSORBOARD_PREFIX = "captions/"


@dataclass
class CaptionEvalConfig:
    """What caption evaluation does; each field but the derived ones is a flag of
    `python -m mgpt4.eval captions` (metadata: its help)."""

    images: list[str] = field(
        metadata={"help": "image folders, .tar shards ({a..b} and globs) or list files"}
    )
    references: str = field(metadata={"help": "reference captions, COCO format (captions_val2014.json)"})
    out: str = field(metadata={"help": "folder for predictions.jsonl and metrics.json"})
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "prompt with one <ImageHere> (default: the stage's: stage 2 its first instruction in the "
            "template, stage 1 the image alone)"
        },
    )  # None: the stage's prompt (see stage_prompt)
    batch_size: int = field(default=16, metadata={"help": "images per generate call"})
    num_workers: int = field(default=2, metadata={"help": "image decoding workers"})
    decoding: GenerationSettings = GREEDY
    # A TensorBoard folder to log the scores to.
    tensorboard: str | None = field(
        default=None,
        metadata={
            "nargs": "?",
            "const": "run",
            "metavar": "DIR",
            "help": "also log the scores as captions/<metric> scalars: to DIR, or without DIR to the "
            "tensorboard/ folder of the --checkpoint's run, at the checkpoint's step",
        },
    )
    step: int = field(default=0, metadata={"derived": "the --checkpoint's step (0 without one)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})
    checkpoint: str | None = field(
        default=None, metadata={"derived": "the checkpoint folder --checkpoint resolves to"}
    )  # recorded in metrics.json

    def validate(self) -> None:
        if not self.images:
            raise ConfigError("captions: give at least one image folder, shard or list file (--images)")
        if self.prompt is not None and self.prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ConfigError(f"--prompt must contain {IMAGE_PLACEHOLDER!r} once, got {self.prompt!r}")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        self.decoding.validate()


@dataclass
class CaptionReport:
    images: int = 0
    empty_predictions: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


def stage_prompt(model: MiniGPT4) -> str:
    """The prompt the model was trained with: stage 2 its first instruction in the model's template
    (`###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: ` for Vicuna v0),
    stage 1 the image alone, which the caption follows directly."""
    return model.sample_prompts()[0]


def first_caption(reply: str, end_sym: str) -> str:
    """The caption the model ends with its `end_sym` (stage 1 ends captions with a newline)."""
    return (reply.split(end_sym)[0] if end_sym else reply).strip()


def generate_captions(
    model: MiniGPT4, items: list[ImageItem], cfg: CaptionEvalConfig, rank: int = 0
) -> dict[str, dict[str, Any]]:
    """{item id: {"caption", "error"?}} for `items`, generated in batches of `cfg.batch_size`."""
    end_sym = model.text_spec.end_sym  # the template's when the config leaves it to it
    prompt = cfg.prompt or stage_prompt(model)
    device = next(model.llama_proj.parameters()).device
    loader = DataLoader(
        EvalImages(items, model.cfg.vision.image_size),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=list,
    )
    out: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(items), desc=f"captions r{rank}", unit="img", disable=not cfg.progress) as bar:
        for batch in loader:
            good = [(i, t) for i, t, err in batch if err is None]
            for i, _, err in batch:
                if err is not None:
                    log.warning(f"scored as an empty caption: {err}")
                    out[items[i].id] = {"caption": "", "error": err}
            if good:
                replies = model.generate(torch.stack([t for _, t in good]).to(device), prompt, cfg.decoding)
                for (i, _), reply in zip(good, replies):
                    out[items[i].id] = {"caption": first_caption(reply, end_sym)}
            bar.update(len(batch))
    return out


def run_caption_eval(
    model: MiniGPT4 | Callable[[], MiniGPT4], cfg: CaptionEvalConfig, info: dist.RankInfo | None = None
) -> CaptionReport | None:
    """Caption every image, then score on rank 0 (which returns the report; other ranks return None).

    `model` may be a function that builds it: it is called only after the inputs are checked, and
    only on ranks with images to caption. Bad inputs raise ReferencesError, SourceError or ConfigError
    on every rank before anything is generated.
    """
    cfg.validate()
    info = info or dist.rank_info()
    created = dist.init_group(info)
    try:
        problems: list[str] = []
        items = list_images(cfg.images, problems)
        for p in problems:
            log.warning(p)
        refs = load_references(cfg.references)
        check_matches([it.id for it in items], refs, " ".join(cfg.images))
        by_id = {it.id: it for it in items}
        mine = [by_id[i] for i in dist.share(list(by_id), info)]
        start = time.perf_counter()
        captions: dict[str, dict[str, Any]] = {}
        if mine:
            if not isinstance(model, MiniGPT4):
                model = model()
            captions = generate_captions(model, mine, cfg, info.rank)
        log.info(f"captions: {len(mine)} images on rank {info.rank} in {time.perf_counter() - start:.1f} s")
        parts = dist.gather(captions)
    finally:
        dist.close_group(created)
    if info.rank != 0:
        return None
    merged = {k: v for part in parts for k, v in part.items()}
    return _score_and_write(merged, by_id, refs, cfg, model if isinstance(model, MiniGPT4) else None)


def _score_and_write(
    captions: dict[str, dict[str, Any]],
    items: dict[str, ImageItem],
    refs: References,
    cfg: CaptionEvalConfig,
    model: MiniGPT4 | None,
) -> CaptionReport:
    report = CaptionReport(images=len(captions))
    report.unreadable_images = sorted(k for k, v in captions.items() if "error" in v)
    report.empty_predictions = sorted(k for k, v in captions.items() if not v["caption"] and "error" not in v)
    if report.empty_predictions:
        log.warning(
            f"{len(report.empty_predictions)} empty caption(s), scored as empty: "
            + ", ".join(report.empty_predictions[:10])
        )
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, PREDICTIONS_FILE), "w", encoding="utf-8") as f:
        for key in sorted(captions):
            row = {"image_id": refs.image_ids[key], "file": items[key].describe(), **captions[key]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report.scores = score_captions({k: v["caption"] for k, v in captions.items()}, refs.captions)
    summary = {
        **report.scores,
        "images": report.images,
        "empty_predictions": len(report.empty_predictions),
        "unreadable_images": len(report.unreadable_images),
        "checkpoint": cfg.checkpoint,
        "step": cfg.step,
        "prompt": cfg.prompt or (stage_prompt(model) if model is not None else None),
        "decoding": asdict(cfg.decoding),
        "references": os.path.abspath(cfg.references),
    }
    with open(os.path.join(cfg.out, METRICS_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(format_table(report.scores, report.images), flush=True)
    log.info(f"captions: wrote {os.path.join(cfg.out, PREDICTIONS_FILE)} and {METRICS_FILE}")
    if cfg.tensorboard:
        log_to_tensorboard(cfg.tensorboard, report.scores, cfg.step)
    return report


def log_to_tensorboard(folder: str, scores: dict[str, float], step: int) -> None:
    """`captions/<metric>` scalars at `step` in the TensorBoard folder (a run's `tensorboard/`)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(folder)
    try:
        for name in METRICS:
            writer.add_scalar(TENSORBOARD_PREFIX + name, scores[name], step)
    finally:
        writer.close()
    log.info(f"captions: scores logged to {folder} at step {step}")
