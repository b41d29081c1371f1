"""Step 2, fix: an LLM rewrites every description with the paper's prompt.

Back ends: an OpenAI-compatible chat-completions endpoint (threads, bounded concurrency) or a local
Hugging Face causal LM folder (batched, shared out over ranks like describe). Input is a describe
store; its done items are the work, its failed items stay where they are (filter counts them).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from mgpt4.curate import ranks
from mgpt4.curate.chat_api import ChatAPIConfig, ChatClient, FatalAPIError, ItemError
from mgpt4.curate.hf_rewriter import HFRewriter, HFRewriterConfig
from mgpt4.curate.prompts import FIX_PROMPT, fix_message
from mgpt4.curate.store import (
    DONE,
    FAILED,
    PartWriter,
    StoreError,
    open_store,
    pending_ids,
    read_meta,
    read_store,
    record,
)
from mgpt4.strict_config import ConfigError

STEP = "fix"


@dataclass
class FixConfig:
    input: str  # a describe store
    out: str  # the fix store
    api: ChatAPIConfig | None = None
    hf: HFRewriterConfig | None = None
    instruction: str = FIX_PROMPT
    retry_failed: bool = True
    progress: bool = True

    def validate(self) -> None:
        if (self.api is None) == (self.hf is None):
            raise ConfigError(
                "fix: choose one back end: --base-url/--model (an API) or --hf-model (a local folder)"
            )
        if self.api is not None:
            self.api.validate()
        if self.hf is not None:
            self.hf.validate()
        if os.path.abspath(self.input) == os.path.abspath(self.out):
            raise ConfigError("fix: --out must be another folder than --input")

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"instruction": self.instruction}
        if self.api is not None:
            a = self.api
            s.update(backend="api", base_url=a.base_url, model=a.model, temperature=a.temperature)
            s.update(max_tokens=a.max_tokens, api_key_env=a.api_key_env)
        if self.hf is not None:
            s.update(
                backend="hf", model=os.path.abspath(self.hf.model_path), max_new_tokens=self.hf.max_new_tokens
            )
        return s


@dataclass
class FixReport:
    total: int = 0  # done items of the input store
    already_done: int = 0
    mine: int = 0
    done: int = 0
    failed: int = 0
    aborted: str | None = None
    errors: dict[str, int] = field(default_factory=dict)


def _input_items(cfg: FixConfig) -> dict[str, dict[str, Any]]:
    if read_meta(cfg.input) is None:
        raise StoreError(
            f"--input {cfg.input}: not an mgpt4 curate store (no meta.json); give describe's --out"
        )
    return read_store(cfg.input).done()


def _done(item_id: str, src: dict[str, Any], fixed: str, **extra: Any) -> dict[str, Any]:
    return record(item_id, DONE, source=src.get("source"), description=src["text"], text=fixed, **extra)


def _failed(item_id: str, src: dict[str, Any], error: str, **extra: Any) -> dict[str, Any]:
    return record(
        item_id, FAILED, source=src.get("source"), description=src.get("text"), error=error, **extra
    )


def run_fix(
    cfg: FixConfig,
    info: ranks.RankInfo | None = None,
    client: ChatClient | None = None,
    rewriter: HFRewriter | None = None,
) -> FixReport:
    """Rewrite every pending description; every item ends done or failed in the fix store.

    `client` / `rewriter` may be given ready-made (tests inject sleeps; a caller may share a model).
    An endpoint that refuses all requests stops the step with FatalAPIError after recording what
    had finished; the rest stays pending for the next run.
    """
    cfg.validate()
    info = info or ranks.rank_info()
    report = FixReport()
    created = ranks.init_group(info)
    try:
        items = _input_items(cfg)
        open_store(cfg.out, STEP, cfg.settings(), cfg.input, info.rank)
        state = read_store(cfg.out)
        ids = sorted(items)
        report.total = len(ids)
        done = state.done()
        report.already_done = sum(1 for i in ids if i in done)
        todo = pending_ids(ids, state, cfg.retry_failed)
        ranks.barrier()
        mine = ranks.share(todo, info)
        report.mine = len(mine)
        if mine:
            _fix_items(cfg, mine, items, info, report, client, rewriter)
    finally:
        ranks.close_group(created)
    left = report.mine - report.done - report.failed
    print(
        f"fix rank {info.rank}/{info.world_size}: {report.done} done, {report.failed} failed, {left} left "
        f"of {report.mine} pending here; {report.already_done} of {report.total} were done before; store {cfg.out}",
        file=sys.stderr,
    )
    for reason, n in sorted(report.errors.items(), key=lambda kv: -kv[1]):
        print(f"  failed {n:6d}  {reason}", file=sys.stderr)
    if report.aborted:
        raise FatalAPIError(f"fix stopped: {report.aborted}; {left} item(s) left pending for the next run")
    return report


class _Recorder:
    """Writes records as they come, and keeps the counts, the progress bar and the failure reasons."""

    def __init__(
        self, writer: PartWriter, total: int, info: ranks.RankInfo, report: FixReport, progress: bool
    ):
        self.writer = writer
        self.report = report
        self.bar = tqdm(total=total, desc=f"fix r{info.rank}", unit="item", disable=not progress)

    def __call__(self, recs: list[dict[str, Any]]) -> None:
        self.writer.write(recs)
        for r in recs:
            if r["status"] == DONE:
                self.report.done += 1
            else:
                self.report.failed += 1
                reason = re.sub(r"https?://\S+?(?=:?(?:\s|$))", "<url>", r["error"]).split(":")[0][:60]
                self.report.errors[reason] = self.report.errors.get(reason, 0) + 1
        self.bar.update(len(recs))
        self.bar.set_postfix(done=self.report.done, failed=self.report.failed)


def _fix_items(
    cfg: FixConfig,
    mine: list[str],
    items: dict[str, dict[str, Any]],
    info: ranks.RankInfo,
    report: FixReport,
    client: ChatClient | None,
    rewriter: HFRewriter | None,
) -> None:
    with PartWriter(cfg.out, info.rank) as writer:
        emit = _Recorder(writer, len(mine), info, report, cfg.progress)
        try:
            bad = {
                i for i in mine if not isinstance(items[i].get("text"), str) or not items[i]["text"].strip()
            }
            if bad:
                emit([_failed(i, items[i], "input record has no description text") for i in sorted(bad)])
                mine = [i for i in mine if i not in bad]
            if not mine:
                return
            if cfg.api is not None:
                client = client or ChatClient(cfg.api, api_key=_api_key(cfg.api))
                _fix_api(cfg, client, mine, items, emit)
            else:
                if rewriter is None:
                    assert cfg.hf is not None
                    cfg.hf.device = ranks.rank_device(cfg.hf.device, info)
                    rewriter = HFRewriter(cfg.hf)
                _fix_hf(cfg, rewriter, mine, items, emit)
        except FatalAPIError as e:
            report.aborted = str(e)
        finally:
            emit.bar.close()


def _api_key(api: ChatAPIConfig) -> str | None:
    key = os.environ.get(api.api_key_env) or None
    if key is None:
        print(
            f"note: ${api.api_key_env} is not set; requests go without an Authorization header",
            file=sys.stderr,
        )
    return key


def _fix_api(
    cfg: FixConfig,
    client: ChatClient,
    ids: list[str],
    items: dict[str, dict[str, Any]],
    emit: Callable[[list[dict[str, Any]]], None],
) -> None:
    assert cfg.api is not None
    stop = threading.Event()
    fatal: list[FatalAPIError] = []
    meta = {"backend": "api", "model": cfg.api.model}

    def work(item_id: str) -> dict[str, Any] | None:
        if stop.is_set():
            return None
        src = items[item_id]
        try:
            text, attempts = client.complete(fix_message(cfg.instruction, src["text"]))
        except ItemError as e:
            return _failed(item_id, src, str(e), **meta)
        except FatalAPIError as e:
            stop.set()
            fatal.append(e)
            return None
        return _done(item_id, src, text, attempts=attempts, **meta)

    with ThreadPoolExecutor(max_workers=cfg.api.concurrency, thread_name_prefix="fix") as pool:
        futures = [pool.submit(work, i) for i in ids]
        try:
            for fut in as_completed(futures):
                rec = fut.result()
                if rec is not None:
                    emit([rec])
        except BaseException:
            # Ctrl-C: queued items stay pending; the ones in flight finish and are dropped.
            stop.set()
            for f in futures:
                f.cancel()
            raise
    if fatal:
        raise fatal[0]


def _fix_hf(
    cfg: FixConfig,
    rewriter: HFRewriter,
    ids: list[str],
    items: dict[str, dict[str, Any]],
    emit: Callable[[list[dict[str, Any]]], None],
) -> None:
    assert cfg.hf is not None
    meta = {"backend": "hf", "model": os.path.basename(os.path.abspath(cfg.hf.model_path))}
    bs = cfg.hf.batch_size
    for start in range(0, len(ids), bs):
        chunk = ids[start : start + bs]
        messages = [fix_message(cfg.instruction, items[i]["text"]) for i in chunk]
        results = rewriter.rewrite(messages)
        recs = []
        for item_id, (text, err) in zip(chunk, results):
            src = items[item_id]
            recs.append(
                _done(item_id, src, text, **meta)
                if text
                else _failed(item_id, src, err or "empty reply", **meta)
            )
        emit(recs)
