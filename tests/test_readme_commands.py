"""Every command of the README's ```bash blocks runs as written, at tiny size, in README order.

Skipped: the blocks of the "Benchmarks" section (tests/test_bench_commands.py runs them) and those a line
`<!-- not run: REASON -->` precedes (real weights, GPUs, a cluster, the network, an interactive terminal
or a server). Every other block runs in one fresh folder (copies of launchers/, ds_configs/ and docs/),
one test per block, so later blocks reuse what the quickstart left, as a reader following the README
would. A command that fails fails its block's test. The runs share one cache (the tiny assets are made
once) and an empty extensions folder, which stays empty: training builds no DeepSpeed op.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.launch import REPO, launcher_env, on_free_port

pytestmark = pytest.mark.slow

NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")
SKIPPED_SECTIONS = ("## Benchmarks",)


def readme_bash_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(section, line number, commands) of each ```bash block that is to run: continuation lines
    joined, comments and blank lines dropped. A block under a skipped section, or whose nearest
    non-blank line above is a `not run` marker with a reason, is left out."""
    lines = text.splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line
        if line.strip() == "```bash":
            end = lines.index("```", i + 1)
            above = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
            if not NOT_RUN.match(above) and not section.startswith(SKIPPED_SECTIONS):
                body = "\n".join(lines[i + 1 : end]).replace("\\\n", " ")
                commands = [" ".join(c.split()) for c in body.splitlines()]
                blocks.append((section, i + 1, [c for c in commands if c and not c.startswith("#")]))
            i = end
        i += 1
    return blocks


def _blocks() -> list[tuple[str, int, list[str]]]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return readme_bash_blocks(f.read())


BLOCKS = _blocks()


def test_the_parser_finds_the_runnable_blocks_and_honours_the_markers():
    text = (
        "## A\n<!-- not run: needs a GPU -->\n```bash\ngpu-only\n```\n"
        "```bash\necho one \\\n  two\n# a comment\n\necho three\n```\n"
        "## Benchmarks\n```bash\nbench\n```\n## C\n<!-- not run: -->\n```bash\nempty-reason\n```\n"
    )
    assert readme_bash_blocks(text) == [
        ("## A", 6, ["echo one two", "echo three"]),
        ("## C", 19, ["empty-reason"]),
    ]
    # Every marker in the README gives a reason, and the quickstart runs first.
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        markers = [line for line in f.read().splitlines() if line.startswith("<!-- not run")]
    assert markers and all(NOT_RUN.match(m) for m in markers), markers
    assert BLOCKS[0][2] == ["deepspeed launchers/pretrain.py --deepspeed ds_configs/z2.json"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The reader's folder: what the README's commands read from the repository, and nothing else."""
    root = tmp_path_factory.mktemp("readme")
    for folder in ("launchers", "ds_configs", "docs"):
        shutil.copytree(os.path.join(REPO, folder), root / folder)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = launcher_env(str(tmp_path_factory.mktemp("mgpt4-cache")))
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch-extensions"))
    return env


@pytest.mark.parametrize(
    "block", BLOCKS, ids=[f"line{line}-{section[3:].split()[0].lower()}" for section, line, _ in BLOCKS]
)
def test_readme_block_runs_as_written(block, workdir, env):
    section, line, commands = block
    for command in commands:
        # A deepspeed command gets a free rendezvous port (never a fixed one); nothing else changes.
        shell = on_free_port(command) if command.startswith("deepspeed ") else command
        proc = subprocess.run(
            shell, shell=True, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=900, executable="/bin/bash",
        )  # fmt: skip
        assert proc.returncode == 0, f"README.md line {line} ({section}): {command}\n{proc.stdout[-4000:]}"
        assert "Traceback" not in proc.stdout, f"README.md line {line}: {command}\n{proc.stdout[-4000:]}"
    # Training builds no DeepSpeed op (deepspeed_shm_comm took minutes of g++ on a first run).
    assert os.listdir(env["TORCH_EXTENSIONS_DIR"]) == []
