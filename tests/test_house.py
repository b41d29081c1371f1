"""House rules that hold the layout together: one set of decoding settings behind every tool's flags,
console logging with a rank filter, the two-phase collective timeout on every process group, the layer
contracts."""

from __future__ import annotations

import dataclasses
import logging
import subprocess

import pytest

from mgpt4.logs import RankFilter
from mgpt4.model.generation import GREEDY, GenerationSettings
from tests.launch import REPO, deepspeed_cmd, run


def _parsers():
    from mgpt4.chat.terminal import build_parser as terminal
    from mgpt4.chat.web import build_parser as web
    from mgpt4.curate.__main__ import build_parser as curate
    from mgpt4.eval.__main__ import build_parser as evaluation
    from mgpt4.serve.__main__ import build_parser as serve

    describe = curate()._subparsers._group_actions[0].choices["describe"]
    captions = evaluation()._subparsers._group_actions[0].choices["captions"]
    return {
        "chat": (terminal(), GenerationSettings()),
        "demo": (web(), GenerationSettings()),
        "describe": (describe, GREEDY),
        # Caption length: the checkpoint's max_txt_len, known once the model is.
        "captions": (captions, GREEDY.replace(max_new_tokens=None)),
        "serve": (serve(), GenerationSettings()),
    }


@pytest.mark.parametrize("tool", ["chat", "demo", "describe", "captions", "serve"])
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


# Run by the deepspeed launcher on 2 ranks: the start-up and step timeouts of every process group, the
# world group's and those DeepSpeed makes in `deepspeed.initialize` (named by DeepSpeed's engine).
_TIMEOUTS = """
import sys

import torch
import torch.distributed as tdist

from mgpt4 import dist
from mgpt4.train import engine

seconds = lambda g: g._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def out(line):  # a file per rank: the ranks' lines would interleave on the shared stdout
    with open(f"{sys.argv[-2]}/rank{tdist.get_rank()}.txt", "a") as f:
        f.write(line + "\\n")


show = lambda phase, groups: out(f"{phase} {tdist.get_pg_count()} {[seconds(g) for g in groups]}")

engine.init_distributed(45)
show("joined", dist.groups())
model = torch.nn.Linear(4, 4)
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": int(sys.argv[-1])}}
eng, _, _, _ = engine.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
made = [eng.data_parallel_group, eng.seq_data_parallel_group, eng.optimizer.dp_process_group]
out(f"owned {[g is not tdist.group.WORLD and any(g is k for k in dist.groups()) for g in made]}")
show("start", dist.groups())
show("start-deepspeed", made)
eng.backward(eng(torch.randn(2, 4)).sum())
eng.step()
dist.set_timeout(0.5)
show("steps", dist.groups())
show("steps-deepspeed", made)
dist.shutdown()
"""


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("stage", [2, 3])
def test_collectives_get_a_long_start_up_timeout_then_a_short_one(tmp_path, stage):
    """A hung collective fails after the start-up timeout while weights load, and after the step
    timeout from the first step on, on every group: also on the group DeepSpeed clones from the world
    group for ZeRO's collectives, which torch would otherwise give its default (30 min on gloo)."""
    script = tmp_path / "timeouts.py"
    script.write_text(_TIMEOUTS)
    proc = run(deepspeed_cmd(str(script), 2, str(tmp_path), str(stage)), str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    seen: dict[str, list[str]] = {}
    for rank in (0, 1):
        for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines():
            key, value = line.split(" ", 1)
            seen.setdefault(key, []).append(value)
    assert all(len(v) == 2 for v in seen.values()) and len(seen) == 6, seen
    # Each line: the number of process groups this process has (torch's count), then timeouts in seconds.
    assert set(seen["joined"]) == {"1 [2700.0]"}
    assert set(seen["owned"]) == {"[True, True, True]"}  # DeepSpeed's own groups, under mgpt4.dist
    assert set(seen["start"]) == {"2 [2700.0, 2700.0]"}  # every group of the process, the start-up timeout
    assert set(seen["start-deepspeed"]) == {"2 [2700.0, 2700.0, 2700.0]"}
    assert set(seen["steps"]) == {"2 [30.0, 30.0]"}
    assert set(seen["steps-deepspeed"]) == {"2 [30.0, 30.0, 30.0]"}
    assert "made outside mgpt4.dist" not in proc.stdout


def test_layer_contracts_hold():
    """model, data and config never import train, chat or curate; only the engine imports deepspeed;
    no import circles (import-linter, configured in pyproject.toml)."""
    out = subprocess.run(["lint-imports"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: " in out.stdout and " broken" in out.stdout and "0 broken" in out.stdout
