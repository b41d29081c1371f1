"""Every command of the README's Benchmarks section runs, as written, at reduced size.

The section's ```bash blocks are read from README.md; each command gets the flags that shorten it (fewer
steps, smaller corpora; the GPU script its CPU mode) appended, so a command the README changes is
tested as changed. A command of a kind this file does not know fails the test.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from mgpt4.bench import data as bench_data
from mgpt4.bench import train as bench
from mgpt4.dist import DistInfo
from tests.launch import REPO, run


def benchmark_commands() -> list[str]:
    """The commands of the bash blocks between `## Benchmarks` and the next `## ` heading, continuation
    lines joined, comments dropped."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^## Benchmarks\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no Benchmarks section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def reduced(command: str, tmp: str) -> str:
    """`command` at test size: the benchmark's own flags for fewer steps, appended (argparse takes the
    last value), or the GPU script's CPU mode."""
    if "python -m mgpt4.bench.train" in command:
        return f"{command} --steps 2 --warmup 1 --rounds 1"
    if "python -m mgpt4.bench.data" in command:
        small = "--n224 64 --nlarge 32 --batches 1 --batches-large 1 --repeats 1"
        return f"{command} {small} --workdir {tmp}/bench-data"
    if command.startswith("bash tests/gpu/bench.sh"):
        return f"OUT={tmp}/gpu-bench {command} --cpu"
    if "python -m mgpt4.bench.serve" in command:
        return f"{command} --requests 4 --concurrency 1 4 --max-tokens 4 --device cpu"
    raise AssertionError(f"README Benchmarks: no reduced form for {command!r}")


@pytest.mark.parametrize("preset", [None, *bench.PRESETS])
@pytest.mark.parametrize("recipe", bench.stage1_recipes())
def test_every_recipe_and_preset_the_bench_offers_resolves(recipe, preset, tmp_path_factory, monkeypatch):
    """Whole recipes (real weights named, which the bench does not read) and random weights, with each
    preset: the config resolves, validation is off (the bench times steps only) and the modes are the
    ones the model has (a feature cache needs a Q-Former)."""
    monkeypatch.setenv("MGPT4_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))  # made once
    d = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for random_weights in (False, True):
        argv = ["--recipe", recipe, *(["--preset", preset] if preset else [])]
        cfg, _ = bench.prepare(bench.parse_args(argv + (["--random-weights"] if random_weights else [])), d)
        assert not cfg.data.val.enabled() and cfg.train.eval_every == 0
        modes = bench.choose_modes(None, cfg)
        has_cache = cfg.model.qformer is not None
        assert modes == (list(bench.MODES) if has_cache else ["plain", "packed"])
        if preset == "small":
            assert cfg.model.llm.hidden_size == 512 and cfg.train.precision == "fp32"
            assert {cfg.model.precision.vit, cfg.model.precision.llm} == {"fp32"}
        if not has_cache:
            with pytest.raises(SystemExit, match="no Q-Former"):
                bench.choose_modes("plain,cached", cfg)


def test_the_bench_offers_stage1_recipes_only():
    assert "tiny_stage1" in bench.stage1_recipes() and "stage1_llama2_7b" in bench.stage1_recipes()
    assert not any("stage2" in r for r in bench.stage1_recipes())


def test_bench_help_names_the_module_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mgpt4.bench.train")
    assert "(default: 20)" in out and "(default: ds_configs/z2.json)" in out and "(default: config)" in out
    with pytest.raises(SystemExit):
        bench_data.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mgpt4.bench.data") and "(default: 1024)" in out


@pytest.mark.slow
def test_the_section_shows_every_benchmark():
    commands = benchmark_commands()
    for tool in ("python -m mgpt4.bench.data", "python -m mgpt4.bench.train", "bash tests/gpu/bench.sh"):
        assert any(tool in c for c in commands), tool
    assert any("--preset small --random-weights" in c for c in commands)  # the speed table's command


@pytest.mark.slow
@pytest.mark.parametrize("command", benchmark_commands())
def test_readme_benchmark_command_runs(command, tmp_path):
    proc = run(reduced(command, str(tmp_path)), str(tmp_path / "cache"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    if "mgpt4.bench.train" in command:
        modes = re.search(r"--modes (\S+)", command)
        for mode in modes.group(1).split(",") if modes else bench.MODES:
            row = rf"^\| {re.escape(mode)} \| (off|on) \| [0-9.]+ \| [0-9.]+ \|"
            assert re.search(row, out, re.M), (mode, out[-3000:])
            if "--compile both" in command:
                assert re.search(row.replace(re.escape(mode), re.escape(mode) + " compiled"), out, re.M), out[
                    -3000:
                ]
    elif "mgpt4.bench.data" in command:
        assert re.search(r"^speedup: [0-9.]+$", out, re.M), out[-3000:]
    elif "mgpt4.bench.serve" in command:
        assert re.search(r"^batched\s+4\s", out, re.M), out[-3000:]
        assert re.search(r"^speedup at 4: [0-9.]+$", out, re.M), out[-3000:]
    else:  # the GPU script in its CPU mode: every part ran and passed, and the table was written
        parts = (tmp_path / "gpu-bench" / "parts.txt").read_text().splitlines()
        assert parts and all(" rc=0 " in p for p in parts), parts
        assert {p.split()[0] for p in parts} == {
            "packing-test",
            "bench",
            "bench-compiled",
            "quantized",
            "serve",
        }
        table = (tmp_path / "gpu-bench" / "table.md").read_text()
        assert re.search(r"^\| packed\+cached \| on \|", table, re.M), table


def test_the_gpu_script_writes_what_it_measured_when_parts_fail(tmp_path):
    """Every part cut short by its timeout: each is recorded with its status, the next part still runs,
    the table is written, and the script's own status says something failed."""
    out = tmp_path / "gpu-bench"
    proc = run(
        f"OUT={out} PART_TIMEOUTS='1 1 1 1 1' bash tests/gpu/bench.sh --cpu",
        str(tmp_path / "cache"),
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    parts = (out / "parts.txt").read_text().splitlines()
    assert [p.split()[:2] for p in parts] == [
        ["packing-test", "rc=124"],
        ["bench", "rc=124"],
        ["bench-compiled", "rc=124"],
        ["quantized", "rc=124"],
        ["serve", "rc=124"],
    ], parts
    table = (out / "table.md").read_text()
    assert "bench (bench rc=124" in table and "(no table: see" in table
    assert (out / "device.txt").read_text().startswith("CPU")
