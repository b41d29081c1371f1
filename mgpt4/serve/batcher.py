"""Dynamic batching: one model thread takes up to `max_batch` waiting requests at a time and answers
them in one left-padded `generate` (`MiniGPT4.generate_from_embeds` with a list of prompts).

Requests wait in a bounded queue; a full queue is refused at once (`QueueFull`: the server answers
429 with Retry-After) rather than letting latency grow without end. Each request keeps its own
settings inside the shared batch: its sampling (`RowSampler`: temperature, top_p and a seeded
generator of its own, so a seeded reply is the same alone or batched), its token limit and stop
strings (`RowTracker`, which also streams each row's text as it grows). A batch runs to its longest
request; requests that arrive meanwhile wait for the next one (dynamic, not continuous, batching:
transformers' `generate` takes no rows mid-run).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria

from mgpt4.logs import get_logger
from mgpt4.model.generation import GenerationSettings, RowSampler, RowSampling, eos_token_ids
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.prompts import clean_reply

log = get_logger(__name__)

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not yet a whole UTF-8 character


class QueueFull(Exception):
    """The request queue is full; `retry_after` is a whole number of seconds to wait."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Done:
    """A finished reply: its text, why it ended (`stop`, `length`), tokens generated."""

    text: str
    finish_reason: str
    completion_tokens: int


@dataclass(eq=False)
class Job:
    """One request on its way through the model thread. Results arrive on `events` (an asyncio queue
    read by the request's handler): `str` pieces of the reply (when `stream`), then a `Done`, or an
    exception."""

    prompt: str
    pixels: torch.Tensor  # [3, S, S], the eval transform's output
    prompt_tokens: int
    max_tokens: int
    sampling: RowSampling
    stops: tuple[str, ...] = ()
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False  # the client went away: its row stops at the next token
    # Set by the model thread.
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the reply decoded so far, in whole characters (`RowTracker._grow`)
    sent: str = ""  # what has been streamed
    # ids[:_read] are decoded into `text`; ids[_prefix:_read] stay as the next window's context.
    _prefix: int = 0
    _read: int = 0

    def emit(self, event: object) -> None:
        if self.loop is None or self.events is None:
            return
        # RuntimeError: the event loop has closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def visible(text: str, stops: Sequence[str], echo: str | None) -> str:
    """The part of a reply being written that will not change: before the first stop string, without
    a trailing start of one (`#`, `##` of `###`), a partial character, trailing spaces, or a start that
    may still become the echoed role (`Assistant:`), which is cut off."""
    for stop in stops:
        text = text.split(stop)[0]
    for stop in stops:
        held = next((n for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])), 0)
        text = text[: len(text) - held]
    text = text.split(REPLACEMENT)[0].lstrip()
    if echo:
        if text.startswith(echo):
            text = text[len(echo) :].lstrip()
        elif echo.startswith(text):
            return ""
    return text.rstrip()


