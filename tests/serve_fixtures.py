"""A `python -m mgpt4.serve` subprocess on the tiny trained model, talked to with the official client."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import threading
import time

from PIL import Image

from tests.chat_fixtures import REPO, subprocess_env


class ServerProcess:
    """The server started as a person would (`--port 0`), its port read from its first line."""

    def __init__(self, *args: str, timeout: float = 120.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mgpt4.serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=subprocess_env(),
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            m = re.match(r"Serving (\S+) at (http://\S+/v1)", line)
            if m:
                self.name, self.base_url = m.group(1), m.group(2)
                return
        self.proc.kill()
        raise AssertionError(f"the server did not start: {line!r}\n{''.join(self.stderr)}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def data_url(path_or_bytes: str | bytes, mime: str = "image/png") -> str:
    if isinstance(path_or_bytes, bytes):
        data = path_or_bytes
    else:
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def image_message(url: str, question: str) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
    }
