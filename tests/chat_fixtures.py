"""A tiny "trained model" on disk for the chat and demo tests, and a pseudo-terminal to type into.

The tiny model is random, so it writes nonsense; its output head is cut down to word pieces so
that the nonsense is made of letters and never ends early (no `###`, no EOS, no byte pieces),
which makes "a reply appears" a property of the code under test rather than of the seed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import subprocess
import sys
import termios
import time

import torch
from PIL import Image

from mgpt4.checkpoints import CONFIG_FILE, PROJ_FILE
from mgpt4.model import MiniGPT4, apply_freeze, build_model
from mgpt4.model.export import save_official_files, save_projection
from mgpt4.model.presets import tiny
from mgpt4.strict_config import to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORD_PIECE = re.compile(r"▁?[A-Za-z]+")


def readable_tiny_model(tokenizer, seed: int = 0) -> MiniGPT4:
    """The tiny preset with an output head that can only pick word pieces of the tokenizer."""
    torch.manual_seed(seed)
    model = build_model(tiny(), tokenizer)
    apply_freeze(model)
    vocab = tokenizer.convert_ids_to_tokens(list(range(model.cfg.llm.vocab_size)))
    keep = torch.tensor([bool(WORD_PIECE.fullmatch(p or "")) for p in vocab])
    with torch.no_grad():
        head = model.llm.lm_head.weight
        # A zero row gives logit 0, below the best of ~300 random logits: greedy never picks it.
        head[~keep] = 0
    return model.eval()


def write_checkpoint(model: MiniGPT4, root: str) -> str:
    """The model as a trained run leaves it: official files plus an mgpt4 checkpoint folder naming them."""
    weights = save_official_files(model, os.path.join(root, "official"))
    ckpt = os.path.join(root, "run", "checkpoints", "step_00000010")
    os.makedirs(ckpt)
    proj = {f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()}
    save_projection(proj, os.path.join(ckpt, PROJ_FILE))
    cfg = tiny()
    cfg.weights = weights
    with open(os.path.join(ckpt, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"model": to_dict(cfg)}, f)
    with open(os.path.join(root, "run", "checkpoints", "latest"), "w", encoding="utf-8") as f:
        f.write("step_00000010\n")
    return os.path.join(root, "run")


def write_image(
    path: str, size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 40, 40)
) -> str:
    img = Image.new("RGB", size, color)
    # A second colour, so the image is not flat and its preprocessing is not trivial.
    img.paste((30, 60, 200), (0, 0, size[0] // 2, size[1] // 2))
    img.save(path)
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = "1"
    return env


class Terminal:
    """A program in a pseudo-terminal, read and typed into as a person would (stdlib only)."""

    def __init__(self, argv: list[str]):
        import pty

        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(
            argv,
            stdin=child,
            stdout=child,
            stderr=child,
            cwd=REPO,
            env=subprocess_env(),
            close_fds=True,
            # Its own session with the pty as controlling terminal: Ctrl-C then sends SIGINT, as in a shell.
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(child)
        self.output = ""

    def read_until(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Read until `pattern` (a regex) matches the output not consumed yet; the match ends the consumed part."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.output, re.S)
            if m:
                self.seen, self.output = self.output[: m.end()], self.output[m.end() :]
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(
                    f"{pattern!r} did not appear within {timeout:.0f}s (exit code {self.proc.poll()}); "
                    f"output so far:\n{self.output}"
                )

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], min(timeout, 1.0))
        if ready:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                return False
            if not data:
                return False
            self.output += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return True

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self, timeout: float = 10.0) -> int:
        """Wait for the program to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
