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


def on_free_port(command: str) -> str:
    """A README `deepspeed ...` command with a free port added: the launcher's default, 29500, may be
    taken by any other job on the machine, and no test may depend on a fixed port being free."""
    assert command.startswith("deepspeed "), command
    return f"deepspeed --master_port {free_port()} " + command[len("deepspeed ") :]


def readme_block(marker: str) -> list[str]:
    """The commands of the README's bash block after `<!-- marker -->`, continuation lines joined and
    `&&` chains split."""
    import re

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert block, f"README.md has no {marker} block"
    joined = block.group(1).replace("\\\n", " ")
    parts = [p.strip() for line in joined.splitlines() for p in line.split("&&")]
    return [" ".join(p.split()) for p in parts if p and not p.startswith("#")]


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
