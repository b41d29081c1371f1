"""A minimal OpenAI-compatible chat-completions client on the standard library (urllib).

One call = one paragraph to fix. 429 and 5xx, dropped connections and a 200 whose JSON body is cut
short are retried with exponential backoff, honouring Retry-After; a reply that is not a usable
completion is this item's failure. A 401/403/404 means every item would fail the same way, so it
stops the step instead; so does an endpoint that has not given a single HTTP answer in this run
(nothing listens on the port, the host name does not resolve, every try times out): with no answer
at all there is no sign that the next item would fare better. The API key is only ever put in the
Authorization header: it is kept out of reprs and scrubbed from messages.

`ChatClient.stop` is an event: setting it (Ctrl-C, a fatal error) wakes every retry wait at once,
and the waiting item raises `Cancelled`, so it stays pending instead of failing.
"""

from __future__ import annotations

import email.utils
import errno
import http.client
import json
import random
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mgpt4.strict_config import ConfigError

RETRY_STATUSES = frozenset({408, 409, 425, 429})
FATAL_STATUSES = frozenset({401, 403, 404})
_SNIPPET = 200
# Connection errors that mean nothing answers at that address: before any HTTP answer they stop
# the step at once (a dropped connection or a timeout is retried first).
_UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL}
)


class ItemError(RuntimeError):
    """This item's request did not give a usable rewrite; the message is its recorded reason."""


class TransientReplyError(ItemError):
    """A 2xx whose JSON body was cut short in transit: retried like a 5xx."""


class FatalAPIError(RuntimeError):
    """The endpoint refuses every request (key, URL or model) or cannot be reached; the step stops and
    the items not finished stay pending."""


class Cancelled(Exception):
    """The run is stopping (Ctrl-C, or a fatal error seen by another worker): this item stays pending."""


