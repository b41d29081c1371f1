"""Step 2, fix: an LLM rewrites every description with the paper's prompt.

Back ends: an OpenAI-compatible chat-completions endpoint (threads, bounded concurrency) or a local
Hugging Face causal LM folder (batched, shared out over ranks like describe). Input is a describe
store; its done items are the work, its failed items stay where they are (filter counts them).

Ctrl-C stops the step within a moment: retry waits end at once, requests still in flight are left
to die with the process (their items stay pending), and the finished records are all in the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from mgpt4 import dist
from mgpt4.curate.chat_api import Cancelled, ChatAPIConfig, ChatClient, FatalAPIError, ItemError
from mgpt4.curate.hf_rewriter import HFRewriter, HFRewriterConfig, folder_stamp
from mgpt4.curate.prompts import FIX_PROMPT, fix_message
from mgpt4.curate.store import (
    DONE,
    FAILED,
    Interrupted,
    PartWriter,
    StoreError,
    open_store,
    pending_ids,
    read_meta,
    read_store,
    record,
    unchanged_failure,
)
from mgpt4.logs import get_logger
from mgpt4.strict_config import ConfigError

STEP = "fix"
log = get_logger(__name__)


@dataclass
class FixConfig:
    """What fix does; each field but the derived ones is a flag of `python -m mgpt4.curate fix`."""

    input: str = field(metadata={"help": "describe's store folder"})  # a describe store
    out: str = field(metadata={"help": "store folder for the fixed descriptions"})  # the fix store
    api: ChatAPIConfig | None = field(
        default=None, metadata={"derived": "the endpoint's flags (ChatAPIConfig), with --base-url"}
    )
    hf: HFRewriterConfig | None = field(
        default=None, metadata={"derived": "the local model's flags (HFRewriterConfig), with --hf-model"}
    )
    instruction: str = field(default=FIX_PROMPT, metadata={"derived": "--prompt-file's text"})
    retry_failed: bool = field(
        default=True,
        metadata={
            "help": "leave items that failed in an earlier run as they are (by default they are tried again)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

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
    unchanged: int = 0  # failed before on inputs and settings that have not changed: not retried
    aborted: str | None = None
    interrupted: bool = False
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def left(self) -> int:
        return self.mine - self.done - self.failed


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


def _fingerprint(kind: str, data: Any) -> str:
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{kind}:{digest[:16]}"


class _FailedOn:
    """Fingerprints of failures that repeat as long as nothing changes (see `store.pending_ids`).

    `text`: the input record has no description. `hf`: the local model's greedy rewrite failed
    (cut at max_new_tokens, prompt too long, empty): the same prompt, settings and model folder give
    the same reply. Failures of the HTTP back end have none: servers change, so they are retried.
    """

    def __init__(self, cfg: FixConfig, items: dict[str, dict[str, Any]]):
        self.cfg = cfg
        self.items = items
        self._hf: list | None = None

    def text(self, item_id: str) -> str:
        return _fingerprint("text", self.items[item_id].get("text"))

    def hf(self, item_id: str) -> str:
        assert self.cfg.hf is not None
        if self._hf is None:
            h = self.cfg.hf
            self._hf = [
                self.cfg.instruction,
                h.max_new_tokens,
                h.max_input_tokens,
                folder_stamp(h.model_path),
            ]
        return _fingerprint("hf", [self.items[item_id].get("text"), self._hf])

    def __call__(self, item_id: str, rec: dict[str, Any]) -> str | None:
        kind = str(rec.get("failed_on", "")).split(":")[0]
        if item_id not in self.items or kind not in ("text", "hf"):
            return None
        if kind == "hf":
            return self.hf(item_id) if self.cfg.hf is not None else None
        return self.text(item_id)


def run_fix(
    cfg: FixConfig,
    info: dist.RankInfo | None = None,
    client: ChatClient | None = None,
    rewriter: HFRewriter | None = None,
) -> FixReport:
    """Rewrite every pending description; every item ends done or failed in the fix store.

    `client` / `rewriter` may be given ready-made (tests inject sleeps; a caller may share a model).
    An endpoint that refuses all requests, or cannot be reached, stops the step with FatalAPIError
    after recording what had finished; Ctrl-C raises `Interrupted`. Either way the rest stays
    pending for the next run.
    """
    cfg.validate()
    info = info or dist.rank_info()
    report = FixReport()
    created = dist.init_group(info)
    try:
        items = _input_items(cfg)
        open_store(cfg.out, STEP, cfg.settings(), cfg.input, info.rank)
        state = read_store(cfg.out)
        ids = sorted(items)
        report.total = len(ids)
        done = state.done()
        report.already_done = sum(1 for i in ids if i in done)
        failed_on = _FailedOn(cfg, items)
        if cfg.retry_failed:
            report.unchanged = sum(
                unchanged_failure(i, r, failed_on) for i, r in state.failed().items() if i in items
            )
        todo = pending_ids(ids, state, cfg.retry_failed, failed_on)
        dist.barrier()
        mine = dist.share(todo, info)
        report.mine = len(mine)
        if mine:
            _fix_items(cfg, mine, items, info, report, client, rewriter, failed_on)
        # Ranks meet only when they all finished: an interrupted or stopped rank speaks for itself.
        reports = [report] if report.interrupted or report.aborted else dist.gather(report)
    finally:
        dist.close_group(created)
    _log_reports(cfg, info, reports)
    if report.interrupted:
        raise Interrupted(
            f"fix interrupted: {report.left} item(s) left pending; run the same command again to resume"
        )
    if report.aborted:
        raise FatalAPIError(
            f"fix stopped: {report.aborted}; {report.left} item(s) left pending for the next run"
        )
    return report


def _log_reports(cfg: FixConfig, info: dist.RankInfo, reports: list[FixReport]) -> None:
    """Each rank's counts and failure reasons (whole, with URLs folded), then one total."""
    for r, rep in enumerate(reports):
        rank = info.rank if len(reports) == 1 else r
        log.info(
            f"fix rank {rank}/{info.world_size}: {rep.done} done, {rep.failed} failed, {rep.left} left "
            f"of {rep.mine} pending here; {rep.already_done} of {rep.total} were done before; store {cfg.out}"
        )
        for reason, n in sorted(rep.errors.items(), key=lambda kv: -kv[1]):
            log.info(f"  failed {n:6d}  {reason}")
    if len(reports) > 1:
        log.info(
            f"fix: {sum(r.done for r in reports)} done, {sum(r.failed for r in reports)} failed of "
            f"{sum(r.mine for r in reports)} pending on {len(reports)} ranks; store {cfg.out}"
        )
    unchanged = reports[0].unchanged
    if unchanged:
        log.info(
            f"fix: {unchanged} item(s) failed before on the same input, settings and model, so they would "
            "fail again and were not retried (change --max-new-tokens, the model or the description to retry)"
        )


