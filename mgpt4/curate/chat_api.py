"""A minimal OpenAI-compatible chat-completions client on the standard library (urllib).

One call = one paragraph to fix. 429 and 5xx (and dropped connections) are retried with exponential
backoff, honouring Retry-After; a reply that is not a usable completion is this item's failure; a
401/403/404 means every item would fail the same way, so it stops the step instead. The API key is
only ever put in the Authorization header: it is kept out of reprs and scrubbed from messages.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mgpt4.strict_config import ConfigError

RETRY_STATUSES = frozenset({408, 409, 425, 429})
FATAL_STATUSES = frozenset({401, 403, 404})
_SNIPPET = 200


class ItemError(RuntimeError):
    """This item's request did not give a usable rewrite; the message is its recorded reason."""


class FatalAPIError(RuntimeError):
    """The endpoint refuses every request (key, URL or model); the step stops, items stay pending."""


@dataclass
class ChatAPIConfig:
    base_url: str  # up to and including /v1, e.g. https://api.openai.com/v1 or http://localhost:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; its value is never stored or printed
    concurrency: int = 8
    max_attempts: int = 6
    timeout_s: float = 120.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # A Retry-After above this is cut to it, so one server hint cannot stall the run for hours.
    max_retry_after_s: float = 600.0
    max_tokens: int = 1024
    temperature: float = 0.0

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ConfigError("--model: give the model name the endpoint serves")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ConfigError("concurrency and max_attempts must be at least 1")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_completion(body: bytes) -> str:
    """The assistant text of a chat-completions reply, or ItemError saying what is wrong with it."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ItemError(f"malformed reply: not JSON ({e}): {_snippet(body)}") from e
    if not isinstance(data, dict):
        raise ItemError(f"malformed reply: expected a JSON object: {_snippet(body)}")
    if "error" in data and "choices" not in data:
        raise ItemError(f"API error in reply: {_snippet(json.dumps(data['error']).encode())}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ItemError(f"malformed reply: no choices: {_snippet(body)}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # newer servers may send content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ItemError(f"malformed reply: choices[0].message.content is not text: {_snippet(body)}")
    if choices[0].get("finish_reason") == "length":
        raise ItemError("reply cut at max_tokens (finish_reason=length); raise --max-tokens")
    if not content.strip():
        raise ItemError("empty reply")
    return content.strip()


def _snippet(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    return text[:_SNIPPET] + ("..." if len(text) > _SNIPPET else "")


@dataclass
class ChatClient:
    cfg: ChatAPIConfig
    api_key: str | None = field(default=None, repr=False)
    sleep: Callable[[float], None] = time.sleep
    jitter: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        self.url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"

    def _scrub(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _post(self, body: bytes) -> tuple[int, Any, bytes]:
        req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            try:
                data = e.read()
            except (OSError, http.client.HTTPException):
                data = b""
            return e.code, e.headers, data

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.cfg.max_retry_after_s)
        base = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        # Jitter keeps concurrent workers that failed together from retrying together.
        return base * (0.5 + 0.5 * self.jitter())

    def complete(self, content: str) -> tuple[str, int]:
        """(reply text, attempts used) for one user message; ItemError or FatalAPIError otherwise."""
        body = json.dumps(
            {
                "model": self.cfg.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens,
            }
        ).encode("utf-8")
        last = ""
        for attempt in range(1, self.cfg.max_attempts + 1):
            retry_after = None
            try:
                status, headers, data = self._post(body)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                last = f"connection error: {getattr(e, 'reason', e)}"
            else:
                if 200 <= status < 300:
                    try:
                        return parse_completion(data), attempt
                    except ItemError as e:
                        raise ItemError(self._scrub(str(e))) from None
                detail = self._scrub(f"HTTP {status} from {self.url}: {_snippet(data)}")
                if status in FATAL_STATUSES:
                    hint = (
                        f"check the key in ${self.cfg.api_key_env}"
                        if status in (401, 403)
                        else "check --base-url and --model"
                    )
                    raise FatalAPIError(f"{detail} ({hint})")
                if status not in RETRY_STATUSES and status < 500:
                    raise ItemError(detail)
                last = detail
                retry_after = retry_after_seconds(headers.get("Retry-After") if headers else None)
            if attempt < self.cfg.max_attempts:
                self.sleep(self.backoff(attempt, retry_after))
        raise ItemError(f"gave up after {self.cfg.max_attempts} attempts; last: {last}")