@dataclass
class ChatAPIConfig:
    """An OpenAI-compatible endpoint; each field is a flag of `python -m mgpt4.curate fix`."""

    # Up to and including /v1, e.g. https://api.openai.com/v1 or http://localhost:8000/v1.
    base_url: str = field(metadata={"help": "e.g. https://api.openai.com/v1 or http://localhost:8000/v1"})
    model: str = field(metadata={"help": "model name served by the endpoint"})
    # The variable's name; its value is never stored or printed.
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "environment variable holding the key"}
    )
    concurrency: int = field(default=8, metadata={"help": "requests in flight"})
    max_attempts: int = field(
        default=6, metadata={"help": "tries per item on 429/5xx, dropped connections, cut replies"}
    )
    timeout_s: float = field(default=120.0, metadata={"flag": "--timeout", "help": "seconds per request"})
    backoff_base_s: float = field(
        default=1.0, metadata={"flag": "--backoff", "help": "first retry delay in seconds (doubles)"}
    )
    backoff_max_s: float = field(
        default=60.0, metadata={"flag": "--backoff-max", "help": "longest retry delay in seconds"}
    )
    # A Retry-After above this is cut to it, so one server hint cannot stall the run for hours.
    max_retry_after_s: float = field(
        default=600.0,
        metadata={
            "flag": "--max-retry-after",
            "help": "longest wait a server's Retry-After may ask, in seconds",
        },
    )
    max_tokens: int = field(default=1024, metadata={"help": "longest reply; a reply cut there fails"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature of the endpoint"})

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if not urllib.parse.urlsplit(self.base_url).hostname:
            raise ConfigError(f"--base-url {self.base_url!r} names no host")
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
    """The assistant text of a chat-completions reply, or ItemError saying what is wrong with it.

    A body that is JSON cut short (the parser runs out of input) raises TransientReplyError.
    """
    try:
        data = json.loads(body)
    except ValueError as e:
        if _cut_short(body, e):
            raise TransientReplyError(
                f"malformed reply: JSON cut short after {len(body)} bytes: {_snippet(body)}"
            ) from e
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


def _cut_short(body: bytes, error: ValueError) -> bool:
    """True when the JSON parser ran out of input (a body cut in transit), not when it met bad syntax."""
    if not isinstance(error, json.JSONDecodeError):
        return False  # not even UTF-8
    text = body.decode("utf-8", errors="replace").rstrip()
    if text[:1] not in ("", "{", "["):
        return False  # an HTML error page, say: not a reply at all
    # A string still open at the end, or an error at the very end: the input ran out.
    return error.msg.startswith("Unterminated string") or error.pos >= len(text)


def _unreachable(reason: object) -> bool:
    """A connection error meaning nothing answers at that address (refused, unknown host, TLS refused)."""
    if isinstance(reason, (ConnectionRefusedError, socket.gaierror, ssl.SSLError)):
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


def _snippet(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    return text[:_SNIPPET] + ("..." if len(text) > _SNIPPET else "")


# A retry wait this long or longer is said (ChatClient.notice); shorter ones pass unremarked.
NOTICE_WAIT_S = 5.0


@dataclass
class ChatClient:
    """One client serves every worker thread of a run.

    `sleep` replaces the retry wait (tests record the delays); by default a retry waits on `stop`,
    so that setting it ends every wait at once. `notice` gets one line when a retry is about to wait
    `NOTICE_WAIT_S` or longer (a Retry-After of 35 s is otherwise silence), at most one line per
    `NOTICE_WAIT_S` for all worker threads together.
    """

    cfg: ChatAPIConfig
    api_key: str | None = field(default=None, repr=False)
    sleep: Callable[[float], None] | None = None
    jitter: Callable[[], float] = random.random
    notice: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"
        self.stop = threading.Event()
        self._noticed_at = -float("inf")
        self._notice_lock = threading.Lock()
        # Set by the first HTTP answer of any status: from then on the endpoint is known to exist.
        self.answered = False

    def _scrub(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text

    def _wait(self, seconds: float) -> None:
        if self.stop.is_set():
            raise Cancelled
        if self.sleep is not None:
            self.sleep(seconds)
        elif self.stop.wait(seconds):
            raise Cancelled

    def _post(self, body: bytes) -> tuple[int, Any, bytes]:
        req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                self.answered = True
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            self.answered = True
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
        """(reply text, attempts used) for one user message.

        Raises ItemError (this item failed; the message is the reason), FatalAPIError (stop the
        step) or Cancelled (`stop` was set while this item waited to retry).
        """
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
                reason = getattr(e, "reason", e)
                last = f"connection error: {reason}"
                if not self.answered and _unreachable(reason):
                    raise FatalAPIError(
                        f"no HTTP answer from {self.url}: {reason} (is the server running? check --base-url)"
                    ) from None
            else:
                if 200 <= status < 300:
                    try:
                        return parse_completion(data), attempt
                    except TransientReplyError as e:
                        last = self._scrub(str(e))
                    except ItemError as e:
                        raise ItemError(self._scrub(str(e))) from None
                else:
                    last, retry_after = self._retryable(status, headers, data)
            if attempt < self.cfg.max_attempts:
                seconds = self.backoff(attempt, retry_after)
                self._say_wait(seconds, retry_after is not None, attempt, last)
                self._wait(seconds)
        if not self.answered:
            raise FatalAPIError(
                f"no HTTP answer from {self.url} in {self.cfg.max_attempts} attempts; last: {last} "
                "(check --base-url and --timeout)"
            )
        raise ItemError(f"gave up after {self.cfg.max_attempts} attempts; last: {last}")

    def _say_wait(self, seconds: float, server_asked: bool, attempt: int, last: str) -> None:
        if self.notice is None or seconds < NOTICE_WAIT_S:
            return
        with self._notice_lock:
            now = time.monotonic()
            if now - self._noticed_at < NOTICE_WAIT_S:
                return
            self._noticed_at = now
        why = "as the server's Retry-After asks" if server_asked else "backing off"
        self.notice(
            f"waiting {seconds:.0f} s ({why}) before attempt {attempt + 1} of {self.cfg.max_attempts}: {last}"
        )

    def _retryable(self, status: int, headers: Any, data: bytes) -> tuple[str, float | None]:
        """(reason, Retry-After seconds) for a status worth retrying; raises for the others."""
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
        return detail, retry_after_seconds(headers.get("Retry-After") if headers else None)