class _Recorder:
    """Writes records as they come, and keeps the counts, the progress bar and the failure reasons."""

    def __init__(
        self, writer: PartWriter, total: int, info: dist.RankInfo, report: FixReport, progress: bool
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
                # The whole reason, with URLs folded so that items failing alike count together.
                reason = re.sub(r"https?://\S+?(?=:?(?:\s|$))", "<url>", r["error"])
                self.report.errors[reason] = self.report.errors.get(reason, 0) + 1
        self.bar.update(len(recs))
        self.bar.set_postfix(done=self.report.done, failed=self.report.failed)


def _fix_items(
    cfg: FixConfig,
    mine: list[str],
    items: dict[str, dict[str, Any]],
    info: dist.RankInfo,
    report: FixReport,
    client: ChatClient | None,
    rewriter: HFRewriter | None,
    failed_on: _FailedOn,
) -> None:
    with PartWriter(cfg.out, info.rank) as writer:
        emit = _Recorder(writer, len(mine), info, report, cfg.progress)
        try:
            bad = {
                i for i in mine if not isinstance(items[i].get("text"), str) or not items[i]["text"].strip()
            }
            if bad:
                emit(
                    [
                        _failed(
                            i, items[i], "input record has no description text", failed_on=failed_on.text(i)
                        )
                        for i in sorted(bad)
                    ]
                )
                mine = [i for i in mine if i not in bad]
            if not mine:
                return
            if cfg.api is not None:
                client = client or ChatClient(cfg.api, api_key=_api_key(cfg.api))
                if client.notice is None:
                    # A long retry wait is a log line without the bar, and the bar's note with it.
                    client.notice = emit.bar.set_postfix_str if cfg.progress else log.info
                _fix_api(cfg, client, mine, items, emit)
            else:
                if rewriter is None:
                    assert cfg.hf is not None
                    cfg.hf.device = dist.rank_device(cfg.hf.device, info)
                    rewriter = HFRewriter(cfg.hf)
                _fix_hf(cfg, rewriter, mine, items, emit, failed_on)
        except FatalAPIError as e:
            report.aborted = str(e)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            emit.bar.close()


def _api_key(api: ChatAPIConfig) -> str | None:
    key = os.environ.get(api.api_key_env) or None
    if key is None:
        log.warning(f"${api.api_key_env} is not set; requests go without an Authorization header")
    return key


def _fix_api(
    cfg: FixConfig,
    client: ChatClient,
    ids: list[str],
    items: dict[str, dict[str, Any]],
    emit: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Fix `ids` on `cfg.api.concurrency` worker threads; this thread writes every record.

    The workers are daemon threads: on Ctrl-C this thread stops them (`client.stop` ends every
    retry wait at once), writes what had finished and returns, without waiting for requests still
    in flight: those items stay pending and the process can exit at once.
    """
    assert cfg.api is not None
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for i in ids:
        todo.put(i)
    results: queue.Queue[tuple[str, Any]] = queue.Queue()
    meta = {"backend": "api", "model": cfg.api.model}

    def fix_one(item_id: str) -> dict[str, Any] | None:
        src = items[item_id]
        try:
            text, attempts = client.complete(fix_message(cfg.instruction, src["text"]))
        except ItemError as e:
            return _failed(item_id, src, str(e), **meta)
        except Cancelled:
            return None
        return _done(item_id, src, text, attempts=attempts, **meta)

    def worker() -> None:
        try:
            while not client.stop.is_set():
                try:
                    item_id = todo.get_nowait()
                except queue.Empty:
                    break
                rec = fix_one(item_id)
                if rec is not None:
                    results.put(("record", rec))
        except FatalAPIError as e:
            client.stop.set()
            results.put(("fatal", e))
        except BaseException as e:  # a bug: hand it to the writing thread
            client.stop.set()
            results.put(("error", e))
        finally:
            results.put(("exit", None))

    workers = [
        threading.Thread(target=worker, name=f"fix-{k}", daemon=True)
        for k in range(min(cfg.api.concurrency, len(ids)))
    ]
    for t in workers:
        t.start()
    running, problems = len(workers), []
    try:
        while running:
            try:
                kind, value = results.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "record":
                emit([value])
            elif kind == "exit":
                running -= 1
            else:
                problems.append(value)
    except KeyboardInterrupt:
        client.stop.set()
        # Records that reached the queue were paid for: keep them.
        while True:
            try:
                kind, value = results.get_nowait()
            except queue.Empty:
                break
            if kind == "record":
                emit([value])
        raise
    for p in problems:
        raise p


def _fix_hf(
    cfg: FixConfig,
    rewriter: HFRewriter,
    ids: list[str],
    items: dict[str, dict[str, Any]],
    emit: Callable[[list[dict[str, Any]]], None],
    failed_on: _FailedOn,
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
                else _failed(item_id, src, err or "empty reply", failed_on=failed_on.hf(item_id), **meta)
            )
        emit(recs)
