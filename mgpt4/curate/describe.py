"""Step 1, describe: a stage-1 (or stage-2) model writes a detailed description of every image.

Batched over images, shared out over ranks, resumable through the item store. A first answer under
`continue_below_tokens` tokens gets the paper's "Continue" turn, and the two answers are joined.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mgpt4 import dist
from mgpt4.curate.prompts import CONTINUE_PROMPT, CONTINUE_QUESTION, DESCRIBE_PROMPT, DESCRIBE_QUESTION
from mgpt4.curate.store import (
    DONE,
    FAILED,
    PartWriter,
    open_store,
    pending_ids,
    read_store,
    record,
    unchanged_failure,
)
from mgpt4.image_sources import EvalImages, ImageItem, list_images
from mgpt4.logs import get_logger
from mgpt4.model.generation import GREEDY, GenerationError, GenerationSettings
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.prompts import IMAGE_PLACEHOLDER, VICUNA_V0
from mgpt4.strict_config import ConfigError

STEP = "describe"
log = get_logger(__name__)


@dataclass
class DescribeConfig:
    """What describe does; each field is a flag of `python -m mgpt4.curate describe` (metadata: its help)."""

    images: list[str] = field(
        metadata={"help": "image folders, .tar shards ({a..b} and globs) or list files"}
    )
    out: str = field(metadata={"help": "store folder for the descriptions"})
    # None: the paper's question in the model's conversation template (exactly the paper's prompts for
    # a Vicuna v0 model). A prompt given here is used as it is, with `continue_prompt` after the answer.
    prompt: str | None = field(
        default=None,
        metadata={
            "help": "describe prompt with one <ImageHere> (default: the paper's question in the model's "
            "template)"
        },
    )
    continue_prompt: str | None = field(
        default=None,
        metadata={
            "help": "the 'Continue' turn: with --prompt the text put after the first answer, else the "
            "question asked in the model's template (default: the paper's 'Continue')"
        },
    )
    # 0 turns the "Continue" turn off.
    continue_below_tokens: int = field(
        default=80,
        metadata={
            "flag": "--continue-below",
            "help": "answers under this many tokens get the 'Continue' turn (0: never)",
        },
    )
    batch_size: int = field(default=8, metadata={"help": "images per generate call"})
    num_workers: int = field(default=2, metadata={"help": "image decoding workers"})
    # Greedy by default, so that a re-run describes an image the same way.
    decoding: GenerationSettings = GREEDY
    # Describe a seeded random subset of this many images (the paper took 5,000 random CC images).
    sample: int | None = field(
        default=None,
        metadata={"dest": "sample_count", "help": "describe a seeded random subset of this many images"},
    )
    seed: int = field(default=0, metadata={"help": "seed of --sample (and of sampled decoding)"})
    retry_failed: bool = field(
        default=True,
        metadata={
            "help": "leave items that failed in an earlier run as they are (by default they are tried again)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "no progress bar"})
    # Stop after this many batches in a row fail to generate: that is a broken setup, not bad images.
    max_failed_batches: int = field(
        default=3,
        metadata={"help": "stop after this many batches in a row fail to generate (a broken setup)"},
    )

    def validate(self) -> None:
        if not self.images:
            raise ConfigError("describe: give at least one image folder, shard or list file")
        if self.prompt is not None and self.prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise ConfigError(f"describe prompt must contain {IMAGE_PLACEHOLDER!r} once, got {self.prompt!r}")
        if self.batch_size < 1:
            raise ConfigError("describe: batch_size must be at least 1")
        try:
            self.decoding.validate()
        except GenerationError as e:
            raise ConfigError(f"describe decoding: {e}") from None
        if self.sample is not None and self.sample < 1:
            raise ConfigError("describe: sample must be at least 1")

    def settings(self) -> dict[str, Any]:
        """What decides a description (kept in meta.json to notice a changed re-run)."""
        keep = ("prompt", "continue_prompt", "continue_below_tokens", "decoding", "sample", "seed")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class DescribeReport:
    total: int = 0  # items in the input (or the sample)
    already_done: int = 0  # done before this run started (all ranks)
    mine: int = 0  # this rank's share of the pending items
    done: int = 0  # done by this rank in this run
    failed: int = 0
    continued: int = 0
    unchanged: int = 0  # images that failed to decode before and have not changed since: not retried
    problems: list[str] = field(default_factory=list)


def _collate(batch: list) -> list:
    return batch


def file_stamp(path: str) -> str:
    """An image file's size and modification time, or "missing": what a decode failure failed on."""
    try:
        st = os.stat(path)
    except OSError:
        return "file:missing"
    return f"file:{st.st_size}:{st.st_mtime_ns}"


