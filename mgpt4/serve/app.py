"""The FastAPI app: `POST /v1/chat/completions` (whole or streamed as server-sent events in OpenAI's chunk
format), `GET /v1/models` and `GET /health`.

A request is checked before it waits for the model: body size, JSON, fields (`protocol.py`), the model
name, the image (`images.py`), the prompt against the context and the limits; each problem is a 4xx
with OpenAI's error body naming the field. Then it joins the batcher's queue (429 with Retry-After when
full) and its handler waits for its reply. A streamed reply whose client goes away stops at its next
token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mgpt4.images import eval_transform
from mgpt4.model.generation import GenerationSettings, RowSampling
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.serve import protocol
from mgpt4.serve.batcher import Batcher, Done, Job, QueueFull
from mgpt4.serve.conversation import build_prompt
from mgpt4.serve.images import ImagePolicy
from mgpt4.serve.protocol import ApiError, ChatRequest


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. `max_body_bytes` bounds the JSON body (a base64 image included)."""

    max_body_bytes: int = 32 * 2**20
    max_tokens: int = 1024  # the largest max_tokens a request may give
    max_prompt_tokens: int | None = None  # None: only the context bounds it
    context: int = 2000  # prompt + reply, in tokens


@dataclass
class Service:
    """Everything a request needs: the model, its name, the batcher and the rules."""

    model: MiniGPT4
    name: str
    batcher: Batcher
    defaults: GenerationSettings
    policy: ImagePolicy = field(default_factory=ImagePolicy)
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    created: int = 0


def create_app(service: Service) -> FastAPI:
    """The app over `service`; its batcher is closed when the app shuts down (after the requests in
    flight are answered: uvicorn's graceful shutdown waits for them first)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(service.batcher.close)

    app = FastAPI(title="mgpt4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), service.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY`",
                type="authentication_error",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health() -> dict:
        """Liveness, with the batcher's counts: requests waiting, batches run and the largest."""
        b = service.batcher
        return {
            "status": "ok",
            "model": service.name,
            "waiting": b.waiting,
            "batches": b.batches,
            "largest_batch": b.largest_batch,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return protocol.model_list(service.name, service.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = protocol.parse_request(await _json_body(request, service.limits.max_body_bytes))
        if req.model != service.name:
            raise ApiError(
                404,
                f"model: `{req.model}` is not served here; this server serves `{service.name}` (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        job = await run_in_threadpool(_prepare, service, req)
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            service.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(
                429,
                f"the server is busy (its queue is full); retry in {e.retry_after} s",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        cid = protocol.completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(service, job, cid, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            done = await _wait(job)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        return protocol.completion(
            cid, service.name, done.text, done.finish_reason, job.prompt_tokens, done.completion_tokens
        )

    return app


async def _json_body(request: Request, limit: int) -> object:
    """The body as JSON, read up to `limit` bytes; 413 above it, 400 when it is not JSON."""
    too_large = ApiError(413, f"the request body is over {limit / 2**20:.1f} MB", code="body_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


def _prepare(service: Service, req: ChatRequest) -> Job:
    """The request checked and made ready for the model (in a worker thread: images decode here)."""
    limits, defaults = service.limits, service.defaults
    max_tokens = req.token_limit if req.token_limit is not None else defaults.max_new_tokens
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"{key}: at most {limits.max_tokens}, got {max_tokens}", param=key)
    prompt = build_prompt(service.model, req.messages, service.policy)
    if limits.max_prompt_tokens is not None and prompt.tokens > limits.max_prompt_tokens:
        raise ApiError(
            400,
            f"messages: the prompt is {prompt.tokens} tokens (the image's included); this server takes "
            f"prompts up to {limits.max_prompt_tokens}",
            param="messages",
            code="context_length_exceeded",
        )
    if prompt.tokens + max_tokens > limits.context:
        raise ApiError(
            400,
            f"messages: the model's context is {limits.context} tokens, but {prompt.tokens + max_tokens} "
            f"were asked for ({prompt.tokens} in the messages, {max_tokens} for the reply); shorten the "
            f"conversation or lower {key}",
            param="messages",
            code="context_length_exceeded",
        )
    size = service.model.cfg.vision.image_size
    return Job(
        prompt=prompt.text,
        pixels=eval_transform(prompt.image, size),
        prompt_tokens=prompt.tokens,
        max_tokens=max_tokens,
        sampling=_sampling(req, defaults),
        stops=tuple(req.stops),
        stream=req.stream,
    )


def _sampling(req: ChatRequest, defaults: GenerationSettings) -> RowSampling:
    """The request's temperature and top_p over the server's defaults (greedy when the defaults are
    greedy and the request gives no temperature, or at temperature 0); a seed gives its own stream."""
    temperature = req.temperature
    if temperature is None:
        temperature = defaults.temperature if defaults.sample else 0.0
    top_p = req.top_p if req.top_p is not None else defaults.top_p
    gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
    return RowSampling(temperature=float(temperature), top_p=float(top_p), generator=gen)


async def _wait(job: Job) -> Done:
    while True:
        event = await job.events.get()
        if isinstance(event, Done):
            return event
        if isinstance(event, BaseException):
            raise ApiError(500, f"generation failed: {type(event).__name__}: {event}", type="server_error")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(service: Service, job: Job, cid: str, include_usage: bool) -> AsyncIterator[str]:
    """The reply as OpenAI's chunks: the role first, then text pieces, the finish reason, [DONE]."""
    created, name = int(time.time()), service.name
    usage = {"usage": None} if include_usage else {}
    try:
        yield _sse({**protocol.chunk(cid, name, created, {"role": "assistant", "content": ""}), **usage})
        while True:
            event = await job.events.get()
            if isinstance(event, str):
                yield _sse({**protocol.chunk(cid, name, created, {"content": event}), **usage})
            elif isinstance(event, Done):
                yield _sse({**protocol.chunk(cid, name, created, {}, event.finish_reason), **usage})
                if include_usage:
                    u = protocol.usage(job.prompt_tokens, event.completion_tokens)
                    yield _sse(protocol.chunk(cid, name, created, None, usage_=u))
                break
            else:
                err = ApiError(
                    500, f"generation failed: {type(event).__name__}: {event}", type="server_error"
                )
                yield _sse(err.body())
                break
        yield _sse("[DONE]")
    finally:
        # Reached early when the client went away (the generator is closed): its row stops.
        job.cancelled = True