class RowTracker(StoppingCriteria):
    """Per-row ends and streaming inside one batched `generate`: a row ends at EOS, at a stop string
    (the template's, e.g. `###`, or the request's), at its own `max_tokens`, or when its client has
    gone. Called by `generate` after every token with the tokens so far ([B, n]: only generated ones,
    as the prompt goes in as embeddings)."""

    def __init__(self, model: MiniGPT4, jobs: Sequence[Job]):
        super().__init__()
        self.tok = model.tokenizer
        spec = model.text_spec
        self.template_stops = tuple(spec.stops)
        self.echo = spec.template.echo
        self.eos = set(eos_token_ids(self.tok, model.llm.generation_config))
        self.jobs = list(jobs)
        self.done: list[Done | None] = [None] * len(self.jobs)

    def _stops(self, job: Job) -> tuple[str, ...]:
        return self.template_stops + job.stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, job in enumerate(self.jobs):
            if self.done[i] is not None:
                continue
            job.ids.append(int(last[i]))
            self._grow(job)
            stops = self._stops(job)
            if job.ids[-1] in self.eos or any(s in job.text for s in stops):
                self._finish(i, "stop")
            elif len(job.ids) >= job.max_tokens:
                self._finish(i, "length")
            elif job.cancelled:
                self.done[i] = Done("", "cancelled", len(job.ids))
            elif job.stream:
                now = visible(job.text, stops, self.echo)
                if len(now) > len(job.sent) and now.startswith(job.sent):
                    job.emit(now[len(job.sent) :])
                    job.sent = now
        return torch.tensor([d is not None for d in self.done], dtype=torch.bool, device=input_ids.device)

    def _grow(self, job: Job) -> None:
        """Extend `job.text` by the new token's text: a window of the tokens not yet decoded, with one
        token of context before it (a word piece's leading space, a byte run), decoded once it ends on a
        whole character (the incremental detokenisation of vLLM and TGI). Each step costs the window,
        not the whole reply, so long replies in large batches stay cheap."""
        done = self.tok.decode(job.ids[job._prefix : job._read], skip_special_tokens=True)
        now = self.tok.decode(job.ids[job._prefix :], skip_special_tokens=True)
        if len(now) > len(done) and not now.endswith(REPLACEMENT):
            job.text += now[len(done) :]
            job._prefix, job._read = job._read, len(job.ids)

    def _finish(self, i: int, reason: str) -> None:
        job = self.jobs[i]
        # The reply as `MiniGPT4.generate` gives it (the official `Chat.answer`'s cleaning), from one
        # decode of all its tokens.
        text = self.tok.decode(job.ids, skip_special_tokens=True)
        final = clean_reply(text, self._stops(job), self.echo)
        if job.stream and final.startswith(job.sent) and len(final) > len(job.sent):
            job.emit(final[len(job.sent) :])
            job.sent = final
        self.done[i] = Done(final, reason, len(job.ids))
        job.emit(self.done[i])

    def finish_rest(self) -> None:
        """Rows `generate` ended without this tracker seeing it (its own max_new_tokens)."""
        for i, done in enumerate(self.done):
            if done is None:
                self._finish(i, "length")


class Batcher:
    """The model thread and its bounded queue. `submit` from any thread; `close` answers what is queued,
    then ends the thread."""

    def __init__(
        self,
        model: MiniGPT4,
        defaults: GenerationSettings,
        max_batch: int = 8,
        queue_size: int = 64,
    ):
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"max_batch and queue_size must be at least 1, got {max_batch}, {queue_size}")
        self.model = model
        self.defaults = defaults
        self.max_batch = max_batch
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._closing = False
        self._last_batch_s = 1.0
        self.batches = 0  # batches run, and the largest: the benchmark and tests read them
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="mgpt4-serve-model", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when the queue is full (or the server is shutting down)."""
        if self._closing:
            raise QueueFull(self.retry_after())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after()) from None

    @property
    def waiting(self) -> int:
        """Requests in the queue, not yet taken by the model thread."""
        return self._queue.qsize()

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the last batch's duration, rounded up."""
        return max(1, math.ceil(self._last_batch_s))

    def close(self) -> None:
        self._closing = True
        self._queue.put(None)
        self._thread.join()

    def _take(self) -> tuple[list[Job], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        jobs, end = [first], False
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                end = True
                break
            jobs.append(job)
        return [j for j in jobs if not j.cancelled], end

    def _run(self) -> None:
        while True:
            jobs, end = self._take()
            if jobs:
                start = time.monotonic()
                try:
                    self.run_batch(jobs)
                except Exception as e:  # handed to each request, which answers 500 with it
                    log.exception("generation failed for a batch of %d", len(jobs))
                    for job in jobs:
                        job.emit(e)
                self._last_batch_s = time.monotonic() - start
            if end:
                return

    @torch.no_grad()
    def run_batch(self, jobs: Sequence[Job]) -> list[Done]:
        """Answer `jobs` in one batch: their images encoded together, one left-padded `generate`."""
        model = self.model
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        vision = next(model.visual_encoder.parameters()).device
        embeds = model.encode_img(torch.stack([j.pixels for j in jobs]).to(vision))
        tracker = RowTracker(model, jobs)
        longest = max(j.max_tokens for j in jobs)
        # The context is checked per request before it is queued; here nothing may be cut from the left.
        settings = self.defaults.replace(
            max_new_tokens=longest,
            max_context=max(j.prompt_tokens for j in jobs) + longest + 1,
            sample=False,
            num_beams=1,
        )
        model.generate_from_embeds(
            [embeds],
            [j.prompt for j in jobs],
            settings,
            stopping_criteria=[tracker],
            logits_processor=[RowSampler([j.sampling for j in jobs])],
        )
        tracker.finish_rest()
        return [d for d in tracker.done if d is not None]