def _unreadable(item: ImageItem, error: str) -> dict[str, Any]:
    """The record of an image that could not be read; it is retried only once its file changes."""
    return record(item.id, FAILED, source=item.to_dict(), error=error, failed_on=file_stamp(item.path))


def generate_rows(
    model: MiniGPT4,
    images: torch.Tensor,
    prompts: list[str],
    settings: GenerationSettings = GREEDY,
    **fields,
) -> list[str]:
    """Like `MiniGPT4.generate`, but every row has its own prompt (the "Continue" turn repeats each
    row's first answer, so its prompts differ row by row)."""
    if len(prompts) != images.shape[0]:
        raise ConfigError(f"{images.shape[0]} images but {len(prompts)} prompts")
    with torch.no_grad():
        return model.generate_from_embeds([model.encode_img(images)], prompts, settings, **fields)


def describe_prompts(model: MiniGPT4, cfg: DescribeConfig) -> tuple[str, Callable[[str], str]]:
    """(the first prompt, answer -> the "Continue" prompt that follows that answer).

    The paper's question and "Continue" turn are asked in the model's own conversation template:
    the paper's exact prompts for Vicuna v0, `<s>[INST] ... [/INST] ` turns for Llama-2-Chat, the
    tokenizer's chat template for another decoder. A prompt given in `cfg` is used as it is.
    """
    if cfg.prompt is not None or model.new_conversation().template == VICUNA_V0:
        first = cfg.prompt if cfg.prompt is not None else DESCRIBE_PROMPT
        after = cfg.continue_prompt if cfg.continue_prompt is not None else CONTINUE_PROMPT
        return first, lambda answer: first + answer + after

    def rendered(answer: str | None) -> str:
        conv = model.new_conversation()
        conv.add_image()
        conv.ask(DESCRIBE_QUESTION)
        if answer is not None:
            conv.add_reply(answer)
            conv.ask(cfg.continue_prompt if cfg.continue_prompt is not None else CONTINUE_QUESTION)
        return conv.prompt_for_reply()

    return rendered(None), rendered


def describe_images(model: MiniGPT4, images: torch.Tensor, cfg: DescribeConfig) -> list[dict[str, Any]]:
    """Descriptions of a batch of normalised images: [{"text", "answers", "tokens"}] per row."""
    prompt, continued = describe_prompts(model, cfg)
    first = model.generate(images, prompt, cfg.decoding)
    tok = model.tokenizer
    counts = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in first]
    results = [{"text": a, "answers": [a], "tokens": n} for a, n in zip(first, counts)]
    short = [i for i, n in enumerate(counts) if n < cfg.continue_below_tokens]
    if short:
        prompts = [continued(first[i]) for i in short]
        more = generate_rows(model, images[short], prompts, cfg.decoding)
        for i, extra in zip(short, more):
            results[i]["answers"].append(extra)
            results[i]["text"] = " ".join(a.strip() for a in results[i]["answers"] if a.strip())
    return results


def _select(items: list[ImageItem], cfg: DescribeConfig) -> list[ImageItem]:
    if cfg.sample is None or cfg.sample >= len(items):
        return items
    picked = sorted(random.Random(cfg.seed).sample(range(len(items)), cfg.sample))
    return [items[i] for i in picked]


