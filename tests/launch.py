"""Run the real launchers in subprocesses: CPU DeepSpeed (gloo), a free port, a per-session cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(cache: str, cpu: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.update(
        {
            "MGPT4_CACHE": cache,
            # The JIT-built comm op is reused across runs and sessions (30-80 s to build once).
            "TORCH_EXTENSIONS_DIR": os.environ.get(
                "TORCH_EXTENSIONS_DIR",
                os.path.join(os.path.expanduser("~"), ".cache", "mgpt4", "torch_extensions"),
            ),
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def deepspeed_cmd(script: str, ranks: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
        "--master_port", str(free_port()), script, *args,
    ]  # fmt: skip


def run(
    cmd: list[str] | str, cache: str, cwd: str = REPO, timeout: int = 600, cpu: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=launcher_env(cache, cpu),
        shell=isinstance(cmd, str),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return proc


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
