"""Helpers for the curate tests: a tiny stage-1 checkpoint on disk, drawn images, a chat-completions server."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from PIL import Image, ImageDraw

from mgpt4.checkpoints import CONFIG_FILE, PROJ_FILE
from mgpt4.curate.prompts import FIX_PROMPT
from mgpt4.curate.store import DONE, PartWriter, open_store, record
from mgpt4.model import apply_freeze, build_model
from mgpt4.model.export import save_official_files, save_projection
from mgpt4.strict_config import to_dict


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread: on a small shared machine, spinning OpenMP threads make tiny models 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


def make_stage1_checkpoint(root: str, cfg, tokenizer, seed: int = 0) -> str:
    """A random tiny model written as official files + an mgpt4 checkpoint folder; returns the folder.

    The LLM's matrices are drawn larger than the init: with the init's small weights a 2-layer LLM
    answers the same whatever the prompt, and the tests need answers that depend on the prompt.
    """
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer)
    apply_freeze(model)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    weights = save_official_files(model, os.path.join(root, "official"))
    ckpt = os.path.join(root, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    save_projection(
        {k: v for k, v in model.state_dict().items() if k.startswith("llama_proj.")},
        os.path.join(ckpt, PROJ_FILE),
    )
    with open(os.path.join(ckpt, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"model": to_dict(dataclasses.replace(cfg, weights=weights))}, f)
    return ckpt


def draw_images(folder: str, n: int, size: int = 48, png_every: int = 0) -> list[str]:
    """n small pictures of shapes; every png_every-th one is a PNG (the rest JPEG). Returns their ids."""
    os.makedirs(folder, exist_ok=True)
    ids = []
    for i in range(n):
        img = Image.new("RGB", (size + 8 * (i % 3), size), COLORS[i % len(COLORS)])
        d = ImageDraw.Draw(img)
        c = COLORS[(i + 3) % len(COLORS)]
        if i % 2:
            d.ellipse([4, 4, size // 2 + i % 7, size // 2 + 4], fill=c)
        else:
            d.rectangle([size // 4, 6, size - 6, size // 2 + i % 9], fill=c)
        ext = "png" if png_every and i % png_every == png_every - 1 else "jpg"
        name = f"img_{i:02d}"
        img.save(os.path.join(folder, f"{name}.{ext}"))
        ids.append(name)
    return ids


def make_describe_store(root: str, texts: dict[str, str], image_dir: str | None = None) -> None:
    """A describe store written directly, for fix and filter tests that need known descriptions."""
    open_store(root, "describe", {"made_by": "test"}, None, 0)
    with PartWriter(root, 0) as w:
        w.write(
            record(
                i,
                DONE,
                source={"path": os.path.join(image_dir or root, f"{i}.jpg")},
                text=t,
                answers=[t],
                tokens=len(t.split()),
            )
            for i, t in texts.items()
        )


def paragraph_of(request: dict[str, Any]) -> str:
    """The paragraph a fix request carries (the user message after the instruction)."""
    content = request["messages"][-1]["content"]
    assert content.startswith(FIX_PROMPT + "\n\n"), content[:80]
    return content[len(FIX_PROMPT) + 2 :]


Reply = tuple[int, dict[str, str], bytes]


def completion(text: str, finish: str = "stop") -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            ],
        }
    ).encode()


class ChatServer:
    """A chat-completions server on 127.0.0.1 (ephemeral port) whose replies a test function decides.

    `respond(request_json, n)` gets the parsed body and how many requests with the same paragraph
    came before (0 for the first), and returns (status, headers, body), or None to drop the connection.
    """

    def __init__(self, respond: Callable[[dict[str, Any], int], Reply | None]):
        self.respond = respond
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "json"}
        self.seen: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = json.loads(body)
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "json": req})
                    key = paragraph_of(req) if self.path == "/v1/chat/completions" else self.path
                    n = server.seen.get(key, 0)
                    server.seen[key] = n + 1
                reply = (
                    server.respond(req, n)
                    if self.path == "/v1/chat/completions"
                    else (404, {}, b"no such path")
                )
                if reply is None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, headers, data = reply
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that went away (a test that stopped it) is no news.
                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self, paragraph: str) -> int:
        with self.lock:
            return self.seen.get(paragraph, 0)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def files_containing(root: str, needle: str) -> list[str]:
    """Every file under root whose bytes contain `needle`."""
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                if needle.encode() in f.read():
                    hits.append(path)
    return hits
