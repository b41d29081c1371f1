"""The data benchmark runs end to end at toy sizes and ends with the speedup line."""

from __future__ import annotations

import re
import subprocess
import sys


def test_benchmark_prints_every_figure_and_the_speedup_last(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "mgpt4.bench.data",
        "--workdir",
        str(tmp_path),
        "--n224",
        "64",
        "--nlarge",
        "8",
        "--batches",
        "1",
        "--batches-large",
        "1",
        "--repeats",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.strip().splitlines()
    rates = re.findall(r"(official|mgpt4)\s+samples/s per worker core: best (\d+)", out)
    assert [name for name, _ in rates] == ["official", "mgpt4"] * 2
    assert all(int(r) > 0 for _, r in rates)
    ratios = [float(x) for x in re.findall(r"per-core ratio mgpt4 / official on \S+: (\d+\.\d\d)", out)]
    assert len(ratios) == 2
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[1]) == min(ratios)
    assert "device-side work" in out
