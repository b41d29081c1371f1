"""House rules that hold the layout together: one set of decoding settings behind every tool's flags,
console logging with a rank filter, the two-phase collective timeout, the layer contracts."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import pytest

from mgpt4.logs import RankFilter
from mgpt4.model.generation import GREEDY, GenerationSettings
from tests.launch import REPO, launcher_env


def _parsers():
    from mgpt4.chat.terminal import build_parser as terminal
    from mgpt4.chat.web import build_parser as web
    from mgpt4.curate.__main__ import build_parser as curate
    from mgpt4.eval.__main__ import build_parser as evaluation

    describe = curate()._subparsers._group_actions[0].choices["describe"]
    captions = evaluation()._subparsers._group_actions[0].choices["captions"]
    return {
        "chat": (terminal(), GenerationSettings()),
        "demo": (web(), GenerationSettings()),
        "describe": (describe, GREEDY),
        # Caption length: the checkpoint's max_txt_len, known once the model is.
        "captions": (captions, GREEDY.replace(max_new_tokens=None)),
    }


@pytest.mark.parametrize("tool", ["chat", "demo", "describe", "captions"])
def test_decoding_flags_are_derived_from_the_one_settings_dataclass(tool):
    parser, defaults = _parsers()[tool]
    base = (
        ["--image", "x.png"]
        if tool == "chat"
        else (["--images", "d", "--out", "o"] if tool in ("describe", "captions") else [])
    )
    base += ["--references", "r.json"] if tool == "captions" else []
    args = parser.parse_args(base)
    for f in dataclasses.fields(GenerationSettings):
        assert getattr(args, f.name) == getattr(defaults, f.name), (tool, f.name)
    changed = parser.parse_args(
        [*base, "--max-new-tokens", "7", "--num-beams", "2", "--temperature", "0.5", "--top-p", "0.8",
         "--repetition-penalty", "1.2", "--max-context", "512", "--greedy"]
    )  # fmt: skip
    assert {f.name: getattr(changed, f.name) for f in dataclasses.fields(GenerationSettings)} == {
        "max_new_tokens": 7, "num_beams": 2, "sample": False, "temperature": 0.5, "top_p": 0.8,
        "repetition_penalty": 1.2, "max_context": 512,
    }  # fmt: skip
    assert parser.parse_args([*base, "--do-sample"]).sample is True


def _record(level: int) -> logging.LogRecord:
    return logging.LogRecord("mgpt4.test", level, __file__, 1, "hello", None, None)


def test_rank_filter_shows_rank_0_and_every_rank_on_request(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MGPT4_LOG_RANKS", raising=False)
    f = RankFilter()
    info, warning = _record(logging.INFO), _record(logging.WARNING)
    assert not f.filter(info)  # rank 1's progress lines would repeat rank 0's
    assert f.filter(warning) and warning.rank_tag == "[rank 1] "  # its own news, tagged
    monkeypatch.setenv("MGPT4_LOG_RANKS", "all")
    assert RankFilter().filter(_record(logging.INFO))
    monkeypatch.setenv("MGPT4_LOG_RANKS", "0,3")
    assert not RankFilter().filter(_record(logging.INFO))
    monkeypatch.setenv("RANK", "0")
    assert RankFilter().filter(_record(logging.INFO))


def test_collectives_get_a_long_start_up_timeout_then_a_short_one():
    script = (
        "import os, torch, torch.distributed as dist\n"
        "from mgpt4.train import engine\n"
        "engine.init_distributed(45)\n"
        "b = lambda g: g._get_backend(torch.device('cpu')).options._timeout.total_seconds()\n"
        "groups = list(dist.distributed_c10d._world.pg_map)\n"
        "print('start', [b(g) for g in groups])\n"
        "engine.set_step_timeout(0.5)\n"
        "print('steps', [b(g) for g in groups])\n"
        "engine.shutdown()\n"
    )
    env = launcher_env(str(REPO))
    env.pop("MASTER_PORT", None)
    # A world of one waits on no peer: the run needs no time limit, and what it did is checked below.
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(
        line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("start", "steps"))
    )
    assert eval(lines["start"]) and set(eval(lines["start"])) == {45 * 60.0}
    assert set(eval(lines["steps"])) == {30.0}
    assert len(eval(lines["steps"])) == len(eval(lines["start"]))  # every group shortened, none added


def test_layer_contracts_hold():
    """model, data and config never import train, chat or curate; only the engine imports deepspeed;
    no import circles (import-linter, configured in pyproject.toml)."""
    out = subprocess.run(["lint-imports"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: " in out.stdout and " broken" in out.stdout and "0 broken" in out.stdout
