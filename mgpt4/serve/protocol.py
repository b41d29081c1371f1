"""The OpenAI chat-completions wire format the server speaks: requests checked field by field, replies
and stream chunks as OpenAI's API reference gives them (`chat.completion`, `chat.completion.chunk`,
the `{"error": {...}}` body), so the official `openai` client and tools built on it work unchanged.

Fields the server cannot honour are refused by name, never ignored: `n` other than 1, penalties other
than 0, `logprobs`, tools. Unknown fields are refused too (a misspelt `max_token` would otherwise
silently get the default).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ApiError(Exception):
    """A request the server answers with an HTTP error: status, OpenAI error `type`, the field (`param`)
    it concerns and a `code` (`model_not_found`, `context_length_exceeded`, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(_Strict):
    url: str
    # OpenAI's resolution hint; MiniGPT-4 sees every image at its own size, so each value means the same.
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None  # a participant's name: informational, as in OpenAI's API


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """POST /v1/chat/completions. Sampling fields left out take the server's defaults (its decoding flags)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # an end-user id for the operator's logs: informational, as in OpenAI's API

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is served (one choice per request; send several requests instead)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not served (0 only); the server's --repetition-penalty applies")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 stop strings, none empty")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        """`max_completion_tokens` (OpenAI's current name) or `max_tokens` (its older one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(data: Any) -> ChatRequest:
    """A decoded JSON body -> ChatRequest; ApiError 400 naming the first bad field and what it expects."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "not a field this server knows (a setting is honoured or refused, never ignored)"
        raise ApiError(400, f"{where}: {msg}", param=where or None) from None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    """A whole reply (`chat.completion`)."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict | None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
) -> dict:
    """One piece of a streamed reply (`chat.completion.chunk`); `delta` None: the usage chunk, no choices."""
    out: dict = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    out["choices"] = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    )
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_list(name: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "mgpt4"}],
    }