def run_describe(
    model: MiniGPT4 | Callable[[], MiniGPT4], cfg: DescribeConfig, info: dist.RankInfo | None = None
) -> DescribeReport:
    """Describe every pending image of this rank's share; every item ends done or failed in the store.

    `model` may be a function that builds it: it is then called only once the inputs are listed and
    only if this rank has work, so a bad path fails in seconds and a finished run loads nothing.
    """
    cfg.validate()
    info = info or dist.rank_info()
    report = DescribeReport()
    created = dist.init_group(info)
    try:
        items = _select(list_images(cfg.images, report.problems), cfg)
        for p in report.problems:
            log.warning(p)
        by_id = {it.id: it for it in items}
        open_store(cfg.out, STEP, cfg.settings(), None, info.rank)
        state = read_store(cfg.out)
        report.total = len(items)
        done = state.done()
        report.already_done = sum(1 for i in by_id if i in done)
        # Decided before any model loads: an unreadable image whose file has not changed would fail again.
        failed_on = _failed_on_now(by_id)
        if cfg.retry_failed:
            report.unchanged = sum(
                unchanged_failure(i, r, failed_on) for i, r in state.failed().items() if i in by_id
            )
        todo = pending_ids(list(by_id), state, cfg.retry_failed, failed_on)
        # Every rank has read the store before any rank writes: they all split the same list.
        dist.barrier()
        mine = [by_id[i] for i in dist.share(todo, info)]
        report.mine = len(mine)
        if mine:
            if not isinstance(model, MiniGPT4):
                model = model()
            _describe_items(model, mine, cfg, info, report)
        reports = dist.gather(report)
    finally:
        dist.close_group(created)
    # Rank 0 speaks for all: each rank's share, then one total.
    for r, rep in enumerate(reports):
        log.info(
            f"describe rank {r}/{info.world_size}: {rep.done} done, {rep.failed} failed "
            f"({rep.continued} continued) of {rep.mine} pending here; {rep.already_done} of "
            f"{rep.total} were done before this run; store {cfg.out}"
        )
    if len(reports) > 1:
        log.info(
            f"describe: {sum(r.done for r in reports)} done, {sum(r.failed for r in reports)} failed of "
            f"{sum(r.mine for r in reports)} pending on {len(reports)} ranks; store {cfg.out}"
        )
    if report.unchanged:
        log.info(
            f"describe: {report.unchanged} image(s) could not be read before and have not changed since; "
            "they are not tried again (replace or fix the file to retry)"
        )
    return report


def _failed_on_now(by_id: dict[str, ImageItem]):
    def now(item_id: str, rec: dict[str, Any]) -> str | None:
        item = by_id.get(item_id)
        return file_stamp(item.path) if item is not None and rec["failed_on"].startswith("file:") else None

    return now


def _describe_batch(
    model: MiniGPT4, items: list[ImageItem], batch: list, cfg: DescribeConfig, device: torch.device
) -> list[dict[str, Any]]:
    """Records for one loader batch; raises only when generation itself fails."""
    recs = [_unreadable(items[i], err) for i, _, err in batch if err]
    good = [(i, t) for i, t, err in batch if err is None]
    if not good:
        return recs
    t0 = time.perf_counter()
    results = describe_images(model, torch.stack([t for _, t in good]).to(device), cfg)
    secs = round((time.perf_counter() - t0) / len(good), 3)
    for (i, _), res in zip(good, results):
        src = items[i].to_dict()
        if res["text"].strip():
            recs.append(record(items[i].id, DONE, source=src, seconds=secs, **res))
        else:
            recs.append(record(items[i].id, FAILED, source=src, error="empty answer", answers=res["answers"]))
    return recs


def _describe_items(
    model: MiniGPT4, items: list[ImageItem], cfg: DescribeConfig, info: dist.RankInfo, report: DescribeReport
) -> None:
    if cfg.decoding.do_sample:
        torch.manual_seed(cfg.seed + info.rank)
    device = next(model.llama_proj.parameters()).device
    loader = DataLoader(
        EvalImages(items, model.cfg.vision.image_size),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
    )
    bar = tqdm(total=len(items), desc=f"describe r{info.rank}", unit="img", disable=not cfg.progress)
    failed_batches = 0
    with PartWriter(cfg.out, info.rank) as writer:
        for batch in loader:
            try:
                recs = _describe_batch(model, items, batch, cfg, device)
                failed_batches = 0
            except Exception as e:  # this batch's items fail; several batches in a row stop the step
                failed_batches += 1
                msg = f"generation failed: {type(e).__name__}: {e}"
                recs = [
                    _unreadable(items[i], err)
                    if err
                    else record(items[i].id, FAILED, source=items[i].to_dict(), error=msg)
                    for i, _, err in batch
                ]
                if failed_batches >= cfg.max_failed_batches:
                    writer.write(recs)
                    raise RuntimeError(
                        f"describe: {failed_batches} batches in a row failed to generate; last error: {msg}"
                    ) from e
            writer.write(recs)
            for rec in recs:
                if rec["status"] == DONE:
                    report.done += 1
                    report.continued += len(rec["answers"]) > 1
                else:
                    report.failed += 1
            bar.update(len(batch))
            bar.set_postfix(done=report.done, failed=report.failed)
    bar.close()
